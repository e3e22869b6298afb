"""Public API behaviour in one process: validation, targets, warnings, scaling, parity with torch.

Run: ``.venv/bin/python -m pytest tests/test_api.py``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import pathlib
import re
import warnings

import pytest
import torch
from torch import nn

import dist_clip
from dist_clip.testing import reference_norm


def _params(seed=0, sizes=((4, 3), (7,), (1000,)), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ps = [nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in sizes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g, dtype=dtype) * 3
    return ps


@pytest.mark.parametrize("bad", [-1.0, -0.5, math.nan, -math.inf, "-inf", "two", None, True, [2.0], object()])
def test_bad_norm_type_is_a_value_error(bad):
    with pytest.raises(ValueError, match="norm_type"):
        dist_clip.get_total_norm(_params(), bad)
    with pytest.raises(ValueError, match="norm_type"):
        dist_clip.clip_grad_norm_(_params(), 1.0, bad)


@pytest.mark.parametrize("good", [0, 1, 2, 2.5, math.inf, "inf", "Inf", torch.tensor(2.0)])
def test_accepted_norm_types(good):
    ps = _params()
    want = reference_norm([p.grad for p in ps], float(good))
    assert dist_clip.get_total_norm(ps, good).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("bad", [-1.0, math.nan, -1e-9])
def test_bad_max_norm_is_a_value_error(bad):
    with pytest.raises(ValueError, match="max_norm"):
        dist_clip.clip_grad_norm_(_params(), bad)


def test_max_norm_zero_zeroes_the_gradients_as_torch_does():
    """max_norm is "a number >= 0" (README), 0 included, as torch's: every gradient becomes 0."""
    ours, theirs = _params(), _params()
    total = dist_clip.clip_grad_norm_(ours, 0.0)
    want = torch.nn.utils.clip_grad_norm_(theirs, 0.0)
    assert total.item() == pytest.approx(want.item(), rel=1e-6) and total.item() > 0
    assert all(bool((p.grad == 0).all()) for p in ours) and all(bool((p.grad == 0).all()) for p in theirs)


@pytest.mark.parametrize("limit", [math.inf, torch.tensor(math.inf), torch.tensor(math.inf, dtype=torch.float64)])
@pytest.mark.parametrize("grads,p", [
    ([[2e3, 1.0], [0.5]], 100.0),  # finite entries whose 100th powers overflow float64: the total reads inf
    ([[math.inf, 1.0], [0.5]], 2.0),  # an inf entry
    ([[1e200, 1.0], [0.5]], 2.0),  # float64 gradients whose squares overflow float64
])
def test_an_infinite_max_norm_leaves_gradients_alone_when_the_total_is_inf(limit, grads, p):
    """max_norm=inf is no limit: the coefficient is 1 for an inf total too (inf / inf was NaN, as in torch's clip,
    and every gradient became NaN, the finite ones included: 'clip_grad_norm_(params, inf)' to measure only)."""
    dtype = torch.float64 if grads[0][0] == 1e200 else torch.float32
    gs = [torch.tensor(g, dtype=dtype) for g in grads]
    mine = [g.clone() for g in gs]
    total = dist_clip.clip_grad_norm_(mine, limit, p)
    assert total.item() == math.inf and all(torch.equal(a, b) for a, b in zip(mine, gs)), mine
    mine = [g.clone() for g in gs]
    dist_clip.clip_grads_with_norm_(mine, limit, dist_clip.get_total_norm(mine, p))
    assert all(torch.equal(a, b) for a, b in zip(mine, gs)), mine
    for mode in ("total", "per_param"):
        params = {f"w{i}": nn.Parameter(torch.zeros_like(g)) for i, g in enumerate(gs)}
        for q, g in zip(params.values(), gs):
            q.grad = g.clone()
        result = dist_clip.GradClipper(max_norm=math.inf, norm_type=p, mode=mode)(params)
        assert all(torch.equal(q.grad, g) for q, g in zip(params.values(), gs)), (mode, params)
        assert bool((result.clip_coef == 1).all()) and not bool(result.clipped), (mode, result)
    opt = torch.optim.SGD([{"params": [q], "max_norm": math.inf} for q in params.values()], lr=0.1)
    for q, g in zip(params.values(), gs):
        q.grad = g.clone()
    dist_clip.GradClipper(max_norm=1.0, norm_type=p, mode="per_group")(params, optimizer=opt)
    assert all(torch.equal(q.grad, g) for q, g in zip(params.values(), gs)), params
    params["w0"].grad = gs[0].clone()  # ZClip(max_norm=inf) in its warm-up clips nothing, as max_norm=None does
    dist_clip.GradClipper(max_norm=dist_clip.ZClip(max_norm=math.inf), norm_type=p)([params["w0"]])
    assert torch.equal(params["w0"].grad, gs[0])


def test_an_infinite_total_under_a_finite_or_nan_limit():
    """A finite max_norm float32 cannot hold (1e39) beside get_total_norm's float32 inf is a finite limit: 0 over
    the inf total, as 1e38's (it was inf / inf = NaN); a NaN total still makes the coefficient NaN, an infinite
    limit included."""
    g = torch.tensor([1e30, 1.0])
    total = dist_clip.get_total_norm([g * 1e10])
    assert total.dtype == torch.float32 and total.item() == math.inf
    for limit in (1e38, 1e39):
        mine = g.clone()
        dist_clip.clip_grads_with_norm_([mine], limit, total)
        assert mine.tolist() == [0.0, 0.0], (limit, mine)
    for limit in (1.0, math.inf):
        mine = g.clone()
        dist_clip.clip_grads_with_norm_([mine], limit, torch.tensor(math.nan))
        assert bool(mine.isnan().all()), (limit, mine)


@pytest.mark.parametrize("limit", [1.0, torch.tensor(1.0), torch.tensor(1.0, dtype=torch.float64)])
def test_a_finite_max_norm_as_a_tensor_or_per_parameter_zeroes_under_an_inf_total(limit):
    """Only an infinite limit leaves an inf total's gradients alone: a finite one, given as a tensor (device ops
    only: no host read) or as GradClipper's per-parameter limits (a tensor of them), is 0 over the inf total, as
    the float limit is (the inf entry becomes NaN, the finite ones 0); the finite parameter of
    per_param keeps its own coefficient (0.5 under 1: 1)."""
    gs = [torch.tensor([math.inf, 1.0]), torch.tensor([0.5])]
    mine = [g.clone() for g in gs]
    total = dist_clip.clip_grad_norm_(mine, limit)
    assert total.item() == math.inf
    assert bool(mine[0][0].isnan()) and mine[0][1].item() == 0.0 and mine[1].item() == 0.0, mine
    params = {f"w{i}": nn.Parameter(torch.zeros_like(g)) for i, g in enumerate(gs)}
    for q, g in zip(params.values(), gs):
        q.grad = g.clone()
    result = dist_clip.GradClipper(max_norm=float(limit), mode="per_param")(params)
    assert params["w0"].grad[1].item() == 0.0 and bool(params["w0"].grad[0].isnan()), params["w0"].grad
    assert params["w1"].grad.tolist() == [0.5] and result.clip_coef.tolist() == [0.0, 1.0], result


def test_mixed_float32_and_float64_gradients_give_a_float64_norm():
    """The returned norm is float64 where some gradient is float64 (README), in one process too: a float32
    result would round 2.2360679775 to 2.2360680103."""
    grads = [torch.ones(3), torch.full((2,), 1 + 2**-40, dtype=torch.float64)]
    total = dist_clip.get_total_norm(grads)
    want = reference_norm(grads, 2.0)
    assert total.dtype == torch.float64 and abs(total.item() - want) <= 1e-15 * want, (total.dtype, total.item())


