"""The public functions: resolve a target to Shards, measure, combine with one collective, scale in place."""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _fused, _norm, _reduce, _scale
from ._warn import warn_at_caller
from .adapters import resolve
from .adapters.params import refuse_stepped_in_backward
from .shards import Shards, common_loss_scale

__all__ = ["clip_grad_norm_", "clip_grads_with_norm_", "get_total_norm", "local_total_partial", "total_from_shards"]


# Never traced: under torch.compile the writes a call makes to the optimizer (the fused hand-over, skip flags)
# and to its own state were dropped (a compiled clip with a fused SGD stepped unclipped; a skipped step ran).
_eager = _fused.never_traced


def _check_group(group: object) -> dist.ProcessGroup | None:
    if group is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group= was given but torch.distributed is not initialized; call init_process_group first")
    if not isinstance(group, dist.ProcessGroup):
        if isinstance(group, int) and group == getattr(dist.GroupMember, "NON_GROUP_MEMBER", None):
            raise ValueError(
                f"group= is a group this rank ({dist.get_rank()}) is not a member of (dist.new_group returns "
                "GroupMember.NON_GROUP_MEMBER on the other ranks): call with group= only on the group's ranks"
            )
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    return group


def _check_foreach(foreach: object) -> bool | None:
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"foreach must be None, True or False, got {foreach!r}")
    return foreach


def _undistributed(value: object) -> object:
    """A DTensor value (``torch.nn.utils.get_total_norm`` returns one on FSDP2 gradients, ``Partial`` for inf)
    as the plain tensor it stands for: ``full_tensor()``, local for ``Replicate``, a collective for ``Partial``
    (every rank calls, as torch's own clipping would redistribute it)."""
    if isinstance(value, Tensor) and type(value).__name__ == "DTensor":
        return value.full_tensor()  # type: ignore[attr-defined]
    return value


def _check_max_norm(max_norm: object) -> float | Tensor:
    max_norm = _norm.numpy_scalar(_undistributed(max_norm))
    if isinstance(max_norm, bool) or not isinstance(max_norm, (numbers.Real, Tensor)):
        raise TypeError(f"max_norm must be a real number, got {type(max_norm).__name__} {max_norm!r}")
    if isinstance(max_norm, Tensor):
        if max_norm.numel() != 1 or max_norm.dtype == torch.bool or max_norm.is_complex():
            raise TypeError(
                "max_norm as a tensor must hold one real number, got a tensor of shape "
                f"{tuple(max_norm.shape)} and dtype {max_norm.dtype}"
            )
        if not max_norm.is_floating_point():
            max_norm = max_norm.to(torch.float32)  # an integer tensor, as torch.nn.utils accepts it
        if max_norm.device.type != "cpu":
            # Validating would be a device sync: a negative or NaN one makes the coefficient NaN (it flipped the
            # gradients' signs, silently), on the device.
            return torch.where(max_norm >= 0, max_norm, math.nan).reshape(())
        value = float(max_norm)
    else:
        value = _norm.as_float("max_norm", max_norm)
    if math.isnan(value) or value < 0:
        raise ValueError(f"max_norm must be a number >= 0, got {value}")
    return max_norm.reshape(()) if isinstance(max_norm, Tensor) else value


def _all_tensors(shards: Sequence[Shards]) -> list[Tensor]:
    """Every piece of a call once (a tensor listed twice must not be scaled twice)."""
    if len(shards) == 1:
        only = list(shards[0].tensors)
        if len(set(map(id, only))) == len(only):  # the common case, checked in C
            return only
    seen: set[int] = set()
    out: list[Tensor] = []
    for s in shards:
        for t in s.tensors:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def _counted_tensors(
    shards: Sequence[Shards], group: dist.ProcessGroup | None, everything: list[Tensor] | None = None
) -> tuple[list[Tensor], bool]:
    """The pieces this rank measures (counted ones, and replicated ones on rank 0 only), and whether that is
    every piece of every Shards. Empty pieces stay in: they measure as the neutral partial.

    ``everything``: ``_all_tensors(shards)``, where the caller has it: returned as it is where every piece is
    counted here (the same pieces, each once, in the same order), without listing and testing them again.
    """
    first = _reduce.group_rank(group) == 0
    if everything is not None and all(s.counted and (s.group is not None or first) for s in shards):
        return everything, True
    out: list[Tensor] = []
    whole = True
    for s in shards:
        if s.counted and (s.group is not None or first):
            out.extend(s.tensors)
        else:
            whole = False
    if len(set(map(id, out))) != len(out):
        # one tensor listed twice counts once, as it is scaled once (it was counted twice: x1.41 on the total)
        out = list({id(t): t for t in out}.values())  # (first-listed order)
    return out, whole


