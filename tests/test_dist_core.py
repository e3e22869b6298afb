"""Distributed tier for the core: spawned gloo ranks (world sizes 1-4), against the float64 reference.

Every rank builds the same full set of gradients from a seed, keeps its own (uneven, sometimes empty) share,
and checks the total and the clipped pieces against the reference computed from the full set; totals must be
bit-identical across ranks, and each call must issue exactly the expected number of collectives.
Run: ``.venv/bin/python -m pytest tests/test_dist_core.py``.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dist_clip
from dist_clip.testing import count_collectives, reference_norm
from tests._harness import outcome

ORDERS = (0.0, 1.0, 2.0, 3.5, math.inf)
WORLD_SIZES = (1, 2, 3, 4)


def _full_grads(seed: int, dtype: torch.dtype, sizes=(1, 7, 13 * 7, 5000, 0, 70000, 2, 300)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        t = torch.randn(n, generator=g, dtype=torch.float64) * (10.0 ** (i % 3 - 1))
        t[torch.rand(n, generator=g) < 0.2] = 0
        out.append(t.to(dtype))
    return out


def _my_share(items: list, rank: int, world: int) -> list:
    # Uneven on purpose: rank 0 takes every item whose index % (world + 1) is 0 or 1, the last rank may
    # get nothing at all when world >= 3.
    if world >= 3 and rank == world - 1:
        return []
    return [x for i, x in enumerate(items) if min(i % (world + 1), world - 1) == rank]


def body_plain_group(dtype_name: str, max_norm: float) -> list:
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, dtype_name)
    out = []
    for p in ORDERS:
        full = _full_grads(17, dtype)
        mine = _my_share(full, rank, world)
        # Items held by no rank (the excluded last rank's) are not part of the model on any rank.
        held = [x for r in range(world) for x in _my_share(full, r, world)]
        want = reference_norm(held, p)
        before = [t.clone() for t in mine]
        with count_collectives() as calls:
            total = dist_clip.clip_grad_norm_(mine, max_norm, p, group=dist.group.WORLD)
        rtol = 1e-6 if dtype == torch.float32 else 1e-5
        assert total.dtype == torch.float32 and total.dim() == 0
        assert abs(total.item() - want) <= rtol * want, (p, total.item(), want)
        assert calls.total == (1 if world > 1 else 0), calls.names
        coef = min(1.0, max_norm / (want + 1e-6))
        # One rounding in the gradient's own dtype; fp16 results below 6.1e-5 are subnormal (spacing 6e-8).
        rtol_g = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
        atol_g = 6e-8 if dtype == torch.float16 else 1e-30
        for t, b in zip(mine, before):
            torch.testing.assert_close(t.double(), b.double() * coef, rtol=rtol_g, atol=atol_g)
        out.append(total.item())
    return out


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_plain_tensors_with_group(run_ranks, world, dtype):
    values = run_ranks(world, body_plain_group, dtype, 0.7)
    assert all(v == values[0] for v in values), "totals differ across ranks"


def body_nan_on_one_rank(bad_rank: int) -> list:
    rank = dist.get_rank()
    out = []
    for p in ORDERS:
        t = torch.randn(1000) if rank != bad_rank else torch.randn(100000)
        if rank == bad_rank:
            t[123] = math.nan
        out.append(math.isnan(dist_clip.get_total_norm([t], p, group=dist.group.WORLD).item()))
        try:
            dist_clip.clip_grad_norm_([t.clone()], 1.0, p, error_if_nonfinite=True, group=dist.group.WORLD)
            out.append("no error")
        except RuntimeError as e:
            out.append("non-finite" in str(e))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_nan_on_one_rank_is_nan_everywhere_and_errors_everywhere(run_ranks, world):
    for values in run_ranks(world, body_nan_on_one_rank, world - 1):
        assert values == [True] * (2 * len(ORDERS)), values


_GROUPS: dict = {}


def _gloo_creator(store, rank, size, timeout):  # a backend of the user's own, registered for the CPU alone
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def _group_on(backend: str) -> dist.ProcessGroup:
    """The world on ``backend``: "gloo" the pool's own group; "cpu:gloo" started with a device-qualified name,
    which torch's ``get_backend`` says as is (and "undefined" for ``init_process_group()`` without one); "dcgloo"
    a backend registered with ``Backend.register_backend(..., devices=["cpu"])`` (here wrapping gloo)."""
    if backend == "gloo":
        return dist.group.WORLD
    if backend not in _GROUPS:
        if backend == "dcgloo" and not hasattr(dist.Backend, "DCGLOO"):
            dist.Backend.register_backend("dcgloo", _gloo_creator, devices=["cpu"])
        _GROUPS[backend] = dist.new_group(backend=backend)
    return _GROUPS[backend]


def body_mixed_dtypes_agree(p: float, backend: str) -> list:
    """Rank 0 holds float64 gradients, rank 1 float32 ones, rank 2 (if any) none: every rank returns the same
    float64 total, and a total beyond float32's range neither raises on one rank alone nor zeroes the float32
    rank's gradients. On every backend of :func:`_group_on`: "cpu:gloo" and a backend registered for the CPU
    alone left the flag out (rank 1 returned float32, and inf for the total beyond float32's range)."""
    from dist_clip import GradClipper

    group = _group_on(backend)
    assert dist.get_backend(group) == backend, dist.get_backend(group)

    rank, world = dist.get_rank(), dist.get_world_size()
    full = _full_grads(5, torch.float64)
    shares = [full[:3], [t.to(torch.float32) for t in full[3:]], []]
    mine = [t.clone() for t in shares[rank]] if rank < 2 else []
    want = reference_norm([t.double() for s in shares[:world] for t in s], p)
    out = []
    total = dist_clip.clip_grad_norm_(mine, 0.5, p, group=group)
    assert total.dtype == torch.float64, (rank, total.dtype)
    assert abs(total.item() - want) <= 1e-6 * want, (total.item(), want)  # float32 pieces: the fp32 contract
    out.append(total.item())
    result = GradClipper(max_norm=0.5, norm_type=p)(
        [t.clone() for t in shares[rank]] if rank < 2 else [], group=group
    )
    assert result.total_norm.dtype == torch.float64, (rank, result.total_norm.dtype)
    out.append(result.total_norm.item())
    # Beyond float32's range (1e39): finite in float64 on every rank, so no rank raises, and the float32
    # rank's gradient is scaled by the float64 coefficient (1e30 / 1e39), not by 1e30 / inf = 0.
    huge = [torch.full((1,), 1e39, dtype=torch.float64)] if rank == 0 else []
    if rank == 1:
        huge = [torch.ones(1)]
    total = dist_clip.clip_grad_norm_(huge, 1e30, math.inf, error_if_nonfinite=True, group=group)
    assert total.dtype == torch.float64 and total.item() == 1e39
    if rank == 1:
        assert huge[0].item() == pytest.approx(1e-9, rel=1e-6), huge[0].item()
    return out


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("p", [2.0, math.inf])
@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo", "dcgloo"])
def test_ranks_with_float64_and_float32_gradients_agree_on_float64(run_ranks, world, p, backend):
    values = run_ranks(world, body_mixed_dtypes_agree, p, backend)
    assert all(v == values[0] for v in values), values


def body_a_rank_holding_nothing_under_group() -> list:
    """A rank holding none of a group-sharded target's pieces is normal under sharding: no "holds no gradients"
    warning there (it is for a target without gradients and no group=)."""
    pieces = [torch.ones(4)] if dist.get_rank() == 0 else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        total = dist_clip.get_total_norm(pieces, group=dist.group.WORLD).item()
    return [total, [str(w.message) for w in caught]]


def test_a_rank_holding_nothing_under_group_is_not_warned(run_ranks):
    assert run_ranks(2, body_a_rank_holding_nothing_under_group) == [[2.0, []], [2.0, []]]


def body_inf_elements_do_not_break_max() -> list:
    rank = dist.get_rank()
    t = torch.full((10,), -3.0 if rank == 0 else 2.0)
    return [dist_clip.get_total_norm([t], p, group=dist.group.WORLD).item() for p in ("inf", 0)]


def test_inf_norm_of_negative_values_across_ranks(run_ranks):
    for values in run_ranks(2, body_inf_elements_do_not_break_max):
        assert values == [3.0, 20.0]


def body_ddp(max_norm: float) -> list:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 3))
    ref = [p.detach().clone() for p in model.parameters()]
    ddp = nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(100)
    xs = torch.randn(dist.get_world_size(), 5, 13, generator=g)
    ddp(xs[dist.get_rank()]).square().mean().backward()
    # Reference: the same model unsharded on the global batch (DDP averages the per-rank mean losses).
    ref_model = nn.Sequential(nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 3))
    with torch.no_grad():
        for p, r in zip(ref_model.parameters(), ref):
            p.copy_(r)
    torch.stack([ref_model(x).square().mean() for x in xs]).mean().backward()
    ref_grads = [p.grad for p in ref_model.parameters()]
    out = []
    for p in ORDERS:
        want = reference_norm(ref_grads, p)
        with count_collectives() as calls:
            total = dist_clip.get_total_norm(ddp, p)
            ignored = dist_clip.get_total_norm(ddp, p, group=dist.group.WORLD)  # replicas stay replicas
        assert calls.total == 0, calls.names
        assert abs(total.item() - want) <= 1e-5 * want, (p, total.item(), want)
        assert ignored.item() == total.item(), (p, ignored.item(), total.item())
        out.append(total.item())
    torch_total = torch.nn.utils.get_total_norm([q.grad for q in model.parameters()])
    ours = dist_clip.clip_grad_norm_(ddp, max_norm)
    assert ours.item() == pytest.approx(torch_total.item(), rel=1e-5)
    coef = min(1.0, max_norm / (reference_norm(ref_grads) + 1e-6))
    for q, r in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(q.grad.double(), r.double() * coef, rtol=1e-5, atol=1e-8)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_needs_no_collective(run_ranks, world):
    values = run_ranks(world, body_ddp, 0.05)
    assert all(v == values[0] for v in values)