@pytest.mark.parametrize("make, error, match", [
    (lambda g: dist_clip.Shards([g, g], names=["w"]), ValueError, "names"),
    (lambda g: dist_clip.Shards([g], loss_scale=0.0), ValueError, "loss_scale"),
    (lambda g: dist_clip.Shards([g], loss_scale=math.inf), ValueError, "loss_scale"),
    # (an int past float64's range was taken, then common_loss_scale's float() raised OverflowError in the call)
    (lambda g: dist_clip.Shards([g], loss_scale=10**400), ValueError, "loss_scale must be .* an int of 401 digits"),
    # (past 4300 digits str() refuses the int: Python's own "Exceeds the limit" ValueError came instead)
    (lambda g: dist_clip.Shards([g], loss_scale=10**5000), ValueError, "loss_scale must be .* an int of 5001 digits"),
    (lambda g: dist_clip.Shards([g], loss_scale=True), TypeError, "loss_scale"),
    (lambda g: dist_clip.Shards([g, 1.0]), TypeError, "tensors"),
    (lambda g: dist_clip.Shards([g], None, None), TypeError, "Shards.counted must be a bool"),
    (lambda g: dist_clip.Shards([g], None, "False"), TypeError, "Shards.counted must be a bool"),
    (lambda g: dist_clip.Shards([g], None, 2), TypeError, "Shards.counted must be a bool"),
    (lambda g: dist_clip.Shards([g], "world"), TypeError, "Shards.group must be a torch.distributed.ProcessGroup"),
    (lambda g: dist_clip.Shards([g, g.clone()], names="wb"), TypeError, "Shards.names must be a list of names"),
    (lambda g: dist_clip.Shards([g], names=[0]), TypeError, "Shards.names must hold str names, got a int"),
], ids=["names-one-short", "loss-scale-0", "loss-scale-inf", "loss-scale-10**400", "loss-scale-10**5000",
        "loss-scale-bool", "a-float-piece", "counted-none", "counted-str", "counted-2", "group-str", "names-a-str",
        "names-an-int"])
def test_the_shards_contract_refuses_bad_pieces_when_made(make, error, match):
    """What a custom adapter hands back is checked when made (README, Adding a framework): each of these was
    taken by a mutant (a loss scale of 0 or inf gave a total of inf or 0, True a total, names one short and a
    float piece went on to fail later, unclearly; counted=None was counted by no rank, a total of 0, and "False" by
    every rank, silently; a str group failed later with "'str' object has no attribute 'size'"; names="wb" named
    two pieces "w" and "b"; an int name failed in the per-parameter modes with "sequence item 0: expected str
    instance")."""
    with pytest.raises(error, match=match):
        make(torch.tensor([3.0, 4.0]))


def test_the_shards_contract_takes_a_counted_flag_of_another_bool_type():
    import numpy as np

    g = torch.tensor([3.0, 4.0])
    for flag, want in ((np.bool_(False), False), (1, True), (torch.tensor(False), False), (torch.tensor([True]), True)):
        made = dist_clip.Shards([g], None, flag)
        assert made.counted is want, (flag, made.counted)
    for flag in (2, -1, None, "False", torch.tensor([True, False])):  # an integer other than 0 or 1 is no flag
        with pytest.raises(TypeError, match="Shards.counted must be a bool"):
            dist_clip.Shards([g], None, flag)


def test_pieces_with_two_loss_scales_are_refused(monkeypatch):
    """One call's pieces share one loss scale: two were divided by an arbitrary one of them (3.54 for 2.5)."""
    from dist_clip import adapters
    from tests.custom_adapter import HandSharded

    monkeypatch.setattr(adapters, "ADAPTERS", ("tests.custom_adapter", *adapters.BUILT_IN))
    g = torch.tensor([3.0, 4.0])
    target = HandSharded([dist_clip.Shards([g], loss_scale=2.0), dist_clip.Shards([g.clone()], loss_scale=4.0)])
    with pytest.raises(ValueError, match="loss"):
        dist_clip.get_total_norm(target)


def test_a_non_finite_total_of_unnamed_adapter_pieces_is_reported_as_such(monkeypatch):
    """on_nonfinite="error" names the culprits; in mode "total" a user adapter's Shards need no names, but naming
    them went through the named modes, which called its shards() again and raised their ValueError ("Shards
    without a name for each piece ... mode='total' works without") in place of the non-finite RuntimeError."""
    from dist_clip import adapters
    from tests import custom_adapter
    from tests.custom_adapter import HandSharded

    calls = []
    shards = custom_adapter.shards
    monkeypatch.setattr(custom_adapter, "shards", lambda target, group: calls.append(1) or shards(target, group))
    monkeypatch.setattr(adapters, "ADAPTERS", ("tests.custom_adapter", *adapters.BUILT_IN))
    for names, culprit in (((), "<piece 1>"), (["a", "b"], "b")):
        g, h = torch.tensor([3.0, 4.0]), torch.tensor([1.0, math.nan])
        calls.clear()
        with pytest.raises(RuntimeError, match=f"non-finite gradients on rank 0: {culprit}. Every rank"):
            dist_clip.GradClipper(max_norm=1.0, on_nonfinite="error")(HandSharded([dist_clip.Shards([g, h],
                                                                                                   names=names)]))
        assert len(calls) == 1
        assert g.tolist() == [3.0, 4.0]


def test_one_tensor_in_two_shards_is_scaled_once(monkeypatch):
    """README (Adding a framework): one tensor object in two Shards counts and scales once; with the dedupe
    gone it was scaled twice (0.75 for 1.5)."""
    from dist_clip import adapters
    from tests.custom_adapter import HandSharded

    monkeypatch.setattr(adapters, "ADAPTERS", ("tests.custom_adapter", *adapters.BUILT_IN))
    g, h = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    total = dist_clip.clip_grad_norm_(HandSharded([dist_clip.Shards([g]), dist_clip.Shards([g, h])]), 6.5)
    assert total.item() == pytest.approx(13.0, rel=1e-6)
    coef = 6.5 / (13.0 + 1e-6)
    torch.testing.assert_close(g, torch.tensor([3.0, 4.0]) * coef)
    torch.testing.assert_close(h, torch.tensor([12.0]) * coef)
    g = torch.tensor([3.0, 4.0])  # listed twice in one Shards (another path: the one-Shards shortcut)
    assert dist_clip.clip_grad_norm_(HandSharded([dist_clip.Shards([g, g])]), 1.0).item() == pytest.approx(5.0)
    torch.testing.assert_close(g, torch.tensor([3.0, 4.0]) / (5.0 + 1e-6))
    # GradClipper's total mode measures through _slots.measure, whose list of counted pieces dedupes on its own
    # (with that dedupe gone: 13.93 for 13.0, and every gradient scaled by 6.5 / 13.93)
    g, h = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    result = dist_clip.GradClipper(max_norm=6.5)(HandSharded([dist_clip.Shards([g]), dist_clip.Shards([g, h])]))
    assert result.total_norm.item() == pytest.approx(13.0, rel=1e-6)
    torch.testing.assert_close(g, torch.tensor([3.0, 4.0]) * coef)
    torch.testing.assert_close(h, torch.tensor([12.0]) * coef)


def test_an_adapter_handing_over_parameters_instead_of_gradients_is_refused(monkeypatch):
    """README (Adding a framework): Shards hold gradient pieces. An adapter giving the parameters themselves (as
    the top-level API takes them) had their values measured (6.0 for 1.0) and the weights scaled in place (3.0 to
    0.5), the gradients left alone, silently. Gradients made with create_graph=True (not leaves) still pass."""
    from dist_clip import adapters
    from tests.custom_adapter import HandSharded

    monkeypatch.setattr(adapters, "ADAPTERS", ("tests.custom_adapter", *adapters.BUILT_IN))
    w = torch.nn.Parameter(torch.full((4,), 3.0))
    w.grad = torch.full((4,), 0.5)
    for call in (lambda t: dist_clip.clip_grad_norm_(t, 1.0), lambda t: dist_clip.GradClipper(mode="per_param")(t)):
        with pytest.raises(TypeError, match=r"tests.custom_adapter: shards\(\) gave a parameter .* pass its .grad"):
            call(HandSharded([dist_clip.Shards([w], names=["w"])]))
        assert w.detach().eq(3.0).all() and w.grad.eq(0.5).all()
    x = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    (g,) = torch.autograd.grad(x.pow(2).sum(), x, create_graph=True)  # [2, 4], not a leaf
    assert dist_clip.get_total_norm(HandSharded([dist_clip.Shards([g])])).item() == pytest.approx(20 ** 0.5)


