"""Composed parallelism on 4 CPU ranks: 2 PP x 2 TP and 2 EP x 2 DP, against the unsharded float64 model.

Every rank builds the full model's gradients from one seed (the reference), keeps the pieces its coordinates
give it (its pipeline stage, its tensor-parallel slice or duplicate, its experts and data-parallel shard, the
tied output projection of the last stage), and clips with a ParallelPlan. The total, the per-parameter report
(which names parameters of every stage on every rank) and the clipped pieces must match the reference, with one
collective per call. ``debug=True`` must pass a right plan and raise on plans that over- or under-count.
Run: ``.venv/bin/python -m pytest tests/test_compose.py``.
"""

from __future__ import annotations

import functools
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dist_clip import GradClipper, ParallelPlan, Rule, compose
from dist_clip.testing import count_collectives, reference_norm
from tests import beyond_cases as cases
from tests.fsdp_cases import _local

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


def body_pp_tp_per_group() -> list[list[float]]:
    """per_group under a plan: each stage's optimizer holds its own stage's parameters only, yet a group's norm
    spans every stage (the same coefficients on every rank), each group against its own max_norm."""
    rank = dist.get_rank()
    pp, tp = divmod(rank, 2)
    full = full_model_grads(14)

    def group_of(name: str) -> int:
        return 0 if name.endswith(("w1.weight", "w2.weight", "embed.weight", "output.weight")) else 1

    limits = (0.7, 0.2)
    out = []
    for p in (0.0, 1.0, 2.0, 3.5, math.inf):
        params = {}
        for name, g in pp_tp_pieces(full, pp, tp).items():
            params[name] = torch.nn.Parameter(torch.zeros_like(g))
            params[name].grad = g
        before = {n: q.grad.clone() for n, q in params.items()}
        opt = torch.optim.SGD([{"params": [q for n, q in params.items() if group_of(n) == k], "max_norm": limits[k]}
                               for k in (0, 1)], lr=0.1)
        with count_collectives() as calls:
            result = GradClipper(norm_type=p, mode="per_group")(params, plan=pp_tp_plan(), optimizer=opt)
        assert calls.total == 1, calls.names
        want = [reference_norm([t for n, t in full.items() if group_of(n) == k], p) for k in (0, 1)]
        coefs = [min(1.0, limits[k] / (want[k] + 1e-6)) for k in (0, 1)]
        assert result.clip_coef.tolist() == pytest.approx(coefs, rel=1e-6), (p, result.clip_coef, coefs)
        for name, q in params.items():
            coef = coefs[group_of(name)]  # output.weight, embed.weight's tied copy, is in group 0 too
            torch.testing.assert_close(q.grad.double(), before[name].double() * coef, rtol=1e-6, atol=1e-9)
        out.append(result.clip_coef.tolist())
    return out


def body_pp_tp_per_group_uneven() -> list[list[float]]:
    """Stages with different numbers of param groups: the last stage puts final_norm.weight in a third group of
    its own; group i still means group i of every stage that has it."""
    rank = dist.get_rank()
    pp, tp = divmod(rank, 2)
    full = full_model_grads(15)

    def group_of(name: str) -> int:
        if name == "final_norm.weight":
            return 2
        return 0 if name.endswith(("w1.weight", "w2.weight", "embed.weight", "output.weight")) else 1

    limits = (0.7, 0.2, 0.3)
    params = {}
    for name, g in pp_tp_pieces(full, pp, tp).items():
        params[name] = torch.nn.Parameter(torch.zeros_like(g))
        params[name].grad = g
    before = {n: q.grad.clone() for n, q in params.items()}
    mine = sorted({group_of(n) for n in params} | {0, 1})  # stage 0: groups 0 and 1; stage 1: 0, 1 and 2
    opt = torch.optim.SGD([{"params": [q for n, q in params.items() if group_of(n) == k], "max_norm": limits[k]}
                           for k in mine], lr=0.1)
    result = GradClipper(mode="per_group")(params, plan=pp_tp_plan(), optimizer=opt)
    want = [reference_norm([t for n, t in full.items() if group_of(n) == k], 2.0) for k in mine]
    coefs = [min(1.0, limits[k] / (w + 1e-6)) for k, w in zip(mine, want)]
    assert result.clip_coef.tolist() == pytest.approx(coefs, rel=1e-6), (result.clip_coef, coefs)
    for name, q in params.items():
        torch.testing.assert_close(q.grad.double(), before[name].double() * coefs[group_of(name)], rtol=1e-6,
                                   atol=1e-9)
    return result.clip_coef.tolist()


def test_per_group_under_a_plan_with_uneven_group_counts(run_ranks):
    results = run_ranks(4, body_pp_tp_per_group_uneven)
    assert results[0] == results[1] and results[2] == results[3] and results[0] == results[2][:2], results


def test_per_group_under_a_plan_spans_every_stage(run_ranks):
    results = run_ranks(4, body_pp_tp_per_group)
    assert all(r == results[0] for r in results), results


def body_bad_plans() -> list[str]:
    """Each wrong plan must make debug=True raise on every rank, naming the miscounted piece."""
    rank = dist.get_rank()
    pp, tp = divmod(rank, 2)
    full = full_model_grads(21)
    messages = []
    plan_again = pp_tp_plan(rules=(Rule("*"),), debug=True)
    for plan in (
        plan_again,  # norms duplicated over tp, counted twice
        pp_tp_plan(tied=(), names=(*full_model_grads(0), "output.weight"), debug=True),  # tie forgotten
        pp_tp_plan(rules=(Rule("*", replicate=("tp",)),), debug=True),  # tp shards taken for copies
    ):
        try:
            GradClipper(max_norm=1.0)(pp_tp_pieces(full, pp, tp), plan=plan)
            messages.append("no error")
        except RuntimeError as e:
            messages.append(str(e))
    # A failed audit, caught, audits the next call again: marking the plan checked after a failure let the same
    # over-count through silently from the second step on.
    try:
        GradClipper(max_norm=1.0)(pp_tp_pieces(full, pp, tp), plan=plan_again)
        messages.append("no error")
    except RuntimeError as e:
        messages.append(str(e))
    # The audit compares the one-collective norm with its all-gathered reference too, beyond counting: a total
    # off by 1e-3 with every piece counted once is a failure.
    right = pp_tp_plan(debug=True)
    named = right.named_shards(pp_tp_pieces(full, pp, tp))
    want = reference_norm(list(full.values()))
    try:
        right.check_once(named.shards, SimpleNamespace(total=torch.tensor(want * (1 + 1e-3), dtype=torch.float64)),
                         2.0)
        messages.append("no error")
    except RuntimeError as e:
        messages.append(str(e))
    right.check_once(named.shards, SimpleNamespace(total=torch.tensor(want, dtype=torch.float64)), 2.0)
    return messages


def test_pipeline_and_tensor_parallel(run_ranks):
    values = run_ranks(4, body_pp_tp)
    assert all(v == values[0] for v in values)


