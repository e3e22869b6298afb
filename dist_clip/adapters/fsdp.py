"""FSDP1 (``FullyShardedDataParallel``, FlatParameter) and FSDP2 (``fully_shard``, DTensor) adapters.

FSDP2 and any DTensor gradient: the placements say how a piece counts. ``Shard`` (and ``_StridedShard``) mesh
dims hold distinct pieces whose partials are summed, ``Replicate`` dims hold copies that count once, and
``Partial`` gradients are not gradients yet and are refused. A mesh sliced from a bigger one (``mesh["shard"]``)
has siblings on the other coordinates of its root mesh: they hold copies too, as under HSDP.

Two plans, both with exactly one collective per call:

* *minimal*: every sharded piece is sharded along the same dimension of the same root mesh (the FSDP and
  HSDP layouts). The call reduces over that dimension's group only; replicas compute the same total each.
* *full*: blocks live on different meshes, a piece is sharded along several dims, or ``group=`` was given.
  Every piece is reduced over the world (or ``group``) and counted by one replica only: the one at coordinate
  0 of every replicated dim of its mesh, on the sibling slice that holds its root mesh's first rank. With
  ``group``, :class:`GroupCounting` decides: sibling slices the rank's other gradients span hold copies (tensor
  parallelism), the others other pieces (pipeline stages); a group missing a shard's peers is refused.

FSDP1: each FlatParamHandle is sharded over its process group (the intra-node group for the hybrid
strategies, whose replicas are identical after FSDP's inter-node all-reduce) or replicated (``NO_SHARD``);
parameters no handle manages (ignored modules, or modules of a plain root outside every FSDP instance) are
replicated. The padding FSDP1 appends to the last shards is sliced off.
"""

from __future__ import annotations

import collections
import itertools
import operator
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import _fused, _reduce
from .._reduce import check_covers, same_ranks
from ..shards import Shards

__all__ = [
    "check_context",
    "clean_name",
    "dtensor_shards",
    "fsdp1_handles",
    "fsdp1_reduction",
    "fsdp1_shards",
    "kept_on_root",
    "matches",
    "shards",
    "unmanaged_parameters",
]

_T = TypeVar("_T")

_HYBRID = ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")


def _fsdp1_type() -> type:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def _fsdp2_type() -> type:
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def matches(target: object) -> bool:
    if not isinstance(target, nn.Module):
        return False
    if isinstance(target, (_fsdp1_type(), _fsdp2_type())):
        return True
    # A plain root holding FSDP1 children: its FlatParameters are shards, never replicated gradients.
    fsdp1 = _fsdp1_type()
    return any(isinstance(m, fsdp1) for m in target.modules())


def _world() -> dist.ProcessGroup:
    world = dist.group.WORLD
    assert world is not None
    return world


def _is_distinct(placement: Any) -> bool:  # noqa: ANN401 - torch's Placement, imported lazily
    """Whether a mesh dim holds different pieces: Shard and _StridedShard do (the latter is not ``is_shard()``)."""
    return not placement.is_replicate() and not placement.is_partial()


def _root_mesh(mesh: Any) -> Any:  # noqa: ANN401
    getter = getattr(mesh, "_get_root_mesh", None)
    if getter is not None:
        return getter()
    from torch.distributed.device_mesh import _mesh_resources  # older torch

    return _mesh_resources.get_root_mesh(mesh)


def _dim_key(mesh: Any, root: Any, dim: int) -> tuple[int, object]:  # noqa: ANN401
    """Identifies a mesh dim by its root mesh and name, the same on every rank and every sibling slice."""
    names = mesh.mesh_dim_names
    return (id(root), names[dim] if names else (mesh.ndim, dim))


def _counted_here(mesh: Any, root: Any, coord: Sequence[int], distinct: Sequence[bool], siblings: bool) -> bool:  # noqa: ANN401
    """Whether this rank's piece is the one copy that counts, when pieces are reduced over the world."""
    if any(c != 0 for c, d in zip(coord, distinct) if not d):
        return False  # a copy along one of the mesh's own Replicate dims
    if siblings and root is not mesh:
        origin = int(root.mesh.reshape(-1)[0])
        return origin in mesh.mesh.reshape(-1).tolist()  # the slice holding the root's first rank counts
    return True


