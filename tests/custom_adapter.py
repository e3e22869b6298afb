"""A framework dist_clip does not ship, added through ``ADAPTERS`` as README's "Adding a framework" says: its
target holds each rank's pieces of a model sharded by hand, named by full-model parameter names."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dist_clip import Shards


class HandSharded:
    """The pieces this rank holds: a list of Shards (or whatever a test gives), handed back as they are."""

    def __init__(self, shards: object) -> None:
        self.pieces = shards


class HandModule(nn.Module):
    """A module this adapter takes ahead of the built-in one (for plain modules)."""

    def __init__(self, shards: object) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2, 3))
        self.pieces = shards


def matches(target: object) -> bool:
    return isinstance(target, (HandSharded, HandModule))


def shards(target: HandSharded | HandModule, group: dist.ProcessGroup | None) -> list[Shards]:
    return list(target.pieces) if isinstance(target.pieces, list) else target.pieces  # type: ignore[return-value]
