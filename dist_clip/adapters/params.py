"""Plain tensors, iterables of parameters, plain modules and DistributedDataParallel.

Under DDP every rank holds the same, already averaged gradients, so the norm needs no collective at all.
Plain tensors with ``group=`` are pieces that differ on every rank of ``group`` (the caller's own sharding):
one collective over ``group`` sums them. DTensor gradients met anywhere here are handed to the DTensor logic
of the FSDP adapter, so ``model.parameters()`` of an FSDP2 model is as good as the model.
"""

from __future__ import annotations

import functools
import itertools
import operator
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._reduce import reduction_group as _reduction_group
from .._warn import warn_at_caller
from ..shards import Shards

__all__ = [
    "absent_dtensor_grads",
    "copy_counted_here",
    "copy_peers",
    "fsdp2_data_peers",
    "gradient_of",
    "holds_dtensors",
    "is_parameter",
    "listed_stand_ins",
    "matches",
    "named_grads",
    "refuse_managed",
    "shards",
    "shards_of_grads",
    "shards_with_stand_ins",
    "split_dtensors",
]

_NAMES: list[str] = []


def _positions(n: int) -> list[str]:
    """``["0", "1", ..., str(n - 1)]``, from a cache: formatting 1000 ints costs as much as measuring them."""
    if len(_NAMES) < n:
        _NAMES.extend(map(str, range(len(_NAMES), n)))
    return _NAMES[:n]


_PLAIN_KINDS = frozenset((Tensor, nn.Parameter))
#: absent_dtensor_grads's stand-ins by ``id`` of their parameter, each with the layout it was made for (mesh, held,
#: so compared by identity; placements; dtype and device), which is checked on every use: a stand-in depends on that
#: layout only, so an id reused by another parameter is harmless. Not a weak dictionary: a weak reference on a
#: parameter makes ``module.to()``/``.float()`` refuse to swap it ("Cannot swap t1 because it has weakref"). Cleared
#: when it grows past _STAND_INS_MAX (parameters made and dropped over a long run).
_STAND_INS: dict[int, tuple[Any, Any, tuple[torch.dtype, torch.device], Tensor]] = {}
_STAND_INS_MAX = 1 << 16
_PARAMETER = frozenset((nn.Parameter,))
_requires_grad = operator.attrgetter("requires_grad")
_grad = operator.attrgetter("grad")
_is_set = functools.partial(operator.is_not, None)
_second = operator.itemgetter(1)
_IS_PARAM = itertools.repeat("_is_param")
_FALSE = itertools.repeat(False)


def gradient_of(t: Tensor) -> Tensor | None:
    """The gradient a target element stands for: ``.grad`` of a parameter, the tensor itself otherwise.

    See :func:`is_parameter`; a parameter's ``.grad`` is measured, and skipped when ``None``.
    """
    return t.grad if is_parameter(t) else t


def is_parameter(t: Tensor) -> bool:
    """Whether a target element is a parameter (its ``.grad`` counts) rather than a gradient.

    An ``nn.Parameter`` (any subclass, frozen or not, and tensor subclasses marked ``_is_param`` such as
    FSDP2's DTensor parameters), a leaf tensor that requires grad, or a view of one (``p.view(-1)``: its
    ``.grad`` is ``None`` and it is skipped, as torch skips it) is a parameter, and so is a tensor whose ``.grad``
    is set (a weight frozen after its backward, a tensor given a ``.grad`` by hand: its values were measured and
    scaled as a gradient, where torch clips its ``.grad``), or a non-leaf tensor given ``retain_grad()``. Any
    other tensor is taken to be
    a gradient already, as ``torch.nn.utils.get_total_norm`` takes it: also a gradient that requires grad
    because ``backward(create_graph=True)`` or ``autograd.grad(create_graph=True)`` made it part of a graph (it
    has a ``grad_fn``, and is not a view of a leaf: such gradients often come back as views, e.g. expanded).
    """
    # The cheap tests first: isinstance goes through nn.Parameter's metaclass in Python (~1-2 us a call).
    return (
        type(t) is nn.Parameter
        or getattr(t, "_is_param", False)
        or (t.requires_grad and (t.grad_fn is None or _views_a_leaf(t)))
        or isinstance(t, nn.Parameter)
        or (not t.requires_grad and t.grad is not None)  # a leaf: reading .grad does not warn
        # A non-leaf given retain_grad() (an activation kept for its gradient): its .grad counts, as in torch
        # (its values were measured and scaled in place as a gradient, the gradient left unclipped).
        or t.retains_grad
    )


def _views_a_leaf(t: Tensor) -> bool:
    base = t._base if t._is_view() else None
    return base is not None and base.grad_fn is None and base.requires_grad


def matches(target: object) -> bool:
    return isinstance(target, (Tensor, nn.Module, Iterable))


def _is_dtensor(t: Tensor) -> bool:
    return _is_dtensor_type(type(t))


def _is_dtensor_type(kind: type) -> bool:
    return kind.__name__ == "DTensor" and kind.__module__.startswith("torch.distributed")


def split_dtensors(grads: Iterable[tuple[str, Tensor]]) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """Separate (name, grad) pairs into plain and DTensor gradients, keeping order."""
    grads = grads if isinstance(grads, list) else list(grads)
    kinds = set(map(type, map(_second, grads)))
    if kinds <= _PLAIN_KINDS:  # no DTensor: checked in C
        return grads, []
    # _is_dtensor reads the type alone: decided once per type (a test per gradient cost ~1 ms a call on 2000
    # FSDP2 gradients), and every gradient a DTensor (FSDP2's usual case) without a loop
    of_dtensors = {k for k in kinds if k is not Tensor and _is_dtensor_type(k)}
    if kinds <= of_dtensors:
        return [], list(grads)
    plain: list[tuple[str, Tensor]] = []
    dtensors: list[tuple[str, Tensor]] = []
    for pair in grads:
        (dtensors if type(pair[1]) in of_dtensors else plain).append(pair)
    return plain, dtensors


