"""dist_clip on DeepSpeed engines: ZeRO 0-3, fp32/bf16/fp16, accumulation, offload, on spawned gloo ranks.

Each test runs a body of ``tests/ds_cases.py`` on every rank and compares dist_clip with the float64 unsharded
torch run (norm for p in {0, 1, 2, 3.5, inf}, and parameters after ``step()``), with DeepSpeed's own L2 norm
and ``gradient_clipping``, and counts the collectives of each call. Run with
``.venv/bin/python -m pytest tests/test_deepspeed.py`` (``DS_ACCELERATOR=cpu`` is set by conftest).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

from tests import ds_cases  # noqa: E402

pytestmark = pytest.mark.deepspeed

TIMEOUT = 300


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp32_every_p_matches_unsharded_run(run_ranks, stage):
    run_ranks(2, ds_cases.case_fp32_vs_reference, stage, timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_l2_matches_deepspeeds_own_clipping(run_ranks, stage):
    run_ranks(2, ds_cases.case_l2_vs_deepspeed, stage, timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage,gas,offload", [(1, 3, False), (2, 2, False), (3, 2, False), (2, 1, True), (3, 2, True)])
def test_accumulation_and_offload_match_unsharded_run(run_ranks, stage, gas, offload):
    run_ranks(2, ds_cases.case_fp32_vs_reference, stage, gas=gas, offload=offload, timeout_s=TIMEOUT)


#: ZeRO switches that change where and how DeepSpeed reduces and partitions the gradients: buckets far smaller
#: than a parameter (each cut between buckets and by the partition boundary), overlap on and off, non-contiguous
#: gradients, round-robin partitions, all-reduce instead of reduce-scatter with a predivide factor, persistence
#: thresholds, one sub-group per parameter, parameter offload.
ZERO_SWITCHES = {
    "zero1-allreduce-predivide": (1, {"reduce_scatter": False, "reduce_bucket_size": 16},
                                  {"gradient_predivide_factor": 4.0}),
    "zero2-tiny-buckets-overlap": (2, {"overlap_comm": True, "contiguous_gradients": False, "reduce_bucket_size": 16,
                                       "allgather_bucket_size": 16, "round_robin_gradients": True}, {}),
    "zero3-tiny-buckets": (3, {"overlap_comm": False, "reduce_bucket_size": 16, "stage3_prefetch_bucket_size": 16,
                               "stage3_param_persistence_threshold": 0, "sub_group_size": 10}, {}),
    "zero3-offload-param": (3, {"offload_param": {"device": "cpu"}, "stage3_param_persistence_threshold": 10**9,
                                "contiguous_gradients": False}, {}),
}


@pytest.mark.parametrize("name", list(ZERO_SWITCHES))
def test_zero_switches_match_unsharded_run(run_ranks, name):
    stage, zero, top = ZERO_SWITCHES[name]
    run_ranks(2, ds_cases.case_fp32_vs_reference, stage, ps=(2.0, math.inf, 1.0), zero_extra=zero, top_extra=top,
              timeout_s=TIMEOUT)
    run_ranks(2, ds_cases.case_fp32_vs_reference, stage, ps=(2.0,), hand_over=True, zero_extra=zero, top_extra=top,
              timeout_s=TIMEOUT)

@pytest.mark.parametrize("offload", [False, True])
def test_stage3_uneven_partitions_three_ranks(run_ranks, offload):
    run_ranks(3, ds_cases.case_fp32_vs_reference, 3, offload=offload, gas=2 if offload else 1, timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage,dtype,offload,accum", [
    (1, "bf16", False, None), (2, "bf16", False, None), (3, "bf16", False, None), (3, "bf16", True, None),
    (1, "bf16", False, "fp32"),
    (1, "fp16", False, None), (2, "fp16", False, None), (3, "fp16", False, None), (2, "fp16", True, None),
])
def test_low_precision_every_p(run_ranks, stage, dtype, offload, accum):
    run_ranks(2, ds_cases.case_lowp_vs_reference, stage, dtype, offload=offload, grad_accum_dtype=accum,
              timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage,dtype,accum", [(1, "bf16", None), (2, "bf16", None), (3, "bf16", None),
                                               (0, "bf16", None), (1, "bf16", "fp32"),
                                               (1, "fp16", None), (2, "fp16", None), (3, "fp16", None)])
def test_low_precision_l2_matches_deepspeed(run_ranks, stage, dtype, accum):
    run_ranks(2, ds_cases.case_l2_vs_deepspeed, stage, dtype=dtype, grad_accum_dtype=accum, rtol=1e-4,
              timeout_s=TIMEOUT)


def test_stage0_fp16_norm_matches_deepspeed(run_ranks):
    # DeepSpeed 0.19's engine.backward() does not scale the loss for its non-ZeRO fp16 wrapper, yet its step()
    # divides by the loss scale: the parameters of that configuration are DeepSpeed's business, the norm is ours.
    run_ranks(2, ds_cases.case_l2_vs_deepspeed, 0, dtype="fp16", rtol=1e-4, steps=1, compare_params=False,
              timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage,offload", [(1, False), (2, False), (3, False), (2, True), (3, True)])
def test_fp16_overflow_steps_are_skipped_like_deepspeed(run_ranks, stage, offload):
    run_ranks(2, ds_cases.case_fp16_overflow, stage, offload=offload, timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage,offload,dtype,call", [(3, False, "fp32", "plain"), (3, False, "fp16", "total"),
                                                    (2, True, "fp32", "plain"), (3, True, "fp32", "per_group"),
                                                    (1, False, "bf16", "plain"), (3, False, "fp32", "settle"),
                                                    (2, True, "fp32", "with_norm")])
def test_a_nan_batch_leaves_no_nan_in_the_slots_of_unused_parameters(run_ranks, stage, offload, dtype, call):
    run_ranks(2, ds_cases.case_nan_batch_beside_an_unused_parameter, stage, offload, dtype, call, timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_optimizer_argument_with_a_fused_torch_optimizer_clips_every_group(run_ranks, stage):
    assert run_ranks(2, ds_cases.case_fused_inner_optimizer, stage, timeout_s=TIMEOUT) == [True, True]


@pytest.mark.parametrize("stage,offload,dtype", [(1, False, "fp32"), (2, False, "fp32"), (3, False, "fp32"),
                                                 (2, True, "fp32"), (3, True, "fp32"), (2, False, "bf16"),
                                                 (0, False, "fp32"), (0, False, "bf16")])
def test_coefficient_folded_into_step_applies_to_one_step(run_ranks, stage, offload, dtype):
    assert run_ranks(2, ds_cases.case_fold_applies_to_one_step, stage, offload=offload, dtype=dtype,
                     timeout_s=TIMEOUT) == [True, True]


@pytest.mark.parametrize("stage,gas,offload", [(1, 1, False), (2, 2, False), (3, 1, False), (2, 1, True), (3, 2, True)])
def test_folded_into_step_matches_unsharded_run(run_ranks, stage, gas, offload):
    run_ranks(2, ds_cases.case_fp32_vs_reference, stage, gas=gas, offload=offload, ps=(2.0, float("inf")),
              hand_over=True, timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage,offload", [(1, False), (2, False), (3, False), (2, True), (3, True)])
def test_folded_coefficient_of_a_dropped_batch_is_not_applied_to_the_next(run_ranks, stage, offload):
    assert run_ranks(2, ds_cases.case_fold_dropped_with_its_batch, stage, offload=offload,
                     timeout_s=TIMEOUT) == [True, True]


@pytest.mark.parametrize("stage,offload", [(2, False), (3, False), (2, True), (3, True)])
def test_a_read_after_a_dropped_batch_drops_its_folded_coefficient(run_ranks, stage, offload):
    """A dist_clip call reading the next batch's gradients before engine.step() settles the pending hand-over:
    it must drop it (they are not the measured ones), not apply it to them (ZeRO-3, offload: total 0.3)."""
    assert run_ranks(2, ds_cases.case_fold_dropped_with_its_batch, stage, offload=offload, read_first=True,
                     timeout_s=TIMEOUT) == [True, True]


@pytest.mark.parametrize("stage,offload", [(1, False), (2, False), (3, False), (2, True)])
def test_folded_into_step_with_deepspeeds_own_clipping_on(run_ranks, stage, offload):
    """DeepSpeed's default gradient_clipping is 1.0: its clip in step() used the norm it measured before our
    coefficient reached the gradients, and so clipped the clipped gradients again (8x too small a step here)."""
    run_ranks(2, ds_cases.case_fp32_vs_reference, stage, offload=offload, ps=(2.0,), hand_over=True, ds_clip=1.0,
              timeout_s=TIMEOUT)


def test_folded_into_step_three_ranks_uneven(run_ranks):
    run_ranks(3, ds_cases.case_fp32_vs_reference, 3, ps=(2.0,), hand_over=True, timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage,dtype", [(1, "bf16"), (2, "fp16"), (3, "bf16"), (3, "fp16")])
def test_folded_into_step_low_precision_matches_deepspeed(run_ranks, stage, dtype):
    run_ranks(2, ds_cases.case_l2_vs_deepspeed, stage, dtype=dtype, rtol=1e-4, hand_over=True, timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage,offload", [(2, False), (3, True)])
def test_folded_into_step_fp16_overflow_skips(run_ranks, stage, offload):
    run_ranks(2, ds_cases.case_fp16_overflow, stage, offload=offload, hand_over=True, timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_policy_leaves_fp16_overflow_to_deepspeed(run_ranks, stage):
    run_ranks(2, ds_cases.case_fp16_overflow, stage, policy="zero", timeout_s=TIMEOUT)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_stage0_hand_over_to_the_fused_torch_optimizer_counts_a_skip_and_skips_only_it(run_ranks, dtype):
    run_ranks(2, ds_cases.case_stage0_fused_hand_over_counts_a_skipped_step, dtype, timeout_s=TIMEOUT)


@pytest.mark.parametrize("dtype,target", [("bf16", "engine.module"), ("fp16", "parameters()")])
def test_stage0_wrapper_torch_optimizer_with_a_module_target_skips_only_the_nan_step(run_ranks, dtype, target):
    run_ranks(2, ds_cases.case_stage0_wrapper_torch_optimizer_with_a_module_target, dtype, target,
              timeout_s=TIMEOUT)


def test_zero_policy_leaves_a_stage_0_fp16_overflow_to_deepspeed(run_ranks):
    run_ranks(2, ds_cases.case_stage0_fp16_nan_batch, timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage,dtype,accum", [(0, "fp32", None), (0, "bf16", None), (1, "bf16", "fp32"),
                                               (1, "fp32", None), (3, "fp32", None)])
def test_a_group_spanning_model_parallel_ranks(run_ranks, stage, dtype, accum):
    results = run_ranks(4, ds_cases.case_mpu_group_spanning_model_parallel, stage, dtype, accum, timeout_s=TIMEOUT)
    assert results == [[True] * 6] * 4, results


def test_an_mpu_naming_its_group_get_tensor_model_parallel_group(run_ranks):
    results = run_ranks(4, ds_cases.case_mpu_group_spanning_model_parallel, 0, "fp32", None, True,
                        timeout_s=TIMEOUT)
    assert results == [[True] * 6] * 4, results


def test_the_pipeline_engine_is_refused_on_every_rank(run_ranks):
    assert run_ranks(2, ds_cases.case_pipeline_engine_is_refused, timeout_s=TIMEOUT) == [[True] * 3] * 2


def test_a_zero_module_under_a_plan_is_refused_on_every_rank(run_ranks):
    assert run_ranks(2, ds_cases.case_zero_module_under_a_plan_is_refused, timeout_s=TIMEOUT) == [[True] * 12] * 2


def test_the_bf16_optimizers_module_is_refused_and_stage_0s_is_measured_under_a_plan(run_ranks):
    assert run_ranks(2, ds_cases.case_bf16_optimizer_module_is_refused, timeout_s=TIMEOUT) == [
        [("BF16_Optimizer", 9.8212)] + [True] * 6 + [1.0, 1.0, True] * 2] * 2


@pytest.mark.parametrize("dtype,accum", [("bf16", None), ("fp32", None), ("bf16", "fp32")])
def test_a_trainable_layer_outside_the_optimizer_on_the_replicated_wrappers(run_ranks, dtype, accum):
    results = run_ranks(2, ds_cases.case_outside_the_optimizer_on_replicated_wrappers, dtype, accum,
                        timeout_s=TIMEOUT)
    assert results == [[True]] * 2, results


@pytest.mark.parametrize("stage,dtype,accum", [(1, "fp32", None), (2, "fp32", None), (2, "bf16", None),
                                               (1, "bf16", "fp32"), (0, "fp32", None)])
def test_a_zero_element_parameter_is_not_taken_for_one_outside_the_optimizer(run_ranks, stage, dtype, accum):
    """DeepSpeed 0.19.8 leaves trainable zero-element parameters (a device marker) out of its groups: they were
    refused as parameters in no param group (ValueError on every rank), though they hold no gradient element."""
    assert run_ranks(2, ds_cases.case_zero_element_parameter, stage, dtype, accum, timeout_s=TIMEOUT) == [
        [True] * 4] * 2


@pytest.mark.parametrize("stage,offload,hand_over,what", [
    (1, False, False, "max_norm"), (2, False, False, "max_norm"), (3, False, False, "max_norm"),
    (2, True, False, "total"), (3, True, False, "total"), (2, False, True, "total"), (3, False, True, "total")])
def test_get_global_grad_norm_after_the_clip_is_as_the_readme_says(run_ranks, stage, offload, hand_over, what):
    """README: ZeRO 1-3 without offload measure after the plain call's scaling (ZeRO-3 was left out of the list),
    the offloaded ones in backward and the hand-over before the coefficient applies."""
    results = run_ranks(2, ds_cases.case_global_grad_norm_after_the_clip, stage, offload, hand_over,
                        timeout_s=TIMEOUT)
    assert results[0] == results[1] and results[0][1] == what, results


def test_internals_still_exist_and_misuse_is_loud(run_ranks):
    run_ranks(2, ds_cases.case_contract, timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_parameter_unfrozen_after_first_call_is_refused(run_ranks, stage):
    assert run_ranks(2, ds_cases.case_unfrozen_after_first_call, stage, timeout_s=TIMEOUT) == [True, True]


@pytest.mark.parametrize("stage,dtype,offload", [(0, "fp32", False), (1, "fp32", False), (2, "fp32", False),
                                                 (3, "fp32", False), (0, "bf16", False), (3, "fp32", True)])
def test_call_before_the_boundary_backward_is_refused(run_ranks, stage, dtype, offload):
    run_ranks(2, ds_cases.case_call_before_boundary_backward, stage, dtype=dtype, offload=offload, timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage,dtype,accum,offload", [(0, "fp32", None, False), (0, "bf16", None, False),
                                                       (1, "bf16", "fp32", False), (1, "fp32", None, False),
                                                       (2, "fp32", None, False), (3, "fp32", None, False),
                                                       (3, "fp32", None, True)])
def test_manual_boundary_call_before_the_last_backward_is_refused(run_ranks, stage, dtype, accum, offload):
    results = run_ranks(2, ds_cases.case_manual_boundary_before_last_backward, stage, dtype, accum, offload,
                        timeout_s=TIMEOUT)
    assert results[0] == results[1], results


@pytest.mark.parametrize("stage,dtype,accum", [(0, "fp32", None), (0, "bf16", None), (1, "bf16", "fp32"),
                                               (1, "fp32", None)])
def test_a_call_after_a_backward_inside_no_sync_is_refused(run_ranks, stage, dtype, accum):
    results = run_ranks(2, ds_cases.case_no_sync, stage, dtype, accum, timeout_s=TIMEOUT)
    assert results == [["no_sync", "no_sync", True]] * 2, results


def test_version_guard(monkeypatch):
    from dist_clip.adapters import deepspeed as adapter

    adapter.check_version()  # the installed release is a tested one
    adapter.check_version("0.19.8")
    with pytest.raises(RuntimeError, match="tested with DeepSpeed 0.19.x, found 0.20.0"):
        adapter.check_version("0.20.0")
    monkeypatch.setenv(adapter.ALLOW_UNTESTED_ENV, "1")
    adapter.check_version("0.20.0")


_BLOCKED = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("deepspeed", "fairscale"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
import torch, dist_clip
g = torch.ones(4, requires_grad=True); g.grad = torch.full((4,), 3.0)
assert abs(float(dist_clip.clip_grad_norm_([g], 1.0)) - 6.0) < 1e-6
assert "deepspeed" not in sys.modules and "fairscale" not in sys.modules
from dist_clip.adapters import deepspeed as ds_adapter, fairscale as fs_adapter
for adapter, extra in ((ds_adapter, "dist_clip[deepspeed]"), (fs_adapter, "dist_clip[fairscale]")):
    try:
        adapter.shards(object(), None)
    except ImportError as e:
        assert extra in str(e), str(e)
    else:
        raise AssertionError("no ImportError")
print("ok")
"""


