"""FSDP adapters (issue 3): dist_clip on FSDP2 (``fully_shard``) and FSDP1 models, on 2, 3 and 4 gloo ranks.

Every case is checked three ways for p in {0, 1, 2, 3.5, inf} (see tests/fsdp_cases.py, which runs on the
ranks): the total norm and the clipped gradients against the float64 unsharded reference, the parameters after
one SGD step against the unsharded model stepped the same way, and the wrapper's own clipping. dist_clip must
issue exactly one collective per call (none where every gradient is replicated). The wrapper's own clipping
must be right except in the cases named in ``wrapper_wrong`` below, where the test checks that it is indeed
wrong, so that the list stays true. The last section puts the wrappers' switches (DDP's static graph and
communication hooks among them) through the same checks and four clipped steps (``cases.clipped_steps``).

Run: ``.venv/bin/python -m pytest tests/test_fsdp.py`` (35 s on two idle cores; 3 pools of 2, 3, 4 ranks).
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests import fsdp_cases as cases

RTOL = cases.RTOL

# The wrapper's own clipping, where it is not right (torch 2.13). Each reason is checked to still hold.
P0_TORCH = "torch's p=0 counts the gradients with a non-zero norm, not the non-zero entries"
P0_FSDP1 = "FSDP1.clip_grad_norm_ raises ZeroDivisionError for p=0 (it takes the (1/p)-th power)"
MIXED_TENSORS = "torch's clip raises on DTensor and plain gradients together (aten._foreach_norm: mixed Tensor/DTensor)"
MIXED_MESHES = "torch's clip raises on gradients from different meshes (pytorch/pytorch#180346: aten.stack)"
EMPTY_INF = "torch's inf norm raises on a rank holding an empty shard while the other ranks hang in the collective"
PARTIAL_MAX = "torch's inf norm comes back as a Partial(max) DTensor: to_local() is the rank-local max"
BF16_NORM = "torch returns the norm of bf16 gradients in bf16: rounded to 8 significant bits"
MIXED_GROUPS = "FSDP1.clip_grad_norm_ reduces every partial over the root's group: hybrid beside other strategies"


def wrapper_wrong(wrapper: str, p: float, *, plain: bool = False, meshes: bool = False, empty: bool = False,
                  bf16: bool = False, no_shard: bool = False, mixed_groups: bool = False) -> str | None:
    """Why the wrapper's own clip is wrong for this case, or None where it must match the reference."""
    if wrapper == "ddp":  # torch's clip on DDP's replicated gradients
        return P0_TORCH if p == 0 else None
    if wrapper == "fsdp1":
        if p == 0:
            return P0_TORCH if no_shard else P0_FSDP1  # all-NO_SHARD models fall back to torch's clip
        if mixed_groups and not math.isinf(p):  # (a max taken over more ranks than needed is still the max)
            return MIXED_GROUPS
        return BF16_NORM if bf16 and not math.isinf(p) else None  # (the largest bf16 entry is its own max)
    if math.isinf(p) and empty:
        return EMPTY_INF  # checked first by the rank bodies, which do not call the wrapper then
    if plain:
        return MIXED_TENSORS
    if meshes:
        return MIXED_MESHES
    if p == 0:
        return P0_TORCH
    if math.isinf(p):
        return PARTIAL_MAX
    if bf16:
        return BF16_NORM
    return None


def check(results: list[dict[str, Any]], wrapper: str | None, **flags: bool) -> None:
    """What the ranks reported: one answer on every rank, and the wrapper right or wrong as named."""
    ranks = [r["per_p"] for r in results]
    for p, entry in ranks[0].items():
        values = [r[p]["ours"] for r in ranks]
        assert all(v == values[0] for v in values), f"p={p}: ranks disagree: {values}"
        assert math.isclose(values[0], entry["ref"], rel_tol=RTOL), (p, values[0], entry["ref"])
        if wrapper is None:
            continue
        reason = wrapper_wrong(wrapper, p, **flags)
        errors = [r[p].get("wrapper_error") for r in ranks]
        if reason is None:
            assert not any(errors), f"p={p}: the wrapper failed: {errors}"
            for r in ranks:
                assert math.isclose(r[p]["wrapper"], r[p]["ref"], rel_tol=RTOL), (p, r[p])
                assert r[p]["wrapper_grads_ok"], f"p={p}: the wrapper's clipped grads differ from the reference"
                assert r[p]["count"] <= r[p]["wrapper_count"], (p, r[p]["count"], r[p]["wrapper_count"])
            continue
        if reason == EMPTY_INF:
            assert all(e == cases.EMPTY_INF for e in errors), (p, errors)
        elif reason in (MIXED_TENSORS, MIXED_MESHES, P0_FSDP1):
            marker = {MIXED_TENSORS: "mixed torch.Tensor and DTensor", MIXED_MESHES: "must have the same mesh",
                      P0_FSDP1: "ZeroDivisionError"}[reason]
            assert all(e and marker in e for e in errors), f"p={p}: expected '{reason}', got {errors}"
        elif reason == PARTIAL_MAX:
            assert all("Partial(max)" in r[p]["wrapper_returns"] for r in ranks), [r[p] for r in ranks]
            locals_ = [r[p]["wrapper_local"] for r in ranks]
            assert any(not math.isclose(v, entry["ref"], rel_tol=RTOL) for v in locals_), (
                f"p={p}: every rank-local value is right now ({locals_}): update PARTIAL_MAX"
            )
            for r in ranks:  # full_tensor() and the clipped gradients are right
                assert math.isclose(r[p]["wrapper"], r[p]["ref"], rel_tol=RTOL) and r[p]["wrapper_grads_ok"], r[p]
        elif reason == P0_TORCH:
            for r in ranks:
                assert r[p]["wrapper"] == r[p]["grad_tensors"] != r[p]["ref"], (p, r[p])
        elif reason == MIXED_GROUPS:
            values = [r[p]["wrapper"] for r in ranks]
            assert not any(math.isclose(v, entry["ref"], rel_tol=RTOL) for v in values), f"p={p}: {values}"
            assert not any(r[p]["wrapper_grads_ok"] for r in ranks), f"p={p}: update MIXED_GROUPS"
        elif reason == BF16_NORM:
            for r in ranks:
                assert not math.isclose(r[p]["wrapper"], r[p]["ref"], rel_tol=RTOL), f"p={p}: update BF16_NORM"
                assert math.isclose(r[p]["wrapper"], r[p]["ref"], rel_tol=2.0**-8), (p, r[p])
                assert r[p]["wrapper_grads_ok"], (p, r[p])


# --------------------------------------------------------------------------------------------------- FSDP2


@pytest.mark.parametrize(
    ("world_size", "shard_root", "wide"),
    [(2, True, False), (3, True, False), (4, True, False), (2, False, False), (4, False, False), (3, True, True)],
    ids=["ws2", "ws3", "ws4", "ws2-plain-root", "ws4-plain-root", "ws3-no-empty-shards"],
)
def test_fsdp2_1d_mesh(run_ranks, world_size: int, shard_root: bool, wide: bool) -> None:
    """1-D mesh; uneven and empty shards unless ``wide``; ``plain-root``: parameters left unsharded."""
    results = run_ranks(world_size, cases.fsdp2_1d, shard_root, wide)
    check(results, "torch", plain=not shard_root, empty=not wide)