def module_parameters(module: nn.Module, remove_duplicate: bool = True) -> list[tuple[str, Tensor]]:
    """``module.named_parameters()`` as an optimizer holds them, refused where gradients are not reduced yet.

    ``remove_duplicate=False`` lists a tied parameter under each of its names (what a
    :class:`~dist_clip.ParallelPlan` reads: it names the copy and the owner), with the same swap and checks.

    FSDP2 (``fully_shard``): a parameter group left unsharded (``set_reshard_after_backward(False)``, torch's
    accumulation recipe) registers plain unsharded parameters whose ``.grad`` is ``None`` (reduced) or this
    rank's own unreduced sum; the reduced gradient sits on the sharded parameter the optimizer steps, which
    stands in for it here (it was left out: 0.70 for 1.31, or 0 with every module unsharded). Gradient sync
    off (``set_requires_gradient_sync(False)``; ``set_requires_all_reduce(False)`` where replicas all-reduce),
    or gradients accumulated without it and not reduced since (sync turned back on after the last backward),
    and composable ``replicate``'s sync off: ``ValueError`` (each rank's own total, or 0, was returned). The
    FSDP2 module owning a parameter may enclose the target (a submodule clipped on its own): it is found
    through torch's registry of composable states.
    """
    pairs = list(module.named_parameters(remove_duplicate=remove_duplicate))
    fully_shard = sys.modules.get("torch.distributed.fsdp._fully_shard._fully_shard")
    replicate = sys.modules.get("torch.distributed._composable.replicate")
    if "torch.distributed.tensor.parallel.ddp" in sys.modules:  # (loaded by DDP or replicate() over TP only)
        _refuse_dp_over_tp(module, replicate)
    if fully_shard is None and replicate is None:
        if dist.is_available() and dist.is_initialized():
            _check_nested_ddp(module)
        return pairs
    groups: dict[int, Any] = {}
    root = fully_shard is not None and isinstance(module, fully_shard.FSDPModule)
    if root:
        # An FSDP2 root after its lazy init: the states under it from the walk kept on it (no walk over the module
        # tree per call, which took 0.3 ms on a 32-block model). Not the root's own list of states from its lazy
        # init: a module fully_shard-ed under it after that (a layer made anew) is not in it (its unsharded
        # parameters were not stood in for, left out after an evaluation forward, 3.910 for 3.991, and its sync off
        # not refused: measured, 8.38), and a module replaced since still is (its sync off refused the model).
        root = bool(module._get_fsdp_state()._is_root)  # type: ignore[operator]
        if root:
            holders, states = _walk(module, replicate)
            for st in states:
                groups.update((id(pg), pg) for pg in _param_groups(st))
            # A DDP (its parameters ignored by fully_shard) or a replicate() module under the root, inside its own
            # no_sync: counted as replicas, rank 0's unaveraged gradients set every rank's total (0.85 both).
            for m in holders:
                _check_synced(m, replicate)
    if not root:
        ddp = _ddp_types()
        for m in module.modules():
            if isinstance(m, ddp):  # a DDP inside a plain container (a DDP target is checked by shards())
                check_ddp_synced(m)
            elif fully_shard is not None and isinstance(m, fully_shard.FSDPModule):
                groups.update((id(pg), pg) for pg in _param_groups(m._get_fsdp_state()))
            elif replicate is not None:
                state = replicate.replicate.state(m)
                if state is not None and getattr(state, "_no_sync", False):
                    _unsynced(f"a replicated {type(m).__name__}", "set_requires_gradient_sync(False)")
    if fully_shard is None:
        return pairs
    enclosed = not isinstance(module, fully_shard.FSDPModule) and bool(pairs)
    if enclosed:
        # Not an FSDP2 module itself: the one managing its parameters may enclose it (a submodule clipped alone).
        groups.update((id(pg), pg) for pg in _all_fsdp2_param_groups())
    if not groups:
        return pairs
    from torch.distributed.fsdp._fully_shard._fsdp_common import DDPMeshInfo

    mine = set(map(id, map(_second, pairs))) if enclosed else set()
    swap: dict[int, Tensor] = {}
    for pg in groups.values():
        fps = pg.fsdp_params
        unsharded = [getattr(fp, "_unsharded_param", None) for fp in fps] if enclosed or not pg.is_sharded else []
        if enclosed and not any(id(fp.sharded_param) in mine or id(u) in mine
                                or id(getattr(fp, "_sharded_post_forward_param", None)) in mine
                                for fp, u in zip(fps, unsharded)):
            continue  # another model's, or another part of this one
        how = _unreduced(pg, DDPMeshInfo)
        if how is not None:
            _unsynced(pg, how)
        if not pg.is_sharded:
            for fp, u in zip(fps, unsharded):
                if u is not None:
                    swap[id(u)] = fp.sharded_param
                # reshard_after_forward=<int> after a forward without backward registers a DTensor on the
                # smaller mesh, without gradient: the reduced one is on the sharded parameter (it was left out)
                post = getattr(fp, "_sharded_post_forward_param", None)
                if post is not None and post.grad is None:
                    swap[id(post)] = fp.sharded_param
    return [(n, swap.get(id(q), q)) for n, q in pairs] if swap else pairs


def _refuse_dp_over_tp(module: nn.Module, replicate: Any) -> None:
    """ValueError for DDP or composable ``replicate()`` over a tensor-parallel module (torch's 2-D recipe with
    DDP, ``DistributedDataParallel(parallelize_module(...), device_mesh=mesh["dp"])``): torch's
    ``_pre_dp_module_transform`` swaps the DTensor parameters for local tensors around the wrapper, and after the
    first forward the module registers only the parameters tensor parallelism left alone, so the total silently
    missed the others (0.907 for 1.402). Found by the forward pre-hook that transform puts on the module, with
    the tensors it localized: torch applies it to any module wrapped over a mesh sliced from a larger one, a
    pipeline stage without tensor parallelism too (measured right, and refused by the hook alone)."""
    reconstruct = sys.modules["torch.distributed.tensor.parallel.ddp"]._reconstruct_dtensor
    ddp = _ddp_types()
    for m in (module, *_sync_holders(module, replicate)):
        inner = m.module if isinstance(m, ddp) else m
        if reconstruct in inner._forward_pre_hooks.values() and _localized_dtensors(inner):
            raise ValueError(
                f"{type(m).__name__} is data parallel over a tensor-parallel module (torch's "
                "_pre_dp_module_transform, as DistributedDataParallel or replicate() with device_mesh= does over "
                "parallelize_module): torch swaps its DTensor parameters for local tensors, and after a forward the "
                "module no longer registers them, so their gradients cannot be measured. Use FSDP2 (fully_shard "
                "over the data-parallel mesh dimension) over the tensor-parallel model"
            )


def _localized_dtensors(module: nn.Module) -> bool:
    """Whether torch's ``_localize_dtensor`` swapped DTensor parameters under ``module``: before a forward they are
    local parameters marked ``_st_info``; after one, the DTensors its pre-hook put back stay as plain attributes
    (not parameters)."""
    for m in module.modules():
        if any(hasattr(q, "_st_info") for q in m._parameters.values() if q is not None):
            return True
        if any(isinstance(v, Tensor) and _is_dtensor(v) for v in vars(m).values()):
            return True
    return False


def _check_nested_ddp(module: nn.Module) -> None:
    """:func:`check_ddp_synced` for every DDP under ``module``: a container holding one, clipped inside its
    ``no_sync()``, gave each rank its own total (11.20 and 10.11), where the DDP itself is refused. The DDPs are
    found by :func:`_sync_holders` (kept on the module), only once torch.distributed is up."""
    for m in _sync_holders(module, None):
        check_ddp_synced(m)


_SYNC_HOLDERS = "_dist_clip_sync_holders"


