"""GradClipper's non-finite policies and adaptive thresholds on DeepSpeed engines and fairscale wrappers.

The policies put a NaN into one piece of rank 1's partition only (after DeepSpeed/fairscale reduced the
gradients); every rank takes the same decision from the one collective:

* ``"error"`` raises on every rank, naming rank 1 and the unwrapped model's parameter holding the NaN;
* ``"zero"`` zeroes every local piece (one collective);
* ``"skip"``: a good step, the poisoned step skipped (parameters, fp32 masters and optimizer state bit-for-bit
  unchanged; one collective), a good step: equal to a twin that only took the two good steps, and (fp32) to the
  float64 unsharded torch run. On DeepSpeed the engine is handed its optimizer in each accepted form (left out,
  ``engine.optimizer``, the torch optimizer), over two param groups; the hook on DeepSpeed's overflow path is
  also driven alone on finite gradients, which DeepSpeed would never skip by itself.

AutoClip and ZClip run a few steps (one a spike) on ZeRO-2 and on OSS + ShardedDataParallel: thresholds,
coefficients and ZClip's running statistics equal the single-process references of ``tests/test_adaptive.py``
fed the float64 reference norms, with identical state on every rank.
Run: ``.venv/bin/python -m pytest tests/test_policies_wrappers.py``.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import pytest
import torch
import torch.distributed as dist

from dist_clip import AutoClip, GradClipper, ZClip, skip_next_step_
from dist_clip.testing import count_collectives, reference_norm

# Only the tests marked deepspeed or fairscale skip without their framework (conftest.py): the case modules import
# it inside the cases. The whole module skipped without DeepSpeed, torch's ZeroRedundancyOptimizer cases too.
from tests import ds_cases, ds_names_cases, fairscale_cases
from tests._harness import outcome
from tests.test_adaptive import ZClipReference, _same_state, autoclip_reference, percentile_reference

TIMEOUT = 240
MAX_NORM = 0.3


# ------------------------------------------------------------------------------------------------- helpers


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> str:
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} tensors"
    return "; ".join(f"#{i} {tuple(x.shape)}/{tuple(y.shape)} max diff {(x.double() - y.double()).abs().max():.3e}"
                     for i, (x, y) in enumerate(zip(a, b)) if not torch.equal(x, y))


def _everyone(value: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _poison(pieces: list[tuple[str, torch.Tensor]]) -> str:
    """A NaN in rank 1's last non-empty piece; the name of its parameter, on every rank."""
    name = None
    if dist.get_rank() == 1:
        name, t = [(n, t) for n, t in pieces if t.numel()][-1]
        t.view(-1)[0] = math.nan
    return _everyone(name)[1]


def _error_message(clip_target: Any, **kwargs: Any) -> str:
    try:
        GradClipper(on_nonfinite="error")(clip_target, **kwargs)
    except RuntimeError as e:
        return str(e)
    return "no error"


def _check_error(message: str, name: str, names: set[str]) -> None:
    assert name in names, f"{name!r} is not a parameter name of the unwrapped model {sorted(names)}"
    assert f"rank 1: {name}" in message and "rank 0" not in message, message


def _clip_once(clipper: GradClipper, clip_target: Any, **kwargs: Any) -> Any:
    with count_collectives() as calls:
        result = clipper(clip_target, **kwargs)
    assert calls.total == 1, f"{calls.total} collectives"
    return result


# ------------------------------------------------------------------------------------------------ DeepSpeed


def _engine(stage: int, dtype: str, offload: bool = False) -> tuple[Any, torch.optim.Optimizer]:
    """``ds_names_cases``' engine (two SGD param groups); bf16 with DeepSpeed's own overflow check off, so
    ZeRO-1/2 would step a NaN gradient if dist_clip did not skip it."""
    deepspeed = ds_cases._quiet()
    cfg = ds_cases.ds_config(stage, dtype=dtype, offload=offload)
    if dtype == "bf16":
        cfg["bf16"]["check_grad_overflow"] = False
    model = ds_cases.make_model(0)
    by_name = dict(model.named_parameters())
    opt = torch.optim.SGD([{"params": [by_name[n] for n in g]} for g in ds_names_cases.GROUPS["layers"]],
                          lr=ds_cases.LR, momentum=ds_cases.MOMENTUM)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine, opt


def _ds_pieces(engine: Any) -> list[tuple[str, torch.Tensor]]:
    from dist_clip.adapters import deepspeed as adapter

    return [(n, t) for s in adapter.shards(engine, None) for n, t in zip(s.names, s.tensors)]


def _ds_state(engine: Any) -> list[torch.Tensor]:
    """Whole bit16 parameters (gathered under ZeRO-3), this rank's fp32 masters, the torch optimizer's state."""
    opt = engine.optimizer
    out = ds_cases.full_params(engine)
    state = opt.optimizer.state
    if engine.zero_optimization_stage() < 3:
        for master in opt.single_partition_of_fp32_groups:
            out.append(master.detach().clone())
            out += [v.detach().clone() for v in state.get(master, {}).values() if isinstance(v, torch.Tensor)]
        return out
    # ZeRO-3's flat fp32 partitions hold uninitialised alignment padding: compare the parameters' elements only.
    from dist_clip.adapters.deepspeed import _real_numel

    for i, master in enumerate(opt.fp32_partitioned_groups_flat):
        cuts = [(int(opt.grad_position[opt.get_param_id(p)][1]), _real_numel(p, dist.get_rank()))
                for p in opt.fp16_groups[i]]
        held = [master] + [v for v in state.get(master, {}).values() if isinstance(v, torch.Tensor)]
        out += [t.detach().reshape(-1).narrow(0, o, n).clone() for t in held for o, n in cuts]
    return out


