"""Rank-side bodies of the DeepSpeed tests (module level, so spawned ranks can import them).

Every case builds a tiny model with the same seed on every rank, feeds each rank its own batch, and compares
dist_clip on the DeepSpeed engine with

* a float64 unsharded torch model fed all ranks' batches (the definition of the norm, and of the step),
* DeepSpeed's own L2 norm and clipping (``gradient_clipping`` set, dist_clip not called),
* the count of backend collectives issued by the dist_clip call.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import dist_clip
from dist_clip.testing import count_collectives, reference_norm
from tests._harness import outcome

P_ALL = (0.0, 1.0, 2.0, 3.5, math.inf)
IN, HID, OUT, BATCH = 6, 7, 4, 3
LR, MOMENTUM = 0.1, 0.9


def _quiet() -> Any:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    deepspeed.utils.logger.setLevel(logging.ERROR)
    # DeepSpeed keeps the last engine's mpu (a PipelineEngine's grid too) for the whole process, and an engine
    # built without one then takes it for its own: clear what an earlier case in these reused ranks left.
    deepspeed.utils.groups.mpu = None
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*")
    return deepspeed


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(IN, HID), torch.nn.Tanh(), torch.nn.Linear(HID, HID), torch.nn.ReLU(), torch.nn.Linear(HID, OUT)
    )


def batch(rank: int, step: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + 100 * micro + rank)
    return torch.randn(BATCH, IN, generator=g) * (1.0 + rank)


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    return (out.float() - 0.5).pow(2).sum()


def ds_config(stage: int, *, dtype: str = "fp32", gas: int = 1, offload: bool = False, clip: float = 0.0,
              grad_accum_dtype: str | None = None, initial_scale_power: int = 8) -> dict:
    zero: dict[str, Any] = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": initial_scale_power,
                       "loss_scale_window": 1000, "hysteresis": 1, "min_loss_scale": 1}
    if grad_accum_dtype is not None:
        cfg["data_types"] = {"grad_accum_dtype": grad_accum_dtype}
    return cfg


def allow_cpu_fp16() -> None:
    """TEST-ONLY SHIM: DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has fp16 kernels (this CPU has
    none), although torch computes fp16 on the CPU, only slowly. The fp16 tests lift that refusal so that
    the loss-scaling code paths, the ones that run on GPUs, can be exercised here."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if not acc.is_fp16_supported():
        acc.is_fp16_supported = lambda: True  # test-only, see the docstring


def make_engine(cfg: dict, seed: int = 0) -> Any:
    deepspeed = _quiet()
    if "fp16" in cfg:
        allow_cpu_fp16()
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def _engine_dtype(engine: Any) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def full_params(engine: Any) -> list[torch.Tensor]:
    """The engine's whole parameters (gathered under ZeRO-3), float64, in model order."""
    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().to(torch.float64).clone() for p in params]
    return [p.detach().to(torch.float64).clone() for p in params]


def micro_batches(engine: Any, step: int) -> list[list[torch.Tensor]]:
    """Batches of every rank for every micro step of ``step``: [micro][rank]."""
    world = dist.get_world_size()
    return [[batch(r, step, m) for r in range(world)] for m in range(engine.gradient_accumulation_steps())]


def run_engine_step(engine: Any, step: int, clip: tuple[float, float] | None,
                    hand_over: bool = False, policy: str | None = None) -> tuple[float | None, int]:
    """One optimizer step of ``engine`` (all micro steps); dist_clip at the boundary when ``clip`` is given,
    handing the coefficient to ``engine.step()`` (``optimizer=engine.optimizer``) when ``hand_over``, through a
    ``GradClipper`` with ``on_nonfinite=policy`` when that is given.

    Returns (dist_clip's total norm or None, collectives of the dist_clip call).
    """
    rank = dist.get_rank()
    dtype = _engine_dtype(engine)
    total, ncoll = None, -1
    for per_rank in micro_batches(engine, step):
        out = engine(per_rank[rank].to(dtype))
        engine.backward(loss_fn(out))
        if engine.is_gradient_accumulation_boundary() and clip is not None:
            max_norm, p = clip
            with count_collectives() as c:
                if policy is not None:
                    t = dist_clip.GradClipper(max_norm=max_norm, norm_type=p, on_nonfinite=policy)(engine).total_norm
                else:
                    t = dist_clip.clip_grad_norm_(engine, max_norm, p,
                                                  optimizer=engine.optimizer if hand_over else None)
            total, ncoll = float(t), c.total
        engine.step()
    return total, ncoll


class Reference:
    """The unsharded float64 torch run: same init, all ranks' batches, DeepSpeed's averaging, same SGD."""

    def __init__(self, seed: int = 0) -> None:
        self.model = make_model(seed).double()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)

    def grads(self, batches: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """DeepSpeed's gradient: the mean over ranks of each rank's loss, each micro loss divided by GAS."""
        self.opt.zero_grad(set_to_none=True)
        gas, world = len(batches), len(batches[0])
        for per_rank in batches:
            for x in per_rank:
                (loss_fn(self.model(x.double())) / (gas * world)).backward()
        return [p.grad for p in self.model.parameters()]

    def step(self, batches: list[list[torch.Tensor]], max_norm: float, p: float) -> float:
        grads = self.grads(batches)
        total = reference_norm(grads, p)
        coef = min(1.0, max_norm / (total + 1e-6))
        for g in grads:
            g.mul_(coef)
        self.opt.step()
        return total

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


def _close(a: float, b: float, rtol: float, what: str) -> None:
    if math.isinf(b) or math.isnan(b):
        assert (math.isnan(a) and math.isnan(b)) or a == b, f"{what}: {a} != {b}"
        return
    assert abs(a - b) <= rtol * abs(b) + 1e-12, f"{what}: {a} vs {b} (rel {abs(a - b) / max(abs(b), 1e-30):.2e})"


def _params_close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float, atol: float, what: str) -> None:
    for i, (a, b) in enumerate(zip(got, want)):
        err = (a - b).abs().max().item()
        assert torch.allclose(a, b, rtol=rtol, atol=atol), f"{what}: param {i} differs by {err:.3e}"


def expected_collectives(engine: Any) -> int:
    """One collective for ZeRO's partitions; none where every rank holds the same whole gradients."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    partitioned = isinstance(engine.optimizer, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3))
    return 1 if partitioned and dist.get_world_size() > 1 else 0


def case_fp32_vs_reference(stage: int, gas: int = 1, offload: bool = False, steps: int = 2,
                           ps: tuple[float, ...] = P_ALL, hand_over: bool = False, ds_clip: float = 0.0,
                           zero_extra: dict | None = None, top_extra: dict | None = None) -> dict:
    """For every p: the norm equals the float64 unsharded reference, params after ``steps`` equal the
    unsharded torch run, one collective per call (none at stage 0, whose gradients are replicated).
    ``hand_over``: the coefficient rides in ``engine.step()`` (``optimizer=engine.optimizer``). ``ds_clip``:
    DeepSpeed's own ``gradient_clipping`` (its default is 1.0), above the L2 norm of our clipped gradients, so
    that its second clip must change nothing. ``zero_extra`` / ``top_extra``: more ``zero_optimization`` and
    top-level config keys (buckets, overlap, reduce-scatter, persistence, sub-groups, parameter offload)."""
    report: dict[str, Any] = {}
    for p in ps:
        cfg = ds_config(stage, gas=gas, offload=offload, clip=ds_clip)
        cfg["zero_optimization"].update(zero_extra or {})
        cfg.update(top_extra or {})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*gradient_clipping.*")
            engine = make_engine(cfg)
        ref = Reference()
        _params_close(full_params(engine), ref.params(), 0, 1e-7, "initial params")
        for step in range(steps):
            batches = micro_batches(engine, step)
            want_total = ref.step(batches, max_norm=_max_norm(p), p=p)
            got_total, ncoll = run_engine_step(engine, step, (_max_norm(p), p), hand_over)
            _close(got_total, want_total, 2e-6, f"stage {stage} p={p} step {step} norm")
            assert ncoll == expected_collectives(engine), f"p={p}: {ncoll} collectives"
            assert _max_norm(p) < want_total, "the case must actually clip"
        _params_close(full_params(engine), ref.params(), 1e-5, 1e-6, f"stage {stage} p={p} params after step")
        report[str(p)] = got_total
    return report


def _max_norm(p: float) -> float:
    # Below every total of the tiny model, so every step clips.
    return 2.0 if p == 0 else 0.05 if math.isinf(p) else 0.3


def case_l2_vs_deepspeed(stage: int, dtype: str = "fp32", gas: int = 1, offload: bool = False, steps: int = 2,
                         grad_accum_dtype: str | None = None, rtol: float = 1e-6, compare_params: bool = True,
                         hand_over: bool = False) -> dict:
    """For L2 the norm equals DeepSpeed's own ``get_global_grad_norm()`` and dist_clip's clipping gives the
    parameters DeepSpeed's own ``gradient_clipping`` gives."""
    max_norm = 0.3
    ours = make_engine(ds_config(stage, dtype=dtype, gas=gas, offload=offload, grad_accum_dtype=grad_accum_dtype))
    theirs = make_engine(ds_config(stage, dtype=dtype, gas=gas, offload=offload, clip=max_norm,
                                   grad_accum_dtype=grad_accum_dtype))
    norms = []
    for step in range(steps):
        got, ncoll = run_engine_step(ours, step, (max_norm, 2.0), hand_over)
        run_engine_step(theirs, step, None)
        if theirs.get_global_grad_norm() is not None:  # stage 0 with a plain torch optimizer keeps none
            want = float(theirs.get_global_grad_norm())
            # From the second step on, low-precision parameters may differ by an ulp (see below), and so
            # may the gradients: the first step is the exact comparison.
            tol = rtol if step == 0 or dtype == "fp32" else 1e-2
            _close(got, want, tol, f"stage {stage} {dtype} step {step} L2 vs DeepSpeed")
        else:
            want = None
        assert ncoll == expected_collectives(ours)
        norms.append((got, want))
    # Low-precision parameters may round the last bit apart: DeepSpeed multiplies by 1/(clip*scale), we by
    # coef and then 1/scale. A clipped step moves them by far more than a few ulps, so the check still tells.
    # Over two momentum steps such ulps compound a little: allow 4 ulps of the largest parameter.
    eps = {"fp32": 0.0, "bf16": 2.0**-8, "fp16": 2.0**-11}[dtype]
    if compare_params:
        got_p, want_p = full_params(ours), full_params(theirs)
        atol = max(1e-6, 4 * eps * max(float(t.abs().max()) for t in want_p))
        _params_close(got_p, want_p, 1e-6 if dtype == "fp32" else 2 * eps, atol,
                      f"stage {stage} {dtype} params vs DeepSpeed's clipping")
    return {"norms": norms}


def _gathered_reference(engine: Any, p: float) -> float:
    """The float64 norm of exactly the pieces DeepSpeed holds, unscaled, gathered from every rank.

    Independent of dist_clip's arithmetic (its partials, its collective, its finalisation); the choice of
    pieces is checked against DeepSpeed's own L2 norm in :func:`case_l2_vs_deepspeed`.
    """
    from dist_clip.adapters import deepspeed as adapter

    mine = []
    for s in adapter.shards(engine, None):
        counted = s.counted and (s.group is not None or dist.get_rank() == 0)
        if counted:
            mine += [t.detach().reshape(-1).to(torch.float64) / s.loss_scale for t in s.tensors]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return reference_norm([t for pieces in everyone for t in pieces], p)


