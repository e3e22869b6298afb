"""Small models of random widths (1-9) under FSDP2, HSDP, FSDP1 and DeepSpeed ZeRO 1-3, against the float64
unsharded reference.

The hand-made cases in tests/test_fsdp.py place one kind of shard each; these draw many at once from fixed
seeds (uneven rows, empty pieces, parameters smaller than the world, frozen layers, unsharded layers beside
sharded ones): total, per-parameter and AGC norms for p in {0, 1, 2, 3.5, inf}, and the clipped gradients.
Bodies: tests/random_cases.py. Run: ``.venv/bin/python -m pytest tests/test_random_models.py``.
"""

from __future__ import annotations

import pytest

from tests import random_cases as cases


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_fsdp2_random_models(run_ranks, world_size: int) -> None:
    for errors in run_ranks(world_size, cases.fsdp2_models, 6, False, timeout_s=240):
        assert not errors, errors[:10]


def test_hsdp_random_models(run_ranks) -> None:
    for errors in run_ranks(4, cases.fsdp2_models, 6, True, timeout_s=240):
        assert not errors, errors[:10]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_fsdp1_random_models(run_ranks, world_size: int) -> None:
    for errors in run_ranks(world_size, cases.fsdp1_models, 6, timeout_s=240):
        assert not errors, errors[:10]


def test_fsdp1_hybrid_and_mixed_random_models(run_ranks) -> None:
    for errors in run_ranks(4, cases.fsdp1_mixed_models, 4, timeout_s=300):
        assert not errors, errors[:10]


@pytest.mark.deepspeed
def test_deepspeed_random_models(run_ranks) -> None:
    pytest.importorskip("deepspeed")
    for errors in run_ranks(2, cases.deepspeed_models, 2, timeout_s=300):
        assert not errors, errors[:10]