def body_ddp_no_sync(composable: bool = False) -> list:
    """Inside DDP's no_sync() each rank holds its own gradients: every mode measured them as identical replicas
    (no collective) and each rank clipped by its own total (12.0, 19.0, 68.8 on 3 ranks). Refused on every
    rank; after a synchronised backward the accumulated gradients give the reference's total. Composable
    ``replicate`` with ``set_requires_gradient_sync(False)`` likewise (0.42 and 0.57 on 2 ranks, no error)."""
    import contextlib

    from dist_clip import AGC, GradClipper

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 3))
    ref_model = nn.Sequential(nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    with torch.no_grad():
        for p, r in zip(ref_model.parameters(), model.parameters()):
            p.copy_(r)
    if composable:
        from torch.distributed._composable.replicate import replicate

        ddp = replicate(model)

        @contextlib.contextmanager
        def no_sync():  # noqa: ANN202
            ddp.set_requires_gradient_sync(False)
            yield
            ddp.set_requires_gradient_sync(True)
    else:
        ddp = nn.parallel.DistributedDataParallel(model)
        no_sync = ddp.no_sync
    world, rank = dist.get_world_size(), dist.get_rank()
    xs = torch.randn(2, world, 5, 13, generator=torch.Generator().manual_seed(7))
    # A plain container holding the DDP: each rank measured its own gradients (11.20 and 10.11), unrefused.
    box = nn.ModuleDict({"G": ddp})
    calls = (lambda: dist_clip.clip_grad_norm_(ddp, 1.0), lambda: GradClipper(mode="per_param")(ddp),
             lambda: GradClipper(mode="unitwise", agc=AGC(0.1))(ddp), lambda: dist_clip.clip_grad_norm_(box, 1.0),
             lambda: GradClipper()(box), lambda: GradClipper(mode="per_param")(box),
             lambda: GradClipper(mode="unitwise", agc=AGC(0.1))(box))
    out = []
    with no_sync():
        ddp(xs[0, rank]).square().mean().backward()
        for call in calls:
            try:
                call()
                out.append("measured")
            except ValueError as e:
                out.append("refused" if "no_sync()" in str(e) or "not reduced yet" in str(e) else str(e))
    ddp(xs[1, rank]).square().mean().backward()
    sum(ref_model(x.double()).square().mean() for x in xs.reshape(-1, 5, 13)).div(world).backward()
    want = reference_norm([p.grad for p in ref_model.parameters()])
    total = dist_clip.get_total_norm(ddp).item()
    out.append(abs(total - want) <= 1e-5 * want)
    return out


@pytest.mark.parametrize("composable", [False, True])
def test_ddp_no_sync_gradients_are_refused(run_ranks, composable):
    assert run_ranks(3, body_ddp_no_sync, composable) == [["refused"] * 7 + [True]] * 3


def body_ddp_optimizer_stepped_in_backward(composable: bool = False) -> list:
    """A DDP whose communication hook steps an optimizer (``_register_fused_optim``: torch's functional Adam,
    once each bucket is reduced) has stepped its parameters before any clip after the backward: a NaN batch's
    clip returned NaN with every parameter NaN already, and a finite batch's coefficient scaled gradients the
    step had used, silently. Every clipping entry point refuses it on every rank (the DDP itself or a container
    holding it); get_total_norm still measures (the float64 reference). Composable ``replicate`` with the same
    hook given to its ``register_comm_hook`` (it goes to the DDP its state makes at the first forward) likewise:
    it was clipped unrefused (7.84 returned on 2 ranks, the gradients scaled after the step had used them)."""
    from dist_clip import AGC, GradClipper

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (torch's TorchScript functional optimizers)
        if composable:
            from torch.distributed._composable.replicate import replicate
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
            from torch.distributed.algorithms.ddp_comm_hooks.optimizer_overlap_hooks import (
                _hook_then_optimizer,
                _OptimizerHookState,
            )
            from torch.distributed.optim.utils import as_functional_optim

            ddp = replicate(model)  # (what DDP._register_fused_optim registers, through replicate's own method)
            ddp.register_comm_hook(None, _hook_then_optimizer(  # type: ignore[operator]
                allreduce_hook, _OptimizerHookState(as_functional_optim(torch.optim.Adam, lr=0.1))))
        else:
            ddp = nn.parallel.DistributedDataParallel(model)
            ddp._register_fused_optim(torch.optim.Adam, lr=0.1)
    box = nn.ModuleDict({"G": ddp})
    world, rank = dist.get_world_size(), dist.get_rank()
    calls = (lambda: dist_clip.clip_grad_norm_(ddp, 0.5), lambda: GradClipper(max_norm=0.5)(ddp),
             lambda: GradClipper(mode="per_param")(ddp), lambda: GradClipper(mode="unitwise", agc=AGC(0.1))(ddp),
             lambda: dist_clip.clip_grad_norm_(box, 0.5), lambda: GradClipper()(box),
             lambda: dist_clip.clip_grads_with_norm_(ddp, 0.5, torch.tensor(2.0)))
    out = []
    for step in range(2):
        before = [q.detach().clone() for q in model.parameters()]
        xs = [torch.randn(4, 6, generator=torch.Generator().manual_seed(10 * step + r)) for r in range(world)]
        ref = [q.detach().double().requires_grad_() for q in before]
        for x in xs:  # the float64 reference gradients: the mean of the ranks' losses
            h = torch.tanh(x.double() @ ref[0].T + ref[1]) @ ref[2].T + ref[3]
            (h.square().sum() / world).backward()
        (ddp(xs[rank]).square().sum() * (math.nan if step == 1 else 1.0)).backward()
        out.append(all(not torch.equal(b, q) for b, q in zip(before, model.parameters())))  # stepped in backward
        grads = [q.grad.clone() for q in model.parameters()]
        out.append([outcome(call, ValueError, lambda m: "steps the optimizer inside the backward" in m)
                    for call in calls])
        out.append(all(torch.allclose(g, q.grad, rtol=0, atol=0, equal_nan=True)  # nothing scaled
                       for g, q in zip(grads, model.parameters())))
        total = dist_clip.get_total_norm(ddp).item()
        if step == 0:
            want = reference_norm([r.grad for r in ref])
            out.append(abs(total - want) <= 1e-5 * want)
        else:
            out.append(math.isnan(total))
        ddp.zero_grad()
    return out


@pytest.mark.parametrize("composable", [False, True])
def test_ddp_optimizer_stepped_in_backward_is_refused(run_ranks, composable):
    assert run_ranks(2, body_ddp_optimizer_stepped_in_backward, composable) == [
        [True, [True] * 7, True, True] * 2] * 2


def body_optimizer_in_backward_hook_is_refused(composable: bool) -> list:
    """Parameters under torch's ``_apply_optimizer_in_backward`` get DDP's own stepping hook
    (``apply_optim_in_backward_hook``), registered at the DDP's first forward; composable ``replicate`` makes its
    DDP then too, and was clipped unrefused. Its backward needs an accelerator (torch waits on an optimizer
    stream), so the refusal is checked after a forward, on every rank, before anything is measured."""
    from torch.distributed.optim import _apply_optimizer_in_backward

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    _apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1})
    if composable:
        from torch.distributed._composable.replicate import replicate

        ddp = replicate(model)
    else:
        ddp = nn.parallel.DistributedDataParallel(model)
    ddp(torch.randn(4, 6))
    return [outcome(call, ValueError, lambda m: "(apply_optim_in_backward_hook) steps the optimizer" in m)
            for call in (lambda: dist_clip.clip_grad_norm_(ddp, 0.5), lambda: dist_clip.GradClipper()(ddp),
                         lambda: dist_clip.clip_grad_norm_(nn.ModuleDict({"G": ddp}), 0.5))]


@pytest.mark.parametrize("composable", [False, True])
def test_optimizer_in_backward_hook_is_refused(run_ranks, composable):
    assert run_ranks(2, body_optimizer_in_backward_hook_is_refused, composable) == [[True] * 3] * 2


def body_ddp_bucket_views_two_losses_keep_the_first_part_s_skip(how: str) -> list:
    """Two heads under one DDP with ``gradient_as_bucket_view=True``, each clipped right after its own backward (two
    losses, ``find_unused_parameters``): the views share their bucket's version counter, so the second backward
    reads as a write of the first head's gradients (README said it replaced the first head's NaN skip, a NaN step
    taken). The backward count per parameter tells them apart: the NaN batch (rank 1's first head) is skipped on
    every rank, and the next good batch, clipped the same way, steps with finite parameters."""

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.h = nn.ModuleList([nn.Linear(4, 3), nn.Linear(4, 2)])

        def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
            return self.h[i](x)

    torch.manual_seed(0)
    model = Heads()
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True, find_unused_parameters=True)
    ps = list(model.parameters())
    opt = torch.optim.Adam(ps, lr=0.1, fused=how != "clipper")
    clipper = dist_clip.GradClipper(max_norm=1.0, on_nonfinite="skip")
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(dist.get_rank()))
    out = []
    for nan in (True, False):
        opt.zero_grad(set_to_none=True)
        for i in range(2):
            bad = nan and i == 0 and dist.get_rank() == 1
            (ddp(x, i).square().sum() * (math.nan if bad else 1.0)).backward()
            part = list(model.h[i].parameters())
            if how == "clip_fused":
                dist_clip.clip_grad_norm_(part, 1.0, optimizer=opt)
            else:
                clipper(part, optimizer=opt)
        before = [q.detach().clone() for q in ps]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        out.append((not all(torch.equal(b, q) for b, q in zip(before, ps)),
                    all(bool(q.isfinite().all()) for q in ps)))
    return out


@pytest.mark.parametrize("how", ["clipper", "clipper_fused", "clip_fused"])
def test_ddp_bucket_views_two_losses_keep_the_first_part_s_skip(run_ranks, how):
    assert run_ranks(2, body_ddp_bucket_views_two_losses_keep_the_first_part_s_skip, how) == [
        [(False, True), (True, True)]] * 2


@contextlib.contextmanager
def _custom_adapter_listed():
    """tests/custom_adapter.py in ``ADAPTERS`` for the block; the built-in list again after it (the ranks serve
    later tests too)."""
    import dist_clip.adapters as adapters

    adapters.ADAPTERS = ("tests.custom_adapter", *adapters.BUILT_IN)
    try:
        yield
    finally:
        adapters.ADAPTERS = adapters.BUILT_IN


def body_custom_adapter(p: float) -> list:
    """Rows of "w" split unevenly over the ranks (rank 1 holds none), a bf16 "b" split likewise, and a
    replicated "r" counted on rank 0 only; every rank names every parameter."""
    with _custom_adapter_listed():
        return _custom_adapter_values(p)


def _custom_adapter_values(p: float) -> list:
    from dist_clip import GradClipper, Shards

    from .custom_adapter import HandSharded

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    full = {"w": torch.randn(10, 3) * 3, "b": (torch.randn(7) * 5).bfloat16(), "r": torch.randn(4)}
    cuts = {"w": [0, 6, 6, 10], "b": [0, 0, 3, 7], "r": [0, 4] * world}  # "r": whole on every rank

    def mine(name: str) -> torch.Tensor:
        return full[name][cuts[name][rank]:cuts[name][rank + 1]]

    def pieces() -> HandSharded:
        shards = [Shards([mine("w").clone(), mine("b").clone()], dist.group.WORLD, True, ["w", "b"]),
                  Shards([mine("r").clone()], dist.group.WORLD, rank == 0, ["r"])]
        return HandSharded(shards[::-1] if rank == 2 else shards)  # (slots follow the sorted names, any order)

    out = []
    target = pieces()
    res = GradClipper(max_norm=1.0, norm_type=p, mode="per_param", report=True)(target)
    out.append(res.slots == ("b", "r", "w"))
    got = {n: t for s in target.pieces for n, t in zip(s.names, s.tensors)}
    for name, t in full.items():
        want = reference_norm([t], p)  # bf16 "b": of its own values, in float64
        out.append(abs(float(res.norms[name]) - want) <= 1e-5 * want)
        coef = min(1.0, 1.0 / (want + 1e-6))
        out.append(torch.allclose(got[name].double(), mine(name).double() * coef, rtol=1e-2 if name == "b" else 1e-6))
    total = dist_clip.get_total_norm(pieces(), p)
    out.append(abs(total.item() - reference_norm(list(full.values()), p)) <= 1e-5 * total.item())
    return out


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_a_custom_adapter_is_named_per_parameter_by_its_shards(run_ranks, p):
    """README's "Adding a framework": Shards.names serve the per-parameter modes and reports. They were
    ignored there: TypeError "cannot name the gradients of a HandSharded per parameter" on every rank."""
    for values in run_ranks(3, body_custom_adapter, p):
        assert values == [True] * 8, values


def body_custom_adapter_output() -> list:
    """What an adapter hands back is checked and completed: an empty list under group= joins the collective (the
    rank returned 0 and the others waited), one Shards alone is a list of it ("'Shards' object is not
    iterable"), a generator of pieces is read once (it read empty: 0, unclipped), one tensor in two Shards
    counts once (x1.41), a list of tensors is a TypeError naming the adapter, and unit-wise clipping refuses a
    module the adapter takes (it read it as plain parameters, each rank its own units)."""
    with _custom_adapter_listed():
        return _custom_adapter_output_values()


def _custom_adapter_output_values() -> list:
    from dist_clip import AGC, GradClipper, Shards

    from .custom_adapter import HandModule, HandSharded

    rank, world = dist.get_rank(), dist.get_world_size()
    w = torch.arange(1.0, 7.0)
    want = reference_norm([w], 2.0)
    out = []
    # rank 0 holds all of w; rank 1's adapter returns []
    got = dist_clip.get_total_norm(HandSharded([Shards([w.clone()], dist.group.WORLD)] if rank == 0 else []), 2.0,
                                   group=dist.group.WORLD)
    out.append(got.item() == pytest.approx(want, rel=1e-6))
    piece = w[rank * 3:(rank + 1) * 3].clone()
    lone = HandSharded(Shards([piece], dist.group.WORLD))
    out.append(dist_clip.clip_grad_norm_(lone, 1.0).item() == pytest.approx(want, rel=1e-6))
    out.append(torch.allclose(piece, w[rank * 3:(rank + 1) * 3] / (want + 1e-6)))
    piece = w[rank * 3:(rank + 1) * 3].clone()
    gen = HandSharded([Shards((t for t in [piece]), dist.group.WORLD)])
    out.append(dist_clip.clip_grad_norm_(gen, 1.0).item() == pytest.approx(want, rel=1e-6))
    out.append(torch.allclose(piece, w[rank * 3:(rank + 1) * 3] / (want + 1e-6)))
    piece = w[rank * 3:(rank + 1) * 3].clone()
    twice = HandSharded([Shards([piece], dist.group.WORLD), Shards([piece], dist.group.WORLD)])
    out.append(dist_clip.get_total_norm(twice, 2.0).item() == pytest.approx(want, rel=1e-6))
    once = HandSharded([Shards([piece, piece], dist.group.WORLD)])  # twice in one Shards: counted twice before
    out.append(dist_clip.get_total_norm(once, 2.0).item() == pytest.approx(want, rel=1e-6))
    # the named modes go through the same checks: one Shards alone is a list of it; [] under group= joins the
    # collective (the rank returned 0 and the other waited), where the names differing is the layout check's
    # RuntimeError on both ranks (every rank must name every parameter)
    named = Shards([w[rank * 3:(rank + 1) * 3].clone()], dist.group.WORLD, names=["w"])
    res = GradClipper(max_norm=1e9, mode="per_param", report=True)(HandSharded(named))
    out.append(res.total_norm.item() == pytest.approx(want, rel=1e-6))
    try:
        GradClipper(mode="per_param")(HandSharded(named if rank == 0 else []), group=dist.group.WORLD)
        out.append("returned")
    except RuntimeError as e:
        out.append("disagree on the target's parameter names" in str(e))
    for bad in ([piece], HandModule([Shards([piece], dist.group.WORLD, names=["w"])])):
        try:
            if isinstance(bad, list):
                dist_clip.get_total_norm(HandSharded(bad), 2.0)
            else:
                GradClipper(mode="unitwise", agc=AGC(0.01))(bad)
            out.append("accepted")
        except TypeError as e:
            out.append("tests.custom_adapter" in str(e) and ("list of dist_clip.Shards" in str(e) or
                                                             "unit-wise" in str(e)))
    assert world == 2
    return out