def case_lowp_vs_reference(stage: int, dtype: str, offload: bool = False, grad_accum_dtype: str | None = None) -> dict:
    """bf16/fp16 (loss-scaled) gradients: for every p the norm equals the float64 norm of the gathered,
    unscaled gradients (to float64 rounding) and the float64 unsharded model (to the dtype's precision);
    one collective per call."""
    engine = make_engine(ds_config(stage, dtype=dtype, offload=offload, grad_accum_dtype=grad_accum_dtype))
    ref = Reference()
    rank = dist.get_rank()
    batches = micro_batches(engine, 0)
    ref_grads = ref.grads(batches)
    engine.backward(loss_fn(engine(batches[0][rank].to(_engine_dtype(engine)))))
    # DeepSpeed's own assembly of each parameter's gradient (safe_get_full_grad; loss-scaled under fp16): the
    # exact reference independent of the adapter's choice of pieces (the gathered one follows it: an element
    # cut from every rank's piece passed both checks below, the model's at 5% and skipped at p = 0).
    from tests.ds_names_cases import _deepspeed_grads

    scale = float(getattr(engine.optimizer, "loss_scale", 1.0)) if dtype == "fp16" else 1.0
    assembled = [g / scale for g in _deepspeed_grads(engine).values()]
    out = {}
    for p in P_ALL:
        with count_collectives() as c:
            got = float(dist_clip.get_total_norm(engine, p))
        assert c.total == expected_collectives(engine), f"{c.total} collectives"
        exact = _gathered_reference(engine, p)
        _close(got, exact, 1e-6, f"stage {stage} {dtype} p={p} vs gathered float64")
        _close(got, reference_norm(assembled, p), 1e-6, f"stage {stage} {dtype} p={p} vs DeepSpeed's gradients")
        if p != 0:  # low-precision grads may round small entries to zero: the count is not comparable
            _close(got, reference_norm(ref_grads, p), 0.05, f"stage {stage} {dtype} p={p} vs float64 model")
        out[str(p)] = got
    engine.step()
    return out


def case_fp16_overflow(stage: int, offload: bool = False, steps: int = 5, hand_over: bool = False,
                       policy: str | None = None) -> dict:
    """fp16 with a loss scale so high that the first steps overflow: dist_clip returns a non-finite norm on
    exactly the steps DeepSpeed skips, DeepSpeed skips them (params untouched, loss scale lowered) as it does
    with its own clipping, and the steps after agree with DeepSpeed's own clipping. Under the "zero" policy
    too: zeroed, the gradients read finite to DeepSpeed, whose scale then never came down (every step zeroed)."""
    max_norm = 0.3
    ours = make_engine(ds_config(stage, dtype="fp16", offload=offload, initial_scale_power=17))
    theirs = make_engine(ds_config(stage, dtype="fp16", offload=offload, clip=max_norm, initial_scale_power=17))
    history = []
    for step in range(steps):
        before = full_params(ours)
        got, _ = run_engine_step(ours, step, (max_norm, 2.0), hand_over, policy)
        run_engine_step(theirs, step, None)
        skipped = not ours._step_applied
        assert skipped == (not theirs._step_applied), f"step {step}: DeepSpeed skipped one run only"
        assert skipped == (not math.isfinite(got)), f"step {step}: norm {got} but skipped={skipped}"
        if skipped:
            _params_close(full_params(ours), before, 0, 0, f"step {step} skipped but params moved")
        else:
            _close(got, float(theirs.get_global_grad_norm()), 1e-4, f"step {step} L2 vs DeepSpeed")
        assert ours.optimizer.loss_scale == theirs.optimizer.loss_scale
        history.append((got, skipped, ours.optimizer.loss_scale))
    assert ours.skipped_steps == theirs.skipped_steps
    assert 0 < ours.skipped_steps < steps, f"the case must both overflow and step: {history}"
    _params_close(full_params(ours), full_params(theirs), 2 * 2.0**-11, 1e-6, "params vs DeepSpeed's clipping")
    return {"history": history}