def _sync_holders(root: nn.Module, replicate: Any) -> list[nn.Module]:
    """The DDP (and, given torch's composable ``replicate`` module, ``replicate()``d) modules under ``root``
    (:func:`_walk`)."""
    return _walk(root, replicate)[0]


def _walk(root: nn.Module, replicate: Any) -> tuple[list[nn.Module], list[Any]]:
    """:func:`_sync_holders`, and the FSDP2 states of the ``fully_shard``-ed modules under ``root`` (the root's
    included), by a plain walk over ``_modules`` (``modules()`` took 5x as long), kept on the root until a module
    or parameter is registered anywhere or a composable state is added (a walk of a 673-module model cost 0.25 ms
    a call)."""
    from torch.distributed._composable_state import _module_state_mapping

    from .fsdp import _watch_registrations, registrations

    _watch_registrations()
    key = (registrations(), len(_module_state_mapping))
    kept = root.__dict__.get(_SYNC_HOLDERS)
    if kept is not None and kept[0] == key:
        return kept[1], kept[2]
    ddp = _ddp_types()
    fully_shard = sys.modules.get("torch.distributed.fsdp._fully_shard._fully_shard")
    sharded = fully_shard.FSDPModule if fully_shard is not None else ()
    found: list[nn.Module] = []
    states: list[Any] = []
    stack = [root]
    while stack:
        m = stack.pop()
        if isinstance(m, ddp) or (replicate is not None and replicate.replicate.state(m) is not None):
            found.append(m)
        if isinstance(m, sharded) and (st := _fsdp2_state(m)) is not None:
            states.append(st)
        stack.extend(c for c in m._modules.values() if c is not None)
    root.__dict__[_SYNC_HOLDERS] = (key, found, states)
    return found, states


def _fsdp2_state(module: nn.Module) -> Any:  # noqa: ANN401 - torch's FSDPState
    """A ``fully_shard``-ed module's state, or None where torch has none for it (a deep copy's)."""
    try:
        return module._get_fsdp_state()  # type: ignore[operator]
    except AssertionError:
        return None


def _check_synced(m: nn.Module, replicate: Any) -> None:
    if isinstance(m, _ddp_types()):
        check_ddp_synced(m)
        return
    state = replicate.replicate.state(m) if replicate is not None else None
    if state is not None and getattr(state, "_no_sync", False):
        _unsynced(f"a replicated {type(m).__name__}", "set_requires_gradient_sync(False)")


def _unreduced(pg: Any, ddp_mesh_info: type) -> str | None:  # noqa: ANN401 - torch's FSDPParamGroup
    """Why an FSDP2 param group's gradients are not reduced yet (what :func:`_unsynced` says), or None."""
    if not pg.reduce_grads:
        return "set_requires_gradient_sync(False)"
    if not pg.all_reduce_grads and isinstance(pg.mesh_info, ddp_mesh_info):
        return "set_requires_all_reduce(False)"
    if getattr(pg, "_partial_reduce_output", None) is not None or _any_accumulated(pg.fsdp_params):
        return ("gradients accumulated without sync and not reduced since: sync was turned back on after the last "
                "backward")
    if _any_unsharded_grad(pg.fsdp_params):
        # FSDP2 sets an unsharded parameter's gradient to None once it reduced it: one still there was summed by a
        # backward without sync (kept there whether or not the module resharded; the accumulated one above under a
        # reduce dtype). Resharded, nothing else showed it: a call after sync was turned back on read 0.
        if pg.is_sharded:
            return ("gradients accumulated without sync and not reduced since: sync was turned back on after the last "
                    "backward")
        return "an unsharded parameter holds this rank's own gradient"
    return None


def _refuse_unreduced(items: Iterable[object]) -> None:
    """:func:`_unsynced` for a listed or mapped target (or a single tensor) holding parameters of an FSDP2 (or
    ``replicate_with_fsdp``) param group whose gradients are not reduced, or their gradients: the sharded
    parameters (their gradients ``None``, or last step's zeros), the unsharded ones
    ``set_reshard_after_backward(False)`` registers (each rank's own gradient) or the
    ``reshard_after_forward=<int>`` ones. As a module target is: a list read 0 with sync off, each rank its own
    total with the module left unsharded (0.42 and 1.51), and the other modules' total alone with sync off on
    one of them (0.82, silently)."""
    if "torch.distributed.fsdp._fully_shard._fully_shard" not in sys.modules:
        return
    groups = _all_fsdp2_param_groups()
    if not groups:
        return
    from torch.distributed.fsdp._fully_shard._fsdp_common import DDPMeshInfo

    suspects = [(pg, how) for pg in groups if (how := _unreduced(pg, DDPMeshInfo)) is not None]
    if not suspects:
        return
    listed = set(map(id, items))
    for pg, how in suspects:
        for fp in pg.fsdp_params:
            for t in (fp.sharded_param, getattr(fp, "_unsharded_param", None),
                      getattr(fp, "_sharded_post_forward_param", None)):
                # The parameter, or its gradient listed as a tensor (torch's own idiom, [p.grad for p in
                # model.parameters() if p.grad is not None]: with the module left unsharded, each rank's own sum,
                # 0.41 and 1.50 read; the sharded gradients with sync off on one block, the other blocks' alone).
                if t is not None and (id(t) in listed or ((g := t.grad) is not None and id(g) in listed)):
                    _unsynced(pg, how)


_ACCUMULATED = operator.attrgetter("unsharded_accumulated_grad")


def _any_accumulated(fsdp_params: Sequence[Any]) -> bool:
    """Whether some FSDP2 parameter of a group holds a gradient accumulated without sync; in C over the group (read
    on every call, for every group a target touches)."""
    try:
        return any(map(operator.is_not, map(_ACCUMULATED, fsdp_params), itertools.repeat(None)))
    except AttributeError:  # a torch without the attribute
        return any(map(_accumulated, fsdp_params))


_UNSHARDED_GRAD = operator.attrgetter("_unsharded_param.grad")


def _any_unsharded_grad(fsdp_params: Sequence[Any]) -> bool:
    """Whether some FSDP2 parameter of a group holds a gradient on its unsharded parameter; in C over the group."""
    try:
        return any(map(operator.is_not, map(_UNSHARDED_GRAD, fsdp_params), itertools.repeat(None)))
    except AttributeError:  # a parameter never unsharded yet (before the lazy init, or the first forward)
        return any(getattr(getattr(fp, "_unsharded_param", None), "grad", None) is not None for fp in fsdp_params)


def _accumulated(fsdp_param: Any) -> bool:
    """Whether an FSDP2 parameter holds a gradient accumulated without sync (not reduced yet)."""
    return getattr(fsdp_param, "unsharded_accumulated_grad", None) is not None


