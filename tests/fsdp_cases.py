"""Rank-side bodies of tests/test_fsdp.py: build a model, wrap it, backward, then check dist_clip three ways.

Every body runs on all ranks of a reused gloo pool. It builds its model from a fixed seed, keeps a float64
deep copy as the unsharded reference, and feeds rank ``r`` the batch of "data rank" ``data_ranks[r]``; the
reference loss is the mean of those per-rank losses, which is what FSDP's gradient averaging computes. Then,
for every norm order p (looping here, so one spawned call covers them all), starting each time from the same
gradients and parameters:

1. ``dist_clip.clip_grad_norm_`` / ``get_total_norm``: a plain float32 0-dim tensor equal to the float64
   reference, exactly one collective (none where every gradient is replicated);
2. the clipped gradients, gathered, against the reference gradients times the reference coefficient, and the
   parameters after one SGD step against the reference model stepped the same way;
3. the wrapper's own clipping (FSDP1 ``clip_grad_norm_``, torch's ``clip_grad_norm_`` on DTensors): its
   norm, whether its clipped gradients are right, and its collective count, reported to the test, which
   knows the cases where the wrapper is wrong.

Device meshes are cached per process: creating process groups is collective and slow, and every rank of a
pool runs the same tests in the same order, so a cached mesh is the same on all of them.
"""

from __future__ import annotations

import copy
import gc
import itertools
import math
import os
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import dist_clip
from dist_clip.testing import count_collectives, reference_agc_, reference_norm, reference_param_norms
from tests._harness import outcome

PS = (0.0, 1.0, 2.0, 3.5, math.inf)
LR = 0.1
RTOL = 1e-5  # fp32 gradients against the float64 reference
ATOL = 1e-6  # gradients here are O(0.1-1): fp32 rounding of the averaged gradients stays far below this
# bf16 keeps 8 significant bits: one rounding is off by at most u = 2**-8 relative. A bf16 gradient scaled in
# bf16 sees one rounding; a bf16 parameter stepped in bf16 sees two (the scaled gradient, then the update), so
# 2u = 2**-7 relative, plus lr * u * |clipped grad| <= 0.1 * 2**-8 * 1.4 = 5.5e-4 absolute where the update
# brings a parameter near zero: 1e-3.
BF16_RTOL, BF16_ATOL = 2.0**-7, 1e-3
# bf16 *compute* (MixedPrecisionPolicy(param_dtype=bf16)) against the fp32 model: every matmul input and output
# is rounded to bf16 (u = 2**-8 = 3.9e-3) and the layers compound several such roundings per gradient entry,
# partly cancelling in the norm. Measured on 2 and 3 ranks, all p: at most 4.1e-3 (about 1 u) for the norms, so
# 1e-2 (2.5 u). A single entry's error is about u times the terms summed into it (activations times upstream
# gradients, up to about 1 here), not u times the entry, which may be small: measured up to 3.1e-3 absolute
# (13% of a small entry), so 5e-3 absolute beside 5e-2 relative.
BF16_MODEL_NORM_RTOL = 1e-2
BF16_MODEL_GRAD_RTOL, BF16_MODEL_GRAD_ATOL = 5e-2, 5e-3

_MESHES: dict[tuple[Any, ...], Any] = {}


def mesh(shape: tuple[int, ...], names: tuple[str, ...] | None = None):  # noqa: ANN201
    """A cached CPU device mesh (one per shape and names per rank process)."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (shape, names)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh("cpu", shape, mesh_dim_names=names)
    return _MESHES[key]


# --------------------------------------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(x))


class Net(nn.Module):
    """Uneven and tiny parameters on purpose.

    ``inp.weight`` is 7x13 (rows 4,3 over 2 ranks; 3,3,1 over 3; 2,2,2,1 over 4); ``head`` has one output row, so
    its Shard(0) pieces are empty on every rank but the first; ``scale`` has two entries (empty on ranks >= 2);
    ``side`` is left unsharded by the FSDP2 cases that do not shard the root, and ignored by FSDP1. ``wide=True``
    gives every parameter at least 7 rows, so that no rank of 2, 3 or 4 holds an empty shard.
    """

    def __init__(self, wide: bool = False) -> None:
        super().__init__()
        self.wide = wide
        d, out = (12, 12) if wide else (5, 1)
        self.inp = nn.Linear(13, 7)
        self.blocks = nn.ModuleList([Block(7, 7), Block(7, d)])
        self.head = nn.Linear(d, out)
        self.scale = nn.Parameter(torch.linspace(1.5, -0.25, 12 if wide else 2))
        self.side = nn.Linear(13, out)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = block(h)
        if self.wide:
            # Weighted, so that side's rows have different gradients and the largest is on one rank only.
            weights = torch.linspace(0.2, 2.0, self.scale.numel(), dtype=x.dtype)
            return (self.head(h) * self.scale + self.side(x) * weights).mean(-1, keepdim=True)
        return self.head(h) * self.scale[0] + self.scale[1] + self.side(x)


def batch(data_rank: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1234 + data_rank)
    return torch.randn(6, 13, generator=g).to(dtype), torch.randn(6, 1, generator=g).to(dtype)


def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    out = model(x)
    return (out.float() - y.float()).pow(2).mean()


def new_model(seed: int = 0, wide: bool = False) -> Net:
    torch.manual_seed(seed)
    return Net(wide)


@dataclass
class Reference:
    """The unsharded model in float64 after backward on the mean of every rank's loss."""

    params: dict[str, Tensor]
    grads: dict[str, Tensor]


def reference(model: nn.Module, data_ranks: list[int]) -> Reference:
    ref = copy.deepcopy(model).double()
    loss = sum(loss_fn(ref, *batch(d, torch.float64)) for d in data_ranks) / len(data_ranks)
    loss.backward()
    return Reference(
        {n: p.detach().clone() for n, p in ref.named_parameters()},
        {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.grad is not None},  # frozen: none
    )


def average_grads_(params: list[nn.Parameter]) -> None:
    """What a user must do for parameters no wrapper averages (FSDP1 ignored, FSDP2 left unsharded)."""
    ws = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(ws)


# -------------------------------------------------------------------------------------------------- checks


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "_local_tensor") and hasattr(t, "placements")


def _local(t: Tensor) -> Tensor:
    return t._local_tensor if _is_dtensor(t) else t


def _clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def _close(actual: Tensor, expected: Tensor, rtol: float, atol: float, what: str) -> None:
    actual = actual.detach().to(torch.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _norm_close(value: float, expected: float, rtol: float) -> bool:
    if math.isnan(expected) or math.isnan(value):
        return math.isnan(expected) and math.isnan(value)
    return abs(value - expected) <= rtol * abs(expected) + 1e-12


@dataclass
class Case:
    """How one wrapped model is driven and observed; the bodies below fill it in."""

    model: nn.Module
    ref: Reference
    gather_grads: Callable[[], dict[str, Tensor]]
    gather_params: Callable[[], dict[str, Tensor]]
    wrapper_clip: Callable[[float, float], Tensor] | None
    # Checks the clipped local gradients directly where they cannot be gathered (FSDP1 flat shards).
    check_local_grads: Callable[[dict[str, Tensor], float, float, str], None] | None = None
    # Overwrites FSDP1's padding after every restore: nothing in it may count or be scaled as gradient.
    poison: Callable[[], None] | None = None
    expected_collectives: int = 1
    # torch's inf norm raises on an empty tensor ("does not have an identity"): a wrapper built on it raises on
    # the ranks holding an empty shard while the others block in its collective until the gloo timeout.
    wrapper_raises_on_empty_inf: bool = False
    grad_rtol: float = RTOL
    grad_atol: float = ATOL
    # For bf16 compute: the fp32 model, whose gradients are compared at the bf16 tolerances.
    model_ref: Reference | None = None
    # HSDP / HYBRID_SHARD: this rank's shard group, passed as group= it must give the same total on every
    # replica (the replicas it does not reach read 0 once).
    shard_group: Any = None
    # Collectives of group=WORLD: DDP takes its replicas as they are under any group= (none).
    world_collectives: int = 1
    notes: dict[str, Any] = field(default_factory=dict)


def _snapshot(model: nn.Module) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
    grads, data = [], []
    for p in model.parameters():
        data.append((_local(p), _local(p).detach().clone()))
        if p.grad is not None:
            grads.append((_local(p.grad), _local(p.grad).clone()))
    return grads, data


def _restore(snap: tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]) -> None:
    with torch.no_grad():
        for live, saved in snap[0] + snap[1]:
            live.copy_(saved)


def _check_grads(case: Case, expected: dict[str, Tensor], rtol: float, atol: float, what: str) -> None:
    if case.check_local_grads is not None:
        case.check_local_grads(expected, rtol, atol, what)
        return
    full = case.gather_grads()
    if set(full) != set(expected):
        raise AssertionError(f"{what}: gradients of {sorted(full)} != reference {sorted(expected)}")
    for n, g in full.items():
        _close(g, expected[n], rtol, atol, f"{what} {n}")


def _scalar(total: Tensor) -> tuple[float, float]:
    """(value, rank-local value) of a norm the wrapper returned: a DTensor's local value may differ."""
    if _is_dtensor(total):
        return float(total.full_tensor()), float(total.to_local())
    return float(total), float(total)


EMPTY_INF = "not called: some rank holds an empty shard, where the inf norm raises and the other ranks hang"


def _some_rank_has_empty_grad(model: nn.Module) -> bool:
    flag = torch.tensor(
        [float(any(_local(p.grad).numel() == 0 for p in model.parameters() if p.grad is not None))]
    )
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def run_case(case: Case) -> dict[float, dict[str, Any]]:
    """The three-way check for every p; raises on any dist_clip mismatch, returns what the test reports."""
    model, ref = case.model, case.ref
    snap = _snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out: dict[float, dict[str, Any]] = {}
    for p in PS:
        ref_norm = reference_norm(list(ref.grads.values()), p)
        max_norm = ref_norm / 2  # always clips: the coefficient is about 1/2
        coef = min(1.0, max_norm / (ref_norm + 1e-6))
        clipped = {n: g * coef for n, g in ref.grads.items()}
        stepped = {n: ref.params[n] - LR * clipped[n] for n in ref.params}
        what = f"p={p}"

        # 1. dist_clip: norm and collectives.
        _restore(snap)
        if case.poison is not None:
            case.poison()
        with count_collectives() as counted:
            total = dist_clip.clip_grad_norm_(model, max_norm, p)
        if type(total) is not torch.Tensor or total.dtype != torch.float32 or total.dim() != 0:
            raise AssertionError(f"{what}: expected a plain 0-dim float32 tensor, got {type(total).__name__} {total!r}")
        ours = float(total)
        if not _norm_close(ours, ref_norm, RTOL):
            raise AssertionError(f"{what}: dist_clip norm {ours!r} != float64 reference {ref_norm!r}")
        if counted.total != case.expected_collectives:
            raise AssertionError(
                f"{what}: dist_clip issued {counted.names}, expected {case.expected_collectives} collective(s)"
            )
        model_norm = None
        if case.model_ref is not None:
            model_norm = reference_norm(list(case.model_ref.grads.values()), p)
            if not _norm_close(ours, model_norm, BF16_MODEL_NORM_RTOL):
                raise AssertionError(f"{what}: norm {ours} vs fp32 model {model_norm}: beyond the bf16 tolerance")

        # 2. clipped gradients, then parameters after one SGD step.
        _check_grads(case, clipped, case.grad_rtol, case.grad_atol, f"{what} clipped grad")
        if case.model_ref is not None and p == 2.0:
            model_ref = case.model_ref
            model_clipped = {n: g * min(1.0, max_norm / (ref_norm + 1e-6)) for n, g in model_ref.grads.items()}
            _check_grads(case, model_clipped, BF16_MODEL_GRAD_RTOL, BF16_MODEL_GRAD_ATOL, f"{what} vs fp32 model")
        opt.step()
        params = case.gather_params()
        for n, value in params.items():
            _close(value, stepped[n], case.grad_rtol, case.grad_atol, f"{what} param after step {n}")

        # get_total_norm: same value, one collective, nothing scaled.
        _restore(snap)
        if case.poison is not None:
            case.poison()
        with count_collectives() as counted_norm:
            again = dist_clip.get_total_norm(model, p)
        if type(again) is not torch.Tensor or not _norm_close(float(again), ref_norm, RTOL):
            raise AssertionError(f"{what}: get_total_norm gave {again!r}, reference {ref_norm}")
        if counted_norm.total != case.expected_collectives:
            raise AssertionError(f"{what}: get_total_norm issued {counted_norm.names}")

        # 3. the wrapper's own clipping, from the same (unpoisoned) gradients.
        _restore(snap)
        entry: dict[str, Any] = {"ours": ours, "ref": ref_norm, "count": counted.total}
        entry["grad_tensors"] = sum(1 for q in model.parameters() if q.grad is not None)
        if model_norm is not None:
            entry["model_norm"] = model_norm
        # group= spanning every rank: the full plan (each piece counted on one replica), same answer. Sibling
        # slices of a sliced mesh that the rank's other gradients span hold copies (counted once), as here.
        with count_collectives() as counted_world:
            world_total = dist_clip.get_total_norm(model, p, group=dist.group.WORLD)
        if not _norm_close(float(world_total), ref_norm, RTOL) or counted_world.total != case.world_collectives:
            raise AssertionError(
                f"{what}: group=WORLD gave {float(world_total)} with {counted_world.names}, reference {ref_norm}"
            )
        if case.shard_group is not None:
            with count_collectives() as counted_shard:
                shard_total = dist_clip.get_total_norm(model, p, group=case.shard_group)
            if not _norm_close(float(shard_total), ref_norm, RTOL) or counted_shard.total != 1:
                raise AssertionError(
                    f"{what}: group=<shard group> gave {float(shard_total)} with {counted_shard.names}, "
                    f"reference {ref_norm}"
                )
        if case.wrapper_clip is None:
            out[p] = entry
            continue
        if math.isinf(p) and case.wrapper_raises_on_empty_inf and _some_rank_has_empty_grad(model):
            entry["wrapper_error"] = EMPTY_INF
            out[p] = entry
            continue
        try:
            with count_collectives() as wc:
                wtotal = case.wrapper_clip(max_norm, p)
            entry["wrapper_count"] = wc.total
            entry["wrapper"], entry["wrapper_local"] = _scalar(wtotal)
            entry["wrapper_returns"] = type(wtotal).__name__ + (
                f"{tuple(wtotal.placements)}" if _is_dtensor(wtotal) else ""
            )
            try:
                _check_grads(case, clipped, case.grad_rtol, case.grad_atol, f"{what} wrapper-clipped grad")
                entry["wrapper_grads_ok"] = True
            except AssertionError:
                entry["wrapper_grads_ok"] = False
        except Exception as e:  # noqa: BLE001 - reported: the test names the cases where the wrapper raises
            entry["wrapper_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        out[p] = entry
    _restore(snap)
    return out


# -------------------------------------------------------------------------------------------------- FSDP2


def _fsdp2_gatherers(model: nn.Module) -> tuple[Callable[[], dict[str, Tensor]], Callable[[], dict[str, Tensor]]]:
    def grads() -> dict[str, Tensor]:
        return {
            n: (p.grad.full_tensor() if _is_dtensor(p.grad) else p.grad).detach().double()
            for n, p in model.named_parameters()
            if p.grad is not None
        }

    def params() -> dict[str, Tensor]:
        return {n: (p.full_tensor() if _is_dtensor(p) else p).detach().double() for n, p in model.named_parameters()}

    return grads, params


def _torch_clip(model: nn.Module) -> Callable[[float, float], Tensor]:
    def clip(max_norm: float, p: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm, p)

    return clip


def _fsdp2_case(model: nn.Module, ref: Reference, **kw: Any) -> Case:
    grads, params = _fsdp2_gatherers(model)
    return Case(model, ref, grads, params, _torch_clip(model), wrapper_raises_on_empty_inf=True, **kw)


def fsdp2_1d(shard_root: bool, wide: bool = False) -> dict[str, Any]:
    """One 1-D mesh over the world; with ``shard_root=False``, ``scale`` and ``side`` stay plain tensors.

    ``wide=True``: no empty shards, so that torch's own clip can be called with p = inf too.
    """
    from torch.distributed.fsdp import fully_shard

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model(wide=wide)
    ref = reference(model, list(range(ws)))
    m = mesh((ws,))
    for module in (model.inp, *model.blocks, model.head):
        fully_shard(module, mesh=m)
    if shard_root:
        fully_shard(model, mesh=m)
    loss_fn(model, *batch(rank)).backward()
    average_grads_([p for p in model.parameters() if not _is_dtensor(p)])
    return {"per_p": run_case(_fsdp2_case(model, ref))}


def fsdp2_frozen_block() -> dict[str, Any]:
    """A frozen block under FSDP2: its DTensor parameters have no gradient, and must not be taken for gradients
    (a tensor that is neither a parameter nor requires grad is one), through the module and its parameters()."""
    from torch.distributed.fsdp import fully_shard

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model()
    model.blocks[0].requires_grad_(False)
    ref = reference(model, list(range(ws)))
    want = {p: reference_norm(list(ref.grads.values()), p) for p in (2.0, math.inf)}
    m = mesh((ws,))
    for module in (model.inp, *model.blocks, model.head):
        fully_shard(module, mesh=m)
    fully_shard(model, mesh=m)
    loss_fn(model, *batch(rank)).backward()
    assert all(q.grad is None for q in model.blocks[0].parameters())
    out = {}
    for p, w in want.items():
        for target in ("module", "parameters"):
            got = dist_clip.get_total_norm(model if target == "module" else list(model.parameters()), p).item()
            assert _norm_close(got, w, RTOL), (p, target, got, w)
            out[f"{target} {p}"] = got
    return out


def fsdp2_hsdp() -> dict[str, Any]:
    """HSDP on a 2x2 mesh (replicate x shard) of 4 ranks: replicas hold identical shards and count once."""
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    model = new_model()
    ref = reference(model, [0, 1, 2, 3])
    m = mesh((2, 2), ("replicate", "shard"))
    for module in (model.inp, *model.blocks, model.head, model):
        fully_shard(module, mesh=m)
    loss_fn(model, *batch(rank)).backward()
    return {"per_p": run_case(_fsdp2_case(model, ref, shard_group=m["shard"].get_group()))}


def fsdp2_mixed_meshes(plain_root: bool) -> dict[str, Any]:
    """Blocks on different meshes and sub-meshes in one model; ``plain_root``: the root's own parameters
    (``scale``, ``side``) left unsharded, else sharded on the 1-D mesh.

    * 2 ranks: ``inp``/``head`` on a 1-D mesh, block 0 on a 2x1 HSDP mesh (pure replication), block 1 on a
      1x2 mesh (a 2-D mesh whose replicate dim has one rank).
    * 3 ranks: 1-D mesh; block 0 on 3x1 HSDP; block 1 on the "replicate" slice of that 3x1 mesh, sharded 3 ways.
    * 4 ranks: 1-D mesh; block 0 on 2x2 HSDP; block 1 on the "shard" slice of that mesh: FSDP2 averages its
      gradients within each slice only, so ranks r and r+2 are fed the same batch (data rank r % 2) and the
      two slices hold identical copies, which must count once.
    """
    from torch.distributed.fsdp import fully_shard

    rank, ws = dist.get_rank(), dist.get_world_size()
    one_d = mesh((ws,))
    if ws == 2:
        hsdp, other, data_ranks = mesh((2, 1), ("replicate", "shard")), mesh((1, 2), ("replicate", "shard")), [0, 1]
    elif ws == 3:
        hsdp = mesh((3, 1), ("replicate", "shard"))
        other, data_ranks = hsdp["replicate"], [0, 1, 2]
    else:
        hsdp = mesh((2, 2), ("replicate", "shard"))
        other, data_ranks = hsdp["shard"], [0, 1, 0, 1]
    model = new_model()
    ref = reference(model, data_ranks)
    fully_shard(model.inp, mesh=one_d)
    fully_shard(model.blocks[0], mesh=hsdp)
    fully_shard(model.blocks[1], mesh=other)
    fully_shard(model.head, mesh=one_d)
    if not plain_root:
        fully_shard(model, mesh=one_d)
    loss_fn(model, *batch(data_ranks[rank])).backward()
    average_grads_([p for p in model.parameters() if not _is_dtensor(p)])
    return {"per_p": run_case(_fsdp2_case(model, ref))}


def fsdp2_mixed_precision(storage: str, reduce: str) -> dict[str, Any]:
    """``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=...)`` on a 1-D mesh, fp32 or bf16 storage.

    The exact reference is the float64 norm of the gradients FSDP2 produced (gathered): dist_clip must match
    it at fp32 precision whatever their dtype. The fp32 unsharded model is compared at the bf16 tolerances
    (see ``BF16_MODEL_*``). With bf16 storage the gradients and parameters are bf16 and are scaled and stepped
    in bf16: ``BF16_RTOL`` and ``BF16_ATOL``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    rank, ws = dist.get_rank(), dist.get_world_size()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    model = new_model()
    model_ref = reference(model, list(range(ws)))
    model = model.to(dtypes[storage])
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=dtypes[reduce])
    m = mesh((ws,))
    for module in (model.inp, *model.blocks, model.head, model):
        fully_shard(module, mesh=m, mp_policy=policy)
    loss_fn(model, *batch(rank)).backward()
    grads, params = _fsdp2_gatherers(model)
    # Exact reference: what FSDP2 produced, unsharded, in float64 (and the parameters it will step).
    exact = Reference({n: t.clone() for n, t in params().items()}, {n: t.clone() for n, t in grads().items()})
    tol = (BF16_RTOL, BF16_ATOL) if storage == "bf16" else (RTOL, ATOL)
    case = Case(
        model, exact, grads, params, _torch_clip(model), grad_rtol=tol[0], grad_atol=tol[1], model_ref=model_ref,
        wrapper_raises_on_empty_inf=True,
    )
    return {"per_p": run_case(case)}


# -------------------------------------------------------------------------------------------------- FSDP1


def _fsdp1_wrap(model: Net, strategy: str, use_orig_params: bool, plain_root: bool = False) -> nn.Module:
    """Blocks get their own FSDP1 instances. With an FSDP1 root, inp, head and scale share the root's
    FlatParameter and ``side`` is ignored; with ``plain_root`` only the blocks are wrapped."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    kw: dict[str, Any] = {
        "sharding_strategy": getattr(ShardingStrategy, strategy),
        "use_orig_params": use_orig_params,
        "device_id": torch.device("cpu"),
    }
    if strategy in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
        kw["device_mesh"] = mesh((2, 2), ("replicate", "shard"))
    if plain_root:
        for i, block in enumerate(model.blocks):
            model.blocks[i] = FSDP(block, **kw)
        return model
    return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}), ignored_modules=[model.side], **kw)


