"""GradClipper: config validation, parity with the functional API, the non-finite policies, checkpoint resume,
and one collective per call in every mode.

The non-finite cases put a NaN into one rank's shard only: every rank must take the same decision from the one
collective (raise together naming the rank and parameter, skip the step, zero the gradients, or scale as torch
does). "skip" is checked with fused Adam (``found_inf``) and with non-fused Adam and SGD (snapshot/restore):
parameters and optimizer state are bit-for-bit unchanged, and the next finite step matches an optimizer that
never saw the bad step. Run: ``.venv/bin/python -m pytest tests/test_clipper.py``.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dist_clip
from dist_clip import AGC, AutoClip, ClipperConfig, GradClipper, ZClip
from dist_clip.testing import count_collectives, reference_norm
from tests import beyond_cases as cases


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_norm": -1.0}, ValueError, "max_norm must be a number >= 0, got -1.0"),
        ({"max_norm": "1"}, TypeError, "max_norm must be a real number"),
        ({"max_norm": True}, TypeError, "max_norm"),
        ({"norm_type": -2}, ValueError, "norm_type"),
        ({"mode": "layer"}, ValueError, r"mode must be one of .*got 'layer'"),
        ({"on_nonfinite": "raise"}, ValueError, r"on_nonfinite must be one of .*got 'raise'"),
        ({"report": 1}, TypeError, "report must be a bool"),
        ({"report_depth": 0}, ValueError, "report_depth"),
        ({"agc": 0.01}, TypeError, "agc must be a dist_clip.AGC"),
        ({"foreach": "yes"}, TypeError, "foreach"),
        ({"max_norm": AutoClip(), "mode": "per_param"}, ValueError, "adaptive max_norm"),
        ({"mode": "unitwise", "norm_type": 0}, ValueError, "p > 0"),
    ],
)
def test_config_errors_name_expected_and_received(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradClipper(**kwargs)


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: AutoClip(percentile=120), ValueError, "percentile"),
        (lambda: AutoClip(window=0), ValueError, "window must be an int >= 1, got 0"),
        (lambda: ZClip(alpha=1.0), ValueError, "alpha"),
        (lambda: ZClip(clip_option="max"), ValueError, "clip_option"),
        (lambda: ZClip(warmup_steps=2.5), TypeError, "warmup_steps must be an int"),
        (lambda: ZClip(warmup_steps=0), ValueError, "warmup_steps must be an int >= 1, got 0"),
        (lambda: ZClip(clip_factor=math.inf), ValueError, "clip_factor must be a number > 0.0 and < inf, got inf"),
        # Buffers of this many float64 values are made at the first call: float()'s OverflowError and torch's
        # "Storage size calculation overflowed" came from there, after the gradients were measured.
        (lambda: ZClip(warmup_steps=10**400), ValueError, f"warmup_steps must be an int <= {2**60 - 1} .*401 digits"),
        (lambda: AutoClip(window=2**60), ValueError, f"window must be an int <= {2**60 - 1} .*got {2**60}"),
        (lambda: AutoClip(window=-(10**5000)), ValueError, "must be an int >= 1, got a negative int of 5001 digits"),
        (lambda: AutoClip(window=10**5000), ValueError, "window must be an int <= .*got an int of 5001 digits"),
        (lambda: AGC(clipping=0), ValueError, "clipping"),
        (lambda: AGC(exclude="fc.*"), TypeError, "exclude"),
    ],
)
def test_adaptive_config_errors(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_config_is_frozen_and_clipper_takes_one_form():
    cfg = ClipperConfig(max_norm=2.0)
    with pytest.raises(AttributeError):
        cfg.max_norm = 3.0  # type: ignore[misc]
    with pytest.raises(TypeError, match="either a ClipperConfig or keyword"):
        GradClipper(cfg, max_norm=1.0)
    assert GradClipper(cfg).config is cfg
    with pytest.raises(ValueError, match="optimizer="):
        GradClipper(on_nonfinite="skip")([torch.ones(2)])
    with pytest.raises(TypeError, match="optimizer must be"):
        GradClipper()([torch.ones(2)], optimizer="sgd")


def test_state_dict_errors():
    clipper = GradClipper(max_norm=ZClip())
    with pytest.raises(ValueError, match="lacks"):
        clipper.load_state_dict({"step": 1})
    with pytest.raises(ValueError, match="threshold is ZClip but the state is of AutoClip"):
        clipper.load_state_dict(GradClipper(max_norm=AutoClip()).state_dict())
    with pytest.raises(TypeError, match="state must be a dict"):
        clipper.load_state_dict([1])


def test_single_process_matches_torch():
    torch.manual_seed(0)
    for p in (1.0, 2.0, math.inf):
        ps = [nn.Parameter(torch.randn(s)) for s in ((7, 5), (3,), (1000,))]
        for q in ps:
            q.grad = torch.randn_like(q) * 3
        twins = [nn.Parameter(q.detach().clone()) for q in ps]
        for q, t in zip(ps, twins):
            t.grad = q.grad.clone()
        want = torch.nn.utils.clip_grad_norm_(twins, 0.5, p)
        result = GradClipper(max_norm=0.5, norm_type=p)(ps)
        assert result.total_norm.item() == pytest.approx(want.item(), rel=1e-6)
        for q, t in zip(ps, twins):
            torch.testing.assert_close(q.grad, t.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["total", "per_param", "unitwise"])
def test_float64_gradients_keep_float64(mode):
    """float64 gradients get a float64 total and coefficient, as clip_grad_norm_ gives them: exact to 1e-14. The
    limit 0.1 is not a float32 value: per_param's limit taken in float32 was 1.5e-8 off."""
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in ((7, 5), (3,), (1000,))]
    for q in ps:
        q.grad = torch.randn_like(q) * 3
    before = [q.grad.clone() for q in ps]
    extra = {"agc": AGC(clipping=0.01)} if mode == "unitwise" else {"max_norm": 0.1}
    result = GradClipper(norm_type=2.0, mode=mode, **extra)(ps)
    want = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in before]))
    assert result.total_norm.dtype == torch.float64, result.total_norm.dtype
    assert result.clip_coef.dtype == torch.float64, result.clip_coef.dtype  # unitwise's smallest too
    assert abs(result.total_norm.item() - want.item()) <= 1e-14 * want.item()
    if mode == "total":
        assert result.clip_coef.dtype == result.max_norm.dtype == torch.float64
        coef = 0.1 / (want.item() + 1e-6)
        for q, g in zip(ps, before):
            torch.testing.assert_close(q.grad, g * coef, rtol=1e-14, atol=0)
    elif mode == "per_param":
        assert result.clip_coef.dtype == torch.float64
        for q, g in zip(ps, before):
            n = torch.linalg.vector_norm(g).item()
            torch.testing.assert_close(q.grad, g * min(1.0, 0.1 / (n + 1e-6)), rtol=1e-14, atol=0)


@pytest.mark.parametrize("kind", ["complex", "sparse"])
def test_unitwise_refuses_complex_and_sparse_gradients_clearly(kind):
    if kind == "sparse":
        model = nn.Embedding(5, 3, sparse=True)
        model(torch.tensor([1, 2])).sum().backward()
    else:
        model = nn.Linear(3, 2).to(torch.complex64)
        model.weight.grad = torch.ones_like(model.weight)
        model.bias.grad = torch.ones_like(model.bias)
    with pytest.raises(TypeError, match="mode='unitwise' needs dense real gradients"):
        GradClipper(mode="unitwise", agc=AGC(clipping=0.01))(model)
    GradClipper(mode="per_param", max_norm=0.5)(model)  # the other modes measure them


@pytest.mark.parametrize("shape", [(20,), (5, 4), (2, 10)])
def test_unitwise_refuses_a_gradient_shaped_unlike_its_weight(shape):
    """AGC reads units off the gradient and the weight alike: a weight whose ``.data`` was replaced after the
    backward by one of another shape gave every row of a (4, 5) gradient the whole (20,) weight's limit, silently
    (rows clipped to 0.447 where a (4, 5) weight of ones allows 0.224), or torch's size mismatch from inside."""
    w = nn.Parameter(torch.ones(4, 5))
    w.grad = torch.arange(20.0).reshape(4, 5)
    before = w.grad.clone()
    with torch.no_grad():
        w.data = torch.ones(shape)
    with pytest.raises(ValueError, match=r"'0' has a gradient of shape \(4, 5\) and a weight of shape"):
        GradClipper(mode="unitwise", agc=AGC(clipping=0.1))([w])
    assert torch.equal(w.grad, before)
    GradClipper(mode="per_param", max_norm=0.5)([w])  # the other modes read no weights


@pytest.mark.parametrize("mode", ["total", "per_param", "per_group", "unitwise"])
@pytest.mark.parametrize("policy,applied", [("skip", 1.0), ("zero", 0.0)])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_clip_coef_is_the_coefficient_applied_under_a_policy(mode, policy, applied, bad):
    """A non-finite total under "skip" leaves the gradients (coefficient 1), under "zero" zeroes them
    (coefficient 0): ClipResult.clip_coef says so, as documented, rather than the NaN or 0 computed."""
    model = nn.Linear(3, 2)
    model.weight.grad = torch.full((2, 3), 2.0)
    model.bias.grad = torch.tensor([4.0, bad])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {"agc": AGC(clipping=0.01)} if mode == "unitwise" else {"max_norm": 0.5}
    result = GradClipper(mode=mode, on_nonfinite=policy, **kwargs)(model, optimizer=opt)
    assert not bool(result.finite)
    assert torch.equal(result.clip_coef, torch.full_like(result.clip_coef, applied)), result.clip_coef
    if policy == "skip":
        assert model.weight.grad.eq(2.0).all()
    else:
        assert model.weight.grad.eq(0.0).all() and model.bias.grad.eq(0.0).all()