def test_an_adapter_added_to_the_adapters_tuple_in_its_file_names_its_pieces(tmp_path):
    """README (Adding a framework): "Add the module to the ADAPTERS tuple in dist_clip/adapters/__init__.py". BUILT_IN
    was that very tuple, so the added module counted as shipped: the per-parameter modes and reports ignored its
    Shards' names (TypeError "cannot name the gradients of a HandSharded per parameter"), and a misspelled one
    was passed over. Done here on a copy of the package, edited as README says."""
    import pathlib
    import shutil
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    shutil.copytree(root / "dist_clip", tmp_path / "dist_clip", ignore=shutil.ignore_patterns("__pycache__"))
    init = tmp_path / "dist_clip" / "adapters" / "__init__.py"
    text = init.read_text()
    marker = 'ADAPTERS: tuple[str, ...] = (\n'
    assert text.count(marker) == 1
    init.write_text(text.replace(marker, marker + '    "tests.custom_adapter",\n'))
    child = (
        "import torch, dist_clip\n"
        "from tests.custom_adapter import HandSharded\n"
        f"assert dist_clip.__file__.startswith({str(tmp_path)!r})\n"
        "t = HandSharded([dist_clip.Shards([torch.tensor([3.0, 4.0]), torch.tensor([12.0])], names=['w', 'b'])])\n"
        "print(sorted(dist_clip.GradClipper(mode='per_param', report=True, max_norm=1e9)(t).norms.items()))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])}
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[('b', 12.0), ('w', 5.0)]", out.stdout


@pytest.mark.parametrize("piece", ["slice", "flat_view", "view_of_view"])
def test_an_adapter_handing_over_slices_of_parameters_is_refused(monkeypatch, piece):
    """README (Adding a framework): a slice or view of a parameter (what a sharded adapter cuts, where the slice of
    its .grad belongs) is a parameter given as a piece too. Only leaves were refused: pieces w[2:4] of a (4, 3)
    weight of ones on two ranks gave 3.46 for 1.73 and the weights were scaled in place (1.0 to 0.144), the
    gradients left alone, silently. A view of a create_graph gradient (not of a leaf) still passes."""
    from dist_clip import adapters
    from tests.custom_adapter import HandSharded

    monkeypatch.setattr(adapters, "ADAPTERS", ("tests.custom_adapter", *adapters.BUILT_IN))
    w = torch.nn.Parameter(torch.full((4, 3), 1.0))
    w.grad = torch.full((4, 3), 0.5)
    made = {"slice": lambda: w[2:4], "flat_view": lambda: w.view(-1), "view_of_view": lambda: w.view(-1)[3:9]}[piece]
    for call in (lambda t: dist_clip.clip_grad_norm_(t, 0.5), lambda t: dist_clip.GradClipper(mode="per_param")(t)):
        with pytest.raises(TypeError, match=r"tests.custom_adapter: shards\(\) gave a parameter .* pass its .grad"):
            call(HandSharded([dist_clip.Shards([made()], names=["w"])]))
        assert w.detach().eq(1.0).all() and w.grad.eq(0.5).all()
    x = torch.nn.Parameter(torch.tensor([1.0, 2.0, 2.0]))
    (g,) = torch.autograd.grad(x.pow(2).sum(), x, create_graph=True)  # [2, 4, 4], not a leaf
    assert dist_clip.get_total_norm(HandSharded([dist_clip.Shards([g[1:]])])).item() == pytest.approx(32 ** 0.5)


@pytest.mark.parametrize("listed", ["tests.custom_adaptr", "tests_typo.custom_adapter"])
def test_an_adapter_module_that_does_not_import_is_an_error(monkeypatch, listed):
    """README (Adding a framework): a user's adapter module listed in ADAPTERS that does not import (a typo, a
    package missing from a worker's path) was passed over as absent: a module it should have taken was read by
    the built-in adapter as plain parameters (each rank its own norm, silently), anything else was "does not know
    how to find gradients", which did not say why. Built-in adapter modules may still be absent."""
    from dist_clip import adapters
    from tests.custom_adapter import HandModule, HandSharded

    monkeypatch.setattr(adapters, "ADAPTERS", (listed, *adapters.BUILT_IN))
    for target in (HandModule([dist_clip.Shards([torch.ones(3)])]), HandSharded([dist_clip.Shards([torch.ones(3)])])):
        with pytest.raises(ModuleNotFoundError, match=f"ADAPTERS lists '{listed}', which cannot be imported"):
            dist_clip.get_total_norm(target)
        with pytest.raises(ModuleNotFoundError, match="cannot be imported"):
            dist_clip.GradClipper(mode="per_param")(target)
    monkeypatch.setattr(adapters, "ADAPTERS", ("dist_clip.adapters.absent", *adapters.BUILT_IN))
    monkeypatch.setattr(adapters, "BUILT_IN", ("dist_clip.adapters.absent", *adapters.BUILT_IN))
    assert dist_clip.get_total_norm([torch.tensor([3.0, 4.0])]).item() == 5.0


@pytest.mark.parametrize(
    "bad", ["1.0", None, [1.0], True, torch.tensor([1.0, 2.0]), torch.tensor(True), torch.tensor(1 + 0j)]
)
def test_non_numeric_max_norm_is_a_type_error(bad):
    with pytest.raises(TypeError, match="max_norm"):
        dist_clip.clip_grad_norm_(_params(), bad)


@pytest.mark.parametrize("max_norm", [torch.tensor(1), torch.tensor([2], dtype=torch.int32), torch.tensor(0.5)])
def test_max_norm_as_a_tensor_of_any_real_dtype(max_norm):
    """As torch.nn.utils.clip_grad_norm_ takes it: an integer tensor is a number too."""
    ours, theirs, before = _params(), _params(), _params()
    total = dist_clip.clip_grad_norm_(ours, max_norm)
    torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    want = reference_norm([p.grad for p in before])
    assert total.item() == pytest.approx(want, rel=1e-6)
    coef = float(max_norm) / (want + 1e-6)
    assert coef < 1
    for a, b, c in zip(ours, theirs, before):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.grad.double(), c.grad.double() * coef, rtol=1e-6, atol=1e-7)


def test_arguments_have_torch_nn_utils_names():
    """Keyword calls written for torch.nn.utils work unchanged."""
    want = reference_norm([p.grad for p in _params()], 1.0)
    assert dist_clip.get_total_norm(tensors=[p.grad for p in _params()], norm_type=1.0).item() == pytest.approx(
        want, rel=1e-6
    )
    ps = _params()
    total = dist_clip.clip_grad_norm_(parameters=ps, max_norm=1.0, norm_type=1.0, error_if_nonfinite=True,
                                      foreach=None)
    assert total.item() == pytest.approx(want, rel=1e-6)
    ps = _params()
    dist_clip.clip_grads_with_norm_(parameters=ps, max_norm=1.0, total_norm=total, foreach=None)
    assert reference_norm([p.grad for p in ps], 1.0) == pytest.approx(1.0, rel=1e-5)


def test_total_norm_of_several_values_is_a_value_error():
    with pytest.raises(ValueError, match="total_norm.*shape \\(2,\\)"):
        dist_clip.clip_grads_with_norm_(_params(), 1.0, torch.tensor([1.0, 2.0]))
    # no value at all is no norm either (it reached the reshape to 0-dim: torch's RuntimeError)
    with pytest.raises(ValueError, match="total_norm.*shape \\(0,\\)"):
        dist_clip.clip_grads_with_norm_(_params(), 1.0, torch.tensor([]))


def test_a_total_norm_given_as_a_number_is_taken_in_float64():
    """A Python number is a float64 total (as get_total_norm returns for float64 gradients): rounded to float32
    it clipped float64 gradients by 1 / 5.0 for a total of 5.000000001, and zeroed them for 1e39 (inf in
    float32) where the coefficient is 1e-39."""
    g = [torch.tensor([3.0, 4.0], dtype=torch.float64)]
    dist_clip.clip_grads_with_norm_(g, 1.0, 5.000000001)
    torch.testing.assert_close(g[0], torch.tensor([3.0, 4.0], dtype=torch.float64) / (5.000000001 + 1e-6),
                               rtol=1e-15, atol=0)
    g = [torch.tensor([3.0, 4.0], dtype=torch.float64)]
    dist_clip.clip_grads_with_norm_(g, 1.0, 1e39)
    assert g[0].tolist() == [pytest.approx(3e-39, rel=1e-12), pytest.approx(4e-39, rel=1e-12)]


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_total_norm_of_one_value_in_any_shape(shape, foreach):
    ps = _params()
    total = dist_clip.get_total_norm(ps)
    dist_clip.clip_grads_with_norm_(ps, 1.0, total.reshape(shape), foreach=foreach)
    assert reference_norm([p.grad for p in ps]) == pytest.approx(1.0, rel=1e-5)