def _flat_layout(fsdp_model: nn.Module) -> list[tuple[Any, list[str]]]:
    """(handle, full names of its parameters in flat order) for every FSDP1 instance."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    prefixes = {id(m): _clean(n) for n, m in fsdp_model.named_modules()}
    out = []
    for module in FSDP.fsdp_modules(fsdp_model):
        if module._handle is None:
            continue
        prefix = prefixes[id(module)]
        out.append((module._handle, [f"{prefix}.{f}" if prefix else f for f in module._handle.flat_param._fqns]))
    return out


def _fsdp1_full_views(fsdp_model: nn.Module) -> tuple[Callable[[], dict[str, Tensor]], Callable[[], dict[str, Tensor]]]:
    """(grads, params): float64 copies of an FSDP1 model's full gradients and parameters, by unwrapped name."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def grads() -> dict[str, Tensor]:
        with FSDP.summon_full_params(fsdp_model, with_grads=True):
            return {_clean(n): p.grad.detach().double().clone() for n, p in fsdp_model.named_parameters()}

    def params() -> dict[str, Tensor]:
        with FSDP.summon_full_params(fsdp_model):
            return {_clean(n): p.detach().double().clone() for n, p in fsdp_model.named_parameters()}

    return grads, params


def _fsdp1_gathered_grads(fsdp_model: nn.Module) -> Callable[[], dict[str, Tensor]]:
    """float64 copies of an FSDP1 model's full gradients by unwrapped name, gathered from the flat gradients by
    hand (``summon_full_params(with_grads=True)`` takes neither flat parameters nor bf16 gradients of fp32 ones)."""
    layout = _flat_layout(fsdp_model)

    def grads() -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for handle, names in layout:
            flat = handle.flat_param
            g = flat.grad.detach().double()
            if handle.uses_sharded_strategy:
                parts = [torch.empty_like(g) for _ in range(dist.get_world_size(handle.process_group))]
                dist.all_gather(parts, g, group=handle.process_group)
                g = torch.cat(parts)
            real = [n for n, pad in zip(flat._numels_with_padding, flat._is_padding_mask) if not pad]
            offsets = [o for o, pad in zip(itertools.accumulate([0, *flat._numels_with_padding]),
                                           [*flat._is_padding_mask, True]) if not pad]
            for name, shape, at, numel in zip(names, flat._shapes, offsets, real):
                out[name] = g[at : at + numel].reshape(shape).clone()
        return out

    return grads


def _fsdp1_flat_checker(fsdp_model: nn.Module) -> Callable[[dict[str, Tensor], float, float, str], None]:
    """Compare flat grad shards with the same slices of the reference, laid out as FSDP1 does (chunk)."""
    from torch.distributed.fsdp._flat_param import FlatParameter

    layout = _flat_layout(fsdp_model)

    def check(expected: dict[str, Tensor], rtol: float, atol: float, what: str) -> None:
        seen: set[str] = set()
        for handle, names in layout:
            full = torch.cat([expected[n].reshape(-1) for n in names])
            seen.update(names)
            g = handle.flat_param.grad
            if handle.uses_sharded_strategy:
                pg = handle.process_group
                chunks = full.chunk(dist.get_world_size(pg))
                rank = dist.get_rank(pg)
                local = chunks[rank] if rank < len(chunks) else full.new_empty(0)
                assert g.numel() == chunks[0].numel(), (g.numel(), chunks[0].numel())
                _close(g[: local.numel()], local, rtol, atol, f"{what} flat shard of {names}")
            else:
                _close(g, full, rtol, atol, f"{what} flat grad of {names}")
        for n, p in fsdp_model.named_parameters():
            if not isinstance(p, FlatParameter) and p.grad is not None:
                _close(p.grad, expected[_clean(n)], rtol, atol, f"{what} {n}")
                seen.add(_clean(n))
        if seen != set(expected):
            raise AssertionError(f"{what}: checked {sorted(seen)}, reference has {sorted(expected)}")

    return check


def fsdp1(strategy: str, use_orig_params: bool, plain_root: bool = False) -> dict[str, Any]:
    """FSDP1 with nested auto-wrapping (Blocks), the rest in the root's FlatParameter, ``side`` ignored.

    ``plain_root``: only the blocks are FSDP1 instances, the root is a plain module (dist_clip must still see
    FlatParameters, not replicated tensors); FSDP1's own clip needs an FSDP1 root, so it is not compared.
    """

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model()
    ref = reference(model, list(range(ws)))
    fsdp_model = _fsdp1_wrap(model, strategy, use_orig_params, plain_root)
    loss_fn(fsdp_model, *batch(rank)).backward()
    # Parameters outside every FSDP1 instance: averaging them is the user's job, as in code without DDP.
    outside = [model.inp, model.head, model.side] if plain_root else [model.side]
    average_grads_([p for m in outside for p in m.parameters()] + ([model.scale] if plain_root else []))

    grads, params = _fsdp1_full_views(fsdp_model)

    poison = None
    if not use_orig_params and strategy != "NO_SHARD":
        flats = [handle.flat_param for handle, _ in _flat_layout(fsdp_model)]

        def poison() -> None:
            # FSDP1's padding grads are zero after reduce-scatter; a large value shows that they never count.
            for flat in flats:
                if flat._shard_numel_padded:
                    flat.grad[flat.grad.numel() - flat._shard_numel_padded :] = 1e3

    case = Case(
        fsdp_model,
        ref,
        grads,
        params,
        None if plain_root else lambda max_norm, p: fsdp_model.clip_grad_norm_(max_norm, p),
        check_local_grads=None if use_orig_params else _fsdp1_flat_checker(fsdp_model),
        poison=poison,
        expected_collectives=0 if strategy == "NO_SHARD" else 1,
        # Another group object with the shard group's ranks (every rank makes both groups).
        shard_group=[dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2] if "HYBRID" in strategy else None,
    )
    result = run_case(case)
    padded = [h.flat_param._shard_numel_padded for h, _ in _flat_layout(fsdp_model)]
    refused = None
    if not plain_root:
        # The module the root wraps holds its own flat parameter (or, with use_orig_params, sharded views) beside
        # FSDP1 children: passed instead of the root, it must be refused, not measured as replicated tensors.
        try:
            dist_clip.get_total_norm(fsdp_model.module)
        except ValueError as e:
            refused = "pass the FullyShardedDataParallel module" in str(e)
        # So must its parameters in the per-parameter modes (named by position, they were measured as
        # replicated: a different norm on every rank).
        try:
            dist_clip.GradClipper(mode="per_param", report=True)(list(fsdp_model.parameters()))
        except ValueError as e:
            refused = refused and "pass the FullyShardedDataParallel module" in str(e)
        else:
            refused = False
    return {"per_p": result, "padded": padded, "inner_refused": refused}


def fsdp1_hybrid_beside_other_strategies(hybrid: str) -> dict[str, Any]:
    """One FSDP1 root whose instances are sharded over different groups, 4 ranks: ``hybrid="blocks"`` wraps the
    blocks HYBRID_SHARD (2 x 2 mesh) under a FULL_SHARD root, ``"root"`` the root HYBRID_SHARD around FULL_SHARD
    blocks over the world. dist_clip reduces over the world and counts each hybrid shard on its first replica;
    FSDP1's own clip sums every instance's partial over the root's group alone."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model()
    ref = reference(model, list(range(ws)))
    hsdp = {"sharding_strategy": ShardingStrategy.HYBRID_SHARD, "device_mesh": mesh((2, 2), ("replicate", "shard"))}
    full = {"sharding_strategy": ShardingStrategy.FULL_SHARD}
    inner, outer = (hsdp, full) if hybrid == "blocks" else (full, hsdp)
    common = {"use_orig_params": True, "device_id": torch.device("cpu")}
    for i, block in enumerate(model.blocks):
        model.blocks[i] = FSDP(block, **inner, **common)
    fsdp_model = FSDP(model, ignored_modules=[model.side], **outer, **common)
    loss_fn(fsdp_model, *batch(rank)).backward()
    average_grads_(list(model.side.parameters()))
    grads, params = _fsdp1_full_views(fsdp_model)
    case = Case(fsdp_model, ref, grads, params, lambda max_norm, p: fsdp_model.clip_grad_norm_(max_norm, p))
    return {"per_p": run_case(case)}


def fsdp1_low_precision_gradients(strategy: str) -> dict[str, Any]:
    """``MixedPrecision(param_dtype=bf16, reduce_dtype=fp32, keep_low_precision_grads=True)``: fp32 parameters,
    bf16 gradients. The exact reference is the float64 norm of the gradients FSDP1 left (gathered); the fp32
    unsharded model is compared at the bf16 tolerances, as for FSDP2 above."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model()
    model_ref = reference(model, list(range(ws)))
    policy = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, keep_low_precision_grads=True)
    hybrid = {"device_mesh": mesh((2, 2), ("replicate", "shard"))} if "HYBRID" in strategy else {}
    # (no ignored module: FSDP1 casts the root's inputs to bf16, which an fp32 module outside it cannot take)
    fsdp_model = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}), mixed_precision=policy,
                      sharding_strategy=getattr(ShardingStrategy, strategy), use_orig_params=True,
                      device_id=torch.device("cpu"), **hybrid)
    loss_fn(fsdp_model, *batch(rank)).backward()
    if {q.grad.dtype for q in fsdp_model.parameters() if q.grad is not None} != {torch.bfloat16}:
        raise AssertionError("expected bf16 gradients")
    _, params = _fsdp1_full_views(fsdp_model)
    # Gathered by hand: torch 2.13's summon_full_params(with_grads=True) raises on bf16 gradients of fp32
    # parameters ("attempting to assign a gradient with dtype BFloat16 to a tensor with grad_dtype Float").
    grads = _fsdp1_gathered_grads(fsdp_model)

    exact = Reference({n: t.clone() for n, t in params().items()}, {n: t.clone() for n, t in grads().items()})
    case = Case(fsdp_model, exact, grads, params, lambda max_norm, p: fsdp_model.clip_grad_norm_(max_norm, p),
                grad_rtol=BF16_RTOL, grad_atol=BF16_ATOL, model_ref=model_ref)
    return {"per_p": run_case(case)}


def _refused(call: Callable[[], object], reason: str) -> bool | None:
    """None when ``call`` measured; else whether its ValueError gives ``reason``."""
    try:
        call()
    except ValueError as e:
        return reason in str(e)
    return None


def fsdp1_no_sync(strategy: str, use_orig_params: bool) -> dict[str, Any]:
    """Clipping inside FSDP1's ``no_sync()``, where each rank's whole, unreduced gradient sits in place of its
    shard: measured as a shard it gave the ranks' local norms combined (72.36 and 72.27 on 3 ranks, no error),
    less the padding's worth of real entries. It must be refused on every rank, inside the context and after
    it until a synchronised backward (sharded strategies); then the accumulated total is the reference's."""
    from dist_clip import GradClipper

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model()
    ref = copy.deepcopy(model).double()
    loss = sum(loss_fn(ref, *batch(d, torch.float64)) + loss_fn(ref, *batch(ws + d, torch.float64))
               for d in range(ws)) / ws
    loss.backward()
    want = reference_norm([p.grad for p in ref.parameters() if p.grad is not None], 2.0)
    fsdp_model = _fsdp1_wrap(model, strategy, use_orig_params)

    calls = (lambda: dist_clip.get_total_norm(fsdp_model), lambda: GradClipper(mode="per_param")(fsdp_model),
             lambda: GradClipper(mode="unitwise")(fsdp_model))
    with fsdp_model.no_sync():
        loss_fn(fsdp_model, *batch(rank)).backward()
        inside = [_refused(c, "not reduced yet") for c in calls]
    after = _refused(calls[0], "not reduced yet")
    loss_fn(fsdp_model, *batch(ws + rank)).backward()
    average_grads_(list(model.side.parameters()))  # the ignored module: the user's job
    total = dist_clip.clip_grad_norm_(fsdp_model, 1e9).item()
    return {"inside": inside, "after": after, "total": total, "want": want}


def fsdp2_accumulation(unsharded: str) -> dict[str, Any]:
    """FSDP2 gradient accumulation over two micro-batches, the first with ``set_requires_gradient_sync(False)``:
    a call there is refused on every rank (each rank returned its own total, 0.33 and 2.52 for 1.31, under
    ``set_reshard_after_backward(False)``; 0 otherwise). At the boundary, with ``unsharded`` modules left
    unsharded after backward ("none", "root": the root alone, "all"), the reduced gradients sit on the sharded
    parameters the optimizer steps, not on the registered unsharded ones: they were left out (0.70 for 1.31 with
    the root's head, 0 with all). Every mode, the report, and the clipped step against the float64 reference."""
    from torch.distributed.fsdp import fully_shard

    from dist_clip import AGC, GradClipper

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model(wide=True)
    ref = copy.deepcopy(model).double()
    (sum(loss_fn(ref, *batch(d, torch.float64)) + loss_fn(ref, *batch(ws + d, torch.float64))
         for d in range(ws)) / ws).backward()
    want = reference_norm([p.grad for p in ref.parameters()], 2.0)
    m = mesh((ws,))
    for module in (model.inp, *model.blocks, model.head):
        fully_shard(module, mesh=m)
    fully_shard(model, mesh=m)
    held = list(model.parameters())  # what an optimizer built now steps: the sharded DTensor parameters
    if unsharded == "all":
        model.set_reshard_after_backward(False)
    elif unsharded == "root":
        model.set_reshard_after_backward(False, recurse=False)

    model.set_requires_gradient_sync(False)
    loss_fn(model, *batch(rank)).backward()
    calls = (lambda: dist_clip.get_total_norm(model), lambda: GradClipper(mode="per_param")(model),
             lambda: GradClipper(mode="unitwise")(model))
    inside = [_refused(c, "gradients are not reduced yet") for c in calls]
    model.set_requires_gradient_sync(True)
    loss_fn(model, *batch(ws + rank)).backward()
    out: dict[str, Any] = {"inside": inside, "want": want}
    out["total"] = dist_clip.get_total_norm(model).item()
    # model.parameters() yields the unsharded parameters where modules are left unsharded, and after a forward
    # without backward (an evaluation one: the root keeps its parameters unsharded): the sharded ones stand in
    # for them (they were left out: 0.854 for 1.237)
    out["params_total"] = dist_clip.get_total_norm(list(model.parameters())).item()
    with torch.no_grad():
        loss_fn(model, *batch(rank))
    out["eval_params_total"] = dist_clip.get_total_norm(model.parameters()).item()
    report = GradClipper(max_norm=math.inf, mode="per_param", report=True)(model).norms
    out["report"] = sorted(report) == sorted(n for n, _ in ref.named_parameters())
    out["agc_total"] = GradClipper(mode="unitwise", agc=AGC(1e9))(model).total_norm.item()
    out["clipped"] = dist_clip.clip_grad_norm_(model, want / 2).item()
    assert all(_is_dtensor(p) for p in held) and all(p.grad is not None for p in held)
    out["after"] = reference_norm([p.grad.full_tensor().double() for p in held], 2.0)
    return out


def fsdp2_enclosed_and_late_sync() -> list:
    """A submodule clipped on its own whose parameters belong to an enclosing FSDP2 module: left unsharded after
    backward, its gradients were missed (total 0, unclipped); with sync off on the enclosing module the call
    returned 0 instead of refusing. Sync turned back on after the last backward (the gradients never reduced)
    read 0 too: refused."""
    from torch.distributed.fsdp import fully_shard

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model(wide=True)
    ref = reference(model, list(range(ws)))
    m = mesh((ws,))
    for module in (model.inp, *model.blocks):
        fully_shard(module, mesh=m)
    fully_shard(model, mesh=m)  # head, scale and side belong to the root's group
    model.set_reshard_after_backward(False, recurse=False)
    loss_fn(model, *batch(rank)).backward()
    want = reference_norm([ref.grads["head.weight"], ref.grads["head.bias"]], 2.0)
    out: list = [abs(dist_clip.get_total_norm(model.head).item() - want) <= 1e-6 * want]

    model.zero_grad()
    model.set_requires_gradient_sync(False)
    loss_fn(model, *batch(rank)).backward()
    out.append(_refused(lambda: dist_clip.get_total_norm(model.head), "not reduced yet"))
    model.set_requires_gradient_sync(True)  # too late: the backward ran without sync
    out.append(_refused(lambda: dist_clip.get_total_norm(model), "not reduced yet"))
    return out