def _ds_backward(engine: Any, step: int) -> list[list[torch.Tensor]]:
    batches = ds_cases.micro_batches(engine, step)
    dtype = next(engine.module.parameters()).dtype
    engine.backward(ds_cases.loss_fn(engine(batches[0][dist.get_rank()].to(dtype))))
    return batches


def case_ds_policies(stage: int, dtype: str = "fp32") -> dict:
    from dist_clip.adapters import deepspeed as adapter

    exact = dtype == "fp32"
    # -- "error" and "zero" on one engine.
    engine, _ = _engine(stage, dtype)
    _ds_backward(engine, 0)
    name = _poison(_ds_pieces(engine))
    _check_error(_error_message(engine), name, {n for n, _ in engine.module.named_parameters()})
    result = _clip_once(GradClipper(on_nonfinite="zero"), engine)
    assert not bool(result.finite)
    assert all(bool((t == 0).all()) for _, t in _ds_pieces(engine)), "a local piece was not zeroed"
    engine.step()

    # -- "skip": good, poisoned (skipped), good == a twin that took the good steps only (== float64 run).
    ours, torch_opt = _engine(stage, dtype)
    twin, _ = _engine(stage, dtype)
    ref = ds_cases.Reference()
    try:
        GradClipper(on_nonfinite="skip")(ours, optimizer=torch.optim.SGD(ref.model.parameters(), lr=0.1))
    except ValueError as e:
        assert "deepspeed.initialize" in str(e), e
    else:
        raise AssertionError("a foreign optimizer= was accepted")
    clipper, twin_clipper = GradClipper(max_norm=MAX_NORM, on_nonfinite="skip"), GradClipper(max_norm=MAX_NORM)
    # (the engine as optimizer= was refused under "skip" alone; the skipped step goes through it)
    forms = [{"optimizer": torch_opt}, {"optimizer": ours}, {"optimizer": ours.optimizer}]
    for step in range(3):
        batches = _ds_backward(ours, step)
        if step == 1:
            _poison(_ds_pieces(ours))
            before = _ds_state(ours)
            result = _clip_once(clipper, ours, **forms[step])
            assert not bool(result.finite) and not bool(result.clipped)
            ours.step()
            assert _same(before, _ds_state(ours)), f"stage {stage} {dtype}: the skipped step changed something"
            assert ours.skipped_steps == 1 and not ours._step_applied
            continue
        assert bool(_clip_once(clipper, ours, **forms[step]).finite)
        ours.step()
        _ds_backward(twin, step)
        twin_clipper(twin)
        twin.step()
        if exact:
            ref.step(batches, MAX_NORM, 2.0)
        a, b = _ds_state(ours), _ds_state(twin)
        assert _same(a, b), f"stage {stage} {dtype}: step {step} differs from the twin: {_diff(a, b)}"
    if exact:
        ds_cases._params_close(ds_cases.full_params(ours), ref.params(), 1e-5, 1e-6, f"stage {stage} vs float64")
    assert int(clipper.num_nonfinite) == 1

    # -- the hook alone: finite gradients, DeepSpeed would step them; armed with True, the step is skipped.
    _ds_backward(ours, 3)
    arm, _ = adapter.skip_handle(ours, None)
    arm(torch.tensor(True))
    before = _ds_state(ours)
    ours.step()
    assert _same(before, _ds_state(ours)) and ours.skipped_steps == 2
    assert vars(ours.optimizer)["_update_scale"].flag is None, "the flag must be consumed by the step"
    _ds_backward(ours, 4)
    assert bool(_clip_once(clipper, ours).finite)
    ours.step()
    assert ours._step_applied and not _same(before, _ds_state(ours)), "a finite step after a skip must step"
    return {"name": name, "skipped": ours.skipped_steps}


def case_ds_zero_policy_and_offload(stage: int) -> dict:
    """``"zero"`` on fp32 ZeRO-2/3: without offload the gradients are zeroed and the step is taken; with the
    optimizer offloaded DeepSpeed took each gradient's norm in backward and skips the step on it whatever the
    clip does: there ``"zero"`` acts as ``"skip"`` (gradients left for that skip, ``skipped_steps`` counts it).
    Rank 1's batch holds the NaN, so that DeepSpeed's own backward-time norms see it too."""
    out = {}
    for offload in (False, True):
        engine, _ = _engine(stage, "fp32", offload)
        batch = ds_cases.micro_batches(engine, 0)[0][dist.get_rank()].clone()
        if dist.get_rank() == 1:
            batch.view(-1)[0] = math.nan
        engine.backward(ds_cases.loss_fn(engine(batch)))
        before = _ds_state(engine)
        result = _clip_once(GradClipper(max_norm=MAX_NORM, on_nonfinite="zero"), engine)
        assert not bool(result.finite)
        zeroed = all(bool((t == 0).all()) for _, t in _ds_pieces(engine))
        engine.step()
        skipped, unchanged = engine.skipped_steps, _same(before, _ds_state(engine))
        if offload:
            assert not zeroed and skipped == 1 and unchanged, (stage, zeroed, skipped, unchanged)
        else:
            assert zeroed and skipped == 0 and not unchanged, (stage, zeroed, skipped, unchanged)
        _ds_backward(engine, 1)  # a finite step after it is taken
        assert bool(_clip_once(GradClipper(max_norm=MAX_NORM, on_nonfinite="zero"), engine).finite)
        before = _ds_state(engine)
        engine.step()
        assert engine.skipped_steps == skipped and not _same(before, _ds_state(engine))
        out[offload] = skipped
    return out


