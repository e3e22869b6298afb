"""In-place scaling of gradient pieces by the clip coefficient, foreach-grouped by (device, dtype)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from . import _native, _reduce

__all__ = [
    "EPS", "clip_coefficient", "group_by_device_dtype", "mul_wide_", "needs_wide", "resolve_foreach", "round_once",
    "scale_", "writable", "writable_pieces",
]

#: Added to the total norm before dividing, as torch.nn.utils.clip_grad_norm_ does.
EPS = 1e-6
# Groups of many small bf16/fp16 CPU tensors are scaled by the native kernel: torch's CPU _foreach_mul_ runs
# 1.2-1.5 ms on 1000 x 1 Ki halves, the kernel 0.25 ms. fp32 has a fast torch path (0.45 ms there, a wash once
# our per-tensor bookkeeping is counted), and for large tensors torch's mul_ runs at memory bandwidth.
_NATIVE_MIN_TENSORS = 32
_NATIVE_MAX_AVG = 1 << 16  # elements per tensor on average: above, torch's own kernel is as fast or faster
_NATIVE_DTYPES = (torch.bfloat16, torch.float16)


def group_by_device_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    """Bucket tensors for fused kernels (the C++ grouping torch's own clip uses, when present)."""
    try:
        grouped = torch._C._group_tensors_by_device_and_dtype([list(tensors)], False)
        return {key: lists[0] for key, (lists, _) in grouped.items()}
    except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - older or exotic builds
        out: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for t in tensors:
            out.setdefault((t.device, t.dtype), []).append(t)
        return out


def writable(tensors: Sequence[Tensor]) -> Sequence[Tensor]:
    """``tensors`` as an in-place multiply by a real coefficient can take them: a gradient whose elements share
    memory (stride 0 on a dimension of size > 1: ``expand()``, what ``autograd.grad`` gives for a bias summed into
    the loss) as the view of each memory location once, so that every element is multiplied once (torch's ``mul_``
    refuses such a tensor: the others were scaled and it raised, half-clipped); a conjugate or negative view as
    the plain view of its memory. Only stride 0 makes torch's overlap test say "yes"; other non-dense views are
    written as they are."""
    if (all(map(Tensor.is_contiguous, tensors))  # the usual case, in C (a size-1 dimension's stride is ignored)
            and not any(map(Tensor.is_conj, tensors)) and not any(map(Tensor.is_neg, tensors))):
        return tensors
    out = list(tensors)
    for i, t in enumerate(out):
        if t.layout != torch.strided:
            continue
        # A conjugate (or negative) view, as autograd gives a complex parameter used through .conj(): its stored
        # values, which a real coefficient scales alike (torch's foreach refuses such views: the call raised after
        # scaling the other gradients, half-clipped).
        if t.is_conj():
            t = t.conj()
        if t.is_neg():
            t = torch._neg_view(t)
        if 0 in t.stride() and not t.is_contiguous():
            t = t.as_strided([1 if st == 0 else n for n, st in zip(t.shape, t.stride())], t.stride())
        out[i] = t
    return out


def writable_pieces(pieces: Sequence[tuple[Tensor, int]]) -> Iterable[tuple[Tensor, int]]:
    """:func:`writable` for (tensor, slot) pairs."""
    return zip(writable([t for t, _ in pieces]), (slot for _, slot in pieces))


_FOREACH_TYPES = frozenset((Tensor, type(None)))


def resolve_foreach(foreach: bool | None, device: torch.device, tensors: Sequence[Tensor]) -> bool:
    """torch's tri-state: None = fused where supported, True = fused or RuntimeError, False = per tensor."""
    from torch.utils._foreach_utils import _device_has_foreach_support

    if foreach is None:
        # torch's _has_foreach_support, the per-tensor test in C: plain tensors only (a subclass takes the loop)
        return _device_has_foreach_support(device) and set(map(type, tensors)) <= _FOREACH_TYPES
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
    return bool(foreach)


def clip_coefficient(max_norm: float | Tensor, total_norm: Tensor) -> Tensor:
    """``min(1, max_norm / (total + 1e-6))`` as a device tensor: clamped, never tested (no sync). float64 for a
    float64 total (float64 gradients), float32 otherwise."""
    total = total_norm if total_norm.dtype == torch.float64 else total_norm.to(torch.float32)
    # A true division: a number over a tensor is torch's reciprocal-then-multiply, whose 1 / total is a float32
    # subnormal above 2**126 (digits lost: 2 ulps off; zeroed gradients under torch.set_flush_denormal(True)).
    limit = max_norm if isinstance(max_norm, Tensor) else full_like(total, max_norm)
    coef = torch.clamp(limit / (total + EPS), max=1.0)
    # An inf total (an inf gradient, or a p-th power sum beyond float64: p = 100 on entries of 2e3) meets inf / inf
    # = NaN where the limit is inf, and every gradient, finite ones included, became NaN (torch's clip does that):
    # an infinite max_norm is no limit, 1 whatever the total (a NaN total stays NaN); a finite max_norm that only
    # float32 rounds to inf (1e39 beside a float32 total) is a finite limit, 0 over an inf total as any other.
    if isinstance(max_norm, Tensor):  # (device ops only: no host read of a device limit)
        return torch.where((limit == math.inf) & (total == math.inf), 1.0, coef)
    if math.isinf(max_norm):
        return torch.where(total == math.inf, 1.0, coef)
    if max_norm > torch.finfo(total.dtype).max:
        return torch.where(total == math.inf, 0.0, coef)
    return coef


def full_like(like: Tensor, value: float) -> Tensor:
    """``torch.full_like`` where a number beyond the dtype's range reads ``inf`` (a max_norm of 1e39 beside a
    float32 total: torch refuses it, "value cannot be converted to type float without overflow")."""
    value = float(value)
    if like.is_floating_point() and abs(value) > torch.finfo(like.dtype).max:
        value = math.copysign(math.inf, value)
    return torch.full_like(like, value)


FP32_TINY = 2.0**-126  # float32's smallest normal number
_WIDE_PIECE = 1 << 20  # elements per float64 copy in mul_wide_


def needs_wide(coefs: Tensor) -> bool:
    """Whether some float64 coefficient (one, or one per slot) is one float32 holds only as a subnormal, or not
    at all (finite gradients whose norm is beyond float32's range, or a tiny ``max_norm``): multiplied in float32
    it lost its digits, or zeroed the gradients; such calls scale through :func:`mul_wide_`. The test is the
    same where float64 gradients make the coefficient float64: the float32 and bfloat16 gradients beside them
    would otherwise get it rounded to a float32 subnormal. False off the CPU, where the test would be a host read."""
    if coefs.device.type != "cpu":
        return False
    if coefs.numel() == 1:  # (one coefficient, 0-dim or a total's one slot: read once, no tensor ops)
        return 0.0 < float(coefs) < FP32_TINY
    return bool(((coefs > 0) & (coefs < FP32_TINY)).any())


def mul_wide_(tensors: Sequence[Tensor], value: float) -> None:
    """``t *= value`` for CPU tensors with the product taken in float64 (complex128) and rounded once to each
    tensor's dtype: the coefficients of :func:`needs_wide`. (They were applied as a normal factor times powers
    of two, each product rounded to the dtype: results that are subnormal themselves rounded twice, 1 ulp off,
    1.7% of a bf16 value.) A float64 copy of at most 1 Mi elements at a time."""
    for t in writable(tensors):
        if t.is_sparse:
            t = t._values()
        if not t.numel():
            continue
        if t.dtype in (torch.float64, torch.complex128):
            t.mul_(value)
            continue
        wide = torch.complex128 if t.is_complex() else torch.float64
        if not t.is_contiguous():
            t.copy_(round_once(t.to(wide) * value, t.dtype))
            continue
        for piece in t.view(-1).split(_WIDE_PIECE):
            piece.copy_(round_once(piece.to(wide) * value, piece.dtype))


def round_once(x: Tensor, dtype: torch.dtype) -> Tensor:
    """float64 (complex128) ``x`` as ``dtype`` will hold it, rounded once to nearest: for bfloat16 and float16
    through :func:`_round_to_odd_float32` (torch's own cast goes through float32, two roundings), else ``x``
    (the cast into the gradient rounds once)."""
    return _round_to_odd_float32(x) if dtype in (torch.bfloat16, torch.float16) else x


def _round_to_odd_float32(x: Tensor) -> Tensor:
    """float64 ``x`` to float32 rounded to odd (toward zero, the last bit set where inexact), so that the cast to
    bfloat16/float16 that follows rounds to nearest as if from ``x`` itself: torch converts float64 to those
    through float32, and the two roundings to nearest put 0.2% of bf16 products 1 ulp off (1 + 2^-8 + 2^-30
    became 1.0, not 1.0078125). Round-to-odd at 2 or more bits beyond the target's precision is exact."""
    y = x.to(torch.float32)
    back = y.to(torch.float64)
    inexact = (back != x) & (x == x)  # (NaN kept as it is)
    toward_zero = torch.where(back.abs() > x.abs(), torch.nextafter(y, torch.zeros_like(y)), y)
    odd = (toward_zero.view(torch.int32) | 1).view(torch.float32)
    return torch.where(inexact, odd, y)


def scale_(
    tensors: Sequence[Tensor],
    coef: Tensor,
    foreach: bool | None = None,
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] | None = None,
    divide: bool = False,
) -> None:
    """Multiply every tensor in place by ``coef``, rounded once to its own dtype (see :func:`mul_group_`).

    On the CPU, where reading ``coef`` costs nothing, a coefficient of exactly 1 skips the pass, so
    gradients that need no clipping are left bit-for-bit untouched, and groups of many small contiguous
    bfloat16/float16 tensors are scaled by the native kernel in one call (bit-identical to
    ``torch._foreach_mul_`` except for NaN payloads; ``foreach=False`` keeps torch's per-tensor ``mul_``).
    Elsewhere the multiply always runs: a branch on a device value would stall the host. ``groups``:
    ``tensors`` already bucketed by :func:`group_by_device_dtype`, when the caller has it.

    ``divide``: divide by ``coef`` instead, the float32 ``grad_scale`` a hand-over gives torch's fused optimizers
    (the reciprocal of the clip coefficient), as their kernels apply it: float32 gradients scaled so are
    bit-identical to those the fused step takes from the hand-over (a product by the coefficient was 1 ulp off in a
    third of the elements, and DDP's replicas parted where one rank scaled and the others handed over).
    bfloat16/float16 ones are rounded to their dtype here, where the kernels keep the float32 quotient. (Never by
    the native kernel, which multiplies.)
    """
    if not tensors:
        return
    value = float(coef) if coef.device.type == "cpu" else None
    if value == 1.0:
        return
    for (device, dtype), group in (groups if groups is not None else group_by_device_dtype(tensors)).items():
        group = writable(group)
        if (
            value is not None
            and not divide
            and dtype in _NATIVE_DTYPES
            and device.type == "cpu"
            and foreach is not False
            and len(group) >= _NATIVE_MIN_TENSORS
            and sum(map(Tensor.numel, group)) <= _NATIVE_MAX_AVG * len(group)
            and all(map(Tensor.is_contiguous, group))
            and _native.plain(group)
            and _native.available()
            and _native.scale_(group, value)
        ):
            continue  # one native multi-tensor pass, rounded exactly as torch's mul_
        mul_group_(group, _reduce.moved(coef, device), foreach, divide)


