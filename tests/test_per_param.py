"""Per-parameter and per-param-group clipping and the per-parameter report, against the float64 reference.

Every parameter's norm is taken across all its shards; all of them travel in one collective as one vector.
Single-process: the classic per-tensor experiment. Distributed (gloo ranks): hand-sharded tensors passed as a
mapping with ``group=`` (uneven and empty pieces), DDP, FSDP2 (1-D and HSDP), FSDP1 with and without
``use_orig_params`` (nested, rows cut by flat shards) and ``NO_SHARD``.
Run: ``.venv/bin/python -m pytest tests/test_per_param.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dist_clip
from dist_clip import GradClipper
from dist_clip.testing import assert_clip_matches_unsharded, count_collectives, reference_norm, reference_param_norms
from tests import beyond_cases as cases

ORDERS = (0.0, 1.0, 2.0, 3.5, math.inf)


def test_classic_per_tensor_experiment():
    big = nn.Parameter(torch.zeros(4))
    small = nn.Parameter(torch.zeros(3))
    big.grad = torch.full((4,), 15.38 / 2)
    small.grad = torch.tensor([0.88, 0.0, 0.0])
    untouched = small.grad.clone()
    result = GradClipper(max_norm=1.0, mode="per_param", report=True)([big, small])
    assert result.norms == pytest.approx({"0": 15.38, "1": 0.88}, rel=1e-6)
    assert f"{big.grad.norm().item():.4f}" == "1.0000"
    assert torch.equal(small.grad, untouched)  # bit for bit: coefficient 1 is never applied on the CPU
    assert result.slots == ("0", "1") and result.clip_coef.shape == (2,)
    assert bool(result.clipped) and bool(result.finite)
    assert result.total_norm.item() == pytest.approx(math.hypot(15.38, 0.88), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", [None, False])
def test_per_slot_scaling_rounds_as_mul_by_each_coefficient(dtype, foreach):
    """On the CPU the slots' coefficients are applied as Python scalars, fused where torch's foreach keeps the
    scalar's precision (fp32, fp64): bit for bit ``t.mul_(coefs[slot])``, and coefficient 1 leaves a piece alone."""
    from dist_clip import _slots

    torch.manual_seed(0)
    for coef_dtype in (torch.float32, torch.float64):
        tensors = [torch.randn(n, dtype=dtype) * 7 for n in (1, 33, 1000, 0, 4096)]
        slots = [0, 1, 2, 1, 3]
        coefs = torch.tensor([0.3, 1.0, 0.123456789, 0.7071], dtype=coef_dtype)
        want = [t.clone().mul_(coefs[s]) for t, s in zip(tensors, slots)]
        before = [t.clone() for t in tensors]
        _slots.scale_slots_(list(zip(tensors, slots)), coefs, foreach)
        for got, w, b, s in zip(tensors, want, before, slots):
            assert torch.equal(got, w), (dtype, coef_dtype, s)
            if s == 1:
                assert torch.equal(got, b)