class GroupCounting:
    """Which copy of a DTensor piece counts when pieces are reduced over a caller's ``group=``.

    Copies are the ranks along the mesh's own ``Replicate`` dims, and the sibling slices of its root mesh that
    this rank's other gradients on the same root mesh span (a tensor-parallel dim: the peers hold the same
    non-TP parameters, sharded on ``mesh["dp"]`` alike; HSDP replicas of a block on ``mesh["shard"]`` beside
    blocks on the whole mesh). A gradient replicated over the whole root mesh spans it too: a weight tied
    between pipeline stages belongs on a mesh of its own (a DeviceMesh of the ranks that hold it).
    Sibling slices no gradient of this rank spans hold other pieces (pipeline stages). Of all the copies of a
    piece, the lowest rank of ``group`` counts. A group missing a rank that holds another shard of a gradient
    cannot give its norm: ``ValueError`` on every rank (every rank misses its own peers), not a partial total.
    """

    def __init__(self, group: dist.ProcessGroup, meshes: Sequence[Any]) -> None:  # noqa: ANN401
        self.ranks = frozenset(dist.get_process_group_ranks(group))
        self.me = dist.get_rank()
        # Per root mesh: the ranks its meshes among this rank's gradients cover (a mesh made apart, such as a
        # tied weight's over the first and last stage, says nothing of another root's slices).
        self.spanned: dict[int, set[int]] = {}
        for mesh in {id(m): m for m in meshes}.values():
            self.spanned.setdefault(id(_root_mesh(mesh)), set()).update(mesh.mesh.reshape(-1).tolist())
        self._known: dict[tuple[int, tuple[bool, ...], frozenset[str]], bool] = {}
        self.apart: set[int] = set()  # meshes (ids) whose sibling slices hold other pieces (pipeline stages)

    def _first_in_group(self, line: list[int]) -> bool:
        return self.me == min((r for r in line if r in self.ranks), default=self.me)

    @staticmethod
    def _line(grid: Any, coord: Sequence[int], d: int) -> list[int]:  # noqa: ANN401
        """The ranks of ``grid`` that differ from ``coord`` along dim ``d`` only (``coord``'s included)."""
        index: list[Any] = list(coord)
        index[d] = slice(None)
        return grid[tuple(index)].reshape(-1).tolist()

    def counted(self, name: str, mesh: Any, root: Any, coord: Sequence[int], distinct: Sequence[bool],  # noqa: ANN401
                apart: frozenset[str] = frozenset()) -> bool:
        """Whether this rank's piece of ``name`` (on ``mesh`` at ``coord``; ``distinct``: its Shard dims) counts.

        ``apart``: names of root mesh dims whose sibling slices are known to hold other pieces (a
        :class:`~dist_clip.Rule`'s ``distinct=``, expert parallelism): never taken for copies."""
        key = (id(mesh), tuple(distinct), apart)
        known = self._known.get(key)
        if known is None:
            known = self._known[key] = self._decide(name, mesh, root, coord, distinct, apart)
        return known

    def _decide(self, name: str, mesh: Any, root: Any, coord: Sequence[int], distinct: Sequence[bool],  # noqa: ANN401
                apart: frozenset[str] = frozenset()) -> bool:
        grid = mesh.mesh
        peers = set(grid[tuple(slice(None) if d else c for c, d in zip(coord, distinct))].reshape(-1).tolist())
        missing = peers - self.ranks
        if missing:
            raise ValueError(
                f"group= holds ranks {sorted(self.ranks)}, but the gradient of {name!r} is sharded over ranks "
                f"{sorted(peers)} (mesh {tuple(grid.shape)}, dims {mesh.mesh_dim_names}, sharded along "
                f"{[d for d, is_d in enumerate(distinct) if is_d]}): "
                f"ranks {sorted(missing)} hold pieces of it outside the group, so its norm cannot be formed; pass "
                "a group holding them (the shard group, the world) or no group="
            )
        # The copies of this piece: along the mesh's own Replicate dims, then along the sibling slices this
        # rank's other gradients span. The group's lowest rank among all of them counts (taken line by line, a
        # mesh not in row-major rank order, [[3, 1], [0, 2]], had two ranks each the lowest of its own lines).
        copies = set(grid[tuple(slice(None) if not d else c for c, d in zip(coord, distinct))].reshape(-1).tolist())
        if root is not mesh:
            own = set(grid.reshape(-1).tolist())
            spanned = self.spanned.get(id(root), own)
            rgrid, rcoord = root.mesh, root.get_coordinate()
            rnames = root.mesh_dim_names or ()
            where = self._coordinates(rgrid)
            for d in range(root.ndim):
                line = self._line(rgrid, rcoord, d)
                if set(line) <= own:
                    continue  # a dim of the mesh itself
                if not set(line) <= spanned or (d < len(rnames) and rnames[d] in apart):
                    if (set(line) - own) & self.ranks:  # (group= a stage's own shard group mixes nothing: AGC
                        self.apart.add(id(mesh))         # was refused there, naming other stages)
                    continue  # sibling slices holding other pieces (pipeline stages; experts: a rule's distinct=)
                # copies on the sibling slices along d, of every copy found so far
                copies = {r for c in copies for r in self._line(rgrid, where[c], d)}
        return self._first_in_group(list(copies))

    @staticmethod
    def _coordinates(grid: Any) -> dict[int, tuple[int, ...]]:  # noqa: ANN401
        """Each rank's coordinate in ``grid`` (a mesh's tensor of ranks)."""
        shape = tuple(grid.shape)
        out: dict[int, tuple[int, ...]] = {}
        for flat, rank in enumerate(grid.reshape(-1).tolist()):
            coord = []
            for size in reversed(shape):
                flat, i = divmod(flat, size)
                coord.append(i)
            out[rank] = tuple(reversed(coord))
        return out