def test_bad_foreach_and_target():
    with pytest.raises(TypeError, match="foreach"):
        dist_clip.get_total_norm(_params(), foreach="yes")
    with pytest.raises(TypeError, match="target"):
        dist_clip.get_total_norm(None)
    with pytest.raises(TypeError, match="expected tensors"):
        dist_clip.get_total_norm([1.0, 2.0])


def test_mapping_target_and_bad_total_norm_are_type_errors():
    # A dict iterates its keys: "got str at 0" said nothing of the mapping.
    with pytest.raises(TypeError, match=r"got a dict \(iterating it gives its keys\)"):
        dist_clip.clip_grad_norm_({"w": _params()[0]}, 1.0)
    g = [torch.tensor([3.0, 4.0])]
    for bad in ("5", None, True, [5.0]):  # a string was parsed as 5 and clipped by it
        with pytest.raises(TypeError, match="total_norm must be a real number"):
            dist_clip.clip_grads_with_norm_(g, 1.0, bad)
    assert g[0].tolist() == [3.0, 4.0]


def test_a_total_norm_that_is_no_norm_is_refused():
    """A negative total flipped every gradient's sign (coefficient 1 / -5), -inf zeroed them, and a complex
    5+0j was taken for 5: none is a norm. NaN passes (get_total_norm returns it for NaN gradients, and torch
    multiplies by the NaN coefficient the same way)."""
    g = [torch.tensor([3.0, 4.0])]
    for bad in (-5.0, -math.inf, torch.tensor(-1.0), torch.tensor([-0.5])):
        with pytest.raises(ValueError, match=r"total_norm must be a norm \(>= 0, or NaN\)"):
            dist_clip.clip_grads_with_norm_(g, 1.0, bad)
    for bad in (torch.tensor(5 + 0j), torch.tensor(True)):
        with pytest.raises(TypeError, match="one-value real tensor"):
            dist_clip.clip_grads_with_norm_(g, 1.0, bad)
    assert g[0].tolist() == [3.0, 4.0]
    for zero in (0.0, torch.tensor(0.0), torch.tensor([0.0], dtype=torch.float64)):  # a norm: all-zero gradients
        dist_clip.clip_grads_with_norm_(g, 1.0, zero)
    assert g[0].tolist() == [3.0, 4.0]
    dist_clip.clip_grads_with_norm_(g, 1.0, float("nan"))
    assert g[0].isnan().all()


def test_numpy_zero_dim_arrays_are_numbers_as_in_torch():
    """torch.nn.utils takes 0-dim numpy arrays as max_norm and norm_type (np.array(0.5)); they were refused."""
    import numpy as np

    for max_norm, norm_type in ((np.array(0.5), np.array(2.0)), (np.float32(0.5), np.int64(1))):
        ours, theirs = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
        ours.grad, theirs.grad = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])
        got = dist_clip.clip_grad_norm_([ours], max_norm, norm_type)
        want = torch.nn.utils.clip_grad_norm_([theirs], max_norm, norm_type)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(ours.grad, theirs.grad)
        assert ours.grad.abs().sum().item() < 5.0  # clipped
    g = [torch.tensor([3.0, 4.0])]
    dist_clip.clip_grads_with_norm_(g, np.array(1.0), np.array(5.0))
    torch.testing.assert_close(g[0], torch.tensor([3.0, 4.0]) / (5.0 + 1e-6))
    with pytest.raises(TypeError, match="max_norm must be a real number"):
        dist_clip.clip_grad_norm_(g, np.array([0.5, 0.5]))


def test_a_list_of_parameters_takes_the_fast_path_only_where_it_gives_the_general_paths_shards():
    """shards() of a list of distinct parameters, each with a plain gradient of its own, skips named_grads' (name,
    gradient) pairs (_listed_parameters): the same Shards (tensors, names, group) as named_grads then
    shards_of_grads give; every other list (a gradient None, shared, a plain tensor or a DTensor-like subclass
    listed, a parameter listed twice, one a sharding wrapper marks) takes the general path."""
    from dist_clip.adapters import params as adapter

    ps = [nn.Parameter(torch.randn(3)) for _ in range(4)]
    for p in ps:
        p.grad = torch.randn(3)
    fast = adapter._listed_parameters(list(ps), None)
    general = adapter.shards_of_grads(adapter.named_grads(list(ps)), None)
    assert fast is not None and len(fast) == len(general) == 1
    assert [id(t) for t in fast[0].tensors] == [id(p.grad) for p in ps] == [id(t) for t in general[0].tensors]
    assert list(fast[0].names) == list(general[0].names) == ["0", "1", "2", "3"]
    assert (fast[0].group, fast[0].counted) == (general[0].group, general[0].counted)

    class Sub(torch.Tensor):
        pass

    none, shared = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    shared.grad = ps[0].grad
    sub = nn.Parameter(torch.randn(3))
    sub.grad = torch.randn(3).as_subclass(Sub)
    for items in ([*ps, none], [*ps, shared], [*ps, torch.randn(3)], [*ps, ps[0]], [*ps, sub], []):
        assert adapter._listed_parameters(items, None) is None
    # A parameter a sharding wrapper marks (FSDP1 here: its gradient may be a shard) takes the general path, which
    # refuses it as it refuses a module's (the fast path would have measured the shard as a whole tensor).
    flat = nn.Parameter(torch.randn(3))
    flat.grad, flat._fsdp_flattened = torch.randn(3), True
    assert adapter._listed_parameters([*ps, flat], None) is None
    with pytest.raises(ValueError, match="managed by FSDP1"):
        dist_clip.clip_grad_norm_([*ps, flat], 1.0)


def test_a_list_of_marked_parameters_beside_a_plain_gradient_reads_each_as_it_is():
    """A list whose items are every one marked ``_is_param`` (FSDP2's DTensor parameters; any tensor subclass that
    ``nn.Parameter`` wraps) is read as their ``.grad`` in one pass; one with a plain gradient beside them takes the
    per-item path, where that gradient counts as itself (read as a parameter, its ``.grad`` None, it was left out
    of the norm: 3.46 for 6.93)."""

    class Marked(torch.Tensor):
        pass

    p = nn.Parameter(torch.zeros(3).as_subclass(Marked))
    assert getattr(p, "_is_param", False) and type(p) is Marked
    p.grad = torch.full((3,), 2.0).as_subclass(Marked)
    g = torch.full((4,), 3.0)
    want = reference_norm([p.grad.as_subclass(torch.Tensor), g], 2.0)
    assert dist_clip.get_total_norm([p, g]).item() == pytest.approx(want, rel=1e-6)
    assert dist_clip.get_total_norm([p]).item() == pytest.approx(math.sqrt(12.0), rel=1e-6)


@pytest.mark.parametrize("case", ["a parameter beside its own grad", "two parameters sharing one grad"])
def test_a_gradient_reached_twice_counts_once(case):
    """[p, p.grad, q] (or two parameters given one gradient tensor) counted p's gradient twice in the norm while
    the in-place scaling touched it once: the clipped gradients' norm was not max_norm."""
    p, q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    p.grad, q.grad = torch.tensor([3.0, 4.0, 12.0]), torch.tensor([6.0, 8.0])
    if case == "a parameter beside its own grad":
        target, grads = [p, p.grad, q], [p.grad, q.grad]
    else:
        r = nn.Parameter(torch.zeros(3))
        r.grad = p.grad
        target, grads = [p, r, q], [p.grad, q.grad]
    want = reference_norm(grads, 2.0)
    assert dist_clip.get_total_norm(target).item() == pytest.approx(want, rel=1e-6)
    saved = [g.clone() for g in grads]
    total = dist_clip.clip_grad_norm_(target, 1.0)
    assert total.item() == pytest.approx(want, rel=1e-6)
    assert reference_norm(grads, 2.0) == pytest.approx(1.0, rel=1e-5)
    for g, s in zip(grads, saved):  # per_param: p's gradient is one slot, scaled once to its limit
        g.copy_(s)
    result = dist_clip.GradClipper(max_norm=1.0, mode="per_param")(target)
    assert [reference_norm([g], 2.0) for g in grads] == pytest.approx([1.0, 1.0], rel=1e-5), result.slots