@pytest.mark.timeout(120)
def test_what_a_custom_adapter_hands_back_is_checked_and_completed(run_ranks):
    for values in run_ranks(2, body_custom_adapter_output):
        assert values == [True] * 11, values


def body_custom_adapter_per_group() -> list:
    """mode="per_group" through a user adapter whose Shards hold the gradients of the parameters the optimizer
    steps (rows of "w" cut unevenly, rank 1 holding none of them and no gradient for its empty parameter): each
    param group is clipped against its own max_norm. Every piece was taken for a parameter outside the optimizer
    (the Shards hold gradients, not parameters): ValueError "found none of the target's parameters" on every
    rank; with the pieces found, rank 1's parameter without a gradient put it in no group there, a
    RuntimeError (the ranks disagreeing on the grouping)."""
    with _custom_adapter_listed():
        return _custom_adapter_per_group_values()


def _body_head_sgd(params: dict) -> torch.optim.SGD:
    """The custom-adapter per_group tests' optimizer: "w" and "b" (the body) clipped to 1.0, "h" (the head) to 0.1."""
    return torch.optim.SGD([{"params": [params["w"], params["b"]], "max_norm": 1.0},
                            {"params": [params["h"]], "max_norm": 0.1}], lr=0.1)


def _body_head_coefs(full: dict) -> dict:
    """Each name's reference coefficient under :func:`_body_head_sgd`, from the full gradients."""
    body, head = reference_norm([full["w"], full["b"]]), reference_norm([full["h"]])
    return {"w": 1.0 / (body + 1e-6), "b": 1.0 / (body + 1e-6), "h": 0.1 / (head + 1e-6)}


def _custom_adapter_per_group_values() -> list:
    from dist_clip import GradClipper, Shards

    from .custom_adapter import HandSharded

    rank = dist.get_rank()
    torch.manual_seed(0)
    full = {"w": torch.randn(10, 3) * 3, "b": torch.randn(7), "h": torch.randn(4, 2) * 0.2}
    cuts = {"w": [0, 6, 6, 10], "b": [0, 2, 3, 7], "h": [0, 1, 4, 4]}
    params = {n: nn.Parameter(torch.zeros_like(t[cuts[n][rank]:cuts[n][rank + 1]])) for n, t in full.items()}
    for n, prm in params.items():
        if prm.numel():
            prm.grad = full[n][cuts[n][rank]:cuts[n][rank + 1]].clone()
    names = sorted(params)
    target = HandSharded([Shards([params[n].grad if params[n].grad is not None else torch.zeros(0) for n in names],
                                 dist.group.WORLD, names=names)])
    opt = _body_head_sgd(params)
    res = GradClipper(mode="per_group")(target, optimizer=opt)
    coef = _body_head_coefs(full)  # the body's norm 16.50, the head's 0.98
    out = [res.total_norm.item() == pytest.approx(reference_norm(list(full.values())), rel=1e-6)]
    for n, prm in params.items():
        mine = full[n][cuts[n][rank]:cuts[n][rank + 1]]
        out.append(prm.grad is None if not prm.numel() else torch.allclose(prm.grad, mine * coef[n], rtol=1e-6))
    return out


def test_a_custom_adapter_clips_per_group(run_ranks):
    for values in run_ranks(3, body_custom_adapter_per_group):
        assert values == [True] * 4, values


def body_custom_adapter_flat_buffer() -> list:
    """mode="per_group" through a user adapter whose pieces are views of one flat gradient buffer per rank (each
    parameter's .grad a view of it, as DeepSpeed and Megatron lay them out): slices of the buffer, a .grad
    flattened, a .grad cut in two pieces. Only the .grad objects themselves were found: a view was taken for a
    parameter outside the optimizer, left unclipped ("b" kept 1.0 of its gradient for 0.0765), and its group
    measured without it ("w" scaled by 1/12.97 for 1/13.09); with every piece a view, "found none" on every rank.
    A piece over the gradients of two groups is a ValueError on every rank; a copy stays outside."""
    with _custom_adapter_listed():
        return _custom_adapter_flat_buffer_values()


def _custom_adapter_flat_buffer_values() -> list:
    from dist_clip import GradClipper, Shards

    from .custom_adapter import HandSharded

    rank = dist.get_rank()
    torch.manual_seed(0)
    full = {"w": torch.randn(6, 3) * 3, "b": torch.randn(6), "h": torch.randn(4, 2) * 0.2}
    cuts = {"w": [0, 4, 6], "b": [0, 1, 6], "h": [0, 1, 4]}
    mine = {n: full[n][cuts[n][rank]:cuts[n][rank + 1]] for n in full}
    names = sorted(full)  # b, h, w
    coef = _body_head_coefs(full)  # the body's norm 13.09, the head's 0.58
    out = []
    for kind in ("slices", "flattened", "mixed", "halves", "two groups"):
        params = {n: nn.Parameter(torch.zeros_like(t)) for n, t in mine.items()}
        flat = torch.cat([mine[n].flatten() for n in names])
        at = dict(zip(names, torch.tensor([0] + [mine[n].numel() for n in names]).cumsum(0).tolist()))
        for n in names:
            params[n].grad = flat[at[n]:at[n] + mine[n].numel()].view_as(mine[n])
        pieces = {"slices": [flat[at[n]:at[n] + mine[n].numel()] for n in names],
                  "flattened": [params[n].grad.view(-1) for n in names],
                  "mixed": [params[n].grad if n != "b" else params[n].grad.view(-1) for n in names],
                  "halves": [params[n].grad for n in names[:2]] + [params["w"].grad[:1], params["w"].grad[1:]],
                  "two groups": [flat[:at["w"]], params["w"].grad]}[kind]
        labels = {"halves": [*names, "w"], "two groups": ["b", "w"]}.get(kind, names)
        target = HandSharded([Shards(pieces, dist.group.WORLD, names=labels)])
        opt = _body_head_sgd(params)
        if kind == "two groups":  # "b" and "h" in one piece: b's group is the body's, h's the head's
            out.append(outcome(lambda t=target, o=opt: GradClipper(mode="per_group")(t, optimizer=o), ValueError,
                               lambda m: "lie in the .grad of parameters of different param groups" in m))
            continue
        res = GradClipper(mode="per_group")(target, optimizer=opt)
        out.append(res.total_norm.item() == pytest.approx(reference_norm(list(full.values())), rel=1e-6))
        out.append(all(torch.allclose(params[n].grad, mine[n] * coef[n], rtol=1e-6) for n in names))
    # a copy of a .grad shares no bytes with it: outside the optimizer, counted in the total and kept
    params = {n: nn.Parameter(torch.zeros_like(t)) for n, t in mine.items()}
    for n in names:
        params[n].grad = mine[n].clone()
    copy_b = mine["b"].clone()
    target = HandSharded([Shards([copy_b, params["h"].grad, params["w"].grad], dist.group.WORLD, names=names)])
    opt = _body_head_sgd(params)
    GradClipper(mode="per_group")(target, optimizer=opt)
    out.append(torch.equal(copy_b, mine["b"]) and torch.equal(params["b"].grad, mine["b"]))
    out.append(torch.allclose(params["w"].grad, mine["w"] / (reference_norm([full["w"]]) + 1e-6), rtol=1e-6))
    return out


def test_a_custom_adapter_clips_views_of_a_flat_gradient_buffer_per_group(run_ranks):
    for values in run_ranks(2, body_custom_adapter_flat_buffer):
        assert values == [True] * 11, values