def _unsynced(where: object, how: str) -> None:
    what = where if isinstance(where, str) else f"the FSDP2 module {getattr(where, '_module_fqn', '') or '(root)'!r}"
    raise ValueError(
        f"dist_clip was called on {what} whose gradients are not reduced yet ({how}): each rank would clip by "
        "its own norm. Clip after the last backward of the accumulation, with gradient sync on for that backward"
    )


def named_grads(target: object, params: list[tuple[str, Tensor]] | None = None,
                _refused: bool = False) -> list[tuple[str, Tensor]]:
    """(name, gradient) pairs of a tensor, an iterable or a module; duplicates (tied weights) once. ``params``:
    the module's :func:`module_parameters`, where the caller has them already. ``_refused``: the listed refusal
    ran already (the stand-ins' second pass: a sharded parameter stands in for an unsharded one of the same group,
    already checked; scanning every FSDP2 group again cost 0.25 ms a call over 100 groups)."""
    if isinstance(target, Tensor):
        names: Sequence[str] = ("0",)
        items: Sequence[object] = (target,)
        # One parameter (or gradient) of an FSDP2 module whose gradients are not reduced: refused as in a list (each
        # rank its own gradient's norm was read, 0.077 and 0.141, with the module left unsharded; 0 with sync off)
        if not _refused:
            _refuse_unreduced(items)
    elif isinstance(target, nn.Module):
        pairs = module_parameters(target) if params is None else params
        names, items = (list(x) for x in zip(*pairs)) if pairs else ([], [])
    elif isinstance(target, Mapping):
        raise TypeError(
            f"expected a tensor, an iterable of tensors or an nn.Module, got a {type(target).__name__} (iterating "
            "it gives its keys): pass its .values(), or the mapping to GradClipper, whose modes take {name: tensor}"
        )
    elif isinstance(target, Iterable) and not isinstance(target, (str, bytes)):
        items = list(target)
        names = _positions(len(items))
        if not _refused:
            _refuse_unreduced(items)
    else:
        raise TypeError(f"expected a tensor, an iterable of tensors or an nn.Module, got {type(target).__name__}")
    # The hot path of every call: with only tensors (parameters, gradients, DTensor parameters), no duplicates
    # and no FSDP1 marks, every check runs in C over the whole list (1000 parameters: ~0.1 ms instead of ~0.4).
    kinds = set(map(type, items))
    if (
        all(issubclass(k, Tensor) for k in kinds)
        and len(set(map(id, items))) == len(items)
        and not any(any(map(hasattr, items, itertools.repeat(mark))) for mark in _managed_marks())
    ):
        if kinds == _PARAMETER:
            grads = list(map(_grad, items))
            if not all(map(_is_set, grads)) and (swapped := _listed_stand_ins(target, items)) is not None:
                return named_grads(swapped, _refused=True)
        elif (
            nn.Parameter in kinds
            or not kinds <= _PLAIN_KINDS
            or any(map(_requires_grad, items))
            or any(map(_is_set, map(_grad, items)))  # a tensor with a .grad is a parameter (is_parameter)
        ):
            # Every item marked a parameter (FSDP2's DTensor parameters: is_parameter's second test): their .grad in
            # C, without is_parameter per item (0.4 ms over 2000)
            grads = (list(map(_grad, items)) if all(map(getattr, items, _IS_PARAM, _FALSE))
                     else [t.grad if is_parameter(t) else t for t in items])
            if not all(map(_is_set, grads)) and (swapped := _listed_stand_ins(target, items)) is not None:
                return named_grads(swapped, _refused=True)
        else:
            return [pair for pair in zip(names, items) if pair[1] is not None]  # type: ignore[misc]
        return each_gradient_once([pair for pair in zip(names, grads) if pair[1] is not None])  # type: ignore[misc]
    seen: set[int] = set()
    out: list[tuple[str, Tensor]] = []
    for name, t in zip(names, items):
        if not isinstance(t, Tensor):
            raise TypeError(f"expected tensors or parameters in the target, got {type(t).__name__} at {name}")
        if id(t) in seen:
            continue
        seen.add(id(t))
        refuse_managed(name, t)
        g = gradient_of(t)
        if g is not None:
            out.append((name, g))
    return each_gradient_once(out)


def _all_fsdp2_param_groups() -> list[Any]:
    """Every FSDP2 param group in the process, through torch's registry of composable states."""
    from torch.distributed._composable_state import _module_state_mapping

    out: list[Any] = []
    for ref in list(_module_state_mapping.values()):
        state = ref() if callable(ref) else ref  # weak references to the states
        out.extend(_param_groups(state))
    return out


