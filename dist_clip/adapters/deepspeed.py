"""DeepSpeed engines: ZeRO stages 0-3, fp32 / bf16 / fp16 with loss scaling, ZeRO-Offload.

The loop stays the plain one, with DeepSpeed's own ``gradient_clipping`` left at 0::

    loss = engine(batch)
    engine.backward(loss)
    dist_clip.clip_grad_norm_(engine, 1.0, norm_type)   # every rank, at accumulation boundaries
    engine.step()

No hook on ``engine.step()`` is needed: in the DeepSpeed releases this adapter is tested with, every stage has
finished reducing and partitioning the gradients when ``engine.backward()`` returns at a gradient accumulation
boundary, and ``step()`` reads them from the very buffers read here:

* ZeRO 1/2: ``optimizer.averaged_gradients[i]``, this rank's partition of each parameter group as a list of
  pieces (views into the reduced gradients); with ``offload_optimizer`` the fp32 partition
  ``single_partition_of_fp32_groups[i].grad`` on the host.
* ZeRO 3: ``optimizer.averaged_gradients[i]``, views of this rank's gradient partition buffer; with
  ``offload_optimizer`` the fp32 partition ``fp32_partitioned_groups_flat[i].grad``.
* stage 0 and the non-ZeRO mixed-precision wrappers: whole gradients, identical on every rank after
  DeepSpeed's all-reduce (``param.grad``, or ``BF16_Optimizer``'s fp32 accumulation buffers).

DeepSpeed's MoE layers at ZeRO-1/2 and stage 0: each expert-parallel rank's experts are partitioned over (stage 0:
all-reduced over) its expert-data-parallel group; their partials are summed over the engine's data-parallel group
with the dense ones, and the experts are named by their index among all of the layer's experts
(:func:`_expert_blocks`).

Partitions are distinct pieces (their partials are summed over the data-parallel group); the alignment padding
DeepSpeed appends is sliced off. Every piece is named with its parameter's name in ``engine.module`` (a ZeRO-1/2
partition is cut into one piece per parameter slice it holds, from ``round_robin_bit16_offsets`` and
``partition_size``, cross-checked against ``params_in_partition`` and ``first_offset``), so per-parameter and
per-group clipping and reports (:mod:`dist_clip._slots`) work at every stage; :func:`optimizer_tensors` tells
which tensor the torch optimizer holds for each parameter (ZeRO-3's param groups are empty between steps, so
per-group clipping does not work there yet).

Unit-wise clipping (AGC) reads the same pieces through :func:`unit_layout`, which places each in its full parameter
(cuts from ``partition_size`` / ``partition_numel()`` alone, so every rank knows them without communicating) beside
the matching slice of the fp32 master partition as its weights.

Under fp16 the buffers hold loss-scaled gradients: the ``Shards`` carry the loss scale, so the norm is that of
the unscaled gradients, and the coefficient multiplies the scaled buffers, which ``step()`` then unscales as
usual. An fp16 overflow makes the norm inf or NaN; the scaled buffers then hold inf or NaN and ``step()`` skips
the step and lowers the loss scale exactly as it would without dist_clip.

``GradClipper(on_nonfinite="skip")`` on an engine drives DeepSpeed's own overflow path under ZeRO 1-3 (see
:func:`skip_handle`): the next ``engine.step()`` skips every param group, as it does on an fp16 overflow.

``clip_grad_norm_(engine, ..., optimizer=engine.optimizer)`` measures only: under ZeRO 1-3 the coefficient is
multiplied in by the next ``step()`` while it copies the gradients into its flat partition buffers (see
:class:`_ZeroFold` and :func:`fold_handle`), which saves the multiply pass over the partition.

These buffers are internals of DeepSpeed, so the adapter checks the version (``TESTED_VERSIONS``) and the
attributes it reads, and raises a ``RuntimeError`` naming what changed instead of clipping the wrong tensors.
"""

from __future__ import annotations

import math
import operator
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors

from .. import _native, _scale
from .._reduce import check_covers, first_copy_in, same_ranks
from .._warn import warn_at_caller
from ..shards import Shards, UnitLayout, UnitPiece, partition_cuts
from .fsdp import registrations

__all__ = [
    "ALLOW_UNTESTED_ENV",
    "TESTED_VERSIONS",
    "check_version",
    "fold_handle",
    "matches",
    "optimizer_tensors",
    "release",
    "required_attributes",
    "shards",
    "skip_handle",
    "steps_per_group",
    "unit_layout",
    "zero3_param_groups",
]

#: (major, minor) releases of DeepSpeed whose ZeRO internals this adapter was tested against.
TESTED_VERSIONS: tuple[tuple[int, int], ...] = ((0, 19),)
#: Set to 1 to use the adapter with an untested DeepSpeed release anyway (the attribute checks still run).
ALLOW_UNTESTED_ENV = "DIST_CLIP_ALLOW_UNTESTED_DEEPSPEED"

_INSTALL_HINT = "pip install dist_clip[deepspeed]"


def _require() -> Any:
    try:
        import deepspeed
    except ModuleNotFoundError as e:
        raise ImportError(
            f"dist_clip's DeepSpeed adapter needs DeepSpeed, which is not installed: {_INSTALL_HINT}"
        ) from e
    return deepspeed


def check_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless ``version`` (default: the installed DeepSpeed) is a tested release."""
    if version is None:
        version = _require().__version__
    try:
        major, minor = (int(x) for x in version.split("+")[0].split(".")[:2])
    except ValueError:
        major, minor = -1, -1
    if (major, minor) in TESTED_VERSIONS or os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return
    tested = ", ".join(f"{a}.{b}.x" for a, b in TESTED_VERSIONS)
    raise RuntimeError(
        f"dist_clip's DeepSpeed adapter reads ZeRO's gradient partitions, whose layout changes between "
        f"releases; it is tested with DeepSpeed {tested}, found {version}. Install a tested release, or set "
        f"{ALLOW_UNTESTED_ENV}=1 to try this one (the attributes it reads are still checked)"
    )


#: What the adapter reads, by optimizer class name; a test asserts that every name still exists.
_ZERO12 = ("averaged_gradients", "cpu_offload", "single_partition_of_fp32_groups", "real_dp_process_group",
           "bit16_groups", "loss_scaler", "round_robin_bit16_groups", "round_robin_bit16_offsets",
           "round_robin_bit16_meta", "partition_size", "params_in_partition", "first_offset",
           "is_gradient_accumulation_boundary")
_ZERO3 = ("averaged_gradients", "offload_optimizer", "fp32_partitioned_groups_flat", "fp16_groups",
          "dp_process_group", "loss_scaler", "_swappable_optimizer_subgroup", "grad_position", "get_param_id",
          "is_gradient_accumulation_boundary", "_epilogue_ran_this_backward", "micro_step_id")
#: What MoE layers add to what the adapter reads on ZeRO-1/2 (see :func:`_check_moe`).
_ZERO12_MOE = ("is_moe_param_group", "dp_process_group", "has_moe_layers")
#: What the adapter reads on the engine itself (see :class:`_BackwardMark`).
_ENGINE = ("micro_steps", "_backward_epilogue")
_BF16 = ("fp32_groups_gradients", "fp32_groups_has_gradients", "bf16_groups", "is_gradient_accumulation_boundary")
_FP16_UNFUSED = ("fp16_groups",)
#: What ``on_nonfinite="skip"`` drives on ZeRO 1-3 (see :func:`skip_handle`).
_SKIP_ZERO = ("overflow", "_update_scale")
#: What ``clip_grad_norm_(engine, ..., optimizer=)`` wraps on ZeRO 1-3 (see :class:`_ZeroFold`).
_FOLD_ZERO = ("step", "flatten", "unscale_and_clip_grads", "averaged_gradients", "clip_grad", "loss_scale")


def required_attributes() -> dict[str, tuple[str, ...]]:
    """Optimizer class name -> the attributes (or methods) of its instances that the adapter reads."""
    return {
        "DeepSpeedZeroOptimizer": _ZERO12 + _SKIP_ZERO + _FOLD_ZERO,
        "DeepSpeedZeroOptimizer_Stage3": _ZERO3 + _SKIP_ZERO + _FOLD_ZERO + ("fp32_partitioned_groups_flat",),
        "BF16_Optimizer": _BF16,
        "FP16_UnfusedOptimizer": _FP16_UNFUSED,
        "FP16_Optimizer": _FP16_UNFUSED,
        "DeepSpeedEngine": _ENGINE,
    }


def matches(target: object) -> bool:
    # An engine can only exist once DeepSpeed is imported: never import it here (it takes seconds).
    engine = sys.modules.get("deepspeed.runtime.engine")
    return engine is not None and isinstance(target, engine.DeepSpeedEngine)


def release(engine: Any) -> None:
    """Let go of what keeps a DeepSpeed engine alive out of gc's sight, once it is done with (it must not be used
    afterwards), so that it is freed, with its optimizer and the process groups they hold, when its last reference
    goes: before the process group ends, not at interpreter exit or never.

    ``engine.destroy()`` (DeepSpeed's) removes the hooks the ZeRO optimizers put on every parameter's gradient
    accumulation: torch's C++ autograd nodes hold them, they hold the optimizer, and the optimizer the engine's
    backward hook. ZeRO-3 also keeps the engine's module in two globals of DeepSpeed's, taken out here:
    ``FWD_MODULE_STACK`` (the top module is pushed when the engine is made and never popped) and the class-wide
    ``lru_cache`` of ``PartitionedParameterCoordinator.__params_to_release`` (keyed by coordinator and submodule;
    emptied: it is recomputed where needed). Whatever of these a DeepSpeed release lacks is passed over."""
    destroy = getattr(engine, "destroy", None)
    if callable(destroy):
        destroy()
    module = getattr(engine, "module", None)
    stack = getattr(sys.modules.get("deepspeed.runtime.zero.parameter_offload"), "FWD_MODULE_STACK", None)
    if isinstance(stack, list) and module is not None:
        mine = {id(m) for m in module.modules()}  # a forward that raised left its submodules pushed too
        stack[:] = [m for m in stack if id(m) not in mine]
    coordinator = getattr(sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator"),
                          "PartitionedParameterCoordinator", None)
    cached = getattr(coordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    for cell in getattr(cached, "__closure__", None) or ():  # under DeepSpeed's instrument_w_nvtx wrapper
        clear = getattr(cell.cell_contents, "cache_clear", None)
        if callable(clear):
            clear()


def steps_per_group(target: object) -> bool:
    """Whether ``engine.step()`` calls the torch optimizer's ``step()`` once per param group (or ZeRO-3
    sub-group) rather than once: true under ZeRO 1-3 (``_optimizer_step(i)`` with ``param_groups`` narrowed to
    group ``i``). ``clip_grad_norm_(..., optimizer=)`` then scales the gradients instead of handing the
    coefficient to the first of those calls only."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return isinstance(target.optimizer, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3))  # type: ignore[attr-defined]