_Groups = dict[tuple[torch.device, torch.dtype], list[Tensor]]


def local_total_partial(
    tensors: Sequence[Tensor],
    p: float,
    foreach: bool | None,
    device: torch.device,
    groups: _Groups | None = None,
) -> Tensor:
    """This rank's one partial (float64, 0-dim, on ``device``) over all its counted pieces.

    ``groups``: ``tensors`` already bucketed by :func:`_scale.group_by_device_dtype`, when the caller has it.
    """
    parts: list[Tensor] = []
    for (_, _), group in (groups if groups is not None else _scale.group_by_device_dtype(tensors)).items():
        partials = _norm.local_partials(group, p, foreach)
        reduced = partials.max() if math.isinf(p) and partials.numel() else partials.sum()
        parts.append(_reduce.moved(reduced, device))
    if not parts:
        return torch.zeros((), dtype=torch.float64, device=device)
    if len(parts) == 1:
        return parts[0]
    stacked = torch.stack(parts)
    if math.isinf(p):
        # torch.max propagates NaN, which is what a NaN gradient must do.
        return stacked.max()
    return stacked.sum()


_WIDE = (torch.float64, torch.complex128)
_dtype = operator.attrgetter("dtype")


def _result_dtype(tensors: Sequence[Tensor], groups: _Groups | None) -> torch.dtype:
    """float64 where any gradient is float64 (or complex128), as torch returns its norm in the gradients' dtype;
    float32 otherwise (never bf16/fp16: torch's low-precision totals are rounded to 2-3 digits)."""
    dtypes = {dtype for _, dtype in groups} if groups is not None else set(map(_dtype, tensors))
    return torch.float64 if any(d in _WIDE for d in dtypes) else torch.float32


def wide_flag(dtype: torch.dtype, device: torch.device) -> Tensor:
    """1.0 where this rank's result dtype is float64, else 0.0: combined by SUM or MAX, positive iff some rank's
    is. Packed into a call's all-reduce where :func:`_reduce.reduces_on_host`, so that a rank holding only
    float32 pieces (or none) returns the float64 total the ranks holding float64 gradients return."""
    return torch.tensor([1.0 if dtype == torch.float64 else 0.0], dtype=torch.float64).to(device, non_blocking=True)


def agreed_dtype(combined_flag: Tensor) -> torch.dtype:
    """The result dtype every rank takes from the combined :func:`wide_flag` (a host read: host backends only)."""
    return torch.float64 if bool(combined_flag > 0) else torch.float32


def total_from_shards(
    shards: Sequence[Shards],
    p: float,
    error_if_nonfinite: bool,
    foreach: bool | None,
    everything: list[Tensor] | None = None,
    groups: _Groups | None = None,
) -> Tensor:
    """The global norm of ``shards``: local partials, one collective, root. Identical on every rank.

    ``everything`` (``_all_tensors(shards)``) and ``groups`` (its device/dtype buckets) save recomputing them
    when the caller needs them again to scale; the buckets are used only where every piece is counted here.
    """
    wide, out = _wide_total(shards, p, error_if_nonfinite, foreach, everything, groups)
    return wide.to(out)