def fsdp2_listed_unsynced(how: str) -> dict[str, Any]:
    """A list (or mapping) of FSDP2 parameters whose gradients are not reduced yet is refused as the module is
    (it read 0 with sync off; each rank its own total with the module left unsharded after backward, 0.42 and
    1.51; the other modules' total alone with sync off on one block, 0.82, silently). ``how``: "off" (sync off
    on the root), "unsharded" (and ``set_reshard_after_backward(False)``), "one block" (sync off on one block),
    "late" (sync turned back on after the last backward), "replicate" (``replicate_with_fsdp``). After a
    synchronised backward the list measures the reference, and a list of another model is never refused."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.fsdp import fully_shard

    from dist_clip import AGC, GradClipper

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model(wide=True)
    ref = copy.deepcopy(model).double()
    (sum(loss_fn(ref, *batch(d, torch.float64)) + loss_fn(ref, *batch(ws + d, torch.float64))
         for d in range(ws)) / ws).backward()
    want = reference_norm([p.grad for p in ref.parameters()], 2.0)  # both micro-batches, accumulated
    other = new_model(seed=1, wide=True)  # another model beside it, plain: its gradients are the user's own
    loss_fn(other, *batch(0)).backward()
    other_want = reference_norm([p.grad for p in other.parameters()], 2.0)
    if how == "replicate":
        for module in model.blocks:
            replicate(module)
        replicate(model)
    else:
        for module in (model.inp, *model.blocks, model.head):
            fully_shard(module, mesh=mesh((ws,)))
        fully_shard(model, mesh=mesh((ws,)))
    if how == "unsharded":
        model.set_reshard_after_backward(False)
    off = model.blocks[1] if how == "one block" else model
    off.set_requires_gradient_sync(False)
    loss_fn(model, *batch(rank)).backward()
    if how == "late":
        off.set_requires_gradient_sync(True)  # too late: the backward ran without sync
    calls = (
        lambda: dist_clip.get_total_norm(list(model.parameters())),
        lambda: dist_clip.clip_grad_norm_(model.parameters(), 1.0),
        lambda: GradClipper(mode="per_param")(list(model.parameters())),
        lambda: GradClipper(mode="unitwise", agc=AGC(1e9))(dict(model.named_parameters())),
        lambda: GradClipper(max_norm=1e9)(list(model.parameters()), report=True),
        lambda: dist_clip.get_total_norm(model),
        lambda: GradClipper(mode="unitwise", agc=AGC(1e9))(model),
    )
    out: dict[str, Any] = {"inside": [_refused(c, "gradients are not reduced yet") for c in calls]}
    out["other"] = dist_clip.get_total_norm(list(other.parameters())).item() / other_want
    # the accumulation's last backward, synchronised: measured, and as the module
    off.set_requires_gradient_sync(True)
    loss_fn(model, *batch(ws + rank)).backward()
    out["after"] = [dist_clip.get_total_norm(list(model.parameters())).item() / want,
                    dist_clip.get_total_norm(model).item() / want]
    return out


def fsdp2_single_parameter(how: str) -> dict[str, Any]:
    """One FSDP2 parameter passed alone (a tensor target), as a list of it is read: with sync off it was measured
    (each rank its own gradient's norm, 0.077 and 0.141, with the module left unsharded; 0 with the default
    resharding) where the list is refused; at the accumulation's synchronised last backward with the module left
    unsharded (``set_reshard_after_backward(False)``) it read 0, the sharded parameter not standing in for it.
    ``how``: "off", "unsharded" (sync off, the module left unsharded), "late" (sync turned back on after the
    last backward). After the synchronised backward: the reference's norm, and a clip scales the gradient the
    optimizer steps."""
    from torch.distributed.fsdp import fully_shard

    from dist_clip import AGC, GradClipper

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model(wide=True)
    ref = copy.deepcopy(model).double()
    (sum(loss_fn(ref, *batch(d, torch.float64)) + loss_fn(ref, *batch(ws + d, torch.float64))
         for d in range(ws)) / ws).backward()
    want = reference_norm([ref.blocks[1].lin.weight.grad], 2.0)  # both micro-batches, accumulated
    for module in (model.inp, *model.blocks, model.head):
        fully_shard(module, mesh=mesh((ws,)))
    fully_shard(model, mesh=mesh((ws,)))
    sharded = model.blocks[1].lin.weight  # what an optimizer built now steps
    if how == "unsharded":
        model.set_reshard_after_backward(False)
    model.set_requires_gradient_sync(False)
    loss_fn(model, *batch(rank)).backward()
    if how == "late":
        model.set_requires_gradient_sync(True)  # too late: the backward ran without sync

    def calls(w: Tensor) -> tuple[Callable[[], Any], ...]:
        return (lambda: dist_clip.get_total_norm(w), lambda: dist_clip.clip_grad_norm_(w, 1e9),
                lambda: GradClipper(max_norm=1e9)(w).total_norm, lambda: GradClipper(mode="unitwise",
                                                                                    agc=AGC(1e9))(w).total_norm)

    out: dict[str, Any] = {"inside": [_refused(c, "gradients are not reduced yet")
                                      for c in calls(model.blocks[1].lin.weight)]}
    model.set_requires_gradient_sync(True)
    loss_fn(model, *batch(ws + rank)).backward()
    w = model.blocks[1].lin.weight  # the unsharded parameter where the module stays unsharded
    out["unsharded"] = (w is not sharded) == (how == "unsharded")
    out["after"] = [c().item() / want for c in calls(w)]
    dist_clip.clip_grad_norm_(w, want / 2)
    out["clipped"] = sharded.grad.full_tensor().double().norm().item() / (want / 2)
    return out


def fsdp2_listed_gradients_unsynced(how: str) -> dict[str, Any]:
    """A list of FSDP2 gradients (torch's idiom, ``[p.grad for p in model.parameters() if p.grad is not None]``)
    whose sums are not reduced yet is refused as the parameters are: "unsharded" (sync off, the modules left
    unsharded after backward: the unsharded parameters' gradients are each rank's own, 0.41 and 1.50 were read),
    "one block" (a synchronised backward, then one with sync off on one block: its sharded gradient holds the
    first micro-batch only, and the list was measured silently). A gradient list of another model is measured;
    after the synchronised last backward, the gradients of the sharded parameters read the reference."""
    from torch.distributed.fsdp import fully_shard

    from dist_clip import GradClipper

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model(wide=True)
    ref = copy.deepcopy(model).double()
    micro = 3 if how == "one block" else 2
    (sum(loss_fn(ref, *batch(k * ws + d, torch.float64)) for d in range(ws) for k in range(micro)) / ws).backward()
    want = reference_norm([p.grad for p in ref.parameters()], 2.0)
    other = new_model(seed=1, wide=True)
    loss_fn(other, *batch(0)).backward()
    other_want = reference_norm([p.grad for p in other.parameters()], 2.0)
    for module in (model.inp, *model.blocks, model.head):
        fully_shard(module, mesh=mesh((ws,)))
    fully_shard(model, mesh=mesh((ws,)))
    held = list(model.parameters())
    off = model
    if how == "unsharded":
        model.set_reshard_after_backward(False)
    else:
        loss_fn(model, *batch(2 * ws + rank)).backward()  # a synchronised micro-batch first
        off = model.blocks[1]
    off.set_requires_gradient_sync(False)
    loss_fn(model, *batch(rank)).backward()

    def grads() -> list[Tensor]:
        return [p.grad for p in model.parameters() if p.grad is not None]

    calls = (lambda: dist_clip.get_total_norm(grads()), lambda: dist_clip.clip_grad_norm_(grads(), 1e9),
             lambda: GradClipper(max_norm=1e9)(grads()), lambda: GradClipper(mode="per_param")(grads()))
    out: dict[str, Any] = {"inside": [_refused(c, "gradients are not reduced yet") for c in calls]}
    out["other"] = dist_clip.get_total_norm([p.grad for p in other.parameters()]).item() / other_want
    off.set_requires_gradient_sync(True)
    loss_fn(model, *batch(ws + rank)).backward()
    out["after"] = dist_clip.get_total_norm([p.grad for p in held]).item() / want
    return out


def fsdp2_mapping_under_plan(how: str) -> dict[str, Any]:
    """``dict(model.named_parameters())`` of an FSDP2 model under a ``ParallelPlan``, as without one: "unsharded"
    (``set_reshard_after_backward(False)``: the unsharded parameters' gradients are None, it read 0 for 0.82) and
    "eval" (a forward without backward leaves the root unsharded: 0.11) have the sharded parameters stand in, and
    a clip scales the gradients the optimizer steps; "off" (sync off, the modules left unsharded: each rank's own
    sums were summed over the mesh, 1.57 on both ranks) is refused."""
    from torch.distributed.fsdp import fully_shard

    from dist_clip import GradClipper, ParallelPlan

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model(wide=True)
    ref = reference(model, list(range(ws)))
    want = reference_norm(list(ref.grads.values()), 2.0)
    m = mesh((ws,), ("dp",))
    plan = ParallelPlan(m, tuple(ref.params))
    for module in (model.inp, *model.blocks, model.head):
        fully_shard(module, mesh=m)
    fully_shard(model, mesh=m)
    held = list(model.parameters())
    if how in ("unsharded", "off"):
        model.set_reshard_after_backward(False)
    if how == "off":
        model.set_requires_gradient_sync(False)
    loss_fn(model, *batch(rank)).backward()
    if how == "eval":
        with torch.no_grad():
            loss_fn(model, *batch(rank))
    if how == "off":
        return {"refused": _refused(lambda: GradClipper(max_norm=1e9)(dict(model.named_parameters()), plan=plan),
                                    "gradients are not reduced yet")}
    out = {"total": GradClipper(max_norm=1e9)(dict(model.named_parameters()), plan=plan).total_norm.item() / want}
    GradClipper(max_norm=want / 2)(dict(model.named_parameters()), plan=plan)
    out["clipped"] = reference_norm([p.grad.full_tensor().double() for p in held], 2.0) / (want / 2)
    return out


def fsdp2_listed_refusal_scans_once() -> dict[str, Any]:
    """A list of unsharded FSDP2 parameters (``set_reshard_after_backward(False)``) has the sharded ones stand in
    and is read again: the refusal's scan of every FSDP2 param group ran on both passes (0.25 ms a call more over
    100 groups), though a sharded parameter stands in only for an unsharded one of a group checked already. Each
    group's verdict is read once per call, and the total is the reference's."""
    from torch.distributed.fsdp import fully_shard

    from dist_clip.adapters import params as params_adapter

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model(wide=True)
    ref = reference(model, list(range(ws)))
    want = reference_norm(list(ref.grads.values()), 2.0)
    for module in (model.inp, *model.blocks, model.head):
        fully_shard(module, mesh=mesh((ws,)))
    fully_shard(model, mesh=mesh((ws,)))
    model.set_reshard_after_backward(False)
    loss_fn(model, *batch(rank)).backward()
    groups = len(params_adapter._all_fsdp2_param_groups())
    seen = [0]
    unreduced = params_adapter._unreduced

    def counted(pg: Any, ddp_mesh_info: type) -> str | None:
        seen[0] += 1
        return unreduced(pg, ddp_mesh_info)

    params_adapter._unreduced = counted
    try:
        total = dist_clip.get_total_norm(list(model.parameters())).item()
    finally:
        params_adapter._unreduced = unreduced
    return {"reads_per_group": seen[0] / groups, "total": total / want}


def fsdp2_late_sync_resharded() -> list:
    """Sync turned back on after a backward without it, the modules resharded after backward (the default): the
    sums wait on the unsharded parameters FSDP2 no longer registers, and every mode read 0 instead of refusing."""
    from torch.distributed.fsdp import fully_shard

    from dist_clip import AGC, GradClipper

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model(wide=True)
    for module in (model.inp, *model.blocks, model.head):
        fully_shard(module, mesh=mesh((ws,)))
    fully_shard(model, mesh=mesh((ws,)))
    model.set_requires_gradient_sync(False)
    loss_fn(model, *batch(rank)).backward()
    model.set_requires_gradient_sync(True)  # too late: the backward ran without sync
    calls = (lambda: dist_clip.get_total_norm(model), lambda: GradClipper(mode="per_param")(model),
             lambda: GradClipper(mode="unitwise", agc=AGC(1e9))(model))
    return [_refused(c, "sync was turned back on after the last backward") for c in calls]


def fsdp1_inside_summon_full_params() -> list[bool]:
    """Inside summon_full_params() the parameters (with ``with_grads=True`` the gradients too) are unsharded for
    the context: every call is refused on every rank with a message naming the context, with and without
    ``with_grads``, ``rank0_only`` and flat parameters; outside it, the reference's total and AGC.

    Before: with_grads=True named no_sync(); rank0_only=True with with_grads=True refused on rank 0 alone while
    rank 1 waited in the collective until the timeout; AGC without with_grads combined the rows cut between
    shards wrong (inp.weight and blocks.1.lin.weight clipped apart from the same call outside, silently), and
    with flat parameters and rank0_only=True made the ranks' buffers differ (gloo aborted the process)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from dist_clip import AGC, GradClipper

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model()
    ref = reference(model, list(range(ws)))
    out = []
    for use_orig_params in (True, False):
        fsdp_model = _fsdp1_wrap(copy.deepcopy(model), use_orig_params=use_orig_params, strategy="FULL_SHARD")
        loss_fn(fsdp_model, *batch(rank)).backward()
        average_grads_(list(fsdp_model.module.side.parameters()))  # the ignored module: the user's job
        calls = (
            lambda m=fsdp_model: dist_clip.get_total_norm(m),
            lambda m=fsdp_model: GradClipper(mode="unitwise", agc=AGC(0.05, 1e-3))(m),
        )
        contexts = [{"rank0_only": True, "writeback": False}]
        if use_orig_params:  # (with_grads needs them)
            contexts = [{}, {"with_grads": True}, {"with_grads": True, "rank0_only": True, "writeback": False}]
        for kw in contexts:
            for call in calls:
                with FSDP.summon_full_params(fsdp_model, **kw):
                    try:
                        call()
                        out.append(False)
                    except ValueError as e:
                        out.append("summon_full_params(with_grads=True)" in str(e) and "Clip outside it" in str(e))
        # Outside it: the reference (nothing was built or kept inside), and AGC as on a model never summoned.
        want = reference_norm(list(ref.grads.values()), 2.0)
        out.append(abs(dist_clip.get_total_norm(fsdp_model).item() - want) <= 1e-6 * want)
        flat = _fsdp1_gathered_grads(fsdp_model)

        def grads(m: nn.Module = fsdp_model, flat: Callable[[], dict[str, Tensor]] = flat) -> dict[str, Tensor]:
            return {**flat(), **{f"side.{n}": q.grad.double() for n, q in m.module.side.named_parameters()}}

        agc = grads()
        with FSDP.summon_full_params(fsdp_model):
            weights = {_clean(n): q.detach().double().clone() for n, q in fsdp_model.named_parameters()}
        reference_agc_(weights, agc, 0.05, 1e-3)
        GradClipper(mode="unitwise", agc=AGC(0.05, 1e-3))(fsdp_model)
        got = grads()
        out.append(set(got) == set(ref.grads) and all(torch.allclose(got[n], agc[n], rtol=RTOL, atol=1e-7)
                                                      for n in agc))
    return out


def fsdp1_parameters_changed_after_first_call(use_orig_params: bool) -> list[tuple[float, float]]:
    """The plan kept on an FSDP1 root listed the parameters no handle manages by object: an ignored module's
    weight replaced after the first call (``side.weight = nn.Parameter(...)``) kept being read from the old
    object (its stale gradient, 5.35 for 5.51, the new gradient never clipped), and a parameter registered after
    the first call was never counted (2.55 for 69.3). (total, reference) per step, and the report's keys."""
    from dist_clip import GradClipper

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model()
    ref = copy.deepcopy(model).double()
    fsdp_model = _fsdp1_wrap(model, "FULL_SHARD", use_orig_params)
    out: list[tuple[float, float]] = []

    def step(extra: float = 0.0) -> None:
        fsdp_model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        loss_fn(fsdp_model, *batch(rank)).backward()
        average_grads_(list(model.side.parameters()))
        (sum(loss_fn(ref, *batch(d, torch.float64)) for d in range(ws)) / ws).backward()
        grads = [p.grad for p in ref.parameters() if p.grad is not None]
        if extra:
            model.extra.grad = torch.full((3,), extra)
            grads.append(torch.full((3,), extra, dtype=torch.float64))
        report = GradClipper(max_norm=math.inf, mode="per_param", report=True)(fsdp_model).norms
        out.append((dist_clip.get_total_norm(fsdp_model).item(), reference_norm(grads), "extra" in report))

    step()
    # A model built elsewhere (parameters registered outside this root) keeps the plan: nothing is walked again.
    kept = {k: v[-1] for k, v in fsdp_model.__dict__["_dist_clip_fsdp1_plan"].items()}
    nn.Linear(2, 2)
    dist_clip.get_total_norm(fsdp_model)
    again = {k: v[-1] for k, v in fsdp_model.__dict__["_dist_clip_fsdp1_plan"].items()}
    out.append((float(all(again[k] is v for k, v in kept.items())), 1.0, False))
    with torch.no_grad():
        model.side.weight = nn.Parameter(model.side.weight.detach() * 3)
        ref.side.weight = nn.Parameter(ref.side.weight.detach() * 3)
    step()
    model.extra = nn.Parameter(torch.zeros(3))
    step(extra=5.0)
    return out


def fsdp1_plan_across_steps(use_orig_params: bool) -> dict[str, Any]:
    """The walk over an FSDP1 model's handles is kept on the root between calls (FSDP fixes them at its lazy
    init): three steps of new gradients (set to None, then zeroed in place), the total and per-parameter norms of
    each against the float64 reference, and the per-parameter pieces AGC reads; one walk per mode (total,
    per-parameter, AGC's pieces), and new ones once FSDP's handle list is replaced."""
    from dist_clip import ClipperConfig, GradClipper, _slots
    from dist_clip.adapters import fsdp as adapter

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model()
    refs = [reference(model, [r + 10 * step for r in range(ws)]) for step in range(3)]
    fsdp_model = _fsdp1_wrap(model, "FULL_SHARD", use_orig_params)
    walks: list[int] = []
    real = adapter.fsdp1_handles
    adapter.fsdp1_handles = lambda root: (walks.append(1), real(root))[1]

    def check(ref: Reference, step: int) -> None:
        got = dist_clip.get_total_norm(fsdp_model, 2.0).item()
        assert _norm_close(got, reference_norm(list(ref.grads.values()), 2.0), RTOL), (step, got)
        report = GradClipper(ClipperConfig(max_norm=1e9, mode="per_param", report=True))(fsdp_model).norms
        want = {n: torch.linalg.vector_norm(g).item() for n, g in ref.grads.items()}
        assert report.keys() == want.keys(), (step, sorted(report), sorted(want))
        assert all(_norm_close(report[n], want[n], RTOL) for n in want), (step, report, want)
        # The per-parameter pieces AGC reads (their places kept too) give this step's full gradients back.
        layout = _slots.fsdp1_pieces(fsdp_model)
        local = [(pc.name, pc.start, pc.grad.double().clone()) for pc in layout.pieces if pc.grad is not None]
        local += [(n, 0, q.grad.double().reshape(-1).clone()) for n, q in layout.unmanaged if q.grad is not None]
        gathered: list[Any] = [None] * ws
        dist.all_gather_object(gathered, local)
        full = {n: torch.zeros(shape, dtype=torch.float64).reshape(-1) for n, (shape, _) in layout.geometry.items()}
        for rank_pieces in gathered:
            for n, start, values in rank_pieces:
                full[n][start : start + values.numel()] = values
        for n, g in ref.grads.items():
            assert torch.allclose(full[n].reshape(g.shape), g.double(), rtol=1e-5, atol=1e-7), (step, n)

    try:
        counts = []
        for step, ref in enumerate(refs):
            fsdp_model.zero_grad(set_to_none=step != 2)
            loss_fn(fsdp_model, *batch(rank + 10 * step)).backward()
            average_grads_(list(model.side.parameters()))  # ignored by FSDP1: the user's job
            check(ref, step)
            counts.append(len(walks))
        fsdp_model._all_handles = list(fsdp_model._all_handles)  # as a new lazy init would
        check(refs[-1], 3)
        counts.append(len(walks))
        # A caller's group= changes what the pieces say; a new group object each time keeps one entry, not one more.
        for _ in range(3):
            other = dist.new_group(list(range(ws)))
            assert {pc.group for pc in _slots.fsdp1_pieces(fsdp_model, other).pieces} == {other}
        assert {pc.group for pc in _slots.fsdp1_pieces(fsdp_model).pieces} != {other}
        kept = len(fsdp_model.__dict__[adapter._PLAN_ATTR])
    finally:
        adapter.fsdp1_handles = real
    return {"walks": counts, "kept": kept}


def wrapped_names(kind: str) -> dict[str, Any]:
    """A model under activation checkpointing and ``torch.compile`` (eager backend) as users stack them: the
    total, the per-parameter report and AGC's per-parameter norms name every parameter as the unwrapped model
    does (no ``_orig_mod.`` / ``_checkpoint_wrapped_module.`` / ``module.``), each against the float64
    reference. ``fsdp2``: checkpointed blocks under ``fully_shard``, compiled; ``fsdp1``: a compiled FSDP1 root
    with checkpointed blocks (the handle walk still kept on the root); ``ddp``: a compiled DDP."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.nn.parallel import DistributedDataParallel

    from dist_clip import AGC, ClipperConfig, GradClipper

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model()
    ref = reference(model, list(range(ws)))
    is_block = lambda m: isinstance(m, Block)  # noqa: E731
    if kind == "fsdp2":
        apply_activation_checkpointing(model, check_fn=is_block)
        for block in model.blocks:
            fully_shard(block, mesh=mesh((ws,)))
        fully_shard(model, mesh=mesh((ws,)))
        wrapped: nn.Module = model
    elif kind == "fsdp1":
        wrapped = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True,
                                           device_id=torch.device("cpu"))
        apply_activation_checkpointing(wrapped, check_fn=is_block)
    else:
        wrapped = DistributedDataParallel(model)
    compiled = torch.compile(wrapped, backend="eager")
    loss_fn(compiled, *batch(rank)).backward()
    want = {n: torch.linalg.vector_norm(g).item() for n, g in ref.grads.items()}
    total = dist_clip.get_total_norm(compiled, 2.0).item()
    assert _norm_close(total, reference_norm(list(ref.grads.values()), 2.0), RTOL), (total, want)
    report = GradClipper(ClipperConfig(max_norm=1e9, mode="per_param", report=True))(compiled).norms
    assert report.keys() == want.keys(), (sorted(report), sorted(want))
    assert all(_norm_close(report[n], want[n], RTOL) for n in want), (report, want)
    agc = GradClipper(ClipperConfig(agc=AGC(clipping=1e9), mode="unitwise", report=True))(compiled).norms
    assert agc.keys() == want.keys(), (sorted(agc), sorted(want))
    assert all(_norm_close(agc[n], want[n], RTOL) for n in want), (agc, want)
    kept = "_dist_clip_fsdp1_plan" in wrapped.__dict__
    return {"names": sorted(report), "fsdp1_plan_kept": kept}


class SharedBlockNet(nn.Module):
    """One block registered under three paths (``shared``, ``enc.0``, ``dec.1``) and run twice per forward: the
    unwrapped model names its parameters ``shared.lin.*``, the first path."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(13, 7)
        self.shared = Block(7, 7)
        self.enc = nn.Sequential(self.shared)
        self.dec = nn.Sequential(Block(7, 7), self.shared)
        self.head = nn.Linear(7, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dec(self.enc(torch.tanh(self.inp(x)))))


class AliasFirstNet(nn.Module):
    """A block registered first as ``last`` and then as ``dec.1``, run through ``dec`` only: the unwrapped model
    names its parameters ``last.lin.*``, the first path, outside the FSDP1 unit that wraps ``dec``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(13, 7)
        self.last = Block(7, 7)
        self.dec = nn.Sequential(Block(7, 7), self.last)
        self.head = nn.Linear(7, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dec(torch.tanh(self.inp(x))))


def fsdp1_shared_module_names(use_orig_params: bool, alias_first: bool = False) -> dict[str, Any]:
    """FSDP1 units around a module registered under several parents (every ``nn.Linear`` its own unit): the
    per-parameter report, slots and AGC name the shared one's parameters as the unwrapped model does. They were
    named after its last path (``dec.1.lin.weight`` for ``shared.lin.weight``), so an AGC ``exclude=`` of the
    model's name missed it (its rows were clipped)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from dist_clip import AGC, ClipperConfig, GradClipper

    rank, ws = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = AliasFirstNet() if alias_first else SharedBlockNet()
    shared = "last" if alias_first else "shared"
    ref = reference(model, list(range(ws)))
    # alias_first: one unit wraps dec, whose own names (flat_param._fqns) say 1.lin.* for last.lin.*
    policy = ModuleWrapPolicy({nn.Sequential} if alias_first else {nn.Linear})
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=policy,
                                       use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    loss_fn(wrapped, *batch(rank)).backward()
    want = {n: torch.linalg.vector_norm(g).item() for n, g in ref.grads.items()}
    for p in PS:
        total = dist_clip.get_total_norm(wrapped, p).item()
        assert _norm_close(total, reference_norm(list(ref.grads.values()), p), RTOL), (p, total)
    result = GradClipper(ClipperConfig(max_norm=1e9, mode="per_param", report=True))(wrapped)
    assert sorted(result.slots) == sorted(want), (sorted(result.slots), sorted(want))
    assert result.norms is not None and result.norms.keys() == want.keys(), (sorted(result.norms or {}), sorted(want))
    assert all(_norm_close(result.norms[n], want[n], RTOL) for n in want), (result.norms, want)
    # AGC leaves an excluded parameter alone, named as the model names it.
    before = {_clean(n): q.grad.detach().clone() for n, q in wrapped.named_parameters() if q.grad is not None}
    agc = GradClipper(ClipperConfig(agc=AGC(clipping=1e-6, exclude=(f"{shared}.lin.weight",)), mode="unitwise",
                                    report=True))(wrapped)
    assert agc.norms is not None and agc.norms.keys() == want.keys(), (sorted(agc.norms or {}), sorted(want))
    kept = {_clean(n): torch.equal(q.grad, before[_clean(n)])
            for n, q in wrapped.named_parameters() if q.grad is not None}
    return {"names": sorted(result.slots), "kept": kept}


# ------------------------------------------------------------------------------------- DTensor placements


def refusals_name_the_layouts_gradient() -> list[str]:
    """On a 1-D mesh of 2 ranks, a gradient replicated then one sharded, clipped with ``group=`` this rank's own
    one-rank group (the second's other shard is outside it), and one replicated then one Partial: each call is
    refused, naming the second (the first gradient of the refused layout: ``'1'`` in a list), not the call's
    first gradient. Returns the errors' texts."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    m = mesh((dist.get_world_size(),), ("dp",))
    mine = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]
    out = []
    for second, group in ((Shard(0), mine), (Partial(), None)):
        grads = [DTensor.from_local(torch.ones(2), m, [placement], run_check=False)
                 for placement in (Replicate(), second)]
        try:
            dist_clip.get_total_norm(grads, group=group)
            out.append("no error")
        except ValueError as e:
            out.append(str(e))
    return out


# GradClipper settings by name, each mode and policy (the functional calls are "total" and "clip")
PARTIAL_CLIPPERS: dict[str, dict[str, Any]] = {
    "fixed": {}, "report": {"report": True}, "autoclip": {"max_norm": dist_clip.AutoClip()},
    "zclip": {"max_norm": dist_clip.ZClip()}, "unitwise": {"mode": "unitwise"}, "per_param": {"mode": "per_param"},
    "per_group": {"mode": "per_group"}, "skip": {"on_nonfinite": "skip"}, "hand-over": {},
    "unitwise-pending": {"mode": "unitwise"}, "per_param-mapping": {"mode": "per_param"},
    "fixed-lone": {}, "unitwise-lone": {"mode": "unitwise"},
}


def _outcomes(calls: tuple[Callable[[], Any], ...], errors: tuple[type[BaseException], ...]) -> list[str]:
    """Each call's total to 4 digits, or the name of the exception (of ``errors``) it raised, in order: what the
    cases of a refusal on one rank return (the refused call, then one every rank must meet)."""
    out = []
    for call in calls:
        try:
            out.append(f"{float(call()):.4f}")
        except errors as e:
            out.append(type(e).__name__)
    return out


def partial_on_one_rank_none_on_another(how: str) -> list[str]:
    """A module with a ``Shard(0)`` DTensor parameter ``w`` (and a plain ``b``) on a 1-D mesh of 2 ranks: rank 1
    holds a ``Partial`` gradient of ``w``, rank 0 none (the layer unused there: a stand-in in ``w``'s layout, one
    collective). ``how`` calls ``get_total_norm`` or ``clip_grad_norm_`` on the module, or a ``GradClipper`` set
    as ``PARTIAL_CLIPPERS[how]`` says (with an optimizer, fused for "hand-over"; "unitwise-pending": a hand-over
    of another part pending, which the call settles first; "-mapping": the target ``{"w": w, "b": b}``; "-lone":
    the target ``w`` itself, not in a list); then every rank measures ``b`` over the world. Returns what each call
    gave: the exception's type, or the value."""
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    m = mesh((2,), ("dp",))
    mod = nn.Module()
    mod.w = nn.Parameter(distribute_tensor(torch.ones(4, 2), m, [Shard(0)]))
    mod.b = nn.Parameter(torch.ones(3))
    mod.b.grad = torch.full((3,), 2.0)
    if dist.get_rank() == 1:
        mod.w.grad = DTensor.from_local(torch.ones(4, 2), m, [Partial()], run_check=False)
    target = {"w": mod.w, "b": mod.b} if how.endswith("mapping") else mod.w if how.endswith("lone") else mod
    if how.startswith("total"):
        first = lambda: dist_clip.get_total_norm(target)  # noqa: E731
    elif how.startswith("clip"):
        first = lambda: dist_clip.clip_grad_norm_(target, 1.0)  # noqa: E731
    else:
        clipper = dist_clip.GradClipper(**PARTIAL_CLIPPERS[how])
        opt = torch.optim.SGD(mod.parameters(), lr=0.1, fused=how == "hand-over")
        first = lambda: clipper(target, optimizer=opt).total_norm  # noqa: E731
    other = nn.Parameter(torch.ones(3))
    other.grad = torch.full((3,), 5.0)
    fused = torch.optim.SGD([other], lr=0.1, fused=True)
    if how.endswith("pending"):
        dist_clip.clip_grad_norm_([other], 1.0, optimizer=fused)  # (replicas: no collective)
    out = _outcomes((first, lambda: dist_clip.get_total_norm(mod.b, group=dist.group.WORLD)),
                    (ValueError, RuntimeError))
    fused.step()  # (the pending hand-over taken)
    return out


# The settings a list of gradients (no parameters) is measured with, by name: the functional calls and the
# GradClipper modes and policies that take one
LISTED_PARTIAL = ("total", "clip", "fixed", "report", "autoclip", "zclip", "per_param", "skip")


def partial_gradient_listed_on_one_rank(how: str) -> list[str]:
    """A list of gradients (no parameters, ``[p.grad for p in ... if p.grad is not None]``) on a 1-D mesh of 2
    ranks: a ``Shard(0)`` gradient ``a`` (ones) on both, and on rank 1 also a ``Partial`` gradient ``w``, which
    rank 0 does not hold (its layer unused there). ``how`` measures the list (``LISTED_PARTIAL``: the functional
    calls or a ``GradClipper`` as ``PARTIAL_CLIPPERS`` sets it; "skip" with a plain SGD); then every rank measures a
    plain ``b`` over the world. Returns what each call gave: the exception's type, or the value."""
    from torch.distributed.tensor import DTensor, Partial, Shard

    m = mesh((2,), ("dp",))
    a = DTensor.from_local(torch.ones(2, 2), m, [Shard(0)], run_check=False)
    grads = [a]
    if dist.get_rank() == 1:
        grads.append(DTensor.from_local(torch.ones(4, 2), m, [Partial()], run_check=False))
    if how == "total":
        first = lambda: dist_clip.get_total_norm(grads)  # noqa: E731
    elif how == "clip":
        first = lambda: dist_clip.clip_grad_norm_(grads, 1.0)  # noqa: E731
    else:
        clipper = dist_clip.GradClipper(**PARTIAL_CLIPPERS[how])
        opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1) if how == "skip" else None
        first = lambda: clipper(grads, optimizer=opt).total_norm  # noqa: E731
    b = torch.full((3,), 2.0)
    return _outcomes((first, lambda: dist_clip.get_total_norm([b], group=dist.group.WORLD)), (ValueError, RuntimeError))