def test_debug_mode_catches_over_and_under_counting(run_ranks):
    results = run_ranks(4, body_bad_plans)
    assert all(r == results[0] for r in results), "ranks disagree"
    over_norm, over_tie, under, over_again, off_norm = results[0]
    assert "over-counted" in over_again and "norm.weight" in over_again, over_again
    assert "differs from the all-gathered reference" in off_norm, off_norm
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
    for kwargs in (
        {"names": ("a", "z"), "tied": (("b", "a"), ("b", "z"))},  # one copy, two owners: dict() kept the last
        {"names": ("a",), "debug": "no"},  # a non-empty string was taken for True
        {"names": ("a",), "rules": Rule("*")},  # "'Rule' object is not iterable"
    ):
        try:
            ParallelPlan(mesh, **kwargs)
            out.append("accepted")
        except (ValueError, TypeError) as e:
            out.append(f"{type(e).__name__}: {e}")
    # group= not naming exactly the mesh's ranks: a rank off the mesh counted nothing (10.13 for 17.42), a group
    # without coordinate 0 of a replicate dim no copy (0 for 17.42). And group= beside plan= was ignored.
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    half = pairs[1]
    for m, g in ((mesh["tp"], dist.group.WORLD), (mesh, half), (mesh, dist.group.WORLD)):
        try:
            ParallelPlan(m, names=("a",), group=g)
            out.append("accepted")
        except (ValueError, TypeError) as e:
            out.append(f"{type(e).__name__}: {e}")
    for g in (pairs[dist.get_rank() // 2], dist.group.WORLD):  # another group than the plan's; the plan's own
        try:
            GradClipper()({"a": torch.ones(2)}, plan=plan, group=g)
            out.append("accepted")
        except ValueError as e:
            out.append(str(e))
    try:  # a 2-character string for a pair: "ba" was read as copy "b" of owner "a"
        ParallelPlan(mesh, names=("a",), tied=("ba",))
        out.append("accepted")
    except (ValueError, TypeError) as e:
        out.append(f"{type(e).__name__}: {e}")
    return out


def body_tie_on_one_rank_and_measure_only() -> list[float]:
    """A tied weight on one rank under both names (the copy's registered first, so named_parameters() gives only
    the copy's name): counted once, as its owner (it was not counted at all: 1.85 for 4.00); a mapping holding it
    under the plan's name and an alias outside the plan too. And
    ``compose.get_total_norm`` only measures: an inf on one rank left every rank's gradients as they were (a
    clipper with an infinite limit multiplied them by inf / inf = NaN)."""
    mesh = cases.mesh((dist.get_world_size(),), ("tp",))

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(3, 4, bias=False)
            self.tok = torch.nn.Module()
            self.tok.weight = self.head.weight
            self.other = torch.nn.Parameter(torch.zeros(2))

    model = Tied()
    g = torch.Generator().manual_seed(3)
    model.head.weight.grad = torch.randn(4, 3, generator=g)
    model.other.grad = torch.randn(2, generator=g)
    plan = ParallelPlan(mesh, names=("tok.weight", "other"), rules=(Rule("*", replicate=("tp",)),),
                        tied=(("head.weight", "tok.weight"),))
    want = reference_norm([model.head.weight.grad, model.other.grad], 2.0)
    out = []
    for p in (2.0, math.inf):
        ref = reference_norm([model.head.weight.grad, model.other.grad], p)
        got = compose.get_total_norm(model, plan, p).item()
        assert got == pytest.approx(ref, rel=1e-6), (p, got, ref)
        out.append(got)
    assert GradClipper(max_norm=1e9, mode="per_param", report=True)(model, plan=plan).norms == pytest.approx(
        {"tok.weight": float(model.head.weight.grad.norm()), "other": float(model.other.grad.norm())}, rel=1e-6)
    assert out[0] == pytest.approx(want, rel=1e-6)
    # The same shared weight, no tie declared: the plan lists the name the full model's named_parameters() gives,
    # and a mapping of every name (remove_duplicate=False) holds an alias too, which sorts first. Counted once
    # under the plan's name, as the module is (it was refused: "'head.weight', which is neither in the plan's
    # names nor a tied copy").
    shared = ParallelPlan(mesh, names=("tok.weight", "other"), rules=(Rule("*", replicate=("tp",)),))
    every = dict(model.named_parameters(remove_duplicate=False))
    assert sorted(every)[0] == "head.weight"
    assert compose.get_total_norm(every, shared).item() == pytest.approx(want, rel=1e-6)
    assert compose.get_total_norm(model, shared).item() == pytest.approx(want, rel=1e-6)
    # With the tie declared, under the tied copy's name (sorted first) and an alias outside the plan after it: read
    # as under the copy's name alone (a copy: its owner counts it), the alias, which no name of the plan owns,
    # passed over as beside a name of the plan.
    copy_only = {"head.weight": model.head.weight, "other": model.other}
    aliased = {**copy_only, "z.weight": model.head.weight}
    assert compose.get_total_norm(aliased, plan).item() == compose.get_total_norm(copy_only, plan).item()
    if dist.get_rank() == 0:  # the rank that counts the replicated pieces
        model.other.grad[0] = math.inf
    before = [model.head.weight.grad.clone(), model.other.grad.clone()]
    total = compose.get_total_norm(model, plan)
    assert math.isinf(total.item()), total
    assert torch.equal(model.head.weight.grad, before[0]) and torch.equal(model.other.grad, before[1])
    return out


def test_plan_validation_names_expected_and_received(run_ranks):
    for msgs in run_ranks(4, body_plan_errors):  # every rank's (rank 0's alone were read)
        assert "mesh dimensions ['dp']" in msgs[0] and "('pp', 'tp')" in msgs[0]
        assert "no rule matches ['b']" in msgs[1]
        assert "tied entry" in msgs[2]
        assert "duplicates" in msgs[3]
        assert "'zzz'" in msgs[4] and "ParallelPlan.names" in msgs[4]
        assert msgs[5].startswith("ValueError: tied entry ('b', 'z')") and "already tied" in msgs[5], msgs[5]
        assert msgs[6] == "TypeError: ParallelPlan.debug must be True or False, got 'no'", msgs[6]
        assert msgs[7] == "TypeError: ParallelPlan.rules must be a tuple of Rule, got Rule", msgs[7]
        want = "ValueError: ParallelPlan.group holds ranks [0, 1, 2, 3], but the mesh spans ranks"
        assert msgs[8].startswith(want), msgs
        assert "group= must name exactly the mesh's ranks" in msgs[8]
        assert msgs[9].startswith("TypeError: ParallelPlan.group must be") or msgs[9].startswith(
            "ValueError: ParallelPlan.group holds ranks [2, 3], but the mesh spans ranks [0, 1, 2, 3]"), msgs[9]
        assert msgs[10] == "accepted", msgs[10]
        assert msgs[11].startswith("group= does not combine with plan="), msgs[11]
        assert msgs[12] == "accepted", msgs[12]  # the plan's own group, given again
        assert msgs[13] == "TypeError: ParallelPlan.tied entries must be (copy name, owner name) pairs, got 'ba'", msgs


def test_tie_on_one_rank_and_a_measurement_that_touches_nothing(run_ranks):
    results = run_ranks(2, body_tie_on_one_rank_and_measure_only)
    assert results[0] == results[1], results


# ------------------------------------------------------------------------------------------ real PP x TP
#
# The same 2 PP x 2 TP layout built with the real torch APIs: parallelize_module over the "tp" sub-mesh on each
# stage's module, and torch.distributed.pipelining (PipelineStage + a schedule) running forward and backward
# over microbatches on gloo, so the gradients come from the schedule. The embedding (stage 0) and the output
# projection (stage 1) share one weight; the user sums their gradients over "pp", the plan counts them once.

PD, PH, PV, PS = 6, 10, 8, 5  # model width, hidden width (splits over tp), vocabulary (splits over tp), sequence


class PipeBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(PD, bias=False)  # a plain weight duplicated over tp
        self.w1 = torch.nn.Linear(PD, PH)
        self.w2 = torch.nn.Linear(PH, PD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w2(torch.tanh(self.w1(self.norm(x))))


class PipeNet(torch.nn.Module):
    """Embedding, two blocks, final norm, output projection tied to the embedding; stages drop what they lack."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = torch.nn.Embedding(PV, PD)
        self.layers = torch.nn.ModuleDict({"0": PipeBlock(), "1": PipeBlock()})
        self.final_norm = torch.nn.LayerNorm(PD, bias=False)
        self.output = torch.nn.Linear(PD, PV, bias=False)
        self.output.weight = self.tok_embeddings.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        for layer in self.layers.values():
            h = layer(h)
        h = self.final_norm(h) if self.final_norm is not None else h
        return self.output(h) if self.output is not None else h


def pipe_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.reshape(-1, PV), target.reshape(-1))


def _pipe_full(seed: int) -> PipeNet:
    torch.manual_seed(seed)
    model = PipeNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
    return model


def _pipe_stage(full: PipeNet, pp: int, tp_mesh) -> torch.nn.Module:  # noqa: ANN001
    import copy

    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    stage = copy.deepcopy(full)
    if pp == 0:
        del stage.layers["1"]
        stage.final_norm, stage.output = None, None
        tp_plan = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
                   "layers.0.w1": ColwiseParallel(), "layers.0.w2": RowwiseParallel()}
    else:
        del stage.layers["0"]
        stage.tok_embeddings = None  # output.weight stays: this stage's copy of the tied weight
        tp_plan = {"layers.1.w1": ColwiseParallel(), "layers.1.w2": RowwiseParallel(),
                   "output": ColwiseParallel(output_layouts=Replicate())}
    return parallelize_module(stage, tp_mesh, tp_plan)


def _run_pipeline(stage: torch.nn.Module, pp: int, pp_group, schedule: str, n_micro: int,  # noqa: ANN001
                  tokens: torch.Tensor, target: torch.Tensor) -> None:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    pipe = PipelineStage(stage, pp, 2, torch.device("cpu"), group=pp_group)
    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    sched = kind(pipe, n_microbatches=n_micro, loss_fn=pipe_loss)  # scale_grads: the mean over microbatches
    if pp == 0:
        sched.step(tokens)
    else:
        sched.step(target=target)
    # The tied weight: torch gives the vocab-parallel embedding a Replicate gradient (embedding_dense_backward
    # has no Shard(0) strategy); bring it to the parameter's Shard(0) (a local slice), then sum the two stages'
    # gradients over pp, as a training loop with tied stages must.
    tied = stage.tok_embeddings.weight if pp == 0 else stage.output.weight
    tied.grad = tied.grad.redistribute(tied.device_mesh, tied.placements)
    dist.all_reduce(tied.grad._local_tensor, group=pp_group)


def _grad_full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if type(t).__name__ == "DTensor" else t).detach().double()


def body_real_pp_tp(schedule: str, n_micro: int) -> list[float]:
    mesh = cases.mesh((2, 2), ("pp", "tp"))
    pp, _ = mesh.get_coordinate()
    full = _pipe_full(5)
    names = tuple(n for n, _ in full.named_parameters())  # the tied output weight is listed once
    ref = __import__("copy").deepcopy(full).double()
    stage = _pipe_stage(full, pp, mesh["tp"])
    g = torch.Generator().manual_seed(9)
    tokens, target = torch.randint(0, PV, (4, PS), generator=g), torch.randint(0, PV, (4, PS), generator=g)
    _run_pipeline(stage, pp, mesh["pp"].get_group(), schedule, n_micro, tokens, target)
    pipe_loss(ref(tokens), target).backward()  # the unsharded model on the whole batch, float64
    ref_grads = {n: q.grad for n, q in ref.named_parameters()}
    owner = {"output.weight": "tok_embeddings.weight"}
    for n, q in stage.named_parameters():  # the schedule's gradients are the reference's, piece by piece
        torch.testing.assert_close(_grad_full(q.grad), ref_grads[owner.get(n, n)], rtol=1e-5, atol=1e-6)
    saved = {n: q.grad._local_tensor.clone() if type(q.grad).__name__ == "DTensor" else q.grad.clone()
             for n, q in stage.named_parameters()}

    def restore() -> None:
        for n, q in stage.named_parameters():
            (q.grad._local_tensor if type(q.grad).__name__ == "DTensor" else q.grad).copy_(saved[n])

    out = []
    for p in (2.0, math.inf):
        want_total = reference_norm(list(ref_grads.values()), p)
        want = {n: reference_norm([t], p) for n, t in ref_grads.items()}
        per_limit = sorted(want.values())[len(want) // 2]  # some parameters clipped, some not
        for i, (mode, max_norm) in enumerate((("total", 0.5 * want_total), ("per_param", per_limit))):
            debug = i == 0  # the first call of each plan audits once against an all-gather
            plan = ParallelPlan(mesh, names=names, rules=(Rule("*norm.weight", replicate=("tp",)), Rule("*")),
                                tied=(("output.weight", "tok_embeddings.weight"),), debug=debug)
            restore()
            with count_collectives() as calls:
                result = GradClipper(max_norm=max_norm, norm_type=p, mode=mode, report=True)(stage, plan=plan)
            assert calls.names.count("gloo:all_reduce") == 1 and calls.total == (3 if debug else 1), calls.names
            assert result.total_norm.item() == pytest.approx(want_total, rel=1e-5)
            assert result.norms == pytest.approx(want, rel=1e-5)  # every stage's parameters, on every rank
            for n, q in stage.named_parameters():
                o = owner.get(n, n)
                coef = min(1.0, max_norm / ((want_total if mode == "total" else want[o]) + 1e-6))
                torch.testing.assert_close(_grad_full(q.grad), ref_grads[o] * coef, rtol=1e-5, atol=1e-6)
            assert bool(result.clipped)
            out.append(result.total_norm.item())
    return out


def test_real_pipeline_schedule_with_tensor_parallel_stages(run_ranks):
    values = run_ranks(4, body_real_pp_tp, "gpipe", 2)
    assert all(v == values[0] for v in values)
    values = run_ranks(4, body_real_pp_tp, "1f1b", 4)
    assert all(v == values[0] for v in values)


def body_debug_audit_with_nan() -> list[float]:
    """A NaN gradient under a right plan: the audit's all-gathered reference is NaN for every p, as the
    one-collective norm is (vector_norm counts a NaN as one non-zero at p = 0: a false alarm that pre-empted
    on_nonfinite)."""
    rank = dist.get_rank()
    mesh = cases.mesh((dist.get_world_size(),), ("tp",))
    out = []
    for p in (2.0, math.inf, 0.0):
        g = torch.arange(1.0, 5.0) * (rank + 1)
        if rank == 1:
            g[0] = math.nan
        result = GradClipper(max_norm=1.0, norm_type=p, on_nonfinite="zero")(
            {"w": g}, plan=ParallelPlan(mesh, names=("w",), debug=True)
        )
        assert not bool(result.finite) and bool((g == 0).all())
        out.append(float(result.total_norm))
    return out


def test_debug_audit_accepts_nan_for_every_order(run_ranks):
    for totals in run_ranks(2, body_debug_audit_with_nan):
        assert all(math.isnan(t) for t in totals), totals


def body_debug_audit_of_complex_and_sparse_pieces() -> list[float]:
    """The audit measures each piece as the definition does: a complex gradient by its moduli (cast to float64 it
    kept the real part: a right plan failed, 12.37 for 13.04) and a sparse one by its coalesced values (its
    reshape raised on that stage alone, the other waited in the all-gather until the timeout)."""
    rank = dist.get_rank()
    mesh = cases.mesh((2,), ("pp",))
    out = []
    torch.manual_seed(0)
    emb, lin = torch.nn.Embedding(6, 3, sparse=True), torch.nn.Linear(3, 2)
    emb(torch.tensor([1, 2, 1])).sum().backward()
    lin(torch.ones(1, 3)).sum().backward()
    complex_grad = torch.tensor([3 + 4j, 1j], dtype=torch.complex64)
    full = [emb.weight.grad.to_dense(), lin.weight.grad, lin.bias.grad, complex_grad]
    stages = ({"emb.weight": emb.weight, "c": complex_grad}, {"lin.weight": lin.weight, "lin.bias": lin.bias})
    names = ("emb.weight", "c", "lin.weight", "lin.bias")
    for p in (2.0, 1.0, math.inf, 0.0):
        plan = ParallelPlan(mesh, names=names, debug=True)
        got = GradClipper(max_norm=1e9, norm_type=p)(stages[rank], plan=plan).total_norm
        assert float(got) == pytest.approx(reference_norm(full, p), rel=1e-6), (p, float(got))
        out.append(float(got))
    # Two stages' sparse embeddings with the same values in other rows are two pieces (their coalesced values
    # alone read as one piece counted twice: "over-counted" on a right plan)
    emb = torch.nn.Embedding(6, 3, sparse=True)
    emb(torch.tensor([1, 2] if rank == 0 else [4, 5])).sum().backward()
    plan = ParallelPlan(mesh, names=("e0.weight", "e1.weight"), debug=True)
    got = GradClipper(max_norm=1e9)({f"e{rank}.weight": emb.weight}, plan=plan).total_norm
    assert float(got) == pytest.approx(math.sqrt(12.0), rel=1e-6), float(got)
    return out


def test_debug_audit_of_complex_and_sparse_pieces(run_ranks):
    totals = run_ranks(2, body_debug_audit_of_complex_and_sparse_pieces)
    assert totals[0] == totals[1], totals


def body_one_sided_bad_input() -> list[str]:
    """Bad input on one stage only (a name the plan lacks, a negative group limit, a Partial gradient, a NaN
    max_norm given to compose.clip_grad_norm_): that rank raises its ValueError and every other rank a RuntimeError
    at once (they waited in the collective until the process group's timeout; compose.clip_grad_norm_'s clipper
    refused its max_norm alone, and rank 0's collective met rank 1's next call). A Partial gradient is refused on
    every rank holding one, copies too: a replica off coordinate 0 raised "another rank refused" instead of its
    own ValueError, and a tied copy's Partial gradient was measured as a copy on no error at all."""
    from torch.distributed.tensor import DTensor, Partial

    rank = dist.get_rank()
    mesh = cases.mesh((2,), ("pp",))
    out = []
    for case in ("missing name", "bad group limit", "partial", "measure only", "optimizer", "report", "compose",
                 "partial replica", "partial tied copy"):
        q = torch.nn.Parameter(torch.zeros(4))
        q.grad = torch.arange(1.0, 5.0)
        pieces = {("a.weight", "b.weight")[rank]: q}
        kw, opt = {}, None
        plan = ParallelPlan(mesh, names=("a.weight", "b.weight"))
        if case == "partial replica":  # the same parameter on both ranks, a copy over pp, Partial on both
            plan = ParallelPlan(mesh, names=("a.weight",), rules=(Rule("*", replicate=("pp",)),))
            q.grad = DTensor.from_local(torch.ones(4), mesh, [Partial()], run_check=False)
            pieces = {"a.weight": q}
        if case == "partial tied copy":  # rank 1 holds the tied copy, its gradient Partial
            plan = ParallelPlan(mesh, names=("a.weight",), tied=(("b.weight", "a.weight"),))
            if rank == 1:
                q.grad = DTensor.from_local(torch.ones(4), mesh, [Partial()], run_check=False)
        if case in ("missing name", "measure only") and rank == 1:
            pieces["c.bias"] = torch.nn.Parameter(torch.zeros(2))
            pieces["c.bias"].grad = torch.ones(2)
        if case == "bad group limit":
            kw = {"mode": "per_group"}
            opt = torch.optim.SGD([{"params": [q], "max_norm": 1.0 if rank == 0 else -1.0}], lr=0.1)
        if case == "partial" and rank == 1:
            w = torch.nn.Parameter(torch.zeros(4))
            w.grad = DTensor.from_local(torch.ones(4), mesh, [Partial()], run_check=False)
            pieces = {"b.weight": w}
        if case == "optimizer" and rank == 1:  # refused before the plan's names are read: never joined, and
            opt = "sgd"  # rank 0's next call paired with this one's
        if case == "report" and rank == 1:
            kw = {"report": "yes"}
        try:
            if case == "measure only":  # compose.get_total_norm refuses the same way
                compose.get_total_norm(pieces, plan)
            elif case == "report":
                GradClipper(max_norm=1.0)(pieces, plan=plan, **kw)
            elif case == "compose":
                compose.clip_grad_norm_(pieces, math.nan if rank == 1 else 1.0, plan)
            else:
                GradClipper(max_norm=1.0, **kw)(pieces, plan=plan, optimizer=opt)
            out.append("no error")
        except (ValueError, TypeError, RuntimeError) as e:
            out.append(f"{type(e).__name__}: {e}")
    return out


def test_bad_input_on_one_stage_raises_on_every_rank_at_once(run_ranks):
    a, b = run_ranks(2, body_one_sided_bad_input, timeout_s=60)
    refused = "RefusedElsewhere: another rank of this call refused its input"  # a RuntimeError subclass
    partial = "ValueError: gradient of '{}' has placements (Partial(sum),)"
    assert len(a) == 9 and all(m.startswith(refused) for m in a[:7] + a[8:]), a
    assert a[7].startswith(partial.format("a.weight")), a
    expected = ("ValueError: this rank holds 'c.bias', which is neither in the plan's names",
                "ValueError: param group 0 has max_norm -1.0; expected a number >= 0",
                partial.format("b.weight"),
                "ValueError: this rank holds 'c.bias', which is neither in the plan's names",
                "TypeError: optimizer must be a torch.optim.Optimizer, got str",
                "TypeError: report must be None, True or False, got str",
                "ValueError: max_norm must be a number >= 0, got nan",
                partial.format("a.weight"),
                partial.format("b.weight"))
    assert len(b) == 9 and all(m.startswith(e) for m, e in zip(b, expected)), b


def body_group_limits_across_stages() -> list[str]:
    """One param group index over two stages: the same max_norm gives the same coefficient on every rank; two
    different ones are a ValueError on every rank (each stage clipped its half by its own limit: 0.14 / 0.014)."""
    rank = dist.get_rank()
    plan = ParallelPlan(cases.mesh((2,), ("pp",)), names=("a.weight", "b.weight"))
    out = []
    for p in (2.0, math.inf):
        for limits in ((1.0, 1.0), (1.0, 0.1), (1.0, math.inf)):  # an inf limit hid a finite one (inf sums)
            q = torch.nn.Parameter(torch.zeros(4))
            q.grad = torch.arange(1.0, 5.0) * (rank + 1)
            opt = torch.optim.SGD([{"params": [q], "max_norm": limits[rank]}], lr=0.1)
            try:
                r = GradClipper(mode="per_group", norm_type=p)({("a.weight", "b.weight")[rank]: q}, plan=plan,
                                                              optimizer=opt)
                full = torch.cat([torch.arange(1.0, 5.0), torch.arange(1.0, 5.0) * 2])
                want = min(1.0, 1.0 / (float(torch.linalg.vector_norm(full, p)) + 1e-6))
                assert r.clip_coef.tolist() == pytest.approx([want], rel=1e-6), (p, r.clip_coef)
                out.append(f"{r.clip_coef.item():.6f}")
            except ValueError as e:
                out.append(str(e).split(":")[0])
    return out


def test_a_group_limit_differing_across_stages_is_refused_on_every_rank(run_ranks):
    a, b = run_ranks(2, body_group_limits_across_stages, timeout_s=60)
    assert a == b, (a, b)
    refused = "param group 0 ('param_group0') has different max_norm on different ranks (0.1, 1)"
    assert a[1] == a[4] == refused and a[0] != refused and a[3] != refused, a
    assert a[2] == a[5] == "param group 0 ('param_group0') has different max_norm on different ranks (1, inf)", a


def body_plans_differing_in_rules() -> list[str]:
    """Rank 0's plan counts every piece once over dp (replicate=), rank 1's sums them; the names agree. Both
    returned one total (10.32) that rank 0's plan did not describe (4.13), with no error: the plan's rules,
    tied copies and debug flag now ride in the settings fingerprint, and every rank raises."""
    rank = dist.get_rank()
    mesh = cases.mesh((2,), ("dp",))
    names = ("a.weight", "a.bias")
    rep = ParallelPlan(mesh, names=names, rules=(Rule("*", replicate=("dp",)),))
    summed = ParallelPlan(mesh, names=names, rules=(Rule("*"),))
    tied = ParallelPlan(mesh, names=names, tied=(("b.weight", "a.weight"),))
    out = []
    for mine in ((rep, summed), (summed, tied)):
        for call in ("total", "per_param", "get_total_norm"):
            grads = {n: torch.full((3,), float(i + 1 + rank)) for i, n in enumerate(names)}
            try:
                if call == "get_total_norm":
                    compose.get_total_norm(grads, mine[rank])
                else:
                    GradClipper(max_norm=1.0, mode=call)(grads, plan=mine[rank])
                out.append("no error")
            except RuntimeError as e:
                out.append("settings" if "or on its settings" in str(e) and "plan(rules=" in str(e) else str(e))
    same = GradClipper(max_norm=1.0)({n: torch.ones(3) for n in names}, plan=rep).total_norm  # agreeing plans
    out.append(f"{same.item():.6f}")
    # Orders that mean nothing do not count (a set's order is the process's hash order: two ranks refused the
    # same plan): a rule's dimension names, the tied pairs.
    mesh2 = cases.mesh((2, 1), ("dp", "tp"))
    dims = ("dp", "tp") if rank == 0 else ("tp", "dp")
    pairs = (("b.weight", "a.weight"), ("b.bias", "a.bias"))
    plan = ParallelPlan(mesh2, names=names, rules=(Rule("*", replicate=dims),), tied=pairs[::1 - 2 * rank])
    same = GradClipper(max_norm=1.0)({n: torch.ones(3) for n in names}, plan=plan).total_norm
    out.append(f"{same.item():.6f}")
    return out


def test_plans_differing_in_rules_are_refused_on_every_rank(run_ranks):
    a, b = run_ranks(2, body_plans_differing_in_rules, timeout_s=60)
    assert a == b == ["settings"] * 6 + [f"{math.sqrt(6):.6f}"] * 2, (a, b)


def body_replaced_plans() -> list[str]:
    """A plan made with ``dataclasses.replace()`` is a plan of its own: it shared the original's memo, so its
    settings fingerprint was the original's (a rank with other rules went unnoticed) and its debug audit counted
    as done (a plan counting replicas on every rank returned sqrt(2) x the norm, unaudited)."""
    import dataclasses

    rank = dist.get_rank()
    mesh = cases.mesh((2,), ("dp",))
    names = ("a.weight", "a.bias")
    good = ParallelPlan(mesh, names=names, rules=(Rule("*", replicate=("dp",)),), debug=True)

    def call(plan: ParallelPlan) -> str:
        grads = {n: torch.full((3,), float(i + 1)) for i, n in enumerate(names)}  # the same on both: replicas
        try:
            return f"{GradClipper(max_norm=1.0)(grads, plan=plan).total_norm.item():.6f}"
        except RuntimeError as e:
            if "over-counted" in str(e):
                return "audit"
            return "settings" if "or on its settings" in str(e) else str(e)

    out = [call(good)]
    out.append(call(dataclasses.replace(good, rules=(Rule("*"),))))
    quiet = dataclasses.replace(good, debug=False)
    out.append(call(quiet))
    out.append(call(quiet if rank == 0 else dataclasses.replace(quiet, rules=(Rule("*"),))))
    return out


def test_plans_made_with_dataclasses_replace_start_afresh(run_ranks):
    a, b = run_ranks(2, body_replaced_plans, timeout_s=60)
    norm = f"{math.sqrt(15):.6f}"
    assert a == b == [norm, "audit", norm, "settings"], (a, b)


def body_distinct_over_replicate_placements(p: float) -> list[float]:
    """Each ep rank holds its own expert as a ``Replicate()`` DTensor on a 1-D ("ep",) mesh (a layout that says
    copy where the experts differ): ``Rule("moe.*", distinct=("ep",))`` counts every rank's piece (README:
    distinct= names the dims along which pieces differ whatever the meshes suggest; the suite's only distinct=
    case had its experts on another mesh, and a plan taking the placement's word dropped expert 1, 3.55 for
    4.29)."""
    from torch.distributed.tensor import DTensor, Replicate

    rank = dist.get_rank()
    mesh = cases.mesh((2,), ("ep",))
    full = {f"moe.experts.{e}.w": torch.randn(4, 3, generator=torch.Generator().manual_seed(e)) for e in range(2)}
    mine = f"moe.experts.{rank}.w"
    grad = DTensor.from_local(full[mine].clone(), mesh, [Replicate()], run_check=False)
    plan = ParallelPlan(mesh, names=tuple(full), rules=(Rule("moe.*", distinct=("ep",)),))
    out = []
    for mode in ("total", "per_param"):
        result = GradClipper(max_norm=1e9, norm_type=p, mode=mode, report=True)({mine: grad}, plan=plan)
        out += [result.total_norm.item(), *(result.norms[n] for n in full)]
    want = [reference_norm(list(full.values()), p), *(reference_norm([t], p) for t in full.values())]
    for got, expected in zip(out, want * 2):
        assert abs(got - expected) <= 1e-6 * expected, (out, want)
    return out


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_distinct_dims_override_replicate_placements(run_ranks, p):
    a, b = run_ranks(2, body_distinct_over_replicate_placements, p, timeout_s=60)
    assert a == b, (a, b)


def body_plan_edge_cases() -> list:
    """Four cases on a (pp=2, tp=1) mesh: clipped (and num_clipped) the same on both stages when only the stage
    with more param groups clips (stage 0 said False); a parameter both ranks hold put in different group
    indices is a ValueError on every rank (the indices were averaged into a third group, silently); a debug
    audit of a correct plan on an overflowing step passes (inf - inf read as a mismatch); an integer gradient on
    one stage is refused with the other ranks at once (they waited until the timeout)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("pp", "tp"))
    pp = mesh.get_coordinate()[0]
    out: list = []
    params: dict[str, torch.nn.Parameter] = {}

    def param(name: str, grad: list[float]) -> torch.nn.Parameter:
        params[name] = torch.nn.Parameter(torch.zeros(len(grad)))
        params[name].grad = torch.tensor(grad)
        return params[name]

    plan = ParallelPlan(mesh, names=("s0.w", "s1.w", "s1.b"))
    if pp == 0:
        opt = torch.optim.SGD([{"params": [param("s0.w", [0.3, 0.4])], "max_norm": 1.0}], lr=0.1)
    else:
        opt = torch.optim.SGD([{"params": [param("s1.w", [0.3, 0.4])], "max_norm": 1.0},
                               {"params": [param("s1.b", [30.0, 40.0])], "max_norm": 1.0}], lr=0.1)
    clipper = GradClipper(mode="per_group")
    out.append(bool(clipper(params, plan=plan, optimizer=opt).clipped))
    out.append(int(clipper.num_clipped))

    shared = ParallelPlan(mesh, names=("a",), tied=(("b", "a"),))
    params.clear()
    mine = param("a" if pp == 0 else "b", [3.0, 4.0])
    groups = [{"params": [], "max_norm": 1.0}] * pp + [{"params": [mine], "max_norm": 1.0}]
    try:
        GradClipper(mode="per_group")(params, plan=shared, optimizer=torch.optim.SGD(groups, lr=0.1))
    except ValueError as e:
        out.append("different param group indices" in str(e))
    else:
        out.append(False)

    plan = ParallelPlan(mesh, names=("s0.w", "s1.w"), debug=True)
    params.clear()
    param("s0.w" if pp == 0 else "s1.w", [math.inf, 1.0] if pp == 0 else [1.0, 2.0])
    out.append(math.isinf(GradClipper()(params, plan=plan).total_norm.item()))

    grads = {"s0.w": torch.tensor([1.0, 2.0])} if pp == 0 else {"s1.w": torch.tensor([1, 2])}  # raw gradients
    try:
        GradClipper()(grads, plan=ParallelPlan(mesh, names=("s0.w", "s1.w")))
    except (TypeError, RuntimeError) as e:
        out.append(type(e).__name__)
    return out


def test_plan_edge_cases(run_ranks):
    results = run_ranks(2, body_plan_edge_cases, timeout_s=60)
    assert results[0] == [True, 1, True, True, "RefusedElsewhere"], results  # a RuntimeError subclass
    assert results[1] == [True, 1, True, True, "TypeError"], results


# ------------------------------------------------------------------------------------------ FSDP2 over TP


class _TpBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(D)
        self.w1 = torch.nn.Linear(D, H)
        self.w2 = torch.nn.Linear(H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w2(torch.tanh(self.w1(self.norm(x))))


def body_fsdp2_over_tp_plan() -> list[float]:
    """FSDP2 over tensor parallelism on a (dp, tp) mesh, the norm layers left out of the TP plan: their
    gradients are DTensors on mesh["dp"], the same on both tp slices. Rule("*") counted them once per slice
    (1.33 for 1.28 at p = 2, 675 for 633 at p = 0); a debug audit that failed and was caught audited nothing on
    the next call."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = cases.mesh((2, 2), ("dp", "tp"))
    dp = mesh.get_coordinate()[0]
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Embedding(V, D), _TpBlock(), _TpBlock(), torch.nn.LayerNorm(D),
                                torch.nn.Linear(D, V, bias=False))
    with torch.no_grad():
        for n, q in model.named_parameters():
            if n.startswith(("1.norm", "2.norm", "3.")):
                q.normal_(1.0, 0.5)  # norm layers with gradients of the size of the others'
    ref = __import__("copy").deepcopy(model).double()
    tp_plan = {"0": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
               "4": ColwiseParallel(output_layouts=Replicate())}
    for i in ("1", "2"):
        tp_plan |= {f"{i}.w1": ColwiseParallel(), f"{i}.w2": RowwiseParallel()}
    parallelize_module(model, mesh["tp"], tp_plan)
    for i in (1, 2):
        fully_shard(model[i], mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])

    def batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(50 + k)
        return torch.randint(0, V, (2, 5), generator=g), torch.randint(0, V, (2, 5), generator=g)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.reshape(-1, V).double(), target.reshape(-1))

    loss(model(batch(dp)[0]), batch(dp)[1]).backward()
    torch.stack([loss(ref(batch(k)[0]), batch(k)[1]) for k in range(2)]).mean().backward()
    ref_grads = {n: q.grad for n, q in ref.named_parameters()}
    names = tuple(n for n, _ in model.named_parameters())
    out = []
    for p in (0.0, 1.0, 2.0, 3.5, math.inf):
        want = reference_norm(list(ref_grads.values()), p)
        for debug in (False, True):
            plan = ParallelPlan(mesh, names=names, debug=debug)
            with count_collectives() as calls:
                got = GradClipper(max_norm=1e30, norm_type=p)(model, plan=plan).total_norm.item()
            assert calls.names.count("gloo:all_reduce") == 1, calls.names
            assert got == pytest.approx(want, rel=1e-6), (p, debug, got, want)
            if p == 2.0 and not debug:
                report = GradClipper(max_norm=1e30, mode="per_param", report=True)(model, plan=plan).norms
                assert report == pytest.approx({n: reference_norm([t], p) for n, t in ref_grads.items()}, rel=1e-5)
            out.append(got)
    # A wrong plan (the norms declared copies over dp, where they are shards) fails its audit on every call.
    wrong = ParallelPlan(mesh, names=names, rules=(Rule("*norm*", replicate=("dp",)), Rule("*")), debug=True)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="under-counted"):
            GradClipper(max_norm=1e30)(model, plan=wrong)
    return out


