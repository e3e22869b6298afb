"""AGC (``mode="unitwise"``) on tensor-parallel DTensors built with ``parallelize_module``, against float64.

Every rank builds the same small MLP and a float64 copy (the reference), parallelizes the first with
ColwiseParallel / RowwiseParallel over a "tp" mesh (optionally with the LayerNorm replicated over tp as DTensors,
and FSDP2 ``fully_shard`` over "dp" on a 2 x 2 (dp, tp) mesh on top), and runs forward/backward on the batch of
its dp coordinate while the reference runs every dp batch. A RowwiseParallel weight is ``Shard(1)``: every row
(AGC unit) is cut across the tp ranks, so its weight and gradient partials are combined in the call's one
collective. The total norm, the clipped full gradients (``full_tensor()``), some rows clipped and some not, and
one collective per call are checked for p in {1, 2, inf}. Run: ``.venv/bin/python -m pytest tests/test_agc_tp.py``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_clip import AGC, GradClipper
from dist_clip.adaptive import unit_pieces
from dist_clip.testing import count_collectives, reference_norm
from tests import beyond_cases as cases
from tests.fsdp_cases import _local
from tests.test_adaptive import agc_reference

IN, HID, MID = 6, 12, 7  # HID splits evenly over tp (torch TP infers the global shape of activations)


def _build(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, MID), nn.LayerNorm(MID))
    with torch.no_grad():  # a non-trivial norm layer, so its units are not all alike
        model[3].weight.normal_(1.0, 0.5)
        model[3].bias.normal_(0.0, 0.5)
    return model


def _batch(dp: int) -> torch.Tensor:
    return torch.randn(5, IN, generator=torch.Generator().manual_seed(100 + dp)) * 2


def _parallel(model: nn.Module, layout: str) -> tuple[nn.Module, int, int]:
    """(the parallelized model, number of dp batches, this rank's dp coordinate)."""
    from torch.distributed.tensor import distribute_module
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    world = dist.get_world_size()
    two_d = layout.startswith("dp_tp")
    mesh = cases.mesh((2, world // 2), ("dp", "tp")) if two_d else cases.mesh((world,), ("tp",))
    tp_mesh = mesh["tp"] if two_d else mesh
    tp_norm = layout.endswith("tp_norm")
    parallelize_module(model, tp_mesh, {"0": ColwiseParallel(), "2": RowwiseParallel(use_local_output=not tp_norm)})
    if tp_norm:
        distribute_module(model[3], tp_mesh)  # Replicate DTensors over tp: counted once
    if not two_d:
        return model, 1, 0
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=mesh["dp"])  # (_StridedShard(0), Shard(0)), (Shard(0), Shard(1)), ...
    return model, 2, mesh.get_coordinate()[0]


def _clipping_between(ref: nn.Module, p: float) -> float:
    """Halfway between the middle ratios ||g_row|| / max(||w_row||, eps) of the row-parallel weight's rows (the
    cut ones): some clip, some do not, none sits on the threshold (where float32 and float64 could differ)."""
    q = ref[2].weight
    ratios = torch.linalg.vector_norm(q.grad, p, dim=1) / torch.linalg.vector_norm(q.detach(), p, dim=1).clamp(min=1e-3)
    s = ratios.sort().values
    return float(s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if type(t).__name__ == "DTensor" else t).detach().double()


def _check_row_ids(model: nn.Module) -> int:
    """The global rows AGC assigns to each local piece (``_StridedShard`` included) are the rows it holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from dist_clip.adaptive import _dt_rows

    strided = 0
    for n, q in model.named_parameters():
        if q.dim() < 2:
            continue
        row0, ids = _dt_rows(n, q, q.device_mesh.get_coordinate())
        local = q._local_tensor
        ids = ids if ids is not None else torch.arange(row0, row0 + local.shape[0])
        shape, offset = compute_local_shape_and_global_offset(q.shape, q.device_mesh, q.placements)
        cols = slice(offset[1], offset[1] + shape[1])
        assert torch.equal(q.full_tensor()[ids][:, cols], local), n
        strided += any(type(pl).__name__ == "_StridedShard" for pl in q.placements)
    return strided


def body_agc_tp(layouts: list[str], group_world: bool = False) -> list[list]:
    """``group_world``: every call with ``group=WORLD`` (copies on the other tp slices still count once)."""
    out = []
    group = dist.group.WORLD if group_world else None
    for layout in layouts:
        model, n_dp, dp = _parallel(_build(3), layout)
        ref = copy.deepcopy(_build(3)).double()
        y = model(_batch(dp))
        (y.to_local() if type(y).__name__ == "DTensor" else y).square().mean().backward()
        torch.stack([ref(_batch(d).double()).square().mean() for d in range(n_dp)]).mean().backward()
        saved = {n: _local(q.grad).clone() for n, q in model.named_parameters()}
        cut = unit_pieces(model, None)[1]
        assert ("2.weight", range(MID)) in cut, cut  # RowwiseParallel: every row cut, one block
        strided = _check_row_ids(model)
        assert strided == (1 if layout.startswith("dp_tp") else 0), (layout, strided)  # FSDP2 over Colwise
        record = [layout, [(n, u if isinstance(u, int) else (u.start, u.stop)) for n, u in cut]]
        for p in (1.0, 2.0, math.inf):
            for n, q in model.named_parameters():
                _local(q.grad).copy_(saved[n])
            clipping = _clipping_between(ref, p)
            ref_params = {n: q.detach() for n, q in ref.named_parameters()}
            ref_grads = {n: q.grad for n, q in ref.named_parameters()}
            want = agc_reference(ref_params, ref_grads, clipping, 1e-3, p)
            with count_collectives() as calls:
                result = GradClipper(mode="unitwise", norm_type=p, agc=AGC(clipping))(model, group=group)
            assert calls.total == 1, (layout, p, calls.names)
            assert result.total_norm.item() == pytest.approx(reference_norm(list(ref_grads.values()), p), rel=1e-5)
            assert bool(result.clipped)
            for n, q in model.named_parameters():
                where = f"{layout} {n} p={p}"
                torch.testing.assert_close(_full(q.grad), want[n], rtol=1e-5, atol=1e-6,  # fp32 grads: ~1e-7 abs
                                           msg=lambda m, where=where: f"{where}: {m}")
            units = torch.cat([
                (~torch.isclose(want[n], ref_grads[n])).reshape(want[n].shape[0] if want[n].dim() > 1 else 1, -1)
                .any(dim=1) for n in want
            ])
            assert 0 < int(units.sum()) < units.numel(), (layout, p)
            clipped_rows = (~torch.isclose(want["2.weight"], ref_grads["2.weight"])).any(dim=1)
            assert 0 < int(clipped_rows.sum()) < MID, (layout, p)  # cut rows: some clipped, some not
            record.append((p, round(result.total_norm.item(), 6), int(units.sum()), int(clipped_rows.sum())))
        out.append(record)
    return out


def body_agc_all_replicated() -> list:
    """Every parameter a Replicate DTensor (``distribute_module``; torch 2.13's FSDP2 with
    ``DataParallelMeshDims(replicate=...)`` lays a model out so): every rank holds every unit whole, so AGC needs
    no collective (it reduced over the mesh, where the other modes make none), and clips as the reference."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    mesh = cases.mesh((dist.get_world_size(),), ("dp",))
    model, ref = _build(3), _build(3).double()
    distribute_module(model, mesh)
    x = _batch(0)
    model(DTensor.from_local(x, mesh, [Replicate()])).to_local().square().mean().backward()
    ref(x.double()).square().mean().backward()
    out = []
    saved = {n: _local(q.grad).clone() for n, q in model.named_parameters()}
    for p in (1.0, 2.0, math.inf):
        for n, q in model.named_parameters():
            _local(q.grad).copy_(saved[n])
        clipping = _clipping_between(ref, p)
        ref_grads = {n: q.grad for n, q in ref.named_parameters()}
        want = agc_reference({n: q.detach() for n, q in ref.named_parameters()}, ref_grads, clipping, 1e-3, p)
        with count_collectives() as calls:
            result = GradClipper(mode="unitwise", norm_type=p, agc=AGC(clipping))(model)
        assert calls.total == 0, (p, calls.names)
        assert result.total_norm.item() == pytest.approx(reference_norm(list(ref_grads.values()), p), rel=1e-5)
        for n, q in model.named_parameters():
            torch.testing.assert_close(_full(q.grad), want[n], rtol=1e-5, atol=1e-6)
        out.append(sum(int((~torch.isclose(want[n], ref_grads[n])).any()) for n in want))
    return out


def body_partial_refused() -> str:
    from torch.distributed.tensor import DTensor, Partial

    mesh = cases.mesh((dist.get_world_size(),), ("tp",))
    w = nn.Parameter(DTensor.from_local(torch.ones(3, 2), mesh, [Partial()], run_check=False))
    w.grad = DTensor.from_local(torch.ones(3, 2), mesh, [Partial()], run_check=False)
    try:
        GradClipper(mode="unitwise", agc=AGC())({"w": w})
    except NotImplementedError as e:
        return str(e)
    return "accepted"


def test_agc_tensor_parallel_two_ranks(run_ranks):
    results = run_ranks(2, body_agc_tp, ["tp", "tp_tp_norm"])
    assert all(r == results[0] for r in results), "ranks disagree"
    msg = run_ranks(2, body_partial_refused)[0]
    assert "Partial" in msg and "'w'" in msg, msg


def test_agc_on_replicated_dtensors_makes_no_collective(run_ranks):
    for clipped in run_ranks(2, body_agc_all_replicated):
        assert all(n > 0 for n in clipped), clipped  # some parameter clipped at every p


def test_agc_tensor_parallel_four_ranks_with_fsdp2(run_ranks):
    # tp over 4 ranks; dp x tp: FSDP2 over dp on top of the tp layout (MID=7 splits 4, 3 over dp), the norm
    # either on the dp slice alone (plain LayerNorm) or replicated over tp.
    results = run_ranks(4, body_agc_tp, ["tp", "dp_tp", "dp_tp_tp_norm"])
    assert all(r == results[0] for r in results), "ranks disagree"
    # group=WORLD: the LayerNorm on mesh["dp"] alone has a copy on the other tp slice; counted once (it counted
    # twice: total 15% high), the same numbers as without group=.
    with_group = run_ranks(4, body_agc_tp, ["dp_tp", "dp_tp_tp_norm"], True)
    assert with_group[0] == results[0][1:], (with_group[0], results[0][1:])
