"""Random layouts under a ParallelPlan, real tensor-parallel/FSDP2 modules under a plan, and fairscale around
random models, against the float64 unsharded reference, on 2-4 gloo ranks.

The hand-made cases of tests/test_compose.py and tests/test_fairscale.py place one kind of piece each; these draw
many at once from fixed seeds: meshes of pp/tp/dp/ep dims (size-1 dims, two jobs side by side with ``group=``),
``Shard(d)`` on random dims with uneven and empty pieces as DTensors or hand-cut plain tensors, ``Replicate``
copies, stages holding nothing, experts on one ep coordinate, tied copies; ``parallelize_module`` column/row
layers beside ``fully_shard`` ones; fairscale OSS (ShardedDataParallel, either reduce buffer, or DDP) and FSDP
(flat or not, nested or not, reshard_after_forward, mixed precision). Checked: totals and per-parameter norms for
p in {0, 1, 2, 3.5, inf}, clipped gradients (total, per_param, per_group, foreach), bf16 and fp16 gradients, one
collective per plan measurement, AutoClip and ZClip, ``debug=True``, non-finite gradients under "error" and "skip"
(plans) and ``error_if_nonfinite`` (fairscale), AGC norms (fairscale). A failure names its seed; ``scratch``-style
drivers replay any seed range with ``plan_cases.random_plans(seeds)``, ``plan_cases.random_modules(seeds)`` or
``random_cases.fairscale_models(seeds)``. Bodies: tests/plan_cases.py, tests/random_cases.py.
Run: ``.venv/bin/python -m pytest tests/test_random_plans.py``.
"""

from __future__ import annotations

import pytest

from tests import plan_cases, random_cases


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_random_layouts_under_a_plan(run_ranks, world_size: int) -> None:
    for errors in run_ranks(world_size, plan_cases.random_plans, list(range(6)), timeout_s=240):
        assert not errors, errors[:10]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_random_tensor_parallel_and_fsdp2_modules_under_a_plan(run_ranks, world_size: int) -> None:
    for errors in run_ranks(world_size, plan_cases.random_modules, list(range(4)), timeout_s=240):
        assert not errors, errors[:10]


@pytest.mark.fairscale
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_fairscale_random_models(run_ranks, world_size: int) -> None:
    pytest.importorskip("fairscale")
    for errors in run_ranks(world_size, random_cases.fairscale_models, list(range(5)), timeout_s=240):
        assert not errors, errors[:10]