class _WithUnused(torch.nn.Module):
    """The test model beside a layer the forward never calls: its gradient slot in ZeRO's buffers is never
    written by a backward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()
        self.unused = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def case_nan_batch_beside_an_unused_parameter(stage: int, offload: bool, dtype: str, call: str) -> list:
    """A NaN in rank 0's first batch, clean batches after, a parameter without a gradient. ZeRO-3 and the
    offloaded optimizers keep gradient slots between steps that a backward writes only for parameters it
    reaches: scaled by the NaN coefficient (0 * NaN), the unused parameter's slot held NaN for good, and every
    later step read it (ZeRO-3 skipped every step, offload stepped NaN into the parameters). DeepSpeed skips
    the bad step itself; the clean ones must step, finite."""
    deepspeed = _quiet()
    if dtype == "fp16":
        allow_cpu_fp16()
    torch.manual_seed(0)
    model = _WithUnused()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                          config=ds_config(stage, dtype=dtype, offload=offload))
    rank, history = dist.get_rank(), []
    for step in range(3):
        x = batch(rank, step, 0)
        if step == 0 and rank == 0:
            x[0, 0] = math.nan
        engine.backward(loss_fn(engine(x.to(_engine_dtype(engine)))))
        if call == "plain":
            total = dist_clip.clip_grad_norm_(engine, 0.3)
        elif call == "settle":  # handed to step(), then a read first applies it (as the plain call would)
            dist_clip.clip_grad_norm_(engine, 0.3, optimizer=engine)
            total = dist_clip.get_total_norm(engine)
        elif call == "with_norm":  # torch's two steps
            total = dist_clip.get_total_norm(engine)
            dist_clip.clip_grads_with_norm_(engine, 0.3, total)
        else:  # a GradClipper under its default policy ("ignore"): "total", or "per_group" (one group here)
            extra = {"optimizer": engine.optimizer} if call == "per_group" else {}
            total = dist_clip.GradClipper(max_norm=0.3, mode=call)(engine, **extra).total_norm
        engine.step()
        history.append((math.isfinite(float(total)), bool(engine._step_applied)))
    assert history == [(False, False), (True, True), (True, True)], history
    assert all(bool(torch.isfinite(t).all()) for t in full_params(engine)), "NaN reached the parameters"
    return history


def case_stage0_fp16_nan_batch() -> dict:
    """Stage 0's fp16 wrapper (FP16_UnfusedOptimizer) tests the gradients for overflow in step(), skips and
    lowers the loss scale. A NaN in rank 0's batch: "zero" zeroed the gradients before that test, which read
    them finite, took the step and kept the scale; now it leaves them to it, as "ignore" does."""
    seen = {}
    for policy in ("ignore", "zero"):
        engine = make_engine(ds_config(0, dtype="fp16", initial_scale_power=8))
        history = []
        for step in range(3):
            before = full_params(engine)
            x = batch(dist.get_rank(), step, 0)
            if step == 1 and dist.get_rank() == 0:
                x[0, 0] = math.nan
            engine.backward(loss_fn(engine(x.to(_engine_dtype(engine)))))
            total = dist_clip.GradClipper(max_norm=0.3, on_nonfinite=policy)(engine).total_norm
            engine.step()
            still = all(torch.equal(a, b) for a, b in zip(full_params(engine), before))
            history.append((math.isfinite(float(total)), still, engine.optimizer.loss_scale))
        seen[policy] = history
    assert seen["zero"] == seen["ignore"], seen
    assert [h[:2] for h in seen["zero"]] == [(True, False), (False, True), (True, False)], seen
    assert seen["zero"][1][2] < seen["zero"][0][2], seen  # the loss scale came down
    return seen


def _stage0_engine_with_fused_adamw(dtype: str) -> tuple[Any, torch.optim.Optimizer]:
    deepspeed = _quiet()
    cfg = ds_config(0, dtype=dtype)
    if dtype == "fp16":
        allow_cpu_fp16()
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.005, "warmup_max_lr": 0.01,
                                                       "warmup_num_steps": 10, "warmup_type": "linear"}}
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine, opt


def _stage0_nan_at_step_2(dtype: str, clip: Callable[[Any, torch.optim.Optimizer], None]
                          ) -> tuple[Any, torch.optim.Optimizer, list[tuple[bool, bool, int, int]]]:
    """Four steps of a stage-0 engine with a fused AdamW (:func:`_stage0_engine_with_fused_adamw`), a NaN in rank
    0's batch at step 2, ``clip(engine, opt)`` between each backward and step: the engine, its torch optimizer and
    per step (parameters moved, ``_step_applied``, ``skipped_steps``, the scheduler's ``last_batch_iteration``)."""
    engine, opt = _stage0_engine_with_fused_adamw(dtype)
    history = []
    for step in range(4):
        x = batch(dist.get_rank(), step, 0)
        if step == 1 and dist.get_rank() == 0:
            x[0, 0] = math.nan
        engine.backward(loss_fn(engine(x.to(_engine_dtype(engine)))))
        before = full_params(engine)
        clip(engine, opt)
        engine.step()
        moved = not all(torch.equal(a, b) for a, b in zip(full_params(engine), before))
        history.append((moved, engine._step_applied, engine.skipped_steps, engine.lr_scheduler.last_batch_iteration))
    return engine, opt, history


def case_stage0_fused_hand_over_counts_a_skipped_step(dtype: str) -> list:
    """Stage 0, ``clip_grad_norm_(engine, ..., optimizer=<the fused torch optimizer given to DeepSpeed>)``, a NaN
    batch on rank 0 only, then good batches; against the same loop without ``optimizer=``.

    fp32 (the engine steps the torch optimizer itself): the NaN total skips the fused step through ``found_inf``,
    and the engine must count it so, as the loop with ``GradClipper(on_nonfinite="skip")`` does (it counted the
    step as taken, ``skipped_steps`` 0, and stepped its LR scheduler on it: every later step ran with the next
    step's lr).
    fp16/bf16 (a DeepSpeed wrapper steps it): the wrapper skips the NaN step itself without stepping the torch
    optimizer, so a skip armed on that optimizer waited for the next good step, which was skipped too, silently
    (the engine counted it as taken; parameters 0.0069 off the loop without ``optimizer=``: one AdamW step).
    """
    import dist_clip

    runs = {}
    skipping = dist_clip.GradClipper(max_norm=0.5, on_nonfinite="skip")

    def clip(engine: Any, opt: torch.optim.Optimizer, hand_over: bool) -> None:
        if hand_over:
            dist_clip.clip_grad_norm_(engine, 0.5, optimizer=opt)
        elif dtype == "fp32":  # (the plain call would step the NaN: the engine has no test of its own)
            skipping(engine)
        else:
            dist_clip.clip_grad_norm_(engine, 0.5)

    for hand_over in (False, True):
        engine, opt, history = _stage0_nan_at_step_2(dtype, functools.partial(clip, hand_over=hand_over))
        runs[hand_over] = (history, full_params(engine))
        if hand_over and dtype == "fp32":
            # A NaN batch dropped after the clip (zero_grad, a new backward, no second clip): its flag does not
            # reach that step, which is taken and counted as taken.
            x = batch(dist.get_rank(), 4, 0)
            x[0, 0] = math.nan
            engine.backward(loss_fn(engine(x)))
            assert not math.isfinite(float(dist_clip.clip_grad_norm_(engine, 0.5, optimizer=opt)))
            engine.zero_grad()
            engine.backward(loss_fn(engine(batch(dist.get_rank(), 5, 0))))
            engine.step()
            assert engine._step_applied and engine.skipped_steps == 1 and engine.lr_scheduler.last_batch_iteration == 3
            assert all(bool(torch.isfinite(t).all()) for t in full_params(engine))
            # A NaN batch whose gradients an auxiliary loss then wrote (NaN + x stays NaN), stepped with no call
            # between: the step drops the coefficient but keeps the flag, and the engine counts the skip (a
            # pending_flag dropping the flag with the coefficient fails here: counted as taken, skipped_steps 1).
            engine.zero_grad()
            x = batch(dist.get_rank(), 6, 0)
            x[0, 0] = math.nan
            engine.backward(loss_fn(engine(x)))
            dist_clip.clip_grad_norm_(engine, 0.5, optimizer=opt)
            engine.backward(loss_fn(engine(batch(dist.get_rank(), 7, 0))))  # the auxiliary loss
            before = [t.clone() for t in full_params(engine)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (the dropped coefficient)
                engine.step()
            assert not engine._step_applied and engine.skipped_steps == 2, engine.skipped_steps
            assert engine.lr_scheduler.last_batch_iteration == 3
            assert all(torch.equal(a, b) for a, b in zip(before, full_params(engine)))
            # The same with the gradients replaced out of place (the NaN carried), then straight to step(), or read
            # by get_total_norm and scaled by clip_grads_with_norm_ first: skipped and counted, on every rank.
            for n, settle in enumerate((False, True)):
                engine.zero_grad()
                x = batch(dist.get_rank(), 8 + n, 0)
                x[0, 0] = math.nan
                engine.backward(loss_fn(engine(x)))
                dist_clip.clip_grad_norm_(engine, 0.5, optimizer=opt)
                for q in engine.module.parameters():
                    q.grad = q.grad + 1.0
                if settle:
                    dist_clip.clip_grads_with_norm_(engine, 0.5, dist_clip.get_total_norm(engine))
                before = [t.clone() for t in full_params(engine)]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # (the dropped coefficient)
                    engine.step()
                assert not engine._step_applied and engine.skipped_steps == 3 + n, (n, engine.skipped_steps)
                assert engine.lr_scheduler.last_batch_iteration == 3
                assert all(torch.equal(a, b) for a, b in zip(before, full_params(engine)))
            # and a good batch after them steps
            engine.zero_grad()
            engine.backward(loss_fn(engine(batch(dist.get_rank(), 10, 0))))
            dist_clip.clip_grad_norm_(engine, 0.5, optimizer=opt)
            engine.step()
            assert engine._step_applied and engine.skipped_steps == 4 and engine.lr_scheduler.last_batch_iteration == 4
            assert all(bool(torch.isfinite(t).all()) for t in full_params(engine))
    handed, _ = runs[True]
    # the NaN step is skipped, and counted so (skipped_steps, no scheduler step); every other step is taken
    assert handed == [(True, True, 0, 0), (False, False, 1, 0), (True, True, 1, 1), (True, True, 1, 2)], handed
    assert runs[False][0] == handed, runs
    for a, b in zip(*(runs[h][1] for h in (False, True))):  # (fp32: the fused kernel divides by 1 / coef)
        torch.testing.assert_close(b, a, rtol=0 if dtype != "fp32" else 1e-6, atol=0 if dtype != "fp32" else 1e-7)
    return handed


def case_stage0_wrapper_torch_optimizer_with_a_module_target(dtype: str, target: str) -> list:
    """Stage 0 bf16/fp16, ``clip_grad_norm_(engine.module or its parameters(), ..., optimizer=<the fused torch
    optimizer inside DeepSpeed's wrapper>)``, a NaN batch on rank 0 at step 2 of 4; against the loop without
    ``optimizer=``. The wrapper tests the gradients and skips the NaN step itself without stepping the torch
    optimizer, so the skip armed on it waited: the next call (a finite total, the next batch's gradients) combined
    its False with it and the good step 3 was skipped too, silently (steps [T, F, F, T], parameters 0.0059 off)."""
    import dist_clip

    runs = {}

    def clip(engine: Any, opt: torch.optim.Optimizer, hand_over: bool) -> None:
        clipped = engine.module if target == "engine.module" else list(engine.module.parameters())
        dist_clip.clip_grad_norm_(clipped, 0.5, optimizer=opt if hand_over else None)

    for hand_over in (False, True):
        engine, _, history = _stage0_nan_at_step_2(dtype, functools.partial(clip, hand_over=hand_over))
        runs[hand_over] = ([moved for moved, *_ in history], full_params(engine))
    assert runs[True][0] == runs[False][0] == [True, False, True, True], {h: r[0] for h, r in runs.items()}
    for a, b in zip(*(runs[h][1] for h in (False, True))):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    return runs[True][0]


def case_contract() -> dict:
    """The attributes the adapter reads exist on every optimizer kind; misuse fails loudly and together."""
    from dist_clip.adapters import deepspeed as adapter

    kinds = {}
    for stage, dtype, extra in ((0, "fp32", {}), (1, "fp32", {}), (2, "fp32", {"offload": True}), (3, "fp32", {}),
                                (3, "fp32", {"offload": True}), (1, "bf16", {"grad_accum_dtype": "fp32"}),
                                (0, "bf16", {})):
        engine = make_engine(ds_config(stage, dtype=dtype, **extra))
        name = type(engine.optimizer).__name__
        required = adapter.required_attributes().get(name, ())
        missing = [a for a in required if not hasattr(engine.optimizer, a)]
        assert not missing, f"DeepSpeed's {name} no longer has {missing}: the adapter must be updated"
        missing = [a for a in adapter.required_attributes()["DeepSpeedEngine"] if not hasattr(engine, a)]
        assert not missing, f"DeepSpeed's engine no longer has {missing}: the adapter must be updated"
        kinds[f"{stage}/{dtype}/{extra}"] = name
    # torch-style targets (engine.module, its parameters, a submodule): ZeRO holds the
    # gradients in its partitions and .grad is None, so the total silently read 0 and nothing was clipped.
    own = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]
    for stage in (1, 2, 3):
        engine = make_engine(ds_config(stage))
        engine.backward(loss_fn(engine(batch(dist.get_rank(), 0, 0))))
        module = engine.module
        targets = {"engine.module": module, "parameters()": list(module.parameters()),
                   "submodule": next(module.children())}
        for what, target in targets.items():
            for call in (lambda t: dist_clip.clip_grad_norm_(t, 1.0, group=dist.group.WORLD),
                         lambda t: dist_clip.clip_grad_norm_(t, 1.0),
                         lambda t: dist_clip.GradClipper(mode="per_param")(t)):
                try:
                    call(target)
                except ValueError as e:
                    assert "managed by DeepSpeed ZeRO" in str(e) and "pass the engine" in str(e), str(e)
                else:
                    raise AssertionError(f"stage {stage}: {what} was taken for plain parameters")
        # optimizer= that is none of the engine, engine.optimizer or a torch optimizer: a TypeError, as at stage
        # 0 and on plain models (stages 1-3 dropped it and scaled in the call).
        for bad in ("adam", 42):
            try:
                dist_clip.clip_grad_norm_(engine, 1.0, optimizer=bad)
            except TypeError as e:
                assert "optimizer must be a torch.optim.Optimizer" in str(e), str(e)
            else:
                raise AssertionError(f"stage {stage}: optimizer={bad!r} was accepted")
        # group= short of the partitions' ranks (a rank's own tensor-parallel group): each rank returned its own
        # partition's norm (1.65 and 4.83 for 5.11). A ValueError on every rank; the world still measures.
        for call in (lambda e, g: dist_clip.get_total_norm(e, group=g),
                     lambda e, g: dist_clip.GradClipper(max_norm=1.0, mode="per_param")(e, group=g)):
            try:
                call(engine, own)
            except ValueError as e:
                assert "outside the group" in str(e) and "ZeRO" in str(e), str(e)
            else:
                raise AssertionError(f"stage {stage}: a group= short of the partitions' ranks was accepted")
        assert dist_clip.get_total_norm(engine, group=dist.group.WORLD) == dist_clip.get_total_norm(engine)
        # MoE layers are measured at ZeRO 1-2 only (case_moe_vs_reference); ZeRO-3 refuses DeepSpeed's MoE itself:
        # the flag deepspeed.initialize sets for a model holding deepspeed.moe.layer.MoE stands in there. The
        # message names the remedy (DeepSpeed's own gradient_clipping), and no warning to turn that clipping off
        # comes first (it did, with the config's gradient_clipping set).
        if stage != 3:
            dist_clip.clip_grad_norm_(engine, 1.0)
            engine.step()
            continue
        engine.has_moe_layers = True
        engine.gradient_clipping = lambda: 1.0
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                dist_clip.get_total_norm(engine)
        except NotImplementedError as e:
            assert "MoE" in str(e) and '"gradient_clipping"' in str(e), str(e)
            assert not [w for w in seen if "gradient_clipping" in str(w.message)], [str(w.message) for w in seen]
        else:
            raise AssertionError(f"stage {stage}: an engine with MoE layers was measured")
        engine.has_moe_layers = False
        del engine.gradient_clipping
        dist_clip.clip_grad_norm_(engine, 1.0)
        engine.step()
    # Between accumulation boundaries the gradients are not reduced: a clear error on every rank.
    engine = make_engine(ds_config(2, gas=2))
    engine.backward(loss_fn(engine(batch(dist.get_rank(), 0, 0))))
    try:
        dist_clip.clip_grad_norm_(engine, 1.0)
    except ValueError as e:
        assert "accumulation" in str(e)
    else:
        raise AssertionError("no error between accumulation boundaries")
    engine.step()
    # A trainable parameter left out of the optimizer: ZeRO 1-3 neither reduce nor step it, and the total was
    # silently taken without it (9.24 for 9.83) while it stayed unclipped. Refused in every mode.
    deepspeed = _quiet()
    for stage in (1, 2, 3):
        model = make_model()
        opt = torch.optim.SGD(list(model.parameters())[2:], lr=LR)
        with contextlib.redirect_stdout(io.StringIO()):
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage))
        engine.backward(loss_fn(engine(batch(dist.get_rank(), 0, 0))))
        for call in (lambda e: dist_clip.clip_grad_norm_(e, 1.0),
                     lambda e: dist_clip.GradClipper(mode="per_param", report=True)(e),
                     lambda e: dist_clip.GradClipper(mode="unitwise")(e)):
            try:
                call(engine)
            except ValueError as e:
                assert "0.weight, 0.bias require gradients but are in no param group" in str(e), str(e)
            else:
                raise AssertionError(f"stage {stage}: a trainable parameter outside the optimizer was left out")
    # DeepSpeed's own clipping left on: a warning that names the fix.
    engine = make_engine(ds_config(1, clip=1.0))
    engine.backward(loss_fn(engine(batch(dist.get_rank(), 0, 0))))
    for call in (lambda: dist_clip.clip_grad_norm_(engine, 1.0), lambda: dist_clip.GradClipper(max_norm=1.0)(engine)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        where = [(w.filename, w.lineno) for w in caught if "gradient_clipping" in str(w.message)]
        # attributed to the calling line (it named torch's _contextlib.py: shown once per process for all calls)
        assert where == [(__file__, call.__code__.co_firstlineno)], (where, [str(w.message) for w in caught])
    engine.step()
    return kinds


def case_fused_inner_optimizer(stage: int) -> bool:
    """``clip_grad_norm_(engine, ..., optimizer=<the fused torch optimizer given to DeepSpeed>)`` with two param
    groups: ZeRO steps that optimizer once per group, so the coefficient must reach every group's step (or the
    gradients be scaled): parameters must equal those of clipping without ``optimizer=``."""
    import dist_clip

    deepspeed = _quiet()
    results = []
    for hand_over in (False, True):
        model = make_model(0)
        groups = [{"params": list(model[0].parameters())},
                  {"params": [*model[2].parameters(), *model[4].parameters()], "lr": LR / 2}]
        opt = torch.optim.AdamW(groups, lr=LR, fused=True)
        with contextlib.redirect_stdout(io.StringIO()):
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage))
        for step in range(2):
            engine.backward(loss_fn(engine(batch(dist.get_rank(), step, 0))))
            dist_clip.clip_grad_norm_(engine, 1e-3, optimizer=opt if hand_over else None)
            engine.step()
        results.append(full_params(engine))
    plain, handed = results
    for a, b in zip(plain, handed):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    return True