_SPEC = operator.attrgetter("_spec")
_LOCAL = operator.attrgetter("_local_tensor")
_NAME, _GRAD = operator.itemgetter(0), operator.itemgetter(1)


def refuse_partial(name: str, placements: tuple[Any, ...]) -> None:
    """A gradient whose ``placements`` hold a ``Partial`` is refused (a ``ValueError``), in every mode alike."""
    if any(pl.is_partial() for pl in placements):
        raise ValueError(
            f"gradient of {name!r} has placements {placements}: a Partial gradient is not reduced yet, so its "
            "norm is undefined; redistribute it to Shard/Replicate before clipping"
        )


def dtensor_shards(pairs: Sequence[tuple[str, Tensor]], group: dist.ProcessGroup | None,
                   params: Sequence[tuple[str, Tensor]] = ()) -> list[Shards]:
    """Shards for (name, DTensor gradient) pairs, read from their meshes and placements.

    Args:
        pairs: (name, gradient) with DTensor gradients.
        group: the caller's override. With it, ranks of ``group`` outside a gradient's mesh are taken to hold
            different pieces (pipeline stages): only the mesh's own Replicate dims make copies.
        params: the target's (name, tensor) pairs, frozen parameters too: with ``group``, the meshes of its
            DTensor parameters say which sibling slices hold copies (:class:`GroupCounting`), as the gradients'
            do. The tensor-parallel layers frozen, the layers on ``mesh["dp"]`` were taken for pipeline stages.
    """
    names, grads = list(map(_NAME, pairs)), list(map(_GRAD, pairs))
    ids = list(map(id, map(_SPEC, grads)))
    # What a (mesh, placements) pair implies, worked out once per pair (a model has one or a few), and each
    # gradient's pair found through its DTensorSpec, read once per spec object: torch's FSDP2 gradients share
    # their parameter's spec, which torch makes one object per shape and layout (one for 2,000 gradients of 8
    # elements), and reading every gradient's mesh and placements (hashing each placements tuple) was 0.5 ms of
    # a 1.1 ms call there. Nothing is kept across calls, so nothing goes stale (a placement made anew, a
    # parameter added, a mesh of a new group): the gradients hold their specs until the call returns, so no id
    # is reused within it.
    layouts: list[tuple[Any, Any, list[bool], tuple[int, ...] | None]] = []  # (mesh, root, distinct, coord)
    makers: list[int] = []  # each layout's first spec (its first gradient's)
    seen: dict[tuple[int, tuple[Any, ...]], int] = {}
    of_spec: dict[int, int] = {}  # spec id -> its layout
    keys: set[tuple[int, object]] = set()
    multi = False
    for sid, spec in dict(zip(ids, map(_SPEC, grads))).items():  # (in the order of each spec's first gradient)
        mesh, placements = spec.mesh, tuple(spec.placements)
        known = seen.get((id(mesh), placements))
        if known is None:
            refuse_partial(names[ids.index(sid)], placements)
            distinct = [_is_distinct(pl) for pl in placements]
            root = _root_mesh(mesh)
            dims = [d for d, is_d in enumerate(distinct) if is_d]
            # Two shard dims need the full plan; so does a replicated gradient on a mesh short of the world,
            # which the minimal plan would leave to the first rank of a group that may not hold it, and any
            # gradient on a root mesh short of the world: the ranks off it reduced nothing and read 0 (or
            # their other pieces alone), a different total per rank.
            ws = dist.get_world_size()
            multi = multi or len(dims) > 1 or (not dims and mesh.size() < ws) or root.size() < ws
            keys.update(_dim_key(mesh, root, d) for d in dims)  # on every rank, on the mesh or not: same plan
            coord = mesh.get_coordinate()
            known = seen[(id(mesh), placements)] = len(layouts)
            layouts.append((mesh, root, distinct, None if coord is None else tuple(coord)))
            makers.append(sid)
        of_spec[sid] = known
    # The bucket each layout's gradients go to; -1: this rank is off the mesh and holds nothing of them.
    bucket = [-1] * len(layouts)
    held = [i for i, (_, _, _, coord) in enumerate(layouts) if coord is not None]

    if group is None and not multi and len(keys) <= 1:
        # Minimal plan: one shard dim everywhere (or none). Replicas of it each reduce their own copy.
        groups: dict[tuple[int, tuple[bool, ...]], dist.ProcessGroup | None] = {}
        buckets: dict[int, tuple[int, dist.ProcessGroup | None]] = {}  # group id -> (bucket, group)
        for i in held:
            mesh, _, distinct, _ = layouts[i]
            key = (id(mesh), tuple(distinct))
            if key not in groups:
                groups[key] = mesh.get_group(distinct.index(True)) if any(distinct) else None
            gr = groups[key]
            bucket[i] = buckets.setdefault(id(gr), (len(buckets), gr))[0]
        cut = _cut(names, grads, ids, of_spec, bucket, len(buckets))
        return [Shards(ts, group=gr, names=ns) for (_, gr), (ns, ts) in zip(buckets.values(), cut)]

    if group is not None and held and _only_shard_groups_like([layouts[i] for i in held], group):
        # group= naming the one dim each gradient is sharded over (HSDP's shard group): each replica reduces its
        # own copy, as without group=; the full plan below counts the first replica only, which such a group
        # does not hold on the other replicas (they read 0). Over the caller's object: a rank holding nothing
        # takes the full plan below over that same object, and the two meet in one collective.
        for i in held:
            bucket[i] = 0
        ((ns, ts),) = _cut(names, grads, ids, of_spec, bucket, 1)
        return [Shards(ts, group=group, names=ns)]

    reduce_over = group if group is not None else _world()
    counting = GroupCounting(group, [layouts[i][0] for i in held] + _param_meshes(params)) if group is not None \
        else None
    for i in held:  # (in the order of each layout's first gradient: a refusal names the first one)
        mesh, root, distinct, coord = layouts[i]
        if counting is not None:
            here = counting.counted(names[ids.index(makers[i])], mesh, root, coord, distinct)
        else:
            here = _counted_here(mesh, root, coord, distinct, siblings=True)
        bucket[i] = 0 if here else 1
    (counted, counted_t), (scaled, scaled_t) = _cut(names, grads, ids, of_spec, bucket, 2)
    out = [Shards(counted_t, group=reduce_over, counted=True, names=counted)]
    if scaled_t:
        out.append(Shards(scaled_t, group=reduce_over, counted=False, names=scaled))
    return out