def _wide_total(
    shards: Sequence[Shards],
    p: float,
    error_if_nonfinite: bool,
    foreach: bool | None,
    everything: list[Tensor] | None,
    groups: _Groups | None,
    limit: float | Tensor | None = None,
    refused: bool = False,
    agreement: _fused.Agreement | None = None,
    skips: bool = False,
    listed: bool = False,
) -> tuple[Tensor, torch.dtype]:
    """:func:`total_from_shards` before its cast: the float64 total and the dtype to return it in (``limit``:
    clip_grad_norm_'s ``max_norm``, part of the settings every rank must share; ``skips``: a non-finite total skips
    the next step of clip_grad_norm_'s ``optimizer=`` here, a setting too; ``listed``: ``everything`` is
    ``_all_tensors(shards)`` itself, not a caller's list said to be, so that :func:`_counted_tensors` may return
    it). Clipping and the finiteness test use the float64 value: the norm of fp32 gradients may exceed
    float32's range (3.4e38) while every element is finite.

    ``refused``: this rank found bad input before the call (see :func:`_refuse_together`): nothing is measured,
    the payload the other ranks send is sent with a NaN fingerprint, and every rank raises ``RuntimeError``
    (:data:`dist_clip._slots.REFUSED`) on the CPU; elsewhere their norms are NaN (no host sync). A ``ValueError``
    or ``TypeError`` found while measuring (an integer gradient on this rank only), or any other error of this
    rank's measuring (a meta gradient's ``NotImplementedError``), joins the same way, then
    is raised here: a rank that raised before the collective, caught it and called again paired its next call with
    the others' current one (a total of two steps, and every later call misaligned, silently)."""
    group = _reduce.reduction_group(s.group for s in shards)
    if everything is None:
        everything, listed = _all_tensors(shards), True
    home = _reduce.home_device(everything, group)
    # Four more values in the all-reduce: a fingerprint of the settings every rank must share (norm_type 2 on one
    # rank and 1 or inf on another gave each rank its own wrong total, unnoticed): RuntimeError on every rank on
    # the CPU, NaN elsewhere. None where nothing is combined (one process, DDP): no string to build, and bad input
    # raises here alone.
    check = group is not None and _reduce.group_size(group) > 1
    error: Exception | None = None
    scale, out = 1.0, torch.float32
    if not refused:
        try:
            scale = common_loss_scale(shards)
            if not everything and group is None:
                warn_at_caller("dist_clip: the target holds no gradients; the total norm is 0")
            everything_groups = groups
            counted, whole = _counted_tensors(shards, group, everything if listed else None)
            if not (whole and len(counted) == len(everything)):  # then counted is everything, each piece once
                groups = None
            partial = local_total_partial(counted, p, foreach, home, groups)
            out = _result_dtype(everything, everything_groups)
        except Exception as e:  # noqa: BLE001 - any error of this rank's alone joins, then is raised below
            # (not only bad input: a meta gradient's NotImplementedError on one rank, caught by
            # a loop that skips the batch, left the others in the collective and paired this rank's next call
            # with their current one: 5.683058 on both ranks for 5.399326 and 6.132488, silently)
            if not check:
                raise
            error, refused, scale = e, True, 1.0
    if refused:
        partial = torch.zeros((), dtype=torch.float64, device=home)
    if not check:  # nothing to combine: the partial is the total's (no buffer to build, no element to pick)
        if agreement is not None:
            agreement.agree(None, alone=True)  # (nothing agreed is decided: this rank's read of it is not made)
        return _finished(_norm.finalize(partial, p), p, scale, out, error_if_nonfinite and not refused)
    # One more value in every call: this rank's read of the agreed skip flags (see _fused.Agreement), 0 where the
    # call reads none, so that every rank's buffer has the same layout.
    agreed = (_reduce.moved(agreement.local, home).reshape(1) if agreement is not None and not refused
              else torch.zeros(1, dtype=torch.float64, device=home))
    partial = torch.cat([partial.reshape(1), agreed])
    agree = _reduce.reduces_on_host(group, home)
    if agree:  # one more value in the same all-reduce: whether any rank holds float64 gradients
        partial = torch.cat([partial, wide_flag(out, home)])
    from . import _slots

    settings = ""
    if refused:  # NaN: every rank's check fails, and says another rank refused (NaN-safe under MAX)
        values = torch.full((4,), math.nan, dtype=torch.float64)
    else:
        settings = f"norm_type={p!r}, error_if_nonfinite={bool(error_if_nonfinite)}"
        if limit is not None:
            settings += f", max_norm={_limit_setting(limit)}"
        if skips:
            # A fused optimizer= on some ranks only (or a fused one beside a plain one): on a non-finite total
            # those ranks skipped the step and the others stepped their NaN-scaled gradients, unnoticed.
            settings += ", on_nonfinite=skip (a fused optimizer=)"
        values = _slots._settings_values(settings, p, _reduce.group_size(group))
    partial = torch.cat([partial, values.to(home, non_blocking=True)])
    combined = _slots.joined_all_reduce(partial, p, group, error)
    try:
        combined = _slots._layout_check(combined, p, _reduce.group_size(group), 1, settings, named=False)
    except RuntimeError:
        if not refused:
            raise
    if error is not None:
        raise error  # this rank's own reason; the others raised REFUSED (or hold NaN norms on accelerators)
    if agreement is not None:
        agreement.agree(combined[1], group=group)
    if agree:
        out = agreed_dtype(combined[2])
    return _finished(_norm.finalize(combined[0], p), p, scale, out, error_if_nonfinite and not refused)


