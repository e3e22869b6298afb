"""Adaptive clipping: thresholds that follow the norm history (AutoClip, ZClip) and unit-wise AGC.

AutoClip and ZClip turn the history of total norms into this step's ``max_norm``. Their state lives on the
gradients' device as float64 tensors and is updated with tensor ops only (no host sync on CUDA); since every
rank feeds it the same total norm (from the call's one collective), the state is identical on every rank.
Use them through :class:`dist_clip.GradClipper`::

    clipper = dist_clip.GradClipper(max_norm=dist_clip.ZClip(alpha=0.97, z_thresh=2.5))
    result = clipper(model)            # every rank

AGC (adaptive gradient clipping, Brock et al. 2021, as in timm) clips every *unit* (a row along dim 0 of a
weight, or the whole of a 1-D parameter) whose gradient norm exceeds ``clipping * max(||w_unit||, eps)``. It is
shard-aware: rows kept whole by dim-0 sharding (FSDP2, ColwiseParallel) are measured locally; units that a shard
boundary cuts (FSDP1 flat shards, sharded 1-D parameters, every row of a RowwiseParallel ``Shard(1)`` weight) have
their weight and gradient partials combined, and every one of them travels in the call's one collective, beside
the per-parameter norms used for the total. DeepSpeed engines and fairscale targets describe their pieces
through their adapter's ``unit_layout`` (:class:`dist_clip.shards.UnitLayout`: ZeRO partitions and fairscale flat
shards placed in each full parameter, the cuts every rank knows from the structure alone, the loss scale).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import numbers
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _norm, _reduce, _scale, _slots
from . import clip as _clip
from .adapters import unwrap_compiled
from .adapters.fsdp import refuse_partial
from .adapters.params import copy_counted_here, copy_peers, listed_stand_ins, refuse_managed, replica_groups
from .shards import Shards, UnitLayout

__all__ = ["AGC", "AutoClip", "ZClip"]


def _real(name: str, value: object, *, low: float | None = None, high: float | None = None,
          low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = _norm.as_float(name, value)
    bad = math.isnan(v)
    if low is not None:
        bad = bad or (v <= low if low_open else v < low)
    if high is not None:
        bad = bad or (v >= high if high_open else v > high)
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise ValueError(f"{name} must be a number {' and '.join(x for x in (lo, hi) if x)}, got {v}")
    return v


#: The most values a float64 buffer may be made of: its byte size must fit torch's int64 storage size.
_BUFFER_MAX = 2**60 - 1


def _int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    shown = value if int(value).bit_length() <= 128 else (
        f"{'a negative' if value < 0 else 'an'} int of {_norm.int_digits(value)} digits")
    if int(value) < low:
        raise ValueError(f"{name} must be an int >= {low}, got {shown}")
    if high is not None and int(value) > high:
        # (a buffer of this many float64 values is made at the first call: 10**400 raised float()'s OverflowError
        # there, 2**62 torch's "Storage size calculation overflowed", after the gradients were measured)
        raise ValueError(f"{name} must be an int <= {high} (a float64 buffer of that many values is made at the "
                         f"first call), got {shown}")
    return int(value)


# ---------------------------------------------------------------------------------------------- AutoClip

_QUANTILE_MAX = 2**24  # the most values torch.quantile/nanquantile take


def nanquantile(values: Tensor, q: float, limit: int = _QUANTILE_MAX) -> Tensor:
    """``torch.nanquantile(values, q, interpolation="linear")`` of a 1-D float tensor of any length (0-dim): torch's
    refuses more than 2^24 values ("quantile() input tensor is too large", at call 2^24 + 1 of an AutoClip keeping
    every norm). Beyond ``limit`` values, torch's own computation, spelled out: the values sorted (NaN last), the
    rank ``q * (n - 1)`` among the ``n`` that are not NaN (0 where none is), the values at its floor and ceiling
    interpolated by ``torch.lerp`` with its fraction; the same numbers (numpy's "linear" percentile), on the
    device throughout (no host read)."""
    if values.numel() <= limit:
        return torch.nanquantile(values, q, interpolation="linear")
    ordered = torch.sort(values).values
    count = torch.logical_not(torch.isnan(ordered)).sum()  # (int64, on the device)
    rank = ((count - 1).to(values.dtype) * q).clamp(min=0)
    below = rank.to(torch.int64)
    above = rank.ceil().to(torch.int64)
    low, high = ordered.gather(0, below.reshape(1)), ordered.gather(0, above.reshape(1))
    return torch.lerp(low, high, (rank - below).reshape(1)).reshape(())


@dataclass(frozen=True)
class AutoClip:
    """AutoClip (Seetharaman et al. 2020): clip at a percentile of the history of total norms.

    Each call appends the current total norm to the history and clips at its ``percentile``-th percentile
    (linear interpolation, as ``numpy.percentile``), current norm included, exactly as the original. Non-finite
    norms are kept out of the history.

    Attributes:
        percentile: in [0, 100]; the paper's defaults are 5-10.
        window: keep only the last ``window`` norms (``None``: every norm seen, as the original).
    """

    percentile: float = 10.0
    window: int | None = None

    def __post_init__(self) -> None:
        _real("AutoClip.percentile", self.percentile, low=0.0, high=100.0)
        if self.window is not None:
            _int("AutoClip.window", self.window, 1, _BUFFER_MAX)


def _norms_or_nan(name: str, values: Tensor, nan: bool = True, inf: bool = False) -> None:
    """Saved norms must be finite and >= 0 (NaN too where ``nan``: a non-finite norm stored as skipped; +inf
    where ``inf``): a negative one flipped the gradients' signs, an infinite history entry made them NaN."""
    ok = torch.isfinite(values) & (values >= 0)
    if nan:
        ok |= torch.isnan(values)
    if inf:
        ok |= values == math.inf
    bad = ~ok
    if bool(bad.any()):
        allowed = "".join((", or NaN" if nan else "", ", or +inf" if inf else ""))
        raise ValueError(f"{name} must hold norms (finite, >= 0{allowed}), got {values[bad][:3].tolist()}")


def _history_tensor(saved: object) -> Tensor | None:
    """A saved AutoClip history as a 1-D float tensor: from a list (or tuple) of real numbers, each kept as its
    float64 value, or a 1-D float tensor as states saved it before; None for anything else (a bool, a nested
    list, a tensor among the numbers, a string)."""
    if isinstance(saved, Tensor):
        return saved if saved.dim() == 1 and saved.is_floating_point() else None
    if not isinstance(saved, (list, tuple)):
        return None
    if all(type(x) is float for x in saved):  # (as saved: 0.17 s for a million, the general loop below 0.95 s)
        return torch.tensor(saved, dtype=torch.float64)
    if not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in saved):
        return None
    return torch.tensor([_norm.as_float("AutoClip state 'history'", x) for x in saved], dtype=torch.float64)