@pytest.mark.parametrize("mode", ["total", "unitwise"])
def test_a_nonfinite_call_that_raises_under_error_still_counts(mode):
    """on_nonfinite="error" raises after measuring: the call counts as a step and a non-finite call in every
    mode, as on the other ranks (unit-wise clipping raised before counting)."""
    model = nn.Linear(3, 2)
    model.weight.grad = torch.full((2, 3), 2.0)
    model.bias.grad = torch.tensor([4.0, math.inf])
    clipper = GradClipper(mode=mode, on_nonfinite="error", agc=AGC(clipping=0.01))
    with pytest.raises(RuntimeError, match="is non-finite"):
        clipper(model)
    assert clipper.step == 1 and clipper.num_nonfinite.item() == 1 and clipper.num_clipped.item() == 0


@pytest.mark.parametrize("mode", ["total", "per_param", "per_group", "unitwise"])
@pytest.mark.parametrize("policy", ["zero", "ignore"])
def test_clipped_is_false_and_uncounted_for_a_nonfinite_total(mode, policy):
    """ClipResult.clipped is documented False when the norm was not finite: an inf gradient gives coefficient
    0 under "zero" and "ignore", which must not read as clipped (nor count in num_clipped)."""
    model = nn.Linear(3, 2)
    model.weight.grad = torch.full((2, 3), 2.0)
    model.bias.grad = torch.tensor([4.0, math.inf])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {"agc": AGC(clipping=0.01)} if mode == "unitwise" else {"max_norm": 0.5}
    clipper = GradClipper(mode=mode, on_nonfinite=policy, **kwargs)
    result = clipper(model, optimizer=opt)
    assert not bool(result.finite) and not bool(result.clipped), result
    assert clipper.num_clipped.item() == 0 and clipper.num_nonfinite.item() == 1


def test_per_param_under_ignore_clips_a_finite_parameter_beside_a_nan_one_by_its_own_norm():
    """Each parameter's coefficient comes from its own norm alone: a NaN in another parameter (total NaN) leaves
    it clipped as clip_grad_norm_ on it alone would (a slot norm capped at the total turned it NaN too)."""
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([math.nan, 1.0])
    result = GradClipper(mode="per_param", max_norm=1.0, on_nonfinite="ignore")({"a": a, "b": b})
    assert result.slots == ("a", "b") and not bool(result.finite)
    assert result.clip_coef[0].item() == pytest.approx(1.0 / (5.0 + 1e-6), rel=1e-6)
    assert math.isnan(result.clip_coef[1].item())
    torch.testing.assert_close(a, torch.tensor([3.0, 4.0]) / (5.0 + 1e-6))


@pytest.mark.parametrize(("mode", "report"), [("total", True), ("per_param", False), ("per_group", False)])
def test_the_total_over_several_slots_at_p_inf_is_their_largest(mode, report):
    """Measured in several slots (a report, per_param, per_group), the total at p = inf is the largest slot norm,
    not their sum (8.0 for 5.0, which mode='total' then clipped by: coefficient 0.125 for 0.2)."""
    w, v = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    w.grad, v.grad = torch.tensor([1.0, -5.0, 2.0]), torch.tensor([3.0, 0.25])
    before = [w.grad.clone(), v.grad.clone()]
    opt = torch.optim.SGD([{"params": [w]}, {"params": [v]}], lr=0.1)
    result = GradClipper(max_norm=1.0, norm_type="inf", mode=mode, report=report)({"w": w, "v": v}, optimizer=opt)
    want = reference_norm(before, math.inf)
    assert want == 5.0 and result.total_norm.item() == pytest.approx(want, rel=1e-6)
    if mode == "total":
        for g, b in zip((w.grad, v.grad), before):
            torch.testing.assert_close(g, b * (1.0 / (want + 1e-6)))


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_per_group_under_ignore_gives_the_group_of_a_nan_gradient_a_nan_coefficient(p):
    """Slots merge into param groups with NaN carried beside the max of p = inf as a flag per group: with the flag
    dropped the NaN group's norm read 0 and its coefficient 1, its gradients left unscaled where "ignore" scales
    them by the NaN, as torch; the other group keeps its own coefficient."""
    w, v = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    w.grad, v.grad = torch.tensor([1.0, math.nan, 2.0]), torch.tensor([0.5, 0.25])
    opt = torch.optim.SGD([{"params": [w]}, {"params": [v]}], lr=0.1)
    result = GradClipper(mode="per_group", max_norm=1.0, norm_type=p, on_nonfinite="ignore")(
        {"w": w, "v": v}, optimizer=opt
    )
    assert math.isnan(result.total_norm.item()) and not bool(result.finite)
    assert math.isnan(result.clip_coef[0].item()) and result.clip_coef[1].item() == 1.0
    assert bool(torch.isnan(w.grad).all()) and v.grad.tolist() == [0.5, 0.25]


@pytest.mark.parametrize("listed", [("ep_size_2", "ep_size_1"), ("ep_size_1", "ep_size_2")])
def test_per_group_numbers_deepspeed_expert_groups_by_name(listed):
    """DeepSpeed lists its expert param groups ("moe": True) in the order a Python set iterates their names, which
    differs between processes: per_group takes them sorted by name in their places, each with its own limit and
    parameters (ranks listing them apart numbered them apart: a RuntimeError on every rank), the others in place."""
    d, e1, e2, last = (nn.Parameter(torch.ones(2)) for _ in range(4))
    d.grad, e1.grad, e2.grad, last.grad = (torch.tensor(x) for x in ([3.0, 4.0], [6.0, 8.0], [0.0, 9.0], [1.0, 0.0]))
    experts = {"ep_size_1": {"params": [e1], "max_norm": 2.0}, "ep_size_2": {"params": [e2], "max_norm": 3.0}}
    opt = torch.optim.SGD([{"params": [d], "name": "dense", "max_norm": 1.0},
                           *({**experts[n], "name": n, "moe": True} for n in listed),
                           {"params": [last], "name": "tail", "max_norm": 0.5}], lr=0.1)
    result = GradClipper(mode="per_group")({"d": d, "e1": e1, "e2": e2, "last": last}, optimizer=opt)
    assert result.slots == ("dense", "ep_size_1", "ep_size_2", "tail"), result.slots
    assert result.max_norm.tolist() == [1.0, 2.0, 3.0, 0.5]
    want = [m / (n + 1e-6) for m, n in ((1.0, 5.0), (2.0, 10.0), (3.0, 9.0), (0.5, 1.0))]
    assert result.clip_coef.tolist() == pytest.approx(want, rel=1e-6)
    torch.testing.assert_close(e1.grad, torch.tensor([6.0, 8.0]) * want[1])
    torch.testing.assert_close(e2.grad, torch.tensor([0.0, 9.0]) * want[2])


@pytest.mark.parametrize("mode", ["per_param", "unitwise"])
def test_report_leaves_out_parameters_without_gradients(mode):
    """A frozen layer has no gradient anywhere: neither report lists it (AGC's listed it with a norm of 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    model(torch.randn(5, 3)).sum().backward()
    extra = {"agc": AGC(clipping=1e9)} if mode == "unitwise" else {"max_norm": 1e9}
    for depth in (None, 1):
        norms = GradClipper(mode=mode, report=True, report_depth=depth, **extra)(model).norms
        if depth is None:
            assert set(norms) == {"2.weight", "2.bias"}, norms
            assert norms["2.weight"] == pytest.approx(model[2].weight.grad.norm().item(), rel=1e-6)
        else:
            assert set(norms) == {"2"}, norms


# ----------------------------------------------------------------------------------------------- distributed


def body_total_parity(names: list[str]) -> list[float]:
    """mode='total' gives the functional API's norm and clipping on every wrapper, both the float64 reference's
    (the functional API's norm alone was the expectation: a shard counted twice passed)."""
    out = []
    for name in names:
        for p in (0.0, 2.0, math.inf):
            target, ref = cases.trained(name)
            grads = [g.clone() for g in _local_grads(target)]
            want = dist_clip.get_total_norm(target, p)
            expected = reference_norm([q.grad for q in ref.parameters()], p)
            assert want.item() == pytest.approx(expected, rel=1e-5), (name, p, want.item(), expected)
            with count_collectives() as calls:
                result = GradClipper(max_norm=0.01, norm_type=p)(target)
            assert calls.total == (0 if name == "ddp" else 1), calls.names
            assert result.total_norm.item() == pytest.approx(want.item(), rel=1e-6)
            coef = min(1.0, 0.01 / (want.item() + 1e-6))
            for g, before in zip(_local_grads(target), grads):
                torch.testing.assert_close(g, before * coef, rtol=1e-6, atol=1e-9)
            out.append(result.total_norm.item())
    return out


def _local_grads(target: nn.Module) -> list[torch.Tensor]:
    out = []
    for q in target.parameters():
        g = q.grad
        if g is not None:
            out.append(g._local_tensor if type(g).__name__ == "DTensor" else g)
    return out


def test_total_mode_matches_functional(run_ranks):
    values = run_ranks(2, body_total_parity, ["ddp", "fsdp2", "fsdp1_flat"])
    assert values[0] == values[1]


def _poisoned(rank_with_nan: int) -> nn.Module:
    """An FSDP2 model whose gradient of '2.weight' holds a NaN on one rank's shard only."""
    target, _ = cases.trained("fsdp2")
    if dist.get_rank() == rank_with_nan:
        target[2].weight.grad._local_tensor.view(-1)[0] = math.nan
    return target


def _error_message(target: nn.Module) -> str:
    try:
        GradClipper(on_nonfinite="error")(target)
    except RuntimeError as e:
        return str(e)
    return "no error"


def body_error_policy() -> str:
    return _error_message(_poisoned(1))


def test_error_policy_raises_on_every_rank_naming_rank_and_parameter(run_ranks):
    for message in run_ranks(2, body_error_policy):
        assert "rank 1: 2.weight" in message and "rank 0" not in message, message
        assert "on_nonfinite='skip'" in message


def body_error_policy_fsdp1_flat() -> str:
    """FSDP1 without use_orig_params: the total mode's pieces are flat shards; the message must still name the
    unwrapped model's parameters (it said 'flat_param')."""
    target, _ = cases.trained("fsdp1_flat")
    if dist.get_rank() == 1:
        flat = next(m._flat_param for m in target.modules() if getattr(m, "_flat_param", None) is not None)
        flat.grad.view(-1)[0] = math.nan
    return _error_message(target)


def test_error_policy_names_parameters_inside_fsdp1_flat_shards(run_ranks):
    names = [n for n, _ in cases.build_mlp().named_parameters()]
    for message in run_ranks(2, body_error_policy_fsdp1_flat):
        assert "flat_param" not in message and "rank 0" not in message, message
        assert any(f"rank 1: {n}" in message for n in names), message


def _optimizer(kind: str, params) -> torch.optim.Optimizer:  # noqa: ANN001
    if kind == "adam_fused":
        return torch.optim.Adam(params, lr=0.1, fused=True)
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.1, foreach=True)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [q.detach()._local_tensor.clone() for q in model.parameters()]
    for q in model.parameters():
        for v in opt.state.get(q, {}).values():
            if isinstance(v, torch.Tensor):
                out.append((v._local_tensor if type(v).__name__ == "DTensor" else v).clone())
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def body_skip_policy(kind: str) -> bool:
    """A good step, a poisoned step skipped, a good step: equals two good steps of an untouched twin."""
    rank = dist.get_rank()
    model, _ = cases.trained("fsdp2", seed=3)
    twin, _ = cases.trained("fsdp2", seed=3)
    opt, twin_opt = _optimizer(kind, model.parameters()), _optimizer(kind, twin.parameters())
    clipper, twin_clipper = GradClipper(max_norm=0.05, on_nonfinite="skip"), GradClipper(max_norm=0.05)
    for step in range(3):
        if step > 0:
            for m in (model, twin):
                m.zero_grad()
                m(cases.batch(rank + 10 * step, 2)).square().mean().backward()
        if step == 1:
            if rank == 1:
                model[2].weight.grad._local_tensor.view(-1)[0] = math.nan
            before = _snapshot(model, opt)
            with count_collectives() as calls:
                result = clipper(model, optimizer=opt)
            assert calls.total == 1 and not bool(result.finite) and not bool(result.clipped)
            opt.step()
            assert _same(before, _snapshot(model, opt)), f"{kind}: the skipped step changed parameters or state"
            assert not hasattr(opt, "found_inf")
            continue
        assert bool(clipper(model, optimizer=opt).finite)
        opt.step()
        twin_clipper(twin)
        twin_opt.step()
        assert _same(_snapshot(model, opt), _snapshot(twin, twin_opt)), f"{kind}: step {step} differs from the twin"
    assert int(clipper.num_nonfinite) == 1
    return True