def case_fold_applies_to_one_step(stage: int, offload: bool = False, dtype: str = "fp32") -> bool:
    """``clip_grad_norm_(engine, ..., optimizer=engine.optimizer)`` leaves the gradients as they are (the
    coefficient rides in ``step()``), clips exactly the next step (a following step without dist_clip is not
    clipped), and gives the parameters of scaling the gradients in the call; every accepted ``optimizer``
    (the engine, ``engine.optimizer``, the torch optimizer) folds. Stage 0 has no ZeRO step to fold into:
    the same calls scale the gradients in the call, without error."""
    from dist_clip.adapters import deepspeed as adapter

    results = []
    ways = ("scale", "engine", "zero", "torch", "then plain", "then report")
    for how in ways:
        engine = make_engine(ds_config(stage, offload=offload, dtype=dtype))
        for step in range(3):
            for per_rank in micro_batches(engine, step):
                engine.backward(loss_fn(engine(per_rank[dist.get_rank()].to(_engine_dtype(engine)))))
            if step != 1:  # step 1 is not clipped: a left-over coefficient would show
                before = [t.clone() for s in adapter.shards(engine, None) for t in s.tensors]
                target = {"scale": None, "engine": engine, "zero": engine.optimizer, "then plain": engine,
                          "then report": engine,
                          "torch": getattr(engine.optimizer, "optimizer", engine.optimizer)}[how]
                dist_clip.clip_grad_norm_(engine, 0.3, optimizer=target)
                after = [t for s in adapter.shards(engine, None) for t in s.tensors]
                same = all(torch.equal(a, b) for a, b in zip(before, after))
                folds = target is not None and stage > 0
                assert same == folds, f"{how}: gradients scaled in the call: {not same}"
                if how == "then plain" and folds:
                    # A plain clip of the same gradients before step(): the handed-over coefficient is applied
                    # first, so it measures the clipped norm 0.3 and a max_norm of 1 changes nothing, and the
                    # step applies nothing more (dropping the coefficient would clip by 1 / the unclipped norm,
                    # applying it in step() too would clip twice).
                    total = dist_clip.clip_grad_norm_(engine, 1.0)
                    assert abs(float(total) - 0.3) < (1e-5 if dtype == "fp32" else 2e-3), float(total)
                if how == "then report" and folds:
                    # A report before step() reads the clipped norm, and does not cancel the clipping.
                    result = dist_clip.GradClipper(max_norm=1e30, report=True)(engine)
                    assert abs(float(result.total_norm) - 0.3) < (1e-5 if dtype == "fp32" else 2e-3), result
            engine.step()
        results.append(full_params(engine))
    eps = {"fp32": 1e-6, "bf16": 2.0**-7, "fp16": 2.0**-10}[dtype]
    for how, got in zip(ways[1:], results[1:]):
        _params_close(got, results[0], eps, 1e-9, f"stage {stage} {dtype} folded via {how} vs scaled")
    return True


def case_fold_dropped_with_its_batch(stage: int, offload: bool = False, read_first: bool = False) -> bool:
    """A coefficient handed to ``engine.step()`` (``optimizer=engine``) whose batch is dropped (no step), then the
    next batch's backward and ``engine.step()`` with no dist_clip call in between: the step must not multiply
    the new gradients by the coefficient measured on the dropped ones (it did: parameters 0.37 off at stages
    1-2, 0.79 at stage 3). The coefficient is dropped, so the step takes them unclipped, as the same loop
    without dist_clip does: ZeRO-1/2 replace the gradients (batch 1's alone; with offload written into the same
    buffer), ZeRO-3 accumulates into them (batch 0's + batch 1's). Both checked against the float64 unsharded
    run; where the measured buffers were written in place the step warns that it takes them unclipped.
    ``read_first``: a dist_clip call reads the new gradients before the step (its settle() must drop the
    coefficient too, silently: it scaled ZeRO-3's accumulated and the offloaded buffers by it, a total of 0.3
    returned and the parameters stepped clipped); its total is checked against the float64 unsharded one."""
    rank, world = dist.get_rank(), dist.get_world_size()
    results, caught, read = [], [], []
    for hand_over in (True, False):
        engine = make_engine(ds_config(stage, offload=offload))
        engine.backward(loss_fn(engine(batch(rank, 0, 0))))
        if hand_over:
            total = float(dist_clip.clip_grad_norm_(engine, 0.3, optimizer=engine))
            assert total > 0.3, "the case must actually clip"
        engine.backward(loss_fn(engine(batch(rank, 1, 0))))  # batch 0 dropped: no step
        if read_first:
            read.append(float(dist_clip.get_total_norm(engine)))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            engine.step()
        step_line = sys._getframe().f_lineno - 1
        caught.append([str(x.message) for x in w if "dist_clip" in str(x.message)])
        assert all((x.filename, x.lineno) == (__file__, step_line) for x in w if "dist_clip" in str(x.message)), [
            (x.filename, x.lineno) for x in w]  # the engine.step() line, past DeepSpeed's frames
        results.append(full_params(engine))
    ref = Reference()
    grads = [g.clone() for g in ref.grads([[batch(r, 1, 0) for r in range(world)]])]
    accumulates = stage == 3
    if accumulates:
        grads = [a + b for a, b in zip(grads, ref.grads([[batch(r, 0, 0) for r in range(world)]]))]
    if read_first:
        want = float(torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads])))
        assert all(abs(x - want) <= 1e-5 * want for x in read), (read, want)
    folded, plain_loop = results
    _params_close(folded, plain_loop, 1e-6, 1e-9, f"stage {stage} offload {offload}: dropped batch's coefficient")
    for p, g in zip(ref.model.parameters(), grads):
        p.grad = g
    ref.opt.step()
    _params_close(folded, ref.params(), 1e-5, 1e-6, f"stage {stage} offload {offload}: vs the unsharded run")
    assert not caught[1], caught[1]
    written = [m for m in caught[0] if "written after the clip" in m]
    assert bool(written) == ((stage == 3 or offload) and not read_first), caught[0]
    return True


def case_unfrozen_after_first_call(stage: int) -> bool:
    """A parameter frozen when the engine is built is in no ZeRO param group; unfrozen after the first dist_clip
    call it must be refused as when unfrozen before (the check ran once per optimizer: it was left out of the
    norm and stayed unclipped, its .grad each rank's own). Frozen again, the calls work again."""
    deepspeed = _quiet()
    model = make_model()
    model[0].bias.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage))
    rank = dist.get_rank()
    for step, trainable in enumerate((False, True, False)):
        model[0].bias.requires_grad_(trainable)
        engine.backward(loss_fn(engine(batch(rank, step, 0))))
        try:
            dist_clip.clip_grad_norm_(engine, 1.0)
        except ValueError as e:
            assert trainable, f"step {step}: {e}"
            assert "0.bias require gradients but are in no param group" in str(e), str(e)
        else:
            assert not trainable, f"stage {stage}: 0.bias unfrozen after the first call was left out of the norm"
        engine.step()
    return True


def _refused(engine: Any, what: str) -> None:
    try:
        dist_clip.clip_grad_norm_(engine, 1e-3)
    except RuntimeError as e:
        assert "holds no reduced gradients" in str(e), f"{what}: {e}"
    else:
        raise AssertionError(f"{what}: accepted")


def case_call_before_boundary_backward(stage: int, dtype: str = "fp32", offload: bool = False) -> dict:
    """With accumulation, ``is_gradient_accumulation_boundary()`` is already True after the previous micro step's
    ``step()``, before the boundary micro step's backward: a call there read the partial sum (ZeRO-3: 3.03 for
    6.07) or, at stage 0, each rank's own unreduced gradients (no collective: ranks clipped by different
    coefficients). Refused on every rank, before and after that micro step's forward, as after ``step()``
    without accumulation; the norm at the real boundary then matches the unsharded run (nothing was scaled).
    Stage 0 (a plain torch optimizer, or the bf16/fp16 wrappers) has no flag of DeepSpeed's to read: it is
    checked from the second call on an engine (the first installs the backward counter), except after step(),
    where no gradient is left. An evaluation forward between the boundary's backward and the call is fine."""
    rank = dist.get_rank()
    low = dtype != "fp32"
    engine = make_engine(ds_config(stage, dtype=dtype, gas=2, offload=offload))
    ref = Reference()
    norms = []
    for step in range(2):
        batches = micro_batches(engine, step)
        want = ref.step(batches, max_norm=0.3, p=2.0)
        for micro, per_rank in enumerate(batches):
            first_call = step == 0 and micro == 1
            if micro == 1 and not (first_call and stage == 0):
                assert engine.is_gradient_accumulation_boundary()
                _refused(engine, f"step {step}: before the boundary's forward")
            out = engine(per_rank[rank].to(_engine_dtype(engine)))
            if micro == 1 and not (first_call and stage == 0):
                _refused(engine, f"step {step}: between the boundary's forward and backward")
            engine.backward(loss_fn(out))
            if micro == 1 and step == 1:
                # An evaluation forward between the backward and the clip leaves the reduced gradients alone:
                # ZeRO-3 refused it when the check read _epilogue_ran_this_backward, which forward() resets.
                with torch.no_grad():
                    engine(per_rank[rank].to(_engine_dtype(engine)))
            if micro == 1:
                got = float(dist_clip.clip_grad_norm_(engine, 0.3))
                _close(got, want, 2e-2 if low else 2e-6, f"stage {stage} step {step} norm")
                norms.append(got)
            engine.step()
    # Without accumulation, after step(): stages 1-3 hold no partitions any more, stage 0 no .grad (it read 0.0).
    for calls_before in (1, 0):
        engine = make_engine(ds_config(stage, dtype=dtype, offload=offload))
        engine.backward(loss_fn(engine(batch(rank, 0, 0).to(_engine_dtype(engine)))))
        for _ in range(calls_before):
            dist_clip.clip_grad_norm_(engine, 0.3)
        engine.step()
        _refused(engine, f"after step() ({calls_before} call before)")
    return {"norms": norms}


def case_manual_boundary_before_last_backward(stage: int, dtype: str = "fp32", grad_accum_dtype: str | None = None,
                                             offload: bool = False) -> dict:
    """DeepSpeed's manual accumulation (``engine.set_gradient_accumulation_boundary(False)`` for the first micro
    steps, ``True`` before the last one, one ``engine.step()`` per window): a call after the boundary was set but
    before the last micro step's backward read the partial sum (ZeRO-3: 0.844 for 8.761) or, at stage 0 and under
    BF16_Optimizer, each rank's own unreduced gradients (0.766 and 0.972: the ranks clipped by different
    coefficients). ``step()`` runs once per window, so the count of steps did not tell, and
    ``set_gradient_accumulation_boundary`` sets the ZeRO optimizers' mirrored flag too. Refused on every rank
    from the second call on an engine (the first installs the backward counter); the norm at the boundary then
    matches the unsharded run, step after step."""
    rank = dist.get_rank()
    gas = 3
    engine = make_engine(ds_config(stage, dtype=dtype, gas=gas, offload=offload, grad_accum_dtype=grad_accum_dtype))
    dt = _engine_dtype(engine)
    ref = Reference()
    norms = []
    for step in range(2):
        batches = micro_batches(engine, step)
        want = ref.step(batches, max_norm=0.3, p=2.0)
        engine.set_gradient_accumulation_boundary(False)
        for micro, per_rank in enumerate(batches):
            if micro == gas - 1:
                engine.set_gradient_accumulation_boundary(True)
                if step == 1:
                    _refused(engine, f"stage {stage}: boundary set, before the last micro step's forward")
            out = engine(per_rank[rank].to(dt))
            if micro == gas - 1 and step == 1:
                _refused(engine, f"stage {stage}: boundary set, before the last micro step's backward")
            engine.backward(loss_fn(out))
        got = float(dist_clip.clip_grad_norm_(engine, 0.3))
        _close(got, want, 2e-2 if dtype != "fp32" else 2e-6, f"stage {stage} step {step} norm")
        norms.append(got)
        engine.step()
    return {"norms": norms}


