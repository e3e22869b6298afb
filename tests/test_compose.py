"""Composed parallelism on 4 CPU ranks: 2 PP x 2 TP and 2 EP x 2 DP, against the unsharded float64 model.

Every rank builds the full model's gradients from one seed (the reference), keeps the pieces its coordinates
give it (its pipeline stage, its tensor-parallel slice or duplicate, its experts and data-parallel shard, the
tied output projection of the last stage), and clips with a ParallelPlan. The total, the per-parameter report
(which names parameters of every stage on every rank) and the clipped pieces must match the reference, with one
collective per call. ``debug=True`` must pass a right plan and raise on plans that over- or under-count.
Run: ``.venv/bin/python -m pytest tests/test_compose.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from dist_clip import GradClipper, ParallelPlan, Rule, compose
from dist_clip.testing import count_collectives, reference_norm
from tests import beyond_cases as cases

D, H, V = 6, 10, 8


def full_model_grads(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (V, D), "final_norm.weight": (D,)}
    for layer in (0, 1):
        shapes |= {f"layers.{layer}.norm.weight": (D,), f"layers.{layer}.w1.weight": (H, D),
                   f"layers.{layer}.w2.weight": (D, H), f"layers.{layer}.w2.bias": (D,)}
    return {
        n: torch.randn(s, generator=g, dtype=torch.float64) * (1 + i % 3) for i, (n, s) in enumerate(shapes.items())
    }


STAGE = {"embed.weight": 0, "final_norm.weight": 1, "output.weight": 1}


def stage_of(name: str) -> int:
    return STAGE.get(name, 0 if name.startswith("layers.0.") else 1)


def pp_tp_pieces(full: dict[str, torch.Tensor], pp: int, tp: int, as_dtensor: bool = False) -> dict[str, torch.Tensor]:
    """This rank's pieces: vocab-parallel embedding (and its tied copy as the output projection), column-parallel
    w1, row-parallel w2, duplicated norms and w2 bias."""
    out: dict[str, torch.Tensor] = {}
    named = dict(full)
    named["output.weight"] = full["embed.weight"]
    for name, t in named.items():
        if stage_of(name) != pp:
            continue
        if name in ("embed.weight", "output.weight") or name.endswith("w1.weight"):
            piece, placement = t.chunk(2, dim=0)[tp], "shard0"
        elif name.endswith("w2.weight"):
            piece, placement = t.chunk(2, dim=1)[tp], "shard1"
        else:
            piece, placement = t, "replicate"
        piece = piece.float().contiguous().clone()
        if as_dtensor:
            from torch.distributed.tensor import DTensor, Replicate, Shard

            tp_mesh = cases.mesh((2, 2), ("pp", "tp"))["tp"]
            pl = {"shard0": Shard(0), "shard1": Shard(1), "replicate": Replicate()}[placement]
            piece = DTensor.from_local(piece, tp_mesh, [pl], run_check=False)
        out[name] = piece
    return out


def pp_tp_plan(**overrides) -> ParallelPlan:  # noqa: ANN003
    mesh = cases.mesh((2, 2), ("pp", "tp"))
    kwargs = dict(
        names=tuple(full_model_grads(0)),
        rules=(Rule("*norm.weight", replicate=("tp",)), Rule("*.w2.bias", replicate=("tp",)), Rule("*")),
        tied=(("output.weight", "embed.weight"),),
    )
    kwargs |= overrides
    return ParallelPlan(mesh, **kwargs)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if type(t).__name__ == "DTensor" else t


def _check_layout(pieces: dict[str, torch.Tensor], full: dict[str, torch.Tensor], plan: ParallelPlan, p: float,
                  mode: str, max_norm: float) -> float:
    before = {n: _local(t).clone() for n, t in pieces.items()}
    clipper = GradClipper(max_norm=max_norm, norm_type=p, mode=mode, report=True)
    with count_collectives() as calls:
        result = clipper(pieces, plan=plan)
    # debug=True adds all_gather_object (two backend all-gathers: sizes, then data), on the first call only.
    assert calls.names.count("gloo:all_reduce") == 1 and calls.total == (3 if plan.debug else 1), calls.names
    want_total = reference_norm(list(full.values()), p)
    assert result.total_norm.item() == pytest.approx(want_total, rel=1e-6)
    want = {n: reference_norm([t], p) for n, t in full.items()}
    assert result.norms == pytest.approx(want, rel=1e-6)  # every stage's parameters, on every rank
    for name, t in pieces.items():
        owner = plan.owner(name)
        coef = min(1.0, max_norm / ((want_total if mode == "total" else want[owner]) + 1e-6))
        torch.testing.assert_close(_local(t).double(), before[name].double() * coef, rtol=1e-6, atol=1e-9)
    return result.total_norm.item()


def body_pp_tp() -> list[float]:
    rank = dist.get_rank()
    pp, tp = divmod(rank, 2)
    out = []
    for p in (2.0, 1.0, math.inf, 0.0):
        for mode, max_norm in (("total", 0.5), ("per_param", 0.8)):
            full = full_model_grads(11)
            out.append(_check_layout(pp_tp_pieces(full, pp, tp), full, pp_tp_plan(), p, mode, max_norm))
    full = full_model_grads(12)
    out.append(_check_layout(pp_tp_pieces(full, pp, tp), full, pp_tp_plan(debug=True), 2.0, "total", 0.5))
    # Placements read from DTensors: no tensor-parallel rule needed, only the tie.
    full = full_model_grads(13)
    dt_plan = pp_tp_plan(rules=(Rule("*"),), debug=True)
    out.append(_check_layout(pp_tp_pieces(full, pp, tp, as_dtensor=True), full, dt_plan, 2.0, "per_param", 0.8))
    with count_collectives() as calls:
        total = compose.get_total_norm(pp_tp_pieces(full, pp, tp, as_dtensor=True), dt_plan)
    assert calls.total == 1 and total.item() == pytest.approx(reference_norm(list(full.values())), rel=1e-6)
    return out


def body_bad_plans() -> list[str]:
    """Each wrong plan must make debug=True raise on every rank, naming the miscounted piece."""
    rank = dist.get_rank()
    pp, tp = divmod(rank, 2)
    full = full_model_grads(21)
    messages = []
    for plan in (
        pp_tp_plan(rules=(Rule("*"),), debug=True),  # norms duplicated over tp, counted twice
        pp_tp_plan(tied=(), names=(*full_model_grads(0), "output.weight"), debug=True),  # tie forgotten
        pp_tp_plan(rules=(Rule("*", replicate=("tp",)),), debug=True),  # tp shards taken for copies
    ):
        try:
            GradClipper(max_norm=1.0)(pp_tp_pieces(full, pp, tp), plan=plan)
            messages.append("no error")
        except RuntimeError as e:
            messages.append(str(e))
    return messages


def test_pipeline_and_tensor_parallel(run_ranks):
    values = run_ranks(4, body_pp_tp)
    assert all(v == values[0] for v in values)


def test_debug_mode_catches_over_and_under_counting(run_ranks):
    results = run_ranks(4, body_bad_plans)
    assert all(r == results[0] for r in results), "ranks disagree"
    over_norm, over_tie, under = results[0]
    assert "over-counted" in over_norm and "norm.weight" in over_norm, over_norm
    assert "over-counted" in over_tie and "output.weight" in over_tie and "embed.weight" in over_tie, over_tie
    assert "under-counted" in under and "w1.weight" in under, under


# ------------------------------------------------------------------------------------------ experts x data


def ep_dp_full(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"router.weight": (4, D), "dense.big": (37,)} | {f"moe.experts.{i}.w": (5, D) for i in range(4)}
    return {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}


def ep_dp_pieces(full: dict[str, torch.Tensor], dp: int, ep: int, experts_sharded: bool) -> dict[str, torch.Tensor]:
    """ep rank e holds experts 2e and 2e+1, sharded over dp by rows (or replicated over dp); the router is
    replicated everywhere; 'dense.big' is sharded over all four ranks, unevenly."""
    out = {"router.weight": full["router.weight"].float().clone()}
    out["dense.big"] = torch.tensor_split(full["dense.big"], 4)[dp * 2 + ep].float().clone()
    for i in (2 * ep, 2 * ep + 1):
        w = full[f"moe.experts.{i}.w"]
        out[f"moe.experts.{i}.w"] = (w.chunk(2, dim=0)[dp] if experts_sharded else w).float().clone()
    return out


def body_ep_dp() -> list[float]:
    rank = dist.get_rank()
    dp, ep = divmod(rank, 2)
    mesh = cases.mesh((2, 2), ("dp", "ep"))
    names = tuple(ep_dp_full(0))
    out = []
    for sharded in (True, False):
        rules = (
            Rule("router.*", replicate=("dp", "ep")),
            Rule("moe.experts.*", replicate=() if sharded else ("dp",)),
            Rule("*"),
        )
        for p, debug in ((2.0, True), (math.inf, False), (3.0, False)):
            full = ep_dp_full(31 + int(sharded))
            plan = ParallelPlan(mesh, names=names, rules=rules, debug=debug)
            out.append(_check_layout(ep_dp_pieces(full, dp, ep, sharded), full, plan, p, "per_param", 0.7))
    return out


def test_expert_and_data_parallel(run_ranks):
    values = run_ranks(4, body_ep_dp)
    assert all(v == values[0] for v in values)


# ------------------------------------------------------------------------------------------ validation


def body_plan_errors() -> list[str]:
    mesh = cases.mesh((2, 2), ("pp", "tp"))
    out = []
    for kwargs in (
        {"names": ("a",), "rules": (Rule("a", replicate=("dp",)),)},
        {"names": ("a", "b"), "rules": (Rule("a"),)},
        {"names": ("a",), "tied": (("a", "a"),)},
        {"names": ("a", "a")},
    ):
        try:
            ParallelPlan(mesh, **kwargs)
            out.append("accepted")
        except (ValueError, TypeError) as e:
            out.append(str(e))
    plan = ParallelPlan(mesh, names=("a",))
    try:
        GradClipper()({"zzz": torch.ones(2)}, plan=plan)
    except ValueError as e:
        out.append(str(e))
    return out


def test_plan_validation_names_expected_and_received(run_ranks):
    msgs = run_ranks(4, body_plan_errors)[0]
    assert "mesh dimensions ['dp']" in msgs[0] and "('pp', 'tp')" in msgs[0]
    assert "no rule matches ['b']" in msgs[1]
    assert "tied entry" in msgs[2]
    assert "duplicates" in msgs[3]
    assert "'zzz'" in msgs[4] and "ParallelPlan.names" in msgs[4]