def _check_attributes(opt: object, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not hasattr(opt, n)]
    if missing:
        raise RuntimeError(
            f"{type(opt).__name__} of DeepSpeed {_require().__version__} lacks {missing}, which dist_clip reads "
            "to find the gradient partitions: this DeepSpeed release changed its ZeRO internals and is not "
            f"supported (tested: {TESTED_VERSIONS})"
        )


def _no_reduced_gradients(what: str) -> RuntimeError:
    return RuntimeError(
        f"the engine holds no reduced gradients ({what}): call dist_clip after engine.backward() and before "
        "engine.step(), on a gradient accumulation boundary"
    )


def _real_pieces(pieces: list[Tensor] | None, what: str) -> list[Tensor]:
    if pieces is None:
        raise _no_reduced_gradients(f"{what} is empty")
    return [t for t in pieces if not getattr(t, "_zero_padding", False)]


@dataclass(frozen=True)
class _Slice:
    """The part of one parameter inside this rank's ZeRO-1/2 partition of its param group."""

    name: str
    dest: int  # offset in the rank's partition
    src: int  # offset in the flattened parameter
    numel: int


# optimizer -> per param group: (partition size, the parameter slices of this rank's partition, in flat order).
_ZERO12_LAYOUTS: weakref.WeakKeyDictionary[Any, list[tuple[int, list[_Slice]]]] = weakref.WeakKeyDictionary()


def _module_named(engine: Any) -> list[tuple[str, Any]]:
    """``engine.module``'s parameters under the unwrapped model's names: without the path parts activation
    checkpointing and a compiled module insert (``0._checkpoint_wrapped_module.weight`` was reported as such, and
    an AGC ``exclude=("0.*",)`` written against the model's names missed it), as for every other wrapper. The
    experts of a DeepSpeed MoE layer are named by their index among all its experts (:func:`_expert_blocks`)."""
    from .fsdp import clean_name

    named = [(clean_name(n), p) for n, p in engine.module.named_parameters()]
    blocks = _expert_blocks(engine)
    if blocks:
        named = [(_global_expert_name(blocks, n), p) for n, p in named]
    return named


@dataclass(frozen=True)
class _ExpertBlock:
    """One DeepSpeed MoE layer's ``Experts`` module on this rank: its experts are ``local`` of the layer's
    ``local * ep_size``, the ``ep_rank``-th run of them (``MOELayer`` all-to-alls expert ``e`` to expert-parallel
    rank ``e // local``)."""

    prefix: str  # "moe.deepspeed_moe.experts.deepspeed_experts."
    local: int
    ep_rank: int
    ep_size: int
    group_name: str


# engine -> (torch's registration count when read, the expert blocks of its module)
_EXPERT_BLOCKS: weakref.WeakKeyDictionary[Any, tuple[int, list[_ExpertBlock]]] = weakref.WeakKeyDictionary()


def _expert_blocks(engine: Any) -> list[_ExpertBlock]:
    """The DeepSpeed MoE experts of ``engine.module`` (none without MoE layers), kept until a module or parameter
    is registered anywhere. Each rank holds its own experts under the same local names
    (``...deepspeed_experts.0.weight`` is expert 0 on expert-parallel rank 0 and expert 1 on rank 1 where each
    holds one): named so, the per-parameter modes added other ranks' experts into one slot."""
    if not getattr(engine, "has_moe_layers", False):
        return []
    count = registrations()
    try:
        seen = _EXPERT_BLOCKS.get(engine)
    except TypeError:
        seen = None
    if seen is not None and seen[0] == count:
        return seen[1]
    from deepspeed.moe.experts import Experts

    from .fsdp import clean_name

    blocks: list[_ExpertBlock] = []
    for name, module in engine.module.named_modules():
        if not isinstance(module, Experts):
            continue
        group_name = next((getattr(p, "group_name", None) for p in module.parameters()), None)
        ep_group = getattr(engine, "expert_parallel_group", {}).get(group_name) if group_name else None
        if ep_group is None:
            raise NotImplementedError(
                f"the DeepSpeed MoE experts {name!r} have no expert-parallel group on this engine: dist_clip "
                "cannot tell which of the layer's experts this rank holds"
            )
        prefix = clean_name(f"{name}.deepspeed_experts") + "." if name else "deepspeed_experts."
        blocks.append(_ExpertBlock(prefix, int(module.num_local_experts), dist.get_rank(ep_group),
                                   dist.get_world_size(ep_group), str(group_name)))
    try:
        _EXPERT_BLOCKS[engine] = (count, blocks)
    except TypeError:
        pass
    return blocks


def _split_expert_name(blocks: list[_ExpertBlock], name: str) -> tuple[_ExpertBlock, int, str] | None:
    """(block, local expert index, the rest of the name) of an expert parameter's local name; None otherwise."""
    for b in blocks:
        if name.startswith(b.prefix):
            k, _, rest = name[len(b.prefix):].partition(".")
            if k.isdigit():
                return b, int(k), rest
    return None


def _global_expert_name(blocks: list[_ExpertBlock], name: str) -> str:
    """An expert parameter's name in the unsharded model (its layer's experts numbered over every
    expert-parallel rank, as one process with ``ep_size=1`` names them); other names as they are."""
    found = _split_expert_name(blocks, name)
    if found is None:
        return name
    return _on_this_rank(*found)


def _on_this_rank(b: _ExpertBlock, e: int, rest: str) -> str:
    """The unsharded model's name of this rank's expert at local index ``e % b.local`` (``e`` a local index, or
    another expert-parallel rank's expert numbered over the layer: every rank builds its experts alike, so that
    expert's group and cuts are those of this rank's twin)."""
    return f"{b.prefix}{b.ep_rank * b.local + e % b.local}.{rest}"


def all_names(engine: Any) -> list[str]:
    """Every parameter name of the unsharded model, in an order identical on every rank: ``engine.module``'s
    (:func:`_module_named`), each MoE layer's experts listed for every expert-parallel rank (this rank holds
    ``local`` of them)."""
    from .fsdp import clean_name

    blocks = _expert_blocks(engine)
    local = [clean_name(n) for n, _ in engine.module.named_parameters()]
    if not blocks:
        return local
    out: list[str] = []
    done: set[str] = set()
    for n in local:
        found = _split_expert_name(blocks, n)
        if found is None:
            out.append(n)
            continue
        b = found[0]
        if b.prefix in done:
            continue
        done.add(b.prefix)
        mine = [split[1:] for split in (_split_expert_name([b], m) for m in local) if split is not None]
        for e in range(b.local * b.ep_size):  # expert e is local expert e % local on its expert-parallel rank
            out += [f"{b.prefix}{e}.{rest}" for k, rest in mine if k == e % b.local]
    return out


def _names_by_id(engine: Any) -> dict[int, str]:
    """id(parameter) -> its name in ``engine.module`` (the first name of a tied parameter)."""
    return {id(p): n for n, p in _module_named(engine)}


def _layout_error(what: str) -> RuntimeError:
    return RuntimeError(
        f"DeepSpeed {_require().__version__}'s ZeRO-1/2 partition layout is not the one dist_clip expects ({what}); "
        f"this release changed its ZeRO internals and is not supported (tested: {TESTED_VERSIONS})"
    )


def _zero12_layout(engine: Any, opt: Any) -> list[tuple[int, list[_Slice]]]:
    """Where each parameter lies in this rank's partition of each flat param group (cached per optimizer).

    ZeRO-1/2 flatten each group's parameters, in ``round_robin_bit16_groups`` order, at
    ``round_robin_bit16_offsets`` (which include the per-parameter alignment padding of
    ``parameter_alignment``), pad the buffer to a multiple of the world size and give rank r the elements
    ``[r * partition_size, (r + 1) * partition_size)``. A parameter cut by a partition boundary has a slice on
    each side. The result is checked against DeepSpeed's own ``params_in_partition`` and ``first_offset``.
    """
    try:
        return _ZERO12_LAYOUTS[opt]
    except (KeyError, TypeError):
        pass
    names = _names_by_id(engine)
    layout: list[tuple[int, list[_Slice]]] = []
    for i, params in enumerate(opt.round_robin_bit16_groups):
        size = int(opt.partition_size[i])
        start = dist.get_rank(opt.real_dp_process_group[i]) * size
        end = start + size
        slices: list[_Slice] = []
        ids: list[int] = []
        numels: dict[int, int] = {}
        offsets, metas = opt.round_robin_bit16_offsets[i], opt.round_robin_bit16_meta[i]
        for k, (p, off, meta) in enumerate(zip(params, offsets, metas)):
            off, numel = int(off), int(meta.numel())  # meta: the shape, even while p.data is swapped out
            numels[id(p)] = numel
            lo, hi = max(off, start), min(off + numel, end)
            if lo < hi:
                slices.append(_Slice(names.get(id(p), f"zero_group{i}.param{k}"), lo - start, lo - off, hi - lo))
                ids.append(id(p))
        theirs = [id(p) for p in opt.params_in_partition[i] if numels.get(id(p), 1) > 0]
        if ids != theirs:
            raise _layout_error(f"param group {i}: the parameters found in this rank's partition differ from "
                                "params_in_partition")
        first = int(opt.first_offset[i])
        if slices and slices[0].src != first:
            raise _layout_error(f"param group {i}: first_offset is {first}, expected {slices[0].src}")
        layout.append((size, slices))
    try:
        _ZERO12_LAYOUTS[opt] = layout
    except TypeError:
        pass
    return layout


def _muon_steps(opt: Any) -> bool:
    """Whether a ZeRO 1-3 optimizer runs DeepSpeed's Muon (``"optimizer": {"type": "Muon"}``) on some of its
    parameters: DeepSpeed 0.19.8 replaces their gradients by Muon's orthogonalized update (momentum, then
    Newton-Schulz) where its ``get_flat_partition`` tells a Muon group, a parameter marked ``use_muon`` under an
    optimizer whose class name holds "muon"; ZeRO 1-2 while building the partitions in backward (without
    offload), ZeRO-3 and ZeRO 1-2 with offload at the start of ``step()``."""
    inner = getattr(opt, "optimizer", None)
    if "muon" not in type(inner).__name__.lower():
        return False
    groups = getattr(opt, "fp16_groups", None) if hasattr(opt, "fp32_partitioned_groups_flat") else None
    groups = groups if groups is not None else getattr(opt, "bit16_groups", None) or ()
    return any(getattr(p, "use_muon", False) for params in groups for p in params)


def _refuse_muon_partitions(opt: Any) -> None:
    """ZeRO 1-2 without offload run Muon while they build each group's partition in backward
    (``get_flat_partition``): ``averaged_gradients`` of a Muon group holds Muon's update, not the gradient, and
    the gradient itself is gone (Nesterov blends the momentum into it in place). Read as gradients, the norm was
    that of the updates (8.006 for 9.264, 1 rank) and the clip scaled the updates, silently."""
    if opt.cpu_offload or not _muon_steps(opt):
        return
    raise NotImplementedError(
        "this ZeRO-1/2 engine runs DeepSpeed's Muon optimizer, which replaces the gradients of its Muon parameters "
        "by Muon's orthogonalized update while it builds the gradient partitions in engine.backward(): the "
        "gradients are gone before dist_clip can read them, and their norm cannot be measured. Use ZeRO-3 or "
        "offload_optimizer (Muon runs in engine.step() there, after dist_clip clips the gradients), or DeepSpeed's "
        "own \"gradient_clipping\" (which clips the Muon update, not the gradient)"
    )