def case_no_sync(stage: int, dtype: str = "fp32", grad_accum_dtype: str | None = None) -> list:
    """A backward inside ``engine.no_sync()`` (DeepSpeed allows it at stages 0-1) skips DeepSpeed's all-reduce:
    each rank holds its own unreduced gradients, and dist_clip returned each rank's own norm (1.197645 and
    1.378025 at stage 0), without a collective, so the ranks clipped by different coefficients. ValueError on
    every rank inside the context and after it until a backward outside it; then the gathered reference."""
    rank = dist.get_rank()
    engine = make_engine(ds_config(stage, dtype=dtype, grad_accum_dtype=grad_accum_dtype))
    dt = _engine_dtype(engine)
    engine.backward(loss_fn(engine(batch(rank, 0, 0).to(dt))))
    dist_clip.clip_grad_norm_(engine, 1e9)  # a first call (it installs the backward counter)
    engine.step()

    def attempt() -> object:
        try:
            return float(dist_clip.clip_grad_norm_(engine, 1e9))
        except ValueError as e:
            return "no_sync" if "engine.no_sync()" in str(e) else f"ValueError: {e}"
        except RuntimeError as e:
            return f"RuntimeError: {e}"

    out = []
    with engine.no_sync():
        engine.backward(loss_fn(engine(batch(rank, 1, 0).to(dt))))
        out.append(attempt())
    out.append(attempt())  # after it, before any synchronising backward
    engine.backward(0.0 * loss_fn(engine(batch(rank, 1, 0).to(dt))))  # one backward outside: all-reduced
    want = _gathered_reference(engine, 2.0)
    got = attempt()
    out.append(abs(got - want) <= 1e-5 * want if isinstance(got, float) else got)
    engine.step()
    return out


def case_call_inside_coalesce_grad_reduction(stage: int, offload: bool, steps: int = 2) -> list:
    """``engine.coalesce_grad_reduction()`` (ZeRO 1-3): its backwards leave each rank's own gradients on the
    parameters and reduce them into the partitions when the block exits. A call inside the block is a ValueError
    on every rank (ZeRO 1-2 with offload returned the norm of the fp32 partitions the last step left: 0.0, then
    0.3, for the model's 17.35, silently); the plain call after the block measures the float64 model's norm and
    the step gives its parameters."""
    rank, world = dist.get_rank(), dist.get_world_size()
    engine = make_engine(ds_config(stage, offload=offload))
    ref = Reference()
    out: list = []
    for step in range(steps):
        batches = [[batch(r, step, m) for r in range(world)] for m in range(2)]
        grads = ref.grads(batches)  # the mean over the block's micro losses; DeepSpeed adds them (gas 1)
        for g in grads:
            g.mul_(2.0)
        want = reference_norm(grads, 2.0)
        with engine.coalesce_grad_reduction():
            for per_rank in batches:
                engine.backward(loss_fn(engine(per_rank[rank])))
            out.append(outcome(lambda: dist_clip.clip_grad_norm_(engine, 0.3), ValueError,
                               lambda m: "coalesce_grad_reduction()" in m))
        got = float(dist_clip.clip_grad_norm_(engine, 0.3))
        _close(got, want, 2e-6, f"stage {stage} step {step} norm after the block")
        for g in grads:
            g.mul_(min(1.0, 0.3 / (want + 1e-6)))
        ref.opt.step()
        engine.step()
    _params_close(full_params(engine), ref.params(), 1e-5, 1e-6, f"stage {stage} params after step")
    return out


def case_bad_input_on_one_rank(stage: int) -> list:
    """One rank refuses bad input on an engine (a negative ``max_norm``; then an ``optimizer=`` of another type
    on the other rank) and goes on: every other rank raises in the same call and the next call measures the
    float64 reference on both (the refusing rank used to raise alone and pair its next call with the others')."""
    engine = make_engine(ds_config(stage))
    rank = dist.get_rank()
    engine.backward(loss_fn(engine(batch(rank, 0, 0))))
    want = _gathered_reference(engine, 2.0)
    out: list = []

    def attempt(call: Any) -> None:
        try:
            call()
            out.append("measured")
        except RuntimeError as e:
            refused = isinstance(e, dist_clip._slots.RefusedElsewhere) and "refused its input" in str(e)
            out.append("refused" if refused else f"RuntimeError: {e}")
        except (ValueError, TypeError) as e:
            out.append(type(e).__name__)
        out.append(abs(float(dist_clip.get_total_norm(engine)) - want) <= 1e-6 * want)

    attempt(lambda: dist_clip.clip_grad_norm_(engine, -1.0 if rank == 1 else 1e9))
    attempt(lambda: dist_clip.GradClipper(max_norm=1e9)(engine, optimizer="sgd" if rank == 0 else None))
    engine.step()
    return out


def case_mpu_group_spanning_model_parallel(stage: int, dtype: str = "fp32", grad_accum_dtype: str | None = None,
                                          tensor_named: bool = False) -> list:
    """4 ranks with an mpu: data-parallel groups {0, 2} and {1, 3}, model-parallel {0, 1} and {2, 3}, each
    model-parallel rank a distinct model. group=WORLD sums the model-parallel ranks' distinct partitions: at
    ZeRO-3 the padding was cut by the rank in group= (6.39 for 9.98). Unit-wise clipping there (units cut
    between partitions, combined by name over group=: the other model-parallel rank's rows of the same name
    were added, coefficients 0.88-0.97 off) is a NotImplementedError on every rank. ``tensor_named``: an mpu
    naming its model-parallel group get_tensor_model_parallel_group() only (Megatron's newer name; DeepSpeed's
    stage 0 asks for neither), where dist_clip's check of group= raised AttributeError."""
    deepspeed = _quiet()
    rank = dist.get_rank()
    dps = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    mps = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mp_rank, dp_rank = rank % 2, rank // 2

    class MPU:
        def get_data_parallel_group(self) -> Any:
            return dps[mp_rank]

        def get_data_parallel_world_size(self) -> int:
            return 2

        def get_data_parallel_rank(self) -> int:
            return dp_rank

        def get_tensor_model_parallel_group(self) -> Any:
            return mps[dp_rank]

        def get_model_parallel_world_size(self) -> int:
            return 2

        def get_model_parallel_rank(self) -> int:
            return mp_rank

    if not tensor_named:
        MPU.get_model_parallel_group = MPU.get_tensor_model_parallel_group  # type: ignore[attr-defined]
        del MPU.get_tensor_model_parallel_group
    refs = []
    for t in (0, 1):  # model-parallel rank t: its model, the mean over its data-parallel ranks t and t + 2
        m = make_model(t).double()
        for r in (t, t + 2):
            (loss_fn(m(batch(r, 0, 0).double())) / 2).backward()
        refs += [q.grad for q in m.parameters()]
    model = make_model(mp_rank)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                          config=ds_config(stage, dtype=dtype, grad_accum_dtype=grad_accum_dtype),
                                          mpu=MPU())
    engine.backward(loss_fn(engine(batch(rank, 0, 0).to(next(engine.module.parameters()).dtype))))
    out = []
    rtol = 1e-5 if dtype == "fp32" else 2e-2  # (bf16 gradients against the float64 model)
    for p in (2.0, 1.0, math.inf):
        want = reference_norm(refs, p)
        out.append(abs(float(dist_clip.get_total_norm(engine, p, group=dist.group.WORLD)) - want) <= rtol * want)
    # Without group= the data-parallel group gave each model-parallel rank its own piece's norm (stage 0 dropped
    # group= too: 11.88 and 14.19 for 18.51): refused on every rank.
    out.append(outcome(lambda: dist_clip.get_total_norm(engine), ValueError, lambda m: "model-parallel" in m))
    # nor by the data-parallel group passed as group= (the same own-piece norms)
    out.append(outcome(lambda: dist_clip.get_total_norm(engine, group=dps[mp_rank]), ValueError,
                       lambda m: "mpu" in m))
    agc = dist_clip.GradClipper(mode="unitwise", agc=dist_clip.AGC(0.05))
    if stage == 0 or grad_accum_dtype is not None:  # whole gradients (BF16_Optimizer's too): units clipped here
        from deepspeed.utils import safe_get_full_grad

        named = list(model.named_parameters())
        grads = {n: safe_get_full_grad(q).double().clone() for n, q in named}
        before = {n: g.clone() for n, g in grads.items()}
        dist_clip.testing.reference_agc_({n: q.detach().double() for n, q in named}, grads, 0.05, 1e-3)
        res = agc(engine, group=dist.group.WORLD)  # (its total counted rank 0's model-parallel piece only: 11.88)
        agc_rtol = 1e-5 if dtype == "fp32" else 1e-2
        want = reference_norm(refs, 2.0)
        total_right = abs(float(res.total_norm) - want) <= rtol * want
        changed = total_right and any(not torch.equal(grads[n], before[n]) for n in grads)  # (some unit clipped)
        out.append(changed and all(torch.allclose(safe_get_full_grad(q).double(), grads[n], rtol=agc_rtol)
                                   for n, q in named))
    else:  # (refused whether or not this rank's partitions cut a row: this model's ZeRO-1 ones do not, ZeRO-3's do)
        out.append(outcome(lambda: agc(engine, group=dist.group.WORLD), NotImplementedError,
                           lambda m: "beyond that group" in m))
    return out


def case_pipeline_engine_is_refused() -> list:
    """DeepSpeed's PipelineEngine: each stage's data-parallel group holds its own layers only, so every stage
    returned its own norm (3.80 and 8.57 for 9.38): NotImplementedError on every rank, in every entry point."""
    deepspeed = _quiet()
    from deepspeed.pipe import PipelineModule

    deepspeed.init_distributed(dist_backend="gloo")  # (PipelineModule reads DeepSpeed's communication backend)
    module = PipelineModule(layers=[torch.nn.Linear(IN, HID), torch.nn.Tanh(), torch.nn.Linear(HID, OUT)],
                            num_stages=2, loss_fn=lambda out, y: (out - y).pow(2).sum())
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                          optimizer=torch.optim.SGD(module.parameters(), lr=LR),
                                          config=ds_config(1))
    refused = lambda m: "PipelineEngine" in m  # noqa: E731
    return [outcome(lambda: dist_clip.get_total_norm(engine), NotImplementedError, refused),
            outcome(lambda: dist_clip.clip_grad_norm_(engine, 1.0), NotImplementedError, refused),
            outcome(lambda: dist_clip.GradClipper(max_norm=1.0, mode="per_param")(engine), NotImplementedError,
                    refused)]


def case_zero_module_under_a_plan_is_refused() -> list:
    """``engine.module`` of a ZeRO 1-3 engine (a pipeline stage's module, say) under a ParallelPlan: its gradients
    live in the engine's partitions and ``.grad`` is None, so the total read 0.0 for 9.83, silently, where the
    path without a plan refuses it. ValueError on every rank, naming ZeRO and plan=, for the module, its
    ``{name: param}`` mapping and the engine itself (which failed on its ``module.`` names)."""
    from dist_clip import GradClipper, ParallelPlan, Rule, compose
    from tests.beyond_cases import mesh

    rank = dist.get_rank()
    out = []
    for stage in (1, 2, 3):
        engine = make_engine(ds_config(stage))
        engine.backward(loss_fn(engine(batch(rank, 0, 0))))
        names = tuple(n for n, _ in engine.module.named_parameters())
        plan = ParallelPlan(mesh((dist.get_world_size(),), ("dp",)), names=names, rules=(Rule("*", replicate=("dp",)),))
        # (the engine passed itself was told to "pass the engine itself, not engine.module", beside the plan's
        # "clip that wrapper without plan=": the advice the plan gives alone names what to clip)
        refused = lambda m: ("managed by DeepSpeed ZeRO" in m  # noqa: E731
                             and "clip the engine itself without plan=" in m and "pass the" not in m)
        for target in (engine.module, dict(engine.module.named_parameters()), engine):
            out.append(outcome(lambda t=target, pl=plan: GradClipper(max_norm=1.0)(t, plan=pl), ValueError, refused))
        out.append(outcome(lambda m=engine.module, pl=plan: compose.get_total_norm(m, pl), ValueError, refused))
        engine.step()
    return out


