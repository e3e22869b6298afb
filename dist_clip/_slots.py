"""Many norms from one collective: every counted piece of a call is measured into a *slot*.

A slot is whatever a caller wants one norm of: one parameter of the full model (per-parameter clipping and
reports), one optimizer param group, or the single total of :func:`dist_clip.clip_grad_norm_`. Each rank
computes one float64 partial per slot from the pieces it counts, the whole vector travels in one
``_reduce.all_reduce_partials`` call, and every slot norm, and the global total, are read from the result.

The slot layout must be identical on every rank *without communication*: it is derived from names every rank
knows from the structure of the target (the parameter names of the unsharded model, in model order), never
from which pieces a rank happens to hold. A rank holding an empty piece of a parameter, or no piece at all,
contributes the neutral 0 to that slot. An optional *presence* count per slot (the number of gradient pieces
seen, summed like the partials) tells apart a parameter without a gradient anywhere from one whose gradient is
zero, in the same collective.

FSDP1 with ``use_orig_params=False`` keeps one flat gradient per wrapped module; :func:`fsdp1_pieces` splits it
back into per-parameter views with the flat parameter's ``_shard_param_infos`` and ``_fqns``, under the names of
the unwrapped model.
"""

from __future__ import annotations

import functools
import hashlib
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _norm, _reduce, _scale
from . import clip as _clip
from .adapters import BUILT_IN as _adapters_built_in
from .adapters import fsdp as _fsdp
from .adapters import resolve, unwrap_compiled
from .adapters.fsdp import clean_name
from .shards import Shards, common_loss_scale, partition_cuts

__all__ = [
    "FlatPiece",
    "Fsdp1Layout",
    "Measurement",
    "Named",
    "all_pieces",
    "clean_name",
    "counted_pieces",
    "fsdp1_pieces",
    "is_fsdp1",
    "measure",
    "merge_partials",
    "module_parameters",
    "named_shards",
    "scale_slots_",
    "slot_partials",
]

@dataclass
class Named:
    """A target seen parameter by parameter.

    Attributes:
        shards: the call's Shards; their ``names`` are full-model parameter names (one per tensor).
        names: every parameter name of the full model, in an order identical on every rank. A name may have
            no piece on this rank, or no gradient anywhere.
        params: name -> the tensor an optimizer holds for it (an FSDP1 flat parameter, a DTensor, a plain
            parameter), for param-group lookups. Names of plain gradient tensors map to the tensor itself.
        group_of: name -> index of its param group in ``group_optimizer.param_groups``, where the optimizer
            does not hold the parameter between steps (DeepSpeed ZeRO-3); empty elsewhere.
        group_optimizer: the optimizer ``group_of`` refers to.
        by_pieces: the names are the pieces' own (a user adapter's Shards), as a mapping target's keys: a rank
            may hold nothing of a parameter and leave it out of its optimizer.
    """

    shards: list[Shards]
    names: tuple[str, ...]
    params: dict[str, Tensor] = field(default_factory=dict)
    group_of: dict[str, int] = field(default_factory=dict)
    group_optimizer: object = None
    by_pieces: bool = False
    #: more ``params`` entries, made on first need (:meth:`group_params`): DeepSpeed's optimizer tensors, which only
    #: param-group lookups read (made for every named call, they took 2.7 ms of a 24 ms per-parameter call on 2,000
    #: parameters, ZeRO-2, 2 ranks).
    more_params: Callable[[], dict[str, Tensor]] | None = None

    def group_params(self) -> dict[str, Tensor]:
        """``params`` with :attr:`more_params` merged in (once): what param-group lookups read."""
        if self.more_params is not None:
            self.params.update(self.more_params())
            self.more_params = None
        return self.params


# --------------------------------------------------------------------------------------------- FSDP1 names


@dataclass(frozen=True)
class FlatPiece:
    """This rank's piece of one original parameter inside an FSDP1 flat parameter.

    Attributes:
        name: the parameter's name in the unwrapped model.
        grad: the local gradient piece (a 1-D view that scales the real gradient in place), or ``None``.
        data: the local piece of the parameter's values, aligned with ``grad`` (1-D).
        start: index of the piece's first element in the flattened full parameter.
        shape: shape of the full parameter.
        group: the group the piece's partials combine over: the flat parameter's shard group when the root's
            sharded handles share one and no ``group=`` was given, else that group or the world; ``None`` when
            it is not sharded (``NO_SHARD``).
        optim_param: what an optimizer holds for this parameter (the flat parameter unless
            ``use_orig_params=True``).
        split_at: offsets, in the flattened full parameter, where shard boundaries of *any* rank cut it:
            identical on every rank, so every rank knows which of its rows are split without communicating.
        counted: whether this rank's copy counts: hybrid replicas hold identical shards, and where ``group``
            spans more than one replica only the first counts.
    """

    name: str
    grad: Tensor | None
    data: Tensor
    start: int
    shape: torch.Size
    group: dist.ProcessGroup | None
    optim_param: Tensor
    split_at: tuple[int, ...]
    counted: bool = True


def _fsdp1_type() -> type:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def is_fsdp1(target: object) -> bool:
    """An FSDP1 root, or a plain module holding FSDP1 children (whose FlatParameters are shards)."""
    if not isinstance(target, nn.Module):
        return False
    fsdp = _fsdp1_type()
    return isinstance(target, fsdp) or any(isinstance(m, fsdp) for m in target.modules())