def test_a_plan_over_fsdp2_and_tensor_parallel_counts_dp_only_pieces_once(run_ranks):
    values = run_ranks(4, body_fsdp2_over_tp_plan)
    assert all(v == values[0] for v in values)


def test_debug_audit_needs_no_numpy(monkeypatch):
    """``debug=True`` told pieces apart by ``t.numpy().tobytes()``, and numpy is not a dependency: without it
    every rank raised "Numpy is not available". The key is now torch's own bytes: exact, so copies meet and
    pieces one ulp apart do not."""
    from dist_clip import _norm

    def no_numpy(self, *args, **kwargs):
        raise RuntimeError("Numpy is not available")

    monkeypatch.setattr(torch.Tensor, "numpy", no_numpy)
    a = torch.tensor([3.0, -4.0], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    b_next = b.clone()
    b_next[0] = math.nextafter(1.0, 2.0)
    gathered = [(0, [("a", True, a), ("b", True, b)]), (1, [("a", False, a.clone()), ("b", True, b.clone())]),
                (2, [("b", True, b_next)])]
    problems, reference = compose._audit(gathered, 2.0)
    assert problems == ["over-counted: a piece of 'b' held by ranks [0, 1] is counted by ranks [0, 1]"], problems
    assert reference == pytest.approx(math.sqrt(25 + 9 + 9 + 2 * (b_next[0].item() - 1.0)), rel=1e-12)
    assert _norm.tensor_bytes(torch.tensor([], dtype=torch.float64)) == b""
    assert _norm.tensor_bytes(torch.arange(6.0, dtype=torch.float64).reshape(2, 3)[:, 1]) == \
        bytes(torch.tensor([1.0, 4.0], dtype=torch.float64).view(torch.uint8).tolist())


# ------------------------------------------------------------------------------------------ wrappers under a plan


def _wrapped_stage(kind: str, mesh) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, torch.Tensor]]:  # noqa: ANN001
    """A small MLP wrapped as ``kind`` on 2 ranks, after one backward of each rank's own batch; also what the
    optimizer steps (name -> parameter: FSDP2's sharded parameters) and the float64 reference gradients."""
    import copy

    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    ref = copy.deepcopy(model).double()
    stepped = dict(model.named_parameters())
    if kind.startswith("fsdp2"):
        for m in (model[0], model[2], model):
            fully_shard(m, mesh=mesh)
        stepped = dict(model.named_parameters())  # the sharded DTensor parameters, before any unshard
        if kind == "fsdp2 unsharded":
            model.set_reshard_after_backward(False)
        if kind == "fsdp2 sync off":
            model.set_requires_gradient_sync(False)
        wrapped = model
    elif kind.startswith("replicate"):
        from torch.distributed._composable.replicate import replicate

        wrapped = replicate(model)
        if kind == "replicate sync off":
            wrapped.set_requires_gradient_sync(False)
    elif kind.startswith("ddp"):
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:  # fsdp1
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(model, use_orig_params=kind.endswith("orig"), device_id=torch.device("cpu"))
    xs = [torch.randn(2, 4, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    if kind == "ddp no_sync":
        wrapped.require_backward_grad_sync = False  # what no_sync() sets: the call happens inside it
    wrapped(xs[dist.get_rank()]).pow(2).sum().backward()
    torch.stack([ref(x.double()).pow(2).sum() for x in xs]).mean().backward()
    return wrapped, stepped, {n: q.grad for n, q in ref.named_parameters()}


def body_wrappers_under_a_plan() -> list:
    """A plan over an FSDP2, composable ``replicate`` or DDP stage module runs the checks and the FSDP2 swap of
    the path without a plan. FSDP2 left unsharded after backward (``set_reshard_after_backward(False)``) read its
    plain unsharded parameters, whose gradients are None once reduced: 0 for 3.26, and a clip to 0.1 left the
    stepped gradients at 3.26; FSDP2 or ``replicate`` with gradient sync off, and DDP inside ``no_sync()``,
    measured each rank's unreduced gradients silently (both ranks returned rank 0's 5.92); DDP's ``module.``
    prefix was not unwrapped; FSDP1 was refused as "'_flat_param' not in names"."""
    from tests._harness import outcome

    mesh = cases.mesh((2,), ("dp",))
    names = ("0.weight", "0.bias", "2.weight", "2.bias")
    out: list = []
    for kind, rules in (("fsdp2", (Rule("*"),)), ("fsdp2 unsharded", (Rule("*"),)),
                        ("replicate", (Rule("*", replicate=("dp",)),)), ("ddp", (Rule("*", replicate=("dp",)),))):
        wrapped, stepped, ref = _wrapped_stage(kind, mesh)
        plan = ParallelPlan(mesh, names=names, rules=rules, debug=kind == "ddp")
        want = reference_norm(list(ref.values()), 2.0)
        got = GradClipper(max_norm=1e9)(wrapped, plan=plan).total_norm.item()
        assert got == pytest.approx(want, rel=1e-6), (kind, got, want)
        report = GradClipper(max_norm=1e9, mode="per_param", report=True)(wrapped, plan=plan).norms
        assert report == pytest.approx({n: reference_norm([t], 2.0) for n, t in ref.items()}, rel=1e-5), kind
        GradClipper(max_norm=0.1)(wrapped, plan=plan)
        after = [_grad_full(q.grad).double() for q in stepped.values()]  # what the optimizer steps
        clipped = reference_norm(after, 2.0)
        assert clipped == pytest.approx(0.1, rel=1e-5), (kind, clipped)
        out.append(round(got, 6))
    for kind, expected in (("fsdp2 sync off", "set_requires_gradient_sync(False)"),
                           ("replicate sync off", "set_requires_gradient_sync(False)"),
                           ("ddp no_sync", "no_sync()"),
                           ("fsdp1", "FSDP1 flat parameters are not supported under a plan"),
                           ("fsdp1 orig", "FSDP1 flat parameters are not supported under a plan")):
        wrapped, _, _ = _wrapped_stage(kind, mesh)
        plan = ParallelPlan(mesh, names=names, rules=(Rule("*", replicate=("dp",)),))
        for mode in ("total", "per_param"):
            call = functools.partial(GradClipper(max_norm=1e9, mode=mode), wrapped, plan=plan)
            out.append(outcome(call, ValueError, lambda m, e=expected: e in m))
    return out


def test_wrapped_stage_modules_get_the_checks_and_swap_without_a_plan(run_ranks):
    results = run_ranks(2, body_wrappers_under_a_plan, timeout_s=180)
    assert results[0] == results[1], results
    assert results[0][4:] == [True] * 10, results[0]


# ------------------------------------------------------------------------------------------ experts x FSDP2


class _MoeNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(4, 6)
        self.moe = torch.nn.Module()
        self.moe.experts = torch.nn.ModuleList([torch.nn.Linear(6, 5) for _ in range(2)])

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self.moe.experts[e](torch.tanh(self.dense(x)))


def body_ep_over_fsdp2_flattened() -> list:
    """Expert parallelism with FSDP2 as torchtitan lays it out on a (dp=2, ep=2) mesh: the dense layer sharded
    over the flattened ("dp", "ep") mesh, expert e sharded over mesh["dp"] on the ep = e ranks. The dense
    gradients span the ep line, so the sibling inference of a rule without replicate= took the other expert for
    a copy and counted ep = 0 only (6.06 for 8.14 at p = 2, 65 for 100 at p = 0), and the debug audit advised
    shortening an empty replicate=. ``Rule("moe.*", distinct=("ep",))`` says the ep slices differ."""
    import copy

    from torch.distributed.fsdp import fully_shard

    mesh = cases.mesh((2, 2), ("dp", "ep"))
    dp, ep = mesh.get_coordinate()
    torch.manual_seed(1)
    model = _MoeNet()
    ref = copy.deepcopy(model).double()
    fully_shard(model.moe.experts[ep], mesh=mesh["dp"])
    fully_shard(model.dense, mesh=mesh["dp", "ep"]._flatten("dp_ep_moe_test"))

    def batch(k: int) -> torch.Tensor:
        return torch.randn(3, 4, generator=torch.Generator().manual_seed(50 + k))

    model(batch(dp * 2 + ep), ep).pow(2).sum().backward()
    # The reference: the dense layer sees all four batches (mean), each expert the two batches routed to it.
    dense_ref, expert_ref = copy.deepcopy(ref), copy.deepcopy(ref)
    torch.stack([dense_ref(batch(k).double(), k % 2).pow(2).sum() for k in range(4)]).mean().backward()
    for e in (0, 1):
        torch.stack([expert_ref(batch(d * 2 + e).double(), e).pow(2).sum() for d in range(2)]).mean().backward()
    full = {n: q.grad for n, q in dense_ref.named_parameters() if n.startswith("dense.")}
    full |= {n: q.grad for n, q in expert_ref.named_parameters() if n.startswith("moe.")}
    stage = {n: q for n, q in model.named_parameters() if n.startswith(("dense.", f"moe.experts.{ep}."))}
    names = tuple(full)
    out: list = []
    saved = {n: q.grad._local_tensor.clone() for n, q in stage.items()}
    for p in (2.0, 0.0, math.inf):
        want = reference_norm(list(full.values()), p)
        for debug in (False, True):
            plan = ParallelPlan(mesh, names=names, rules=(Rule("moe.*", distinct=("ep",)), Rule("*")), debug=debug)
            with count_collectives() as calls:
                r = GradClipper(max_norm=0.5 * want, norm_type=p, mode="total", report=True)(stage, plan=plan)
            assert calls.names.count("gloo:all_reduce") == 1, calls.names
            assert r.total_norm.item() == pytest.approx(want, rel=1e-6), (p, debug, r.total_norm.item(), want)
            assert r.norms == pytest.approx({n: reference_norm([t], p) for n, t in full.items()}, rel=1e-5), p
            coef = min(1.0, 0.5 * want / (want + 1e-6))
            for n, q in stage.items():  # the clipped pieces, against the reference
                assert torch.allclose(q.grad.full_tensor().double(), full[n] * coef, rtol=1e-5, atol=1e-7), (p, n)
                q.grad._local_tensor.copy_(saved[n])
            out.append(round(r.total_norm.item(), 5))
    # With replicate= (here over a pipeline dim of one stage), the siblings inference is off: the experts count on
    # every ep slice without distinct=, and the dense layer once (the inference under replicate= took the ep slices
    # for copies of the experts: ep = 0 only, 6.06 for 8.14).
    plan = ParallelPlan(cases.mesh((1, 2, 2), ("pp", "dp", "ep")), names=names, rules=(Rule("*", replicate=("pp",)),))
    want = reference_norm(list(full.values()), 2.0)
    r = GradClipper(max_norm=1e9, report=True)(stage, plan=plan)
    assert r.total_norm.item() == pytest.approx(want, rel=1e-6), (r.total_norm.item(), want)
    assert r.norms == pytest.approx({n: reference_norm([t], 2.0) for n, t in full.items()}, rel=1e-5)
    out.append(round(r.total_norm.item(), 5))
    # The README's former recipe, Rule("moe.*"): the audit names distinct= in its advice.
    plan = ParallelPlan(mesh, names=names, rules=(Rule("moe.*"), Rule("*")), debug=True)
    with pytest.raises(RuntimeError, match="under-counted") as caught:
        GradClipper(max_norm=1e9)(stage, plan=plan)
    out.append("distinct=" in str(caught.value) and "moe.experts.1" in str(caught.value))
    return out


def test_experts_beside_a_flattened_fsdp2_mesh_count_on_every_ep_slice(run_ranks):
    results = run_ranks(4, body_ep_over_fsdp2_flattened, timeout_s=180)
    assert all(r == results[0] for r in results), results
    assert results[0][-1] is True, results[0]


# ------------------------------------------------------------------------------------------ plan arguments


def body_plan_arguments() -> list:
    """Arguments that were taken silently or failed obscurely: names as a generator ("object of type 'generator'
    has no len()"); replicate= as a generator, consumed by the validation and left empty (7.07 for 5.00); a rule
    no name reaches, shadowed by Rule('*') or misspelt, ignored (15.94 for 15.13); distinct= overlapping
    replicate= or naming no mesh dim; unit-wise clipping of pipeline stages told to pass plan=, which it refuses."""
    mesh = cases.mesh((2,), ("tp",))
    tp = dist.get_rank()
    out: list = []
    full = {"a.w": torch.tensor([3.0, 4.0]), "b.w": torch.tensor([12.0])}
    pieces = {"a.w": full["a.w"].clone()} if tp == 0 else {"b.w": full["b.w"].clone()}
    plan = ParallelPlan(mesh, names=(n for n in full), rules=[Rule("*")], tied=[])
    assert plan.names == ("a.w", "b.w") and isinstance(plan.rules, tuple), plan
    out.append(GradClipper(max_norm=1e9)(pieces, plan=plan).total_norm.item())  # 13
    rule = Rule("a*", replicate=(d for d in ["tp"]))
    assert rule.replicate == ("tp",), rule
    plan = ParallelPlan(mesh, names=("a.w",), rules=(rule, ))
    out.append(GradClipper(max_norm=1e9)({"a.w": full["a.w"].clone()}, plan=plan).total_norm.item())  # 5, not 7.07
    w, norm = torch.arange(1.0, 9.0).reshape(4, 2), torch.tensor([3.0, 4.0])
    for rules in ((Rule("*"), Rule("norm.weight", replicate=("tp",))),
                  (Rule("norm.wieght", replicate=("tp",)), Rule("*"))):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                ParallelPlan(mesh, names=("w.weight", "norm.weight"), rules=rules)
                out.append("accepted: " + "; ".join(str(w.message) for w in seen))
            except ValueError as e:
                out.append(str(e))
    # a rule template's rule for layers this model lacks, and a repeated rule: accepted, the first with a warning;
    # sets are refused (their order is the process's hash order: ranks listed names and rules differently)
    with pytest.warns(UserWarning, match="matches no name"):
        ParallelPlan(mesh, names=("w.weight", "norm.weight"),
                     rules=(Rule("*.bias", replicate=("tp",)), Rule("norm.*", replicate=("tp",)), Rule("*")))
    ParallelPlan(mesh, names=("w.weight", "norm.weight"), tied=[(x for x in ("head.weight", "w.weight"))],
                 rules=(Rule("norm.*", replicate=("tp",)), Rule("norm.*", replicate=("tp",)), Rule("*")))
    for bad in ({"names": {"w.weight", "norm.weight"}}, {"names": ("w.weight",), "rules": {Rule("*")}}):
        with pytest.raises(TypeError, match="must be a tuple"):
            ParallelPlan(mesh, **bad)
    # a catch-all Rule('*') the rules before it leave nothing to is a default, not a mistake: accepted
    ParallelPlan(mesh, names=("w.weight", "norm.weight"),
                 rules=(Rule("norm.weight", replicate=("tp",)), Rule("w.*"), Rule("*")))
    plan = ParallelPlan(mesh, names=("w.weight", "norm.weight"),
                        rules=(Rule("norm.weight", replicate=("tp",)), Rule("*")))
    got = GradClipper(max_norm=1e9)({"w.weight": w.chunk(2)[tp].clone(), "norm.weight": norm.clone()}, plan=plan)
    out.append(round(got.total_norm.item(), 6))
    for make in (lambda: Rule("*", replicate=("tp",), distinct=("tp",)),
                 lambda: ParallelPlan(mesh, names=("a",), rules=(Rule("*", distinct=("ep",)),)),
                 lambda: Rule("*", distinct="tp"),
                 lambda: ParallelPlan(mesh, names=7)):
        try:
            make()
            out.append("accepted")
        except (ValueError, TypeError) as e:
            out.append(f"{type(e).__name__}: {e}")
    # Unit-wise clipping of two pipeline stages (different parameters) over group=: the message must not send
    # the caller to plan=, which unit-wise clipping refuses.
    from dist_clip import AGC

    torch.manual_seed(0)
    stage = torch.nn.Linear(3, 2) if tp == 0 else torch.nn.Sequential(torch.nn.Linear(2, 2))
    stage(torch.randn(4, 3 if tp == 0 else 2)).sum().backward()
    try:
        GradClipper(mode="unitwise", agc=AGC(0.05))(stage, group=dist.group.WORLD)
        out.append("measured")
    except RuntimeError as e:
        out.append(str(e))
    return out


def test_plan_arguments_are_taken_as_meant_or_refused(run_ranks):
    results = run_ranks(2, body_plan_arguments, timeout_s=120)
    assert results[0][:-1] == results[1][:-1], results
    got = results[0]
    assert got[0] == pytest.approx(13.0, rel=1e-6) and got[1] == pytest.approx(5.0, rel=1e-6), got
    assert got[2].startswith("Rule(pattern='norm.weight'") and "never applies" in got[2], got[2]
    assert got[3].startswith("accepted: dist_clip: Rule(pattern='norm.wieght'") and "matches no name" in got[3], got[3]
    assert got[4] == pytest.approx(math.sqrt(204 + 25), rel=1e-6), got[4]
    assert got[5].startswith("ValueError: Rule('*') names ['tp'] in both replicate="), got[5]
    assert got[6].startswith("ValueError: Rule('*') names mesh dimensions ['ep']"), got[6]
    assert got[7].startswith("TypeError: Rule.distinct must be a tuple"), got[7]
    assert got[8].startswith("TypeError: ParallelPlan.names must be"), got[8]
    for msg in (results[0][-1], results[1][-1]):
        assert "disagree on the target's parameter names" in msg and "unit-wise clipping takes no plan=" in msg, msg
        assert "pass a dist_clip.ParallelPlan" not in msg, msg


# ------------------------------------------------------------------------------------------ replicate= over DTensors


def body_replicate_rule_over_tp_dtensors() -> list[float]:
    """Data-parallel replicas of a tensor-parallel module whose gradients are DTensors on mesh["tp"], under
    ``Rule("*", replicate=("dp",))``: with replicate= the siblings inference is off, and a DTensor piece counts on
    dp = 0 wherever its own mesh coordinate is 0 along its Replicate placements (the norm weight on tp = 0), on
    every coordinate along its Shard placements (both tp halves of w). Counting along the Shard placements
    instead counted the norm weight on both tp ranks and w's tp = 1 half on none (7.74 for 10.81 at p = 2)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = cases.mesh((2, 2), ("dp", "tp"))
    _, tp = mesh.get_coordinate()
    g = torch.Generator().manual_seed(41)
    full = {"norm.weight": torch.randn(5, generator=g, dtype=torch.float64),
            "w.weight": torch.randn(6, 5, generator=g, dtype=torch.float64) * 2}
    out = []
    def pieces() -> dict[str, torch.Tensor]:
        return {
            "norm.weight": DTensor.from_local(full["norm.weight"].float().clone(), mesh["tp"], [Replicate()],
                                              run_check=False),
            "w.weight": DTensor.from_local(full["w.weight"].chunk(2, dim=0)[tp].float().clone(), mesh["tp"],
                                           [Shard(0)], run_check=False),
        }

    plan = ParallelPlan(mesh, names=tuple(full), rules=(Rule("*", replicate=("dp",)),))
    for p in (2.0, 1.0, math.inf, 0.0):
        out.append(_check_layout(pieces(), full, plan, p, "total", 0.5))
        out.append(_check_layout(pieces(), full, plan, p, "per_param", 0.8))
    # debug=True beside a parameter whose gradient is zero everywhere (its two tp halves, distinct pieces, hold
    # the same bytes): all-zero pieces add nothing and are not audited; told apart by content they read as one
    # piece counted by ranks 0 and 1, and the right plan failed its audit.
    full0 = full | {"unused.weight": torch.zeros(6, 5, dtype=torch.float64)}
    pieces0 = pieces() | {"unused.weight": DTensor.from_local(torch.zeros(3, 5), mesh["tp"], [Shard(0)],
                                                              run_check=False)}
    plan0 = ParallelPlan(mesh, names=tuple(full0), rules=(Rule("*", replicate=("dp",)),), debug=True)
    out.append(_check_layout(pieces0, full0, plan0, 2.0, "total", 0.5))
    return out


def test_a_replicate_rule_counts_dtensor_pieces_by_their_placements(run_ranks):
    results = run_ranks(4, body_replicate_rule_over_tp_dtensors)
    assert all(r == results[0] for r in results), results


def body_plans_over_group_sub_meshes() -> list[float]:
    """Two jobs side by side on (0, 1) and (2, 3), each with a plan over its own slice of the mesh and group= that
    slice's group: each job's total is its own model's, reduced over its two ranks only (over the world, the
    two jobs' partials were summed into one total: 17.50 on every rank for 5.52 and 16.60)."""
    mesh = cases.mesh((2, 2), ("job", "tp"))
    job, tp = mesh.get_coordinate()
    g = torch.Generator().manual_seed(60 + job)
    full = {"norm.weight": torch.randn(4, generator=g, dtype=torch.float64) * (1 + 3 * job),
            "w.weight": torch.randn(6, 4, generator=g, dtype=torch.float64) * (1 + 3 * job)}
    plan = ParallelPlan(mesh["tp"], names=tuple(full), rules=(Rule("norm.*", replicate=("tp",)), Rule("*")),
                        group=mesh.get_group("tp"))
    out = [float(job)]
    for p in (2.0, math.inf):
        for mode, max_norm in (("total", 0.5), ("per_param", 0.8)):
            pieces = {"norm.weight": full["norm.weight"].float().clone(),
                      "w.weight": full["w.weight"].chunk(2, dim=0)[tp].float().clone()}
            out.append(_check_layout(pieces, full, plan, p, mode, max_norm))
    return out


def test_plans_with_group_over_a_slice_of_the_world_reduce_over_that_group(run_ranks):
    results = run_ranks(4, body_plans_over_group_sub_meshes)
    assert results[0] == results[1] and results[2] == results[3] and results[0] != results[2], results
