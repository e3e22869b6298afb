"""GPU tier: CUDA accuracy, zero host syncs on the default path, one NCCL collective per call.

Skipped without CUDA (``tests/conftest.py`` skips every ``gpu``-marked test). On a GPU machine:
``.venv/bin/python -m pytest tests/test_gpu.py``. The NCCL check spawns ``min(2, device_count)`` ranks, one
GPU each (NCCL refuses two ranks on one device): with one GPU it checks the one-rank case (no collective).
"""

from __future__ import annotations

import math
import os
import tempfile
from datetime import timedelta

import pytest
import torch

import dist_clip
from dist_clip.testing import count_collectives, reference_norm

pytestmark = pytest.mark.gpu

ORDERS = [0.0, 1.0, 2.0, 3.0, 3.5, math.inf]
RTOL = {torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def _grads(dtype: torch.dtype, device: str = "cuda", seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = (1, 1000, 4097, 1 << 20, 3 * (1 << 20) + 5)
    scales = [10.0 ** (i % 3 - 1) for i in range(len(sizes))]
    return [(torch.randn(n, generator=g) * s).to(device=device, dtype=dtype) for n, s in zip(sizes, scales)]


def _params(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    ps = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g
        ps.append(p)
    return ps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", ORDERS)
def test_cuda_total_matches_float64_reference(dtype, p):
    grads = _grads(dtype)
    total = dist_clip.get_total_norm(grads, p)
    assert total.device.type == "cuda" and total.dtype == torch.float32
    want = reference_norm(grads, p)
    assert abs(total.item() - want) <= RTOL[dtype] * want, (total.item(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", ORDERS)
def test_cuda_partials_per_tensor_with_empty_and_nan_pieces(dtype, p):
    """The device inf and L0 partials come from one fused multi-tensor kernel for the whole list (one reduction
    per tensor before): each tensor's own value, an empty one's 0, a NaN only in the tensor that holds it."""
    from dist_clip import _norm

    grads = _grads(dtype)
    grads.insert(2, torch.zeros(0, device="cuda", dtype=dtype))
    grads.append(torch.zeros(0, device="cuda", dtype=dtype))
    grads[1][7] = math.nan
    grads[3][::3] = 0  # zeros for the count
    got = _norm.local_partials(grads, p).cpu()
    assert got.dtype == torch.float64 and got.shape == (len(grads),)
    for i, g in enumerate(grads):
        if i == 1:
            assert math.isnan(got[i].item()), (p, got[i])
            continue
        want = reference_norm([g], p)
        want = want if p in (0.0, 1.0) or math.isinf(p) else want ** p
        assert abs(got[i].item() - want) <= 1e-6 * want, (i, p, got[i].item(), want)
    assert math.isnan(dist_clip.get_total_norm(grads, p).item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_odd_shapes_take_the_unrounded_coefficient_on_the_gpu(dtype):
    """0-dim, transposed, strided and 1-element gradients beside ordinary ones: each scaled as the float64 product
    rounded once (the half multiply runs as one list-by-list torch call now, 0-dim tensors on their own)."""
    g = torch.Generator().manual_seed(3)
    base = [torch.randn((), generator=g), torch.randn(64, 48, generator=g).t(), torch.randn(1, generator=g),
            torch.randn(300, generator=g), torch.randn(4097, generator=g)]
    grads = [b.to("cuda", dtype) for b in base]
    grads[1] = grads[1].t().contiguous().t()  # transposed on the device too
    grads[3] = grads[3][::3]  # strided in the gradients' dtype (a conversion of a strided tensor is contiguous)
    assert grads[1].stride() == (1, 48) and grads[3].stride() == (3,)
    before = [t.detach().double().cpu() for t in grads]
    want = reference_norm(grads, 2.0)
    dist_clip.clip_grad_norm_(_params(grads), 0.7371 * want)
    coef = 0.7371 * want / (want + 1e-6)
    # One rounding of the product: half an ulp, 2^-8 relative in bf16, 2^-11 in fp16 (eps let a coefficient
    # rounded to bf16 first pass, review36); fp16 subnormals hold 2^-24 absolute.
    rtol = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    atol = 2.0**-25 if dtype == torch.float16 else 0.0
    for t, b in zip(grads, before):
        assert t.shape == b.shape
        torch.testing.assert_close(t.double().cpu(), b * coef, rtol=rtol, atol=atol)


@pytest.mark.parametrize("p", ORDERS)
def test_cuda_nan_gives_nan(p):
    grads = _grads(torch.float32)
    grads[3][12345] = math.nan
    assert math.isnan(dist_clip.get_total_norm(grads, p).item())


@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_a_negative_or_nan_max_norm_on_the_device_gives_nan_not_flipped_signs(bad):
    """A max_norm tensor on the GPU is not read (a host sync): a negative one flipped the gradients' signs."""
    g = torch.tensor([3.0, 4.0], device="cuda")
    limit = torch.tensor(bad, device="cuda")  # made before the check: a host-to-device copy syncs by itself
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = dist_clip.clip_grad_norm_([g], limit)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert total.item() == pytest.approx(5.0)
    assert bool(torch.isnan(g).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", ORDERS)
def test_default_path_makes_no_host_sync(dtype, p):
    ps = _params(_grads(dtype))
    dist_clip.clip_grad_norm_(ps, 1.0, p)  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = dist_clip.get_total_norm(ps, p)
        dist_clip.clip_grads_with_norm_(ps, 1.0, total)
        dist_clip.clip_grad_norm_(ps, 1.0, p)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_half_gradients_are_clipped_on_the_gpu(dtype):
    """Sparse mul refuses a dense operand of another dtype: the 1-element coefficient scales their values."""
    emb = torch.nn.Embedding(50, 8, sparse=True).to("cuda", dtype)
    emb(torch.tensor([1, 2, 2, 7], device="cuda")).float().square().sum().backward()
    before = emb.weight.grad.coalesce().to_dense().double()
    want = reference_norm([emb.weight.grad], 2.0)
    total = dist_clip.clip_grad_norm_(emb.parameters(), 0.5 * want)
    assert abs(total.item() - want) <= 1e-5 * want
    torch.testing.assert_close(emb.weight.grad.coalesce().to_dense().double(), before * 0.5 * want / (want + 1e-6),
                               rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("mode", ["total", "per_param", "per_group", "unitwise"])
def test_clipper_modes_make_no_host_sync(mode):
    """The GradClipper modes copied per-call host lists (per-group indices and limits, unit ids) to the GPU
    with blocking copies, read a boolean index (unit-wise), and moved the counters blocking; the clipper's
    docstring promises no host sync outside "error", reports and a non-fused "skip"."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8)).cuda()
    model(torch.randn(16, 64, device="cuda")).square().sum().backward()
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "max_norm": 0.5},
                             {"params": model[1].parameters(), "max_norm": 0.1}], fused=True)
    kwargs = {"agc": dist_clip.AGC(0.01)} if mode == "unitwise" else {"max_norm": 1.0}
    clipper = dist_clip.GradClipper(mode=mode, on_nonfinite="skip", **kwargs)
    clipper(model, optimizer=opt)  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        clipper(model, optimizer=opt)
        dist_clip.skip_next_step_(opt, False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_fused_optimizer_hand_over_makes_no_host_sync_and_matches(name):
    make = {
        "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "SGD": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True),
    }[name]
    ref_ps, ps = _params(_grads(torch.float32)), _params(_grads(torch.float32))
    ref_opt, opt = make(ref_ps), make(ps)
    for step in range(3):
        for a, b in zip(ref_ps, ps):
            b.grad.copy_(a.grad)
        # The coefficient from a float64 total, rounded once to float32, as dist_clip forms it (from the float32
        # total in float32 arithmetic, 1 / coef differed in its last bit for ~22% of totals: a flaky test).
        total = torch.linalg.vector_norm(torch.cat([p.grad.double().reshape(-1) for p in ref_ps]))
        coef = torch.clamp(0.5 / (total + 1e-6), max=1.0).float()
        torch._foreach_div_([p.grad for p in ref_ps], torch.reciprocal(coef))
        ref_opt.step()
        torch.cuda.synchronize()
        if step > 0:
            torch.cuda.set_sync_debug_mode("error")
        try:
            dist_clip.clip_grad_norm_(ps, 0.5, optimizer=opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.step()
    for a, b in zip(ref_ps, ps):  # the totals may differ in their last bits (summation orders): 1e-6
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("order", ["cpu first", "cuda first"])
@pytest.mark.parametrize("p", [2.0, math.inf])
def test_gradients_on_the_cpu_and_the_gpu_in_one_call_match_the_reference(order, p):
    """A non-blocking copy to the host returns before the data lands: the CPU read what the pinned block held
    before (zeros, or the previous step's values). Partials and coefficients copied to the CPU wait now."""
    for step in range(5):
        grads = _grads(torch.float32, seed=step) + _grads(torch.float32, device="cpu", seed=100 + step)
        if order == "cuda first":
            grads = grads[5:] + grads[:5]
        want = reference_norm(grads, p)
        before = [g.detach().double().cpu() for g in grads]
        total = dist_clip.clip_grad_norm_(_params(grads), 0.5 * want, p)
        assert abs(total.item() - want) <= 1e-6 * want, (step, total.item(), want)
        coef = 0.5 * want / (want + 1e-6)
        for g, b in zip(grads, before):
            torch.testing.assert_close(g.double().cpu(), b * coef, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("mode", ["clip_grad_norm_", "clipper", "optimizer="])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gradients_are_scaled_by_the_unrounded_coefficient(dtype, mode):
    """A 0-dim float32 coefficient on the GPU was cast to the gradients' dtype before the multiply (CUDA reads
    only a CPU scalar in float): a bias of 0.16% in bf16 for 0.7371 (0.73828125), and a coefficient below 3e-8
    zeroed fp16 gradients. The product is taken in float32 and rounded once, as on the CPU: over millions of
    elements the ratio to the exact product averages 1 (each element's rounding is unbiased)."""
    for fraction in (0.7371, 3e-9):
        grads = _grads(dtype)
        want = reference_norm(grads, 2.0)
        before = [g.detach().double() for g in grads]
        params = _params(grads)
        limit = fraction * want
        if mode == "clip_grad_norm_":
            dist_clip.clip_grad_norm_(params, limit)
        elif mode == "clipper":
            dist_clip.GradClipper(max_norm=limit)(params)
        else:
            opt = torch.optim.SGD(params, lr=0.0)  # not fused: scaled in the call
            dist_clip.clip_grad_norm_(params, limit, optimizer=opt)
        coef = limit / (want + 1e-6)
        exact = torch.cat([(b * coef).flatten() for b in before])
        got = torch.cat([g.double().flatten() for g in grads])
        assert bool((got != 0).any()), fraction  # fp16: 3e-9 was rounded to 0 and zeroed every gradient
        if dtype == torch.float16 and fraction < 1e-3:
            continue  # the products themselves are mostly below fp16's range
        seen = exact.abs() > 1e-3 * exact.abs().max()
        bias = (got[seen] / exact[seen]).mean().item() - 1.0
        assert abs(bias) < (2e-4 if dtype == torch.bfloat16 else 5e-5), (fraction, bias)


def _nccl_rank(rank: int, world: int, store_path: str, results) -> None:
    import torch.distributed as dist

    try:
        torch.cuda.set_device(rank)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        store = dist.FileStore(store_path, world)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=120))
        full = _grads(torch.float32, device="cpu", seed=7)
        mine = [t.cuda() for i, t in enumerate(full) if i % world == rank]
        ps = _params(mine)
        out = []
        for p in ORDERS:
            want = reference_norm(full, p)
            dist_clip.get_total_norm(ps, p, group=dist.group.WORLD)  # warm-up (NCCL communicator set-up)
            torch.cuda.synchronize()
            with count_collectives() as calls:
                torch.cuda.set_sync_debug_mode("error")
                try:
                    total = dist_clip.get_total_norm(ps, p, group=dist.group.WORLD)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
            out.append((p, total.item(), want, calls.names))
        dist.destroy_process_group()
        results.put((rank, True, out))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        results.put((rank, False, f"{e!r}\n{traceback.format_exc()}"))


def test_nccl_one_collective_per_call_and_exact():
    import torch.multiprocessing as mp

    world = min(2, torch.cuda.device_count())
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_nccl_rank, args=(r, world, store, results)) for r in range(world)]
        for proc in procs:
            proc.start()
        got = [results.get(timeout=300) for _ in range(world)]
        for proc in procs:
            proc.join(timeout=60)
    failures = [msg for _, ok, msg in got if not ok]
    assert not failures, failures
    by_rank = {rank: out for rank, _, out in got}
    for p_idx, p in enumerate(ORDERS):
        totals = {by_rank[r][p_idx][1] for r in range(world)}
        assert len(totals) == 1, (p, totals)  # identical on every rank
        _, total, want, names = by_rank[0][p_idx]
        assert abs(total - want) <= 1e-6 * want or (math.isnan(want) and math.isnan(total)), (p, total, want)
        nccl = [n for n in names if n.startswith("nccl:")]
        assert len(nccl) == (1 if world > 1 else 0), (p, names)


class _TokenLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.out = torch.nn.Linear(8, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids))


def test_ci_helper_takes_token_ids_on_the_gpu():
    """``assert_clip_matches_unsharded`` inside the caller's process (world_size=None) with the model and its token
    ids on the GPU: the ids reached the float64 CPU model on the GPU (torch's "Expected all tensors to be on the
    same device")."""
    from dist_clip.testing import assert_clip_matches_unsharded

    norms = assert_clip_matches_unsharded(
        _TokenLM, lambda m: m.to("cuda"),
        lambda rank, world: torch.randint(0, 50, (4, 5), generator=torch.Generator().manual_seed(rank)).cuda(),
        max_norm=0.05)
    assert set(norms) == {"emb.weight", "out.weight", "out.bias"}