def _zero12_shards(engine: Any, opt: Any, group: dist.ProcessGroup | None, scale: float) -> list[Shards]:
    """One Shards per param group: this rank's slice of every parameter in its partition, named."""
    _check_attributes(opt, _ZERO12)
    _refuse_muon_partitions(opt)
    _check_last_backward_on_boundary(opt)
    _check_trainable_in_groups(engine, opt, opt.bit16_groups)
    layout = _zero12_layout(engine, opt)
    out: list[Shards] = []
    for i, (size, slices) in enumerate(layout):
        dp = _zero12_peers(opt, i)
        # a group= short of the partitions' ranks: each rank returned its own partition's norm (1.65 and 4.83
        # for 5.11), unrefused
        check_covers(group, dp, "ZeRO partitions the gradients")
        pg = group if group is not None else dp
        pieces: list[Tensor] = []
        if opt.cpu_offload:
            flat = opt.single_partition_of_fp32_groups[i].grad
            if flat is None:
                _real_pieces(None, "single_partition_of_fp32_groups[i].grad")
            if flat.numel() != size:
                raise _layout_error(f"the offloaded fp32 gradient partition of group {i} has {flat.numel()} "
                                    f"elements, partition_size is {size}")
            pieces = [flat.narrow(0, s.dest, s.numel) for s in slices]
        else:
            grads = opt.averaged_gradients.get(i)
            # The parameter slices in flat order, then padding: marked ``_zero_padding``, or (for the unpadded
            # layout and for a partition holding no parameter) a trailing zero buffer left unmarked.
            real = [t for t in _real_pieces(grads, "averaged_gradients") if t.numel() > 0]
            if sum(t.numel() for t in grads) != size or len(real) < len(slices):
                raise _layout_error(f"averaged_gradients[{i}] does not cover this rank's partition of {size} "
                                    f"elements with {len(slices)} parameter slices")
            for s, t in zip(slices, real):
                if t.numel() != s.numel:
                    raise _layout_error(f"averaged_gradients[{i}] holds {t.numel()} elements of {s.name!r}, "
                                        f"expected {s.numel}")
                pieces.append(t)
        out.append(Shards(pieces, group=pg, loss_scale=scale, names=[s.name for s in slices]))
    return out


def _zero12_peers(opt: Any, i: int) -> dist.ProcessGroup:
    """The ranks whose partials of ZeRO-1/2 param group ``i`` combine: the data-parallel group it is partitioned
    over, and for a DeepSpeed MoE group (partitioned over an expert-data-parallel group, each expert-parallel
    rank holding other experts) the engine's data-parallel group, which holds both (:func:`_check_moe`)."""
    moe = getattr(opt, "is_moe_param_group", None)
    if getattr(opt, "has_moe_layers", False) and moe and moe[i]:
        return opt.dp_process_group  # type: ignore[no-any-return]
    return opt.real_dp_process_group[i]  # type: ignore[no-any-return]


_MOE_ONLY = (
    "dist_clip handles DeepSpeed MoE layers (DeepSpeed's own MoE class) under ZeRO-1 and ZeRO-2, where DeepSpeed's "
    "own \"gradient_clipping\" counts the experts right as well, and at stage 0 with a torch optimizer, without a "
    "model-parallel mpu; "
)


def _check_moe(engine: Any) -> None:
    """``NotImplementedError`` (on every rank: it reads what every rank builds alike) for an engine with MoE
    layers that the adapter cannot measure: DeepSpeed's AutoEP layers (no ``Experts`` module), an optimizer other
    than ZeRO-1/2's or stage 0's torch optimizer (ZeRO-3 refuses DeepSpeed's MoE itself; DeepSpeed's non-ZeRO
    wrappers reduce expert gradients into buffers of their own, unread), a model-parallel mpu, or expert groups
    that do not tile the data-parallel group (expert-parallel times expert-data-parallel ranks): there an
    expert's partials would not meet exactly once."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    blocks = _expert_blocks(engine)
    if not blocks:
        # DeepSpeed's AutoEP (AutoEPMoELayer, which it also runs at ZeRO-3) keeps its experts otherwise: unread
        raise NotImplementedError(f"{_MOE_ONLY}this engine's MoE layers hold no deepspeed.moe.experts.Experts "
                                  "module (DeepSpeed's AutoEP layers are not handled)")
    zero = isinstance(opt, DeepSpeedZeroOptimizer)
    if not zero and not isinstance(opt, torch.optim.Optimizer):
        raise NotImplementedError(
            f"{_MOE_ONLY}this engine's optimizer is {type(opt).__name__}"
        )
    mp = getattr(engine, "mp_world_size", 1)
    if isinstance(mp, int) and mp > 1:
        raise NotImplementedError(f"{_MOE_ONLY}this engine's mpu spreads the model over {mp} model-parallel ranks")
    if zero:
        _check_attributes(opt, _ZERO12_MOE)
    dp = opt.dp_process_group if zero else _stage0_dp_group(engine)
    dp_ranks = set(dist.get_process_group_ranks(dp))
    for b in blocks:
        ep = engine.expert_parallel_group.get(b.group_name)
        edp = engine.expert_data_parallel_group.get(b.group_name)
        ok = ep is not None and edp is not None
        if ok:
            ep_ranks, edp_ranks = set(dist.get_process_group_ranks(ep)), set(dist.get_process_group_ranks(edp))
            ok = (ep_ranks | edp_ranks <= dp_ranks and len(ep_ranks & edp_ranks) == 1
                  and len(ep_ranks) * len(edp_ranks) == len(dp_ranks))
        if ok and zero:  # ZeRO-1/2 partition each expert param group over its expert-data-parallel group
            ok = all(same_ranks(opt.real_dp_process_group[i], edp)
                     for i, group in enumerate(opt.optimizer.param_groups)
                     if opt.is_moe_param_group[i] and group.get("name") == b.group_name)
        if not ok:
            raise NotImplementedError(
                f"{_MOE_ONLY}the experts of {b.prefix[:-1]!r} ({b.group_name!r}) are spread over "
                "expert-parallel and expert-data-parallel groups that do not make up the engine's data-parallel "
                "group"
            )
    if zero and any(opt.is_moe_param_group[i] and group.get("name") not in engine.expert_parallel_group
                    for i, group in enumerate(opt.optimizer.param_groups)):
        raise NotImplementedError(f"{_MOE_ONLY}an expert param group of this engine is named after no "
                                  "expert-parallel group")


def _stage0_dp_group(engine: Any) -> dist.ProcessGroup:
    """The ranks stage 0 all-reduces the dense gradients over."""
    return getattr(engine, "seq_data_parallel_group", None) or dist.group.WORLD


def _zero3_dp_group(opt: Any, i: int) -> dist.ProcessGroup:
    """The data-parallel group ZeRO-3 partitions sub-group ``i`` over."""
    if hasattr(opt, "_get_sub_group_process_group"):
        return opt._get_sub_group_process_group(i)  # type: ignore[no-any-return]
    return opt.dp_process_group  # type: ignore[no-any-return]


def _zero3_name(names: dict[int, str], p: Any) -> str:
    name = names.get(id(p))
    return name if name is not None else getattr(p, "ds_name", f"ds_id{p.ds_id}")


def _zero3_shards(engine: Any, opt: Any, group: dist.ProcessGroup | None, scale: float) -> list[Shards]:
    _check_attributes(opt, _ZERO3)
    _check_last_backward_on_boundary(opt)
    # No backward since step() (or zero_grad()): both reset micro_step_id to 0 and _epilogue_ran_this_backward;
    # an engine forward resets the flag too but first counts the backward it saw into micro_step_id, so an
    # evaluation forward between the backward and the clip (reduced partitions intact) is not refused.
    if not opt._epilogue_ran_this_backward and opt.micro_step_id == 0:
        raise _no_reduced_gradients("no engine.backward() since the last step() or zero_grad()")
    _check_trainable_in_groups(engine, opt, opt.fp16_groups)
    names_by_id = _names_by_id(engine)
    out: list[Shards] = []
    for i, params in enumerate(opt.fp16_groups):
        dp = _zero3_dp_group(opt, i)
        check_covers(group, dp, "ZeRO-3 partitions the gradients")
        pg = group if group is not None else dp
        rank = dist.get_rank(dp)  # (the partition's index: the padding is cut by it, not by the rank in group=)
        pieces: list[Tensor] = []
        names: list[str] = []
        if opt.offload_optimizer:
            if opt._swappable_optimizer_subgroup(i):
                raise NotImplementedError(
                    "ZeRO-3 with NVMe optimizer swapping keeps gradients on disk: dist_clip cannot reach them"
                )
            flat = opt.fp32_partitioned_groups_flat[i].grad
            if flat is None:
                _real_pieces(None, "fp32_partitioned_groups_flat[i].grad")
            for p in params:
                _, offset, _ = opt.grad_position[opt.get_param_id(p)]
                real = _real_numel(p, rank)
                pieces.append(flat.narrow(0, int(offset), real))
                names.append(_zero3_name(names_by_id, p))
        else:
            grads = _real_pieces(opt.averaged_gradients.get(i), "averaged_gradients")
            for p, g in zip(params, grads):
                pieces.append(g.reshape(-1).narrow(0, 0, _real_numel(p, rank)))
                names.append(_zero3_name(names_by_id, p))
        out.append(Shards(pieces, group=pg, loss_scale=scale, names=names))
    return out


class _BackwardMark:
    """Stands in for ``engine._backward_epilogue`` (an instance attribute shadowing the method), which DeepSpeed
    0.19 runs at the end of every backward (``engine.backward()`` and the torch-style backward hook), after the
    boundary's reduction: it records ``engine.micro_steps`` (the count of ``engine.step()`` calls) then. A call at
    another count comes before its micro step's backward (the boundary micro step, whose gradients hold the
    partial sum of the earlier ones: ZeRO-3's partitions, or at stage 0 each rank's own unreduced gradients) or
    after its ``step()``. It also records whether that backward ran on an accumulation boundary: under manual
    accumulation (``set_gradient_accumulation_boundary``) the count does not move between micro steps. Installed
    by the first call on an engine, which it takes as valid: that one is checked by the optimizer's own flags
    (ZeRO 1-3, ``BF16_Optimizer``) only."""

    def __init__(self, engine: Any) -> None:
        self.method = engine._backward_epilogue  # the bound class method
        self.micro_step = engine.micro_steps
        self.synced = True  # whether the last backward ran outside engine.no_sync() (its all-reduce ran)
        # Whether the last backward ran on an accumulation boundary (reduced). Under DeepSpeed's manual
        # accumulation step() runs once per window, and set_gradient_accumulation_boundary(True) writes the ZeRO
        # optimizers' mirrored flag too: a call after it and before the last backward read the partial sum
        # (ZeRO-3: 0.844 for 8.761) or each rank's own gradients (stage 0, BF16_Optimizer: 0.766 and 0.972).
        self.boundary = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.method(*args, **kwargs)
        engine = self.method.__self__
        self.micro_step = engine.micro_steps
        self.synced = not _inside_no_sync(engine)
        self.boundary = bool(engine.is_gradient_accumulation_boundary())
        return out


def _inside_no_sync(engine: Any) -> bool:
    """Inside ``engine.no_sync()``, where a backward skips DeepSpeed's all-reduce; not inside
    ``coalesce_grad_reduction()``, which sets the same flag and reduces when it exits (a call inside it is refused
    by :func:`_inside_coalesce`)."""
    return bool(getattr(engine, "inside_no_sync_ctxt", False)) and not _inside_coalesce(engine)


def _inside_coalesce(engine: Any) -> bool:
    """Inside ``engine.coalesce_grad_reduction()`` (ZeRO 1-3): its backwards leave each rank's own gradients on
    the parameters, reduced into the partitions only when the block exits. The ZeRO optimizers' flags refused a
    call there except with ``offload_optimizer`` at ZeRO 1-2, whose fp32 gradient partitions still held the last
    step's (clipped) gradients: it returned their norm (0.0, then 0.3 for 17.35), silently."""
    return bool(getattr(engine.optimizer, "_coalesce_grad_reduction", False))


