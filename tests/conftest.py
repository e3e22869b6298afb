"""Shared fixtures: the float64 reference, and the session-wide pools of spawned gloo ranks."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The interpreter's own bin first, as `make test` and the launch scripts put it: DeepSpeed builds its CPU comm op
# with the first `ninja` on PATH, and a system ninja of another version rewrites the op cache's log, so that every
# switch between the two rebuilt the op (about a minute each) when pytest was started as `.venv/bin/python -m
# pytest` without the venv on PATH.
_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")

from tests._harness import PoolCache, settle_heap  # noqa: E402


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
    import importlib.util

    import torch

    skip_gpu = pytest.mark.skip(reason="needs CUDA and NCCL (runs on GPU machines only)")
    # Only the tests marked for a framework skip without it, not every test of their module.
    skip_missing = {name: pytest.mark.skip(reason=f"needs {name}: pip install 'dist_clip[{name}]'")
                    for name in ("deepspeed", "fairscale") if importlib.util.find_spec(name) is None}
    # By marker: item.keywords also holds parametrize ids ([deepspeed] in test_launchers reads environment
    # variables only, and was skipped without DeepSpeed).
    for item in items:
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        for name, skip in skip_missing.items():
            if item.get_closest_marker(name) is not None:
                item.add_marker(skip)


def pytest_collection_finish(session):
    """Move what collection imported (torch, DeepSpeed, hypothesis, every test module: ~500k objects) out of the
    cyclic collector's sight: each full collection of the tests' own run walked all of it. Frozen objects are still
    freed when their last reference goes; the rank pools freeze their heaps alike (tests/_harness.py)."""
    settle_heap()