def _param_meshes(params: Sequence[tuple[str, Tensor]]) -> list[Any]:
    """The meshes of the DTensors among (name, tensor) ``params`` that hold this rank (each spec read once)."""
    specs = {id(spec): spec for q in map(_GRAD, params) if (spec := getattr(q, "_spec", None)) is not None
             and hasattr(q, "device_mesh")}
    meshes = {id(spec.mesh): spec.mesh for spec in specs.values()}
    return [m for m in meshes.values() if m.get_coordinate() is not None]


def _cut(names: list[str], grads: list[Tensor], ids: list[int], of_spec: dict[int, int], bucket: list[int],
         n: int) -> list[tuple[list[str], list[Tensor]]]:
    """(names, local tensors) of the gradients in each of ``n`` buckets, in order: a gradient goes to the bucket
    of its spec's layout (``of_spec`` by spec id, then ``bucket``; none for -1). Every gradient in the first
    bucket (FSDP2's usual case, one layout): no pass per bucket."""
    if set(bucket) == {0}:
        return [(names, list(map(_LOCAL, grads)))] + [([], [])] * (n - 1)
    where = list(map(bucket.__getitem__, map(of_spec.__getitem__, ids)))
    out = []
    for b in range(n):
        keep = list(map(b.__eq__, where))
        out.append((list(itertools.compress(names, keep)), list(map(_LOCAL, itertools.compress(grads, keep)))))
    return out


_WRAPPER_PARTS = frozenset(("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"))


def clean_name(name: str) -> str:
    """A parameter name as the unwrapped model spells it: without the path parts FSDP1, activation checkpointing
    and a compiled submodule insert. Whole parts only: a user's submodule ``enc_orig_mod`` beside a parameter
    ``encweight`` lost its ``_orig_mod.`` text and merged with it (one slot, clipped by their combined norm)."""
    if "wrapped_module" not in name and "_orig_mod" not in name:  # most names: two scans in C
        return name
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _handle_layout(
    handle: Any, prefix: str, names: list[str], per_param: bool
) -> list[tuple[str, int, int | None]]:
    """Where this rank's gradient pieces of one FlatParamHandle lie, under full-model names: (name, offset,
    numel) for pieces of the flat grad, or (name, padding, None) for the whole flat grad less FSDP1's padding.
    With ``use_orig_params=True``, one name per original parameter (in ``flat._params`` order, numbers unused),
    whose grads are views of this rank's part of the flat grad (``None`` where that part is empty). Otherwise
    the flat grad is one piece (``per_param=False``: the fewest tensors to measure) or one view per original
    parameter (``per_param=True``: per-parameter norms), cut with ``_shard_param_infos``. Fixed once FSDP has
    wrapped the model: see :func:`_plan`.
    """
    flat = handle.flat_param
    if handle._use_orig_params:
        return [(clean_name(name), 0, 0) for name in names]
    if per_param:
        return [
            (clean_name(name), info.offset_in_shard, info.numel_in_shard)
            for name, info in zip(names, flat._shard_param_infos)
            if info.in_shard
        ]
    padding = flat._shard_numel_padded if handle.uses_sharded_strategy else 0  # FSDP1's padding is not gradient
    return [(clean_name(prefix + "flat_param"), padding, None)]