# How a target holding None in place of a gradient is measured, by name (see none_listed_on_one_rank)
NONE_LISTED = ("total", "clip", "fixed", "autoclip", "per_param", "report", "unitwise", "mapping")


def none_listed_on_one_rank(how: str) -> list[str]:
    """``[w, x]`` on a 1-D mesh of 2 ranks (``w`` a ``Shard(0)`` DTensor parameter with its gradient, ``x`` a plain
    one), where rank 1 lists ``None`` in ``x``'s place (``[p.grad for p in model.parameters()]`` beside a layer
    unused there: the gradients themselves; for "unitwise", the parameters); "mapping": ``{"w": .., "x": None}``
    to a ``GradClipper``. Every call refuses the ``None`` with a ``TypeError`` on rank 1. ``how`` names the call
    (``NONE_LISTED``); then every rank measures a plain ``b`` over the world. Returns what each call gave: the
    exception's type, or the value."""
    from torch.distributed.tensor import Shard, distribute_tensor

    m = mesh((2,), ("dp",))
    w = nn.Parameter(distribute_tensor(torch.ones(4, 2), m, [Shard(0)]))
    w.grad = distribute_tensor(torch.ones(4, 2), m, [Shard(0)])
    x = nn.Parameter(torch.ones(3))
    x.grad = torch.ones(3)
    params = how == "unitwise"
    listed = [w if params else w.grad, None if dist.get_rank() == 1 else x if params else x.grad]
    target = dict(zip("wx", listed)) if how == "mapping" else listed
    first = {"total": lambda: dist_clip.get_total_norm(target),
             "clip": lambda: dist_clip.clip_grad_norm_(target, 1.0)}.get(how)
    if first is None:
        config = {"autoclip": {"max_norm": dist_clip.AutoClip()}, "per_param": {"mode": "per_param"},
                  "report": {"report": True}, "unitwise": {"mode": "unitwise"}}.get(how, {})
        clipper = dist_clip.GradClipper(**config)
        first = lambda: clipper(target).total_norm  # noqa: E731
    b = torch.full((3,), 2.0)
    return _outcomes((first, lambda: dist_clip.get_total_norm([b], group=dist.group.WORLD)), (TypeError, RuntimeError))


def unitwise_tensor_not_a_parameter_on_one_rank(how: str) -> list[str]:
    """``mode="unitwise"`` over ``[w, x]`` (or ``{"w": w, "x": x}``): ``w`` a ``Shard(0)`` DTensor parameter on a 1-D
    mesh of 2 ranks with its gradient, ``x`` a parameter with a gradient on rank 0 and, on rank 1, a plain tensor
    (no gradient, not requiring one), which unit-wise clipping refuses there ("needs parameters"); "group": ``w``
    plain too, the list clipped with ``group=`` the world (``x`` a unit cut across the ranks). Then every rank
    measures a plain ``b`` over the world. Returns what each call gave: the exception's type, or the value."""
    from torch.distributed.tensor import Shard, distribute_tensor

    m = mesh((2,), ("dp",))
    if how == "group":
        w = nn.Parameter(torch.ones(4, 2))
        w.grad = torch.ones(4, 2)
    else:
        w = nn.Parameter(distribute_tensor(torch.ones(4, 2), m, [Shard(0)]))
        w.grad = distribute_tensor(torch.ones(4, 2), m, [Shard(0)])
    if dist.get_rank() == 0:
        x = nn.Parameter(torch.ones(3))
        x.grad = torch.ones(3)
    else:
        x = torch.ones(3)
    target = {"w": w, "x": x} if how == "mapping" else [w, x]
    clipper = dist_clip.GradClipper(mode="unitwise")
    group = dist.group.WORLD if how == "group" else None
    b = torch.full((3,), 2.0)
    return _outcomes((lambda: clipper(target, group=group).total_norm,
                      lambda: dist_clip.get_total_norm([b], group=dist.group.WORLD)), (TypeError, RuntimeError))


def unitwise_placements_differ_where_another_holds_none(how: str) -> list[str]:
    """``mode="unitwise"`` over a module (or ``[w, b]``) with a ``Shard(0)`` DTensor parameter ``w`` on a 1-D mesh of
    2 ranks: rank 0 holds a ``Replicate`` gradient of it (torch gives a vocab-parallel ``nn.Embedding`` one), which
    unit-wise clipping refuses there ("placements differ", ``NotImplementedError``), rank 1 none (the layer unused
    there: a stand-in, one collective). Then every rank measures a plain ``b`` over the world. Returns what each
    call gave: the exception's type, or the value."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    m = mesh((2,), ("dp",))
    mod = nn.Module()
    mod.w = nn.Parameter(distribute_tensor(torch.ones(4, 2), m, [Shard(0)]))
    mod.b = nn.Parameter(torch.ones(3))
    mod.b.grad = torch.full((3,), 2.0)
    if dist.get_rank() == 0:
        mod.w.grad = DTensor.from_local(torch.ones(4, 2), m, [Replicate()], run_check=False)
    target = mod if how == "module" else [mod.w, mod.b]
    clipper = dist_clip.GradClipper(mode="unitwise")
    return _outcomes((lambda: clipper(target).total_norm,
                      lambda: dist_clip.get_total_norm(mod.b, group=dist.group.WORLD)),
                     (NotImplementedError, RuntimeError))


def lone_parameter_without_gradient_on_one_rank(how: str) -> list[str]:
    """A lone ``Shard(0)`` DTensor parameter ``w`` (not in a list) on a 1-D mesh of 2 ranks, its gradient ones on
    rank 0's shard and ``None`` on rank 1 (the layer unused there): ``how`` measures ``w`` itself
    (``get_total_norm``, ``clip_grad_norm_`` or a ``GradClipper``), then every rank measures a plain ``b`` over
    the world. Returns what each call gave."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    m = mesh((2,), ("dp",))
    w = nn.Parameter(distribute_tensor(torch.ones(4, 2), m, [Shard(0)]))
    b = nn.Parameter(torch.ones(3))
    b.grad = torch.full((3,), 2.0)
    if dist.get_rank() == 0:
        w.grad = DTensor.from_local(torch.ones(2, 2), m, [Shard(0)], run_check=False)
    first = {"total": lambda: dist_clip.get_total_norm(w), "clip": lambda: dist_clip.clip_grad_norm_(w, 1.0),
             "clipper": lambda: dist_clip.GradClipper()(w).total_norm}[how]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ("the target holds no gradients on this rank", as for a list)
        return _outcomes((first, lambda: dist_clip.get_total_norm(b, group=dist.group.WORLD)), (RuntimeError,))


def dtensor_placements() -> dict[str, Any]:
    """Hand-made DTensor gradients on a 2x2 mesh of 4 ranks, every placement FSDP2 and TP produce.

    ``two_d``: Shard on both dims (FSDP x TP); ``strided``: ``_StridedShard`` (FSDP2 over TP; its
    ``is_shard()`` is False, yet it holds distinct pieces); ``replicated``: Replicate twice; ``hsdp``:
    (Replicate, Shard); ``slice``: Shard on the "shard" slice, whose two sibling slices hold equal copies.
    Each subset is one call: the plan (minimal or full) changes with the subset, the answer must not. The
    reference is the float64 norm of every tensor's ``full_tensor()``, each counted once.
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    m = mesh((2, 2), ("replicate", "shard"))
    rep, sh = m.get_coordinate()

    def make(name: str, shape: tuple[int, ...], device_mesh, placements, seed: tuple[int, ...]) -> Tensor:  # noqa: ANN001
        g = torch.Generator().manual_seed(zlib.crc32(repr((name, *seed)).encode()))  # hash() differs by process
        return DTensor.from_local(torch.randn(shape, generator=g), device_mesh, placements, run_check=False)

    grads = {
        "two_d": make("two_d", (3, 5), m, [Shard(0), Shard(1)], (rep, sh)),
        "strided": make("strided", (4, 3), m, [_StridedShard(0, split_factor=2), Replicate()], (rep,)),
        "replicated": make("replicated", (2, 3), m, [Replicate(), Replicate()], ()),
        "hsdp": make("hsdp", (5, 2), m, [Replicate(), Shard(0)], (sh,)),
        "slice": make("slice", (3, 4), m["shard"], [Shard(0)], (sh,)),
    }
    full = {n: g.full_tensor().double() for n, g in grads.items()}
    subsets = [tuple(grads), ("two_d",), ("strided",), ("replicated",), ("hsdp",), ("slice",), ("hsdp", "slice"),
               ("replicated", "hsdp"), ("strided", "slice")]
    out: dict[str, Any] = {}
    for subset in subsets:
        for p in PS:
            ref_norm = reference_norm([full[n] for n in subset], p)
            with count_collectives() as counted:
                total = dist_clip.get_total_norm([grads[n] for n in subset], p)
            if type(total) is not torch.Tensor or not _norm_close(float(total), ref_norm, RTOL):
                raise AssertionError(f"{subset} p={p}: {total!r} != reference {ref_norm}")
            expected = 0 if subset == ("replicated",) else 1
            if counted.total != expected:
                raise AssertionError(f"{subset} p={p}: {counted.names}, expected {expected} collective(s)")
            out[f"{'+'.join(subset)} p={p}"] = float(total)
        # Scaling: every local piece scaled by the one coefficient.
        saved = {n: grads[n]._local_tensor.clone() for n in subset}
        ref_norm = reference_norm([full[n] for n in subset], 2.0)
        dist_clip.clip_grad_norm_([grads[n] for n in subset], ref_norm / 4, 2.0)
        coef = (ref_norm / 4) / (ref_norm + 1e-6)
        for n in subset:
            _close(grads[n].full_tensor(), full[n] * coef, RTOL, ATOL, f"{subset} clipped {n}")
            grads[n]._local_tensor.copy_(saved[n])
    # A Partial gradient is not a gradient yet: every rank refuses it, none enters a collective.
    partial = DTensor.from_local(torch.ones(2), m, [Partial(), Shard(0)], run_check=False)
    try:
        dist_clip.get_total_norm([grads["hsdp"], partial])
    except ValueError as e:
        out["partial"] = str(e).split(":")[0]
    else:
        raise AssertionError("a Partial DTensor gradient was accepted")
    return out


class Tiny(nn.Module):
    """Two parameters in all: over 3 or 4 ranks some FSDP1 shards hold padding only (no gradient at all)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0]))

    def forward(self, x: Tensor) -> Tensor:
        return (x[:, :2] * self.w).sum(-1, keepdim=True)