@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp2_frozen_block(run_ranks, world_size: int) -> None:
    """Frozen DTensor parameters count as parameters without gradients, not as gradients."""
    results = run_ranks(world_size, cases.fsdp2_frozen_block)
    assert all(r == results[0] for r in results)


@pytest.mark.parametrize("kind", ["fsdp2", "fsdp1", "ddp"])
def test_compiled_and_checkpointed_models_keep_their_names(run_ranks, kind: str) -> None:
    """torch.compile and activation checkpointing around or inside the wrapper: exact norms under the
    unwrapped model's parameter names, per parameter and for AGC."""
    results = run_ranks(2, cases.wrapped_names, kind)
    assert results[0]["names"] == results[1]["names"]
    assert all(r["fsdp1_plan_kept"] is (kind == "fsdp1") for r in results)


@pytest.mark.parametrize("alias_first", [False, True])
@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_module_under_several_parents_keeps_its_first_name(run_ranks, use_orig_params: bool,
                                                                 alias_first: bool) -> None:
    """A block registered as ``shared``, ``enc.0`` and ``dec.1`` in its own FSDP1 units: named ``shared.lin.*``,
    as in the unwrapped model (``dec.1.lin.*`` before), for the report, the slots and AGC's ``exclude=``.
    ``alias_first``: a block registered as ``last`` and then ``dec.1``, inside one unit wrapping ``dec``: named
    ``last.lin.*`` (the unit's own names gave ``dec.1.lin.*``)."""
    results = run_ranks(2, cases.fsdp1_shared_module_names, use_orig_params, alias_first)
    shared = "last" if alias_first else "shared"
    assert results[0]["names"] == results[1]["names"]
    assert f"{shared}.lin.weight" in results[0]["names"] and not any(n.startswith(("enc.", "dec.1.")) for n in
                                                                     results[0]["names"])
    if use_orig_params:  # the excluded weight's gradient (whole per-parameter .grad views) is untouched by AGC
        held = [r["kept"][f"{shared}.lin.weight"] for r in results if f"{shared}.lin.weight" in r["kept"]]
        assert held and all(held), results  # (a rank whose shard holds none of it has no .grad for it)
        assert not all(r["kept"]["inp.weight"] for r in results), results


def test_fsdp2_hsdp(run_ranks) -> None:
    """2x2 HSDP mesh (replicate x shard): one collective over the shard group, replicas counted once."""
    check(run_ranks(4, cases.fsdp2_hsdp), "torch", empty=True)


@pytest.mark.parametrize(
    ("world_size", "plain_root"), [(2, False), (3, True), (4, True), (4, False)],
    ids=["ws2", "ws3-plain-root", "ws4-plain-root", "ws4"],
)
def test_fsdp2_mixed_meshes(run_ranks, world_size: int, plain_root: bool) -> None:
    """Blocks on a 1-D mesh, an HSDP mesh and a slice of it in one model (torch's clip raises there)."""
    results = run_ranks(world_size, cases.fsdp2_mixed_meshes, plain_root)
    check(results, "torch", plain=plain_root, meshes=True, empty=True)