def case_ds_stage0() -> dict:
    """Stage 0 steps its torch optimizer once per engine.step(): its step hooks skip it, and the engine counts
    the skip and leaves its LR scheduler alone, as at ZeRO 1-3. DeepSpeed's non-ZeRO mixed-precision wrappers
    (stage 0 bf16 here) are refused, on every rank, before anything is measured."""
    cfg = ds_cases.ds_config(0)
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.005, "warmup_max_lr": 0.01,
                                                       "warmup_num_steps": 10, "warmup_type": "linear"}}
    engine = ds_cases.make_engine(cfg)
    clipper = GradClipper(on_nonfinite="skip")
    lrs = []
    for step in range(3):
        _ds_backward(engine, step)
        if step == 1:
            for p in engine.module.parameters():  # replicated gradients: every rank holds the NaN
                p.grad.view(-1)[0] = math.nan
        before = ds_cases.full_params(engine)
        assert bool(clipper(engine).finite) == (step != 1)
        engine.step()
        lrs.append(engine.optimizer.param_groups[0]["lr"])
        assert engine._step_applied == (step != 1) and engine.skipped_steps == int(step >= 1), step
        assert _same(before, ds_cases.full_params(engine)) == (step == 1), step
    # the scheduler stepped on the taken steps only (it stepped on the skipped one too: lr 0.005 -> 0.0055)
    assert engine.lr_scheduler.last_batch_iteration == 1 and lrs[0] == lrs[1] < lrs[2], lrs
    # A skip armed, then cleared by the user (the NaN repaired): the step is taken and counted as taken (the
    # engine said skipped: its overflow came from a copy of the armed flag). Then every hook cleared by the
    # user: the next arming puts them back, and a NaN step is skipped and counted again.
    _ds_backward(engine, 3)
    for p in engine.module.parameters():
        p.grad.view(-1)[0] = math.nan
    assert not bool(clipper(engine).finite)
    for p in engine.module.parameters():
        p.grad.nan_to_num_(0.0)
    skip_next_step_(engine.optimizer, False)
    before = ds_cases.full_params(engine)
    engine.step()
    assert engine._step_applied and engine.skipped_steps == 1 and engine.lr_scheduler.last_batch_iteration == 2
    assert not _same(before, ds_cases.full_params(engine))
    # Armed from the user's own pre-hook, after dist_clip's: the step under way is skipped and counted so (it
    # was counted as taken: the overflow hook had read the flag pending before).
    _ds_backward(engine, 3)

    def poison_and_clip(optimizer: Any, args: Any, kwargs: Any) -> None:
        for p in engine.module.parameters():
            p.grad.view(-1)[0] = math.nan
        assert not bool(clipper(engine).finite)

    handle = engine.optimizer.register_step_pre_hook(poison_and_clip)
    before = ds_cases.full_params(engine)
    engine.step()
    handle.remove()
    assert not engine._step_applied and engine.skipped_steps == 2 and engine.lr_scheduler.last_batch_iteration == 2
    assert _same(before, ds_cases.full_params(engine))
    engine.optimizer._optimizer_step_pre_hooks.clear()
    engine.optimizer._optimizer_step_post_hooks.clear()
    for step, poison in ((4, True), (5, False)):
        _ds_backward(engine, step)
        if poison:
            for p in engine.module.parameters():
                p.grad.view(-1)[0] = math.nan
        before = ds_cases.full_params(engine)
        assert bool(clipper(engine).finite) == (not poison)
        engine.step()
        assert engine._step_applied == (not poison) and engine.skipped_steps == 3, step
        assert _same(before, ds_cases.full_params(engine)) == poison, step
    # The very first arming from a user's pre-hook, on a fresh engine, another pre-hook after it: registering the
    # overflow pre-hook while torch looped over the pre-hooks raised "OrderedDict mutated during iteration".
    engine = ds_cases.make_engine(cfg)
    first = GradClipper(on_nonfinite="skip")

    def poison_and_clip_first(optimizer: Any, args: Any, kwargs: Any) -> None:
        for p in engine.module.parameters():
            p.grad.view(-1)[0] = math.nan
        assert not bool(first(engine).finite)

    _ds_backward(engine, 0)
    handles = [engine.optimizer.register_step_pre_hook(poison_and_clip_first),
               engine.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: None)]  # (one after it)
    before = ds_cases.full_params(engine)
    engine.step()
    for handle in handles:
        handle.remove()
    assert not engine._step_applied and engine.skipped_steps == 1 and _same(before, ds_cases.full_params(engine))
    _ds_backward(engine, 1)  # the next arming, outside any step, installs what was left out
    assert bool(first(engine).finite)
    engine.step()
    assert engine._step_applied and engine.skipped_steps == 1
    engine = ds_cases.make_engine(ds_cases.ds_config(0, dtype="bf16"))
    _ds_backward(engine, 0)
    with count_collectives() as calls:
        try:
            GradClipper(on_nonfinite="skip")(engine)
        except NotImplementedError as e:
            message = str(e)
        else:
            raise AssertionError(f"{type(engine.optimizer).__name__} was accepted")
    assert type(engine.optimizer).__name__ in message and calls.total == 0, (message, calls.total)
    engine.step()
    return {"message": message}