_COALESCE = (
    "dist_clip was called inside DeepSpeed's engine.coalesce_grad_reduction(): the backwards inside it leave each "
    "rank's own gradients on the parameters, reduced into ZeRO's partitions only when the block exits. Clip after "
    "the block, before engine.step()"
)


_NO_SYNC = (
    "dist_clip was called inside DeepSpeed's engine.no_sync(), or after a backward inside it with none outside "
    "it since: each rank holds its own unreduced gradients (each returned its own norm and clipped by its own "
    "coefficient). Clip after the last engine.backward() of the accumulation, outside no_sync()"
)


def _check_backward_ran(engine: Any) -> None:
    """RuntimeError, on every rank alike, unless an ``engine.backward()`` ran since the last ``engine.step()``
    (see :class:`_BackwardMark`); ZeRO optimizers also check their own flags (:func:`_zero12_shards`,
    :func:`_zero3_shards`, :func:`_replicated_shards`)."""
    _check_attributes(engine, _ENGINE)
    mark = vars(engine).get("_backward_epilogue")
    if not isinstance(mark, _BackwardMark):
        engine._backward_epilogue = _BackwardMark(engine)
    elif mark.micro_step != engine.micro_steps:
        raise _no_reduced_gradients("no engine.backward() since the last engine.step()")
    elif not mark.boundary:
        raise _no_reduced_gradients("the last engine.backward() was before the accumulation boundary")
    opt = engine.optimizer
    if type(opt).__name__ == "BF16_Optimizer":  # stage 0: the engine mirrors its boundary flag into it too
        _check_attributes(opt, _BF16)
        _check_last_backward_on_boundary(opt)


def _check_last_backward_on_boundary(opt: Any) -> None:
    """ZeRO optimizers mirror the engine's accumulation boundary when each backward starts (and, at stage 0,
    when it reduces): False here means the last backward was not the boundary's, i.e. the call came after an
    earlier micro step's ``step()`` and before the boundary micro step's backward."""
    if not opt.is_gradient_accumulation_boundary():
        raise _no_reduced_gradients("the last engine.backward() was before the accumulation boundary")


def _real_numel(param: Any, rank: int) -> int:
    """Elements of ``param``'s ZeRO-3 partition on ``rank`` that are not alignment padding."""
    per_rank = int(param.partition_numel())
    return max(0, min(per_rank, int(param.ds_numel) - rank * per_rank))


def _loss_scale(opt: Any, zero_optimizer: type) -> float:
    """The factor engine.backward() multiplied the loss by: ``ZeROOptimizer.scale_if_loss`` in DeepSpeed 0.19.

    Only ZeRO optimizers (BF16_Optimizer among them) scale the loss; the other wrappers' gradients are not
    scaled, whatever their ``loss_scale`` attribute says.
    """
    if not isinstance(opt, zero_optimizer):
        return 1.0
    if getattr(opt, "torch_autocast_gradscaler", None):
        raise NotImplementedError("dist_clip's DeepSpeed adapter does not handle torch autocast's GradScaler")
    if getattr(opt, "custom_loss_scaler", False):
        return float(opt.external_loss_scale)
    scaler = getattr(opt, "loss_scaler", None)
    return float(scaler.cur_scale) if scaler is not None else 1.0


def applied_coefficient(target: object, coef: Tensor) -> Tensor:
    """``coef`` as dist_clip applies it to ``target``'s gradients: on an engine a NaN coefficient (a NaN
    total) is applied as 1, the gradients left as they are for ``step()`` (which skips a non-finite step, or
    steps it, as without dist_clip). ZeRO-3 and the offloaded optimizers keep gradient slots across steps that a
    backward writes only for the parameters it reaches: multiplied by NaN, the slot of a parameter without a
    gradient that step held NaN for good (0 * NaN), and every later step read it (ZeRO-3 skipped them all,
    offload stepped NaN into the parameters). A device op: no host sync."""
    if not matches(target):
        return coef
    return torch.where(torch.isnan(coef), 1.0, coef)


def checks_overflow(target: object) -> bool:
    """Whether ``engine.step()`` itself skips a step whose gradients are not finite: fp16 ZeRO 0-3 (and bf16
    with ``check_grad_overflow``) test for overflow inside ``step()`` and then lower the loss scale. Zeroing the
    gradients before it hides the overflow: the scale never comes down.

    With the optimizer offloaded to the CPU, DeepSpeed takes each gradient's norm in backward, before any clip,
    and skips a step whose total is not finite (ZeRO-3 always, ZeRO-1/2 unless bf16 without
    ``check_grad_overflow``): there the step is skipped whatever the clip does to the gradients."""
    if not matches(target):
        return False
    opt = getattr(target, "optimizer", None)
    if type(opt).__name__ in ("FP16_UnfusedOptimizer", "FP16_Optimizer"):
        return True  # stage 0's fp16 wrappers test for overflow in step() too ("zero" hid it: the scale stayed)
    stage3 = sys.modules.get("deepspeed.runtime.zero.stage3")
    stage12 = sys.modules.get("deepspeed.runtime.zero.stage_1_and_2")
    if stage3 is not None and isinstance(opt, stage3.DeepSpeedZeroOptimizer_Stage3):
        return getattr(opt, "dtype", None) == torch.float16 or bool(getattr(opt, "offload_optimizer", False))
    if stage12 is not None and isinstance(opt, stage12.DeepSpeedZeroOptimizer):
        if getattr(opt, "check_grad_overflow", False):
            return True
        return (bool(getattr(opt, "cpu_offload", False)) and bool(getattr(opt, "compute_grad_norm", True))
                and getattr(opt, "dtype", None) != torch.bfloat16)
    return False


def _replicated_shards(engine: Any, opt: Any, group: dist.ProcessGroup | None) -> list[Shards]:
    """Whole gradients, identical on every rank of the data-parallel group after DeepSpeed's all-reduce: nothing
    to combine; under ``group=`` (an mpu's model-parallel ranks beside them) copies over that group, counted on
    its lowest rank in ``group`` (each rank returned its own model-parallel piece's norm: ``group=`` was
    dropped, 11.88 and 14.19 for 18.51)."""
    name = type(opt).__name__
    if name == "BF16_Optimizer":
        _check_attributes(opt, _BF16)
        # Its reduction takes the optimizer's groups only: a trainable parameter outside them keeps each rank's
        # own gradient (it was left out of the norm, unclipped: 9.22 for 10.22), as at ZeRO 1-3.
        _check_trainable_in_groups(engine, opt, opt.bf16_groups)
        names = _names_by_id(engine)
        named = [
            (names.get(id(opt.bf16_groups[i][j]), f"bf16_group{i}.param{j}"), g)
            for i, grads in enumerate(opt.fp32_groups_gradients) for j, g in enumerate(grads)
            if opt.fp32_groups_has_gradients[i][j]
        ]
    else:
        if name in ("FP16_UnfusedOptimizer", "FP16_Optimizer"):
            _check_attributes(opt, _FP16_UNFUSED)
        # Stage 0 reduces every trainable parameter's gradient, the wrappers' too (reading their fp16 groups
        # only left a parameter outside them out of the norm, and unclipped: 9.22 for 10.22).
        named = [(n, p.grad) for n, p in _module_named(engine) if p.grad is not None]
    if not named and any(p.requires_grad for p in engine.module.parameters()):
        # engine.step() sets every .grad to None; the boundary's reduction gives every trainable parameter one.
        raise _no_reduced_gradients("no parameter has a gradient")
    wrapped = name in ("BF16_Optimizer", "FP16_UnfusedOptimizer", "FP16_Optimizer")
    experts: dict[str, list[tuple[str, Tensor]]] = {}
    if not wrapped and _expert_blocks(engine):
        # stage 0 with DeepSpeed MoE (_check_moe): each expert whole, copies over its expert-data-parallel group
        group_names = {n: getattr(p, "group_name", None) for n, p in _module_named(engine)
                       if not getattr(p, "allreduce", True)}
        for n, g in [(n, g) for n, g in named if n in group_names]:
            experts.setdefault(str(group_names[n]), []).append((n, g))
        named = [(n, g) for n, g in named if n not in group_names]
    tensors, labels = [g for _, g in named], [n for n, _ in named]
    dp = _stage0_dp_group(engine)
    out = [Shards(tensors, group=None, names=labels) if group is None else
           Shards(tensors, group=group, counted=first_copy_in(dp, group), names=labels)]
    for group_name, pieces in experts.items():
        # the other expert-parallel ranks hold other experts: summed over the data-parallel group (or group=),
        # each expert counted on the lowest rank of its copies
        check_covers(group, dp, "DeepSpeed's expert-parallel ranks hold other experts")
        over = group if group is not None else dp
        out.append(Shards([g for _, g in pieces], group=over,
                          counted=first_copy_in(engine.expert_data_parallel_group[group_name], over),
                          names=[n for n, _ in pieces]))
    return out