def case_bf16_optimizer_module_is_refused() -> list:
    """ZeRO-1 with bf16 and fp32 gradient accumulation steps DeepSpeed's ``BF16_Optimizer``, which reduces its
    fp32 accumulation buffers and leaves each rank's own, unreduced bf16 gradient in ``.grad``. Its parameters
    carry neither ZeRO-1/2's ``param_idx_in_group`` nor ZeRO-3's ``ds_id``, so ``engine.module`` was read as
    replicated whole gradients, silently: 9.2711 under a plan (a pipeline stage's module), 9.2711 on rank 0 and
    10.9436 on rank 1 without one, for the engine's 9.8212 (float64 reference 9.8301). A ValueError on every rank
    now, in every mode, with and without a plan (it links each parameter to its fp32 copy, ``_hp_mapping``, as
    ZeRO 1-2 do); the engine itself still measures 9.8212. Stage 0's ``engine.module`` (fp32, and bf16 under
    ``FP16_UnfusedOptimizer``), whose ``.grad`` DeepSpeed all-reduces, is still measured under a plan: the
    engine's norm, not a refusal; the stage-0 engine itself, a ValueError naming the remedy."""
    from dist_clip import AGC, GradClipper, ParallelPlan, Rule, compose
    from tests.beyond_cases import mesh

    rank = dist.get_rank()
    out: list = []
    for stage, dtype, accum in ((1, "bf16", "fp32"), (0, "fp32", None), (0, "bf16", None)):
        engine = make_engine(ds_config(stage, dtype=dtype, grad_accum_dtype=accum))
        engine.backward(loss_fn(engine(batch(rank, 0, 0).to(_engine_dtype(engine)))))
        module = engine.module
        names = tuple(n for n, _ in module.named_parameters())
        plan = ParallelPlan(mesh((dist.get_world_size(),), ("dp",)), names=names, rules=(Rule("*", replicate=("dp",)),))
        want = float(dist_clip.get_total_norm(engine))
        if stage == 0:
            out.append(round(float(compose.get_total_norm(module, plan)) / want, 6))
            per_param = GradClipper(max_norm=1e9, mode="per_param")(module, plan=plan)
            out.append(round(float(per_param.total_norm) / want, 6))
            # The stage-0 engine passed itself failed on its ``module.`` names, told to list them in the plan
            refused = lambda m: "not a DeepSpeed engine; clip the engine itself without plan=" in m  # noqa: E731
            out.append(outcome(lambda e=engine, pl=plan: compose.get_total_norm(e, pl), ValueError, refused))
        else:
            out.append((type(engine.optimizer).__name__, round(want, 4)))
            refused = lambda m: "managed by DeepSpeed ZeRO" in m and "BF16_Optimizer" in m  # noqa: E731
            for call in (lambda m=module, pl=plan: compose.get_total_norm(m, pl),
                         lambda m=module, pl=plan: GradClipper(max_norm=1.0)(dict(m.named_parameters()), plan=pl),
                         lambda m=module: dist_clip.get_total_norm(m),
                         lambda m=module: dist_clip.clip_grad_norm_(list(m.parameters()), 1.0),
                         lambda m=module: GradClipper(max_norm=1.0, mode="per_param")(m),
                         lambda m=module: GradClipper(mode="unitwise", agc=AGC(0.05))(m)):
                out.append(outcome(call, ValueError, refused))
            assert float(dist_clip.get_total_norm(engine)) == want  # (nothing was scaled)
        engine.step()
    return out


def case_outside_the_optimizer_on_replicated_wrappers(dtype: str, grad_accum_dtype: str | None) -> list:
    """A trainable layer in no param group: stage 0's bf16 wrapper (FP16_UnfusedOptimizer) reduces its gradient
    as stage 0 does every gradient, but its fp16 groups were read alone (9.22 for 10.22, the layer unclipped);
    BF16_Optimizer (ZeRO-1, fp32 accumulation) reduces its groups only: the layer's gradient is each rank's own,
    a ValueError on every rank as at ZeRO 1-3 (it was left out silently)."""
    deepspeed = _quiet()
    rank, world = dist.get_rank(), dist.get_world_size()
    stage = 0 if grad_accum_dtype is None else 1
    model = make_model(0)
    params = list(model.parameters())
    opt = torch.optim.SGD(params[2:], lr=LR)  # params[0], params[1]: trainable, in no param group
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(
            stage, dtype=dtype, grad_accum_dtype=grad_accum_dtype))
    engine.backward(loss_fn(engine(batch(rank, 0, 0).to(next(engine.module.parameters()).dtype))))
    if stage == 1:
        return [outcome(lambda: dist_clip.get_total_norm(engine), ValueError, lambda m: "no param group" in m)]
    ref = make_model(0).double()
    for r in range(world):
        (loss_fn(ref(batch(r, 0, 0).double())) / world).backward()
    got = float(dist_clip.get_total_norm(engine))
    return [abs(got - reference_norm([q.grad for q in ref.parameters()])) <= 2e-2 * got]


def case_bf16_optimizer_reads_only_gradients_it_holds() -> dict:
    """bf16 with fp32 gradient accumulation (DeepSpeed's ``BF16_Optimizer``, whole gradients): its fp32 gradient
    buffers are kept across steps, zeroed, with ``fp32_groups_has_gradients`` telling which hold a gradient. The
    first call on an engine after ``engine.step()`` (no backward since, and no backward counter installed yet to
    tell) is refused: read as gradients, the zeroed buffers gave a total of 0 and nothing was clipped. A layer the
    forward never reaches has no gradient anywhere and stays out of the report (it was listed with norm 0)."""
    deepspeed = _quiet()
    torch.manual_seed(0)
    model = _WithUnused()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(1, dtype="bf16",
                                                                                  grad_accum_dtype="fp32"))
    assert type(engine.optimizer).__name__ == "BF16_Optimizer", type(engine.optimizer).__name__
    rank = dist.get_rank()
    out: dict[str, Any] = {}
    engine.backward(loss_fn(engine(batch(rank, 0, 0).to(torch.bfloat16))))
    engine.step()
    try:
        dist_clip.clip_grad_norm_(engine, 1.0)  # the first call on this engine: no backward counter yet
    except RuntimeError as e:
        out["after step"] = "holds no reduced gradients" in str(e)
    else:
        out["after step"] = "accepted"
    engine.backward(loss_fn(engine(batch(rank, 1, 0).to(torch.bfloat16))))
    r = dist_clip.GradClipper(max_norm=1e9, report=True)(engine)
    out["reported"] = sorted(r.norms or {})
    return out


def case_skip_then_steps_with_offload_and_fp32_accumulation(stage: int, dtype: str, accum: str | None,
                                                            policy: str = "skip") -> list:
    """``GradClipper(on_nonfinite="skip")`` on an offloaded ZeRO 1-2 engine: a good step, a NaN batch on rank 1
    (skipped through DeepSpeed's overflow path), two good steps. With bf16/fp16 parameters and
    ``grad_accum_dtype: fp32`` DeepSpeed 0.19.8 accumulates into a compact fp32 buffer that its overflow path left
    NaN under offload (its update path drops it): every later backward added to it, and every later step read NaN
    and was skipped (skipped_steps 1, 2, 3). Each step's (finite, skipped_steps), and whether the parameters end
    as a run of the good batches alone (the skipped step leaving them and the optimizer as they were).
    ``policy="ignore"``: no skip armed, DeepSpeed's own overflow check alone (README: it keeps the NaN)."""
    from dist_clip import GradClipper

    rank = dist.get_rank()
    runs = []
    for with_nan in (True, False):
        engine = make_engine(ds_config(stage, dtype=dtype, grad_accum_dtype=accum, offload=True))
        clipper = GradClipper(max_norm=0.3, on_nonfinite=policy)
        out = []
        for step, bad in enumerate((False, True, False, False)):
            if bad and not with_nan:
                continue
            loss = loss_fn(engine(batch(rank, step, 0).to(_engine_dtype(engine))))
            engine.backward(loss * (float("nan") if bad and rank == 1 else 1.0))
            out.append((bool(clipper(engine).finite), None))
            engine.step()
            out[-1] = (out[-1][0], engine.skipped_steps)
        runs.append((out, full_params(engine)))
    same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(runs[0][1], runs[1][1]))
    return [*runs[0][0], same]