# ------------------------------------------------------------------------------------------------- fairscale


def _fs_pieces(clip_target: Any) -> list[tuple[str, torch.Tensor]]:
    from dist_clip import _slots

    named = _slots.named_shards(clip_target, None)
    return [(n, t) for s in named.shards for n, t in zip(s.names, s.tensors)]


def _fs_state(kind: str, model: Any, opt: Any) -> list[torch.Tensor]:
    out = fairscale_cases.full_params(kind, model)
    out += [p.detach().clone() for p in model.parameters()]  # FSDP: this rank's shards
    inner = opt.optim if hasattr(opt, "optim") else opt  # OSS keeps the state in its torch optimizer
    for state in inner.state.values():
        out += [v.detach().clone() for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def _fs_backward(model: Any, step: int, scale: float = 1.0) -> None:
    model.zero_grad()  # ShardedDDP's own zero_grad keeps its buckets
    (scale * ds_cases.loss_fn(model(ds_cases.batch(dist.get_rank(), step, 0)))).backward()


def case_fs_policies(kind: str) -> dict:
    shim = fairscale_cases.cpu_stream_shim() if kind.startswith("fsdp") else contextlib.nullcontext()
    with shim:
        model, opt, target = fairscale_cases.build(kind)
        unwrapped = {n for n, _ in ds_cases.make_model(0).named_parameters()}
        _fs_backward(model, 0)
        name = _poison(_fs_pieces(target))
        _check_error(_error_message(target, optimizer=opt), name, unwrapped)
        result = _clip_once(GradClipper(on_nonfinite="zero"), target)
        assert not bool(result.finite)
        assert all(bool((t == 0).all()) for _, t in _fs_pieces(target)), "a local piece was not zeroed"
        opt.step()

        ours, ours_opt, ours_target = fairscale_cases.build(kind)
        twin, twin_opt, twin_target = fairscale_cases.build(kind)
        ref = ds_cases.Reference()
        clipper, twin_clipper = GradClipper(max_norm=MAX_NORM, on_nonfinite="skip"), GradClipper(max_norm=MAX_NORM)
        for step in range(3):
            _fs_backward(ours, step)
            if step == 1:
                _poison(_fs_pieces(ours_target))
                before = _fs_state(kind, ours, ours_opt)
                result = _clip_once(clipper, ours_target, optimizer=ours_opt)
                assert not bool(result.finite) and not bool(result.clipped)
                ours_opt.step()
                assert _same(before, _fs_state(kind, ours, ours_opt)), f"{kind}: the skipped step changed something"
                continue
            assert bool(_clip_once(clipper, ours_target, optimizer=ours_opt).finite)
            ours_opt.step()
            _fs_backward(twin, step)
            twin_clipper(twin_target)
            twin_opt.step()
            ref.step(fairscale_cases._batches(step), MAX_NORM, 2.0)
            assert _same(_fs_state(kind, ours, ours_opt), _fs_state(kind, twin, twin_opt)), f"{kind}: step {step}"
        ds_cases._params_close(fairscale_cases.full_params(kind, ours), ref.params(), 1e-5, 1e-6, f"{kind} vs float64")
    return {"name": name}


def case_torch_zero_skip(fused: bool, how: str = "GradClipper", wrapper: str = "torch") -> dict:
    """torch's ZeroRedundancyOptimizer keeps the state in its inner .optim, as OSS does: a skipped step must leave
    it (and the parameters) as they were, so the run equals one without that step. ``clip_grad_norm_`` with
    ``optimizer=`` the wrapper over a fused optimizer skips too, as with its inner optimizer: the wrapper takes no
    grad_scale, its gradients were scaled by NaN, every rank stepped and the owners broadcast NaN parameters.
    ``PostLocalSGDOptimizer`` (``wrapper="post_local_sgd"``) steps its ``.optim`` too, which is armed: the wrapper
    runs no step hooks, so a skip was refused, and ``clip_grad_norm_`` over a fused optimizer stepped NaN
    gradients (NaN parameters, averaged over the ranks). Over a ``ZeroRedundancyOptimizer``
    (``"post_local_sgd over zero"``) the ZeRO's own inner optimizer, which holds the state, is armed."""
    from torch import nn
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import dist_clip

    rank = dist.get_rank()
    finals = []
    for poison in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        ddp = nn.parallel.DistributedDataParallel(model)
        if wrapper == "oss":
            from fairscale.optim import OSS

            opt = OSS(model.parameters(), optim=torch.optim.Adam, lr=0.1, fused=fused)
        elif wrapper in ("post_local_sgd", "post_local_sgd over zero"):
            from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
            from torch.distributed.optim import PostLocalSGDOptimizer

            inner = (torch.optim.Adam(model.parameters(), lr=0.1, fused=fused) if wrapper == "post_local_sgd" else
                     ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=0.1,
                                             fused=fused))
            opt = PostLocalSGDOptimizer(inner, PeriodicModelAverager(period=2, warmup_steps=0))
        else:
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=0.1, fused=fused)
        clipper = GradClipper(max_norm=0.5, on_nonfinite="skip")
        for step in [0, 1, 2, 3] if poison else [0, 2, 3]:
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * step + rank))
            ddp(x).square().sum().backward()
            if step == 1:
                model[2].weight.grad.view(-1)[0] = math.nan
            if how == "GradClipper":
                finite = bool(clipper(ddp, optimizer=opt).finite)
            else:
                finite = bool(torch.isfinite(dist_clip.clip_grad_norm_(ddp, 0.5, optimizer=opt)))
            assert finite == (step != 1)
            opt.step()
            opt.zero_grad()
        stepping = opt.optim.optim if wrapper == "post_local_sgd over zero" else opt.optim
        state = [v.clone() for s in stepping.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        finals.append([q.detach().clone() for q in model.parameters()] + state)
    assert all(bool(t.isfinite().all()) for t in finals[1]), "NaN stepped"
    assert _same(finals[0], finals[1]), "the skipped step changed parameters or the inner optimizer's state"
    return {}


def case_torch_zero_before_its_local_optimizer() -> list[float]:
    """``ZeroRedundancyOptimizer(overlap_with_ddp=True)`` makes its ``.optim`` only once DDP's hook first runs:
    before that, ``clip_grad_norm_(..., optimizer=zero)`` raised AttributeError ('no attribute optim') since the
    hand-over learnt to reach a ZeRO wrapper's inner optimizer; it clips as with no hand-over now."""
    from torch import nn
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import dist_clip

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=0.1,
                                   overlap_with_ddp=True)
    assert not hasattr(zero, "optim")
    model(torch.randn(5, 4, generator=torch.Generator().manual_seed(dist.get_rank()))).square().sum().backward()
    grads = [q.grad.double().clone() for q in model.parameters()]
    want = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])))
    total = dist_clip.clip_grad_norm_(model.parameters(), 0.1, optimizer=zero)
    assert abs(total.item() - want) <= 1e-6 * want, (total.item(), want)
    for q, g in zip(model.parameters(), grads):
        torch.testing.assert_close(q.grad.double(), g * (0.1 / (want + 1e-6)), rtol=1e-6, atol=0)
    return [want]