def test_report_by_module_prefix_and_unused_parameters_left_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2)))
    model[1][1].weight.requires_grad_(False)
    model(torch.randn(5, 3)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for p in ORDERS:
        full = GradClipper(max_norm=math.inf, norm_type=p, report=True)(model).norms
        assert set(full) == set(grads)  # the frozen weight has no gradient anywhere: not reported
        for n, g in grads.items():
            assert full[n] == pytest.approx(reference_norm([g], p), rel=1e-6)
        by_module = GradClipper(max_norm=math.inf, norm_type=p, report=True, report_depth=1)(model).norms
        assert set(by_module) == {"0", "1"}
        want = reference_norm([g for n, g in grads.items() if n.startswith("1.")], p)
        assert by_module["1"] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("target", ["module", "mapping", "shared", "with_grad"])
def test_per_param_on_many_parameters_matches_the_reference(target):
    """Per-parameter norms of many parameters, of a module, a mapping, a parameter under two names and a parameter
    listed beside its own gradient: each gradient is measured and scaled once, under its first name."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)) for _ in range(30)])
    model[3][0].weight.requires_grad_(False)
    model(torch.randn(5, 3)).square().sum().backward()
    model[5][1].bias.grad = None
    named = dict(model.named_parameters())
    arg: object = model
    if target == "mapping":
        arg = named
    elif target == "shared":
        arg = {**named, "zz.again": named["7.0.weight"]}  # the same parameter again, sorted last
    elif target == "with_grad":
        arg = {**named, "zz.grad": named["7.0.weight"].grad}  # a parameter and its own gradient
    grads = {n: q.grad.clone() for n, q in named.items() if q.grad is not None}
    result = GradClipper(max_norm=0.5, mode="per_param", report=True)(arg)
    assert result.norms == pytest.approx({n: reference_norm([g]) for n, g in grads.items()}, rel=1e-6)
    for n, g in grads.items():
        coef = min(1.0, 0.5 / (reference_norm([g]) + 1e-6))
        torch.testing.assert_close(named[n].grad, g * coef, rtol=1e-6, atol=0), n


def test_per_group_single_process():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model(torch.randn(5, 3)).square().sum().backward()
    grads = {n: p.grad.clone().double() for n, p in model.named_parameters()}
    groups = [{"params": model[0].parameters(), "max_norm": 0.3}, {"params": model[1].parameters()}]
    opt = torch.optim.SGD(groups, lr=0.1)
    result = GradClipper(max_norm=0.7, mode="per_group")(model, optimizer=opt)
    norms = [reference_norm([grads["0.weight"], grads["0.bias"]]), reference_norm([grads["1.weight"], grads["1.bias"]])]
    coefs = [min(1.0, 0.3 / (norms[0] + 1e-6)), min(1.0, 0.7 / (norms[1] + 1e-6))]
    torch.testing.assert_close(result.clip_coef.double(), torch.tensor(coefs, dtype=torch.float64), rtol=1e-6, atol=0)
    assert result.slots == ("param_group0", "param_group1")
    for n, p in model.named_parameters():
        want = grads[n] * coefs[0 if n.startswith("0.") else 1]
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("target", ["mapping", "list", "views", "rows"])
def test_per_group_on_gradients_takes_the_group_of_their_parameters(target):
    """README (Per-parameter and per-group clipping): a gradient given in place of its parameter is in the group of
    the parameter whose .grad it is (dd67b95 made this so for every target, not only a user adapter's Shards: a
    mapping of .grads raised "found none" before); a copy of a .grad is outside the optimizer, kept as it is."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model(torch.randn(5, 3)).square().sum().backward()
    named = dict(model.named_parameters())
    grads = {n: q.grad.clone().double() for n, q in named.items()}
    opt = torch.optim.SGD([{"params": model[0].parameters(), "max_norm": 0.3},
                           {"params": model[1].parameters(), "max_norm": 0.7}], lr=0.1)
    copy = named["1.bias"].grad.clone()
    pieces = {n: q.grad for n, q in named.items() if n != "1.bias"} | {"1.bias": copy}
    if target == "views":  # views of a .grad are that gradient: a view was taken for one outside the optimizer
        pieces |= {"0.weight": named["0.weight"].grad.view(-1), "1.weight": named["1.weight"].grad[:, 1:]}
        pieces["1.weight.0"] = named["1.weight"].grad[:, 0]
    if target == "rows":  # a row starting further into its .grad than the shortest .grad is long (1.bias: 8 bytes)
        pieces |= {"1.weight": named["1.weight"].grad[:1], "1.weight.1": named["1.weight"].grad[1:]}
    arg: object = pieces if target != "list" else [pieces[n] for n in sorted(pieces)]
    GradClipper(mode="per_group")(arg, optimizer=opt)
    norms = [reference_norm([grads["0.weight"], grads["0.bias"]]), reference_norm([grads["1.weight"]])]
    coefs = [min(1.0, 0.3 / (norms[0] + 1e-6)), min(1.0, 0.7 / (norms[1] + 1e-6))]
    assert coefs[0] < 1 and coefs[1] < 1
    for n in ("0.weight", "0.bias", "1.weight"):
        want = grads[n] * coefs[0 if n.startswith("0.") else 1]
        torch.testing.assert_close(named[n].grad.double(), want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(copy.double(), grads["1.bias"], rtol=0, atol=0)


def test_per_group_does_not_walk_the_gradients_for_frozen_parameters(monkeypatch):
    """Placing views of a .grad by memory (119ed50) walks every stepped gradient's bytes for the slots no param
    group holds by identity, meant for gradient pieces; a module's frozen parameters (requires_grad=False, as in
    fine-tuning) passed for such pieces, and every call walked them: 0.6 ms -> 6.7 ms per call for 1,000 frozen
    of 2,000 parameters on the CPU. Parameters, frozen or outside the optimizer, are never a view of a .grad."""
    from dist_clip import _fused

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].requires_grad_(False)
    model(torch.randn(5, 3)).square().sum().backward()
    grads = {n: q.grad.clone().double() for n, q in model.named_parameters() if q.grad is not None}
    opt = torch.optim.SGD([{"params": model[0].parameters(), "max_norm": 0.3}], lr=0.1)  # model[2]: outside
    walked = []
    monkeypatch.setattr(_fused, "_span", lambda t: walked.append(1))
    GradClipper(max_norm=0.7, mode="per_group")(model, optimizer=opt)
    assert walked == []
    coef = min(1.0, 0.3 / (reference_norm([grads["0.weight"], grads["0.bias"]]) + 1e-6))
    assert coef < 1
    for n, q in model.named_parameters():
        if n in grads:
            want = grads[n] * (coef if n.startswith("0.") else 1.0)
            torch.testing.assert_close(q.grad.double(), want, rtol=1e-6, atol=1e-9)


def test_bad_input_names_expected_and_received():
    with pytest.raises(ValueError, match="optimizer="):
        GradClipper(mode="per_group")([torch.ones(2)])
    with pytest.raises(TypeError, match="str keys"):
        GradClipper(mode="per_param")({1: torch.ones(2)})
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.ones(2))], "max_norm": -1.0}], lr=0.1)
    with pytest.raises(ValueError, match="max_norm"):
        GradClipper(mode="per_group")([p for g in opt.param_groups for p in g["params"]], optimizer=opt)
    other = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    model = nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(ValueError, match="would clip nothing"):  # the wrong optimizer: never a silent no-op
        GradClipper(mode="per_group")(model, optimizer=other)


# ----------------------------------------------------------------------------------------------- distributed