def _handle_pieces(handle: Any, layout: list[tuple[str, int, int | None]]) -> list[tuple[str, Tensor]]:
    """This step's gradient pieces of one handle, cut as :func:`_handle_layout` says."""
    flat = handle.flat_param
    if handle._use_orig_params:
        return [(name, p.grad) for p, (name, _, _) in zip(flat._params, layout) if p.grad is not None]
    g = flat.grad
    if g is None:
        return []
    # (views that stand for the whole flat grad, its padding left out: see _fused.whole_)
    if layout and layout[0][2] is None:  # the whole shard, less its padding
        name, padding, _ = layout[0]
        return [(name, _fused.whole_(g[: g.numel() - padding]) if padding else g)]
    return [(name, _fused.whole_(g.narrow(0, offset, numel))) for name, offset, numel in layout]


def fsdp1_handles(root: nn.Module) -> Iterator[tuple[nn.Module, Any, str, list[str]]]:
    """(FSDP1 instance, its FlatParamHandle, the dotted path of the module it wraps, the full name of each of the
    handle's parameters in ``flat_param._fqns`` order) for every instance with parameters under ``root``; paths
    and names as ``root.named_modules()`` spells them, wrapper prefixes included. A module registered under
    several parents (``self.enc = self.dec[1] = block``) takes its first path, as the unwrapped model's
    ``named_parameters()`` names its parameters: the handle's own names (``flat_param._fqns``) are paths within
    its unit, so a block registered first as ``last`` and then as ``dec.1`` inside a unit wrapping ``dec`` was
    reported, slotted and matched by AGC's ``exclude=`` as ``dec.1.lin.*`` where the model says ``last.lin.*``
    (and the last path was taken for a unit's own module: ``dec.1.lin.weight`` for ``shared.lin.weight``)."""
    module_names = {id(m): n for n, m in root.named_modules()}  # (each module once, under its first path)
    for module in _fsdp1_type().fsdp_modules(root):
        handle = module._handle
        if handle is not None:
            path = module_names.get(id(handle._fully_sharded_module), "")
            prefix = path + "." if path else ""
            yield module, handle, prefix, [_first_name(handle._fully_sharded_module, fqn, prefix, module_names)
                                           for fqn in handle.flat_param._fqns]


def _first_name(unit: nn.Module, fqn: str, prefix: str, module_names: dict[int, str]) -> str:
    """The name under the root of the parameter ``fqn`` (a path within ``unit``): its module's first path."""
    owner_path, _, leaf = fqn.rpartition(".")
    try:
        owner = unit.get_submodule(owner_path) if owner_path else unit
    except AttributeError:
        return prefix + fqn
    first = module_names.get(id(owner))
    if first is None:
        return prefix + fqn
    return f"{first}.{leaf}" if first else leaf


# One handle of the plan: (handle, its layout, its process group or None when replicated (NO_SHARD), whether this
# rank's copy counts in a full plan: hybrid replicas hold identical shards after backward(), the first counts,
# and the name of its first parameter).
_Unit = tuple[Any, list[tuple[str, int, int | None]], "dist.ProcessGroup | None", bool, str]
_PLAN_ATTR = "_dist_clip_fsdp1_plan"


def kept_on_root(root: nn.Module, key: Hashable, build: Callable[[], _T], also: object = None) -> _T:
    """``build()``, kept on an FSDP1 root for as long as its handles stand: what does not change from step to step.

    Walking the module tree costs about 30 ms a call on a 96-block model with 1248 parameters (most of the call
    there, and host time on a GPU), so an FSDP1 root keeps what a walk finds in its own ``__dict__`` (it lives
    and dies with the model), under ``key``, for as long as FSDP's own list of the root's handles
    (``_all_handles``, set at the root's lazy init) is the same list, and ``also`` (what else ``build`` reads,
    such as a caller's process group) the same object: one entry per key, whatever the caller passes over time.
    A plain root holding FSDP1 children, or a root not yet run, is walked every call.
    """
    _watch_registrations()
    token = root.__dict__.get("_all_handles")
    entries = root.__dict__.get(_PLAN_ATTR, {})
    cached = entries.get(key)
    if (
        token is not None
        and cached is not None
        and cached[0] is token
        and cached[1] == len(token)
        and cached[2] is also
        and _unregistered_since(cached[3], cached[4])
    ):
        cached[3] = _REGISTRATIONS[0]  # nothing under the root since: checked up to now
        return cached[5]  # type: ignore[no-any-return]
    value = build()
    if token is not None:
        modules = frozenset(id(m) for m in root.modules())
        root.__dict__.setdefault(_PLAN_ATTR, entries)[key] = [token, len(token), also, _REGISTRATIONS[0], modules,
                                                              value]
    return value


