"""Clipping folded into a fused optimizer step: the clip coefficient travels as ``grad_scale``.

torch's fused optimizers (``Adam``/``AdamW``/``SGD``/``Adagrad`` with ``fused=True``) take two device tensors
meant for mixed-precision loss scaling: every gradient is divided by ``grad_scale`` inside the update kernel
(and written back, so ``p.grad`` ends up clipped), and ``found_inf == 1`` makes the kernel skip the update and
roll the step count back. Handing them ``1 / coef`` and ``not isfinite(total)`` clips inside the optimizer's
own read of the gradients: the clip costs the norm's read pass only, no separate scaling pass, and a
non-finite norm skips the step without the host ever reading the norm (no device sync on CUDA).

The values are stashed on the optimizer by :func:`hand_over_` and consumed by a step pre-hook, so they apply to
exactly the next ``step()``. A dist_clip call that reads those gradients before that step (another clip, a
norm, a report) first applies the coefficient to them (:func:`settle`), so it sees them clipped, exactly as
after a clip that scaled them. The hook combines with what a ``GradScaler`` sets for the same step (it sets
``grad_scale``/``found_inf`` before calling ``step``): scales multiply, either ``found_inf`` flag skips. A post-hook
restores the attributes as they were.
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import dis
import functools
import operator
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _reduce, _scale
from ._warn import warn_at_caller

__all__ = [
    "arm_skip_", "armed_record", "grad_state", "gradients", "hand_over_", "overlapping",
    "same_tensors", "settle", "steps_what_was_measured", "supports_grad_scale", "untouched",
]

_PENDING = "_dist_clip_pending"
_HOOKS = "_dist_clip_hooks"
_SAVED = "_dist_clip_saved"
_SKIP = "_dist_clip_skip"
_OUTER = "_dist_clip_outer"  # on a ZeRO or OSS wrapper's inner optimizer: a weak reference to the wrapper
#: set on an optimizer once a call combining over several ranks could arm its skip (see Agreement._may_differ)
_COMBINED = "_dist_clip_combined"
#: on an optimizer among several ranks: the parameters it steps that no flag waiting for its step was armed on
#: (see :func:`note_beside`)
_BESIDE = "_dist_clip_beside"
#: the same, but for flags read on the CPU (for free) as not set, which hold nothing: read by Agreement._may_differ
_UNSET = "_dist_clip_beside_unset"
#: on an optimizer among several ranks: the flags armed since its last step by calls combining over several ranks
#: that read on the CPU as not set, the same on every rank (see :func:`note_beside`), and on a device the flags of
#: such calls' hand-overs of no gradient here (see :func:`hand_over_`), of calls measuring nothing here with no
#: collective (0) and what the verdicts carry them into (see :func:`_still_calm`)
_CALM = "_dist_clip_calm"
#: where the arming combined over several ranks: :data:`_BESIDE` passing over the :data:`_CALM` flags' gradients,
#: for the carries of calls combining over no other rank (see :func:`note_beside`)
_BESIDE_ALONE = "_dist_clip_beside_alone"
# id(parameter) -> (backward count, its hook's handle, the tensor's _cdata) (see _write_cell). By id: a weak
# reference on a parameter made module.to() / load_state_dict() refuse to swap it
# (torch.__future__.set_swap_module_params_on_conversion).
_WRITES: dict[int, tuple[_Count, Any, int]] = {}
_WRITES_PRUNE = [256]  # prune dead parameters' entries when the table reaches this size
_MISSING = object()
#: the coefficient a hand-over applied in place leaves to its step (:func:`hand_over_applied_`): 1, in the
#: gradients already (told apart by identity: see :func:`defers_beside`)
_APPLIED = torch.ones((), dtype=torch.float32)
#: a settled hand-over's flag among the entries :func:`_held_flags` reads
_SETTLED = object()
#: the ranks' agreed verdict (a 0-dim bool) on whether a gradient the arming call does not measure is non-finite,
#: read by :func:`carried_by_replacements` in place of this rank's own pieces (see :class:`Agreement`)
_AGREED: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("dist_clip_agreed", default=None)
#: where :func:`_keep_replaced` leaves a flag for the call's agreement to decide, while it settles
_DEFERRED: contextvars.ContextVar[Agreement | None] = contextvars.ContextVar("dist_clip_deferred", default=None)
#: whether the call arming under :meth:`Agreement.armed` combined over several ranks (:attr:`Agreement.shared`;
#: see :func:`note_beside`, :func:`_measured_again`)
_COMBINING: contextvars.ContextVar[bool] = contextvars.ContextVar("dist_clip_combining", default=False)
#: the dist_clip call at hand (its :class:`Agreement`), from its entry, before anything is settled or carried: every
#: carry of the call reads the set that matches whether it combines over several ranks (:func:`_beside_key`); None
#: outside a call (the step)
_CALL: contextvars.ContextVar[Agreement | None] = contextvars.ContextVar("dist_clip_call", default=None)


class _ByIdentity:
    """A weak set of objects by identity: a ``WeakSet`` hashes and compares its members, so an optimizer class
    defining ``__eq__`` (unhashable) raised ``TypeError`` at the hand-over and at every later ``step()``, and one
    whose ``__eq__``/``__hash__`` follow its settings was taken for another equal one (never settled: a call
    reading its gradients before the step saw them unclipped)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref[Any]] = {}

    def add(self, obj: Any) -> None:
        key, refs = id(obj), self._refs

        def gone(ref: weakref.ref[Any]) -> None:
            if refs.get(key) is ref:  # (not a later object that took the same id)
                del refs[key]

        refs[key] = weakref.ref(obj, gone)

    def discard(self, obj: Any) -> None:
        ref = self._refs.get(id(obj))
        if ref is not None and ref() is obj:
            del self._refs[id(obj)]

    def __iter__(self) -> Iterator[Any]:
        for ref in list(self._refs.values()):
            obj = ref()
            if obj is not None:
                yield obj

    def __len__(self) -> int:
        return len(self._refs)


# Optimizers holding a coefficient for their next step(): a later call reading the same gradients settles it.
_WAITING = _ByIdentity()
# Optimizers armed among several ranks whose ledger may hold a flag standing for another rank's gradients
# (:func:`_elsewhere_entry`): such a flag outlasts a call that does not arm that optimizer, so it joins that call's
# verdict (see :class:`Agreement`); dropped from here once nothing is armed
_ARMED = _ByIdentity()
# ids of optimizers whose step(closure) is running that closure: their step is under way (see _pre_hook). By id:
# an optimizer class defining __eq__ is not hashable (a WeakSet made its step(closure) raise).
_IN_CLOSURE: set[int] = set()
_OUR_PRE = "_dist_clip_pre_hooks"  # the step pre-hooks dist_clip registered on an optimizer (see in_step)
# The code of torch's step wrapper (Optimizer.profile_hook_step's), which runs the pre-hooks, step and post-hooks.
_STEP_CODE = torch.optim.Optimizer.profile_hook_step(lambda *a, **k: None).__code__


def _call_lines(code: Any) -> dict[str, set[int]]:
    """The lines of torch's step wrapper that call a pre-hook, the step itself and a post-hook: where its frame
    stands tells the phase (the code of the frame it called did not: a pre-hook and ``step()`` under one
    decorator, ``torch.no_grad()``, run one wrapper code, and a hook's call was taken for the step's)."""
    lines: dict[str, set[int]] = {"pre": set(), "step": set(), "post": set()}
    for ins in dis.get_instructions(code):
        line = ins.positions.lineno if ins.positions is not None else None
        if line is None or not ins.opname.startswith("LOAD_"):
            continue
        if ins.argval == "pre_hook":
            lines["pre"].add(line)
        elif ins.argval == "func":
            lines["step"].add(line)
        elif ins.argval == "post_hook":
            lines["post"].add(line)
    return lines


_LINES = _call_lines(_STEP_CODE)


def step_closure(args: Any, kwargs: Any) -> Any:
    """The closure passed to ``step()``, from a step pre-hook's arguments (torch passes ``self`` first)."""
    return kwargs["closure"] if kwargs and "closure" in kwargs else (args[1] if len(args) > 1 else None)


