"""Rank-side bodies of ``tests/test_deepspeed_names.py``: DeepSpeed gradients named by parameter.

Every case builds one engine over ``tests/ds_cases.make_model`` with two SGD param groups (``0.*`` and the rest),
so each ZeRO-1/2 flat group is cut by the partition boundary of 2 ranks inside a weight (``0.weight`` at 26 of
its 42 elements, ``2.weight`` at 44 of 49), and checks against the float64 unsharded torch run:

* step 0: ``GradClipper(report=True)`` for p = 2 and inf: every parameter's norm, and the total; then
  ``mode="per_param"`` clipping (the coefficient of every parameter, the norms after it), ``engine.step()`` and
  the parameters after it;
* step 1: ``mode="per_group"`` clipping for p = inf with a ``max_norm`` per param group, the step and the
  parameters (under ZeRO-3, whose torch optimizer holds no parameters between steps, through the stage-3
  optimizer's ``sub_group_to_group_id``);
* every dist_clip call issues exactly one collective.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import torch
import torch.distributed as dist

import dist_clip
from dist_clip.testing import count_collectives, reference_norm, reference_param_norms
from tests import ds_cases
from tests.ds_cases import LR, MOMENTUM, Reference, full_params, loss_fn, micro_batches

HUGE = 1e30  # a max_norm that never clips: report-only calls


#: Param groups by name. "layers": ZeRO-1/2 cut ``0.weight`` (group 0: 49 -> 52 elements, 26 per rank) and
#: ``2.weight`` (group 1: 88 elements, 44 per rank). "shuffled", in an order of our own: group 0 is ``0.weight``
#: alone (cut at 22 of 42); group 1 is cut at 48 inside ``2.weight``, or, with ``parameter_alignment`` (fp32
#: parameters padded to 4 elements; 100 elements, 50 per rank), with or without ``round_robin_gradients``, at
#: 50 inside the padding after ``2.weight`` (49 elements): rank 1's partition then starts with padding.
GROUPS = {
    "layers": (("0.weight", "0.bias"), ("2.weight", "2.bias", "4.weight", "4.bias")),
    "shuffled": (("0.weight",), ("2.weight", "4.weight", "2.bias", "0.bias", "4.bias")),
}


def make_engine(stage: int, dtype: str = "fp32", offload: bool = False, zero_extra: dict | None = None,
                grad_accum_dtype: str | None = None, groups: str = "layers") -> tuple[Any, torch.optim.Optimizer]:
    deepspeed = ds_cases._quiet()
    if dtype == "fp16":
        ds_cases.allow_cpu_fp16()  # test-only, see its docstring
    cfg = ds_cases.ds_config(stage, dtype=dtype, offload=offload, grad_accum_dtype=grad_accum_dtype)
    cfg["zero_optimization"].update(zero_extra or {})
    model = ds_cases.make_model(0)
    by_name = dict(model.named_parameters())
    opt = torch.optim.SGD([{"params": [by_name[n] for n in g]} for g in GROUPS[groups]], lr=LR, momentum=MOMENTUM)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine, opt


def _close(got: float, want: float, rtol: float, what: str) -> None:
    assert abs(got - want) <= rtol * abs(want) + 1e-12, f"{what}: {got} vs {want}"


def _norms_close(got: dict[str, float] | None, want: dict[str, float], rtol: float, what: str) -> None:
    assert got is not None and set(got) == set(want), f"{what}: names {sorted(got or {})} vs {sorted(want)}"
    for n in want:
        _close(got[n], want[n], rtol, f"{what} {n}")


def _params_close(engine: Any, ref: Reference, rtol: float, atol: float, what: str) -> None:
    for (n, _), a, b in zip(ref.model.named_parameters(), full_params(engine), ref.params()):
        err = (a - b).abs().max().item()
        assert torch.allclose(a, b, rtol=rtol, atol=atol), f"{what}: {n} differs by {err:.3e}"


def _backward(engine: Any, ref: Reference, step: int) -> dict[str, torch.Tensor]:
    """Both runs' gradients of ``step``; the reference's by name (float64, scaled in place later)."""
    batches = micro_batches(engine, step)
    grads = dict(zip([n for n, _ in ref.model.named_parameters()], ref.grads(batches)))
    dtype = next(engine.module.parameters()).dtype
    engine.backward(loss_fn(engine(batches[0][dist.get_rank()].to(dtype))))
    return grads


def _deepspeed_grads(engine: Any) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient as DeepSpeed assembles it (``safe_get_full_grad``), float64, by name."""
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).detach().to(torch.float64).clone() for n, p in engine.module.named_parameters()}


