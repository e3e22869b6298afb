"""Single-process norm math: validation, per-tensor partials, finalisation. No communication here.

A *partial* is what one rank contributes for one slot before the collective:

* finite ``p > 0``: the sum of ``|g|**p`` (combined across ranks with SUM),
* ``p == 0``: the count of non-zeros, NaN if any element is NaN (SUM),
* ``p == inf``: the max of ``|g|`` (MAX).

Partials are float64 whatever the gradient dtype, so a fp16 gradient whose norm exceeds 65504 and a fp32
gradient whose squares overflow float32 both give finite, correct totals.

On the CPU, contiguous float32/bfloat16/float16 gradients go through the native kernel (``_native.c``): one
read pass over every tensor of a call, at the read bandwidth of ``torch.sum``: powers 1-3 summed 8 terms a lane in
float32 (16 for halves) then in float64 (at most 4.8e-7 relative for fp32), other orders widened to float64
element by element. Everything else, and every CPU when the kernel cannot be built, takes the
plain-torch path below, exact too: p=2 in float32 rows of ``BLOCK`` elements combined in float64 with a
vectorised float64 recomputation of the rows that overflowed or may have underflowed, other orders in float64
chunk by chunk (slower: see the README's Benchmarks). Accelerators use fused multi-tensor float64 norms.
"""

from __future__ import annotations

import ctypes
import math
import numbers
import operator
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from . import _native

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
# Elements per chunk of the plain-torch float64 path: the float64 copy (512 KiB) stays in L2.
_CHUNK = 1 << 16
# A float32 block result below this (as a p-th power sum) may have lost underflowed terms: recompute.
_UNDERFLOW = 1e-20

ReduceOp = Literal["sum", "max"]


def numpy_scalar(value: object) -> object:
    """A 0-dim numpy array (``np.array(2.0)``, which torch's arithmetic takes as a number) as its Python value;
    anything else as it is."""
    if type(value).__name__ == "ndarray" and type(value).__module__ == "numpy" and value.ndim == 0:  # type: ignore[attr-defined]
        return value.item()  # type: ignore[attr-defined]
    return value


def tensor_bytes(t: Tensor) -> bytes:
    """The bytes of ``t``'s elements in order, with torch alone (numpy is not a dependency; ``t.numpy()`` raises
    "Numpy is not available" without it): a copy of the memory of a contiguous CPU copy."""
    t = t.detach().cpu().resolve_conj().resolve_neg().contiguous()
    n = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), n) if n else b""


def int_digits(value: numbers.Integral) -> int:
    """How many decimal digits an integer has, without ``str()``, which refuses one of over 4300 digits (a
    ValueError of its own, "Exceeds the limit ... for integer string conversion", in place of the caller's)."""
    n = abs(int(value))
    if n < 10:
        return 1
    digits = math.floor(math.log10(n)) + 1  # (a float estimate: corrected by exact powers below)
    if 10 ** (digits - 1) > n:
        digits -= 1
    elif 10**digits <= n:
        digits += 1
    return digits