# ------------------------------------------------------------------------------------------ AutoClip, ZClip

SPIKES = {4: 30.0}  # step -> loss multiplier: a gradient norm spike
STEPS = 6


def case_torch_zero_overlapped_with_ddp_is_refused(fused: bool) -> list[Any]:
    """``ZeroRedundancyOptimizer(overlap_with_ddp=True)`` under DDP's ``hook_with_zero_step`` steps inside the
    backward (its ``step()`` does nothing): a clip, a hand-over or a skip after the backward reaches no step. A NaN
    batch's "skipped" step left every parameter NaN, silently; each entry point refuses it now with a
    ``ValueError`` on every rank. (torch refuses the hook on gloo, which may hang, #62300: the check is bypassed for
    the hook's construction only; 2 ranks ran it without a hang.)"""
    from torch import nn
    from torch.distributed.algorithms.ddp_comm_hooks import ddp_zero_hook
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import dist_clip

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    ddp = nn.parallel.DistributedDataParallel(model)
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=0.1,
                                   overlap_with_ddp=True, fused=fused)
    real = ddp_zero_hook.dist.get_backend
    ddp_zero_hook.dist.get_backend = lambda *_: "nccl"
    try:
        hook = ddp_zero_hook.hook_with_zero_step(allreduce_hook, ddp, zero)
    finally:
        ddp_zero_hook.dist.get_backend = real
    ddp.register_comm_hook(None, hook)
    ps = list(model.parameters())  # (the DDP itself is refused too, for its hook: see tests/test_dist_core.py)
    calls = {
        "GradClipper": lambda: GradClipper(max_norm=0.5, on_nonfinite="skip")(ddp, optimizer=zero),
        "GradClipper per_group": lambda: GradClipper(max_norm=0.5, mode="per_group")(ddp, optimizer=zero),
        "clip_grad_norm_": lambda: dist_clip.clip_grad_norm_(ddp, 0.5, optimizer=zero),
        "GradClipper, the parameters": lambda: GradClipper(max_norm=0.5, on_nonfinite="skip")(ps, optimizer=zero),
        "clip_grad_norm_, the parameters": lambda: dist_clip.clip_grad_norm_(ps, 0.5, optimizer=zero),
        "skip_next_step_": lambda: skip_next_step_(zero, torch.tensor(True)),
        # without optimizer=: the DDP's hook (hook_with_zero_fn) alone tells that its step ran in the backward
        "clip_grad_norm_, the DDP alone": lambda: dist_clip.clip_grad_norm_(ddp, 0.5),
        "GradClipper, the DDP alone": lambda: GradClipper(max_norm=0.5)(ddp),
    }
    out: list[Any] = []
    for step in range(3):  # two warm-up iterations (DDP's buckets), then the hook steps in the backward
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * step + rank))
        (ddp(x).square().sum() * (math.nan if step == 2 else 1.0)).backward()
        if step < 2:
            assert "optim" not in zero.__dict__
            # warm-up: the hook does not step yet (no .optim), so a clip with the optimizer is not refused
            warm = dist_clip.clip_grad_norm_(ps, 1e9, optimizer=zero)
            assert bool(torch.isfinite(warm)), warm
            zero.zero_grad()
    out.append(all(bool(q.isfinite().all()) for q in model.parameters()))  # the hook stepped the NaN batch
    for name, call in calls.items():
        out.append((name, outcome(call, ValueError, lambda m: "reaches no step" in m
                                   and ("overlap_with_ddp=True" in m or "hook_with_zero_fn" in m))))
    return out


