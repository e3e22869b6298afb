"""FSDP1 (``FullyShardedDataParallel``, FlatParameter) and FSDP2 (``fully_shard``, DTensor) adapters.

FSDP2 and any DTensor gradient: the placements say how a piece counts. ``Shard`` mesh dims hold distinct
pieces (their partials are summed), ``Replicate`` dims hold copies (counted once), ``Partial`` gradients are not
gradients yet and are refused. When every DTensor of a call needs the same group, the reduction runs over the
shard dimension only and replicas each compute the same total; when blocks live on different meshes, every
piece is reduced over its whole mesh (the world) and counted only by the replica at coordinate 0, so the call
still issues exactly one collective.

FSDP1: each FlatParamHandle is sharded over its process group (the intra-node group for the hybrid
strategies, whose replicas are identical after FSDP's inter-node all-reduce) or replicated (``NO_SHARD``);
parameters no handle manages are replicated. The padding FSDP1 appends to the last shard is sliced off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
from torch import Tensor, nn

from ..shards import Shards

__all__ = ["dtensor_shards", "matches", "shards"]


def _fsdp1_type() -> type:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def _fsdp2_type() -> type:
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def matches(target: object) -> bool:
    return isinstance(target, nn.Module) and isinstance(target, (_fsdp1_type(), _fsdp2_type()))


def _mesh_group(mesh, override: dist.ProcessGroup | None) -> dist.ProcessGroup:  # noqa: ANN001
    """A group spanning every rank of ``mesh``."""
    if override is not None:
        return override
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        world = dist.group.WORLD
        assert world is not None
        return world
    raise ValueError(
        f"gradients live on a {mesh.ndim}-D device mesh of {mesh.size()} ranks that is not the whole world "
        f"({dist.get_world_size()} ranks) while other gradients need another group; pass group= naming a "
        "process group that spans all of them"
    )


def dtensor_shards(pairs: Sequence[tuple[str, Tensor]], group: dist.ProcessGroup | None) -> list[Shards]:
    """Shards for (name, DTensor gradient) pairs, read from their meshes and placements."""
    minimal: list[tuple[dist.ProcessGroup | None, str, Tensor]] = []
    full: list[tuple[dist.ProcessGroup, bool, str, Tensor]] = []
    for name, g in pairs:
        mesh, placements = g.device_mesh, g.placements
        coord = mesh.get_coordinate()
        if coord is None:  # this rank is not on the gradient's mesh: it holds nothing of it
            continue
        if any(pl.is_partial() for pl in placements):
            raise ValueError(
                f"gradient of {name!r} has placements {tuple(placements)}: a Partial gradient is not reduced "
                "yet, so its norm is undefined; redistribute it to Shard/Replicate before clipping"
            )
        local = g._local_tensor
        shard_dims = [d for d, pl in enumerate(placements) if pl.is_shard()]
        replicated_here = all(coord[d] == 0 for d, pl in enumerate(placements) if not pl.is_shard())
        full.append((_mesh_group(mesh, group), replicated_here, name, local))
        if group is None:
            if not shard_dims:
                minimal.append((None, name, local))
            elif len(shard_dims) == 1:
                minimal.append((mesh.get_group(shard_dims[0]), name, local))
            else:
                minimal.append((_mesh_group(mesh, None), name, local))  # forces the full plan below
    distinct = {id(gr): gr for gr, _, _ in minimal if gr is not None}
    use_minimal = group is None and len(minimal) == len(full) and len(distinct) <= 1 and not any(
        len([pl for pl in g.placements if pl.is_shard()]) > 1 for _, g in pairs
    )
    buckets: dict[tuple[int, bool], tuple[dist.ProcessGroup | None, bool, list[str], list[Tensor]]] = {}
    if use_minimal:
        for gr, name, local in minimal:
            key = (id(gr), True)
            buckets.setdefault(key, (gr, True, [], []))
            buckets[key][2].append(name)
            buckets[key][3].append(local)
    else:
        for gr, counted, name, local in full:
            key = (id(gr), counted)
            buckets.setdefault(key, (gr, counted, [], []))
            buckets[key][2].append(name)
            buckets[key][3].append(local)
    return [Shards(tensors, group=gr, counted=counted, names=names) for gr, counted, names, tensors in buckets.values()]


def _fsdp1_shards(root: nn.Module, group: dist.ProcessGroup | None) -> list[Shards]:
    fsdp = _fsdp1_type()
    sharded: dict[int, tuple[dist.ProcessGroup, list[str], list[Tensor]]] = {}
    replicated_names: list[str] = []
    replicated: list[Tensor] = []
    managed: set[int] = set()
    names = {id(p): n for n, p in root.named_parameters(remove_duplicate=False)}
    for module in fsdp.fsdp_modules(root):
        handle = module._handle
        if handle is None:
            continue
        flat = handle.flat_param
        managed.add(id(flat))
        pieces: list[tuple[str, Tensor]] = []
        if handle._use_orig_params:
            for p, fqn in zip(flat._params, flat._fqns):
                managed.add(id(p))
                if p.grad is not None:
                    pieces.append((names.get(id(p), fqn), p.grad))
        elif flat.grad is not None:
            g = flat.grad
            if handle.uses_sharded_strategy and flat._shard_numel_padded:
                g = g[: g.numel() - flat._shard_numel_padded]  # FSDP1's zero padding is not gradient
            pieces.append((names.get(id(flat), "flat_param"), g))
        if handle.uses_sharded_strategy:
            pg = group if group is not None else handle.process_group
            entry = sharded.setdefault(id(pg), (pg, [], []))
            for n, g in pieces:
                entry[1].append(n)
                entry[2].append(g)
        else:
            for n, g in pieces:
                replicated_names.append(n)
                replicated.append(g)
    for n, p in root.named_parameters():
        if id(p) not in managed and p.grad is not None:  # left unwrapped: identical on every rank
            replicated_names.append(n)
            replicated.append(p.grad)
    out = [Shards(ts, group=pg, names=ns) for pg, ns, ts in sharded.values()]
    if replicated or not out:
        out.append(Shards(replicated, group=None, names=replicated_names))
    if not sharded and group is not None:
        out.append(Shards([], group=group))
    return out


def shards(target: object, group: dist.ProcessGroup | None) -> list[Shards]:
    if isinstance(target, _fsdp1_type()):
        return _fsdp1_shards(target, group)
    from .params import shards as param_shards

    return param_shards(target, group)