@dataclass
class Fsdp1Layout:
    """Every FSDP1 parameter of a root module, per parameter (see :func:`fsdp1_pieces`)."""

    pieces: list[FlatPiece]
    unmanaged: list[tuple[str, nn.Parameter]]
    names: tuple[str, ...]
    optim: dict[str, Tensor]
    geometry: dict[str, tuple[torch.Size, tuple[int, ...]]]  # name -> (full shape, cuts), every parameter
    # The group sharded pieces combine over, on every rank (one holding padding only too), or None (no sharding).
    group: dist.ProcessGroup | None = None
    # Names sharded over fewer ranks than ``group`` holds, with no replica across them (pipeline stages under a
    # group= spanning them): their units cut between shards cannot be combined by name over ``group``.
    apart: frozenset[str] = frozenset()


# One in-shard piece of an FSDP1 parameter, all but its tensors: (handle, the original parameter under
# use_orig_params or None, offset and numel in the local shard, name, start, shape, group, what an optimizer
# holds for it, cuts, counted).
_Place = tuple[Any, "nn.Parameter | None", int, int, str, int, torch.Size, "dist.ProcessGroup | None", Tensor,
               tuple[int, ...], bool]


def _fsdp1_places(root: nn.Module, group: dist.ProcessGroup | None) -> tuple[list[_Place], Fsdp1Layout]:
    """Where every FSDP1 parameter of ``root`` lies, kept on the root while its handles stand (a walk costs tens
    of milliseconds on a model of a thousand parameters): the in-shard places, and a layout without pieces."""
    _fsdp.check_context(root)  # (a layout built inside summon_full_params() is wrong, and would be kept)

    def build() -> tuple[list[_Place], Fsdp1Layout]:
        places: list[_Place] = []
        names: list[str] = []
        optim: dict[str, Tensor] = {}
        geometry: dict[str, tuple[torch.Size, tuple[int, ...]]] = {}
        handles = list(_fsdp.fsdp1_handles(root))
        shard_groups = {id(h.process_group): h.process_group for _, h, _, _ in handles if h.uses_sharded_strategy}
        red, whole = _fsdp.fsdp1_reduction(list(shard_groups.values()), group)  # as the adapter's plan reduces
        wide = not whole and (bool(shard_groups) or group is not None)
        apart: set[str] = set()
        for module, handle, _, full_names in handles:
            flat = handle.flat_param
            sharded = bool(handle.uses_sharded_strategy)
            if sharded:
                pg, counted = red, whole or _fsdp.first_replica(module, handle)
            elif wide:  # NO_SHARD under a wider reduction: its copy counts once, as in fsdp1_shards
                pg, counted = red, _reduce.first_copy_in(handle.process_group, red)
            else:
                pg, counted = None, True
            world = _reduce.group_size(handle.process_group) if sharded else 1
            shard_numel = int(flat._local_shard.numel()) if sharded else 0
            # Offsets of the original parameters in the (padded) unsharded flat parameter, padding included.
            offsets: list[int] = []
            at = 0
            for numel, is_pad in zip(flat._numels_with_padding, flat._is_padding_mask):
                if not is_pad:
                    offsets.append(at)
                at += numel
            use_orig = bool(handle._use_orig_params)
            # Sharded over fewer ranks than the reduction holds, with no replica of it there: the ranks beyond
            # hold other pieces under the same names (pipeline stages). A hybrid handle spans its shard group
            # times its replicas (HYBRID_SHARD stages reached past that by group= were combined by name too).
            span = world * (_reduce.group_size(module._inter_node_pg) if sharded and
                            handle._sharding_strategy.name in _fsdp._HYBRID else 1)
            stage = sharded and wide and span < _reduce.group_size(red)
            for i, (full_name, info) in enumerate(zip(full_names, flat._shard_param_infos)):
                name = clean_name(full_name)
                names.append(name)
                if stage:
                    apart.add(name)
                cuts = partition_cuts(offsets[i], int(flat._numels[i]), shard_numel, world)
                shape = torch.Size(flat._shapes[i])
                geometry[name] = (shape, cuts)
                orig = flat._params[i] if use_orig and flat._params is not None else None
                optim[name] = orig if orig is not None else flat
                if info.in_shard:
                    places.append((handle, orig, int(info.offset_in_shard), int(info.numel_in_shard), name,
                                   int(info.intra_param_start_idx), shape, pg, optim[name], cuts, counted))
        unmanaged = _fsdp.unmanaged_parameters(root)  # the shard plan's list, not a second walk
        for n, p in unmanaged:
            names.append(n)
            optim[n] = p
            geometry[n] = (p.shape, ())
        return places, Fsdp1Layout([], unmanaged, tuple(names), optim, geometry, red if wide or whole else None,
                                   frozenset(apart))

    return _fsdp.kept_on_root(root, "pieces", build, also=group)