# Parameters and submodules registered anywhere since import, other than FSDP1's own re-registrations (FSDP1
# re-registers its flat and, under use_orig_params, original parameters whenever it switches views: those are
# marked ``_fsdp_flattened``), with the id of the module registered on. A kept plan lists the parameters no
# FSDP1 handle manages by object: one added to the model after the first call, or replaced
# (``module.weight = nn.Parameter(...)``, an ignored module's), was never counted or clipped, and the old
# object's stale gradient was read instead. Recorded by torch's global registration hooks; a plan is rebuilt
# only when one of them landed on a module of its root (a model built elsewhere each step costs nothing).
_REGISTRATIONS = [0]
_LOG: collections.deque[tuple[int, int]] = collections.deque(maxlen=4096)
_WATCHING: list[object] = []


def _unregistered_since(count: int, modules: frozenset[int]) -> bool:
    """Whether no parameter or submodule was registered on one of ``modules`` after registration ``count``."""
    if count == _REGISTRATIONS[0]:
        return True
    if not _LOG or _LOG[0][0] > count + 1:  # the log no longer reaches back that far
        return False
    for n, owner in reversed(_LOG):  # newest first: stop at what the plan has already seen
        if n <= count:
            return True
        if owner in modules:
            return False
    return True


def registrations() -> int:
    """Parameters and submodules registered on any module since the hooks below went in (on the first call; FSDP1's
    own flat parameters aside): caches of what a model holds (FSDP1 plans, DeepSpeed's trainable check) keep it
    and are rebuilt when it moved."""
    _watch_registrations()
    return _REGISTRATIONS[0]


def _watch_registrations() -> None:
    if _WATCHING:
        return
    from torch.nn.modules.module import (
        register_module_module_registration_hook,
        register_module_parameter_registration_hook,
    )

    # Never traced: compiled autograd builds an OptimizedModule inside a frame dynamo watches, and this hook,
    # traced there, raised KeyError("_orig_mod") on the half-built module (any compiled-autograd backward in a
    # process that once clipped an FSDP or DeepSpeed model). Under fullgraph=True a registration inside the
    # compiled code (a submodule assigned in forward) then raises, with this reason.
    @torch.compiler.disable(reason=(
        "dist_clip counts module and parameter registrations (its caches of a model's layout are rebuilt after one) "
        "in a hook torch runs on every registration, which is never traced: register modules and parameters "
        "outside torch.compile(fullgraph=True) code"))
    def counted(module: nn.Module, name: str, value: object) -> None:
        if not getattr(value, "_fsdp_flattened", False):
            _REGISTRATIONS[0] += 1
            _LOG.append((_REGISTRATIONS[0], id(module)))

    _WATCHING.append(register_module_parameter_registration_hook(counted))
    _WATCHING.append(register_module_module_registration_hook(counted))


def first_replica(module: nn.Module, handle: Any) -> bool:
    """Whether this rank's shard of a sharded handle counts where the reduction spans more than its shard group:
    hybrid replicas hold identical shards after backward(), and the first of them counts."""
    return handle._sharding_strategy.name not in _HYBRID or dist.get_rank(module._inter_node_pg) == 0


def _only_shard_groups_like(layouts: Sequence[tuple[Any, ...]], group: dist.ProcessGroup) -> bool:
    """Whether every (mesh, root, distinct, coord) layout is sharded over exactly one mesh dim whose group holds
    the ranks of ``group`` (worked out once per mesh and layout)."""
    known: dict[tuple[int, tuple[bool, ...]], bool] = {}
    for mesh, _, distinct, _ in layouts:
        key = (id(mesh), tuple(distinct))
        if key not in known:
            known[key] = sum(distinct) == 1 and same_ranks(mesh.get_group(distinct.index(True)), group)
        if not known[key]:
            return False
    return True


def fsdp1_reduction(
    shard_groups: Sequence[dist.ProcessGroup], group: dist.ProcessGroup | None
) -> tuple[dist.ProcessGroup, bool]:
    """Over which group an FSDP1 root's sharded pieces combine, and whether every replica's copy counts there:
    the one shard group its handles share, when no ``group=`` is given (each hybrid replica then reduces its own
    copy to the same total), else ``group`` or the world, where only the first hybrid replica counts."""
    one = bool(shard_groups) and all(same_ranks(g, shard_groups[0]) for g in shard_groups[1:])
    if one and (group is None or same_ranks(group, shard_groups[0])):
        # group= naming the shard group (HYBRID_SHARD's intra-node group) is the same plan: counted as the first
        # replica only, the other replicas, which that group does not reach, read 0. The caller's object is used.
        # Handles given distinct group objects of the same ranks (a root and its children each over its own
        # new_group) share one too: the world added another job's gradients on the other ranks.
        return (group if group is not None else _reduce.same_everywhere(shard_groups)), True
    for pg in shard_groups:  # FSDP1 over the world with a subgroup, HYBRID_SHARD with its replicate group
        check_covers(group, pg, "FSDP1 shards gradients")
    return (group if group is not None else _world()), False


