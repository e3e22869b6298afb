"""Adapters turn whatever a user trains with into :class:`~dist_clip.shards.Shards`.

Each adapter module exposes ``matches(target) -> bool`` and ``shards(target, group) -> list[Shards]`` and
imports its framework lazily, inside those functions, so ``import dist_clip`` needs torch only. Order matters:
the most specific wrapper is tried first and the generic parameter adapter last.
"""

from __future__ import annotations

import importlib
import sys
from typing import Protocol

import torch.distributed as dist
from torch import nn

from ..shards import Shards
from .params import _views_a_leaf  # a slice or view of a parameter, as is_parameter takes it

__all__ = ["ADAPTERS", "BUILT_IN", "Adapter", "find", "resolve", "unwrap_compiled"]


class Adapter(Protocol):
    def matches(self, target: object) -> bool: ...

    def shards(self, target: object, group: dist.ProcessGroup | None) -> list[Shards]: ...


#: The adapters dist_clip ships, whose targets the per-parameter modes name themselves (others: by their
#: Shards' ``names``). Listed apart from ``ADAPTERS``: it was ``ADAPTERS`` itself, so a module added to that tuple
#: here, as README says, counted as shipped (its names were ignored: "cannot name the gradients ... per parameter").
BUILT_IN: tuple[str, ...] = (
    "dist_clip.adapters.deepspeed",
    "dist_clip.adapters.fairscale",
    "dist_clip.adapters.fsdp",
    "dist_clip.adapters.params",
)
#: Adapter modules in the order they are tried; adding a framework means adding one module here.
ADAPTERS: tuple[str, ...] = (
    "dist_clip.adapters.deepspeed",
    "dist_clip.adapters.fairscale",
    "dist_clip.adapters.fsdp",
    "dist_clip.adapters.params",
)


def _load(name: str) -> Adapter | None:
    loaded = sys.modules.get(name)  # (every call tries the adapters: importlib's own lookup took ~4 us a name)
    # Python lists a module before running it: a first call on another thread, while this one imports, got the
    # half-made module (AttributeError: partially initialized module ... has no attribute 'matches'); importlib
    # waits for the import instead.
    if loaded is not None and not getattr(getattr(loaded, "__spec__", None), "_initializing", False):
        return loaded  # type: ignore[return-value]
    try:
        return importlib.import_module(name)  # type: ignore[return-value]
    except ModuleNotFoundError as e:
        if e.name == name and name in BUILT_IN:  # the adapter itself is absent, not its framework
            return None
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            # a user's adapter module that does not import (a typo, a package missing from a worker's path) was
            # passed over as absent: its targets went to the built-in adapters, a module read as plain
            # parameters, each rank its own norm (33.19 and 37.32 for 49.94), silently
            raise ModuleNotFoundError(
                f"dist_clip.adapters.ADAPTERS lists {name!r}, which cannot be imported ({e}); list importable "
                "adapter modules only (every rank must import them)", name=e.name
            ) from e
        raise


def unwrap_compiled(target: object) -> object:
    """The module ``torch.compile`` wrapped: its ``OptimizedModule`` holds it as ``_orig_mod``, with the very same
    parameters. Adapters then see the wrapper they know (DDP, an FSDP1 root) and names lose ``_orig_mod.``."""
    while type(target).__name__ == "OptimizedModule" and isinstance(getattr(target, "_orig_mod", None), nn.Module):
        target = target._orig_mod  # type: ignore[attr-defined]
    return target


def find(target: object) -> tuple[str, Adapter] | None:
    """The first adapter of ``ADAPTERS`` whose ``matches`` takes ``target``, with its module name; None if none."""
    for name in ADAPTERS:
        adapter = _load(name)
        if adapter is not None and adapter.matches(target):
            return name, adapter
    return None


def _checked(name: str, out: object, group: dist.ProcessGroup | None) -> list[Shards]:
    """An adapter's ``shards()`` result as a list of Shards: one ``Shards`` alone is taken as a list of it (it
    failed with "'Shards' object is not iterable"), anything else is a ``TypeError`` naming the adapter; an empty
    list under an explicit ``group=`` joins that group's collective with nothing (the rank returned 0 at once and
    left the others waiting)."""
    if isinstance(out, Shards):
        return [out]
    if not isinstance(out, list) or not all(isinstance(s, Shards) for s in out):
        if isinstance(out, tuple) and all(isinstance(s, Shards) for s in out):
            out = list(out)
        else:
            kind = type(out).__name__ if not isinstance(out, (list, tuple)) else (
                f"a {type(out).__name__} holding a " + type(next(s for s in out if not isinstance(s, Shards))).__name__)
            raise TypeError(f"adapter {name}: shards() must return a list of dist_clip.Shards, got {kind}")
    if name not in BUILT_IN:
        for s in out:
            for t in s.tensors:
                if t.requires_grad and (t.is_leaf or _views_a_leaf(t)):
                    # a parameter's values were measured and the weights scaled in place (3.0 -> 0.354), its
                    # gradient left as it was, silently; a slice of one too (what a sharded adapter cuts: w[2:4]
                    # of a weight of ones gave 3.46 for 1.73 on 2 ranks, the weights scaled 1.0 -> 0.144)
                    raise TypeError(
                        f"adapter {name}: shards() gave a parameter (a leaf tensor that requires grad, or a slice or "
                        f"view of one, shape {tuple(t.shape)}) as a piece; Shards.tensors are gradient pieces: pass "
                        "its .grad (or the same slice of it)"
                    )
    if not out and group is not None:
        return [Shards([], group=group)]
    return out


def resolve(target: object, group: dist.ProcessGroup | None = None) -> list[Shards]:
    """The Shards of ``target`` on this rank, from the first adapter that recognises it."""
    if target is None:
        raise TypeError("target must be a tensor, an iterable of tensors/parameters, a module or an engine; got None")
    target = unwrap_compiled(target)
    found = find(target)
    if found is not None:
        return _checked(found[0], found[1].shards(target, group), group)
    raise TypeError(
        f"dist_clip does not know how to find gradients in a {type(target).__module__}.{type(target).__name__}; "
        "pass a tensor, an iterable of parameters/tensors, an nn.Module, or a supported wrapper"
    )