def body_ddp_groups_unitwise() -> list:
    """Two DDP replica groups (ranks 0-1, 2-3) with different data, AGC with group=WORLD: each group gets its
    own averaged gradient's norm and verdict, with no collective (ranks 2-3 read group 0's norm, 0.473 for
    0.476, and a NaN in group 1 stepped NaN weights there while group 0's verdict said finite)."""
    from torch.nn.parallel import DistributedDataParallel

    from dist_clip import AGC, GradClipper

    rank = dist.get_rank()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    out = []
    for nan_group in (None, 1):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        ref = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        ref.load_state_dict(model.state_dict())
        ddp = DistributedDataParallel(model, process_group=groups[rank // 2])
        torch.manual_seed(1 + rank // 2)
        xs = torch.randn(2, 5, 4) * (1 + 3 * (rank // 2))
        x = xs[rank % 2].clone()
        if nan_group == rank // 2 and rank % 2 == 0:
            x[0, 0] = float("nan")
        ddp(x).square().mean().backward()
        for r in range(2):
            ref(xs[r].double()).square().mean().div(2).backward()
        want = reference_norm([q.grad for q in ref.parameters()], 2.0)
        clipper = GradClipper(mode="unitwise", agc=AGC(0.05), on_nonfinite="skip")
        opt = torch.optim.SGD(model.parameters())
        with count_collectives() as c:
            res = clipper(ddp, group=dist.group.WORLD, optimizer=opt)
        nan_here = nan_group == rank // 2
        out.append((c.total, bool(res.finite) != nan_here,
                    nan_here or abs(res.total_norm.item() - want) <= 1e-6 * want))
    return out


def body_replicas_under_a_group(kind: str) -> list:
    """4 ranks, two stages (ranks 0-1 and 2-3), each a composable replicate() or a DDP in a plain container
    over its pair's group, measured with group= spanning the stages (the world, or a pair across them): the
    replicas were taken for the caller's distinct pieces and summed over the group (1.20 for 0.85; a world-wide
    replicate() read sqrt(world) times its norm; AGC too). Each copy counts once, on the lowest rank of its group
    in group=; without group= each stage measures its own, with no collective."""
    from torch.distributed._composable import replicate
    from torch.nn.parallel import DistributedDataParallel

    rank = dist.get_rank()
    stage = rank // 2
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    cross = [dist.new_group([0, 2]), dist.new_group([1, 3])]

    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))

    refs = []
    for s in (0, 1):
        ref = net(10 + s).double()
        for r in (2 * s, 2 * s + 1):
            x = torch.randn(5, 6, generator=torch.Generator().manual_seed(r)).double()
            ref(x).square().mean().div(2).backward()
        refs.append([q.grad for q in ref.parameters()])
    module = net(10 + stage)
    if kind == "replicate":
        target = model = replicate(module, process_group=pairs[stage])
    else:
        model = DistributedDataParallel(module, process_group=pairs[stage])
        target = nn.ModuleDict({"body": model})
    model(torch.randn(5, 6, generator=torch.Generator().manual_seed(rank))).square().mean().backward()
    both = refs[0] + refs[1]
    out = [abs(float(dist_clip.get_total_norm(target)) - reference_norm(refs[stage], 2.0)) <= 1e-6]
    for grp in (dist.group.WORLD, cross[rank % 2]):
        for p in (2.0, 1.0, math.inf):
            want = reference_norm(both, p)
            out.append(abs(float(dist_clip.get_total_norm(target, p, group=grp)) - want) <= 1e-6 * want)
        res = dist_clip.GradClipper(max_norm=1e9, mode="per_param", report=True)(target, group=grp)
        want = reference_norm(both, 2.0)
        out.append(abs(float(res.total_norm) - want) <= 1e-6 * want)
    saved = [q.grad.clone() for q in module.parameters()]
    # AGC: each unit's norms are its replica's (the copies were summed: a 1-D bias cut across the group too);
    # the same clipping as without group=, where each stage clips its own replicas
    agc = dist_clip.GradClipper(mode="unitwise", agc=dist_clip.AGC(0.01))
    res = agc(target, group=dist.group.WORLD)
    out.append(abs(float(res.total_norm) - want) <= 1e-6 * want)
    grouped = [q.grad.clone() for q in module.parameters()]
    for q, g in zip(module.parameters(), saved):
        q.grad.copy_(g)
    agc(target)
    out.append(all(torch.equal(q.grad, g) for q, g in zip(module.parameters(), grouped))
               and not all(torch.equal(q.grad, g) for q, g in zip(module.parameters(), saved)))
    for q, g in zip(module.parameters(), saved):
        q.grad.copy_(g)
    dist_clip.clip_grad_norm_(target, want / 4, group=dist.group.WORLD)
    out.append(all(torch.allclose(q.grad, g / 4, rtol=1e-5) for q, g in zip(module.parameters(), saved)))
    return out


@pytest.mark.parametrize("kind", ["replicate", "ddp_in_container"])
def test_replicas_count_once_under_a_group_spanning_stages(run_ranks, kind):
    assert run_ranks(4, body_replicas_under_a_group, kind) == [[True] * 12] * 4


def body_replicas_beside_fsdp2(kind: str) -> list:
    """The stages of body_replicas_under_a_group, each a container of an FSDP2 block on its pair and a DDP (or
    replicate()) block over the same pair: plain gradients beside DTensors were taken for FSDP2's unsharded
    copies, counted on the reduction's first rank only, so every mode lost the other stage's replicas (3.87 for
    8.66, AGC too). AGC with group= the stage's own shard group is the AGC without group= (it was refused,
    naming other stages)."""
    from torch.distributed._composable import replicate
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from tests.fsdp_cases import _local

    rank = dist.get_rank()
    stage = rank // 2
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    pair = mesh["dp"].get_group()

    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        # (no bias on the FSDP2 block: a sharded 1-D unit under a group= spanning stages is refused in AGC)
        return nn.ModuleDict({"blk": nn.Linear(6, 8, bias=False), "rep": nn.Linear(8, 4)})

    def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m["rep"](torch.tanh(m["blk"](x))).square().mean()

    per_stage = []
    for s in (0, 1):
        ref = net(10 + s).double()
        for r in (2 * s, 2 * s + 1):
            run(ref, torch.randn(5, 6, generator=torch.Generator().manual_seed(r)).double()).div(2).backward()
        per_stage.append([q.grad for q in ref.parameters()])
    refs = per_stage[0] + per_stage[1]
    model = net(10 + stage)
    fully_shard(model["blk"], mesh=mesh["dp"])
    if kind == "replicate":
        replicate(model["rep"], process_group=pair)
    else:
        model["rep"] = DistributedDataParallel(model["rep"], process_group=pair)
    run(model, torch.randn(5, 6, generator=torch.Generator().manual_seed(rank))).backward()
    world = dist.group.WORLD
    out = []
    for p in (2.0, 1.0, math.inf):
        want = reference_norm(refs, p)
        out.append(abs(float(dist_clip.get_total_norm(model, p, group=world)) - want) <= 1e-6 * want)
    want = reference_norm(refs, 2.0)
    res = dist_clip.GradClipper(max_norm=1e9, mode="per_param", report=True)(model, group=world)
    out.append(abs(float(res.total_norm) - want) <= 1e-6 * want)

    def local(q: torch.Tensor) -> torch.Tensor:
        return _local(q.grad)

    saved = [local(q).clone() for q in model.parameters()]
    agc = dist_clip.GradClipper(mode="unitwise", agc=dist_clip.AGC(0.01))
    for grp in (None, world, pair):
        for q, g in zip(model.parameters(), saved):
            local(q).copy_(g)
        res = agc(model, group=grp)
        own = want if grp is world else reference_norm(per_stage[stage], 2.0)  # (None, pair: the stage's own)
        out.append(abs(float(res.total_norm) - own) <= 1e-6 * own)
        clipped = [local(q).clone() for q in model.parameters()]
        if grp is None:
            alone = clipped
            out.append(not all(torch.equal(a, g) for a, g in zip(alone, saved)))
        else:
            out.append(all(torch.allclose(a, c, rtol=1e-6, atol=0) for a, c in zip(alone, clipped)))
    for q, g in zip(model.parameters(), saved):
        local(q).copy_(g)
    dist_clip.clip_grad_norm_(model, want / 4, group=world)
    out.append(all(torch.allclose(local(q), g / 4, rtol=1e-5) for q, g in zip(model.parameters(), saved)))
    # A stage's FSDP2 block with a bias (a 1-D unit cut between its shards), AGC with group= its own shard group
    torch.manual_seed(20 + stage)
    head = nn.Linear(4, 3)
    fully_shard(head, mesh=mesh["dp"])
    head(torch.randn(5, 4, generator=torch.Generator().manual_seed(rank))).square().mean().backward()
    kept = [local(q).clone() for q in head.parameters()]
    agc(head)
    alone = [local(q).clone() for q in head.parameters()]
    for q, g in zip(head.parameters(), kept):
        local(q).copy_(g)
    agc(head, group=pair)
    out.append(all(torch.equal(local(q), a) for q, a in zip(head.parameters(), alone))
               and not all(torch.equal(a, g) for a, g in zip(alone, kept)))
    return out


@pytest.mark.parametrize("kind", ["replicate", "ddp"])
def test_replicas_beside_fsdp2_count_once_under_a_group_spanning_stages(run_ranks, kind):
    assert run_ranks(4, body_replicas_beside_fsdp2, kind) == [[True] * 12] * 4


def body_ddp_experts_beside_fsdp2_on_the_world(hsdp: bool = False, frozen: bool = False) -> list:
    """Expert parallelism on a (dp=2, ep=2) mesh without ``group=``: the dense layer under FSDP2 over the
    flattened world, each ep rank's own expert under a DDP over its ``mesh["dp"]`` pair (copies along dp only,
    distinct along ep). The call reduces over the world (the FSDP2 pieces), and the plain DDP gradients beside
    them were taken for FSDP2's unsharded copies, counted on rank 0 only: the other ep rank's expert was lost
    (4.16 for 4.62 in a 4-expert model; here the pair below), silently, in every mode (AGC's total as well). Each
    DDP group's copy counts once, on its lowest rank. ``hsdp``: the dense layer under HSDP on the (ep, dp) mesh
    instead (replicated along ep, sharded along dp): FSDP2 reduces over both dims, so neither holds copies of
    the experts (taking the replicate dim for copies counted the ep=1 expert on no rank); the named modes
    (``report=True``, per-parameter) kept HSDP's shard group there, each ep line its own expert (0.3644 and
    0.4823 for 0.5838), and ``group=`` HSDP's shard group is the caller's word: each ep line's own dense layer and
    expert, not widened to the world. ``frozen``: the dense layer frozen, so the call plans no reduction at all
    (no DTensor gradient): each ep line read its own expert in every mode but AGC (0.3289 and 0.4561 for 0.5624
    beside HSDP, 0.3439 and 0.4437 for 0.5613 beside FSDP2 on the world)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from tests.fsdp_cases import _local

    rank = dist.get_rank()
    names = ("ep", "dp") if hsdp else ("dp", "ep")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=names)
    dp, ep = (mesh.get_coordinate()[names.index(n)] for n in ("dp", "ep"))
    rank_of = {(d, e): int(mesh.mesh[(e, d) if hsdp else (d, e)]) for d in (0, 1) for e in (0, 1)}

    def net(seed_expert: int) -> nn.Module:
        torch.manual_seed(0)
        dense = nn.Linear(6, 8).requires_grad_(not frozen)
        torch.manual_seed(10 + seed_expert)
        return nn.ModuleDict({"dense": dense, "expert": nn.Linear(8, 4)})

    def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m["expert"](torch.tanh(m["dense"](x))).square().mean()

    def batch(r: int) -> torch.Tensor:
        return torch.randn(5, 6, generator=torch.Generator().manual_seed(70 + r))

    # The reference: the dense layer averaged over all four ranks, expert e over the two dp ranks routed to it.
    dense_ref, experts_ref = [], []
    for e in (0, 1):
        ref = net(e).double()
        for d in (0, 1):
            run(ref, batch(rank_of[d, e]).double()).div(2).backward()
        experts_ref.append([q.grad for q in ref["expert"].parameters()])
        dense_ref.append([q.grad / 2 for q in ref["dense"].parameters() if q.grad is not None])
    dense = [a + b for a, b in zip(*dense_ref)]
    refs = dense + experts_ref[0] + experts_ref[1]
    model = net(ep)
    fully_shard(model["dense"], mesh=mesh if hsdp else mesh["dp", "ep"]._flatten("dp_ep_ddp_experts"))
    model["expert"] = DistributedDataParallel(model["expert"], process_group=mesh["dp"].get_group())
    run(model, batch(rank)).backward()
    held = [q for q in model.parameters() if q.requires_grad]
    saved = [_local(q.grad).clone() for q in held]
    out = []
    for p in (2.0, 1.0, 0.0, math.inf):
        want = reference_norm(refs, p)
        with count_collectives() as calls:
            got = float(dist_clip.get_total_norm(model, p))
        out.append((p, abs(got - want) <= 1e-6 * want, calls.names.count("gloo:all_reduce")))
    want = reference_norm(refs, 2.0)
    res = dist_clip.GradClipper(max_norm=want / 4)(model)
    out.append(abs(float(res.total_norm) - want) <= 1e-6 * want)
    out.append(all(torch.allclose(_local(q.grad), g / 4, rtol=1e-5) for q, g in zip(held, saved)))
    # The named modes: report=True's total and its clip, per_param's total
    for q, g in zip(held, saved):
        _local(q.grad).copy_(g)
    res = dist_clip.GradClipper(max_norm=want / 4, report=True)(model)
    out.append(abs(float(res.total_norm) - want) <= 1e-6 * want
               and all(torch.allclose(_local(q.grad), g / 4, rtol=1e-5) for q, g in zip(held, saved)))
    res = dist_clip.GradClipper(max_norm=1e9, mode="per_param", report=True)(model)
    out.append(abs(float(res.total_norm) - want / 4) <= 1e-6 * want)
    # AGC's total too (0.378 for 0.583 here), its clip the same as with group= the world
    clipped = []
    for grp in (None, dist.group.WORLD):
        for q, g in zip(held, saved):
            _local(q.grad).copy_(g)
        res = dist_clip.GradClipper(mode="unitwise", agc=dist_clip.AGC(0.01))(model, group=grp)
        out.append(abs(float(res.total_norm) - want) <= 1e-6 * want)
        clipped.append([_local(q.grad).clone() for q in held])
    out.append(all(torch.equal(a, b) for a, b in zip(*clipped)))
    if hsdp and not frozen:
        # group= HSDP's shard group: this ep line's dense layer and expert (the world gave 0.5838 on every rank)
        for q, g in zip(held, saved):
            _local(q.grad).copy_(g)
        for p in (2.0, 1.0, math.inf):
            want = reference_norm(dense + experts_ref[ep], p)
            got = float(dist_clip.get_total_norm(model, p, group=mesh["dp"].get_group()))
            out.append(abs(got - want) <= 1e-6 * want)
    return out


@pytest.mark.parametrize(("hsdp", "frozen"), [(False, False), (True, False), (False, True), (True, True)])
def test_ddp_experts_beside_fsdp2_count_each_dp_group_once_without_group(run_ranks, hsdp, frozen):
    want = [(2.0, True, 1), (1.0, True, 1), (0.0, True, 1), (math.inf, True, 1)] + [True] * 7
    want += [True] * 3 if hsdp and not frozen else []
    assert run_ranks(4, body_ddp_experts_beside_fsdp2_on_the_world, hsdp, frozen) == [want] * 4


def body_hsdp_stages_beside_ddp() -> list:
    """Where the world rule for DDP copies beside FSDP2 (:func:`body_ddp_experts_beside_fsdp2_on_the_world`) must
    not apply. Two pipeline stages on a (pp=2, rep=2, shard=1) mesh, each an HSDP block on its stage's (rep,
    shard) slice beside a DDP block over the stage's pair: FSDP2 reduces with the stage's ranks only, so without
    ``group=`` each stage measures its own blocks (planned over the world, every rank read both stages: 0.8476
    for 0.7870 and 0.3149), and ``group=WORLD`` sums the stages. And an HSDP model on a 2 x 2 mesh without any
    DDP: its replicas each reduce their own copy over the shard group (2 ranks), not over the world."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 2, 1), mesh_dim_names=("pp", "rep", "shard"))
    stage = mesh.get_coordinate()[0]

    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.ModuleDict({"blk": nn.Linear(6, 8), "rep": nn.Linear(8, 4)})

    def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m["rep"](torch.tanh(m["blk"](x))).square().mean()

    def batch(r: int) -> torch.Tensor:
        return torch.randn(5, 6, generator=torch.Generator().manual_seed(r))

    per_stage = []
    for s in (0, 1):
        ref = net(10 + s).double()
        for r in (2 * s, 2 * s + 1):
            run(ref, batch(r).double()).div(2).backward()
        per_stage.append([q.grad for q in ref.parameters()])
    model = net(10 + stage)
    fully_shard(model["blk"], mesh=mesh["rep", "shard"])
    model["rep"] = DistributedDataParallel(model["rep"], process_group=mesh["rep"].get_group())
    run(model, batch(rank)).backward()
    out = []
    for p in (2.0, 1.0, math.inf):
        own, both = reference_norm(per_stage[stage], p), reference_norm(per_stage[0] + per_stage[1], p)
        got = float(dist_clip.get_total_norm(model, p))
        res = dist_clip.GradClipper(max_norm=1e9, report=True)(model) if p == 2.0 else None
        out.append(abs(got - own) <= 1e-6 * own and (res is None or abs(float(res.total_norm) - own) <= 1e-6 * own))
        got = float(dist_clip.get_total_norm(model, p, group=dist.group.WORLD))
        out.append(abs(got - both) <= 1e-6 * both)
    # HSDP alone on a 2 x 2 mesh: one all-reduce, over its shard group
    square = init_device_mesh("cpu", (2, 2), mesh_dim_names=("rep", "shard"))
    torch.manual_seed(3)
    alone = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    ref = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    ref.load_state_dict(alone.state_dict())
    for r in range(4):
        ref(batch(r).double()).square().mean().div(4).backward()
    fully_shard(alone, mesh=square)
    alone(batch(rank)).square().mean().backward()
    sizes: list[int] = []
    all_reduce = dist.all_reduce

    def recorded(t: torch.Tensor, *args: object, group: object = None, **kwargs: object) -> object:
        sizes.append(dist.get_world_size(group))
        return all_reduce(t, *args, group=group, **kwargs)

    dist.all_reduce = recorded
    try:
        got = float(dist_clip.get_total_norm(alone))
    finally:
        dist.all_reduce = all_reduce
    want = reference_norm([q.grad for q in ref.parameters()], 2.0)
    out.append((abs(got - want) <= 1e-6 * want, sizes))
    return out


def test_hsdp_stages_beside_ddp_keep_their_own_reduction(run_ranks):
    assert run_ranks(4, body_hsdp_stages_beside_ddp) == [[True] * 6 + [(True, [2])]] * 4


def body_fsdp2_data_peers_look_at_each_mesh_once() -> list:
    """:func:`fsdp2_data_peers` (run twice per call on a module beside a DDP: the world test and the copy peers)
    walked every FSDP2 param group's parameters and indexed its mesh: an HSDP model of 50 ``fully_shard`` units
    (1,000 parameters) beside a DDP took 14.1-14.7 ms per ``get_total_norm`` call for 8.3-10.9 ms before
    3565a97 (4 gloo ranks, CPU time). One look per mesh and dims: the same peers, the mesh read once."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dist_clip.adapters import params as params_mod

    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(6)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    reads = [0]
    original = DeviceMesh.get_coordinate

    def counted(self: DeviceMesh) -> object:
        reads[0] += 1
        return original(self)

    DeviceMesh.get_coordinate = counted  # type: ignore[method-assign]
    try:
        every = params_mod.fsdp2_data_peers(model.parameters())
        first = reads[0]
        last = params_mod.fsdp2_data_peers(model[5].parameters())
    finally:
        DeviceMesh.get_coordinate = original  # type: ignore[method-assign]
    return [sorted(every), first, sorted(last), reads[0] - first]


def test_fsdp2_data_peers_look_at_each_mesh_once(run_ranks):
    assert run_ranks(2, body_fsdp2_data_peers_look_at_each_mesh_once) == [[[0, 1], 1, [0, 1], 1]] * 2


def body_ddp_layer_beside_fsdp2_over_tp() -> list:
    """FSDP2 over tensor parallelism on a (dp=2, tp=2) mesh without ``group=``: the dense layer column-parallel
    over ``mesh["tp"]`` and sharded over ``mesh["dp"]``, the layer after it (outside tensor parallelism) under a
    DDP over its ``mesh["dp"]`` pair. Both tp ranks read the same batch, so the two DDP groups hold copies of
    that layer; counted once per DDP group (as experts beside FSDP2 on the world, whose ep ranks read other
    batches), it read sqrt(2) times its norm: 0.4675 for 0.3513 at p = 2, 128 for 92 at p = 0, in every mode,
    and so under ``group=WORLD`` before that."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from torch.nn.parallel import DistributedDataParallel

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp, _ = mesh.get_coordinate()

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.ModuleDict({"dense": nn.Linear(6, 8), "norm": nn.Linear(8, 4)})

    def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m["norm"](torch.tanh(m["dense"](x))).square().mean()

    def batch(d: int) -> torch.Tensor:
        return torch.randn(5, 6, generator=torch.Generator().manual_seed(70 + d))

    ref = net().double()
    for d in (0, 1):  # the batch of each dp index, the same on its two tp ranks
        run(ref, batch(d).double()).div(2).backward()
    refs = [q.grad for q in ref.parameters()]
    model = net()
    parallelize_module(model["dense"], mesh["tp"], ColwiseParallel(output_layouts=Replicate()))
    fully_shard(model["dense"], mesh=mesh["dp"])
    model["norm"] = DistributedDataParallel(model["norm"], process_group=mesh["dp"].get_group())
    run(model, batch(dp)).backward()
    out = []
    for p in (2.0, 0.0, math.inf):
        want = reference_norm(refs, p)
        with count_collectives() as calls:
            got = float(dist_clip.get_total_norm(model, p))
        out.append((p, abs(got - want) <= 1e-6 * want, calls.names.count("gloo:all_reduce")))
    want = reference_norm(refs, 2.0)
    for grp in (None, dist.group.WORLD):  # under group= too (counted once per DDP group there before)
        for mode in ("total", "per_param", "unitwise"):
            kw = {"agc": dist_clip.AGC(1e9)} if mode == "unitwise" else {"max_norm": 1e9}
            res = dist_clip.GradClipper(mode=mode, **kw)(model, group=grp)
            out.append((mode, abs(float(res.total_norm) - want) <= 1e-6 * want))
    return out


def test_ddp_layer_beside_fsdp2_over_tp_counts_once(run_ranks):
    modes = [("total", True), ("per_param", True), ("unitwise", True)]
    want = [(2.0, True, 1), (0.0, True, 1), (math.inf, True, 1), *modes, *modes]
    assert run_ranks(4, body_ddp_layer_beside_fsdp2_over_tp) == [want] * 4


def test_ddp_groups_unitwise_with_a_wider_group(run_ranks):
    assert run_ranks(4, body_ddp_groups_unitwise) == [[(0, True, True)] * 2] * 4


def _agc_reference(model: nn.Module, batches: list[torch.Tensor], agc: dist_clip.AGC) -> tuple[float, dict, dict]:
    """The float64 single-process run of a copy of ``model`` fed every batch (losses averaged, as the data-parallel
    wrappers average gradients): its total norm, and its per-parameter norms before and after unit-wise AGC."""
    import copy

    from dist_clip.testing import reference_agc_, reference_param_norms

    ref = copy.deepcopy(model).double()
    torch.stack([ref(b.double()).square().sum() for b in batches]).mean().backward()
    params = dict(ref.named_parameters())
    grads = {n: q.grad for n, q in params.items()}
    total, before = reference_norm(list(grads.values())), reference_param_norms(grads)
    reference_agc_(params, grads, agc.clipping, agc.eps)
    return total, before, reference_param_norms(grads)


def _agree_by_name(got: dict, want: dict, rtol: float = 1e-5) -> bool:
    """Norms by name (names cleaned of wrapper prefixes) within ``rtol`` of the float64 reference's: fp32 gradients
    of a data-parallel model against the float64 model fed every batch."""
    from dist_clip._slots import clean_name

    got = {clean_name(n).removeprefix("module."): v for n, v in got.items()}
    return set(got) == set(want) and all(abs(got[n] - w) <= rtol * w for n, w in want.items())


def body_fsdp1_no_shard_unitwise_under_a_wider_group() -> list:
    """FSDP1 NO_SHARD keeps whole, identical gradients on every rank: unit-wise clipping with group= the world counts
    each copy once (the first rank of its process group within the group), as without group=. Counting every
    copy gave the total and every reported norm sqrt(2) too large on two ranks (6.02 for 4.26). The total, the
    norms before and after the clip are checked against the float64 model clipped by the reference AGC (comparing
    the two calls alone passed with AGC's limit doubled in both)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    batches = [torch.randn(5, 4, generator=torch.Generator().manual_seed(r)) for r in range(dist.get_world_size())]
    agc = dist_clip.AGC(0.05)
    ref_total, ref_before, ref_after = _agc_reference(net, batches, agc)
    model = FSDP(net, sharding_strategy=ShardingStrategy.NO_SHARD, device_id=torch.device("cpu"))
    model(batches[rank]).square().sum().backward()
    saved = [q.grad.clone() for q in model.parameters()]
    want = reference_norm(saved, 2.0)
    out = []
    clipped = []
    for group in (None, dist.group.WORLD):
        for q, g in zip(model.parameters(), saved):
            q.grad.copy_(g)
        with count_collectives() as calls:
            res = dist_clip.GradClipper(mode="unitwise", agc=agc, report=True)(model, group=group)
        out.append((group is None or calls.total == 1, abs(float(res.total_norm) - want) <= 1e-6 * want))
        out.append(sorted(round(v, 5) for v in res.norms.values()))
        after = dist_clip.GradClipper(max_norm=math.inf, mode="per_param", report=True)(model).norms
        out.append((abs(float(res.total_norm) - ref_total) <= 1e-5 * ref_total,
                    _agree_by_name(res.norms, ref_before), _agree_by_name(after, ref_after)))
        clipped.append([q.grad.clone() for q in model.parameters()])
    out.append(all(torch.equal(a, b) for a, b in zip(*clipped)))
    return out


def test_fsdp1_no_shard_unitwise_under_a_wider_group_counts_each_copy_once(run_ranks):
    results = run_ranks(2, body_fsdp1_no_shard_unitwise_under_a_wider_group)
    assert results[0] == results[1], results
    alone, _, alone_ref, wide, _, wide_ref, same = results[0]
    assert alone == wide == (True, True) and same, results[0]
    assert alone_ref == wide_ref == (True, True, True), results[0]
    assert results[0][1] == results[0][4], results[0]


def body_fsdp1_hybrid_unitwise_under_the_world() -> list:
    """FSDP1 HYBRID_SHARD on 2 x 2 ranks, unit-wise with group= the world: its shards times its replicas span the
    whole group, so it is no pipeline stage and measures (the first replica counts) as without group=, the same
    total and the same clipped pieces; taking it for a stage refused it with NotImplementedError. Both calls are
    checked against the float64 model clipped by the reference AGC too (comparing them alone passed with AGC's
    limit doubled in both)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    from tests import beyond_cases as cases

    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3))
    batches = [torch.randn(5, 4, generator=torch.Generator().manual_seed(r)) for r in range(dist.get_world_size())]
    agc = dist_clip.AGC(0.05)
    ref_total, ref_before, ref_after = _agc_reference(net, batches, agc)
    model = FSDP(net, device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.HYBRID_SHARD,
                 device_mesh=cases.mesh((2, 2), ("replicate", "shard")))
    model(batches[rank]).square().sum().backward()
    saved = [q.grad.clone() for q in model.parameters()]
    out = []
    clipped = []
    checks = []
    for group in (None, dist.group.WORLD):
        for q, g in zip(model.parameters(), saved):
            q.grad.copy_(g)
        res = dist_clip.GradClipper(mode="unitwise", agc=agc, report=True)(model, group=group)
        out.append(round(float(res.total_norm), 5))
        after = dist_clip.GradClipper(max_norm=math.inf, mode="per_param", report=True)(model, group=group).norms
        checks.append((abs(float(res.total_norm) - ref_total) <= 1e-5 * ref_total,
                       _agree_by_name(res.norms, ref_before), _agree_by_name(after, ref_after)))
        clipped.append([q.grad.clone() for q in model.parameters()])
    out.append(all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(*clipped)))
    out.append(not all(torch.equal(a, g) for a, g in zip(clipped[0], saved)))
    return [*out, *checks]