def _full(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = {"a.weight": (5, 3), "a.bias": (5,), "b.weight": (2, 4), "big": (3000,), "tiny": (1,), "zero": (4,)}
    out = {}
    for i, (name, shape) in enumerate(sizes.items()):
        t = torch.randn(shape, generator=g, dtype=torch.float64) * (10.0 ** (i % 3 - 1))
        out[name] = torch.zeros(shape, dtype=torch.float64) if name == "zero" else t
    return out


def body_mapping(world_size: int) -> list[float]:
    """Each rank holds an uneven contiguous chunk of every flattened gradient (the last rank often nothing)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == world_size
    out = []
    for p in ORDERS:
        full = _full(7)
        mine: dict[str, torch.Tensor] = {}
        for name, t in full.items():
            cuts = [1, t.numel() // 2, t.numel() - 1][: world - 1]
            cuts = [max(cuts[: i + 1]) for i in range(len(cuts))]  # monotone: every element held exactly once
            pieces = torch.tensor_split(t.reshape(-1).float(), cuts)
            mine[name] = pieces[rank].clone() if rank < len(pieces) else torch.zeros(0)
        mine["frozen"] = nn.Parameter(torch.ones(2))  # a parameter whose gradient is None on every rank
        before = {n: t.clone() for n, t in mine.items()}
        clipper = GradClipper(max_norm=0.9, norm_type=p, mode="per_param", report=True)
        with count_collectives() as calls:
            result = clipper(mine, group=dist.group.WORLD)
        assert calls.total == (1 if world > 1 else 0), calls.names
        want = {n: reference_norm([t], p) for n, t in full.items()}
        assert set(result.norms) == set(want), result.norms
        for n, w in want.items():
            assert result.norms[n] == pytest.approx(w, rel=1e-6, abs=1e-12), (p, n)
        assert result.total_norm.item() == pytest.approx(reference_norm(list(full.values()), p), rel=1e-6)
        assert result.slots == tuple(sorted(mine))
        for n, w in want.items():
            coef = min(1.0, 0.9 / (w + 1e-6))
            torch.testing.assert_close(mine[n].double(), before[n].double() * coef, rtol=1e-6, atol=1e-30)
        out.append(result.total_norm.item())
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_hand_sharded_mapping(run_ranks, world):
    values = run_ranks(world, body_mapping, world)
    assert all(v == values[0] for v in values), "totals differ across ranks"


def body_mapping_per_group(world_size: int, shifted: bool = False, scale: float = 1.0) -> list[list[float]]:
    """per_group on hand-sharded pieces where a rank holding nothing of a parameter leaves it out of its
    optimizer: the group's norm still spans every rank (rank 0 scaled its share of that group by its own
    pieces' norm, 0.53 instead of 0.080, before memberships travelled in the all-reduce)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == world_size
    out = []
    for p in ORDERS:
        full = _full(11)
        mine: dict[str, nn.Parameter] = {}
        for name, t in full.items():
            if name == "b.weight" and not shifted:  # held whole by the last rank, in its optimizer only
                piece = t.reshape(-1).float() if rank == world - 1 else torch.zeros(0)
            elif shifted and name.startswith("a."):  # held by rank 0 only: the others' optimizers lack group 0
                piece = t.reshape(-1).float() if rank == 0 else torch.zeros(0)
            else:
                piece = t.reshape(-1).float().tensor_split(world)[rank]
            mine[name] = nn.Parameter(torch.zeros_like(piece))
            mine[name].grad = piece.clone()
        before = {n: q.grad.clone() for n, q in mine.items()}
        first = [mine["a.weight"], mine["a.bias"]]
        in_second = rank == world - 1 or shifted
        second = [mine[n] for n in ("big", "tiny", "zero")] + ([mine["b.weight"]] if in_second else [])
        groups = [{"params": first, "max_norm": 0.5 * scale}, {"params": second, "max_norm": 0.2 * scale}]
        if shifted and rank > 0:  # numbered differently: these ranks' group 0 is rank 0's group 1
            groups = groups[1:]
        opt = torch.optim.SGD(groups, lr=0.1)
        with count_collectives() as calls:
            result = GradClipper(norm_type=p, mode="per_group")(mine, optimizer=opt, group=dist.group.WORLD)
        assert calls.total == 1, calls.names
        if shifted:  # each rank's coefficients follow its own numbering: compare the scaled gradients only
            norm_b = reference_norm([full[n] for n in ("big", "tiny", "zero", "b.weight")], p)
            coef_b = min(1.0, 0.2 * scale / (norm_b + 1e-6))
            for n in ("big", "tiny", "zero", "b.weight"):
                torch.testing.assert_close(mine[n].grad.double(), before[n].double() * coef_b, rtol=1e-6, atol=1e-30)
            out.append([coef_b])
            continue
        norms = [reference_norm([full["a.weight"], full["a.bias"]], p),
                 reference_norm([full[n] for n in ("big", "tiny", "zero", "b.weight")], p)]
        coefs = [min(1.0, 0.5 * scale / (norms[0] + 1e-6)), min(1.0, 0.2 * scale / (norms[1] + 1e-6))]
        torch.testing.assert_close(result.clip_coef.double(), torch.tensor(coefs, dtype=torch.float64), rtol=1e-5,
                                   atol=0)
        for n, q in mine.items():
            coef = coefs[0] if n.startswith("a.") else coefs[1]
            torch.testing.assert_close(q.grad.double(), before[n].double() * coef, rtol=1e-6, atol=1e-30)
        out.append(result.clip_coef.tolist())
    return out


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("shifted", [False, True])
def test_per_group_on_pieces_whose_ranks_optimizers_differ(run_ranks, world, shifted):
    """Also with group numberings that differ across ranks (a rank left a whole group out: b's group is 1 on
    rank 0 and 0 elsewhere), where combining the numberings left b unclipped on the other ranks."""
    values = run_ranks(world, body_mapping_per_group, world, shifted)
    assert all(v == values[0] for v in values), "coefficients differ across ranks"


def test_per_group_on_pieces_with_tiny_limits(run_ranks):
    """Limits of 2e-8 and 5e-8: each group's limit, recovered from 1/(1 + limit) summed over different numbers of
    holders, lost its digits and the ranks' alike numbering read as different (a false ValueError)."""
    values = run_ranks(3, body_mapping_per_group, 3, False, 1e-7)
    assert all(v == values[0] for v in values), "coefficients differ across ranks"


def _numbered_differently(rank: int) -> tuple[dict[str, nn.Parameter], list[dict]]:
    """Named pieces and param groups whose ranks number the groups differently: rank 0 {a} and {b, c}, rank 1
    (holding only a piece of c) {c}, so its own group of {c} is {b, c} elsewhere."""
    pieces = {"a": torch.tensor([1.0]) if rank == 0 else torch.zeros(0),
              "b": torch.tensor([3.0, 4.0]) if rank == 0 else torch.zeros(0),
              "c": torch.tensor([0.3, 0.4])[rank:rank + 1]}
    mine = {n: nn.Parameter(torch.zeros_like(t)) for n, t in pieces.items()}
    for n, t in pieces.items():
        mine[n].grad = t.clone()
    if rank == 1:
        return mine, [{"params": [mine["c"]], "max_norm": 0.5}]
    return mine, [{"params": [mine["a"]], "max_norm": 1.0}, {"params": [mine["b"], mine["c"]], "max_norm": 0.5}]


def body_per_group_numberings() -> list:
    """Two ranks whose optimizers each hold one group of their own pieces: rank 0 {body} (limit 10), rank 1
    {head} (limit 1). Each slot has one holder, so the numbering looked alike and both "group 0"s were merged:
    head (0.5, under its limit 1) was scaled by 1/10. Different limits tell them apart: each rank's own group.
    With equal limits they are one group (numbered alike, each rank listing what it holds), as documented.
    A rank that leaves out a whole group and a parameter of another group it holds nothing of cannot use its
    own numbering (its group of {c} is {b, c} elsewhere): a ValueError on every rank, where it kept c's piece
    unclipped on one rank and scaled it by 0.1 on the other."""
    rank = dist.get_rank()
    out: list = []
    for p in ORDERS:
        for limits in ((10.0, 1.0), (1.0, 1.0)):
            body = torch.tensor([6.0, 8.0]) if rank == 0 else torch.zeros(0)
            head = torch.tensor([0.5]) if rank == 1 else torch.zeros(0)
            mine = {"body": nn.Parameter(torch.zeros_like(body)), "head": nn.Parameter(torch.zeros_like(head))}
            mine["body"].grad, mine["head"].grad = body.clone(), head.clone()
            own = "body" if rank == 0 else "head"
            opt = torch.optim.SGD([{"params": [mine[own]], "max_norm": limits[rank]}], lr=0.1)
            GradClipper(norm_type=p, mode="per_group")(mine, optimizer=opt, group=dist.group.WORLD)
            if limits[0] != limits[1]:
                norm = reference_norm([body if rank == 0 else head], p)
            else:
                norm = reference_norm([torch.tensor([6.0, 8.0]), torch.tensor([0.5])], p)
            coef = min(1.0, limits[rank] / (norm + 1e-6))
            got = mine[own].grad.double()
            torch.testing.assert_close(got, (body if rank == 0 else head).double() * coef, rtol=1e-6, atol=0)
            out.append(round(coef, 6))
        mine, groups = _numbered_differently(rank)
        try:
            GradClipper(norm_type=p, mode="per_group")(mine, optimizer=torch.optim.SGD(groups, lr=0.1),
                                                      group=dist.group.WORLD)
        except ValueError as e:
            out.append("number their param groups differently" in str(e))
        else:
            out.append(False)
    return out


def test_per_group_on_pieces_tells_numberings_apart(run_ranks):
    values = run_ranks(2, body_per_group_numberings)
    assert values[0][2::3] == [True] * len(ORDERS) and values[1][2::3] == [True] * len(ORDERS), values


def body_per_group_checks_off_the_host() -> list:
    """On accelerators the per_group checks that raise ValueError on the CPU (a reading of the verdict there is a
    host sync) were skipped: ranks putting one parameter in different group indices under a plan had the
    indices averaged into another group, different limits clipped a group's pieces by different coefficients,
    and named pieces numbered differently kept each rank's own numbering, all silently. Off the host the norms
    now read NaN on every rank (simulated here: the checks are told the CPU is not the host)."""
    from torch.distributed.device_mesh import init_device_mesh

    from dist_clip import ParallelPlan
    from dist_clip import clipper as clipper_module

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    out: list = []

    def coefs(target: dict, groups: list, plan: object = None) -> list[float]:
        opt = torch.optim.SGD(groups, lr=0.1)
        kw = {"plan": plan} if plan is not None else {"group": dist.group.WORLD}
        result = GradClipper(mode="per_group", on_nonfinite="ignore")(target, optimizer=opt, **kw)
        return [round(float(c), 6) for c in result.clip_coef]

    def param(grad: list[float]) -> nn.Parameter:
        q = nn.Parameter(torch.zeros(len(grad)))
        q.grad = torch.tensor(grad)
        return q

    saved = clipper_module._host_checks
    clipper_module._host_checks = lambda device: False
    try:
        shared = ParallelPlan(mesh, names=("a",), tied=(("b", "a"),))
        mine = param([3.0, 4.0])
        # a tied copy in group 1 on stage 1, its owner in group 0 on stage 0
        out.append(coefs({"a" if rank == 0 else "b": mine},
                         [{"params": [], "max_norm": 1.0}] * rank + [{"params": [mine], "max_norm": 1.0}], shared))
        # the same group index with a different max_norm on each stage
        plan = ParallelPlan(mesh, names=("s0.w", "s1.w"))
        mine = param([0.3, 0.4])
        out.append(coefs({f"s{rank}.w": mine}, [{"params": [mine], "max_norm": 1.0 + rank}], plan))
        # named pieces whose ranks number their groups differently (see body_per_group_numberings)
        out.append(coefs(*_numbered_differently(rank)))
        # a consistent plan stays exact: one group over both stages, 0.5 / |(0.3, 0.4, 0.6, 0.8)|
        mine = param([0.3, 0.4] if rank == 0 else [0.6, 0.8])
        out.append(coefs({f"s{rank}.w": mine}, [{"params": [mine], "max_norm": 0.5}], plan))
    finally:
        clipper_module._host_checks = saved
    return out


def test_per_group_checks_off_the_host_give_nan_norms(run_ranks):
    for got in run_ranks(2, body_per_group_checks_off_the_host):
        assert all(math.isnan(c) for c in got[0]) and all(math.isnan(c) for c in got[1]), got
        assert got[2] and all(math.isnan(c) for c in got[2]), got
        assert got[3] == [pytest.approx(0.5 / math.sqrt(0.25 + 1.0), rel=1e-5)], got


def body_wrappers(names: list[str]) -> int:
    checked = 0
    for name in names:
        for p, mode, max_norm in ((2.0, "per_param", 0.05), (math.inf, "per_param", 0.02), (1.0, "total", 0.1)):
            assert_clip_matches_unsharded(cases.build_mlp, cases.WRAPS[name], cases.batch, norm_type=p,
                                          max_norm=max_norm, mode=mode)
            checked += 1
    return checked


def test_per_param_on_every_wrapper(run_ranks):
    assert run_ranks(2, body_wrappers, ["ddp", "fsdp2", "fsdp1_flat", "fsdp1_orig", "fsdp1_noshard"]) == [15, 15]


def body_hsdp() -> int:
    cases.WRAPS["hsdp"] = cases.wrap_hsdp
    return body_wrappers(["hsdp", "fsdp2", "fsdp1_flat"])


def test_per_param_hsdp_and_four_ranks(run_ranks):
    assert run_ranks(4, body_hsdp) == [9] * 4


def body_per_group(names: list[str]) -> list[str]:
    out = []
    for name in names:
        target, ref = cases.trained(name)
        params = list(target.named_parameters())
        inner = [dist_clip._slots.clean_name(n).removeprefix("module.").startswith("2.") for n, _ in params]
        first = [q for (_, q), hit in zip(params, inner) if hit]
        rest = [q for (_, q), hit in zip(params, inner) if not hit]
        opt = torch.optim.SGD([{"params": first, "max_norm": 0.01}, {"params": rest, "name": "others"}], lr=0.1)
        ref_grads = {n: q.grad for n, q in ref.named_parameters()}
        norms = [reference_norm([g for n, g in ref_grads.items() if n.startswith("2.")]),
                 reference_norm([g for n, g in ref_grads.items() if not n.startswith("2.")])]
        coefs = [min(1.0, 0.01 / (norms[0] + 1e-6)), min(1.0, 0.03 / (norms[1] + 1e-6))]
        with count_collectives() as calls:
            result = GradClipper(max_norm=0.03, mode="per_group")(target, optimizer=opt)
        assert calls.total == (0 if name in ("ddp", "fsdp1_noshard") else 1), (name, calls.names)
        assert result.slots == ("param_group0", "others")
        want_coefs = torch.tensor(coefs, dtype=torch.float64)
        torch.testing.assert_close(result.clip_coef.double(), want_coefs, rtol=1e-5, atol=0)
        after = GradClipper(max_norm=math.inf, report=True)(target).norms
        for n, g in ref_grads.items():
            want = reference_norm([g]) * coefs[0 if n.startswith("2.") else 1]
            assert after[n] == pytest.approx(want, rel=1e-5), (name, n)
        out.append(name)
    return out


def test_per_group_on_every_wrapper(run_ranks):
    names = ["ddp", "fsdp2", "fsdp1_flat", "fsdp1_orig", "fsdp1_noshard"]
    assert run_ranks(2, body_per_group, names) == [names, names]


def body_stage_modules_without_plan() -> list[str]:
    """Each rank passes its own pipeline stage (different parameter names, the same count): per-parameter
    modes would pair rank 0's slot i with rank 1's slot i, a different parameter. Every rank must raise."""
    rank = dist.get_rank()
    torch.manual_seed(rank)
    stage = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)) if rank == 0 else nn.Sequential(nn.Linear(4, 4))
    if rank == 1:
        stage.add_module("head", nn.Linear(4, 2))  # names 0.*, head.* against rank 0's 0.*, 1.*
    stage(torch.randn(3, 4)).square().sum().backward()
    group = dist.group.WORLD
    out = []
    # (norm_type=inf: the fingerprint combines by MAX there, checked as max(d) == -max(-d))
    for kwargs in ({"mode": "per_param", "max_norm": 0.1}, {"report": True}, {"mode": "unitwise"},
                   {"mode": "per_param", "max_norm": 0.1, "norm_type": math.inf}):
        try:
            GradClipper(**kwargs)(stage, group=group)
        except RuntimeError as e:
            out.append(str(e))
        else:
            out.append("no error")
    # Total mode needs no names: it still works, and equals the norm of both stages' gradients together.
    total = GradClipper(max_norm=1e9)(stage, group=group).total_norm
    grads = [q.grad for q in stage.parameters()]
    gathered: list = [None, None]
    dist.all_gather_object(gathered, grads)
    out.append(f"{abs(float(total) - reference_norm(gathered[0] + gathered[1])):.1e}")
    return out