@pytest.mark.parametrize("kind", ["adam_fused", "adam", "sgd"])
def test_skip_policy_makes_the_step_a_no_op(run_ranks, kind):
    assert run_ranks(2, body_skip_policy, kind) == [True, True]


def body_zero_and_ignore() -> list[bool]:
    out = []
    target = _poisoned(0)
    result = GradClipper(on_nonfinite="zero")(target)
    out.append(not bool(result.finite) and all(bool((g == 0).all()) for g in _local_grads(target)))
    target = _poisoned(0)
    GradClipper(on_nonfinite="ignore")(target)
    twin = _poisoned(0)
    dist_clip.clip_grad_norm_(twin, 1.0)  # torch's behaviour: scale by the non-finite coefficient
    pairs = zip(_local_grads(target), _local_grads(twin))
    out.append(all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in pairs))
    out.append(all(bool(g.isnan().all()) for g in _local_grads(target) if g.numel()))
    return out


def test_zero_and_ignore_policies(run_ranks):
    assert run_ranks(2, body_zero_and_ignore) == [[True, True, True]] * 2


def _step_grads(step: int, rank: int) -> dict[str, torch.Tensor]:
    """This rank's half of a gradient whose norm wanders, with spikes at steps 6 and 9."""
    g = torch.Generator().manual_seed(step)
    full = torch.randn(40, generator=g, dtype=torch.float64) * (1.0 + 0.1 * step)
    if step in (6, 9):
        full *= 25
    return {"w": full[rank * 20 : (rank + 1) * 20].float().clone()}


def body_resume() -> list[list[float]]:
    rank = dist.get_rank()
    configs = [
        ClipperConfig(max_norm=ZClip(warmup_steps=3, max_norm=None)),
        ClipperConfig(max_norm=AutoClip(percentile=50, window=4)),
        ClipperConfig(max_norm=AutoClip(percentile=25)),
        ClipperConfig(max_norm=0.5, on_nonfinite="zero"),
    ]
    out = []
    for cfg in configs:
        straight = GradClipper(cfg)
        through = [straight(_step_grads(s, rank), group=dist.group.WORLD) for s in range(12)]
        first = GradClipper(cfg)
        for s in range(5):
            first(_step_grads(s, rank), group=dist.group.WORLD)
        buf = io.BytesIO()
        torch.save(first.state_dict(), buf)
        buf.seek(0)
        resumed = GradClipper(cfg)
        resumed.load_state_dict(torch.load(buf))
        again = [resumed(_step_grads(s, rank), group=dist.group.WORLD) for s in range(5, 12)]
        for a, b in zip(through[5:], again):
            assert torch.equal(a.clip_coef, b.clip_coef) and torch.equal(a.max_norm, b.max_norm), cfg
        assert resumed.step == straight.step == 12
        assert torch.equal(resumed.num_clipped, straight.num_clipped)
        out.append([r.clip_coef.item() for r in through])
    return out


def test_state_dict_resume_continues_identically(run_ranks):
    a, b = run_ranks(2, body_resume)
    assert a == b