def _finished(
    total: Tensor, p: float, scale: float, out: torch.dtype, error_if_nonfinite: bool
) -> tuple[Tensor, torch.dtype]:
    """The end of :func:`_wide_total`: the combined total unscaled by the loss scale, tested where asked."""
    if scale != 1.0 and p != 0:  # every p-norm is homogeneous of degree 1; the L0 count is scale-free
        total = total / scale
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {p} for gradients is non-finite ({total.item()}), so it cannot be clipped. "
            "Every rank of the group raises this error together. To disable it and scale the gradients by the "
            "non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    return total, out


def _limit_setting(limit: float | Tensor) -> str:
    """``max_norm`` as the settings fingerprint compares it: the value of a number or a CPU tensor (reading it is
    free: ``torch.tensor(1.0)`` on one rank and ``1.0`` on another are the same limit, which read as a
    disagreement before); ``tensor`` for a device tensor, which is not read (a host sync): compared as given."""
    if isinstance(limit, Tensor) and limit.device.type != "cpu":
        return "tensor"
    return repr(float(limit))


@contextlib.contextmanager
def _partial_grads_set_aside(target: object) -> Iterator[object]:
    """The ``Partial`` DTensor gradients of a module's (or a list's) parameters set to ``None`` for the while: the
    refusal of such a gradient then plans the call as a rank holding none of it does, with a stand-in laid out as
    its parameter (``absent_dtensor_grads``). A rank holding no gradient of that parameter (a DTensor layer
    unused there) entered the call's collective alone, and the next call of the refusing rank met it (2 ranks, a
    ``Shard(0)`` parameter: rank 0 returned 4.899, rank 1's next call paired with it, rank 0's next hung).

    Yields the target to plan: ``target`` itself, or, where a list, tuple or mapping holds ``Partial`` gradients
    themselves (no parameter: ``[p.grad for p in ... if p.grad is not None]``), a copy without them, as a rank
    holding none of them lists them (a lone one: nothing). Planned with them, such a list did not resolve, and the
    refusing rank joined nothing: the others' collective met its next call.

    A ``None`` listed (or mapped), a gradient this rank does not hold (``[p.grad for p in model.parameters()]``
    beside a layer unused here), is planned as a parameter without gradient in its place (its position's name
    kept): refused alone, the others' collective met this rank's next call (gloo aborted a process)."""
    from .adapters.params import is_parameter

    def partial(t: object) -> bool:
        return isinstance(t, Tensor) and any(pl.is_partial() for pl in getattr(t, "placements", ()))

    def gradient(t: object) -> bool:  # a Partial gradient given as such, not a parameter's
        return partial(t) and not is_parameter(t)  # type: ignore[arg-type]

    def held(t: object) -> object:  # (None: a parameter without gradient, holding nothing, in its place)
        return nn.Parameter(torch.empty(0), requires_grad=False) if t is None else t

    planned = target
    if isinstance(target, nn.Module):
        items = list(target.parameters())
    elif isinstance(target, Mapping):
        items = list(target.values())
        if any(gradient(t) or t is None for t in items):
            planned = {k: held(v) for k, v in target.items() if not gradient(v)}
    elif isinstance(target, Tensor):
        items = [target]
        if gradient(target):
            planned, items = [], []
    elif isinstance(target, (list, tuple)):
        items = list(target)
        if any(gradient(t) or t is None for t in items):
            planned = items = [held(t) for t in items if not gradient(t)]
    else:
        items = []
    aside = [(q, q.grad) for q in items if isinstance(q, Tensor) and partial(q.grad)]
    try:
        for q, _ in aside:
            q.grad = None
        yield planned
    finally:
        for q, g in aside:
            q.grad = g


