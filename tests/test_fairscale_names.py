"""fairscale gradients named by parameter: ``mode="per_param"``, ``mode="per_group"`` and ``report=True``.

On 2 spawned gloo ranks, for OSS (passed as the optimizer: names ``"group{g}.param{i}"``; or through
ShardedDataParallel: names of ``.module``) and fairscale FullyShardedDataParallel (flat shards split per
parameter, names of the unwrapped model), against the float64 unsharded torch run:

* step 0: ``report=True`` for p = 2 and inf (every parameter's norm, and the total); ``mode="per_param"`` at
  p = 2 (each coefficient, the norms after it); ``step()`` and the parameters after it;
* step 1: ``mode="per_group"`` at p = inf with a different ``max_norm`` per param group (one clips, one does
  not); ``step()`` and the parameters after it;
* every dist_clip call issues exactly one collective.

The rank bodies live here (module level, so spawned ranks import them). fairscale's FSDP needs CUDA: its CPU
runs go through the test-only ``fairscale_cases.cpu_stream_shim``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("fairscale")

import dist_clip  # noqa: E402
from dist_clip.testing import count_collectives, reference_norm, reference_param_norms  # noqa: E402
from tests.ds_cases import Reference, _close, batch, loss_fn, make_model  # noqa: E402
from tests.fairscale_cases import LAYOUTS as FAIRSCALE_LAYOUTS
from tests.fairscale_cases import LR, MOMENTUM, _batches, cpu_stream_shim, full_params  # noqa: E402

pytestmark = pytest.mark.fairscale

TIMEOUT = 120
HUGE = 1e30  # a max_norm that never clips: report-only calls
FIRST = ("0.weight", "0.bias")  # param group 0; everything else is param group 1


def _build(kind: str, **fsdp_kwargs: Any) -> tuple[Any, Any, Any, dict[str, str], bool]:
    """(model, optimizer, target, reference name -> target name, whether there are two param groups)."""
    model = make_model(0)
    names = [n for n, _ in model.named_parameters()]
    if kind.startswith("oss"):
        from fairscale.optim import OSS

        by_name = dict(model.named_parameters())
        groups = [[by_name[n] for n in FIRST], [by_name[n] for n in names if n not in FIRST]]
        opt = OSS([{"params": g} for g in groups], optim=torch.optim.SGD, lr=LR, momentum=MOMENTUM)
        if kind == "oss_sdp":
            from fairscale.nn.data_parallel import ShardedDataParallel

            wrapped = ShardedDataParallel(model, opt)
            return wrapped, opt, wrapped, {n: n for n in names}, True
        from torch.nn.parallel import DistributedDataParallel

        order = [n for n in FIRST] + [n for n in names if n not in FIRST]
        gi = {n: (0, FIRST.index(n)) if n in FIRST else (1, order.index(n) - len(FIRST)) for n in names}
        return DistributedDataParallel(model), opt, opt, {n: f"group{g}.param{i}" for n, (g, i) in gi.items()}, True
    from fairscale.nn import FullyShardedDataParallel as FSDP

    kw = dict(compute_device=torch.device("cpu"), **fsdp_kwargs)
    if kind == "fsdp_nested":
        model[0] = FSDP(model[0], **kw)
        model[2] = FSDP(model[2], **kw)
    wrapped = FSDP(model, **kw)
    # The tensors the optimizer holds for 0.*: FSDP(model[0])'s flat parameter, or the sharded originals.
    first = list(model[0].parameters())
    if not first:  # one flat parameter for the whole model: one param group
        return wrapped, torch.optim.SGD(wrapped.parameters(), lr=LR, momentum=MOMENTUM), wrapped, \
            {n: n for n in names}, False
    rest = [p for p in wrapped.parameters() if all(p is not q for q in first)]
    opt = torch.optim.SGD([{"params": first}, {"params": rest}], lr=LR, momentum=MOMENTUM)
    return wrapped, opt, wrapped, {n: n for n in names}, True


def _clip(clipper: dist_clip.GradClipper, target: Any, **kwargs: Any) -> dist_clip.ClipResult:
    with count_collectives() as c:
        result = clipper(target, **kwargs)
    assert c.total == 1, f"{c.total} collectives"
    return result


def _norms_close(got: dict[str, float] | None, want: dict[str, float], to: dict[str, str], rtol: float,
                 what: str) -> None:
    want_t = {to[n]: v for n, v in want.items()}
    assert got is not None and set(got) == set(want_t), f"{what}: names {sorted(got or {})} vs {sorted(want_t)}"
    for n, v in want_t.items():
        _close(got[n], v, rtol, f"{what} {n}")


def _backward(model: Any, ref: Reference, step: int) -> dict[str, torch.Tensor]:
    grads = dict(zip([n for n, _ in ref.model.named_parameters()], ref.grads(_batches(step))))
    model.zero_grad()
    loss_fn(model(batch(dist.get_rank(), step, 0))).backward()
    return grads


def _pieces_cover_every_parameter(target: Any, to: dict[str, str], names: list[str]) -> dict[str, int]:
    """Names identical on every rank; the counted pieces of all ranks hold every element exactly once."""
    from dist_clip import _slots

    named = _slots.named_shards(target)
    first = dist.get_rank() == 0
    mine = [(n, t.numel()) for s in named.shards if s.group is not None or first for n, t in zip(s.names, s.tensors)]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (named.names, mine))
    assert all(e[0] == everyone[0][0] for e in everyone), [e[0] for e in everyone]
    held: dict[str, int] = {}
    for _, pieces in everyone:
        for n, k in pieces:
            held[n] = held.get(n, 0) + k
    sizes = dict(Reference().model.named_parameters())
    assert held == {to[n]: sizes[n].numel() for n in names}, held
    return {n: sum(m == n for _, ps in everyone for m, _ in ps) for n in held}


def case_names(kind: str, **fsdp_kwargs: Any) -> dict:
    shim = cpu_stream_shim() if kind.startswith("fsdp") else contextlib.nullcontext()
    out: dict[str, Any] = {}
    rtol = 2e-6
    with shim:
        model, opt, target, to, two_groups = _build(kind, **fsdp_kwargs)
        ref = Reference()
        names = [n for n, _ in ref.model.named_parameters()]

        # -- step 0: reports for p = 2 and inf, then per-parameter clipping at p = 2.
        grads = _backward(model, ref, 0)
        out["pieces"] = _pieces_cover_every_parameter(target, to, names)
        for p in (2.0, math.inf):
            r = _clip(dist_clip.GradClipper(max_norm=HUGE, norm_type=p, report=True), target)
            _norms_close(r.norms, reference_param_norms(grads, p), to, rtol, f"{kind} p={p} report")
            _close(float(r.total_norm), reference_norm(list(grads.values()), p), rtol, f"{kind} p={p} total")
            out[f"report_p{p}"] = r.norms
        before = reference_param_norms(grads, 2.0)
        limit = sorted(before.values())[len(before) // 2]  # clips about half of the parameters
        r = _clip(dist_clip.GradClipper(mode="per_param", max_norm=limit), target)
        assert set(r.slots) == {to[n] for n in names} and len(r.slots) == len(names), r.slots
        got = dict(zip(r.slots, r.clip_coef.tolist()))
        coefs = {n: min(1.0, limit / (before[n] + 1e-6)) for n in names}
        assert 0 < sum(c < 1 for c in coefs.values()) < len(coefs), "must clip some parameters and not others"
        for n in names:
            _close(got[to[n]], coefs[n], 1e-6, f"{kind} per_param coefficient of {n}")
            grads[n].mul_(coefs[n])
        r = _clip(dist_clip.GradClipper(max_norm=HUGE, report=True), target)
        _norms_close(r.norms, reference_param_norms(grads, 2.0), to, 1e-5, f"{kind} norms after per_param")
        opt.step()
        ref.opt.step()
        for n, a, b in zip(names, full_params(kind, model), ref.params()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"{kind} {n} after per_param step"

        # -- step 1: per-group clipping at p = inf, each group against its own max_norm.
        if two_groups:
            grads = _backward(model, ref, 1)
            inf = reference_param_norms(grads, math.inf)
            groups = [list(FIRST), [n for n in names if n not in FIRST]]
            group_norms = [max(inf[n] for n in g) for g in groups]
            limits = [0.5 * group_norms[0], 2.0 * group_norms[1]]  # the first group clips, the second does not
            for pg, m in zip(opt.param_groups, limits):
                pg["max_norm"] = m
            r = _clip(dist_clip.GradClipper(mode="per_group", norm_type="inf", report=True), target, optimizer=opt)
            assert r.slots == ("param_group0", "param_group1"), r.slots
            _norms_close(r.norms, inf, to, rtol, f"{kind} per_group report")
            want = [min(1.0, m / (g + 1e-6)) for m, g in zip(limits, group_norms)]
            for i, (w, c) in enumerate(zip(want, r.clip_coef.tolist())):
                _close(c, w, 1e-6, f"{kind} per_group coefficient of group {i}")
            for g, w in zip(groups, want):
                for n in g:
                    grads[n].mul_(w)
            r = _clip(dist_clip.GradClipper(max_norm=HUGE, norm_type="inf", report=True), target)
            _norms_close(r.norms, reference_param_norms(grads, math.inf), to, 1e-6, f"{kind} norms after per_group")
            opt.step()
            ref.opt.step()
            for n, a, b in zip(names, full_params(kind, model), ref.params()):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"{kind} {n} after per_group step"
            out["group_coefs"] = want
    return out


def case_oss_layout() -> dict:
    """OSS names are identical on every rank, and each rank's pieces are exactly the parameters it owns."""
    from dist_clip import _slots

    model, opt, target, to, _ = _build("oss_ddp")
    loss_fn(model(batch(dist.get_rank(), 0, 0))).backward()
    named = _slots.named_shards(target)
    mine = sorted(n for s in named.shards for n in s.names)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (named.names, mine))
    assert all(e[0] == everyone[0][0] for e in everyone), everyone
    held = sorted(n for e in everyone for n in e[1])
    assert held == sorted(to.values()), held  # every parameter measured once, by its owner
    assert all(e[1] for e in everyone), "the case must give every rank some parameter"
    return {"names": named.names, "mine": mine}