def _split_grads(step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    """One 42-element gradient per step, split over ``world`` ranks (any of 1, 2, 3)."""
    g = torch.Generator().manual_seed(step)
    full = torch.randn(42, generator=g, dtype=torch.float64) * (1.0 + 0.1 * step)
    if step in (6, 9):
        full *= 25
    n = 42 // world
    return {"w": full[rank * n : (rank + 1) * n].float().clone()}


_DCP_CONFIGS = (
    ClipperConfig(max_norm=ZClip(warmup_steps=3)),  # saved after 2 calls: in warm-up; after 5: past it
    ClipperConfig(max_norm=0.5),
)


def body_dcp_save(path: str, cut: int) -> list[list[float]]:
    import torch.distributed.checkpoint as dcp

    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for i, cfg in enumerate(_DCP_CONFIGS):
        clipper = GradClipper(cfg)
        coefs = []
        for s in range(cut + 5):
            if s == cut:  # the clipper itself as DCP's Stateful, beside other entries
                dcp.save({"clipper": clipper, "other": torch.ones(2)}, checkpoint_id=f"{path}/{i}")
            coefs.append(clipper(_split_grads(s, rank, world), group=dist.group.WORLD).clip_coef.item())
        out.append(coefs[cut:])
    return out


def body_dcp_load(path: str, cut: int) -> list[object]:
    import torch.distributed.checkpoint as dcp

    rank, world = dist.get_rank(), dist.get_world_size()
    out: list[object] = []
    for i, cfg in enumerate(_DCP_CONFIGS):
        clipper = GradClipper(cfg)
        dcp.load({"clipper": clipper, "other": torch.zeros(2)}, checkpoint_id=f"{path}/{i}")
        assert clipper.step == cut
        out.append([clipper(_split_grads(s, rank, world), group=dist.group.WORLD).clip_coef.item()
                    for s in range(cut, cut + 5)])
    return out


@pytest.mark.parametrize("cut", [2, 5])
def test_state_saved_by_dcp_on_two_ranks_resumes_on_two_and_three(run_ranks, tmp_path, cut):
    """ZClip's and a fixed limit's states are of fixed shape: ``torch.distributed.checkpoint`` saves them (the
    clipper as its Stateful) and loads them on another number of ranks, the next 5 coefficients those of the run
    never stopped (bit for bit on 2 ranks; on 3 the norm's float64 partials add in another order). AutoClip's
    history, which grows: tests/test_adaptive.py."""
    straight = run_ranks(2, body_dcp_save, str(tmp_path), cut)
    assert straight[0] == straight[1]
    for world in (2, 3):
        got = run_ranks(world, body_dcp_load, str(tmp_path), cut)
        assert all(g == got[0] for g in got)
        for a, b in zip(straight[0], got[0]):
            assert a == b if world == 2 else a == pytest.approx(b, rel=1e-6, abs=0)


def body_one_collective_per_mode() -> list[int]:
    counts = []
    for cfg, needs_opt in (
        (ClipperConfig(), False),
        (ClipperConfig(report=True), False),
        (ClipperConfig(mode="per_param"), False),
        (ClipperConfig(mode="per_group"), True),
        (ClipperConfig(mode="unitwise", report=True), False),
        (ClipperConfig(max_norm=ZClip(warmup_steps=1)), False),
        (ClipperConfig(max_norm=AutoClip(), norm_type="inf"), False),
        (ClipperConfig(on_nonfinite="skip"), True),
    ):
        for name in ("fsdp2", "fsdp1_flat", "fsdp1_orig"):
            target, _ = cases.trained(name)
            opt = torch.optim.SGD(target.parameters(), lr=0.1) if needs_opt else None
            with count_collectives() as calls:
                GradClipper(cfg)(target, optimizer=opt)
            counts.append(calls.total)
    return counts


def test_one_collective_per_call_in_every_mode(run_ranks):
    for counts in run_ranks(2, body_one_collective_per_mode):
        assert counts == [1] * len(counts), counts


def test_reference_norm_agrees_with_report():
    g = {"a": torch.randn(10), "b": torch.randn(3, 3)}
    norms = GradClipper(max_norm=math.inf, report=True)(g).norms
    assert norms == pytest.approx({k: reference_norm([v]) for k, v in g.items()}, rel=1e-6)


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("depth", [None, 1])
def test_a_report_of_many_parameters_matches_the_float64_reference(p, depth):
    """The report's roots are taken over one vector of every entry (a tensor per entry cost 21-27 ms of a 52-60 ms
    call on 2,400 parameters): each entry is still its own parameter's (or module's) norm, NaN and inf included."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)) for _ in range(40)])
    model(torch.randn(5, 3)).square().sum().backward()
    model[7][0].weight.grad[0, 0] = math.nan
    model[9][1].bias.grad[1] = math.inf
    model[11][0].bias.grad = None  # left out of the report
    params = dict(model.named_parameters())
    keys = {".".join(n.split(".")[:depth]) if depth else n for n, q in params.items() if q.grad is not None}
    want = {key: reference_norm([q.grad for n, q in params.items()
                                 if q.grad is not None and (n == key or n.startswith(key + "."))], p) for key in keys}
    norms = GradClipper(max_norm=math.inf, norm_type=p, report=True, report_depth=depth)(model).norms  # (NaN-scaled)
    assert norms == pytest.approx(want, rel=1e-6, nan_ok=True)


def test_bad_call_arguments_name_what_was_expected():
    model = nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="plan must be a dist_clip.ParallelPlan, got object"):
        GradClipper(max_norm=1.0)(model, plan=object())
    with pytest.raises(TypeError, match="flag must be a one-value tensor.*got str"):
        dist_clip.skip_next_step_(opt, "yes")  # (a Python bool is a constant flag: test_skip_next_step_takes_...)
    with pytest.raises(TypeError, match=r"flag must be a one-value tensor.*shape \(2,\)"):
        dist_clip.skip_next_step_(opt, torch.tensor([True, False]))
    with pytest.raises(TypeError, match="flag must be a bool tensor.*got dtype torch.float32"):
        dist_clip.skip_next_step_(opt, torch.tensor(0.5))  # was taken as True
    for bad in ("no", 0):  # report="no" gave a report, report=0 none, where the config refuses both
        with pytest.raises(TypeError, match="report must be None, True or False"):
            GradClipper(max_norm=1.0)(model, report=bad)
    empty = GradClipper(max_norm=1.0, mode="per_param")([])  # one coefficient for no slots before
    assert empty.slots == () and empty.clip_coef.shape == (0,) and not bool(empty.clipped)
    clipper = GradClipper(max_norm=AutoClip(percentile=10))
    state = clipper.state_dict()
    with pytest.raises(TypeError, match=r"state\['threshold'\] must be a dict or None, got int"):
        clipper.load_state_dict({**state, "threshold": 5})
    thr = {k: v for k, v in state["threshold"].items() if k != "history"}
    with pytest.raises(ValueError, match=r"state\['threshold'\] lacks 'history'"):
        clipper.load_state_dict({**state, "threshold": thr})
    opt.param_groups[0]["max_norm"] = torch.tensor(0.25)  # a one-value tensor is a number here too
    result = GradClipper(mode="per_group")(model, optimizer=opt)
    assert result.max_norm.tolist() == [0.25]


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("mode", "report"), [("total", True), ("per_param", False), ("per_group", False), ("unitwise", False)]
)
def test_a_nonfinite_gradient_at_p_inf_is_nonfinite_in_every_per_slot_path(bad, dtype, mode, report):
    """The per-slot max dropped NaN by mapping it to 0, and mapped inf to float64's largest value with it: the
    float64 total came out finite (1.8e308), so a non-finite policy never fired. NaN is carried beside the max as a
    flag per slot: with the flag dropped a NaN gradient's slot read 0 (a total of 0.5, the step taken)."""
    w = nn.Parameter(torch.ones(3, dtype=dtype))
    w.grad = torch.tensor([1.0, bad, 2.0], dtype=dtype)
    v = nn.Parameter(torch.ones(2, dtype=dtype))
    v.grad = torch.tensor([0.5, 0.25], dtype=dtype)
    opt = torch.optim.SGD([w, v], lr=0.1)
    before = [w.detach().clone(), v.detach().clone()]
    out = GradClipper(max_norm=1.0, norm_type="inf", mode=mode, report=report, on_nonfinite="skip")(
        {"w": w, "v": v}, optimizer=opt
    )
    same = math.isnan if math.isnan(bad) else math.isinf
    assert same(out.total_norm.item()) and not bool(out.finite)
    opt.step()
    assert torch.equal(w.detach(), before[0]) and torch.equal(v.detach(), before[1])
    if report:
        assert same(out.norms["w"]) and out.norms["v"] == 0.5


def test_unitwise_coefficients_of_float64_gradients_stay_float64():
    """AGC's per-unit coefficients were rounded to float32 for every dtype (3e-8 off for float64 gradients)."""
    g = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(3, 5, dtype=torch.float64, generator=g))
    grad = torch.randn(3, 5, dtype=torch.float64, generator=g) * 10
    w.grad = grad.clone()
    result = GradClipper(mode="unitwise", agc=AGC(clipping=0.01, eps=1e-3))([w])
    limit = torch.linalg.vector_norm(w.detach(), dim=1).clamp(min=1e-3) * 0.01
    norms = torch.linalg.vector_norm(grad, dim=1)
    coef = torch.where(norms < limit, torch.ones_like(norms), limit / norms)
    torch.testing.assert_close(w.grad, grad * coef[:, None], rtol=1e-13, atol=0)
    assert result.clip_coef.item() == pytest.approx(coef.min().item(), rel=1e-13)


def test_a_generator_target_is_read_once_in_every_mode():
    """``model.parameters()`` was read more than once by a call: unit-wise clipping after a pending fused
    hand-over found it empty ("a measurement needs at least one slot"), and the error policy's message said
    "non-finite gradients on no rank" for a NaN it had just measured."""
    torch.manual_seed(0)
    m = nn.Linear(4, 4)
    opt = torch.optim.Adam(m.parameters(), lr=0.1, fused=True)
    for q in m.parameters():
        q.grad = torch.randn_like(q) * 10
    dist_clip.clip_grad_norm_(m, 1.0, optimizer=opt)  # the coefficient rides to opt's next step
    result = GradClipper(mode="unitwise", agc=AGC(clipping=1e9))(m.parameters())
    assert result.total_norm.item() == pytest.approx(1.0, rel=1e-5)  # sees the gradients clipped
    m.weight.grad[0, 0] = math.nan
    with pytest.raises(RuntimeError, match=r"non-finite gradients on rank 0: 0\b"):
        GradClipper(on_nonfinite="error")(m.parameters())


def test_unitwise_takes_a_norm_beyond_float32_range_for_finite():
    """As the other modes: finite gradients whose norm overflows float32 are finite (unit-wise mode zeroed them
    under "zero" and raised under "error")."""
    for policy in ("zero", "error"):
        w = nn.Parameter(torch.ones(1, 2))
        w.grad = torch.tensor([[3e38, -3e38]])
        result = GradClipper(mode="unitwise", on_nonfinite=policy, agc=AGC(clipping=0.01))([w])
        assert bool(result.finite) and bool(result.clipped), policy
        limit = 0.01 * math.sqrt(2.0)
        # The unit's coefficient, 3.3e-41, is a float32 subnormal (AGC applies it in the gradient's precision,
        # not in two factors as the total modes do): 2e-5 off.
        torch.testing.assert_close(w.grad, torch.tensor([[1.0, -1.0]]) * (limit / math.sqrt(2.0)), rtol=1e-4, atol=0)


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_group_limits_that_holders_of_one_slot_give_differently_are_found(p):
    """Two tensor-parallel ranks hold halves of one slot, one with max_norm 1, the other inf: the summed
    check read inf + inf as agreement; limits ride as 1 / (1 + limit) now. Equal limits (inf too) agree,
    also summed over different numbers of holders."""
    from dist_clip.clipper import _group_membership, _limits_agree

    def combine(*parts):
        out = parts[0]
        for x in parts[1:]:
            out = torch.maximum(out, x) if math.isinf(p) else out + x
        return out

    slot = torch.tensor([0])
    with pytest.raises(ValueError, match="param group 0 .* has different max_norm on different ranks"):
        _limits_agree(combine(_group_membership([0], p, [1.0]), _group_membership([0], p, [math.inf])), slot, p, ["g"])
    for limit in (2.0, math.inf, 0.0):
        _limits_agree(combine(_group_membership([0], p, [limit]), _group_membership([0], p, [limit])), slot, p, ["g"])
        three = combine(*[_group_membership([0, -1], p, [limit])] * 3, _group_membership([-1, 0], p, [limit]))
        _limits_agree(three, torch.tensor([0, 0]), p, ["g"])


