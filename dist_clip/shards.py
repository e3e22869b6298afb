"""The adapter contract: what a training wrapper tells the core about the gradients of one rank."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch.distributed as dist
from torch import Tensor

__all__ = ["Shards", "common_loss_scale"]


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
        if self.names and len(self.names) != len(self.tensors):
            raise ValueError(f"Shards.names has {len(self.names)} entries for {len(self.tensors)} tensors")
        if not (self.loss_scale > 0 and self.loss_scale < float("inf")):
            raise ValueError(f"Shards.loss_scale must be a finite number > 0, got {self.loss_scale}")


def common_loss_scale(shards: Sequence[Shards]) -> float:
    """The one loss scale of a call's Shards (1 when there are none); differing scales are a ValueError."""
    scales = {float(s.loss_scale) for s in shards}
    if len(scales) > 1:
        raise ValueError(f"the Shards of one call must share one loss_scale, got {sorted(scales)}")
    return scales.pop() if scales else 1.0
