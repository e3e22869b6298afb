"""Rank-side bodies of tests/test_random_models.py: small models of random widths, wrapped at random (FSDP2, HSDP,
FSDP1) or handed to DeepSpeed ZeRO 1-3.

Widths of 1-9 give every kind of shard the hand-made cases give one at a time: uneven rows, empty pieces on
some ranks, parameters smaller than the world, FSDP1 padding. Each model is drawn from a fixed seed (the same on
every rank), so a failure names its trial and replays. The reference is the float64 unsharded model fed every
rank's batch, its gradients averaged over the ranks as the wrappers average them; every check is against it:
the total and per-parameter norms for p in {0, 1, 2, 3.5, inf}, AGC's per-parameter norms, and the clipped
gradients.
"""

from __future__ import annotations

import copy
import math
import random
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import dist_clip
from dist_clip import AGC, ClipperConfig, GradClipper
from dist_clip.testing import reference_norm
from tests.fsdp_cases import mesh

ORDERS = (0.0, 1.0, 2.0, 3.5, math.inf)
RTOL = 1e-5  # fp32 gradients of a sharded model against the float64 reference


class Layer(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


def _draw(trial: int) -> tuple[random.Random, list[int], nn.Sequential]:
    rnd = random.Random(trial)
    widths = [rnd.randint(1, 9) for _ in range(rnd.randint(2, 5))]
    torch.manual_seed(trial)
    model = nn.Sequential(*[Layer(a, b, rnd.random() < 0.7) for a, b in zip(widths, widths[1:])])
    if len(model) > 1 and rnd.random() < 0.3:
        for q in model[0].parameters():
            q.requires_grad_(False)  # a frozen layer: parameters without gradients anywhere
    return rnd, widths, model


def _batch(rank: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(3, width, generator=torch.Generator().manual_seed(100 + rank)).to(dtype)


def _reference(model: nn.Module, width: int) -> dict[str, torch.Tensor]:
    ws = dist.get_world_size()
    ref = copy.deepcopy(model).double()
    for r in range(ws):
        (ref(_batch(r, width, torch.float64)).pow(2).sum() / ws).backward()
    return {n: q.grad.detach().clone() for n, q in ref.named_parameters() if q.grad is not None}


def _close(got: float, want: float) -> bool:
    return got == want if want == 0 else abs(got - want) <= RTOL * want


def _check_norms(target: nn.Module, grads: dict[str, torch.Tensor], where: str, agc: bool = True,
                 group: dist.ProcessGroup | None = None, orders: tuple[float, ...] = ORDERS) -> list[str]:
    errors = []
    for p in orders:
        want = reference_norm(list(grads.values()), p) if grads else 0.0
        got = dist_clip.get_total_norm(target, p, group=group).item()
        if not _close(got, want):
            errors.append(f"{where} p={p}: total {got} != {want}")
        modes = [("per_param", ClipperConfig(max_norm=1e9, norm_type=p, mode="per_param", report=True))]
        if agc and p > 0:
            modes.append(("unitwise", ClipperConfig(agc=AGC(clipping=1e9), norm_type=p, mode="unitwise", report=True)))
        for mode, cfg in modes:
            norms = GradClipper(cfg)(target, group=group).norms
            if set(norms) != set(grads):
                errors.append(f"{where} p={p} {mode}: names {sorted(norms)} != {sorted(grads)}")
                continue
            errors += [f"{where} p={p} {mode}: {n} {norms[n]} != {w}" for n, g in grads.items()
                       if not _close(norms[n], w := reference_norm([g], p))]
    return errors


def _clip_coef(grads: dict[str, torch.Tensor]) -> tuple[float, float]:
    total = reference_norm(list(grads.values()), 2.0) if grads else 0.0
    max_norm = 0.5 * total if total else 1.0
    return max_norm, min(1.0, max_norm / (total + 1e-6))


def _check_clipped(target: Any, grads: dict[str, torch.Tensor], where: str,
                   group: dist.ProcessGroup | None = None) -> list[str]:
    """Clip ``target`` at half the reference norm, then measure it again: the total and per-parameter norms of
    what the wrapper holds must be the reference's times the coefficient (where the clipped gradients cannot be
    gathered: FSDP1's flat parameters, mixed strategies, ZeRO partitions; a piece clipped as a copy, or not at
    all, passed before). The norms themselves were checked against the reference first."""
    max_norm, coef = _clip_coef(grads)
    dist_clip.clip_grad_norm_(target, max_norm, group=group)
    return _check_norms(target, {n: g * coef for n, g in grads.items()}, f"{where} clipped", agc=False, group=group)


def fsdp2_models(trials: int, hsdp: bool) -> list[str]:
    """FSDP2 on a 1-D mesh (or a 2 x (world/2) HSDP mesh): every layer sharded or not at random, the root sharded
    or not (then its unsharded parameters are averaged by hand, as a user must)."""
    from torch.distributed.fsdp import fully_shard

    rank, ws = dist.get_rank(), dist.get_world_size()
    m = mesh((2, ws // 2), ("replicate", "shard")) if hsdp else mesh((ws,))
    errors: list[str] = []
    for trial in range(trials):
        rnd, widths, model = _draw(trial)
        grads = _reference(model, widths[0])
        for layer in model:
            if rnd.random() < 0.8:
                fully_shard(layer, mesh=m)
        if rnd.random() < 0.6:
            fully_shard(model, mesh=m)
        model(_batch(rank, widths[0])).pow(2).sum().backward()
        for q in model.parameters():
            if q.grad is not None and type(q.grad).__name__ != "DTensor":
                dist.all_reduce(q.grad)
                q.grad.div_(ws)
        where = f"trial {trial} widths {widths}"
        errors += _check_norms(model, grads, where)
        max_norm, coef = _clip_coef(grads)
        dist_clip.clip_grad_norm_(model, max_norm)
        for n, q in model.named_parameters():
            if q.grad is not None:
                g = q.grad.full_tensor() if type(q.grad).__name__ == "DTensor" else q.grad
                if not torch.allclose(g.double(), grads[n] * coef, rtol=RTOL, atol=1e-7):
                    errors.append(f"{where}: clipped {n}")
    return errors


def fsdp1_models(trials: int) -> list[str]:
    """FSDP1: an instance per layer (or one for the whole model) at random, each sharding strategy with flat
    parameters and with use_orig_params in turn. Clipped gradients are gathered with ``summon_full_params``
    where FSDP1 allows it (use_orig_params), and measured again against the reference's times the coefficient
    elsewhere."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    rank = dist.get_rank()
    errors: list[str] = []
    for trial in range(trials):
        rnd, widths, model = _draw(1000 + trial)
        grads = _reference(model, widths[0])
        # Over six trials each strategy with flat parameters and with use_orig_params (drawn, NO_SHARD and two of
        # the flat ones never came); frozen layers need use_orig_params.
        orig = trial % 2 == 0 or not all(q.requires_grad for q in model.parameters())
        strategy = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")[trial % 3]
        policy = ModuleWrapPolicy({Layer}) if rnd.random() < 0.7 else None
        wrapped = FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=orig,
                                           sharding_strategy=getattr(ShardingStrategy, strategy),
                                           device_id=torch.device("cpu"))
        wrapped(_batch(rank, widths[0])).pow(2).sum().backward()
        where = f"trial {trial} widths {widths} {strategy} use_orig_params={orig}"
        errors += _check_norms(wrapped, grads, where)
        if not orig:  # flat parameters: no gathering of gradients
            errors += _check_clipped(wrapped, grads, where)
            continue
        max_norm, coef = _clip_coef(grads)
        dist_clip.clip_grad_norm_(wrapped, max_norm)
        with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
            for n, q in wrapped.named_parameters():
                n = n.replace("_fsdp_wrapped_module.", "")
                # (a frozen parameter sharing a flat parameter with trainable ones gets a zero .grad inside
                # summon_full_params: no gradient in the reference, a KeyError on trials 11, 40, 46 and 56)
                if q.requires_grad and q.grad is not None and not torch.allclose(
                        q.grad.double(), grads[n] * coef, rtol=RTOL, atol=1e-7):
                    errors.append(f"{where}: clipped {n}")
    return errors


def fsdp1_mixed_models(trials: int) -> list[str]:
    """FSDP1 on 4 ranks: every layer its own instance under a plain root, each with a strategy drawn from hybrid
    (2 x 2 device mesh), full sharding and no sharding, or one hybrid instance for the whole model; measured with
    and without ``group=``, so that hybrid replicas must count once whether a call reduces over their shard
    group or the world. A last layer of 1 x 1 leaves ranks whose shard of it is padding only."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    rank = dist.get_rank()
    m = mesh((2, dist.get_world_size() // 2), ("replicate", "shard"))
    errors: list[str] = []
    for trial in range(trials):
        rnd, widths, model = _draw(3000 + trial)
        model.append(Layer(widths[-1], 1, True))
        model.append(Layer(1, 1, False))
        grads = _reference(model, widths[0])
        chosen = []
        if rnd.random() < 0.25:
            chosen.append("whole model HYBRID_SHARD")
            model = FullyShardedDataParallel(model, sharding_strategy=ShardingStrategy.HYBRID_SHARD,
                                             device_mesh=m, use_orig_params=True, device_id=torch.device("cpu"))
        else:
            for i, layer in enumerate(model):
                strategy = rnd.choice(["HYBRID_SHARD", "_HYBRID_SHARD_ZERO2", "FULL_SHARD", "NO_SHARD"])
                orig = rnd.random() < 0.5
                chosen.append(f"{strategy}{'/orig' if orig else ''}")
                kwargs = {"device_mesh": m} if "HYBRID" in strategy else {}
                model[i] = FullyShardedDataParallel(layer, sharding_strategy=getattr(ShardingStrategy, strategy),
                                                    use_orig_params=orig, device_id=torch.device("cpu"), **kwargs)
        model(_batch(rank, widths[0])).pow(2).sum().backward()
        for group in (None, dist.group.WORLD):
            where = f"trial {trial} widths {widths} {chosen} group={'world' if group else None}"
            errors += _check_norms(model, grads, where, group=group)
        errors += _check_clipped(model, grads, f"trial {trial} widths {widths} {chosen}", group=dist.group.WORLD)
    return errors


def deepspeed_models(trials: int) -> list[str]:
    """DeepSpeed ZeRO 1-3 engines (fp32, SGD) around the same random models: partitions of every shape, the
    total and per-parameter norms against the float64 model fed every rank's batch, averaged."""
    import contextlib
    import io

    from tests import ds_cases

    deepspeed = ds_cases._quiet()
    rank = dist.get_rank()
    errors: list[str] = []
    for trial in range(trials):
        for stage in (1, 2, 3):
            _, widths, model = _draw(2000 + trial)
            grads = _reference(model, widths[0])
            cfg = ds_cases.ds_config(stage)
            cfg["train_micro_batch_size_per_gpu"] = 3
            opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.0)
            with contextlib.redirect_stdout(io.StringIO()):
                engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
            engine.backward(engine(_batch(rank, widths[0])).pow(2).sum())
            errors += _check_norms(engine, grads, f"trial {trial} widths {widths} ZeRO-{stage}", agc=False)
            errors += _check_clipped(engine, grads, f"trial {trial} widths {widths} ZeRO-{stage}")
            engine.step()
    return errors


def _fairscale_wrap(rnd: random.Random, model: nn.Sequential, kind: str, low: bool) -> tuple[Any, str, Any]:
    """(target, description, module to run) for a wrapping: OSS under ShardedDataParallel (either reduce buffer)
    or torch DDP, or fairscale FSDP (flat or not, nested per layer or not, reshard_after_forward or not, mixed
    precision where ``low``)."""
    from fairscale.optim import OSS

    trainable = [q for q in model.parameters() if q.requires_grad]
    cut = rnd.randint(1, len(trainable) - 1) if len(trainable) > 1 and rnd.random() < 0.5 else len(trainable)
    groups = [{"params": trainable[:cut], "max_norm": 1.0}] + (
        [{"params": trainable[cut:], "max_norm": 1.0}] if cut < len(trainable) else [])
    if kind == "oss_sdp":
        from fairscale.nn.data_parallel import ShardedDataParallel

        buffer = rnd.choice((0, 2**23))
        opt = OSS(groups, optim=torch.optim.SGD, lr=0.0)
        sdp = ShardedDataParallel(model, opt, reduce_buffer_size=buffer)
        return sdp, f"oss_sdp buffer={buffer} groups cut at {cut}", (sdp, opt)
    if kind == "oss_ddp":
        from torch.nn.parallel import DistributedDataParallel

        opt = OSS(groups, optim=torch.optim.SGD, lr=0.0)
        return opt, f"oss_ddp groups cut at {cut}", (DistributedDataParallel(model), opt)
    from fairscale.nn import FullyShardedDataParallel as FSDP

    kw = dict(compute_device=torch.device("cpu"), flatten_parameters=rnd.random() < 0.6,
              reshard_after_forward=rnd.random() < 0.5, mixed_precision=low)
    nested = []
    for i, layer in enumerate(model):
        frozen = not all(q.requires_grad for q in layer.parameters())
        if rnd.random() < 0.5 or (frozen and kw["flatten_parameters"]):  # (fairscale flattens one requires_grad)
            model[i] = FSDP(layer, **kw)
            nested.append(i)
    root = FSDP(model, **kw)
    return root, f"fsdp {kw} nested {nested}", (root, None)


def fairscale_models(seeds: list[int]) -> list[str]:
    """fairscale around the random models on any number of ranks: OSS with ShardedDataParallel or DDP, FSDP flat
    or not, nested or not, with mixed precision (fp16 compute) or not; OSS also with bf16 gradients. Totals,
    per-parameter and AGC norms (OSS passed as the target names them "group0.param{i}"), the clipped gradients
    measured again, and a NaN batch on one rank under ``error_if_nonfinite``."""
    global RTOL
    from tests.fairscale_cases import cpu_stream_shim

    rank = dist.get_rank()
    errors: list[str] = []
    with cpu_stream_shim():
        for seed in seeds:
            rnd, widths, model = _draw(4000 + seed)
            kind = rnd.choice(["oss_sdp", "oss_ddp", "fsdp", "fsdp"])
            low = rnd.random() < 0.25
            dtype = torch.bfloat16 if low and kind != "fsdp" else torch.float32
            model = model.to(dtype)
            grads = _reference(model, widths[0])
            target, what, (module, opt) = _fairscale_wrap(rnd, model, kind, low)
            where = f"seed {seed} widths {widths} {what} {dtype}"
            saved = RTOL
            # bf16 compute against the float64 model: about 1% apart, and p = 0 counts the zeros rounding makes
            RTOL = 5e-2 if low else 1e-5
            try:
                module(_batch(rank, widths[0], dtype)).float().pow(2).sum().backward()
                want = grads
                if opt is not None:  # OSS's groups: the parameters' names under each
                    by_id = {id(q): n for n, q in model.named_parameters()}
                    in_group = [[by_id[id(q)] for q in g["params"]] for g in opt.param_groups]
                if kind == "oss_ddp":  # DDP's reduced gradients, whole on every rank, are the exact reference
                    want = {f"group{g}.param{i}": model.get_parameter(n).grad.double()
                            for g, names in enumerate(in_group) for i, n in enumerate(names)}
                    in_group = [[f"group{g}.param{i}" for i in range(len(names))] for g, names in enumerate(in_group)]
                    RTOL = 1e-5
                orders = ORDERS[1:] if RTOL > 1e-5 else ORDERS
                errors += _check_norms(target, want, where, orders=orders)
                if opt is not None:  # per_group: each group against its own limit, half its reference norm
                    pg = rnd.choice(orders)
                    gnorms = [reference_norm([want[n] for n in names], pg) for names in in_group]
                    for g, w in zip(opt.param_groups, gnorms):
                        g["max_norm"] = 0.5 * w if w else 1.0
                    res = GradClipper(mode="per_group", norm_type=pg)(target, optimizer=opt)
                    coefs = [min(1.0, g["max_norm"] / (w + 1e-6)) for g, w in zip(opt.param_groups, gnorms)]
                    got = res.clip_coef.reshape(-1).tolist()
                    if len(got) != len(coefs) or not all(_close(a, b) for a, b in zip(got, coefs)):
                        errors.append(f"{where} per_group p={pg}: coefs {got} != {coefs}")
                    want = {n: g * coefs[k] for k, names in enumerate(in_group) for n in names
                            for g in (want[n],)}
                    errors += _check_norms(target, want, f"{where} per_group clipped", agc=False, orders=orders)
                foreach = rnd.choice((None, False))
                max_norm, coef = _clip_coef(want)
                dist_clip.clip_grad_norm_(target, max_norm, foreach=foreach)
                errors += _check_norms(target, {n: g * coef for n, g in want.items()}, f"{where} clipped", agc=False,
                                       orders=ORDERS[1:] if RTOL > 1e-5 else ORDERS)
                module.zero_grad()  # a NaN batch on one rank: every rank raises
                bad = rnd.randrange(dist.get_world_size())
                x = _batch(rank, widths[0], dtype)
                if rank == bad:
                    x[0, 0] = math.nan
                module(x).float().pow(2).sum().backward()
                try:
                    dist_clip.clip_grad_norm_(target, 1.0, error_if_nonfinite=True)
                    if want:
                        errors.append(f"{where}: NaN batch on rank {bad} not refused")
                except RuntimeError:
                    pass
            except Exception as e:
                import traceback

                raise RuntimeError(f"{where}: {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}") from e
            finally:
                RTOL = saved
    return errors