@pytest.mark.parametrize("fused", [False, True])
def test_a_user_post_hook_sees_a_skipped_step_undone(fused):
    """A user step post-hook (an EMA of the parameters) registered before the first skip ran before dist_clip's
    restore on a non-fused optimizer: it averaged the skipped step's NaN parameters in and kept NaN for good."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused)
    ema = [p.detach().clone() for p in model.parameters()]

    def update(*_):
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.mul_(0.5).add_(p, alpha=0.5)

    opt.register_step_post_hook(update)
    clipper = GradClipper(max_norm=1.0, on_nonfinite="skip")
    for step, bad in enumerate([False, True, False]):
        model.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        if bad:
            model.weight.grad[0, 0] = float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        clipper(model, optimizer=opt)
        opt.step()
        if bad:
            assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
        assert all(torch.isfinite(e).all() for e in ema), f"step {step}: the EMA read the skipped step"


def test_inputs_read_once_or_refused_by_type():
    """AGC(exclude=<generator>) was read by its own check and excluded nothing (1.weight clipped to 0.003 for
    10.0); a param group's max_norm=tensor(True) was the limit 1.0; keys of mixed types gave Python's sort error;
    unit-wise clipping took a non-dict mapping as its keys and said "not iterable" for an optimizer; a 0-dim
    numpy norm_type made the frozen config unhashable."""
    import types

    import numpy as np

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    for q in model.parameters():
        q.grad = torch.full_like(q, 10.0)
    agc = AGC(exclude=(n for n in ["1.*"]))
    assert agc.exclude == ("1.*",)
    GradClipper(mode="unitwise", agc=agc)(model)
    assert bool((model[1].weight.grad == 10.0).all()) and not bool((model[0].weight.grad == 10.0).all())
    for bad in (None, {"1.*": 1}, "1.*", [1], 3):
        with pytest.raises(TypeError, match="AGC.exclude must be an iterable of name patterns"):
            AGC(exclude=bad)
    opt = torch.optim.SGD([{"params": list(model.parameters()), "max_norm": torch.tensor(True)}], lr=0.1)
    with pytest.raises(TypeError, match=r"param group 0 has max_norm tensor\(True\)"):
        GradClipper(mode="per_group")(model, optimizer=opt)
    opt = torch.optim.SGD([{"params": list(model.parameters()), "max_norm": torch.tensor(2)}], lr=0.1)
    assert GradClipper(mode="per_group")(model, optimizer=opt).max_norm.tolist() == [2.0]
    p, q = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    p.grad, q.grad = torch.ones(2), torch.ones(2)
    for mode in ("total", "per_param", "unitwise"):
        with pytest.raises(TypeError, match="a mapping target needs str keys .* got int 1"):
            GradClipper(mode=mode)({"a": p, 1: q})
    for target in (opt, None, 3):
        with pytest.raises(TypeError, match="unit-wise clipping needs parameters"):
            GradClipper(mode="unitwise")(target)
    report = GradClipper(mode="unitwise", report=True)(types.MappingProxyType({"a": p})).norms
    assert report == {"a": pytest.approx(math.sqrt(2.0))}
    # a plain tensor given a .grad is a parameter to every mode (unit-wise refused it: "needs parameters")
    w, like = torch.randn(4, 8), nn.Parameter(torch.zeros(4, 8))
    w.grad = torch.randn(4, 8) * 10
    like.data.copy_(w)
    like.grad, before = w.grad.clone(), w.grad.clone()
    for t in (w, like):
        GradClipper(mode="unitwise", agc=AGC(clipping=0.01))([t])
    assert torch.equal(w.grad, like.grad) and not torch.equal(w.grad, before)
    config = ClipperConfig(norm_type=np.array(3.0))
    assert config.norm_type == 3.0 and hash(config) == hash(ClipperConfig(norm_type=3.0))


@pytest.mark.parametrize(("how", "fused"), [("clipper", False), ("clipper", True), ("hand_over", True)])
def test_a_first_call_from_a_user_pre_hook_acts_on_the_running_step(how, fused):
    """The very first dist_clip call on an optimizer made from a user's step pre-hook installed dist_clip's hooks
    while torch ran the pre-hooks: its skip was dropped and the NaN step taken ([0.9, nan, 0.9] for [1, 1, 1]).
    (optimizer= skips a step only when fused.)"""
    params = [torch.ones(3, requires_grad=True)]
    opt = torch.optim.Adam(params, lr=0.1, fused=fused)
    clipper = GradClipper(max_norm=0.5, on_nonfinite="skip")
    if how == "clipper":
        opt.register_step_pre_hook(lambda o, *_: (clipper(params, optimizer=o), None)[1])
    else:
        opt.register_step_pre_hook(lambda o, *_: (dist_clip.clip_grad_norm_(params, 0.5, optimizer=o), None)[1])
    for bad in (True, False, True):
        params[0].grad = torch.tensor([1.0, float("nan") if bad else 2.0, 3.0])
        before = params[0].detach().clone()
        opt.step()
        if bad:
            assert torch.equal(params[0].detach(), before), "the NaN step was taken"
        else:
            assert torch.isfinite(params[0]).all() and not torch.equal(params[0].detach(), before)


def _skip_guard_branch(monkeypatch: pytest.MonkeyPatch, host: bool) -> None:
    """The skip guard's host branch (the flag read on the host), or, ``host=False``, the accelerator's (no read)."""
    from dist_clip import _fused

    if not host:
        monkeypatch.setattr(_fused, "_on_host", lambda flag: False)


@pytest.mark.parametrize("fused", [False, True])
def test_every_flag_taken_for_a_device_s_is_read_nowhere_in_the_step(monkeypatch, fused):
    """``_fused._on_host``, patched to take every flag for an accelerator's (tests/test_flow_fuzz.py's
    ``off_the_host``), is the one test of it: the skip guard kept a copy of its own and the fused post-hook tested
    ``found.device.type``, so both still read the flag on the host under that patch (the guard's snapshot and
    restore of a plain SGD; the fused AdamW's post-hook after a hand-over), and the flows run "off the host" ran
    their host branches. No value is read on the host by dist_clip's code in such a step now (after a first step,
    whose new optimizer state only the host restores), and the step is taken with the clipped gradients."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    from dist_clip import _fused

    monkeypatch.setattr(_fused, "_on_host", lambda flag: False)
    package = str(Path(dist_clip.__file__).parent)
    reads: list[str] = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func is torch.ops.aten._local_scalar_dense.default:
                stack = traceback.extract_stack()
                reads.extend(f"{f.filename}:{f.lineno}" for f in stack if f.filename.startswith(package))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6))
    opt = (torch.optim.AdamW([w], lr=0.1, fused=True) if fused else torch.optim.SGD([w], lr=0.1, momentum=0.9))
    clipper = GradClipper(max_norm=0.5, on_nonfinite="skip")
    for step in range(2):
        w.grad = torch.full((6,), 3.0)
        if fused:
            dist_clip.clip_grad_norm_([w], 0.5, optimizer=opt)
        else:
            clipper([w], optimizer=opt)
        before = w.detach().clone()
        with Reads():
            opt.step()
        assert not torch.equal(before, w.detach()), step
        if step == 1:
            assert not reads, reads
        reads.clear()


def test_the_device_restore_leaves_sparse_state_to_the_host(monkeypatch):
    """Off the host the restore used torch.where on every state tensor: SGD's sparse momentum buffer (sparse
    gradients) raised NotImplementedError from the post-hook at every step after the first."""
    _skip_guard_branch(monkeypatch, host=False)
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1, momentum=0.9)
    clipper = GradClipper(max_norm=0.5, on_nonfinite="skip")
    for bad in (False, False, True):
        emb(torch.tensor([1, 2, 3])).sum().backward()
        if bad:
            emb.weight.grad = emb.weight.grad * float("nan")
        before = emb.weight.detach().clone()
        momentum = opt.state[emb.weight].get("momentum_buffer")
        momentum = momentum.clone() if momentum is not None else None
        clipper(emb.parameters(), optimizer=opt)
        opt.step()
        if bad:
            assert torch.equal(emb.weight.detach(), before)
            assert torch.equal(opt.state[emb.weight]["momentum_buffer"].to_dense(), momentum.to_dense())
        opt.zero_grad()


class _GroupAdapting(torch.optim.Optimizer):
    """An optimizer keeping its adaptation in its param groups, as Prodigy, D-Adaptation and schedule-free do
    (``group["d"] = d``, ``group["k"] = k + 1``); plain SGD otherwise."""

    def __init__(self, params, lr: float) -> None:  # noqa: ANN001
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        for g in self.param_groups:
            g["d_num"] = g.get("d_num", 0.0) + sum(float(p.grad.abs().sum()) for p in g["params"])
            g["k"] = g.get("k", 0) + 1
            for p in g["params"]:
                p.add_(p.grad, alpha=-g["lr"])