def fsdp1_tiny(use_orig_params: bool) -> dict[str, Any]:
    """A FlatParameter smaller than the world: ranks whose shard is padding only must still join the call."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    rank, ws = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Tiny()
    ref = reference(model, list(range(ws)))
    fsdp_model = FSDP(model, use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    loss_fn(fsdp_model, *batch(rank)).backward()

    grads, params = _fsdp1_full_views(fsdp_model)

    case = Case(
        fsdp_model, ref, grads, params, lambda max_norm, p: fsdp_model.clip_grad_norm_(max_norm, p),
        check_local_grads=None if use_orig_params else _fsdp1_flat_checker(fsdp_model),
    )
    # The per-parameter path (GradClipper's report) shares the adapter's plan: padding-only ranks join it too.
    from dist_clip import ClipperConfig, GradClipper

    with count_collectives() as counted:
        report = GradClipper(ClipperConfig(max_norm=1e9, mode="per_param", report=True))(fsdp_model).norms
    want = {n: torch.linalg.vector_norm(g).item() for n, g in ref.grads.items()}
    assert counted.total == 1, counted.names
    assert report.keys() == want.keys() and all(_norm_close(report[n], want[n], RTOL) for n in want), (report, want)
    # AGC's per-unit path too: a rank holding padding only joins its one collective (it used to skip it and
    # return a local 0, leaving the others waiting).
    from dist_clip import AGC

    with count_collectives() as counted:
        agc = GradClipper(ClipperConfig(agc=AGC(clipping=1e9), mode="unitwise", report=True))(fsdp_model)
    assert counted.total == 1, counted.names
    assert agc.norms.keys() == want.keys() and all(_norm_close(agc.norms[n], want[n], RTOL) for n in want), agc.norms
    total = reference_norm(list(ref.grads.values()), 2.0)
    assert _norm_close(agc.total_norm.item(), total, RTOL), (agc.total_norm.item(), total)
    # Gradient entries this rank holds, padding excluded (a flat grad of padding only is all padding).
    held = sum(
        q.grad.numel() - getattr(q, "_shard_numel_padded", 0) for q in fsdp_model.parameters() if q.grad is not None
    )
    return {"per_p": run_case(case), "nothing_here": held == 0}


def fsdp1_tiny_float64(use_orig_params: bool, agree_on_host: bool = True, keep_low: bool = False,
                       full_in_eval: bool = False) -> dict[str, Any]:
    """The tiny model in float64: every rank returns the same float64 total, the padding-only ones included.

    ``agree_on_host=False``: the ranks do not agree on the result's dtype through the collective, as on NCCL
    (:func:`dist_clip._reduce.reduces_on_host` false): each rank's own pieces decide it, and a padding-only rank
    under ``use_orig_params`` (no gradient at all) takes it from its handle's empty stand-in (without it, float32
    there beside float64 elsewhere).

    ``keep_low``: ``MixedPrecision(param_dtype=float32, keep_low_precision_grads=True)`` over the float64 model:
    the gradients are float32, and so must the total be on every rank, the padding-only ones included (their
    stand-in took the float64 parameters' dtype: float64 on every rank on gloo, and on NCCL float64 there beside
    float32 elsewhere).

    ``full_in_eval``: with ``keep_low``, the backward and the clip in eval mode under FSDP's
    ``FSDP_USE_FULL_PREC_IN_EVAL=1``, which forces full precision there: the gradients are float64 again, and so
    must the total be (the padding-only ranks' stand-ins included)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from dist_clip import ClipperConfig, GradClipper, _reduce

    if not agree_on_host:
        real = _reduce.reduces_on_host
        _reduce.reduces_on_host = lambda group, device: False  # type: ignore[assignment]
        try:
            return fsdp1_tiny_float64(use_orig_params, keep_low=keep_low, full_in_eval=full_in_eval)
        finally:
            _reduce.reduces_on_host = real  # (the ranks are reused)
    if full_in_eval and "FSDP_USE_FULL_PREC_IN_EVAL" not in os.environ:
        os.environ["FSDP_USE_FULL_PREC_IN_EVAL"] = "1"  # (read as FSDP wraps the model)
        try:
            return fsdp1_tiny_float64(use_orig_params, keep_low=keep_low, full_in_eval=True)
        finally:
            del os.environ["FSDP_USE_FULL_PREC_IN_EVAL"]  # (the ranks are reused)

    rank, ws = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Tiny().double()
    ref = reference(model, list(range(ws)))
    kw: dict[str, Any] = {}
    if keep_low:
        from torch.distributed.fsdp import MixedPrecision

        kw["mixed_precision"] = MixedPrecision(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                               keep_low_precision_grads=True)
    fsdp_model = FSDP(model, use_orig_params=use_orig_params, device_id=torch.device("cpu"), **kw)
    if full_in_eval:
        fsdp_model.eval()
    loss_fn(fsdp_model, *batch(rank, torch.float64)).backward()
    held = sum(
        q.grad.numel() - getattr(q, "_shard_numel_padded", 0) for q in fsdp_model.parameters() if q.grad is not None
    )
    total = dist_clip.get_total_norm(fsdp_model, 2.0)
    result = GradClipper(ClipperConfig(max_norm=1e9, mode="per_param", report=True))(fsdp_model)
    want = reference_norm(list(ref.grads.values()), 2.0)
    return {"dtype": str(total.dtype), "total": total.item(), "want": want, "nothing_here": held == 0,
            "clipper_dtype": str(result.total_norm.dtype), "report": sorted(result.norms),
            "grad_dtypes": sorted({str(q.grad.dtype) for q in fsdp_model.parameters() if q.grad is not None})}


def replicated_on_a_submesh() -> list[float]:
    """A Replicate DTensor on a mesh without rank 0 (beside a Shard(0) one on the world, or on disjoint 2-rank
    meshes): counted once, on every rank's total (the minimal plan left it to rank 0, which does not hold it)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    ws = dist.get_world_size()
    a_full = torch.arange(1.0, 7.0).reshape(6, 1)
    b_full = torch.full((4,), 2.0)
    world = DeviceMesh("cpu", list(range(ws)))
    upper = DeviceMesh("cpu", list(range(1, ws)))
    out = []
    layouts = [(world, upper)]
    if ws == 4:
        layouts.append((DeviceMesh("cpu", [0, 1]), DeviceMesh("cpu", [2, 3])))
    for a_mesh, b_mesh in layouts:
        for p in (0.0, 1.0, 2.0, 3.5, math.inf):
            a = distribute_tensor(a_full.clone(), a_mesh, [Shard(0)])  # it may share the storage
            b = distribute_tensor(b_full.clone(), b_mesh, [Replicate()])
            want = reference_norm([a_full, b_full], p)
            with count_collectives() as calls:
                total = dist_clip.clip_grad_norm_([a, b], 0.5, p)
            assert calls.total == 1, calls.names
            assert _norm_close(total.item(), want, RTOL), (p, total.item(), want)
            coef = min(1.0, 0.5 / (want + 1e-6))
            if a_mesh.get_coordinate() is not None:
                torch.testing.assert_close(a.full_tensor(), a_full * coef, rtol=1e-6, atol=1e-7)
            if b_mesh.get_coordinate() is not None:
                torch.testing.assert_close(b.to_local(), b_full * coef, rtol=1e-6, atol=1e-7)
            out.append(total.item())
    return out


def fsdp2_rank_without_gradients() -> dict[str, Any]:
    """FSDP2 on a 1-D mesh, the last rank's gradients dropped (set to None): it must still join the other
    ranks' collective (it returned 0 at once while they waited in the all-reduce until the timeout), and the
    total is the norm of the gradients the others hold, in total mode and in the named modes; a parameter
    without a gradient anywhere stays out of reports."""
    from torch.distributed.fsdp import fully_shard

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model()
    m = mesh((ws,))
    for module in (model.inp, *model.blocks, model.head, model):
        fully_shard(module, mesh=m)
    loss_fn(model, *batch(rank)).backward()
    model.scale.grad = None  # no gradient on any rank
    if rank == ws - 1:
        model.zero_grad(set_to_none=True)
    pieces = [p.grad._local_tensor.double() for p in model.parameters() if p.grad is not None]
    mine = torch.cat([t.reshape(-1) for t in pieces]) if pieces else torch.zeros(0, dtype=torch.float64)
    gathered = [None] * ws
    dist.all_gather_object(gathered, mine)
    want = float(torch.linalg.vector_norm(torch.cat(gathered)))
    total = float(dist_clip.get_total_norm(model))
    report = dist_clip.GradClipper(max_norm=1e9, mode="per_param", report=True)(model)
    # AGC too: that rank skipped the collective (its units were all absent), returned 0 and left the others
    # waiting until the timeout.
    agc = dist_clip.GradClipper(mode="unitwise", agc=dist_clip.AGC(clipping=1e9))(model)
    return {"total": total, "want": want, "per_param_total": float(report.total_norm),
            "report": sorted(report.norms), "agc_total": float(agc.total_norm)}


def dp_over_tp_refused() -> list[str]:
    """DDP or composable ``replicate()`` over a ``parallelize_module`` model on a 2 x 2 (dp, tp) mesh: torch swaps
    the DTensor parameters for local tensors around the wrapper and, after the forward, the module registers only
    the LayerNorm and the last Linear, so the total silently missed the tensor-parallel layers (0.907 for 1.402).
    Refused on every rank, from the wrapper, the module under it, a container holding it and under a plan."""
    from torch.distributed._composable.replicate import replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from dist_clip import ParallelPlan, Rule
    from dist_clip import compose as plans

    m = mesh((2, 2), ("dp", "tp"))
    messages = []
    for how in ("ddp", "replicate"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 8), nn.LayerNorm(8), nn.Linear(8, 3))
        parallelize_module(model, m["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        if how == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model, device_mesh=m["dp"])
        else:
            wrapped = replicate(model, device_mesh=m["dp"])
        wrapped(torch.randn(4, 8, generator=torch.Generator().manual_seed(m.get_coordinate()[0]))).sum().backward()
        names = ("0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias", "4.weight", "4.bias")
        plan = ParallelPlan(m, names=names, rules=(Rule("*"),))
        calls = [(dist_clip.get_total_norm, (wrapped,)), (dist_clip.clip_grad_norm_, (model, 1.0)),
                 (dist_clip.get_total_norm, (nn.ModuleList([wrapped]),)), (plans.get_total_norm, (wrapped, plan))]
        for i, (call, args) in enumerate(calls):
            with count_collectives() as counted:
                try:
                    call(*args)
                except ValueError as e:
                    messages.append(str(e))
                else:
                    raise AssertionError(f"{how}: DP over TP was measured")
            # (a plan agrees on its refusals in one collective: one stage's bad input raises on every rank)
            assert counted.total == (1 if i == 3 else 0), (how, i, counted.total)
        # Without tensor parallelism, over the same sliced mesh (a pipeline stage's, as torchtitan wraps it):
        # torch puts the same pre-hook on the module, and it was refused too; measured, and right.
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3))
        ref = copy.deepcopy(plain).double()
        if how == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(plain, device_mesh=m["dp"])
        else:
            wrapped = replicate(plain, device_mesh=m["dp"])
        dp = m.get_coordinate()[0]
        wrapped(torch.randn(4, 8, generator=torch.Generator().manual_seed(dp))).sum().backward()
        torch.stack([ref(torch.randn(4, 8, generator=torch.Generator().manual_seed(d)).double()).sum()
                     for d in range(2)]).mean().backward()
        want = reference_norm([q.grad for q in ref.parameters()], 2.0)
        for group in (None, m["dp"].get_group()):
            got = float(dist_clip.get_total_norm(wrapped, group=group))
            assert abs(got - want) <= 1e-6 * want, (how, got, want)
    return messages


def group_over_sliced_meshes() -> dict[str, Any]:
    """``group=`` over gradients on mesh slices, 4 ranks, every p, against the float64 unsharded model.

    * FSDP2 over tensor parallelism (2 dp x 2 tp): the LayerNorm and the plain Linear are sharded on
      ``mesh["dp"]`` alone, so the two tp slices hold equal copies of them; ``group=WORLD`` (or a new group of
      every rank) must count them once, as no ``group=`` does (it counted them twice: 1.60 for 1.38).
    * pipeline stages (2 pp x 2 dp): each stage a different model sharded on its own ``mesh["dp"]``;
      ``group=WORLD`` sums the stages (other slices no gradient of the rank spans hold other pieces).
    * HSDP 2x2 with ``group=`` its replicate group, which misses the other shard: a ``ValueError`` on every
      rank (each replica read a different wrong total, 0.33 / 0.27 for 0.43).
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    rank = dist.get_rank()
    out: dict[str, Any] = {}
    everyone = dist.new_group(list(range(dist.get_world_size())))

    def seq(seed: int, widths: tuple[int, ...]) -> nn.Sequential:
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        return nn.Sequential(*layers[:-1], nn.LayerNorm(widths[-1]))

    def data(d: int, width: int) -> Tensor:
        return torch.randn(4, width, generator=torch.Generator().manual_seed(50 + d)) * 2

    def check(model: nn.Module, want_grads: list[Tensor], what: str, with_none: bool) -> None:
        full = [q.grad.full_tensor() for q in model.parameters()]
        saved = [_local(q.grad).clone() for q in model.parameters()]
        for p in PS:
            want = reference_norm(want_grads, p)
            for gname, group in (("none", None), ("WORLD", dist.group.WORLD), ("new_group", everyone))[not with_none:]:
                with count_collectives() as calls:
                    total = dist_clip.get_total_norm(model, p, group=group)
                if not _norm_close(float(total), want, RTOL) or calls.total != 1:
                    raise AssertionError(f"{what} p={p} group={gname}: {float(total)} ({calls.names}), want {want}")
                if not with_none:
                    continue  # stages name their parameters alike ("0.weight"): per-parameter needs a ParallelPlan
                report = dist_clip.GradClipper(max_norm=1e9, norm_type=p, mode="per_param", report=True)(
                    model, group=group)
                if not _norm_close(float(report.total_norm), want, RTOL):
                    raise AssertionError(f"{what} p={p} group={gname}: per_param total {float(report.total_norm)}")
            total = dist_clip.clip_grad_norm_(model, want / 3, p, group=dist.group.WORLD)
            coef = min(1.0, (want / 3) / (want + 1e-6))
            for q, f in zip(model.parameters(), full):
                _close(q.grad.full_tensor(), f.double() * coef, RTOL, ATOL, f"{what} p={p} clipped")
            for q, s in zip(model.parameters(), saved):
                _local(q.grad).copy_(s)
            out[f"{what} p={p}"] = float(total)

    # FSDP2 over TP.
    m = mesh((2, 2), ("dp", "tp"))
    dp = m.get_coordinate()[0]
    model = seq(7, (6, 12, 5, 3))  # 0: Linear 6->12, 2: Linear 12->5, 4: Linear 5->3, 5: LayerNorm
    ref = copy.deepcopy(model).double()
    parallelize_module(model, m["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=m["dp"])
    model(data(dp, 6)).square().mean().backward()
    torch.stack([ref(data(d, 6).double()).square().mean() for d in range(2)]).mean().backward()
    check(model, [q.grad for q in ref.parameters()], "fsdp2+tp", with_none=True)

    # Pipeline stages as slices of a (pp, dp) mesh, each a different model.
    m = mesh((2, 2), ("pp", "dp"))
    stage, dp = m.get_coordinate()
    widths = ((5, 9, 4), (4, 3, 7, 2))[stage]
    model = seq(20 + stage, widths)
    ref = copy.deepcopy(model).double()
    fully_shard(model, mesh=m["dp"])
    model(data(dp, widths[0])).square().mean().backward()
    torch.stack([ref(data(d, widths[0]).double()).square().mean() for d in range(2)]).mean().backward()
    stages: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(stages, (stage, [q.grad for q in ref.parameters()]))
    check(model, [g for s in (0, 1) for g in next(grads for st, grads in stages if st == s)], "pipeline",
          with_none=False)  # the stages are not visible in the gradients: group= says they are there

    # HSDP with its replicate group: refused on every rank.
    m = mesh((2, 2), ("replicate", "shard"))
    model = seq(30, (5, 6, 3))
    fully_shard(model, mesh=m)
    model(data(rank, 5)).square().mean().backward()
    try:
        dist_clip.get_total_norm(model, group=m["replicate"].get_group())
    except ValueError as e:
        out["replicate group"] = str(e).split(" holds ranks")[0] + " ... " + str(e).split("outside the group")[1][:30]
    else:
        raise AssertionError("group= missing the shard peers was accepted")

    # FSDP1 the same: HYBRID_SHARD with its replicate group, FULL_SHARD over the world with a half of it; every
    # mode (each half returned the norm of its own shards: 1.42 and 2.74 for 3.09).
    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    for strategy, grp in (("HYBRID_SHARD", "replicate"), ("FULL_SHARD", "half")):
        model = _fsdp1_wrap(new_model(31), strategy, use_orig_params=True)
        loss_fn(model, *batch(rank)).backward()
        sub = model._inter_node_pg if grp == "replicate" else halves[rank // 2]
        for mode in ("total", "per_param", "unitwise"):
            try:
                if mode == "total":
                    dist_clip.get_total_norm(model, group=sub)
                elif mode == "unitwise":
                    dist_clip.GradClipper(mode="unitwise")(model, group=sub)
                else:
                    dist_clip.GradClipper(max_norm=1.0, mode=mode)(model, group=sub)
            except ValueError as e:
                out[f"fsdp1 {strategy} {mode}"] = str(e).split(" holds ranks")[0] + " ... " + str(e).split(
                    "outside the group")[0][-12:]
            else:
                raise AssertionError(f"FSDP1 {strategy} {mode}: group= missing the shard peers was accepted")
    return out


def dtensor_norm_values() -> dict[str, Any]:
    """``torch.nn.utils.get_total_norm`` of FSDP2 gradients is a DTensor (``Replicate``, ``Partial`` for inf):
    as ``total_norm`` of ``clip_grads_with_norm_`` and as ``max_norm`` it stands for its full value (it raised
    "got mixed torch.Tensor and DTensor")."""
    from torch.distributed.fsdp import fully_shard

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model()
    ref = reference(model, list(range(ws)))
    for module in (model.inp, *model.blocks, model.head, model):
        fully_shard(module, mesh=mesh((ws,)))
    loss_fn(model, *batch(rank)).backward()
    saved = [_local(q.grad).clone() for q in model.parameters()]
    out: dict[str, Any] = {}
    for p in (2.0, math.inf):
        want = reference_norm(list(ref.grads.values()), p)
        if p == 2.0:
            theirs, value = torch.nn.utils.get_total_norm([q.grad for q in model.parameters()], p), want
        else:  # get_total_norm(inf) raises on the empty shards of small parameters: one weight's max, Partial
            theirs = torch.linalg.vector_norm(model.inp.weight.grad, p)
            value = reference_norm([ref.grads["inp.weight"]], p)
        assert _is_dtensor(theirs), type(theirs)
        for how in ("clip_grads_with_norm_", "max_norm"):
            if how == "clip_grads_with_norm_":
                coef = min(1.0, (want / 4) / (value + 1e-6))
                dist_clip.clip_grads_with_norm_(model, want / 4, theirs)
            else:
                coef = min(1.0, (value / 4) / (want + 1e-6))
                total = dist_clip.clip_grad_norm_(model, theirs / 4, p)  # a DTensor max_norm
                assert _norm_close(float(total), want, RTOL), (p, float(total), want)
            for n, q in model.named_parameters():
                _close(q.grad.full_tensor(), ref.grads[_clean(n)] * coef, 1e-4, ATOL, f"{how} p={p} {n}")
            for q, s in zip(model.parameters(), saved):
                _local(q.grad).copy_(s)
            out[f"{how} p={p}"] = "ok"
    return out


def short_meshes_and_stage_ties() -> dict[str, Any]:
    """4 ranks, hand-made DTensors, against float64 sums of squares.

    * A Shard(0) gradient on a mesh of ranks 0-1 beside one replicated over the world, no group=: ranks 2-3
      read only the replicated one (2.0 for 8.72) and clipped their copy of it by another coefficient.
    * A Shard(0) gradient on ranks 1-3 alone: rank 0 read 0; AGC there is a NotImplementedError on every rank.
    * Pipeline stages on a (pp, dp) mesh with group=WORLD, plus a weight tied between the stages on a mesh of
      its own (ranks 0 and 2): the stages summed (rank 2 took its stage's block for a copy of rank 0's, as
      the tied weight's mesh spans both: 18.03 for 18.47).
    * AGC with group= over those stages where a unit is cut across ranks: a NotImplementedError on every rank
      (the stages' units were combined with each other: silently wrong rows).
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out: dict[str, Any] = {}

    def param(full: Tensor, m: Any, placements: list[Any]) -> nn.Parameter:  # noqa: ANN401
        w = nn.Parameter(distribute_tensor(full + 1, m, placements, src_data_rank=None))
        w.grad = distribute_tensor(full.clone(), m, placements, src_data_rank=None)
        return w

    world = mesh((4,))
    a, b = torch.full((4, 2), 3.0), torch.full((2, 2), 1.0)
    pa, pb = param(a, DeviceMesh("cpu", [0, 1]), [Shard(0)]), param(b, world, [Replicate()])
    want = math.sqrt(float((a**2).sum() + (b**2).sum()))
    total = float(dist_clip.clip_grad_norm_([pa, pb], 1.0))
    assert _norm_close(total, want, RTOL), (total, want)
    coef = 1.0 / (want + 1e-6)
    torch.testing.assert_close(pb.grad._local_tensor, b * coef)  # every rank's copy alike
    out["short mesh + world"] = round(total, 5)

    full = torch.arange(1.0, 13.0).reshape(6, 2)
    g = param(full, DeviceMesh("cpu", [1, 2, 3]), [Shard(0)])
    for p in PS:
        got = float(dist_clip.get_total_norm([g], p))
        assert _norm_close(got, reference_norm([full], p), RTOL), (p, got)
    try:
        dist_clip.GradClipper(mode="unitwise", agc=dist_clip.AGC(clipping=0.05))([g])
    except NotImplementedError as e:
        out["agc short mesh"] = str(e).split(":")[0]

    pp = mesh((2, 2), ("pp", "dp"))
    stage = pp.get_coordinate()[0]
    blocks = [torch.tensor([[1.0], [2.0]]), torch.tensor([[4.0], [8.0]])]
    emb = torch.tensor([[16.0]])
    tie_mesh = DeviceMesh("cpu", [0, 2])
    pieces = [param(blocks[stage], pp["dp"], [Shard(0)]), param(emb, tie_mesh, [Replicate()])]
    want = math.sqrt(sum(float((t**2).sum()) for t in (*blocks, emb)))
    for call in ("norm", "agc"):
        if call == "norm":
            got = float(dist_clip.get_total_norm(pieces, 2.0, group=dist.group.WORLD))
        else:
            got = float(dist_clip.GradClipper(mode="unitwise", agc=dist_clip.AGC(clipping=100.0))(
                pieces, group=dist.group.WORLD).total_norm)
        assert _norm_close(got, want, RTOL), (call, got, want)
        out[f"stages + tie {call}"] = round(got, 5)
    cut = param(torch.arange(1.0, 9.0).reshape(2, 4) * (stage + 1), pp["dp"], [Shard(1)])
    try:
        dist_clip.GradClipper(mode="unitwise", agc=dist_clip.AGC(clipping=0.05))([cut], group=dist.group.WORLD)
    except NotImplementedError as e:
        out["agc cut across stages"] = str(e).split(":")[0]
    return out


def fsdp2_post_forward_reshard() -> list[float]:
    """``reshard_after_forward=2`` on 4 ranks: after a forward without backward (an evaluation one) FSDP2
    registers DTensors on the 2-rank mesh, without gradient; the reduced gradients are on the sharded
    parameters. Both the module and its parameter list left them out (14.48 for 15.36, silently)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    fully_shard(m[0], reshard_after_forward=2)
    fully_shard(m)
    torch.manual_seed(100 + dist.get_rank())
    m(torch.randn(5, 8)).sum().backward()
    want = reference_norm([p.grad.full_tensor() for p in m.parameters()], 2.0)
    with torch.no_grad():
        m(torch.randn(5, 8))
    assert all(p.grad is None for p in m[0].parameters())  # the post-forward DTensors are registered
    return [want, dist_clip.get_total_norm(list(m.parameters())).item(), dist_clip.get_total_norm(m).item()]


def fsdp1_padded_rank_skips_with_the_others(bad: float) -> dict[str, Any]:
    """FSDP1 (flat parameters) with a fused AdamW and ``optimizer=``: 43 elements on 2 ranks leave rank 1's shard
    one element of padding, which its optimizer steps but nobody measured, so that rank scales in the call while
    rank 0 hands the coefficient over. A non-finite gradient on rank 0 skipped rank 0's step only: rank 1
    stepped with NaN (its parameters and Adam state NaN for good) or, for inf, with zeroed gradients."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.manual_seed(0)
    model = FSDP(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), device_id=torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    (flat,) = list(model.parameters())
    out: dict[str, Any] = {"padded": int(flat._shard_numel_padded)}
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(2, 4, generator=torch.Generator().manual_seed(step + 10 * dist.get_rank()))).sum().backward()
        if step == 1 and dist.get_rank() == 0:
            flat.grad.view(-1)[0] = bad
        total = dist_clip.clip_grad_norm_(model, 1.0, optimizer=opt)
        before = flat.detach().clone()
        opt.step()
        out[f"step {step}"] = (math.isfinite(total.item()), not torch.equal(before, flat.detach()),
                               bool(flat.detach().isfinite().all()), float(opt.state[flat]["step"]))
    return out


def gradients_dropped_on_one_rank(case: str) -> dict[str, Any]:
    """Rank 0 sets some FSDP2 gradients to None (4 ranks, block 0 on an HSDP 2x2 mesh). "mixed": block 1 on a 1-D
    world mesh, its gradients dropped on rank 0; "plain": block 1 left unsharded (averaged by hand), block 0's
    dropped on rank 0. Rank 0 planned from the gradients it held: a collective over its shard group while the
    others reduced over the world (every rank hung until the timeout), or none at all (rank 0 returned its own
    total at once, and its next call met the others' current one). Every rank of a reduction now returns the
    total of the shards left."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    fully_shard(model[0], mesh=mesh((2, 2), ("replicate", "shard")))
    if case == "mixed":
        fully_shard(model[2], mesh=mesh((4,)))
    out: dict[str, Any] = {}
    rank = dist.get_rank()
    for call in ("module", "list", "generator", "per_param", "clip"):
        model.zero_grad()
        torch.manual_seed(rank)
        model(torch.randn(4, 5)).pow(2).sum().backward()
        if case == "plain":
            for q in model[2].parameters():
                dist.all_reduce(q.grad)
                q.grad.div_(4)
        dropped = model[2] if case == "mixed" else model[0]
        full = {id(q): (q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad).double()
                for q in model.parameters()}
        mine = torch.tensor([sum(float(q.grad._local_tensor.double().pow(2).sum()) for q in dropped.parameters())],
                            dtype=torch.float64)
        dist.broadcast(mine, 0)  # what rank 0 drops
        everything = sum(float(g.pow(2).sum()) for g in full.values())
        # "plain": the replicas [0, 1] and [2, 3] each total their own shards (README: HSDP replicas decide apart)
        left = everything - float(mine) if case == "mixed" or rank in (0, 1) else everything
        if rank == 0:
            for q in dropped.parameters():
                q.grad = None
        if call == "module":
            got = dist_clip.get_total_norm(model).item()
        elif call == "list":
            got = dist_clip.get_total_norm(list(model.parameters())).item()
        elif call == "generator":
            got = dist_clip.get_total_norm(model.parameters()).item()
        elif call == "per_param":
            got = dist_clip.GradClipper(max_norm=1e9, mode="per_param")(model, report=True).total_norm.item()
        else:
            got = dist_clip.clip_grad_norm_(model, 1e9).item()
        out[call] = _norm_close(got, math.sqrt(left), RTOL) or (got, math.sqrt(left))
    # Five calls in a row, each right: none met another's collective.
    return out


def stand_ins_keep_dtype_warning_and_lists() -> dict[str, Any]:
    """Three things around the empty stand-ins for None FSDP2 gradients: an unused float64 layer made the result
    float64 where every gradient was float32; a list of parameters without any gradient (sync off, or before the
    backward) lost the empty-target warning; and after an evaluation forward (the root stays unsharded) the
    named modes on a list left out the root's parameters (1.95 for 3.27), as the total did not."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4).double()

        def forward(self, x: Tensor) -> Tensor:
            return self.b(torch.tanh(self.a(x)))

    out: dict[str, Any] = {}
    torch.manual_seed(0)
    model = Net()
    for sub in (model.a, model.unused, model):
        fully_shard(sub, mesh=mesh((dist.get_world_size(),)))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out["no grads warns"] = (dist_clip.get_total_norm(list(model.parameters())).item(),
                                 any("holds no gradients" in str(w.message) for w in seen))
    torch.manual_seed(dist.get_rank())
    x = torch.randn(3, 4)
    model(x).pow(2).sum().backward()
    out["dtype"] = str(dist_clip.get_total_norm(model).dtype)
    # The unused layer's stand-ins count nothing, no presence either: it stays out of reports as in every mode
    out["reported"] = sorted(dist_clip.GradClipper(max_norm=1e9, mode="per_param", report=True)(model).norms)
    want = reference_norm([q.grad.full_tensor() for q in model.parameters() if q.grad is not None], 2.0)
    with torch.no_grad():
        model(x)  # an evaluation forward: the root's parameters stay unsharded
    got = {
        "total": dist_clip.get_total_norm(list(model.parameters())).item(),
        "report": dist_clip.GradClipper(max_norm=1e9)(list(model.parameters()), report=True).total_norm.item(),
        "per_param": dist_clip.GradClipper(max_norm=1e9, mode="per_param")(model.parameters()).total_norm.item(),
        "unitwise": dist_clip.GradClipper(mode="unitwise", agc=dist_clip.AGC(clipping=1e9))(
            list(model.parameters())).total_norm.item(),
    }
    out["after eval"] = {k: _norm_close(v, want, RTOL) or (v, want) for k, v in got.items()}
    # The stand-ins are kept per parameter: built anew each call, 500 of them added 35 ms to every call.
    from torch.distributed.tensor import DTensor

    made: list[int] = []
    kept = DTensor.__dict__["from_local"]

    def counting(*args: Any, **kwargs: Any) -> Any:
        made.append(1)
        return kept.__func__(*args, **kwargs)

    first = dist_clip.get_total_norm(model).item()
    DTensor.from_local = counting  # type: ignore[method-assign]
    try:
        again = [dist_clip.get_total_norm(model).item() for _ in range(2)]
    finally:
        DTensor.from_local = kept  # type: ignore[method-assign]
    out["stand-ins kept"] = (len(made), again == [first, first], _norm_close(first, want, RTOL))
    # Kept without a weak reference on the parameters: one made module.to()/.float() refuse to swap them ("Cannot
    # swap t1 because it has weakref associated with it", review36), on the ranks that had made stand-ins only.
    model.to(torch.float64)
    model.float()
    out["moved after"] = {str(q.dtype) for q in model.parameters()} == {"torch.float32"}
    return out


def stand_ins_of_any_layout_and_lists_empty_on_one_rank() -> dict[str, Any]:
    """hunt111: a stand-in was a 1-D empty tensor, which a Shard(1) placement cannot lay out (FSDP2's
    shard_placement_fn, RowwiseParallel weights): "Sharding dim 1 greater than tensor ndim 1" on valid input; and
    a list whose gradients were all None on one rank returned 0 there without a collective while the others
    waited for it until the timeout (the module target joined)."""
    import warnings

    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x)

    out: dict[str, Any] = {}
    world = dist.get_world_size()
    for how in ("shard_placement_fn", "rowwise"):
        torch.manual_seed(0)
        model = Net()
        if how == "shard_placement_fn":
            def dim1(p: Tensor) -> Any:
                return Shard(1) if p.ndim == 2 else Shard(0)

            for sub in (model.used, model.unused, model):
                fully_shard(sub, mesh=mesh((world,)), shard_placement_fn=dim1)
            torch.manual_seed(dist.get_rank())
            x = torch.randn(3, 8)
        else:
            parallelize_module(model, mesh((world,)), {"used": RowwiseParallel(), "unused": RowwiseParallel()})
            x = torch.randn(3, 8 // world)  # the same input on every rank (seeded alike)
        model(x).pow(2).sum().backward()
        want = reference_norm([q.grad.full_tensor() for q in model.parameters() if q.grad is not None], 2.0)
        got = [dist_clip.get_total_norm(model).item(), dist_clip.get_total_norm(list(model.parameters())).item(),
               dist_clip.clip_grad_norm_(model.parameters(), 1e9).item()]
        out[how] = all(_norm_close(g, want, RTOL) for g in got) or (got, want)
    # One rank's list holds no gradient at all: it joins the others' total, and says so.
    torch.manual_seed(0)
    model = Net()
    for sub in (model.used, model.unused, model):
        fully_shard(sub, mesh=mesh((world,)))
    torch.manual_seed(dist.get_rank())
    model(torch.randn(3, 8)).pow(2).sum().backward()
    if dist.get_rank() == 1:
        model.zero_grad(set_to_none=True)
    module_total = dist_clip.get_total_norm(model).item()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        listed = dist_clip.get_total_norm(list(model.parameters())).item()
        clipped = dist_clip.clip_grad_norm_(model.parameters(), 1e9).item()
    said = any("no gradients on this rank" in str(w.message) for w in seen)
    totals: list[Any] = [None] * world
    dist.all_gather_object(totals, (module_total, listed, clipped))
    out["list empty on one rank"] = (len({t for row in totals for t in row}) == 1 and module_total > 0,
                                     said == (dist.get_rank() == 1))
    return out


def two_jobs_nested_groups() -> dict[str, Any]:
    """4 ranks, two independent 2-rank jobs (ranks 0-1 and 2-3, different data), each an FSDP1 root over one
    ``new_group`` of its pair and its blocks over another object of the same ranks: the call reduced over the
    world, adding the other job's gradients (10.59 on every rank for 3.46 and 10.01; a job calling alone
    waited for the other until the timeout). Each job's own norm, clip and unit-wise verdict now."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    rank = dist.get_rank()
    job = rank // 2
    # every rank creates every group, in the same order (torch's rule for new_group)
    roots = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    inners = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    model = new_model(5 + job)
    ref = reference(model, [2 * job, 2 * job + 1])
    kw: dict[str, Any] = {"device_id": torch.device("cpu"), "use_orig_params": True}
    for i, block in enumerate(model.blocks):
        model.blocks[i] = FSDP(block, process_group=inners[job], **kw)
    wrapped = FSDP(model, process_group=roots[job], ignored_modules=[model.side], **kw)
    loss_fn(wrapped, *batch(rank)).backward()
    for q in model.side.parameters():  # side is ignored by FSDP1: averaged over the job by hand
        dist.all_reduce(q.grad, group=roots[job])
        q.grad.div_(2)
    out: dict[str, Any] = {}
    for p in (2.0, math.inf, 1.0):
        want = reference_norm(list(ref.grads.values()), p)
        with count_collectives() as calls:
            got = float(dist_clip.get_total_norm(wrapped, p))
        out[f"p={p}"] = (_norm_close(got, want, 1e-6), calls.total)
    want = reference_norm(list(ref.grads.values()), 2.0)
    res = dist_clip.GradClipper(max_norm=want / 4, mode="per_param")(wrapped)
    out["per_param"] = _norm_close(float(res.total_norm), want, 1e-6)
    return out


def permuted_mesh_copies() -> dict[str, Any]:
    """4 ranks. DTensor gradients on 2-D meshes whose ranks are not in row-major order, measured with group= (and
    under a ParallelPlan, and unit-wise): a copy counted where this rank was the group's lowest along each copy
    line alone, which on [[3, 1], [0, 2]] held for two ranks (2.83 for 2.0; sqrt(40) for sqrt(28)). The group's
    lowest rank among all the copies counts."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    world = dist.group.WORLD
    out: dict[str, Any] = {}
    for layout in ([[0, 1], [2, 3]], [[3, 1], [0, 2]], [[2, 0], [3, 1]], [[1, 3], [2, 0]]):
        m = DeviceMesh("cpu", layout, mesh_dim_names=("a", "b"))
        g = DTensor.from_local(torch.full((4,), 1.5), m, [Replicate(), Replicate()], run_check=False)
        w = DTensor.from_local(torch.ones(2, 2), m, [Shard(0), Shard(1)], run_check=False)
        b = DTensor.from_local(torch.full((3,), 2.0), m["b"], [Replicate()], run_check=False)
        got = []
        for p in (1.0, 2.0, math.inf):
            want = reference_norm([t.full_tensor() for t in (g, w, b)], p)
            got.append(_norm_close(float(dist_clip.get_total_norm([g, w, b], p, group=world)), want, 1e-6))
        want = reference_norm([g.full_tensor()], 2.0)
        plan = dist_clip.ParallelPlan(m, names=["w"], rules=(dist_clip.Rule("*"),))
        got.append(_norm_close(float(dist_clip.GradClipper(max_norm=1e9)({"w": g}, plan=plan).total_norm), want, 1e-6))
        ps = [nn.Parameter(DTensor.from_local(torch.ones(4), m, [Replicate(), Replicate()], run_check=False))]
        ps[0].grad = g.clone()
        res = dist_clip.GradClipper(mode="unitwise", agc=dist_clip.AGC(1e9))(ps, group=world)
        got.append(_norm_close(float(res.total_norm), want, 1e-6))
        params = [nn.Parameter(torch.zeros_like(t)) for t in (g, w, b)]
        for q, t in zip(params, (g, w, b)):
            q.grad = t.clone()
        want = reference_norm([t.full_tensor() for t in (g, w, b)], 2.0)
        dist_clip.clip_grad_norm_(params, want / 3, group=world)
        got.append(all(torch.allclose(q.grad._local_tensor, t._local_tensor * (1 / 3), rtol=1e-6)
                       for q, t in zip(params, (g, w, b))))
        out[str(layout)] = got
    return out


def no_shard_stages() -> dict[str, Any]:
    """4 ranks, two pipeline stages (ranks 0-1 and 2-3), each an FSDP1 NO_SHARD model over its pair's group,
    measured with group= spanning the stages (the world, or a pair across them): the replicas were counted by
    rank 0 of the reduction alone, so the second stage was dropped (every rank returned the first stage's norm,
    0.787 for 0.848, and clipped the second by it). The lowest rank of each handle's group counts its copy."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    rank = dist.get_rank()
    stage = rank // 2
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    cross = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    refs = [reference(new_model(20 + s), [2 * s, 2 * s + 1]) for s in (0, 1)]
    model = FSDP(new_model(20 + stage), process_group=pairs[stage], sharding_strategy=ShardingStrategy.NO_SHARD,
                 device_id=torch.device("cpu"), use_orig_params=True)
    loss_fn(model, *batch(rank)).backward()
    both = [g for ref in refs for g in ref.grads.values()]
    out: dict[str, Any] = {}
    for label, grp in (("world", dist.group.WORLD), ("cross", cross[rank % 2])):
        for p in (2.0, math.inf, 0.0):
            out[f"{label} p={p}"] = _norm_close(float(dist_clip.get_total_norm(model, p, group=grp)),
                                                reference_norm(both, p), 1e-6)
        res = dist_clip.GradClipper(max_norm=1e9, mode="per_param", report=True)(model, group=grp)
        # (the stages name their parameters alike here: a name's pieces over both stages make one slot)
        want = {n: reference_norm([ref.grads[n] for ref in refs], 2.0) for n in refs[0].grads}
        out[f"{label} report"] = sorted(res.norms) == sorted(want) and all(
            _norm_close(float(v), want[n], 1e-6) for n, v in res.norms.items())
    want = reference_norm(both, 2.0)
    saved = [q.grad.clone() for q in model.parameters()]
    # AGC too (it counted the replicas on the group's rank 0 only: the first stage's norm, and a NaN on the
    # other stage read finite under "error"); its clipping is each stage's own, as without group=
    agc = dist_clip.GradClipper(mode="unitwise", agc=dist_clip.AGC(0.01))
    out["unitwise"] = _norm_close(float(agc(model, group=dist.group.WORLD).total_norm), want, 1e-6)
    grouped = [q.grad.clone() for q in model.parameters()]
    for q, s in zip(model.parameters(), saved):
        q.grad.copy_(s)
    agc(model)
    out["unitwise clip"] = all(torch.equal(q.grad, g) for q, g in zip(model.parameters(), grouped))
    for q, s in zip(model.parameters(), saved):
        q.grad.copy_(s)
    if stage == 1:
        next(model.parameters()).grad.view(-1)[0] = math.nan
    try:
        dist_clip.GradClipper(mode="unitwise", agc=dist_clip.AGC(0.01), on_nonfinite="error")(
            model, group=dist.group.WORLD)
    except RuntimeError as e:
        out["unitwise nan"] = "non-finite" in str(e)
    else:
        out["unitwise nan"] = False
    for q, s in zip(model.parameters(), saved):
        q.grad.copy_(s)
    total = dist_clip.clip_grad_norm_(model, want / 2, group=dist.group.WORLD)
    out["clip"] = _norm_close(float(total), want, 1e-6) and all(
        torch.allclose(q.grad, s * 0.5, rtol=1e-5, atol=0) for q, s in zip(model.parameters(), saved))
    # A replica holding no gradient at all (set to None on rank 3) still joins the call's one collective with
    # nothing to count: rank 2 counts the copy
    for q, s in zip(model.parameters(), saved):
        q.grad = None if rank == 3 else s.clone()
    out["replica without gradients"] = _norm_close(float(dist_clip.get_total_norm(model, group=dist.group.WORLD)),
                                                   want, 1e-6)
    return out


def full_shard_stages_unitwise() -> dict[str, Any]:
    """4 ranks, two pipeline stages each an FSDP1 FULL_SHARD model over its pair, under group= spanning them:
    the total sums the stages; unit-wise clipping, whose rows cut between shards are combined by name over the
    group (the other stage's rows of the same name were added: a different clip than each stage's own), is a
    NotImplementedError on every rank."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    rank = dist.get_rank()
    stage = rank // 2
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    refs = [reference(new_model(30 + s), [2 * s, 2 * s + 1]) for s in (0, 1)]
    model = FSDP(new_model(30 + stage), process_group=pairs[stage], device_id=torch.device("cpu"),
                 use_orig_params=True)
    loss_fn(model, *batch(rank)).backward()
    want = reference_norm([g for ref in refs for g in ref.grads.values()], 2.0)
    out: dict[str, Any] = {"total": _norm_close(float(dist_clip.get_total_norm(model, group=dist.group.WORLD)),
                                                want, 1e-6)}
    agc = dist_clip.GradClipper(mode="unitwise", agc=dist_clip.AGC(0.01))
    stages = lambda m: "other pieces (pipeline stages)" in m  # noqa: E731
    out["unitwise"] = outcome(lambda: agc(model, group=dist.group.WORLD), NotImplementedError, stages)
    out["unitwise alone"] = _norm_close(float(dist_clip.GradClipper(mode="unitwise", agc=dist_clip.AGC(1e9))(
        model).total_norm), reference_norm(list(refs[stage].grads.values()), 2.0), 1e-6)
    # HYBRID_SHARD stages (each over its pair, one replica): reached past by group=, combined by name too
    from torch.distributed.fsdp import ShardingStrategy

    own = [dist.new_group([r]) for r in range(4)][rank]
    hybrid = FSDP(new_model(30 + stage), process_group=(pairs[stage], own), device_id=torch.device("cpu"),
                  sharding_strategy=ShardingStrategy.HYBRID_SHARD, use_orig_params=True)
    loss_fn(hybrid, *batch(rank)).backward()
    out["hybrid unitwise"] = outcome(lambda: agc(hybrid, group=dist.group.WORLD), NotImplementedError, stages)
    return out


def fsdp2_unsharded_agc_under_group() -> list[bool]:
    """AGC with group= on an FSDP2 model whose other parameters are left unsharded (plain, the same on every
    rank, averaged by hand): they were taken for the caller's pieces and summed over the group (total 7.35 for
    5.23, a 1-D one clipped as a unit cut across ranks); copies counted once, as without group= and as the other
    modes take them."""
    from torch.distributed.fsdp import fully_shard

    ws = dist.get_world_size()
    torch.manual_seed(0)
    lin, bias0, w2 = nn.Linear(4, 4), nn.Parameter(torch.zeros(3)), nn.Parameter(torch.randn(2, 3))
    model = nn.Module()
    model.lin, model.bias0, model.w2 = lin, bias0, w2

    def loss(m: nn.Module, x: Tensor) -> Tensor:
        return m.lin(x).pow(2).mean() + ((x[:, :3] @ m.w2.t()).sum(1, keepdim=True) + m.bias0).pow(2).mean()

    xs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(r)) for r in range(ws)]
    # The float64 model fed every rank's batch, clipped by the reference AGC: comparing the calls with dist_clip's
    # own get_total_norm passed with every 2-norm 0.1% off.
    ref = copy.deepcopy(model).double()
    torch.stack([loss(ref, x.double()) for x in xs]).mean().backward()
    ref_params = dict(ref.named_parameters())
    ref_grads = {n: q.grad for n, q in ref_params.items()}
    ref_total = reference_norm(list(ref_grads.values()))
    reference_agc_(ref_params, ref_grads, 0.01, dist_clip.AGC().eps)
    ref_after = reference_param_norms(ref_grads)
    fully_shard(lin, mesh=mesh((ws,)))
    loss(model, xs[dist.get_rank()]).backward()
    for q in (bias0, w2):
        dist.all_reduce(q.grad)
        q.grad /= ws
    saved = [_local(q.grad).clone() for q in model.parameters()]
    results = []
    for group in (None, dist.group.WORLD):
        for q, s in zip(model.parameters(), saved):
            _local(q.grad).copy_(s)
        res = dist_clip.GradClipper(mode="unitwise", agc=dist_clip.AGC(0.01), report=True)(model, group=group)
        after = dist_clip.GradClipper(max_norm=math.inf, mode="per_param", report=True)(model).norms
        clipped_ok = set(after) == set(ref_after) and all(_norm_close(after[n], w, RTOL) for n, w in ref_after.items())
        results.append((float(res.total_norm), [_local(q.grad).clone() for q in model.parameters()], clipped_ok))
    for q, s in zip(model.parameters(), saved):
        _local(q.grad).copy_(s)
    want = float(dist_clip.get_total_norm(model))
    return [_norm_close(results[0][0], want, 1e-6), _norm_close(results[1][0], want, 1e-6),
            all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1])),
            _norm_close(want, ref_total, RTOL), results[0][2], results[1][2]]


def hsdp_shard_group_with_a_replicated_gradient() -> dict[str, Any]:
    """4 ranks, an HSDP mesh (2 replicas x 2 shards), ``group=`` the rank's shard group, hand-made DTensors: a
    (Replicate, Shard(0)) gradient beside a (Replicate, Replicate) one, which takes the full plan over the group.
    Of a piece's copies the lowest rank *in the group* counts: the second replica's shard group (ranks 2-3) holds
    none of the first replica's ranks, and counting the lowest copy overall (ranks 0 and 1) counted nothing there
    (0.0 for 14.70 at p=2 on ranks 2-3). Every p, against float64 sums; the replicated copy clipped alike."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    hsdp = mesh((2, 2), ("rep", "shard"))
    shard_group = hsdp.get_group("shard")
    a, b = torch.arange(1.0, 9.0).reshape(4, 2), torch.full((3,), 2.0)

    def param(full: Tensor, placements: list[Any]) -> nn.Parameter:  # noqa: ANN401
        w = nn.Parameter(distribute_tensor(full + 1, hsdp, placements, src_data_rank=None))
        w.grad = distribute_tensor(full.clone(), hsdp, placements, src_data_rank=None)
        return w

    out: dict[str, Any] = {}
    for p in PS:
        pa, pb = param(a, [Replicate(), Shard(0)]), param(b, [Replicate(), Replicate()])
        want = reference_norm([a, b], p)
        got = float(dist_clip.get_total_norm([pa, pb], p, group=shard_group))
        out[f"p={p}"] = _norm_close(got, want, RTOL) or (got, want)
    pa, pb = param(a, [Replicate(), Shard(0)]), param(b, [Replicate(), Replicate()])
    want = reference_norm([a, b], 2.0)
    total = float(dist_clip.clip_grad_norm_([pa, pb], 1.0, group=shard_group))
    out["clip"] = _norm_close(total, want, RTOL) and bool(
        torch.allclose(pb.grad._local_tensor, b / (want + 1e-6), rtol=1e-5))
    return out


class _ThreeHeads(nn.Module):
    """Heads ha (15 elements), hb (25), hc (15): on 2 ranks every flat shard of rank 1 ends in one element of
    padding. ``nan`` multiplies that head's output by NaN (on the ranks that pass it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ha, self.hb, self.hc = nn.Linear(4, 3), nn.Linear(4, 5), nn.Linear(4, 3)

    def forward(self, x: Tensor, used: tuple[str, ...] = ("ha", "hb", "hc"), nan: str | None = None) -> Tensor:
        out = x.new_zeros(())
        for name in used:
            y = getattr(self, name)(x)
            out = out + (y * math.nan if name == nan else y).square().mean()
        return out


def _fsdp1_heads_skip(heads: nn.Module, use_orig_params: bool, how: str
                      ) -> tuple[nn.Module, torch.optim.Adam, Callable[[nn.Module], float]]:
    """``heads``' ha, hb, hc each an FSDP1 unit under an FSDP1 root (on the CPU), an Adam over them (fused for
    ``how="clip_fused"``), and the call clipping a part under ``on_nonfinite="skip"`` with ``optimizer=`` that
    Adam, returning its total: ``clip_grad_norm_`` (``how="clip_fused"``) or one ``GradClipper`` kept across calls
    (``mode="per_param"`` for ``how="per_param"``: without ``use_orig_params``, one view of the flat gradient per
    parameter)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for name in ("ha", "hb", "hc"):
        setattr(heads, name, FSDP(getattr(heads, name), use_orig_params=use_orig_params, device_id=torch.device("cpu")))
    model = FSDP(heads, use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=how == "clip_fused")
    clipper = dist_clip.GradClipper(max_norm=1.0, on_nonfinite="skip",
                                    mode="per_param" if how == "per_param" else "total")

    def clip(part: nn.Module) -> float:
        if how == "clip_fused":
            return dist_clip.clip_grad_norm_(part, 1.0, optimizer=opt).item()
        return clipper(part, optimizer=opt).total_norm.item()

    return model, opt, clip


def _stepped(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[bool, bool]:
    """``opt.step()``, then (whether it left ``model``'s parameters as they were, whether all are finite)."""
    before = [q.detach().clone() for q in model.parameters()]
    opt.step()
    return (all(torch.equal(b, q.detach()) for b, q in zip(before, model.parameters())),
            all(bool(q.isfinite().all()) for q in model.parameters()))


def fsdp1_parts_keep_a_part_s_skip(use_orig_params: bool, flow: str, how: str) -> dict[str, Any]:
    """FSDP1 heads [ha], [hb], [hc], each its own unit under an FSDP1 root, clipped in three calls with
    ``on_nonfinite="skip"``, a NaN in hb's batch on rank 0 only, then a second, finite batch. ``flow``: "forward",
    a forward (logging, no grad) between [hb]'s and [hc]'s clips; "aux", an auxiliary loss through every head
    after the three clips (hb's gradients stay NaN) and [ha] clipped again. FSDP1 makes its gradients anew over
    the same bytes (``use_orig_params=True``: new views at every forward; both ways: the flat gradient re-aliased
    through ``.data`` by a backward accumulating into it): read as gradients gone, hb's NaN flag was dropped and
    the NaN step taken, every parameter NaN (without ``use_orig_params``, with "aux", rank 1, whose shards end in
    padding, took it alone). Returns, per batch, (skipped, parameters finite), and the three parts' totals of the
    finite batch against their float64 references (the unsharded model, the ranks' gradients averaged)."""

    rank, world = dist.get_rank(), dist.get_world_size()
    heads = _ThreeHeads()
    reference = copy.deepcopy(heads)
    model, opt, clip = _fsdp1_heads_skip(heads, use_orig_params, how)

    def x_of(batch: int, r: int) -> Tensor:
        return torch.randn(8, 4, generator=torch.Generator().manual_seed(100 * batch + r))

    out: dict[str, Any] = {}
    for batch, nan in enumerate((True, False)):
        opt.zero_grad(set_to_none=False)
        x = x_of(batch, rank)
        model(x, nan="hb" if nan and rank == 0 else None).backward()
        totals = [clip(heads.ha), clip(heads.hb)]
        if flow == "forward":
            with torch.no_grad():
                model(x)
        totals.append(clip(heads.hc))
        if flow == "aux":
            model(x).backward()  # an auxiliary loss: hb's gradients stay NaN
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (a handed-over coefficient dropped after the auxiliary loss)
                clip(heads.ha)
        out[f"batch {batch}"] = _stepped(model, opt)
        if not nan:
            reference.zero_grad()
            for r in range(world):
                reference(x_of(batch, r)).backward()
            want = [float(torch.linalg.vector_norm(torch.cat([q.grad.double().flatten() / world
                                                               for q in getattr(reference, n).parameters()])))
                    for n in ("ha", "hb", "hc")]
            # (the NaN batch skipped: the reference's parameters are the FSDP1 model's before this batch)
            out["totals"] = [math.isclose(t, w, rel_tol=RTOL) for t, w in zip(totals, want)]
    return out


def fsdp1_explicit_skip_over_gradients_made_anew(use_orig_params: bool, flow: str, how: str) -> dict[str, Any]:
    """FSDP1 heads [ha], [hb], [hc] as in :func:`fsdp1_parts_keep_a_part_s_skip`, every gradient finite, a skip
    asked for by ``skip_next_step_(opt, True)`` after the backward (a batch found bad by other means), then the
    three parts clipped with ``on_nonfinite="skip"``. ``flow``: "forward_after", a forward (logging, no grad)
    between [ha]'s and [hb]'s clips; "forward_before", one before [ha]'s; "aux", an auxiliary loss through every
    head after [ha]'s clip. FSDP1 makes its gradients anew over the same bytes there: the asked-for flag, held by
    the gradients present when it was asked for, must follow them (no NaN is left to keep it). Then a finite
    batch without a skip asked for. Returns, per batch, (skipped, parameters finite)."""

    rank = dist.get_rank()
    heads = _ThreeHeads()
    model, opt, clip = _fsdp1_heads_skip(heads, use_orig_params, how)
    out: dict[str, Any] = {}
    for batch, ask in enumerate((True, False)):
        opt.zero_grad(set_to_none=False)
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(100 * batch + rank))
        model(x).backward()
        if ask:
            dist_clip.skip_next_step_(opt, True)
        if flow in ("forward_before", "whole"):
            with torch.no_grad():
                model(x)
        if flow == "whole":
            clip(model)
            out[f"batch {batch}"] = _stepped(model, opt)
            continue
        clip(heads.ha)
        if flow == "forward_after":
            with torch.no_grad():
                model(x)
        if flow == "aux":
            model(x).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (a handed-over coefficient dropped after the auxiliary loss)
            clip(heads.hb)
            clip(heads.hc)
        out[f"batch {batch}"] = _stepped(model, opt)
    return out


class _TinyMiddleHead(nn.Module):
    """Heads ha (15 elements), hb (one element: on 2 ranks rank 1's shard of it is padding only), hc (15)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ha, self.hb, self.hc = nn.Linear(4, 3), nn.Linear(1, 1, bias=False), nn.Linear(4, 3)

    def forward(self, x: Tensor, nan: bool = False) -> Tensor:
        z = self.hb(x.sum(dim=1, keepdim=True)).sum()
        return self.ha(x).square().mean() + self.hc(x).square().mean() + (z * math.nan if nan else z)


def fsdp1_padding_only_rank_keeps_a_part_s_skip(flow: str, how: str) -> dict[str, Any]:
    """FSDP1 (``use_orig_params=True``) heads [ha], [hb], [hc], each its own unit, clipped in three calls with
    ``on_nonfinite="skip"``, a NaN in hb's batch on rank 0, whose shard holds hb's one element (rank 1's is padding
    only: its call measures nothing), then a finite batch. ``flow``: "plain"; "forward", a forward (logging, no
    grad) between [hb]'s and [hc]'s clips; "drop", the NaN batch dropped (no step, ``zero_grad(set_to_none=False)``).
    Rank 1 merged the NaN flag into its flag only, not into the flag's ledger, and [hc]'s call, which rebuilds the
    flag from the ledger, dropped it: rank 1 stepped its shards where rank 0 skipped. Returns, per batch, (skipped,
    parameters finite)."""

    rank = dist.get_rank()
    heads = _TinyMiddleHead()
    model, opt, clip = _fsdp1_heads_skip(heads, True, how)

    out: dict[str, Any] = {}
    for batch, nan in enumerate((True, False)):
        opt.zero_grad(set_to_none=False)
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(100 * batch + rank))
        model(x, nan=nan and rank == 0).backward()
        clip(heads.ha)
        clip(heads.hb)
        if flow == "forward":
            with torch.no_grad():
                model(x)
        clip(heads.hc)
        if flow == "drop" and nan:
            continue
        out[f"batch {batch}"] = _stepped(model, opt)
    return out


def fsdp1_unitwise_out_of_place_nan_in_one_shard(mode: str) -> dict[str, Any]:
    """FSDP1 (``use_orig_params=True``) heads ha, hb, hc, each its own unit, Adam, ``GradClipper(on_nonfinite="skip")``
    in ``mode`` ("unitwise" or "total"): the model clipped whole with a NaN in rank 1's shard of hb (its bias lies
    in rank 1's half of hb's flat shard), the gradients replaced out of place (``p.grad = p.grad + g``) and [ha]
    clipped again; then a finite batch. The unit-wise call armed its flag on its units' gradients, which under FSDP1
    are views of their own, not the tensors the optimizer steps: rank 0's flag was dropped by the [ha] call and rank
    0 stepped while rank 1 skipped (a random flow of the session-35 fuzz). Returns, per batch, (skipped, finite)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    rank = dist.get_rank()
    heads = _ThreeHeads()
    for name in ("ha", "hb", "hc"):
        setattr(heads, name, FSDP(getattr(heads, name), use_orig_params=True, device_id=torch.device("cpu")))
    model = FSDP(heads, use_orig_params=True, device_id=torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    if mode == "unitwise":
        clipper = dist_clip.GradClipper(mode="unitwise", on_nonfinite="skip", agc=dist_clip.AGC(clipping=0.05))
    else:
        clipper = dist_clip.GradClipper(max_norm=1.0, on_nonfinite="skip")
    out: dict[str, Any] = {}
    for batch, nan in enumerate((True, False)):
        opt.zero_grad(set_to_none=True)
        model(torch.randn(8, 4, generator=torch.Generator().manual_seed(100 * batch + rank))).backward()
        bias = heads.hb.bias.grad  # (rank 1's: the last 5 of hb's 25 elements, past rank 0's 13)
        assert (bias is not None and bias.numel() == 5) == (rank == 1), bias
        if nan and rank == 1:
            bias[0] = math.nan
        clipper(model, optimizer=opt)
        for q in model.parameters():
            if q.grad is not None:
                q.grad = q.grad + 0.01 * q.grad.detach()  # an auxiliary loss's, added out of place
        clipper(heads.ha, optimizer=opt)
        out[f"batch {batch}"] = _stepped(model, opt)
    return out


def fsdp2_listed_unsynced_before_backward(how: str) -> list:
    """Sync turned off after a synchronised backward, before the next one (``how``: "off",
    ``set_requires_gradient_sync(False)`` on FSDP2; "no all-reduce", ``set_requires_all_reduce(False)`` on HSDP,
    a (ws, 1) mesh): nothing accumulated yet, the param group's own setting alone says the next gradients will not
    be reduced. A list of the parameters is refused with the setting named, as the module is."""
    from torch.distributed.fsdp import fully_shard

    ws = dist.get_world_size()
    model = new_model(wide=True)
    over = mesh((ws, 1), ("rep", "shard")) if how == "no all-reduce" else mesh((ws,))
    for module in (model.inp, *model.blocks, model.head):
        fully_shard(module, mesh=over)
    fully_shard(model, mesh=over)
    loss_fn(model, *batch(dist.get_rank())).backward()
    if how == "no all-reduce":
        model.set_requires_all_reduce(False)
        reason = "set_requires_all_reduce(False)"
    else:
        model.set_requires_gradient_sync(False)
        reason = "set_requires_gradient_sync(False)"
    calls = (lambda: dist_clip.get_total_norm(model), lambda: dist_clip.get_total_norm(list(model.parameters())),
             lambda: dist_clip.clip_grad_norm_(model.parameters(), 1.0))
    return [_refused(c, reason) for c in calls]


def fsdp2_out_of_place_nan_in_one_shard(how: str, fresh: bool = False, whole: bool = False,
                                        between: str | None = None, again: bool | int = True) -> dict[str, Any]:
    """FSDP2 heads h0 (5 rows: uneven shards on 3 ranks) and h1 (2 rows: rank 2's shard empty), each its own
    ``fully_shard`` unit, fused Adam, ``on_nonfinite="skip"`` (``how``: the clipper, ``mode="unitwise"``'s, or the
    hand-over), clipped as [h0] and [h1] with a NaN in rank 0's shard of h0 alone; then an auxiliary loss's
    gradients added out of place (``p.grad = p.grad + g``) and [h1] clipped again. ``fresh``: instead, the batch is
    dropped (``zero_grad(set_to_none=True)``) and the next batch's gradients clipped as [h1] alone first.
    ``whole``: the first clip takes both heads (the hand-over hands its coefficient over, settled by the next
    call). ``between``: a call arming no skip made after the write, before [h1]'s (``again``: made at all; an
    int: made that many times): it settles the hand-over. Returns, per batch, whether this rank's step was skipped
    (every parameter as it was)
    and its parameters finite."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    m = mesh((dist.get_world_size(),), ("dp",))  # (named: a ParallelPlan reads it)
    model = nn.ModuleDict({"h0": nn.Linear(4, 5), "h1": nn.Linear(4, 2)})
    for head in model.values():
        fully_shard(head, mesh=m)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    if how == "unitwise":
        clipper = dist_clip.GradClipper(mode="unitwise", on_nonfinite="skip", agc=dist_clip.AGC(clipping=0.05))
    else:
        clipper = dist_clip.GradClipper(max_norm=1.0, on_nonfinite="skip")
    calls: dict[str, Callable[[], object]] = {  # (limits no gradient reaches: they only read)
        "get_total_norm h1": lambda: dist_clip.get_total_norm(model["h1"]),
        "get_total_norm h0": lambda: dist_clip.get_total_norm(model["h0"]),
        "get_total_norm": lambda: dist_clip.get_total_norm(model),
        "clip_grad_norm_ h1": lambda: dist_clip.clip_grad_norm_(model["h1"], 1e9),
        "GradClipper h1": lambda: dist_clip.GradClipper(max_norm=1e9)(model["h1"]),
        "unitwise h1": lambda: dist_clip.GradClipper(mode="unitwise", agc=dist_clip.AGC(clipping=1e9))(model["h1"]),
        "compose h1": lambda: dist_clip.compose.get_total_norm(model["h1"], dist_clip.ParallelPlan(
            m, names=("weight", "bias"), rules=(dist_clip.Rule("*"),))),
        "compose": lambda: dist_clip.compose.get_total_norm(model, dist_clip.ParallelPlan(
            m, names=tuple(n for n, _ in model.named_parameters()), rules=(dist_clip.Rule("*"),))),
    }

    def clip(part: nn.Module) -> None:
        if how == "clip_fused":
            dist_clip.clip_grad_norm_(part, 1.0, optimizer=opt)
        else:
            clipper(part, optimizer=opt)

    def backward(batch: int) -> None:
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(100 * batch + dist.get_rank()))
        (model["h0"](x).square().mean() + model["h1"](x).square().mean()).backward()

    out: dict[str, Any] = {}
    for batch, nan in enumerate((True, False)):
        opt.zero_grad(set_to_none=True)
        backward(batch)
        if nan and dist.get_rank() == 0:
            model["h0"].weight.grad._local_tensor[0, 0] = math.nan
        if whole:
            clip(model)
        else:
            clip(model["h0"])
            clip(model["h1"])
        if nan and fresh:
            opt.zero_grad(set_to_none=True)  # the NaN batch dropped: the next batch's gradients
            backward(batch + 10)
        elif nan or not fresh:
            for q in model.parameters():
                q.grad = q.grad + 0.01 * q.grad.detach()  # an auxiliary loss's, added out of place
        if nan or not fresh:
            if between is not None:
                calls[between]()
            for _ in range(int(again)):
                clip(model["h1"])
        before = [q.detach().to_local().clone() for q in model.parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (a coefficient dropped: the replaced gradients step unclipped)
            opt.step()
        out[f"batch {batch}"] = (all(torch.equal(b, q.detach().to_local()) for b, q in zip(before, model.parameters())),
                                 all(bool(q.to_local().isfinite().all()) for q in model.parameters()))
    return out


def fsdp2_out_of_place_nan_of_a_second_optimizer(how: str, nan: bool) -> tuple[bool, bool, bool]:
    """Two fused optimizers: ``enc`` (6 rows: a shard on every rank) stepped by Adam a, heads h0 (5 rows) and h1 (2
    rows: rank 2's shard empty) by Adam b, each module its own ``fully_shard`` unit. The heads are clipped with
    ``optimizer=b`` (handed over), with a NaN in rank 0's shard of h0 where ``nan``; their gradients are then
    replaced out of place (an auxiliary loss's, ``p.grad = p.grad + g``), and a call settles b's hand-over
    (``how``): a ``GradClipper`` arming a skip for a, or ``clip_grad_norm_(..., optimizer=a)``, on [enc, h1];
    ``get_total_norm`` or a ``GradClipper`` without a skip policy on [h1] (``how`` ending in " h0": on [enc, h0],
    or [h0], instead). Returns (this rank's heads left as they were, its enc stepped, every parameter finite)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    m = mesh((dist.get_world_size(),))
    model = nn.ModuleDict({"enc": nn.Linear(4, 6), "h0": nn.Linear(6, 5), "h1": nn.Linear(6, 2)})
    for part in model.values():
        fully_shard(part, mesh=m)
    heads = [*model["h0"].parameters(), *model["h1"].parameters()]
    a = torch.optim.Adam(model["enc"].parameters(), lr=0.1, fused=True)
    b = torch.optim.Adam(heads, lr=0.1, fused=True)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(100 + dist.get_rank()))
    e = model["enc"](x)
    (model["h0"](e).square().mean() + model["h1"](e).square().mean()).backward()
    if nan and dist.get_rank() == 0:
        model["h0"].weight.grad._local_tensor[0, 0] = math.nan
    dist_clip.clip_grad_norm_(heads, 1.0, optimizer=b)
    for q in heads:
        q.grad = q.grad + 0.01 * q.grad.detach()  # an auxiliary loss's, added out of place
    part = [*model["enc"].parameters(), *model["h0" if how.endswith(" h0") else "h1"].parameters()]
    how = how.removesuffix(" h0")
    if how == "clipper_skip":
        dist_clip.GradClipper(max_norm=1.0, on_nonfinite="skip")(part, optimizer=a)
    elif how == "clip_fused":
        dist_clip.clip_grad_norm_(part, 1.0, optimizer=a)
    elif how == "get_total_norm":
        dist_clip.get_total_norm(part[2:])
    else:
        dist_clip.GradClipper(max_norm=1.0)(part[2:])
    before = {n: q.detach().to_local().clone() for n, q in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a coefficient dropped: the replaced gradients step unclipped)
        a.step()
        b.step()
    same = {n: torch.equal(before[n], q.detach().to_local()) for n, q in model.named_parameters()}
    return (all(v for n, v in same.items() if not n.startswith("enc")), not same["enc.weight"],
            all(bool(q.to_local().isfinite().all()) for q in model.parameters()))


def fsdp2_out_of_place_nan_then_error_if_nonfinite(_: None = None) -> tuple[bool, bool]:
    """FSDP2 heads h0 (5 rows) and h1 (2 rows: rank 2's shard empty), fused Adam, clipped whole with optimizer=
    (handed over) with a NaN in rank 0's shard of h0; the gradients then replaced out of place, a NaN put in rank
    1's shard of h1, and [h1] clipped with ``error_if_nonfinite=True``, which raises on every rank after its
    all-reduce; the step taken anyway. Returns (raised, this rank's step skipped)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    m = mesh((dist.get_world_size(),))
    model = nn.ModuleDict({"h0": nn.Linear(4, 5), "h1": nn.Linear(4, 2)})
    for head in model.values():
        fully_shard(head, mesh=m)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(100 + dist.get_rank()))
    (model["h0"](x).square().mean() + model["h1"](x).square().mean()).backward()
    if dist.get_rank() == 0:
        model["h0"].weight.grad._local_tensor[0, 0] = math.nan
    dist_clip.clip_grad_norm_(model, 1.0, optimizer=opt)
    for q in model.parameters():
        q.grad = q.grad + 0.01 * q.grad.detach()  # an auxiliary loss's, added out of place
    if dist.get_rank() == 1:
        model["h1"].weight.grad._local_tensor.view(-1)[0] = math.nan
    raised = False
    try:
        dist_clip.clip_grad_norm_(model["h1"], 1.0, error_if_nonfinite=True, optimizer=opt)
    except RuntimeError as e:
        raised = "non-finite" in str(e)
    before = [q.detach().to_local().clone() for q in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    return raised, all(torch.equal(b, q.detach().to_local()) for b, q in zip(before, model.parameters()))


def fsdp2_layouts_remade_between_calls() -> list[tuple[str, str, float, float]]:
    """Gradient layouts changed between calls on one model, each call against the float64 unsharded reference
    (the full gradients, known on every rank): a gradient redistributed to Replicate, a parameter added (float64,
    another shape), then replaced (float32, uneven Shard(0)), a layer made anew and ``fully_shard``-ed on a mesh
    of a new group, and that group destroyed and made again. Per call: the total (``get_total_norm``, p = 2 and
    inf), and every per-parameter norm of a ``per_param`` report (a name paired with another one's tensor shows
    there, not in the total). dist_clip reads each gradient's layout from its DTensorSpec in every call: a layout
    kept from an earlier call would count the Replicate gradient once per rank, or miss the added parameter."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard._fsdp_common import _from_local_no_grad
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    ws = dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 2))
    m = mesh((ws,))
    for layer in model:
        fully_shard(layer, mesh=m)
    gen = torch.Generator().manual_seed(7)  # the same full gradients on every rank
    full: dict[str, Tensor] = {}
    out: list[tuple[str, str, float, float]] = []

    def grads() -> None:  # on the parameter's own spec, as FSDP2 makes them (one spec for 0.bias and 1.bias)
        full.clear()
        for n, q in model.named_parameters():
            full[n] = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(q.dtype)
            q.grad = _from_local_no_grad(distribute_tensor(full[n], q.device_mesh, q.placements).to_local(), q._spec)

    def call(step: str) -> None:
        for p in (2.0, math.inf):
            want = float(torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in full.values()]), p))
            out.append((step, f"total p={p}", float(dist_clip.get_total_norm(model, p)), want))
        report = dist_clip.GradClipper(max_norm=1e9, mode="per_param", report=True)(model)
        for n, g in full.items():
            out.append((step, n, report.norms[n], float(torch.linalg.vector_norm(g.double()))))

    grads()
    call("sharded")
    w = model[0].weight
    w.grad = w.grad.redistribute(m, [Replicate()])
    call("redistributed")
    model.extra = nn.Parameter(distribute_tensor(torch.zeros(4, 3, dtype=torch.float64), m, [Shard(0)]))
    grads()
    call("added")
    model.extra = nn.Parameter(distribute_tensor(torch.zeros(ws + 1), m, [Shard(0)]))
    grads()
    call("replaced")
    pg = dist.new_group(list(range(ws)))
    model[1] = nn.Linear(7, 7)
    # (a mesh named apart: one equal to m would get m's specs from torch's caches, m's group with them)
    fully_shard(model[1], mesh=DeviceMesh.from_group(pg, "cpu", mesh_dim_names=("anew",)))
    grads()
    assert model[1].weight.grad.device_mesh.get_group() is pg
    call("sharded anew")
    del model[1]
    gc.collect()  # (the layer's FSDP state holds the group: none may outlive its destruction)
    dist.destroy_process_group(pg)
    # torch gives DTensors on a mesh equal to the destroyed one that one's specs, the dead group with them (its
    # sharding propagation caches): cleared, as the README says
    _clear_sharding_prop_cache()
    pg = dist.new_group(list(range(ws)))
    model.insert(1, nn.Linear(7, 7))
    fully_shard(model[1], mesh=DeviceMesh.from_group(pg, "cpu", mesh_dim_names=("anew",)))
    grads()
    assert model[1].weight.grad.device_mesh.get_group() is pg
    call("group made again")
    del model[1]
    gc.collect()
    dist.destroy_process_group(pg)
    _clear_sharding_prop_cache()
    return out