def test_group_without_process_group_is_a_value_error():
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="not initialized"):
        dist_clip.get_total_norm(_params(), group=object())


def test_distributed_options_are_keyword_only():
    with pytest.raises(TypeError):
        dist_clip.get_total_norm(_params(), 2.0, False, None, None)  # group positionally
    with pytest.raises(TypeError):
        dist_clip.clip_grad_norm_(_params(), 1.0, 2.0, False, None, None)


def test_return_is_a_scalar_on_grad_device_float64_only_for_float64_grads():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        total = dist_clip.get_total_norm(_params(dtype=dtype))
        want = torch.float64 if dtype == torch.float64 else torch.float32
        assert total.dtype == want and total.dim() == 0 and total.device.type == "cpu"


def test_float64_gradients_keep_float64_precision():
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=g, dtype=torch.float64) * 10.0**k for n, k in ((1000, 3), (17, -2), (64, 0))]
    want = torch.linalg.vector_norm(torch.cat(grads))
    before = [x.clone() for x in grads]
    total = dist_clip.clip_grad_norm_(grads, 1.0)
    assert total.dtype == torch.float64 and abs(total.item() - want.item()) <= 1e-14 * want.item()
    coef = 1.0 / (want + 1e-6)
    for after, old in zip(grads, before):
        torch.testing.assert_close(after, old * coef, rtol=1e-14, atol=0)


@pytest.mark.parametrize("target", ["list", "generator", "module", "tensor", "grads"])
def test_target_forms(target):
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    model(torch.randn(8, 5)).square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    want = reference_norm(grads)
    forms = {
        "list": list(model.parameters()),
        "generator": model.parameters(),
        "module": model,
        "tensor": model[0].weight,
        "grads": [g.clone() for g in grads],
    }
    if target == "tensor":
        want = reference_norm([model[0].weight.grad])
    assert dist_clip.get_total_norm(forms[target]).item() == pytest.approx(want, rel=1e-6)


def test_none_grads_are_skipped_and_tied_weights_count_once():
    net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    net[1].weight = net[0].weight  # tied
    model = nn.ModuleDict({"net": net, "unused": nn.Linear(3, 3)})  # "unused" never runs: grads stay None
    net(torch.tensor([1, 2, 3])).sum().backward()
    want = reference_norm([net[0].weight.grad])
    assert model["unused"].weight.grad is None
    assert dist_clip.get_total_norm(model).item() == pytest.approx(want, rel=1e-6)


class _CustomParameter(nn.Parameter):
    """A Parameter subclass, as quantisation libraries define them (e.g. bitsandbytes' Int8Params)."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("form", ["module", "parameters", "list"])
def test_frozen_parameter_subclass_is_a_parameter_not_a_gradient(dtype, form):
    """A frozen weight of an nn.Parameter subclass has no gradient: it must be neither measured nor scaled."""
    model = nn.Linear(4, 4)
    model.weight = _CustomParameter(torch.full((4, 4), 100).to(dtype), requires_grad=False)
    model.bias.grad = torch.ones(4)
    target = {"module": model, "parameters": model.parameters(), "list": [model.weight, model.bias]}[form]
    total = dist_clip.clip_grad_norm_(target, 1.0)
    assert total.item() == pytest.approx(2.0, rel=1e-6)
    assert torch.equal(model.weight, torch.full((4, 4), 100).to(dtype))
    torch.testing.assert_close(model.bias.grad, torch.full((4,), 1 / (2 + 1e-6)))


def test_a_view_of_a_parameter_is_not_a_gradient():
    """p.view(-1) requires grad and has a grad_fn, like a create_graph gradient, but it is a parameter's view: its
    .grad is None and it is skipped, as torch skips it; the weight itself is neither measured nor scaled."""
    lin = nn.Linear(2, 2)
    lin.weight.grad = torch.ones(2, 2)
    lin.bias.grad = torch.ones(2)
    weight = lin.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that a non-leaf's .grad is read
        total = dist_clip.clip_grad_norm_([lin.weight.view(-1), lin.bias], 0.1)
    assert total.item() == pytest.approx(math.sqrt(2), rel=1e-6)
    assert torch.equal(lin.weight.detach(), weight)


def test_gradients_made_with_create_graph_are_gradients():
    """backward(create_graph=True) leaves gradients that require grad (and have a grad_fn): passed as tensors
    they are measured themselves, as torch.nn.utils.get_total_norm measures them; parameters still count by
    their .grad."""
    w = nn.Parameter(torch.arange(1.0, 7.0))
    x = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0])
    (w.pow(3) * x).sum().backward(create_graph=True)
    assert w.grad.requires_grad and w.grad.grad_fn is not None
    want = reference_norm([w.grad.detach()])
    assert dist_clip.get_total_norm([w.grad]).item() == pytest.approx(want, rel=1e-6)
    assert dist_clip.get_total_norm([w]).item() == pytest.approx(want, rel=1e-6)
    leaf = torch.ones(3, requires_grad=True)  # a leaf that requires grad is a parameter: its .grad counts
    leaf.grad = torch.full((3,), 2.0)
    assert dist_clip.get_total_norm([leaf]).item() == pytest.approx(math.sqrt(12), rel=1e-6)
    # Silently in the named modes too (they read .grad of every listed tensor: torch warned "The .grad attribute
    # of a Tensor that is not a leaf Tensor is being accessed" for this gradient)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = dist_clip.GradClipper(mode="per_param", report=True)([w.grad])
    assert result.norms == {"0": pytest.approx(want, rel=1e-6)}
    w.grad = None  # break the reference cycle create_graph makes


def test_a_non_leaf_given_retain_grad_counts_by_its_grad():
    """An activation kept with retain_grad() (adversarial training on embeddings) is clipped by its .grad, as
    torch does: its values were measured (7.10 for 14.20) and scaled in place, its gradient left unclipped."""
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    for call in ("get_total_norm", "clip", "clipper"):
        h = w * 2
        h.retain_grad()
        h.pow(2).sum().backward()
        values, grad = h.detach().clone(), h.grad.clone()
        want = reference_norm([grad])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (reading a retained .grad does not warn)
            if call == "get_total_norm":
                got = dist_clip.get_total_norm([h])
            elif call == "clip":
                got = dist_clip.clip_grad_norm_([h], 1.0)
            else:
                got = dist_clip.GradClipper(max_norm=1.0, mode="per_param", report=True)({"h": h}).total_norm
        assert got.item() == pytest.approx(want, rel=1e-6), call
        assert torch.equal(h.detach(), values), call
        if call != "get_total_norm":
            assert torch.allclose(h.grad, grad / want, rtol=1e-5), call
        w.grad = None


def test_create_graph_gradients_that_are_views_are_gradients():
    """autograd.grad(create_graph=True) hands back some gradients as views (the gradient of w.sum() is an expand
    of a scalar) and slices of such gradients are views too: their base is not a leaf, so they are gradients."""
    w = nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    b = nn.Parameter(torch.randn(3, generator=torch.Generator().manual_seed(1)))
    gw, gb = torch.autograd.grad(w.sum() ** 2 + (b**2).sum(), [w, b], create_graph=True)
    assert gw._is_view() and gw.grad_fn is not None
    for tensors in ([gw, gb], [gw], [gb[:2]]):
        want = reference_norm([t.detach() for t in tensors])
        assert dist_clip.get_total_norm(tensors).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("how", ["clip_grad_norm_", "foreach=False", "clip_grads_with_norm_", "per_param", "bf16 x40"])
def test_gradients_whose_elements_share_memory_are_clipped(how):
    """autograd.grad gives the gradient of a bias summed into the loss as an expand (stride 0): measured right,
    then torch's mul_ refused it ("more than one element of the written-to tensor refers to a single memory
    location") after the other gradients were scaled, half-clipped. Each memory location is now scaled once,
    so every element is multiplied by the coefficient once."""
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if how == "bf16 x40" else torch.float32
    w = nn.Parameter(torch.randn(4, 3, generator=gen, dtype=dtype))
    b = nn.Parameter(torch.randn(3, generator=gen, dtype=dtype))
    gw, gb = torch.autograd.grad((w * 2).sum() + b.sum() * 3, [w, b])
    assert 0 in gb.stride()
    wide = torch.full((1, 5), 7.0, dtype=dtype).expand(6, 5)  # stride 0 on a dim of 6 (native path with bf16)
    grads = [gw, gb, wide]
    if how == "bf16 x40":
        grads += [torch.full((4,), float(i % 5), dtype=dtype) for i in range(40)]
    before = [g.double().clone() for g in grads]
    want = reference_norm(before)
    coef = 1.0 / (want + 1e-6)
    if how == "clip_grads_with_norm_":
        total = dist_clip.get_total_norm(grads)
        dist_clip.clip_grads_with_norm_(grads, 1.0, total)
    elif how == "per_param":
        result = dist_clip.GradClipper(max_norm=1.0, mode="per_param")({f"g{i}": g for i, g in enumerate(grads)})
        total = result.total_norm
    else:
        total = dist_clip.clip_grad_norm_(grads, 1.0, foreach=False if how == "foreach=False" else None)
    assert total.item() == pytest.approx(want, rel=1e-5 if dtype == torch.bfloat16 else 1e-6)
    for g, old in zip(grads, before):
        c = 1.0 / (reference_norm([old]) + 1e-6) if how == "per_param" else coef
        torch.testing.assert_close(g.double(), old * min(1.0, c), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                                   atol=0)


@pytest.mark.parametrize("empty", [[], "generator", "module"])
def test_empty_target_gives_zero_with_a_warning(empty):
    target = {"generator": (p for p in []), "module": nn.ReLU()}.get(empty, []) if empty != [] else []
    with pytest.warns(UserWarning, match="no gradients"):
        total = dist_clip.clip_grad_norm_(target, 1.0)
    assert total.item() == 0.0 and total.dtype == torch.float32


def test_the_empty_target_warning_names_the_callers_line():
    """A fixed stacklevel pointed into torch's wrappers of the entry points (torch/_dynamo/eval_frame.py), so
    Python's default filter printed the warning once per process for every call site."""
    for call in (lambda: dist_clip.clip_grad_norm_([], 1.0), lambda: dist_clip.get_total_norm([])):
        with pytest.warns(UserWarning, match="no gradients") as seen:
            call()
        assert [w.filename for w in seen] == [__file__], [w.filename for w in seen]


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_clip_scales_in_place_in_own_dtype(p, dtype):
    ps = _params(dtype=dtype, sizes=((30, 20), (5000,), (3,)))
    before = [x.grad.clone() for x in ps]
    ptrs = [x.grad.data_ptr() for x in ps]
    ref_total = reference_norm(before, p)
    total = dist_clip.clip_grad_norm_(ps, 0.5, p)
    assert total.item() == pytest.approx(ref_total, rel=1e-5)
    coef = min(1.0, 0.5 / (ref_total + 1e-6))
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]  # one rounding in own dtype
    for x, b, ptr in zip(ps, before, ptrs):
        assert x.grad.dtype == dtype and x.grad.data_ptr() == ptr
        # fp16 results below 6.1e-5 are subnormal: their spacing (6e-8) bounds the absolute error there.
        atol = 6e-8 if dtype == torch.float16 else 0.0
        torch.testing.assert_close(x.grad.double(), b.double() * coef, rtol=tol, atol=atol)
    assert reference_norm([x.grad for x in ps], p) == pytest.approx(0.5, rel=20 * tol)