def _plan(root: nn.Module, per_param: bool) -> tuple[list[_Unit], list[tuple[str, nn.Parameter]]]:
    """The handles under ``root`` and the parameters no handle manages (identical on every rank), with their
    names, kept on the root (:func:`kept_on_root`)."""

    def build() -> tuple[list[_Unit], list[tuple[str, nn.Parameter]]]:
        units: list[_Unit] = []
        managed: set[int] = set()
        for module, handle, prefix, names in fsdp1_handles(root):
            flat = handle.flat_param
            managed.add(id(flat))
            managed.update(id(p) for p in (flat._params or ()) if handle._use_orig_params)
            layout = _handle_layout(handle, prefix, names, per_param)
            first_name = clean_name(names[0]) if names else clean_name(prefix + "flat_param")
            if handle.uses_sharded_strategy:
                units.append((handle, layout, handle.process_group, first_replica(module, handle), first_name))
            else:
                units.append((handle, layout, None, True, first_name))
        unmanaged = [(clean_name(n), p) for n, p in root.named_parameters() if id(p) not in managed]
        for n, p in unmanaged:
            if type(p).__name__ == "DTensor":
                # FSDP2 (fully_shard) or tensor-parallel parameters beside FSDP1 ones: taken for whole, replicated
                # tensors, their shards were measured on one rank only while torch's DTensor ops ran collectives
                # of their own there (gloo aborted the process: "16 vs 8").
                raise ValueError(
                    f"{n} is a DTensor parameter (fully_shard, or tensor parallel) under a target holding FSDP1 "
                    "modules: one target cannot mix FSDP1 with DTensor parameters. Measure each part with "
                    "dist_clip.get_total_norm and clip both with clip_grads_with_norm_ by their combined norm, or "
                    "use fully_shard throughout"
                )
            if getattr(p, "_fsdp_flattened", False):
                # A module an FSDP1 instance wraps, passed instead of that instance: its own flat parameter (or,
                # under use_orig_params, its parameters' sharded views) would pass for whole, replicated tensors.
                raise ValueError(
                    f"{n} is a shard managed by an FSDP1 instance above the module passed; pass the "
                    "FullyShardedDataParallel module that wraps it (the root), not its .module"
                )
        return units, unmanaged

    return kept_on_root(root, ("shards", per_param), build)