def test_fsdp1_hybrid_unitwise_under_the_world_is_no_pipeline_stage(run_ranks):
    results = run_ranks(4, body_fsdp1_hybrid_unitwise_under_the_world)
    assert all(r == results[0] for r in results), results
    assert results[0][0] == results[0][1] and results[0][2:4] == [True, True], results[0]
    assert results[0][4:] == [(True, True, True)] * 2, results[0]


def body_settings_disagree() -> list:
    """Ranks calling with different settings (norm_type 2 here and 1 there; max_norm; a GradClipper with another
    limit, adaptive threshold or its state's length, group limit, mode or order) each returned their own wrong
    total (7.60 and 57.76 for p = 2 and p = 1, as the README had it), or clipped one parameter's pieces by different
    coefficients, unnoticed: RuntimeError on every rank. Equal settings still measure."""
    from dist_clip import AGC, AutoClip, GradClipper

    rank = dist.get_rank()
    torch.manual_seed(rank)
    grads = [torch.randn(5), torch.randn(3, 2)]
    ps = [nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3, 2))]
    for q, g in zip(ps, grads):
        q.grad = g.clone()
    out = []
    # The same settings spelt differently are the same: AGC's 1 and 1.0, a list and a tuple of patterns.
    agc = AGC(clipping=1, exclude=["zz*"]) if rank else AGC(clipping=1.0, exclude=("zz*",))
    out.append(GradClipper(mode="unitwise", agc=agc)(ps, group=dist.group.WORLD).total_norm.item() > 0)
    calls = [
        lambda: dist_clip.get_total_norm(grads, 2.0 if rank == 0 else 1.0, group=dist.group.WORLD),
        lambda: dist_clip.clip_grad_norm_(grads, 1.0, 2.0, error_if_nonfinite=rank == 0, group=dist.group.WORLD),
        lambda: GradClipper(max_norm=1.0 + rank)(grads, group=dist.group.WORLD),
        lambda: GradClipper(norm_type=2.0 if rank else 3.0, mode="per_param")(grads, group=dist.group.WORLD),
        lambda: GradClipper(on_nonfinite="zero" if rank else "ignore")(grads, group=dist.group.WORLD),
        lambda: dist_clip.clip_grad_norm_(grads, 1.0 + rank, group=dist.group.WORLD),
        lambda: GradClipper(max_norm=AutoClip(percentile=10.0 + 80 * rank))(grads, group=dist.group.WORLD),
        lambda: GradClipper(mode="per_group")(ps, group=dist.group.WORLD, optimizer=torch.optim.SGD(
            [{"params": ps, "max_norm": 1.0 + rank}])),
        lambda: resumed_on_rank_0()(grads, group=dist.group.WORLD),
        # Limits of the same length and byte sum: the old fingerprint (crc32 and adler32, 10 bits each) read
        # these pairs as equal, and each rank clipped by its own coefficient (0.239 and 0.363).
        lambda: dist_clip.clip_grad_norm_(grads, 4.49 if rank else 2.96, group=dist.group.WORLD),
        lambda: GradClipper(max_norm=2.04 if rank else 1.41)(grads, group=dist.group.WORLD),
    ]

    def resumed_on_rank_0() -> GradClipper:
        # A checkpoint loaded on rank 0 only: each rank's threshold scaled the same gradient by its own factor.
        clipper = GradClipper(max_norm=AutoClip(percentile=25.0))
        if rank == 0:
            saved = GradClipper(max_norm=AutoClip(percentile=25.0))
            for k in range(5):
                saved([torch.full((3,), float(k + 1))])
            clipper.load_state_dict(saved.state_dict())
        return clipper

    for call in calls:
        out.append(outcome(call, RuntimeError, lambda m: "disagree on" in m and "settings (norm_type=" in m))
    everyone = [torch.cat([torch.randn(5, generator=torch.Generator().manual_seed(r)) for r in range(2)])]
    torch.manual_seed(rank)
    mine = [torch.randn(5)]
    total = dist_clip.get_total_norm(mine, 2.0, group=dist.group.WORLD).item()
    out.append(abs(total - reference_norm(everyone)) <= 1e-6 * total)
    return out