def _clip(clipper: dist_clip.GradClipper, engine: Any, **kwargs: Any) -> dist_clip.ClipResult:
    with count_collectives() as c:
        result = clipper(engine, **kwargs)
    want = ds_cases.expected_collectives(engine)  # none where every rank holds the same whole gradients
    assert c.total == want, f"{c.total} collectives, expected {want}"
    return result


def case_names_vs_reference(stage: int, dtype: str = "fp32", offload: bool = False, zero_extra: dict | None = None,
                            per_group: bool = True, rtol: float = 1e-6, grad_accum_dtype: str | None = None,
                            groups: str = "layers") -> dict:
    engine, opt = make_engine(stage, dtype, offload, zero_extra, grad_accum_dtype, groups)
    ref = Reference()
    names = tuple(n for n, _ in ref.model.named_parameters())
    exact = dtype == "fp32"
    out: dict[str, Any] = {}

    # -- step 0: reports for p = 2 and inf, then per-parameter clipping at p = 2.
    grads = _backward(engine, ref, 0)
    if not exact:
        # A low-precision run's gradients differ from the float64 model's by its own rounding (``rtol`` as the
        # caller states it), which would hide a wrong piece as small as that: first, every norm against
        # DeepSpeed's own assembly of each gradient (loss-scaled under fp16), exact to float64 rounding.
        scale = float(getattr(engine.optimizer, "loss_scale", 1.0)) if dtype == "fp16" else 1.0
        assembled = {n: g / scale for n, g in _deepspeed_grads(engine).items()}
        for p in (2.0, math.inf):
            r = _clip(dist_clip.GradClipper(max_norm=HUGE, norm_type=p, report=True), engine)
            _norms_close(r.norms, reference_param_norms(assembled, p), 1e-6, f"stage {stage} p={p} assembled")
            _close(float(r.total_norm), reference_norm(list(assembled.values()), p), 1e-6,
                   f"stage {stage} p={p} total of the assembled gradients")
    for p in (2.0, math.inf):
        r = _clip(dist_clip.GradClipper(max_norm=HUGE, norm_type=p, report=True), engine)
        _norms_close(r.norms, reference_param_norms(grads, p), rtol, f"stage {stage} p={p} report")
        _close(float(r.total_norm), reference_norm(list(grads.values()), p), rtol, f"stage {stage} p={p} total")
        out[f"report_p{p}"] = r.norms
    before = reference_param_norms(grads, 2.0)
    limit = sorted(before.values())[len(before) // 2]  # clips about half of the parameters
    r = _clip(dist_clip.GradClipper(mode="per_param", max_norm=limit), engine)
    assert r.slots == names, r.slots
    coefs = [min(1.0, limit / (before[n] + 1e-6)) for n in names]
    assert 0 < sum(c < 1 for c in coefs) < len(coefs), "the case must clip some parameters and not others"
    for n, want, got in zip(names, coefs, r.clip_coef.tolist()):
        _close(got, want, max(rtol, 1e-6), f"stage {stage} per_param coefficient of {n}")
        grads[n].mul_(want)
    r = _clip(dist_clip.GradClipper(max_norm=HUGE, report=True), engine)
    _norms_close(r.norms, reference_param_norms(grads, 2.0), max(rtol, 1e-5), f"stage {stage} norms after per_param")
    engine.step()
    ref.opt.step()
    if exact:
        _params_close(engine, ref, 1e-5, 1e-6, f"stage {stage} params after per_param step")

    # -- step 1: per-group clipping at p = inf, each group against its own max_norm.
    if per_group:
        grads = _backward(engine, ref, 1)
        if not exact:
            # Low-precision parameters drift from the float64 ones within a step, and the small gradients of the
            # next step amplify it to tens of percent: from here on the reference is DeepSpeed's own gradient of
            # each parameter, assembled by DeepSpeed (exact to float64 rounding).
            grads, rtol = _deepspeed_grads(engine), 1e-6
        inf = reference_param_norms(grads, math.inf)
        group_norms = [max(inf[n] for n in g) for g in GROUPS[groups]]
        limits = [0.5 * group_norms[0], 2.0 * group_norms[1]]  # the first group clips, the second does not
        # engine.optimizer (a ZeRO wrapper) and the engine stand for the torch optimizer given to initialize (it
        # was a TypeError but under on_nonfinite="skip"); a first call with limits that clip nothing, then the real
        # one through engine.optimizer
        for pg in opt.param_groups:
            pg["max_norm"] = HUGE
        r = _clip(dist_clip.GradClipper(mode="per_group", norm_type="inf"), engine, optimizer=engine)
        assert r.slots == ("param_group0", "param_group1") and r.clip_coef.tolist() == [1.0, 1.0], r
        for pg, m in zip(opt.param_groups, limits):
            pg["max_norm"] = m
        r = _clip(dist_clip.GradClipper(mode="per_group", norm_type="inf", report=True), engine,
                  optimizer=engine.optimizer)
        assert r.slots == ("param_group0", "param_group1"), r.slots
        _norms_close(r.norms, inf, rtol, f"stage {stage} per_group report")
        want = [min(1.0, m / (g + 1e-6)) for m, g in zip(limits, group_norms)]
        for i, (w, got) in enumerate(zip(want, r.clip_coef.tolist())):
            _close(got, w, max(rtol, 1e-6), f"stage {stage} per_group coefficient of group {i}")
        for g, w in zip(GROUPS[groups], want):
            for n in g:
                grads[n].mul_(w)
        r = _clip(dist_clip.GradClipper(max_norm=HUGE, norm_type="inf", report=True), engine)
        _norms_close(r.norms, reference_param_norms(grads, math.inf), max(rtol, 1e-6),
                     f"stage {stage} norms after per_group")
        engine.step()
        ref.opt.step()
        if exact:
            _params_close(engine, ref, 1e-5, 1e-6, f"stage {stage} params after per_group step")
        out["group_coefs"] = want
    return out


def case_layout(stage: int, offload: bool = False, zero_extra: dict | None = None, groups: str = "layers") -> dict:
    """The ZeRO-1/2 pieces of each rank: named, padding-free, and together exactly every parameter element."""
    from dist_clip.adapters import deepspeed as adapter

    engine, _ = make_engine(stage, offload=offload, zero_extra=zero_extra, groups=groups)
    rank = dist.get_rank()
    engine.backward(loss_fn(engine(ds_cases.batch(rank, 0, 0))))
    shards = adapter.shards(engine, None)
    mine = [(n, t.numel()) for s in shards for n, t in zip(s.names, s.tensors)]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    held: dict[str, int] = {}
    for pieces in everyone:
        for n, k in pieces:
            held[n] = held.get(n, 0) + k
    want = {n: p.numel() for n, p in engine.module.named_parameters()}
    assert held == want, f"elements held per parameter {held} vs {want}"
    split = sorted(n for n in want if sum(n == m for pieces in everyone for m, _ in pieces) > 1)
    assert split, "the case must split some parameter across ranks"
    # Where the partition starts in this rank's flat buffer: in padding for "shuffled" + parameter_alignment.
    starts = [slices[0].dest if slices else None for _, slices in adapter._zero12_layout(engine, engine.optimizer)]
    every_start: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every_start, starts)
    if groups == "shuffled" and (zero_extra or {}).get("parameter_alignment"):
        assert every_start[1][1] == 2, f"rank 1's group 1 partition must start with 2 padding elements: {every_start}"
    engine.step()
    return {"pieces": mine, "split": split, "starts": every_start}


