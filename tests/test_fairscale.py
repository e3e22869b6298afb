"""dist_clip on fairscale 0.4.13: OSS + ShardedDataParallel, OSS + torch DDP, FullyShardedDataParallel.

Each test runs a body of ``tests/fairscale_cases.py`` on 2 spawned gloo ranks and compares dist_clip with the
float64 unsharded torch run (norm for p in {0, 1, 2, 3.5, inf}, parameters after ``step()``), with fairscale's
own clipping, and counts collectives. fairscale's FSDP needs CUDA; its tests run through a test-only stream
shim (``fairscale_cases.cpu_stream_shim``). Run with ``.venv/bin/python -m pytest tests/test_fairscale.py``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("fairscale")

from tests import fairscale_cases  # noqa: E402

pytestmark = pytest.mark.fairscale

TIMEOUT = 180
FSDP_SETUPS = [
    pytest.param("fsdp", {}, id="flat"),
    pytest.param("fsdp", {"flatten_parameters": False}, id="not-flat"),
    pytest.param("fsdp_nested", {}, id="nested-flat"),
    pytest.param("fsdp_nested", {"flatten_parameters": False}, id="nested-not-flat"),
]


@pytest.mark.parametrize("kind", ["oss_sdp", "oss_ddp"])
def test_oss_every_p_matches_unsharded_run(run_ranks, kind):
    run_ranks(2, fairscale_cases.case_vs_reference, kind, timeout_s=TIMEOUT)


@pytest.mark.parametrize("kind", ["oss_sdp", "oss_ddp"])
def test_oss_matches_fairscales_own_clipping(run_ranks, kind):
    run_ranks(2, fairscale_cases.case_vs_fairscale, kind, timeout_s=TIMEOUT)


def test_oss_bf16_norm_is_not_quantised(run_ranks):
    out = run_ranks(2, fairscale_cases.case_bf16_not_quantised, "oss_ddp", timeout_s=TIMEOUT)[0]
    assert all(v["fairscale_dtype"] == "torch.bfloat16" for v in out.values())


@pytest.mark.parametrize("kind,kwargs", FSDP_SETUPS)
def test_fsdp_every_p_matches_unsharded_run(run_ranks, kind, kwargs):
    run_ranks(2, fairscale_cases.case_vs_reference, kind, timeout_s=TIMEOUT, **kwargs)


@pytest.mark.parametrize("kind,kwargs", [FSDP_SETUPS[0], FSDP_SETUPS[3]])
def test_fsdp_matches_fairscales_own_clipping(run_ranks, kind, kwargs):
    run_ranks(2, fairscale_cases.case_vs_fairscale, kind, timeout_s=TIMEOUT, **kwargs)


@pytest.mark.parametrize("kind", ["oss_sdp", "fsdp"])
def test_inside_no_sync_is_refused_and_the_boundary_is_exact(run_ranks, kind):
    assert run_ranks(2, fairscale_cases.case_no_sync, kind, timeout_s=TIMEOUT) == [[True] * 4] * 2


def test_sdp_rank_owning_only_params_unused_in_the_step_is_measured_on_every_rank(run_ranks):
    out = run_ranks(2, fairscale_cases.case_sdp_owner_of_unused_params, timeout_s=TIMEOUT)
    assert out[0] == out[1], out


def test_sdp_trainable_parameters_outside_its_oss_are_refused(run_ranks):
    out = run_ranks(2, fairscale_cases.case_sdp_trainable_outside_oss, timeout_s=TIMEOUT)
    assert out[0] == out[1] == [(True, 0, True)] * 4 * len(fairscale_cases.P_ALL), out


def test_sdp_trainable_parameters_it_does_not_reduce_are_refused(run_ranks):
    out = run_ranks(2, fairscale_cases.case_sdp_trainable_not_reduced, timeout_s=TIMEOUT)
    assert out[0] == out[1] == [("add_param_group", True, 0, True), ("no_refresh", True, 0, True),
                                ("unfrozen after the backward", True, True),
                                ("unfrozen after the backward", False, True)], out


def test_sdp_accumulation_outside_no_sync_is_fairscales_own_wrong_gradient(run_ranks):
    out = run_ranks(2, fairscale_cases.case_sdp_accumulation_without_no_sync, timeout_s=TIMEOUT)
    assert out[0] == out[1] == {"reference": 8.6732, f"{2**23}/plain": 8.3014, f"{2**23}/no_sync": 8.6732,
                                "0/plain": 6.2586, "0/no_sync": 8.6732}, out


def test_accumulation_is_exact_where_the_readme_says_so(run_ranks):
    out = run_ranks(2, fairscale_cases.case_accumulation_exact_where_readme_says, timeout_s=TIMEOUT)
    assert out[0] == out[1], out
    assert out[0]["oss_sdp 3 micro-batches buffer 8388608"] == (8.0178, 8.7607), out[0]


def test_sdp_forward_without_backward_after_the_backward_is_measured(run_ranks):
    out = run_ranks(2, fairscale_cases.case_sdp_forward_after_backward, timeout_s=TIMEOUT)
    assert out[0] == out[1], out


@pytest.mark.parametrize("kind", ["oss_ddp", "fsdp"])
def test_a_group_short_of_the_wrappers_ranks_or_a_non_root_target_is_refused(run_ranks, kind):
    out = run_ranks(4, fairscale_cases.case_refused_targets, kind, timeout_s=TIMEOUT)
    assert out == [[True] * (6 if kind == "fsdp" else 2)] * 4, out


def test_two_jobs_whose_wrappers_hold_distinct_groups_of_the_same_ranks(run_ranks):
    assert run_ranks(4, fairscale_cases.case_two_jobs_nested_groups, timeout_s=TIMEOUT) == [[(True, 1)] * 2] * 4


def test_fsdp_under_a_plan_is_refused_on_every_rank(run_ranks):
    assert run_ranks(2, fairscale_cases.case_fsdp_under_a_plan_is_refused, timeout_s=TIMEOUT) == [[True] * 7] * 2


def test_adapter_requires_fairscale_by_name(monkeypatch):
    import builtins

    from dist_clip.adapters import fairscale as adapter

    real_import = builtins.__import__

    def no_fairscale(name, *args, **kwargs):
        if name.split(".")[0] == "fairscale":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fairscale)
    with pytest.raises(ImportError, match=r"pip install dist_clip\[fairscale\]"):
        adapter.shards(object(), None)


def test_an_expert_over_a_one_rank_group_is_refused(run_ranks):
    for got in run_ranks(2, fairscale_cases.case_solo_expert_refused):
        assert got == [True] * 5, got


@pytest.mark.parametrize("kind,kwargs", [FSDP_SETUPS[0], FSDP_SETUPS[1]])
def test_fsdp_padding_poisoned_is_left_out(run_ranks, kind, kwargs):
    out = run_ranks(2, fairscale_cases.case_padding_poisoned, kind, timeout_s=TIMEOUT, **kwargs)
    assert any(r[0] for r in out), out  # some rank held padding: the poison checked something


def test_only_a_tensor_marked_as_fairscale_s_shard_is_refused():
    """refuse_managed reads fairscale FSDP's ``_is_sharded`` only beside its ``_orig_size`` (both set on each
    parameter it manages): another library's ``_is_sharded`` flag alone is not a fairscale shard."""
    import torch

    from dist_clip.adapters.params import refuse_managed

    other = torch.zeros(2)
    other._is_sharded = True  # type: ignore[attr-defined]
    refuse_managed("w", other)
    refuse_managed("w", other, plan=True)
    other._orig_size = torch.Size([4])  # type: ignore[attr-defined]
    for plan in (False, True):
        with pytest.raises(ValueError, match="sharded by fairscale"):
            refuse_managed("w", other, plan=plan)