def unmanaged_parameters(root: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter under ``root`` no FSDP1 handle manages (whole on every rank)."""
    return _plan(root, False)[1]


def fsdp1_shards(root: nn.Module, group: dist.ProcessGroup | None, per_param: bool = False) -> list[Shards]:
    """Shards of an FSDP1 root (or a plain root holding FSDP1 children); see :func:`_handle_layout`."""
    # Sharded pieces as (counted in a full plan, name, grad), and the groups of every sharded handle: a rank
    # whose shards are padding only has no grad at all (use_orig_params) yet must join the call.
    sharded: list[tuple[bool, str, Tensor]] = []
    groups: dict[int, dist.ProcessGroup] = {}
    replicated_names: list[str] = []
    replicated: list[Tensor] = []
    unsharded: list[tuple[dist.ProcessGroup, list[tuple[str, Tensor]]]] = []  # NO_SHARD handles' replicas
    check_context(root)  # (before the plan: one built inside summon_full_params() is wrong, and kept)
    units, unmanaged = _plan(root, per_param)
    check_reduced(root, units)
    hint: tuple[str, Tensor] | None = None  # an empty tensor of a handle's dtype, for a rank holding no gradient
    for handle, layout, pg, first, first_name in units:
        pieces = _handle_pieces(handle, layout)
        if pg is not None:
            groups.setdefault(id(pg), pg)
            sharded.extend((first, n, g) for n, g in pieces)
            if not pieces and hint is None:
                hint = (first_name, handle.flat_param.detach().new_empty(0, dtype=_grad_dtype(handle)))
        else:
            unsharded.append((handle.process_group, pieces))
    for n, p in unmanaged:
        if p.grad is not None:
            replicated_names.append(n)
            replicated.append(p.grad)

    out: list[Shards] = []
    reduce_over, whole = fsdp1_reduction(list(groups.values()), group)
    wide = not whole and (bool(groups) or group is not None)
    for pg, pieces in unsharded:
        if wide:
            # Reduced over more than the handle's ranks (group= spanning pipeline stages, each NO_SHARD over its
            # own ranks): the lowest rank of the handle's group in the reduction counts its copy (rank 0 of the
            # reduction alone did, and the other stages' were dropped: every rank returned the first stage's
            # norm and clipped the others by it).
            first = _reduce.first_copy_in(pg, reduce_over)
            sharded.extend((first, n, g) for n, g in pieces)
        else:
            replicated_names.extend(n for n, _ in pieces)
            replicated.extend(g for _, g in pieces)
    if whole:
        # Minimal plan: reduce over the one shard group; hybrid replicas each compute the same total.
        out.append(Shards([g for _, _, g in sharded], group=reduce_over, names=[n for _, n, _ in sharded]))
    elif wide:
        # Handles on different groups (or group=): reduce over the world and count each shard on one replica.
        for flag in (True, False):
            part = [(n, g) for first, n, g in sharded if first is flag]
            if part or flag:
                out.append(
                    Shards([g for _, g in part], group=reduce_over, counted=flag, names=[n for n, _ in part])
                )
    if replicated or not out:
        out.append(Shards(replicated, group=None, names=replicated_names))
    if hint is not None and not sharded and not replicated:
        # Padding only here (use_orig_params): nothing to measure or scale, but the total's dtype follows the
        # gradients' (float64 for a float64 model), as on the ranks that hold some. Not counted: no presence.
        out.append(Shards([hint[1]], group=out[0].group, counted=False, names=[hint[0]]))
    return out


def _grad_dtype(handle: Any) -> torch.dtype:  # noqa: ANN401 - torch's FlatParamHandle
    """The dtype of a handle's gradients after backward: its parameters', or under ``MixedPrecision(...,
    keep_low_precision_grads=True)`` the compute dtype (FSDP1 leaves them in ``param_dtype`` there)."""
    if getattr(handle, "_keep_low_precision_grads", False) and not getattr(handle, "_force_full_precision", False):
        return handle._fwd_bwd_param_dtype  # type: ignore[no-any-return]
    return handle.flat_param.dtype  # type: ignore[no-any-return]


_UNREDUCED = (
    "the FSDP1 gradients are not reduced yet: dist_clip was called inside no_sync(), or after a backward inside "
    "it with no synchronised backward since (each rank then holds its own whole, unreduced gradient). Clip "
    "after the last backward of the accumulation, outside no_sync()"
)


def _sync_holders(root: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The FSDP1 instances and the DDP modules under ``root`` (kept on an FSDP1 root: :func:`kept_on_root`)."""

    def build() -> tuple[list[nn.Module], list[nn.Module]]:
        from .params import _ddp_types

        fsdp1, ddp = _fsdp1_type(), _ddp_types()
        found = list(root.modules())
        return [m for m in found if isinstance(m, fsdp1)], [m for m in found if isinstance(m, ddp)]

    return kept_on_root(root, "sync holders", build)


_SUMMONED = (
    "dist_clip was called inside FSDP1's summon_full_params(): the parameters are unsharded for the context (and "
    "under summon_full_params(with_grads=True) the gradients; with rank0_only=True on rank 0 alone), not laid out "
    "as the shards the call reads. Clip outside it"
)


def check_context(root: nn.Module) -> None:
    """ValueError, on every rank, where the FSDP1 instances under ``root`` are in a state whose gradients cannot be
    read as reduced shards: inside ``no_sync()`` or ``summon_full_params()`` (both set on every rank). Checked
    before the plan is built: one built inside ``summon_full_params()`` with flat parameters would list their
    unflattened views (FSDP1 registers them for the context) as parameters no handle manages, and be kept on the
    root after it."""
    instances, ddps = _sync_holders(root)
    if any(getattr(m.training_state, "name", "") == "SUMMON_FULL_PARAMS" for m in instances):
        # (the state of every instance summoned, on every rank: with rank0_only=True and with_grads=True rank 0
        # alone holds unsharded gradients, and it alone raised while the others waited in the collective; AGC
        # combined the rows cut between shards wrong with the parameters unsharded)
        raise ValueError(_SUMMONED)
    if getattr(root, "_sync_gradients", True) is False or any(m._sync_gradients is False for m in instances):
        # (every FSDP1 instance under the root: a NO_SHARD child in a plain container inside its own no_sync()
        # gave each rank its own total, 0.35 and 0.74, which no shard size tells)
        raise ValueError(_UNREDUCED)
    from .params import check_ddp_synced

    for ddp in ddps:  # a DDP beside the FSDP1 modules (in the container, or FSDP1's ignored_states)
        check_ddp_synced(ddp)


def check_reduced(root: nn.Module, units: list[_Unit] | None = None) -> None:
    """ValueError unless the FSDP1 gradients under ``root`` are reduced. Inside ``no_sync()`` (the root's
    ``_sync_gradients`` is off) each rank holds its own gradient; a sharded handle keeps the whole unsharded,
    unreduced gradient where its shard will be until a synchronised backward, which measured as a shard gave a
    meaningless total (the ranks' local norms combined) and, less its padding, dropped real entries. ``units``:
    the plan, built after :func:`check_context` passed (else that is checked here first)."""
    if units is None:
        check_context(root)
        units = _plan(root, False)[0]
    for handle, _, pg, _, _ in units:
        flat = handle.flat_param
        if pg is not None and flat.grad is not None and flat.grad.numel() != flat._sharded_size.numel():
            raise ValueError(_UNREDUCED)


def shards(target: object, group: dist.ProcessGroup | None) -> list[Shards]:
    if not isinstance(target, _fsdp2_type()):  # an FSDP1 root, or a plain root with FSDP1 children
        return fsdp1_shards(target, group)  # type: ignore[arg-type]
    from .params import shards as param_shards  # FSDP2: DTensor grads, plus any left unsharded

    return param_shards(target, group)