def shards(target: object, group: dist.ProcessGroup | None) -> list[Shards]:
    ds = _require()
    check_version(ds.__version__)
    engine: Any = target
    if getattr(engine, "pipeline_parallelism", False):
        # Each stage's data-parallel group reduces its own layers (tied ones on two stages): every stage returned
        # its own norm (3.80 and 8.57 for 9.38), and train_batch() runs backward and step() itself anyway.
        raise NotImplementedError("dist_clip's DeepSpeed adapter does not handle the PipelineEngine: each "
                                  "stage's data-parallel group holds only its own layers (tied ones on two stages), "
                                  "and train_batch() runs backward and step() itself")
    managed = getattr(engine, "managed_gradient_accumulation", None)
    if managed is not None and not managed():
        raise NotImplementedError(
            "with managed_gradient_accumulation=false DeepSpeed reduces the gradients inside engine.step(), "
            "where dist_clip cannot reach them; keep the default (managed) gradient accumulation"
        )
    if _inside_coalesce(engine):
        raise ValueError(_COALESCE)
    if not engine.is_gradient_accumulation_boundary():
        raise ValueError(
            "dist_clip was called on a DeepSpeed engine between gradient accumulation boundaries: its gradients "
            "are not reduced yet. Clip only where engine.is_gradient_accumulation_boundary() is True (after the "
            "last engine.backward() of the accumulation window, before engine.step())"
        )
    if _inside_no_sync(engine):
        raise ValueError(_NO_SYNC)
    _check_backward_ran(engine)
    mark = vars(engine).get("_backward_epilogue")
    if isinstance(mark, _BackwardMark) and not mark.synced:  # the last backward ran inside no_sync()
        raise ValueError(_NO_SYNC)
    if getattr(engine, "has_moe_layers", False):
        # Before the gradient_clipping warning: the same on every rank (deepspeed.initialize sets it from the
        # model), so every rank raises alike.
        _check_moe(engine)
    if engine.gradient_clipping() > 0:
        warn_at_caller(
            f"DeepSpeed's gradient_clipping is {engine.gradient_clipping()}, so engine.step() clips the gradients "
            "again with DeepSpeed's own L2 norm after dist_clip; set \"gradient_clipping\": 0 in the DeepSpeed "
            "config when clipping with dist_clip"
        )
    mp = getattr(engine, "mp_world_size", 1)
    if isinstance(mp, int) and mp > 1:
        if group is None:
            raise ValueError(
                f"this DeepSpeed engine's mpu spreads the model over {mp} model-parallel ranks, whose gradients "
                "are other pieces than this rank's: its data-parallel group alone gives each of them its own norm. "
                "Pass group= holding them (e.g. group=dist.group.WORLD); parameters repeated on tensor-parallel "
                "ranks are then counted on each (not handled)"
            )
        mpu = getattr(engine, "mpu", None)
        if mpu is not None:
            # (the data-parallel group passed as group= gave each model-parallel rank its own piece's norm too)
            # Megatron-style mpus may name it get_tensor_model_parallel_group only (DeepSpeed's hybrid engine
            # reads either; at stage 0 nothing else of DeepSpeed's asks for it: an AttributeError here).
            model_parallel = (getattr(mpu, "get_model_parallel_group", None)
                              or getattr(mpu, "get_tensor_model_parallel_group", None))
            if model_parallel is None:
                raise TypeError(
                    f"this DeepSpeed engine's mpu ({type(mpu).__name__}) has neither get_model_parallel_group() nor "
                    "get_tensor_model_parallel_group(): dist_clip reads the model-parallel group from it to check "
                    "that group= holds those ranks"
                )
            check_covers(group, model_parallel(), "this engine's mpu spreads the model")
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        raise NotImplementedError("dist_clip's DeepSpeed adapter does not handle torch autocast's GradScaler")
    opt = engine.optimizer
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    scale = _loss_scale(opt, ZeROOptimizer)

    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        return _zero3_shards(engine, opt, group, scale)
    if isinstance(opt, DeepSpeedZeroOptimizer):
        return _zero12_shards(engine, opt, group, scale)
    return _replicated_shards(engine, opt, group)


_requires_grad = operator.attrgetter("requires_grad")


def _check_trainable_in_groups(engine: Any, opt: Any, groups: Any) -> None:
    """ValueError for a parameter that requires a gradient but is in no param group of a ZeRO 1-3 optimizer:
    ZeRO neither reduces nor steps it, so its ``.grad`` is each rank's own, and the norm was silently taken
    without it (9.24 for 9.83; stage 0, which reduces every gradient, counted it) and it stayed unclipped.

    Checked again whenever a parameter's ``requires_grad`` changes or a parameter or submodule is registered
    anywhere (a parameter unfrozen after the first call was left out of the norm and unclipped: the check ran
    once per optimizer). A passed check is kept on the optimizer with the module's parameters and their
    ``requires_grad``: a later call re-reads only those flags (a walk of ``engine.module.parameters()`` costs
    ~2 us per submodule)."""
    seen = vars(opt).get("_dist_clip_trainable")
    count = registrations()  # torch's registration hooks, shared with the FSDP1 plans
    if seen is not None and seen[0] == count and list(map(_requires_grad, seen[1])) == seen[2]:
        return
    params = list(engine.module.parameters())
    held = {id(p) for group in groups for p in group}
    # A zero-element parameter is left out of the groups by DeepSpeed 0.19.8 itself (``is_optimized_parameter``:
    # nothing to optimize) and holds no gradient element: not outside (a device marker ``nn.Parameter(
    # torch.empty(0))`` was refused as a parameter in no param group, ZeRO 1-2 and BF16_Optimizer).
    outside = [n for n, p in _module_named(engine) if p.requires_grad and id(p) not in held and p.numel() > 0]
    if outside:
        more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
        raise ValueError(
            f"{', '.join(outside[:5])}{more} require gradients but are in no param group of the DeepSpeed "
            f"{type(opt).__name__}: ZeRO neither reduces nor steps them, so their gradients are each rank's own "
            "and the norm of the model cannot include them. Give them to the optimizer passed to "
            "deepspeed.initialize, or set requires_grad=False"
        )
    opt._dist_clip_trainable = (count, params, list(map(_requires_grad, params)))


class _ZeroSkip:
    """Stands in for a ZeRO optimizer's ``_update_scale`` (an instance attribute shadowing the method).

    In DeepSpeed 0.19, ``DeepSpeedZeroOptimizer.step()`` (stage_1_and_2.py) and
    ``DeepSpeedZeroOptimizer_Stage3.step()`` (stage3.py, through ``_loss_scale_update_and_overflow_cleanup``)
    each call ``self._update_scale(self.overflow)`` exactly once, after their own overflow check and before they
    read ``self.overflow`` to choose between their overflow path (zero the gradients, release the partitions,
    return without touching the torch optimizer, the fp32 masters or the bit16 parameters; the engine then
    counts ``skipped_steps`` and does not step its LR scheduler) and the update. This hook lets the loss scaler
    see DeepSpeed's own verdict, then sets ``overflow`` when the armed flag is true, and forgets the flag. On an
    overflow it also clears what DeepSpeed's overflow path keeps of the skipped batch
    (:func:`_drop_compact_grad_buffers`, :func:`_zero_kept_grad_slots`).
    """

    def __init__(self, opt: Any) -> None:
        self.method = opt._update_scale  # the bound class method
        self.flag: Tensor | None = None

    def __call__(self, has_overflow: bool = False) -> Any:
        flag, self.flag = self.flag, None
        out = self.method(has_overflow)
        opt = self.method.__self__
        if flag is not None and bool(flag):  # a host read; DeepSpeed's step() reads its own flags on the host too
            opt.overflow = True
        if opt.overflow and getattr(opt, "cpu_offload", False):
            _drop_compact_grad_buffers(opt)
        if opt.overflow:
            _zero_kept_grad_slots(opt)
        return out


#: Where DeepSpeed 0.19.8 runs Muon inside ``step()`` (ZeRO-3; ZeRO 1-2 and ZeRO-3 with offload), before
#: ``_update_scale``.
_MUON_APPLY = ("_apply_muon_to_accumulated_grads", "_apply_muon_updates_cpu_offload")


class _MuonGuard:
    """Stands in for the method through which a ZeRO optimizer's ``step()`` runs DeepSpeed's Muon (an instance
    attribute shadowing it): with a skip armed (:class:`_ZeroSkip`), Muon is not run. ``step()`` runs it after
    its own overflow check and before ``_update_scale``, where the armed skip takes effect, and it writes its
    momentum into the optimizer state as it goes: a step skipped by dist_clip still advanced the momentum of
    every Muon parameter with a finite gradient (0.082 on a 7x6 layer, a NaN in one bias; ZeRO-3 and ZeRO-2
    offload), where DeepSpeed's own fp16 overflow, checked before Muon, leaves it alone."""

    def __init__(self, method: Any, skip: _ZeroSkip) -> None:
        self.method = method
        self.skip = skip

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flag = self.skip.flag
        if flag is not None and bool(flag):  # (a host read, as _ZeroSkip makes just after)
            return None
        return self.method(*args, **kwargs)


def _drop_compact_grad_buffers(opt: Any) -> None:
    """ZeRO 1-2 with optimizer offload and fp32 gradient accumulation over bf16/fp16 parameters (DeepSpeed
    0.19.8) accumulate each step's reduced gradients into a compact fp32 buffer per param group
    (``averaged_gradients[i]``, a list with a ``flat_partition``), added to by every backward. Its update path
    drops the buffer after the step (``averaged_gradients[i] = None``); its overflow path, with offload, does not:
    a skipped step's NaN or inf stayed in it, every later backward added to it, and every later step read
    non-finite and was skipped (bf16 with ``on_nonfinite="skip"``: one NaN batch skipped every step after it;
    fp16's own overflow does the same there). Dropped here, as the update path does, for the overflow path about
    to run: the next backward builds a zeroed one."""
    grads = getattr(opt, "averaged_gradients", None)
    if not isinstance(grads, dict):
        return
    for key, group in list(grads.items()):
        if getattr(group, "flat_partition", None) is not None:
            grads[key] = None


def _zero_kept_grad_slots(opt: Any) -> None:
    """Zero, for the overflow path about to run, the gradient buffers DeepSpeed 0.19.8 keeps across steps and a
    backward writes (copies into) only for the parameters it reaches: the offloaded fp32 gradient partitions
    (ZeRO 1-2 ``single_partition_of_fp32_groups``, ZeRO-3 ``fp32_partitioned_groups_flat``, each ``.grad``) and
    ZeRO-3's ``grad_partitions_flat_buffer`` (offloaded or not). A parameter the skipped batch reached and the
    batches after it did not kept the skipped NaN there, and every later step read NaN and was skipped again until
    a batch reached it (a layer unused after one NaN batch: skipped_steps 1, 2, 3; ZeRO 1-3 with offload, ZeRO-3
    without). Zeroed in place (the views into them stay valid): after a skip such a slot reads 0, no gradient, and
    nothing of the skipped batch is stepped later. ZeRO 1-2 without offload rebuild their partitions from the
    parameters' gradients at every step: nothing kept."""
    kept: list[Any] = [getattr(opt, "grad_partitions_flat_buffer", None)]
    if getattr(opt, "cpu_offload", False):
        kept += [getattr(f, "grad", None) for f in getattr(opt, "single_partition_of_fp32_groups", None) or ()]
    if getattr(opt, "offload_optimizer", False):
        kept += [getattr(f, "grad", None) for f in getattr(opt, "fp32_partitioned_groups_flat", None) or ()]
    for t in kept:
        if isinstance(t, Tensor):
            t.zero_()