def test_no_clip_needed_skips_the_scaling_pass_on_cpu(monkeypatch):
    ps = _params()
    calls = []
    monkeypatch.setattr(torch, "_foreach_mul_", lambda *a, **k: calls.append(a))
    before = [x.grad.clone() for x in ps]
    dist_clip.clip_grad_norm_(ps, 1e9)
    assert calls == []
    for x, b in zip(ps, before):
        assert torch.equal(x.grad, b)
    dist_clip.clip_grad_norm_(ps, 1e-3)
    assert len(calls) == 1  # one fused call for the one (device, dtype) group


def test_scaling_is_grouped_by_device_and_dtype(monkeypatch):
    ps = _params(sizes=((3,), (4,))) + _params(sizes=((5,),), dtype=torch.bfloat16)
    seen = []
    real = torch._foreach_mul_
    monkeypatch.setattr(torch, "_foreach_mul_", lambda ts, c: (seen.append({t.dtype for t in ts}), real(ts, c)))
    dist_clip.clip_grad_norm_(ps, 1e-3)
    assert sorted(map(sorted, seen), key=str) == sorted([[torch.float32], [torch.bfloat16]], key=str)


def test_foreach_false_and_true_scale_the_same():
    a, b = _params(seed=3), _params(seed=3)
    ta = dist_clip.clip_grad_norm_(a, 0.1, foreach=False)
    tb = dist_clip.clip_grad_norm_(b, 0.1, foreach=True)
    assert ta.item() == tb.item()
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)


def test_matches_torch_where_torch_is_right():
    for p in (1.0, 2.0, math.inf):
        a, b = _params(seed=5), _params(seed=5)
        ours = dist_clip.clip_grad_norm_(a, 1.0, p)
        theirs = torch.nn.utils.clip_grad_norm_(b, 1.0, p)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
        for x, y in zip(a, b):
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)


def test_building_blocks_compose_to_clip_grad_norm():
    a, b = _params(seed=7), _params(seed=7)
    total = dist_clip.get_total_norm(a, 2.0)
    dist_clip.clip_grads_with_norm_(a, 1.0, total)
    dist_clip.clip_grad_norm_(b, 1.0, 2.0)
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)
    c = _params(seed=7)
    dist_clip.clip_grads_with_norm_(c, 1.0, float(total))  # a plain float total works too
    for x, y in zip(c, b):
        assert torch.equal(x.grad, y.grad)


def test_error_if_nonfinite():
    ps = _params()
    ps[1].grad[0] = math.nan
    with pytest.raises(RuntimeError, match="error_if_nonfinite=False"):
        dist_clip.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
    ps[1].grad[0] = math.inf
    with pytest.raises(RuntimeError, match="non-finite"):
        dist_clip.get_total_norm(ps, 2.0, error_if_nonfinite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isinf(dist_clip.get_total_norm(ps, 2.0).item())  # without the flag: just the value


def test_nonfinite_total_scales_like_torch():
    a, b = _params(seed=9), _params(seed=9)
    for ps in (a, b):
        ps[0].grad[0, 0] = math.inf
    dist_clip.clip_grad_norm_(a, 1.0)
    torch.nn.utils.clip_grad_norm_(b, 1.0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, equal_nan=True)


def test_ddp_module_on_one_rank_is_plain():
    # A one-rank DDP still needs a process group; the distributed tier covers DDP across ranks. Here the
    # adapter must at least see through .module for a non-initialised wrapper-like object.
    model = nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    assert dist_clip.get_total_norm(model).item() == pytest.approx(
        reference_norm([p.grad for p in model.parameters()]), rel=1e-6
    )


def test_import_needs_torch_only():
    import subprocess
    import sys

    code = (
        "import sys, dist_clip\n"
        "bad = [m for m in ('deepspeed', 'fairscale', 'mpi4py', 'yaml', 'matplotlib') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_complex64_moduli_beyond_float32_range_or_subnormal_are_exact(p):
    """|3e38+3e38j| overflowed float32 (the total read inf as a non-finite: error_if_nonfinite raised, the
    gradients were zeroed); subnormal moduli lost digits (2.5e-4 relative on 1000 of 1e-42+1e-42j)."""
    big = torch.tensor([3e38 + 3e38j, 1.0 + 0j], dtype=torch.complex64)
    want = torch.linalg.vector_norm(big.to(torch.complex128), p).item()
    assert math.isfinite(want) and want > 3.4e38
    grad = big.clone()
    dist_clip.clip_grad_norm_([grad], 1.0, p, error_if_nonfinite=True)
    torch.testing.assert_close(grad.to(torch.complex128), big.to(torch.complex128) / (want + 1e-6), rtol=1e-6,
                               atol=0)
    tiny = torch.full((1000,), 1e-42 + 1e-42j, dtype=torch.complex64)
    want = torch.linalg.vector_norm(tiny.to(torch.complex128), p).item()
    assert dist_clip.get_total_norm([tiny], p).item() == pytest.approx(want, rel=2e-6)  # float32's rounding


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0, 3.5, math.inf])
def test_complex_gradients_measure_by_modulus_and_scale(p):
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(300, generator=g, dtype=torch.complex64), torch.randn(7, 3, generator=g),
             torch.tensor([0j, 3 + 4j], dtype=torch.complex64)]
    want = torch.linalg.vector_norm(torch.cat([x.reshape(-1).to(torch.complex128) for x in grads]), p).item()
    before = [x.clone() for x in grads]
    total = dist_clip.clip_grad_norm_(grads, 0.5 * want, p)
    assert total.item() == pytest.approx(want, rel=1e-6)
    coef = 0.5 * want / (want + 1e-6)
    for after, old in zip(grads, before):
        assert after.dtype == old.dtype
        torch.testing.assert_close(after, old * coef, rtol=1e-6, atol=1e-6)