def fsdp2_frozen_sharded_layers_beside_unsharded_ones() -> list[tuple[str, str, float, float]]:
    """FSDP2 blocks frozen (fine-tuning the layers left unsharded: plain, averaged by hand, the same on every
    rank): no DTensor gradient is left, and under ``group=`` the plain gradients were taken for the caller's own
    pieces and summed over it (7.952 for 5.623 on 2 ranks, every per-parameter norm sqrt(2) times its own, and
    clip_grad_norm_ clipped by that), where with the blocks trainable, or their gradients None, they count once as
    FSDP2's unsharded copies (AGC already took them so). (mode, group, ours, reference) per call, list and module."""
    from torch.distributed.fsdp import fully_shard

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model()
    model.blocks.requires_grad_(False)
    ref = reference(model, list(range(ws)))
    want = reference_norm(list(ref.grads.values()))
    per_param = reference_param_norms(ref.grads)
    for block in model.blocks:
        fully_shard(block, mesh=mesh((ws,)))
    loss_fn(model, *batch(rank)).backward()
    average_grads_([q for q in model.parameters() if q.grad is not None])
    saved = [q.grad.clone() for q in model.parameters() if q.grad is not None]
    out: list[tuple[str, str, float, float]] = []
    for label, group in (("none", None), ("world", dist.group.WORLD), ("new", dist.new_group(list(range(ws))))):
        for kind, target in (("module", model), ("list", list(model.parameters()))):
            out.append((f"{kind} total", label, float(dist_clip.get_total_norm(target, group=group)), want))
        report = dist_clip.GradClipper(max_norm=math.inf, mode="per_param", report=True)(model, group=group).norms
        out += [(f"per_param {n}", label, report[n], w) for n, w in per_param.items()]
        total = float(dist_clip.clip_grad_norm_(model, 1.0, group=group))
        after = reference_norm([q.grad for q in model.parameters() if q.grad is not None])
        out += [("clip", label, total, want), ("clipped", label, after, min(1.0, want))]
        for q, s in zip([q for q in model.parameters() if q.grad is not None], saved):
            q.grad.copy_(s)
    return out