class _Stage0Overflow:
    """Step hooks on a stage-0 engine's torch optimizer that set its ``overflow`` to whether the step was skipped.

    At stage 0 the torch optimizer's own step hooks skip the step (``skip_next_step_``), but
    ``engine._take_model_step`` (DeepSpeed 0.19, engine.py) decides whether the step was taken from
    ``engine.optimizer.overflow``, which a torch optimizer lacks: the engine counted the skipped step as taken and
    stepped its LR scheduler (ZeRO 1-3 leave it alone and count ``skipped_steps``). The pre-hook, ahead of every
    other, reads the skip flag pending on the optimizer as the step starts (a ``skip_next_step_(opt, False)``
    clearing it after the clip included: a copy of the armed flag said skipped for a step taken); the post-hook
    sets ``overflow`` from it, read on the host as the ZeRO optimizers' ``step()`` reads theirs. Registered again
    by the next arming where the hooks were cleared (as the skip's own are)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.flag: Tensor | None = None
        self.handles: list[Any] = [None, None]
        self.install(optimizer)

    def install(self, optimizer: torch.optim.Optimizer) -> None:
        """Register the hooks missing (never made, or cleared by the user), except into a dict torch is looping
        over now (an arming from a user's step pre-hook: "OrderedDict mutated during iteration", as
        :func:`dist_clip._fused.register_step_hooks` avoids); the next arming registers what was left out."""
        from .. import _fused

        phase, _ = _fused.step_phase(optimizer)
        pre_hooks, post_hooks = optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks
        if phase != "pre" and (self.handles[0] is None or self.handles[0].id not in pre_hooks):
            self.handles[0] = optimizer.register_step_pre_hook(self.pre)
            # ahead of every other pre-hook (torch's optimizer hooks take no prepend=): before dist_clip's use
            # the flag
            pre_hooks.move_to_end(self.handles[0].id, last=False)
        if phase != "post" and (self.handles[1] is None or self.handles[1].id not in post_hooks):
            self.handles[1] = optimizer.register_step_post_hook(self.post)

    def pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        from ..clipper import pending_skip_flag

        # (a clip_grad_norm_(engine, ..., optimizer=) hand-over's flag too, where it reaches this step: the fused
        # kernel skipped a NaN step the engine counted as taken, its LR scheduler stepped on it)
        self.flag = pending_skip_flag(optimizer)

    def join(self, flag: Tensor) -> None:
        """``flag`` (bool, 0-dim) skips the step under way too."""
        self.flag = flag if self.flag is None else self.flag | flag.to(self.flag.device)

    def post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        flag, self.flag = self.flag, None
        optimizer.overflow = flag is not None and bool(flag)


def stage0_overflow(optimizer: torch.optim.Optimizer) -> _Stage0Overflow:
    """The :class:`_Stage0Overflow` of a stage-0 engine's torch optimizer, made or its hooks registered again."""
    told = vars(optimizer).get("_dist_clip_ds_overflow")
    if isinstance(told, _Stage0Overflow):
        told.install(optimizer)
    else:
        told = optimizer._dist_clip_ds_overflow = _Stage0Overflow(optimizer)  # type: ignore[attr-defined]
    return told


def count_fused_skip(target: object, optimizer: object, running: Tensor | None) -> None:
    """``clip_grad_norm_(engine, ..., optimizer=)`` at stage 0, where ``optimizer`` is the fused torch optimizer
    the engine steps itself (``engine.optimizer``): a non-finite total skips that step through ``found_inf``,
    and the engine must count it as DeepSpeed counts an overflow (``skipped_steps``, no LR scheduler step), as
    under ``on_nonfinite="skip"`` (:class:`_Stage0Overflow`). ``running``: this call's skip flag where it acts on
    the step under way (from inside it), which it joins."""
    if not (matches(target) and getattr(target, "optimizer", None) is optimizer
            and isinstance(optimizer, torch.optim.Optimizer)):
        return
    told = stage0_overflow(optimizer)
    if running is not None:
        told.join(running.reshape(()) != 0)


def torch_optimizer(target: object, optimizer: object) -> object:
    """The torch optimizer given to ``deepspeed.initialize`` where ``optimizer`` is the engine or its
    ``engine.optimizer`` (a ZeRO or mixed-precision wrapper holding it as ``.optimizer``); ``optimizer`` itself
    otherwise (per-group clipping read param groups only from a torch optimizer: the wrapper was a TypeError
    except under ``on_nonfinite="skip"``, which resolved it)."""
    if not matches(target):
        return optimizer
    own = getattr(target, "optimizer", None)
    if optimizer is target or (optimizer is own and own is not None):
        inner = own if isinstance(own, torch.optim.Optimizer) else getattr(own, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            return inner
    return optimizer


def skip_handle(target: object, optimizer: object) -> tuple[Any, Any]:
    """How ``on_nonfinite="skip"`` makes the next ``engine.step()`` a no-op: ``(arm, torch_optimizer)``.

    ``arm(flag)`` takes the 0-dim bool flag (true: skip). ``optimizer`` may be ``None``, the engine,
    ``engine.optimizer`` or the torch optimizer given to ``deepspeed.initialize`` (``torch_optimizer`` is that
    one, or ``None`` where there is none to name). ZeRO 1-3 take DeepSpeed's own overflow path
    (:class:`_ZeroSkip`): the step is skipped for every param group and sub-group at once, parameters, fp32
    masters and optimizer state stay as they were. Stage 0 without a mixed-precision wrapper steps the torch
    optimizer once per ``engine.step()``: its step hooks (:func:`dist_clip.clipper.skip_next_step_`) skip it.
    DeepSpeed's non-ZeRO mixed-precision wrappers raise ``NotImplementedError``. Raises before anything is
    measured, and identically on every rank.
    """
    ds = _require()
    check_version(ds.__version__)
    engine: Any = target
    opt = engine.optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = isinstance(opt, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3))
    inner = getattr(opt, "optimizer", None) if zero else opt
    if optimizer is target:
        optimizer = opt  # the engine stands for its optimizer, as under the other policies
    if optimizer is not None and optimizer is not opt and optimizer is not inner:
        raise ValueError(
            f"on_nonfinite='skip' on a DeepSpeed engine skips engine.step(); optimizer= must be left out, or be the "
            f"engine, engine.optimizer ({type(opt).__name__}) or the torch optimizer given to deepspeed.initialize, "
            f"got another {type(optimizer).__name__}"
        )
    torch_opt = inner if isinstance(inner, torch.optim.Optimizer) else None
    if zero:
        _check_attributes(opt, _SKIP_ZERO)
        hook = vars(opt).get("_update_scale")
        if not isinstance(hook, _ZeroSkip):
            hook = _ZeroSkip(opt)
            opt._update_scale = hook

        if _muon_steps(opt):
            for name in _MUON_APPLY:
                if hasattr(type(opt), name) and not isinstance(vars(opt).get(name), _MuonGuard):
                    setattr(opt, name, _MuonGuard(getattr(opt, name), hook))

        def arm(flag: Tensor) -> None:
            hook.flag = flag

        return arm, torch_opt
    if isinstance(opt, torch.optim.Optimizer):
        from ..clipper import skip_next_step_

        def arm_stage0(flag: Tensor) -> None:
            from .. import _fused

            skip_next_step_(opt, flag)
            told = stage0_overflow(opt)
            if _fused.in_step(opt):
                # Armed for the step under way (a user's pre-hook after ours, a closure), which it replaces as
                # skip_next_step_ does: ours read the flag pending before it (the skip taken, counted as a step).
                told.flag = flag

        return arm_stage0, opt
    raise NotImplementedError(
        f"on_nonfinite='skip' on a DeepSpeed engine supports ZeRO stages 1-3 and stage 0 without a "
        f"mixed-precision wrapper; this engine's optimizer is {type(opt).__name__}"
    )


_dtype = operator.attrgetter("dtype")
#: Pieces above which a scaled flatten without the native kernel copies then multiplies (two passes) rather
#: than multiplying piece by piece into place (one pass, but one torch call per piece: ~5 us each on the CPU).
_PIECEWISE_MAX = 64


def _scaled_flatten(tensors: list[Tensor], coef: Tensor) -> Tensor:
    """``_flatten_dense_tensors(tensors) * coef``, in one pass where possible: the native kernel on the CPU (one
    call for any number of pieces), else each piece multiplied straight into its place."""
    first = tensors[0]
    c = coef.to(first.device)
    if (
        first.device.type == "cpu"  # one partition's pieces share a device (torch.cat would refuse otherwise)
        and first.dtype in _native.DTYPES
        and len(set(map(_dtype, tensors))) == 1
        and all(map(Tensor.is_contiguous, tensors))
        and _native.plain(tensors)
    ):
        out = _native.scaled_flatten(tensors, float(c))
        if out is not None:
            return out
    if first.device.type != "cpu" and c.dtype != first.dtype:
        c = c.reshape(1)  # the product in c's precision, rounded once (see dist_clip._scale.mul_group_)
    if len(tensors) > _PIECEWISE_MAX:
        return _flatten_dense_tensors(tensors).mul_(c)
    out = torch.empty(sum(t.numel() for t in tensors), dtype=first.dtype, device=first.device)
    offset = 0
    for t in tensors:
        n = t.numel()
        torch.mul(t.reshape(-1), c, out=out.narrow(0, offset, n))
        offset += n
    return out


def _flat_grads(grads: Any) -> list[Tensor]:
    """The tensors of ``unscale_and_clip_grads``' argument (ZeRO-1/2 may nest sub-partition lists)."""
    out: list[Tensor] = []
    for g in grads:
        if isinstance(g, list):
            out += _flat_grads(g)
        elif g is not None:
            out.append(g)
    return out