def case_torch_zero_dropped_nan_part(fused: bool) -> list[str]:
    """torch's ZeroRedundancyOptimizer, each rank's inner optimizer holding one head: a NaN in head 1 clipped
    and the batch dropped, then both heads clipped: rank 1's inner optimizer held no gradient when the skip was
    armed, and that empty record never looked replaced, so rank 1 skipped the good step rank 0 took."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.manual_seed(0)
    h1, h2 = torch.nn.Linear(4, 6), torch.nn.Linear(4, 6)
    ps = [*h1.parameters(), *h2.parameters()]
    opt = ZeroRedundancyOptimizer(ps, optimizer_class=torch.optim.Adam, lr=0.1, fused=fused)
    x = torch.randn(8, 4)
    clip = GradClipper(max_norm=1.0, on_nonfinite="skip")
    h1(x).square().sum().backward()
    h1.weight.grad[0, 0] = math.nan
    clip(h1, optimizer=opt)
    opt.zero_grad()  # the NaN batch is dropped
    (h1(x).square().sum() + h2(x).square().sum()).backward()
    assert bool(clip(ps, optimizer=opt).finite)
    before = [p.detach().clone() for p in ps]
    opt.step()
    return [n for n, b, p in zip(("h1.w", "h1.b", "h2.w", "h2.b"), before, ps) if not torch.equal(b, p)]


def _zero_over_ddp(wrapper: str) -> tuple[Any, ...]:
    """Heads h0 and h1 over an encoder, under DDP, stepped by a ZeRO wrapper (fairscale's OSS, ``wrapper="oss"``,
    else torch's ZeroRedundancyOptimizer) of fused Adam: (enc, h0, h1, the model, the DDP, the wrapper, the ids of
    the parameters this rank's partition steps)."""
    from torch import nn
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.manual_seed(0)
    enc, h0, h1 = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(5, 2)
    model = nn.ModuleDict({"enc": enc, "h0": h0, "h1": h1})
    ddp = nn.parallel.DistributedDataParallel(model)
    if wrapper == "oss":
        from fairscale.optim import OSS

        opt = OSS(model.parameters(), optim=torch.optim.Adam, lr=0.1, fused=True)
    else:
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=0.1, fused=True)
    mine = {id(q) for g in opt.optim.param_groups for q in g["params"]}
    return enc, h0, h1, model, ddp, opt, mine


def _zero_step_moved(opt: Any, model: Any, mine: set[int], step: int) -> bool:
    """``opt.step()`` then ``zero_grad()``: whether a parameter of this rank's partition (``mine``) moved; no
    parameter may be non-finite after it."""
    before = [q.detach().clone() for q in model.parameters()]
    opt.step()
    opt.zero_grad()
    assert all(bool(q.isfinite().all()) for q in model.parameters()), f"NaN stepped at {step}"
    return any(not torch.equal(b, q) for b, q in zip(before, model.parameters()) if id(q) in mine)


def case_zero_replaced_nan_agrees(wrapper: str, how: str) -> list[bool]:
    """A ZeRO wrapper over DDP (torch's ZeroRedundancyOptimizer, fairscale OSS): every rank holds every gradient,
    its inner optimizer steps a partition. A NaN in h0's weight on every rank (as DDP's all-reduce leaves one rank's
    NaN), clipped, every gradient then replaced out of place (``p.grad = p.grad + 0.01``), and h1 clipped again
    (``how="part"``: the DDP clipped, a call without a collective) or straight to the step of a hand-over (``how=
    "step"``: the OSS clipped, its partition handed over): the flag lasts where a replaced gradient is not finite,
    which each rank read in its own partition alone, so the rank not holding h0.weight dropped it and stepped while
    the other skipped. Each rank reports whether a parameter of its partition moved at each step."""
    import dist_clip

    rank = dist.get_rank()
    _, h0, h1, model, ddp, opt, mine = _zero_over_ddp(wrapper)
    clipper = GradClipper(max_norm=1.0, on_nonfinite="skip")
    moved = []
    for step in range(3):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * step + rank))
        z = torch.tanh(ddp.module["enc"](x))
        (h0(z).sum() + h1(z).square().sum()).backward()
        if step == 1:
            h0.weight.grad.view(-1)[0] = math.nan  # on every rank, as after DDP's all-reduce
        if how == "part":
            clipper(ddp, optimizer=opt)
        else:
            dist_clip.clip_grad_norm_(opt, 1.0, optimizer=opt)
        for q in model.parameters():
            q.grad = q.grad + 0.01
        if how == "part":
            clipper(h1, optimizer=opt)
        moved.append(_zero_step_moved(opt, model, mine, step))
    return moved


