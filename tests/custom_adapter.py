"""A framework dist_clip does not ship, added through ``ADAPTERS`` as README's "Adding a framework" says: its
target holds each rank's pieces of a model sharded by hand, named by full-model parameter names."""

from __future__ import annotations

import torch.distributed as dist

from dist_clip import Shards


class HandSharded:
    """The pieces this rank holds: a list of Shards, handed back as they are."""

    def __init__(self, shards: list[Shards]) -> None:
        self.pieces = shards


def matches(target: object) -> bool:
    return isinstance(target, HandSharded)


def shards(target: HandSharded, group: dist.ProcessGroup | None) -> list[Shards]:
    return list(target.pieces)
