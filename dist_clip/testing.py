"""Helpers for users' own distributed CI (and ours): count collectives, compare with the unsharded norm."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["CollectiveCount", "count_collectives", "reference_norm"]


@dataclass
class CollectiveCount:
    """Backend collectives seen inside :func:`count_collectives`, by name (``gloo:all_reduce``...)."""

    names: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.names)


_BACKEND_PREFIXES = ("gloo:", "nccl:", "mpi:", "ucc:", "xccl:")


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveCount]:
    """Count the process-group collectives issued in the block, as the profiler records them.

    Each backend collective appears once as a profiler event named ``<backend>:<op>`` whatever Python API
    issued it (``dist.all_reduce``, a wrapper's internal call, a DTensor redistribution), so the count is
    what the network sees, not what our code thinks it called.
    """
    from torch.profiler import ProfilerActivity, profile

    result = CollectiveCount()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield result
    result.names.extend(e.name for e in prof.events() if e.name.startswith(_BACKEND_PREFIXES))


def reference_norm(grads: Sequence[Tensor], norm_type: float | str = 2.0) -> float:
    """The definition: ``vector_norm`` of the concatenation of every full gradient, in float64, as a float."""
    p = float(norm_type)
    flat = [g.detach().reshape(-1).to("cpu", torch.float64) for g in grads if g is not None]
    if not flat:
        return 0.0
    value = torch.linalg.vector_norm(torch.cat(flat), p).item()
    if p == 0 and any(bool(torch.isnan(f).any()) for f in flat):
        return math.nan  # dist_clip's documented choice: NaN anywhere gives NaN for every p
    return value