def case_wrapped_block_names(stage: int) -> dict:
    """An activation-checkpointed block and a compiled block inside a DeepSpeed engine: the report named them
    ``0._checkpoint_wrapped_module.weight`` and ``2._orig_mod.weight`` (every other wrapper reports the unwrapped
    model's names), and an AGC ``exclude=("0.weight", "0.bias")`` missed them (0.362 clipped to 1e-4)."""
    from deepspeed.utils import safe_get_full_grad
    from torch import nn
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    deepspeed = ds_cases._quiet()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(checkpoint_wrapper(nn.Linear(4, 6)), nn.Tanh(),
                          torch.compile(nn.Linear(6, 6), backend="eager"), nn.Tanh(), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cases.ds_config(stage))
    torch.manual_seed(100 + rank)
    engine.backward(engine(torch.randn(4, 4)).pow(2).sum())
    report = dist_clip.GradClipper(max_norm=1e30, report=True)(engine).norms or {}
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    for r in range(world):  # DeepSpeed averages the ranks' gradients
        torch.manual_seed(100 + r)
        (ref(torch.randn(4, 4).double()).pow(2).sum() / world).backward()
    want = reference_param_norms({n: q.grad for n, q in ref.named_parameters()})
    first = engine.module[0]._checkpoint_wrapped_module.weight
    before = safe_get_full_grad(first).clone()
    agc = dist_clip.AGC(clipping=1e-4, exclude=("0.weight", "0.bias"))
    unit = dist_clip.GradClipper(mode="unitwise", agc=agc, report=True)(engine).norms or {}
    return {"names": list(report), "unitwise names": list(unit), "want": list(want),
            "close": all(abs(report[n] - w) <= 1e-6 * w for n, w in want.items() if n in report),
            "excluded": torch.equal(before, safe_get_full_grad(first))}


