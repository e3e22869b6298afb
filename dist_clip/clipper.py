"""A stateful clipper beside the functional API: per-parameter and per-group limits, reports, adaptive
thresholds, unit-wise AGC and a non-finite policy, each with one collective per call.

::

    clipper = dist_clip.GradClipper(max_norm=1.0, on_nonfinite="skip")
    loss.backward()
    result = clipper(model, optimizer=optimizer)   # every rank; result holds device tensors
    optimizer.step()                               # a no-op when the norm was not finite

Every mode measures into the slots of :mod:`dist_clip._slots` and reduces one float64 vector with one
all-reduce; every decision (clip or not, skip or not, the adaptive threshold) is taken from that vector, so it
is identical on every rank. No host sync on CUDA except where a mode needs host values: ``on_nonfinite="error"``
(to raise), ``report=True`` (to build the dict) and a non-fused optimizer under ``on_nonfinite="skip"`` whose
state lives on the host (see :func:`skip_next_step_`).
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import functools
import math
import numbers
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from . import _fused, _norm, _reduce, _scale, _slots
from . import clip as _clip
from ._reduce import same_ranks
from .adapters import resolve, unwrap_compiled
from .adapters.params import refuse_stepped_in_backward
from .adaptive import (
    AGC,
    AutoClip,
    ZClip,
    _AutoClipState,
    _int,
    _ZClipState,
    make_state,
    unitwise_join_refused,
    unitwise_measure,
    unitwise_scale_,
)
from .compose import ParallelPlan
from .shards import Shards

__all__ = ["ClipResult", "ClipperConfig", "GradClipper", "skip_next_step_"]

Mode = Literal["total", "per_param", "per_group", "unitwise"]
OnNonFinite = Literal["error", "skip", "zero", "ignore"]
MODES: tuple[str, ...] = ("total", "per_param", "per_group", "unitwise")
POLICIES: tuple[str, ...] = ("error", "skip", "zero", "ignore")
_STATE_VERSION = 1
_NONE = object()  # an absent param group entry
# Param group entries a skipped step leaves as they are: the learning rate is its scheduler's (torch's write it,
# a step pre-hook or a subclass's step may step one: put back, a chainable schedule lagged its own counter for
# good, ExponentialLR's lr a factor gamma per skipped step, as no scheduler stepped after step() does).
_SCHEDULED = ("params", "lr")


@dataclass(frozen=True)
class ClipperConfig:
    """What a :class:`GradClipper` does; frozen, so a checkpoint can record it and a run can compare it.

    Attributes:
        max_norm: a fixed limit ``>= 0``, or an adaptive one (:class:`~dist_clip.AutoClip`,
            :class:`~dist_clip.ZClip`; ``mode="total"`` only). In ``per_group`` mode a param group's own
            ``"max_norm"`` entry overrides it.
        norm_type: the order ``p >= 0`` or ``inf``/``"inf"``, as in the functional API.
        mode: ``"total"`` (one norm, as ``clip_grad_norm_``), ``"per_param"`` (each parameter's norm across all
            its shards against ``max_norm``), ``"per_group"`` (each optimizer param group's norm against its
            own limit), ``"unitwise"`` (AGC, configured by ``agc``).
        on_nonfinite: when the total norm is NaN or infinite (in ``"unitwise"`` mode also where a unit's
            coefficient is NaN: a NaN in its weight, with a gradient not zero): ``"error"`` raises
            ``RuntimeError`` on every rank naming the ranks and parameters holding non-finite values; ``"skip"``
            turns the next ``optimizer.step()`` into a no-op (needs ``optimizer=``; on a DeepSpeed engine the
            next ``engine.step()``, through DeepSpeed's overflow path under ZeRO 1-3); ``"zero"`` zeroes every
            gradient; ``"ignore"`` scales by the non-finite coefficient, as ``torch.nn.utils.clip_grad_norm_``
            does (on a DeepSpeed engine a NaN one by 1: see :func:`dist_clip.adapters.deepspeed.applied_coefficient`).
        report: return the norm of every parameter as a dict (one host read).
        report_depth: report per module prefix of this many dotted components instead of per parameter.
        agc: the unit-wise clipping settings of ``mode="unitwise"``.
        foreach: as in the functional API.
    """

    max_norm: float | AutoClip | ZClip = 1.0
    norm_type: float | str = 2.0
    mode: Mode = "total"
    on_nonfinite: OnNonFinite = "ignore"
    report: bool = False
    report_depth: int | None = None
    agc: AGC = field(default_factory=AGC)
    foreach: bool | None = None

    def __post_init__(self) -> None:
        m = self.max_norm
        if isinstance(m, (AutoClip, ZClip)):
            if self.mode != "total":
                raise ValueError(
                    f"an adaptive max_norm ({type(m).__name__}) works with mode='total', got mode={self.mode!r}"
                )
        elif isinstance(m, bool) or not isinstance(m, numbers.Real):
            raise TypeError(f"max_norm must be a real number, AutoClip or ZClip, got {type(m).__name__} {m!r}")
        elif math.isnan(_norm.as_float("max_norm", m)) or float(m) < 0:
            raise ValueError(f"max_norm must be a number >= 0, got {float(m)}")
        p = _norm.parse_norm_type(self.norm_type)
        if isinstance(self.norm_type, Tensor) or type(self.norm_type).__name__ == "ndarray":
            object.__setattr__(self, "norm_type", p)  # its number: an array made the frozen config unhashable
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.on_nonfinite not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {POLICIES}, got {self.on_nonfinite!r}")
        if not isinstance(self.report, bool):
            raise TypeError(f"report must be a bool, got {type(self.report).__name__} {self.report!r}")
        if self.report_depth is not None and (
            isinstance(self.report_depth, bool) or not isinstance(self.report_depth, int) or self.report_depth < 1
        ):
            raise ValueError(f"report_depth must be None or an int >= 1, got {self.report_depth!r}")
        if not isinstance(self.agc, AGC):
            raise TypeError(f"agc must be a dist_clip.AGC, got {type(self.agc).__name__}")
        if self.foreach is not None and not isinstance(self.foreach, bool):
            raise TypeError(f"foreach must be None, True or False, got {self.foreach!r}")
        if self.mode == "unitwise" and _norm.parse_norm_type(self.norm_type) == 0:
            raise ValueError("mode='unitwise' needs a norm order p > 0 or inf, got norm_type=0")

    @property
    def p(self) -> float:
        return _norm.parse_norm_type(self.norm_type)

    @functools.cached_property
    def settings(self) -> str:
        """What every rank's clipper must share, checked in the call's one collective: a rank clipping with
        another limit, order or mode scaled its pieces of a parameter by another coefficient, unnoticed."""
        m = self.max_norm
        if isinstance(m, (AutoClip, ZClip)):  # an adaptive threshold's settings, numbers as floats (10 is 10.0)
            values = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)}
            fields = ", ".join(
                f"{k}={float(v)!r}" if isinstance(v, numbers.Real) and not isinstance(v, bool) else f"{k}={v!r}"
                for k, v in values.items()
            )
            limit = f"{type(m).__name__}({fields})"
        else:
            limit = repr(float(m))
        used = f", agc={self.agc!r}" if self.mode == "unitwise" else f", max_norm={limit}"  # AGC has its own
        return f"norm_type={self.p!r}, mode={self.mode}{used}, on_nonfinite={self.on_nonfinite}"


def _pairs(pieces: list[tuple[Tensor, int]] | None, tensors: list[Tensor]) -> list[tuple[Tensor, int]]:
    """The (tensor, slot) pairs of a call's pieces: ``pieces``, or for one slot (None) each of ``tensors`` in
    slot 0."""
    return pieces if pieces is not None else [(t, 0) for t in tensors]


@dataclass(frozen=True)
class ClipResult:
    """What one call did; tensors stay on the gradients' device and are identical on every rank.

    Attributes:
        total_norm: 0-dim, the norm of every gradient before clipping (the unsharded definition): float32, or
            float64 where some gradient is float64, as :func:`dist_clip.clip_grad_norm_` returns it. The
            coefficients and limits take the same dtype.
        clip_coef: the coefficient applied: 0-dim in ``total`` mode, one per entry of ``slots`` in
            ``per_param``/``per_group`` modes; in ``unitwise`` mode the smallest unit coefficient.
        clipped: 0-dim bool, whether some gradient was scaled down (False when the norm was not finite).
        finite: 0-dim bool, whether the total norm was finite (in ``unitwise`` mode, and every unit coefficient:
            a NaN in a weight made its unit's NaN).
        max_norm: the limit used (0-dim, or one per slot of ``per_group``; the AGC ratio in ``unitwise``).
        slots: names of the entries of ``clip_coef`` (parameter names or param group names), else empty.
        norms: the report, name (or module prefix) -> norm, when asked for; parameters without a gradient
            on any rank are left out.
    """

    total_norm: Tensor
    clip_coef: Tensor
    clipped: Tensor
    finite: Tensor
    max_norm: Tensor
    slots: tuple[str, ...] = ()
    norms: dict[str, float] | None = None


# ------------------------------------------------------------------------------------------- skipping


class _SkipGuard:
    """Hooks on one optimizer that turn its next step into a no-op when armed with a true flag.

    Fused optimizers (``fused=True`` Adam, AdamW, SGD, Adagrad) read ``optimizer.found_inf`` in their kernels, as
    ``torch.amp.GradScaler`` uses them: nothing is read on the host (:func:`_fused.arm_skip_` sets it in a step
    pre-hook, combined with the scaler's). Other optimizers are snapshotted before the step and restored after
    it, with ``torch.where`` on the device (on the CPU, where reading the flag is free, only when the flag is
    set). State that only the host can restore makes the accelerator path read the flag once: state created by
    the step (each optimizer has its own initial values: NAdam's ``mu_product`` 1, Rprop's ``step_size`` lr, so
    no device-side default is right: it is removed, as if never stepped) and state that is not a tensor
    (SparseAdam's and LBFGS's counters and histories), param group entries included (not the lr: its scheduler's):
    an optimizer keeping its adaptation there (Prodigy's and D-Adaptation's ``d``, schedule-free's ``k`` and
    ``weight_sum``) wrote the skipped step's NaN and counters into its groups, for good.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.flag: Tensor | None = None  # armed before the step, for the next one
        # Armed inside the step under way (its closure, or a pre-hook after this one), apart from ``flag``: a step
        # that raises drops only this one (ORed together, the flag armed before a failed step was lost with it).
        self.running: Tensor | None = None
        self.replaced = False  # ``running`` replaces ``flag`` (skip_next_step_ inside the step), not ORed in
        self.saved: tuple[list[Tensor], list[Tensor], dict[int, dict[str, Any]], list[Tensor],
                          list[tuple[dict[str, Any], dict[str, Any]]]] | None = None
        # The post-hook before the user's own (as _fused's): one keeping an average of the parameters (EMA) read
        # the skipped step's NaN parameters before this hook put them back, and kept the NaN for good. Bound
        # once: in_step tells this pre-hook in the optimizer's list by identity.
        self._pre_hook, self._post_hook = self._pre, self._post
        self._handles: list[Any] = [None, None]
        _fused.complete_step_hooks(optimizer, self._handles, self._pre_hook, self._post_hook)

    def arm(
        self,
        optimizer: torch.optim.Optimizer,
        flag: Tensor,
        combine: bool = True,
        measured: Sequence[Tensor] | None = None,
    ) -> None:
        """``measured``: the pieces the arming call measured (see :func:`_fused.ledger_arm` for how a second arming
        combines with the first;
        ``combine=False`` replaces)."""
        if _fused.supports_grad_scale(optimizer):
            _fused.arm_skip_(optimizer, flag, combine, measured)
            self.flag = None
            return
        if _fused.in_step(optimizer):
            # Armed from inside step(closure) (or a user's step pre-hook after this guard's), for this step (the
            # flag was dropped: a NaN step taken): restored from the snapshot the pre-hook took at the step's start
            # (LBFGS moves the parameters between its closure's calls), or, for a guard made inside the closure,
            # or a snapshot not taken (no flag then), one taken now.
            self.running = flag if self.running is None or not combine else self.running | flag.to(
                self.running.device)
            if not combine:
                # skip_next_step_ replaces any pending flag, for this step only: a step that raises keeps the flag
                # armed before it for the retry (cleared here, the retry took the NaN step)
                self.replaced = True
            if self.saved is None:
                self._snapshot(optimizer, force=True)
            return
        self.running, self.replaced = None, False  # left by a step that raised: that step's
        _fused.ledger_arm(optimizer, flag, measured, explicit=not combine)
        self.flag = flag  # (read again from the ledger at the step: see _pre)

    @staticmethod
    def _local(t: Tensor) -> Tensor:
        return t._local_tensor if type(t).__name__ == "DTensor" else t  # type: ignore[attr-defined]

    @_fused.never_traced  # run as Python under torch.compile(opt.step): see _fused._pre_hook
    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        _fused.complete_step_hooks(optimizer, self._handles, self._pre_hook, self._post_hook)
        if _fused.nested_step(optimizer):
            # super().step() of a subclass's step: the outer step's snapshot, taken before anything it wrote (its
            # param group entries), stands, and the outer post-hook restores (the inner snapshot missed them)
            return None
        # Armed inside a step that raised (its closure, or a pre-hook after this one): that step's flag, not this
        # retry's (ORed into the retry's False, a good step was skipped and every later one came one behind); and
        # that step's snapshot (a restore would put back its values).
        self.running = self.saved = None
        self.replaced = False
        if not _fused.supports_grad_scale(optimizer):
            read = _fused.ledger_flag(optimizer)
            self.flag = None if read is None else read != 0
        # A closure runs inside this step and may arm a skip for it (see arm): snapshot at the step's start
        # whatever the flag, for the post-hook to restore if one is armed by then.
        if _fused.step_closure(args, kwargs) is None:
            self._snapshot(optimizer)
            return None
        if not _fused.supports_grad_scale(optimizer):  # (a fused one skips through found_inf: nothing to restore)
            self._snapshot(optimizer, force=True)
        return _fused.wrap_closure(optimizer, args, kwargs)

    def _snapshot(self, optimizer: torch.optim.Optimizer, force: bool = False) -> None:
        flag = self.flag
        if not force:
            if flag is None or (_fused._on_host(flag) and not bool(flag)):
                return
        params = [p for g in optimizer.param_groups for p in g["params"]]
        locals_ = [self._local(p.detach()) for p in params]
        states: dict[int, dict[str, Any]] = {}
        for p in params:
            if p in optimizer.state:
                states[id(p)] = {
                    k: (self._local(v).detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v))
                    for k, v in optimizer.state[p].items()
                }
        # Each param group's entries (all but its parameters), by the objects they hold: a step that writes one
        # (``group["d"] = d``) puts a new object there, told by identity, put back on a skip (see _groups_changed).
        groups = [(g, {k: v for k, v in g.items() if k not in _SCHEDULED}) for g in optimizer.param_groups]
        self.saved = ([t.clone() for t in locals_], locals_, states, params, groups)

    @_fused.never_traced
    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        _fused.complete_step_hooks(optimizer, self._handles, self._pre_hook, self._post_hook)
        if _fused.nested_step(optimizer):
            return  # the outer step's post-hook decides (see _pre)
        flag, running, saved = self.flag, self.running, self.saved
        if running is not None:
            flag = running if flag is None or self.replaced else flag | running.to(flag.device)
        self.flag = self.running = self.saved = None
        self.replaced = False
        # (kept until the step is over: a step that raised left its arming to combine with the next call's)
        _fused.clear_ledger(optimizer)
        if saved is None or flag is None:
            return
        if _fused._on_host(flag) and not bool(flag):
            return  # a snapshot taken for a closure that armed no skip
        values, live, states, params, groups = saved
        known = _fused._on_host(flag)  # we only snapshot on the host when the flag is set
        if not known and (self._host_state(optimizer, params, states) or self._groups_changed(groups)):
            if not bool(flag):  # one host read: state the device cannot put back
                return
            known = True
        if known:
            self._restore_groups(groups)
        with torch.no_grad():
            for old, now in zip(values, live):
                now.copy_(old if known else torch.where(flag.to(now.device), old, now))
            for p in params:
                before = states.get(id(p))
                if p not in optimizer.state:
                    continue
                after = optimizer.state[p]
                if known:
                    if before is None:
                        del optimizer.state[p]
                        continue
                    for k in [k for k in after if k not in before]:
                        del after[k]
                    for k, v in before.items():
                        if isinstance(v, Tensor) and isinstance(after.get(k), Tensor):
                            self._local(after[k]).copy_(v)
                        else:
                            after[k] = v
                    continue
                for k, v in after.items():
                    loc = self._local(v)
                    prev = before[k]  # present: _host_state found no new state
                    loc.copy_(torch.where(flag.to(loc.device), prev.to(loc.device), loc))

    @staticmethod
    def _groups_changed(groups: list[tuple[dict[str, Any], dict[str, Any]]]) -> bool:
        """Whether the step wrote a param group entry (a new object under a key, a key added or removed)."""
        return any(sum(k not in _SCHEDULED for k in g) != len(before)
                   or any(g.get(k, _NONE) is not v for k, v in before.items()) for g, before in groups)

    @staticmethod
    def _restore_groups(groups: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """Put back the param group entries the skipped step wrote (only those: a group untouched keeps its
        objects)."""
        for g, before in groups:
            for k in [k for k in g if k not in _SCHEDULED and k not in before]:
                del g[k]
            for k, v in before.items():
                if g.get(k, _NONE) is not v:
                    g[k] = v

    @staticmethod
    def _host_state(optimizer: torch.optim.Optimizer, params: list[Tensor], states: dict[int, dict[str, Any]]) -> bool:
        """Whether the step created state, changed its layout, or holds state that is not a tensor: only the host
        can restore those (see the class)."""
        for p in params:
            if p not in optimizer.state:
                continue
            before, after = states.get(id(p)), optimizer.state[p]
            if before is None or before.keys() != after.keys():
                return True
            for k, v in after.items():
                prev = before[k]
                if not (isinstance(v, Tensor) and isinstance(prev, Tensor)):
                    return True
                if v.layout != torch.strided:  # sparse state (SGD's momentum of sparse gradients): no torch.where
                    return True
                if prev.shape != _SkipGuard._local(v).shape:
                    return True
        return False


def _meta_tensors(state: object, path: str = "state") -> list[str]:
    """Where ``state`` (dicts, lists and tuples of it) holds a meta tensor: reading one raised torch's own
    RuntimeError or NotImplementedError from deep in the load instead of a ValueError naming the key."""
    if isinstance(state, Tensor):
        return [path] if state.is_meta else []
    if isinstance(state, dict):
        return [m for k, v in state.items() for m in _meta_tensors(v, f"{path}[{k!r}]")]
    if isinstance(state, (list, tuple)):
        return [m for i, v in enumerate(state) for m in _meta_tensors(v, f"{path}[{i}]")]
    return []


def _counter(name: str, value: object) -> Tensor:
    """A saved counter: an int >= 0, or a one-value integer tensor holding one (as state_dict() saves it)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a one-value integer tensor, got {value!r:.80}")
        value = int(value)
    return torch.tensor(_int(name, value, 0), dtype=torch.int64)


def _kept(coef: Tensor, finite: Tensor, policy: str) -> Tensor:
    """The coefficient applied under ``policy`` where the total is not finite: 1 for "skip" (the gradients are
    left for a skipped step), 0 for "zero"; ``coef`` itself under the other policies."""
    if policy not in ("skip", "zero"):
        return coef
    keep = torch.full_like(coef, 1.0 if policy == "skip" else 0.0)
    return torch.where(finite.to(coef.device), coef, keep)


def _policy(policy: str, target: object) -> str:
    """The policy applied: ``"zero"`` on a DeepSpeed engine whose ``step()`` tests the gradients for overflow
    (fp16 ZeRO 1-3) leaves them as they are, for that test to skip the step and lower the loss scale, as
    ``"skip"`` does (zeroed, they read finite: the scale never came down and every later step was zeroed too);
    as under torch's ``GradScaler``, whose overflow check precedes the clip. With the optimizer offloaded,
    DeepSpeed skips on the norm it took in backward: zeroed gradients were dropped with the skipped step."""
    if policy == "zero" and "deepspeed" in sys.modules:
        from .adapters import deepspeed as ds_adapter

        if ds_adapter.checks_overflow(target):
            return "skip"
    return policy


def _zero_class() -> type | None:
    """torch's ``ZeroRedundancyOptimizer`` class, where its module is loaded."""
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    return getattr(module, "ZeroRedundancyOptimizer", None)


def _refuse_overlapped_zero(optimizer: object) -> None:
    """Refuse an optimizer that has already stepped when a clip after ``backward()`` runs: torch's
    ``ZeroRedundancyOptimizer(overlap_with_ddp=True)`` once DDP's ``hook_with_zero_step`` (or its interleaved
    variant) made its local optimizer (``.optim``) steps each rank's parameters inside that hook, during the
    backward, and its ``step()`` is a no-op. A hand-over, a scale or a skip after the backward reaches no step: a
    NaN batch was stepped by the hook and its "skipped" ``step()`` left the NaN parameters for good, and the
    coefficient was applied to gradients already used (2 ranks: every parameter NaN from the poisoned step on)."""
    cls = _zero_class()
    if (cls is not None and isinstance(optimizer, cls) and getattr(optimizer, "_overlap_with_ddp", False)
            and "optim" in optimizer.__dict__):
        raise ValueError(
            "optimizer is a ZeroRedundancyOptimizer(overlap_with_ddp=True): DDP's hook_with_zero_step steps its "
            "parameters inside the backward, before any clip after it, and its step() does nothing, so a clip "
            "coefficient or a skip given to it here reaches no step (a non-finite batch has already been stepped); "
            "use overlap_with_ddp=False to clip or skip, or leave optimizer= out"
        )


def _is_torch_zero(optimizer: object) -> bool:
    """torch's ``ZeroRedundancyOptimizer``: like fairscale's OSS, ``step()`` steps ``.optim`` (this rank's
    parameters, all the state) and then broadcasts every rank's parameters from their owners."""
    cls = _zero_class()
    # (.optim is made lazily under overlap_with_ddp=True: until then, an optimizer whose step() is DDP's hook)
    return cls is not None and isinstance(optimizer, cls) and isinstance(getattr(optimizer, "optim", None),
                                                                         torch.optim.Optimizer)


@_clip._eager
def skip_next_step_(optimizer: torch.optim.Optimizer, flag: Tensor | bool) -> None:
    """Make the next ``optimizer.step()`` a no-op where the 0-dim bool ``flag`` is true, without a host sync
    (a Python ``bool`` is a constant: ``False`` clears a pending flag).
    The flag replaces any pending one (``GradClipper``'s own armings within one step combine instead).

    Fused optimizers get ``optimizer.found_inf`` (their kernels skip the update and the step count, as under
    ``GradScaler``). Any other optimizer gets a step pre-hook that snapshots parameters and state and a post-hook
    that restores them with ``torch.where`` on the device (on the CPU only when the flag is set, since reading
    it is free there). A fairscale ``OSS`` or torch ``ZeroRedundancyOptimizer`` arms its inner ``optim`` (which
    holds the state), so the broadcast that ends its ``step()`` carries the restored parameters. The snapshot
    costs one copy of parameters and state per step on accelerators: prefer a fused optimizer. A fused
    optimizer's flag is set in a step pre-hook, combined with a ``GradScaler``'s (either skips). State that
    a skipped step creates is removed (as if never stepped), and state that is not a tensor (SparseAdam's,
    LBFGS's counters) put back; on accelerators deciding either reads the flag on the host once (the first
    step of each parameter, or every step for such optimizers), as does optimizer state kept on the host for
    device parameters (``capturable=False`` step counters).
    """
    if isinstance(flag, Tensor) and flag.dtype != torch.bool:
        raise TypeError(f"flag must be a bool tensor (e.g. ~torch.isfinite(norm)), got dtype {flag.dtype}")
    if isinstance(flag, Tensor) and flag.is_meta:
        # (armed, it made that step raise "Cannot copy out of meta tensor", and a fused optimizer's every step after)
        raise ValueError("flag is a meta tensor, which holds no value; pass a bool tensor on a real device, or a bool")
    if isinstance(flag, bool):  # a constant (skip_next_step_(opt, False) clears a pending flag): no host read
        flag = torch.full((), flag, dtype=torch.bool, device=_first_device(optimizer))  # a fill: no copy
    _arm_skip(optimizer, flag, combine=False)


def _first_device(optimizer: Any) -> torch.device:
    """The device of the optimizer's first parameter (the CPU where it has none, or is not an optimizer)."""
    for opt in _stepping_optimizers(optimizer) or [optimizer]:
        for group in getattr(opt, "param_groups", ()):
            for q in group["params"]:
                return q.device  # type: ignore[no-any-return]
    return torch.device("cpu")


def pending_skip_flag(optimizer: torch.optim.Optimizer) -> Tensor | None:
    """The skip flag armed on ``optimizer`` for its next step (a fused optimizer's, or its skip guard's), or None."""
    flag = _fused.ledger_flag(optimizer)
    return None if flag is None else flag != 0


def _with_agreed(extra: Tensor | None, local: Tensor) -> Tensor:
    """``extra`` with one more value, last: the call's :class:`_fused.Agreement` (every rank of every call sends
    it, 0 where it arms nothing, so the layouts agree whatever a rank's settings: a mismatch raises by the
    fingerprint)."""
    one = local.reshape(1).to(torch.float64)
    return one if extra is None else torch.cat([extra, _reduce.moved(one, extra.device)])


def _skip_pending(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a skip flag armed on ``optimizer`` waits for its next step (fused or not)."""
    return pending_skip_flag(optimizer) is not None


def _is_post_local_sgd(optimizer: object) -> bool:
    """torch's ``PostLocalSGDOptimizer``: ``step()`` steps ``.optim`` (which holds the param groups and state),
    then averages the parameters; it never runs ``Optimizer.__init__``, so its own ``step()`` runs no step hooks.
    Its inner optimizer is armed and handed over to: a skip was refused (no hooks), and ``clip_grad_norm_`` with
    the wrapper over a fused optimizer scaled a non-finite total's NaN into the gradients and stepped them (every
    parameter NaN, averaged over the ranks), where the inner optimizer skips."""
    module = sys.modules.get("torch.distributed.optim.post_localSGD_optimizer")
    cls = getattr(module, "PostLocalSGDOptimizer", None)
    return cls is not None and isinstance(optimizer, cls) and isinstance(optimizer.__dict__.get("optim"),
                                                                         torch.optim.Optimizer)


def _stepping_optimizers(optimizer: Any) -> list[Any] | None:
    """The torch optimizers a fairscale ``OSS``, torch ``ZeroRedundancyOptimizer`` or ``PostLocalSGDOptimizer``
    steps (None otherwise)."""
    from .adapters.fairscale import skip_optimizers

    _refuse_overlapped_zero(optimizer)
    if _is_post_local_sgd(optimizer):
        inner_optim = optimizer.optim
        return _stepping_optimizers(inner_optim) or [inner_optim]  # (a ZeRO or OSS inside: its own inner one)
    inner = skip_optimizers(optimizer)  # a fairscale OSS: the torch optimizer stepping this rank's parameters
    if inner is None and _is_torch_zero(optimizer):
        inner = [optimizer.optim]  # torch's own ZeroRedundancyOptimizer, alike
    for o in inner or ():
        if isinstance(o, torch.optim.Optimizer) and o is not optimizer:
            _fused.set_outer(o, optimizer)  # (its ledger is held by every rank's partition: _ledger_params)
    return inner


def _arm_skip(
    optimizer: Any, flag: Tensor, combine: bool = True, measured: Sequence[Tensor] | None = None,
) -> None:
    """:func:`skip_next_step_`, with the pieces the arming call measured (``measured``). ``combine=False`` (an
    explicit ``skip_next_step_``): the flag replaces any pending one."""
    inner = _stepping_optimizers(optimizer)
    if inner is not None:
        for opt in inner:
            _arm_skip(opt, flag, combine, measured)
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"skip_next_step_ needs a torch.optim.Optimizer, got {type(optimizer).__name__}; for a DeepSpeed engine "
            "use GradClipper(on_nonfinite='skip') with the engine as the target"
        )
    if not isinstance(flag, Tensor) or flag.numel() != 1:
        raise TypeError(
            f"flag must be a one-value tensor (a 0-dim bool on the device), got {type(flag).__name__}"
            + (f" of shape {tuple(flag.shape)}" if isinstance(flag, Tensor) else "")
        )
    _check_undoable(optimizer)
    guard = getattr(optimizer, "_dist_clip_skip_guard", None)
    if guard is not None:  # hooks cleared by the user, or left out by a step that raised: registered again
        _fused.repair_step_hooks(optimizer, guard._handles, guard._pre_hook, guard._post_hook)
    if guard is None:
        guard = _SkipGuard(optimizer)
        optimizer._dist_clip_skip_guard = guard  # type: ignore[attr-defined]
    guard.arm(optimizer, flag.reshape(()).to(torch.bool), combine, measured)


def _check_undoable(optimizer: torch.optim.Optimizer) -> None:
    """A ``differentiable=True`` step records its update in the autograd graph: restoring the values after a
    skipped step leaves the NaN update in that history (hypergradients read NaN), so it cannot be skipped. A
    step that runs no torch step hooks (:func:`_fused.hooked`) cannot be skipped either."""
    if not _fused.hooked(optimizer):
        raise ValueError(
            f"{type(optimizer).__name__}.step() runs no torch step hooks (its class's step was replaced after the "
            "first instance was made, or the object never ran torch.optim.Optimizer.__init__, as a wrapper around "
            "another optimizer may not): a skip cannot be armed on it; pass the optimizer whose step() runs "
            "torch's hooks (the inner one of a wrapper)"
        )
    if any(g.get("differentiable", False) for g in optimizer.param_groups):
        raise ValueError(
            f"{type(optimizer).__name__} has differentiable=True: a skipped step cannot be undone in its autograd "
            "history (the restored parameters' gradients still flow through the NaN update); use "
            "on_nonfinite='zero' or 'error', or an optimizer without differentiable=True"
        )


def _skip_handle(target: object, optimizer: Any) -> tuple[Callable[..., None], Any]:
    """``(arm, optimizer)`` for ``on_nonfinite="skip"``: ``arm(flag)`` makes the next step a no-op where the flag
    is true; ``optimizer`` is what the other modes use (a DeepSpeed wrapper becomes its torch optimizer)."""
    from .adapters import deepspeed as ds_adapter
    from .adapters import fairscale as fs_adapter

    if ds_adapter.matches(target):
        arm, torch_opt = ds_adapter.skip_handle(target, optimizer)
        return (lambda flag, measured=None: arm(flag)), (torch_opt if optimizer is not None else None)
    if optimizer is None and fs_adapter.skip_optimizers(target) is not None:
        optimizer = target  # an OSS target steps itself
    if optimizer is None:
        raise ValueError("on_nonfinite='skip' needs optimizer= (the optimizer whose next step is skipped)")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    chosen = optimizer
    for o in _stepping_optimizers(chosen) or [chosen]:
        if isinstance(o, torch.optim.Optimizer):
            _check_undoable(o)  # before the collective: refused on every rank together
    return (lambda flag, measured=None: _arm_skip(chosen, flag, measured=measured)), optimizer


# ------------------------------------------------------------------------------------------- the clipper


def _plain_shards(target: object, group: dist.ProcessGroup | None) -> list[Shards]:
    """A target's Shards without names (a mapping {name: tensor} is not something the adapters know)."""
    return _slots.named_shards(target, group).shards if isinstance(target, Mapping) else resolve(target, group)


def _pieces_of(target: object, group: dist.ProcessGroup | None) -> list[Tensor]:
    """This rank's gradient pieces of a target (a mapping of names to tensors too)."""
    return [t for s in _plain_shards(target, group) for t in s.tensors]


def _check_group(group: object) -> dist.ProcessGroup | None:
    from .clip import _check_group as check

    return check(group)


def _nonfinite_message(
    shards: Sequence[Shards], group: dist.ProcessGroup | None, total: float, p: float
) -> str:
    """Which ranks hold non-finite values in which parameters: the debug pass of ``on_nonfinite="error"``."""
    local: list[str] = []
    for s in shards:
        for i, t in enumerate(s.tensors):
            v = t.coalesce().values() if t.is_sparse else t  # (no sparse isfinite: raised before the all-gather)
            if v.numel() and not bool(torch.isfinite(v).all()):
                name = _slots.clean_name(s.names[i]) if s.names else f"<piece {i}>"
                if name not in local:
                    local.append(name)
    where = _holders(local, group) or "no rank found a non-finite element (the norm itself overflowed)"
    return (
        f"The total gradient norm of order {p} is non-finite ({total}); non-finite gradients on {where}. Every "
        "rank raises this error together. Set on_nonfinite='skip' to skip the optimizer step, 'zero' to zero the "
        "gradients, or 'ignore' to scale by the non-finite coefficient as torch does"
    )


def _nan_limit_message(units: Sequence[Any], coefs: Sequence[Tensor], group: dist.ProcessGroup | None,
                       total: float, p: float) -> str:
    """``mode="unitwise"``'s debug pass of ``on_nonfinite="error"`` where the total is finite but a unit
    coefficient is NaN: which ranks hold non-finite weights in the units whose coefficient is NaN."""
    local: list[str] = []
    for u, c in zip(units, coefs):
        nan_coef = c.numel() and not bool(torch.isfinite(c).all())
        if nan_coef and u.data.numel() and not bool(torch.isfinite(u.data).all()):
            name = _slots.clean_name(u.name)
            if name not in local:
                local.append(name)
    where = _holders(local, group) or "no rank found a non-finite weight"
    return (
        f"AGC's limit clipping * max(||w_unit||, eps) is NaN for some unit whose gradient is not zero (the total "
        f"gradient norm of order {p} is finite, {total}): non-finite weights on {where}. Scaled by it, the "
        "gradient would hold NaN. Every rank raises this error together. Set on_nonfinite='skip' to skip the "
        "optimizer step, 'zero' to zero the gradients, or 'ignore' to scale by the NaN coefficient as timm does"
    )


def _holders(local: list[str], group: dist.ProcessGroup | None) -> str:
    """``"rank r: names; ..."`` of every rank's ``local`` names (an ``all_gather_object`` over ``group``)."""
    if group is not None and _reduce.group_size(group) > 1:
        gathered: list[Any] = [None] * _reduce.group_size(group)
        dist.all_gather_object(gathered, local, group=group)
        ranks = [dist.get_global_rank(group, i) for i in range(len(gathered))]
    elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [local]
        ranks = ["every rank (replicas)"]  # type: ignore[list-item]
    else:
        gathered = [local]
        ranks = [0]
    holders = [
        f"{r if isinstance(r, str) else f'rank {r}'}: {', '.join(names)}" for r, names in zip(ranks, gathered) if names
    ]
    return "; ".join(holders)


class GradClipper:
    """Gradient clipping with state: ``clipper(target) -> ClipResult``, checkpointable with ``state_dict()``.

    Must be called on all ranks of the group, after ``backward()`` and before ``optimizer.step()``, like the
    functional API; each call issues one collective (none where nothing is sharded), whatever the mode, except
    ``on_nonfinite="error"`` on a non-finite norm (an all-gather of the culprits' names, then the error) and the
    first call under a ``ParallelPlan(debug=True)`` (its audit gathers every piece once).

    Args:
        config: a :class:`ClipperConfig`; or leave it out and pass its fields as keyword arguments.
    """

    def __init__(self, config: ClipperConfig | None = None, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise TypeError(f"pass either a ClipperConfig or keyword arguments, got both (keywords: {sorted(kwargs)})")
        self._threshold: _AutoClipState | _ZClipState | None = None
        self.config = config if config is not None else ClipperConfig(**kwargs)
        self.step = 0
        self._num_clipped: Tensor | None = None
        self._num_nonfinite: Tensor | None = None

    @property
    def config(self) -> ClipperConfig:
        """What this clipper does. A new :class:`ClipperConfig` may be assigned between calls (a schedule of
        limits, say), on every rank alike: an adaptive threshold keeps its history while ``max_norm`` is the same
        policy, and starts afresh when it changes (another policy or parameter, or to or from a fixed limit, or
        another ``norm_type``): the history of one policy is not the other's (a clipper built once kept the first
        threshold, silently)."""
        return self._config

    @config.setter
    def config(self, config: ClipperConfig) -> None:
        if not isinstance(config, ClipperConfig):
            raise TypeError(f"config must be a ClipperConfig, got {type(config).__name__}")
        thr = config.max_norm
        old = getattr(self, "_config", None)
        # (and the same norm order: a history of 2-norms set the limit for inf-norms, 3.16 for 0.1, and was saved
        # as inf-norms)
        same = (old is not None and isinstance(thr, (AutoClip, ZClip)) and type(old.max_norm) is type(thr)
                and old.max_norm == thr and old.p == config.p)
        if not same:
            self._threshold = make_state(thr) if isinstance(thr, (AutoClip, ZClip)) else None
        self._config = config

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A clipper pickled before ``config`` became a property holds it as "config": under "_config" now (it
        # loaded, then every use raised AttributeError).
        if "config" in state and "_config" not in state:
            state = {("_config" if k == "config" else k): v for k, v in state.items()}
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"GradClipper({self.config!r}, step={self.step})"

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue identically: CPU tensors, numbers and strings (an AutoClip
        history a list of floats, which ``torch.distributed.checkpoint`` loads whole); reading them syncs once."""
        def count(t: Tensor | None) -> Tensor:
            return t.detach().cpu().clone() if t is not None else torch.zeros((), dtype=torch.int64)

        return {
            "version": _STATE_VERSION,
            "step": self.step,
            "num_clipped": count(self._num_clipped),
            "num_nonfinite": count(self._num_nonfinite),
            "threshold": None if self._threshold is None else {
                "kind": type(self.config.max_norm).__name__, "norm_type": self.config.p,
                **self._threshold.state_dict()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the config must use the same kind of threshold."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from GradClipper.state_dict(), got {type(state).__name__}")
        meta = _meta_tensors(state)
        if meta:
            raise ValueError(f"GradClipper state holds meta tensors, which have no values, at {meta}: load a state "
                             "saved by state_dict() (torch.load(..., map_location='cpu'))")
        missing = {"version", "step", "num_clipped", "num_nonfinite", "threshold"} - state.keys()
        if missing:
            raise ValueError(
                f"GradClipper state lacks {sorted(missing)}; expected a dict from GradClipper.state_dict()"
            )
        version = state["version"]
        # An integer, not anything that compares equal (True passed; an array raised numpy's ambiguity error).
        if not isinstance(version, numbers.Integral) or isinstance(version, bool) or version != _STATE_VERSION:
            raise ValueError(f"GradClipper state 'version' is {version!r:.80}, expected the integer {_STATE_VERSION}")
        thr = state["threshold"]
        if thr is not None and not isinstance(thr, dict):
            raise TypeError(f"GradClipper state['threshold'] must be a dict or None, got {type(thr).__name__}")
        want = type(self.config.max_norm).__name__ if self._threshold is not None else None
        if thr is not None and "kind" not in thr:
            raise ValueError("GradClipper state['threshold'] lacks 'kind'; expected one from state_dict()")
        got = None if thr is None else thr["kind"]
        if got is not None and not isinstance(got, str):
            raise TypeError(f"GradClipper state['threshold']['kind'] must be a policy's name (str), got "
                            f"{type(got).__name__}")
        if want != got:
            raise ValueError(
                f"this clipper's threshold is {want or 'fixed'} but the state is of {got or 'a fixed one'}"
            )
        unknown = state.keys() - {"version", "step", "num_clipped", "num_nonfinite", "threshold"}
        if unknown:
            raise ValueError(f"GradClipper state has unknown keys {sorted(map(str, unknown))}; expected a dict from "
                             "GradClipper.state_dict()")
        step = _int("GradClipper state 'step'", state["step"], 0)
        counters = [_counter(f"GradClipper state {key!r}", state[key]) for key in ("num_clipped", "num_nonfinite")]
        for key, c in zip(("num_clipped", "num_nonfinite"), counters):
            if int(c) > step:
                raise ValueError(f"GradClipper state {key!r} is {int(c)}, more than its {step} steps")
        if thr is not None and "norm_type" in thr:  # (states saved before it was kept hold no order)
            try:
                saved_p = _norm.parse_norm_type(thr["norm_type"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"GradClipper state['threshold']['norm_type']: {e}") from None
            if saved_p != self.config.p:
                raise ValueError(
                    f"the state's threshold history holds norms of order {saved_p!r}, this clipper takes norms of "
                    f"order {self.config.p!r}: a limit learnt from one order clips another by a wrong coefficient"
                )
        if self._threshold is not None:  # assigns only once its own checks pass
            try:
                self._threshold.load_state_dict({k: v for k, v in thr.items() if k not in ("kind", "norm_type")})
            except KeyError as e:
                raise ValueError(f"GradClipper state['threshold'] lacks {e}; expected one from state_dict()") from None
        self.step = step
        self._num_clipped, self._num_nonfinite = counters

    @property
    def num_clipped(self) -> Tensor:
        """How many calls scaled some gradient down (a device tensor)."""
        return self._num_clipped if self._num_clipped is not None else torch.zeros((), dtype=torch.int64)

    @property
    def num_nonfinite(self) -> Tensor:
        """How many calls met a non-finite norm (a device tensor)."""
        return self._num_nonfinite if self._num_nonfinite is not None else torch.zeros((), dtype=torch.int64)

    def _count(self, clipped: Tensor, finite: Tensor) -> None:
        """One measured call: ``step`` and the counters move here, after every check of the input (a call that
        raised on bad input counted as a step before)."""
        self.step += 1
        dev = clipped.device
        if self._num_clipped is None or self._num_nonfinite is None:
            self._num_clipped = torch.zeros((), dtype=torch.int64)
            self._num_nonfinite = torch.zeros((), dtype=torch.int64)
        # (no host sync; _reduce.moved waits for a copy to the host, whose pinned target could be read early)
        self._num_clipped = _reduce.moved(self._num_clipped, dev)
        self._num_nonfinite = _reduce.moved(self._num_nonfinite, dev)
        self._num_clipped.add_(clipped)  # (a bool added to an int64 counter: no cast op)
        self._num_nonfinite.add_(~finite)

    # ---------------------------------------------------------------------------------------- call
    @_clip._eager
    @torch.no_grad()
    def __call__(
        self,
        target: object,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        group: dist.ProcessGroup | None = None,
        plan: Any = None,
        report: bool | None = None,
    ) -> ClipResult:
        """Measure (one collective), decide, and scale the gradients of ``target`` in place.

        Args:
            target: anything the functional API takes; per-parameter modes and reports also take a mapping
                ``{name: tensor}`` (every rank the same keys).
            optimizer: needed by ``mode="per_group"`` (its param groups) and ``on_nonfinite="skip"`` (whose
                step is skipped; optional on a DeepSpeed engine, where it may also be ``engine.optimizer``, and
                on a fairscale OSS target).
            group: as in the functional API.
            plan: a :class:`dist_clip.compose.ParallelPlan` describing tensor/pipeline/expert parallelism.
            report: overrides ``config.report`` for this call.

        Returns:
            A :class:`ClipResult`, identical on every rank.
        """
        cfg = self.config
        p = cfg.p
        want_report = report if isinstance(report, bool) else cfg.report  # a bad one joins as the config's
        if isinstance(target, Iterator):
            # A generator (``model.parameters()``) is read more than once below (a pending hand-over, the
            # measurement, an error message naming culprits): it read empty after the first.
            target = list(target)
        # Bad input found on this rank before the collective joins the other ranks' one collective (see
        # _join_refused); under a plan named_under_plan does; unit-wise with its units' layout (see
        # unitwise_join_refused), until its own measuring starts, which joins by itself for what it finds.
        before = plan is None and cfg.mode != "unitwise"
        before_units = plan is None and cfg.mode == "unitwise"
        named = shards = None
        try:
            if report is not None and not isinstance(report, bool):
                raise TypeError(f"report must be None, True or False, got {type(report).__name__} {report!r}")
            arm_skip = None
            if cfg.on_nonfinite == "skip":
                arm_skip, optimizer = _skip_handle(target, optimizer)
            elif optimizer is not None and "deepspeed" in sys.modules:
                from .adapters import deepspeed as ds_adapter

                optimizer = ds_adapter.torch_optimizer(target, optimizer)  # engine.optimizer: the torch one
            if cfg.mode == "per_group" and optimizer is None:
                raise ValueError("mode='per_group' needs optimizer= (whose param groups set the slots)")
            if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
            _refuse_overlapped_zero(optimizer)
            refuse_stepped_in_backward(target)
            group = _check_group(group)
            if plan is not None and not isinstance(plan, ParallelPlan):
                raise TypeError(f"plan must be a dist_clip.ParallelPlan, got {type(plan).__name__}")
            if cfg.mode == "unitwise":
                if plan is not None:
                    raise ValueError("mode='unitwise' does not take a plan= (AGC reads FSDP/DTensor layouts itself)")
                before_units = False
                return self._unitwise(target, arm_skip, group, want_report, optimizer)

            named_mode = plan is not None or cfg.mode != "total" or want_report
            grouping = None
            if plan is not None:
                groups = (lambda nm: self._groups(nm, optimizer)) if cfg.mode == "per_group" else None  # type: ignore[arg-type]
                named, grouping = named_under_plan(plan, target, p, groups, group, True)
            elif named_mode:
                named = _slots.named_shards(target, group)
            else:
                named = None
            if named is not None:
                shards = named.shards
                index = {n: i for i, n in enumerate(named.names)}

                def slot_of(name: str, _i: int) -> int:
                    try:
                        return index[name]
                    except KeyError:
                        raise ValueError(
                            f"a gradient piece is named {name!r}, which is not a parameter name of the target "
                            f"({len(index)} known, e.g. {list(index)[:3]}); name every piece by its full-model name"
                        ) from None

                n_slots = max(len(named.names), 1)
                pick = slot_of if named.names else None
            else:
                shards = _plain_shards(target, group)  # names are not needed here
                pick, n_slots = None, 1
            membership = None
            if cfg.mode == "per_group":
                assert named is not None and optimizer is not None
                if grouping is None:
                    grouping = self._groups(named, optimizer)
                if plan is not None or isinstance(target, Mapping) or named.by_pieces:
                    # Pipeline stages, or named pieces (a mapping, a user adapter's Shards) whose ranks' optimizers
                    # differ (a rank holding nothing of a parameter may leave it out, or hold it without a
                    # gradient): every rank's memberships travel in the measurement.
                    # (as _slots.measure finds it: the digests' width follows it)
                    red = _slots.reduction_group_of(shards, plan.reduction_group if plan is not None else None)
                    world = _reduce.group_size(red)
                    held = {n for s in named.shards for n, t in zip(s.names, s.tensors) if t.numel() > 0}
                    unlisted = [g < 0 and n in held for g, n in zip(grouping[0], named.names)]
                    membership = _group_membership(grouping[0], p, grouping[1], world, unlisted)
                    if plan is None:
                        membership = torch.cat(
                            [membership, _group_signatures(grouping[0], named.names, held, p, world)])
            settings = cfg.settings if plan is None else f"{cfg.settings}, {plan.settings}"
            if cfg.mode == "per_group" and membership is None:
                # The group limits do not travel in the measurement here (every rank's optimizer holds the same
                # groups): a rank with another group max_norm clipped a parameter's pieces by another coefficient.
                assert grouping is not None
                settings += f", group_limits=[{', '.join(repr(float(x)) for x in grouping[1])}]"
                # and which parameter is in which group: ranks grouping them differently under the same limits
                # (FSDP2, FSDP1 use_orig_params) clipped one parameter's shards by different coefficients
                settings += f", groups_of={grouping[0]}"
            if self._threshold is not None:
                # How many norms the adaptive threshold has seen (host-side): a checkpoint loaded on one rank only
                # gave each rank its own threshold, so one gradient was scaled by a different factor on each.
                settings += f", threshold_calls={self._threshold.count}"
            # (the ranks' read of the agreed skip flags travels in this call's measurement: see _fused.Agreement;
            # not read where the call combines over no other rank, DDP or one process, which decides none of them)
            flat = [t for s in shards for t in s.tensors]  # (listed once)
            agreement = _fused.Agreement(optimizer if arm_skip is not None else None)
            _clip.settle_hand_over(target, flat)
            red = _slots.reduction_group_of(shards, plan.reduction_group if plan is not None else None)
            membership = _with_agreed(membership, agreement.sent(_reduce.group_size(red) > 1))
            before = False
        except (ValueError, TypeError) as e:
            if before:
                self._join_refused(target, group, want_report, named, shards)
            elif before_units:
                # (a bad optimizer= on one rank left the others in the collective until the process group's
                # timeout: the units' layout is known from the target alone)
                self._join_units_refused(target, group)
            elif isinstance(plan, ParallelPlan) and cfg.mode != "unitwise":
                # named_under_plan joins for what it finds; bad input found before it (an optimizer= of the
                # wrong type on one stage) joins here, with the same layout
                if getattr(e, "dist_clip_joined", False) or _refuse_together(plan, p, cfg.mode == "per_group", True):
                    self._count_refused_call()
            raise
        try:
            m = _slots.measure(shards, pick, n_slots, p, cfg.foreach, presence=named is not None,
                               group=plan.reduction_group if plan is not None else None,
                               layout=named.names if named is not None else None, extra=membership,
                               result_dtype=_clip._result_dtype(flat, None),
                               settings=settings)
        except Exception as e:  # (any error measuring may have joined: see _slots.measure)
            if getattr(e, "dist_clip_joined", False) or isinstance(e, _slots.RefusedElsewhere):
                self._count_refused_call(getattr(e, "dist_clip_others_counted", False))
            raise
        assert m.extra is not None  # the verdict, the last extra value (see _with_agreed)
        agreement.agree(m.extra[-1], alone=_reduce.group_size(m.group) <= 1, group=m.group)
        m = dataclasses.replace(m, extra=m.extra[:-1] if m.extra.numel() > 1 else None)
        out = m.result_dtype
        assert out is not None
        total = m.total.to(out)
        # Finiteness and coefficients from the float64 norms: finite gradients whose norm float32 cannot hold
        # (beyond 3.4e38) are clipped, as clip_grad_norm_ clips them, not zeroed or taken for non-finite.
        finite = torch.isfinite(m.total)

        slot_names: tuple[str, ...] = ()
        clipped_anywhere: Tensor | None = None
        one_slot = False
        if cfg.mode == "per_param":
            assert named is not None
            limit = _scale.full_like(m.total, float(cfg.max_norm))  # type: ignore[arg-type]
            coef = _scale.clip_coefficient(limit, m.slot_norms)
            if not named.names:
                coef = coef[:0]  # the one slot measured for an empty target names nothing (slots is ())
            slot_coef = coef
            slot_names = named.names
            limit_out = limit.to(out)
        elif cfg.mode == "per_group":
            assert named is not None and optimizer is not None
            assert grouping is not None
            coef, slot_coef, slot_names, limit_out, clipped_anywhere = _per_group(
                grouping, m, p, torch.float64, fill_only=plan is None)
            limit_out = limit_out.to(out)
            if not _host_checks(m.device):
                # A failed group check (NaN group norms off the CPU, where it raises) is a non-finite call: the
                # total read finite, so "skip" stepped the NaN-scaled gradients, "zero" and "error" did nothing.
                failed = torch.isnan(coef).any()
                total = torch.where(failed, torch.full_like(total, math.nan), total)
                finite = finite & ~failed
        else:
            if self._threshold is not None:
                thr = self._threshold.threshold(m.total, finite)
                coef = self._threshold.coefficient(thr, m.total)
                limit_out = thr.to(out)
            else:
                limit_out = _scale.full_like(total, float(cfg.max_norm))  # type: ignore[arg-type]
                coef = _scale.clip_coefficient(float(cfg.max_norm), m.total)  # type: ignore[arg-type]
            slot_coef = coef.reshape(1)
            one_slot = True  # the total's own coefficient: kept and converted once, below
        if plan is not None:
            plan.check_once(shards, m, p)

        policy = _policy(cfg.on_nonfinite, target)
        if policy == "error" and not bool(finite):
            if m.recheck is not None:
                # Off the CPU a refusal or a settings mismatch on some rank reads as NaN norms: this policy reads
                # the host anyway, so it says which (the culprits' all-gather below waited for a refusing rank
                # that had raised: a hang until the timeout, or a misaligned next call).
                try:
                    m.recheck()
                except _slots.RefusedElsewhere:
                    self._count_refused_call()
                    raise
            # The plain pieces may be unnamed (fairscale OSS) or flat (FSDP1 without use_orig_params, fairscale
            # FSDP): name them by the unwrapped model's parameters (no collective) for the message. A user
            # adapter's Shards are named by their own names, or not at all ("<piece i>"): naming them again
            # called its shards() a second time and, in mode "total", which takes unnamed Shards, raised the
            # named modes' ValueError ("Shards without a name for each piece ... mode='total' works without")
            # in place of this error.
            custom = named is None and _slots._custom_adapter(unwrap_compiled(target)) is not None
            culprits = shards if named is not None or custom else _slots.named_shards(target, group).shards
            self._count(torch.zeros_like(finite), finite)  # a measured call: counted before it raises
            raise RuntimeError(_nonfinite_message(culprits, m.group, total.item(), p))
        if pick is None:  # one slot: the tensors, without a (tensor, 0) pair each (2000 tuples on 2000 gradients)
            tensors = _clip._all_tensors(shards)
            pieces: list[tuple[Tensor, int]] | None = None
        else:
            pieces = _slots.all_pieces(shards, pick)
            tensors = [t for t, _ in pieces]
        on_cpu = total.device.type == "cpu"
        slot_wide = _clip._deepspeed_applied(target, _kept(slot_coef, finite, policy))  # float64
        slot_coef = slot_wide.to(out)
        # What is applied, as documented.
        if one_slot:
            coef = slot_coef.reshape(())
        else:
            coef = _clip._deepspeed_applied(target, _kept(coef, finite, policy)).to(out)
        # Some gradient was scaled down: a slot (or group) whose gradients are all zero, or absent, is left as it
        # was whatever its coefficient (max_norm=0 on a parameter without gradient read as clipped).
        scaled = m.slot_norms.to(slot_coef.device) > 0 if m.slot_norms.numel() == slot_coef.numel() else m.total > 0
        clipped = finite & ((slot_coef < 1) & scaled).any()
        if clipped_anywhere is not None:  # per_group, plan or named pieces: groups this rank's optimizer lacks count
            clipped = finite & clipped_anywhere.to(clipped.device)
        # Counted, and the skip armed, whatever the scaling below raises on this rank alone (a gradient torch will
        # not write in place, an interrupt): the other ranks counted and armed, and the ranks' states must agree.
        self._count(clipped, finite)
        try:
            if policy == "zero" and on_cpu and not bool(finite):
                for t in tensors:
                    t.zero_()
            else:
                if _scale.needs_wide(slot_wide):  # (coefficients float32 holds only as subnormals)
                    _slots.scale_slots_wide_(_pairs(pieces, tensors), slot_wide, slot_coef, cfg.foreach)
                elif pieces is None and slot_coef.numel() == 1:  # (scale_slots_'s one coefficient, as it applies it)
                    _scale.scale_(tensors, slot_coef.reshape(()), cfg.foreach)
                else:
                    _slots.scale_slots_(_pairs(pieces, tensors), slot_coef, cfg.foreach)
                if policy == "zero" and not on_cpu:
                    # 0 * NaN is NaN: zero explicitly, no sync. Sparse gradients by their values (no sparse
                    # masked_fill_: every call raised there), expanded ones each memory location once.
                    for t in _scale.writable(tensors):
                        (t._values() if t.is_sparse else t).masked_fill_(~finite.to(t.device), 0)
        finally:
            if arm_skip is not None:
                with agreement.armed():
                    arm_skip(~finite, tensors)
        norms = self._report(named.names, m, p) if want_report and named is not None else None
        return ClipResult(total, coef, clipped, finite, limit_out, slot_names, norms)

    def _join_refused(
        self,
        target: object,
        group: object,
        want_report: bool,
        named: _slots.Named | None,
        shards: Sequence[Shards] | None,
    ) -> None:
        """Bad input this rank found before the collective (an ``optimizer=`` missing or of another type, a param
        group's ``max_norm``...), which the other ranks may not share: join their one collective with the payload
        they send (its slot count from the target's names, the same on every rank) and a NaN fingerprint, so that
        they raise ``RuntimeError`` now instead of pairing this rank's next call with their current one. Bad input
        found while measuring (an integer gradient) joins in :func:`_slots.measure`. Not joined where the layout
        is unknown here: a ``group=`` or target that does not resolve, or nothing combined."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        cfg = self.config
        per_name = cfg.mode != "total" or want_report
        try:
            g = _check_group(group)
            with _clip._partial_grads_set_aside(target) as planned:  # (as a rank holding none of them: see there)
                if per_name:
                    named = named if named is not None else _slots.named_shards(planned, g)
                    shards, names = named.shards, named.names
                else:
                    shards, names = (shards if shards is not None else _plain_shards(planned, g)), None
            red = _reduce.reduction_group(s.group for s in shards)
        except Exception:  # noqa: BLE001 - the layout is unknown: raise the caller's error alone
            return
        if red is None or _reduce.group_size(red) <= 1:
            return
        n = max(len(names), 1) if names is not None else 1
        # per_group on a mapping: the memberships and signatures travel too, built as a rank listing no slot builds
        # them (their width follows the two functions; neutral values under MAX too, where zeros were not)
        extra = None
        if cfg.mode == "per_group" and (isinstance(target, Mapping) or named is not None and named.by_pieces):
            none = [-1] * n
            extra = torch.cat([_group_membership(none, cfg.p), _group_signatures(none, names or (), set(), cfg.p)])
        extra = _with_agreed(extra, torch.zeros((), dtype=torch.float64))  # (the verdict: see _with_agreed)
        try:
            _slots.measure(shards, None, n, cfg.p, presence=per_name, extra=extra, group=red, layout=names,
                           result_dtype=torch.float32, refused=True, settings=cfg.settings)
        except RuntimeError:
            self._count_refused_call()  # the REFUSED error every other rank raises; the caller raises its own
        else:
            self._count_refused_call(others_counted=True)  # off the CPU: the others read NaN norms and went on

    def _join_units_refused(self, target: object, group: object) -> None:
        """Bad input this rank found before a ``mode="unitwise"`` measurement: join the others' collective (see
        :func:`unitwise_join_refused`) and count the call as they do."""
        joined = unitwise_join_refused(target, self.config.p, group, self.config.settings)
        if joined is not None:
            self._count_refused_call(joined)

    def _count_refused_call(self, others_counted: bool = False) -> None:
        """A call refused together still counts as one call of the adaptive threshold on every rank: elsewhere
        than on the CPU the other ranks do not raise, and their threshold takes the call's NaN norm (left out of
        its statistics) and counts it; the count rides in the settings fingerprint, so a refusing rank left one
        behind made every later call's norms NaN. ``others_counted`` (off the CPU, where they went on): ``step``
        and ``num_nonfinite`` count it too, as theirs did (checkpoints saved on different ranks differed)."""
        if self._threshold is not None:
            self._threshold.count += 1
        if others_counted:
            held = self._num_clipped.device if self._num_clipped is not None else torch.device("cpu")
            no = torch.zeros((), dtype=torch.bool, device=held)
            self._count(no, no)

    def _groups(
        self, named: _slots.Named, optimizer: torch.optim.Optimizer
    ) -> tuple[list[int], list[float], list[str]]:
        """Each slot's param group in this rank's optimizer (-1: none), and every group's limit and label, the
        groups numbered as :func:`_group_order` orders them."""
        where: dict[int, int] = {}
        grads: dict[int, int] = {}
        limits: list[float] = []
        labels: list[str] = []
        for gi, pg in enumerate(optimizer.param_groups):
            value = pg.get("max_norm", self.config.max_norm)
            real = isinstance(value, Tensor) and not (value.is_complex() or value.dtype == torch.bool)
            if real and value.numel() == 1:
                # a one-value tensor is a number, as max_norm= takes it (tensor(True) read as 1.0)
                value = float(value) if value.is_floating_point() else int(value)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or isinstance(value, Tensor):
                raise TypeError(
                    f"param group {gi} has max_norm {value!r:.80}; expected a number >= 0 (a one-value real tensor "
                    "too; not a bool)"
                )
            value = _norm.as_float(f"param group {gi}'s max_norm", value)
            if math.isnan(value) or value < 0:
                raise ValueError(f"param group {gi} has max_norm {value!r}; expected a number >= 0")
            limits.append(value)
            labels.append(str(pg.get("name", f"param_group{gi}")))
            for q in pg["params"]:
                where[id(q)] = gi
                # a user adapter's Shards hold gradients, not parameters: its pieces are found by the .grad of
                # the parameters stepped (every piece was outside the optimizer: "found none", per_group refused)
                grad = getattr(q, "grad", None)
                if grad is not None:
                    grads.setdefault(id(grad), gi)
        # DeepSpeed ZeRO-3 empties the torch optimizer's param groups between steps; its own map stands in.
        fallback = named.group_of if named.group_optimizer is optimizer else {}
        params = named.group_params()
        groups_of = [where.get(id(params[n]), grads.get(id(params[n]), -1)) if n in params else -1
                     for n in named.names]
        if grads and min(groups_of, default=0) < 0:
            groups_of = _groups_by_memory(named, optimizer, groups_of, grads)
        groups_of = [g if g >= 0 else fallback.get(n, -1) for g, n in zip(groups_of, named.names)]
        order = _group_order(optimizer.param_groups)
        if order is not None:
            place = {old: new for new, old in enumerate(order)}
            groups_of = [place[g] if g >= 0 else g for g in groups_of]
            limits, labels = [limits[i] for i in order], [labels[i] for i in order]
        return groups_of, limits, labels

    def _report(self, names: Sequence[str], m: _slots.Measurement, p: float) -> dict[str, float]:
        # One host transfer for both (on an accelerator each .tolist() is a sync: two were read apart)
        if m.presence is not None:
            n = m.partials.numel()
            both = torch.cat((m.partials, m.presence.to(m.partials.dtype))).tolist()
            partials, present = both[:n], both[n:]
        else:
            partials, present = m.partials.tolist(), [1.0] * len(names)
        depth = self.config.report_depth
        buckets: dict[str, float] = {}
        for name, part, seen in zip(names, partials, present):
            if seen <= 0:
                continue
            key = ".".join(name.split(".")[:depth]) if depth is not None else name
            if key not in buckets:
                buckets[key] = part
            elif math.isinf(p):
                buckets[key] = math.nan if math.isnan(part) or math.isnan(buckets[key]) else max(buckets[key], part)
            else:
                buckets[key] += part
        if not buckets:
            return {}
        if p in (0.0, 1.0, 2.0) or math.isinf(p):
            # One vector for every entry: the root (sqrt, or none) and the loss-scale division are correctly
            # rounded element by element, so each value is bit for bit the one a 0-dim tensor gives (a tensor, a
            # root and a float per entry cost 21-27 ms of a 52-60 ms call on 2,400 parameters).
            values = torch.tensor(list(buckets.values()), dtype=torch.float64)
            return dict(zip(buckets, _slots.finalize_norms(values, p, m.loss_scale).tolist()))
        # Other orders' pow on a vector takes torch's SIMD pow, which may differ from the scalar one in the last bit.
        return {key: float(_slots.finalize_norms(torch.tensor(part, dtype=torch.float64), p, m.loss_scale))
                for key, part in buckets.items()}

    def _unitwise(
        self,
        target: object,
        arm_skip: Callable[..., None] | None,
        group: dist.ProcessGroup | None,
        want_report: bool,
        optimizer: Any = None,
    ) -> ClipResult:
        cfg = self.config
        p = cfg.p
        pieces: list[list[Tensor]] = []

        def measured() -> list[Tensor]:  # (found once, where needed: a pending hand-over, a flag to agree on)
            if not pieces:
                pieces.append(_pieces_of(target, group))
            return pieces[0]

        # The ranks' read of the agreed skip flags travels in the measurement, as in the other modes (read by
        # each rank alone, a NaN in rank 0's FSDP2 shard kept the flag there alone: rank 0 skipped, the others
        # stepped): see _fused.Agreement
        agreement = _fused.Agreement(optimizer if arm_skip is not None else None)
        try:
            _clip.settle_hand_over(target, measured)
        except (ValueError, TypeError):
            # (a hand-over pending: this rank's pieces, found for it, refused here, a Partial gradient, before
            # unitwise_measure could join: rank 0 waited in its collective, gloo aborted rank 1's next call)
            self._join_units_refused(target, group)
            raise
        try:
            outcome = unitwise_measure(target, cfg.agc, p, cfg.foreach, group, cfg.settings, agreement.sent)
        except BaseException as e:
            if getattr(e, "dist_clip_joined", False) or isinstance(e, _slots.RefusedElsewhere):
                self._count_refused_call(getattr(e, "dist_clip_others_counted", False))
            raise
        agreement.agree(outcome.agreed, alone=_reduce.group_size(outcome.measurement.group) <= 1,
                        group=outcome.measurement.group)
        out = outcome.measurement.result_dtype
        assert out is not None
        total = outcome.total.to(out)
        finite = torch.isfinite(outcome.total)  # the float64 norm: one beyond float32's range is finite
        # A NaN unit coefficient (a NaN in a weight: its limit NaN, a gradient not zero) is a non-finite call too,
        # on every rank alike: min_coef is every rank's smallest, combined in the collective (NaN-safe). It wrote
        # NaN into a finite gradient, and the call said finite: "skip" took the step (the row and its Adam
        # moments turned NaN), "error" and "zero" did nothing. (No host read: a device flag, as the total's.)
        finite = finite & torch.isfinite(outcome.min_coef).to(finite.device)
        units = outcome.units
        if cfg.on_nonfinite == "error" and not bool(finite):
            shards = [Shards([u.grad], group=u.group, names=[u.name]) for u in units]
            self._count(torch.zeros_like(finite), finite)
            if bool(torch.isfinite(outcome.total)):  # (the same on every rank: one message, one all-gather)
                raise RuntimeError(_nan_limit_message(units, outcome.coefs, outcome.group, total.item(), p))
            raise RuntimeError(_nonfinite_message(shards, outcome.group, total.item(), p))
        policy = _policy(cfg.on_nonfinite, target)
        on_cpu = total.device.type == "cpu"
        clipped = finite & (outcome.min_coef < 1)
        self._count(clipped, finite)  # before the scaling, which may raise on this rank alone (see __call__)
        try:
            if policy == "zero" and on_cpu and not bool(finite):
                for u in units:
                    u.grad.zero_()
            elif not (policy == "skip" and on_cpu and not bool(finite)):
                if policy in ("skip", "zero") and not on_cpu:
                    outcome = type(outcome)(**{**outcome.__dict__, "coefs": [
                        _kept(c, finite, policy) for c in outcome.coefs]})
                unitwise_scale_(outcome)
                if policy == "zero" and not on_cpu:
                    for u in units:
                        u.grad.masked_fill_(~finite.to(u.grad.device), 0)
        finally:
            if arm_skip is not None:
                with agreement.armed():
                    arm_skip(~finite, measured())
        norms = self._report(outcome.names, outcome.measurement, p) if want_report else None
        limit = torch.full_like(total, cfg.agc.clipping)
        applied = _kept(outcome.min_coef.to(device=total.device, dtype=total.dtype), finite, policy)
        return ClipResult(total, applied, clipped, finite, limit, (), norms)


def named_under_plan(
    plan: ParallelPlan,
    target: object,
    p: float,
    groups: Callable[[_slots.Named], tuple[list[int], list[float], list[str]]] | None = None,
    group: dist.ProcessGroup | None = None,
    agreed_slot: bool = False,
) -> tuple[_slots.Named, tuple[list[int], list[float], list[str]] | None]:
    """This rank's named pieces under ``plan`` and, for per_group, its groups (``groups``), both checked before
    the collective: bad input (a name the plan lacks, a Partial gradient, a bad group limit) that only this
    stage sees is refused together with the other ranks (:func:`_refuse_together`) rather than left to them
    waiting in the collective."""
    try:
        own = plan.reduction_group if plan.reduction_group is not None else dist.group.WORLD
        if group is not None and not same_ranks(group, own):  # another group was ignored before
            raise ValueError(
                "group= does not combine with plan=: the plan reduces over its own group (ParallelPlan(group=...), "
                "the world without it); drop group= from the call"
            )
        named = plan.named_shards(target)
        for shard in named.shards:  # the measurement would refuse them on this rank alone, after this check
            _norm.check_dtypes(shard.tensors)
        return named, groups(named) if groups is not None else None
    except (ValueError, TypeError) as e:
        if _refuse_together(plan, p, groups is not None, agreed_slot):
            e.dist_clip_joined = True  # type: ignore[attr-defined]  # (the call counts as joined)
        raise


def _refuse_together(plan: ParallelPlan, p: float, per_group: bool, agreed_slot: bool = False) -> bool:
    """Bad input on this rank under a plan (a name the plan lacks, a Partial gradient, a bad group limit), which
    the other stages may not share: join their one collective with the same layout and a NaN fingerprint, so
    that every rank raises now (they waited in it until the process group's timeout). Whether it joined."""
    group = plan.reduction_group
    if group is None or _reduce.group_size(group) == 1:
        return False
    n = max(len(plan.names), 1)
    extra = _group_membership([-1] * n, p) if per_group else None
    if agreed_slot:  # (a GradClipper call's verdict, as the others send it: see _with_agreed)
        extra = _with_agreed(extra, torch.zeros((), dtype=torch.float64))
    try:
        _slots.measure([], None, n, p, presence=True, group=group, layout=plan.names, extra=extra,
                       result_dtype=torch.float32, refused=True)
    except RuntimeError:
        pass  # the REFUSED error every rank raises; this rank raises its own
    return True


def _group_order(param_groups: Sequence[dict[str, Any]]) -> list[int] | None:
    """The order ``mode="per_group"`` numbers the param groups in (``order[k]``: the optimizer's index of group
    ``k``), or None where it is the optimizer's own. DeepSpeed's expert param groups (``"moe": True``, made by
    ``split_params_into_different_moe_groups_for_optimizer``) come in the order a Python set iterates their names
    (``ep_size_2``, ``ep_size_1``), which differs between processes without a common ``PYTHONHASHSEED``: numbered
    as listed, the ranks' groups disagreed and every call raised ``RuntimeError`` on every rank. They are taken
    sorted by name in the places they hold, the other groups where they are. The sort is stable: groups of one
    name (one per original group, or one name split at DeepSpeed's ``max_group_size``) keep DeepSpeed's order,
    which is the same on every rank. Only the numbering changes: which parameter is in which group, and each
    group's limit, still travel in the call's fingerprint, so ranks whose groups differ otherwise still raise."""
    places = [i for i, pg in enumerate(param_groups) if pg.get("moe", False)]
    ranked = sorted(places, key=lambda i: str(param_groups[i].get("name", "")))
    if ranked == places:
        return None
    order = list(range(len(param_groups)))
    for at, i in zip(places, ranked):
        order[at] = i
    return order


def _groups_by_memory(named: _slots.Named, optimizer: torch.optim.Optimizer, groups_of: list[int],
                      grads: dict[int, int]) -> list[int]:
    """``groups_of`` with each slot no param group holds by identity placed by memory: the group of the stepped
    parameters whose ``.grad`` bytes its gradient pieces lie in. A piece that is a view of a ``.grad`` (``g[:5]``,
    ``g.view(-1)``, or the slice of a flat gradient buffer a ``.grad`` views, as DeepSpeed and Megatron lay them
    out) is scaled in place in that ``.grad``: taken for a parameter outside the optimizer, it kept its gradient
    and its group was measured without it (0.0765 of its gradient left at 1.0, the rest of its group scaled by
    1/12.97 for 1/13.09). Parameters and copies of gradients share no bytes with a ``.grad``: they stay outside.
    A slot whose pieces lie in the gradients of two groups is a ``ValueError``."""
    # Parameters (outside the optimizer by identity) are not placed, frozen ones neither: requires_grad=False,
    # a module's frozen parameters were walked on every call (0.6 ms -> 6.7 ms for 1,000 of 2,000 on the CPU),
    # and an FSDP2 DTensor parameter's local tensor requires no grad.
    param = torch.nn.Parameter
    unplaced = {name: i for i, (g, name) in enumerate(zip(groups_of, named.names)) if g < 0}
    pieces: dict[str, list[Tensor]] = {}
    if named.by_pieces:
        for s in named.shards:
            for n, t in zip(s.names, s.tensors):
                if n in unplaced and not isinstance(t, param):
                    pieces.setdefault(n, []).append(t)
    else:
        params = named.group_params()
        pieces = {n: [t] for n in unplaced if (t := params.get(n)) is not None and not isinstance(t, param)}

    def placeable(t: Tensor) -> bool:  # a tensor with bytes to place, not requiring grad (not a parameter)
        t = getattr(t, "_local_tensor", t)
        return not t.requires_grad and t.layout == torch.strided and t.numel() > 0

    todo = [(unplaced[name], [t for t in ts if placeable(t)]) for name, ts in pieces.items()]
    todo = [(i, ts) for i, ts in todo if ts]
    if not todo:  # (parameters outside the optimizer, a frozen part of a module: no walk over the gradients)
        return groups_of
    spans: dict[torch.device, list[tuple[int, int, int]]] = {}
    for gi, pg in enumerate(optimizer.param_groups):
        for q in pg["params"]:
            g = getattr(q, "grad", None)
            g = getattr(g, "_local_tensor", g)
            span = _fused._span(g) if isinstance(g, Tensor) and id(q.grad) in grads else None
            if span is not None:
                spans.setdefault(g.device, []).append((*span, gi))
    if not spans:
        return groups_of
    index = {dev: (sorted(s), [a for a, _, _ in sorted(s)], max(b - a for a, b, _ in s)) for dev, s in spans.items()}
    out = list(groups_of)
    for i, ts in todo:
        found: set[int] = set()
        for t in ts:
            t = getattr(t, "_local_tensor", t)
            span = _fused._span(t) if t.device in index else None
            if span is None:
                continue
            ordered, starts, longest = index[t.device]
            at = bisect.bisect_left(starts, span[1]) - 1  # the last stepped gradient starting before its end
            while at >= 0 and ordered[at][0] > span[0] - longest:
                a, b, gi = ordered[at]
                if a < span[1] and b > span[0]:
                    found.add(gi)
                at -= 1
        if len(found) > 1:
            raise ValueError(
                f"the gradient pieces named {named.names[i]!r} lie in the .grad of parameters of different param "
                f"groups ({sorted(found)}): name each piece by the parameter whose gradient it is"
            )
        if found:
            out[i] = found.pop()
    return out


def _group_membership(groups_of: Sequence[int], p: float, limits: Sequence[float] = (), world: int = 1,
                      unlisted: Sequence[bool] = ()) -> Tensor:
    """Under a plan each pipeline stage's optimizer holds its own stage's parameters only: which slot is in which
    group travels in the measurement's all-reduce, so that every rank sees every stage's groups. Per slot,
    ``group + 1`` where this rank's optimizer holds it (else 0), then 1 where it holds it: summed, the first over
    the second is ``group + 1`` (tensor-parallel ranks hold the same slot in the same group); maxed, the first
    is. A third row tells whether the holders agree: summed, ``(group + 1)**2`` (they agree where its product
    with the holders is the first row squared); maxed, ``-(group + 1)`` (they agree where it is minus the first).
    The length depends on the slots only: stages may have different numbers of groups. Three more rows carry the
    limit (``max_norm``) of each slot's group, so that a group whose stages give it different limits is found on
    every rank alike (see :func:`_limits_agree`): summed, ``t = 1 / (1 + limit)`` (for the value) and a digest
    ``d`` of the limit and ``d**2`` (for the comparison, exact: :func:`_slots._digest_values` for ``world``
    ranks; comparing t and t**2 within a tolerance let 1e-6 and 2e-6, or 0 and 1e-6, pass as one limit);
    maxed, ``limit``, ``-limit`` (-inf where not held) and zeros. A seventh row marks a rank holding a non-empty
    piece of the slot without listing it (``unlisted``; summed: counted, maxed: 1): where another rank lists it,
    that rank's piece was scaled by its own group of that number's limit (0.38 where the listing rank used
    1/13), or left alone."""
    gi = torch.tensor(list(groups_of) or [-1], dtype=torch.long)
    held = (gi >= 0).to(torch.float64)
    third = torch.where(held > 0, -(gi + 1.0), -1e9) if math.isinf(p) else (gi + 1.0) ** 2 * held
    values = [float(x) + 0.0 for x in limits] or [0.0]  # (+ 0.0: -0.0 is the limit 0.0)
    at = gi.clamp(min=0, max=len(values) - 1)
    lim = torch.tensor(values, dtype=torch.float64)[at]
    if math.isinf(p):
        none = torch.full_like(lim, -math.inf)
        rows = [torch.where(held > 0, lim, none), torch.where(held > 0, -lim, none), torch.zeros_like(lim)]
    else:  # t = 1 / (1 + limit), in [0, 1] for any limit >= 0 (inf: 0), so that sums stay finite
        digests = torch.stack([_slots._digest_values(repr(v).encode(), p, world)[:2] for v in values])[at]
        rows = [held / (1.0 + lim), digests[:, 0] * held, digests[:, 1] * held]
    stray = torch.tensor([bool(u) for u in unlisted] or [False], dtype=torch.float64)
    if stray.numel() != gi.numel():
        stray = torch.zeros_like(held)
    return torch.cat([(gi + 1.0) * held, held, third, *rows, stray * (1.0 - held)])


_MEMBERSHIP_ROWS = 7  # the rows of _group_membership; _group_signatures' follow


def _strays(rows: Tensor) -> Tensor:
    """Per slot: some rank lists it and another holds a piece of it without listing it (row 7). A device bool."""
    return (rows[6] > 0) & (rows[1] > 0)


def _group_signatures(groups_of: Sequence[int], names: Sequence[str], held: set[str], p: float,
                      world: int = 1) -> Tensor:
    """Five more rows per slot for named pieces without a plan, telling whether the ranks listing a slot agree
    on the *set* of slots in its group (which the group numbers cannot tell when ranks number groups
    differently): a rank listing slot s gives the signature of its group, two digests of the names of the
    group's slots (:func:`_slots._digest_values` for ``world`` ranks: exact integers, compared exactly; a sum of
    golden-ratio weights per slot before made {0, 3} and {1, 2} one set, and 1200 slots compared within a
    tolerance another pair); a rank holding a piece of s without listing it gives -1. Summed: the participants,
    then each digest and its square (all equal iff sum**2 == count * sum of squares); maxed: each digest and
    minus it (-inf where not taking part), and a row of zeros."""
    n = max(len(groups_of), 1)
    members: dict[int, list[str]] = {}
    for g, name in zip(groups_of, names):
        if g >= 0:
            members.setdefault(g, []).append(name)
    unlisted = [-1.0, 1.0, -1.0, 1.0]  # a digest of -1 (its square, or minus it, 1)
    by_group = {g: _slots._digest_values("\x00".join(sorted(m)).encode(), p, world).tolist()
                for g, m in members.items()}
    holds = [name in held for name in names] or [False]
    rows: list[list[float]] = []
    for i in range(n):
        g = groups_of[i] if i < len(groups_of) else -1
        if g >= 0:
            rows.append(by_group[g])
        elif holds[i]:
            rows.append(unlisted)
        else:
            rows.append([-math.inf] * 4 if math.isinf(p) else [0.0] * 4)
    sig = torch.tensor(rows, dtype=torch.float64).T
    if math.isinf(p):
        return torch.cat([sig.reshape(-1), torch.zeros(n, dtype=torch.float64)])
    part = (sig[0] != 0).to(torch.float64)
    return torch.cat([part, sig.reshape(-1)])


def _slot_limits(rows: Tensor, p: float) -> tuple[Tensor, Tensor, Tensor]:
    """Each slot's group limit from rows 4-6 of :func:`_group_membership`: whether every holder gives the same
    (summed: the digests d and d**2 agree iff (sum d)**2 == holders * sum d**2, exactly; maxed: the largest and
    smallest match), the value to compare limits by (the digest, or the limit itself when maxed), and the limit
    (summed: from t = 1 / (1 + limit), which loses digits for tiny limits: only for the clipped flag)."""
    holders = rows[1]
    if math.isinf(p):
        return rows[3] == -rows[4], rows[3], rows[3]  # the limit itself (exact under MAX)
    t, d, d2 = rows[3], rows[4], rows[5]
    known = d * d == holders * d2
    mean = t / holders.clamp(min=1)
    return known, d / holders.clamp(min=1), torch.where(mean > 0, 1.0 / mean - 1.0, math.inf)


def _group_limits_agree(rows: Tensor, combined: Tensor, p: float) -> Tensor:
    """Whether, numbered by ``combined``, every group has one limit: every holder of each slot gives the same
    (:func:`_slot_limits`), and every slot of a group the same (sorted by group, neighbours compared). A device
    bool: no host read."""
    known, value, _ = _slot_limits(rows, p)
    listed = combined >= 0
    ok = (known | ~listed).all()
    key = torch.where(listed, combined, -1)
    order = torch.argsort(key, stable=True)
    k, v = key[order], value[order]
    same_group = (k[1:] == k[:-1]) & (k[1:] >= 0)
    return ok & ((v[1:] == v[:-1]) | ~same_group).all()


def _own_groups_agree(rows: Tensor, p: float) -> Tensor:
    """Whether each rank's own numbering is right: for every slot, the ranks listing it (or holding a piece of
    it) give the same group signature (:func:`_group_signatures`) and the same limit. A device bool."""
    holders = rows[1]
    sig = rows[_MEMBERSHIP_ROWS:]
    if math.isinf(p):
        a1, b1, a2, b2 = sig[:4]
        sig_ok = ((a1 == -b1) & (a2 == -b2)) | torch.isinf(a1)  # -inf: nobody takes part
    else:
        part, s1, q1, s2, q2 = sig[:5]
        sig_ok = (s1 * s1 == part * q1) & (s2 * s2 == part * q2)
    lim_ok, _, _ = _slot_limits(rows, p)
    return (sig_ok & (lim_ok | (holders <= 0))).all()


def _host_checks(device: torch.device) -> bool:
    """Whether checks may read their verdict on the host (the CPU: free); elsewhere a failed check turns the
    norms into NaN, without a host sync."""
    return device.type == "cpu"


def _limits_agree(extra: Tensor, combined: Tensor, p: float, labels: Sequence[str]) -> None:
    """On the CPU (where reading is free): every holder of a slot, and every slot of a group, must give the group
    the same ``max_norm`` (under a plan each stage's optimizer gives its own: it clipped a group's pieces by
    different coefficients). All ranks see the same combined values, so all raise together. Elsewhere
    :func:`_per_group` turns the norms into NaN (:func:`_group_limits_agree`)."""
    if not _host_checks(extra.device):
        return
    known, compared, limits = _slot_limits(extra.reshape(-1, combined.numel()), p)
    values: dict[int, set[float]] = {}
    shown: dict[int, set[float]] = {}
    split: set[int] = set()
    for g, ok, value, limit in zip(combined.tolist(), known.tolist(), compared.tolist(), limits.tolist()):
        if g < 0:
            continue
        values.setdefault(g, set()).add(value)
        shown.setdefault(g, set()).add(limit)
        if not ok:
            split.add(g)
    bad = sorted(split | {g for g, v in values.items() if len(v) > 1})  # compared exactly (digests, or MAX)
    if bad:
        g = bad[0]
        label = labels[g] if g < len(labels) else f"param_group{g}"
        short = sorted({f"{v:g}" for v in shown[g]})
        seen = "" if g in split else f" ({', '.join(short if len(short) > 1 else map(repr, sorted(shown[g])))})"
        raise ValueError(
            f"param group {g} ({label!r}) has different max_norm on different ranks{seen}: every stage's optimizer "
            "must give a group the same limit, or the group's pieces are clipped by different coefficients"
        )


def _per_group(
    grouping: tuple[list[int], list[float], list[str]],
    m: _slots.Measurement,
    p: float,
    out: torch.dtype,
    fill_only: bool = False,
) -> tuple[Tensor, Tensor, tuple[str, ...], Tensor, Tensor | None]:
    """Coefficients per param group (``grouping`` from :meth:`GradClipper._groups`) and per slot, the limits,
    and whether any group of any rank is clipped (:func:`_clipped_anywhere`).

    ``fill_only`` (named pieces, no plan): the combined memberships are taken only when every holder of every
    slot numbers it alike (they then also place the slots a rank's optimizer left out); otherwise each rank keeps
    its own numbering. A rank whose optimizer holds none of the slots takes the combined groups (it raised alone
    on accelerators, where the combined test is not read: NaN norms on every rank where no rank lists any)."""
    groups_of, limits, labels = grouping
    if groups_of and max(groups_of) < 0 and m.extra is None:
        # Every rank sees the same names and groups, so every rank raises here: none steps alone.
        raise ValueError(
            "per_group clipping found none of the target's parameters in optimizer.param_groups, so it "
            "would clip nothing; pass the optimizer that steps these parameters (under DeepSpeed ZeRO-3: "
            "the torch optimizer given to deepspeed.initialize)"
        )
    index = _reduce.moved(torch.tensor(groups_of or [-1], dtype=torch.long), m.device)  # (no host sync)
    host = _host_checks(m.device)
    agreed: Tensor | None = None  # off the CPU: whether the checks raising on the CPU pass (else NaN norms)
    if m.extra is not None:  # plan or named pieces: the groups of every rank's slots, combined (on the device)
        rows = m.extra.reshape(-1, index.numel())
        ids, holders, third = rows[:3]  # see _group_membership
        same = (ids == -third) if math.isinf(p) else (third * holders == ids * ids)
        consistent = (same | (holders <= 0)).all()  # every holder of every slot names the same group
        ids = ids if math.isinf(p) else ids / holders.clamp(min=1)  # MAX: the id itself; SUM: id x holders
        combined = torch.where(holders > 0, ids.round().long() - 1, -1)
        if host and bool((combined < 0).all()):  # all-reduced: the same verdict everywhere
            raise ValueError(
                "per_group clipping found none of the target's parameters in any rank's optimizer.param_groups, "
                "so it would clip nothing; pass the optimizer that steps these parameters"
            )
        stray = _strays(rows).any()
        if not fill_only:
            if not host:  # a host read: the same verdict as NaN norms on every rank, as _slots._layout_check does
                agreed = consistent & _group_limits_agree(rows, combined, p) & (combined >= 0).any() & ~stray
            elif not bool(consistent):  # all-reduced: every rank raises alike
                raise ValueError(
                    "mode='per_group' under a plan: the ranks holding a parameter (tensor-parallel peers, a tied "
                    "copy and its owner) put it in different param group indices; group i must be group i of "
                    "every stage's optimizer (the indices were averaged into another group)"
                )
            elif bool(stray):
                raise ValueError(
                    "mode='per_group' under a plan: a rank holds a piece of a parameter its optimizer does not list "
                    "while another rank's optimizer lists it (that piece was scaled by another group's limit, or "
                    "left alone): every rank holding part of a parameter must list it in the same group"
                )
            _limits_agree(m.extra, combined, p, labels)
        if fill_only:
            # Ranks may number their groups differently (one holding nothing of a group's parameters may leave
            # the group out): then every rank keeps its own numbering, which is right only where every rank
            # listing a parameter lists the same group of parameters with the same limit, and lists every
            # parameter it holds a piece of (_own_groups_agree). Where all number alike (every holder of a slot
            # names the same group, and each group has one limit), the combined groups also place what a rank's
            # optimizer left out. A numbering that looked alike because each slot had one holder merged two
            # ranks' different "group 0"s (each limit applied to the merged norm).
            # (and no rank holds a piece of a listed slot without listing it: its piece took its own group of
            # that number's limit; _own_groups_agree refuses that layout)
            alike = consistent & _group_limits_agree(rows, combined, p) & ~stray
            own_ok = _own_groups_agree(rows, p)
            if not host:
                agreed = (alike | own_ok) & (combined >= 0).any()
            elif not bool(alike | own_ok):  # all-reduced: every rank raises alike
                raise ValueError(
                    "per_group on named pieces: the ranks' optimizers number their param groups differently, so "
                    "each rank's own groups are used, but a parameter's group (or its max_norm) differs between "
                    "ranks listing it, or a rank holds a piece of a parameter its optimizer does not list: give "
                    "every rank's optimizer the same groups in the same order (a rank may leave out parameters "
                    "it holds nothing of), or list every parameter of a group on every rank holding part of it"
                )
            index = torch.where(alike, combined, index)
        else:
            index = combined
        # A group this rank's optimizer lacks (stages with fewer groups) has no limit here: left out.
        index = torch.where(index < len(limits), index, -1)
    partials = _slots.merge_partials(m.partials, index, len(limits), p)
    if agreed is not None:
        partials = torch.where(agreed, partials, torch.full_like(partials, math.nan))
    norms = _slots.finalize_norms(partials, p, m.loss_scale).to(out)
    limit = _reduce.moved(torch.tensor(limits, dtype=out), norms.device)  # (no host sync)
    coef = _scale.clip_coefficient(limit, norms)
    # Parameters outside the optimizer count in the total but keep their gradients (coefficient 1).
    slot_coef = torch.where(index >= 0, coef[index.clamp(min=0)], torch.ones_like(index, dtype=out))
    anywhere = None
    if m.extra is not None:
        # Whether some group of any rank scales a gradient down, the same on every rank: each rank's own
        # coefficients cover only the groups its optimizer has (a rank lacking the clipped group said False).
        # Groups are told by their combined numbers, or under each rank's own numbering by their signatures.
        key = combined.to(torch.float64)
        if fill_only:
            sig = rows[_MEMBERSHIP_ROWS:]
            own = sig[0] if math.isinf(p) else sig[1] / sig[0].clamp(min=1)  # the group's first digest
            key = torch.where(alike, key, own)
        anywhere = _clipped_anywhere(m, key, rows[1] > 0, _slot_limits(rows, p)[2], p)
    return coef, slot_coef, tuple(labels), limit, anywhere


def _clipped_anywhere(m: _slots.Measurement, key: Tensor, listed: Tensor, slot_limit: Tensor, p: float) -> Tensor:
    """Whether any group scales some gradient down, from every rank's combined memberships: slots with equal
    ``key`` (where ``listed``) form one group, with the limit ``slot_limit``. Device ops only (sorted into
    segments, no host read: under a plan on accelerators stages with different groups disagreed)."""
    n = key.numel()
    device = m.partials.device
    key, listed, slot_limit = key.to(device), listed.to(device), slot_limit.to(device)
    order = torch.argsort(torch.where(listed, key, math.inf), stable=True)
    k = key[order]
    starts = torch.ones(n, dtype=torch.bool, device=device)
    starts[1:] = k[1:] != k[:-1]
    segment = torch.empty(n, dtype=torch.long, device=device)
    segment[order] = torch.cumsum(starts.long(), 0) - 1
    index = torch.where(listed, segment, -1)
    norms = _slots.finalize_norms(_slots.merge_partials(m.partials.to(torch.float64), index, n, p), p, m.loss_scale)
    limits = torch.zeros(n, dtype=torch.float64, device=device).scatter_(
        0, index.clamp(min=0), torch.where(listed, slot_limit.to(torch.float64), 0.0))
    used = torch.zeros(n, dtype=torch.bool, device=device).scatter_(0, index.clamp(min=0), listed)
    coefs = _scale.clip_coefficient(limits, norms)
    return ((coefs < 1) & (norms > 0) & used).any()