def test_optional_imports_stay_lazy():
    """``import dist_clip`` and clipping plain tensors work with neither package; the adapters name the extra."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _BLOCKED], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("stage", [2, 3])
def test_bad_input_on_one_rank_is_refused_on_every_rank(run_ranks, stage):
    a, b = run_ranks(2, ds_cases.case_bad_input_on_one_rank, stage, timeout_s=TIMEOUT)
    assert a == ["refused", True, "TypeError", True], a
    assert b == ["ValueError", True, "refused", True], b


def test_bf16_optimizer_reads_only_the_gradients_it_holds(run_ranks):
    names = [f"net.{i}.{w}" for i in (0, 2, 4) for w in ("bias", "weight")]
    want = {"reported": sorted(names), "after step": True}
    assert run_ranks(2, ds_cases.case_bf16_optimizer_reads_only_gradients_it_holds, timeout_s=TIMEOUT) == [want] * 2


@pytest.mark.parametrize("stage,dtype,accum", [(1, "bf16", "fp32"), (2, "bf16", "fp32"), (1, "bf16", None),
                                               (2, "fp16", "fp32")])
def test_skip_with_offload_and_fp32_accumulation_steps_the_next_batches(run_ranks, stage, dtype, accum):
    out = run_ranks(2, ds_cases.case_skip_then_steps_with_offload_and_fp32_accumulation, stage, dtype, accum,
                    timeout_s=TIMEOUT)
    assert out == [[(True, 0), (False, 1), (True, 1), (True, 1), True]] * 2, out


@pytest.mark.parametrize("stage,dtype", [(1, "bf16"), (2, "fp16")])
def test_deepspeed_own_overflow_with_offload_and_fp32_accumulation_keeps_the_nan_without_a_skip(run_ranks, stage,
                                                                                                dtype):
    """README: without dist_clip's skip (no hook), DeepSpeed 0.19.8's own overflow check (fp16, and bf16 whose
    check_grad_overflow is on by default) keeps the NaN batch in its fp32 accumulation buffer under offload:
    every later step reads NaN and is skipped. on_nonfinite="skip" (above) is the remedy."""
    out = run_ranks(2, ds_cases.case_skip_then_steps_with_offload_and_fp32_accumulation, stage, dtype, "fp32",
                    "ignore", timeout_s=TIMEOUT)
    assert out == [[(True, 0), (False, 1), (False, 2), (False, 3), False]] * 2, out


@pytest.mark.parametrize("stage,dtype,accum,offload", [(1, "bf16", "fp32", True), (2, "fp32", None, True),
                                                       (3, "bf16", "fp32", True), (3, "bf16", None, False),
                                                       (3, "fp16", None, False)])
def test_skip_steps_the_next_batches_that_leave_out_a_layer(run_ranks, stage, dtype, accum, offload):
    out = run_ranks(2, ds_cases.case_skip_then_steps_without_a_layer, stage, dtype, accum, offload,
                    timeout_s=TIMEOUT)
    assert out == [[(True, 0), (False, 1), (True, 1), (True, 1), True, True]] * 2, out



@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeeds_muon_at_zero_1_2_is_refused_on_every_rank(run_ranks, stage):
    assert run_ranks(2, ds_cases.case_deepspeed_muon_zero12_refused, stage, timeout_s=TIMEOUT) == [[True] * 3] * 2


def test_deepspeeds_muon_under_bf16_optimizer_is_measured_not_refused(run_ranks):
    """README: ZeRO-1's BF16_Optimizer (bf16, fp32 gradient accumulation) runs Muon in step(), so the gradients
    are there to measure, unlike ZeRO 1-2's own optimizer, which is refused."""
    assert run_ranks(2, ds_cases.case_deepspeed_muon_bf16_optimizer_is_measured, timeout_s=TIMEOUT) == [[True] * 2] * 2