def case_zero_parts_nan_agrees(wrapper: str, flow: str) -> list[bool]:
    """A ZeRO wrapper over DDP clipped in parts, a NaN in one part on every rank (as DDP's all-reduce leaves it)
    whose parameters some rank's partition holds none of: that rank's call on the part measured nothing it steps,
    and its ledger entry, held by no gradient there, was decided by the ranks' verdict, which a DDP call has no
    all-reduce to carry. ``flow="aux"`` (OSS, 2 ranks: rank 1 holds all of h0): [h0] (NaN in h0.weight), [enc,
    h1], an auxiliary loss through h1, [h1] again, with ``GradClipper(on_nonfinite="skip")``: rank 0 dropped the
    flag and stepped, rank 1 skipped. ``flow="hand-over"`` (torch's ZeroRedundancyOptimizer, 3 ranks: rank 1 holds
    h0 alone): [enc, h1] (NaN in enc.weight) and [h0] handed over, every gradient replaced out of place, [h0]
    again: rank 1's second hand-over dropped the first call's flag and stepped, the others skipped. ``flow=
    "dropped"``: the whole clipped over the world with ``GradClipper(on_nonfinite="skip")`` and the wrapper as
    ``optimizer=``, a NaN batch armed, dropped (``zero_grad()`` to ``None``) and computed again, finite: the next
    call, combining over the world, decides the dropped batch's flag on the inner optimizer's ledger, whose arming
    optimizer is the wrapper (``_fused._armed_by``: read as another optimizer's, the flag lasted and the good step
    was skipped on every rank). Each rank reports whether a parameter of its partition moved at each step."""
    from torch import nn

    import dist_clip

    rank = dist.get_rank()
    enc, h0, h1, model, ddp, opt, mine = _zero_over_ddp(wrapper)
    clipper = GradClipper(max_norm=1.0, on_nonfinite="skip")

    def clip(*mods: nn.Module) -> None:
        ps = [q for m in mods for q in m.parameters()]
        if flow == "aux":
            clipper(ps, optimizer=opt)
        else:
            dist_clip.clip_grad_norm_(ps, 1.0, optimizer=opt)

    moved = []
    for step in range(3):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * step + rank))
        z = torch.tanh(ddp.module["enc"](x))
        (h0(z).sum() + h1(z).square().sum()).backward()
        if flow == "dropped":
            if step == 1:  # a NaN batch armed over the world, dropped, and computed again
                h0.weight.grad.view(-1)[0] = math.nan
                clipper(list(model.parameters()), optimizer=opt, group=dist.group.WORLD)
                opt.zero_grad(set_to_none=True)
                z = torch.tanh(ddp.module["enc"](x))
                (h0(z).sum() + h1(z).square().sum()).backward()
            clipper(list(model.parameters()), optimizer=opt, group=dist.group.WORLD)
        elif flow == "aux":
            if step == 1:
                h0.weight.grad.view(-1)[0] = math.nan  # on every rank, as after DDP's all-reduce
            clip(h0)
            clip(enc, h1)
            h1(torch.ones(1, 5)).sum().backward()
            clip(h1)
        else:
            if step == 1:
                enc.weight.grad.view(-1)[0] = math.nan
            clip(enc, h1)
            clip(h0)
            for q in model.parameters():
                q.grad = q.grad + 0.01
            clip(h0)
        moved.append(_zero_step_moved(opt, model, mine, step))
    return moved


def case_adaptive(wrapper: str) -> list:
    """For each threshold: ``STEPS`` steps of the wrapper against the float64 run clipped by the reference."""
    out = []
    for threshold in (AutoClip(percentile=25), ZClip(warmup_steps=3, max_norm=None, z_thresh=2.0)):
        ref = ds_cases.Reference()
        if wrapper == "zero2":
            engine, _ = _engine(2, "fp32")
        else:
            model, opt, target = fairscale_cases.build("oss_sdp")
        clipper = GradClipper(max_norm=threshold)
        zref = ZClipReference(threshold.alpha, threshold.z_thresh, threshold.max_norm, threshold.eps,
                              threshold.warmup_steps, threshold.clip_option, threshold.clip_factor,
                              threshold.skip_update_on_spike) if isinstance(threshold, ZClip) else None
        norms: list[float] = []
        got, want = [], []
        for step in range(STEPS):
            scale = SPIKES.get(step, 1.0)
            batches = [[ds_cases.batch(r, step, 0) for r in range(dist.get_world_size())]]
            grads = ref.grads(batches)
            for g in grads:
                g.mul_(scale)
            norm = reference_norm(grads, 2.0)
            norms.append(norm)
            if zref is None:
                thr = percentile_reference(norms, threshold.percentile)
                coef = autoclip_reference(norms, threshold.percentile, threshold.window)[-1]
            else:
                thr = zref.threshold(norm)
                coef = zref.step(norm)
            for g in grads:
                g.mul_(coef)
            ref.opt.step()
            if wrapper == "zero2":
                engine.backward(scale * ds_cases.loss_fn(engine(batches[0][dist.get_rank()])))
                result = _clip_once(clipper, engine)
                engine.step()
            else:
                _fs_backward(model, step, scale)
                result = _clip_once(clipper, target)
                opt.step()
            got.append((float(result.total_norm), float(result.max_norm), float(result.clip_coef)))
            want.append((norm, thr, coef))
            if zref is not None and zref.initialized:
                st = clipper.state_dict()["threshold"]
                assert float(st["mean"]) == pytest.approx(zref.mean, rel=1e-5), (step, st, zref.mean)
                assert float(st["var"]) == pytest.approx(zref.var, rel=1e-4), (step, st, zref.var)
        for (gn, gt, gc), (wn, wt, wc) in zip(got, want):
            assert gn == pytest.approx(wn, rel=2e-6), (threshold, got, want)
            assert gt == pytest.approx(wt, rel=1e-5), (threshold, got, want)
            assert gc == pytest.approx(wc, rel=1e-5), (threshold, got, want)
        assert any(c < 0.999 for _, _, c in want) and any(c > 0.999 for _, _, c in want), want
        final = (fairscale_cases.full_params("oss_sdp", model) if wrapper != "zero2"
                 else ds_cases.full_params(engine))
        ds_cases._params_close(final, ref.params(), 1e-5, 1e-6, f"{wrapper} {threshold} params")
        out.append(clipper.state_dict())
    return out