def _param_groups(state: Any) -> list[Any]:
    """An FSDP2 state's param groups: ``_fsdp_param_groups`` in torch 2.13 (the floor tested here); torch 2.11,
    the one the lent GPU machine carries, holds one ``_fsdp_param_group`` or None. Anything else: none."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    one = getattr(state, "_fsdp_param_group", None)
    return [] if one is None else [one]


def _listed_stand_ins(target: object, items: list[object]) -> list[object] | None:
    """``items`` with FSDP2 parameters listed while their module is unsharded replaced; None where a listed
    target (not a module: its own path swaps) holds none. ``model.parameters()`` after a forward that had no
    backward (an evaluation or logging forward: the root keeps its parameters unsharded after forward; under
    ``reshard_after_forward=<int>`` DTensors on the smaller mesh), or under ``set_reshard_after_backward(False)``,
    yields registered parameters whose ``.grad`` is None once reduced; the sharded parameter the optimizer
    steps holds the reduced gradient and stands in for each (they were left out, silently: 0.854 for 1.237), as
    when the module is the target; so for one such parameter passed alone (it read 0: 0.0 for 0.054)."""
    if isinstance(target, nn.Module) or "torch.distributed.fsdp._fully_shard._fully_shard" not in sys.modules:
        return None
    swap: dict[int, object] = {}
    for pg in _all_fsdp2_param_groups():
        if pg.is_sharded:
            continue
        for fp in pg.fsdp_params:
            for u in (getattr(fp, "_unsharded_param", None), getattr(fp, "_sharded_post_forward_param", None)):
                if u is not None and u.grad is None:
                    swap[id(u)] = fp.sharded_param
    out = [swap.get(id(t), t) for t in items] if swap else items
    return out if any(a is not b for a, b in zip(out, items)) else None


def listed_stand_ins(items: Sequence[tuple[str, Tensor]]) -> Sequence[tuple[str, Tensor]]:
    """(name, tensor) pairs of a listed or mapped target with :func:`_listed_stand_ins` applied: the named
    modes (per-parameter, per-group, unit-wise, reports) left out the FSDP2 parameters a list yields while their
    module is unsharded (1.95 for 3.27 after an evaluation forward), as the total does not. Only where some
    listed parameter has no gradient."""
    if "torch.distributed.fsdp._fully_shard._fully_shard" not in sys.modules:
        return items
    _refuse_unreduced(t for _, t in items)
    if all(not isinstance(t, nn.Parameter) or t.grad is not None for _, t in items):  # (a non-leaf's .grad warns)
        return items
    swapped = _listed_stand_ins(items, [t for _, t in items])
    return items if swapped is None else [(n, t) for (n, _), t in zip(items, swapped)]  # type: ignore[misc]


def each_gradient_once(pairs: list[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """Each gradient once: a parameter listed beside its own ``.grad`` ([p, p.grad]), or two parameters given one
    gradient tensor, counted it twice in the norm while the scaling touched it once (set-based)."""
    if len(set(map(id, map(_second, pairs)))) == len(pairs):  # the common case, checked in C
        return pairs
    seen: set[int] = set()
    out = []
    for name, g in pairs:
        if id(g) not in seen:
            seen.add(id(g))
            out.append((name, g))
    return out


# Attributes that FSDP1 (its FlatParameters and, under use_orig_params=True, the original parameters) and
# DeepSpeed ZeRO (stage 3: ds_id; stages 1-2: param_idx_in_group; BF16_Optimizer, ZeRO-1 with bf16 and fp32
# gradient accumulation or a bf16 pipeline, and stages 1-2 again: _hp_mapping, the link to the fp32 copy) set on
# the parameters they manage.
_FSDP1_MARKS = ("_fsdp_flattened",)
_ALL_MARKS = ("_fsdp_flattened", "ds_id", "param_idx_in_group", "_hp_mapping")


#: fairscale FSDP sets ``_is_sharded`` (True where this rank holds a shard) on every parameter it manages.
_FAIRSCALE_MARKS = ("_is_sharded",)


def _managed_marks() -> tuple[str, ...]:
    """The marks to look for: DeepSpeed's and fairscale's only once imported (none can exist before)."""
    marks = _ALL_MARKS if "deepspeed" in sys.modules else _FSDP1_MARKS
    return marks + _FAIRSCALE_MARKS if "fairscale" in sys.modules else marks


def refuse_managed(name: str, t: Tensor, plan: bool = False) -> None:
    """ValueError for a parameter whose gradient a sharding wrapper holds: an FSDP1 (or fairscale FSDP)
    parameter's gradient may be a shard, which nothing here can tell from a replicated tensor, and DeepSpeed ZeRO
    moves gradients into its partitions and sets ``.grad`` to None (the total would silently read 0).

    ``plan``: the target was given with a ParallelPlan, which reads none of them, the wrapper itself included
    (the advice to pass the wrapper itself was no remedy there: the engine or the FSDP module passed under a
    plan was told to pass the engine or the module itself)."""
    if getattr(t, "_fsdp_flattened", False):
        what, wrapper = "is managed by FSDP1 (its gradient may be a shard of flattened parameters)", (
            "the FullyShardedDataParallel module itself", "its parameters()")
    elif getattr(t, "_is_sharded", False) is True and hasattr(t, "_orig_size"):
        # Each rank measured its own shards as whole tensors: 17.08 on one rank, 22.75 on the other for 28.45.
        what, wrapper = "is sharded by fairscale's FullyShardedDataParallel (its gradient is this rank's shard)", (
            "the FullyShardedDataParallel module itself", "its parameters() or a module holding it")
    elif hasattr(t, "ds_id") or hasattr(t, "param_idx_in_group") or hasattr(t, "_hp_mapping"):
        # BF16_Optimizer (_hp_mapping only) reduces its fp32 accumulation buffers and leaves each rank's own,
        # unreduced bf16 gradient in .grad: engine.module read 9.27 on one rank and 10.94 on the other for 9.82.
        what, wrapper = (
            "is managed by DeepSpeed ZeRO or its BF16_Optimizer (its reduced gradient lives in the engine's "
            "partitions or fp32 buffers; .grad is None or this rank's own, unreduced one)"
        ), ("the engine itself", "engine.module or its parameters()")
    else:
        return
    if plan:
        raise ValueError(
            f"parameter {name} {what}: a ParallelPlan reads plain, DDP, FSDP2 and DTensor gradients only, not "
            f"this wrapper's, whatever part of it is passed; clip {wrapper[0]} without plan="
        )
    raise ValueError(f"parameter {name} {what}; pass {wrapper[0]}, not {wrapper[1]}")


def _ddp_types() -> tuple[type, ...]:
    from torch.nn.parallel import DistributedDataParallel

    return (DistributedDataParallel,)


def shards_of_grads(grads: Sequence[tuple[str, Tensor]], group: dist.ProcessGroup | None,
                    params: Sequence[tuple[str, Tensor]] = ()) -> list[Shards]:
    """Shards for (name, gradient) pairs: plain tensors and DTensors, each by its own rule. ``params``: the
    target's (name, tensor) pairs, frozen parameters and those without a gradient too (:func:`holds_dtensors`)."""
    plain, dtensors = split_dtensors(grads)
    out: list[Shards] = []
    if plain or not dtensors:
        # Plain tensors beside DTensors are the parameters FSDP2 left unsharded: copies on every rank,
        # whatever group= says about the DTensors. Alone, with group=, they are the caller's own shards, unless
        # the target holds DTensor parameters without a gradient: every sharded layer frozen (fine-tuning the
        # unsharded ones), they were summed over group= (sqrt(2) times the norm on 2 ranks), where trainable
        # ones, or ones whose gradients are None (stand-ins), made them copies.
        copies = not dtensors and group is not None and bool(plain) and holds_dtensors(params)
        plain_group = None if dtensors or copies else group
        names, tensors = zip(*plain) if plain else ((), ())
        out.append(Shards(list(tensors), group=plain_group, names=list(names)))
        if copies:
            # group='s collective joined all the same, with nothing: a pipeline stage frozen so took none, and the
            # stages holding DTensor gradients waited in theirs until the timeout
            out.append(Shards([], group=group))
    if dtensors:
        from .fsdp import dtensor_shards

        out.extend(dtensor_shards(dtensors, group, params))
    return out


def holds_dtensors(params: Sequence[tuple[str, Tensor]]) -> bool:
    """Whether some tensor of the (name, tensor) pairs ``params`` is a DTensor (by type, each type once)."""
    return any(map(_is_dtensor_type, set(map(type, map(_second, params))) - _PLAIN_KINDS))


def check_ddp_synced(ddp: nn.Module) -> None:
    """ValueError inside DDP's ``no_sync()``: each rank holds its own, unaveraged gradients there, and the
    total measured on them (no collective: replicas are taken to be identical) differed on every rank."""
    if getattr(ddp, "require_backward_grad_sync", True) is False:
        raise ValueError(
            "dist_clip was called inside DistributedDataParallel.no_sync(): the gradients are not averaged yet "
            "(each rank would clip by its own norm). Clip after the last backward of the accumulation, outside "
            "no_sync()"
        )