def _refuse_together(
    target: object, norm_type: object, group: object, shards: Sequence[Shards] | None = None
) -> None:
    """Bad input this rank found before the collective of :func:`clip_grad_norm_` or :func:`get_total_norm` (a
    ``max_norm``, an ``optimizer=``, ``foreach=``...), which the other ranks may not share: join their one
    collective with the payload they send and a NaN fingerprint, so that they raise ``RuntimeError`` now instead
    of pairing this rank's next call with their current one (silently). The caller then raises its own error.

    Not joined where the layout cannot be known here: an invalid ``norm_type`` (the combine op is unknown), a
    ``group=`` or target that does not resolve (the group is unknown), or nothing combined (one process, no
    group, one rank): those raise on this rank alone, as before."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        p = _norm.parse_norm_type(norm_type)
        if shards is None:
            with _partial_grads_set_aside(target) as planned:
                shards = resolve(planned, _check_group(group))
        red = _reduce.reduction_group(s.group for s in shards)
    except Exception:  # noqa: BLE001 - the layout is unknown: raise the caller's error alone
        return
    if red is None or _reduce.group_size(red) <= 1:
        return
    try:
        _wide_total(shards, p, False, None, None, None, refused=True)
    except RuntimeError:
        pass  # (a peer gone): the caller raises its own error anyway


def settle_hand_over(target: object, tensors: Sequence[Tensor] | Callable[[], Sequence[Tensor]]) -> None:
    """Before a dist_clip call reads ``tensors`` (the pieces of ``target``; a function giving them, called only if
    a hand-over is pending): apply the coefficient an earlier ``optimizer=`` call left for the next ``step()``
    of the same gradients (a DeepSpeed engine's, or a fused torch optimizer's), so the call sees them clipped,
    as after a clip that scaled them in place."""
    from .adapters import deepspeed as ds_adapter

    if ds_adapter.matches(target):
        ds_adapter.settle(target)
    if _fused._WAITING:
        _fused.settle(tensors() if callable(tensors) else tensors)


def _deepspeed_applied(target: object, coef: Tensor) -> Tensor:
    """``coef`` as scaled into ``target``'s gradients (see :func:`dist_clip.adapters.deepspeed.applied_coefficient`:
    NaN as 1 on an engine)."""
    if "deepspeed" not in sys.modules:
        return coef
    from .adapters import deepspeed as ds_adapter

    return ds_adapter.applied_coefficient(target, coef)


def _inner_optimizer(optimizer: object) -> object:
    """A torch ``ZeroRedundancyOptimizer``'s or fairscale ``OSS``'s inner optimizer, which steps this rank's
    parameters and holds the state, as ``on_nonfinite="skip"`` arms it: the wrapper takes no ``grad_scale``, so a
    non-finite total scaled its gradients by NaN and every rank stepped, the NaN broadcast for good."""
    if optimizer is None:
        return None
    from .clipper import _stepping_optimizers

    inner = _stepping_optimizers(optimizer)
    return inner[0] if inner is not None and len(inner) == 1 else optimizer


def _deepspeed_fold(target: object, optimizer: object) -> tuple[Any, object]:
    """``(fold, optimizer)``: the hand-over of the coefficient into a DeepSpeed ZeRO engine's ``step()`` (see
    :func:`dist_clip.adapters.deepspeed.fold_handle`) or None, and what is left of ``optimizer`` for the fused
    torch hand-over. None (the gradients are scaled in the call) where nothing folds and the engine or its own
    wrapper was named, or the engine steps its torch optimizer more than once per step (ZeRO 1-3, once per param
    group or sub-group: a coefficient handed to the first call would miss the others)."""
    from .adapters import deepspeed as ds_adapter

    if optimizer is None or not ds_adapter.matches(target):
        return None, optimizer
    fold = ds_adapter.fold_handle(target, optimizer)
    if fold is not None:
        return fold, None
    own = getattr(target, "optimizer", None)
    if not (optimizer is target or optimizer is own or isinstance(optimizer, torch.optim.Optimizer)):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer, the DeepSpeed engine or its engine.optimizer, got "
            f"{type(optimizer).__name__}"
        )
    if (
        optimizer is target
        or (optimizer is own and not isinstance(own, torch.optim.Optimizer))
        or ds_adapter.steps_per_group(target)
        # The torch optimizer inside a DeepSpeed mixed-precision wrapper (stage 0 bf16/fp16, BF16_Optimizer): the
        # wrapper tests the gradients itself and skips a non-finite step without stepping it, so at stage 0 a skip
        # armed on it waited for the next good step and skipped that one, silently (its gradients are the
        # wrapper's fp32 copies, filled in step(): never handed over, nor could the next clip tell the flag stale).
        or (not isinstance(own, torch.optim.Optimizer) and optimizer is getattr(own, "optimizer", None))
    ):
        return None, None
    return None, optimizer


@_eager
@torch.no_grad()
def get_total_norm(
    tensors: object,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Norm of all gradients of ``tensors`` as if unsharded, combined across ranks with one collective.

    Must be called on all ranks of the group (every rank of the wrapper's process group, or of ``group``),
    including ranks that hold no gradients: they contribute a neutral partial.

    Args:
        tensors: the target (named as in ``torch.nn.utils.get_total_norm``): a tensor, an iterable of
            parameters or gradient tensors, an ``nn.Module`` (plain, DDP, FSDP1, FSDP2) or a supported
            framework object. Parameters contribute their ``.grad`` (``None`` is skipped); other tensors are
            taken to be gradients.
        norm_type: order ``p >= 0`` of the norm, or ``inf``/``"inf"``. ``0`` counts non-zero entries (the
            L0 "norm", as ``torch.linalg.vector_norm``; ``torch.nn.utils`` returns something else for 0).
        error_if_nonfinite: raise ``RuntimeError`` on every rank when the total is NaN or infinite.
        foreach: ``None`` uses fused multi-tensor kernels where supported, ``True`` requires them, ``False``
            measures tensor by tensor.
        group: overrides the process group the adapter would choose. For plain tensors it means "each rank
            of ``group`` holds different pieces": their partials are summed over it.

    Returns:
        A 0-dim tensor on the gradients' device, identical on every rank of the group: float64 where some
        gradient is float64, float32 otherwise.
    """
    shards = None
    try:
        p = _norm.parse_norm_type(norm_type)
        _check_foreach(foreach)
        shards = resolve(tensors, _check_group(group))
        everything = _all_tensors(shards)
        settle_hand_over(tensors, everything)
    except (ValueError, TypeError):
        _refuse_together(tensors, norm_type, group, shards)  # every rank raises, none waits or misaligns
        raise
    # (this rank's read of the agreed skip flags travels in the all-reduce, which decides them: _fused.Agreement)
    wide, out = _wide_total(shards, p, error_if_nonfinite, foreach, everything, None, agreement=_fused.Agreement(),
                            listed=True)
    return wide.to(out)


