"""DeepSpeed gradients named by parameter: per-parameter and per-group clipping and reports at ZeRO 0-3.

ZeRO-1/2 keep one flat gradient partition per param group; the adapter cuts each rank's partition back into
one piece per parameter slice under the names of ``engine.module``. The bodies in ``tests/ds_names_cases.py``
compare norms per parameter (p = 2 and inf), per-parameter and per-group clipping and the parameters after
``step()`` with the float64 unsharded torch run, on 2 gloo ranks, with a weight split by the partition boundary.
ZeRO-3 pieces are whole parameters' partitions, named by module name; their param groups come from the stage-3
optimizer's own map (``fp16_groups``, ``sub_group_to_group_id``).
"""

from __future__ import annotations

import pytest

pytest.importorskip("deepspeed")

from tests import ds_names_cases  # noqa: E402

pytestmark = pytest.mark.deepspeed

TIMEOUT = 300


ALIGNED = {"parameter_alignment": True}
ROUND_ROBIN = {"round_robin_gradients": True, "parameter_alignment": True}


@pytest.mark.parametrize("stage,offload,zero_extra,groups", [
    (1, False, None, "layers"),
    (2, False, None, "layers"),
    (2, True, None, "layers"),
    (1, False, ALIGNED, "shuffled"),
    (2, False, ROUND_ROBIN, "shuffled"),
    (2, True, ROUND_ROBIN, "shuffled"),
    (0, False, None, "layers"),
], ids=["zero1", "zero2", "zero2-offload", "zero1-aligned", "zero2-roundrobin-aligned",
        "zero2-offload-roundrobin-aligned", "stage0"])
def test_per_param_report_and_clipping_match_unsharded(run_ranks, stage, offload, zero_extra, groups):
    run_ranks(2, ds_names_cases.case_names_vs_reference, stage, offload=offload, zero_extra=zero_extra,
              groups=groups, timeout_s=TIMEOUT)


@pytest.mark.parametrize("offload,groups", [(False, "layers"), (True, "layers"), (False, "shuffled")],
                         ids=["zero3", "zero3-offload", "zero3-shuffled-groups"])
def test_zero3_per_param_report_and_clipping_match_unsharded(run_ranks, offload, groups):
    # ZeRO-3 empties the torch optimizer's param groups between steps: mode="per_group" finds each parameter's
    # group through the stage-3 optimizer's fp16_groups and sub_group_to_group_id (groups out of module order
    # in "shuffled").
    run_ranks(2, ds_names_cases.case_names_vs_reference, 3, offload=offload, groups=groups, timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage", [2, 3])
def test_fp16_loss_scaled_partitions(run_ranks, stage):
    # The pieces hold loss-scaled fp16 gradients: the report and the per-parameter limits are unscaled. Norms of
    # the fp16 run's gradients vs the float64 model's: 1e-2 (fp16's rounding in forward and backward); against
    # DeepSpeed's own assembly of the same fp16 gradients: 1e-6 (the case checks both).
    run_ranks(2, ds_names_cases.case_names_vs_reference, stage, dtype="fp16", per_group=False, rtol=1e-2,
              timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage", [2, 1], ids=["zero2-compact", "zero1-bf16optimizer"])
def test_bf16_with_fp32_accumulation(run_ranks, stage):
    # ZeRO-2 keeps the fp32 partition in one compact buffer of views; ZeRO-1 hands this mix to BF16_Optimizer,
    # whose fp32 gradients are whole on every rank. Norms of bf16 gradients vs the float64 model: 3e-2.
    run_ranks(2, ds_names_cases.case_names_vs_reference, stage, dtype="bf16", grad_accum_dtype="fp32", rtol=3e-2,
              timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage,offload,zero_extra,groups", [
    (1, False, None, "layers"), (2, True, None, "layers"), (2, False, ALIGNED, "shuffled"),
    (2, True, ALIGNED, "shuffled"),
], ids=["zero1", "zero2-offload", "zero2-aligned", "zero2-offload-aligned"])
def test_zero12_pieces_cover_every_parameter_once(run_ranks, stage, offload, zero_extra, groups):
    run_ranks(2, ds_names_cases.case_layout, stage, offload=offload, zero_extra=zero_extra, groups=groups,
              timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage", [1, 2])
def test_checkpointed_and_compiled_blocks_keep_the_models_names(run_ranks, stage):
    for got in run_ranks(2, ds_names_cases.case_wrapped_block_names, stage):
        assert got["names"] == got["unitwise names"] == got["want"], got
        assert got["close"] and got["excluded"], got


def test_parameter_names_that_clash_once_unwrapped_are_refused(run_ranks):
    for got in run_ranks(2, ds_names_cases.case_names_that_clash, 2):
        assert got.startswith("two different tensors of the target are named 'weight'"), got


@pytest.mark.parametrize("stage", [1, 2])
def test_optimizer_tensors_are_built_for_per_group_only(run_ranks, stage):
    for counts in run_ranks(2, ds_names_cases.case_optimizer_tensors_built_for_per_group_only, stage,
                            timeout_s=TIMEOUT):
        assert counts == [0, 0, 1], counts