class _AutoClipState:
    """The norm history as a float64 device buffer; non-finite norms are stored as NaN and skipped.

    With a ``window`` the buffer is a ring of the last ``window`` finite norms, written at a device position
    that only finite norms advance: a position advanced by every call let a run of skipped non-finite steps as
    long as the window evict every finite norm, so the next spike set its own threshold and passed unclipped.
    """

    def __init__(self, config: AutoClip) -> None:
        self.config = config
        self.count = 0  # calls seen: host-side, identical on every rank, never read from the device
        self.buffer: Tensor | None = None
        self.written: Tensor | None = None  # with a window: finite norms written so far (device int64)

    def _grow(self, device: torch.device) -> Tensor:
        cap = self.config.window
        if self.buffer is None:
            size = cap if cap is not None else 64
            self.buffer = torch.full((size,), math.nan, dtype=torch.float64, device=device)
        elif self.buffer.device != device:
            self.buffer = self.buffer.to(device)
        if cap is not None:
            if self.written is None:
                self.written = torch.zeros((), dtype=torch.int64, device=device)
            elif self.written.device != device:
                self.written = self.written.to(device)
        if cap is None and self.count >= self.buffer.numel():
            size = self.buffer.numel()
            while self.count >= size:  # calls refused together advance the count without a write
                size *= 2
            bigger = torch.full((size,), math.nan, dtype=torch.float64, device=device)
            bigger[: self.buffer.numel()] = self.buffer
            self.buffer = bigger
        return self.buffer

    def threshold(self, total: Tensor, finite: Tensor) -> Tensor:
        buf = self._grow(total.device)
        cap = self.config.window
        finite = finite.to(total.device)
        value = torch.where(finite, total.to(torch.float64), torch.full_like(total, math.nan, dtype=torch.float64))
        self.count += 1
        if cap is None:
            buf[self.count - 1] = value
            return nanquantile(buf[: self.count], self.config.percentile / 100.0)
        assert self.written is not None
        slot = (torch.arange(cap, device=buf.device) == self.written % cap) & finite
        buf.copy_(torch.where(slot, value, buf))
        self.written += finite.to(torch.int64)
        return nanquantile(buf, self.config.percentile / 100.0)

    def coefficient(self, threshold: Tensor, total: Tensor) -> Tensor:
        # torch.nn.utils.clip_grad_norm_(params, clip_value), as the original calls it. An inf norm with no
        # finite history (NaN threshold) takes 0, as any threshold over inf does (NaN turned finite entries NaN).
        g = total.to(torch.float64)
        coef = torch.clamp(threshold / (g + 1e-6), max=1.0)
        return torch.where(g == math.inf, torch.zeros_like(coef), coef)

    def _history(self) -> Tensor:
        """The norms in the order seen (with a window: the last finite ones, NaN-padded in front to the
        ``min(count, window)`` entries the saved format has always had)."""
        cap = self.config.window
        if cap is None:
            # NaN where no norm was written: calls refused together count without one (a refused first call
            # saved an empty history, or call 65 one of 64 norms, which load_state_dict refused)
            hist = torch.full((self.count,), math.nan, dtype=torch.float64)
            if self.buffer is not None:
                kept = min(self.count, self.buffer.numel())
                hist[:kept] = self.buffer[:kept].detach().cpu()
            return hist
        if self.buffer is None:
            return torch.full((min(self.count, cap),), math.nan, dtype=torch.float64)
        buf = self.buffer.detach().cpu()
        written = int(self.written) if self.written is not None else 0
        start = written % cap
        ring = torch.cat((buf[start:], buf[:start])) if written >= cap else buf[:written]
        pad = torch.full((min(self.count, cap) - ring.numel(),), math.nan, dtype=torch.float64)
        return torch.cat((pad, ring.to(torch.float64)))

    def state_dict(self) -> dict[str, Any]:
        # The history as a list of Python floats (float64, exact): torch.distributed.checkpoint pickles such a
        # value and loads it back whole, where it loads a tensor into the fresh clipper's own (empty) one and
        # refused the grown history ("Size mismatch"); torch.load(weights_only=True) reads it as well.
        return {"count": self.count, "history": self._history().tolist(), "oldest_first": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = state.keys() - {"count", "history", "oldest_first"}
        if unknown:
            raise ValueError(
                f"AutoClip state has unknown keys {sorted(map(str, unknown))}; expected one from state_dict()"
            )
        count = _int("AutoClip state 'count'", state["count"], 0)
        oldest_first = state.get("oldest_first", False)
        if not isinstance(oldest_first, bool):  # (its truth value decided the order: an array raised numpy's error)
            raise TypeError(f"AutoClip state 'oldest_first' must be True or False, got {type(oldest_first).__name__}")
        saved = state["history"]
        cap = self.config.window
        want = min(count, cap) if cap is not None else count
        # A list of numbers (as state_dict() saves it), or a 1-D float tensor (as it saved it before)
        hist = _history_tensor(saved)
        if hist is None or hist.numel() != want:
            where = (f"this AutoClip keeps window={cap} norms and the state counts {count} calls"
                     if cap is not None else f"the state counts {count} calls (this AutoClip has no window)")
            if hist is not None:
                where += f"; it holds {hist.numel()} norms (saved with another window?)"
            raise ValueError(f"AutoClip state 'history' must be a list of {want} norms (or a 1-D float tensor of "
                             f"them) ({where}), got {saved!r:.80}")
        _norms_or_nan("AutoClip state 'history'", hist)
        hist = hist.detach().cpu().to(torch.float64)
        if cap is None:
            buf = torch.full((max(64, 1 << max(0, (count - 1)).bit_length()),), math.nan, dtype=torch.float64)
            buf[:want] = hist
            self.buffer, self.written, self.count = buf, None, count
            return
        if not oldest_first and count > cap:
            # Saved before the window held finite norms only (no "oldest_first"): its entries sit in ring order,
            # the oldest at count % window; read as oldest first, the newest norm was the next evicted.
            start = count % cap
            hist = torch.cat((hist[start:], hist[:start]))
        kept = hist[~torch.isnan(hist)]  # the finite norms in the order seen, oldest first
        buf = torch.full((cap,), math.nan, dtype=torch.float64)
        buf[: kept.numel()] = kept
        self.buffer, self.count = buf, count
        self.written = torch.tensor(kept.numel(), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------- ZClip


@dataclass(frozen=True)
class ZClip:
    """ZClip (Kumar et al. 2025): clip spikes found by a z-score against an EMA of the norm's mean and variance.

    Until ``warmup_steps`` finite norms are collected the norms are clipped at ``max_norm`` if set, as
    ``clip_grad_norm_`` would (left alone with ``max_norm=None``); then mean and variance start from their plain
    average and follow ``mean = a*mean + (1-a)*g`` and ``var = a*var + (1-a)*(g - mean)**2``. A norm whose
    ``z = (g - mean) / (std + eps)`` exceeds ``z_thresh`` is a spike: it is clipped to
    ``(mean + z_thresh * std / (z / z_thresh)) * clip_factor`` ("adaptive_scaling") or to ``mean`` ("mean"),
    never above ``max_norm``, and the EMA is fed the clipped value (or not fed at all with
    ``skip_update_on_spike``). This follows the reference implementation of the paper; non-finite norms are
    kept out of the statistics.
    """

    alpha: float = 0.97
    z_thresh: float = 2.5
    max_norm: float | None = 1.0
    eps: float = 1e-6
    warmup_steps: int = 25
    clip_option: Literal["adaptive_scaling", "mean"] = "adaptive_scaling"
    clip_factor: float = 1.0
    skip_update_on_spike: bool = False

    def __post_init__(self) -> None:
        _real("ZClip.alpha", self.alpha, low=0.0, high=1.0, high_open=True)
        _real("ZClip.z_thresh", self.z_thresh, low=0.0, low_open=True)
        if self.max_norm is not None:
            _real("ZClip.max_norm", self.max_norm, low=0.0)
        _real("ZClip.eps", self.eps, low=0.0)
        _int("ZClip.warmup_steps", self.warmup_steps, 1, _BUFFER_MAX)
        if self.clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(f"ZClip.clip_option must be 'adaptive_scaling' or 'mean', got {self.clip_option!r}")
        # (finite: an inf one fed the EMA an inf mean and a NaN variance at the first spike, after which no spike
        # was caught, and the state saved was one its own load_state_dict refused)
        _real("ZClip.clip_factor", self.clip_factor, low=0.0, low_open=True, high=math.inf, high_open=True)
        if not isinstance(self.skip_update_on_spike, bool):
            raise TypeError(f"ZClip.skip_update_on_spike must be a bool, got {self.skip_update_on_spike!r}")


class _ZClipState:
    """Warm-up buffer, EMA mean and variance, all float64 device tensors updated with tensor ops only.

    Warm-up lasts until ``warmup_steps`` finite norms are collected (``seen``, a device count): it counted calls
    before, so a warm-up of non-finite norms only (fp16 overflows in the first steps) left the mean NaN and
    every later spike unclipped, with nothing said.
    """

    def __init__(self, config: ZClip) -> None:
        self.config = config
        self.count = 0  # calls seen (host-side, for the record)
        self.seen: Tensor | None = None  # finite warm-up norms collected, up to warmup_steps
        self.warm: Tensor | None = None  # warm-up norms in the order seen, NaN beyond ``seen``
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self._warming: Tensor | None = None  # whether the last call was still in warm-up (device bool)

    def _ensure(self, device: torch.device) -> None:
        if self.warm is None:
            self.warm = torch.full((self.config.warmup_steps,), math.nan, dtype=torch.float64, device=device)
            self.mean = torch.full((), math.nan, dtype=torch.float64, device=device)
            self.var = torch.full((), math.nan, dtype=torch.float64, device=device)
        if self.seen is None:
            self.seen = torch.zeros((), dtype=torch.float64, device=device)
        if self.warm.device != device:
            self.warm, self.mean, self.var, self.seen = (
                t.to(device) for t in (self.warm, self.mean, self.var, self.seen)  # type: ignore[union-attr]
            )

    def threshold(self, total: Tensor, finite: Tensor) -> Tensor:
        cfg = self.config
        self._ensure(total.device)
        assert self.warm is not None and self.mean is not None and self.var is not None and self.seen is not None
        self.count += 1
        g = total.to(torch.float64)
        finite = finite.to(g.device)
        width = cfg.warmup_steps
        warming = self.seen < width
        take = warming & finite
        slot = torch.arange(width, device=g.device) == self.seen.clamp(max=width - 1).to(torch.int64)
        self.warm.copy_(torch.where(slot & take, g, self.warm))
        seen = self.seen + take.to(torch.float64)
        ready = warming & (seen >= width)  # the warm-up ends with this norm: every entry is finite now
        mean0 = self.warm.mean()
        var0 = ((self.warm - mean0) ** 2).mean()

        std = self.var.sqrt()
        z = (g - self.mean) / (std + cfg.eps)
        spike = ~warming & (z > cfg.z_thresh)
        if cfg.clip_option == "adaptive_scaling":
            eta = z / cfg.z_thresh
            clip_val = (self.mean + (cfg.z_thresh * std) / eta) * cfg.clip_factor
        else:
            clip_val = self.mean.clone()
        effective = torch.where(spike, clip_val, g)
        if cfg.max_norm is not None:
            effective = torch.minimum(effective, torch.full_like(g, cfg.max_norm))
        update = ~warming & finite
        if cfg.skip_update_on_spike:
            update = update & ~spike
        fed = torch.where(spike, clip_val, g)
        new_mean = cfg.alpha * self.mean + (1 - cfg.alpha) * fed
        new_var = cfg.alpha * self.var + (1 - cfg.alpha) * (fed - new_mean) ** 2
        self.mean.copy_(torch.where(ready, mean0, torch.where(update, new_mean, self.mean)))
        self.var.copy_(torch.where(ready, var0, torch.where(update, new_var, self.var)))
        self.seen.copy_(seen)
        self._warming = warming
        during = torch.full_like(g, cfg.max_norm if cfg.max_norm is not None else math.inf)
        return torch.where(warming, during, effective)

    def coefficient(self, threshold: Tensor, total: Tensor) -> Tensor:
        g = total.to(torch.float64)
        after = torch.where(g > threshold, threshold / (g + 1e-6), torch.ones_like(g))
        after = torch.where(torch.isnan(g), g, after)  # NaN > x is False: a NaN norm took 1, not NaN as torch
        if self.config.max_norm is None:
            during = torch.ones_like(g)  # nothing is clipped in warm-up (inf / inf or inf / NaN was NaN)
        else:
            # clip_grad_norm_(max_norm) during warm-up; max_norm=inf, as None, clips nothing (inf / inf was NaN)
            during = _scale.clip_coefficient(threshold, g)
        warming = self._warming if self._warming is not None else torch.zeros((), dtype=torch.bool)
        return torch.where(warming.to(g.device), during, after)

    def state_dict(self) -> dict[str, Any]:
        def cpu(t: Tensor | None, shape: tuple[int, ...], fill: float = math.nan) -> Tensor:
            return t.detach().cpu().clone() if t is not None else torch.full(shape, fill, dtype=torch.float64)

        return {
            "count": self.count,
            "seen": cpu(self.seen, (), 0.0),
            "warmup": cpu(self.warm, (self.config.warmup_steps,)),
            "mean": cpu(self.mean, ()),
            "var": cpu(self.var, ()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        count = _int("ZClip state 'count'", state["count"], 0)
        width = self.config.warmup_steps
        warm = state["warmup"]
        if not isinstance(warm, Tensor) or warm.shape != (width,) or not warm.is_floating_point():
            raise ValueError(
                f"ZClip state 'warmup' must be a float tensor of shape ({width},) (warmup_steps), "
                f"got {getattr(warm, 'shape', type(warm).__name__)}"
            )
        moments = []
        for key in ("mean", "var"):
            value = state[key]
            if not (isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point()):
                raise ValueError(f"ZClip state {key!r} must be a one-value float tensor, got {value!r:.80}")
            moments.append(value.detach().to(torch.float64).cpu().clone().reshape(()))
        warm = warm.detach().to(torch.float64).cpu().clone()
        unknown = state.keys() - {"count", "seen", "warmup", "mean", "var"}
        if unknown:
            raise ValueError(
                f"ZClip state has unknown keys {sorted(map(str, unknown))}; expected one from state_dict()"
            )
        if "seen" in state:
            seen = state["seen"]
            if (not (isinstance(seen, Tensor) and seen.numel() == 1) or seen.dtype == torch.bool or seen.is_complex()
                    or not 0 <= float(seen) <= width or float(seen) != int(float(seen))):
                raise ValueError(
                    f"ZClip state 'seen' must be a one-value tensor holding an integer in [0, {width}], "
                    f"got {seen!r:.80}"
                )
            seen = seen.detach().to(torch.float64).cpu().clone().reshape(())
            n = int(seen)
            _norms_or_nan("ZClip state 'warmup'", warm[:n], nan=False)  # the finite warm-up norms collected
            for key, value in zip(("mean", "var"), moments):
                # NaN until the warm-up ends (a NaN mean after it left ZClip off for good), never negative (a
                # negative variance gave NaN thresholds); +inf where the moments outgrew float64 (norms of 1e300
                # in float64), as ZClip itself saves them.
                _norms_or_nan(f"ZClip state {key!r}", value.reshape(1), nan=n < width, inf=True)
        else:  # a state saved when warm-up counted calls: its finite warm-up norms, in order
            ok = torch.isfinite(warm[: min(count, width)])
            kept = warm[: min(count, width)][ok]
            warm = torch.full((width,), math.nan, dtype=torch.float64)
            warm[: kept.numel()] = kept
            done = count >= width and bool(torch.isfinite(moments[0]))
            seen = torch.tensor(float(width if done else kept.numel()), dtype=torch.float64)
            # the same checks as the current format (a negative mean loaded and flipped a spike's gradients, a
            # negative variance turned spike detection off)
            _norms_or_nan("ZClip state 'warmup'", kept, nan=False)
            for key, value in zip(("mean", "var"), moments):
                _norms_or_nan(f"ZClip state {key!r}", value.reshape(1), nan=not done, inf=True)
        # Assigned only once everything is checked: a bad state leaves the clipper as it was.
        self.count, self.seen, self.warm = count, seen, warm
        self.mean, self.var = moments
        self._warming = None


def make_state(threshold: AutoClip | ZClip) -> _AutoClipState | _ZClipState:
    return _AutoClipState(threshold) if isinstance(threshold, AutoClip) else _ZClipState(threshold)


# ---------------------------------------------------------------------------------------------- AGC


@dataclass(frozen=True)
class AGC:
    """Unit-wise adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale Image Recognition
    Without Normalization"; the formulation of timm's ``adaptive_clip_grad``).

    For every unit (row along dim 0 of a parameter with 2+ dims, the whole of a 0/1-D parameter), with
    ``max = clipping * max(||w_unit||, eps)``: a gradient unit with ``||g_unit|| >= max`` is scaled to norm
    ``max`` (``g * max / max(||g_unit||, 1e-6)``), others are left alone. Norms are of the clipper's order. A NaN
    in a weight makes its unit's ``max`` NaN: where that unit's gradient is not zero the call is a non-finite one
    (``on_nonfinite`` applies, on every rank), as its coefficient would write NaN into the gradient.

    Attributes:
        clipping: the ratio λ (0.01 for batch sizes up to 4096 in the paper, smaller for larger batches).
        eps: floor on the weight norm, so zero-initialised units can still move.
        exclude: ``fnmatch`` patterns of parameter names left alone (the paper leaves the final classifier).
    """

    clipping: float = 0.01
    eps: float = 1e-3
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _real("AGC.clipping", self.clipping, low=0.0, low_open=True)
        _real("AGC.eps", self.eps, low=0.0)
        given = self.exclude
        if isinstance(given, (str, bytes, Mapping)) or not isinstance(given, Iterable):
            raise TypeError(
                f"AGC.exclude must be an iterable of name patterns (a tuple; not one str), got {type(given).__name__} "
                f"{given!r}"
            )
        # A tuple, whatever iterable came, made before the check reads it (a generator read by the check left no
        # pattern: nothing was excluded), and a set sorted: its order depends on each process's hash seed, and the
        # call's settings fingerprint (which holds this repr) read as the ranks disagreeing.
        patterns = tuple(sorted(given, key=repr) if isinstance(given, (set, frozenset)) else given)
        if not all(isinstance(x, str) for x in patterns):
            raise TypeError(f"AGC.exclude must be an iterable of name patterns (str), got {patterns!r}")
        object.__setattr__(self, "exclude", patterns)
        # Numbers as floats, so that 1 and 1.0 (or np.float64(0.01)) are the same settings on every rank.
        object.__setattr__(self, "clipping", float(self.clipping))
        object.__setattr__(self, "eps", float(self.eps))


@dataclass
class _Unit:
    """One local piece of one parameter with how it maps onto that parameter's units."""

    name: str
    grad: Tensor
    data: Tensor
    group: dist.ProcessGroup | None
    counted: bool
    kind: str  # "rows": a block of whole rows [row0, row0 + rows) (or the whole 0/1-D tensor); "flat": a range
    row0: int = 0
    start: int = 0  # flat: index of the first element in the flattened full parameter
    row_len: int = 1  # flat: elements per unit
    split_units: tuple[int, ...] = ()  # units of this parameter cut across ranks (global ids)
    rows: Tensor | None = None  # "rows": global ids of the local rows when they are not [row0, row0 + n)
    loss_scale: float = 1.0  # the gradient holds loss_scale times the gradient (DeepSpeed fp16)
    present: bool = True  # False: a zero stand-in for an absent gradient, there for its weight piece (no report)


# Elements per block of the unit-wise passes: torch's vector_norm(dtype=float64) converts its whole input first,
# and a bf16 gradient multiplied by float32 coefficients on the CPU goes through float32 copies of the input and
# the output: over whole gradients and weights that took 1-4 times their bytes (2 GiB more for a 256 Mi-element
# bf16 weight); per block it is 8 MiB at most.
_UNIT_BLOCK = 1 << 20


def _blocks(rows: int, cols: int) -> list[tuple[slice, slice]]:
    """(rows, columns) blocks of at most about ``_UNIT_BLOCK`` elements covering a ``rows x cols`` matrix: runs of
    whole rows, or pieces of one row where a row alone is larger."""
    if rows * cols <= _UNIT_BLOCK:
        return [(slice(None), slice(None))]
    if cols >= _UNIT_BLOCK:
        return [(slice(r, r + 1), slice(c, c + _UNIT_BLOCK)) for r in range(rows) for c in range(0, cols, _UNIT_BLOCK)]
    step = _UNIT_BLOCK // cols
    return [(slice(r, r + step), slice(None)) for r in range(0, rows, step)]


def _block_partials(x: Tensor, p: float) -> Tensor:
    if math.isinf(p):
        # no |x| copy; NaN propagates (a block stays in cache: two passes are 5x faster than aminmax over dim 1)
        return torch.maximum(x.amax(dim=1), x.amin(dim=1).neg()).to(torch.float64)
    norms = torch.linalg.vector_norm(x, p, dim=1, dtype=torch.float64)
    return norms if p == 1 else norms.square() if p == 2 else norms.pow(p)


def _row_partials(x: Tensor, p: float) -> Tensor:
    """Partials per row of a 2-D tensor (float64): sum |x|^p, or max |x| for inf."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=x.device)
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    blocks = _blocks(*x.shape)
    if len(blocks) == 1:
        return _block_partials(x, p)
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for rs, cs in blocks:
        part = _block_partials(x[rs, cs], p)
        if math.isinf(p):
            torch.maximum(out[rs], part, out=out[rs])
        else:
            out[rs] += part
    return out


def _mul_rows_(m: Tensor, c: Tensor) -> None:
    """``m[i, :] *= c[i]`` in place, a block at a time (see ``_UNIT_BLOCK``)."""
    for rs, cs in _blocks(*m.shape):
        m[rs, cs].mul_(c[rs].unsqueeze(1))


def _flat_segments(u: _Unit) -> list[tuple[int, int, int]]:
    """(unit id, offset in the local piece, length) of the head, whole-row block and tail of a flat piece."""
    n = u.grad.numel()
    out: list[tuple[int, int, int]] = []
    at, pos = 0, u.start
    head = min(n, (-pos) % u.row_len)
    if head:
        out.append((pos // u.row_len, 0, head))
        at, pos = head, pos + head
    rows = (n - at) // u.row_len
    if rows:
        out.append((-(pos // u.row_len) - 1, at, rows))  # negative id: a block of `rows` whole rows
        at += rows * u.row_len
        pos += rows * u.row_len
    if at < n:
        out.append((pos // u.row_len, at, n - at))
    return out


def _unit_partials(u: _Unit, x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(global unit ids, partials) of tensor ``x`` laid out like ``u.grad``."""
    dev = x.device
    if u.kind == "rows":
        if x.dim() <= 1:
            return torch.zeros(1, dtype=torch.long), _row_partials(x.reshape(1, -1), p)
        rows = x.shape[0]
        ids = u.rows if u.rows is not None else torch.arange(u.row0, u.row0 + rows)
        if x.numel() == 0:
            return ids, torch.zeros(rows, dtype=torch.float64, device=dev)
        return ids, _row_partials(x.reshape(rows, -1), p)
    ids: list[Tensor] = []
    parts: list[Tensor] = []
    flat = x.reshape(-1)
    for uid, off, length in _flat_segments(u):
        if uid >= 0:
            ids.append(torch.tensor([uid]))
            parts.append(_row_partials(flat[off : off + length].reshape(1, -1), p))
        else:
            first = -uid - 1
            ids.append(torch.arange(first, first + length))
            parts.append(_row_partials(flat[off : off + length * u.row_len].reshape(length, u.row_len), p))
    if not parts:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64, device=dev)
    return torch.cat(ids), torch.cat(parts)


def _apply_unit_coefs_(u: _Unit, coefs: Tensor) -> None:
    """Scale ``u.grad`` in place, each unit by its coefficient (``coefs`` aligned with ``_unit_partials``)."""
    g = u.grad
    if g.numel() == 0:
        return
    if not g.is_contiguous():
        work = g.contiguous()
        _apply_unit_coefs_(dataclasses.replace(u, grad=work), coefs)
        g.copy_(work)
        return
    # float32 (float64 for float64 gradients), never the gradient's own dtype: a coefficient rounded to fp16
    # first lost its digits (fp16 subnormals: 0.1-3% off) or became 0 (1e-9 zeroed a row of 500s, which fp16
    # holds as 4.8e-7). Multiplied by tensors of one or more dims (not 0-dim), the product is taken in that
    # precision and rounded once to the gradient's dtype, as the other modes scale.
    c = coefs.to(g.device, torch.float64 if g.dtype in (torch.float64, torch.complex128) else torch.float32)
    if u.kind == "rows":
        if g.dim() <= 1:
            _mul_rows_(g.view(1, -1), c.reshape(1))
        else:
            _mul_rows_(g.view(g.shape[0], -1), c)
        return
    flat = g.view(-1)
    at = 0
    for uid, off, length in _flat_segments(u):
        if uid >= 0:
            _mul_rows_(flat[off : off + length].view(1, -1), c[at : at + 1])
            at += 1
        else:
            _mul_rows_(flat[off : off + length * u.row_len].view(length, u.row_len), c[at : at + length])
            at += length


@dataclass(frozen=True)
class _DtGeometry:
    """How one DTensor parameter's local piece maps onto its units, and how it counts."""

    row0: int  # global id of the first local row (dim 0); only computed where rows are cut
    rows: Tensor | None  # global ids of the local rows when not one contiguous block (_StridedShard on dim 0)
    cut: Literal["", "unit", "rows"]  # "": rows whole here; "unit": the one unit of a 0/1-D param; "rows": all
    group: dist.ProcessGroup | None
    counted: bool
    here: bool  # this rank is on the parameter's mesh


def _dt_rows(name: str, param: Any, coord: list[int]) -> tuple[int, Tensor | None]:  # noqa: ANN401
    """(first global row, global row ids or None when contiguous) of the local piece along dim 0.

    Shard placements are applied left to right as ``compute_local_shape_and_global_offset`` does; a
    ``_StridedShard`` on dim 0 (FSDP2 over a tensor-parallel ``Shard(0)``) gives non-contiguous rows, whose
    ids are composed from each placement's own ``_local_shard_size_and_offset`` (torch's offset logic).
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from .adapters.fsdp import _is_distinct

    mesh, placements = param.device_mesh, tuple(param.placements)
    local_rows = int(param._local_tensor.shape[0])
    if not any(type(pl).__name__ == "_StridedShard" and pl.dim == 0 for pl in placements):
        _, offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
        return (int(offset[0]) if offset else 0), None
    from torch.distributed.tensor.placement_types import _StridedShardOffsetMode

    ids = torch.arange(int(param.shape[0]))
    for d, pl in enumerate(placements):
        if not _is_distinct(pl) or pl.dim != 0:
            continue
        if type(pl).__name__ == "_StridedShard":
            size, offs = pl._local_shard_size_and_offset(ids.numel(), mesh.size(d), coord[d],
                                                         offset_mode=_StridedShardOffsetMode.ALL)
            pick = torch.tensor(list(offs) if size else [], dtype=torch.long)
        else:
            size, off = pl._local_shard_size_and_offset(ids.numel(), mesh.size(d), coord[d])
            pick = torch.arange(int(off), int(off) + int(size))
        ids = ids[pick]
    if ids.numel() != local_rows:
        raise NotImplementedError(
            f"unit-wise clipping of {name!r}: placements {placements} give {ids.numel()} rows here but the local "
            f"tensor has {local_rows}; this _StridedShard layout is not supported"
        )
    return (int(ids[0]) if ids.numel() else 0), ids


def _dt_needs_world(params: list[tuple[str, Any]]) -> bool:  # noqa: ANN401
    """Whether the DTensor parameters must reduce over the world: a multi-dim mesh, or 1-D meshes of
    different groups (FSDP2 over tensor parallelism puts norms on the dp slice, matrices on dp x tp)."""
    from .adapters.fsdp import _dim_key, _root_mesh

    keys = set()
    world = dist.get_world_size() if dist.is_initialized() else 1
    for _, param in params:
        mesh = param.device_mesh
        root = _root_mesh(mesh)
        if mesh.ndim > 1 or root.size() < world:  # a mesh short of the world: the ranks off it read 0 alone
            return True
        keys.add(_dim_key(mesh, root, 0))
    return len(keys) > 1


def _dtensor_geometry(name: str, param: Any, world: bool, group: dist.ProcessGroup | None,  # noqa: ANN401
                      counting: Any = None) -> _DtGeometry:  # noqa: ANN401
    """Units, group and counting of a DTensor parameter.

    A unit is a row along dim 0 (the whole tensor for 0/1-D). Rows stay whole unless the parameter is sharded
    along a dim > 0 on a mesh dim of size > 1 (tensor parallelism's ``Shard(1)``): then every row is cut and
    its partials are combined across ranks. A sharded 0/1-D parameter is one cut unit. ``world``: reduce over
    ``group`` (or the world) and count each piece once, on coordinate 0 of the mesh's ``Replicate`` dims and
    (without ``group``) on the sibling slice of its root mesh that holds the root's first rank (with it, as
    ``counting``, a :class:`~dist_clip.adapters.fsdp.GroupCounting`, decides); otherwise the mesh is 1-D and
    reduces over its own group.
    """
    from .adapters.fsdp import _counted_here, _is_distinct, _root_mesh

    mesh, placements = param.device_mesh, tuple(param.placements)
    if any(pl.is_partial() for pl in placements):
        raise NotImplementedError(
            f"unit-wise clipping of {name!r} with placements {placements}: a Partial parameter is not supported; "
            "redistribute it to Shard/Replicate"
        )
    distinct = [_is_distinct(pl) for pl in placements]
    spread = [d for d, is_d in enumerate(distinct) if is_d and mesh.size(d) > 1]
    if param.dim() <= 1:
        cut: Literal["", "unit", "rows"] = "unit" if spread else ""
    else:
        cut = "rows" if any(placements[d].dim > 0 for d in spread) else ""
    root = _root_mesh(mesh)
    if world and group is None and root.size() != dist.get_world_size():
        raise NotImplementedError(
            f"unit-wise clipping of {name!r}: its mesh {tuple(mesh.shape)} is cut from a root mesh of "
            f"{root.size()} ranks, not the world ({dist.get_world_size()}); pass group= naming the root's ranks"
        )
    coord = mesh.get_coordinate()
    if coord is None:  # this rank holds nothing of it
        return _DtGeometry(0, None, cut, None, False, False)
    # Unit ids are looked up only for cut rows; whole rows and 0/1-D units never need them (no per-step work).
    row0, rows = _dt_rows(name, param, coord) if cut == "rows" else (0, None)
    if world:
        pg = group if group is not None else dist.group.WORLD
        if counting is not None:
            counted = counting.counted(name, mesh, root, coord, distinct)
            if cut and id(mesh) in counting.apart:
                # Cut units are combined by (name, unit) over the group: the stages' units would be mixed.
                raise NotImplementedError(
                    f"unit-wise clipping of {name!r}: its units are cut across ranks, and group= spans other "
                    "slices of its mesh that hold other pieces (pipeline stages), whose units would be combined "
                    "with its own; clip each stage's AGC without group=, or use mode='per_param'"
                )
        else:
            counted = _counted_here(mesh, root, coord, distinct, siblings=True)
    elif not spread:  # every rank holds all of it (Replicate, or sharded over one rank): nothing to combine
        pg, counted = None, True  # (reduced over the mesh, all-Replicate layouts cost AGC the collective the
        #                           other modes do without)
    else:
        pg = mesh.get_group()
        counted = all(c == 0 for c, d in zip(coord, distinct) if not d)
    return _DtGeometry(row0, rows, cut, pg, counted, True)


def unit_pieces(
    target: object, group: dist.ProcessGroup | None, *, refusing: bool = False
) -> tuple[list[_Unit], list[tuple[str, int | range]], tuple[str, ...]]:
    """Every local piece of ``target`` with its unit geometry, the cut units (identical on every rank) and names.

    Cut units are listed by (parameter name, unit id) in an order every rank derives from the model's
    structure alone; (parameter name, range of unit ids) is a parameter whose every unit is cut (a
    tensor-parallel ``Shard(1)`` weight), combined as one block of the buffer.

    ``refusing``: the layout of a rank that refuses its input (:func:`unitwise_join_refused`): a listed tensor
    that is no parameter (refused with a ``TypeError`` otherwise) is laid out as a parameter without gradient,
    as the ranks holding that parameter lay it out, and a DTensor gradient whose placements are not its
    parameter's (refused with ``NotImplementedError``) as no gradient, as a rank holding none of it does.
    """
    units: list[_Unit] = []
    cut: list[tuple[str, int | range]] = []
    target = unwrap_compiled(target)
    custom = _slots._custom_adapter(target)
    if custom is not None:  # (a module it takes was read as plain parameters: each rank's own units, 40% off)
        raise TypeError(
            f"unit-wise clipping does not take targets of a user adapter ({getattr(custom, '__name__', custom)}): "
            "its Shards carry no unit geometry; use mode='total' or 'per_param' there"
        )
    if _slots.is_fsdp1(target):
        layout = _slots.fsdp1_pieces(target, group)  # type: ignore[arg-type]
        for name in layout.names:
            shape, cuts = layout.geometry[name]
            numel = int(math.prod(shape))
            row_len = numel // shape[0] if len(shape) >= 2 and shape[0] > 0 else max(numel, 1)
            cut.extend((name, c // row_len) for c in cuts if c % row_len)
        if layout.apart:
            # Refused whether or not this stage's rows are cut between shards (another stage's may be: it
            # raised alone, and the stages without a cut row waited in the collective until the timeout).
            name = next(n for n in layout.names if n in layout.apart)
            raise NotImplementedError(
                f"unit-wise clipping of {name!r}: it is sharded by FSDP1 over fewer ranks than group= holds, "
                "and the ranks beyond hold other pieces (pipeline stages), whose units cut between shards would "
                "be combined by name with its own; clip each stage's AGC without group=, or use mode='per_param'"
            )
        cut_by_name: dict[str, list[int]] = {}
        for name, uid in cut:
            cut_by_name.setdefault(name, []).append(uid)
        for piece in layout.pieces:
            if piece.grad is None:
                continue
            numel = int(math.prod(piece.shape))
            row_len = numel // piece.shape[0] if len(piece.shape) >= 2 and piece.shape[0] > 0 else max(numel, 1)
            units.append(_Unit(piece.name, piece.grad, piece.data, piece.group, piece.counted, "flat",
                               start=piece.start, row_len=row_len,
                               split_units=tuple(cut_by_name.get(piece.name, ()))))
        for name, param in layout.unmanaged:
            if param.grad is not None:
                units.append(_Unit(name, param.grad, param.detach(), None, True, "rows"))
        if layout.group is not None and layout.names:
            # Join the reduction even holding nothing (a rank whose shards are padding only); not a gradient piece.
            empty = layout.optim[layout.names[0]].detach().new_zeros(0)  # the model's dtype and device
            units.append(_Unit(layout.names[0], empty, empty, layout.group, False, "flat"))
        return units, cut, layout.names
    wrapped = _wrapper_layout(target, group)  # DeepSpeed engines, fairscale: the adapter places its pieces
    if wrapped is not None:
        return _layout_units(wrapped)
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(target, DistributedDataParallel):
        from .adapters.params import check_ddp_synced

        check_ddp_synced(target)
        items, group = _slots.module_parameters(target.module), None
    elif isinstance(target, nn.Module):
        items = _slots.module_parameters(target)
    elif isinstance(target, Mapping):
        if not all(isinstance(k, str) for k in target):  # (as the other modes: the report's keys are names)
            bad = next(k for k in target if not isinstance(k, str))
            raise TypeError(f"a mapping target needs str keys (parameter names), got {type(bad).__name__} {bad!r}")
        items = list(listed_stand_ins([(k, target[k]) for k in sorted(target)]))
    elif isinstance(target, Tensor):
        # As one listed: refused where FSDP2 has not reduced its gradient (each rank's own read), and the sharded
        # parameter standing in for an unsharded one (set_reshard_after_backward(False): its None read 0)
        items = list(listed_stand_ins([("0", target)]))
    elif isinstance(target, Iterable) and not isinstance(target, (str, bytes)):
        items = list(listed_stand_ins([(str(i), t) for i, t in enumerate(target)]))
    else:
        raise TypeError(
            "unit-wise clipping needs parameters: a module, a tensor, an iterable of tensors or a mapping of names "
            f"to tensors, got {type(target).__name__}"
        )
    names: list[str] = []
    # Parameters a DDP or a composable replicate() holds: copies over its group, whole on each of its ranks (under
    # group= they were read as the caller's pieces of one parameter, summed: 1.20 for 0.85 over two stages).
    dtensors = [(n, q) for n, q in items if type(q).__name__ == "DTensor"]
    # Without group=, beside DTensors too: the call then reduces over their groups, and the DDP blocks' copies
    # (experts under a DDP over their dp group beside FSDP2 on the world) were counted on its first rank only.
    replicas = (replica_groups(target) if (group is not None or dtensors) and isinstance(target, nn.Module)
                else {})
    ddp_units: list[tuple[int, dist.ProcessGroup]] = []
    peers = copy_peers(q for _, q in items) if replicas else set()  # (ranks holding copies: tensor parallelism's)
    world = bool(dtensors) and (group is not None or _dt_needs_world(dtensors))
    counting = None
    if world and group is not None:
        from .adapters.fsdp import GroupCounting

        on_mesh = [q.device_mesh for _, q in dtensors if q.device_mesh.get_coordinate() is not None]
        counting = GroupCounting(group, on_mesh)
    seen: set[int] = set()
    for name, param in items:
        # (a tensor given a .grad is a parameter, as everywhere else: adapters.params.is_parameter)
        stray = isinstance(param, Tensor) and not (
            isinstance(param, nn.Parameter) or param.requires_grad or param.grad is not None
        )
        if not isinstance(param, Tensor) or (stray and not refusing):
            raise TypeError(
                f"unit-wise clipping needs parameters (it reads their values), got {type(param).__name__} at {name!r}"
            )
        if id(param) in seen:  # a tied weight listed twice ({"emb": w, "head": w}): counted and scaled once
            continue
        seen.add(id(param))
        # A sharding wrapper's parameters reached past it (FSDP1's or fairscale FSDP's parameters(), a container
        # holding the wrapper): refused as in the other modes (each rank clipped its flat shard as one whole
        # unit: 1.63 and 4.84 for 5.11).
        refuse_managed(name, param)
        names.append(name)
        is_dt = type(param).__name__ == "DTensor"
        if is_dt:
            geo = _dtensor_geometry(name, param, world, group, counting)
            if geo.cut == "unit":
                cut.append((name, 0))
            elif geo.cut == "rows":
                cut.append((name, range(int(param.shape[0]))))  # one block: every row is cut
            g = None if stray else param.grad
            if refusing and type(g).__name__ == "DTensor" and tuple(g.placements) != tuple(param.placements):
                g = None  # (refused below: laid out as a rank holding none of it, as the others may)
            if not geo.here:
                continue
            if g is None:
                # Joins the reduction over this parameter's mesh without a gradient piece (not counted): a rank
                # whose DTensor gradients were all None skipped the collective, returned 0 and left the other
                # ranks waiting until the timeout (the other modes joined already).
                empty = param._local_tensor.detach().new_zeros(0)
                units.append(_Unit(name, empty, empty, geo.group, False, "rows"))
                continue
            if type(g).__name__ == "DTensor":
                refuse_partial(name, tuple(g.placements))  # (as the other modes: not "placements differ")
                if tuple(g.placements) != tuple(param.placements):
                    raise NotImplementedError(
                        f"unit-wise clipping of {name!r}: its gradient has placements {tuple(g.placements)}, its "
                        f"parameter {tuple(param.placements)} (torch gives a vocab-parallel nn.Embedding a Replicate "
                        "gradient); redistribute it first: p.grad = p.grad.redistribute(p.device_mesh, p.placements)"
                    )
                g = g._local_tensor
            units.append(_Unit(name, g, param._local_tensor.detach(), geo.group, geo.counted, "rows",
                               row0=geo.row0, split_units=(0,) if geo.cut == "unit" else (), rows=geo.rows))
        else:
            # Plain tensors with group= are pieces of the same parameters on the group's ranks (matched by
            # position): a 0/1-D one is one unit cut across them, its partials combined as a sharded DTensor's
            # (each rank clipped its piece as a whole unit: 0.01 for 0.0063 on 2 ranks). 2-D ones are whole rows.
            copies = replicas.get(id(param))
            # Beside DTensor parameters, plain ones are those FSDP2 left unsharded: copies on every rank, counted
            # once, as in the other modes (with group= they were summed as the caller's pieces: AGC counted
            # them once per rank).
            beside = bool(dtensors)
            split = group is not None and param.dim() <= 1 and copies is None and not beside
            if split:
                cut.append((name, 0))
            grad = None if stray else param.grad
            present = grad is not None
            if grad is None and split:
                # Its weight piece still counts in the unit's weight norm (left out, the other ranks' limit was
                # that of their own pieces: 0.05 for 0.50), beside a gradient piece of zeros.
                grad = torch.zeros_like(param.detach())
            if grad is not None:
                counted = copies is None or group is None or copy_counted_here(copies, group, peers)
                # (a DDP or replicate() block beside DTensors: copies over its own group, counted as above)
                mine = None if beside and copies is None else group
                if group is None and copies is not None:
                    ddp_units.append((len(units), copies))
                units.append(_Unit(name, grad, param.detach(), mine, counted, "rows",
                                   split_units=(0,) if split else (), present=present))
    reduce_over = _reduce.reduction_group([u.group for u in units]) if ddp_units else None
    if reduce_over is not None:
        for i, copies in ddp_units:  # each DDP group's copy once, on its lowest rank in the call's reduction
            # (with the ranks holding copies of it whatever their DDP group: tensor parallelism's)
            units[i].group, units[i].counted = reduce_over, copy_counted_here(copies, reduce_over, peers)
    return units, cut, tuple(dict.fromkeys(names))


def _wrapper_layout(target: object, group: dist.ProcessGroup | None) -> UnitLayout | None:
    """The adapter's unit layout of a DeepSpeed engine or a fairscale target; ``None`` for anything else."""
    engine = sys.modules.get("deepspeed.runtime.engine")  # never import DeepSpeed here: it takes seconds
    if engine is not None and isinstance(target, engine.DeepSpeedEngine):
        from .adapters import deepspeed as ds_adapter

        return ds_adapter.unit_layout(target, group)
    from .adapters import fairscale as fs_adapter

    if fs_adapter.matches(target):  # reads sys.modules only: never imports fairscale
        return fs_adapter.unit_layout(target, group)
    return None


def _row_len(shape: torch.Size) -> int:
    """Elements per unit of a parameter of ``shape``: a row along dim 0, or the whole 0/1-D tensor."""
    numel = int(math.prod(shape))
    return numel // shape[0] if len(shape) >= 2 and shape[0] > 0 else max(numel, 1)


def _layout_units(layout: UnitLayout) -> tuple[list[_Unit], list[tuple[str, int | range]], tuple[str, ...]]:
    """Units of an adapter's :class:`UnitLayout`: flat pieces placed by their start offset, whole ones as rows.

    Every rank gets one empty unit per group of the layout, so a rank holding no piece still joins the one
    collective, with the same loss scale.
    """
    cut: list[tuple[str, int | range]] = []
    for name in layout.names:  # identical order on every rank
        if name in layout.geometry:
            shape, cuts = layout.geometry[name]
            row_len = _row_len(shape)
            cut.extend(dict.fromkeys((name, c // row_len) for c in cuts if c % row_len))
    unknown = set(layout.geometry) - set(layout.names)
    if unknown:
        raise RuntimeError(f"unit layout places parameters it does not name: {sorted(unknown)[:3]}")
    split: dict[str, tuple[int, ...]] = {}
    for name, uid in cut:
        split[name] = split.get(name, ()) + (uid,)  # type: ignore[operator]
    scale = float(layout.loss_scale)
    units: list[_Unit] = []
    for pc in layout.pieces:
        if pc.start is None:
            units.append(_Unit(pc.name, pc.grad, pc.data, pc.group, pc.counted, "rows", loss_scale=scale))
            continue
        if pc.name not in layout.geometry or pc.grad.numel() != pc.data.numel() or pc.grad.dim() != 1:
            raise RuntimeError(f"unit layout: the flat piece of {pc.name!r} has no geometry or differs from its "
                               f"values ({tuple(pc.grad.shape)} vs {tuple(pc.data.shape)})")
        units.append(_Unit(pc.name, pc.grad, pc.data, pc.group, pc.counted, "flat", start=pc.start,
                           row_len=_row_len(layout.geometry[pc.name][0]), split_units=split.get(pc.name, ()),
                           loss_scale=scale))
    if layout.names:
        empty = torch.zeros(0, device=layout.device)
        for g in layout.groups:  # join every group even holding nothing; not a gradient piece of names[0]
            units.append(_Unit(layout.names[0], empty, empty, g, False, "flat", loss_scale=scale))
    return units, cut, layout.names


@dataclass(frozen=True)
class UnitwiseOutcome:
    total: Tensor  # float64 0-dim, pre-clip norm over every gradient
    names: tuple[str, ...]
    measurement: _slots.Measurement  # the one collective's outcome: per-name norms and presence (for reports)
    min_coef: Tensor  # float64 0-dim, the smallest unit coefficient applied on any rank (1 when nothing clipped)
    group: dist.ProcessGroup | None
    units: list[_Unit]
    coefs: list[Tensor]  # per unit piece, aligned with _unit_partials
    agreed: Tensor  # float64 0-dim: the combined ``agreed`` value (the call's _fused.Agreement verdict)


def _add_partials_(extra: Tensor, k: int, where: Tensor, wp: Tensor, gp: Tensor, p: float) -> None:
    """Fold weight and gradient partials into the cut-unit buffer ``[weights (k), gradients (k)]``."""
    if math.isinf(p):
        extra[:k].scatter_reduce_(0, where, wp, reduce="amax")
        extra[k:].scatter_reduce_(0, where, gp, reduce="amax")
    else:
        extra[:k].index_add_(0, where, wp)
        extra[k:].index_add_(0, where, gp)


def _unit_coefs(wp: Tensor, gp: Tensor, p: float, loss_scale: float, config: AGC, name: str,
                dtype: torch.dtype | None) -> Tensor:
    """AGC's coefficients of units from their weight and gradient partials, in the gradient's precision (float32
    unless float64); all ones for a parameter ``config.exclude`` names."""
    wn = _norm.finalize(wp, p)
    gn = _norm.finalize(gp, p)
    if loss_scale != 1.0:  # loss-scaled pieces: compare the true gradient; the coefficient scales either
        gn = gn / loss_scale
    limit = wn.clamp(min=config.eps) * config.clipping
    # A zero gradient unit is left as it is whatever its limit (with eps=0 and a zero weight the limit is 0 and
    # the formula gives 0: a parameter without gradient anywhere made clip_coef 0 and clipped True).
    coef = torch.where((gn < limit) | (gn == 0), torch.ones_like(gn), limit / gn.clamp(min=1e-6))
    if math.isinf(config.clipping):
        # clipping=inf is no limit, as max_norm=inf is (_scale.clip_coefficient): a unit norm that reads inf (an inf
        # entry, or p = 100 on finite entries of 2e3) met inf / inf = NaN, and the unit's finite entries became NaN
        # (timm's formula does that); so did a NaN in the weight (its limit inf * NaN). A NaN unit norm stays NaN.
        coef = torch.where(gn.isnan(), coef, torch.ones_like(coef))
    coef = coef.to(torch.float64 if dtype == torch.float64 else torch.float32)  # the gradient's precision
    if name and any(fnmatch.fnmatchcase(name, pat) for pat in config.exclude):
        coef = torch.ones_like(coef)
    return coef


def _check_units(units: Iterable[_Unit]) -> None:
    """Refuse the gradients unit-wise clipping cannot measure or scale (before anything is measured)."""
    for u in units:
        if u.grad.is_sparse or u.grad.is_complex() or u.data.is_complex():
            # AGC's units are rows of a real weight; the other modes measure these, unit-wise clipping does not.
            raise TypeError(
                f"mode='unitwise' needs dense real gradients and weights, got a {u.grad.dtype} "
                f"{'sparse ' if u.grad.is_sparse else ''}gradient for {u.name!r}; use mode='total' or 'per_param'"
            )
        if (u.grad.shape != u.data.shape) if u.kind == "rows" else (u.grad.numel() != u.data.numel()):
            # Units are read off the gradient and the weight alike (rows along dim 0, or flat ranges): a weight
            # whose data was replaced after the backward by one of another shape (w.data = torch.ones(20) beside
            # a (4, 5) gradient) gave every row the whole weight's limit, silently, or torch's "The size of
            # tensor a (4) must match the size of tensor b (5)" from inside the measuring.
            raise ValueError(
                f"mode='unitwise' needs each gradient shaped as its weight (it compares their units row by row); "
                f"{u.name!r} has a gradient of shape {tuple(u.grad.shape)} and a weight of shape "
                f"{tuple(u.data.shape)}: give the parameter a gradient of its own shape, or use mode='total' or "
                "'per_param'"
            )
        if any(st == 0 and n > 1 for n, st in zip(u.grad.shape, u.grad.stride())):
            # Units sharing memory (an expand()) would each write their own coefficient into it: torch's copy
            # refused it after the other gradients were scaled.
            raise ValueError(
                f"mode='unitwise' needs gradients whose elements own their memory; {u.name!r}'s has stride 0 "
                f"(an expand(), shape {tuple(u.grad.shape)}, strides {u.grad.stride()}): set p.grad to its "
                "clone() first, or use mode='total' or 'per_param'"
            )


def _cut_layout(
    cut: Iterable[tuple[str, int | range]],
) -> tuple[dict[tuple[str, int], int], dict[str, tuple[int, int]], int]:
    """Where each cut unit's partials lie in the call's extra values: (cut unit -> position, a parameter whose
    every unit is cut -> (first position, first id), the number of cut units)."""
    cut_index: dict[tuple[str, int], int] = {}
    blocks: dict[str, tuple[int, int]] = {}
    k = 0
    for cname, uid in cut:
        if isinstance(uid, range):
            blocks[cname] = (k, uid.start)
            k += len(uid)
        else:
            cut_index[(cname, uid)] = k
            k += 1
    return cut_index, blocks, k


def _join_refused(units: list[_Unit], cut: list[tuple[str, int | range]], names: tuple[str, ...],
                  index: dict[str, int], p: float, group: dist.ProcessGroup | None, settings: str) -> bool:
    """:func:`unitwise_measure`'s collective for a rank that refused its input: the others' layout, nothing
    measured, a NaN fingerprint (see :func:`dist_clip._slots.measure`), so that they raise ``RuntimeError``
    (:data:`dist_clip._slots.REFUSED`) now. The caller raises its own error after it (a peer gone or silent
    until the timeout: the caller's error all the same). Whether the others went on (off the CPU, where they
    read NaN norms instead of raising, and count the call): see :meth:`GradClipper._count_refused_call`."""
    red = _reduce.reduction_group([u.group for u in units] + ([group] if group is not None else []))
    if red is None or _reduce.group_size(red) <= 1:  # nothing combined
        return False
    k = _cut_layout(cut)[2]
    shards = [Shards([u.grad], group=u.group, counted=False, names=[u.name]) for u in units]
    extra = torch.zeros(2 * k + _reduce.group_size(red) + 1, dtype=torch.float64)
    layout = [*names, *(f"{c[0]}:{c[1]}" for c in cut)]
    try:
        _slots.measure(shards, lambda n, _i: index[n], max(len(names), 1), p, None, presence=True, extra=extra,
                       layout=layout, group=red, result_dtype=torch.float32, refused=True, settings=settings)
    except RuntimeError:
        return False  # (REFUSED, this rank's own NaN fingerprint; or the collective's failure)
    return True


def unitwise_join_refused(target: object, p: float, group: object, settings: str) -> bool | None:
    """Bad input a rank found before a ``mode="unitwise"`` call (an ``optimizer=`` of another type, a bad
    ``report=``), which the other ranks may not share: join their one collective with the layout they send (the
    units' names and cut units, known from the target alone) and a NaN fingerprint, so that they raise
    ``RuntimeError`` now instead of waiting in it until the process group's timeout. None where it did not
    join, the layout unknown here (a target or ``group=`` that does not resolve, ``norm_type=0``) or nothing
    combined (a DDP target, one process); else whether the others went on (see :func:`_join_refused`)."""
    from torch.nn.parallel import DistributedDataParallel

    if not (dist.is_available() and dist.is_initialized()) or p == 0:
        return None
    try:
        if isinstance(unwrap_compiled(target), DistributedDataParallel):
            return None
        checked = _clip._check_group(group)
        with _clip._partial_grads_set_aside(target) as planned:  # (as a rank holding none of them)
            units, cut, names = unit_pieces(planned, checked, refusing=True)
    except Exception:  # noqa: BLE001 - the layout is unknown: the caller raises its error alone
        return None
    return _join_refused(units, cut, names, {n: i for i, n in enumerate(names)}, p, checked, settings)


def unitwise_measure(target: object, config: AGC, p: float, foreach: bool | None,
                     group: dist.ProcessGroup | None, settings: str = "",
                     agreed: Callable[[bool], Tensor] | None = None) -> UnitwiseOutcome:
    """Measure per-unit weight and gradient norms (cut units combined) and per-parameter norms, ONE collective.

    ``agreed``: what this rank sends of the call's :class:`dist_clip._fused.Agreement` given whether the call
    combines over several ranks (:meth:`~dist_clip._fused.Agreement.sent`: its 0/1 read, or 0 unread where it
    combines over none), one more value in the same all-reduce (0 where None: every call sends it, so the layout
    never depends on a rank's state).

    Gradients it cannot take (sparse, complex, stride 0) on this rank alone join the other ranks' collective
    (see :func:`unitwise_join_refused`), then are raised: they raised alone, and the others waited in the
    collective until the process group's timeout (1800 s under ``dist-clip``)."""
    if p == 0:
        raise ValueError("unit-wise clipping needs a norm order p > 0 or inf, got norm_type=0")
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(unwrap_compiled(target), DistributedDataParallel):
        # Replicas: nothing to combine, as in the other modes. Reduced over group= they were counted on its
        # first rank only, and another DDP group's ranks took that group's norms and NaN verdict.
        group = None
    try:
        units, cut, names = unit_pieces(target, group)
    except Exception as e:  # noqa: BLE001 - joined only where the layout is known without the refused pieces
        # A refusal of this rank's pieces (a Partial gradient: the others hold none of that parameter, or a
        # reduced one) joins as a rank holding none of them (see unitwise_join_refused); it raised alone, and the
        # others paired their collective with this rank's next call.
        joined = unitwise_join_refused(target, p, group, settings)
        if joined is not None:
            e.dist_clip_others_counted, e.dist_clip_joined = joined, True  # type: ignore[attr-defined]
        raise
    index = {n: i for i, n in enumerate(names)}
    try:
        _check_units(units)
        cut_index, blocks, k = _cut_layout(cut)  # (blocks: a parameter whose every unit is cut)
        red = _reduce.reduction_group([u.group for u in units] + ([group] if group is not None else []))
        # (a stand-in is not counted there: zeros add nothing to the norms, its parameter stays out of reports)
        shards = [Shards([u.grad], group=u.group, counted=u.counted and u.present, names=[u.name],
                         loss_scale=u.loss_scale) for u in units]
        device = _reduce.home_device((t for s in shards for t in s.tensors), red)
        # The cut units' partials, then one value per rank of the reduction: the smallest coefficient of the units
        # this rank holds whole, at its own position (zeros elsewhere), so that after the sum (or max) every
        # rank reads every rank's smallest and all report the same one (each reported its own: clipped on one
        # rank only).
        n_ranks = _reduce.group_size(red) if red is not None else 1
        me = _reduce.group_rank(red) if red is not None else 0
        # ... and last, this rank's read of the agreed skip flags (see _fused.Agreement)
        extra = torch.zeros(2 * k + n_ranks + 1, dtype=torch.float64, device=device)
        if agreed is not None:
            extra[-1:] = _reduce.moved(agreed(n_ranks > 1).reshape(1).to(torch.float64), device)
        first = me == 0
        local: list[tuple[Tensor, Tensor, Tensor]] = []  # per unit piece: (ids, weight partials, grad partials)
        whole: list[Tensor | None] = []  # per unit piece: its coefficients where no unit is cut (None: redo all)
        in_block: dict[int, Tensor] = {}  # unit piece -> positions of its rows in the extra buffer
        mine = torch.ones((), dtype=torch.float64, device=device)
        for i, u in enumerate(units):
            ids, gp = _unit_partials(u, u.grad, p)
            _, wp = _unit_partials(u, u.data, p)
            gp, wp = gp.to(device), wp.to(device)
            local.append((ids, wp, gp))
            contributes = u.counted and (u.group is not None or first)
            pos: list[int] = []
            if u.name in blocks:  # every row cut (tensor parallelism's Shard(1)): vectorised, no per-row Python
                at, first_id = blocks[u.name]
                in_block[i] = _reduce.moved(ids, device) - first_id + at
                if contributes:
                    _add_partials_(extra, k, in_block[i], wp, gp, p)
            elif u.split_units:
                pos = [j for j, uid in enumerate(ids.tolist()) if (u.name, uid) in cut_index]
                if pos and contributes:
                    where = _on(device, [cut_index[(u.name, int(ids[j]))] for j in pos])
                    sel = _on(device, pos)
                    _add_partials_(extra, k, where, wp[sel], gp[sel], p)
            if i in in_block:
                whole.append(None)
                continue
            coef = _unit_coefs(wp, gp, p, u.loss_scale, config, u.name, u.grad.dtype)
            whole.append(None if pos else coef)
            kept = coef
            if pos:  # the rows cut across ranks are counted from the combined buffer below, on every rank
                keep = torch.ones(coef.numel(), dtype=torch.bool, device=device)
                keep[_on(device, pos)] = False
                kept = torch.where(keep, coef, torch.full_like(coef, math.inf))  # (a boolean index is a host sync)
            if kept.numel():
                mine = torch.minimum(mine, kept.min().to(device, torch.float64))
        extra[2 * k + me] = mine
    except Exception as e:  # noqa: BLE001 - any error of this rank's own pieces (see _slots.measure)
        # (a gradient it cannot take, or one torch cannot read: a meta gradient's NotImplementedError raised
        # alone, and this rank's next call met the others' collective: gloo aborted the process on its length)
        e.dist_clip_others_counted = _join_refused(units, cut, names, index, p, group, settings)  # type: ignore[attr-defined]
        e.dist_clip_joined = True  # type: ignore[attr-defined]
        raise
    layout = [*names, *(f"{c[0]}:{c[1]}" for c in cut)]  # the slots, then the cut units' order in ``extra``
    result_dtype = _clip._result_dtype([u.grad for u in units], None)
    m = _slots.measure(shards, lambda n, _i: index[n], max(len(names), 1), p, foreach, presence=True,
                       extra=extra, layout=layout, group=red, result_dtype=result_dtype, settings=settings)
    assert m.extra is not None
    combined = m.extra[: 2 * k]
    smallest = m.extra[2 * k : 2 * k + n_ranks].min()
    if k:  # every cut unit's coefficient, from the combined partials every rank holds
        cut_names = [c[0] for c in cut for _ in (c[1] if isinstance(c[1], range) else (0,))]
        excluded = _on(device, [any(fnmatch.fnmatchcase(n, pat) for pat in config.exclude) for n in cut_names])
        cut_coefs = _unit_coefs(combined[:k], combined[k:], p, m.loss_scale, config, "", m.result_dtype)
        smallest = torch.minimum(smallest, torch.where(excluded, 1.0, cut_coefs.to(torch.float64)).min())
    coefs: list[Tensor] = []
    for i, (u, (ids, wp, gp)) in enumerate(zip(units, local)):
        known = whole[i]
        if known is not None:
            coefs.append(known)
            continue
        if i in in_block:
            wp, gp = combined[:k][in_block[i]], combined[k:][in_block[i]]
        else:
            hits = [(j, cut_index[(u.name, uid)]) for j, uid in enumerate(ids.tolist()) if (u.name, uid) in cut_index]
            sel = _on(device, [j for j, _ in hits])
            src = _on(device, [c for _, c in hits])
            wp = wp.clone()
            gp = gp.clone()
            wp[sel] = combined[:k][src]
            gp[sel] = combined[k:][src]
        coefs.append(_unit_coefs(wp, gp, p, u.loss_scale, config, u.name, u.grad.dtype))
    return UnitwiseOutcome(m.total, names, m, smallest, red, units, coefs, m.extra[-1])


def _on(device: torch.device, values: list) -> Tensor:
    """A host list as a tensor on ``device``, copied without a host sync (``torch.tensor(..., device=cuda)``
    copies blocking, which CUDA's sync debug mode reports)."""
    return _reduce.moved(torch.tensor(values), device)


def unitwise_scale_(outcome: UnitwiseOutcome) -> None:
    for u, coef in zip(outcome.units, outcome.coefs):
        if coef.numel():
            _apply_unit_coefs_(u, coef)