# torch's DDP communication hooks that step an optimizer once a bucket is reduced: ZeroRedundancyOptimizer's
# overlap_with_ddp=True hooks, DDP._register_fused_optim's and _apply_optimizer_in_backward's (by module, then the
# name of the function the hook factory returns).
_STEPPING_HOOKS = {
    "torch.distributed.algorithms.ddp_comm_hooks.ddp_zero_hook": ("hook_with_zero_fn",
                                                                  "hook_with_zero_interleaved_fn"),
    "torch.distributed.algorithms.ddp_comm_hooks.optimizer_overlap_hooks": ("hook_then_optimizer_wrapper",
                                                                            "apply_optim_in_backward_hook"),
}


def _stepping_comm_hook(ddp: nn.Module) -> str | None:
    """The name of a communication hook of ``ddp`` that steps an optimizer inside the backward, or None."""
    for entry in getattr(ddp, "_comm_hooks", None) or ():
        fn = entry[0] if isinstance(entry, tuple) and entry else entry
        fn = getattr(fn, "func", fn)  # (a functools.partial)
        names = _STEPPING_HOOKS.get(getattr(fn, "__module__", None) or "")
        if names is not None and getattr(fn, "__name__", None) in names:
            return str(fn.__name__)
    return None


def refuse_stepped_in_backward(target: object) -> None:
    """ValueError for a clip of a DDP (the target, or one inside a module target) whose communication hook steps
    an optimizer inside the backward (``DDP._register_fused_optim``, ``ZeroRedundancyOptimizer(overlap_with_ddp=
    True)``'s ``hook_with_zero_step``): the parameters were stepped with the gradients before the clip (2 ranks,
    ``_register_fused_optim(Adam)``: a NaN batch's total read NaN with every parameter NaN already, and a finite
    one's coefficient scaled gradients already used, silently). Measuring (``get_total_norm``) stays allowed.
    A composable ``replicate()`` module (the target, or inside it) is checked through the DDP its state holds: a
    hook given to its ``register_comm_hook`` goes to that DDP, and one that stepped inside the backward was
    clipped after it, silently (2 ranks: 7.84 returned and every gradient scaled after the step had used it)."""
    if isinstance(target, _ddp_types()):
        ddps: list[tuple[nn.Module, str]] = [(target, "DistributedDataParallel")]
    elif isinstance(target, nn.Module) and dist.is_available() and dist.is_initialized():
        ddps = [(ddp, "DistributedDataParallel" if ddp is m else f"replicate()d {type(m).__name__}")
                for m, ddp in _held_ddps(target)]
    else:
        return
    for ddp, what in ddps:
        hook = _stepping_comm_hook(ddp)
        if hook is not None:
            raise ValueError(
                f"this {what}'s communication hook ({hook}) steps the optimizer inside the "
                "backward, as its buckets are reduced: the parameters were stepped with these gradients before any "
                "clip after the backward, so a clip or skip here reaches no step (a non-finite batch has already "
                "been stepped). Clip with an optimizer stepped after the backward; get_total_norm still measures"
            )


def shards(target: object, group: dist.ProcessGroup | None) -> list[Shards]:
    if isinstance(target, _ddp_types()):
        # DDP gradients are identical on every rank once backward() returns: nothing to combine. A group
        # passed by the caller cannot make replicas distinct, so it is not used.
        check_ddp_synced(target)  # type: ignore[arg-type]
        return shards_of_grads(named_grads(target.module), None)  # type: ignore[union-attr]
    if isinstance(target, nn.Module):
        params = module_parameters(target)
        pairs = named_grads(target, params)

        def plan(over: dist.ProcessGroup | None) -> list[Shards]:
            if len(pairs) < len(params):  # some gradient None here (frozen, unused, or set to None on this rank)
                return shards_with_stand_ins(pairs, absent_dtensor_grads(params, alone=not pairs), over, params)
            return shards_of_grads(pairs, over)

        return planned_with_copies(target, params, group, plan)
    elif isinstance(target, Iterable) and not isinstance(target, (Tensor, Mapping, str, bytes)):
        items = list(target)  # (a generator: read once)
        listed = _listed_parameters(items, group)
        if listed is not None:
            return listed
        pairs = named_grads(items)
        if len(pairs) < len(items):
            listed = _listed_stand_ins(items, items) or items  # (FSDP2's unsharded ones: their sharded ones)
            named = [(n, t) for n, t in zip(_positions(len(listed)), listed) if isinstance(t, Tensor)]
            absent = absent_dtensor_grads(named, alone=not pairs)
            if absent and not pairs:
                # A list whose gradients are all None on this rank (a per-rank zero_grad(set_to_none=True), a
                # rank whose layers were all unused) joins the others' collective through its stand-ins: it
                # returned 0 alone while the others waited for it until the timeout. Still said, as for any
                # target without gradients (before a backward, under FSDP2's sync off the total reads 0).
                warn_at_caller("dist_clip: the target holds no gradients on this rank; its total is the other "
                               "ranks' (0 where none holds any)")
            return shards_with_stand_ins(pairs, absent, group, named)
    else:
        pairs = named_grads(target)
        if not pairs and isinstance(target, Tensor):
            # A lone parameter without a gradient here (its layer unused on this rank): planned as a list of it,
            # with a stand-in in its layout where it is a DTensor, as the named modes plan it. It made no
            # collective and read 0, and the other rank's collective met this rank's next call (2 ranks, a
            # Shard(0) parameter: both returned 4.0, the next call's 4.899 on neither, then a hang).
            return shards([target], group)
    return shards_of_grads(pairs, group)


def _listed_parameters(items: list[object], group: dist.ProcessGroup | None) -> list[Shards] | None:
    """:func:`shards` of a list of distinct plain parameters, each with a gradient of its own (plain, not a
    DTensor), or None for any other list: what :func:`named_grads` then :func:`shards_of_grads` give for it, the
    same checks in the same order, without the (name, gradient) pairs they build and take apart again (2000
    tuples a call on 2000 parameters, which also set off the garbage collector's passes; five C-level passes over
    the list less)."""
    if set(map(type, items)) != _PARAMETER or len(set(map(id, items))) != len(items):
        return None
    if any(any(map(hasattr, items, itertools.repeat(mark))) for mark in _managed_marks()):
        return None
    grads = list(map(_grad, items))
    if (not all(map(_is_set, grads)) or len(set(map(id, grads))) != len(grads)
            or not set(map(type, grads)) <= _PLAIN_KINDS):
        return None  # (a gradient missing, shared by two parameters, or a DTensor: the general path)
    _refuse_unreduced(items)  # (named_grads's refusal: nothing above raises, so it raises as there)
    return [Shards(grads, group=group, names=_positions(len(grads)))]


