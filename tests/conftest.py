"""Shared fixtures: the float64 reference, and the session-wide pools of spawned gloo ranks."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tests._harness import PoolCache  # noqa: E402


@pytest.fixture(scope="session")
def pools():
    cache = PoolCache()
    yield cache
    cache.close()


@pytest.fixture
def run_ranks(pools):
    """``run_ranks(world_size, fn, *args, timeout_s=120)``: run ``fn`` on that many ranks, values by rank."""

    def run(world_size: int, fn, *args, timeout_s: float = 120.0, pg_timeout_s: float = 60.0, **kwargs):
        return pools.get(world_size, pg_timeout_s).run(fn, *args, timeout_s=timeout_s, **kwargs)

    return run


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs CUDA and NCCL (runs on GPU machines only)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
