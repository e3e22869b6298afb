"""Single-process norm math: validation, per-tensor partials, finalisation. No communication here.

A *partial* is what one rank contributes for one slot before the collective:

* finite ``p > 0``: the sum of ``|g|**p`` (combined across ranks with SUM),
* ``p == 0``: the count of non-zeros, NaN if any element is NaN (SUM),
* ``p == inf``: the max of ``|g|`` (MAX).

Partials are float64 whatever the gradient dtype, so a fp16 gradient whose norm exceeds 65504 and a fp32
gradient whose squares overflow float32 both give finite, correct totals. On the CPU, large tensors are
reduced for p=2 in blocks of ``BLOCK`` elements in float32 and the block results are combined in float64: as
fast as torch's float32 norm and accurate to float32 rounding. Blocks whose float32 result overflowed or may
have underflowed are recomputed in float64, so no input range is lost. Other finite orders accumulate in
float64 directly (exact, slower: the performance work replaces this path).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "BLOCK",
    "combine_op",
    "finalize",
    "local_partials",
    "neutral_partial",
    "parse_norm_type",
]

#: Elements per block of the CPU blocked L2 reduction. float32 sums of squares of 64 terms stay within
#: 2.5e-7 even for constant inputs, where rounding errors do not cancel (4096 gave 2e-6), at the same speed.
BLOCK = 64
# Tensors up to this size are measured in float64 directly, in one fused multi-tensor call: the upcast costs
# little at this size and needs no rescue.
_SMALL = 4096
# A float32 block result below this (as a p-th power sum) may have lost underflowed terms: recompute.
_UNDERFLOW = 1e-20

ReduceOp = Literal["sum", "max"]


def parse_norm_type(norm_type: object) -> float:
    """Validate ``norm_type`` the way users write it and return it as a float.

    Accepts any real number ``p >= 0``, ``math.inf`` and the string ``"inf"`` (as torch does).

    Raises:
        ValueError: for negative, NaN or ``-inf`` orders, booleans and anything not a number.
    """
    if isinstance(norm_type, bool):
        raise ValueError(f"norm_type must be a number >= 0 or 'inf', got the bool {norm_type!r}")
    if isinstance(norm_type, str):
        try:
            p = float(norm_type.strip())
        except ValueError:
            raise ValueError(f"norm_type must be a number >= 0 or 'inf', got the string {norm_type!r}") from None
    elif isinstance(norm_type, numbers.Real):
        p = float(norm_type)
    elif isinstance(norm_type, Tensor) and norm_type.numel() == 1 and not norm_type.is_complex():
        p = float(norm_type.item())
    else:
        raise ValueError(
            f"norm_type must be a number >= 0 or 'inf', got {type(norm_type).__name__} {norm_type!r}"
        )
    if math.isnan(p) or p < 0:
        raise ValueError(f"norm_type must be >= 0 or 'inf', got {p} (negative orders and NaN are not norms)")
    return p


def combine_op(p: float) -> ReduceOp:
    """The reduction that combines partials of order ``p`` across ranks."""
    return "max" if math.isinf(p) else "sum"


def neutral_partial(p: float) -> float:
    """What a rank with nothing to measure contributes: 0 is neutral for both SUM and MAX of |g|."""
    return 0.0


def finalize(combined: Tensor, p: float) -> Tensor:
    """Turn combined partials (float64) into norms (float64): the p-th root for finite ``p > 0``."""
    if p == 0 or math.isinf(p):
        return combined
    if p == 1:
        return combined
    if p == 2:
        return combined.sqrt()
    return combined.pow(1.0 / p)


def _as_float64_stack(values: Sequence[Tensor], device: torch.device) -> Tensor:
    if not values:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.stack([v.to(torch.float64) for v in values])


def _acc_dtype(t: Tensor) -> torch.dtype:
    """The dtype a float32-or-better accumulation of ``t`` runs in."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _sum_pow_exact(t: Tensor, p: float) -> Tensor:
    """sum(|t|**p) in float64: the slow path that never loses range; used for rescues and non-CPU devices."""
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=t.device)
    if p == 1:
        return torch.linalg.vector_norm(t, 1, dtype=torch.float64)
    if p == 2:
        return torch.linalg.vector_norm(t, 2, dtype=torch.float64).square()
    return torch.linalg.vector_norm(t, p, dtype=torch.float64).pow(p)