def planned_with_copies(target: nn.Module, params: Sequence[tuple[str, Tensor]], group: dist.ProcessGroup | None,
                        plan: Callable[[dist.ProcessGroup | None], list[Shards]]) -> list[Shards]:
    """``plan(group)`` (the Shards of a module target's ``params`` over a group) with its DDP copies counted once
    (:func:`replicas_counted_once`), planned over the world where :func:`_copies_differ_beyond` says so. One rule
    for the total and the named modes (``report=True``, per-parameter): the named ones kept HSDP's shard group,
    0.3644 and 0.4823 for 0.5838 (the experts case there)."""
    out = plan(group)
    over = None
    if group is None and _copies_differ_beyond(target, out, params):
        over = dist.group.WORLD
        if _reduction_group([sh.group for sh in out]) is not None:
            group, out = over, plan(over)
        # else plain gradients only (the FSDP2 layers frozen): they stay copies, the DDP ones count over the world
    return replicas_counted_once(target, out, dict(params), group, over)


def _copies_differ_beyond(target: nn.Module, shards: list[Shards], params: Sequence[tuple[str, Tensor]]) -> bool:
    """Whether a module target without ``group=`` must be planned over the world: DDP (or ``replicate()``)
    gradients beside FSDP2 pieces whose reduction (HSDP's shard group: its replicas are the same) leaves out
    ranks FSDP2 reduces with, which read other batches, while FSDP2 reduces over every rank. Experts under a
    DDP over ``mesh["dp"]`` beside dense layers under HSDP replicated along ep: the ep = 1 expert was left out on
    the ep = 0 ranks and the other way round (0.3644 and 0.4823 for 0.5838 on a 2 ep x 2 dp mesh), each rank
    clipping its own way. So too where the call plans no reduction at all, its FSDP2 layers frozen (no DTensor
    gradient, no stand-in): each ep line read its own expert alone (0.3289 and 0.4561 for 0.5624 beside HSDP,
    0.3439 and 0.4437 for 0.5613 beside FSDP2 on the world; AGC's total was right). Decided alike on every rank
    (FSDP2's groups span the world on each)."""
    if not replica_groups(target):
        return False
    data = fsdp2_data_peers(q for _, q in params)
    if data != set(range(dist.get_world_size())):
        return False
    reduce_over = _reduction_group([sh.group for sh in shards])
    return reduce_over is None or bool(data - set(dist.get_process_group_ranks(reduce_over)))


def replica_groups(target: nn.Module) -> dict[int, dist.ProcessGroup]:
    """id(parameter) -> the process group of the DDP or composable ``replicate()`` under ``target`` (or
    ``target`` itself, replicated) that holds it: its gradient is a copy on each rank of that group."""
    if not (dist.is_available() and dist.is_initialized()):
        return {}
    owner: dict[int, dist.ProcessGroup] = {}
    for _, ddp in _held_ddps(target):
        owner.update((id(q), ddp.process_group) for q in ddp.module.parameters())
    return owner