class _ZeroFold:
    """Folds dist_clip's clip coefficient into the passes a ZeRO optimizer's ``step()`` already makes over its
    gradient partition, instead of a multiply pass of its own (``clip_grad_norm_(engine, ..., optimizer=)``).

    In DeepSpeed 0.19, ``step()`` of ZeRO-1/2 (stage_1_and_2.py, without offload) and of ZeRO-3
    (``_prepare_fp32_grad_for_sub_group``, stage3.py) copies each group's reduced gradients into one flat
    buffer with ``self.flatten(self.averaged_gradients[i])`` (ZeRO-1/2's last rank through
    ``flatten_dense_tensors_aligned``, which appends padding), then calls ``self.unscale_and_clip_grads`` on that
    buffer, which divides by the loss scale (ZeRO-1/2 skip it when the scale is 1 and DeepSpeed does not clip).
    Wrapped here (instance attributes shadowing the methods): that flatten multiplies each piece by the
    coefficient as it copies it (the same read and write, so clipping costs no pass of its own); where no copy
    carries it (ZeRO-1/2 offload, DeepSpeed's pre-flattened partitions, ZeRO-3 offload) the unscale's own
    multiply takes ``coef / loss_scale`` instead of ``1 / loss_scale`` (free where DeepSpeed multiplies anyway:
    fp16, ZeRO-3). ``step`` is wrapped to forget the coefficient when it returns, overflow skips included, so
    it applies to exactly one ``step()``. Numerically the same products as scaling the gradients first.

    The coefficient applies only to the gradients it was measured on: at the step's entry (and in
    :func:`settle`) :meth:`verdict` compares the buffers the step reads and the measured pieces with what the
    hand-over recorded. A backward since (a batch dropped without a step) replaced them (ZeRO-1/2's new
    partition tensors) or wrote into them (ZeRO-3 accumulates into its partitions; the offloaded buffers are
    rewritten): the coefficient is dropped and the step takes them unclipped, with a warning where they were
    written in place.
    """

    def __init__(self, opt: Any, stage3: bool) -> None:
        self.stage3 = stage3
        self.step_method = opt.step
        self.unscale_method = opt.unscale_and_clip_grads
        self.flatten_fn = opt.flatten
        self.coef: Tensor | None = None
        self.held: list[Tensor] = []  # the pieces coef was measured on
        # What step() reads (see _buffers) when coef was handed over, and their version counters (the pieces are
        # these or views of them: the same counters).
        self.reads: tuple[list[Tensor | None], list[int]] = ([], [])
        self.stepping = False
        self.copied = False  # the flatten just before the next unscale carried the coefficient
        opt.step = self._step
        opt.flatten = self._flatten
        opt.unscale_and_clip_grads = self._unscale

    @property
    def opt(self) -> Any:
        return self.step_method.__self__

    def hand_over(self, coef: Tensor, pieces: list[Tensor]) -> None:
        self.coef, self.held = coef, pieces
        buffers = self._buffers()
        self.reads = (buffers, [-1 if t is None else t._version for t in buffers])

    def _buffers(self) -> list[Tensor | None]:
        """The gradient tensors ``step()`` reads: each group's reduced partition pieces (``averaged_gradients``),
        or with offload the fp32 partitions' ``.grad``. The measured pieces are these or views of them."""
        opt = self.opt
        if opt.offload_optimizer if self.stage3 else opt.cpu_offload:
            flats = opt.fp32_partitioned_groups_flat if self.stage3 else opt.single_partition_of_fp32_groups
            return [f.grad for f in flats]
        out: list[Tensor | None] = []
        groups = opt.averaged_gradients
        for grads in groups.values() if isinstance(groups, dict) else groups:
            if isinstance(grads, (list, tuple)):
                out.extend(grads)
            else:
                out.append(grads)
        return out

    def verdict(self) -> str:
        """What became of the gradients the pending coefficient was measured on: "same" (the step reads the
        very buffers, none written since), "stale" (replaced: a backward since, ZeRO-1/2 building new partition
        tensors) or "written" (written in place since: a backward accumulating into ZeRO-3's partitions, or
        rewriting the offloaded buffers). Identity and version counters only: no pass over the data, no device sync."""
        now = self._buffers()
        then, versions = self.reads
        if len(now) != len(then) or not all(map(operator.is_, now, then)):
            return "stale"
        if [-1 if t is None else t._version for t in now] != versions:
            return "written"
        return "same"

    def forget(self) -> None:
        self.coef, self.held, self.reads = None, [], ([], [])

    def _step(self, *args: Any, **kwargs: Any) -> Any:
        if self.coef is not None:
            verdict = self.verdict()  # one identity and one version read per buffer: about 0.1 us each
            if verdict != "same":
                self.forget()
                if verdict == "written":
                    warn_at_caller(  # the caller of engine.step(), past DeepSpeed's frames
                        "dist_clip: the clip coefficient handed to engine.step() was dropped: its gradients were "
                        "written after the clip (a further backward, accumulating into them or rewriting their "
                        "buffers), so they are no longer the ones measured and this step takes them unclipped. "
                        "Clip after the last backward before step()"
                    )
        self.stepping = True
        try:
            return self.step_method(*args, **kwargs)
        finally:
            self.forget()
            self.stepping, self.copied = False, False

    def _is_partition(self, tensors: Any) -> bool:
        held = self.opt.averaged_gradients
        for grads in held.values() if isinstance(held, dict) else held:
            if isinstance(grads, list) and grads and len(tensors) >= len(grads):
                if all(a is b for a, b in zip(grads, tensors)):
                    return True
        return False

    def _flatten(self, tensors: Any) -> Tensor:
        coef = self.coef
        if coef is None or not self.stepping or not tensors or not self._is_partition(tensors):
            return self.flatten_fn(tensors)
        self.copied = True
        if coef.device.type == "cpu" and bool(coef == 1.0):
            return self.flatten_fn(tensors)
        return _scaled_flatten(list(tensors), coef)

    def _unscale(self, grads: Any, total_norm: Any) -> Any:
        coef = self.coef
        if coef is None or not self.stepping:
            self.copied = False
            return self.unscale_method(grads, total_norm)
        opt = self.opt
        if opt.clip_grad > 0:
            # DeepSpeed clips as well (the adapter warned), by a norm it measured before our coefficient reached
            # the gradients: it must see the norm of the clipped gradients, as after a plain dist_clip call.
            total_norm = _times_coef(total_norm, coef)
        if self.copied:
            self.copied = False
            return self.unscale_method(grads, total_norm)
        held = _flat_grads([opt.fp32_partitioned_groups_flat[grads].grad] if self.stage3 else grads)
        if opt.clip_grad > 0:  # its pass, then ours
            out = self.unscale_method(grads, total_norm)
            _scale.scale_(held, coef)
            return out
        scale = float(opt.loss_scale)  # DeepSpeed's combined scale when it does not clip
        _scale.scale_(held, coef if scale == 1.0 else coef * (1.0 / scale))  # skips a factor of 1 on the CPU
        return None


def _times_coef(total_norm: Any, coef: Tensor) -> Any:
    """DeepSpeed's (loss-scaled) norm of the gradients once multiplied by ``coef``; its invalid-norm sentinels
    (negative, non-finite) kept as they are. On the device: no sync."""
    if not isinstance(total_norm, Tensor):
        value = float(total_norm)
        return value if not math.isfinite(value) or value < 0 else coef.to(torch.float32) * value
    scaled = total_norm * coef.to(device=total_norm.device, dtype=total_norm.dtype)
    return torch.where(total_norm < 0, total_norm, scaled)


def fold_handle(target: object, optimizer: object) -> Any:
    """``clip_grad_norm_(engine, ..., optimizer=)`` on ZeRO 1-3: a function taking the clip coefficient (a 0-dim
    device tensor) that makes the next ``engine.step()`` apply it (:class:`_ZeroFold`), or ``None`` where it
    does not apply (stage 0 and DeepSpeed's other wrappers; an ``optimizer`` that is not the engine,
    ``engine.optimizer`` or the torch optimizer given to ``deepspeed.initialize``; DeepSpeed's Muon, which turns
    the gradients into updates inside ``step()`` before the fold's passes): the caller then scales the
    gradients, or hands the coefficient to a fused torch optimizer's ``step()``.
    """
    engine: Any = target
    opt = engine.optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(opt, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)):
        return None
    if optimizer is not engine and optimizer is not opt and optimizer is not getattr(opt, "optimizer", None):
        return None
    if getattr(opt, "zenflow", False):  # ZenFlow flattens and steps its own way
        return None
    if _muon_steps(opt):
        # DeepSpeed's Muon turns the gradients into Muon updates inside step(), before the flatten and the unscale
        # the coefficient rides on: folded there it scaled the update instead of the gradient (parameters 0.053
        # off the same call without optimizer=, after 2 steps, ZeRO-3 and ZeRO-2 offload). Scaled in the call.
        return None
    fold = vars(opt).get("_dist_clip_fold")
    if fold is None:
        _check_attributes(opt, _FOLD_ZERO)
        fold = _ZeroFold(opt, isinstance(opt, DeepSpeedZeroOptimizer_Stage3))
        opt._dist_clip_fold = fold

    return fold.hand_over


def settle(target: object) -> None:
    """Apply a coefficient an earlier ``clip_grad_norm_(engine, ..., optimizer=)`` left for the next ``step()``
    to the gradients now, because a dist_clip call is about to read them: it then sees them clipped, as after
    the plain call (a second clip composes with the first, a report reads clipped norms). Pieces replaced or
    modified in place since (a new backward, :meth:`_ZeroFold.verdict`) are not the ones it measured: the
    coefficient is dropped instead."""
    fold = getattr(getattr(target, "optimizer", None), "__dict__", {}).get("_dist_clip_fold")
    if fold is None or fold.stepping or fold.coef is None:
        return
    coef, pieces, verdict = fold.coef, fold.held, fold.verdict()
    fold.forget()
    if verdict == "same":  # (NaN as 1, as the plain call applies it: these are the engine's kept slots too)
        _scale.scale_(pieces, applied_coefficient(target, coef))


def optimizer_tensors(target: object) -> dict[str, Tensor]:
    """Parameter name -> the tensor DeepSpeed put in the torch optimizer's ``param_groups`` in its place.

    DeepSpeed's mixed-precision and ZeRO-1/2 wrappers replace each param group's ``params`` with their fp32
    copies (one flat partition per group for ZeRO-1/2 and ``BF16_Optimizer``): per-group clipping finds a
    parameter's group through this tensor. Empty where the torch optimizer holds the module's parameters
    themselves (stage 0 without a wrapper), and for ZeRO-3, whose param groups stay empty between steps (see
    :func:`zero3_param_groups`).
    """
    engine: Any = target
    opt = engine.optimizer
    name = type(opt).__name__
    names = _names_by_id(engine)
    out: dict[str, Tensor] = {}
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    def put(params: Any, held: Any) -> None:
        for k, p in enumerate(params):
            n = names.get(id(p))
            if n is not None:
                out.setdefault(n, held[k] if isinstance(held, (list, tuple)) else held)

    if isinstance(opt, DeepSpeedZeroOptimizer):
        for i, params in enumerate(opt.bit16_groups):
            put(params, opt.single_partition_of_fp32_groups[i])
    elif name == "BF16_Optimizer" and hasattr(opt, "fp32_groups_flat_partition"):
        for i, params in enumerate(opt.bf16_groups):
            put(params, opt.fp32_groups_flat_partition[i])
    elif name == "FP16_Optimizer" and hasattr(opt, "fp32_groups_flat"):
        for i, params in enumerate(opt.fp16_groups):
            put(params, opt.fp32_groups_flat[i])
    elif name == "FP16_UnfusedOptimizer" and hasattr(opt, "fp32_groups"):
        for i, params in enumerate(opt.fp16_groups):
            put(params, list(opt.fp32_groups[i]))
    return out