def fsdp1_pieces(root: nn.Module, group: dist.ProcessGroup | None = None) -> Fsdp1Layout:
    """Split every FSDP1 flat gradient of ``root`` into per-parameter pieces under full-model names.

    Works for ``use_orig_params`` False (views into the flat gradient, by ``_shard_param_infos``) and True
    (the original parameters' sharded ``.grad`` views), for sharded strategies and ``NO_SHARD``.

    Returns:
        An :class:`Fsdp1Layout`: this rank's in-shard pieces of every flat parameter, the parameters no FSDP1
        handle manages (whole and identical on every rank), every parameter name of the unwrapped model in an
        order identical on every rank, and name -> the tensor an optimizer holds for it.
    """
    _fsdp.check_reduced(root)
    places, static = _fsdp1_places(root, group)
    pieces: list[FlatPiece] = []
    for handle, orig, offset, numel, name, start, shape, pg, optim_param, cuts, counted in places:
        if orig is not None:
            g = orig.grad
            data = orig.detach().reshape(-1)
        else:
            flat = handle.flat_param
            local = flat._local_shard if handle.uses_sharded_strategy else flat.data
            g = None if flat.grad is None else flat.grad.narrow(0, offset, numel)
            data = local.detach().narrow(0, offset, numel)
        if g is not None:
            g = g.reshape(-1)
        pieces.append(FlatPiece(name, g, data, start, shape, pg, optim_param, cuts, counted))
    return Fsdp1Layout(pieces, static.unmanaged, static.names, static.optim, static.geometry, static.group,
                       static.apart)


def _fsdp1_named(root: nn.Module, group: dist.ProcessGroup | None) -> Named:
    # The adapter's own plan (shard groups, hybrid replicas, padding-only ranks), cut per parameter.
    _, static = _fsdp1_places(root, group)
    return Named(_fsdp.fsdp1_shards(root, group, per_param=True), static.names, static.optim)


# --------------------------------------------------------------------------------------------- named targets


def _name_clash(name: str) -> ValueError:
    return ValueError(
        f"two different tensors of the target are named {name!r} (after dropping the path parts wrappers insert: "
        "_orig_mod, _checkpoint_wrapped_module, _fsdp_wrapped_module): rename one, since per-parameter clipping, "
        "reports and AGC key everything by name"
    )


def _named_plain(items: Sequence[tuple[str, Tensor]], group: dist.ProcessGroup | None) -> Named:
    """Named pieces of plain tensors/parameters (and DTensor gradients) from a list of (name, tensor)."""
    from .adapters.params import (
        absent_dtensor_grads,
        each_gradient_once,
        gradient_of,
        listed_stand_ins,
        refuse_managed,
        shards_with_stand_ins,
    )

    items = listed_stand_ins(items)
    seen: set[int] = set()
    grads: list[tuple[str, Tensor]] = []
    params: dict[str, Tensor] = {}
    names: list[str] = []
    for name, t in items:
        if not isinstance(t, Tensor):
            raise TypeError(f"expected tensors or parameters in the target, got {type(t).__name__} at {name!r}")
        names.append(name)
        if params.setdefault(name, t) is not t:
            raise _name_clash(name)
        if id(t) in seen:
            continue
        seen.add(id(t))
        refuse_managed(name, t)
        g = gradient_of(t)
        if g is not None:
            grads.append((name, g))
    grads = each_gradient_once(grads)  # [p, p.grad]: one gradient, scaled once
    # A gradient None here (all of them, or one set to None on this rank only): empty stand-ins make this rank's
    # plan the other ranks' (absent_dtensor_grads), not counted.
    absent = absent_dtensor_grads(list(items), alone=not grads) if len(grads) < len(seen) else []
    out = shards_with_stand_ins(grads, absent, group, items)
    return Named(out, tuple(dict.fromkeys(names)), params)