@pytest.mark.parametrize("kind,kwargs", [pytest.param(k, kw, id=i) for k, kw, i in FAIRSCALE_LAYOUTS])
def test_per_param_per_group_and_report_match_unsharded(run_ranks, kind, kwargs):
    run_ranks(2, case_names, kind, timeout_s=TIMEOUT, **kwargs)


def test_fsdp_flat_shards_split_a_parameter_across_ranks(run_ranks):
    # The flat parameter of the whole model (137 elements) is cut at 69, inside 2.weight (elements 49-97).
    pieces = run_ranks(2, case_names, "fsdp", timeout_s=TIMEOUT)[0]["pieces"]
    assert any(k > 1 for k in pieces.values()), pieces


def test_oss_names_identical_and_pieces_owned(run_ranks):
    run_ranks(2, case_oss_layout, timeout_s=TIMEOUT)


def body_wrapped_block_names(kind: str) -> dict:
    """An activation-checkpointed block under fairscale: the report kept ``0._checkpoint_wrapped_module.weight``
    (fairscale's own path cleaning drops only its wrappers' parts) where every other wrapper reports the model's
    names, and an AGC ``exclude=("0.weight", "0.bias")`` missed the block (0.362 clipped to 1e-4)."""
    from fairscale.optim import OSS
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    want = [n for n, _ in make_model(0).named_parameters()]
    model = make_model(0)
    model[0] = checkpoint_wrapper(model[0])
    with cpu_stream_shim() if kind == "fsdp" else contextlib.nullcontext():
        if kind == "fsdp":
            from fairscale.nn import FullyShardedDataParallel as FSDP

            target = FSDP(model, compute_device=torch.device("cpu"))
        else:
            from fairscale.nn.data_parallel import ShardedDataParallel

            target = ShardedDataParallel(model, OSS(model.parameters(), optim=torch.optim.SGD, lr=LR))
        loss_fn(target(batch(dist.get_rank(), 0, 0))).backward()
        report = dist_clip.GradClipper(max_norm=1e30, report=True)(target).norms or {}
        agc = dist_clip.AGC(clipping=1e-4, exclude=("0.weight", "0.bias"))
        unit = dist_clip.GradClipper(mode="unitwise", agc=agc, report=True)(target).norms or {}
    return {"want": want, "names": list(report), "unitwise names": list(unit)}