def test_ranks_calling_with_different_settings_raise_together(run_ranks):
    assert run_ranks(2, body_settings_disagree) == [[True] + [True] * 11 + [True]] * 2


def body_fused_optimizer_on_some_ranks() -> list:
    """A fused ``optimizer=`` on rank 0 only (or beside a plain one): a NaN total skipped rank 0's step and rank 1
    stepped its NaN-scaled gradients (its parameters all NaN, rank 0's unchanged), unnoticed. Whether a call
    skips is a setting now: RuntimeError on every rank. The same optimizer kind everywhere still skips."""
    rank = dist.get_rank()
    world = dist.group.WORLD
    out = []
    for other in ("none", "plain", "fused"):
        torch.manual_seed(rank)
        ps = [nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3, 2))]
        for q in ps:
            q.grad = torch.randn_like(q)
        ps[0].grad[1] = math.nan if rank == 1 else 1.0
        fused = torch.optim.SGD(ps, lr=0.1, fused=True)
        kind = "fused" if rank == 0 else other
        opt = fused if kind == "fused" else torch.optim.SGD(ps, lr=0.1) if kind == "plain" else None
        before = [q.detach().clone() for q in ps]

        def call(opt=opt, ps=ps, fused=fused) -> None:
            dist_clip.clip_grad_norm_(ps, 1.0, group=world, optimizer=opt)
            (opt or fused).step()

        out.append(outcome(call, RuntimeError, lambda m: "disagree on its settings" in m and "optimizer=" in m))
        out.append(all(torch.equal(b, q.detach()) for b, q in zip(before, ps)))  # stepped nothing
    return out


def test_a_fused_optimizer_on_some_ranks_only_raises_together(run_ranks):
    assert run_ranks(2, body_fused_optimizer_on_some_ranks) == [[True, True, True, True, "measured", True]] * 2


@pytest.mark.parametrize("world", [2, 4, 1024])
def test_settings_fingerprints_of_the_same_bytes_in_another_order_differ(world):
    """adler32's low 10 bits are the settings' byte sum alone, so limits of the same length and byte sum (1.41 and
    2.04) were told apart by one 10-bit crc: 1 such pair in ~1000 read equal. Every limit 1.00-9.99 now has its
    own fingerprint (the digests are as wide as the group's size allows: 25, 24 and 16 bits here)."""
    from dist_clip import _slots

    for p in (2.0, math.inf):
        seen: dict[tuple, str] = {}
        for k in range(100, 1000):
            settings = f"norm_type={p!r}, error_if_nonfinite=False, max_norm={k / 100!r}"
            key = tuple(_slots._settings_values(settings, p, world).tolist())
            assert key not in seen, (world, p, seen.get(key), settings)
            seen[key] = settings


def body_many_tensors_one_collective() -> int:
    rank = dist.get_rank()
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    tensors = [torch.randn(i + 1, dtype=dt) for i in range(300) for dt in dtypes]
    if rank == 1:
        tensors = []  # a rank with nothing still takes part
    counts = []
    for p in ORDERS:
        with count_collectives() as calls:
            dist_clip.clip_grad_norm_(tensors, 1.0, p, group=dist.group.WORLD)
        counts.append(calls.total)
    assert counts == [1] * len(ORDERS), counts
    return rank


def test_one_collective_whatever_the_number_of_tensors_and_dtypes(run_ranks):
    assert run_ranks(3, body_many_tensors_one_collective) == [0, 1, 2]