# ------------------------------------------------------------------------------------------------- the tests


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage,dtype", [(1, "fp32"), (2, "fp32"), (3, "fp32"), (1, "bf16")])
def test_deepspeed_policies(run_ranks, stage, dtype):
    names = [r["name"] for r in run_ranks(2, case_ds_policies, stage, dtype, timeout_s=TIMEOUT)]
    assert names[0] == names[1]


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_policy_acts_as_skip_with_offload(run_ranks, stage):
    assert run_ranks(2, case_ds_zero_policy_and_offload, stage, timeout_s=TIMEOUT) == [{False: 0, True: 1}] * 2


@pytest.mark.deepspeed
def test_deepspeed_stage0_skip_and_refusal(run_ranks):
    run_ranks(2, case_ds_stage0, timeout_s=TIMEOUT)


@pytest.mark.fairscale
@pytest.mark.parametrize("kind", ["oss_sdp", "fsdp"])
def test_fairscale_policies(run_ranks, kind):
    run_ranks(2, case_fs_policies, kind, timeout_s=TIMEOUT)


@pytest.mark.parametrize("fused", [False, True])
def test_torch_zero_redundancy_optimizer_skip(run_ranks, fused):
    run_ranks(2, case_torch_zero_skip, fused, timeout_s=TIMEOUT)


@pytest.mark.parametrize("wrapper", ["torch", pytest.param("oss", marks=pytest.mark.fairscale)])
def test_clip_grad_norm_with_a_zero_wrapper_over_a_fused_optimizer_skips(run_ranks, wrapper):
    run_ranks(2, case_torch_zero_skip, True, "clip_grad_norm_", wrapper, timeout_s=TIMEOUT)


@pytest.mark.parametrize("wrapper,how", [("torch", "part"),
                                         pytest.param("oss", "part", marks=pytest.mark.fairscale),
                                         pytest.param("oss", "step", marks=pytest.mark.fairscale)])
def test_a_zero_wrapper_s_replaced_nan_flag_is_kept_on_every_rank(run_ranks, wrapper, how):
    assert run_ranks(2, case_zero_replaced_nan_agrees, wrapper, how, timeout_s=TIMEOUT) == [[True, False, True]] * 2


@pytest.mark.parametrize("wrapper,flow,world", [pytest.param("oss", "aux", 2, marks=pytest.mark.fairscale),
                                               ("torch", "hand-over", 3), ("torch", "dropped", 2),
                                               pytest.param("oss", "dropped", 2, marks=pytest.mark.fairscale)])
def test_a_zero_wrapper_s_part_flag_is_kept_on_every_rank(run_ranks, wrapper, flow, world):
    got = run_ranks(world, case_zero_parts_nan_agrees, wrapper, flow, timeout_s=TIMEOUT)
    assert got == [[True, flow == "dropped", True]] * world


@pytest.mark.parametrize("wrapper", ["post_local_sgd", "post_local_sgd over zero"])
@pytest.mark.parametrize("fused", [False, True])
def test_post_local_sgd_optimizer_skip(run_ranks, fused, wrapper):
    run_ranks(2, case_torch_zero_skip, fused, "GradClipper", wrapper, timeout_s=TIMEOUT)


@pytest.mark.parametrize("wrapper", ["post_local_sgd", "post_local_sgd over zero"])
def test_clip_grad_norm_with_a_post_local_sgd_optimizer_over_a_fused_optimizer_skips(run_ranks, wrapper):
    run_ranks(2, case_torch_zero_skip, True, "clip_grad_norm_", wrapper, timeout_s=TIMEOUT)


def test_a_zero_wrapper_before_its_local_optimizer_exists_is_a_plain_optimizer_for_the_hand_over(run_ranks):
    norms = run_ranks(2, case_torch_zero_before_its_local_optimizer, timeout_s=TIMEOUT)
    assert norms[0] != norms[1], norms  # each rank its own parameters' gradients (no group=)


@pytest.mark.parametrize("fused", [False, True])
def test_torch_zero_overlapped_with_ddp_is_refused_once_it_steps_in_the_backward(run_ranks, fused):
    want = [False, *((name, True) for name in ("GradClipper", "GradClipper per_group", "clip_grad_norm_",
                                                "GradClipper, the parameters", "clip_grad_norm_, the parameters",
                                                "skip_next_step_", "clip_grad_norm_, the DDP alone",
                                                "GradClipper, the DDP alone"))]
    assert run_ranks(2, case_torch_zero_overlapped_with_ddp_is_refused, fused, timeout_s=TIMEOUT) == [want, want]


@pytest.mark.parametrize("fused", [False, True])
def test_torch_zero_redundancy_optimizer_dropped_nan_part(run_ranks, fused):
    assert run_ranks(2, case_torch_zero_dropped_nan_part, fused, timeout_s=TIMEOUT) == [
        ["h1.w", "h1.b", "h2.w", "h2.b"]] * 2


@pytest.mark.parametrize("wrapper", [pytest.param("zero2", marks=pytest.mark.deepspeed),
                                     pytest.param("oss_sdp", marks=pytest.mark.fairscale)])
def test_adaptive_thresholds_match_references(run_ranks, wrapper):
    states = run_ranks(2, case_adaptive, wrapper, timeout_s=TIMEOUT)
    assert _same_state(states[0], states[1]), "adaptive state differs across ranks"