def fsdp2_over_tp_with_the_tp_layers_frozen() -> list[tuple[str, str, float, float]]:
    """FSDP2 over tensor parallelism (2 dp x 2 tp, as in :func:`group_over_sliced_meshes`) with the tensor-parallel
    Linears frozen: the last Linear and the LayerNorm, sharded on ``mesh["dp"]`` alone, have a copy on every tp
    slice, which only the frozen layers' meshes show. Under ``group=`` the slices were taken for pipeline stages
    and summed (2.351 for 1.662, every per-parameter norm sqrt(2) times its own; AGC, reading the parameters, was
    right). (what, group, ours, reference) per call."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    m = mesh((2, 2), ("dp", "tp"))
    dp = m.get_coordinate()[0]
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3), nn.LayerNorm(3))
    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    ref = copy.deepcopy(model).double()

    def data(d: int) -> Tensor:
        return torch.randn(4, 6, generator=torch.Generator().manual_seed(50 + d)) * 2

    parallelize_module(model, m["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=m["dp"])
    model(data(dp)).square().mean().backward()
    torch.stack([ref(data(d).double()).square().mean() for d in range(2)]).mean().backward()
    want = reference_norm([q.grad for q in ref.parameters() if q.grad is not None])
    per_param = reference_param_norms({n: q.grad for n, q in ref.named_parameters() if q.grad is not None})
    out: list[tuple[str, str, float, float]] = []
    for label, group in (("none", None), ("world", dist.group.WORLD), ("new", dist.new_group(list(range(4))))):
        for kind, target in (("module", model), ("list", list(model.parameters()))):
            out.append((f"{kind} total", label, float(dist_clip.get_total_norm(target, group=group)), want))
        report = dist_clip.GradClipper(max_norm=math.inf, mode="per_param", report=True)(model, group=group).norms
        out += [(f"per_param {n}", label, report[n], w) for n, w in per_param.items()]
    return out


def fsdp2_layer_sharded_after_the_root_s_lazy_init() -> list[tuple[str, Any, Any]]:
    """A block made anew and ``fully_shard``-ed after the FSDP2 root's lazy init (the root's list of states, read
    instead of a walk, was made then and lacks it): after an evaluation forward its unsharded parameters were not
    stood in for by the sharded ones (their gradients left out: 3.910 for 3.991 on 2 ranks, the list right), and
    with sync off on it the module was measured (8.38) instead of refused; the block it replaced, still in that
    list, refused the model where its sync was off. (what, ours, reference) per call."""
    from torch.distributed.fsdp import fully_shard

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model()
    for module in (*model.blocks, model):
        fully_shard(module, mesh=mesh((ws,)))
    loss_fn(model, *batch(rank)).backward()
    dist_clip.get_total_norm(model)  # (the root's lazy init ran in the forward)
    model.blocks[1].set_requires_gradient_sync(False)  # (the block replaced: the model's sync is on)
    torch.manual_seed(5)
    model.blocks[1] = Block(7, 5)
    fully_shard(model.blocks[1], mesh=mesh((ws,)))
    model.zero_grad(set_to_none=True)
    loss_fn(model, *batch(rank + 10)).backward()
    want = reference_norm([q.grad.full_tensor() for q in model.parameters()])
    out: list[tuple[str, Any, Any]] = [("sharded", float(dist_clip.get_total_norm(model)), want)]
    with torch.no_grad():
        model(batch(rank)[0])  # an evaluation forward: the root and the new block stay unsharded
    out.append(("unsharded", [type(q).__name__ for q in model.blocks[1].parameters()], ["Parameter"] * 2))
    for kind, target in (("module", model), ("list", list(model.parameters()))):
        out.append((f"{kind} after the forward", float(dist_clip.get_total_norm(target)), want))
    report = dist_clip.GradClipper(max_norm=math.inf, mode="per_param", report=True)(model)
    out.append(("per_param total", float(report.total_norm), want))
    model.blocks[1].set_requires_gradient_sync(False)
    loss_fn(model, *batch(rank + 20)).backward()
    out.append(("sync off", _refused(lambda: dist_clip.get_total_norm(model), "not reduced yet"), True))
    model.blocks[1].set_requires_gradient_sync(True)
    return out


def fsdp2_frozen_stage_beside_a_trainable_one_under_group() -> list[tuple[str, float, float]]:
    """Two pipeline stages on a (pp, dp) = (2, 1) mesh under ``group=WORLD``: stage 0 its FSDP2 block frozen
    beside a plain weight it trains, stage 1 an FSDP2 block it trains. Stage 0's plain gradient is a copy of its
    stage only (taken so beside its frozen DTensor parameters), and its rank must still join the collective the
    other stage's DTensor gradients plan over the group (it took none, and stage 1 waited until the timeout).
    (target, ours, reference) per call."""
    from torch.distributed.fsdp import fully_shard

    stage = dist.get_rank()
    m = mesh((2, 1), ("pp", "dp"))
    torch.manual_seed(40)
    blocks = [Block(4, 4), Block(4, 3)]
    head = nn.Parameter(torch.randn(3, 4))
    ref0, ref1 = copy.deepcopy(blocks[0]).double().requires_grad_(False), copy.deepcopy(blocks[1]).double()
    ref_head = head.detach().double().clone().requires_grad_()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(41))
    model = nn.Module()
    model.block = blocks[stage]
    if stage == 0:
        model.block.requires_grad_(False)
        model.head = head
    fully_shard(model.block, mesh=m["dp"])
    if stage == 0:
        (model.block(x) @ model.head.t()).square().mean().backward()
    else:
        model.block(x).square().mean().backward()
    (ref0(x.double()) @ ref_head.t()).square().mean().backward()
    ref1(x.double()).square().mean().backward()
    want = reference_norm([ref_head.grad, *(q.grad for q in ref1.parameters())])
    # (the stages' names differ: the per-parameter modes need a ParallelPlan there)
    return [(kind, float(dist_clip.get_total_norm(target, group=dist.group.WORLD)), want)
            for kind, target in (("module", model), ("list", list(model.parameters())))]


# ------------------------------------------------------------------------------ switches of DDP, FSDP2, FSDP1

SWITCH_MAX_NORM = 0.3  # below every total of these models: each step clips
SWITCH_LR = 0.01
SWITCH_PARAM_ATOL = 1e-5  # fused fp32 AdamW against the float64 one: measured at most 1e-7 after 4 steps
SWITCH_NAN = 1  # the step whose batch holds a NaN on rank 1


def clipped_steps(model: nn.Module, grads: Callable[[], dict[str, Tensor]],
                  params: Callable[[], dict[str, Tensor]], steps: int = 4) -> list[tuple[float, bool, float]]:
    """``steps`` batches through ``GradClipper(on_nonfinite="skip")(model, optimizer=)`` handing the coefficient
    over to a fused AdamW; rank 1's batch at step ``SWITCH_NAN`` holds a NaN. The reference is a float64 copy of
    the parameters stepped by a float64 AdamW with the gradients the wrapper holds (gathered: under a compressing
    hook or a low-precision reduction those are the ones it reduced, not the exact model's), clipped by their
    float64 norm, and not stepped where that norm is not finite. Per step: (the worst relative error of
    ``get_total_norm`` for p in {2, inf, 1} against their float64 norm, NaN where it was not comparable; whether
    the clipper read a finite total; the largest distance of any parameter from the reference after the step)."""
    rank = dist.get_rank()
    opt = torch.optim.AdamW(model.parameters(), lr=SWITCH_LR, fused=True)
    shadow = {n: nn.Parameter(t.clone()) for n, t in params().items()}
    shadow_opt = torch.optim.AdamW(list(shadow.values()), lr=SWITCH_LR, foreach=False)
    clipper = dist_clip.GradClipper(max_norm=SWITCH_MAX_NORM, on_nonfinite="skip")
    out = []
    for step in range(steps):
        x, y = batch(rank + 10 * (step + 1))
        if step == SWITCH_NAN and rank == 1:
            x[0, 0] = math.nan
        loss_fn(model, x, y).backward()
        held = grads()
        flat = torch.cat([g.reshape(-1) for g in held.values()])
        worst = 0.0
        for p in (2.0, math.inf, 1.0):
            want = float(torch.linalg.vector_norm(flat, p))
            got = float(dist_clip.get_total_norm(model, p))
            if not math.isfinite(want) or not math.isfinite(got):
                worst = math.nan if math.isfinite(want) != math.isfinite(got) else worst
                continue
            worst = max(worst, abs(got - want) / want)
        finite = bool(clipper(model, optimizer=opt).finite)
        total = float(torch.linalg.vector_norm(flat, 2.0))
        if math.isfinite(total):
            coef = min(1.0, SWITCH_MAX_NORM / (total + 1e-6))
            for n, q in shadow.items():
                q.grad = held[n] * coef
            shadow_opt.step()
        opt.step()
        opt.zero_grad()
        now = params()
        out.append((worst, finite, max(float((now[n] - shadow[n].detach()).abs().max()) for n in now)))
    return out


def _exact_or_held(model: nn.Module, ref: Reference, exact: bool, grads: Callable[[], dict[str, Tensor]],
                   params: Callable[[], dict[str, Tensor]]) -> tuple[Reference, Reference | None]:
    """(the reference of run_case, the model reference at the low-precision tolerances): the float64 model where
    the switch keeps the gradients exact, else the gradients the wrapper holds (gathered) beside the model."""
    if exact:
        return ref, None
    held = Reference({n: t.clone() for n, t in params().items()}, {n: t.clone() for n, t in grads().items()})
    return held, ref


def _scaled(ref: Reference, factor: float) -> Reference:
    return Reference(ref.params, {n: g * factor for n, g in ref.grads.items()})


DDP_SWITCHES = ("static_graph", "fp16_compress", "powerSGD", "powerSGD-stateless", "custom_hook")


def ddp_switch(switch: str) -> dict[str, Any]:
    """DDP with ``static_graph=True``, or a communication hook: torch's ``fp16_compress_hook`` (the fp32 gradients
    DDP leaves are the fp16 average), ``powerSGD_hook`` (rank-1 approximations of the matrices; with error feedback
    and warm start, from the third backward, or without either, from the second), or a hook of the user's that
    scales each bucket by 1/4 before the sum (gradients = 1/4 of the sum of the ranks'). run_case on the first
    compressed backward (the float64 model, or for the compressing hooks the gradients DDP left, beside the model
    at the bf16 tolerances for fp16), then ``clipped_steps``. (``bf16_compress_hook`` needs CUDA and NCCL: DDP raises
    TypeError on gloo.)"""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model()
    ref = reference(model, list(range(ws)))
    ddp = DDP(model, static_graph=switch == "static_graph")
    warm_up = 0
    if switch == "fp16_compress":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif switch.startswith("powerSGD"):
        stateful = switch == "powerSGD"
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=1, min_compression_rate=0.5,
            start_powerSGD_iter=2 if stateful else 1, use_error_feedback=stateful, warm_start=stateful)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        warm_up = state.start_powerSGD_iter  # backwards that all-reduce uncompressed
    elif switch == "custom_hook":
        def quarter_then_sum(_, bucket):  # noqa: ANN001, ANN202 - DDP reads the annotations (strings here)
            work = dist.all_reduce(bucket.buffer().mul_(0.25), async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])

        ddp.register_comm_hook(None, quarter_then_sum)
        ref = _scaled(ref, ws / 4)
    for _ in range(warm_up):
        loss_fn(ddp, *batch(rank)).backward()
        ddp.zero_grad()
    loss_fn(ddp, *batch(rank)).backward()

    def grads() -> dict[str, Tensor]:
        return {n: q.grad.detach().double().clone() for n, q in model.named_parameters() if q.grad is not None}

    def params() -> dict[str, Tensor]:
        return {n: q.detach().double().clone() for n, q in model.named_parameters()}

    exact, model_ref = _exact_or_held(model, ref, switch in ("static_graph", "custom_hook"), grads, params)
    if switch.startswith("powerSGD"):
        model_ref = None  # a rank-1 approximation: not the model's gradients at any tolerance
        worst = max(float((g - ref.grads[n]).abs().max()) for n, g in grads().items())
        if worst < 1e-3:
            raise AssertionError(f"powerSGD left the exact gradients ({worst}): the backward was not compressed")
    case = Case(ddp, exact, grads, params, _torch_clip(ddp), expected_collectives=0, model_ref=model_ref,
                world_collectives=0)
    per_p = run_case(case)
    ddp.zero_grad()
    out = {"per_p": per_p, "steps": clipped_steps(ddp, grads, params)}
    if switch == "powerSGD":  # the NaN batch's residue cleared from the hook's state: the next batch is finite
        for kept in (state.error_dict, state.p_memory_dict, state.q_memory_dict):
            kept.clear()
        loss_fn(ddp, *batch(rank)).backward()
        out["cleared"] = math.isfinite(float(dist_clip.get_total_norm(ddp)))
    return out


FSDP2_SWITCHES = ("gradient_divide_factor", "cpu_offload", "reshard_after_forward_int", "mp_reduce_fp32_output_fp32",
                  "mp_fp16_reduce_fp32_output_bf16")


def fsdp2_switch(switch: str) -> dict[str, Any]:
    """FSDP2 (every block and the root on a 1-D mesh; uneven and empty shards) with one switch no other case sets:
    ``set_gradient_divide_factor(5)`` (gloo has no PREMUL_SUM: with ``set_force_sum_reduction_for_comms(True)``;
    gradients = the ranks' sum / 5), ``CPUOffloadPolicy(pin_memory=False)``, ``reshard_after_forward=1`` on the
    blocks (an evaluation forward first, so that the blocks sit resharded to one rank), or a
    ``MixedPrecisionPolicy`` whose ``reduce_dtype`` differs from ``param_dtype`` and sets ``output_dtype`` (bf16
    compute, fp32 reduce and output; fp16 compute, fp32 reduce, bf16 output: the gradients FSDP2 produced are the
    reference, the fp32 model at the bf16 tolerances). run_case, then ``clipped_steps``."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model()
    ref = reference(model, list(range(ws)))
    m = mesh((ws,))
    kw: dict[str, Any] = {}
    if switch == "cpu_offload":
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    elif switch == "mp_reduce_fp32_output_fp32":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                               output_dtype=torch.float32)
    elif switch == "mp_fp16_reduce_fp32_output_bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32,
                                               output_dtype=torch.bfloat16)
    blocks = {"reshard_after_forward": 1} if switch == "reshard_after_forward_int" else {}
    for module in (model.inp, *model.blocks, model.head):
        fully_shard(module, mesh=m, **kw, **blocks)
    fully_shard(model, mesh=m, **kw)
    if switch == "gradient_divide_factor":
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(5.0)
                module.set_force_sum_reduction_for_comms(True)
        ref = _scaled(ref, ws / 5.0)
    if switch == "reshard_after_forward_int":
        with torch.no_grad():
            model(batch(rank)[0])
    loss_fn(model, *batch(rank)).backward()
    grads, params = _fsdp2_gatherers(model)
    exact, model_ref = _exact_or_held(model, ref, not switch.startswith("mp_"), grads, params)
    per_p = run_case(_fsdp2_case(model, exact, model_ref=model_ref))
    model.zero_grad()
    return {"per_p": per_p, "steps": clipped_steps(model, grads, params)}


