"""The adapter contract: what a training wrapper tells the core about the gradients of one rank."""

from __future__ import annotations

import numbers
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from . import _norm

__all__ = ["Shards", "UnitLayout", "UnitPiece", "common_loss_scale", "partition_cuts"]


@dataclass(frozen=True)
class Shards:
    """Local gradient pieces of one rank and how they count in the global norm.

    An adapter turns a training object into one or more ``Shards``; the core measures every counted piece,
    combines all partials of all ``Shards`` with one collective, and scales every piece in place.

    Attributes:
        tensors: local gradient pieces (plain tensors, never DTensors) to measure and to scale in place.
            Empty tensors are allowed: a rank whose shard is empty still takes part in the collective.
        group: the ranks whose partials of these pieces must be combined. ``None`` means the pieces are
            whole on this rank and identical on every rank of the call (replicated, as under DDP): they are
            counted once, by rank 0 of the call's reduction group, and need no collective of their own.
        counted: ``False`` where another rank of ``group`` already counts these very pieces (HSDP replicas,
            tensor-parallel duplicates). Such pieces are only scaled, never measured.
        names: optional names of the pieces, for reports and error messages; empty or one per tensor.
        loss_scale: the pieces hold ``loss_scale`` times the gradients (mixed-precision loss scaling, as under
            DeepSpeed fp16). The norm is that of the unscaled gradients; the clip coefficient computed from it
            applies to the scaled pieces unchanged. All ``Shards`` of one call must share one value.
    """

    tensors: Sequence[Tensor]
    group: dist.ProcessGroup | None = None
    counted: bool = True
    names: Sequence[str] = field(default=())
    loss_scale: float = 1.0

    def __post_init__(self) -> None:
        # (a generator was read empty by the measuring pass after the scaling pass took it: 0, unclipped)
        if not isinstance(self.tensors, (list, tuple)):
            object.__setattr__(self, "tensors", list(self.tensors))
        if isinstance(self.names, (str, bytes)):
            # (a str was split into its characters: names="wb" named two pieces "w" and "b", silently)
            raise TypeError("Shards.names must be a list of names, one per tensor, got the "
                            f"{type(self.names).__name__} {self.names!r:.40}")
        if not isinstance(self.names, (list, tuple)):
            object.__setattr__(self, "names", tuple(self.names))
        if not all(issubclass(k, str) for k in set(map(type, self.names))):  # (one check per type, in C)
            # (an int failed in the per-parameter modes with "sequence item 0: expected str instance, int found")
            bad = next(n for n in self.names if not isinstance(n, str))
            raise TypeError(f"Shards.names must hold str names, got a {type(bad).__name__} {bad!r:.40}")
        if not all(issubclass(k, Tensor) for k in set(map(type, self.tensors))):  # (one check per type, in C)
            bad = next(t for t in self.tensors if not isinstance(t, Tensor))
            raise TypeError(f"Shards.tensors must hold tensors, got a {type(bad).__name__}")
        if type(self.counted) is not bool:
            object.__setattr__(self, "counted", _flag(self.counted))
        if self.group is not None and not (
            dist.is_available() and (isinstance(self.group, dist.ProcessGroup)
                                     or self.group == getattr(dist.GroupMember, "NON_GROUP_MEMBER", None))
        ):
            # (a str failed later with "'str' object has no attribute 'size'")
            raise TypeError(f"Shards.group must be a torch.distributed.ProcessGroup or None, got "
                            f"{type(self.group).__name__} {self.group!r:.40}")
        if type(self.loss_scale) is not float and (
            isinstance(self.loss_scale, bool) or not isinstance(self.loss_scale, numbers.Real)
        ):
            raise TypeError(f"Shards.loss_scale must be a number, got {type(self.loss_scale).__name__}")
        if self.names and len(self.names) != len(self.tensors):
            raise ValueError(f"Shards.names has {len(self.names)} entries for {len(self.tensors)} tensors")
        if not (self.loss_scale > 0 and self.loss_scale <= sys.float_info.max):  # (an int past float64: OverflowError)
            big = isinstance(self.loss_scale, numbers.Integral) and self.loss_scale > sys.float_info.max
            shown = f"an int of {_norm.int_digits(self.loss_scale)} digits" if big else self.loss_scale
            raise ValueError(f"Shards.loss_scale must be a finite number > 0, got {shown}")