def test_integer_gradients_are_a_type_error():
    with pytest.raises(TypeError, match="float32, float64 or complex.*torch.int64"):
        dist_clip.get_total_norm([torch.arange(10)])


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_gradients_are_a_type_error(dtype):
    """torch has no CPU kernel to measure or multiply float8 in place: a clear TypeError, not an internal one."""
    with pytest.raises(TypeError, match=f"float32, float64 or complex.*{dtype}"):
        dist_clip.clip_grad_norm_([torch.randn(10), torch.ones(4).to(dtype)], 1.0)


@pytest.mark.parametrize("bad", [torch.tensor([1, 2], dtype=torch.int32), torch.tensor([True, False]),
                                 torch.ones(2).to(torch.float8_e4m3fn), (torch.eye(2) * 3).to_sparse_csr()],
                         ids=["int32", "bool", "float8", "csr"])
@pytest.mark.parametrize("foreach", [None, False])
def test_clip_grads_with_norm_refuses_bad_gradients_before_scaling_any(bad, foreach):
    """clip_grads_with_norm_ never checked: torch's own error came from the scaling, after the float gradients
    grouped before the bad one were scaled ([3, 4] became [0.6, 0.8] for a caller that caught it)."""
    good = torch.tensor([3.0, 4.0])
    with pytest.raises(TypeError, match="gradients must be"):
        dist_clip.clip_grads_with_norm_([good, bad], 1.0, torch.tensor(5.0), foreach=foreach)
    assert good.tolist() == [3.0, 4.0]


def test_sparse_csr_gradients_and_out_of_range_numbers_are_refused_clearly():
    """A CSR gradient raised torch's "Sparse CSR tensors do not have is_contiguous"; an integer beyond float's
    range as norm_type / max_norm / total_norm an OverflowError; tensor(True) passed as p = 1 (True is refused)."""
    csr = (torch.eye(3) * 3).to_sparse_csr()
    with pytest.raises(TypeError, match="strided or sparse COO.*sparse_csr"):
        dist_clip.get_total_norm([torch.ones(2), csr])
    g = [torch.ones(3)]
    with pytest.raises(ValueError, match="norm_type must fit a float64"):
        dist_clip.get_total_norm(g, norm_type=10**400)
    with pytest.raises(ValueError, match="max_norm must fit a float64"):
        dist_clip.clip_grad_norm_(g, 10**400)
    with pytest.raises(ValueError, match="max_norm must fit a float64"):
        dist_clip.GradClipper(max_norm=10**400)
    with pytest.raises(ValueError, match="total_norm must fit a float64"):
        dist_clip.clip_grads_with_norm_(g, 1.0, 10**400)
    with pytest.raises(ValueError, match="clipping must fit a float64"):
        dist_clip.AGC(clipping=10**400)
    with pytest.raises(ValueError, match="norm_type must be a number"):
        dist_clip.get_total_norm(g, norm_type=torch.tensor(True))
    assert dist_clip.get_total_norm(g, norm_type=torch.tensor(1)).item() == 3.0  # an integer tensor is a number


def test_tensor_subclasses_without_storage_take_torchs_ops():
    """A wrapper subclass (no storage, data_ptr() 0, contiguous) went to the native kernel, which read address 0:
    the process died (SIGSEGV). It takes torch's ops now, as any subclass does."""
    from torch.testing._internal.two_tensor import TwoTensor

    g = TwoTensor(torch.full((8,), 2.0), torch.full((8,), 2.0))
    assert g.data_ptr() == 0 and g.is_contiguous()
    for p in (1.0, 2.0, math.inf):
        total = dist_clip.get_total_norm([g, torch.ones(4)], p)
        want = reference_norm([torch.full((8,), 2.0), torch.ones(4)], p)
        assert float(total) == pytest.approx(want, rel=1e-6)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_gradients_are_scaled_one_by_one():
    """A nested tensor (strided layout, a plain ``Tensor`` to every type test) given as a gradient was measured,
    then torch's fused multiply refused it and the call raised torch's ``NotImplementedError``, nothing scaled (on
    its rank alone, after the collective). ``foreach=None`` now scales it one by one, as ``foreach=False`` does;
    ``foreach=True`` still raises, as torch's tri-state says."""
    from dist_clip import GradClipper

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        parts = [torch.randn(2, generator=gen) * 3, torch.randn(3, generator=gen) * 4]
        return torch.randn(4, 5, generator=gen), torch.nested.nested_tensor(parts)

    def values(a: torch.Tensor, n: torch.Tensor) -> list[torch.Tensor]:
        return [a, *n.unbind()]

    for p in (2.0, math.inf):
        a, n = make()
        before = [t.clone() for t in values(a, n)]
        want = reference_norm(before, p)
        total = dist_clip.clip_grad_norm_([a, n], 0.5, p)
        assert float(total) == pytest.approx(want, rel=1e-6)
        for got, was in zip(values(a, n), before):
            torch.testing.assert_close(got, was * (0.5 / (float(total) + 1e-6)), rtol=1e-6, atol=0)
    a, n = make()
    before = [t.clone() for t in values(a, n)]
    dist_clip.clip_grads_with_norm_([a, n], 0.5, 10.0)
    for got, was in zip(values(a, n), before):
        torch.testing.assert_close(got, was * (0.5 / (10.0 + 1e-6)), rtol=1e-6, atol=0)
    a, n = make()
    before = [t.clone() for t in values(a, n)]
    coefs = GradClipper(mode="per_param", max_norm=0.5)({"a": a, "n": n}).clip_coef.tolist()
    for got, was, coef in zip(values(a, n), before, [coefs[0], coefs[1], coefs[1]]):
        assert coef < 1
        torch.testing.assert_close(got, was * coef, rtol=1e-6, atol=0)
    with pytest.raises(NotImplementedError):
        dist_clip.clip_grad_norm_(list(make()), 0.5, foreach=True)