FSDP1_SWITCHES = ("prefetch", "no_prefetch")


def fsdp1_switch(switch: str, use_orig_params: bool) -> dict[str, Any]:
    """FSDP1 (blocks auto-wrapped, the rest in the root's flat parameter) with ``forward_prefetch=True``,
    ``backward_prefetch=BACKWARD_POST`` and ``limit_all_gathers=False`` (``"prefetch"``), or
    ``backward_prefetch=None`` and ``limit_all_gathers=True`` (``"no_prefetch"``). run_case against the float64
    model, then ``clipped_steps``. (``CPUOffload(offload_params=True)`` needs an accelerator: FSDP1 pins the
    offloaded shards, "Cannot access accelerator device when none is available", at the first forward.)"""
    from torch.distributed.fsdp import BackwardPrefetch
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    rank, ws = dist.get_rank(), dist.get_world_size()
    model = new_model()
    ref = reference(model, list(range(ws)))
    prefetch = switch == "prefetch"
    fsdp_model = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=use_orig_params,
                      device_id=torch.device("cpu"), forward_prefetch=prefetch,
                      backward_prefetch=BackwardPrefetch.BACKWARD_POST if prefetch else None,
                      limit_all_gathers=not prefetch)
    loss_fn(fsdp_model, *batch(rank)).backward()
    _, params = _fsdp1_full_views(fsdp_model)
    grads = _fsdp1_gathered_grads(fsdp_model)
    case = Case(fsdp_model, ref, grads, params, lambda max_norm, p: fsdp_model.clip_grad_norm_(max_norm, p),
                check_local_grads=None if use_orig_params else _fsdp1_flat_checker(fsdp_model))
    per_p = run_case(case)
    fsdp_model.zero_grad()
    return {"per_p": per_p, "steps": clipped_steps(fsdp_model, grads, params)}
