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

The skip flags themselves wait for the step in each optimizer's ledger (below, "the agreed ledger": a hand-over's,
an ``on_nonfinite="skip"`` arming's, ``skip_next_step_``'s), which the step pre-hook reads as ``found_inf`` (a
skip guard, for an optimizer that is not fused). Among several ranks, the flags a rank cannot decide alone are
decided by an :class:`Agreement`: each rank's read of them is one more value in a call's own all-reduce.
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
    "arm_skip_", "gradients", "hand_over_", "ledger_arm", "ledger_flag", "overlapping",
    "same_tensors", "settle", "steps_what_was_measured", "supports_grad_scale",
]

_PENDING = "_dist_clip_pending"
_HOOKS = "_dist_clip_hooks"
_SAVED = "_dist_clip_saved"
_OUTER = "_dist_clip_outer"  # on a ZeRO or OSS wrapper's inner optimizer: a weak reference to the wrapper
# id(parameter) -> (backward count, its hook's handle, the tensor's _cdata) (see _write_cell). By id: a weak
# reference on a parameter made module.to() / load_state_dict() refuse to swap it
# (torch.__future__.set_swap_module_params_on_conversion).
_WRITES: dict[int, tuple[_Count, Any, int]] = {}
_WRITES_PRUNE = [256]  # prune dead parameters' entries when the table reaches this size
_MISSING = object()
#: the coefficient a hand-over applied in place leaves to its step (:func:`hand_over_applied_`): 1, in the
#: gradients already (told apart by identity: see :func:`_in_gradients`)
_APPLIED = torch.ones((), dtype=torch.float32)


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
    a NaN in rank 0's shard of part B clipped, part A handed over, rank 1 stepped and rank 0 skipped); so does an
    empty measured piece the optimizer does not step (the whole model handed to an optimizer of part A alone: rank
    1, whose shards of part B are empty, handed over while rank 0 scaled in the call, and every gradient then
    replaced out of place stepped rank 1's rows of A unclipped beside rank 0's clipped ones)."""
    # The usual case (the same tensors, in the same order or not), without a walk over the bytes.
    ids = set(map(id, grads))
    if len(ids) != len(grads):
        return False  # one gradient tensor stepped for two parameters: the kernel would divide it twice
    if same_tensors(grads, tensors):
        return True
    if set(map(id, grads)) == set(map(id, tensors)):
        return True
    theirs, ours = _covered(grads), _covered(tensors)
    if theirs is None or theirs != ours:
        return False
    empty = [i for i, g in enumerate(grads) if not getattr(g, "_local_tensor", g).numel()]
    if empty and _multi_rank() and set(empty) - set(_measured_among(grads, tensors)):
        return False
    # The converse: an empty measured piece the optimizer does not step (this rank's empty shard of a part the
    # optimizer leaves to another) is a gradient nobody would scale, as on the ranks holding elements of it.
    return not (_multi_rank() and any(not getattr(t, "_local_tensor", t).numel() and id(t) not in ids
                                      and id(_whole_of(t)) not in ids for t in tensors))


def gradients(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The gradients ``optimizer.step()`` reads (a DTensor's: its local shard)."""
    grads = [g for group in optimizer.param_groups for g in map(_GRAD, group["params"]) if g is not None]
    if set(map(type, grads)) <= _PLAIN_GRADS:  # the usual case, without a getattr per gradient
        return grads
    return [getattr(g, "_local_tensor", g) for g in grads]


def set_outer(inner: torch.optim.Optimizer, outer: torch.optim.Optimizer) -> None:
    """Record that ``inner`` steps this rank's partition of ``outer`` (a torch ``ZeroRedundancyOptimizer`` or a
    fairscale ``OSS``), whose param groups hold every rank's parameters (see :func:`_ledger_params`)."""
    ref = inner.__dict__.get(_OUTER)
    if ref is None or ref() is not outer:
        inner.__dict__[_OUTER] = weakref.ref(outer)


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
        scale, found, coef, held, versions, raw, _ = pending
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
            # Its skip flag is the ledger's (see ledger_arm).
            _WAITING.discard(optimizer)
            continue
        if verdict == "replaced" and coef is not _APPLIED:  # (applied in the call: see _pre_hook)
            _warn_replaced()
        _scale.scale_(kept, scale, divide=True)  # as the kernels apply it (see hand_over_)
        # Its flag stays with the stepped gradients it was measured on, not every one stepped: under DDP with a
        # parameter of rank 0's own beside DDP's, a NaN hand-over of DDP's whole settled by a call on a DDP part,
        # the batch dropped in place and DDP's whole handed over again (no collective), rank 0 read the flag held
        # by its own zeroed gradient, unmeasured there, kept it and skipped while rank 1 dropped it and stepped.
        stepped = set(map(id, grads))
        _stash(optimizer, torch.ones_like(scale), found, None, [g for g in kept if id(g) in stepped] or grads)
        saved = optimizer.__dict__.get(_SAVED)
        if running and saved is not None and saved[3] is not None and optimizer.__dict__.get("grad_scale") is saved[3]:
            # The step under way was handed the coefficient as grad_scale by its pre-hook: it is in the gradients
            # now, so the kernel divides by what was there before (a GradScaler's scale, or nothing) only.
            _restore_one(optimizer, "grad_scale", saved[0][0])
            optimizer.__dict__[_SAVED] = (*saved[:3], None)