def wrap_closure(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> tuple[Any, Any]:
    """A step pre-hook's arguments with the closure wrapped so that :func:`in_closure` holds while it runs."""
    closure = step_closure(args, kwargs)
    if not callable(closure) or getattr(closure, "_dist_clip_running", None) is optimizer:
        return args, kwargs  # (a step() whose first argument is not a closure is left alone)

    @functools.wraps(closure)  # (its name and attributes, for the user's own step hooks)
    def running(*a: Any, **k: Any) -> Any:
        _IN_CLOSURE.add(id(optimizer))
        try:
            result = closure(*a, **k)
        finally:
            _IN_CLOSURE.discard(id(optimizer))
        stash = optimizer.__dict__.get(_SAVED)
        if stash is not None:
            # Gradients the closure made for the first time (set to None before it): fused SGD's first-step
            # momentum preparation, which the pre-hook could not do for them (a skipped step kept torch's
            # empty_like buffer: 2e37 or NaN in the momentum).
            fresh = _prepare_sgd_first_step(optimizer)
            if fresh:
                optimizer.__dict__[_SAVED] = (stash[0], [*stash[1], *fresh], *stash[2:])
        return result

    running._dist_clip_running = optimizer  # type: ignore[attr-defined]  # (a second hook wraps it once)
    if kwargs and "closure" in kwargs:
        return args, {**kwargs, "closure": running}
    return (args[0], running, *args[2:]), kwargs


def in_closure(optimizer: object) -> bool:
    """Whether ``optimizer.step(closure)`` is running its closure now: a dist_clip call from inside it acts on
    the step under way (a hand-over made then would reach no step: it scales in place instead; a skip arms the
    running step)."""
    return id(optimizer) in _IN_CLOSURE


def step_phase(optimizer: object) -> tuple[str | None, Any]:
    """Where this thread is in ``optimizer.step()``, read from torch's step wrapper on the Python stack (no mark
    left on the optimizer: a stored frame kept a failed step's callers and their locals alive): ``None`` outside
    it, ``"global_pre"`` in a global step pre-hook, ``"pre"`` in one of the optimizer's own pre-hooks (with that
    hook), ``"step"`` inside the step itself (a closure included), ``"post"`` in a post-hook (the step is over)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _STEP_CODE:
            local = frame.f_locals
            if local.get("self") is optimizer:
                line = frame.f_lineno
                if "out" in local or line in _LINES["post"]:  # (out: bound once the step returned)
                    return "post", None
                if line in _LINES["pre"] and "pre_hook" in local:
                    hook = local["pre_hook"]
                    if any(h is hook for h in _global_pre_hooks().values()):
                        return "global_pre", hook
                    return "pre", hook
                return "step", None
        frame = frame.f_back
    return None, None


def nested_step(optimizer: object) -> bool:
    """Whether this thread runs ``optimizer.step()`` inside another ``step()`` of the same optimizer: a subclass
    whose ``step`` calls ``super().step()`` runs torch's step hooks twice, the inner pair within the outer's step
    (what the outer step wrote before the call was taken for the state before the step)."""
    frame, seen = sys._getframe(1), 0
    while frame is not None:
        if frame.f_code is _STEP_CODE and frame.f_locals.get("self") is optimizer:
            seen += 1
            if seen > 1:
                return True
        frame = frame.f_back
    return False


def _global_pre_hooks() -> Any:
    from torch.optim import optimizer as optim_module

    return optim_module._global_optimizer_pre_hooks


def in_step(optimizer: object) -> bool:
    """Whether a dist_clip call now acts on ``optimizer``'s step under way: from its closure (:func:`in_closure`)
    or the step itself, or from one of its own step pre-hooks that runs after dist_clip's (or where dist_clip has
    none yet: registered now, it would not run in this step). A user's pre-hook registered after dist_clip's
    calling dist_clip: a hand-over made there reached no step, and a norm read there put back the skip flag the
    pre-hook had just set, as for a step that raised (the NaN step taken); the very first call from a pre-hook or
    a closure (no dist_clip hook yet) acted on no step. Not from a global pre-hook (the optimizer's own hooks,
    dist_clip's included, still run in this step) nor from a post-hook (the step is over)."""
    if id(optimizer) in _IN_CLOSURE:
        return True
    phase, hook = step_phase(optimizer)
    if phase == "step":
        return True
    if phase != "pre":
        return False
    ours = optimizer.__dict__.get(_OUR_PRE)  # type: ignore[attr-defined]
    order = list(optimizer._optimizer_step_pre_hooks.values())  # type: ignore[attr-defined]
    if not ours or not any(h is o for h in order for o in ours):  # none there (none yet, or cleared by the user)
        return True
    at = next((i for i, h in enumerate(order) if h is hook), len(order))
    return any(h is o for h in order[:at] for o in ours)  # one of dist_clip's has run


def register_step_hooks(optimizer: torch.optim.Optimizer, pre: Callable[..., Any] | None,
                        post: Callable[..., Any] | None) -> tuple[Any, Any]:
    """Register dist_clip's step pre- and post-hook (post first among the optimizer's own, as it must run before
    the user's); a hook whose dict torch is looping over now (a first call from a user's step hook) is left out
    (None): adding to it raised torch's "OrderedDict mutated during iteration" and lost the step. The other
    hook registers it when it runs (:func:`complete_step_hooks`)."""
    phase, _ = step_phase(optimizer)
    pre_handle = None
    if pre is not None and phase != "pre":
        pre_handle = optimizer.register_step_pre_hook(pre)
        optimizer.__dict__.setdefault(_OUR_PRE, []).append(pre)
    post_handle = None
    if post is not None and phase != "post":
        post_handle = optimizer.register_step_post_hook(post)
        # Before the user's own post-hooks: one reading the gradients (a dist_clip call) ran while the hand-over
        # was still pending and multiplied the coefficient into gradients the fused kernel had already divided.
        hooks = getattr(optimizer, "_optimizer_step_post_hooks", None)
        if hasattr(hooks, "move_to_end"):
            hooks.move_to_end(post_handle.id, last=False)
    return pre_handle, post_handle


# Global step pre-hooks standing in for a dist_clip pre-hook left out (see watch_deferred), with the handle list
# each completes and its optimizer: removed once that list holds its pre-hook or the optimizer is gone (not while
# torch loops over the global hooks).
_LATE: list[tuple[Any, list[Any], Any]] = []


def watch_deferred(optimizer: torch.optim.Optimizer, handles: list[Any], pre: Callable[..., Any],
                   post: Callable[..., Any]) -> None:
    """Where :func:`register_step_hooks` left the pre-hook out (a first call from a user's step pre-hook), the
    post-hook registers it at the step's end; a step that raised never got there, and its retry ran without
    dist_clip's pre-hook (a stale skip combined into it: a good step skipped). A global step pre-hook (which
    torch runs before the optimizer's own, outside their loop) registers it at this optimizer's next step."""
    if handles[0] is not None:
        return
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    ref = weakref.ref(optimizer)
    # Bound methods (a skip guard's) weakly: held by torch's global hooks, they kept a dropped optimizer's guard,
    # its snapshot and the parameters alive.
    hooks = [weakref.WeakMethod(h) if hasattr(h, "__self__") else (lambda h=h: h) for h in (pre, post)]

    def late(opt: Any, args: Any, kwargs: Any) -> None:
        pre_now, post_now = hooks[0](), hooks[1]()
        if opt is ref() and handles[0] is None and pre_now is not None and post_now is not None:
            complete_step_hooks(opt, handles, pre_now, post_now)

    _prune_late()
    _LATE.append((register_optimizer_step_pre_hook(late), handles, ref))


def _prune_late() -> None:
    """Remove the global stand-ins whose pre-hook is registered (never while torch loops over the global
    pre-hooks: removing one there raised "OrderedDict mutated during iteration")."""
    if not _LATE:
        return
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _STEP_CODE and frame.f_lineno in _LINES["pre"]:
            hook = frame.f_locals.get("pre_hook")
            if any(h is hook for h in _global_pre_hooks().values()):
                return
        frame = frame.f_back
    for entry in [e for e in _LATE if e[1][0] is not None or e[2]() is None]:
        entry[0].remove()
        _LATE.remove(entry)


def complete_step_hooks(optimizer: torch.optim.Optimizer, handles: list[Any], pre: Callable[..., Any],
                        post: Callable[..., Any]) -> None:
    """Register what :func:`register_step_hooks` left out, where torch is not looping over its dict now: from a
    dist_clip step hook (a pre-hook from the post-hook, a post-hook from the pre-hook), or from a call outside
    any step (a step that raised before the post-hook could register the pre-hook: the next hand-over and skip
    were lost)."""
    if handles[0] is None or handles[1] is None:
        registered = register_step_hooks(optimizer, pre if handles[0] is None else None,
                                         post if handles[1] is None else None)
        handles[0] = handles[0] if handles[0] is not None else registered[0]
        handles[1] = handles[1] if handles[1] is not None else registered[1]
        watch_deferred(optimizer, handles, pre, post)
    _prune_late()


def repair_step_hooks(optimizer: torch.optim.Optimizer, handles: list[Any], pre: Callable[..., Any],
                      post: Callable[..., Any]) -> None:
    """Forget the hooks behind ``handles`` the user removed (clearing the optimizer's hook dicts left dist_clip
    believing them there: a NaN step taken) and register what is missing (:func:`complete_step_hooks`); hooks
    still there stay (removing one while torch looped over its dict raised "OrderedDict mutated")."""
    if handles[0] is not None and handles[0].id not in optimizer._optimizer_step_pre_hooks:
        handles[0] = None
        optimizer.__dict__[_OUR_PRE] = [h for h in optimizer.__dict__.get(_OUR_PRE, []) if h is not pre]
    if handles[1] is not None and handles[1].id not in optimizer._optimizer_step_post_hooks:
        handles[1] = None
    complete_step_hooks(optimizer, handles, pre, post)


def supports_grad_scale(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` reads ``grad_scale``/``found_inf``: torch's fused optimizers.

    ``_step_supports_amp_scaling`` is the flag ``GradScaler`` relies on for the same contract; it is set by
    torch's optimizers exactly when they run fused.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and hooked(optimizer) and all(
        g.get("fused", False) for g in optimizer.param_groups
    )


def hooked(optimizer: object) -> bool:
    """Whether ``optimizer.step()`` runs torch's step hooks, which every hand-over and skip rides on: torch wraps a
    class's ``step`` when its first instance is made (``step.hooked``); a ``step`` replaced on the class after
    that (another library's patch calling ``step.__wrapped__``), or an object that never ran
    ``Optimizer.__init__`` (a wrapper around another optimizer), runs none: the hand-over was lost (stepped
    unclipped, 35.8 off) and the skip taken."""
    return hasattr(optimizer, "_optimizer_step_pre_hooks") and bool(getattr(type(optimizer).step, "hooked", False))


def _prepare_sgd_first_step(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """torch's fused SGD allocates momentum buffers with ``empty_like`` before a possibly skipped first step
    and keeps them: a skipped first step would leave garbage momentum. With ``dampening == 0`` a zero buffer
    makes the first update ``0 * momentum + grad``, bit-for-bit the first-step rule, so start from zeros.
    With ``dampening != 0`` no buffer does (``momentum * buf + (1 - dampening) * grad`` is not ``grad``):
    returns those parameters, whose new buffers :func:`_post_hook` drops again if the step was skipped."""
    fresh: list[Tensor] = []
    if not isinstance(optimizer, torch.optim.SGD):
        return fresh
    for group in optimizer.param_groups:
        if group.get("momentum", 0) == 0:
            continue
        # With dampening, no buffer gives the first-step rule; nor one kept for some parameters only: a later
        # step finding a buffer beside a parameter without one (no gradient at the skipped step) is no first
        # step to torch, which then passed None for that parameter's buffer (TypeError from _fused_sgd_).
        dampened = group.get("dampening", 0) != 0 or any(p.grad is None for p in group["params"])
        for p in group["params"]:
            if p.grad is not None and optimizer.state[p].get("momentum_buffer") is None:
                if dampened:
                    fresh.append(p)
                else:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(
                        p.grad, memory_format=torch.preserve_format
                    )
    return fresh


def _span(t: Tensor) -> tuple[int, int] | None:
    """The bytes a gradient's elements lie in, [first, last + 1) (a DTensor: its local shard); None when it has
    no elements or no single strided storage (sparse)."""
    t = getattr(t, "_local_tensor", t)
    if t.layout != torch.strided or t.numel() == 0:
        return None
    start = t.data_ptr()
    if t.is_contiguous():  # the usual case (bucket views): no walk over the dimensions
        return start, start + t.nbytes
    last = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) if t.dim() else 0
    return start, start + (last + 1) * t.element_size()


def _overlap_test(tensors: Sequence[Tensor]) -> Callable[[tuple[int, int] | None], bool] | None:
    """A test of whether a span overlaps the bytes of any of ``tensors`` (None when they have none)."""
    spans = sorted(filter(None, map(_span, tensors)))
    if not spans:
        return None
    starts = [a for a, _ in spans]
    reach: list[int] = []  # the furthest end among the spans sorted up to each position
    for _, b in spans:
        reach.append(max(b, reach[-1]) if reach else b)

    def overlaps(span: tuple[int, int] | None) -> bool:
        at = bisect.bisect_left(starts, span[1]) - 1 if span is not None else -1  # spans starting before its end
        return at >= 0 and reach[at] > span[0]  # type: ignore[index]

    return overlaps


def _covered(tensors: Sequence[Tensor]) -> list[tuple[int, int]] | None:
    """The bytes ``tensors`` cover, as sorted disjoint intervals; None when one of them covers bytes it does not
    own (a view with gaps, ``g[::2]``, or one whose elements share memory, ``expand``), whose span would
    overstate its elements."""
    spans = []
    for t in tensors:
        span = _span(t)
        if span is None:
            if getattr(t, "_local_tensor", t).layout != torch.strided:
                return None  # sparse: no bytes to compare
            continue  # no elements
        if span[1] - span[0] != getattr(t, "_local_tensor", t).numel() * t.element_size():
            return None
        spans.append(span)
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def overlapping(tensors: Sequence[Tensor]) -> bool:
    """Whether two of ``tensors`` share bytes (``p.grad = buf[0:10]``, ``q.grad = buf[5:15]``). Scaled in place,
    the shared elements are multiplied once per gradient (twice here, as torch's clip does); a fused kernel's
    ``grad_scale`` would apply the coefficient once to each parameter it steps, so the step differed from the
    same call without ``optimizer=`` (0.38 on a parameter). Tensors that are not views own their memory, unless
    aliased through ``.detach()``, ``.data`` or ``set_()`` (then they share a first byte, or one starts inside
    its storage: one parameter stepped 46 times as far as without ``optimizer=``, the fused kernel writing its
    divided gradient back into the other's); otherwise the views and aliases are walked, by the bytes they span
    (views with gaps count as covering their whole span: in doubt, the gradients are scaled in place)."""
    if not any(map(Tensor._is_view, tensors)) and not any(map(Tensor.storage_offset, tensors)):
        # the usual case, in C: distinct first bytes (a DTensor reads 0: FSDP2's disjoint shards)
        try:
            first = list(filter(None, map(Tensor.data_ptr, tensors)))
        except RuntimeError:  # a tensor without storage (sparse: torch's "cannot access data pointer"), below
            first = [0, 0]
        if len(set(first)) == len(first):
            return False
    spans: Iterable[tuple[int, int]]
    try:  # contiguous plain views (DDP's bucket views): their bytes from two C-level maps
        if not all(map(Tensor.is_contiguous, tensors)):
            raise RuntimeError
        spans = sorted((a, a + n) for a, n in zip(map(Tensor.data_ptr, tensors), map(_NBYTES, tensors)) if n)
    except RuntimeError:  # gaps or strides, a tensor without storage (a DTensor): each one's span
        spans = sorted(filter(None, map(_span, tensors)))
    reach = -1
    for a, b in spans:
        if a < reach:
            return True
        reach = max(reach, b)
    return False


def dense(tensors: Sequence[Tensor]) -> bool:
    """Whether every one of ``tensors`` is non-overlapping and dense (its elements fill its span once). torch's
    fused kernels read and write a gradient as one run of memory: handed a ``grad_scale``, they wrote the divided
    gradient of ``buf[:, ::2]`` into the elements between (2500 outside it changed) and crashed on an
    ``expand()``-ed one; such gradients are scaled in the call."""
    if all(map(Tensor.is_contiguous, tensors)):  # the usual case, in C
        return True
    return all(torch.ops.aten.is_non_overlapping_and_dense(getattr(t, "_local_tensor", t)) for t in tensors
               if getattr(t, "_local_tensor", t).layout == torch.strided)


_NBYTES = operator.attrgetter("nbytes")
_VERSION = operator.attrgetter("_version")


def _version(g: Tensor) -> int:
    """A gradient's version counter; -1 for an inference tensor (made under ``torch.inference_mode()``), which
    has none and cannot be written in place outside it (a hand-over raised torch's "do not track version
    counter" where the fused kernel would have stepped it)."""
    return -1 if g.is_inference() else g._version


def version_list(grads: list[Tensor]) -> list[int]:
    """The version counters of ``grads`` (:func:`_version`; one C-level pass where none is an inference tensor)."""
    try:
        return list(map(_VERSION, grads))
    except RuntimeError:
        return list(map(_version, grads))


_GRAD = operator.attrgetter("grad")
_PLAIN_GRADS = {Tensor}


def steps_what_was_measured(grads: Sequence[Tensor], tensors: Sequence[Tensor]) -> bool:
    """Whether an optimizer whose gradients are ``grads`` (:func:`gradients`) steps exactly the gradients
    ``tensors`` are (or are pieces of): the same tensors, or tensors covering exactly the same bytes. A
    handed-over coefficient would otherwise also scale gradient elements nobody measured (a measured slice
    ``g[:5]`` of a stepped ``g``: an overlap is not enough), or miss measured ones that another optimizer
    steps. Views with gaps are matched by identity only. Among several ranks, an empty gradient (a rank's empty
    FSDP2 shard of a small parameter) covers no bytes: one that ``tensors`` do not hold (:func:`_measured_among`)
    makes it False, as on the ranks holding elements of that parameter (handed over on the rank whose shards of
    the part beside are all empty alone, the call measured every gradient there and dropped the flag of that part:
    a NaN in rank 0's shard of part B clipped, part A handed over, rank 1 stepped and rank 0 skipped)."""
    # The usual case (the same tensors, in the same order or not), without a walk over the bytes.
    if len(set(map(id, grads))) != len(grads):
        return False  # one gradient tensor stepped for two parameters: the kernel would divide it twice
    if same_tensors(grads, tensors):
        return True
    if set(map(id, grads)) == set(map(id, tensors)):
        return True
    theirs, ours = _covered(grads), _covered(tensors)
    if theirs is None or theirs != ours:
        return False
    empty = [i for i, g in enumerate(grads) if not getattr(g, "_local_tensor", g).numel()]
    return not (empty and _multi_rank() and set(empty) - set(_measured_among(grads, tensors)))


def gradients(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The gradients ``optimizer.step()`` reads (a DTensor's: its local shard)."""
    grads = [g for group in optimizer.param_groups for g in map(_GRAD, group["params"]) if g is not None]
    if set(map(type, grads)) <= _PLAIN_GRADS:  # the usual case, without a getattr per gradient
        return grads
    return [getattr(g, "_local_tensor", g) for g in grads]


def set_outer(inner: torch.optim.Optimizer, outer: torch.optim.Optimizer) -> None:
    """Record that ``inner`` steps this rank's partition of ``outer`` (a torch ``ZeroRedundancyOptimizer`` or a
    fairscale ``OSS``), whose param groups hold every rank's parameters (see :func:`read_for_carry`)."""
    ref = inner.__dict__.get(_OUTER)
    if ref is None or ref() is not outer:
        inner.__dict__[_OUTER] = weakref.ref(outer)


def read_for_carry(optimizer: torch.optim.Optimizer, grads: list[Tensor]) -> list[Tensor]:
    """The gradients :func:`carried_by_replacements` reads for ``optimizer`` (``grads``: its own): with those of
    the other ranks' partitions this rank holds where it is a ZeRO or OSS wrapper's inner optimizer. Under DDP
    every rank holds every gradient, and a call has no collective to carry the ranks' reads: each read its own
    partition, so a NaN in one rank's partition kept the flag there alone (torch's ZeroRedundancyOptimizer over
    DDP, GradClipper(on_nonfinite="skip"), gradients replaced out of place, a part clipped again: one rank skipped,
    the other stepped its partition; fairscale OSS over DDP, a hand-over stepped right after the replacement
    alike). Read over every gradient held, the ranks read alike; elsewhere (ShardedDDP keeps the owners' alone)
    the call's all-reduce carries them as before."""
    ref = optimizer.__dict__.get(_OUTER)
    outer = ref() if ref is not None else None
    if outer is None:
        return grads
    ids = set(map(id, grads))
    return [*grads, *(g for g in gradients(outer) if id(g) not in ids)]


def settle(tensors: Sequence[Tensor]) -> None:
    """Apply the coefficient an earlier ``clip_grad_norm_(..., optimizer=)`` left for the next ``step()`` of an
    optimizer one of whose gradients overlaps ``tensors`` (the pieces a dist_clip call is about to read: the same
    tensors, or views of them such as FSDP1's flat shards): its gradients are scaled now, divided by the float32
    reciprocal as the fused kernels divide (float32 ones bit-identical to the step's, which another rank stepping
    the hand-over, or a rank scaling beside a parameter of its own, applies: :func:`_scale.scale_`'s ``divide``),
    and the step keeps only the skip flag. The call then sees the gradients clipped, as after a clip that scaled
    them in place: a second clip composes with the first, a report reads clipped norms, a clip of part of the model
    leaves the rest clipped. Gradients replaced or modified in place since the hand-over (a new backward) are not
    the ones it measured: the coefficient is dropped instead. Gradients that merely share a buffer (bucket views) do
    not overlap. Among several ranks an empty gradient among ``tensors`` (a rank's empty FSDP2 shard of a small
    parameter), which overlaps no bytes, settles it too, as the ranks holding elements of that parameter settle
    theirs: left pending there, its flag was decided by the ranks' verdict once the gradients were replaced, while
    the others' settled flags last to the step (FSDP2, NaN in rank 0's shard of l1, the whole handed over, [l1]
    read, every gradient replaced out of place, the whole read and clipped by ``clip_grads_with_norm_``: rank 0
    skipped, rank 1 dropped the flag and stepped its gradients scaled by the NaN total, its parameters NaN)."""
    if not _WAITING:  # the usual case: nothing handed over, or already stepped
        return
    by_bytes = _overlap_test(tensors)
    # (and an empty gradient the call holds, which overlaps no bytes: see above)
    empty = {id(t) for t, n in zip(tensors, map(Tensor.numel, tensors)) if not n} if _multi_rank() else set()
    if by_bytes is None and not empty:
        return

    def overlaps(g: Tensor) -> bool:
        return (by_bytes is not None and by_bytes(_span(g))) or id(g) in empty

    for optimizer in list(_WAITING):
        handles = optimizer.__dict__.get(_HOOKS)
        if handles is not None:  # (hooks the user cleared since the hand-over: registered again)
            repair_step_hooks(optimizer, handles, _pre_hook, _post_hook)
        grads = gradients(optimizer)
        if not any(map(overlaps, _measured_side(optimizer.__dict__.get(_PENDING), grads))):
            continue  # (another thread's optimizer may be stepping: what its pre-hook set is not this call's)
        running = in_step(optimizer)
        if not running:
            clear_stale(optimizer)  # a step that raised: what it set must not reach a GradScaler's next step
        pending = optimizer.__dict__.get(_PENDING)
        if pending is None:
            _WAITING.discard(optimizer)
            continue
        scale, found, coef, held, versions, raw, shared, beside = pending
        if coef is None:
            # Applied already: only the skip flag is left, and it lasts until the step whatever wrote the
            # gradients since (the verdict of a later read dropped it: a NaN hand-over, a clip in place, then
            # get_total_norm, and the NaN step ran), as in the step's own check (_pre_hook).
            continue
        del optimizer.__dict__[_PENDING]
        verdict, kept = _verdict(held, versions, grads, raw, optimizer)
        if verdict in ("stale", "written"):
            # Dropped without a word here: a step skipped, then gradients zeroed in place and recomputed, looks
            # the same as an accumulation after the clip; the step itself warns if it would take them unclipped.
            # Its skip flag stays with the gradients it measured (see _keep_flag).
            _WAITING.discard(optimizer)
            if verdict == "written":
                _keep_flag(optimizer, found, held, grads)
            else:  # (every one replaced: out of place, or the next batch's; see carried_by_replacements)
                if shared and (agreement := _DEFERRED.get()) is not None:
                    agreement.settled_shared = True  # (its pieces may differ among ranks: see Agreement.agree)
                read = carry_only(optimizer, grads)
                _keep_replaced(optimizer, found, [g for g in read if not overlaps(g)], read)
            continue
        if verdict == "replaced":
            _warn_replaced()
        _scale.scale_(kept, scale, divide=True)  # as the kernels apply it (see hand_over_)
        # Its flag stays with the stepped gradients it was measured on, not every one stepped: under DDP with a
        # parameter of rank 0's own beside DDP's, a NaN hand-over of DDP's whole settled by a call on a DDP part,
        # the batch dropped in place and DDP's whole handed over again (no collective), rank 0 read the flag held
        # by its own zeroed gradient, unmeasured there, kept it and skipped while rank 1 dropped it and stepped.
        stepped = set(map(id, grads))
        _stash(optimizer, torch.ones_like(scale), found, None, [g for g in kept if id(g) in stepped] or grads,
               shared, beside)  # (the parameters stepped beside them: see note_beside)
        saved = optimizer.__dict__.get(_SAVED)
        if running and saved is not None and saved[3] is not None and optimizer.__dict__.get("grad_scale") is saved[3]:
            # The step under way was handed the coefficient as grad_scale by its pre-hook: it is in the gradients
            # now, so the kernel divides by what was there before (a GradScaler's scale, or nothing) only.
            _restore_one(optimizer, "grad_scale", saved[0][0])
            optimizer.__dict__[_SAVED] = (*saved[:3], None)


def _verdict(held: list[Tensor], versions: list[Any], grads: list[Tensor], raw: list[int] | None = None,
             optimizer: torch.optim.Optimizer | None = None) -> tuple[str, list[Tensor]]:
    """What became of the gradients ``held`` a coefficient was measured on, now that the optimizer steps
    ``grads``, and which of them take the coefficient in place if the step's ``grad_scale`` cannot:

    * "same": the very tensors, none written since (``grad_scale`` clips them in the step);
    * "written": a stepped one written in place since (``zero_grad(set_to_none=False)`` then backward, or a
      further backward accumulating into them): dropped, with a warning where the step then takes them unclipped;
    * "stale": none of them is stepped any more (replaced: the next batch, after ``zero_grad()`` to None): dropped,
      as a loop without ``optimizer=`` would step the new ones unclipped;
    * "kept": some still stepped, unwritten, beside new ones (a param group added since, a gradient set where
      there was none) or with some no longer stepped (``p.grad = None`` since): every held gradient not written
      since is scaled in place (stepped or kept aside by the user, as a clip in place would have left it), and
      the new ones step unclipped;
    * "replaced": as "kept", where some were also replaced out of place (``p.grad = p.grad + noise``): the loop
      without ``optimizer=`` stepped the replacement of a clipped gradient, so the step warns (every gradient was
      dropped: the untouched ones stepped 370 times too large).

    A view's version counter is its whole buffer's (DDP's bucket views): a write to another view of it would
    look like a change, so views are checked by identity alone or by a count of backwards (:func:`_unwritten`).
    A stepped gradient that is a measured one moved by its wrapper (:func:`_moved`: FSDP1 ``use_orig_params``
    makes new views of the same bytes at every forward, DDP copies its bucket views into new buckets at the
    second forward) counts as the measured one (a forward between clip and step dropped the coefficient: 24.7
    stepped for 0.0048)."""
    if same_tensors(held, grads):
        # (the versions as recorded: every one unwritten, in one C-level pass; 0.45 ms a step on 1000 gradients
        # through the per-tensor test)
        if version_list(held) == versions or all(_unwritten(a, v) for a, v in zip(held, versions)):
            return "same", held
        return "written", []
    stepped = set(map(id, grads))
    still = [(a, v) for a, v in zip(held, versions) if id(a) in stepped]
    moved: dict[int, Tensor] = {}  # id of a held gradient -> the stepped tensor it moved to
    if len(still) < len(held) and len(still) < len(grads) and raw is not None and optimizer is not None:
        ids = set(map(id, held))
        found = _moved(held, versions, raw, [g for g in grads if id(g) not in ids], stepped, optimizer)
        if found is None:
            return "written", []  # moved by its wrapper, and written since (a further backward)
        moved = found
    if not still and not moved:
        return "stale", []
    if not all(_unwritten(a, v) for a, v in still):
        return "written", []
    kept = [moved.get(id(a), a) for a, v in zip(held, versions)
            if id(a) in stepped or id(a) in moved or _unwritten(a, v)]
    new = len(stepped) > len(still) + len(moved)
    gone = len(still) + len(moved) < len(held)
    return ("replaced" if new and gone else "kept"), kept


def _moved(held: list[Tensor], versions: list[Any], raw: list[int], new: list[Tensor], stepped: set[int],
           optimizer: torch.optim.Optimizer) -> dict[int, Tensor] | None:
    """Which measured gradients a wrapper moved to the new tensors ``new`` the optimizer steps, without changing
    them: the same bytes viewed anew (FSDP1 ``use_orig_params``, at every forward; the held view keeps those
    bytes alive, so equal addresses are the same memory) whose buffer's version is the one recorded, or a
    parameter's gradient copied elsewhere (DDP's bucket rebuild) with no backward into it since (its count,
    :func:`_write_cell`). None where one was moved and written since. Walked only when gradients were replaced."""
    gone = {id(a) for a in held} - stepped  # measured gradients no longer stepped
    by_bytes = {_bytes_key(a): i for i, a in enumerate(held) if id(a) in gone}
    by_cell = {id(v[0]): i for i, v in enumerate(versions) if isinstance(v, tuple) and id(held[i]) in gone}
    params = None
    out: dict[int, Tensor] = {}
    for g in new:
        i = by_bytes.get(_bytes_key(g))
        if i is not None:
            # A view of the very same buffer (the measured tensor itself, or its base), unwritten since. The same
            # bytes under another buffer object (FSDP1 re-aliases its sharded gradient through .data for a
            # backward, with a fresh version counter that matched the recorded one by chance) were written: a
            # stale coefficient met a new batch.
            if _root(g) is not _root(held[i]) or _version(g) != raw[i]:
                return None
            out[id(held[i])] = g
            continue
        if not by_cell:
            continue
        if params is None:
            params = _params_by_grad(optimizer)
        cell = _write_cell_of(params[id(g)]) if id(g) in params else None
        i = by_cell.get(id(cell)) if cell is not None else None
        if i is not None:
            if cell[0] != versions[i][1]:  # type: ignore[index]
                return None
            out[id(held[i])] = g
    return out


def _params_by_grad(optimizer: torch.optim.Optimizer) -> dict[int, Tensor]:
    """id of each gradient :func:`gradients` lists -> its parameter."""
    return {id(getattr(p.grad, "_local_tensor", p.grad)): p for group in optimizer.param_groups
            for p in group["params"] if p.grad is not None}


def _root(t: Tensor) -> Tensor:
    """The tensor owning ``t``'s version counter: its base if a view (``p.grad.view(...)`` of a measured
    gradient shares it; FSDP1's views of a re-aliased buffer do not), else itself."""
    t = getattr(t, "_local_tensor", t)
    return t._base if t._base is not None else t


def _bytes_key(t: Tensor) -> tuple[Any, ...]:
    t = getattr(t, "_local_tensor", t)
    if t.layout != torch.strided or t.numel() == 0:
        return (id(t),)
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


def _warn_replaced() -> None:
    warn_at_caller(
        "dist_clip: some gradients handed to this optimizer's step() with a clip coefficient were replaced out of "
        "place after the clip (p.grad = f(p.grad)): the replacements, computed from unclipped gradients, step "
        "unclipped, while the gradients left as they were are clipped. Edit gradients before the clip, or clip "
        "without optimizer="
    )


def _unwritten(grad: Tensor, seen: Any) -> bool:
    """Whether ``grad`` was not written since :func:`_stash` recorded ``seen``: its version counter; for a view
    of a plain parameter's gradient (DDP's bucket views), the count of backwards that accumulated into it
    (:func:`_write_cell`); other views (FSDP2's shards): by identity alone (README's Limits)."""
    if isinstance(seen, tuple):
        return seen[0][0] == seen[1]
    return grad._is_view() or _version(grad) == seen


def _autograd_leaf_param(p: Tensor) -> bool:
    """A plain tensor or an ``nn.Parameter`` (subclasses too: they were left to the version counter, and a
    dropped batch's coefficient reached the next step through DDP's bucket views), whose gradient autograd
    accumulates; not a tensor subclass such as an FSDP2 DTensor parameter, whose gradients are set outside it
    (DTensor parameters pass ``isinstance(p, nn.Parameter)`` by their ``_is_param`` mark, not by class)."""
    return type(p) is Tensor or issubclass(type(p), torch.nn.Parameter)


class _Count:
    """A parameter's backward count, read as ``cell[0]``. Compiled autograd traces post-accumulate-grad hooks into
    its backward graph: a Python int incremented there was guarded on by value (``cell[0] == 7``), so every
    backward recompiled the whole graph until torch's recompile limit (8), and the backward then ran uncompiled
    for the rest of the run. Traced, the hook adds to a CPU tensor instead (a graph op, no guard on its value)
    and sets ``compiled`` (a constant store, replayed after the graph: no guard either); eagerly, to an int (a
    tensor op per parameter per backward cost ~2 us). The tensor is read only once ``compiled`` is set: read on
    every call, its host read added ~10% to a skip call over 2,000 parameters of one buffer."""

    __slots__ = ("eager", "traced", "compiled")

    def __init__(self) -> None:
        self.eager = 0
        self.traced = torch.zeros((), dtype=torch.int64)
        self.compiled = False

    def __getitem__(self, i: int) -> int:
        return self.eager + int(self.traced) if self.compiled else self.eager


def _write_cell(param: Tensor) -> _Count:
    """A counter of the backwards that accumulated into ``param.grad``, kept by a post-accumulate-grad hook
    installed once per parameter. DDP's reducer gives a parameter the same bucket view back after
    ``zero_grad(set_to_none=True)``, and a view's version counter is its whole bucket's (written by clips of
    other parameters too): a dropped batch's coefficient and skip flag reached the next batch's step."""
    cell = _write_cell_of(param)
    if cell is None:
        cell = _Count()

        def bump(_: Tensor, cell: _Count = cell) -> None:
            if torch.compiler.is_compiling():
                cell.traced.add_(1)
                cell.compiled = True
            else:
                cell.eager += 1

        handle = param.register_post_accumulate_grad_hook(bump)
        # Set again, the hook table is registered with the tensor torch holds now: after torch.utils.swap_tensors
        # the table stays with the Python object and its hooks no longer fire (idempotent otherwise).
        param._post_accumulate_grad_hooks = param._post_accumulate_grad_hooks
        if len(_WRITES) >= _WRITES_PRUNE[0]:
            for key in [k for k, (_, h, _) in _WRITES.items() if h.hooks_dict_ref() is None]:
                del _WRITES[key]  # (their parameters are gone: so is the hook dict the handle refers to)
            _WRITES_PRUNE[0] = max(256, 2 * len(_WRITES))
        # beside the parameter, not on it: a pickled copy got the counter without its hook
        _WRITES[id(param)] = (cell, handle, param._cdata)
    return cell


def _write_cell_of(param: Tensor) -> _Count | None:
    """``param``'s backward count, if its hook is still installed on this very tensor (an id may be reused by
    a new tensor after a parameter is gone; a copy has no hook; after ``torch.utils.swap_tensors`` (``.to()``,
    ``load_state_dict()`` in torch's swap mode) the hook no longer fires: the counter read unwritten, and a
    dropped batch's coefficient scaled the next one, 0.0014 for 46.5)."""
    entry = _WRITES.get(id(param))
    if entry is None:
        return None
    cell, handle, cdata = entry
    hooks = getattr(param, "_post_accumulate_grad_hooks", None)
    if hooks is None or handle.hooks_dict_ref() is not hooks or handle.id not in hooks or param._cdata != cdata:
        return None
    return cell


def _install_hooks(optimizer: torch.optim.Optimizer) -> None:
    repair_step_hooks(optimizer, optimizer.__dict__.setdefault(_HOOKS, [None, None]), _pre_hook, _post_hook)


def arm_skip_(
    optimizer: torch.optim.Optimizer,
    flag: Tensor,
    started: tuple[list[Tensor], list[int]] | None = None,
    combine: bool = True,
    measured: Sequence[Tensor] | None = None,
) -> None:
    """Make the next ``step()`` of a fused optimizer skip where the 0-dim ``flag`` is true: ``found_inf``, set in
    the step pre-hook (combined with a pending hand-over's flag and with what a ``GradScaler`` set just before
    ``step()``: either skips), put back as it was after the step. Set at arming time instead, it was overwritten
    by ``GradScaler.step`` (the skip was lost) and missed the first-step preparation of fused SGD's momentum.
    A flag lasts until the next ``step()``, whatever happens to the gradients meanwhile (they may be copied to
    master weights, or rewritten by a wrapper's own clipping: a NaN step taken is worse than a good one
    skipped). Armed again by a call that found the gradients as the previous arming left them (``started``,
    :func:`grad_state` at that call's start: the same tensors, not written since; two calls clipping parts of
    one model), either flag skips (the second call's False replaced the first's True, and the NaN step was
    taken); found them replaced or rewritten (the next batch after a dropped one, ``zero_grad()`` either way),
    the new flag replaces the old. ``measured``: the pieces the arming call measured; only those of them the
    optimizer steps are held to that test (:func:`armed_record`), so another part's backward between two calls,
    making or writing gradients the first did not measure, combines too (it replaced the flag: a NaN step
    taken). ``combine=False`` (an explicit ``skip_next_step_``) always replaces it."""
    running = in_step(optimizer)  # (before installing the hooks: a first call from a user's running pre-hook)
    _install_hooks(optimizer)
    value = new = flag.reshape(()).to(torch.float32)
    if running:
        _arm_running(optimizer, value, combine)
        return
    clear_stale(optimizer)
    now = grad_state(optimizer)
    if combine:
        _drop_unsettled(optimizer, now[0], measured)
    armed = optimizer.__dict__.get(_SKIP) if combine else None
    value, record = rearm(armed, value, now, started, measured, optimizer,
                          lambda a, b: torch.maximum(a, b.to(a.device)))
    optimizer.__dict__[_SKIP] = (value, record)
    pending = optimizer.__dict__.get(_PENDING)
    if combine and pending is not None and pending[2] is None and pending[3]:
        # A settled hand-over's flag lasts until the step whatever wrote its gradients since, but not once every
        # one of them is gone (``zero_grad(set_to_none=True)``: the batch was dropped, as for the skip flag in
        # :func:`untouched`): a NaN batch clipped whole then in part, dropped, skipped the next good step.
        where = {id(t) for t in now[0]}
        if not any(id(t) in where for t in pending[3]):
            del optimizer.__dict__[_PENDING]
            _WAITING.discard(optimizer)
            # (unless replaced out of place, carrying the NaN: see carried_by_replacements)
            _keep_replaced(optimizer, pending[1], _unmeasured(carry_only(optimizer, now[0]), measured))
            pending = None
    if not combine and pending is not None:
        # skip_next_step_ replaces any pending flag, a hand-over's too (settled or not: skip_next_step_(opt,
        # False) left a settled NaN hand-over's flag in place, and the next batch's good step was skipped).
        optimizer.__dict__[_PENDING] = (pending[0], torch.zeros_like(pending[1]), *pending[2:])
    note_beside(optimizer, measured, now[0], new)  # (grad_state: its gradients, but for a ZeRO or OSS inner one)


def _drop_unsettled(optimizer: torch.optim.Optimizer, now: list[Tensor], measured: Sequence[Tensor] | None) -> None:
    """A hand-over not applied yet whose gradients were written since, which no call settled (the call at hand
    measures none of them; an empty FSDP2 shard it holds settles it since session 38, see :func:`settle`): its
    coefficient is dropped and its flag kept, as settle() does."""
    pending = optimizer.__dict__.get(_PENDING)
    if pending is None or pending[2] is None:
        return
    verdict = _verdict(pending[3], pending[4], now, pending[5], optimizer)[0]
    if verdict in ("written", "stale"):
        del optimizer.__dict__[_PENDING]
        _WAITING.discard(optimizer)
        if verdict == "written":
            _keep_flag(optimizer, pending[1], pending[3], now)
        else:
            _keep_replaced(optimizer, pending[1], _unmeasured(carry_only(optimizer, now), measured))


def _unmeasured(grads: list[Tensor], measured: Sequence[Tensor] | None) -> list[Tensor]:
    """The ``grads`` a call's pieces ``measured`` do not hold (all of them where it does not say)."""
    if not measured:
        return grads
    ids = {id(grads[i]) for i in _measured_among(grads, measured)}
    return [g for g in grads if id(g) not in ids]


def _attributes(optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
    """The ``grad_scale`` and ``found_inf`` the optimizer holds now (``_MISSING`` where none), as :func:`_restore`
    puts them back."""
    return optimizer.__dict__.get("grad_scale", _MISSING), optimizer.__dict__.get("found_inf", _MISSING)


def _closure_stash(optimizer: torch.optim.Optimizer) -> tuple[Any, list[Tensor], None, None]:
    """The post-hook's record for a closure step with nothing handed over yet: the attributes to put back and
    fused SGD's first-step preparation, for a skip the closure may arm (:func:`_arm_running`)."""
    return _attributes(optimizer), _prepare_sgd_first_step(optimizer), None, None


def _arm_running(optimizer: torch.optim.Optimizer, value: Tensor, combine: bool) -> None:
    """Arm the step under way (a call inside its closure): ``found_inf`` is read by the fused kernel after the
    closure returns, and put back by the post-hook (the pre-hook saved it: see :func:`_pre_hook`)."""
    stash = optimizer.__dict__.get(_SAVED)
    if stash is None:  # hooks installed by this very call (the closure was wrapped by a GradClipper's own hook)
        stash = _closure_stash(optimizer)
        # No pre-hook of dist_clip's ran in this step, and no wrapper prepares what the closure's gradients
        # still to come will need: a fused SGD parameter without a momentum buffer now gets torch's empty_like
        # one if the step runs, so a skipped step's is dropped by the post-hook (2e36 momentum was kept).
        if isinstance(optimizer, torch.optim.SGD):
            have = {id(p) for p in stash[1]}
            stash = (stash[0], [*stash[1], *(p for g in optimizer.param_groups if g.get("momentum", 0) != 0
                                              for p in g["params"] if id(p) not in have
                                              and optimizer.state.get(p, {}).get("momentum_buffer") is None)],
                     *stash[2:])
    base = stash[0][1] if not combine else optimizer.__dict__.get("found_inf", _MISSING)
    if isinstance(base, Tensor):
        value = torch.maximum(_reduce.moved(base, value.device).ne(0).to(value.dtype), value)  # 0 or 1: below
    optimizer.found_inf = value  # type: ignore[attr-defined]
    optimizer.__dict__[_SAVED] = (stash[0], stash[1], value, stash[3])


def grad_state(optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], list[int]]:
    """The gradient tensors the skip flag's ledger holds on to for ``optimizer`` and their version counters (a
    view's is its buffer's): its own, with those of the other ranks' partitions this rank holds where it is a ZeRO
    or OSS wrapper's inner optimizer (:func:`read_for_carry`), so that over DDP every rank keeps the same ledger
    (a part's call measuring none of this rank's partition left an entry without gradients there, decided by the
    ranks' verdict, which a DDP call has no all-reduce to carry: rank 0 dropped the flag of a NaN part held by rank
    1 alone after an auxiliary loss and a part clipped again, and stepped where rank 1 skipped)."""
    grads = read_for_carry(optimizer, gradients(optimizer))
    return grads, version_list(grads)


class _Record(tuple):  # type: ignore[type-arg]
    """An :func:`armed_record` of gradients the optimizer steps (part of them, or all), with the backward count of
    each held gradient's parameter where they share version counters (:func:`_write_cell`; None where autograd
    does not accumulate into that parameter, or the gradients are tensors of their own), for :func:`untouched` to
    tell a new batch's backward from a write beside them."""

    cells: list[tuple[_Count, int] | None]
    #: the flag's ledger (see :func:`supersede`): each arming's flag with the gradients it measured that no later
    #: arming measured again (``members``), or, for a flag armed without saying what it measured
    #: (``skip_next_step_``, a call whose pieces the optimizer does not step), None and that arming's record, which
    #: :func:`_sticky` keeps or drops; None where unknown
    parts: list[tuple[Tensor, list[Tensor] | None, tuple[Any, ...] | None]] | None = None
    #: every gradient the optimizer stepped at the arming, with its version, for :func:`_followed`
    state: tuple[list[Tensor], list[Any]] | None = None

    @classmethod
    def uncounted(cls, state: tuple[list[Tensor], list[int]],
                  parts: list[tuple[Tensor, list[Tensor] | None, tuple[Any, ...] | None]] | None = None) -> _Record:
        """A record of ``state`` (gradients, versions) without backward counts, with the ledger ``parts``."""
        record = cls(state)
        record.cells = [None] * len(state[0])
        if parts is not None:
            record.parts = parts
        return record


def supersede(armed: tuple[Any, ...], record: tuple[Any, ...], now: tuple[list[Tensor], list[int]],
              started: tuple[list[Tensor], list[int]] | None, measured: Sequence[Tensor] | None, new: Tensor,
              merge: Callable[[Tensor, Tensor], Tensor], optimizer: Any = None) -> Tensor | None:
    """The flag of a call arming ``new`` on ``record`` over one armed on ``armed``, both records of gradients the
    optimizer steps (:class:`_Record`) with the flag's ledger (``parts``): each earlier arming's flag lasts while
    some gradient it measured is still held and was not measured again since; ``new`` covers the ones this call
    measures, as they are now (a backward accumulating into a NaN gradient leaves it NaN; a dropped batch's
    ``zero_grad()`` makes it finite, or, to None, takes it away). So the next batch, clipping every gradient again
    (in one call or in parts), replaces the flag, while a part clipped again within its step after an extra loss
    keeps the other parts' flags. Deciding from a sign of the next batch instead (the held gradients written since
    or a backward into them), a part clipped again within its step after an auxiliary loss replaced the whole
    flag, and the NaN step was taken (heads [h0, h1] and [h2, h3], a batch through h2 alone with a NaN there, the
    second call measuring every gradient present, an auxiliary loss through h1-h3, [h0, h1] clipped again; also
    over views of one buffer; 29 of 600 random flows of 4 heads in 2 or 3 parts took a NaN step). A flag armed
    without gradients it measured (``skip_next_step_``, a call whose pieces the optimizer does not step) lasts
    while :func:`_sticky` holds for its record. Among several ranks, a flag whose gradients the call measures again
    is kept by its verdict (:func:`_measured_again`: another rank may hold it). None where it does not apply (a
    record of another kind): :func:`untouched` decides. ``optimizer``: whose gradients ``now`` are (for
    :func:`carry_only`)."""
    parts = getattr(armed, "parts", None)
    if parts is None or not isinstance(record, _Record) or measured is None:
        return None
    where = {id(t) for t in now[0]}
    again = {id(t) for t in record[0]}
    kept: list[tuple[Tensor, list[Tensor] | None, tuple[Any, ...] | None]] = []
    gone: list[Tensor] = []
    measured_again: list[Tensor] = []
    # (entries standing for another rank's gradients: kept by the verdict, they stay so, held by no gradient here:
    # re-held by this rank's gradients the call does not measure, they became an ordinary entry, which the next
    # call measuring those replaced by its own read. Under DDP with a parameter of rank 0's own, NaN there, [own]
    # clipped over the world, a backward, [l0] then [l1]: rank 1's entry, kept at [l0] by its forced verdict and
    # held by l1, was dropped by [l1]'s finite read, while rank 0's, held by its NaN, lasted: rank 1 stepped)
    elsewhere: list[Tensor] = []
    calm = _calm_entries(optimizer) if optimizer is not None else []
    for flag, members, seen in parts:
        if members is None:
            if seen is not None and _lasts(seen, started if started is not None else now, measured):
                kept.append((flag, None, seen))
            elif _measured_elsewhere(seen):
                elsewhere.append(flag)
            elif _decided_by_verdict(seen):
                gone.append(flag)
            continue
        left = [t for t in members if id(t) in where and id(t) not in again]
        if left:
            kept.append((flag, left, None))
        elif not members:
            # (an entry without gradients, kept by the ranks' verdict where this rank held none to read: decided
            # again by each arming call's verdict, while the other ranks' entries holding gradients last)
            elsewhere.append(flag)
        elif any(id(t) not in where for t in members):
            if any(flag is e[0] for e in calm):
                elsewhere.append(flag)  # (a device flag a combining call armed: held by none, see _calm_entries)
            else:
                gone.append(flag)
        else:
            measured_again.append(flag)
    again_entry = _measured_again(measured_again, merge)
    if again_entry is not None:
        kept.append(again_entry)
    if gone:
        holding = {id(t) for _, members, _ in kept if members is not None for t in members}
        entry = carried_by_replacements(functools.reduce(merge, gone),
                                        [t for t in carry_only(optimizer, now[0])
                                         if id(t) not in again and id(t) not in holding])
        if entry is not None:
            kept.append(entry)
    if elsewhere:
        entry = carried_by_replacements(functools.reduce(merge, elsewhere), [])
        if entry is not None:
            kept.append(entry)
            _still_calm(optimizer, elsewhere, entry[0])
    record.parts = [*kept, (new, list(record[0]), None)]
    return functools.reduce(merge, [f for f, _, _ in record.parts])


def _still_calm(optimizer: Any, flags: list[Tensor], carried: Tensor) -> None:
    """``carried``, the verdict's carry of ``flags`` into an entry held by no gradient, is a :data:`_CALM` flag where
    one of them is (a device flag a combining call armed, whose gradients are gone): held by none here, it stands
    for every gradient the NaN may have travelled into, which join the verdicts of later calls while it is set
    (:class:`Agreement`, by a multiply: no host read), as the first carry's did. A new tensor, told by identity from
    none of :data:`_CALM`, it joined nothing: plain tensors, NaN in rank 1's ``a``, [a, b] armed over the world,
    ``a``'s gradient replaced out of place, [b] armed twice: the second [b]'s verdict, of ``b`` alone, dropped it on
    every rank, and rank 1 stepped its NaN (on the CPU the carry is held by the replacement, which the call reads)."""
    if not _on_host(carried) and any(_is_calm(optimizer, f) for f in flags):
        optimizer.__dict__[_CALM].append(carried)


def _is_calm(optimizer: Any, flag: Any) -> bool:
    """Whether ``flag`` is a device flag of ``optimizer``'s noted in :data:`_CALM` (told by identity)."""
    return (optimizer is not None and isinstance(flag, Tensor) and not _on_host(flag)
            and any(flag is c for c in optimizer.__dict__.get(_CALM, ())))


def _measured_again(flags: list[Tensor], merge: Callable[[Tensor, Tensor], Tensor]
                    ) -> tuple[Tensor, list[Tensor], None] | None:
    """A ledger entry for the ``flags`` of entries whose gradients, every one still held, an arming call measured
    again, where its verdict was combined over several ranks: an entry without gradients (as one kept by the
    verdict where this rank holds none, see :func:`supersede`), its flag kept by that verdict and decided again by
    each arming call's. A flag armed by a call combining over several ranks stands for every rank's pieces: where
    another rank holds a piece of the part this rank does not (a part held on rank 0 alone), measured again here,
    it may still be held there by that piece, whose flag joins the verdict (:func:`_held_flags`). Dropped here by
    the new measure alone, plain tensors, ``a`` on rank 0 alone and ``b`` on both, a NaN in ``a``, [a, b] then
    [b] clipped (``GradClipper(on_nonfinite="skip")``, fused or not; [b] handed over): rank 1 stepped, rank 0,
    holding the flag by ``a``, skipped. None where nothing is measured again, outside such a verdict (in one
    process the new measure decides, as it did), or the flags read on the CPU as not set."""
    if not flags or not _COMBINING.get() or _AGREED.get() is None:
        return None
    return carried_by_replacements(functools.reduce(merge, flags), [])


def _measured_elsewhere(seen: Any) -> bool:
    """Whether a ledger entry was armed by a call that measured nothing on this rank (another rank measured the
    part: ``seen``, the gradients held then), once :func:`_sticky` no longer holds for it (those gradients written,
    by the next part's clip in place or its hand-over settled, or replaced): its flag is decided as any entry whose
    gradients are gone (:func:`carried_by_replacements`), by the ranks' verdict within an arming call, which a
    rank's flags held by gradients the call does not measure join (:class:`Agreement`), so it lasts as long as the
    rank holding the part's NaN keeps its own. Dropped here alone, rank 1 stepped where rank 0 skipped (a part
    held on rank 0 alone, NaN there, then the next part clipped twice, or its gradients replaced out of place and
    the next part clipped again). So too one armed while this rank held no gradient at all (``seen`` empty:
    :func:`untouched` only while there is still none): dropped once one appeared, rank 1 stepped where rank 0
    skipped (``b``'s gradient made only after [A] was clipped, then [B]); a batch dropped since, its flags gone on
    every rank, the next call's verdict drops it."""
    return type(seen) is tuple and len(seen) == 3 and seen[2] is None


def _decided_by_verdict(seen: Any) -> bool:
    """Whether a ledger entry armed without measured gradients, no longer :func:`_sticky`, is decided by the ranks'
    verdict (:func:`carried_by_replacements`) rather than dropped: one armed by a call that measured nothing on this
    rank (:func:`_measured_elsewhere`), and one armed by ``skip_next_step_``, whose gradients held then are every one
    gone here while another rank may still hold one of its own (it keeps its entry, and its flag joins the verdict:
    :func:`_held_flags`). Dropped here alone, ``skip_next_step_(opt, True)`` on every rank, then the gradient of a
    part held on every rank replaced out of place and that part clipped: rank 0, holding a part of its own
    untouched, skipped, and rank 1 stepped."""
    return isinstance(seen, _Explicit) or _measured_elsewhere(seen)


def _lasts(seen: Any, state: tuple[list[Tensor], list[int]], measured: Sequence[Tensor] | None) -> bool:
    """:func:`_sticky` for a ledger entry armed without measured gradients, but where an arming call's verdict was
    combined over several ranks, an entry armed by a call that measured nothing on this rank
    (:func:`_measured_elsewhere`) is decided by that verdict (:func:`carried_by_replacements`) whatever its record says:
    it stands for another rank's pieces, whose entries there join the verdict while they are kept
    (:func:`_held_flags`), or are decided by it. Held by this rank's own gradients, a part held on rank 0 alone, NaN
    there, clipped over the world, then zeroed in place and clipped again: rank 0 dropped the flag by the new read and
    stepped, rank 1, its gradients untouched, kept it and skipped."""
    if _COMBINING.get() and _measured_elsewhere(seen):
        return False
    return _sticky(seen, state, measured)


def carried_by_replacements(flag: Tensor, rest: list[Tensor]) -> tuple[Tensor, list[Tensor], None] | None:
    """A ledger entry for ``flag``, armed on gradients none of which is held any more, some of them not set to None
    but replaced by other tensors: ``rest``, the gradients held now that the arming call does not measure (nor an
    entry of the ledger holds; every one where no flag of the call at hand stands for them, see :func:`_keep_replaced`
    and the step's :func:`_pre_hook`). Out of place (``p.grad = p.grad + g``, accumulating ``torch.autograd.grad``
    results by hand) the replacement carries a NaN or inf of the one it replaced (NaN + x is NaN), while the next
    batch's fresh gradients (after ``zero_grad(set_to_none=True)``) are finite, and nothing else tells the two
    apart (no trace of ``zero_grad``; dropped, the flag of a NaN batch whose gradients were replaced out of place
    was lost and the NaN step taken). So the flag lasts, held by ``rest``, where one of them is not finite now:
    one read of them, on the device (no host read; on the CPU, where reading the flag is free, only when it is
    set); a later call measuring them replaces it as for any entry. Each rank reads its own pieces, so within a
    call with an all-reduce, arming or settling, the ranks' verdict (:class:`Agreement`, carried by it) stands for
    that read; elsewhere (``clip_grads_with_norm_``, the step itself) this rank's read. None where nothing is left
    to hold it (with a verdict, an entry without gradients: every rank keeps the flag alike)."""
    agreed = _AGREED.get()
    if (not rest and agreed is None) or _unset_on_cpu(flag):
        return None
    bad = _nonfinite(rest, flag.device) if agreed is None else _reduce.moved(agreed, flag.device)
    return (flag & bad if flag.dtype == torch.bool else flag * bad.to(flag.dtype)), rest, None


class Agreement:
    """One arming call's verdict on :func:`carried_by_replacements`' read, the same on every rank: each rank's
    pieces are its own (FSDP, ZeRO, a tensor-parallel plan), so a NaN held in one rank's shard alone, read there
    alone, kept the flag on that rank alone, which skipped its step while the others stepped (FSDP2, heads [h0]
    and [h1], NaN in rank 0's shard of h0, gradients replaced out of place, [h1] clipped again). ``local`` (0-dim
    float64, 0 or 1: SUM or MAX) travels in the call's own all-reduce, one more value in every call that may arm
    (so the layout never depends on what a rank found); it is 1 where some gradient of the ``optimizers`` that
    the call does not measure (``measured``) is not finite, read only where a flag's gradients may have been
    replaced (:func:`_may_carry`: host-side identity tests; on the CPU only where that flag is set), else 0
    without a read; a hand-over it settles of an optimizer it arms no skip for (any, where it arms none) adds the
    read of every gradient of that optimizer (:meth:`fold`). Settled hand-overs' flags wait
    (:meth:`deferring`) for the verdict; :meth:`armed` applies it around the arming. ``hands_over``: the call
    hands its coefficient over to the ``optimizers`` (replacing a settled hand-over's flag, which otherwise lasts
    through it: :func:`_held_flags`). ``combines``: whether the call combines over several ranks (its reduction
    group holds more than one), as its group tells at its entry, or a function telling it; the carries of its read,
    its settling and its arming read the set that matches (:func:`_beside_key`)."""

    def __init__(self, optimizers: Sequence[Any],
                 measured: Sequence[Tensor] | Callable[[], Sequence[Tensor]], hands_over: bool = False, *,
                 combines: bool | Callable[[], bool]) -> None:
        self.deferred: list[Any] = []
        self.agreed: Tensor | None = None
        #: the verdict (and the call's total) combined over more than one rank: see :func:`hand_over_`
        self.shared = False
        self._combines = combines  # (a function telling it: called only where a carry reads it)
        #: a hand-over settled here (waiting for the verdict) had its total combined over more than one rank
        self.settled_shared = False
        self.optimizers = [o for o in optimizers if isinstance(o, torch.optim.Optimizer)]
        self.ids = {id(o) for o in self.optimizers}
        self._measured = measured  # (a function giving the pieces: called only where they are needed)
        with self.calling():
            held, read = self._reads(optimizers, hands_over)
        self._read = (_nonfinite(read, read[0].device).to(torch.float64) if read
                      else torch.zeros((), dtype=torch.float64))
        for flag in held:  # (device tensors: no host read)
            self._read = torch.maximum(_reduce.moved(self._read, flag.device), flag.ne(0).to(torch.float64))
        self._outlasting = _outlasting(self.ids) if _ARMED else []
        #: a call arming no skip among several ranks: the hand-overs it leaves waiting join too (see local)
        self._joins_waiting = not self.optimizers and _multi_rank()
        if self._joins_waiting and (_WAITING or _ARMED):
            self._outlasting += _lasting(lambda: self.measured)

    def _reads(self, optimizers: Sequence[Any], hands_over: bool) -> tuple[list[Tensor], list[Tensor]]:
        """The flags and the gradients this rank's read (``local``) takes, before the call settles anything."""
        read: list[Tensor] = []
        held: list[Tensor] = []
        for optimizer in optimizers:
            if not isinstance(optimizer, torch.optim.Optimizer) or not _armed_or_pending(optimizer):
                continue  # (the usual case: nothing armed before this call in this step)
            candidates = _may_carry(optimizer)
            where = None
            if candidates:
                now = read_for_carry(optimizer, gradients(optimizer))
                where = set(map(id, now))
                if any(id(t) not in where for ts in candidates for t in ts):
                    read += _unmeasured(carry_only(optimizer, now), self.measured)
            held += _held_flags(optimizer, where, lambda: self.measured, hands_over)
            calm = _calm_entries(optimizer)
            if calm and _multi_rank():
                # (a device flag armed by a combining call may hold no gradient in the reads, as one read on the CPU
                # as not set holds none, see note_beside: where it is set, every gradient the call does not measure
                # joins the read, by a multiply; no host read)
                rest = _unmeasured(read_for_carry(optimizer, gradients(optimizer)), self.measured)
                if rest:
                    bad = _nonfinite(rest, rest[0].device)
                    held += [_reduce.moved(e[0], bad.device).ne(0) & bad for e in calm]
        return held, read

    @property
    def local(self) -> Tensor:
        """This rank's value in the call's all-reduce: its read, and the flags of its optimizers' ledgers standing
        for another rank's gradients that the call does not decide (an optimizer it does not arm: see
        :func:`_outlasting`). Plain tensors, a fused AdamW stepping ``a`` and ``b`` on rank 0, ``b`` on rank 1: a
        NaN in ``a.grad`` clipped over the world (rank 1 passes nothing, and arms a flag held for rank 0's part,
        which only a call arming that optimizer decides, by its verdict), the batch dropped, then
        ``get_total_norm`` over the world: rank 0's flag, kept as a hand-over's, was dropped by the verdict of the
        new gradients' read and rank 0 stepped, rank 1 kept its flag and skipped. A call arming no skip among
        several ranks adds the flags that outlast it (:func:`_lasting`) and, read here, after it settled what it
        measures, those of the hand-overs it left waiting (:func:`_left_waiting`). Where the call combines over no
        other rank, its verdict is this rank's read alone (:meth:`agree`)."""
        local = self._read
        for flag in [*self._outlasting, *(_left_waiting() if self._joins_waiting and _WAITING else ())]:
            local = torch.maximum(_reduce.moved(local, flag.device), flag.ne(0).to(torch.float64))  # (no host read)
        return local

    def fold(self, found: Tensor, rest: list[Tensor]) -> None:
        """Another optimizer's hand-over this call settles (its measured gradients every one replaced): this rank's
        read of ``rest`` (every gradient of that optimizer: see :func:`_keep_replaced`) joins ``local`` before the
        all-reduce carries it, so every rank keeps or drops that flag alike (read by each rank alone, a NaN in rank
        0's shard of a head stepped by a second fused optimizer, settled by a call arming the first, skipped that
        optimizer's step on rank 0 only: FSDP2, 2 ranks). One verdict for every flag of the call: where two
        optimizers' flags wait on it at once, either's non-finite read keeps both (a good step skipped, never a NaN
        one taken)."""
        if self.agreed is not None or not rest or _unset_on_cpu(found):
            return  # (already combined; nothing to hold it; or, on the CPU, no flag to keep: read nothing)
        bad = _nonfinite(rest, found.device).to(torch.float64)
        self._read = torch.maximum(_reduce.moved(self._read, bad.device), bad)

    @property
    def measured(self) -> Sequence[Tensor]:
        if callable(self._measured):
            self._measured = self._measured()
        return self._measured

    def agree(self, combined: Tensor, alone: bool = False) -> None:
        """The all-reduced ``local`` (any rank's 1: true on every rank). ``alone``: the call combined over no other
        rank (no reduction group, or a group of one), so ``combined`` is this rank's read alone. While the world holds
        more ranks, the others' pieces may hold a NaN this rank's do not (a sharded part clipped over the world beside
        a replicated one clipped with ``group=None``; see :meth:`_may_differ`): the verdict is then true, every flag
        waiting on it kept as it is, held by the gradients it would have been read from (an entry without gradients:
        decided again by the next call that combines), on every rank alike (read by each rank alone, NaN in rank 0's
        shard of S, [S], [R] with ``group=None``, gradients replaced out of place, [R] again: rank 0 skipped and rank
        1 stepped). So too where a flag standing for another rank's gradients waits (:func:`_armed_elsewhere`), by its
        value, not read on the host: the verdict is true where that flag is set (on the CPU it is read, for free, and
        one not set was passed over), and this rank's read where it is not. Taken as set on a device, an entry kept by
        a verdict of 0 with no gradient left (rank 0's, in a hand-over beside a parameter of its own, which rank 1's
        hand-over of DDP's whole drops) forced rank 0 alone to keep at the next call on DDP's gradients, and a combining
        arming's entry on rank 1 forced it alone: one rank skipped, the other stepped (ddp seeds 1156, 1337, 1414 on a
        GPU). Where the call measures every gradient the flags' optimizers step (DDP, the whole model), the
        read is of replicas, the same on every rank, and decides. In one process, or where the call combines, the
        read decides."""
        elsewhere: list[Tensor] = []
        if alone and _multi_rank() and self._may_differ(elsewhere):
            self.agreed = torch.ones((), dtype=torch.bool, device=combined.device)
            return
        if alone:
            combined = self._read  # (not the flags that outlast the call: see local)
        self.agreed = combined.reshape(()) > 0
        for flag in elsewhere:  # (device tensors: no host read)
            self.agreed = self.agreed | _reduce.moved(flag, self.agreed.device).ne(0)
        self.shared = self._combines = not alone
        if self.shared:
            for optimizer in self.optimizers:  # (one dict store each: see _may_differ)
                optimizer.__dict__[_COMBINED] = True

    def _may_differ(self, elsewhere: list[Tensor]) -> bool:
        """Whether, in a call combining over no other rank, the flags its verdict decides may be read from pieces that
        differ among ranks: a hand-over it settled whose total was combined over several ranks (its pieces were shards),
        or an optimizer whose flag it decides (the call's own, a settled hand-over's, a waiting hand-over it measures
        gradients of) stepping a gradient the call does not measure that a waiting flag was armed on (not one
        :func:`note_beside` left out: a parameter of rank 0's own beside DDP's forced rank 0 alone to keep), or a
        call measuring nothing (no rank holds a gradient of its part: measuring and holding nothing, rank 0 dropped
        by its own read the entry of a NaN in its own gradient beside DDP's, clipped over the world and dropped to
        None, while rank 1's, standing for that gradient, was kept: rank 0 stepped, rank 1 skipped; ddp seed 1759),
        where a call combining over several ranks has armed that optimizer's skip (host-side tests, only where a
        flag waits). A flag standing for another rank's gradients (:func:`_armed_elsewhere`) of such an optimizer
        joins ``elsewhere``, which the verdict takes by its value (see :meth:`agree`); in one no combining call armed,
        such an entry was kept by the verdict of calls combining over no other rank, each rank's own read of its
        replicas, and that read decides it again (taken by its value, an entry of no gradient kept itself: DDP, a NaN
        in l0 armed whole and at [l0], l1's gradients replaced out of place, [l1] armed, the batch dropped to None,
        the next one armed whole: a good step skipped on every rank). Otherwise the call measures every gradient those
        optimizers step, whole on this rank and alike on every rank (``group=None``: DDP's replicas, by the pieces'
        contract), or the flags were all armed by calls on such pieces, and each rank's read is the others' (forced
        to keep, a NaN hand-over under DDP whose batch was dropped and recomputed skipped the next good step on
        every rank; and where rank 0's optimizer also stepped a parameter of its own outside DDP, rank 0 alone
        skipped it). An optimizer armed by combining calls once is marked for good (a flag's origin is not kept in
        its ledger): a loop mixing both keeps such flags from then on, alike on every rank."""
        if self.settled_shared:
            return True
        seen: set[int] = set()
        waiting = [o for o in _WAITING if id(o) not in self.ids] if _WAITING else []
        for optimizer in [*self.optimizers, *(d[0] for d in self.deferred), *waiting]:
            if id(optimizer) in seen:
                continue
            seen.add(id(optimizer))
            deferred = any(d[0] is optimizer for d in self.deferred)
            if not deferred and not _armed_or_pending(optimizer):
                continue  # (no flag of its waits: the verdict decides nothing of it)
            grads = gradients(optimizer)
            if id(optimizer) not in self.ids and not deferred:
                if not (self.measured and _measured_among(grads, self.measured)):
                    continue  # (a hand-over this call neither settles nor measures: left for its own step)
                pending = optimizer.__dict__.get(_PENDING)
                if pending is not None and pending[2] is not None and pending[6]:
                    return True
            if _COMBINED in optimizer.__dict__ and (
                    not self.measured or _unmeasured(carry_only(optimizer, grads, _UNSET), self.measured)):
                return True
            if _COMBINED in optimizer.__dict__:  # (else no entry stands for another rank's gradients)
                elsewhere += _armed_elsewhere(optimizer)
        return False

    @property
    def combines(self) -> bool:
        """Whether the call combines over several ranks: told at its entry (``combines``), and by the verdict once
        it is combined (:meth:`agree`)."""
        if callable(self._combines):
            self._combines = bool(self._combines())
        return self._combines

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """Within: the carries read the set that matches the call (see :func:`_beside_key`)."""
        token = _CALL.set(self)
        try:
            yield
        finally:
            _CALL.reset(token)

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        token = _DEFERRED.set(self)
        try:
            with self.calling():
                yield
        finally:
            _DEFERRED.reset(token)

    def abandon(self) -> None:
        """The call raised: the flags waiting for the verdict are kept by it where the all-reduce gave one (a
        non-finite total under ``error_if_nonfinite``, raised on every rank after the collective: read by each
        rank alone, a NaN in rank 0's shard kept the flag there alone, and a step taken after the error was
        skipped on rank 0 and taken on rank 1), else (raised before it) by this rank's read, as without one."""
        if self.agreed is not None:
            with self.armed():
                # (and a hand-over this rank's call did not settle, which arming would have kept or dropped:
                # rank 2's, whose pieces of the part, an empty shard, overlap none of its gradients)
                for optimizer in self.optimizers:
                    if not in_step(optimizer):
                        _drop_unsettled(optimizer, gradients(optimizer), self.measured)
                return
        self._keep_deferred()

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """The verdict stands for this rank's read within (the flags waiting for it are kept or dropped first)."""
        token = _AGREED.set(self.agreed if self.agreed is not None else self._read > 0)
        combining = _COMBINING.set(self.shared)
        try:
            with self.calling():
                self._keep_deferred()
                self._others_unsettled()
                yield
        finally:
            _COMBINING.reset(combining)
            _AGREED.reset(token)

    def apply(self) -> None:
        """The verdict applied to the settled hand-overs' flags that waited for it, in a call (or at a point of one)
        that arms nothing under it."""
        with self.armed():
            pass

    def _others_unsettled(self) -> None:
        """Another optimizer's hand-over that this call measures gradients of but did not settle here (its pieces
        on this rank were empty FSDP2 shards, which overlap nothing; since session 38 :func:`settle` takes such a
        gradient the call holds as overlapping), as the ranks settling it did (see :meth:`fold`):
        dropped, its flag kept or dropped by the verdict (left for the step's own check, which drops it, this rank
        stepped where the others skipped: heads h0 and h1 of a second fused optimizer, rank 2 of 3 holding nothing of
        h1, a call on [h1] arming the first). A hand-over settled or not replaced is left as it is."""
        if not _WAITING or not self.measured:
            return
        for optimizer in list(_WAITING):
            if id(optimizer) in self.ids or in_step(optimizer):
                continue
            pending = optimizer.__dict__.get(_PENDING)
            if pending is None or pending[2] is None:
                continue
            grads = gradients(optimizer)
            if _measured_among(_measured_side(pending, grads), self.measured):
                # (held by every gradient: this call arms no flag of that optimizer's, see _keep_replaced)
                _drop_unsettled(optimizer, grads, None)

    def _keep_deferred(self) -> None:
        """The settled hand-overs' flags that waited (:meth:`deferring`): kept or dropped, once each. In one process
        each by its own read (every piece is this process's): the call's one verdict kept every such flag where any
        read was not finite, so a hand-over of a second optimizer whose batch was dropped and replaced by a fresh
        one kept its NaN flag by the first's gradients, replaced out of place and NaN, and its good step was skipped.
        Among several ranks the verdict stands for every flag of the call (one value in the all-reduce)."""
        deferred, self.deferred = self.deferred, []
        token = _AGREED.set(None) if deferred and not _multi_rank() else None
        try:
            for optimizer, found, rest in deferred:
                _keep_replaced(optimizer, found, rest)
        finally:
            if token is not None:
                _AGREED.reset(token)


def _armed_elsewhere(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The flags of ``optimizer``'s ledger (the fused skip's or the skip guard's) standing for gradients another
    rank holds: armed by a call that measured nothing on this rank (:func:`_measured_elsewhere`), or kept by the
    ranks' verdict with no gradient left here. Such a flag is decided by the ranks' verdict, which this rank's
    read alone is not: its optimizer steps no gradient of that part here, while the rank holding it does (a part
    held on rank 0 alone, NaN there, clipped over the world, a replicated part clipped with ``group=None``, every
    gradient replaced out of place, the replicated part clipped again: rank 1, measuring all it steps, dropped the
    flag by its own read and stepped, rank 0 skipped). On the CPU only where that flag is set (a free read); so too
    the device flags armed by a call combining over several ranks (:func:`_calm_entries`), which hold no gradient
    there: every rank holds such a flag, by the same value (see :meth:`Agreement.agree`)."""
    return ([entry[0] for entry in _ledger_entries(optimizer) if _elsewhere_entry(*entry)]
            + [entry[0] for entry in _calm_entries(optimizer)])


def _on_host(flag: Tensor) -> bool:
    """Whether reading ``flag`` on the host is free (the CPU); a device flag is never read there (a host sync)."""
    return flag.device.type == "cpu"


def _unset_on_cpu(flag: Tensor) -> bool:
    """Whether ``flag`` is on the CPU and reads as not set: a free read there, never made on a device (a host
    sync); a device flag is taken as possibly set."""
    return _on_host(flag) and not bool(flag)


def _calm_entries(optimizer: torch.optim.Optimizer) -> list[tuple[Any, Any, Any]]:
    """The entries of ``optimizer``'s ledger (and its hand-over's flag) whose flag is a device flag noted in
    :data:`_CALM`: armed (or handed over) by a call combining over several ranks, the same on every rank, never read
    on the host (see :func:`note_beside`, :func:`hand_over_`), or by a call measuring nothing with no collective (0).
    Such a flag holds no gradient in the reads of calls combining over no other rank (:func:`note_beside`), nor once
    its gradients are gone (:func:`supersede`, :func:`rearm`, :func:`hand_over_`, :func:`_keep_replaced`): its
    value joins those calls' verdicts on every rank alike instead
    (:meth:`Agreement.agree`, by a multiply: no host read), as the entry for it on a rank that measured nothing
    there does. None on the CPU, where such a flag is read for free and one not set holds nothing."""
    if not optimizer.__dict__.get(_CALM):
        return []
    entries = _ledger_entries(optimizer)
    pending = optimizer.__dict__.get(_PENDING)
    if pending is not None:
        entries.append((pending[1], pending[3], None))
    return [e for e in entries if _is_calm(optimizer, e[0])]


def _elsewhere_entry(flag: Any, members: Any, seen: Any) -> bool:
    """Whether a ledger entry is a flag, possibly set (on the CPU: set), standing for gradients another rank holds
    (see :func:`_armed_elsewhere`)."""
    return (((members is None and _measured_elsewhere(seen)) or (members is not None and not members))
            and isinstance(flag, Tensor) and not _unset_on_cpu(flag))


def _outlasting(ids: set[int]) -> list[Tensor]:
    """The flags standing for another rank's gradients (:func:`_elsewhere_entry`) in the ledgers of the optimizers
    of :data:`_ARMED` but those whose ids are ``ids`` (the ones a call arms, which decides such flags by its
    verdict): a call not arming an optimizer leaves them as they are, so they join its verdict, as the flags held
    by gradients it does not measure do (:func:`_held_flags`)."""
    out: list[Tensor] = []
    for optimizer in list(_ARMED):
        if not _armed_or_pending(optimizer):
            _ARMED.discard(optimizer)
        elif id(optimizer) not in ids:
            out += [entry[0] for entry in _ledger_entries(optimizer) if _elsewhere_entry(*entry)]
    return out


def _lasting(measured: Callable[[], Sequence[Tensor]]) -> list[Tensor]:
    """For a call arming no skip (``get_total_norm``, a clip without a fused ``optimizer=``,
    ``clip_grads_with_norm_``) among several ranks: the flags of this rank that outlast it, which another rank's
    hand-over of the same optimizer, settled by the call, must join (so every rank keeps or drops alike): a settled
    hand-over's flag whose total was combined over several ranks (it lasts to the step whatever the call reads, see
    :func:`settle`), the ledger's entries (the call decides none of them), and the flags :func:`_held_flags` finds
    held by gradients the call does not measure. Left out,
    ``a`` on rank 0 alone, ``b`` on both, one fused AdamW, a NaN in ``a``, [a, b] handed over over the world, [a]
    read (settling it on rank 0; rank 1, measuring nothing, kept its hand-over waiting), ``b`` replaced out of
    place, [b] read: rank 1 settled its hand-over by its own read of ``b``, finite, and stepped, rank 0 skipped
    (so too with ``b`` replaced before the read of [a], rank 0's flag then an entry of its ledger)."""
    out: list[Tensor] = []
    seen: set[int] = set()
    for optimizer in [*_WAITING, *_ARMED]:
        if id(optimizer) in seen or not _armed_or_pending(optimizer):
            continue
        seen.add(id(optimizer))
        pending = optimizer.__dict__.get(_PENDING)
        if (pending is not None and pending[2] is None and pending[6] and isinstance(pending[1], Tensor)
                and not _unset_on_cpu(pending[1])):
            out.append(pending[1])
        out += _held_flags(optimizer, None, measured)
        # (and the ledger's entries, measured by the call or not, their gradients held or replaced since: it
        # decides none of them; left out, with [a, b] read last, or with ``a`` and ``b`` replaced again before the
        # read of [b], rank 0's entry of ``a`` and ``b``, replaced, joined nothing)
        out += [flag for flag, members, _seen in _ledger_entries(optimizer)
                if members and isinstance(flag, Tensor) and not _unset_on_cpu(flag)]
    return out


def _left_waiting() -> list[Tensor]:
    """For a call arming no skip among several ranks (see :func:`_lasting`), read once it settled what it measures
    here: the flags of the hand-overs it left waiting, unsettled, whose total was combined over several ranks (it
    measured none of their gradients on this rank). Such a flag reaches this rank's step as it is
    (:func:`_carried_at_step`), or the verdict of a later call that settles it, which another rank's lasting flag
    joins; the ranks settling theirs in this call, by its verdict, must keep alike. Left out, ``a`` on rank 0 alone,
    ``b`` on both, one fused AdamW, a NaN in rank 1's ``b``, [a, b] handed over over the world, every gradient
    replaced out of place (or the batch dropped and the next one computed), [a] read over the world: rank 0 settled
    its hand-over by its own finite read and stepped, while rank 1, measuring nothing, kept its own waiting and
    skipped, at the step or once [b] was read. Every rank keeps now (a good step may be skipped, never a NaN one
    taken). Host-side tests; on the CPU only where a flag is set."""
    out: list[Tensor] = []
    for optimizer in list(_WAITING):
        pending = optimizer.__dict__.get(_PENDING)
        if (pending is not None and pending[2] is not None and pending[6] and isinstance(pending[1], Tensor)
                and not _unset_on_cpu(pending[1]) and not in_step(optimizer)):
            out.append(pending[1])
    return out


def _ledger_entries(optimizer: torch.optim.Optimizer) -> list[tuple[Any, Any, Any]]:
    """The ``(flag, members, seen)`` entries of ``optimizer``'s ledger: the fused skip's record's and the skip
    guard's (see :func:`supersede`)."""
    records: list[Any] = []
    armed = optimizer.__dict__.get(_SKIP)
    if armed is not None:
        records.append(armed[1])
    guard = optimizer.__dict__.get("_dist_clip_skip_guard")
    if guard is not None and getattr(guard, "flag", None) is not None:
        records.append(getattr(guard, "armed_on", None))
    return [e for record in records for e in getattr(record, "parts", None) or ()]


def _multi_rank() -> bool:
    """Whether this process is one of several ranks (a process group of more than one rank is initialized)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _armed_or_pending(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a skip flag (fused, or the skip guard's) or a hand-over waits for ``optimizer``'s next step."""
    guard = optimizer.__dict__.get("_dist_clip_skip_guard")
    return (_SKIP in optimizer.__dict__ or _PENDING in optimizer.__dict__
            or (guard is not None and getattr(guard, "flag", None) is not None))


def _may_carry(optimizer: torch.optim.Optimizer) -> list[list[Tensor]]:
    """The gradients of each flag that an arming now may keep by :func:`carried_by_replacements` (host-side, no
    device read): those a flag of the ledger (the fused skip's or the skip guard's) or a hand-over's flag was
    armed on, where that flag may be set (on the CPU: is set); it applies where one of them is no longer held."""
    def live(flag: Any) -> bool:
        return isinstance(flag, Tensor) and not _unset_on_cpu(flag)

    out = [members for flag, members, _seen in _ledger_entries(optimizer) if members and live(flag)]
    pending = optimizer.__dict__.get(_PENDING)
    if pending is not None and pending[3] and live(pending[1]):
        out.append(pending[3])
    return out


def _held_flags(optimizer: torch.optim.Optimizer, where: set[int] | None,
                measured: Callable[[], Sequence[Tensor]], hands_over: bool = False) -> list[Tensor]:
    """The flags of ``optimizer``'s ledger (the fused skip's or the skip guard's) held by a gradient this rank
    still holds that the call at hand does not measure (``measured()``, read only where such a flag may be set):
    they outlast the call here, so they join its :class:`Agreement`. An entry whose gradients are all gone lives
    on every rank by the ranks' verdict (:func:`carried_by_replacements`); read from the replaced gradients alone,
    the verdict went to 0 once the rank holding the NaN held it again by an entry (the replacement, not measured
    by the call, now that entry's gradient), and the other ranks dropped their flag while that rank kept its own:
    a part on rank 0 alone, NaN there, gradients replaced out of place, the next part clipped twice (rank 1
    stepped, rank 0 skipped). A hand-over's flag (settled or not) counts alike, held by the gradients it was
    measured on (settled, those among the ones stepped then, see :func:`settle`): it lasts to the step, or joins the
    ledger, while they are held (left out, rank 0's NaN hand-over of part A, measured while ``b`` had no gradient
    yet, did not reach the verdict at [B], and rank 1, holding no gradient at [A], dropped its flag and stepped
    while rank 0 skipped). Host-side identity tests; on the CPU only where a flag is set."""
    entries = _ledger_entries(optimizer)
    pending = optimizer.__dict__.get(_PENDING)
    if pending is not None and pending[3] and _multi_rank():  # (in one process the flag reaches the step as is)
        entries.append((pending[1], pending[3], _SETTLED if pending[2] is None and not hands_over else None))
    out: list[Tensor] = []
    ids: set[int] | None = None
    plain = None
    for flag, members, seen in entries:
        if not isinstance(flag, Tensor) or _unset_on_cpu(flag):
            continue
        if seen is _SETTLED:
            # A settled hand-over's flag lasts to the step whatever the call reads (see settle), measured or not,
            # unless a hand-over replaces it: held by gradients the call measures again, it was left out, and where
            # a batch dropped in place was clipped again finite (``a`` on rank 0 alone, a NaN hand-over of [a]
            # settled by a call on [a], zeroed in place, [a] clipped), rank 0 kept it and skipped while rank 1,
            # whose entry the verdict decides, stepped.
            where = where if where is not None else set(map(id, read_for_carry(optimizer, gradients(optimizer))))
            if any(id(t) in where for t in members):
                out.append(flag)
            continue
        if members is None and isinstance(seen, _Explicit):
            # skip_next_step_'s flag, lasting while a gradient held then is still held (or armed with none held:
            # until the step): it outlasts any call here, so it joins too (see _decided_by_verdict)
            where = where if where is not None else set(map(id, gradients(optimizer)))
            if not seen[0] or any(id(t) in where for t in seen[0]):
                out.append(flag)
            continue
        if not members:
            continue
        if ids is None:
            where = where if where is not None else set(map(id, read_for_carry(optimizer, gradients(optimizer))))
            ids = set(map(id, measured()))
        if not any(id(t) in where and id(t) not in ids for t in members):  # (the first one, usually)
            continue
        if plain is None:
            plain = not any(map(Tensor._is_view, measured()))  # (then identity alone tells what is measured)
        if plain or _unmeasured([t for t in members if id(t) in where], measured()):
            out.append(flag)
    return out


def _nonfinite(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """A 0-dim bool on ``device``: whether some element of ``tensors`` is NaN or infinite (one largest-magnitude
    pass per device and dtype, which keeps a NaN)."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        t = getattr(t, "_local_tensor", t)
        t = t._values() if t.is_sparse else t
        if t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t)
    out = torch.zeros((), dtype=torch.bool, device=device)
    for ts in groups.values():
        peaks = torch.stack(torch._foreach_norm(ts, float("inf")))
        out = out | _reduce.moved(~torch.isfinite(peaks).all(), device)
    return out


class _Explicit(tuple):  # type: ignore[type-arg]
    """The gradients held (:func:`grad_state`) when ``skip_next_step_`` armed a flag, in the flag's ledger."""


def _sticky(seen: tuple[Any, ...], now: tuple[list[Tensor], list[int]], measured: Sequence[Tensor] | None) -> bool:
    """Whether a flag of the ledger armed without measured gradients still holds. One armed by ``skip_next_step_``
    on the gradients ``seen`` held: while one of them is still held (set to None by ``zero_grad()``, the batch
    was dropped), whatever wrote them since (an auxiliary loss, a clip; a dropped batch's in-place
    ``zero_grad()`` too, which nothing tells from the first: clear the flag with ``skip_next_step_(optimizer,
    False)`` there). Replaced on a write, it was lost to a part clipped again after an extra loss, and the step
    taken. One armed while no gradient was held lasts until the step. Another (a call whose pieces the optimizer
    does not step): while :func:`untouched` holds."""
    if not isinstance(seen, _Explicit):
        return untouched(seen, now, measured)
    if not seen[0]:
        # Armed while no gradient was held (after zero_grad(set_to_none=True), before the backward: a batch found
        # bad before its backward): for this step, whatever the backward makes. Dropped once a gradient appeared,
        # the first call arming a skip replaced it and the requested skip was lost, the step taken.
        return True
    where = set(map(id, now[0]))
    if any(id(t) in where for t in seen[0]):
        return True
    # Or made anew over the same bytes by their wrapper (FSDP1's new views of the flat gradient after a forward,
    # or it re-aliased by a backward; the held tensors keep those bytes alive, so equal addresses are the same
    # memory), whatever wrote them since, as for the held ones: read as gone, a forward between skip_next_step_
    # and a clip (of the whole model, or of a part before it) dropped the flag and the step was taken.
    held = {_bytes_key(t) for t in seen[0] if getattr(t, "_local_tensor", t).numel()}
    return bool(held) and any(_bytes_key(g) in held for g in now[0])


def first_flag(record: tuple[Any, ...], new: Tensor) -> None:
    """``record`` arms ``new`` alone (replaced, or nothing armed before): the ledger's first entry."""
    if isinstance(record, _Record):
        record.parts = [(new, list(record[0]), None)]


def rearm(armed: tuple[Tensor, tuple[Any, ...]] | None, new: Tensor, now: tuple[list[Tensor], list[int]],
          started: tuple[list[Tensor], list[int]] | None, measured: Sequence[Tensor] | None,
          optimizer: torch.optim.Optimizer | None,
          merge: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, tuple[Any, ...]]:
    """The skip flag and record a call arming ``new`` leaves, over ``armed`` (the flag and record armed before,
    or None: nothing armed, or an arming that replaces): by the flag's ledger where the records keep one
    (:func:`supersede`), else both flags merged where the call found the gradients as the arming left them
    (:func:`untouched`), else ``new`` alone. A call that measured nothing (every gradient of its part None) leaves
    the record as it was; one measuring only pieces the optimizer does not step joins the ledger (:func:`_beside`).
    One rule for the fused hand-over's skip (:func:`arm_skip_`) and the clipper's skip guard."""
    if optimizer is not None and _multi_rank():
        _ARMED.add(optimizer)  # (its ledger may come to hold a flag for another rank's gradients: see _outlasting)
    if measured and optimizer is not None and _stand_ins_only(measured, now[0]):
        measured = []
    if measured is not None and not measured and optimizer is not None:
        if armed is not None:
            parts = getattr(armed[1], "parts", None)
            if parts is not None:
                # Its flag joins the ledger as a first call's does (below): another rank may have measured it (an
                # FSDP1 rank whose shard of the part is padding only). Merged into the flag alone, the next call's
                # ledger dropped it there: that rank took the step the others skipped (a NaN in a one-element
                # head on rank 0, use_orig_params=True, 2 ranks: rank 1 stepped its shards, rank 0 did not).
                where = {id(t) for t in now[0]}

                def decided(m: Any, seen: Any) -> bool:
                    # (an entry with no gradient left here, or one armed by a call that measured nothing here whose
                    # gradients held then were replaced or written: decided by this call's verdict too, as in
                    # supersede; kept here, rank 1 skipped a batch zeroed in place whose [A] had dropped rank 0's
                    # flag, and where rank 1's call measured nothing again, [A] / nothing after a dropped NaN batch
                    # of [A], rank 1 skipped while rank 0 stepped; so too skip_next_step_'s entry whose gradients
                    # are every one gone here, as in supersede: kept here, skip_next_step_(opt, True), every gradient
                    # replaced out of place, [a] of rank 0's alone clipped over the world: rank 1 skipped, rank 0
                    # stepped)
                    if m is not None:
                        return not any(id(t) in where for t in m)
                    return _decided_by_verdict(seen) and not _lasts(seen, started if started is not None else now,
                                                                    measured)

                if _AGREED.get() is not None and any(decided(m, seen) for _, m, seen in parts):
                    # (kept, held by the gradients held here that no entry left holds, as supersede holds it on a
                    # rank measuring a part: held by none, it stood for another rank's gradients, and a later call
                    # with no collective was forced to keep it here alone, while the ranks holding it by theirs
                    # dropped it with them. DDP, unfused, rank 0's own part clipped over the world after a NaN
                    # batch, dropped to None, DDP's whole clipped: rank 1 skipped, rank 0 stepped; ddp seed 1649)
                    holding = {id(t) for _, m, seen in parts if m is not None and not decided(m, seen) for t in m}
                    rest = [t for t in carry_only(optimizer, now[0]) if id(t) not in holding]

                    def carry(f: Tensor) -> tuple[Tensor, list[Tensor], None] | None:
                        # (but a _CALM flag, held by no gradient, as supersede carries it: see _still_calm. Held by
                        # DDP's gradients, a new tensor of no _CALM standing, on rank 1 alone, rank 0's own part
                        # armed twice over the world (rank 1 measuring nothing) counted them as held there: a NaN
                        # [l0] armed, the batch dropped to None and [l0] armed again, rank 1 alone was forced to
                        # keep that flag (its verdict taken as possibly differing) and skipped, rank 0 stepped)
                        if not _is_calm(optimizer, f):
                            return carried_by_replacements(f, rest)
                        entry = carried_by_replacements(f, [])
                        if entry is not None:
                            _still_calm(optimizer, [f], entry[0])
                        return entry

                    parts = [e for e in ((carry(f) if decided(m, seen) else (f, m, seen)) for f, m, seen in parts)
                             if e is not None]
                    armed[1].parts = [*parts, (new, None, (*now, None))]
                    return functools.reduce(merge, [f for f, _, _ in armed[1].parts]), armed[1]
                armed[1].parts = [*parts, (new, None, (*now, None))]
            return merge(armed[0], new), armed[1]
        # (a ledger holding the flag by what untouched says of the gradients held now, as a record of them did:
        # on another rank, holding pieces of the part, the same flag may have been measured)
        return new, _Record.uncounted(([], []), [(new, None, (*now, None))])
    if measured is None and optimizer is not None and armed is None:
        # skip_next_step_: nothing says what was measured; the flag lasts while _sticky holds for the gradients
        return new, _Record.uncounted(now, [(new, None, _Explicit(now))])
    record = armed_record(now, measured, optimizer)
    if isinstance(record, _Record):
        record.state = now
    if armed is not None:
        armed = (armed[0], _followed(armed[1], now))
    if measured and optimizer is not None and not isinstance(record, _Record) and not _inside(now[0], measured):
        if _COMBINING.get() and _multi_rank():
            # Combined over several ranks, whose flag is the same on every rank: recorded as by a rank that measured
            # nothing (another rank holding no piece of the part records it so), decided by the verdict of a later
            # call combining over several ranks (see _lasts), on every rank alike. Held here by the pieces, under DDP
            # beside rank 0's own parameter (in an optimizer of its own) with a NaN there, [own] clipped over the
            # world arming DDP's optimizer, then rank 0's gradient written (a plain clip in place, zeroed, a
            # backward) or the batch dropped, and DDP's whole clipped: rank 0 dropped the flag and stepped, rank 1
            # kept its entry and skipped (wddpown seed 125)
            return rearm(armed, new, now, started, [], optimizer, merge)
        return _beside(armed, record, now, started, measured, new, merge, optimizer)
    if armed is not None:
        merged = supersede(armed[1], record, now, started, measured, new, merge, optimizer)
        if merged is not None:
            return merged, record
        if untouched(armed[1], started if started is not None else now, measured):
            carried(armed, record, new)
            return merge(armed[0], new), record
    first_flag(record, new)
    return new, record


def _inside(grads: Sequence[Tensor], measured: Sequence[Tensor]) -> bool:
    """Whether some of a call's pieces ``measured``, none of them a gradient the optimizer steps (``grads``), lie in
    the bytes of one: slices of a stepped gradient (experts stored in one weight, each slice ``w.grad[e]`` clipped
    in its own call), which :func:`untouched` tells apart by their bytes, not pieces the optimizer does not step
    (:func:`_beside`: held by their version counter, which a slice shares with the whole gradient, the next
    slice's scaling read as a write and the first slice's NaN flag was dropped: the NaN step was taken)."""
    ids = set(map(id, grads))
    overlaps = _overlap_test([m for m in measured if id(m) not in ids])
    return overlaps is not None and any(overlaps(_span(g)) for g in grads)


def _beside(armed: tuple[Tensor, tuple[Any, ...]] | None, record: tuple[Any, ...],
            now: tuple[list[Tensor], list[int]], started: tuple[list[Tensor], list[int]] | None,
            measured: Sequence[Tensor], new: Tensor, merge: Callable[[Tensor, Tensor], Tensor],
            optimizer: Any = None) -> tuple[Tensor, _Record]:
    """The flag and record of a call arming ``new`` whose pieces the optimizer steps none of (parameters it does not
    step, copies of its gradients: ``record`` holds them, see :func:`armed_record`): a ledger (:func:`supersede`)
    whose entries armed before stay as they would for a call measuring none of their gradients, and ``new`` joins
    it held by ``record`` (while :func:`untouched` holds for it, as a flag :func:`carried` into a ledger is). An
    earlier flag without a ledger joins it held by its record, where the call found it untouched. Recorded as the
    call's alone, with no ledger, the flags it merged were lost to a later write to the unstepped gradients
    before a call measuring them again (read as the flag's gradients written; a hand-over's flag, kept after its
    gradients were written, had no ledger to join): heads h0, h1 stepped, a module E not, NaN in h0, [h0], [h1],
    [E] clipped, an auxiliary loss through h1 and E, [E] clipped again: the NaN step was taken (``GradClipper``
    fused or not and the hand-over alike, gradients of their own or views of one buffer; a
    ``skip_next_step_(optimizer, True)`` before [E] was lost alike)."""
    own = _Record.uncounted(([], []))
    own.state = now
    if armed is not None and getattr(armed[1], "parts", None) is not None:
        supersede(armed[1], own, now, started, measured, new, merge, optimizer)
        assert own.parts is not None
        own.parts[-1] = (new, None, record)
    elif armed is not None and untouched(armed[1], started if started is not None else now, measured):
        own.parts = [(armed[0], None, armed[1]), (new, None, record)]
    else:
        own.parts = [(new, None, record)]
    return functools.reduce(merge, [f for f, _, _ in own.parts]), own


def _followed(record: tuple[Any, ...], now: tuple[list[Tensor], list[int]]) -> tuple[Any, ...]:
    """``record`` (a flag's :func:`armed_record`, its ledger included) with each held gradient that its wrapper made
    anew over the same bytes (:func:`_successors`) replaced by the tensor the optimizer steps now. FSDP1 does so:
    with ``use_orig_params=True`` its gradients are new views of the flat gradient after every forward, and both
    ways a backward accumulating into the flat gradient re-aliases it through ``.data`` (a new tensor, with a
    fresh version counter). Taken for gradients gone, a forward (logging, evaluation) or an auxiliary loss
    between the calls clipping parts dropped a part's NaN flag, and the NaN step was taken (heads [ha], [hb],
    [hc], NaN in hb, 2 ranks, with and without ``use_orig_params``). A view made anew of the same buffer,
    unwritten, keeps its version; one over a re-aliased buffer counts as written."""
    state = getattr(record, "state", None)
    if state is None and not isinstance(record, _Record) and record and not isinstance(record, _Explicit):
        state = (record[0], record[1])  # a record of every gradient held then, with their versions
    if state is None or not state[0]:
        return record
    moved = _successors(state, now)
    if not moved:
        return record

    def follow(ts: Sequence[Tensor]) -> list[Tensor]:
        return [moved[id(t)][0] if id(t) in moved else t for t in ts]

    def versions(ts: Sequence[Tensor], vs: Sequence[Any]) -> list[Any]:
        return [moved[id(t)][1] if id(t) in moved else v for t, v in zip(ts, vs)]

    if isinstance(record, _Record):
        out = _Record((follow(record[0]), versions(record[0], record[1])))
        out.cells = record.cells
        if record.parts is not None:
            out.parts = [(f, follow(m) if m is not None else None,
                          _Explicit((follow(seen[0]), versions(seen[0], seen[1]))) if isinstance(seen, _Explicit)
                          else (follow(seen[0]), versions(seen[0], seen[1]), *seen[2:])
                          if type(seen) is tuple and seen and seen[0] else seen) for f, m, seen in record.parts]
        out.state = (follow(state[0]), versions(state[0], state[1]))
        return out
    return (follow(record[0]), versions(record[0], record[1]), *record[2:])


def _successors(state: tuple[list[Tensor], list[Any]], now: tuple[list[Tensor], list[int]]
                ) -> dict[int, tuple[Tensor, Any]]:
    """id of each gradient of ``state`` (what the optimizer stepped at an arming, with versions) no longer stepped
    -> (the tensor now stepped over the very same bytes, the version it stands in with): the held gradient keeps
    its bytes alive, so equal addresses are the same memory. Only where the held gradient was not written since
    the arming (a dropped batch's ``zero_grad()`` in place writes it: the next batch's gradients, accumulated by
    FSDP1 into the same bytes, are new). A view of the same buffer object at its recorded version is the held
    gradient unwritten (its version); any other (a buffer re-aliased for a backward) was written since (-1)."""
    if same_tensors(state[0], now[0]):
        return {}  # (the usual case, in one C-level pass)
    stepped = {id(g) for g in now[0]}
    gone = {_bytes_key(h): (h, v) for h, v in zip(*state)
            if id(h) not in stepped and isinstance(v, int) and getattr(h, "_local_tensor", h).numel()}
    if not gone:
        return {}
    held = {id(h) for h in state[0]}
    out: dict[int, tuple[Tensor, Any]] = {}
    for g, v in zip(*now):
        if id(g) in held:
            continue
        hit = gone.get(_bytes_key(g))
        if hit is None or _version(hit[0]) != hit[1]:
            continue
        h = hit[0]
        out[id(h)] = (g, v if _root(g) is _root(h) else -1)
    return out


def _stand_ins_only(measured: Sequence[Tensor], grads: Sequence[Tensor]) -> bool:
    """Whether a call's pieces are only stand-ins for absent gradients: FSDP2 parameters whose ``.grad`` is None
    are measured as empty DTensors (:func:`dist_clip.adapters.params.absent_dtensor_grads`), none of them a
    gradient the optimizer steps. Such a call measured nothing: recorded as one measuring pieces the optimizer
    does not step, it dropped the flag's ledger, and a later part's call after a backward into the flag's NaN
    gradients (new ones beside them in a new reduce-scatter buffer) replaced the flag: the NaN step was taken
    (one ``fully_shard`` unit, heads h0-h4, a batch through h1 and h2 with a NaN, [h0-h3] then the unused [h4]
    clipped, an auxiliary loss through h2-h4, [h4] clipped again; 2 ranks). ``mode="unitwise"`` measures them as
    fresh empty tensors, alike. An empty gradient the optimizer steps (a rank's empty shard of a small parameter)
    or an empty view of a wrapper's buffer is measured, as the other ranks' non-empty ones are."""
    if any(getattr(t, "_local_tensor", t).numel() for t in measured):
        return False
    from .adapters.params import _STAND_INS

    made = {id(v) for _, _, _, kept in _STAND_INS.values() for v in (kept, kept._local_tensor)}
    held = set(map(id, grads))
    return all(id(t) in made or (not t._is_view() and id(t) not in held) for t in measured)


def carried(armed: tuple[Tensor, tuple[Any, ...]], record: tuple[Any, ...], new: Tensor) -> None:
    """A flag armed on ``armed`` combined into one armed on ``record``: the record starts its ledger with the
    earlier flag held by its record (:func:`supersede`)."""
    if isinstance(record, _Record):
        record.parts = [(armed[0], None, armed[1]), (new, list(record[0]), None)]


def armed_record(
    now: tuple[list[Tensor], list[int]], measured: Sequence[Tensor] | None,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[Any, ...]:
    """What a skip armed on ``now`` (:func:`grad_state` after the arming call) holds on to: the optimizer's
    gradients among ``measured`` (the call's pieces), with their versions; all of ``now`` where none of them is
    one the optimizer steps (FSDP1's flat views) or nothing says what was measured (``skip_next_step_``). Where
    none of them is, the measured pieces themselves are held too, weakly (:func:`_measured_record`). Part of
    gradients sharing version counters (``optimizer`` given) also holds their parameters' backward counts."""
    if measured is None:
        return now
    kept = _measured_among(now[0], measured)
    if not kept:
        return (*now, _measured_record(measured))
    if optimizer is None:
        return ((now[0], now[1]) if len(kept) == len(now[0])
                else ([now[0][i] for i in kept], [now[1][i] for i in kept]))
    if len(kept) == len(now[0]):
        return _Record.uncounted(now)  # every gradient held: its versions tell the next batch (see untouched)
    held = [now[0][i] for i in kept]
    if not any(map(Tensor._is_view, held)) or not _shared_counters(now[0]):  # (in C)
        # Gradients of their own: their versions tell a write; a record of the part, for its flag (see supersede)
        return _Record.uncounted((held, [now[1][i] for i in kept]))
    record = _Record((held, [now[1][i] for i in kept]))
    params = _params_by_grad(optimizer)
    cells: list[tuple[_Count, int] | None] = []
    for g in held:
        p = params.get(id(g))
        # (not FSDP1's original parameters: autograd accumulates into their flat parameter, theirs never move)
        if (p is not None and _autograd_leaf_param(p) and p.requires_grad
                and not getattr(p, "_fsdp_flattened", False)):
            cell = _write_cell(p)
            cells.append((cell, cell[0]))
        else:
            cells.append(None)
    record.cells = cells
    return record


def _measured_among(grads: Sequence[Tensor], measured: Sequence[Tensor]) -> list[int]:
    """Indices of the ``grads`` that ``measured`` (a call's pieces) holds: by identity; where gradients are views
    of one buffer (DeepSpeed's, Megatron's, DDP's bucket views), which share one version counter, also those whose
    bytes a measured slice of the buffer overlaps, for :func:`untouched` to tell a write beside them."""
    ids = set(map(id, measured))
    kept = [i for i, g in enumerate(grads) if id(g) in ids]
    if len(kept) < len(ids):
        # A measured view of a gradient of its own that stands for all of it (FSDP1's flat shard less its padding,
        # a reshape of all of it) measures that gradient: left out, the rank whose shard ends in padding kept
        # another record than the others (the whole model's). Not any slice: a call measuring one expert's slice
        # ``w.grad[e]`` of a weight holding all experts was read as measuring ``w.grad`` whole, so the next
        # expert's call dropped the first one's NaN flag, and the NaN step was taken.
        bases = {id(b) for m in measured if (b := _whole_of(m)) is not None}
        if bases:
            kept = sorted({*kept, *(i for i, g in enumerate(grads) if id(g) in bases)})
    if len(kept) < len(grads) and len(kept) < len(ids) and _shared_counters(grads):
        overlaps = _overlap_test([m for m in measured if id(m) not in set(map(id, grads))])
        if overlaps is not None:
            kept = sorted({*kept, *(i for i, g in enumerate(grads) if overlaps(_span(g)))})
    return kept


#: Set by an adapter on a view of a gradient that stands for that whole gradient where it leaves out elements that
#: are not gradient (FSDP1's flat shard less its padding, and its per-parameter views of that shard, measured in
#: one call): see :func:`_whole_of`.
WHOLE = "_dist_clip_whole"


def whole_(piece: Tensor) -> Tensor:
    """Mark ``piece`` (a view of a gradient) as standing for all of that gradient (:data:`WHOLE`); returns it."""
    setattr(piece, WHOLE, True)
    return piece


def _whole_of(piece: Tensor) -> Tensor | None:
    """The gradient a measured view ``piece`` stands for whole: its base, where the view spans all of the base's
    elements (``g.reshape(-1)``) or an adapter marked it (:func:`whole_`); None for any other view (a slice)."""
    t = getattr(piece, "_local_tensor", piece)
    b = t._base
    if b is None:
        return None
    if getattr(t, WHOLE, False) or (t.numel() == b.numel() and _span(t) == _span(b)):
        return b
    return None


def _shared_counters(grads: Sequence[Tensor]) -> bool:
    """Whether two of ``grads`` share a version counter (views of one buffer: a write to either bumps both)."""
    roots = [id(_root(g)) for g in grads]
    return len(set(roots)) < len(roots)


def _measured_record(measured: Sequence[Tensor]) -> list[tuple[Any, int]] | None:
    """Weak references to the measured gradients, with their versions, where the optimizer steps none of them
    (copies of them: a DeepSpeed stage-0 bf16/fp16 wrapper's fp32 gradients, filled in its ``step()`` and
    dropped after it, so that the optimizer held no gradient at either call; two empty records read as
    untouched, the next batch's call combined its flag with a NaN batch's that the wrapper had skipped itself,
    and the good step was skipped too). None where some piece is a view (FSDP1's flat views, whose bases may be
    made anew for each call) or there is none: the optimizer's gradients decide alone, as before."""
    pieces = [getattr(t, "_local_tensor", t) for t in measured]
    if not pieces or any(t._is_view() for t in pieces):
        return None
    try:
        return [(weakref.ref(t), _version(t)) for t in pieces]
    except TypeError:  # (a tensor subclass without weak references)
        return None


def untouched(armed: tuple[Any, ...], now: tuple[list[Tensor], list[int]],
              measured: Sequence[Tensor] | None = None) -> bool:
    """Whether some gradient an armed skip holds (:func:`armed_record`) is still among ``now``'s
    (:func:`grad_state`) with the same version: not every one of them replaced, dropped or written since (a
    dropped batch's ``zero_grad()``, either way, touches them all). Gradients that appeared, or were written,
    beside them do not count: another part's backward between the calls clipping each part, also one
    accumulating into a trunk both parts share (requiring all of them untouched, it replaced the first part's
    NaN skip). An empty record (nothing held then) is untouched only while there is still nothing. A record
    that also holds the measured pieces (the optimizer steps none of them) is touched once every one of them is
    freed or written since, whatever the optimizer's gradients say."""
    seen = armed[2] if len(armed) > 2 else None
    if seen is not None and not any((t := ref()) is not None and _version(t) == v for ref, v in seen):
        return False
    if not armed[0]:
        return not now[0]
    if same_tensors(armed[0], now[0]):
        return any(map(operator.eq, armed[1], now[1]))
    where = {id(t): v for t, v in zip(*now)}
    if any(where.get(id(t)) == v for t, v in zip(armed[0], armed[1])):
        return True
    # Views of one gradient buffer share one version counter: a write beside the held gradients (another part's
    # backward into the same buffer) bumps theirs too, so their versions cannot tell whether they were written.
    # A call measuring every held gradient again (``measured``: the next batch clipped, or the same one clipped
    # whole) replaces the flag; one measuring another part combines with it: replaced, a NaN skip armed on one
    # part of a flat buffer was dropped by the clip of the next part, and the NaN step taken.
    held = {id(t) for t in armed[0] if id(t) in where}
    if not held:
        return False
    roots = {id(_root(t)) for t in armed[0] if id(t) in held}
    if not any(id(_root(g)) in roots for g in now[0] if id(g) not in held):
        return False
    cells = getattr(armed, "cells", None)
    if cells is not None and all(c is not None and c[0][0] != c[1] for t, c in zip(armed[0], cells) if id(t) in held):
        # A backward accumulated into every held gradient since (their parameters' backward counts moved): the
        # next batch's, after a dropped one (DDP's bucket views, a model clipped in two calls: the dropped NaN
        # batch's skip combined with the next batch's first call, and its good step was skipped).
        return False
    again = {id(now[0][i]) for i in _measured_among(now[0], measured)} if measured is not None else set()
    return not held <= again


def same_tensors(held: list[Tensor], grads: list[Tensor]) -> bool:
    """Whether ``grads`` are the very gradient tensors ``held`` (none replaced, none added or gone)."""
    return len(held) == len(grads) and all(map(operator.is_, held, grads))


#: Why dist_clip's entry points and step hooks are never traced, shown in the error a ``fullgraph=True`` trace
#: raises on meeting one (without a reason torch's said "Hint: Remove the torch.compiler.disable call").
NOT_TRACED = (
    "dist_clip's calls and optimizer step hooks write to the optimizer (a handed-over clip coefficient, a skip "
    "flag) and to their own state, which a trace would drop, so they always run eagerly (a graph break): call "
    "them outside torch.compile(fullgraph=True) code, and compile opt.step without fullgraph=True"
)


def never_traced(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable`` with :data:`NOT_TRACED` as its reason."""
    return torch.compiler.disable(fn, reason=NOT_TRACED)


# Run as Python under torch.compile(opt.step): traced into the graph, found_inf set here was not seen by the
# fused kernel (a NaN step taken; torch does the same to a plain hook setting it), and a settled coefficient's
# flag was lost.
@never_traced
def _pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
    # What was handed over stays on the optimizer until the post-hook: a step() that raised after this hook (an
    # out-of-memory error, another pre-hook) did not happen, and its hand-over waits for the next step, read and
    # settled by dist_clip calls meanwhile and checked against the gradients then as any hand-over is (a retry on
    # the same gradients is clipped, a new backward's are not: they were divided by the old coefficient).
    complete_step_hooks(optimizer, optimizer.__dict__[_HOOKS], _pre_hook, _post_hook)
    clear_stale(optimizer)
    pending = optimizer.__dict__.get(_PENDING)
    armed = optimizer.__dict__.get(_SKIP)
    grads = gradients(optimizer) if pending is not None else []
    closure = step_closure(args, kwargs)
    if pending is not None and pending[2] is not None:
        verdict, kept = _verdict(pending[3], pending[4], grads, pending[5], optimizer)
        in_place = closure is not None or not supports_grad_scale(optimizer)
        if verdict in ("kept", "replaced") or (verdict == "same" and in_place):
            # Measured gradients untouched beside others (add_param_group, a gradient replaced or set to None):
            # grad_scale would divide the new ones too and miss the ones kept aside, so the measured ones are
            # scaled here and the step keeps only the flag. So too under step(closure): the closure runs inside
            # step(), after this hook, and writes new gradients, which grad_scale would have divided by the old
            # coefficient (x1/8000 of the plain step); and for an optimizer no longer fused (its param groups
            # loaded from a non-fused run's state_dict: torch's step refused the grad_scale it does not read).
            if verdict == "replaced":
                _warn_replaced()
            _scale.scale_(kept, pending[0], divide=True)
            _stash(optimizer, torch.ones_like(pending[0]), pending[1], None, grads, pending[6])  # as settle() leaves it
            pending = optimizer.__dict__[_PENDING]
        elif _dropped(verdict):
            if verdict == "written":
                warn_at_caller(  # the line calling step(), past torch's step wrappers and hooks
                    "dist_clip: the clip coefficient handed to this optimizer's step() was dropped: its gradients "
                    "were written after the clip (a further backward accumulating into them, or zeroed in place "
                    "and recomputed), so they are no longer the ones measured and this step takes them unclipped. "
                    "Clip after the last backward before step()"
                )
            del optimizer.__dict__[_PENDING]  # measured on gradients that are gone: not this step's
            # Its flag lasts where a gradient stepped now is not finite, as the ledger's does: a NaN travels into a
            # replacement out of place (p.grad + g) and stays under a further backward accumulating into it, while
            # the next batch's gradients (after zero_grad, either way) are finite (see carried_by_replacements;
            # dropped with the coefficient, a NaN hand-over, an auxiliary loss and the step took the NaN step)
            entry = _carried_at_step(pending, carry_only(optimizer, read_for_carry(optimizer, grads)))
            if entry is not None:
                armed = (entry[0] if armed is None
                         else torch.maximum(armed[0], _reduce.moved(entry[0], armed[0].device)), None)
            pending = None
    # A coefficient already applied by settle() leaves only its skip flag, which lasts until this step whatever
    # wrote the gradients since (a later clip of part of them: dropping it took a NaN step).
    skip = armed[0] if armed is not None else None
    if not supports_grad_scale(optimizer):
        _no_longer_fused(optimizer, pending[1] if pending is not None else None, skip)
        return None
    if closure is not None:
        # The closure runs inside this step: dist_clip calls from it act on this step (in_closure), so the
        # attributes are saved for the post-hook whatever is pending (a skip armed in the closure was dropped).
        args, kwargs = wrap_closure(optimizer, args, kwargs)
        if pending is None and skip is None:
            optimizer.__dict__[_SAVED] = _closure_stash(optimizer)
            return args, kwargs
    if pending is None and skip is None:
        _WAITING.discard(optimizer)
        return None
    scale, found = (pending[0], pending[1]) if pending is not None else (None, skip)
    if pending is not None and pending[2] is None:
        scale = None  # settled: the gradients hold the coefficient, the step keeps only the flag
    if pending is not None and skip is not None:
        found = torch.maximum(found, _reduce.moved(skip, found.device))
    saved = _attributes(optimizer)
    theirs_scale, theirs_found = saved
    if scale is not None and isinstance(theirs_scale, Tensor):
        scale = scale * _reduce.moved(theirs_scale, scale.device)
    if isinstance(theirs_found, Tensor):
        # Either flag skips: the larger, kept 0 or 1 (torch's CPU fused kernels skip on exactly 1, so a sum of
        # two raised flags, 2, would step with non-finite gradients). The scaler's own may be such a sum already:
        # ShardedGradScaler all-reduces its flags with SUM (2.0 on two ranks), and the larger of it and our 1
        # stepped NaN through a skip dist_clip had armed.
        found = torch.maximum(found, _reduce.moved(theirs_found, found.device).ne(0).to(found.dtype))
    optimizer.__dict__[_SAVED] = (saved, _prepare_sgd_first_step(optimizer), found, scale)
    if scale is not None:
        optimizer.grad_scale = scale  # type: ignore[attr-defined]
    optimizer.found_inf = found  # type: ignore[attr-defined]
    return (args, kwargs) if closure is not None else None


def pending_flag(optimizer: torch.optim.Optimizer) -> Tensor | None:
    """The skip flag (``found_inf``) a hand-over pending on ``optimizer`` gives its next ``step()``, or None where
    none would reach it: none pending, or one measured on gradients the step will not take (as :func:`_pre_hook`
    decides: replaced or written since, the coefficient dropped, and its flag unless a gradient stepped now is not
    finite). Read before that pre-hook runs."""
    pending = optimizer.__dict__.get(_PENDING)
    if pending is None:
        return None
    if pending[2] is not None:  # not settled: the step's own check decides
        grads = gradients(optimizer)
        verdict, _ = _verdict(pending[3], pending[4], grads, pending[5], optimizer)
        if _dropped(verdict):  # (kept where the gradients hold a NaN, as the pre-hook keeps it)
            entry = _carried_at_step(pending, carry_only(optimizer, read_for_carry(optimizer, grads)))
            return entry[0] if entry is not None else None
    return pending[1]


def _carried_at_step(pending: tuple[Any, ...], grads: list[Tensor]) -> tuple[Tensor, list[Tensor], None] | None:
    """A hand-over's flag at its step, the hand-over dropped (its gradients written or replaced since, with no
    dist_clip call between): kept where a gradient stepped now is not finite (:func:`carried_by_replacements`, this
    rank's read). Where the hand-over's total was combined over several ranks (``pending[6]``, see
    :func:`hand_over_`), the step has no collective to agree by and each rank's pieces are its own: the flag is kept
    as it is, on every rank alike (read by each rank alone, a NaN in rank 0's shard, the gradients replaced out of
    place or an auxiliary loss accumulated into them, then ``step()``: rank 0 skipped and rank 1 stepped). A dropped
    batch's next one stepped with no clip after a NaN hand-over is then skipped too, on every rank."""
    flag = pending[1]
    if pending[6] and _multi_rank() and not _unset_on_cpu(flag):
        return flag, grads, None
    return carried_by_replacements(flag, grads)


def _keep_flag(optimizer: torch.optim.Optimizer, found: Tensor, held: list[Tensor], grads: list[Tensor]) -> None:
    """A hand-over's coefficient dropped because its gradients were written since (:func:`_verdict`): its skip flag
    joins the skip flag's ledger (:func:`supersede`), held by the measured gradients still stepped, so that it
    lasts until they are all measured again or gone. A write after the clip is a dropped batch's ``zero_grad()``
    and the next backward, or an auxiliary loss accumulating into a NaN gradient, which stays NaN: dropped with
    the coefficient, a NaN hand-over's flag was lost there and the NaN step taken (a part of the model whose
    gradients were every one present handed over, an auxiliary loss, another part clipped again). Kept where a
    dist_clip call reads them or arms a skip after the write; the step itself, with no such call since, drops
    the coefficient and warns, and keeps the flag where a gradient it steps is not finite (the next batch of a
    dropped one, stepped unclipped, is finite: kept whatever they held, its good step was skipped)."""
    where = set(map(id, grads))
    members = [t for t in held if id(t) in where]
    if members:
        _join_ledger(optimizer, (found, members, None))
    if len(members) < len(held):
        # Some measured gradients are no longer stepped: replaced out of place, their replacements carrying the NaN
        # (see carried_by_replacements). Held by the written ones alone, the flag was dropped once a call measured
        # those again: under DDP, a NaN in l0 handed over whole, an auxiliary loss, l0's gradients replaced, [l1]
        # clipped by GradClipper(on_nonfinite="skip"): every rank stepped l0's NaN (2 and 3 ranks).
        ids = set(map(id, members))
        _keep_replaced(optimizer, found, [g for g in carry_only(optimizer, grads) if id(g) not in ids])


def _join_ledger(optimizer: torch.optim.Optimizer, entry: tuple[Tensor, list[Tensor], None]) -> None:
    """``entry`` (a flag held by its gradients) joins ``optimizer``'s skip flag and its ledger, or starts both."""
    if _multi_rank():
        _ARMED.add(optimizer)  # (see _outlasting)
    armed = optimizer.__dict__.get(_SKIP)
    if armed is None:
        optimizer.__dict__[_SKIP] = (entry[0], _Record.uncounted((entry[1], version_list(entry[1])), [entry]))
        return
    parts = getattr(armed[1], "parts", None)
    if parts is not None:
        armed[1].parts = [*parts, entry]
    optimizer.__dict__[_SKIP] = (torch.maximum(armed[0], entry[0].to(armed[0].device)), armed[1])


def _keep_replaced(optimizer: torch.optim.Optimizer, found: Tensor, rest: list[Tensor],
                   stepped: list[Tensor] | None = None) -> None:
    """A hand-over's skip flag whose measured gradients were every one replaced (:func:`_verdict`'s "stale"): it
    joins the flag's ledger, held by ``rest`` (the gradients stepped now that the call at hand does not measure)
    where one of them is not finite (:func:`carried_by_replacements`). ``stepped``: every gradient stepped now,
    which hold it instead where the call at hand arms no skip for this optimizer (``get_total_norm``, a clip
    without a fused ``optimizer=``, a call arming another optimizer's, ``clip_grads_with_norm_``): no flag of its
    own stands for the gradients it measures (held by the others alone, a NaN hand-over whose gradients were
    replaced out of place, then read whole or where the NaN lay, ``get_total_norm`` of h0 or of the model for a
    log, lost its flag on every rank and the NaN step was taken)."""
    agreement = _DEFERRED.get()
    arms = agreement is not None and id(optimizer) in agreement.ids
    held = stepped if stepped is not None and not arms else rest
    if agreement is not None:
        # (settled within a call: kept or dropped by the ranks' verdict, see Agreement; another optimizer's
        # hand-over than the one the call arms adds this rank's read of its gradients to the verdict)
        if not arms:
            agreement.fold(found, held)
        agreement.deferred.append((optimizer, found, held))
        return
    if _is_calm(optimizer, found):
        held = []  # (a device flag a combining call armed: held by no gradient, see _calm_entries)
    entry = carried_by_replacements(found, held)
    if entry is not None:
        _join_ledger(optimizer, entry)
        _still_calm(optimizer, [found], entry[0])  # (so too a settled hand-over's, see _still_calm)


def _dropped(verdict: str) -> bool:
    """Whether :func:`_pre_hook` drops a hand-over, its coefficient and flag, on this :func:`_verdict`: measured
    on gradients that are gone (written since, or none of them stepped)."""
    return verdict not in ("same", "kept", "replaced")


def _no_longer_fused(optimizer: torch.optim.Optimizer, *flags: Tensor | None) -> None:
    """The optimizer was fused at the hand-over and is not now (its param groups loaded from a non-fused run's
    ``state_dict``): its step reads no ``found_inf`` (torch's step asserted on the one set here, and the step
    was lost). The coefficient is in the gradients (:func:`_pre_hook`); a skip flag is read on the host (a sync,
    on this path only) and, where set, refused: the step cannot be made a no-op from here."""
    for key in (_PENDING, _SKIP, _SAVED):
        optimizer.__dict__.pop(key, None)
    _WAITING.discard(optimizer)
    if any(f is not None and bool(f.any()) for f in flags):
        raise RuntimeError(
            f"dist_clip: a skip was armed for this step of {type(optimizer).__name__} while it ran fused, and it "
            "runs unfused now (its param groups were replaced or loaded from a non-fused state_dict since): the "
            "step is refused rather than taken with non-finite gradients. Skip it (drop the batch), or arm the "
            "skip again (GradClipper(on_nonfinite='skip'), skip_next_step_) after the change"
        )


@never_traced
def _post_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    complete_step_hooks(optimizer, optimizer.__dict__[_HOOKS], _pre_hook, _post_hook)
    _WAITING.discard(optimizer)
    pending = optimizer.__dict__.pop(_PENDING, None)
    optimizer.__dict__.pop(_SKIP, None)
    _forget_beside(optimizer)
    optimizer.__dict__.pop(_CALM, None)
    stashed = optimizer.__dict__.pop(_SAVED, None)
    if stashed is None:
        return
    saved, fresh, found, scale = stashed
    # The first step of a fused SGD with dampening: one host read of the flag (a sync on CUDA, that step only),
    # so that a skipped step leaves no buffer and the next one takes the first-step rule, as if never called.
    if fresh and found is not None and bool(found != 0):
        for p in fresh:
            state = optimizer.state.get(p)
            if state is not None:
                state.pop("momentum_buffer", None)
                if not state:  # as if never stepped: no entry
                    del optimizer.state[p]
    if scale is not None and pending is not None and pending[2] is not None and found.device.type == "cpu":
        # A skipped step writes nothing back: the gradients it was handed stay unclipped in .grad, where the
        # loop without optimizer= left them clipped (a read after it gave 28.27 for 1.0, and a micro-batch
        # accumulated onto them stepped 1.18 off). Scaled here when the flag is read for free (the CPU).
        if bool(found != 0):
            stepped = set(map(id, gradients(optimizer)))  # ("fewer": a gradient dropped since is someone else's)
            _scale.scale_([g for g in pending[3] if id(g) in stepped], pending[0], divide=True)
    _restore(optimizer, saved)


def clear_stale(optimizer: torch.optim.Optimizer) -> None:
    """After a step that raised past the pre-hook (at the next dist_clip call on the optimizer, or the next step):
    put back the ``grad_scale`` and ``found_inf`` it set, where they still hold what it set (a ``GradScaler``
    setting its own for the next step keeps them: restored over, the old flag skipped that step; copying the
    old ``grad_scale`` after ``unscale_``, it meant none), so that neither reaches a later step. Not from inside
    a running closure (:func:`in_closure`), where they are live."""
    stale = optimizer.__dict__.pop(_SAVED, None)
    if stale is None:
        return
    saved, _, found, scale = stale
    for name, value, ours in zip(("grad_scale", "found_inf"), saved, (scale, found)):
        if ours is None or optimizer.__dict__.get(name) is not ours:
            continue  # not set by that step, or replaced since
        _restore_one(optimizer, name, value)


def _restore(optimizer: torch.optim.Optimizer, saved: tuple[Any, Any]) -> None:
    """Put back the ``grad_scale`` and ``found_inf`` the optimizer held before the pre-hook (or none)."""
    for name, value in zip(("grad_scale", "found_inf"), saved):
        _restore_one(optimizer, name, value)


def _restore_one(optimizer: torch.optim.Optimizer, name: str, value: Any) -> None:
    if value is _MISSING:
        optimizer.__dict__.pop(name, None)
    else:
        setattr(optimizer, name, value)


def hand_over_(
    optimizer: torch.optim.Optimizer, coef: Tensor, total: Tensor, grads: list[Tensor] | None = None,
    shared: bool = False,
) -> None:
    """Make the next ``optimizer.step()`` multiply every gradient by ``coef``, or skip if ``total`` is not finite.

    ``coef`` and ``total`` are 0-dim device tensors; nothing here reads them on the host. The caller has
    checked :func:`supports_grad_scale`. ``grads``: the optimizer's :func:`gradients`, when the caller has them.
    ``shared``: ``total`` was combined over more than one rank (each rank's pieces its own), so that the step,
    which has no collective, keeps the flag as it is where it would read it from this rank's pieces
    (:func:`_carried_at_step`).
    """
    _install_hooks(optimizer)
    clear_stale(optimizer)
    scale = torch.reciprocal(coef.to(torch.float32))  # the kernels divide: 1/1 == 1 keeps an unclipped step exact
    found = torch.logical_not(torch.isfinite(total)).to(torch.float32)
    grads = grads if grads is not None else gradients(optimizer)
    if not grads and _COMBINED in optimizer.__dict__ and not _COMBINING.get() and _multi_rank():
        # Nothing held, no collective, among several ranks: a hand-over of nothing, which cannot tell what the other
        # ranks hold, hands nothing over and leaves every flag as it is, as the verdict forced there keeps them (see
        # Agreement._may_differ). Replacing them, rank 0 dropped the flag of a NaN in its own gradient beside DDP's,
        # clipped over the world and dropped to None, while rank 1's, standing for it, was kept: rank 1 skipped alone
        return
    armed = optimizer.__dict__.get(_SKIP)
    parts = getattr(armed[1], "parts", None) if armed is not None else None
    if parts is not None:
        # The hand-over measures every gradient the optimizer steps, as they are now: of the flag's ledger (see
        # supersede) only flags armed without measured gradients (skip_next_step_) may outlast it, while their
        # records are untouched.
        now = (grads, version_list(grads))
        left = [(f, None, seen) for f, members, seen in parts
                if members is None and seen is not None and _lasts(seen, now, grads)]
        # (and an entry kept by the ranks' verdict with no gradient left: decided by this call's verdict again, as
        # in supersede; dropped here, a rank holding none of the NaN part stepped where the others skipped)
        gone = [f for f, members, seen in parts if (members is None and not (seen is not None and _lasts(
            seen, now, grads)) and _decided_by_verdict(seen)) or (members is not None and not members)]
        # (and an entry held by gradients the optimizer does not step: the other ranks' partitions of a ZeRO or OSS
        # wrapper over DDP, see grad_state, which the hand-over does not measure: kept while one is held, and once
        # every one is replaced decided as in supersede. Dropped here, the rank whose partition held none of a NaN
        # part stepped its hand-over where the others skipped: [enc, h1], NaN in enc, [h0], out of place, [h0])
        wider = read_for_carry(optimizer, grads)
        if len(wider) > len(grads):
            stepped, held = set(map(id, grads)), set(map(id, wider))
            for f, members, _seen in parts:
                other = [t for t in members or () if id(t) not in stepped]
                if not other:
                    continue
                rest = [t for t in other if id(t) in held]
                if rest:
                    left.append((f, rest, None))
                else:
                    gone.append(f)
        if _COMBINING.get():
            # (and the entries whose gradients it measures again or that are gone, where its verdict was combined
            # over several ranks: see _measured_again and supersede. Dropped here, a part on rank 0 alone, NaN
            # there, [a, b] armed by a skip, then [b] handed over, or every gradient replaced out of place first:
            # rank 1 stepped, rank 0 skipped)
            stepped, wide = set(map(id, grads)), set(map(id, wider))
            gone += [f for f, members, _seen in parts
                     if members and all(id(t) in stepped or id(t) not in wide for t in members)]
        entry = carried_by_replacements(functools.reduce(torch.maximum, gone), []) if gone else None
        if entry is not None:
            left.append(entry)  # type: ignore[arg-type]
            # (a _CALM one where one of them is, as supersede carries them: carried into a new tensor of no _CALM
            # standing, under DDP beside rank 0's own parameter, [l0] armed and [own] handed over before any
            # backward, then [own] armed (rank 1 measuring nothing), a NaN batch's [l0] armed, dropped to None and
            # [l0] armed again, rank 1 carried it at [own] into an entry held by DDP's gradients (see rearm), and
            # skipped alone)
            _still_calm(optimizer, gone, entry[0])
        if left:
            armed[1].parts = left
            optimizer.__dict__[_SKIP] = (functools.reduce(torch.maximum, [f for f, _, _ in left]), armed[1])
        else:
            del optimizer.__dict__[_SKIP]
    elif armed is not None and not untouched(armed[1], (grads, version_list(grads)), grads):
        # A skip armed on gradients replaced or rewritten since (a dropped batch's NaN, clipped in place): not this
        # step's, as a hand-over's own flag is replaced by the next hand-over (it skipped the next good step).
        del optimizer.__dict__[_SKIP]
    _stash(optimizer, scale, found, coef, grads, shared)
    _forget_beside(optimizer)  # (it measures every gradient stepped)
    if shared and not grads and not _on_host(found) and _multi_rank():
        # A device flag of a total combined over several ranks that measured no gradient here: the same on every
        # rank, standing for the others' pieces, a _CALM one (see note_beside), held by no gradient here, its value
        # joining the verdicts instead. Carried by the gradients the call settling it does not measure, under DDP
        # beside rank 0's own parameter, [own] handed over over the world before any backward (0 on every rank),
        # then a NaN batch's DDP's whole handed over (no collective) settled it into an entry held by rank 0's own
        # gradient (on rank 1 by none), which forced rank 0 alone to keep the next batch's dropped NaN hand-over at
        # DDP's whole: rank 0 skipped, rank 1 stepped. (Not one that measured gradients here: held by none once they
        # are gone, a NaN hand-over of [a, b] over the world, a of rank 0's own, every gradient replaced out of place,
        # [a] read and [b] armed, lost its flag on every rank and the NaN step was taken. On the CPU one not set
        # holds nothing: read for free.)
        optimizer.__dict__.setdefault(_CALM, []).append(found)
    _WAITING.add(optimizer)


def steps_beside(grads: Sequence[Tensor], tensors: Sequence[Tensor]) -> bool:
    """Whether, among several ranks, an optimizer whose gradients are ``grads`` steps every one of a call's pieces
    ``tensors`` (the very tensors) and others beside them: see :func:`hand_over_applied_`."""
    ids = set(map(id, tensors))
    return bool(ids) and len(ids) < len(grads) and _multi_rank() and ids <= set(map(id, grads))


def defers_beside(optimizer: torch.optim.Optimizer, measured: Sequence[Tensor]) -> bool:
    """Whether :func:`hand_over_applied_` may leave the coefficient of a call beside other gradients
    (:func:`steps_beside`) to the step: no hand-over waits on gradients the call does not measure (its stash is
    the optimizer's one; arming never adds one, so none appears before :func:`hand_over_applied_` reads it), or
    the one waiting holds its coefficient in its gradients already (applied in place, or settled), so that only
    its flag is left, which then joins the ledger (:func:`_in_gradients`)."""
    pending = optimizer.__dict__.get(_PENDING)
    ids = set(map(id, measured))
    return pending is None or _in_gradients(pending) or all(id(t) in ids for t in pending[3])


def _in_gradients(pending: tuple[Any, ...]) -> bool:
    """Whether a hand-over's coefficient is in its gradients already: settled (None), or applied in place by
    :func:`hand_over_applied_` (:data:`_APPLIED`). Only its flag waits for the step, held by those gradients: it
    joins the ledger (:func:`_keep_flag`) where a call beside them leaves its own coefficient to the step (the stash
    is the optimizer's one). Kept there instead, under DDP with a parameter of rank 0's own in its fused
    optimizer, rank 0's own part handed over over the world (rank 1 passing nothing), then DDP's whole, rank 0
    divided DDP's gradients in the call while rank 1 handed the coefficient over: with every gradient then
    replaced out of place (``p.grad = p.grad + 0``) rank 0's replacements carried the clip into its step alone and
    DDP's replicas parted."""
    return pending[2] is None or pending[2] is _APPLIED


def hand_over_applied_(optimizer: torch.optim.Optimizer, total: Tensor, started: tuple[list[Tensor], list[int]],
                       measured: Sequence[Tensor], shared: bool = False, stepped: list[Tensor] | None = None,
                       deferred: tuple[Tensor, Tensor] | None = None) -> None:
    """A call's skip flag (``total`` not finite) for an optimizer that steps the call's pieces ``measured`` and
    other gradients beside them (:func:`steps_beside`): kept as a hand-over's is (held by the measured gradients),
    not as an armed skip, which lasts until the step whatever wrote them since. Under DDP the rank whose optimizer
    also steps a parameter of its own scaled here and armed the skip, while the others handed over: a NaN batch
    dropped and recomputed, then ``clip_grads_with_norm_``, ``get_total_norm`` or straight to ``step()``, the
    others dropped the hand-over by their read of the new gradients and stepped, that rank kept its skip, and the
    replicas parted (rank 0 skipped, rank 1 stepped). The ledger's earlier flags are superseded as by an arming of
    a finite total. ``deferred``: the coefficient's float32 reciprocal and the coefficient, not applied yet
    (:func:`defers_beside`): the step divides the measured gradients by it in place (:func:`_verdict`'s "kept",
    the others stepped beside them), a call reading them first settles it, and gradients written or every one
    replaced since drop it, as on the ranks handing over (applied in the call, gradients every one replaced out of
    place, ``p.grad = p.grad + 0``, carried the clip into the step on this rank alone and DDP's replicas parted:
    6.9e-7 after one AdamW step). None: applied in place by the caller (a coefficient of 1 left).
    ``stepped``: the optimizer's :func:`gradients`, where the caller has them."""
    arm_skip_(optimizer, torch.zeros((), dtype=torch.bool, device=total.device), started, measured=measured)
    pending = optimizer.__dict__.get(_PENDING)
    ids = set(map(id, measured))
    stepped = stepped if stepped is not None else gradients(optimizer)
    if pending is not None and not all(id(t) in ids for t in pending[3]) and not _measured_anew(pending, stepped, ids):
        if deferred is None:
            # (a hand-over waiting on gradients this call does not measure: its flag joins this one's as armed)
            arm_skip_(optimizer, torch.logical_not(torch.isfinite(total)), started, measured=measured)
            return
        # (its coefficient in its gradients already, held by them still, see arm_skip_: its flag joins the ledger,
        # see _in_gradients)
        assert _in_gradients(pending), "defers_beside saw no such hand-over"
        del optimizer.__dict__[_PENDING]
        _keep_flag(optimizer, pending[1], pending[3], stepped)
    grads = [g for g in stepped if id(g) in ids]
    found = torch.logical_not(torch.isfinite(total)).to(torch.float32)
    # (the parameters stepped beside the measured ones, whose gradients a later call reads without the hand-over:
    # see _measured_side)
    beside = [p for group in optimizer.param_groups for p in group["params"]
              if p.grad is not None and id(getattr(p.grad, "_local_tensor", p.grad)) not in ids]
    if deferred is not None:
        _stash(optimizer, deferred[0], found, deferred[1], grads, shared, beside)
    else:  # (the coefficient is in the gradients: 1 on the CPU, which scale_ reads for free and skips)
        _stash(optimizer, torch.ones_like(found), found, _APPLIED, grads, shared, beside)
    note_beside(optimizer, measured, stepped, found)
    _WAITING.add(optimizer)


def _measured_anew(pending: tuple[Any, ...], stepped: list[Tensor], ids: set[int]) -> bool:
    """Whether a call measuring the gradients ``ids`` measures every gradient a hand-over applied beside parameters
    it did not measure (``pending``, see :func:`hand_over_applied_`) may be held by now, some of its own replaced
    since: every one stepped but those parameters' (its NaN travels only into the replacements). The call's own
    hand-over then replaces it, as on the ranks handing over (its flag joining the ledger after the call's arming,
    under DDP beside rank 0's own parameter, a NaN hand-over of DDP's whole settled by a read, l1's gradients
    replaced, the batch dropped in place and DDP's whole handed over again: rank 0 skipped, rank 1 stepped)."""
    return bool(pending[7]) and all(id(g) in ids for g in _without(stepped, pending[7]))


def note_beside(optimizer: torch.optim.Optimizer, measured: Sequence[Tensor] | None,
                grads: list[Tensor] | None = None, new: Tensor | None = None) -> None:
    """After a call armed ``optimizer``'s skip (its flag, a hand-over's, the skip guard's) on its pieces
    ``measured``, among several ranks: record the parameters it steps whose gradients no flag waiting for its
    step was armed on (:data:`_BESIDE`), which :func:`carry_only` leaves out of the read that keeps a flag whose
    gradients were replaced (:func:`carried_by_replacements`). A NaN can travel only into the replacement of a
    gradient the flag was measured on (``p.grad + g``), never into another parameter's; and among several ranks
    that read must be the same on every rank where the call has no collective to agree by. Under DDP with a
    parameter of rank 0's own beside DDP's in its optimizer (never clipped), a NaN batch clipped (handed over, or
    armed by ``GradClipper(on_nonfinite="skip")``), dropped and recomputed with a NaN in that parameter's gradient
    alone, then ``clip_grads_with_norm_``, ``get_total_norm``, a clip again or straight to ``step()``: rank 0 read
    its own NaN, kept the dropped batch's flag and skipped, rank 1 stepped, and DDP's replicas parted. The set is
    left out (nothing excluded: every gradient stepped is read, as before) where a flag was armed without saying
    what it measured, holds a gradient no longer held, or this is a ZeRO or OSS wrapper's inner optimizer; each
    arming computes it anew, and the step clears it. :data:`_UNSET`, read by :meth:`Agreement._may_differ` alone,
    passes over the flags read on the CPU (for free) as not set, as :func:`_elsewhere_entry` reads rank 1's entry
    for the same call: counted, rank 0's own part handed over over the world (finite) beside DDP's whole armed in
    the same step, the batch dropped to ``None``, recomputed and DDP's whole clipped again, forced rank 0 alone to
    keep: rank 0 skipped, rank 1 stepped. (Not for the reads: there the ranks' ledgers differ where rank 0 scales in
    the call and the others hand over, and rank 1 alone left DDP's first layer out: ddp seed 1378 parted; but see
    below for an arming that combined.)
    Where the arming combined over several ranks (its flag the same on every rank), :data:`_UNSET` takes the
    gradients it measured too (its flag, on the CPU not set, holds nothing), and a call measuring nothing on this
    rank (a part held on another rank alone) computes it as well: counted, a NaN hand-over of DDP's whole (or
    [l0]), rank 0's own part clipped over the world (finite: measured there, on rank 1 nothing), the batch dropped
    to ``None``, recomputed and DDP's whole (or [l0]) handed over again forced one rank alone to keep (rank 0 by its
    own gradient; rank 1, holding no ``_UNSET``, by DDP's second layer). Not for an arming combining over no other
    rank: rank 1's, measuring every gradient it steps, computes none, while rank 0's, beside its own parameter,
    would have taken DDP's (ddp seeds 1649, 1659 parted).
    Where the arming combined, :data:`_BESIDE` is that set too (the reads pass over what no flag that may be set
    holds): the own part's arming, finite, counted rank 0's own gradient as held by its flag, so that the reads of
    the dropped NaN batch's flag (at the next call on DDP's gradients, ``group=None``, or at the step) read it: a NaN
    in it alone in the next batch kept that flag on rank 0 alone (rank 0 skipped, rank 1 stepped; 38 of 608 flows
    of a NaN batch, its call, the own part's, a drop and the next batch). The flags an arming combining over no
    other rank leaves on the CPU not set differ among ranks there (above), so its reads still take them as held.
    A flag armed by a call combining over several ranks that reads on the CPU as not set (:data:`_CALM`, noted here
    from ``new``; a hand-over's applied in place alike) is that on every rank and holds no gradient in
    :data:`_BESIDE` either: counted, rank 0's own part's finite entry held its own gradient while rank 1's entry
    for it (measured nothing there) left nothing out, so a NaN [l0] flag whose gradients were replaced out of place
    was kept by [l1] and rank 0's own gradient there, by [l1] on rank 1; the batch dropped to ``None``, recomputed
    and DDP's whole clipped, rank 1 dropped it and rank 0 kept it by its own gradient: rank 0 skipped, rank 1
    stepped (ddp seed 1414). On a device, where no flag is read on the host, every flag such a call arms is noted,
    and holds no gradient in the sets an arming combining over no other rank computes, nor in :data:`_UNSET` (as one
    not set on the CPU); its value joins the verdicts instead, by a multiply (:func:`_calm_entries`). It holds its
    gradients in :data:`_BESIDE` where the arming combines, whose reads are combined over the ranks: passed over there
    too, a NaN hand-over of part [a] over the world (``a`` of each rank's own), its gradients replaced out of place
    and a read of [a] (``get_total_norm``), lost its flag on every rank, and the NaN step was taken.
    ``grads``: the optimizer's :func:`gradients`, where the caller has them; ``new``: the flag the call armed."""
    _forget_beside(optimizer)
    if measured is None or optimizer.__dict__.get(_OUTER) is not None or not _multi_rank():
        return
    if new is not None and _COMBINING.get() and (not _on_host(new) or not bool(new)):
        optimizer.__dict__.setdefault(_CALM, []).append(new)
    elif new is not None and not measured and not _COMBINING.get() and not _on_host(new):
        # (a call that measured nothing here and combined over no other rank armed 0, its total's: on a device a
        # _CALM flag too, as on the CPU one read as not set, holding nothing. Held by DDP's gradients, on rank 1
        # alone, [l0] armed before any backward (measuring nothing on every rank), then rank 0's own part armed twice
        # over the world (rank 1 measuring nothing: its carry, see rearm), a NaN batch's [l0] armed, dropped to None
        # and [l0] armed again: rank 1 took that verdict as possibly differing, kept the NaN flag and skipped alone)
        optimizer.__dict__.setdefault(_CALM, []).append(new)
    grads = grads if grads is not None else gradients(optimizer)
    # (by identity, not by counting: a call may measure pieces a second optimizer steps, 6 pieces beside rank 0's 5
    # gradients, whose own parameter then went unrecorded: rank 0 skipped, rank 1 stepped)
    pieces = set(map(id, measured))
    if len(grads) <= len(pieces) and all(map(pieces.__contains__, map(id, grads))):
        return  # (the usual case: the call measured every gradient the optimizer steps)
    rest = {id(g) for g in _unmeasured(grads, measured)}
    if not rest:
        return
    held: set[int] | None = set()
    entries = _ledger_entries(optimizer)
    pending = optimizer.__dict__.get(_PENDING)
    where = set(map(id, grads))
    if pending is not None:
        members = pending[3]
        if pending[7] and any(id(t) not in where for t in members):
            # (a hand-over applied beside parameters it did not measure, settled or not, some of its gradients
            # replaced since: its NaN travels into their replacements, never into those parameters' gradients. Taken
            # as held by every gradient, under DDP beside rank 0's own parameter, a NaN hand-over of DDP's whole,
            # l1's gradients alone replaced, rank 0's own part clipped over the world, the batch dropped and the
            # next one handed over whole: rank 0 was forced alone to keep by its own gradient and skipped)
            members = _without(grads, pending[7])
        entries.append((pending[1], members, None))
    held_set: set[int] | None = set()  # (by the flags that may be set: see _UNSET)
    reads: set[int] | None = set()  # (the same, for the reads where the arming combined: see _calm_entries)
    alone: set[int] | None = set()  # (and those, passing over the _CALM flags: see _BESIDE_ALONE)
    calm = optimizer.__dict__.get(_CALM, ())
    combining = _COMBINING.get()
    for flag, members, _seen in entries:
        unset = isinstance(flag, Tensor) and _unset_on_cpu(flag)
        quiet = any(flag is c for c in calm)
        if quiet and (unset or not combining):
            # (armed by a call combining over several ranks: not set on any rank, it holds nothing; on a device, in
            # the sets of calls combining over no other rank, its value joining their verdicts: _calm_entries)
            continue
        if members is None or any(id(t) not in where for t in members):
            # (a flag armed on no gradient said, or on one replaced since: every gradient may hold it)
            held = None
            if not unset:
                reads = None
                if not quiet:
                    held_set = None
        if held is not None:
            held.update(map(id, members))
        if held_set is not None and not unset and not quiet:
            held_set.update(map(id, members))
        if reads is not None and not unset:
            reads.update(map(id, members))
        if quiet or alone is None or unset:
            continue
        if members is None or any(id(t) not in where for t in members):
            alone = None
        else:
            alone.update(map(id, members))
    among = rest
    if combining:
        among, held = where, reads  # (the reads too: see the docstring)
    keys: list[tuple[str, set[int] | None]] = [(_BESIDE, held), (_UNSET, held_set)]
    if combining and alone != reads:
        keys.append((_BESIDE_ALONE, alone))
    for key, ids in keys:
        if ids is None:
            continue
        beside = [p for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None and id(getattr(p.grad, "_local_tensor", p.grad)) in among - ids]
        if beside:
            optimizer.__dict__[key] = beside


def _measured_side(pending: tuple[Any, ...] | None, grads: list[Tensor]) -> list[Tensor]:
    """``grads`` (gradients the optimizer steps now) without those of the parameters a hand-over applied in place
    (``pending``, see :func:`hand_over_applied_`) found stepped beside the gradients it measured: a call reading
    only those reads nothing the hand-over measured, as on the ranks whose optimizer steps none of them, so it
    neither settles the hand-over nor drops it. Under DDP with a parameter of rank 0's own in its fused optimizer,
    a NaN hand-over of DDP's whole (or of [l0]), then a call on rank 0's own part over the world (rank 1 passing
    nothing) settled it on rank 0 alone, whose flag then lasted to the step while rank 1's lapsed with the batch:
    the batch dropped and the next one stepped, rank 0 skipped and rank 1 stepped; and where the hand-over's
    coefficient was left to the step (``deferred``), DDP's gradients every one replaced out of place carried the
    clip into rank 0's step alone while the others' stepped unclipped (the replicas parted)."""
    beside = pending[7] if pending is not None and pending[2] is not None else None
    return _without(grads, beside) if beside else grads


def _forget_beside(optimizer: torch.optim.Optimizer) -> None:
    """Drop what :func:`note_beside` recorded (both sets): at each arming, a hand-over and the step."""
    optimizer.__dict__.pop(_BESIDE, None)
    optimizer.__dict__.pop(_UNSET, None)
    optimizer.__dict__.pop(_BESIDE_ALONE, None)


def _beside_key() -> str:
    """:data:`_BESIDE`, or :data:`_BESIDE_ALONE` outside a call combining over several ranks (a call combining over
    no other rank, the step): there a :data:`_CALM` flag holds no gradient (its value joins the verdict:
    :func:`_calm_entries`), so the flags its carries keep are not held by the gradients only it held. Counted, off
    the host (a GPU), rank 0's own part's finite entry held its own gradient, so a NaN [l0] flag whose gradients
    were replaced out of place was carried by rank 0's own gradient at [l0] again (by l1 on rank 1, which held no
    such set): DDP's whole clipped after the next batch, rank 0 alone was forced to keep by its own gradient
    (skipped), rank 1 stepped. Whether the call combines is told at its entry (:data:`_CALL`, from its group), not
    by the all-reduce: its settling and its own read (:class:`Agreement`) run before it, and read :data:`_BESIDE`
    where the arming read :data:`_BESIDE_ALONE` (the same flows through settle(), arm_skip_(), _drop_unsettled(),
    Agreement.__init__ and _keep_flag parted the ranks alike)."""
    call = _CALL.get()
    return _BESIDE if call is not None and call.combines else _BESIDE_ALONE


def carry_only(optimizer: Any, grads: list[Tensor], key: str | None = None) -> list[Tensor]:
    """``grads`` (gradients ``optimizer`` steps now) without those of the parameters no waiting flag of its was
    armed on (:func:`note_beside`): the ones a replaced flag's NaN may have travelled into, by the set that matches
    the call at hand (:func:`_beside_key`). ``key``: :data:`_UNSET` for those no waiting flag that may be set was
    armed on."""
    key = key if key is not None else _beside_key()
    beside = optimizer.__dict__.get(key) if optimizer is not None else None
    if key is _BESIDE_ALONE and optimizer is not None and key not in optimizer.__dict__:
        beside = optimizer.__dict__.get(_BESIDE)  # (no _CALM flag set it apart: see note_beside)
    return _without(grads, beside) if beside else grads


def _without(grads: list[Tensor], params: Sequence[Any]) -> list[Tensor]:
    """``grads`` without the gradients of ``params`` (a DTensor's by its local tensor)."""
    out = {id(getattr(p.grad, "_local_tensor", p.grad)) for p in params if p.grad is not None}
    return [g for g in grads if id(g) not in out]


def _stash(
    optimizer: torch.optim.Optimizer, scale: Tensor, found: Tensor, coef: Tensor | None, grads: list[Tensor],
    shared: bool = False, beside: list[Tensor] | None = None,
) -> None:
    """What the next step applies (``scale``, ``found``), the coefficient settle() would apply instead (None once
    applied), the gradients it was measured on with their versions (see :func:`_verdict`), whether the total
    was combined over several ranks (see :func:`hand_over_`), and the parameters stepped beside the measured ones
    of a hand-over applied in place (see :func:`_measured_side`; kept once settled, see :func:`note_beside`)."""
    raw = version_list(grads)
    versions: list[Any] = list(raw)
    if coef is not None and any(map(Tensor._is_view, grads)):
        params = _params_by_grad(optimizer)
        for i, g in enumerate(grads):
            p = params.get(id(g))
            # (not FSDP1's original parameters: autograd accumulates into their flat parameter, so a count of
            # theirs never moved, and a new batch's gradients passed for the measured ones moved: 4000x too small)
            if (g._is_view() and p is not None and _autograd_leaf_param(p) and p.requires_grad
                    and not getattr(p, "_fsdp_flattened", False)):
                cell = _write_cell(p)
                versions[i] = (cell, cell[0])
    optimizer.__dict__[_PENDING] = (scale, found, coef, grads, versions, raw, shared, beside)