class _GroupAdaptingSGD(torch.optim.SGD):
    """The same, writing its groups before ``super().step()``: torch runs the step hooks of both ``step`` methods,
    the inner pair inside the outer step (its snapshot, taken after the writes, put none of them back)."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        for g in self.param_groups:
            g["d_num"] = g.get("d_num", 0.0) + sum(float(p.grad.abs().sum()) for p in g["params"])
            g["k"] = g.get("k", 0) + 1
        return super().step(closure)


@pytest.mark.parametrize("kind", [_GroupAdapting, _GroupAdaptingSGD])
@pytest.mark.parametrize("host", [True, False])
def test_a_skipped_step_leaves_the_param_groups_as_they_were(monkeypatch, host, kind):
    """A skipped step restored the parameters and the per-parameter state, not what the step wrote into its param
    groups: an optimizer adapting there (Prodigy's d, schedule-free's k) kept the skipped batch's NaN for good
    (d_num nan, k 2 after one good step and one skipped, where 2.23 and 1 are right)."""
    _skip_guard_branch(monkeypatch, host)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    torch.optim.SGD(model.parameters(), lr=0.1)  # (torch wraps SGD.step, with its hooks, at the first instance)
    opt = kind(model.parameters(), lr=0.1)
    clipper = GradClipper(max_norm=1.0, on_nonfinite="skip")
    seen = []
    for bad in (False, True, False):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        if bad:
            model.weight.grad[0, 0] = float("nan")
        clipper(model, optimizer=opt)
        before = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        opt.step()
        after = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        if bad:
            assert after == before and torch.isfinite(model.weight).all()
        seen.append(after["k"])
    assert seen == [1, 1, 2] and math.isfinite(opt.param_groups[0]["d_num"])
    # a step that writes no group entry keeps the very objects (an lr a scheduler holds stays the same tensor)
    lr = torch.tensor(0.1)
    plain = torch.optim.SGD(model.parameters(), lr=lr)
    model.weight.grad[0, 0] = float("nan")
    clipper(model, optimizer=plain)
    plain.step()
    assert plain.param_groups[0]["lr"] is lr


class _AddsAnEntry(torch.optim.Optimizer):
    """Plain SGD whose first step adds a group entry and changes no other (``group.setdefault("d0", ...)``, as
    Prodigy's first step records its initial d)."""

    def __init__(self, params, lr: float) -> None:  # noqa: ANN001
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        for g in self.param_groups:
            g.setdefault("d0", float(sum(p.grad.abs().sum() for p in g["params"])))
            for p in g["params"]:
                p.add_(p.grad, alpha=-g["lr"])


@pytest.mark.parametrize("host", [True, False])
def test_a_skipped_step_removes_a_group_entry_it_added(monkeypatch, host):
    """A skipped first step that only adds an entry to its group (nothing else written there, no per-parameter
    state): the entry is removed, on the host's path and on the accelerator's (which tells a write by the keys'
    count as well as by the objects: the entries the snapshot holds are all the same objects). Kept, the next good
    step read the skipped batch's d0 (NaN) for good."""
    _skip_guard_branch(monkeypatch, host)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = _AddsAnEntry(model.parameters(), lr=0.1)
    clipper = GradClipper(max_norm=1.0, on_nonfinite="skip")
    for bad in (True, False):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        if bad:
            model.weight.grad[0, 0] = float("nan")
        clipper(model, optimizer=opt)
        opt.step()
        assert ("d0" in opt.param_groups[0]) == (not bad) and torch.isfinite(model.weight).all()
    assert math.isfinite(opt.param_groups[0]["d0"])


class _WritesAfterSuper(torch.optim.SGD):
    """A subclass writing its groups and parameters after ``super().step()``: still the skipped step's writes."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        out = super().step(closure)
        for g in self.param_groups:
            g["k"] = g.get("k", 0) + 1
            for p in g["params"]:
                p.mul_(0.5)
        return out


class _Lookahead(torch.optim.Optimizer):
    """An optimizer stepping another inside its own ``step()`` (a Lookahead-style wrapper): the inner one's step is
    not a nested step of itself."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner
        super().__init__([torch.zeros(1, requires_grad=True)], {"lr": 0.0})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        return self.inner.step(closure)


@pytest.mark.parametrize("host", [True, False])
def test_a_skipped_subclass_step_puts_back_what_it_wrote_after_super_step(monkeypatch, host):
    """The inner pair of step hooks (``super().step()``) leaves the skip to the outer post-hook: one deciding in
    the inner post-hook put the parameters and groups back before the subclass's own writes after it, which were
    kept (k 1 and the weights halved on a skipped step)."""
    _skip_guard_branch(monkeypatch, host)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    torch.optim.SGD(model.parameters(), lr=0.1)  # (torch wraps SGD.step, with its hooks, at the first instance)
    opt = _WritesAfterSuper(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    GradClipper(max_norm=1.0, on_nonfinite="skip")(model, optimizer=opt)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert "k" not in opt.param_groups[0]
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    opt.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()  # (the next step is taken)
    assert opt.param_groups[0]["k"] == 1 and not torch.equal(before[0], model.weight)


@pytest.mark.parametrize("host", [True, False])
def test_an_optimizer_stepped_inside_another_optimizers_step_is_skipped(monkeypatch, host):
    """A step is nested only inside a step of the same optimizer: an inner optimizer stepped by a wrapper's
    ``step()`` (another optimizer's frame on the stack) read as nested took its NaN step."""
    _skip_guard_branch(monkeypatch, host)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = _Lookahead(inner)
    model(torch.randn(4, 3)).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    GradClipper(max_norm=1.0, on_nonfinite="skip")(model, optimizer=inner)
    before = [p.detach().clone() for p in model.parameters()]
    outer.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    inner.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    outer.step()  # (the next step is taken)
    assert torch.isfinite(model.weight).all() and not torch.equal(before[0], model.weight)


@pytest.mark.parametrize("where", ["pre_hook", "subclass"])
@pytest.mark.parametrize("host", [True, False])
def test_a_skipped_step_leaves_a_scheduled_lr_to_its_scheduler(monkeypatch, host, where):
    """An LR scheduler stepped inside step() (a step pre-hook registered after the first clip, or a subclass's
    step before super().step()) writes group["lr"]: a skipped step put it back while the scheduler's counter
    moved on, and a chainable schedule lagged for good (ExponentialLR(gamma=0.5): lr 0.125 at last_epoch 4, for
    0.0625), where one stepped after step() stays on schedule. On accelerators every step, good ones too, read
    the flag on the host (an entry written)."""
    from dist_clip.clipper import _SkipGuard

    _skip_guard_branch(monkeypatch, host)
    changed = []
    original = _SkipGuard._groups_changed
    monkeypatch.setattr(_SkipGuard, "_groups_changed", staticmethod(lambda g: changed.append(original(g))
                                                                    or changed[-1]))
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    torch.optim.SGD(model.parameters(), lr=1.0)  # (torch wraps SGD.step, with its hooks, at the first instance)
    holder = {}

    class Scheduled(torch.optim.SGD):
        def step(self, closure=None):  # noqa: ANN001, ANN201
            holder["sched"].step()
            return super().step(closure)

    opt = (Scheduled if where == "subclass" else torch.optim.SGD)(model.parameters(), lr=1.0)
    clipper = GradClipper(max_norm=1.0, on_nonfinite="skip")
    for i in range(4):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        if i == 1:
            model.weight.grad[0, 0] = float("nan")
        clipper(model, optimizer=opt)
        if not holder:
            holder["sched"] = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
            if where == "pre_hook":
                opt.register_step_pre_hook(lambda o, a, k: holder["sched"].step())
        before = model.weight.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (torch's "lr_scheduler.step() before optimizer.step()")
            opt.step()
        assert torch.equal(before, model.weight.detach()) == (i == 1)
        assert opt.param_groups[0]["lr"] == 0.5 ** holder["sched"].last_epoch == 0.5 ** (i + 1)
    assert not any(changed)  # (no entry but the lr written: the accelerators read no flag for it)
    assert torch.isfinite(model.weight).all()


def test_skipping_a_differentiable_step_is_refused():
    """differentiable=True: the skipped step's values were restored, but its NaN update stayed in the autograd
    history (hypergradients [1.8, nan, 5.8] for [1.8, 3.8, 5.8])."""
    w = torch.ones(3, requires_grad=True)
    p = w * 1.0
    p.grad = torch.ones(3)
    opt = torch.optim.Adam([p], lr=0.1, differentiable=True)
    clipper = GradClipper(max_norm=1.0, on_nonfinite="skip")
    with pytest.raises(ValueError, match="differentiable=True"):
        clipper([p.grad], optimizer=opt)
    # refused before measuring, as any bad input (on every rank, before the collective): refused only when it
    # armed, the call had scaled the gradients by 0.577 and counted a step
    assert p.grad.tolist() == [1.0, 1.0, 1.0] and clipper.step == 0
    with pytest.raises(ValueError, match="differentiable=True"):
        dist_clip.skip_next_step_(opt, torch.tensor(False))
    GradClipper(max_norm=1.0, on_nonfinite="zero")([p.grad], optimizer=opt)  # the other policies work


@pytest.mark.parametrize(("kind", "how"), [("sgd_fused", "hand_over"), ("sgd_fused", "skip"), ("adam", "skip"),
                                           ("lbfgs", "skip")])
def test_a_first_call_inside_a_closure_acts_on_the_running_step(kind, how):
    """The very first dist_clip call on an optimizer made inside its step(closure) found no hook to tell it a step
    was under way: its hand-over reached no step (an update of 11997 for 0.001) and its skip was dropped (NaN)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = {"sgd_fused": lambda: torch.optim.SGD(model.parameters(), lr=1.0, fused=True),
           "adam": lambda: torch.optim.Adam(model.parameters(), lr=0.1),
           "lbfgs": lambda: torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)}[kind]()
    clipper = GradClipper(max_norm=0.001, on_nonfinite="skip")
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).sum() * 1000
        loss.backward()
        if how == "skip":
            model.weight.grad[0, 0] = float("nan")
            clipper(model, optimizer=opt)
        else:
            dist_clip.clip_grad_norm_(model, 0.001, optimizer=opt)
        return loss

    before = [q.detach().clone() for q in model.parameters()]
    opt.step(closure)
    update = torch.cat([(q.detach() - b).flatten() for q, b in zip(model.parameters(), before)]).norm().item()
    assert update == (pytest.approx(0.001, rel=1e-4) if how == "hand_over" else 0.0)


@pytest.mark.parametrize("where", ["global_pre", "pre_then_another", "post"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_first_call_from_any_step_hook(where, fused):
    """The very first dist_clip call from a step hook: from a global pre-hook (torch runs those before the
    optimizer's own, dist_clip's included) its skip was taken for the running step and then cleared by
    dist_clip's own pre-hook (NaN stepped); from a pre-hook followed by another, registering dist_clip's pre-hook
    while torch looped over them raised "OrderedDict mutated during iteration"; from a post-hook, the skip meant
    for the next step was taken for the finished one and dropped."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    params = [torch.ones(3, requires_grad=True)]
    opt = torch.optim.Adam(params, lr=0.1, fused=fused)
    clipper = GradClipper(max_norm=0.5, on_nonfinite="skip")

    def arm(o, *_):
        if o is opt:
            clipper(params, optimizer=o)

    handles = []
    if where == "global_pre":
        handles.append(register_optimizer_step_pre_hook(arm))
    elif where == "pre_then_another":
        handles += [opt.register_step_pre_hook(arm), opt.register_step_pre_hook(lambda *_: None)]
    try:
        for step, bad in enumerate((True, False, True, False)):
            params[0].grad = torch.tensor([1.0, float("nan") if bad else 2.0, 3.0])
            if where == "post":
                if step == 0:
                    opt.register_step_post_hook(lambda *_: dist_clip.skip_next_step_(opt, torch.tensor(True)))
                    opt.register_step_post_hook(lambda *_: None)
                    params[0].grad = torch.tensor([1.0, 2.0, 3.0])
            before = params[0].detach().clone()
            opt.step()
            skipped = torch.equal(params[0].detach(), before)
            if where == "post":
                assert skipped == (step > 0), step  # every step after the first hook call is skipped
            else:
                assert skipped == bad and torch.isfinite(params[0]).all(), step
    finally:
        for h in handles:
            h.remove()


def test_a_step_that_raised_leaves_no_frame_behind():
    """dist_clip kept the frame of a step that raised (to tell a step under way from one that failed), and with
    it the callers' frames and their locals: a failed attempt's 64 MiB lived on until the retry's step."""
    import gc
    import weakref

    model = nn.Linear(4, 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)

    def boom(*_):
        raise MemoryError("out of memory")

    def attempt() -> weakref.ref:
        big = torch.zeros(1 << 16)
        model(torch.randn(2, 4)).sum().backward()
        dist_clip.clip_grad_norm_(model, 1.0, optimizer=opt)
        handle = opt.register_step_pre_hook(boom)
        try:
            opt.step()
        except MemoryError:
            pass
        finally:
            handle.remove()
        return weakref.ref(big)

    gc.disable()
    try:
        left = attempt()
        assert left() is None, "the failed attempt's locals are kept alive"
    finally:
        gc.enable()


def test_a_skipped_first_fused_sgd_step_with_a_gradient_missing():
    """A skipped first step of fused SGD with momentum (dampening 0) kept the zero buffers made for the parameters
    with a gradient: the next step, with every gradient, was no first step to torch, which passed None for the
    other parameter's buffer (TypeError from _fused_sgd_). As if never stepped now."""
    torch.manual_seed(0)
    w, e = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    twin = [nn.Parameter(w.detach().clone()), nn.Parameter(e.detach().clone())]
    opt = torch.optim.SGD([w, e], lr=0.1, momentum=0.9, fused=True)
    twin_opt = torch.optim.SGD(twin, lr=0.1, momentum=0.9, fused=True)
    w.grad, e.grad = torch.ones(3), None
    dist_clip.skip_next_step_(opt, torch.tensor(True))
    opt.step()
    for q in (w, e, *twin):
        q.grad = torch.ones(3)
    opt.step()
    twin_opt.step()
    assert torch.equal(w, twin[0]) and torch.equal(e, twin[1])


class _NoGradSGD(torch.optim.Optimizer):
    """A custom optimizer written as torch documents it: step() under @torch.no_grad()."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-g["lr"])


@pytest.mark.parametrize("where", ["pre", "global_pre"])
def test_a_hook_under_the_step_s_decorator_is_told_from_the_step(where):
    """The phase of a step was read from the code of the frame torch's step wrapper called: a pre-hook under the
    same decorator as step() (@torch.no_grad(), one wrapper code) was taken for the step itself, its skip armed on
    the running step and then dropped by dist_clip's own pre-hook: the NaN step was taken. Read from the
    wrapper's own line now."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from dist_clip import _fused

    assert all(_fused._LINES.values()), _fused._LINES  # torch's step wrapper as this reading expects it
    w = nn.Parameter(torch.ones(3))
    opt = _NoGradSGD([w])
    clipper = GradClipper(max_norm=0.5, on_nonfinite="skip")

    @torch.no_grad()
    def hook(o, *_):
        if o is opt:
            clipper([w], optimizer=o)

    handle = opt.register_step_pre_hook(hook) if where == "pre" else register_optimizer_step_pre_hook(hook)
    try:
        for bad in (False, True, False, True):
            w.grad = torch.tensor([1.0, float("nan") if bad else 2.0, 3.0])
            before = w.detach().clone()
            opt.step()
            assert torch.equal(w.detach(), before) == bad and torch.isfinite(w).all()
    finally:
        handle.remove()


def test_steps_without_torch_s_hooks_and_cleared_hooks():
    """A class whose step was replaced after its first instance runs no step hooks: a hand-over was lost (35.8
    off) and a skip taken; a wrapper that never ran Optimizer.__init__ raised AttributeError. A hand-over is
    scaled in the call now, and a skip refused with a ValueError. Hooks the user cleared from the optimizer's
    dicts are registered again by the next call (a NaN step was taken)."""

    class Patched(torch.optim.SGD):
        pass

    w = nn.Parameter(torch.ones(3))
    opt = Patched([w], lr=1.0, fused=True)
    Patched.step = torch.optim.SGD.step.__wrapped__  # another library's patch: no hooks from now on
    try:
        w.grad = torch.tensor([30.0, 40.0, 0.0])
        dist_clip.clip_grad_norm_([w], 1.0, optimizer=opt)
        torch.testing.assert_close(w.grad, torch.tensor([0.6, 0.8, 0.0]), rtol=1e-5, atol=0)  # scaled in the call
        with pytest.raises(ValueError, match="runs no torch step hooks"):
            GradClipper(max_norm=1.0, on_nonfinite="skip")([w], optimizer=opt)
        with pytest.raises(ValueError, match="runs no torch step hooks"):
            dist_clip.skip_next_step_(object.__new__(torch.optim.SGD), torch.tensor(True))
    finally:
        del Patched.step
    for fused in (True, False):
        q = nn.Parameter(torch.ones(3))
        opt = torch.optim.SGD([q], lr=0.1, fused=fused)
        clipper = GradClipper(max_norm=1.0, on_nonfinite="skip")
        q.grad = torch.ones(3)
        clipper([q], optimizer=opt)
        opt.step()
        opt._optimizer_step_pre_hooks.clear()
        opt._optimizer_step_post_hooks.clear()
        q.grad = torch.tensor([1.0, float("nan"), 1.0])
        before = q.detach().clone()
        clipper([q], optimizer=opt)
        opt.step()
        assert torch.equal(q.detach(), before), f"fused={fused}: the NaN step was taken"


@pytest.mark.parametrize("fused", [False, True])
def test_hooks_cleared_or_left_out_are_repaired(fused):
    """Three ways dist_clip's step hooks went missing, each losing a hand-over or a skip (or the step): the user
    cleared the hook dicts and the next call came from a pre-hook (dist_clip believed its pre-hook there);
    a first call from a pre-hook left its pre-hook for the post-hook to add, and that step raised; after a
    partial clear, removing the hook still registered while torch looped over it raised "OrderedDict mutated"."""
    w = nn.Parameter(torch.ones(3))

    def fresh():
        return torch.optim.SGD([w], lr=1.0, fused=fused)

    clipper = GradClipper(max_norm=1.0, on_nonfinite="skip")
    with torch.no_grad():
        w.fill_(1.0)

    def check(opt, grad, want):
        before = w.detach().clone()
        w.grad = torch.tensor(grad)
        opt.step()
        torch.testing.assert_close(before - w.detach(), torch.tensor(want), rtol=1e-5, atol=1e-7)

    # 1) cleared, then a call from a user pre-hook
    opt = fresh()
    w.grad = torch.ones(3)
    clipper([w], optimizer=opt)
    opt.step()
    opt._optimizer_step_pre_hooks.clear()
    opt._optimizer_step_post_hooks.clear()
    opt.register_step_pre_hook(lambda o, *_: (clipper([w], optimizer=o), None)[1])
    check(opt, [1.0, float("nan"), 1.0], [0.0, 0.0, 0.0])
    # 2) a first call from a pre-hook, the step raising after it; then a plain loop
    opt = fresh()

    def boom(*_):
        raise MemoryError("out of memory")

    first = opt.register_step_pre_hook(lambda o, *_: (clipper([w], optimizer=o), None)[1])
    second = opt.register_step_pre_hook(boom)
    w.grad = torch.ones(3)
    with pytest.raises(MemoryError):
        opt.step()
    first.remove()
    second.remove()
    w.grad = torch.tensor([1.0, float("nan"), 1.0])
    clipper([w], optimizer=opt)
    check(opt, [1.0, float("nan"), 1.0], [0.0, 0.0, 0.0])
    # 3) a partial clear, then a call from a pre-hook followed by another pre-hook
    opt = fresh()
    w.grad = torch.ones(3)
    clipper([w], optimizer=opt)
    opt.step()
    opt._optimizer_step_post_hooks.clear()
    opt.register_step_pre_hook(lambda o, *_: (clipper([w], optimizer=o), None)[1])
    opt.register_step_pre_hook(lambda *_: None)
    check(opt, [1.0, float("nan"), 1.0], [0.0, 0.0, 0.0])


def _raise_once():
    calls = [0]

    def hook(*_):
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("injected")

    return hook


@pytest.mark.parametrize("in_hook", [False, True])
def test_a_skip_armed_before_a_step_that_raised_waits_for_the_retry(in_hook):
    """Non-fused: a skip armed on part A (NaN) before a step that raised lost its way to the retry: the guard
    forgot what it was armed on (a second call before the retry, on part B, replaced the flag), or a call inside
    the failed step ORed into it and the retry dropped both: the NaN step was taken ([0.99, nan, 0.99])."""
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([a, b], lr=0.01)
    a.grad, b.grad = torch.tensor([1.0, float("nan"), 1.0]), torch.full((3,), 0.2)
    clip = GradClipper(max_norm=1.0, on_nonfinite="skip")
    clip([a], optimizer=opt)
    if in_hook:
        opt.register_step_pre_hook(lambda o, *_: (clip([b], optimizer=o), None)[1])
    opt.register_step_pre_hook(_raise_once())
    with pytest.raises(RuntimeError, match="injected"):
        opt.step()
    if not in_hook:
        clip([b], optimizer=opt)
    opt.step()
    assert torch.equal(a.detach(), torch.ones(3)) and torch.equal(b.detach(), torch.ones(3))


@pytest.mark.parametrize("fused", [False, True])
def test_a_first_call_in_a_step_that_raised_leaves_the_retry_alone(fused):
    """The very first dist_clip call from a user pre-hook (NaN) in a step that then raised: dist_clip's own
    pre-hook, left for the post-hook to add, never came, and the retry on good gradients was skipped by the
    failed step's flag. A global step pre-hook stands in for it now."""
    p = nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=fused)
    clip = GradClipper(max_norm=1.0, on_nonfinite="skip")
    opt.register_step_pre_hook(lambda o, *_: (clip([p], optimizer=o), None)[1])
    opt.register_step_pre_hook(_raise_once())
    p.grad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    with pytest.raises(RuntimeError, match="injected"):
        opt.step()
    p.grad = torch.full((4,), 3.0)  # the next batch: norm 6
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), 1.0 - 0.1 * 0.5), rtol=1e-5, atol=1e-7)
    from dist_clip import _fused

    assert not any(entry[1][0] is None for entry in _fused._LATE)  # the stand-in did its work