def _held_ddps(target: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(holder, DDP) for each DDP under ``target`` (itself as holder) and each composable ``replicate()`` module
    (the DDP its state holds; none before its first forward, which makes it, nor gradients). The walk is kept on
    the root, called with composable replicate as :func:`module_parameters` calls it: one list."""
    replicate = sys.modules.get("torch.distributed._composable.replicate")
    out = []
    for m in _sync_holders(target, replicate):
        ddp = m if isinstance(m, _ddp_types()) else getattr(replicate.replicate.state(m), "_ddp", None)
        if ddp is not None:
            out.append((m, ddp))
    return out


def replicas_counted_once(target: nn.Module, shards: list[Shards], params: Mapping[str, Tensor],
                          group: dist.ProcessGroup | None, over: dist.ProcessGroup | None = None) -> list[Shards]:
    """``shards`` of a module target with the plain gradients a DDP or a composable ``replicate()`` holds
    (:func:`replica_groups`) taken out of the caller's ``group=`` pieces: copies over that module's process
    group, counted on the lowest of its ranks in ``group``. Taken for distinct pieces, they were summed over the
    group: a replicated model measured with ``group=WORLD`` read sqrt(world) times its norm (0.467 for 0.330 on
    2 ranks; a container holding a DDP too). ``params``: name -> parameter of the named pieces.

    Without ``group=``, where DTensor pieces beside them make the call reduce over a group (FSDP2 dense layers
    on the world beside experts under a DDP over each expert's data-parallel group): the plain pieces there are
    taken for FSDP2's unsharded copies, counted on the reduction's first rank only, and the copies of every
    other DDP group were lost (4.16 for 4.62 on a 2 dp x 2 ep mesh). Each DDP group's copy counts once, on its
    lowest rank in that reduction, with the tensor-parallel ranks that hold the same copy (:func:`copy_peers`).
    ``over``: that reduction where the pieces plan none (plain gradients only: :func:`_copies_differ_beyond`)."""
    reduce_over = group
    if group is None:
        reduce_over = over if over is not None else _reduction_group([sh.group for sh in shards])
    owner = replica_groups(target) if reduce_over is not None else {}
    if not owner:
        return shards
    out: list[Shards] = []
    found: dict[int, tuple[dist.ProcessGroup, list[str], list[Tensor]]] = {}
    for sh in shards:
        # The caller's pieces (group=), and the plain ones beside DTensors (None: FSDP2's unsharded parameters,
        # copies counted on the reduction's first rank; a DDP or replicate() block among them counted there only
        # lost the other stages' replicas, 3.87 for 8.66).
        if (sh.group is not group and sh.group is not None) or not sh.counted or not sh.names:
            out.append(sh)
            continue
        keep: tuple[list[str], list[Tensor]] = ([], [])
        for n, g in zip(sh.names, sh.tensors):
            pg = owner.get(id(params.get(n)))
            entry = found.setdefault(id(pg), (pg, [], [])) if pg is not None and not _is_dtensor(g) else None
            bucket = keep if entry is None else (entry[1], entry[2])
            bucket[0].append(n)
            bucket[1].append(g)
        if len(keep[1]) == len(sh.tensors):
            out.append(sh)
        else:
            out.append(Shards(keep[1], group=sh.group, names=keep[0], loss_scale=sh.loss_scale))
    if not found:
        return shards
    peers = copy_peers(params.values())
    for pg, names, tensors in found.values():
        here = copy_counted_here(pg, reduce_over, peers)  # type: ignore[arg-type]
        out.append(Shards(tensors, group=reduce_over, counted=here, names=names))
    return out


def fsdp2_data_peers(params: Iterable[Tensor]) -> set[int]:
    """The ranks FSDP2 reduces this rank's gradients with (its shard and replicate mesh dims through this rank),
    over the FSDP2 parameter groups holding any of ``params``: ranks that read other batches. Empty without FSDP2."""
    if "torch.distributed.fsdp._fully_shard._fully_shard" not in sys.modules:
        return set()
    mine = set(map(id, params))
    peers: set[int] = set()
    done: set[tuple[int, frozenset[int]]] = set()
    for pg in _all_fsdp2_param_groups():
        info = pg.mesh_info
        dims = frozenset(d for d in (getattr(info, "shard_mesh_dim", None), getattr(info, "replicate_mesh_dim", None))
                         if d is not None)
        # One look per mesh and dims: a model's param groups (one per fully_shard unit) mostly share one, and the
        # walk over each group's parameters and mesh made an HSDP model's call beside a DDP ~60% slower.
        if (id(info.mesh), dims) in done or not any(id(fp.sharded_param) in mine for fp in pg.fsdp_params):
            continue
        done.add((id(info.mesh), dims))
        mesh, coord = info.mesh, info.mesh.get_coordinate()
        if coord is None or not dims:
            continue
        at = tuple(slice(None) if d in dims else c for d, c in enumerate(coord))
        peers.update(int(r) for r in mesh.mesh[at].flatten().tolist())
    return peers


def copy_peers(params: Iterable[Tensor]) -> set[int]:
    """The ranks holding copies of this rank's DDP-held gradients whatever their DDP groups: those along the dims
    of ``params``' DTensor meshes that FSDP2 does not reduce over (:func:`fsdp2_data_peers`), tensor parallelism's,
    whose ranks read the same batches, so a layer outside it is the same on each (a DDP over ``mesh["dp"]``
    beside FSDP2 over TP on a (dp, tp) mesh). Ranks FSDP2 reduces with read other batches, and ranks no mesh
    spans hold other pipeline stages: a DDP not spanning them leaves them other gradients (experts under a DDP
    over ``mesh["dp"]`` beside FSDP2 on the flattened dp x ep world, distinct along ep)."""
    params = list(params)
    data = fsdp2_data_peers(params)
    me = dist.get_rank()
    out: set[int] = set()
    seen: set[int] = set()
    for q in params:
        if not _is_dtensor(q) or id(q.device_mesh) in seen:
            continue
        mesh = q.device_mesh  # type: ignore[attr-defined]
        seen.add(id(mesh))
        if mesh.get_coordinate() is None:
            continue
        for d in range(mesh.ndim):
            ranks = set(dist.get_process_group_ranks(mesh.get_group(d)))
            if not (ranks & data) - {me}:
                out |= ranks
    return out


def copy_counted_here(copies: dist.ProcessGroup, reduce_over: dist.ProcessGroup, peers: set[int]) -> bool:
    """Whether this rank counts the gradients a DDP (or ``replicate()``) over ``copies`` holds, in a reduction over
    ``reduce_over``: the lowest rank, there, of the DDP's group and of ``peers`` (:func:`copy_peers`), the ranks
    that hold copies of them too. Counted once per DDP group (tensor parallelism's ranks taken for distinct
    pieces), a layer outside tensor parallelism under a DDP over ``mesh["dp"]`` read sqrt(tp) times its norm
    (0.4675 for 0.3513 on 2 dp x 2 tp, every mode, with or without ``group=``)."""
    within = set(dist.get_process_group_ranks(reduce_over))
    same = (set(dist.get_process_group_ranks(copies)) | peers) & within
    return dist.get_rank() == min(same)


def shards_with_stand_ins(pairs: list[tuple[str, Tensor]], absent: list[tuple[str, Tensor]],
                          group: dist.ProcessGroup | None, params: Sequence[tuple[str, Tensor]] = ()) -> list[Shards]:
    """:func:`shards_of_grads` of the gradients ``pairs`` and the stand-ins ``absent``
    (:func:`absent_dtensor_grads`) planned together, as the ranks holding those gradients plan them (planned
    apart, the gradients here could take the plan over their shard group, whose replicas would then be summed
    twice over the world the stand-ins need); the stand-ins moved into Shards of their own, not counted (a
    parameter without a gradient anywhere stays out of reports). ``params``: as :func:`shards_of_grads` reads it."""
    if not absent:
        return shards_of_grads(pairs, group, params)
    out = shards_of_grads(pairs + absent, group, params)
    stand_ins = {id(t._local_tensor) for _, t in absent}  # type: ignore[attr-defined]
    split: list[Shards] = []
    for sh in out:
        ins = [i for i, t in enumerate(sh.tensors) if id(t) in stand_ins]
        if not ins:
            split.append(sh)
            continue
        names = list(sh.names) if sh.names else [""] * len(sh.tensors)
        standing = set(ins)
        keep = [i for i in range(len(sh.tensors)) if i not in standing]
        for which, counted in ((keep, sh.counted), (ins, False)):
            if which:
                split.append(Shards([sh.tensors[i] for i in which], group=sh.group, counted=counted,
                                    names=[names[i] for i in which] if sh.names else [],
                                    loss_scale=sh.loss_scale))
    return split


def absent_dtensor_grads(params: Sequence[tuple[str, Tensor]], alone: bool = True) -> list[tuple[str, Tensor]]:
    """Empty DTensor stand-ins for the DTensor parameters among ``params`` whose ``.grad`` is None here. Every rank
    must make the same plan (which meshes, which groups) for one collective: a rank holding no gradient of a
    module's DTensor parameters (FSDP2), or not all of them (a gradient set to None on one rank, an HSDP
    layer's dropped beside a layer on another mesh), took another plan than the others (a collective over its
    shard group alone, or none: every rank hung until the timeout, or one returned its own total and its next
    call paired with the others' current one). The stand-ins, laid out as those parameters are, hold nothing
    and count nothing. Nothing for parameters that are all plain (checked in C). ``alone``: this rank holds no
    gradient at all, so the stand-ins take their parameters' dtypes (the result's dtype follows them on NCCL, as
    the other ranks' does); beside gradients float64 ones are float32 (an unused float64 layer made the result
    float64 where every gradient was float32)."""
    if set(map(type, map(_second, params))) <= _PLAIN_KINDS:
        return []
    from torch.distributed.tensor import DTensor

    def empty(p: Tensor) -> Tensor:
        local = p._local_tensor  # type: ignore[attr-defined]
        dtype = local.dtype if alone or local.dtype != torch.float64 else torch.float32
        mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
        # Kept per parameter while its layout stays (DTensor.from_local each call: 500 parameters without a
        # gradient took a call from 22.6 to 80.6 ms on 2 ranks). A stand-in holds nothing: reusing it writes nothing.
        kept = _STAND_INS.get(id(p))
        if kept is not None and kept[0] is mesh and kept[1] == placements and kept[2] == (dtype, local.device):
            return kept[3]
        # As many dimensions as the parameter's (a 1-D one could not take Shard(1): FSDP2's shard_placement_fn,
        # RowwiseParallel weights raised "Sharding dim 1 greater than tensor ndim 1"), no element.
        empty = local.new_empty((0,) * max(1, local.dim()), dtype=dtype)
        made = DTensor.from_local(empty, mesh, placements, run_check=False)
        if len(_STAND_INS) >= _STAND_INS_MAX:
            _STAND_INS.clear()
        _STAND_INS[id(p)] = (mesh, placements, (dtype, local.device), made)
        return made

    return [(name, empty(p)) for name, p in params if p.grad is None and p.requires_grad and _is_dtensor(p)]