@pytest.mark.parametrize("stage,offload", [(3, False), (2, True), (3, True)])
def test_hand_over_with_deepspeeds_muon_scales_the_gradients_not_the_update(run_ranks, stage, offload):
    assert run_ranks(2, ds_cases.case_deepspeed_muon_hand_over, stage, offload, timeout_s=TIMEOUT) == [[True] * 3] * 2


@pytest.mark.parametrize("stage,offload", [(3, False), (2, True), (3, True)])
def test_a_skip_with_deepspeeds_muon_leaves_its_momentum_alone(run_ranks, stage, offload):
    assert run_ranks(2, ds_cases.case_deepspeed_muon_skip, stage, offload, timeout_s=TIMEOUT) == [[True] * 3] * 2


@pytest.mark.parametrize("stage,offload", [(2, True), (1, True), (3, False)])
def test_a_call_inside_coalesce_grad_reduction_is_refused(run_ranks, stage, offload):
    results = run_ranks(2, ds_cases.case_call_inside_coalesce_grad_reduction, stage, offload, timeout_s=TIMEOUT)
    assert results == [[True, True]] * 2, results


@pytest.mark.parametrize("stage,call", [(1, "plain"), (2, "plain"), (2, "hand_over"), (2, "skip"), (2, "per_param"),
                                        (2, "unitwise"), (1, "deepspeed"), (2, "deepspeed"),
                                        (0, "plain"), (0, "hand_over"), (0, "skip"), (0, "per_param"),
                                        (0, "unitwise")])