def test_a_skipped_first_fused_sgd_step_armed_inside_its_closure():
    """The very first dist_clip call made inside step(closure), before the closure's backward: no hook had
    wrapped the closure, so the gradients it made got no first-step preparation, and the skipped step kept
    torch's empty_like momentum (6e12 here, 2e36 seen): the next step moved the parameters by 5.7e11."""
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.001, momentum=0.9, fused=True)

    def closure():
        opt.zero_grad()
        dist_clip.skip_next_step_(opt, torch.tensor(True))
        (p * torch.tensor([1.0, 2.0, 3.0])).sum().backward()

    opt.step(closure)
    assert torch.equal(p.detach(), torch.ones(3)) and "momentum_buffer" not in opt.state.get(p, {})
    p.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.999), rtol=0, atol=1e-6)


@pytest.mark.parametrize("inner", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_a_replacing_skip_inside_a_step_that_raised_keeps_the_one_before(fused, inner):
    """skip_next_step_ called inside a step (a user pre-hook) replaces the pending flag for that step: on a
    non-fused optimizer it cleared the flag armed before the step at once, so when the step raised the retry
    took the NaN step ([0.9, nan, 0.9])."""
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1, fused=fused)
    p.grad = torch.tensor([1.0, float("nan"), 1.0])
    dist_clip.skip_next_step_(opt, torch.tensor(True))
    calls = [0]

    def rearm(o, *_):
        calls[0] += 1
        if calls[0] == 1:
            dist_clip.skip_next_step_(o, torch.tensor(inner))

    opt.register_step_pre_hook(rearm)
    opt.register_step_pre_hook(_raise_once())
    with pytest.raises(RuntimeError, match="injected"):
        opt.step()
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))