class _SometimesExtra(torch.nn.Module):
    """The test model and a layer after it that the forward calls only while ``use_extra``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()
        self.extra = torch.nn.Linear(OUT, OUT)
        self.use_extra = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return self.extra(y) if self.use_extra else y


def case_skip_then_steps_without_a_layer(stage: int, dtype: str, accum: str | None, offload: bool) -> list:
    """``GradClipper(on_nonfinite="skip")`` on a ZeRO 1-3 engine: a good step, a NaN batch on rank 1 (skipped),
    then two good steps whose forward leaves out a layer the NaN batch reached. DeepSpeed 0.19.8 keeps the
    offloaded fp32 gradient partitions, and ZeRO-3 its gradient partition buffer, across steps, and a backward
    writes only the slots of the parameters it reaches: the layer's slot kept the skipped NaN, and every later step
    read NaN and was skipped (skipped_steps 1, 2, 3). Each step's (finite, skipped_steps); whether every
    parameter ends finite; and whether the model's other parameters end as in a run of the good batches alone
    (the layer's do not: there DeepSpeed steps its slot's stale step-0 gradient again, where after the skip it
    reads 0)."""
    from dist_clip import GradClipper

    deepspeed = _quiet()
    if dtype == "fp16":
        allow_cpu_fp16()
    rank = dist.get_rank()
    runs = []
    for with_nan in (True, False):
        torch.manual_seed(0)
        model = _SometimesExtra()
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        with contextlib.redirect_stdout(io.StringIO()):
            cfg = ds_config(stage, dtype=dtype, grad_accum_dtype=accum, offload=offload)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        clipper = GradClipper(max_norm=1e9, on_nonfinite="skip")  # (the total holds the layer's slot)
        out = []
        for step, bad in enumerate((False, True, False, False)):
            if bad and not with_nan:
                continue
            model.use_extra = step < 2
            loss = loss_fn(engine(batch(rank, step, 0).to(_engine_dtype(engine))))
            engine.backward(loss * (float("nan") if bad and rank == 1 else 1.0))
            finite = bool(clipper(engine).finite)
            engine.step()
            out.append((finite, engine.skipped_steps))
        runs.append((out, full_params(engine)))
    n = len(list(model.net.parameters()))  # the net's parameters come first, in model order
    same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(runs[0][1][:n], runs[1][1][:n]))
    return [*runs[0][0], all(bool(torch.isfinite(t).all()) for t in runs[0][1]), same]


class _WithDeviceMarker(torch.nn.Module):
    """The model of :func:`make_model` beside a zero-element parameter (``nn.Parameter(torch.empty(0))``, the
    usual marker a module keeps to tell its device and dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model(0)
        self.marker = torch.nn.Parameter(torch.empty(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def case_zero_element_parameter(stage: int, dtype: str = "fp32", grad_accum_dtype: str | None = None) -> list:
    """A trainable zero-element parameter in the optimizer's param group: DeepSpeed 0.19.8 leaves it out of its
    groups (``is_optimized_parameter``: nothing to optimize), as it leaves out frozen ones. It holds no gradient
    element, so the norm is the model's: it was refused as a parameter in no param group ("marker requires
    gradients but is in no param group", ValueError on every rank, ZeRO 1-2 and ``BF16_Optimizer``). Every mode
    measures the float64 unsharded norm and steps the clipped gradients."""
    deepspeed = _quiet()
    rank, world = dist.get_rank(), dist.get_world_size()
    out: list = []
    for mode in ("total", "per_param"):
        torch.manual_seed(0)
        model = _WithDeviceMarker()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        with contextlib.redirect_stdout(io.StringIO()):
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(
                stage, dtype=dtype, grad_accum_dtype=grad_accum_dtype))
        ref = make_model(0).double()
        for r in range(world):
            (loss_fn(ref(batch(r, 0, 0).double())) / world).backward()
        grads = [q.grad for q in ref.parameters()]
        dt = _engine_dtype(engine)
        engine.backward(loss_fn(engine(batch(rank, 0, 0).to(dt))))
        result = dist_clip.GradClipper(max_norm=0.3, mode=mode, report=True)(engine)
        engine.step()
        want = reference_norm(grads)
        rtol = 2e-6 if dtype == "fp32" else 2e-2
        out.append(abs(float(result.total_norm) - want) <= rtol * want)
        out.append(sorted(result.norms or {}) == sorted(f"net.{n}" for n, _ in ref.named_parameters()))
    return out


def case_global_grad_norm_after_the_clip(stage: int, offload: bool, hand_over: bool) -> list:
    """What ``engine.get_global_grad_norm()`` holds after ``step()`` beside dist_clip's total: DeepSpeed's own L2
    measurement, taken in ``step()`` after the plain call scaled the gradients (ZeRO 1-3 without offload: the
    clipped norm, max_norm), or in backward before it (offload), or before the handed-over coefficient reached
    them (``optimizer=``): the unclipped norm, dist_clip's total."""
    engine = make_engine(ds_config(stage, offload=offload))
    engine.backward(loss_fn(engine(batch(dist.get_rank(), 0, 0))))
    total = float(dist_clip.clip_grad_norm_(engine, 0.3, optimizer=engine.optimizer if hand_over else None))
    engine.step()
    theirs = float(engine.get_global_grad_norm())
    return [round(total, 4), "total" if abs(theirs - total) <= 1e-5 * total else
            "max_norm" if abs(theirs - 0.3) <= 1e-5 else theirs]


def make_muon_engine(stage: int, offload: bool = False, **dtypes: Any) -> Any:
    """An engine running DeepSpeed's own Muon (``"optimizer": {"type": "Muon"}``: the weight matrices Muon, the
    biases its auxiliary Adam, torch's here: DeepSpeed's FusedAdam would be compiled first)."""
    deepspeed = _quiet()
    model = make_model(0)
    cfg = ds_config(stage, offload=offload, **dtypes)
    cfg["optimizer"] = {"type": "Muon", "params": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
                                                   "torch_adam": True}}
    if stage == 3:
        cfg["zero_optimization"]["reduce_scatter"] = False  # (DeepSpeed's Muon refuses it at stage 3)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def case_deepspeed_muon_zero12_refused(stage: int) -> list:
    """DeepSpeed's Muon replaces gradients by Muon updates (momentum, then Newton-Schulz); ZeRO 1-2 without
    offload do it in backward, while building the partitions dist_clip reads: the norm was that of the updates
    (8.006 for 9.264, 1 rank) and the clip scaled them, silently. Refused on every rank, in every entry point."""
    engine = make_muon_engine(stage)
    engine.backward(loss_fn(engine(batch(dist.get_rank(), 0, 0))))
    refused = lambda m: "Muon" in m and "gradients are gone" in m  # noqa: E731
    return [outcome(lambda: dist_clip.get_total_norm(engine), NotImplementedError, refused),
            outcome(lambda: dist_clip.clip_grad_norm_(engine, 1.0, optimizer=engine.optimizer),
                    NotImplementedError, refused),
            outcome(lambda: dist_clip.GradClipper(max_norm=1.0, mode="per_param")(engine), NotImplementedError,
                    refused)]


def case_deepspeed_muon_bf16_optimizer_is_measured() -> list:
    """ZeRO-1 with bf16 and fp32 gradient accumulation steps DeepSpeed's ``BF16_Optimizer``, which runs Muon in
    ``step()`` after its own norm (``_prepare_muon_updates``), not in backward as the ZeRO 1-2 optimizer does: the
    gradients are there, so it is not refused, and the norm is the gradients' (9.821 for the float64 model's 9.828,
    a bf16 model's difference, 2 ranks; Muon's updates read 13% low at ZeRO 1-2)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    engine = make_muon_engine(1, dtype="bf16", grad_accum_dtype="fp32")
    model = make_model(0).double()
    (sum(loss_fn(model(batch(r, 0, 0).bfloat16().double())) for r in range(world)) / world).backward()
    want = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])))
    engine.backward(loss_fn(engine(batch(rank, 0, 0).bfloat16())))
    total = float(dist_clip.clip_grad_norm_(engine, 1.0))
    engine.step()
    return [type(engine.optimizer).__name__ == "BF16_Optimizer", math.isclose(total, want, rel_tol=2e-2)]


def case_deepspeed_muon_hand_over(stage: int, offload: bool) -> list:
    """ZeRO-3 and offload run DeepSpeed's Muon at the start of step(): the norm is the gradients' (checked against
    the float64 reference), but the hand-over (optimizer=) folded the coefficient into step() after Muon, scaling
    the update instead of the gradient (parameters 0.053 off the plain call after 2 steps, 1 rank); it now
    equals the plain call bit for bit."""
    from deepspeed.utils import safe_get_full_fp32_param

    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(0).double()
    (sum(loss_fn(model(batch(r, 0, 0).double())) for r in range(world)) / world).backward()
    want = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    out, final = [], {}
    for how in ("plain", "hand_over"):
        engine = make_muon_engine(stage, offload)
        for step in range(2):
            engine.backward(loss_fn(engine(batch(rank, step, 0))))
            opt = engine.optimizer if how == "hand_over" else None
            total = dist_clip.clip_grad_norm_(engine, 1.0, optimizer=opt)
            if step == 0:
                out.append(math.isclose(float(total), float(want), rel_tol=1e-5))
            engine.step()
        final[how] = torch.cat([safe_get_full_fp32_param(p).flatten() for p in engine.module.parameters()])
    out.append(torch.equal(final["plain"], final["hand_over"]))
    return out


def case_deepspeed_muon_skip(stage: int, offload: bool) -> list:
    """``on_nonfinite="skip"`` with DeepSpeed's Muon at ZeRO-3 and with offload, where Muon runs in step() before
    the overflow path the skip drives: the skipped step wrote Muon's momentum all the same for the parameters
    with a finite gradient (a NaN in one bias: momentum 0.082 off, and every later step off with it). The
    skipped batch now leaves momentum and parameters as they were: the run equals one that never saw it."""
    from deepspeed.utils import safe_get_full_fp32_param

    rank = dist.get_rank()
    final = {}
    for steps in ((0, 1, 2), (0, 2)):
        engine = make_muon_engine(stage, offload)
        bias = list(engine.module.parameters())[-1]
        for step in steps:
            hook = bias.register_hook(lambda g: g * math.nan) if step == 1 and rank == 0 else None
            engine.backward(loss_fn(engine(batch(rank, step, 0))))
            if hook is not None:
                hook.remove()
            dist_clip.GradClipper(max_norm=1.0, on_nonfinite="skip")(engine)
            engine.step()
        final[steps] = (engine.skipped_steps, {k: v["momentum_buffer"].clone()
                                               for k, v in engine.optimizer.optimizer.state.items()
                                               if "momentum_buffer" in v},
                        torch.cat([safe_get_full_fp32_param(p).flatten() for p in engine.module.parameters()]))
    (skipped, mom_a, par_a), (_, mom_b, par_b) = final[(0, 1, 2)], final[(0, 2)]
    return [skipped == 1, [torch.equal(a, b) for a, b in zip(mom_a.values(), mom_b.values())] == [True] * len(mom_b),
            torch.equal(par_a, par_b)]


# ------------------------------------------------------------------------------------------ DeepSpeed MoE


MOE_EXPERTS, MOE_TOKENS = 4, 8
MOE_EXPERT = "moe.deepspeed_moe.experts.deepspeed_experts."
MOE2_EXPERTS, MOE2_EXPERT = 2, "moe2.deepspeed_moe.experts.deepspeed_experts."


class MoeNet(torch.nn.Module):
    """A dense layer, DeepSpeed's ``MoE`` (top-1 gate, ``MOE_EXPERTS`` experts spread over ``ep_size`` ranks, no
    token dropped: every token reaches its expert on every rank count), with ``second_ep`` a second one
    (``MOE2_EXPERTS`` experts over ``second_ep`` ranks: its own expert param group), and a dense layer. Expert
    ``e`` (of all of a layer's) gets values of its own; DeepSpeed's experts start as copies of one module on every
    rank."""

    def __init__(self, ep_size: int, experts: int = MOE_EXPERTS, hid: int = HID, second_ep: int | None = None) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        torch.manual_seed(0)
        self.inp = torch.nn.Linear(IN, hid)
        layers = [("moe", experts, ep_size, 0)] + ([("moe2", MOE2_EXPERTS, second_ep, 200)] if second_ep else [])
        for attr, n, ep, seed in layers:
            with contextlib.redirect_stdout(io.StringIO()):
                setattr(self, attr, MoE(hid, torch.nn.Linear(hid, hid), num_experts=n, ep_size=ep, k=1,
                                        min_capacity=0, drop_tokens=False, use_rts=False))
            local = n // ep
            ep_rank = dist.get_rank() % ep  # DeepSpeed's expert-parallel groups: consecutive ranks
            with torch.no_grad():
                for k, expert in enumerate(getattr(self, attr).deepspeed_moe.experts.deepspeed_experts):
                    expert.weight.copy_(_expert_values(seed + ep_rank * local + k, hid)[0])
                    expert.bias.copy_(_expert_values(seed + ep_rank * local + k, hid)[1])
        self.out = torch.nn.Linear(hid, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _, _ = self.moe(torch.tanh(self.inp(x)))
        if hasattr(self, "moe2"):
            h, _, _ = self.moe2(h)
        return self.out(h)


def _expert_values(e: int, hid: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + e)
    return torch.randn(hid, hid, generator=g) * 0.5, torch.randn(hid, generator=g) * 0.2


class MoeReference(torch.nn.Module):
    """The unsharded float64 model of :class:`MoeNet`: every expert on one process, under the names the engine's
    parameters carry in dist_clip (experts numbered over all expert-parallel ranks)."""

    def __init__(self, engine: Any) -> None:
        super().__init__()
        src = engine.module
        hid = src.inp.out_features
        self.inp = torch.nn.Linear(IN, hid).double()
        self.layers = [("moe", 0)] + ([("moe2", 200)] if hasattr(src, "moe2") else [])
        for attr, _ in self.layers:
            n = getattr(src, attr).num_experts
            setattr(self, f"{attr}_wg", torch.nn.Linear(hid, n, bias=False).double())
            setattr(self, f"{attr}_experts",
                    torch.nn.ModuleList(torch.nn.Linear(hid, hid).double() for _ in range(n)))
        self.out = torch.nn.Linear(hid, OUT).double()
        with torch.no_grad():
            for mine, theirs in ((self.inp, src.inp), (self.out, src.out),
                                 *((getattr(self, f"{a}_wg"), getattr(src, a).deepspeed_moe.gate.wg)
                                   for a, _ in self.layers)):
                for a, b in zip(mine.parameters(), theirs.parameters()):
                    a.copy_(b)
            for attr, seed in self.layers:
                for e, expert in enumerate(getattr(self, f"{attr}_experts")):
                    expert.weight.copy_(_expert_values(seed + e, hid)[0])
                    expert.bias.copy_(_expert_values(seed + e, hid)[1])
        self.opt = torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.inp(x))
        for attr, _ in self.layers:
            experts = getattr(self, f"{attr}_experts")
            gates = torch.softmax(getattr(self, f"{attr}_wg")(y), dim=1)
            chosen = gates.argmax(dim=1)
            y = torch.stack([gates[t, e] * experts[int(e)](y[t]) for t, e in enumerate(chosen)])
        return self.out(y)

    def named(self) -> dict[str, torch.Tensor]:
        """Parameters by the engine's names."""
        out = {"inp.weight": self.inp.weight, "inp.bias": self.inp.bias}
        for attr, _ in self.layers:
            out[f"{attr}.deepspeed_moe.gate.wg.weight"] = getattr(self, f"{attr}_wg").weight
            prefix = f"{attr}.deepspeed_moe.experts.deepspeed_experts."
            for e, expert in enumerate(getattr(self, f"{attr}_experts")):
                out[f"{prefix}{e}.weight"], out[f"{prefix}{e}.bias"] = expert.weight, expert.bias
        out["out.weight"], out["out.bias"] = self.out.weight, self.out.bias
        return out

    def grads(self, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """DeepSpeed's gradient: the mean over ranks of each rank's loss (experts too: DeepSpeed divides them by
        the data-parallel size, then sums them over the expert-data-parallel group)."""
        self.opt.zero_grad(set_to_none=True)
        for x in batches:
            (loss_fn(self(x.double())) / len(batches)).backward()
        for p in self.parameters():  # an expert no token reached: DeepSpeed holds a zero gradient (and steps it)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return {n: p.grad for n, p in self.named().items()}


def moe_batch(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5000 + 100 * step + rank)
    return torch.randn(MOE_TOKENS, IN, generator=g) * (1.0 + rank)


def make_moe_engine(stage: int, ep_size: int = 2, clip: float = 0.0, dtype: str = "fp32",
                    grad_accum_dtype: str | None = None, experts: int = MOE_EXPERTS, hid: int = HID,
                    second_ep: int | None = None, permuted: bool = False, offload: bool = False) -> Any:
    """A :class:`MoeNet` engine whose torch SGD holds a dense and an expert param group per expert-parallel size,
    as DeepSpeed's MoE wants them (``split_params_into_different_moe_groups_for_optimizer``). ``permuted``: rank 0
    lists the expert groups by name, rank 1 the other way round, as DeepSpeed's split lists them (in a Python set's
    order of their names) in processes of different ``PYTHONHASHSEED``."""
    deepspeed = _quiet()
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    model = MoeNet(ep_size, experts, hid, second_ep)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()),
                                                                   "name": "dense"})
    if permuted:  # (spawned ranks hash with seeds of their own: the split's order may differ between them already)
        assert len(groups) == 3, [g["name"] for g in groups]
        groups = [groups[0], *sorted(groups[1:], key=lambda g: g["name"], reverse=dist.get_rank() == 1)]
    opt = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(
            stage, clip=clip, dtype=dtype, grad_accum_dtype=grad_accum_dtype, offload=offload))
    name = model.moe.expert_group_name
    assert dist.get_rank(engine.expert_parallel_group[name]) == dist.get_rank() % ep_size, "expert-parallel rank"
    return engine