def one_by_one_instead(foreach: bool | None, tensors: Sequence[Tensor]) -> bool:
    """Whether a fused multiply torch refused with ``NotImplementedError`` is done one tensor at a time instead: a
    list holding a nested tensor (strided layout, a plain Tensor to every type test), which torch has no fused
    multiply for and refuses whole before writing any (the call measured it, then raised torch's error on its rank
    alone, nothing scaled), under ``foreach=None``, as torch's tri-state promises; ``foreach=True`` raises."""
    return not foreach and any(t.is_nested for t in tensors)


def mul_group_(group: list[Tensor], c: Tensor, foreach: bool | None, divide: bool = False) -> None:
    """``t *= c`` for every tensor of one (device, dtype) group, the product taken in float32 or better and
    rounded once to the tensor's dtype. Off the CPU a 0-dim ``c`` of another dtype is cast to the tensors' dtype
    before the multiply (CUDA reads only a CPU scalar in float: a float32 coefficient rounded to bf16 was 0.2%
    off, one below 3e-8 became 0 and zeroed fp16 gradients; torch's foreach then takes its per-tensor path
    anyway): there a 1-element operand, which takes part in type promotion, as AGC scales. ``divide``: ``t /= c``
    instead, the quotient taken and rounded alike (see :func:`scale_`)."""
    if not group:
        return
    device, dtype = group[0].device, group[0].dtype
    fused = resolve_foreach(foreach, device, group)  # (foreach=True where there are no such kernels raises)
    on_device = device.type != "cpu"
    op, foreach_op = ("div_", torch._foreach_div_) if divide else ("mul_", torch._foreach_mul_)
    # On the CPU only sparse tensors need this: torch's sparse mul casts the coefficient to the sparse dtype first
    # (fp16: 1.1e-8 became 0, the values zeroed; ordinary ones 1 ulp off): their values are multiplied as a dense
    # tensor is.
    if c.dtype != dtype and (on_device or any(t.is_sparse for t in group)):
        one = c.reshape(1) if on_device else c
        plain = []
        for t in group:
            if t.is_sparse:  # (a dense operand of another dtype is refused by sparse mul: the values)
                getattr(t._values(), op)(one)
            elif t.dim() and on_device:
                plain.append(t)
            else:
                getattr(t, op)(one if t.dim() else c)  # (a 0-dim tensor with a 0-dim c promotes too; shape () stays ())
        if plain:
            # torch's list-by-list multiply: operands of other dtypes take its per-tensor path, each t.mul_(one)
            # with the same promotion, in one C++ loop (a Python loop took 2.7x torch's bf16 clip of 1000 small
            # gradients on an H200).
            foreach_op(plain, [one] * len(plain))
        return
    if fused:
        try:
            foreach_op(group, c)
        except NotImplementedError:
            if not one_by_one_instead(foreach, group):
                raise
            for t in group:
                getattr(t, op)(c)
    else:
        for t in group:
            getattr(t, op)(c)