def test_moe_experts_match_unsharded_run(run_ranks, stage, call):
    """DeepSpeed MoE: 4 experts, 2 on each of 2 expert-parallel ranks (each its own expert-data-parallel group).
    The adapter refused every MoE engine; its experts' local names (``deepspeed_experts.0`` on both ranks, two
    different experts) would have merged two experts into one slot in the per-parameter modes."""
    run_ranks(2, ds_cases.case_moe_vs_reference, stage, call, timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage,offload", [(2, False), (0, False), (2, True)])
def test_moe_per_group_numbers_the_expert_groups_by_name(run_ranks, stage, offload):
    """A second MoE layer of ep_size 1 beside the ep_size 2 one: a dense and two expert param groups, which DeepSpeed
    lists in the order a Python set iterates their names (rank 1 lists them reversed, as a process of another
    PYTHONHASHSEED may). Numbered as listed, every per_group call was a RuntimeError on every rank; numbered by
    name, each group's coefficient is the float64 model's and the parameters after 2 steps match it (ZeRO-Offload
    too). Rank 1 giving one of the groups another max_norm still raises on both ranks."""
    results = run_ranks(2, ds_cases.case_moe_vs_reference, stage, "per_group", second_ep=1, permuted=True,
                        offload=offload, timeout_s=TIMEOUT)
    assert results[0]["group_order"] != results[1]["group_order"], results
    assert [r["refused"] for r in results] == [True, True], results


@pytest.mark.parametrize("stage,call", [(2, "plain"), (0, "per_param")])
def test_moe_experts_all_on_every_rank(run_ranks, stage, call):
    """ep_size 1: every rank holds all 4 experts, partitioned (stage 0: all-reduced) over the whole world."""
    run_ranks(2, ds_cases.case_moe_vs_reference, stage, call, ep_size=1, timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage,call,experts,hid", [(2, "plain", 4, 7), (1, "per_param", 4, 7),
                                                   (2, "unitwise", 2, 6), (1, "per_param", 2, 6),
                                                   (0, "plain", 4, 7), (0, "unitwise", 2, 6)])
def test_moe_experts_over_two_expert_data_parallel_replicas(run_ranks, stage, call, experts, hid):
    """4 ranks, ep_size 2: each expert partitioned over an expert-data-parallel group of 2 ranks ({0, 2} and
    {1, 3}), the dense parameters over all 4. One 6x6 expert per rank (42 elements, padded to 44): the partition
    boundary cuts a row of its weight, whose unit-wise (AGC) norm is then summed over the ranks by name."""
    run_ranks(4, ds_cases.case_moe_vs_reference, stage, call, ps=(2.0, math.inf), experts=experts, hid=hid,
              timeout_s=TIMEOUT)


@pytest.mark.parametrize("stage,dtype,accum", [(0, "bf16", None), (1, "bf16", "fp32")])
def test_moe_where_expert_gradients_are_not_read_is_refused(run_ranks, stage, dtype, accum):
    assert run_ranks(2, ds_cases.case_moe_refused, stage, dtype, accum, timeout_s=TIMEOUT) == [[True] * 3] * 2