def case_names_that_clash(stage: int) -> str:
    """Two parameters whose names coincide once the wrappers' parts are dropped (``weight`` and
    ``_orig_mod.weight``): the second overwrote the first in the per-name lookup. Refused, as for plain models."""
    from torch import nn

    deepspeed = ds_cases._quiet()
    model = nn.Module()
    model.weight = nn.Parameter(torch.ones(2))
    model.add_module("_orig_mod", nn.Linear(2, 2, bias=False))
    model.forward = lambda x: model._orig_mod(x) * model.weight  # type: ignore[method-assign]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cases.ds_config(stage))
    engine.backward(engine(torch.ones(3, 2)).sum())
    try:
        dist_clip.GradClipper(max_norm=1.0, report=True)(engine)
    except ValueError as e:
        return str(e)
    return "measured"


def case_optimizer_tensors_built_for_per_group_only(stage: int) -> list[int]:
    """The tensors DeepSpeed's optimizer holds in each parameter's place are read by param-group lookups only:
    built for every named call, they took 2.7 ms of a 24 ms per-parameter call on 2,000 parameters. Per-parameter
    clipping and reports no longer build them; per-group clipping does, once a call (its numbers are checked
    against the reference in case_names_vs_reference)."""
    from dist_clip.adapters import deepspeed as ds_adapter

    engine, _ = make_engine(stage, groups="shuffled")
    engine.backward(loss_fn(engine(micro_batches(engine, 0)[0][dist.get_rank()])))
    built = []
    original = ds_adapter.optimizer_tensors

    def counted(target: Any) -> dict[str, torch.Tensor]:
        built.append(1)
        return original(target)

    ds_adapter.optimizer_tensors = counted
    try:
        counts = []
        for clipper, kwargs in ((dist_clip.GradClipper(max_norm=1e9, mode="per_param"), {}),
                                (dist_clip.GradClipper(max_norm=1e9, report=True), {}),
                                (dist_clip.GradClipper(max_norm=1e9, mode="per_group"), {"optimizer": engine})):
            _clip(clipper, engine, **kwargs)
            counts.append(len(built))
        return counts
    finally:
        ds_adapter.optimizer_tensors = original