@pytest.mark.parametrize(
    ("world_size", "storage", "reduce"),
    [(2, "fp32", "fp32"), (2, "fp32", "bf16"), (3, "fp32", "bf16"), (2, "bf16", "fp32"), (3, "bf16", "bf16")],
)
def test_fsdp2_mixed_precision(run_ranks, world_size: int, storage: str, reduce: str) -> None:
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32 or bf16), fp32 or bf16 parameters."""
    results = run_ranks(world_size, cases.fsdp2_mixed_precision, storage, reduce)
    check(results, "torch", empty=True, bf16=storage == "bf16")


def test_dtensor_placements(run_ranks) -> None:
    """Hand-made DTensors: Shard x Shard, _StridedShard, Replicate x Replicate, HSDP, sibling slices, Partial."""
    results = run_ranks(4, cases.dtensor_placements)
    assert all(r == results[0] for r in results), "ranks disagree"
    assert results[0]["partial"].startswith("gradient of")


def test_a_refusal_names_the_first_gradient_of_the_refused_layout(run_ranks) -> None:
    """The refusals of a group= missing a rank that holds another shard, and of a Partial gradient, name the first
    gradient of the refused layout (dtensor_shards reads each layout once, through its first gradient's spec),
    not the call's first gradient."""
    for missing, partial in run_ranks(2, cases.refusals_name_the_layouts_gradient):
        assert missing.startswith("group= holds ranks ") and "gradient of '1' is sharded over ranks [0, 1]" in missing
        assert partial.startswith("gradient of '1' has placements (Partial(sum),)"), partial


@pytest.mark.parametrize("how", ["total", "clip", "total-lone", "clip-lone", *cases.PARTIAL_CLIPPERS])
def test_a_partial_gradient_on_one_rank_is_refused_where_another_holds_none(run_ranks, how) -> None:
    """A Partial gradient of a module's DTensor parameter on rank 1, none on rank 0 (a stand-in there): rank 1
    refused alone, without joining the collective rank 0's plan makes (its own target did not resolve), so rank
    0's call met rank 1's next one (rank 0 returned 4.899, the next call's total, and then hung in its next call;
    a GradClipper's call read the next call's settings as a disagreement, or gloo aborted the process on its
    length, and "unitwise" raised NotImplementedError, "placements differ", alone). The refusing rank plans as if
    it held no gradient of that parameter and joins: every rank raises, and the next call is every rank's next
    call (sqrt(24) = 4.899, b's copies summed over the world), in every GradClipper mode and policy too, and
    with the parameter itself as the target ("-lone")."""
    assert run_ranks(2, cases.partial_on_one_rank_none_on_another, how) == [
        ["RefusedElsewhere", "4.8990"], ["ValueError", "4.8990"]]


@pytest.mark.parametrize("how", cases.LISTED_PARTIAL)
def test_a_partial_gradient_listed_on_one_rank_is_refused_on_every_rank(run_ranks, how) -> None:
    """A list of gradients (no parameters) holding a Partial one on rank 1 only, beside a Shard(0) one on both:
    rank 1 refused alone (its list did not resolve, so it planned nothing to join), rank 0's collective met rank 1's
    next call (get_total_norm returned 4.0 on rank 0, and its next call failed in gloo; a GradClipper read the next
    call's settings as a disagreement). The refusing rank plans the list without its Partial gradients, as rank 0
    lists them, and joins: rank 0 raises RefusedElsewhere, rank 1 the ValueError, the next call sqrt(24) on both."""
    assert run_ranks(2, cases.partial_gradient_listed_on_one_rank, how) == [
        ["RefusedElsewhere", "4.8990"], ["ValueError", "4.8990"]]


@pytest.mark.parametrize("how", cases.NONE_LISTED)
def test_a_none_listed_on_one_rank_is_refused_on_every_rank(run_ranks, how) -> None:
    """[w.grad, None] on rank 1 where rank 0 lists [w.grad, x.grad] ([p.grad for p in model.parameters()] beside a
    layer unused on rank 1): rank 1's TypeError was raised alone (its refusal's plan did not resolve either), and
    rank 0's collective met rank 1's next call (gloo aborted rank 1's process, or rank 0 waited until the
    timeout), in every call and mode. The refusal plans the None as a parameter without gradient in its place (its
    name kept) and joins: rank 0 raises RefusedElsewhere, rank 1 the TypeError, the next call sqrt(24) on both."""
    assert run_ranks(2, cases.none_listed_on_one_rank, how) == [
        ["RefusedElsewhere", "4.8990"], ["TypeError", "4.8990"]]


@pytest.mark.parametrize("how", ["list", "mapping", "group"])
def test_unitwise_refuses_a_tensor_not_a_parameter_on_one_rank_on_every_rank(run_ranks, how) -> None:
    """mode="unitwise" given a plain tensor (no gradient, not requiring one) on rank 1 where rank 0 holds a
    parameter: rank 1's TypeError ("needs parameters") was raised alone, its refusal's layout did not resolve
    either, and rank 0's collective met rank 1's next call (gloo aborted rank 1's process on the lengths). The
    refusal lays that tensor out as a parameter without gradient, as rank 0 does, and joins: rank 0 raises
    RefusedElsewhere, rank 1 the TypeError, and the next call is every rank's (sqrt(24) on both)."""
    assert run_ranks(2, cases.unitwise_tensor_not_a_parameter_on_one_rank, how) == [
        ["RefusedElsewhere", "4.8990"], ["TypeError", "4.8990"]]


@pytest.mark.parametrize("how", ["module", "list"])
def test_unitwise_refuses_placements_that_differ_where_another_rank_holds_no_gradient(run_ranks, how) -> None:
    """mode="unitwise": a Replicate gradient of a Shard(0) parameter on rank 0 (NotImplementedError, "placements
    differ"), none on rank 1 (a stand-in): rank 0's refusal planned its units with the same gradient, raised again,
    and joined nothing; rank 1's collective met rank 0's next call (gloo aborted rank 0's process). The refusal lays
    that gradient out as held by none, as rank 1 does, and joins: rank 0 raises the NotImplementedError, rank 1
    RefusedElsewhere, and the next call is every rank's (sqrt(24) on both)."""
    assert run_ranks(2, cases.unitwise_placements_differ_where_another_holds_none, how) == [
        ["NotImplementedError", "4.8990"], ["RefusedElsewhere", "4.8990"]]


@pytest.mark.parametrize("how", ["total", "clip", "clipper"])
def test_a_lone_dtensor_parameter_without_gradient_on_one_rank_joins_the_others(run_ranks, how) -> None:
    """A lone DTensor parameter as the target (not in a list), its gradient None on rank 1: rank 1 made no
    collective and returned 0, and rank 0's collective met rank 1's next call (get_total_norm returned 4.0 on both,
    the next call's 4.899 on neither; clip_grad_norm_ and GradClipper read the next call's settings as a
    disagreement), then rank 0's next call hung. It is planned as a list of it is, with a stand-in: 2.0 (rank 0's
    shard of ones) on both, and the next call aligned."""
    assert run_ranks(2, cases.lone_parameter_without_gradient_on_one_rank, how) == [["2.0000", "4.8990"]] * 2


# --------------------------------------------------------------------------------------------------- FSDP1

FSDP1_CASES = [
    (ws, strategy, orig)
    for strategy in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
    for ws in (2, 3, 4)
    for orig in (True, False)
] + [(4, strategy, orig) for strategy in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2") for orig in (True, False)]


@pytest.mark.parametrize(
    ("world_size", "strategy", "use_orig_params"),
    FSDP1_CASES,
    ids=[f"{s}-ws{ws}-{'orig' if o else 'flat'}" for ws, s, o in FSDP1_CASES],
)
def test_fsdp1(run_ranks, world_size: int, strategy: str, use_orig_params: bool) -> None:
    """Nested auto-wrapping, an ignored module, and (flat, 3 or 4 ranks) padding poisoned with 1e3."""
    results = run_ranks(world_size, cases.fsdp1, strategy, use_orig_params)
    check(results, "fsdp1", no_shard=strategy == "NO_SHARD")
    assert all(r["inner_refused"] for r in results), [r["inner_refused"] for r in results]  # root.module
    if not use_orig_params and strategy != "NO_SHARD" and world_size in (3, 4) and "HYBRID" not in strategy:
        assert any(any(r["padded"]) for r in results), "no rank had padding: the poison test checked nothing"


@pytest.mark.parametrize(("world_size", "strategy"), [(2, "FULL_SHARD"), (3, "SHARD_GRAD_OP"), (4, "HYBRID_SHARD")])
def test_fsdp1_low_precision_gradients(run_ranks, world_size: int, strategy: str) -> None:
    """MixedPrecision(param_dtype=bf16, reduce_dtype=fp32, keep_low_precision_grads=True): bf16 gradients on fp32
    parameters. FSDP1's own clip returns their norm in bf16."""
    check(run_ranks(world_size, cases.fsdp1_low_precision_gradients, strategy, timeout_s=120), "fsdp1", bf16=True)


@pytest.mark.parametrize("hybrid", ["blocks", "root"])
def test_fsdp1_hybrid_instances_beside_other_strategies_under_one_root(run_ranks, hybrid: str) -> None:
    """HYBRID_SHARD blocks under a FULL_SHARD root, and the other way round (4 ranks): exact, and FSDP1's own clip
    wrong for every finite p but 0 (36.00 and 21.04-23.76 for 26.93 at p = 1)."""
    check(run_ranks(4, cases.fsdp1_hybrid_beside_other_strategies, hybrid, timeout_s=120), "fsdp1", mixed_groups=True)


@pytest.mark.parametrize(("world_size", "use_orig_params"), [(2, True), (3, False)])
def test_fsdp1_plain_root(run_ranks, world_size: int, use_orig_params: bool) -> None:
    """A plain root with FSDP1 children: found by type all the same (FSDP1's own clip needs an FSDP1 root)."""
    check(run_ranks(world_size, cases.fsdp1, "FULL_SHARD", use_orig_params, True), None)


@pytest.mark.parametrize(("world_size", "use_orig_params"), [(2, True), (3, False)])
def test_fsdp1_plan_kept_across_steps(run_ranks, world_size: int, use_orig_params: bool) -> None:
    """The handle walk is done once per use (total, per-parameter, AGC's pieces) and reused while FSDP's handle
    list stands; norms and pieces stay exact."""
    for r in run_ranks(world_size, cases.fsdp1_plan_across_steps, use_orig_params):
        assert r["walks"] == [3, 3, 3, 6], r["walks"]
        assert r["kept"] == 4, r["kept"]  # total, per-parameter shards, pieces, sync holders: one entry each


@pytest.mark.parametrize(("world_size", "strategy", "use_orig_params"), [
    (2, "FULL_SHARD", True), (3, "FULL_SHARD", False), (2, "SHARD_GRAD_OP", False), (2, "NO_SHARD", True)])
def test_fsdp1_no_sync_gradients_are_refused(run_ranks, world_size: int, strategy: str,
                                              use_orig_params: bool) -> None:
    results = run_ranks(world_size, cases.fsdp1_no_sync, strategy, use_orig_params, timeout_s=90)
    for r in results:
        assert r["inside"] == [True, True, True], r
        # After the context, before a synchronised backward: a sharded handle's gradient shows it; NO_SHARD's
        # full-size gradient does not (documented).
        assert r["after"] is (True if strategy != "NO_SHARD" else None), r
        assert r["total"] == pytest.approx(r["want"], rel=1e-6), r


def test_fsdp2_enclosed_submodule_and_late_sync(run_ranks) -> None:
    assert run_ranks(2, cases.fsdp2_enclosed_and_late_sync, timeout_s=90) == [[True, True, True]] * 2


@pytest.mark.parametrize("how", ["off", "unsharded", "one block", "late", "replicate"])
def test_fsdp2_listed_parameters_not_reduced_are_refused(run_ranks, how: str) -> None:
    for r in run_ranks(2, cases.fsdp2_listed_unsynced, how, timeout_s=90):
        assert r["inside"] == [True] * 7, r
        assert r["other"] == pytest.approx(1.0, rel=1e-6), r
        assert r["after"] == pytest.approx([1.0, 1.0], rel=1e-6), r


@pytest.mark.parametrize("how", ["off", "unsharded", "late"])
def test_fsdp2_single_parameter_target_is_refused_and_stood_in(run_ranks, how: str) -> None:
    for r in run_ranks(2, cases.fsdp2_single_parameter, how, timeout_s=90):
        assert r["inside"] == [True] * 4, r
        assert r["unsharded"], r
        assert r["after"] == pytest.approx([1.0] * 4, rel=1e-5), r
        assert r["clipped"] == pytest.approx(1.0, rel=1e-4), r  # (the 1e-6 in max_norm / (total + 1e-6))


@pytest.mark.parametrize("how", ["unsharded", "one block"])
def test_fsdp2_listed_gradients_not_reduced_are_refused(run_ranks, how: str) -> None:
    for r in run_ranks(2, cases.fsdp2_listed_gradients_unsynced, how, timeout_s=90):
        assert r["inside"] == [True] * 4, r
        assert r["other"] == pytest.approx(1.0, rel=1e-6), r
        assert r["after"] == pytest.approx(1.0, rel=1e-5), r


@pytest.mark.parametrize("how", ["off", "no all-reduce"])
def test_fsdp2_listed_parameters_refused_once_sync_is_off_before_the_backward(run_ranks, how: str) -> None:
    assert run_ranks(2, cases.fsdp2_listed_unsynced_before_backward, how, timeout_s=90) == [[True] * 3] * 2


def test_fsdp2_mapping_under_a_plan_stands_in_and_refuses(run_ranks) -> None:
    for how in ("unsharded", "eval"):
        for r in run_ranks(2, cases.fsdp2_mapping_under_plan, how, timeout_s=90):
            assert r["total"] == pytest.approx(1.0, rel=1e-5), (how, r)
            assert r["clipped"] == pytest.approx(1.0, rel=1e-4), (how, r)  # (the 1e-6 in max_norm / (total + 1e-6))
    assert run_ranks(2, cases.fsdp2_mapping_under_plan, "off", timeout_s=90) == [{"refused": True}] * 2


def test_fsdp2_listed_refusal_scans_the_groups_once_per_call(run_ranks) -> None:
    for r in run_ranks(2, cases.fsdp2_listed_refusal_scans_once, timeout_s=90):
        assert r["reads_per_group"] == 1.0, r
        assert r["total"] == pytest.approx(1.0, rel=1e-5), r


def test_fsdp2_late_sync_after_a_resharded_backward_is_refused(run_ranks) -> None:
    assert run_ranks(2, cases.fsdp2_late_sync_resharded, timeout_s=90) == [[True, True, True]] * 2


def test_fsdp1_inside_summon_full_params_is_refused_on_every_rank(run_ranks) -> None:
    assert run_ranks(2, cases.fsdp1_inside_summon_full_params, timeout_s=90) == [[True] * 12] * 2


@pytest.mark.parametrize("unsharded", ["none", "root", "all"])
def test_fsdp2_accumulation_refuses_unsynced_and_reads_unsharded_modules(run_ranks, unsharded: str) -> None:
    for r in run_ranks(2, cases.fsdp2_accumulation, unsharded, timeout_s=90):
        assert r["inside"] == [True, True, True], r
        assert r["report"], r
        for key in ("total", "params_total", "eval_params_total", "agc_total", "clipped"):
            assert r[key] == pytest.approx(r["want"], rel=1e-6), (key, r)
        assert r["after"] == pytest.approx(r["want"] / 2, rel=1e-5), r


def test_fsdp2_post_forward_reshard_counts_the_sharded_gradients(run_ranks) -> None:
    for want, listed, module in run_ranks(4, cases.fsdp2_post_forward_reshard, timeout_s=90):
        assert listed == pytest.approx(want, rel=1e-6) and module == pytest.approx(want, rel=1e-6), (want, listed)


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_fsdp1_parameters_changed_after_first_call(run_ranks, use_orig_params: bool) -> None:
    for steps in run_ranks(2, cases.fsdp1_parameters_changed_after_first_call, use_orig_params, timeout_s=90):
        for i, (total, want, has_extra) in enumerate(steps):
            assert total == pytest.approx(want, rel=1e-6), (i, steps)
            assert has_extra == (i == 3), (i, steps)


def test_two_jobs_whose_wrappers_hold_distinct_groups_of_the_same_ranks(run_ranks) -> None:
    results = run_ranks(4, cases.two_jobs_nested_groups, timeout_s=90)
    want = {"p=2.0": (True, 1), "p=inf": (True, 1), "p=1.0": (True, 1), "per_param": True}
    assert results == [want] * 4, results


def test_group_counts_one_copy_on_meshes_not_in_rank_order(run_ranks) -> None:
    results = run_ranks(4, cases.permuted_mesh_copies, timeout_s=90)
    assert results == [{k: [True] * 6 for k in results[0]}] * 4 and len(results[0]) == 4, results


def test_fsdp1_no_shard_stages_under_a_group_spanning_them(run_ranks) -> None:
    results = run_ranks(4, cases.no_shard_stages, timeout_s=90)
    assert results == [{k: True for k in results[0]}] * 4 and len(results[0]) == 13, [
        sorted(r.items()) for r in results]


def test_fsdp1_full_shard_stages_refuse_unitwise_under_a_group_spanning_them(run_ranks) -> None:
    results = run_ranks(4, cases.full_shard_stages_unitwise, timeout_s=90)
    assert results == [{"total": True, "unitwise": True, "unitwise alone": True, "hybrid unitwise": True}] * 4, results


def test_fsdp2_unsharded_parameters_in_agc_under_group(run_ranks) -> None:
    assert run_ranks(2, cases.fsdp2_unsharded_agc_under_group, timeout_s=90) == [[True] * 6] * 2


@pytest.mark.parametrize(("use_orig_params", "agree_on_host"), [(True, True), (False, True), (True, False),
                                                              (False, False)])
def test_fsdp1_float64_total_is_float64_on_every_rank(run_ranks, use_orig_params: bool, agree_on_host: bool) -> None:
    """A float64 model over 4 ranks whose last shards are padding only: the same float64 total everywhere, also
    where the ranks do not agree on the dtype through the collective (NCCL)."""
    results = run_ranks(4, cases.fsdp1_tiny_float64, use_orig_params, agree_on_host, timeout_s=90)
    assert results[-1]["nothing_here"], "the last rank holds gradient: the case tests nothing"
    assert {r["dtype"] for r in results} == {r["clipper_dtype"] for r in results} == {"torch.float64"}, results
    assert len({r["total"] for r in results}) == 1, results
    assert abs(results[0]["total"] - results[0]["want"]) <= 1e-12 * results[0]["want"], results[0]
    assert all(r["report"] == results[0]["report"] for r in results), results


@pytest.mark.parametrize(("use_orig_params", "agree_on_host"), [(True, True), (True, False), (False, False)])
def test_fsdp1_low_precision_gradients_set_the_total_s_dtype_on_every_rank(run_ranks, use_orig_params: bool,
                                                                           agree_on_host: bool) -> None:
    """``keep_low_precision_grads=True`` over a float64 model: float32 gradients, so a float32 total on every rank,
    the padding-only ones included (their stand-in took the parameters' float64)."""
    results = run_ranks(4, cases.fsdp1_tiny_float64, use_orig_params, agree_on_host, True, timeout_s=90)
    assert results[-1]["nothing_here"], "the last rank holds gradient: the case tests nothing"
    assert {g for r in results for g in r["grad_dtypes"]} == {"torch.float32"}, results
    assert {r["dtype"] for r in results} == {r["clipper_dtype"] for r in results} == {"torch.float32"}, results
    assert len({r["total"] for r in results}) == 1, results
    assert abs(results[0]["total"] - results[0]["want"]) <= 1e-6 * results[0]["want"], results[0]


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_fsdp1_low_precision_gradients_forced_to_full_precision_in_eval_set_a_float64_total(
        run_ranks, use_orig_params: bool) -> None:
    """``keep_low_precision_grads=True`` over a float64 model, the backward and the clip in eval mode under
    ``FSDP_USE_FULL_PREC_IN_EVAL=1`` (FSDP then computes in full precision and keeps the gradients float64): a
    float64 total on every rank, the padding-only ones too, each deciding the dtype by its own pieces (taken as
    low precision, their stand-in was float32 beside float64 totals elsewhere)."""
    results = run_ranks(4, cases.fsdp1_tiny_float64, use_orig_params, False, True, True, timeout_s=90)
    assert results[-1]["nothing_here"], "the last rank holds gradient: the case tests nothing"
    assert {g for r in results for g in r["grad_dtypes"]} == {"torch.float64"}, results
    assert {r["dtype"] for r in results} == {r["clipper_dtype"] for r in results} == {"torch.float64"}, results
    assert len({r["total"] for r in results}) == 1, results
    assert abs(results[0]["total"] - results[0]["want"]) <= 1e-12 * results[0]["want"], results[0]


@pytest.mark.parametrize(("world_size", "use_orig_params"), [(3, True), (4, True), (4, False)])
def test_fsdp1_rank_without_gradients(run_ranks, world_size: int, use_orig_params: bool) -> None:
    """Two parameters over 3 or 4 ranks: the last ranks' shards are padding only, yet they join the collective."""
    results = run_ranks(world_size, cases.fsdp1_tiny, use_orig_params, timeout_s=90)
    assert results[-1]["nothing_here"], "the last rank holds gradient: the case tests nothing"
    check(results, "fsdp1")


@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp2_rank_without_gradients(run_ranks, world_size: int) -> None:
    results = run_ranks(world_size, cases.fsdp2_rank_without_gradients, timeout_s=60)
    for r in results:
        assert r["total"] == pytest.approx(r["want"], rel=1e-6) and r["per_param_total"] == pytest.approx(
            r["want"], rel=1e-6), r
        assert r["agc_total"] == pytest.approx(r["want"], rel=1e-6), r
        assert r["report"] == results[0]["report"] and "scale" not in r["report"], r


@pytest.mark.parametrize("world_size", [2, 4])
def test_replicated_dtensor_on_a_mesh_without_rank_zero(run_ranks, world_size: int) -> None:
    results = run_ranks(world_size, cases.replicated_on_a_submesh)
    assert all(r == results[0] for r in results), results


def test_data_parallel_over_tensor_parallel_is_refused_on_every_rank(run_ranks) -> None:
    for messages in run_ranks(4, cases.dp_over_tp_refused, timeout_s=120):
        assert len(messages) == 8 and all("data parallel over a tensor-parallel module" in m for m in messages)


def test_group_over_sliced_meshes(run_ranks) -> None:
    """group= over FSDP2 + TP (copies on the tp slices count once), pipeline stages (summed), and an HSDP
    replicate group (refused on every rank); FSDP1 HYBRID_SHARD's replicate group and half of FULL_SHARD's
    world the same, in every mode."""
    results = run_ranks(4, cases.group_over_sliced_meshes, timeout_s=120)
    assert all(r == results[0] for r in results), "ranks disagree"
    assert results[0]["replicate group"].startswith("group= ..."), results[0]["replicate group"]
    for strategy in ("HYBRID_SHARD", "FULL_SHARD"):
        for mode in ("total", "per_param", "unitwise"):
            assert results[0][f"fsdp1 {strategy} {mode}"].startswith("group= ..."), results[0]


@pytest.mark.parametrize("world_size", [2, 3])
def test_dtensor_total_norm_and_max_norm(run_ranks, world_size: int) -> None:
    results = run_ranks(world_size, cases.dtensor_norm_values)
    assert results[0] == {f"{how} p={p}": "ok" for p in (2.0, math.inf)
                          for how in ("clip_grads_with_norm_", "max_norm")}, results[0]


def test_short_meshes_and_stage_ties(run_ranks) -> None:
    results = run_ranks(4, cases.short_meshes_and_stage_ties, timeout_s=120)
    assert all(r == results[0] for r in results), results
    assert results[0]["agc short mesh"] == "unit-wise clipping of '0'", results[0]
    assert results[0]["agc cut across stages"] == "unit-wise clipping of '0'", results[0]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_fsdp1_padded_rank_skips_a_non_finite_step_with_the_others(run_ranks, bad: float) -> None:
    """A rank that cannot hand the coefficient over (its flat shard ends in padding) still skips a non-finite
    total through found_inf, as the ranks that hand it over do: every rank steps steps 0 and 2 only."""
    results = run_ranks(2, cases.fsdp1_padded_rank_skips_with_the_others, bad)
    assert [r["padded"] for r in results] == [0, 1], results  # the layout the case is about
    for r in results:
        assert r["step 0"] == (True, True, True, 1.0), r
        assert r["step 1"] == (False, False, True, 1.0), r
        assert r["step 2"] == (True, True, True, 2.0), r


@pytest.mark.parametrize("case", ["mixed", "plain"])
def test_gradients_dropped_on_one_rank_keep_the_plan(run_ranks, case: str) -> None:
    """A rank whose FSDP2 gradients are partly None takes the other ranks' plan (empty stand-ins for the missing
    ones): every call returns the total of the shards left, and the calls stay paired."""
    results = run_ranks(4, cases.gradients_dropped_on_one_rank, case, timeout_s=180)
    for r in results:
        assert {k: v for k, v in r.items() if v is not True} == {}


def test_stand_ins_keep_the_dtype_the_warning_and_listed_parameters(run_ranks) -> None:
    for r in run_ranks(2, cases.stand_ins_keep_dtype_warning_and_lists):
        assert r["no grads warns"] == (0.0, True), r
        assert r["dtype"] == "torch.float32", r
        assert r["reported"] == ["a.bias", "a.weight", "b.bias", "b.weight"], r
        assert r["after eval"] == {"total": True, "report": True, "per_param": True, "unitwise": True}, r
        assert r["stand-ins kept"] == (0, True, True), r
        assert r["moved after"] is True, r


def test_stand_ins_of_any_layout_and_a_list_empty_on_one_rank(run_ranks) -> None:
    for r in run_ranks(2, cases.stand_ins_of_any_layout_and_lists_empty_on_one_rank, timeout_s=120):
        assert r == {"shard_placement_fn": True, "rowwise": True, "list empty on one rank": (True, True)}, r


def test_hsdp_shard_group_counts_a_replicated_gradient_on_every_replica(run_ranks) -> None:
    results = run_ranks(4, cases.hsdp_shard_group_with_a_replicated_gradient, timeout_s=90)
    assert results == [{k: True for k in results[0]}] * 4 and len(results[0]) == 6, results


@pytest.mark.parametrize("how", ["clipper", "clip_fused", "per_param"])
@pytest.mark.parametrize("flow", ["forward", "aux"])
@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_parts_keep_a_part_s_skip_over_gradients_made_anew(run_ranks, use_orig_params: bool, flow: str,
                                                                 how: str) -> None:
    """FSDP1 heads clipped as [ha], [hb], [hc], NaN in hb on rank 0 only, then a forward between two clips or an
    auxiliary loss and [ha] clipped again: FSDP1's new views or re-aliased flat gradients over the same bytes read
    as gradients gone, and the NaN step was taken. Every rank skips the NaN batch and steps the next one.
    ``per_param`` without ``use_orig_params``: each parameter's view of the flat gradient stands for all of it
    (``_fused.whole_``), else the aux flow's rank 1 took the NaN step alone, as with the whole flat gradient."""
    results = run_ranks(2, cases.fsdp1_parts_keep_a_part_s_skip, use_orig_params, flow, how)
    for r in results:
        assert r == {"batch 0": (True, True), "batch 1": (False, True), "totals": [True, True, True]}, r


@pytest.mark.parametrize("how", ["clipper", "clip_fused"])
@pytest.mark.parametrize(("use_orig_params", "flow"), [(True, "forward_after"), (True, "forward_before"),
                                                       (True, "aux"), (False, "aux"), (True, "whole")])
def test_fsdp1_an_asked_for_skip_follows_gradients_made_anew(run_ranks, use_orig_params: bool, flow: str,
                                                              how: str) -> None:
    """FSDP1 heads [ha], [hb], [hc], finite gradients, ``skip_next_step_(opt, True)`` after the backward, the parts
    clipped with a forward or an auxiliary loss between (FSDP1's gradients made anew over the same bytes): every
    rank skips that step and steps the next batch's."""
    results = run_ranks(2, cases.fsdp1_explicit_skip_over_gradients_made_anew, use_orig_params, flow, how)
    want = {"batch 0": (True, True), "batch 1": (False, True)}
    assert results == [want, want], results


@pytest.mark.parametrize("how", ["clipper", "clip_fused"])
@pytest.mark.parametrize("flow", ["plain", "forward", "drop"])
def test_fsdp1_a_rank_holding_padding_only_of_a_part_keeps_its_skip(run_ranks, flow: str, how: str) -> None:
    """FSDP1 heads [ha], [hb], [hc] (use_orig_params), hb one element, so rank 1's shard of it is padding only and
    its call measures nothing; a NaN in hb on rank 0: both ranks skip the NaN batch (rank 1 stepped its shards),
    and both step the next one."""
    results = run_ranks(2, cases.fsdp1_padding_only_rank_keeps_a_part_s_skip, flow, how)
    want = {"batch 1": (False, True)} if flow == "drop" else {"batch 0": (True, True), "batch 1": (False, True)}
    assert results == [want, want], results


@pytest.mark.parametrize("mode", ["unitwise", "total"])
def test_fsdp1_unitwise_out_of_place_nan_in_one_shard_skips_on_every_rank(run_ranks, mode: str) -> None:
    """FSDP1 heads clipped whole with ``on_nonfinite="skip"``, a NaN in rank 1's shard of hb alone, the gradients
    replaced out of place and [ha] clipped again: ``mode="unitwise"`` armed its flag on its units' own views, not
    on the gradients the optimizer steps, and rank 0 stepped while rank 1 skipped. Every rank skips the NaN batch
    and steps the next one, as in ``mode="total"``."""
    results = run_ranks(2, cases.fsdp1_unitwise_out_of_place_nan_in_one_shard, mode)
    _assert_batches(results, nan_skipped=True)


def _assert_batches(results: list, nan_skipped: bool) -> None:
    """Every rank's (skipped, finite) for batch 0 (the NaN batch where it is not dropped) and batch 1 (finite)."""
    for r in results:
        assert r == {"batch 0": (nan_skipped, True), "batch 1": (False, True)}, results


@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("how", ["clipper", "clip_fused", "unitwise"])
def test_fsdp2_out_of_place_nan_in_one_shard_skips_on_every_rank(run_ranks, how: str, world: int,
                                                                  whole: bool) -> None:
    """FSDP2 heads [h0] and [h1], fused Adam, a NaN in rank 0's shard of h0 alone, gradients then replaced out of
    place (``p.grad = p.grad + g``) and [h1] clipped again: the flag lasts where a gradient the later call does not
    measure is not finite, and each rank read its own shard, so rank 0 skipped its step alone and the ranks'
    optimizer states parted (clipped whole and handed over, too; ``mode="unitwise"``, whose all-reduce did not
    carry the read, until it did). Every rank skips the NaN batch and steps the next one: the ranks agree on what
    the later call does not measure through its own all-reduce."""
    results = run_ranks(world, cases.fsdp2_out_of_place_nan_in_one_shard, how, False, whole)
    _assert_batches(results, nan_skipped=True)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("how", ["clipper", "clip_fused", "unitwise"])
def test_fsdp2_out_of_place_nan_in_one_shard_reclipped_twice_skips_on_every_rank(run_ranks, how: str,
                                                                                 world: int) -> None:
    """As above, [h1] clipped twice after the replacement: at the second call no rank reads a replaced gradient
    (each rank's h0 replacements are held by its ledger entry since the first), so the ranks' verdict comes from
    the flags those entries hold. Every rank skips the NaN batch and steps the next one."""
    results = run_ranks(world, cases.fsdp2_out_of_place_nan_in_one_shard, how, False, False, None, 2)
    _assert_batches(results, nan_skipped=True)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("how", ["clipper", "clip_fused", "unitwise"])
def test_fsdp2_nan_batch_dropped_then_a_fresh_one_steps_on_every_rank(run_ranks, how: str, world: int) -> None:
    """As above, but the NaN batch is dropped (``zero_grad(set_to_none=True)``) and the next batch's gradients
    clipped as [h1] alone: their unmeasured h0 gradients are finite on every rank, and every rank steps."""
    results = run_ranks(world, cases.fsdp2_out_of_place_nan_in_one_shard, how, True)
    _assert_batches(results, nan_skipped=False)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("how", ["clipper_skip", "clip_fused", "get_total_norm", "clipper", "clipper_skip h0",
                                 "clip_fused h0", "get_total_norm h0"])
def test_fsdp2_out_of_place_nan_of_a_second_optimizer_skips_on_every_rank(run_ranks, how: str, world: int) -> None:
    """Two fused optimizers (a: the encoder, b: the heads h0 and h1), the heads' NaN hand-over to b (a NaN in rank 0's
    shard of h0) settled, after the gradients were replaced out of place, by a call arming a skip for a on
    [enc, h1], or by a call arming nothing on [h1]: each rank read its own shard for b's flag, so rank 0 skipped b's
    step alone while the others stepped their shards of h0 and h1 (and rank 2 of 3, whose empty shard of h1
    settled nothing, dropped the flag at the step). Every rank skips b's step and takes a's; a finite batch steps
    both everywhere. A call measuring h0 itself ([enc, h0] arming a, or [h0] read) held b's flag by the gradients it
    did not measure (h1's, finite): dropped on every rank, b stepped rank 0's NaN. It arms no flag of b's, so every
    gradient of b holds it (a's step is skipped there too: its call's total is NaN)."""
    for nan in (True, False):
        results = run_ranks(world, cases.fsdp2_out_of_place_nan_of_a_second_optimizer, how, nan)
        enc = not (nan and how in ("clipper_skip h0", "clip_fused h0"))
        assert results == [(nan, enc, True)] * world, (nan, results)


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_out_of_place_nan_raised_by_error_if_nonfinite_skips_on_every_rank(run_ranks, world: int) -> None:
    """The same NaN hand-over, gradients replaced out of place, then [h1] clipped with ``error_if_nonfinite=True``
    on a NaN in rank 1's shard: the call raises on every rank after its all-reduce, and the flag waiting for the
    ranks' verdict was kept by each rank's own read instead (rank 0 skipped the step taken after the error, rank 1
    stepped; rank 2, whose empty shard of h1 settled nothing, stepped too). Every rank skips."""
    results = run_ranks(world, cases.fsdp2_out_of_place_nan_then_error_if_nonfinite, None)
    assert results == [(True, True)] * world, results



_BETWEEN = ["get_total_norm h1", "clip_grad_norm_ h1", "GradClipper h1", "unitwise h1", "compose h1"]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("between", _BETWEEN)
def test_fsdp2_out_of_place_nan_settled_by_a_call_arming_nothing_skips_on_every_rank(run_ranks, between: str,
                                                                                     world: int) -> None:
    """The NaN hand-over (FSDP2 heads h0 and h1 clipped whole with ``optimizer=``, NaN in rank 0's shard of h0),
    gradients replaced out of place, then a call that arms no skip reads h1 (and settles the hand-over) before
    [h1] is clipped again: every rank skips. A unit-wise call dropped the flag on every rank (its verdict was never
    applied: rank 0 stepped its NaN), and ``compose.get_total_norm`` kept it by each rank's own read of h0 (rank 0
    skipped alone). The ranks' verdict travels in that call's all-reduce too."""
    results = run_ranks(world, cases.fsdp2_out_of_place_nan_in_one_shard, "clip_fused", False, True, between)
    _assert_batches(results, nan_skipped=True)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("between", ["get_total_norm h1", "compose h1"])
def test_fsdp2_out_of_place_nan_settled_by_a_read_then_stepped_skips_on_every_rank(run_ranks, between: str,
                                                                                   world: int) -> None:
    """As above with no clip after the read of h1: the step itself decides nothing (it has no collective), so the
    read's verdict stands, the same on every rank (by each rank's own read, rank 0 skipped alone)."""
    results = run_ranks(world, cases.fsdp2_out_of_place_nan_in_one_shard, "clip_fused", False, True, between, False)
    _assert_batches(results, nan_skipped=True)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("between", _BETWEEN)
def test_fsdp2_nan_hand_over_dropped_then_a_fresh_batch_read_steps_on_every_rank(run_ranks, between: str,
                                                                                 world: int) -> None:
    """The NaN batch handed over whole is dropped (``zero_grad(set_to_none=True)``), the next batch's gradients read
    by a call arming no skip, then [h1] clipped: every gradient is finite on every rank, and every rank steps."""
    results = run_ranks(world, cases.fsdp2_out_of_place_nan_in_one_shard, "clip_fused", True, True, between)
    _assert_batches(results, nan_skipped=False)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("between", ["get_total_norm h0", "get_total_norm", "compose"])
@pytest.mark.parametrize("again", [True, False])
def test_fsdp2_out_of_place_nan_read_by_a_call_arming_nothing_skips_on_every_rank(run_ranks, between: str,
                                                                                  world: int, again: bool) -> None:
    """The same NaN hand-over, out of place, then a call arming no skip that reads the NaN gradient itself
    (``get_total_norm`` of h0, or of everything; ``compose.get_total_norm`` of everything), [h1] clipped again or
    not: the flag was held by the gradients that call did not read (h1's, finite, or none), so it was dropped on
    every rank and rank 0 stepped its NaN (its parameters NaN for good). That call arms no flag for what it reads:
    the flag is held by every gradient, and every rank skips."""
    results = run_ranks(world, cases.fsdp2_out_of_place_nan_in_one_shard, "clip_fused", False, True, between, again)
    _assert_batches(results, nan_skipped=True)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("between", ["get_total_norm h0", "get_total_norm", "compose"])
def test_fsdp2_nan_hand_over_dropped_then_the_fresh_batch_read_whole_steps_on_every_rank(run_ranks, between: str,
                                                                                        world: int) -> None:
    """As above after the NaN batch is dropped and the next batch's gradients made: they are finite, and every
    rank steps."""
    results = run_ranks(world, cases.fsdp2_out_of_place_nan_in_one_shard, "clip_fused", True, True, between)
    _assert_batches(results, nan_skipped=False)


@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp2_layouts_remade_between_calls_are_read_anew(run_ranks, world_size: int) -> None:
    """A gradient redistributed, a parameter added then replaced (another shape, dtype and placement), a layer
    sharded anew on a new group's mesh, that group destroyed and made again, between calls on one model: every
    total and per-parameter norm equals the float64 unsharded reference, the same on every rank."""
    results = run_ranks(world_size, cases.fsdp2_layouts_remade_between_calls, timeout_s=90)
    assert all(r == results[0] for r in results), "ranks disagree"
    steps = ("sharded", "redistributed", "added", "replaced", "sharded anew", "group made again")
    assert tuple(dict.fromkeys(step for step, *_ in results[0])) == steps
    for step, what, ours, want in results[0]:
        assert math.isclose(ours, want, rel_tol=RTOL), (step, what, ours, want)


def test_fsdp2_frozen_sharded_layers_beside_unsharded_ones_count_them_once_under_group(run_ranks) -> None:
    """Every sharded layer frozen: the layers FSDP2 left unsharded are copies under group= too (they were summed
    over the group: sqrt(2) times the norm on 2 ranks), as with the sharded layers trainable."""
    results = run_ranks(2, cases.fsdp2_frozen_sharded_layers_beside_unsharded_ones, timeout_s=90)
    assert results[0] == results[1], "ranks disagree"
    wrong = [(what, group, ours, want) for what, group, ours, want in results[0]
             if not math.isclose(ours, want, rel_tol=RTOL)]
    assert not wrong, wrong


def test_fsdp2_over_tp_with_the_tp_layers_frozen_counts_the_dp_layers_once_under_group(run_ranks) -> None:
    """The frozen tensor-parallel layers still say the tp slices hold copies of the layers on mesh["dp"] (they were
    summed as pipeline stages under group=: sqrt(2) times the norm on 2 dp x 2 tp)."""
    results = run_ranks(4, cases.fsdp2_over_tp_with_the_tp_layers_frozen, timeout_s=90)
    assert all(r == results[0] for r in results), "ranks disagree"
    # (the last Linear's gradients are about 2e-4: float32's forward leaves them 3e-4 off, relative)
    wrong = [(what, group, ours, want) for what, group, ours, want in results[0]
             if not math.isclose(ours, want, rel_tol=RTOL, abs_tol=cases.ATOL)]
    assert not wrong, wrong


def test_fsdp2_layer_sharded_after_the_root_s_lazy_init_is_read_with_the_others(run_ranks) -> None:
    """A block fully_shard-ed anew after the root's first forward: stood in for once unsharded, refused with sync off
    (the root's state list from its lazy init lacked it: its gradients were left out, or measured unreduced)."""
    results = run_ranks(2, cases.fsdp2_layer_sharded_after_the_root_s_lazy_init, timeout_s=90)
    assert results[0] == results[1], "ranks disagree"
    wrong = [(what, ours, want) for what, ours, want in results[0]
             if not (math.isclose(ours, want, rel_tol=RTOL) if isinstance(want, float) else ours == want)]
    assert not wrong, wrong


def test_fsdp2_frozen_stage_beside_a_trainable_one_joins_the_group_s_collective(run_ranks) -> None:
    """A stage whose DTensor parameters are all frozen still joins group='s collective (its plain gradients are
    copies there, counted once), where the other stage's DTensor gradients plan one."""
    results = run_ranks(2, cases.fsdp2_frozen_stage_beside_a_trainable_one_under_group, timeout_s=60)
    assert results[0] == results[1], "ranks disagree"
    assert all(math.isclose(ours, want, rel_tol=RTOL) for _, ours, want in results[0]), results[0]


# ------------------------------------------------------------------------------ switches of DDP, FSDP2, FSDP1


def check_steps(results: list[dict[str, Any]], finite: list[bool]) -> None:
    """``cases.clipped_steps`` on every rank: each total exact against the float64 norm of the gradients the
    wrapper holds, the NaN batch of rank 1 (and, where named, every later one) skipped on every rank, and the
    parameters on the float64 reference stepped the same way after every step."""
    for r in results:
        assert [f for _, f, _ in r["steps"]] == finite, r["steps"]
        for worst, _, distance in r["steps"]:
            assert worst <= RTOL and distance <= cases.SWITCH_PARAM_ATOL, r["steps"]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("switch", cases.DDP_SWITCHES)
def test_ddp_switches(run_ranks, switch: str, world_size: int) -> None:
    """DDP ``static_graph=True`` and communication hooks (fp16 compression, PowerSGD with and without its state,
    a hook of the user's): exact against what DDP leaves in ``.grad``, no collective, torch's own clip right but
    for p = 0; four steps through a skip-policy clipper handing over to a fused AdamW, a NaN batch on one rank
    skipped on every rank. PowerSGD's error feedback and warm start keep the NaN batch's residue: every later
    gradient is NaN, and every later step is skipped, until the state's dicts are cleared (Limits)."""
    results = run_ranks(world_size, cases.ddp_switch, switch, timeout_s=120)
    check(results, "ddp")
    poisoned = switch == "powerSGD"
    check_steps(results, [True, False] + [not poisoned] * 2)
    if poisoned:
        assert all(r["cleared"] for r in results), "clearing PowerSGDState's dicts ends the NaN"


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("switch", cases.FSDP2_SWITCHES)
def test_fsdp2_switches(run_ranks, switch: str, world_size: int) -> None:
    """FSDP2 ``set_gradient_divide_factor``, ``CPUOffloadPolicy``, an int ``reshard_after_forward`` and
    ``MixedPrecisionPolicy`` with a ``reduce_dtype`` and an ``output_dtype`` beside ``param_dtype``: exact, one
    collective, torch's own clip as in the other FSDP2 cases; four clipped steps with a NaN batch skipped."""
    results = run_ranks(world_size, cases.fsdp2_switch, switch, timeout_s=120)
    check(results, "torch", empty=True)
    check_steps(results, [True, False, True, True])


@pytest.mark.parametrize("use_orig_params", [True, False], ids=["orig", "flat"])
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("switch", cases.FSDP1_SWITCHES)
def test_fsdp1_switches(run_ranks, switch: str, world_size: int, use_orig_params: bool) -> None:
    """FSDP1 ``forward_prefetch``, ``backward_prefetch`` (BACKWARD_POST, None) and ``limit_all_gathers`` (both
    ways): exact, one collective, FSDP1's own clip right but for p = 0; four clipped steps with a NaN batch
    skipped."""
    results = run_ranks(world_size, cases.fsdp1_switch, switch, use_orig_params, timeout_s=120)
    check(results, "fsdp1")
    check_steps(results, [True, False, True, True])