@pytest.mark.fairscale
@pytest.mark.parametrize("kind", ["oss_sdp", "fsdp"])
def test_checkpointed_blocks_keep_the_models_names(run_ranks, kind):
    for got in run_ranks(2, body_wrapped_block_names, kind):
        assert got["names"] == got["unitwise names"] == got["want"], got


def body_alias_first_names() -> dict:
    """A block registered first as ``last`` and then as ``dec.1``, inside a nested fairscale FSDP unit wrapping
    ``dec``: the flat parameter's own names are paths within its unit: the report said ``dec.1.lin.*`` where the
    unwrapped model says ``last.lin.*``, and an AGC ``exclude=`` of the model's name missed it."""
    from fairscale.nn import FullyShardedDataParallel as FSDP

    from tests.fsdp_cases import AliasFirstNet, reference
    from tests.fsdp_cases import batch as fsdp_batch
    from tests.fsdp_cases import loss_fn as fsdp_loss

    rank, ws = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = AliasFirstNet()
    ref = reference(model, list(range(ws)))
    want = {n: torch.linalg.vector_norm(g).item() for n, g in ref.grads.items()}
    with cpu_stream_shim():
        model.dec = FSDP(model.dec, compute_device=torch.device("cpu"))
        target = FSDP(model, compute_device=torch.device("cpu"))
        fsdp_loss(target, *fsdp_batch(rank)).backward()
        report = dist_clip.GradClipper(max_norm=1e30, report=True)(target).norms or {}
        agc = dist_clip.AGC(clipping=1e-4, exclude=("last.lin.weight",))
        unit = dist_clip.GradClipper(mode="unitwise", agc=agc, report=True)(target).norms or {}
    return {"want": want, "report": report, "unitwise names": sorted(unit)}


@pytest.mark.fairscale
def test_a_block_registered_first_outside_its_unit_keeps_the_models_name(run_ranks):
    for got in run_ranks(2, body_alias_first_names):
        assert sorted(got["report"]) == got["unitwise names"] == sorted(got["want"]), got
        assert all(math.isclose(got["report"][n], got["want"][n], rel_tol=1e-5) for n in got["want"]), got