def _flag(counted: object) -> bool:
    """``Shards.counted`` as a bool: a numpy bool, an integer 0 or 1, or a one-value bool tensor stand for one;
    anything else was taken by its truth (None: no rank counted the pieces, a total of 0; "False": every rank
    did), silently."""
    if isinstance(counted, Tensor):
        if counted.numel() == 1 and counted.dtype == torch.bool:
            return bool(counted)
    elif type(counted).__name__ in ("bool_", "bool") or (isinstance(counted, numbers.Integral) and counted in (0, 1)):
        return bool(counted)
    raise TypeError(f"Shards.counted must be a bool (whether this rank counts the pieces), got "
                    f"{type(counted).__name__} {counted!r:.40}")


def common_loss_scale(shards: Sequence[Shards]) -> float:
    """The one loss scale of a call's Shards (1 when there are none); differing scales are a ValueError."""
    scales = {float(s.loss_scale) for s in shards}
    if len(scales) > 1:
        raise ValueError(f"the Shards of one call must share one loss_scale, got {sorted(scales)}")
    return scales.pop() if scales else 1.0


def partition_cuts(offset: int, numel: int, size: int, world: int) -> tuple[int, ...]:
    """Where a flat buffer cut into ``world`` partitions of ``size`` elements cuts the parameter lying at
    ``offset`` (``numel`` elements): offsets inside the parameter, as :attr:`UnitLayout.geometry` lists them."""
    if size <= 0:
        return ()
    return tuple(b - offset for b in range(size, size * world, size) if offset < b < offset + numel)


@dataclass(frozen=True)
class UnitPiece:
    """One local piece of one parameter and where it lies in the full parameter (unit-wise clipping).

    Attributes:
        name: the parameter's name in the unwrapped model (identical on every rank).
        grad: the local gradient piece, scaled in place: a 1-D view of the real gradient when ``start`` is set,
            else the whole gradient (any shape, the parameter's).
        data: the parameter's values aligned with ``grad`` (same numel; 1-D when ``start`` is set).
        start: index of the piece's first element in the flattened full parameter; ``None``: the whole parameter.
        group: as :attr:`Shards.group`: the ranks whose partials of this parameter combine (``None``: whole and
            identical on every rank).
        counted: as :attr:`Shards.counted`.
    """

    name: str
    grad: Tensor
    data: Tensor
    start: int | None
    group: dist.ProcessGroup | None
    counted: bool = True


@dataclass(frozen=True)
class UnitLayout:
    """Every local piece of a wrapper's parameters for unit-wise clipping, and what every rank knows alike.

    Attributes:
        pieces: this rank's pieces (those with an empty gradient may be left out).
        names: every parameter name of the full model, in an order identical on every rank.
        geometry: name -> (full shape, offsets in the flattened parameter where *any* rank's piece boundary
            cuts it), for every parameter some rank holds in flat pieces; identical on every rank.
        groups: every group a piece of *any* rank may name (identical on every rank), so that a rank holding
            no piece still joins the collective.
        loss_scale: as :attr:`Shards.loss_scale`, for every piece.
        device: where a rank holding no piece keeps its partials (the device of the wrapper's gradients).
    """

    pieces: list[UnitPiece]
    names: tuple[str, ...]
    geometry: dict[str, tuple[torch.Size, tuple[int, ...]]]
    groups: tuple[dist.ProcessGroup | None, ...] = ()
    loss_scale: float = 1.0
    device: torch.device | None = None