def zero3_param_groups(target: object) -> tuple[dict[str, int], Any]:
    """ZeRO-3: parameter name -> index of its param group in the torch optimizer, and that optimizer.

    ZeRO-3 empties the torch optimizer's ``param_groups[i]["params"]`` between steps (it puts one flat fp32
    partition there only while stepping a sub-group), but keeps the mapping: ``fp16_groups[k]`` holds the module
    parameters of sub-group ``k``, ``sub_group_to_group_id[k]`` the index of their param group in
    ``optimizer.param_groups`` (whose dicts, and their other keys, persist). ``({}, None)`` for other stages.
    """
    engine: Any = target
    opt = engine.optimizer
    stage3 = sys.modules.get("deepspeed.runtime.zero.stage3")
    cls = getattr(stage3, "DeepSpeedZeroOptimizer_Stage3", None) if stage3 is not None else None
    if cls is None or not isinstance(opt, cls):
        return {}, None
    names = _names_by_id(engine)
    out: dict[str, int] = {}
    for k, params in enumerate(opt.fp16_groups):
        gid = opt.sub_group_to_group_id.get(k)
        if gid is None:
            continue
        for p in params:
            n = names.get(id(p))
            if n is not None:
                out.setdefault(n, int(gid))
    return out, opt.optimizer


def expert_param_groups(target: object) -> tuple[dict[str, int], Any]:
    """ZeRO-1/2 and stage 0 with DeepSpeed MoE layers: every expert's name (:func:`all_names`) -> the index of its
    param group in the torch optimizer, and that optimizer; ``({}, None)`` elsewhere. Another expert-parallel
    rank's expert lies in the group of this rank's expert at the same local index (every rank builds them alike):
    without it, ``mode="per_group"`` found each rank's own experts only, and the ranks' group layouts differed
    (a ``RuntimeError`` on every rank)."""
    engine: Any = target
    opt = engine.optimizer
    blocks = _expert_blocks(engine)
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not blocks:
        return {}, None
    if isinstance(opt, DeepSpeedZeroOptimizer):
        group_by_id = {id(p): i for i, params in enumerate(opt.bit16_groups) for p in params}
        inner = opt.optimizer
    elif isinstance(opt, torch.optim.Optimizer):  # stage 0: the module's parameters themselves
        group_by_id = {id(p): i for i, pg in enumerate(opt.param_groups) for p in pg["params"]}
        inner = opt
    else:
        return {}, None
    local = {n: group_by_id[id(p)] for n, p in _module_named(engine) if id(p) in group_by_id}
    out: dict[str, int] = {}
    for name in all_names(engine):
        found = _split_expert_name(blocks, name)
        if found is not None:
            twin = _on_this_rank(*found)
            if twin in local:
                out[name] = local[twin]
    return out, inner


# ------------------------------------------------------------------------------------ unit-wise clipping (AGC)


def _zero12_units(engine: Any, opt: Any, found: list[Shards]) -> tuple[list[UnitPiece], dict[str, Any], list[str]]:
    """ZeRO-1/2: the named gradient slices with the matching slices of the fp32 master partition.

    Rank r of a group's data-parallel group holds the elements ``[r * partition_size, (r + 1) * partition_size)``
    of the flat group buffer, where parameter k starts at ``round_robin_bit16_offsets[i][k]``: the cuts of every
    parameter follow from those numbers alone, identical on every rank.
    """
    layout = _zero12_layout(engine, opt)
    names = _names_by_id(engine)
    pieces: list[UnitPiece] = []
    geometry: dict[str, Any] = {}
    order: list[str] = []
    for i, ((size, slices), s) in enumerate(zip(layout, found)):
        world = dist.get_world_size(opt.real_dp_process_group[i])
        for k, (p, off, meta) in enumerate(zip(opt.round_robin_bit16_groups[i], opt.round_robin_bit16_offsets[i],
                                               opt.round_robin_bit16_meta[i])):
            name = names.get(id(p), f"zero_group{i}.param{k}")
            geometry[name] = (meta.shape, partition_cuts(int(off), int(meta.numel()), size, world))
            order.append(name)
        master = opt.single_partition_of_fp32_groups[i]
        if master.numel() != size or len(s.tensors) != len(slices):
            raise _layout_error(f"param group {i}: the master partition has {master.numel()} elements (partition "
                                f"size {size}) and {len(s.tensors)} gradient pieces for {len(slices)} slices")
        flat = master.detach().reshape(-1)
        for sl, g in zip(slices, s.tensors):
            # A slice holding a whole parameter may come shaped like it: view(-1) keeps scaling in place.
            pieces.append(UnitPiece(sl.name, g.view(-1), flat.narrow(0, sl.dest, sl.numel), sl.src, s.group))
    return pieces, geometry, order


def _zero3_units(engine: Any, opt: Any, found: list[Shards]) -> tuple[list[UnitPiece], dict[str, Any], list[str]]:
    """ZeRO-3: rank r of a parameter's partition group holds its flattened elements ``[r * n, (r + 1) * n)``,
    ``n = param.partition_numel()`` (the last partitions padded); the fp32 master of the piece lies in the
    sub-group's ``fp32_partitioned_groups_flat`` at the parameter's ``grad_position`` offset."""
    if type(opt).__name__ == "MiCS_Optimizer":
        raise NotImplementedError("unit-wise clipping (AGC) does not handle DeepSpeed MiCS (ZeRO-3 partitions "
                                  "replicated across MiCS replica groups)")
    pieces: list[UnitPiece] = []
    geometry: dict[str, Any] = {}
    order: list[str] = []
    for i, (params, s) in enumerate(zip(opt.fp16_groups, found)):
        pg = _zero3_dp_group(opt, i)
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        master = opt.fp32_partitioned_groups_flat[i]
        if len(s.tensors) != len(params):
            raise RuntimeError(f"ZeRO-3 sub-group {i} has {len(s.tensors)} gradient pieces for {len(params)} "
                               "parameters: this DeepSpeed release changed its ZeRO internals")
        if master.numel() == 0 and any(_real_numel(p, rank) for p in params):
            raise NotImplementedError("ZeRO-3 with NVMe optimizer swapping keeps the fp32 master weights on disk: "
                                      "unit-wise clipping (AGC) cannot read them")
        flat = master.detach().reshape(-1)
        for p, g, name in zip(params, s.tensors, s.names):
            per_rank, numel = int(p.partition_numel()), int(p.ds_numel)
            geometry[name] = (torch.Size(p.ds_shape), partition_cuts(0, numel, per_rank, world))
            order.append(name)
            real = _real_numel(p, rank)
            if g.numel() != real:
                raise RuntimeError(f"ZeRO-3 gradient piece of {name!r} has {g.numel()} elements, its partition "
                                   f"{real}: this DeepSpeed release changed its ZeRO internals")
            if real:
                _, offset, _ = opt.grad_position[opt.get_param_id(p)]
                pieces.append(UnitPiece(name, g, flat.narrow(0, int(offset), real), rank * per_rank, s.group))
    return pieces, geometry, order


def _replicated_units(engine: Any, found: list[Shards]) -> list[UnitPiece]:
    """Whole gradients identical on every rank (stage 0, BF16_Optimizer's fp32 buffers): weights are the
    module's parameters, as every rank holds them."""
    params = dict(_module_named(engine))
    pieces: list[UnitPiece] = []
    for s in found:
        for name, g in zip(s.names, s.tensors):
            p = params.get(name)
            if p is None:
                raise ValueError(f"unit-wise clipping (AGC) needs the parameter of every gradient, and {name!r} "
                                 "is not a parameter of engine.module")
            # (the Shards' group and counting: copies under group= count on their lowest rank there; dropped, only
            # the reduction's rank 0 counted, and another model-parallel rank's NaN passed as finite)
            if g.shape == p.shape:
                pieces.append(UnitPiece(name, g, p.detach(), None, s.group, s.counted))
            elif g.numel() == p.numel() and g.dim() == 1:  # BF16_Optimizer: flat fp32 views
                pieces.append(UnitPiece(name, g, p.detach().reshape(-1), 0, s.group, s.counted))
            else:
                raise _layout_error(f"the gradient of {name!r} has shape {tuple(g.shape)}, the parameter "
                                    f"{tuple(p.shape)}")
    return pieces


def unit_layout(target: object, group: dist.ProcessGroup | None) -> UnitLayout:
    """This rank's pieces of every parameter for unit-wise clipping (AGC), ZeRO stages 0-3.

    The gradient pieces (and every check, and the loss scale) are those of :func:`shards`; weights are the fp32
    master partition under ZeRO 1-3 (what ``step()`` updates, aligned with the gradient pieces), the module's
    parameters where gradients are whole. Raises ``NotImplementedError`` for what it cannot read (MoE outside
    ZeRO-1/2, MiCS, NVMe optimizer swapping).
    """
    engine: Any = target
    found = shards(target, group)
    opt = engine.optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    scale = found[0].loss_scale if found else 1.0
    module_names = list(dict.fromkeys(n for n, _ in _module_named(engine)))
    geometry: dict[str, Any] = {}
    order: list[str] = []
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        pieces, geometry, order = _zero3_units(engine, opt, found)
    elif isinstance(opt, DeepSpeedZeroOptimizer):
        pieces, geometry, order = _zero12_units(engine, opt, found)
    else:
        pieces = _replicated_units(engine, found)
        shapes = {n: p.shape for n, p in _module_named(engine)}
        geometry = {pc.name: (shapes[pc.name], ()) for pc in pieces if pc.start is not None}
    if group is not None and isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        _refuse_group_beyond_dp([_zero3_dp_group(opt, i) for i in range(len(opt.fp16_groups))], group, geometry)
    elif group is not None and isinstance(opt, DeepSpeedZeroOptimizer):
        _refuse_group_beyond_dp([_zero12_peers(opt, i) for i in range(len(opt.real_dp_process_group))], group,
                                geometry)
    blocks = _expert_blocks(engine)
    if blocks:
        # Every rank lists every expert (all_names), and the cuts of another rank's expert are those of this
        # rank's expert at the same local index: the experts are copies of one module, grouped and partitioned
        # alike on every expert-parallel rank.
        module_names = all_names(engine)
        for name in module_names:
            found_expert = _split_expert_name(blocks, name)
            if found_expert is not None and name not in geometry:
                twin = _on_this_rank(*found_expert)
                if twin in geometry:
                    geometry[name] = geometry[twin]
    names = tuple(dict.fromkeys(module_names + order))
    groups = tuple(dict.fromkeys(s.group for s in found))
    device = next((t.device for s in found for t in s.tensors), None)
    return UnitLayout(pieces, names, geometry, groups, scale, device)


def _refuse_group_beyond_dp(dps: list[dist.ProcessGroup], group: dist.ProcessGroup, geometry: dict[str, Any]) -> None:
    """``NotImplementedError`` where ``group=`` reaches beyond the data-parallel group (other model-parallel
    ranks, other stages): units (rows) cut between partitions are combined by (name, row) over the group, so
    another data-parallel group's distinct parameter of the same name was added to this one's (ZeRO-3 under an
    mpu: coefficients 0.88-0.97 off)."""
    if all(same_ranks(dp, group) for dp in dps) or not geometry:
        return
    # Refused whether or not this rank's partitions cut a row (another rank's may: it raised alone, and the
    # others waited in the collective until the timeout).
    name = next(iter(geometry))
    raise NotImplementedError(
        f"unit-wise clipping of {name!r}: ZeRO partitions it over the data-parallel group, and group= holds ranks "
        "beyond that group (other model-parallel ranks or stages), whose units cut between partitions would be "
        "combined by name with its own; clip without group=, or use mode='per_param'"
    )