def _verdict(held: list[Tensor], versions: list[Any], grads: list[Tensor], raw: list[int],
             optimizer: torch.optim.Optimizer) -> tuple[str, list[Tensor]]:
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
    if len(still) < len(held) and len(still) < len(grads):
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
    combine: bool = True,
    measured: Sequence[Tensor] | None = None,
) -> None:
    """Make the next ``step()`` of a fused optimizer skip where the 0-dim ``flag`` is true: ``found_inf``, set in
    the step pre-hook (with what a ``GradScaler`` set just before ``step()``: either skips), put back as it was
    after the step. Set at arming time instead, it was overwritten by ``GradScaler.step`` (the skip was lost) and
    missed the first-step preparation of fused SGD's momentum. The flag joins the optimizer's ledger, held by the
    parameters whose gradients the call measured (``measured``: its pieces), until the step (see
    :func:`ledger_arm`). ``combine=False`` (an explicit ``skip_next_step_``) replaces every flag."""
    running = in_step(optimizer)  # (before installing the hooks: a first call from a user's running pre-hook)
    _install_hooks(optimizer)
    value = flag.reshape(()).to(torch.float32)
    if running:
        _arm_running(optimizer, value, combine)
        return
    clear_stale(optimizer)
    if combine:
        _drop_unsettled(optimizer)
    ledger_arm(optimizer, value, measured, explicit=not combine)


def _drop_unsettled(optimizer: torch.optim.Optimizer) -> None:
    """A hand-over not applied yet whose gradients were written since, which no call settled (the call at hand
    measures none of them): its coefficient is dropped, as settle() does (its flag is the ledger's)."""
    pending = optimizer.__dict__.get(_PENDING)
    if pending is None or pending[2] is None:
        return
    verdict = _verdict(pending[3], pending[4], gradients(optimizer), pending[5], optimizer)[0]
    if verdict in ("written", "stale"):
        del optimizer.__dict__[_PENDING]
        _WAITING.discard(optimizer)


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


class Agreement:
    """One call's agreement on the skip flags that only a verdict of every rank decides (see the agreed ledger,
    :func:`ledger_arm`): ``local`` (0-dim float64, 0 or 1: SUM or MAX) travels in the call's own all-reduce, one
    more value in every call (so the layout never depends on what a rank found): the largest flag of the agreed,
    explicit and held entries this rank's read keeps (:func:`agreed_read`), or 0 unread where the call combines
    over no other rank (:meth:`sent`); where the call combined over several ranks, :meth:`agree` replaces every
    such entry armed over those ranks or fewer by one of the combined verdict, on every rank alike
    (:func:`decide_agreed`). :meth:`armed` makes the call's own flag an agreed entry there."""

    def __init__(self, arming: Any = None) -> None:
        #: the optimizer the call arms (its ``optimizer=``; None: a call arming none), whose entries alone its
        #: verdict decides: see :func:`agreed_read`
        self._arming = arming
        #: the verdict (and the call's total) combined over more than one rank: the call arms an agreed entry
        #: (:func:`ledger_arm`)
        self.shared = False
        #: the global ranks the call combined over (where ``shared``): see :func:`decide_agreed`
        self.ranks: frozenset[int] | None = None
        self._read: tuple[Tensor, dict[int, Any]] | None = None

    @property
    def local(self) -> Tensor:
        """This rank's value in the call's all-reduce."""
        if self._read is None:
            self._read = agreed_read(self._arming)
        return self._read[0]

    def sent(self, combines: bool) -> Tensor:
        """What this rank sends in the call's all-reduce: ``local`` where the call combines over several ranks,
        else 0 (the layout stays; nothing agreed is decided, so no entry is read: :meth:`agree` with ``alone``)."""
        return self.local if combines else torch.zeros((), dtype=torch.float64)

    def agree(self, combined: Tensor | None, alone: bool = False, group: Any = None) -> None:
        """The all-reduced ``local`` (any rank's 1: true on every rank) over ``group`` (None: the world).
        ``alone``: the call combined over no other rank (no reduction group, or a group of one): nothing agreed is
        decided, and ``combined`` is not read (None where the call made no all-reduce)."""
        self.shared = not alone
        if self.shared and _multi_rank():
            self.ranks = group_ranks(group)
            if self._read is not None:
                assert combined is not None, "a call combining over several ranks passes its all-reduced value"
                decide_agreed(self._read[1], combined.reshape(()) > 0, self.ranks)

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """The call arms within: its flag is an agreed entry where it combined (see :func:`ledger_arm`)."""
        token = _ARMING.set(self)
        try:
            yield
        finally:
            _ARMING.reset(token)