def test_ranks_disagreeing_on_names_raise_everywhere(run_ranks):
    for messages in run_ranks(2, body_stage_modules_without_plan):
        assert all("disagree on the target's parameter names" in m for m in messages[:4]), messages
        assert float(messages[4]) < 1e-6, messages


def test_wrapper_parts_are_dropped_from_names_as_whole_parts_only():
    """The wrappers' name parts (``_orig_mod``, ...) were cut out of names as text: a user's submodule
    ``enc_orig_mod`` beside a root parameter ``encweight`` both became ``encweight``, one slot clipped by their
    combined norm (both gradients by 0.0167, where each has its own coefficient), and an AGC exclude written
    against ``head_orig_mod.*`` missed it. Two tensors that do clean to one name are refused."""
    torch.manual_seed(0)
    model = nn.Module()
    model.enc_orig_mod = nn.Linear(3, 3, bias=False)
    model.encweight = nn.Parameter(torch.randn(3))
    model.encweight.grad = torch.randn(3) * 4
    model.enc_orig_mod.weight.grad = torch.randn(3, 3) * 20
    grads = {"encweight": model.encweight.grad.clone(), "enc_orig_mod.weight": model.enc_orig_mod.weight.grad.clone()}
    result = GradClipper(max_norm=1.0, mode="per_param", report=True)(model)
    assert sorted(result.slots) == sorted(grads), result.slots  # two slots, not one merged
    want = reference_param_norms(grads)
    assert result.norms == pytest.approx(want, rel=1e-6)
    for name in grads:
        got = model.get_parameter(name).grad
        assert torch.linalg.vector_norm(got.double()).item() == pytest.approx(1.0, rel=1e-5), name
    head = nn.Sequential()
    head.add_module("body", nn.Linear(2, 2))
    head.add_module("head_orig_mod", nn.Linear(2, 2))
    head(torch.randn(4, 2)).sum().backward()
    kept = head.head_orig_mod.weight.grad.clone()
    agc = dist_clip.AGC(clipping=1e-6, exclude=("head_orig_mod.*",))
    names = GradClipper(mode="unitwise", agc=agc, report=True)(head).norms or {}
    assert list(names) == [n for n, _ in head.named_parameters()] and torch.equal(head.head_orig_mod.weight.grad, kept)
    clash = nn.Module()
    clash.weight = nn.Parameter(torch.ones(2))
    clash.add_module("_orig_mod", nn.Linear(2, 2, bias=False))  # "_orig_mod.weight" is "weight" unwrapped
    clash.weight.grad, clash._orig_mod.weight.grad = torch.ones(2), torch.ones(2, 2)
    with pytest.raises(ValueError, match="two different tensors of the target are named 'weight'"):
        GradClipper(max_norm=1.0, report=True)(clash)