def _rescue_(partials: Tensor, piece: Callable[[int], Tensor], p: float) -> Tensor:
    """Recompute in float64 the partials whose float32 evaluation overflowed or may have underflowed.

    CPU only (reading the flags is free there). An overflowed entry is ``inf`` while its elements may all be
    finite; an underflowed entry is tiny or zero while its elements may not all be zero. NaN entries are
    already right (NaN) and are left alone.
    """
    suspicious = torch.isinf(partials) | (partials < _UNDERFLOW)
    if not bool(suspicious.any()):
        return partials
    for i in suspicious.nonzero().flatten().tolist():
        t = piece(i)
        if t.numel() == 0:
            continue
        lo, hi = torch.aminmax(t.reshape(-1))
        if bool(lo == 0) and bool(hi == 0):
            continue  # all zeros: exactly 0, nothing was lost
        partials[i] = _sum_pow_exact(t, p)
    return partials


def _blocked_sum_pow_cpu(t: Tensor, p: float) -> Tensor:
    """sum(|t|**p) of one large CPU tensor: float32 norms of BLOCK-element rows, combined in float64."""
    flat = t.reshape(-1)
    n = flat.numel()
    rows = n // BLOCK
    body = flat[: rows * BLOCK].view(rows, BLOCK)
    row_norms = torch.linalg.vector_norm(body, p, dim=1, dtype=_acc_dtype(t)).to(torch.float64)
    row_parts = row_norms if p == 1 else row_norms.square() if p == 2 else row_norms.pow(p)
    row_parts = _rescue_(row_parts, body.__getitem__, p)
    total = row_parts.sum()
    if rows * BLOCK < n:
        tail = flat[rows * BLOCK :]
        tail_part = torch.linalg.vector_norm(tail, p, dtype=torch.float64)
        total = total + (tail_part if p == 1 else tail_part.pow(p))
    return total


def _sum_pow_partials(tensors: Sequence[Tensor], p: float, device: torch.device, use_foreach: bool) -> Tensor:
    if device.type != "cpu":
        # Accelerators reduce with tree-shaped sums at memory bandwidth: float64 accumulation costs nothing
        # extra there and needs no host-side rescue (which would be a device sync).
        if use_foreach:
            norms = torch._foreach_norm(list(tensors), p, dtype=torch.float64)
        else:
            norms = [torch.linalg.vector_norm(t, p, dtype=torch.float64) for t in tensors]
        stacked = _as_float64_stack(norms, device)
        return stacked if p == 1 else stacked.pow(p)
    out = torch.empty(len(tensors), dtype=torch.float64, device=device)
    small = [i for i, t in enumerate(tensors) if t.numel() <= _SMALL]
    if small:
        group = [tensors[i] for i in small]
        if use_foreach:
            norms = torch._foreach_norm(group, p, dtype=torch.float64)
        else:
            norms = [torch.linalg.vector_norm(t, p, dtype=torch.float64) for t in group]
        parts = _as_float64_stack(norms, device)
        out[torch.tensor(small)] = parts if p == 1 else parts.pow(p)
    for i, t in enumerate(tensors):
        if t.numel() > _SMALL:
            out[i] = _blocked_sum_pow_cpu(t, p) if p == 2 else _sum_pow_exact(t, p)
    return out


def _max_abs_partials(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    # aminmax is a single fast pass (about 10x torch's vector_norm(inf) on the CPU) and propagates NaN.
    parts = []
    for t in tensors:
        if t.numel() == 0:
            parts.append(torch.zeros((), dtype=torch.float64, device=device))
            continue
        lo, hi = torch.aminmax(t.reshape(-1))
        parts.append(torch.maximum(lo.abs(), hi.abs()))
    return _as_float64_stack(parts, device)


def _count_partials(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    # The L0 "norm": count of non-zeros, exact in float64 up to 2**53. NaN counts would hide a NaN
    # gradient, so a NaN anywhere makes the partial NaN (the documented "NaN gives NaN for every p").
    parts = []
    for t in tensors:
        count = torch.count_nonzero(t).to(torch.float64)
        if t.is_floating_point() or t.is_complex():
            count = torch.where(torch.isnan(t).any(), torch.full_like(count, math.nan), count)
        parts.append(count)
    return _as_float64_stack(parts, device)


def local_partials(tensors: Sequence[Tensor], p: float, use_foreach: bool = True) -> Tensor:
    """Per-tensor partials of order ``p``, float64, on the tensors' (common) device.

    Args:
        tensors: gradient pieces on one device, any floating dtype. Empty tensors contribute the neutral 0.
        p: a validated norm order (see :func:`parse_norm_type`).
        use_foreach: allow fused multi-tensor kernels.

    Returns:
        A float64 vector with one partial per tensor, in input order.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    device = tensors[0].device
    if p == 0:
        return _count_partials(tensors, device)
    if math.isinf(p):
        return _max_abs_partials(tensors, device)
    return _sum_pow_partials(tensors, p, device, use_foreach)