def test_a_dropped_optimizer_s_stand_in_holds_nothing():
    """The global stand-in for a pre-hook left out by a raised step held the skip guard's bound methods, and with
    them the guard's snapshot and the parameters, after the optimizer was gone."""
    import gc
    import weakref

    box = {"p": nn.Parameter(torch.ones(1 << 10)), "clip": GradClipper(max_norm=1.0, on_nonfinite="skip")}
    opt = torch.optim.SGD([box["p"]], lr=0.1)
    opt.register_step_pre_hook(lambda o, *_: (box["clip"]([box["p"]], optimizer=o), None)[1])
    opt.register_step_pre_hook(_raise_once())
    box["p"].grad = torch.ones(1 << 10)
    with pytest.raises(RuntimeError, match="injected"):
        opt.step()
    left = weakref.ref(box["p"])
    box.clear()
    del opt
    gc.collect()
    assert left() is None, "the parameter is kept alive"


@pytest.mark.parametrize("fused", [False, True])
def test_skip_next_step_takes_a_python_bool(fused):
    """The README's `skip_next_step_(opt, False)` (clear a pending flag) raised "flag must be a one-value tensor":
    a Python bool is a constant on the optimizer's device (no host read)."""
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    opt = torch.optim.SGD([p], lr=1.0, fused=fused)
    dist_clip.skip_next_step_(opt, True)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(2))
    dist_clip.skip_next_step_(opt, torch.tensor(True))
    dist_clip.skip_next_step_(opt, False)
    opt.step()
    assert torch.equal(p.detach(), -torch.ones(2))
    # A meta flag holds no value: armed, it made that step raise "Cannot copy out of meta tensor" (and, fused, every
    # step after it); refused instead, the next step is taken.
    with pytest.raises(ValueError, match="flag is a meta tensor"):
        dist_clip.skip_next_step_(opt, torch.tensor(True, device="meta"))
    opt.step()
    assert torch.equal(p.detach(), -2 * torch.ones(2))


def _conj_model() -> tuple[nn.Parameter, nn.Parameter]:
    torch.manual_seed(0)
    z = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    w = nn.Parameter(torch.randn(3))
    c = torch.randn(4, dtype=torch.complex64)
    ((z.conj() * c).real.sum() + (w * 5).sum()).backward()
    assert z.grad.is_conj()  # autograd's gradient of a parameter used through .conj() is a conjugate view
    return z, w


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("how", ["clip_grad_norm_", "clipper", "per_param"])
def test_a_conjugate_view_gradient_is_clipped_with_the_others(how, foreach):
    """torch's foreach multiply refuses conjugate views: the call raised after scaling the other gradients (w by
    0.114, z not: half-clipped). A real coefficient scales the view's memory alike."""
    z, w = _conj_model()
    before = [z.grad.clone(), w.grad.clone()]
    want = reference_norm(before, 2.0)
    if how == "clip_grad_norm_":
        total = dist_clip.clip_grad_norm_([z, w], 1.0, foreach=foreach)
        coefs = [1.0 / (want + 1e-6)] * 2
    elif how == "clipper":
        total = GradClipper(max_norm=1.0, foreach=foreach)([z, w]).total_norm
        coefs = [1.0 / (want + 1e-6)] * 2
    else:
        total = GradClipper(max_norm=1.0, mode="per_param", foreach=foreach)([z, w]).total_norm
        coefs = [min(1.0, 1.0 / (reference_norm([b], 2.0) + 1e-6)) for b in before]
    assert abs(total.item() - want) <= 1e-6 * want
    assert z.grad.is_conj()  # still the view autograd made, its memory scaled
    for g, b, c in zip((z.grad, w.grad), before, coefs):
        torch.testing.assert_close(g, b * c, rtol=1e-6, atol=0)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_a_negative_view_gradient_is_clipped_with_the_others(foreach):
    """A negative view (``torch._neg_view``, what ``z.conj().imag`` gives) is refused by torch's foreach multiply
    ("doesn't currently support mutable TensorLists with negation inputs") as a conjugate view is: its memory is
    scaled alike."""
    torch.manual_seed(0)
    z = torch.randn(5, dtype=torch.complex64)
    assert z.conj().imag.is_neg()
    a, b = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3))
    a.grad, b.grad = torch._neg_view(torch.randn(5) * 10), torch.randn(3)
    before = [a.grad.resolve_neg().clone(), b.grad.clone()]
    want = reference_norm(before, 2.0)
    total = dist_clip.clip_grad_norm_([a, b], 1.0, foreach=foreach)
    assert abs(total.item() - want) <= 1e-6 * want
    assert a.grad.is_neg()
    for g, w in zip((a.grad, b.grad), before):
        torch.testing.assert_close(g.resolve_neg(), w / (want + 1e-6), rtol=1e-6, atol=0)


def test_the_error_policy_names_a_parameter_beside_a_sparse_gradient():
    """Naming the culprits called isfinite on a sparse gradient: NotImplementedError instead of the RuntimeError
    (and, before the all-gather of the names, on the ranks holding it only)."""
    torch.manual_seed(0)
    emb, lin = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1)
    lin(emb(torch.tensor([1, 2, 2]))).sum().backward()
    lin.weight.grad[0, 0] = math.nan
    with pytest.raises(RuntimeError, match=r"1\.weight"):
        GradClipper(max_norm=1.0, on_nonfinite="error")(nn.ModuleList([emb, lin]))
    emb.weight.grad = torch.sparse_coo_tensor([[3, 3]], [[math.inf] * 4, [1.0] * 4], (10, 4), check_invariants=True)
    lin.weight.grad.nan_to_num_(0.0)
    with pytest.raises(RuntimeError, match=r"0\.weight"):
        GradClipper(max_norm=1.0, on_nonfinite="error")(nn.ModuleList([emb, lin]))


@pytest.mark.parametrize("mode", ["total", "per_param"])
def test_zero_gradients_under_a_zero_limit_are_not_clipped(mode):
    """README: `clipped` tells whether some gradient was scaled down; a slot whose gradients are all zero does
    not count whatever its coefficient (max_norm=0 gives every slot the coefficient 0)."""
    model = nn.Linear(4, 4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    result = GradClipper(max_norm=0.0, mode=mode)(model)
    assert result.total_norm.item() == 0.0 and not bool(result.clipped)
    model.weight.grad[0, 0] = 1.0  # one non-zero gradient: scaled to 0, clipped
    result = GradClipper(max_norm=0.0, mode=mode)(model)
    assert bool(result.clipped) and model.weight.grad[0, 0].item() == 0.0


@pytest.mark.parametrize("target", ["module", "mapping"])
def test_zero_gradients_of_a_group_under_a_zero_limit_are_not_clipped(target):
    """The same for mode="per_group", also where the groups travel in the measurement (named pieces: a mapping),
    which decides `clipped` from every rank's groups: a group of zero gradients under max_norm=0 read as
    clipped there."""
    model = nn.Linear(4, 4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD([{"params": [model.weight], "max_norm": 0.0}, {"params": [model.bias], "max_norm": 1.0}],
                          lr=0.1)

    def arg() -> object:
        return model if target == "module" else {n: q.grad for n, q in model.named_parameters()}

    result = GradClipper(mode="per_group")(arg(), optimizer=opt)
    assert result.total_norm.item() == 0.0 and not bool(result.clipped)
    model.weight.grad[0, 0] = 1.0  # one non-zero gradient in the zero-limit group: scaled to 0, clipped
    result = GradClipper(mode="per_group")(arg(), optimizer=opt)
    assert bool(result.clipped) and model.weight.grad[0, 0].item() == 0.0


def test_a_report_lists_a_parameter_and_its_gradient_given_together_once():
    """``[p, p.grad]``: the gradient is p's, measured once: the report names one slot holding its norm (a second
    slot reading 0.0 for a gradient of norm 5 passed the suite, the norms being deduplicated again later)."""
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    result = GradClipper(max_norm=100.0, report=True)([p, p.grad])
    assert result.total_norm.item() == pytest.approx(5.0) and result.norms == {"0": pytest.approx(5.0)}, result.norms


def test_report_given_to_a_call_overrides_the_config():
    """``report=`` of a call overrides ``config.report`` for that call, both ways (no test called with it)."""
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert GradClipper(max_norm=10.0)({"w": p}, report=True).norms == {"w": 5.0}
    assert GradClipper(max_norm=10.0, report=True)({"w": p}, report=False).norms is None
    assert GradClipper(max_norm=10.0, report=True)({"w": p}).norms == {"w": 5.0}


def test_a_zero_max_norm_zeroes_gradients_as_torch_does():
    """max_norm=0 is a limit like any other (>= 0), as torch.nn.utils.clip_grad_norm_ takes it."""
    p, q = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    p.grad, q.grad = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])
    for config in (ClipperConfig(max_norm=0.0), ClipperConfig(max_norm=0)):
        p.grad = torch.tensor([3.0, 4.0])
        result = GradClipper(config)([p])
        assert result.total_norm.item() == 5.0 and bool(result.clipped)
    torch.nn.utils.clip_grad_norm_([q], 0.0)
    assert torch.equal(p.grad, q.grad) and torch.equal(q.grad, torch.zeros(2))