def _on_host(flag: Tensor) -> bool:
    """Whether reading ``flag`` on the host is free (the CPU); a device flag is never read there (a host sync). The
    one test of it for the ledger, the fused step hooks and the skip guard's snapshot and restore (looked up as
    ``_fused._on_host`` at each use: tests take every flag for a device's by replacing it)."""
    return flag.device.type == "cpu"


def _unset_on_cpu(flag: Tensor) -> bool:
    """Whether ``flag`` is on the CPU and reads as not set: a free read there, never made on a device (a host
    sync); a device flag is taken as possibly set."""
    return _on_host(flag) and not bool(flag)


def _multi_rank() -> bool:
    """Whether this process is one of several ranks (a process group of more than one rank is initialized)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


def _measured_among(grads: Sequence[Tensor], measured: Sequence[Tensor]) -> list[int]:
    """Indices of the ``grads`` that ``measured`` (a call's pieces) holds: by identity; where gradients are views
    of one buffer (DeepSpeed's, Megatron's, DDP's bucket views), which share one version counter, also those whose
    bytes a measured slice of the buffer overlaps (a call measuring slices of the buffer, not the parameters'
    views, measures the gradients those slices cover)."""
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
    grads = gradients(optimizer) if pending is not None else []
    closure = step_closure(args, kwargs)
    # A coefficient still to apply reaches this step (its gradients read as the ones measured) with its flag: the
    # step skips where it is NaN, whatever the ledger read of those gradients since (FSDP2's shards, views, are
    # told written by their versions and the same by their identity: an HSDP NaN hand-over accumulated onto and
    # zeroed in place dropped the ledger's flag, and grad_scale 1/NaN stepped NaN into every parameter).
    carried = None
    if pending is not None and pending[2] is not None:
        verdict, kept = _verdict(pending[3], pending[4], grads, pending[5], optimizer)
        if not _dropped(verdict) and not _in_gradients(pending):
            carried = pending[1]
        in_place = closure is not None or not supports_grad_scale(optimizer)
        if verdict in ("kept", "replaced") or (verdict == "same" and in_place):
            # Measured gradients untouched beside others (add_param_group, a gradient replaced or set to None):
            # grad_scale would divide the new ones too and miss the ones kept aside, so the measured ones are
            # scaled here and the step keeps only the flag. So too under step(closure): the closure runs inside
            # step(), after this hook, and writes new gradients, which grad_scale would have divided by the old
            # coefficient (x1/8000 of the plain step); and for an optimizer no longer fused (its param groups
            # loaded from a non-fused run's state_dict: torch's step refused the grad_scale it does not read).
            if verdict == "replaced" and pending[2] is not _APPLIED:  # (applied in the call: see below)
                _warn_replaced()
            _scale.scale_(kept, pending[0], divide=True)
            _stash(optimizer, torch.ones_like(pending[0]), pending[1], None, grads)  # as settle() leaves it
            pending = optimizer.__dict__[_PENDING]
        elif _dropped(verdict):
            # (not for a coefficient divided in the call, hand_over_applied_: it is in the gradients, and the step
            # takes them as they are, clipped, as after a clip in place; it warned that they stepped unclipped)
            if verdict == "written" and pending[2] is not _APPLIED:
                warn_at_caller(  # the line calling step(), past torch's step wrappers and hooks
                    "dist_clip: the clip coefficient handed to this optimizer's step() was dropped: its gradients "
                    "were written after the clip (a further backward accumulating into them, or zeroed in place "
                    "and recomputed), so they are no longer the ones measured and this step takes them unclipped. "
                    "Clip after the last backward before step()"
                )
            del optimizer.__dict__[_PENDING]  # measured on gradients that are gone: not this step's (its flag is
            pending = None  # the ledger's, see ledger_flag)
    skip = ledger_flag(optimizer)
    if carried is not None:
        skip = carried if skip is None else torch.maximum(skip, _reduce.moved(carried, skip.device))
    if not supports_grad_scale(optimizer):
        _no_longer_fused(optimizer, skip)
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
    scale = pending[0] if pending is not None else None
    found = skip if skip is not None else torch.zeros_like(pending[1])
    if pending is not None and pending[2] is None:
        scale = None  # settled: the gradients hold the coefficient, the step keeps only the flag
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


def _dropped(verdict: str) -> bool:
    """Whether :func:`_pre_hook` drops a hand-over, its coefficient and flag, on this :func:`_verdict`: measured
    on gradients that are gone (written since, or none of them stepped)."""
    return verdict not in ("same", "kept", "replaced")


def _no_longer_fused(optimizer: torch.optim.Optimizer, *flags: Tensor | None) -> None:
    """The optimizer was fused at the hand-over and is not now (its param groups loaded from a non-fused run's
    ``state_dict``): its step reads no ``found_inf`` (torch's step asserted on the one set here, and the step
    was lost). The coefficient is in the gradients (:func:`_pre_hook`); a skip flag is read on the host (a sync,
    on this path only) and, where set, refused: the step cannot be made a no-op from here."""
    clear_ledger(optimizer)
    for key in (_PENDING, _SAVED):
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
    clear_ledger(optimizer)
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
    if scale is not None and pending is not None and pending[2] is not None and _on_host(found):
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
) -> None:
    """Make the next ``optimizer.step()`` multiply every gradient by ``coef``, or skip if ``total`` is not finite.

    ``coef`` and ``total`` are 0-dim device tensors; nothing here reads them on the host. The caller has
    checked :func:`supports_grad_scale`. ``grads``: the optimizer's :func:`gradients`, when the caller has them.
    The flag joins the optimizer's ledger (:func:`ledger_arm`: an agreed entry where the call, under
    :meth:`Agreement.armed`, combined over several ranks).
    """
    _install_hooks(optimizer)
    clear_stale(optimizer)
    scale = torch.reciprocal(coef.to(torch.float32))  # the kernels divide: 1/1 == 1 keeps an unclipped step exact
    found = torch.logical_not(torch.isfinite(total)).to(torch.float32)
    grads = grads if grads is not None else gradients(optimizer)
    _stash(optimizer, scale, found, coef, grads)
    ledger_arm(optimizer, found, grads)
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
    its flag is left, which then joins the ledger (:func:`_in_gradients`). A hand-over whose gradients were written
    or are gone since waits on nothing: it is dropped first (:func:`_drop_unsettled`, as the call would drop it
    after), so it does not make this rank divide in the call where the others leave it to the step (under DDP with a
    parameter of rank 0's own, [l0] left to the step, l0's gradients set to None, [l1] then handed over by rank 1,
    whose optimizer steps l1's alone, and divided in the call by rank 0: a further backward accumulated onto the
    clipped gradients there alone, and DDP's all-reduce averaged them with rank 1's unclipped ones, so every rank
    stepped (3 + c) / 2 g where the ranks handing over drop the coefficient, 2 g)."""
    _drop_unsettled(optimizer)
    pending = optimizer.__dict__.get(_PENDING)
    ids = set(map(id, measured))
    return pending is None or _in_gradients(pending) or all(id(t) in ids for t in pending[3])


def _in_gradients(pending: tuple[Any, ...]) -> bool:
    """Whether a hand-over's coefficient is in its gradients already: settled (None), or applied in place by
    :func:`hand_over_applied_` (:data:`_APPLIED`). Only its flag waits for the step, held by those gradients, and
    that is in the ledger already (:func:`ledger_arm`), so a call beside them may leave its own coefficient to the
    step in the stash's place (the stash is the optimizer's one). Were it read as a coefficient still waiting, the
    call beside would divide in the call: under DDP with a parameter of rank 0's own in its fused optimizer, rank
    0's own part handed over over the world (rank 1 passing nothing), then DDP's whole, rank 0 divided DDP's
    gradients in the call while rank 1 handed the coefficient over: with every gradient then replaced out of place
    (``p.grad = p.grad + 0``) rank 0's replacements carried the clip into its step alone and DDP's replicas
    parted."""
    return pending[2] is None or pending[2] is _APPLIED


def hand_over_applied_(optimizer: torch.optim.Optimizer, total: Tensor, measured: Sequence[Tensor],
                       stepped: list[Tensor] | None = None,
                       deferred: tuple[Tensor, Tensor] | None = None) -> None:
    """A call's skip flag (``total`` not finite) for an optimizer that steps the call's pieces ``measured`` and
    other gradients beside them (:func:`steps_beside`), with the stash a hand-over leaves: the flag joins the ledger
    as any arming's (:func:`ledger_arm`), and the stash records the measured gradients and the parameters stepped
    beside them (:func:`_measured_side`), so that this rank settles, keeps and drops the coefficient as the ranks
    handing over do (under DDP, the rank whose optimizer also steps a parameter of its own beside DDP's).
    ``deferred``: the coefficient's float32 reciprocal and the coefficient, not applied yet (:func:`defers_beside`):
    the step divides the measured gradients by it in place (:func:`_verdict`'s "kept", the others stepped beside
    them), a call reading them first settles it, and gradients written or every one replaced since drop it, as on
    the ranks handing over (divided in the call, gradients every one replaced out of place, ``p.grad = p.grad + 0``,
    carried the clip into the step on this rank alone and DDP's replicas parted: 6.9e-7 after one AdamW step).
    None: applied in place by the caller (a coefficient of 1 left, :data:`_APPLIED`). ``stepped``: the optimizer's
    :func:`gradients`, where the caller has them."""
    _install_hooks(optimizer)
    clear_stale(optimizer)
    _drop_unsettled(optimizer)
    found = torch.logical_not(torch.isfinite(total)).to(torch.float32)
    ledger_arm(optimizer, found, measured)
    pending = optimizer.__dict__.get(_PENDING)
    ids = set(map(id, measured))
    stepped = stepped if stepped is not None else gradients(optimizer)
    if pending is not None and not all(id(t) in ids for t in pending[3]):
        if deferred is None:
            return  # (a hand-over waiting on gradients this call does not measure: its coefficient waits)
        # (its coefficient in its gradients already, see _in_gradients: its flag is the ledger's)
        assert _in_gradients(pending), "defers_beside saw no such hand-over"
        del optimizer.__dict__[_PENDING]
    grads = [g for g in stepped if id(g) in ids]
    # (the parameters stepped beside the measured ones, whose gradients a later call reads without the hand-over:
    # see _measured_side)
    beside = [p for group in optimizer.param_groups for p in group["params"]
              if p.grad is not None and id(getattr(p.grad, "_local_tensor", p.grad)) not in ids]
    if deferred is not None:
        _stash(optimizer, deferred[0], found, deferred[1], grads, beside)
    else:  # (the coefficient is in the gradients: 1 on the CPU, which scale_ reads for free and skips)
        _stash(optimizer, torch.ones_like(found), found, _APPLIED, grads, beside)
    _WAITING.add(optimizer)


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
    beside = pending[6] if pending is not None and pending[2] is not None else None
    if not beside:
        return grads
    out = {id(getattr(p.grad, "_local_tensor", p.grad)) for p in beside if p.grad is not None}
    return [g for g in grads if id(g) not in out]


def _stash(
    optimizer: torch.optim.Optimizer, scale: Tensor, found: Tensor, coef: Tensor | None, grads: list[Tensor],
    beside: list[Tensor] | None = None,
) -> None:
    """What the next step applies (``scale``, ``found``), the coefficient settle() would apply instead (None once
    applied), the gradients it was measured on with their versions (see :func:`_verdict`), and the parameters
    stepped beside the measured ones of a hand-over applied in place (see :func:`_measured_side`)."""
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
    optimizer.__dict__[_PENDING] = (scale, found, coef, grads, versions, raw, beside)


# --------------------------------------------------------------------------------------------- the agreed ledger
# Each optimizer's skip flags until its step, decided from values every rank has alike. An entry is a flag with the
# parameters of this optimizer whose gradients its arming measured here (whole, or a slice of), those gradients and
# their versions, weak references to the measured pieces that are no gradient the optimizer steps (a wrapper's
# copies: they hold it while one is alive and unwritten), and its kind: "local" (armed by a call combining over no
# other rank: ``group=None`` pieces are replicas, by their contract, so its parameters, their gradients, their writes
# and reads are the same on every rank), "agreed" (armed by a call whose total was combined over several ranks, or
# made by a verdict: its flag is the same on every rank, its parameters are not), "explicit" (``skip_next_step_``:
# the caller's flag, held while a gradient held then still is, or to the step where none was held), "held"
# (``skip_next_step_``'s entries once a verdict decided them: held by those gradients whatever wrote them). A local
# entry is decided by this rank's read (:func:`_kept`) at every call arming its optimizer and at the step; among
# several ranks the other kinds only by a call combining over every rank they were armed over
# (:func:`decide_agreed`): each rank's read of them travels in its all-reduce as one value (MAX), and every rank
# replaces them by one entry of that verdict (held here by the parameters its read kept). The step reads them as
# they are. In one process every entry is decided by the read.
_LEDGER = "_dist_clip_ledger"
#: the call arming under Agreement.armed (its verdict decides the agreed entries)
_ARMING: contextvars.ContextVar[Any] = contextvars.ContextVar("dist_clip_arming", default=None)
#: optimizers whose ledger holds an agreed, explicit or held entry (decided by combining calls: see Agreement)
_LEDGERED = _ByIdentity()


class _Entry:
    __slots__ = ("flag", "params", "grads", "versions", "kind", "pieces", "ranks", "alone")

    def __init__(self, flag: Tensor, params: list[Tensor], grads: list[Tensor], kind: str,
                 versions: list[int] | None = None, pieces: list[tuple[Any, int]] | None = None,
                 ranks: frozenset[int] | None = None) -> None:
        self.flag, self.params, self.grads, self.kind = flag, params, grads, kind
        self.versions = versions if versions is not None else [_version(g) for g in grads]
        #: weak references to the measured pieces that are no gradient the optimizer steps (a wrapper's copies:
        #: DeepSpeed stage 0's), with their versions: they hold the entry while one of them is alive, unwritten
        self.pieces = pieces or []
        #: the ranks of the group an agreed entry was armed (or last decided) over: see :func:`decide_agreed`
        self.ranks = ranks
        #: an agreed entry a verdict left held by gradients read as written since: its flag is the verdict only
        #: where they were not finite then, and a later verdict is its own alike (see :func:`decide_agreed`)
        self.alone = False


def _ledger_params(optimizer: Any) -> list[Tensor]:
    """The parameters holding ``optimizer``'s ledger entries, with a gradient now: its own, and where it is a ZeRO
    or OSS wrapper's inner optimizer every rank's partition the wrapper holds (over DDP every rank holds every
    gradient: read over its own partition alone, a NaN in one rank's partition, every gradient replaced out of
    place and a part clipped again, kept the flag on that rank alone)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    ref = optimizer.__dict__.get(_OUTER)
    outer = ref() if ref is not None else None
    if outer is not None:
        ids = set(map(id, params))
        params += [p for group in outer.param_groups for p in group["params"]
                   if p.grad is not None and id(p) not in ids]
    return params


def _grads_by_param(optimizer: Any) -> dict[int, Tensor]:
    return {id(p): getattr(p.grad, "_local_tensor", p.grad) for p in _ledger_params(optimizer)}


def _measured_params(optimizer: Any, measured: Sequence[Tensor] | None
                     ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The parameters of ``optimizer``'s ledger whose gradients a call's pieces ``measured`` hold whole, those of
    which they hold only a slice (``w.grad[e]``: one expert's rows), and the pieces that are no view of a gradient
    the optimizer steps (a wrapper's copies)."""
    if not measured:
        return [], [], []
    params = _ledger_params(optimizer)
    grads = [getattr(p.grad, "_local_tensor", p.grad) for p in params]
    whole = [params[i] for i in _measured_among(grads, measured)]
    by_grad = {id(g): p for p, g in zip(params, grads)}
    taken = {id(getattr(p.grad, "_local_tensor", p.grad)) for p in whole}
    partial: dict[int, Tensor] = {}
    others = []
    for t in measured:
        t = getattr(t, "_local_tensor", t)
        if id(t) in taken or id(t) in by_grad:
            continue
        base = t._base
        p = by_grad.get(id(base)) if base is not None else None
        if p is not None:
            if id(base) not in taken:
                partial.setdefault(id(p), p)
        elif t.numel():
            others.append(t)
    return whole, list(partial.values()), others


def _pieces_held(entry: _Entry) -> bool:
    """Whether one of the pieces ``entry`` was armed on (no gradient the optimizer steps) is alive, unwritten."""
    return any((t := ref()) is not None and _version(t) == v for ref, v in entry.pieces)


def _kept(entry: _Entry, again: set[int], now: dict[int, Tensor]) -> _Entry | None:
    """``entry`` as this rank reads it where a call arming its optimizer measures the parameters ``again``: those
    leave it (the call's own flag reads them now); held by one of the very gradients it was measured on, unwritten,
    or by one of its pieces that are no gradient the optimizer steps, alive and unwritten, it lasts as it is;
    written since (an auxiliary loss into a NaN gradient leaves it NaN, a dropped batch's ``zero_grad()`` in place
    and the next backward make it finite), replaced (out of place it carries the NaN, the next batch's does not) or
    gone, it lasts where one of its parameters' gradients is not finite now. An explicit entry lasts while one of
    the gradients held at its arming is still held (or none was held), a held one likewise (none held: dropped
    here, the ranks holding one decide it)."""
    if entry.kind in ("explicit", "held"):
        if not entry.grads:
            return entry if entry.kind == "explicit" else None  # ("held": none here, the ranks holding one decide)
        if any(now.get(id(p)) is g for p, g in zip(entry.params, entry.grads)):
            return entry
        # (or made anew over the same bytes by their wrapper: FSDP1's views of the flat gradient after a forward,
        # or it re-aliased by a backward; the held tensors keep those bytes alive, so equal addresses are the same
        # memory: read as gone, a forward between skip_next_step_ and a clip dropped it and the step was taken)
        held = {_bytes_key(g) for g in entry.grads if getattr(g, "_local_tensor", g).numel()}
        return entry if held and any(_bytes_key(g) in held for g in now.values()) else None
    pieces = entry.pieces if _pieces_held(entry) else []
    if not entry.params and not pieces:
        return None  # (an agreed entry held here by nothing: the ranks holding its parameters decide it)
    pairs = [(p, g, v) for p, g, v in zip(entry.params, entry.grads, entry.versions) if id(p) not in again]
    if pieces:
        if len(pairs) == len(entry.params):
            return entry
        return _Entry(entry.flag, [p for p, _, _ in pairs], [g for _, g, _ in pairs], entry.kind,
                      [v for _, _, v in pairs], pieces, entry.ranks)
    if not pairs:
        return None
    if any(now.get(id(p)) is g and _version(g) == v for p, g, v in pairs):
        if len(pairs) == len(entry.params) and not entry.pieces:
            return entry
        return _Entry(entry.flag, [p for p, _, _ in pairs], [g for _, g, _ in pairs], entry.kind,
                      [v for _, _, v in pairs], None, entry.ranks)
    fresh = [(p, now[id(p)]) for p, _, _ in pairs if id(p) in now]
    if not fresh or _unset_on_cpu(entry.flag):
        return None
    bad = _nonfinite([g for _, g in fresh], entry.flag.device)
    return _Entry(entry.flag * bad.to(entry.flag.dtype), [p for p, _ in fresh], [g for _, g in fresh], entry.kind,
                  None, None, entry.ranks)


def _agreed_kind(entry: _Entry) -> bool:
    """Whether only a combining call's verdict decides ``entry`` (among several ranks)."""
    return entry.kind in ("agreed", "explicit", "held")


def _armed_by(optimizer: Any, arming: Any) -> bool:
    """Whether ``optimizer``'s ledger is the one a call given ``arming`` (its ``optimizer=``) arms: that optimizer,
    or the inner optimizer of that ZeRO or OSS wrapper."""
    if optimizer is arming:
        return True
    ref = optimizer.__dict__.get(_OUTER)
    return ref is not None and ref() is arming


def agreed_read(arming: Any = None) -> tuple[Tensor, dict[int, Any]]:
    """This rank's value in a call's all-reduce (float64 0-dim): the largest flag of the agreed, explicit and held
    entries that this rank's read keeps (:func:`_kept`; not their parameters the call measures again, which its own
    flag reads: a call raising after its all-reduce, ``error_if_nonfinite``, arms none), of the optimizer the call
    arms (``arming``, the same on every rank by the call's contract), or of every optimizer holding one where it
    arms none; and per optimizer the entries read with what is kept of each (those the verdict decides). A call
    arming one optimizer leaves the others' entries as they are: read into its one value, another optimizer's NaN
    entry made the verdict 1 and set the armed optimizer's earlier agreed entry, and its good step was skipped on
    every rank (two fused optimizers, one per part, the second's NaN part armed over the world, then the first's
    part; and ``skip_next_step_`` of one optimizer skipping the other's next hand-over)."""
    out = torch.zeros((), dtype=torch.float64)
    survivors: dict[int, Any] = {}
    if not _LEDGERED:
        return out, survivors
    for optimizer in _LEDGERED:
        if arming is not None and not _armed_by(optimizer, arming):
            continue
        ledger = optimizer.__dict__.get(_LEDGER) or []
        now = _grads_by_param(optimizer)
        read = [(e, _kept(e, set(), now)) for e in ledger if _agreed_kind(e)]
        survivors[id(optimizer)] = (optimizer, read)
        for _, k in read:
            if k is not None:
                out = torch.maximum(_reduce.moved(out, k.flag.device), k.flag.to(torch.float64))
    return out, survivors


def group_ranks(group: Any) -> frozenset[int]:
    """The global ranks of a process group (``None``: the world)."""
    import torch.distributed as dist

    if group is None or group is dist.group.WORLD:
        return frozenset(range(dist.get_world_size()))
    return frozenset(dist.get_process_group_ranks(group))


def _decided_by(entry: _Entry, ranks: frozenset[int]) -> bool:
    """Whether a call combining over ``ranks`` decides the agreed or explicit ``entry``: every rank that armed it
    (or last decided it) takes part, and so receives the same verdict. A call over fewer ranks (a pair's norm
    logged after a clip over the world) leaves it as it is: decided by each pair's own verdict, the pair holding
    the NaN skipped and the other stepped."""
    return entry.ranks is None or entry.ranks <= ranks


def decide_agreed(survivors: dict[int, Any], verdict: Tensor, ranks: frozenset[int]) -> None:
    """A verdict combined over ``ranks`` replaces every agreed and explicit entry armed over those ranks or fewer,
    on every rank alike (the verdict carries each rank's read of all of them: a rank's read of an entry this call
    does not decide can only make it skip, alike on every rank of the call)."""
    for optimizer, read in survivors.values():
        ledger = optimizer.__dict__.get(_LEDGER)
        if ledger is None:
            continue
        flag = verdict.reshape(()).to(torch.float32)
        decided = {id(e) for e, _ in read if _decided_by(e, ranks)}
        if not decided:
            continue
        kept = [k for e, k in read if id(e) in decided and k is not None]

        def merged(ks: list[_Entry], kind: str, flag: Tensor = flag) -> _Entry:
            return _Entry(flag, [p for k in ks for p in k.params], [g for k in ks for g in k.grads], kind,
                          [v for k in ks for v in k.versions], [r for k in ks for r in k.pieces], ranks)

        out = [e for e in ledger if id(e) not in decided]
        if any(e.kind == "agreed" for e in ledger if id(e) in decided):
            # (an entry read through its gradients written or replaced since, _kept's new flag, lasts by them
            # only where they are not finite now: held by them the verdict stands there at the next read only so.
            # Merged into the verdict's entry, one whose flag was not set, dropped on the CPU and kept as its value
            # off the host, held the verdict by its finite gradients off the host alone: every rank skipped a good
            # step the CPU took, a NaN armed elsewhere read by a get_total_norm over the world in between)
            last = {id(k) for e, k in read
                    if id(e) in decided and k is not None and (k.flag is not e.flag or e.alone)}
            out.append(merged([k for k in kept if k.kind == "agreed" and id(k) not in last], "agreed"))
            for k in kept:
                if k.kind == "agreed" and id(k) in last:
                    out.append(_Entry(flag * k.flag.ne(0).to(flag.device, flag.dtype), k.params, k.grads, "agreed",
                                      k.versions, k.pieces, ranks))
                    out[-1].alone = True
        if any(e.kind in ("explicit", "held") for e in ledger if id(e) in decided):
            # (skip_next_step_'s stay held by the gradients held at its arming, whatever wrote them: "held"; one
            # armed while this rank held no gradient lasts to the step as it was, by its own flag: merged into
            # "held" with nothing to hold it, the next call's finite read dropped it, and a skip asked before the
            # backward was lost on every rank, the step taken. Such a rank sends it at every later call deciding
            # that optimizer, so the ranks keep it alike, also where another rank held gradients then, dropped
            # since: a skip kept that a rank holding them alone would drop)
            lasting = [k.flag for k in kept if k.kind == "explicit" and not k.grads]
            if lasting:
                out.append(_Entry(functools.reduce(torch.maximum, lasting), [], [], "explicit", ranks=ranks))
            out.append(merged([k for k in kept if k.kind in ("explicit", "held") and k.grads], "held"))
        optimizer.__dict__[_LEDGER] = out


def ledger_arm(optimizer: Any, flag: Tensor, measured: Sequence[Tensor] | None, explicit: bool = False) -> None:
    """A call arming ``flag`` on its pieces ``measured`` (``explicit``: ``skip_next_step_``, which replaces every
    entry)."""
    flag = flag.reshape(()).to(torch.float32)
    now = _grads_by_param(optimizer)
    several = _multi_rank()
    if explicit:
        params = [p for p in _ledger_params(optimizer) if id(p) in now]
        optimizer.__dict__[_LEDGER] = [_Entry(flag, params, [now[id(p)] for p in params], "explicit",
                                              ranks=group_ranks(None) if several else None)]
        if several:
            _LEDGERED.add(optimizer)
        return
    agreement = _ARMING.get()
    combining = several and agreement is not None and agreement.shared
    if measured is None:
        params, partial, others = _ledger_params(optimizer), [], []
        params = [p for p in params if id(p) in now]
    else:
        params, partial, others = _measured_params(optimizer, measured)
    again = set(map(id, params))
    out = []
    for e in optimizer.__dict__.get(_LEDGER, []):
        if several and _agreed_kind(e):
            out.append(e)  # (decided by a combining call's verdict alone: see Agreement.agree)
        elif (k := _kept(e, again, now)) is not None:
            out.append(k)
    # The entry's kind is the call's, alike on every rank whatever its pieces here: a slice ``w.grad[:4]`` holds
    # the entry by ``w`` (not measured whole: a later call measuring another slice leaves it), a piece that is no
    # view of a gradient the optimizer steps (a wrapper's copies) while it is alive and unwritten. (Read as lasting
    # to the step on the rank measuring a slice, agreed on the rank measuring the whole, a dropped NaN batch's flag
    # read again over the world was dropped there alone: the ranks parted.)
    held = [*params, *(p for p in partial if id(p) not in again)]
    out.append(_Entry(flag, held, [now[id(p)] for p in held], "agreed" if combining else "local",
                      pieces=[(weakref.ref(t), _version(t)) for t in others],
                      ranks=agreement.ranks if combining else None))
    optimizer.__dict__[_LEDGER] = out
    if combining:
        _LEDGERED.add(optimizer)


def ledger_flag(optimizer: Any) -> Tensor | None:
    """The flag the next step reads: agreed entries as they are (among several ranks), explicit ones too (decided
    by arming calls only), local ones by this rank's read."""
    ledger = optimizer.__dict__.get(_LEDGER)
    if not ledger:
        return None
    now = _grads_by_param(optimizer)
    several = _multi_rank()
    flags = [e.flag if (several and _agreed_kind(e)) or e.kind in ("explicit", "held")
             else (k.flag if (k := _kept(e, set(), now)) is not None else None) for e in ledger]
    flags = [f for f in flags if f is not None]
    if not flags:
        return None
    return functools.reduce(lambda a, b: torch.maximum(a, b.to(a.device)), flags)


def clear_ledger(optimizer: Any) -> None:
    optimizer.__dict__.pop(_LEDGER, None)
    _LEDGERED.discard(optimizer)