def as_float(name: str, value: numbers.Real) -> float:
    """``float(value)``, with an integer beyond float's range (``10**400``) a ``ValueError`` naming ``name``
    instead of Python's ``OverflowError``."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must fit a float64, got an integer of {int_digits(value)} digits") from None


def parse_norm_type(norm_type: object) -> float:
    """Validate ``norm_type`` the way users write it and return it as a float.

    Accepts any real number ``p >= 0``, ``math.inf`` and the string ``"inf"`` (as torch does).

    Raises:
        ValueError: for negative, NaN or ``-inf`` orders, booleans and anything not a number.
    """
    norm_type = numpy_scalar(norm_type)
    if isinstance(norm_type, bool):
        raise ValueError(f"norm_type must be a number >= 0 or 'inf', got the bool {norm_type!r}")
    if isinstance(norm_type, str):
        try:
            p = float(norm_type.strip())
        except ValueError:
            raise ValueError(f"norm_type must be a number >= 0 or 'inf', got the string {norm_type!r}") from None
    elif isinstance(norm_type, numbers.Real):
        p = as_float("norm_type", norm_type)
    elif (isinstance(norm_type, Tensor) and norm_type.numel() == 1 and not norm_type.is_complex()
          and norm_type.dtype != torch.bool):  # tensor(True) is no order, as True is not
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
    first = values[0].dtype
    if all(v.dtype is first for v in values):  # one stack, one cast (a .to per value: 1000 launches on a GPU)
        stacked = torch.stack(list(values))
        return stacked if first is torch.float64 else stacked.to(torch.float64)
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


def _rescue_rows_(row_parts: Tensor, body: Tensor, p: float) -> Tensor:
    """Recompute in float64 the rows whose float32 evaluation overflowed or may have underflowed.

    CPU only (reading the flag is free there). An overflowed row is ``inf`` while its elements may all be
    finite; an underflowed row is tiny or zero while its elements may not all be zero. All suspicious rows
    are recomputed in one vectorised float64 pass (all-zero rows come back as exactly 0, which costs little);
    NaN rows are NaN either way.
    """
    suspicious = torch.isinf(row_parts) | (row_parts < _UNDERFLOW)
    if not bool(suspicious.any()):
        return row_parts
    # A chunk of rows at a time: every row of an all-zero gradient (an unused embedding's, a layer zeroed with
    # set_to_none=False) is suspicious, and copying them all at once took 3 times the gradient's bytes.
    for idx in suspicious.nonzero().flatten().split(max(1, _CHUNK // max(1, body.shape[1]))):
        rows = body.index_select(0, idx).to(torch.float64).abs_()
        exact = rows.square_().sum(dim=1) if p == 2 else rows.pow_(p).sum(dim=1)
        row_parts.index_put_((idx,), exact)
    return row_parts


def _blocked_sum_pow_cpu(t: Tensor, p: float) -> Tensor:
    """sum(|t|**2) of one large CPU tensor: float32 norms of BLOCK-element rows, combined in float64.

    The rows are made contiguous: torch sums a contiguous row in vector lanes (a few terms each), a strided one
    term after term, where up to BLOCK - 1 small terms can each round away against a large one (1.9e-6)."""
    flat = t.reshape(-1)
    if not flat.is_contiguous():  # a strided view that reshape kept as a view
        flat = flat.contiguous()
    n = flat.numel()
    rows = n // BLOCK
    body = flat[: rows * BLOCK].view(rows, BLOCK)
    row_norms = torch.linalg.vector_norm(body, p, dim=1, dtype=_acc_dtype(t)).to(torch.float64)
    row_parts = row_norms.square() if p == 2 else row_norms.pow(p)
    total = _rescue_rows_(row_parts, body, p).sum()
    if rows * BLOCK < n:
        total = total + _sum_pow_exact(flat[rows * BLOCK :], p)
    return total


def _chunked_sum_pow_exact(t: Tensor, p: float) -> Tensor:
    """sum(|t|**p) in float64, a chunk at a time: the float64 copy of each chunk stays in cache."""
    flat = t.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for chunk in flat.split(_CHUNK):
        total += _sum_pow_exact(chunk, p)
    return total


def _sum_pow_partials(tensors: Sequence[Tensor], p: float, device: torch.device, use_foreach: bool) -> Tensor:
    if device.type != "cpu":
        return _device_sum_pow(tensors, p, device, use_foreach)
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
            blocked = p == 2 and t.dtype == torch.float32
            out[i] = _blocked_sum_pow_cpu(t, p) if blocked else _chunked_sum_pow_exact(t, p)
    return out


# Elements per piece of a large gradient on an accelerator where the norm is not torch's fused multi-tensor
# kernel (orders other than 1 and 2, or foreach off): torch's vector_norm(dtype=float64) converts its whole input
# to float64 first (2 GiB for a 256 Mi-element bf16 gradient at p = 3); pieces keep that copy at 32 MiB.
_DEVICE_PIECE = 1 << 22


def _device_sum_pow(tensors: Sequence[Tensor], p: float, device: torch.device, use_foreach: bool) -> Tensor:
    """sum(|g|**p) per tensor on an accelerator, in float64. Tree-shaped sums at memory bandwidth: float64
    accumulation costs nothing extra there and needs no host-side rescue (which would be a device sync)."""
    tensors = list(tensors)
    counts = None
    if not (use_foreach and p in (1.0, 2.0)) and any(t.numel() > _DEVICE_PIECE for t in tensors):
        pieces: list[Tensor] = []
        counts = []
        for t in tensors:
            parts = t.reshape(-1).split(_DEVICE_PIECE) if t.numel() > _DEVICE_PIECE else (t,)
            pieces.extend(parts)
            counts.append(len(parts))
        tensors = pieces
    if use_foreach:
        norms = torch._foreach_norm(tensors, p, dtype=torch.float64)
    else:
        norms = [torch.linalg.vector_norm(t, p, dtype=torch.float64) for t in tensors]
    stacked = _as_float64_stack(norms, device)
    stacked = stacked if p == 1 else stacked.pow(p)
    if counts is None:
        return stacked
    return torch.stack([part.sum() for part in stacked.split(counts)])  # each tensor's pieces (device ops only)


def _device_peaks(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """max |t| per tensor (0 for an empty one), float64, off the CPU: torch's fused multi-tensor inf-norm, one
    kernel for the whole list (it propagates NaN), where an aminmax per tensor launched one reduction each (100
    gradients: 8x torch's clip on an H200; 1000 small ones: 12x)."""
    full = [t for t in tensors if t.numel()]  # (torch's inf-norm of an empty tensor raises)
    peaks = list(torch._foreach_norm(full, math.inf)) if full else []
    if len(full) != len(tensors):
        it = iter(peaks)
        zero = torch.zeros((), dtype=tensors[0].dtype, device=device)
        peaks = [next(it) if t.numel() else zero for t in tensors]
    return _as_float64_stack(peaks, device)


def _max_abs_partials(tensors: Sequence[Tensor], device: torch.device, use_foreach: bool = False) -> Tensor:
    if use_foreach and device.type != "cpu":
        return _device_peaks(tensors, device)
    # aminmax is a single fast pass (about 10x torch's vector_norm(inf) on the CPU) and propagates NaN.
    parts = []
    for t in tensors:
        if t.numel() == 0:
            parts.append(torch.zeros((), dtype=torch.float64, device=device))
            continue
        lo, hi = torch.aminmax(t.reshape(-1))
        parts.append(torch.maximum(lo.abs(), hi.abs()))
    return _as_float64_stack(parts, device)


def _count_partials(tensors: Sequence[Tensor], device: torch.device, use_foreach: bool = False) -> Tensor:
    # The L0 "norm": count of non-zeros, exact in float64 up to 2**53. NaN counts would hide a NaN
    # gradient, so a NaN anywhere makes the partial NaN (the documented "NaN gives NaN for every p").
    # (NaN found by amax, which propagates it in one pass and allocates nothing: isnan(t).any() made a bool copy
    # of every gradient, half a bf16 gradient's bytes)
    if use_foreach and device.type != "cpu":
        # One count per tensor and one fused NaN scan for all of them (five launches per tensor before: 100
        # gradients took 6x torch's clip on an H200).
        counts = torch.stack([torch.count_nonzero(t) for t in tensors]).to(torch.float64)
        return torch.where(torch.isnan(_device_peaks(tensors, device)), math.nan, counts)
    parts = []
    for t in tensors:
        count = torch.count_nonzero(t).to(torch.float64)
        if t.numel() and (t.is_floating_point() or t.is_complex()):
            count = torch.where(torch.isnan(torch.amax(t.reshape(-1))), torch.full_like(count, math.nan), count)
        parts.append(count)
    return _as_float64_stack(parts, device)


_layout_of = operator.attrgetter("layout")
_dtype_of = operator.attrgetter("dtype")
_STRIDED = frozenset((torch.strided,))
_MEASURED_LAYOUTS = frozenset((torch.strided, torch.sparse_coo))
# The floating dtypes torch can measure and multiply in place (float8 has neither kernel on the CPU).
_REAL = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def _dtype_refused(dtype: torch.dtype) -> TypeError:
    return TypeError(
        f"gradients must be float16, bfloat16, float32, float64 or complex tensors, got one of dtype {dtype}"
    )


def _layout_refused(layout: torch.layout) -> TypeError:
    return TypeError(f"gradients must be strided or sparse COO tensors, got one of layout {layout}")


def check_dtypes(tensors: Sequence[Tensor]) -> None:
    """The TypeError :func:`_real_inputs` raises for integer, bool or float8 gradients, or sparse ones other than
    COO (CSR...), without measuring anything."""
    if _REAL.issuperset(map(_dtype_of, tensors)) and _STRIDED.issuperset(map(_layout_of, tensors)):  # in C
        return
    for t in tensors:
        if t.layout not in _MEASURED_LAYOUTS:
            raise _layout_refused(t.layout)
        if t.dtype not in _REAL and not t.is_complex():
            raise _dtype_refused(t.dtype)


def _real_inputs(tensors: Sequence[Tensor]) -> Sequence[Tensor]:
    """Complex gradients measure by their moduli (``|z|``, as ``vector_norm`` does), sparse ones by their
    coalesced values; integers are refused."""
    if _REAL.issuperset(map(_dtype_of, tensors)) and _STRIDED.issuperset(map(_layout_of, tensors)):  # usual, in C
        return tensors
    out = []
    for t in tensors:
        if t.layout not in _MEASURED_LAYOUTS:
            raise _layout_refused(t.layout)
        if t.is_sparse:  # a sparse COO gradient (nn.Embedding(sparse=True)): its coalesced values, duplicates summed
            # (on CUDA a host sync, the one of the default path: the number of distinct rows sizes the result)
            t = t.coalesce().values()
        if t.is_complex():
            # A real copy of the moduli, in float64: a complex64 modulus beyond float32's range (|3e38+3e38j|)
            # read inf, and subnormal ones lost digits. NaN stays NaN, zero stays zero.
            out.append(t.to(torch.complex128).abs())
        elif t.dtype not in _REAL:
            raise _dtype_refused(t.dtype)
        else:
            out.append(t)
    return out


def _torch_partials(tensors: Sequence[Tensor], p: float, device: torch.device, use_foreach: bool) -> Tensor:
    tensors = _real_inputs(tensors)
    if p == 0:
        return _count_partials(tensors, device, use_foreach)
    if math.isinf(p):
        return _max_abs_partials(tensors, device, use_foreach)
    return _sum_pow_partials(tensors, p, device, use_foreach)


def _foreach_for(use_foreach: bool | None, device: torch.device, tensors: Sequence[Tensor]) -> bool:
    if use_foreach is None or use_foreach:
        from ._scale import resolve_foreach  # torch's tri-state, resolved only where torch kernels run

        return resolve_foreach(use_foreach, device, tensors)
    return False


def _cpu_partials(tensors: Sequence[Tensor], p: float, use_foreach: bool | None) -> Tensor:
    """CPU partials: the native kernel for every tensor it supports, plain torch for the rest."""
    cpu = torch.device("cpu")
    if not _native.available():
        return _torch_partials(tensors, p, cpu, _foreach_for(use_foreach, cpu, tensors))
    first = tensors[0].dtype
    if not _STRIDED.issuperset(map(_layout_of, tensors)):  # sparse ones have no is_contiguous (CSR raises)
        tensors = _real_inputs(tensors)
    if (
        first in _native.DTYPES
        and all(map(Tensor.is_contiguous, tensors))
        and all(d is first for d in map(_dtype_of, tensors))
        and _native.plain(tensors)
    ):
        out = _native.partials(tensors, p)  # the common case: one call, no loop over tensors in Python
        if out is not None:
            return out
        # a tensor without memory (a plain-typed ZeroTensor: data_ptr() 0): torch's ops, as for the rest below
        return _torch_partials(tensors, p, cpu, _foreach_for(use_foreach, cpu, tensors))
    native: dict[torch.dtype, list[int]] = {}
    rest: list[int] = []
    for i, t in enumerate(tensors):
        (native.setdefault(t.dtype, []) if _native.supports(t) else rest).append(i)
    out = torch.empty(len(tensors), dtype=torch.float64)
    for idx in native.values():
        chosen = [tensors[i] for i in idx]
        parts = _native.partials(chosen, p)
        if parts is None:  # a tensor without memory (see above)
            parts = _torch_partials(chosen, p, cpu, _foreach_for(use_foreach, cpu, chosen))
        out[torch.tensor(idx)] = parts
    if rest:
        others = [tensors[i] for i in rest]
        out[torch.tensor(rest)] = _torch_partials(others, p, cpu, _foreach_for(use_foreach, cpu, others))
    return out


def local_partials(tensors: Sequence[Tensor], p: float, use_foreach: bool | None = True) -> Tensor:
    """Per-tensor partials of order ``p``, float64, on the tensors' (common) device.

    Args:
        tensors: gradient pieces on one device, any floating dtype. Empty tensors contribute the neutral 0.
        p: a validated norm order (see :func:`parse_norm_type`).
        use_foreach: allow fused multi-tensor kernels (the CPU native kernel is always multi-tensor); ``None``
            uses them where torch supports them, ``True`` requires them (torch's tri-state).

    Returns:
        A float64 vector with one partial per tensor, in input order.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    device = tensors[0].device
    if device.type == "cpu":
        return _cpu_partials(tensors, p, use_foreach)
    return _torch_partials(tensors, p, device, _foreach_for(use_foreach, device, tensors))