def test_meta_gradients_on_one_process_give_a_meta_total_as_torch():
    """A dry run on the meta device (no data): torch's clipping returns a meta total, and so did every call here
    until meta pieces were passed over when choosing the result's device on one process too (for a rank of a
    group, whose meta piece must not hold the others in the collective): NotImplementedError ("Cannot copy out
    of meta tensor") from every call."""
    from dist_clip import GradClipper

    lin = nn.Linear(3, 2, device="meta")
    lin.weight.grad, lin.bias.grad = torch.empty(2, 3, device="meta"), torch.empty(2, device="meta")
    assert torch.nn.utils.clip_grad_norm_(lin.parameters(), 1.0).device.type == "meta"
    for p in (2.0, math.inf):
        assert dist_clip.get_total_norm([lin.weight.grad, lin.bias.grad], p).device.type == "meta"
        assert dist_clip.clip_grad_norm_(lin, 1.0, p).device.type == "meta"
    for mode in ("total", "per_param", "unitwise"):
        assert GradClipper(max_norm=1.0, mode=mode)(lin).total_norm.device.type == "meta"


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0, 3.5, math.inf])
def test_sparse_gradients_measure_by_coalesced_values_and_scale(p):
    torch.manual_seed(0)
    emb, lin = nn.Embedding(10, 3, sparse=True), nn.Linear(3, 2)
    lin(emb(torch.tensor([1, 2, 2, 7]))).sum().backward()  # index 2 twice: uncoalesced duplicates
    assert emb.weight.grad.is_sparse
    dense = [emb.weight.grad.to_dense(), lin.weight.grad.clone(), lin.bias.grad.clone()]
    want = reference_norm(dense, p)
    total = dist_clip.clip_grad_norm_([*emb.parameters(), *lin.parameters()], 0.5 * want, p)
    assert total.item() == pytest.approx(want, rel=1e-6)
    coef = 0.5 * want / (want + 1e-6)
    assert emb.weight.grad.is_sparse
    torch.testing.assert_close(emb.weight.grad.to_dense(), dense[0] * coef, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lin.weight.grad, dense[1] * coef, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lin.bias.grad, dense[2] * coef, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("form", ["frozen_after_backward", "grad_set_by_hand", "beside_a_parameter"])
def test_a_plain_tensor_with_a_grad_is_a_parameter(form):
    """A plain tensor whose .grad is set (a weight frozen after its backward, a .grad assigned by hand) was taken
    for a gradient: its values were measured (5.48 for 22.36) and scaled, the weights changed and the gradient
    left unclipped, where torch.nn.utils clips its .grad."""
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    if form == "frozen_after_backward":
        w.requires_grad_(True)
        (w * torch.tensor([10.0, 20.0, 0.0, 0.0])).sum().backward()
        w.requires_grad_(False)
    else:
        w.grad = torch.tensor([10.0, 20.0, 0.0, 0.0])
    target = [w] if form != "beside_a_parameter" else [w, nn.Parameter(torch.zeros(2))]
    ref_w, ref_g = w.clone(), w.grad.clone()
    total = dist_clip.clip_grad_norm_(target, 1.0)
    assert total.item() == pytest.approx(reference_norm([ref_g]), rel=1e-6)
    assert torch.equal(w, ref_w)
    torch.testing.assert_close(w.grad, ref_g / (reference_norm([ref_g]) + 1e-6), rtol=1e-6, atol=0)
    assert dist_clip.get_total_norm([torch.tensor([3.0, 4.0])]).item() == 5.0  # a gradient is still a gradient


def test_copies_to_the_host_wait_and_copies_to_accelerators_do_not():
    """A non-blocking copy from a GPU to the host returns before the data lands, and the CPU then read stale
    memory (a total of 0, or the previous step's norm; simulated on gloo by a reviewer): every copy of partials,
    reduced buffers, coefficients and flags goes through ``_reduce.moved``, which waits only where the
    destination is the CPU (``tests/test_gpu.py`` checks mixed CPU/CUDA gradients on a GPU)."""
    from dist_clip import _reduce

    calls = []

    class Probe:
        device = None  # (on no device: every destination is a move)

        def to(self, device, non_blocking=False):
            calls.append((str(device), non_blocking))
            return self

    for dev in ("cpu", torch.device("cpu"), "cuda:0", torch.device("cuda", 1), "meta"):
        _reduce.moved(Probe(), dev)
    assert calls == [("cpu", False), ("cpu", False), ("cuda:0", True), ("cuda:1", True), ("meta", True)]
    t = torch.ones(2)
    assert _reduce.moved(t, t.device) is t  # already there: no copy


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["clip_grad_norm_", "per_param"])
def test_sparse_half_gradients_take_the_unrounded_coefficient(dtype, mode):
    """torch's sparse mul casts a coefficient to the sparse dtype before multiplying: on the CPU a coefficient of
    1.1e-8 became 0 in fp16 (every value zeroed) and ordinary ones 1 ulp off. Their values are multiplied as a
    dense tensor is now: the product in float32, rounded once."""
    values = torch.tensor([6e4, -6e4, 3e4, 1e3])
    idx = torch.tensor([[0, 3, 5, 7]])
    p = nn.Parameter(torch.zeros(8, dtype=dtype))
    p.grad = torch.sparse_coo_tensor(idx, values.to(dtype), (8,))
    dense = p.grad.to_dense().clone()
    want = reference_norm([dense], 2.0)
    if mode == "clip_grad_norm_":
        total = dist_clip.clip_grad_norm_([p], 1e-3)
    else:
        total = dist_clip.GradClipper(max_norm=1e-3, mode="per_param")({"p": p}).total_norm
    assert abs(total.item() - want) <= 1e-5 * want
    coef = torch.tensor(1e-3, dtype=torch.float32) / (total.float() + 1e-6)
    torch.testing.assert_close(p.grad.to_dense(), (dense.float() * coef).to(dtype), rtol=0, atol=0)


def test_complex128_gradients_give_a_float64_norm():
    """torch returns a float64 norm for complex128 gradients; so does dist_clip (complex64 alone was tested: a
    float32 result for complex128 passed the suite)."""
    g = torch.tensor([1 + 1e-9j, 1.0 + 0j], dtype=torch.complex128)
    want = torch.nn.utils.get_total_norm([g])
    assert want.dtype == torch.float64
    for got in (dist_clip.get_total_norm([g]), dist_clip.clip_grad_norm_([g.clone()], 10.0)):
        assert got.dtype == torch.float64 and got.item() == pytest.approx(want.item(), rel=1e-15, abs=0), got


def _readme_api_signatures() -> dict[str, inspect.Signature]:
    """The signatures README's "## API" section prints, one per public callable, parsed as ``def`` lines."""
    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    ns = {n: getattr(dist_clip, n) for n in dist_clip.__all__}
    found: dict[str, inspect.Signature] = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        lines: list[str] = []
        for line in block.splitlines():  # join continuation lines (indented) onto the line they continue
            if line.startswith(" ") and lines:
                lines[-1] += " " + line.strip()
            else:
                lines.append(line)
        for line in lines:
            m = re.match(r"(\w+)(\(.*\))(?:\s*->\s*(.*?))?\s*$", line.split("#")[0])
            if m is None or m.group(2).startswith("(...)"):
                continue
            tree = ast.parse(f"def {m.group(1)}{m.group(2)}: pass")
            fn = {}
            exec(compile(tree, "<README API>", "exec"), ns, fn)  # defaults evaluated with dist_clip's names
            found[m.group(1)] = inspect.signature(fn[m.group(1)])
    return found


def _default(cls_or_fn: object, param: inspect.Parameter) -> object:
    if dataclasses.is_dataclass(cls_or_fn) and repr(param.default) == "<factory>":
        return next(f for f in dataclasses.fields(cls_or_fn) if f.name == param.name).default_factory()
    return param.default


def test_readme_api_section_names_every_public_name_with_its_real_signature():
    """README's "## API" section printed the three functions only: the other ten callables of __all__ (GradClipper,
    ClipperConfig, ClipResult, AutoClip, ZClip, AGC, ParallelPlan, Rule, Shards, skip_next_step_) were described
    elsewhere or not at all (ClipResult's fields, ZClip's eps/clip_factor). Each is listed there now, and every
    printed parameter name, kind and default must be the code's."""
    section = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = section.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    printed = _readme_api_signatures()
    for name in dist_clip.__all__:
        assert f"`{name}`" in section or name in printed or f"{name}\n" in section or f"{name} " in section, name
        if callable(getattr(dist_clip, name)):
            assert name in printed, f"README's API section prints no signature for {name}"
    for name, doc in printed.items():
        real = inspect.signature(getattr(dist_clip, name))
        def shape(sig: inspect.Signature) -> list[tuple[str, object]]:  # **fields in the README is **kwargs
            return [("**" if p.kind is p.VAR_KEYWORD else p.name, p.kind) for p in sig.parameters.values()]

        assert shape(doc) == shape(real), (name, doc, real)
        for p in doc.parameters.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                continue
            want = _default(getattr(dist_clip, name), real.parameters[p.name])
            assert p.default == want or (p.default is inspect.Parameter.empty and want is inspect.Parameter.empty), \
                (name, p.name, p.default, want)
    call = inspect.signature(dist_clip.GradClipper.__call__)
    assert list(call.parameters) == ["self", "target", "optimizer", "group", "plan", "report"]
    assert "GradClipper(...)(target, *, optimizer=None, group=None, plan=None, report=None) -> ClipResult" in section