@_eager
@torch.no_grad()
def clip_grads_with_norm_(
    parameters: object, max_norm: float | Tensor, total_norm: Tensor | float, foreach: bool | None = None
) -> None:
    """Scale this rank's gradient pieces of ``parameters`` (any target) in place by
    ``min(1, max_norm / (total_norm + 1e-6))``.

    Purely local: ``total_norm`` should come from :func:`get_total_norm`, which must be called on all ranks
    of the group. Each piece is scaled in its own dtype; no host sync on CUDA.
    """
    limit = _check_max_norm(max_norm)
    _check_foreach(foreach)
    total_norm = _norm.numpy_scalar(_undistributed(total_norm))  # type: ignore[assignment]
    real_tensor = isinstance(total_norm, Tensor) and not (total_norm.is_complex() or total_norm.dtype == torch.bool)
    if isinstance(total_norm, bool) or not (isinstance(total_norm, numbers.Real) or real_tensor):
        raise TypeError(
            f"total_norm must be a real number or a one-value real tensor (get_total_norm's result), got "
            f"{type(total_norm).__name__} {total_norm!r}"
        )
    if not isinstance(total_norm, Tensor):
        total_norm = _norm.as_float("total_norm", total_norm)
    else:
        if total_norm.numel() != 1:
            raise ValueError(f"total_norm must be a single value, got a tensor of shape {tuple(total_norm.shape)}")
        total_norm = total_norm.reshape(())  # a (1,)-shaped value, as the fused multiply takes only 0-dim ones
    # A negative total would flip the gradients' signs (coefficient max_norm / -5): not a norm. Checked where
    # reading it is free (a number, a CPU tensor); NaN passes, as get_total_norm returns it for NaN gradients.
    if not isinstance(total_norm, Tensor) or total_norm.device.type == "cpu":
        if float(total_norm) < 0:
            raise ValueError(f"total_norm must be a norm (>= 0, or NaN), got {float(total_norm)}")
    tensors = _all_tensors(resolve(parameters, None))
    refuse_stepped_in_backward(parameters)
    # Before anything is scaled: an integer, bool or float8 gradient raised torch's error from the scaling, after
    # the float gradients grouped before it were scaled (half-clipped gradients for a caller that caught it).
    _norm.check_dtypes(tensors)
    settle_hand_over(parameters, tensors)  # (no collective: it decides no agreed skip flag, see _fused.Agreement)
    if not tensors:
        return
    if not isinstance(total_norm, Tensor):
        total_norm = torch.full((), float(total_norm), dtype=torch.float64, device=tensors[0].device)  # exact, a fill
    coef = _scale.clip_coefficient(limit, total_norm)
    # A coefficient float32 holds only as a subnormal (a norm near float32's top, a tiny max_norm): a float64
    # product, as clip_grad_norm_ applies it (get_total_norm then this call zeroed gradients that
    # clip_grad_norm_ scaled to 8e-21). On the CPU only, where the test reads nothing from a device.
    wide = _scale.clip_coefficient(limit, total_norm.double()) if total_norm.device.type == "cpu" else None
    if wide is not None and _scale.needs_wide(wide):
        _scale.mul_wide_(tensors, float(wide))
    else:
        _scale.scale_(tensors, _deepspeed_applied(parameters, coef), foreach)