def _moe_params_close(engine: Any, ref: MoeReference, what: str) -> None:
    """This rank's parameters (its own experts among them) against the float64 model's."""
    want = ref.named()
    for n, p in engine.module.named_parameters():
        for attr, _ in ref.layers:
            prefix, layer = f"{attr}.deepspeed_moe.experts.deepspeed_experts.", getattr(engine.module, attr)
            if n.startswith(prefix):
                first = dist.get_rank() % layer.ep_size * (layer.num_experts // layer.ep_size)  # its first expert
                k, _, rest = n[len(prefix):].partition(".")
                n = f"{prefix}{first + int(k)}.{rest}"
        err = (p.detach().double() - want[n]).abs().max().item()
        assert torch.allclose(p.detach().double(), want[n], rtol=1e-5, atol=1e-6), f"{what}: {n} differs by {err:.3e}"


def case_moe_vs_reference(stage: int, call: str, ep_size: int = 2, ps: tuple[float, ...] = (2.0, math.inf, 1.0),
                          steps: int = 2, experts: int = MOE_EXPERTS, hid: int = HID, second_ep: int | None = None,
                          permuted: bool = False, offload: bool = False) -> dict:
    """DeepSpeed MoE at ZeRO-1/2: each rank holds its own experts (``MOE_EXPERTS / ep_size``), partitioned over its
    expert-data-parallel group (stage 0: whole, all-reduced over it). For each p the norm equals the float64
    unsharded model's (every expert once, dense parameters once), one collective per call, and the parameters after
    ``steps`` equal the float64 model stepped the same way. ``call``: "plain" (``clip_grad_norm_``), "hand_over"
    (``optimizer=engine.optimizer``), "skip" (``GradClipper(on_nonfinite="skip")``, a NaN in rank 0's batch at step
    1: the step is skipped), "per_param", "per_group" (the dense group and the experts' own, each against its own
    max_norm), "unitwise" (AGC, the float64 model's weights before the step), "deepspeed" (DeepSpeed's own
    ``gradient_clipping``, dist_clip not called: its norm and step against the float64 model). ``second_ep``, a
    second MoE layer of that expert-parallel size (a second expert param group); ``permuted``, its expert groups in
    another order on rank 1 (see :func:`make_moe_engine`): "per_group" numbers them by name on every rank, and a
    rank giving one of them another max_norm is a RuntimeError on every rank. ``offload``: ZeRO-Offload of the
    optimizer (CPU)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict[str, Any] = {}
    for p in ps if call in ("plain", "hand_over") else (2.0,):
        max_norm = 0.05 if math.isinf(p) else 0.3
        engine = make_moe_engine(stage, ep_size, clip=max_norm if call == "deepspeed" else 0.0, experts=experts,
                                 hid=hid, second_ep=second_ep, permuted=permuted, offload=offload)
        ref = MoeReference(engine)
        torch_opt = getattr(engine.optimizer, "optimizer", engine.optimizer)  # (stage 0: itself)
        out["group_order"] = [pg["name"] for pg in torch_opt.param_groups]
        _moe_params_close(engine, ref, "initial params")
        from dist_clip.adapters.deepspeed import _ZERO12_MOE

        missing = [a for a in _ZERO12_MOE if not hasattr(engine.optimizer, a)] if stage else []
        assert not missing, f"DeepSpeed's MoE ZeRO optimizer no longer has {missing}: the adapter must be updated"
        for step in range(steps):
            batches = [moe_batch(r, step) for r in range(world)]
            if call == "skip" and step == 1:
                batches[0][0, 0] = float("nan")
            engine.backward(loss_fn(engine(batches[rank])))
            grads = ref.grads(batches)
            total = reference_norm(list(grads.values()), p)
            # per_group: the dense group against max_norm, ep_size_2's experts against 3x, ep_size_1's against 2x
            limits = {"dense": max_norm, "ep_size_2": 3 * max_norm, "ep_size_1": 2 * max_norm}
            if call == "per_group":
                for pg in torch_opt.param_groups:
                    pg["max_norm"] = limits[pg["name"]]
            if call == "per_group" and permuted and step == 0:
                # rank 1 giving the group of one name another limit: refused on every rank, gradients untouched
                for pg in torch_opt.param_groups:
                    if rank == 1 and pg["name"] == f"ep_size_{second_ep}":
                        pg["max_norm"] = 5 * max_norm
                clipper = dist_clip.GradClipper(mode="per_group")
                out["refused"] = outcome(functools.partial(clipper, engine, optimizer=engine), RuntimeError,
                                         lambda m: "disagree" in m and "group_limits" in m)
                for pg in torch_opt.param_groups:
                    pg["max_norm"] = limits[pg["name"]]
            with count_collectives() as c:
                if call == "plain":
                    got = dist_clip.clip_grad_norm_(engine, max_norm, p)
                elif call == "hand_over":
                    got = dist_clip.clip_grad_norm_(engine, max_norm, p, optimizer=engine.optimizer)
                elif call == "skip":
                    got = dist_clip.GradClipper(max_norm=max_norm, on_nonfinite="skip")(engine).total_norm
                elif call == "per_param":
                    norms = {n: float(torch.linalg.vector_norm(g)) for n, g in grads.items()}
                    result = dist_clip.GradClipper(mode="per_param", max_norm=max_norm, report=True)(engine)
                    assert result.slots == tuple(grads), result.slots
                    for n, want in norms.items():
                        _close(result.norms[n], want, 2e-6, f"per_param norm of {n}")
                    got = result.total_norm
                elif call == "per_group":
                    prefixes = {f"ep_size_{ep_size}": MOE_EXPERT}
                    if second_ep is not None:
                        prefixes[f"ep_size_{second_ep}"] = MOE2_EXPERT
                    names = ("dense", *sorted(prefixes))
                    members = {k: [n for n in grads if n.startswith(v)] for k, v in prefixes.items()}
                    members["dense"] = [n for n in grads if not n.startswith((MOE_EXPERT, MOE2_EXPERT))]
                    result = dist_clip.GradClipper(mode="per_group", report=True)(engine, optimizer=engine)
                    assert result.slots == names, result.slots  # the groups' names, expert groups sorted
                    for i, name in enumerate(names):
                        want = reference_norm([grads[n] for n in members[name]], 2.0)
                        coef = min(1.0, limits[name] / (want + 1e-6))
                        assert coef < 1, f"the case must clip group {name}"
                        _close(float(result.clip_coef[i]), coef, 2e-6, f"per_group coefficient of group {name}")
                        _close(float(result.max_norm[i]), limits[name], 1e-7, f"per_group limit of group {name}")
                        for n in members[name]:
                            grads[n].mul_(coef)
                    got = result.total_norm
                elif call == "unitwise":
                    from dist_clip.testing import reference_agc_

                    got = dist_clip.GradClipper(mode="unitwise", agc=dist_clip.AGC(0.05))(engine).total_norm
                else:
                    got = None
            if call != "deepspeed":
                assert c.total == 1, f"{c.total} collectives"
                _close(float(got), total, 2e-6, f"stage {stage} {call} p={p} step {step} norm")
            if call == "plain" and step == 0:  # (the gradients are clipped: their norm is max_norm now)
                _close(float(dist_clip.get_total_norm(engine, p, group=dist.group.WORLD)), max_norm, 2e-6,
                       f"stage {stage} p={p} group=WORLD after the clip")
            if call == "skip" and step == 1:
                assert math.isnan(total)
                engine.step()
                assert engine.skipped_steps == 1, engine.skipped_steps
                continue
            if call == "per_group":
                pass
            elif call == "per_param":
                for g in grads.values():
                    g.mul_(min(1.0, max_norm / (float(torch.linalg.vector_norm(g)) + 1e-6)))
            elif call == "unitwise":
                reference_agc_({n: t.detach() for n, t in ref.named().items()}, grads, 0.05, 1e-3)
            else:
                assert max_norm < total, "the case must clip"
                for g in grads.values():
                    g.mul_(min(1.0, max_norm / (total + 1e-6)))
            engine.step()
            ref.opt.step()
            if call == "deepspeed":
                theirs = engine.get_global_grad_norm()  # (None at stage 0 with a torch optimizer)
                out[f"deepspeed_norm{step}"] = (None if theirs is None else float(theirs), total)
        _moe_params_close(engine, ref, f"stage {stage} {call} p={p} params after {steps} steps")
        out[str(p)] = float(got) if got is not None else None
    return out


def case_moe_refused(stage: int, dtype: str = "fp32", grad_accum_dtype: str | None = None) -> list:
    """MoE layers under DeepSpeed's non-ZeRO wrappers (BF16_Optimizer at stage 0, and at ZeRO-1 with fp32
    accumulation), which reduce the expert gradients into buffers of their own: NotImplementedError on every
    rank, every mode."""
    engine = make_moe_engine(stage, dtype=dtype, grad_accum_dtype=grad_accum_dtype)
    dtype_ = _engine_dtype(engine)
    engine.backward(loss_fn(engine(moe_batch(dist.get_rank(), 0).to(dtype_))))
    got = [outcome(call, NotImplementedError, lambda m: "MoE" in m and type(engine.optimizer).__name__ in m)
           for call in (lambda: dist_clip.clip_grad_norm_(engine, 1.0),
                        lambda: dist_clip.GradClipper(mode="per_param")(engine),
                        lambda: dist_clip.GradClipper(mode="unitwise")(engine))]
    engine.step()
    return got