def body_subgroups() -> float:
    rank = dist.get_rank()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    full = _full_grads(3 + rank // 2, torch.float32)
    share = full[rank % 2 :: 2]
    with count_collectives() as calls:
        total = dist_clip.get_total_norm(share, 2.0, group=mine)
    assert calls.total == 1
    want = reference_norm(full, 2.0)
    assert abs(total.item() - want) <= 1e-6 * want
    return total.item()


def test_group_override_reduces_over_that_group_only(run_ranks):
    a, b, c, d = run_ranks(4, body_subgroups)
    assert a == b and c == d and a != c


def body_groups_of_the_same_ranks_listed_in_another_order() -> list:
    """Shards of two distinct group objects over the same ranks, listed in one order on rank 0 and the other on
    rank 1, reduce over one of them, the same on every rank (the first by name): over the first listed, each rank
    entered the all-reduce of another communicator and waited for the other until the timeout."""
    with _custom_adapter_listed():
        from dist_clip import Shards

        from .custom_adapter import HandSharded

        rank = dist.get_rank()
        g1, g2 = dist.new_group([0, 1]), dist.new_group([0, 1])
        full = {"a": torch.arange(1.0, 7.0), "b": torch.arange(-4.0, 0.0)}
        a, b = full["a"][rank * 3:(rank + 1) * 3].clone(), full["b"][rank * 2:(rank + 1) * 2].clone()
        shards = [Shards([a], g1), Shards([b], g2)]
        target = HandSharded(shards if rank == 0 else shards[::-1])
        got = dist_clip.get_total_norm(target, 2.0, group=None)
        return [got.item() == pytest.approx(reference_norm(list(full.values()), 2.0), rel=1e-6)]


def test_groups_of_the_same_ranks_listed_in_another_order_on_each_rank_reduce_over_one(run_ranks):
    assert run_ranks(2, body_groups_of_the_same_ranks_listed_in_another_order) == [[True], [True]]


def body_replicated_shards_beside_sharded_ones_per_param() -> list:
    """Shards(group=None) (whole and alike on every rank) beside Shards over the world: the call reduces over the
    world and the replicated pieces are counted once, by its rank 0, in every mode; counted on every rank, the
    per-parameter norm of "r" read sqrt(2) times its own (the total, measured apart, stayed right)."""
    with _custom_adapter_listed():
        from dist_clip import GradClipper, Shards

        from .custom_adapter import HandSharded

        rank = dist.get_rank()
        full = {"a": torch.arange(1.0, 7.0), "r": torch.tensor([3.0, -4.0])}
        shards = [Shards([full["a"][rank * 3:(rank + 1) * 3].clone()], dist.group.WORLD, names=["a"]),
                  Shards([full["r"].clone()], None, names=["r"])]
        result = GradClipper(max_norm=1e9, mode="per_param", report=True)(HandSharded(shards))
        return [result.norms["r"] == pytest.approx(5.0, rel=1e-6),
                result.norms["a"] == pytest.approx(reference_norm([full["a"]], 2.0), rel=1e-6),
                result.total_norm.item() == pytest.approx(reference_norm(list(full.values()), 2.0), rel=1e-6)]


def test_replicated_shards_beside_sharded_ones_count_once_per_parameter(run_ranks):
    assert run_ranks(2, body_replicated_shards_beside_sharded_ones_per_param) == [[True] * 3] * 2


def body_outsider_and_empty_unitwise() -> list[str]:
    """A rank outside group= gets a ValueError saying so (torch hands it an int sentinel, which read "got int");
    a rank with nothing to clip unit-wise while the others hold tensors raises on every rank at once (it raised
    alone and left the others in the collective until the timeout)."""
    rank = dist.get_rank()
    pair = dist.new_group([0, 1])
    out = []
    if rank == 2:
        try:
            dist_clip.get_total_norm([torch.ones(2)], group=pair)
        except ValueError as e:
            out.append(str(e).split(" (")[0])
    else:
        out.append(f"{dist_clip.get_total_norm([torch.ones(2)], group=pair).item():.4f}")
    ps = [nn.Parameter(torch.ones(2, 2))] if rank == 0 else []
    for q in ps:
        q.grad = torch.ones(2, 2)
    try:
        dist_clip.GradClipper(mode="unitwise")(ps, group=dist.group.WORLD)
    except RuntimeError as e:
        out.append(str(e).split(" (")[0])
    return out


def test_outsider_of_group_and_empty_unitwise_rank(run_ranks):
    a, b, c = run_ranks(3, body_outsider_and_empty_unitwise, timeout_s=60)
    assert a == b and a[0] == "2.0000", (a, b)
    assert c[0] == "group= is a group this rank", c
    assert a[1] == b[1] == c[1] == "the ranks of this call disagree on the target's parameter names", (a, b, c)


def body_outsider_of_an_adapters_group() -> list:
    """A custom adapter's Shards on a ``dist.new_group([0, 1])`` hold torch's int sentinel on rank 2, outside it:
    that rank's all-reduce returned at once and it took its own pieces' total for the norm (5.20 there, 3.87 on
    ranks 0 and 1), silently; with report=True it failed inside torch ("Invalid process group specified"). Now a
    ValueError saying so, on that rank alone (the group's ranks never wait for it)."""
    from dist_clip import Shards

    from .custom_adapter import HandSharded

    rank = dist.get_rank()
    pair = dist.new_group([0, 1])
    out: list = []
    with _custom_adapter_listed():
        for call in (lambda t: dist_clip.get_total_norm(t), lambda t: dist_clip.GradClipper(report=True)(t).total_norm):
            target = HandSharded([Shards([torch.full((3,), float(rank + 1))], group=pair, names=["w"])])
            try:
                out.append(f"{call(target).item():.4f}")
            except ValueError as e:
                out.append(str(e).split(" (")[0])
        # Pieces on the pair beside pieces on the world: the call reduces over the world, where each piece counts
        # once (over the pair alone, ranks 0 and 1 read 3.1623 and rank 2 waited)
        target = HandSharded(([Shards([torch.full((2,), float(rank + 1))], group=pair)] if rank < 2 else [])
                             + [Shards([torch.ones(3)], group=dist.group.WORLD, counted=rank == 2)])
        out.append(f"{dist_clip.get_total_norm(target).item():.4f}")
    return out


def test_a_rank_outside_an_adapters_group_is_told_so(run_ranks):
    a, b, c = run_ranks(3, body_outsider_of_an_adapters_group, timeout_s=60)
    assert a == b == [f"{math.sqrt(15):.4f}"] * 2 + [f"{math.sqrt(13):.4f}"], (a, b)
    assert c == ["a Shards' group is a process group this rank"] * 2 + [f"{math.sqrt(13):.4f}"], c


def body_silent_peer() -> str:
    if dist.get_rank() == 1:
        return "skipped the call"
    try:
        dist_clip.get_total_norm([torch.ones(3)], group=dist.group.WORLD)
    except RuntimeError as e:  # gloo's timeout surfaces as a RuntimeError subclass, not a hang
        return f"RuntimeError: {type(e).__name__}"
    return "returned"


def _run_on_ranks_left_timed_out(pools, body, pg_timeout_s: float, timeout_s: float) -> list:  # noqa: ANN001
    """``body`` on 2 ranks of a process group timing out after ``pg_timeout_s``, which it leaves timed out."""
    pool = pools.get(2, pg_timeout_s=pg_timeout_s)
    try:
        return pool.run(body, timeout_s=timeout_s)
    finally:
        pool.broken = True  # the timed-out group is unusable afterwards: never reuse these ranks


def test_a_peer_that_does_not_answer_gives_a_runtime_error(pools):
    values = _run_on_ranks_left_timed_out(pools, body_silent_peer, 3.0, 60)
    assert values[0].startswith("RuntimeError"), values


def test_a_pool_that_fails_to_start_ends_its_ranks(monkeypatch):
    """A pool whose start-up fails raises, and its ranks are gone: no PoolCache holds it to close them later (left
    running, every next test on busy cores spawned another pool beside them, whose start-up timed out too). Rank 1
    is killed as it starts; rank 0 would wait for it in the rendezvous (SIGUSR1, the harness's stack dump, blocked
    in the ranks, so that it cannot end rank 0 before it registered its handler)."""
    import multiprocessing
    import signal

    from tests._harness import RankFailure, RankPool

    collect = RankPool._collect

    def rank_1_dies(self, timeout_s: float, what: str) -> list:  # noqa: ANN001
        self._procs[1].kill()
        self._procs[1].join()
        return collect(self, timeout_s, what)

    monkeypatch.setattr(RankPool, "_collect", rank_1_dies)
    before = {p.pid for p in multiprocessing.active_children()}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # (the spawned ranks inherit the mask)
    try:
        with pytest.raises(RankFailure, match=r"start-up: .*\(dead: \[1\]\)"):
            RankPool(2)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    assert [p.pid for p in multiprocessing.active_children() if p.pid not in before] == []


def body_meta_grad_and_a_silent_peer() -> list:
    """A rank that cannot measure its pieces (a meta gradient) joins the collective to say so; where no peer
    answers it (gone, or silent until the timeout) it raises its own error, the collective's failure as its
    context, as a refusal before measuring does: gloo's error stood in for it ("Timed out", "Connection closed
    by peer"), and this rank's reason was lost."""
    if dist.get_rank() == 1:
        return ["skipped the calls"]
    from dist_clip import GradClipper

    pieces = [torch.empty(3, device="meta"), torch.ones(3)]
    out = []
    for call in (lambda: dist_clip.get_total_norm(pieces, group=dist.group.WORLD),
                 lambda: dist_clip.clip_grad_norm_(pieces, 1.0, group=dist.group.WORLD),
                 lambda: GradClipper(max_norm=1.0, mode="per_param")(pieces, group=dist.group.WORLD)):
        try:
            call()
            out.append("returned")
        except Exception as e:  # noqa: BLE001
            out.append((type(e).__name__, isinstance(e.__context__, RuntimeError)))
    return out


def test_a_rank_that_cannot_measure_raises_its_own_error_when_no_peer_answers(pools):
    values = _run_on_ranks_left_timed_out(pools, body_meta_grad_and_a_silent_peer, 2.0, 90)
    assert values[0] == [("NotImplementedError", True)] * 3, values


def body_fsdp1_parameters_are_refused() -> str:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for use_orig_params in (False, True):
        torch.manual_seed(0)
        model = FSDP(nn.Linear(7, 13), device_id=torch.device("cpu"), use_orig_params=use_orig_params)
        model(torch.randn(3, 7)).sum().backward()
        with pytest.raises(ValueError, match="pass the\\s+FullyShardedDataParallel module"):
            dist_clip.get_total_norm(model.parameters())
        assert dist_clip.get_total_norm(model).item() > 0  # the module itself is fine
    return "refused"


def test_fsdp1_flat_parameters_are_not_taken_for_replicated_tensors(run_ranks):
    assert run_ranks(2, body_fsdp1_parameters_are_refused) == ["refused", "refused"]


# ------------------------------------------------------------------------------------------------------------
# Bad input on one rank, caught, and the loop goes on: the refusing rank joins the call's one collective with a
# NaN fingerprint, so that the others raise RuntimeError in the same call and the next call is aligned (its next
# call paired with the others' current one before: 6.547664 returned where the reference was 4.857076).

_REFUSED = "another rank of this call refused its input"


def _is_refused(e: RuntimeError) -> bool:
    """A peer's refusal: its own type (callers tell it from other runtime errors by type) and message."""
    from dist_clip import _slots

    return isinstance(e, _slots.RefusedElsewhere) and _REFUSED in str(e)


def _named_pieces(full: list, rank: int, world: int, params: bool = False) -> dict:
    """Every rank's own part of every tensor of ``full`` under the same names (some parts empty)."""
    out = {}
    for i, t in enumerate(full):
        piece = t.tensor_split(world)[rank].clone()
        if params:
            q = nn.Parameter(torch.zeros_like(piece))
            q.grad = piece
            piece = q
        out[f"g{i}"] = piece
    return out


def _refusal_call(case: str, full: list, bad: bool, p: float):
    """One call of ``case`` on this rank's share of ``full`` (bad input where ``bad``); returns the total."""
    from dist_clip import GradClipper

    rank, world = dist.get_rank(), dist.get_world_size()
    world_group = dist.group.WORLD
    mine = _my_share(full, rank, world)
    wrong = [torch.ones(3, dtype=torch.int64)] + mine  # an integer gradient: refused on this rank only
    if case == "clip_max_norm":
        return lambda: dist_clip.clip_grad_norm_(mine, -1.0 if bad else 1e9, p, group=world_group).item()
    if case == "clip_int_grad":
        return lambda: dist_clip.clip_grad_norm_(wrong if bad else mine, 1e9, p, group=world_group).item()
    if case == "total_int_grad":
        return lambda: dist_clip.get_total_norm(wrong if bad else mine, p, group=world_group).item()
    # A gradient this rank cannot measure for another reason than bad input (a meta tensor: torch's
    # NotImplementedError): it raised alone, the others waited in the collective, and a rank
    # that caught it paired its next call with their current one (5.683058 on both for 5.399326 and 6.132488).
    meta = [torch.empty(3, device="meta")] + mine
    if case == "total_meta_grad":
        return lambda: dist_clip.get_total_norm(meta if bad else mine, p, group=world_group).item()
    if case == "clip_meta_grad":
        return lambda: dist_clip.clip_grad_norm_(meta if bad else mine, 1e9, p, group=world_group).item()
    if case == "clipper_per_param_meta":
        named = _named_pieces(full, rank, world)
        if bad:
            named["g1"] = torch.empty(2, device="meta")
        clipper = GradClipper(max_norm=1e9, norm_type=p, mode="per_param")
        return lambda: clipper(named, group=world_group).total_norm.item()
    if case == "total_foreach":  # refused before measuring (the int gradient above fails while measuring)
        return lambda: dist_clip.get_total_norm(mine, p, foreach="yes" if bad else None, group=world_group).item()
    if case == "clipper_total_skip":  # on_nonfinite="skip" without optimizer=: refused before measuring
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        clipper = GradClipper(max_norm=1e9, norm_type=p, on_nonfinite="skip")
        return lambda: clipper(mine, group=world_group, optimizer=None if bad else opt).total_norm.item()
    if case == "clipper_per_param_int":  # refused while measuring, slots from the mapping's names
        named = _named_pieces(full, rank, world)
        if bad:
            named["g1"] = torch.ones(2, dtype=torch.int64)
        clipper = GradClipper(max_norm=1e9, norm_type=p, mode="per_param")
        return lambda: clipper(named, group=world_group).total_norm.item()
    if case == "clipper_report_str":  # report="no" was checked before the refusal could join
        clipper = GradClipper(max_norm=1e9, norm_type=p)
        return lambda: clipper(mine, group=world_group, report="no" if bad else None).total_norm.item()
    if case == "clipper_per_group_limit":  # a param group's max_norm refused before measuring
        named = _named_pieces(full, rank, world, params=True)
        opt = torch.optim.SGD([{"params": list(named.values()), "max_norm": -1.0 if bad else 1e9}], lr=0.1)
        clipper = GradClipper(norm_type=p, mode="per_group")
        return lambda: clipper(named, group=world_group, optimizer=opt).total_norm.item()
    # Unit-wise clipping refused alone (its units' layout was taken for unknown before measuring): the others
    # waited in the collective until the process group's timeout.
    if case == "clipper_unitwise_optimizer":  # refused before measuring
        named = list(_named_pieces(full, rank, world, params=True).values())
        clipper = GradClipper(mode="unitwise", norm_type=p)
        return lambda: clipper(named, group=world_group, optimizer="sgd" if bad else None).total_norm.item()
    if case == "clipper_unitwise_shape":  # a weight's data replaced by another shape: refused by the same checks
        named = list(_named_pieces(full, rank, world, params=True).values())
        if bad:
            with torch.no_grad():
                named[1].data = named[1].data.new_ones(named[1].numel() + 1)
        clipper = GradClipper(mode="unitwise", norm_type=p)
        return lambda: clipper(named, group=world_group).total_norm.item()
    if case == "clipper_unitwise_meta":  # torch's error reading the units' partials, before measuring: alone
        named = list(_named_pieces(full, rank, world, params=True).values())
        if bad:
            named[1] = nn.Parameter(torch.empty(named[1].shape, device="meta"))
            named[1].grad = torch.empty(named[1].shape, device="meta")
        clipper = GradClipper(mode="unitwise", norm_type=p)
        return lambda: clipper(named, group=world_group).total_norm.item()
    if case == "clipper_unitwise_stride0":  # refused by unit-wise clipping's own checks, before measuring
        named = list(_named_pieces(full, rank, world, params=True).values())
        if bad:
            named[1].grad = named[1].grad[:1].expand(named[1].numel())
        clipper = GradClipper(mode="unitwise", norm_type=p)
        return lambda: clipper(named, group=world_group).total_norm.item()
    raise AssertionError(case)


def _attempt(call) -> tuple:
    """(what happened, collectives issued): the total, "refused" (a peer's refusal), or this rank's own error."""
    got: object = None
    with count_collectives() as calls:
        try:
            got = call()
        except NotImplementedError as e:  # (a RuntimeError: this rank's own, not a peer's refusal)
            got = type(e).__name__
        except RuntimeError as e:
            got = "refused" if _is_refused(e) else f"RuntimeError: {e}"
        except (ValueError, TypeError) as e:
            got = type(e).__name__
    return got, calls.total


def body_refuse_then_continue(case: str, bad_rank: int, p: float, all_refuse: bool = False) -> list:
    """Step 0: ``bad_rank`` passes bad input and catches its error; (``all_refuse``: step 1, every rank passes
    bad input); then a good call, which must return the float64 reference on every rank. A rank whose refused
    call measured a total instead stops there: its peers' calls are misaligned (going on would wait for the
    timeout)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    steps = [rank == bad_rank] + ([True] if all_refuse else []) + [False]
    out = []
    for step, bad in enumerate(steps):
        full = _full_grads(300 + step, torch.float32, sizes=(1, 7, 91, 500, 0, 2, 30))
        held = [x for r in range(world) for x in _my_share(full, r, world)]
        got, collectives = _attempt(_refusal_call(case, full, bad, p))
        if isinstance(got, float):
            want = reference_norm(held, p)
            out.append((abs(got - want) <= 1e-6 * want, collectives))
            if step < len(steps) - 1:
                break
        else:
            out.append((got, collectives))
    return out


def _refusal_expected(case: str, world: int, bad_rank: int, all_refuse: bool = False) -> list:
    own = ("TypeError" if case in ("clip_int_grad", "total_int_grad", "total_foreach", "clipper_per_param_int",
                                   "clipper_report_str", "clipper_unitwise_optimizer")
           else "NotImplementedError" if case.endswith("_meta_grad") or case.endswith("_meta")
           else "ValueError")
    return [
        [(own if r == bad_rank else "refused", 1)] + ([(own, 1)] if all_refuse else []) + [(True, 1)]
        for r in range(world)
    ]


@pytest.mark.parametrize(
    "case,p",
    [
        ("clip_max_norm", 2.0),
        ("clip_max_norm", math.inf),
        ("clip_int_grad", 2.0),
        ("total_int_grad", math.inf),
        ("total_foreach", 2.0),
        ("clipper_total_skip", 2.0),
        ("clipper_per_param_int", 2.0),
        ("clipper_per_param_int", math.inf),
        ("clipper_per_group_limit", 2.0),
        ("clipper_per_group_limit", math.inf),
        ("clipper_report_str", 2.0),
        ("total_meta_grad", 2.0),
        ("clip_meta_grad", math.inf),
        ("clipper_per_param_meta", 2.0),
        ("clipper_unitwise_optimizer", 2.0),
        ("clipper_unitwise_optimizer", math.inf),
        ("clipper_unitwise_stride0", 2.0),
        ("clipper_unitwise_shape", 2.0),
        ("clipper_unitwise_meta", 2.0),
        ("clipper_unitwise_meta", math.inf),
    ],
)
def test_bad_input_on_one_rank_raises_on_every_rank_and_the_next_call_is_aligned(run_ranks, case, p):
    assert run_ranks(2, body_refuse_then_continue, case, 1, p) == _refusal_expected(case, 2, 1)


@pytest.mark.parametrize("case,bad_rank,p", [("total_int_grad", 2, 2.0), ("clip_max_norm", 1, math.inf),
                                             ("total_meta_grad", 2, 2.0)])
def test_bad_input_on_one_of_three_ranks(run_ranks, case, bad_rank, p):
    # Rank 2 holds no gradient of its own at 3 ranks: its only piece is the integer (or meta) one.
    assert run_ranks(3, body_refuse_then_continue, case, bad_rank, p) == _refusal_expected(case, 3, bad_rank)


def test_every_rank_refusing_joins_once_and_raises_its_own_error(run_ranks):
    # One rank refuses, then every rank refuses the same bad max_norm (each joins once, each raises its own
    # ValueError), then a good call: aligned.
    expected = _refusal_expected("clip_max_norm", 2, 0, all_refuse=True)
    assert run_ranks(2, body_refuse_then_continue, "clip_max_norm", 0, 2.0, True) == expected


def body_max_norm_tensor_or_float() -> list:
    """``max_norm=torch.tensor(1.0)`` on one rank and ``1.0`` on another are the same limit (a CPU tensor's value
    is read for free): measured and clipped alike, not "ranks disagree on settings"; another value still is."""
    rank, world = dist.get_rank(), dist.get_world_size()
    full = _full_grads(41, torch.float32)
    want = reference_norm([x for r in range(world) for x in _my_share(full, r, world)])
    out = []
    for limit in (torch.tensor(1.0), torch.tensor(1), torch.tensor(0.5, dtype=torch.float64)):
        mine = _my_share([t.clone() for t in full], rank, world)
        before = [t.clone() for t in mine]
        given = limit if rank == 0 else float(limit)
        total = dist_clip.clip_grad_norm_(mine, given, group=dist.group.WORLD).item()
        coef = float(limit) / (want + 1e-6)
        scaled = all(torch.allclose(t.double(), b.double() * coef, rtol=1e-6, atol=1e-30) for t, b in zip(mine, before))
        out.append(abs(total - want) <= 1e-6 * want and scaled)
    mine = _my_share([t.clone() for t in full], rank, world)
    out.append(outcome(lambda: dist_clip.clip_grad_norm_(mine, torch.tensor(1.0) if rank == 0 else 2.0,
                                                         group=dist.group.WORLD),
                       RuntimeError, lambda m: "disagree on" in m and "max_norm=" in m))
    return out


def test_max_norm_as_a_cpu_tensor_on_one_rank_and_a_float_on_another(run_ranks):
    assert run_ranks(2, body_max_norm_tensor_or_float) == [[True] * 4] * 2


def body_refused_call_counts_once_for_the_threshold(accelerator: bool) -> list:
    """An AutoClip clipper: rank 1 refuses step 0 (an integer gradient, found while measuring, or a missing
    optimizer=, found before), then good steps. The threshold's call count rides in the settings fingerprint;
    elsewhere than on the CPU (simulated: the layout check's NaN branch instead of its raise) the other ranks
    took the refused call's NaN norm and counted it while the refusing rank did not, so every later call's norms
    were NaN. Each call counts once on every rank now."""
    from dist_clip import AutoClip, GradClipper, _slots

    rank, world = dist.get_rank(), dist.get_world_size()
    original = _slots._layout_check

    def nan_instead_of_raise(combined, p, world_size, n_slots, settings="", named=True):  # noqa: ANN001, ANN202
        v = combined[-4:]
        same = ((v[0::2] == -v[1::2]) if math.isinf(p) else (v[0::2] ** 2 == world_size * v[1::2])).all()
        body = combined[:-4]
        return torch.where(same, body, torch.full_like(body, math.nan))

    out = []
    if accelerator:
        _slots._layout_check = nan_instead_of_raise
    try:
        for how in ("int gradient", "no optimizer"):
            clipper = GradClipper(max_norm=AutoClip(percentile=50), on_nonfinite="skip")
            opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
            got = []
            for step in range(3):
                full = _full_grads(500 + step, torch.float32)
                mine = _my_share(full, rank, world)
                want = reference_norm([x for r in range(world) for x in _my_share(full, r, world)])
                bad = step == 0 and rank == 1
                if bad and how == "int gradient":
                    mine = [torch.ones(2, dtype=torch.int64)] + mine
                try:
                    total = clipper(mine, group=dist.group.WORLD,
                                    optimizer=None if bad and how == "no optimizer" else opt).total_norm.item()
                    got.append("nan" if math.isnan(total) else abs(total - want) <= 1e-6 * want)
                except RuntimeError as e:
                    got.append("refused" if _is_refused(e) else str(e))
                except (ValueError, TypeError) as e:
                    got.append(type(e).__name__)
            out.append((got, clipper._threshold.count))
    finally:
        _slots._layout_check = original
    return out


@pytest.mark.parametrize("accelerator", [False, True])
def test_a_refused_call_counts_once_for_the_adaptive_threshold_on_every_rank(run_ranks, accelerator):
    first = "nan" if accelerator else "refused"
    a, b = run_ranks(2, body_refused_call_counts_once_for_the_threshold, accelerator)
    assert a == [([first, True, True], 3), ([first, True, True], 3)], a
    assert b == [(["TypeError", True, True], 3), (["ValueError", True, True], 3)], b


def body_composed_unsynced() -> list:
    """Unsynced parts of composed wrappers that were measured as replicas, silently: a DDP (parameters ignored by
    fully_shard) or a replicate()d module under an FSDP2 root, inside its own no_sync (0.85 on both ranks, rank 0's
    own gradients); a DDP beside FSDP1 modules in a plain container or in FSDP1's ignored_states; a NO_SHARD FSDP1
    child of a plain container inside its own no_sync (0.35 and 0.74). Refused now; and a DTensor parameter
    beside FSDP1 modules, where gloo aborted the process, is a ValueError. After a synced backward, exact."""
    from torch.distributed._composable.replicate import replicate
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy, fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dist_clip import GradClipper

    rank, world = dist.get_rank(), dist.get_world_size()
    xs = torch.randn(world, 4, 6, generator=torch.Generator().manual_seed(3))
    CPU = torch.device("cpu")  # noqa: N806

    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

    ref = build().double()
    sum(ref(x.double()).pow(2).mean() for x in xs).div(world).backward()
    want = reference_norm([p.grad for p in ref.parameters()])

    def fsdp2_ddp(m):
        fully_shard(m[0])
        m[2] = DDP(m[2])
        fully_shard(m, ignored_params=set(m[2].parameters()))
        return m, m[2].no_sync

    def fsdp2_replicate(m):
        fully_shard(m[0])
        replicate(m[2])
        fully_shard(m)
        return m, lambda: _sync_off(m[2])

    def plain_fsdp1_ddp(m):
        m[0], m[2], m[4] = FSDP(m[0], device_id=CPU), DDP(m[2]), FSDP(m[4], device_id=CPU)
        return m, m[2].no_sync

    def fsdp1_ignored_ddp(m):
        m[2] = DDP(m[2])
        return FSDP(m, ignored_states=[m[2]], device_id=CPU), m[2].no_sync

    def plain_noshard(m):
        m[0] = FSDP(m[0], sharding_strategy=ShardingStrategy.NO_SHARD, device_id=CPU)
        for layer in (m[2], m[4]):  # plain layers: averaged by hand after each synced backward
            for p in layer.parameters():
                p.register_post_accumulate_grad_hook(_average_when_synced)
        return m, m[0].no_sync

    out: list = []
    for wrap in (fsdp2_ddp, fsdp2_replicate, plain_fsdp1_ddp, fsdp1_ignored_ddp, plain_noshard):
        model, unsynced = wrap(build())
        _SYNC[0] = False
        with unsynced():
            model(xs[rank]).pow(2).mean().backward()
            for call in (lambda: dist_clip.get_total_norm(model), lambda: GradClipper(mode="per_param")(model)):  # noqa: B023
                try:
                    call()
                    out.append(f"{wrap.__name__}: measured")
                except ValueError as e:
                    out.append("refused" if "not reduced yet" in str(e) or "no_sync()" in str(e) else str(e))
        for p in model.parameters():
            p.grad = None
        _SYNC[0] = True
        model(xs[rank]).pow(2).mean().backward()
        out.append(abs(dist_clip.get_total_norm(model).item() - want) <= 1e-5 * want)
    mixed = build()
    mixed[0] = FSDP(mixed[0], device_id=CPU)
    fully_shard(mixed[2])
    mixed(xs[rank]).pow(2).mean().backward()
    try:
        dist_clip.get_total_norm(mixed)
        out.append("measured")
    except ValueError as e:
        out.append("DTensor parameter" in str(e))
    return out


_SYNC = [True]


def _average_when_synced(p: torch.Tensor) -> None:
    if _SYNC[0]:
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


@contextlib.contextmanager
def _sync_off(module: nn.Module):  # noqa: ANN201
    module.set_requires_gradient_sync(False)
    yield
    module.set_requires_gradient_sync(True)


def test_unsynced_parts_of_composed_wrappers_are_refused(run_ranks):
    got = run_ranks(2, body_composed_unsynced)
    assert got[0] == got[1] == (["refused", "refused", True] * 5 + [True]), got