@_eager
@torch.no_grad()
def clip_grad_norm_(
    parameters: object,
    max_norm: float | Tensor,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    optimizer: object | None = None,
) -> Tensor:
    """Clip the gradient norm of ``parameters`` (any target, see :func:`get_total_norm`) exactly as if it were
    unsharded: one collective, in place.

    Must be called on all ranks of the group, after ``backward()`` and before ``optimizer.step()``. The
    arguments are those of :func:`get_total_norm` plus ``max_norm``; gradients are multiplied in place by
    ``min(1, max_norm / (total + 1e-6))``.

    ``optimizer``: the optimizer whose next ``step()`` consumes these gradients. When it is one of torch's
    fused optimizers (``fused=True``: Adam, AdamW, SGD, Adagrad) the gradients are not scaled here: the
    coefficient reaches its ``step()`` as ``grad_scale`` and a non-finite total as ``found_inf`` (the next
    step is then skipped), so clipping costs one read pass and no host sync. An optimizer that does not step
    exactly the clipped gradients (more, or fewer) gets nothing: they are scaled here (where it steps them and
    others beside them among several ranks and the call combines over no other rank, DDP's beside a parameter of
    one rank's own, at its step, as on the ranks handing over). On a DeepSpeed ZeRO 1-3 engine, ``optimizer`` may be
    the engine,
    ``engine.optimizer`` or the torch optimizer given to ``deepspeed.initialize``: the next ``engine.step()``
    multiplies each gradient partition by the coefficient while it copies it into its flat buffer (or in its
    loss-scale division), so clipping costs the norm's read pass only. Any other optimizer: the gradients are
    scaled here, as without the argument.

    Returns:
        The total norm before clipping: a 0-dim tensor (float64 where some gradient is float64, float32
        otherwise), identical on every rank of the group.
    """
    shards = None
    try:  # bad input found before the collective: every rank raises (see _refuse_together)
        limit = _check_max_norm(max_norm)
        p = _norm.parse_norm_type(norm_type)
        _check_foreach(foreach)
        shards = resolve(parameters, _check_group(group))
        refuse_stepped_in_backward(parameters)
        fold, optimizer = _deepspeed_fold(parameters, optimizer)
        optimizer = _inner_optimizer(optimizer)
        fused = optimizer is not None and _fused.supports_grad_scale(optimizer)  # type: ignore[arg-type]
        # A fused optimizer skips a non-finite total whether or not the coefficient is handed over: the reasons
        # to scale here instead (below) are per rank (FSDP1's padding lies on the last ranks only), and a rank
        # scaling by a NaN coefficient stepped NaN where the ranks handing over skipped.
        skips = fused
        # Inside step(closure), or a user's step pre-hook after dist_clip's, the step is under way: a hand-over
        # would reach no step, so scale in place, and a non-finite total skips the step under way (it was taken).
        running = fused and _fused.in_step(optimizer)
        fused = fused and not running
        everything = _all_tensors(shards)
        # Handed over only to an optimizer that steps exactly these gradients; otherwise scaled here, as
        # documented for any other optimizer (its grad_scale would also divide gradients nobody measured, or miss
        # some).
        stepped = _fused.gradients(optimizer) if fused else None  # type: ignore[arg-type]
        exact = fused and _fused.steps_what_was_measured(stepped, everything)  # type: ignore[arg-type]
        fused = fused and not _fused.overlapping(everything)  # scaled in place: shared elements twice, as torch
        fused = fused and _fused.dense(everything)  # gaps or repeats: scaled in place (the kernels write them back)
        # Inference tensors have no version counter: a write to one inside inference_mode between clip and step
        # went unseen, and the measured gradient's coefficient scaled the new one. Scaled here (torch's in-place
        # refusal, as without optimizer=).
        fused = fused and not any(map(Tensor.is_inference, everything))
        groups = _scale.group_by_device_dtype(everything)  # bucketed once, for measuring and for scaling
        if fused and any(dtype in _WIDE for _, dtype in groups):
            fused = False  # torch's fused kernels take grad_scale in float32 only: float64 ones are scaled here
        # An optimizer stepping these gradients and others beside them (a parameter of this rank's own beside
        # DDP's) among several ranks: scaled here, its flag kept as a hand-over's (see _fused.hand_over_applied_)
        beside = fused and not exact and _fused.steps_beside(stepped, everything)  # type: ignore[arg-type]
        fused = fused and exact
        settle_hand_over(parameters, everything)
        # (this rank's read of the agreed skip flags of the optimizer it arms travels in the all-reduce, which
        # decides them; its own flag joins the ledger under agreement.armed(): see _fused.Agreement). It arms one
        # exactly where it skips (a fused optimizer=), the same on every rank (the fingerprint checks it); one
        # arming none reads and decides every optimizer's: read by an unfused optimizer= alone, another
        # optimizer's dropped NaN flag armed over the world outlasted the next batch clipped whole over the world,
        # and its good step was skipped on every rank.
        agreement = _fused.Agreement(optimizer if skips else None)
    except (ValueError, TypeError):
        _refuse_together(parameters, norm_type, group, shards)
        raise
    wide, out = _wide_total(shards, p, error_if_nonfinite, foreach, everything, groups, limit, agreement=agreement,
                            skips=skips, listed=True)
    total = wide.to(out)
    coef_wide = _scale.clip_coefficient(limit, wide)  # from the float64 total, which float32 may not hold
    coef = coef_wide.to(out)
    # A finite total beyond float32's range whose coef float32 holds only as a subnormal (digits lost, or 0):
    # applied here as a float64 product rounded once (on the CPU, where reading it is free; never handed over:
    # the grad_scale 1 / coef would be imprecise or inf).
    wide_product = _scale.needs_wide(coef_wide)
    handed = fold is None and fused and not wide_product
    deferred = None
    if fold is not None and not wide_product:
        fold(coef, everything)
    elif handed:
        with agreement.armed():
            _fused.hand_over_(optimizer, coef, wide, stepped)
    elif wide_product:
        _scale.mul_wide_(everything, float(coef_wide))
    elif beside and fold is None:
        # Divided by the float32 reciprocal, as the fused kernels apply a hand-over: the other ranks' optimizers,
        # stepping exactly these gradients, were handed it (or settle it, dividing alike), and a product parted
        # DDP's float32 replicas by rounding (1.5e-8 after one AdamW step, 4.5e-8 after 100). Where the call
        # combined over no other rank (DDP's replicas, which the others hand over), left to the step, or to a call
        # reading them first, as there, while no other coefficient waits for the step (see _fused.defers_beside):
        # scaled here, gradients every one replaced out of place then carried the clip into this rank's step alone,
        # the others' read as the next batch's and stepped unclipped.
        applied = _deepspeed_applied(parameters, coef)
        reciprocal = torch.reciprocal(applied.to(torch.float32))
        late = not agreement.shared and applied is coef
        if late and _fused.defers_beside(optimizer, everything):  # type: ignore[arg-type]
            deferred = (reciprocal, coef)
        else:
            _scale.scale_(everything, reciprocal, foreach, groups, divide=True)
    else:
        _scale.scale_(everything, _deepspeed_applied(parameters, coef), foreach, groups)
    if running or (skips and not handed):
        with agreement.armed():
            # Armed for a finite total too: its False replaces a stale flag of gradients since replaced (a
            # dropped batch's NaN skipped the next good step where the ranks handing over stepped it).
            if beside and fold is None and not wide_product:
                _fused.hand_over_applied_(optimizer, wide, everything,  # type: ignore[arg-type]
                                          stepped, deferred)
            else:
                _fused.arm_skip_(optimizer, torch.logical_not(torch.isfinite(wide)),  # type: ignore[arg-type]
                                 measured=everything)
    if skips and fold is None and "deepspeed" in sys.modules:
        # A stage-0 engine stepping this fused optimizer itself: a skipped step is counted as DeepSpeed counts an
        # overflow (it was counted as taken, and the LR scheduler stepped on it)
        from .adapters import deepspeed as ds_adapter

        ds_adapter.count_fused_skip(parameters, optimizer,
                                    torch.logical_not(torch.isfinite(wide)) if running else None)
    return total