def module_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``named_parameters()`` under the unwrapped model's names: without the prefixes that activation
    checkpointing, FSDP1 and a compiled submodule insert (``_checkpoint_wrapped_module.``, ...)."""
    from .adapters.params import module_parameters as registered

    return [(clean_name(n), q) for n, q in registered(unwrap_compiled(module))]  # type: ignore[arg-type]


def _ddp_module(target: nn.Module) -> nn.Module | None:
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(target, DistributedDataParallel):
        return None
    from .adapters.params import check_ddp_synced

    check_ddp_synced(target)
    return target.module


def _deepspeed_named(engine: object, group: dist.ProcessGroup | None) -> Named:
    """DeepSpeed: the adapter names every piece by its module name (ZeRO 0-3); anything unnamed: ValueError."""
    from .adapters import deepspeed as ds_adapter

    by_id = {}
    names = []
    params: dict[str, Tensor] = {}
    for n, p in ds_adapter._module_named(engine):
        names.append(n)
        if params.setdefault(n, p) is not p:
            raise _name_clash(n)
        if hasattr(p, "ds_id"):
            by_id[f"ds_id{p.ds_id}"] = n
    if ds_adapter._expert_blocks(engine):  # MoE: the other expert-parallel ranks' experts too
        names = ds_adapter.all_names(engine)
    shards = resolve(engine, group)
    out = []
    known = set(names)
    for s in shards:
        mapped = [by_id.get(n, n) for n in s.names]
        if s.tensors and (len(mapped) != len(s.tensors) or not set(mapped) <= known):
            raise ValueError(
                "this DeepSpeed engine's gradient pieces are not all named by parameters of engine.module "
                f"({sorted(set(mapped) - known)[:3] or 'unnamed pieces'}): per-parameter clipping, per-group "
                "clipping and reports need them; mode='total' works with every stage"
            )
        out.append(Shards(s.tensors, group=s.group, counted=s.counted, names=mapped, loss_scale=s.loss_scale))
    group_of, group_optimizer = ds_adapter.zero3_param_groups(engine)  # ZeRO-3: its own name -> group map
    if not group_of:  # MoE (stage 0, ZeRO-1/2): the groups of the experts other expert-parallel ranks hold
        group_of, group_optimizer = ds_adapter.expert_param_groups(engine)
    # what the torch optimizer holds, for per-group lookups only
    return Named(out, tuple(names), params, group_of, group_optimizer,
                 more_params=lambda: ds_adapter.optimizer_tensors(engine))


_BUILT_IN = frozenset(_adapters_built_in)


def _custom_adapter(target: object) -> object | None:
    """The adapter a user added to ``ADAPTERS`` that takes ``target`` (tried in the tuple's order, as
    :func:`~dist_clip.adapters.resolve` tries them); None where a built-in one comes first, or none does."""
    from . import adapters

    found = adapters.find(target)
    return found[1] if found is not None and found[0] not in _BUILT_IN else None


def _named_by_adapter(adapter: object, target: object, group: dist.ProcessGroup | None) -> Named:
    """A user adapter's Shards, named by their own ``names``: every rank must name the same parameters (an
    empty piece where it holds none, as for a mapping target); the layout check finds a disagreement."""
    from .adapters import _checked

    # checked and completed as resolve() does for the other modes (one Shards alone, an empty list under group=)
    name = getattr(adapter, "__name__", type(adapter).__name__)
    shards = _checked(name, adapter.shards(target, group), group)  # type: ignore[attr-defined]
    for s in shards:
        if s.tensors and len(s.names) != len(s.tensors):
            raise ValueError(
                f"the {type(target).__name__} adapter gives Shards without a name for each piece ({len(s.names)} "
                f"names for {len(s.tensors)} tensors): per-parameter clipping, per-group clipping and reports "
                "need them (Shards(..., names=[...])); mode='total' works without"
            )
    names = sorted({n for s in shards for n in s.names})
    params = {n: t for s in shards for n, t in zip(s.names, s.tensors)}
    return Named(list(shards), tuple(names), params, by_pieces=True)


def named_shards(target: object, group: dist.ProcessGroup | None = None) -> Named:
    """The Shards of ``target`` named by full-model parameter names, and every such name.

    Targets: an ``nn.Module`` (plain, DDP, FSDP2, FSDP1 in both ``use_orig_params`` modes), a DeepSpeed engine
    (ZeRO stages 0-3), a fairscale OSS optimizer (names ``"group{g}.param{i}"``), ShardedDataParallel or
    FullyShardedDataParallel (names of the unwrapped model), a mapping ``{name: tensor or parameter}`` (the
    caller's own names: every rank must pass the same keys, with an empty tensor where it holds nothing), a
    tensor, or an iterable of tensors or parameters (named by position: with ``group=``, the i-th tensor of every
    rank is a piece of the same parameter).
    """
    if target is None:
        raise TypeError("target must be a tensor, an iterable of tensors/parameters, a module or an engine; got None")
    target = unwrap_compiled(target)
    custom = _custom_adapter(target)
    if custom is not None:
        return _named_by_adapter(custom, target, group)
    if is_fsdp1(target):
        return _fsdp1_named(target, group)  # type: ignore[arg-type]
    engine = sys.modules.get("deepspeed.runtime.engine")  # never import DeepSpeed here: it takes seconds
    if engine is not None and isinstance(target, engine.DeepSpeedEngine):
        return _deepspeed_named(target, group)
    from .adapters import fairscale as fs_adapter

    if fs_adapter.matches(target):  # reads sys.modules only: never imports fairscale
        fs_shards, fs_names, fs_params = fs_adapter.named(target, group)
        return Named(fs_shards, tuple(fs_names), fs_params)
    if isinstance(target, Mapping):
        bad = [k for k in target if not isinstance(k, str)]  # (before sorting: mixed key types do not sort)
        if bad:
            raise TypeError(f"a mapping target needs str keys (parameter names), got {type(bad[0]).__name__} "
                            f"{bad[0]!r}")
        keys = sorted(target)
        return _named_plain([(k, target[k]) for k in keys], group)
    if isinstance(target, nn.Module):
        inner = _ddp_module(target)
        if inner is not None:
            # DDP: replicated gradients, nothing to combine (as the params adapter does)
            return _named_plain(module_parameters(inner), None)
        from .adapters.params import planned_with_copies

        params = module_parameters(target)
        made: list[Named] = []

        def plan(over: dist.ProcessGroup | None) -> list[Shards]:
            made.append(_named_plain(params, over))
            return list(made[-1].shards)

        shards = planned_with_copies(target, params, group, plan)
        named = made[-1]
        named.shards = shards
        return named
    if isinstance(target, Tensor):
        return _named_plain([("0", target)], group)
    if isinstance(target, Iterable) and not isinstance(target, (str, bytes)):
        return _named_plain([(str(i), t) for i, t in enumerate(target)], group)
    raise TypeError(
        f"dist_clip cannot name the gradients of a {type(target).__module__}.{type(target).__name__} per "
        "parameter; pass a module, a mapping {name: tensor}, an iterable of tensors, or use mode='total'"
    )


# --------------------------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class Measurement:
    """What one collective tells every rank; all tensors float64 on ``device``, identical on every rank.

    Attributes:
        slot_norms: the norm of each slot (the p-th root of its combined partial, loss scale removed).
        total: the global norm over every slot (0-dim).
        presence: per slot, how many gradient pieces exist across ranks (``None`` unless asked for).
        extra: the combined extra values the caller packed into the same buffer (``None`` if none).
        partials: the combined partials per slot (before the root), for callers that merge slots.
        group: the reduction group of the call (``None`` when nothing was combined).
        device: where the vector lives.
        result_dtype: the caller's ``result_dtype``, agreed over the ranks where the group reduces on the host
            (float64 on every rank when any rank's was float64).
    """

    slot_norms: Tensor
    total: Tensor
    presence: Tensor | None
    extra: Tensor | None
    partials: Tensor
    group: dist.ProcessGroup | None
    device: torch.device
    loss_scale: float
    result_dtype: torch.dtype | None = None
    #: off the CPU, where the settings check makes NaN norms instead of raising: the CPU's check, raising its
    #: errors (a host read: for the "error" policy, which reads the host anyway)
    recheck: Callable[[], None] | None = None


def counted_pieces(
    shards: Sequence[Shards], group: dist.ProcessGroup | None, slot_of: Callable[[str, int], int]
) -> list[tuple[Tensor, int]]:
    """(tensor, slot) of the pieces this rank measures: counted ones, replicated ones on rank 0 only."""
    first = _reduce.group_rank(group) == 0
    out: list[tuple[Tensor, int]] = []
    seen: set[int] = set()  # one tensor in two Shards counts once, as it is scaled once
    for s in shards:
        if not s.counted or (s.group is None and not first):
            continue
        for i, t in enumerate(s.tensors):
            if t.numel() > 0 and id(t) not in seen:
                seen.add(id(t))
                out.append((t, slot_of(s.names[i] if s.names else "", i)))
    return out


def slot_partials(
    pieces: Sequence[tuple[Tensor, int]], n_slots: int, p: float, foreach: bool | None, device: torch.device
) -> Tensor:
    """Per-slot partials (float64, ``n_slots``) of ``pieces``: SUM of partials, or NaN-propagating MAX for inf."""
    out = torch.zeros(n_slots, dtype=torch.float64, device=device)
    if not pieces:
        return out
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]] = {}
    for t, slot in pieces:
        entry = buckets.setdefault((t.device, t.dtype), ([], []))
        entry[0].append(t)
        entry[1].append(slot)
    nan_seen = torch.zeros(n_slots, dtype=torch.float64, device=device) if math.isinf(p) else None
    for (dev, _), (tensors, slots) in buckets.items():
        use_foreach = _scale.resolve_foreach(foreach, dev, tensors)
        parts = _reduce.moved(_norm.local_partials(tensors, p, use_foreach), device)
        index = torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True)
        if nan_seen is None:
            out.index_add_(0, index, parts)  # NaN propagates through the sum by itself
        else:
            nan_seen.index_add_(0, index, torch.isnan(parts).to(torch.float64))
            out.scatter_reduce_(0, index, torch.nan_to_num(parts, nan=0.0, posinf=math.inf), reduce="amax")
    if nan_seen is not None:
        out = torch.where(nan_seen > 0, torch.full_like(out, math.nan), out)
    return out


def merge_partials(partials: Tensor, index: Tensor, n_out: int, p: float) -> Tensor:
    """Combine slot partials into ``n_out`` coarser slots (``index[i]`` is slot i's target; -1 drops it). Device
    ops only: dropped slots go to one more slot, cut off at the end (a boolean mask is a host sync on CUDA)."""
    slot = torch.where(index >= 0, index, n_out)
    out = torch.zeros(n_out + 1, dtype=torch.float64, device=partials.device)
    if math.isinf(p):
        nan = torch.zeros_like(out).index_add_(0, slot, torch.isnan(partials).to(torch.float64))
        kept = torch.nan_to_num(partials, nan=0.0, posinf=math.inf)
        out.scatter_reduce_(0, slot, kept, reduce="amax")
        return torch.where(nan > 0, torch.full_like(out, math.nan), out)[:n_out]
    return out.index_add_(0, slot, partials)[:n_out]


def finalize_norms(partials: Tensor, p: float, loss_scale: float) -> Tensor:
    """Norms (float64) from combined partials, with the loss scale removed (the L0 count is scale-free)."""
    norms = _norm.finalize(partials, p)
    if loss_scale != 1.0 and p != 0:
        norms = norms / loss_scale
    return norms


def _digest_bits(world: int, p: float) -> int:
    """Bits per digest: under a SUM the check squares sums of ``world`` digests, exact in float64 while
    ``world * 2**bits <= 2**26`` (25 bits on 2 ranks, 24 on 3-4, 10 at 65536); a MAX only compares them (52)."""
    if math.isinf(p):
        return 52
    return max(1, 26 - max(1, (world - 1).bit_length()))


def _layout_values(layout: Sequence[str], p: float, settings: str, world: int) -> Tensor:
    """Four values that combine to a fingerprint check: two independent digests ``d`` of ``layout`` and the
    call's ``settings`` (integers in [1, 2**bits], :func:`_digest_bits`), each followed by ``d**2`` for a SUM or
    ``-d`` for a MAX reduction; every sum stays an integer below 2**53, so the check is exact. A mismatch slips
    through once in 2**(2 * bits) calls (2**50 on 2 ranks, 2**20 at 65536)."""
    if not layout:
        return _settings_values(settings, p, world)
    return _digest_values(("\x00".join(layout) + "\x01" + settings).encode(), p, world)


@functools.lru_cache(maxsize=64)
def _settings_values(settings: str, p: float, world: int) -> Tensor:
    """:func:`_layout_values` of no names: a total's fingerprint, the same every call (kept, not recomputed)."""
    return _digest_values(("\x01" + settings).encode(), p, world)


def _digest_values(data: bytes, p: float, world: int) -> Tensor:
    # blake2b, not crc32/adler32: adler32's low bits are the byte sum alone, so settings differing by a swap of
    # digits (max_norm 1.41 vs 2.04: same length, same byte sum) left one 10-bit crc to tell them apart.
    digest = hashlib.blake2b(data, digest_size=16).digest()
    mask = (1 << _digest_bits(world, p)) - 1
    out: list[float] = []
    for half in (digest[:8], digest[8:]):
        d = float((int.from_bytes(half, "little") & mask) + 1)
        out += [d, -d if math.isinf(p) else d * d]
    return torch.tensor(out, dtype=torch.float64)


class RefusedElsewhere(RuntimeError):
    """The error a rank raises when another rank of its call refused its input and joined the collective only to
    say so (a NaN fingerprint): recognised by type, not by its message."""


def joined_all_reduce(buffer: Tensor, p: float, group: dist.ProcessGroup | None, error: Exception | None) -> Tensor:
    """The call's one all-reduce, for a rank that may join it only to say it refused its input (``error``, its
    own reason, raised by the caller after the collective). Where no peer answers (gone, or silent until the
    timeout) that reason is raised now, the collective's failure as its context: gloo's error stood in for it
    ("Timed out", "Connection closed by peer"), and the rank's reason was lost."""
    try:
        return _reduce.all_reduce_partials(buffer, _norm.combine_op(p), group)
    except RuntimeError:
        if error is None:
            raise
        raise error  # noqa: B904


REFUSED = (
    "another rank of this call refused its input before the collective (its own error says why: a ValueError or "
    "TypeError for bad input, or whatever its measuring raised) and joined only to say so: every rank raises "
    "together instead of waiting for the timeout"
)


def _layout_check(combined: Tensor, p: float, world: int, n_slots: int, settings: str = "",
                  named: bool = True, on_host: bool | None = None) -> Tensor:
    """Strip the four check values; every rank had the same digests iff ``S1**2 == n * S2`` for both (SUM: the
    difference is the sum of squared pairwise differences) or ``max(d) == -max(-d)`` (MAX). On the CPU (or where
    ``on_host``) a mismatch raises on every rank (they all see the same sums); elsewhere the values become NaN,
    without a host sync."""
    v = combined[-4:]
    a, b = v[0::2], v[1::2]
    same = ((a == -b) if math.isinf(p) else (a * a == world * b)).all()
    body = combined[:-4]
    if body.device.type == "cpu" if on_host is None else on_host:
        if not bool(same):  # one host read on the way that passes (a NaN fingerprint is not "same" either)
            if bool(torch.isnan(v).any()):
                raise RefusedElsewhere(REFUSED)
            if settings and not named:
                raise RuntimeError(
                    f"the ranks of this call disagree on its settings ({settings} here): every rank must clip with "
                    "the same ones (each rank's own norm order or limit gave each its own total or coefficient, "
                    "unnoticed), and pass a fused optimizer= on every rank or on none (a non-finite total skips its "
                    "step: a rank without one stepped NaN)"
                )
            if settings:
                # Unit-wise clipping refuses plan=: recommending one sent the caller into that refusal.
                stages = (
                    "a pipeline stage's module holds only its own, and unit-wise clipping takes no plan=: clip "
                    "each stage with a group= of the ranks holding the same parameters (its data- and "
                    "tensor-parallel peers), or none" if "mode=unitwise" in settings else
                    "a pipeline stage's module holds only its own: pass a dist_clip.ParallelPlan, plan=; under a "
                    "plan, every rank's ParallelPlan must list the same names in the same order"
                )
                groups = (
                    "; per-group clipping also needs every rank's optimizer to put each parameter in the same "
                    "param group, with the same max_norm" if "group_limits=" in settings else ""
                )
                raise RuntimeError(
                    f"the ranks of this call disagree on the target's parameter names ({n_slots} slots here) or on "
                    f"its settings ({settings} here): per-parameter, per-group and unit-wise clipping and reports "
                    f"need the same names in the same order ({stages}), and every rank the same settings{groups}"
                )
            raise RuntimeError(
                f"the ranks of this call disagree on the target's parameter names ({n_slots} slots here): "
                "per-parameter, per-group and unit-wise clipping and reports need the same names in the same order "
                "on every rank. A pipeline stage's module holds only its own parameters: pass a "
                "dist_clip.ParallelPlan with the full model's names (plan=; every rank's plan with the same names "
                "in the same order), or use mode='total'"
            )
        return body
    return torch.where(same, body, torch.full_like(body, math.nan))


def reduction_group_of(shards: Sequence[Shards], group: dist.ProcessGroup | None = None) -> dist.ProcessGroup | None:
    """The group :func:`measure` all-reduces over: ``group`` where given (a plan's), else the one spanning the
    shards' groups. A caller sizing what it sends (a fingerprint's width, whether it combines over other ranks)
    takes it from here, so that it cannot drift from the measurement's."""
    return group if group is not None else _reduce.reduction_group(s.group for s in shards)


def measure(
    shards: Sequence[Shards],
    slot_of: Callable[[str, int], int] | None,
    n_slots: int,
    p: float,
    foreach: bool | None = None,
    *,
    presence: bool = False,
    extra: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    layout: Sequence[str] | None = None,
    result_dtype: torch.dtype | None = None,
    refused: bool = False,
    settings: str = "",
) -> Measurement:
    """Measure every counted piece into its slot and combine everything with ONE all-reduce.

    Args:
        shards: the call's Shards.
        slot_of: ``(name, index in its Shards) -> slot``; ``None`` puts everything into slot 0.
        n_slots: the number of slots, identical on every rank.
        p: a validated norm order.
        foreach: as in the public API.
        presence: also count gradient pieces per slot (to tell "no gradient anywhere" from "zero").
        extra: more float64 values to combine with the same reduction (same length on every rank).
        result_dtype: the dtype this rank's result would take from its own pieces; where the group reduces on
            the host, one more value agrees on it (see :func:`dist_clip.clip.wide_flag`).
        group: the reduction group; by default the common group of the Shards (the world when they differ).
        layout: what gives the slots and ``extra`` their meaning (the parameter names, in slot order), which
            must be identical on every rank. Four more values in the same all-reduce check it (see
            :func:`_layout_check`): a mismatch (a pipeline stage's module passed without a ``ParallelPlan``)
            raises ``RuntimeError`` on every rank on the CPU and turns every norm into NaN elsewhere (no sync).
        refused: this rank found bad input and joins only so that the others do not wait: nothing is measured,
            its fingerprint is NaN, and every rank raises ``RuntimeError`` (:data:`REFUSED`) on the CPU (NaN norms
            elsewhere, no sync); the caller then raises its own error. A ``ValueError`` or ``TypeError`` found
            while measuring (an integer gradient, a piece under an unknown name), or any other error there (a meta
            gradient's ``NotImplementedError``), joins the same way by itself,
            where the payload carries a fingerprint (a layout or settings, a group of more than one rank), and is
            raised after the collective.
        settings: the call's settings every rank must share (norm order, mode, limit, ...), checked with the
            layout (with no layout, on their own).

    Returns:
        A :class:`Measurement`, identical on every rank.
    """
    if n_slots < 1:
        raise ValueError(f"a measurement needs at least one slot, got {n_slots}")
    red = reduction_group_of(shards, group)
    device = _reduce.home_device((t for s in shards for t in s.tensors), red)
    check = (layout is not None or bool(settings)) and red is not None and _reduce.group_size(red) > 1
    pick = slot_of if slot_of is not None else (lambda _n, _i: 0)
    error: Exception | None = None
    if not refused:
        try:
            scale = common_loss_scale(shards)
            if slot_of is None and n_slots == 1:  # one total: clip_grad_norm_'s path, no Python step per piece
                vector = _clip.local_total_partial(_clip._counted_tensors(shards, red)[0], p, foreach,
                                                   device).reshape(1)
            else:
                vector = slot_partials(counted_pieces(shards, red, pick), n_slots, p, foreach, device)
            seen: list[float] | None = None
            if presence:
                # The pieces this rank counts (as counted_pieces picks them, empty ones included): over the ranks
                # every gradient has at least one, and a piece only joining a group (counted=False) none. Counted in
                # Python: a tensor write per piece costs ~10 us.
                seen = [0.0] * n_slots
                first = _reduce.group_rank(red) == 0
                for s in shards:
                    if s.counted and (s.group is not None or first):
                        for i in range(len(s.tensors)):
                            seen[pick(s.names[i] if s.names else "", i)] += 1
        except Exception as e:  # noqa: BLE001 - any error of this rank's measuring (see clip._wide_total)
            if not check:  # no fingerprint to say so: joining with zeros would be a silent wrong answer
                raise
            error = e  # bad input on this rank only, perhaps: join the others' collective, then raise it
            error.dist_clip_joined = True  # type: ignore[attr-defined]  # (GradClipper counts the call as joined)
    if refused or error is not None:
        refused, scale = True, 1.0
        vector = torch.zeros(n_slots, dtype=torch.float64, device=device)
        seen = [0.0] * n_slots if presence else None
    parts = [vector]
    if seen is not None:
        parts.append(torch.tensor(seen, dtype=torch.float64).to(device, non_blocking=True))
    if extra is not None:
        parts.append(_reduce.moved(extra.to(torch.float64), device))  # (no host sync)
    agree = result_dtype is not None and _reduce.reduces_on_host(red, device)
    if agree:
        parts.append(_clip.wide_flag(result_dtype, device))  # type: ignore[arg-type]
    if check:
        if refused:  # this rank found bad input: NaN fingerprints make every rank raise (NaN-safe under MAX)
            values = torch.full((4,), math.nan, dtype=torch.float64)
        else:
            values = _layout_values(layout or (), p, settings, _reduce.group_size(red))  # type: ignore[arg-type]
        parts.append(values.to(device, non_blocking=True))
    buffer = torch.cat(parts) if len(parts) > 1 else vector
    combined = joined_all_reduce(buffer, p, red, error)
    recheck: Callable[[], None] | None = None
    if check and combined.device.type != "cpu":
        raw, world = combined, _reduce.group_size(red)

        def recheck() -> None:  # the CPU's verdict, with its errors (a host read)
            _layout_check(raw, p, world, n_slots, settings, named=layout is not None,  # type: ignore[arg-type]
                          on_host=True)

    if check:
        try:
            combined = _layout_check(combined, p, _reduce.group_size(red), n_slots,  # type: ignore[arg-type]
                                     settings, named=layout is not None)
        except RuntimeError:
            if error is None:
                raise
    if error is not None:
        # (off the CPU the others read NaN norms and went on, counting the call as a non-finite one)
        error.dist_clip_others_counted = combined.device.type != "cpu"  # type: ignore[union-attr]
        raise error  # this rank's own reason; the others raise REFUSED (NaN norms on accelerators)
    partials = combined[:n_slots]
    at = n_slots
    counts_out = None
    if presence:
        counts_out = combined[at : at + n_slots]
        at += n_slots
    extra_out = None
    if extra is not None:
        extra_out = combined[at : at + extra.numel()]
        at += extra.numel()
    if agree:
        result_dtype = _clip.agreed_dtype(combined[at])
    slot_norms = finalize_norms(partials, p, scale)
    if n_slots == 1:  # the total is the one slot's norm (a sum or max of one value is that value)
        total = slot_norms.reshape(())
    else:
        total = finalize_norms(partials.max() if math.isinf(p) else partials.sum(), p, scale)  # (max keeps NaN)
    return Measurement(
        slot_norms=slot_norms,
        total=total,
        presence=counts_out,
        extra=extra_out,
        partials=partials,
        group=red,
        device=device,
        loss_scale=scale,
        result_dtype=result_dtype,
        recheck=recheck,
    )


def all_pieces(shards: Sequence[Shards], slot_of: Callable[[str, int], int] | None) -> list[tuple[Tensor, int]]:
    """(tensor, slot) of every local piece (counted or not), each tensor once: what scaling touches."""
    if slot_of is None:
        return [(t, 0) for t in _clip._all_tensors(shards)]
    seen: set[int] = set()
    out: list[tuple[Tensor, int]] = []
    for s in shards:
        for i, t in enumerate(s.tensors):
            if id(t) not in seen:
                seen.add(id(t))
                out.append((t, slot_of(s.names[i] if s.names else "", i)))
    return out


_SCALAR_LIST_EXACT = (torch.float32, torch.float64)


def scale_slots_wide_(pieces: Sequence[tuple[Tensor, int]], wide: Tensor, coefs: Tensor,
                      foreach: bool | None = None) -> None:
    """:func:`scale_slots_` where some of the float64 CPU coefficients ``wide`` are ones float32 holds only as
    subnormals: the pieces of those slots by a float64 product rounded once (:func:`dist_clip._scale.mul_wide_`),
    the others by their slot's coefficient in ``coefs`` (the result dtype) as :func:`scale_slots_` applies it
    (they took the float64 product too: 99 of 1000 entries of a parameter beside such a slot changed)."""
    values = wide.reshape(-1).tolist()
    if len(values) == 1:
        _scale.mul_wide_([t for t, _ in pieces], values[0])
        return
    tiny = [(t, slot) for t, slot in pieces if 0.0 < values[slot] < _scale.FP32_TINY]
    scale_slots_([(t, slot) for t, slot in pieces if not 0.0 < values[slot] < _scale.FP32_TINY], coefs, foreach)
    for t, slot in tiny:
        _scale.mul_wide_([t], values[slot])


def scale_slots_(pieces: Sequence[tuple[Tensor, int]], coefs: Tensor, foreach: bool | None = None) -> None:
    """Multiply each piece in place by the coefficient of its slot (``coefs``: one per slot).

    One coefficient for everything goes through the fused ``_scale.scale_``. Otherwise each piece is
    multiplied by its slot's 0-dim device tensor (no host sync); on the CPU, where reading is free, by its value,
    and pieces whose coefficient is exactly 1 are left bit-for-bit untouched.
    """
    if not pieces:
        return
    if coefs.numel() == 1:
        _scale.scale_([t for t, _ in pieces], coefs.reshape(()), foreach)
        return
    if coefs.device.type == "cpu":
        # The coefficients are readable for free: one fused call per (device, dtype) with a Python scalar per
        # piece instead of three tensor ops per slot (30 ms on 1248 FSDP1 parameters). Bit for bit what a 0-dim
        # coefficient gives for fp32/fp64; torch's CPU foreach rounds a scalar to bf16/fp16 first, so halves
        # take mul_ one by one, which reads the scalar as float as the 0-dim tensor is read.
        values = coefs.tolist()
        by_kind: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[float]]] = {}
        for t, slot in _scale.writable_pieces(pieces):
            v = values[slot]
            if t.numel() and v != 1.0:
                entry = by_kind.setdefault((t.device, t.dtype), ([], []))
                entry[0].append(t)
                entry[1].append(v)
        for (device, dtype), (tensors, scalars) in by_kind.items():
            if dtype in _SCALAR_LIST_EXACT and _scale.resolve_foreach(foreach, device, tensors):
                try:
                    torch._foreach_mul_(tensors, scalars)
                    continue
                except NotImplementedError:
                    if not _scale.one_by_one_instead(foreach, tensors):
                        raise
            for t, v in zip(tensors, scalars):
                (t._values() if t.is_sparse else t).mul_(v)  # (sparse mul rounds v to t's dtype first)
        return
    by_key: dict[tuple[torch.device, torch.dtype, int], list[Tensor]] = {}
    for t, slot in _scale.writable_pieces(pieces):
        if t.numel():
            by_key.setdefault((t.device, t.dtype, slot), []).append(t)
    for (device, _, slot), tensors in by_key.items():
        _scale.mul_group_(tensors, _reduce.moved(coefs[slot], device), foreach)