def body_group_checks_are_exact() -> list:
    """Three checks that let a wrong layout through, silently: (1) group signatures were sums of golden-ratio
    weights per slot, so rank 0's group {s0, s3, s4} and rank 1's {s1, s2, s4} had one signature (w0 + w3 ==
    w1 + w2) and s4's two pieces were scaled by 0.0194 and 1; (2) limits travelled as 1 / (1 + limit), compared
    within 1e-12, so 1e-6 and 2e-6 (or 0 and 1e-6) read as one limit, on named pieces and under a plan; (3) on
    wrapped models only the list of limits was fingerprinted, so ranks grouping the parameters differently under
    the same limits clipped one parameter's shards by different coefficients (FSDP2: 0.0737 and 0.0866)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dist_clip import ParallelPlan

    rank = dist.get_rank()
    out: list = []

    def refused(call) -> bool:
        try:
            call()
        except ValueError as e:
            return "differently" in str(e) or "different max_norm" in str(e)
        except RuntimeError as e:
            return "settings" in str(e) or "differ" in str(e)
        return False

    full = {"s0": [30.0, 40.0], "s1": [0.01], "s2": [0.02], "s3": [12.0], "s4": [0.3, 0.4], "s5": [0.5]}
    for p in ORDERS:
        mine = {}
        for n, g in full.items():
            piece = g[rank:rank + 1] if n == "s4" else g if (n in ("s0", "s3")) == (rank == 0) else []
            mine[n] = nn.Parameter(torch.zeros(len(piece)))
            mine[n].grad = torch.tensor(piece)
        groups = ([{"params": [mine["s0"], mine["s3"], mine["s4"]], "max_norm": 1.0}] if rank == 0 else
                  [{"params": [mine["s5"]], "max_norm": 7.0},
                   {"params": [mine["s1"], mine["s2"], mine["s4"]], "max_norm": 1.0}])
        clip = GradClipper(mode="per_group", norm_type=p)
        out.append(refused(lambda: clip(mine, optimizer=torch.optim.SGD(groups, lr=0.1),  # noqa: B023
                                        group=dist.group.WORLD)))
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    for limits in ((1e-6, 2e-6), (0.0, 1e-6), (1.0, 1.0 + 2**-40)):
        for how in ("mapping", "plan"):
            q = nn.Parameter(torch.zeros(1))
            q.grad = torch.tensor([3.0, 4.0])[rank:rank + 1]
            kw = {"group": dist.group.WORLD} if how == "mapping" else {"plan": ParallelPlan(mesh, names=("w",))}
            opt = torch.optim.SGD([{"params": [q], "max_norm": limits[rank]}], lr=0.1)
            out.append(refused(lambda: GradClipper(mode="per_group")({"w": q}, optimizer=opt, **kw)))  # noqa: B023
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    fully_shard(model[0])
    fully_shard(model[1])
    fully_shard(model)
    model(torch.randn(4, 4)).pow(2).sum().backward()
    n = dict(model.named_parameters())
    split = (["0.weight", "0.bias"], ["1.weight", "1.bias"]) if rank == 0 else (["0.weight"],
                                                                                  ["0.bias", "1.weight", "1.bias"])
    opt = torch.optim.SGD([{"params": [n[k] for k in ks], "max_norm": 0.5} for ks in split], lr=0.1)
    try:
        GradClipper(mode="per_group")(model, optimizer=opt)
        out.append(False)
    except RuntimeError as e:  # the message says what differs (it spoke of names and settings only)
        out.append("to put each parameter in the same param group" in str(e))
    return out


def test_group_signatures_limits_and_wrapped_groupings_are_checked_exactly(run_ranks):
    got = run_ranks(2, body_group_checks_are_exact)
    assert got[0] == got[1] == [True] * (len(ORDERS) + 7), got


def body_unlisted_holders_and_clipped_everywhere(offhost: bool) -> list:
    """(1) A rank holding a piece of w ([3, 4] of [3, 4, 12]) whose optimizer does not list it, while the other
    rank's does (limit 1): its piece took its own group 0's limit (0.38 for 1/13) or stayed 1, silently, on named
    pieces and under a plan: refused on every rank (NaN norms off the host). (2) `clipped` and `num_clipped` came
    from each rank's own groups: a rank whose optimizer lacks the clipped group said False (named pieces; a plan
    off the host)."""
    from torch.distributed.device_mesh import init_device_mesh

    from dist_clip import ParallelPlan
    from dist_clip import clipper as clipper_module

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    saved = clipper_module._host_checks
    if offhost:
        clipper_module._host_checks = lambda device: False
    out: list = []
    try:
        for how in ("mapping", "plan"):
            for variant in ("other_limit", "missing"):
                piece = torch.tensor([3.0, 4.0]) if rank == 0 else torch.tensor([12.0])
                w = nn.Parameter(torch.zeros_like(piece))
                w.grad = piece.clone()
                other = nn.Parameter(torch.zeros(1))
                if variant == "other_limit":
                    groups = [{"params": [w], "max_norm": 1.0}] if rank else [{"params": [other], "max_norm": 5.0}]
                else:
                    groups = [{"params": [other], "max_norm": 1.0}] + ([{"params": [w], "max_norm": 1.0}] * rank)
                kw = ({"group": dist.group.WORLD} if how == "mapping"
                      else {"plan": ParallelPlan(mesh, names=("w",))})
                try:
                    r = GradClipper(mode="per_group")({"w": w}, optimizer=torch.optim.SGD(groups, lr=0.1), **kw)
                    out.append("nan" if bool(torch.isnan(r.clip_coef).all()) else round(float(w.grad[0] / piece[0]), 6))
                except ValueError as e:
                    out.append("refused" if "does not list" in str(e) else str(e))
        # clipped everywhere: rank 0 lists only {body} (norm 10, limit 1), rank 1 only {head} (0.5, limit 2)
        body = torch.tensor([6.0, 8.0]) if rank == 0 else torch.zeros(0)
        head = torch.tensor([0.5]) if rank == 1 else torch.zeros(0)
        mine = {"body": nn.Parameter(torch.zeros_like(body)), "head": nn.Parameter(torch.zeros_like(head))}
        mine["body"].grad, mine["head"].grad = body.clone(), head.clone()
        own = "body" if rank == 0 else "head"
        clipper = GradClipper(mode="per_group")
        r = clipper(mine, optimizer=torch.optim.SGD([{"params": [mine[own]], "max_norm": 1.0 + rank}], lr=0.1),
                    group=dist.group.WORLD)
        out.append((bool(r.clipped), int(clipper.num_clipped)))
        # under a plan: stage 0 clips group 1 ("a", limit 1), stage 1 has group 0 only
        plan = ParallelPlan(init_device_mesh("cpu", (2,), mesh_dim_names=("pp",)), names=("a", "b"))
        q = nn.Parameter(torch.zeros(2))
        q.grad = torch.tensor([3.0, 4.0]) if rank == 0 else torch.tensor([0.1, 0.1])
        groups = ([{"params": [], "max_norm": 9.0}, {"params": [q], "max_norm": 1.0}] if rank == 0
                  else [{"params": [q], "max_norm": 9.0}])
        r = GradClipper(mode="per_group")({"a" if rank == 0 else "b": q}, optimizer=torch.optim.SGD(groups, lr=0.1),
                                          plan=plan)
        out.append(bool(r.clipped))
    finally:
        clipper_module._host_checks = saved
    return out


@pytest.mark.parametrize("offhost", [False, True])
def test_unlisted_holders_are_refused_and_clipped_is_everyone_s(run_ranks, offhost):
    got = run_ranks(2, body_unlisted_holders_and_clipped_everywhere, offhost)
    bad = "nan" if offhost else "refused"
    assert got[0] == got[1] == [bad] * 4 + [(True, 1), True], got


def body_a_failed_group_check_off_the_host_is_non_finite() -> list:
    """Off the CPU a failed per_group check (ranks giving one group different limits) makes the group norms NaN
    instead of raising; the total read finite, so "skip" stepped the NaN-scaled gradients into the parameters
    and "zero" left them NaN (simulated here: the checks are told the CPU is not the host)."""
    from dist_clip import clipper as clipper_module

    rank = dist.get_rank()
    saved = clipper_module._host_checks
    clipper_module._host_checks = lambda device: False
    out: list = []
    try:
        for policy in ("skip", "zero"):
            w = nn.Parameter(torch.ones(2))
            w.grad = torch.tensor([3.0, 4.0]) * (rank + 1)
            opt = torch.optim.SGD([{"params": [w], "max_norm": 1.0 + rank}], lr=0.1)
            r = GradClipper(mode="per_group", on_nonfinite=policy)({"w": w}, optimizer=opt, group=dist.group.WORLD)
            opt.step()
            out.append((policy, math.isnan(r.total_norm.item()), bool(r.finite) if hasattr(r, "finite") else None,
                        w.detach().tolist()))
    finally:
        clipper_module._host_checks = saved
    return out


def test_a_failed_group_check_off_the_host_is_a_non_finite_call(run_ranks):
    for got in run_ranks(2, body_a_failed_group_check_off_the_host_is_non_finite):
        assert [g[:2] for g in got] == [("skip", True), ("zero", True)], got
        assert got[0][3] == [1.0, 1.0], got  # skipped: untouched
        assert got[1][3] == [1.0, 1.0], got  # zeroed gradients: SGD without weight decay moves nothing


def test_per_group_leaves_parameters_outside_the_optimizer_alone():
    """README: parameters outside the optimizer count in the total and keep their gradients (a coefficient
    looked up for them as group 0's scaled the head by the body's limit, unnoticed by the suite)."""
    torch.manual_seed(0)
    body, head = nn.Linear(8, 8), nn.Linear(8, 8)
    model = nn.Sequential(body, head)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 10
    before = [p.grad.clone() for p in head.parameters()]
    every = [p.grad.clone() for p in model.parameters()]
    opt = torch.optim.SGD([{"params": body.parameters(), "max_norm": 0.1}], lr=0.1)  # head: in no group
    result = GradClipper(mode="per_group")(model, optimizer=opt)
    assert abs(result.total_norm.item() - reference_norm(every, 2.0)) <= 1e-6 * reference_norm(every, 2.0)
    body_after = reference_norm([p.grad for p in body.parameters()], 2.0)
    assert abs(body_after - 0.1) <= 1e-6, body_after
    assert all(torch.equal(b, p.grad) for b, p in zip(before, head.parameters()))


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_per_param_combines_two_pieces_of_one_name_on_one_rank(monkeypatch, p):
    """Two pieces named alike on one rank are one parameter's (the custom-adapter contract allows it): its norm
    is that of both (a sum of the two maxima for inf passed the suite, 5.0 for 3.0)."""
    from dist_clip import Shards, adapters
    from tests.custom_adapter import HandSharded

    monkeypatch.setattr(adapters, "ADAPTERS", ("tests.custom_adapter", *adapters.BUILT_IN))
    a, b = torch.tensor([3.0, -1.0]), torch.tensor([2.0, 0.5])
    target = HandSharded([Shards([a, b], None, True, ["w", "w"])])
    result = GradClipper(max_norm=100.0, norm_type=p, mode="per_param", report=True)(target)
    want = reference_norm([torch.tensor([3.0, -1.0, 2.0, 0.5])], p)
    assert list(result.norms) == ["w"] and abs(result.norms["w"] - want) <= 1e-6 * want, result.norms


@pytest.mark.parametrize("mode", ["per_param", "total"])
def test_one_tensor_in_two_shards_counts_and_scales_once_per_parameter(monkeypatch, mode):
    """README (Adding a framework): one tensor object in two Shards counts and scales once. The total path kept
    it; per-parameter norms counted it twice (7.07 for 5.0)."""
    from dist_clip import Shards, adapters
    from tests.custom_adapter import HandSharded

    monkeypatch.setattr(adapters, "ADAPTERS", ("tests.custom_adapter", *adapters.BUILT_IN))
    g = torch.tensor([3.0, 4.0])
    target = HandSharded([Shards([g], None, True, ["w"]), Shards([g], None, True, ["w"])])
    result = GradClipper(max_norm=1.0, mode=mode, report=True)(target)
    assert {k: float(v) for k, v in result.norms.items()} == {"w": pytest.approx(5.0, rel=1e-6)}
    torch.testing.assert_close(g, torch.tensor([3.0, 4.0]) / (5.0 + 1e-6))  # scaled once


def test_a_loss_scaled_count_is_not_unscaled(monkeypatch):
    """The L0 count of loss-scaled pieces (DeepSpeed fp16) is scale-free, per parameter as in total: the count
    was divided by the loss scale (0.75 for 3)."""
    from dist_clip import Shards, adapters, get_total_norm
    from tests.custom_adapter import HandSharded

    monkeypatch.setattr(adapters, "ADAPTERS", ("tests.custom_adapter", *adapters.BUILT_IN))
    target = HandSharded([Shards([torch.tensor([3.0, 0.0, 4.0, 8.0])], None, True, ["w"], loss_scale=4.0)])
    assert float(get_total_norm(target, norm_type=0)) == 3.0
    result = GradClipper(max_norm=100.0, norm_type=0, mode="per_param", report=True)(target)
    assert {k: float(v) for k, v in result.norms.items()} == {"w": 3.0}
    result = GradClipper(max_norm=100.0, norm_type=2, mode="per_param", report=True)(target)  # 9.64 unscaled
    assert float(result.norms["w"]) == pytest.approx(float(torch.tensor([3.0, 0, 4, 8]).norm()) / 4, rel=1e-6)
