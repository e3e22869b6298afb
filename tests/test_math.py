"""Math tier: single process, against the float64 unsharded reference.

Checks the local partials for every norm order and dtype (hypothesis-generated shapes, values and orders),
the overflow/underflow rescues, and the NaN-safe combination with a mocked collective whose MAX drops NaN as
real backends may. Run: ``.venv/bin/python -m pytest tests/test_math.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import dist_clip
from dist_clip import _norm, _reduce
from dist_clip.testing import reference_norm

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Relative accuracy promised against the float64 reference (fp32 output rounding is 6e-8).
RTOL = {torch.float32: 1e-6, torch.float64: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}

orders = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 3.5, math.inf]),
    st.floats(min_value=0.25, max_value=8.0, allow_nan=False),
)
sizes = st.lists(st.integers(min_value=0, max_value=20000), min_size=0, max_size=6)


def _close(got: float, want: float, rtol: float) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    if math.isinf(want):
        return got == want
    return abs(got - want) <= rtol * abs(want) + 1e-30


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=sizes,
    p=orders,
    dtype=st.sampled_from(DTYPES),
    scale_exp=st.integers(min_value=-4, max_value=4),
    seed=st.integers(0, 2**16),
    sparsity=st.sampled_from([0.0, 0.5]),
)
def test_total_matches_float64_reference(sizes, p, dtype, scale_exp, seed, sparsity):
    g = torch.Generator().manual_seed(seed)
    grads = []
    for n in sizes:
        t = torch.randn(n, generator=g, dtype=torch.float64) * 10.0**scale_exp
        if sparsity:
            t[torch.rand(n, generator=g) < sparsity] = 0
        grads.append(t.to(dtype))
    total = dist_clip.get_total_norm(grads, p)
    want = reference_norm(grads, p)
    wide = dtype == torch.float64 and bool(sizes)  # no gradient at all: no dtype to follow, float32
    assert total.dtype == (torch.float64 if wide else torch.float32) and total.shape == ()
    # The reference itself is rounded to float32 when we return it, so compare with that rounding in mind.
    assert _close(total.item(), want, RTOL[dtype] if dtype != torch.float64 else 1e-12), (total.item(), want)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_fp32_elements_whose_powers_overflow_float32(p):
    g = torch.full((5000,), 1e20)
    g[::7] = 3e19
    want = reference_norm([g], p)
    assert math.isfinite(want)
    assert dist_clip.get_total_norm([g], p).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_fp32_elements_whose_powers_underflow_float32(p):
    g = torch.full((5000,), 1e-25)
    want = reference_norm([g], p)
    assert dist_clip.get_total_norm([g], p).item() == pytest.approx(want, rel=1e-6)


def test_fp16_norm_above_fp16_max_is_finite_and_exact():
    # 100000 elements of 316.25 (exact in fp16): norm 1.00006e5 > 65504, the largest fp16.
    g = torch.full((100000,), 316.25, dtype=torch.float16)
    want = reference_norm([g])
    assert want > 65504
    ours = dist_clip.get_total_norm([g])
    assert ours.item() == pytest.approx(want, rel=1e-6)
    # torch accumulates in fp16 and overflows; clipping by that inf norm zeroes the gradients.
    assert math.isinf(torch.nn.utils.get_total_norm([g]).item())
    p = torch.nn.Parameter(torch.zeros(100000, dtype=torch.float16))
    p.grad = g.clone()
    dist_clip.clip_grad_norm_([p], 1.0)
    assert p.grad.float().norm().item() == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_norm_above_float32_range_clips_by_the_float64_total(dtype, p):
    """Every element finite, the norm beyond float32's 3.4e38: the float32 total reads inf, but clipping uses
    the float64 total (torch divides by that inf and zeroes the gradients) and error_if_nonfinite does not
    raise: nothing is non-finite."""
    g = torch.full((4,), 3e38).to(dtype)
    g[1] = 1e38
    want = reference_norm([g], p)
    assert 3.5e38 < want < math.inf
    param = torch.nn.Parameter(torch.zeros(4, dtype=dtype))
    param.grad = g.clone()
    total = dist_clip.clip_grad_norm_([param], 1.0, p, error_if_nonfinite=True)
    assert total.dtype == torch.float32 and math.isinf(total.item())
    coef = 1.0 / (want + 1e-6)
    elementwise = 1e-6 if dtype == torch.float32 else 2**-8  # the scaled element rounded to its dtype
    torch.testing.assert_close(param.grad.double(), g.double() * coef, rtol=elementwise, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["clip_grad_norm_", "total", "per_param", "per_group"])
def test_a_coefficient_float32_holds_only_as_a_subnormal_is_applied_exactly(dtype, how):
    """A million elements of 3e38 (p = 1): coef ~3e-45, which float32 rounds to 2 significant bits or less
    (clipped norms 0.84, or 0 at ten million elements, before); applied in two normal factors it is exact up to
    the gradients' own rounding. GradClipper zeroed such gradients and took them for non-finite."""
    from dist_clip import GradClipper

    n = 1_000_000
    g = torch.full((n,), 3e38).to(dtype)
    g[::7] = 1e38
    want = reference_norm([g], 1.0)
    coef = 1.0 / (want + 1e-6)
    assert coef < 2.0**-126
    param = torch.nn.Parameter(torch.zeros(n, dtype=dtype))
    param.grad = g.clone()
    if how == "clip_grad_norm_":
        dist_clip.clip_grad_norm_([param], 1.0, 1.0, error_if_nonfinite=True)
    else:
        opt = torch.optim.SGD([param], lr=0.1)
        result = GradClipper(max_norm=1.0, norm_type=1.0, mode=how, on_nonfinite="error")(
            {"w": param}, optimizer=opt)
        assert bool(result.finite) and bool(result.clipped)
        assert result.clip_coef.reshape(-1)[0].item() == pytest.approx(coef, rel=0.5)  # a subnormal: as held
    elementwise = 2e-7 if dtype == torch.float32 else 2**-8  # the scaled element rounded to its dtype
    torch.testing.assert_close(param.grad.double(), g.double() * coef, rtol=elementwise, atol=0)
    assert param.grad.double().abs().sum().item() == pytest.approx(1.0, rel=elementwise)


def _rounded_once(x: Tensor, dtype: torch.dtype) -> Tensor:
    """float64 ``x`` rounded once to nearest (ties to even) in ``dtype``, with exact rational arithmetic: torch's
    own float64 -> bfloat16/float16 cast goes through float32 and rounds twice."""
    from fractions import Fraction

    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    out = []
    for v in x.tolist():
        near = torch.tensor([v], dtype=torch.float64).to(dtype).view(bits).item()
        cands = [torch.tensor([b], dtype=bits).view(dtype) for b in (near - 1, near, near + 1)]
        cands = [c for c in cands if math.isfinite(c.item())]
        out.append(min(cands, key=lambda c: (abs(Fraction(c.item()) - Fraction(v)), c.view(bits).item() & 1)))
    return torch.cat(out)


# (fp16 results of such a coefficient are 0; the half-ulp points are bf16's)
@pytest.mark.parametrize(("dtype", "values"), [(torch.float32, "linspace"), (torch.bfloat16, "linspace"),
                                               (torch.bfloat16, "normal_half_ulp"),
                                               (torch.bfloat16, "subnormal_half_ulp")])
@pytest.mark.parametrize("how", ["clip_grad_norm_", "clip_grads_with_norm_", "total", "per_param"])
def test_a_subnormal_coefficient_is_one_product_rounded_once(dtype, how, values):
    """Applied as a normal factor and then 2**-100, results that are subnormal themselves were rounded twice:
    55 of 201 bf16 elements 1 ulp off the exact product rounded once (0.5 x 1.07e-38 gave 5.33e-39 for 5.42e-39,
    1.7%), 51 in float32. One float64 product, rounded once to the gradient's dtype: for bf16 not by torch's
    cast, which goes through float32 (a second rounding to nearest put products just above a bf16 half-ulp point
    on it, 1 ulp low: 1 + 2^-8 + 2^-30 gave 1.0 for 1.0078125, (64.5 + 2^-20) x 2^-133 gave 64 x 2^-133 for 65 x
    2^-133, 1.5%; 0.2% of random coefficients put some element so)."""
    from dist_clip import GradClipper

    if values == "linspace":
        g = torch.cat([torch.tensor([9.3e37]), torch.linspace(0.5, 1.0, 200, dtype=torch.float64).float()])
        max_norm = 1.0
    else:  # the total is 2^127 (to float64's precision); each limit puts a product just above a half-ulp point
        g = torch.tensor([2.0**127]) if values == "normal_half_ulp" else torch.tensor([2.0**127, 1.0])
        max_norm = 1 + 2**-8 + 2**-30 if values == "normal_half_ulp" else (64.5 + 2**-20) * 2**-6
    g = g.to(dtype)
    coef = max_norm / (reference_norm([g], 2.0) + 1e-6)
    assert coef < 2.0**-126
    want = _rounded_once(g.double() * coef, dtype)  # the exact product (to 2**-53), rounded once
    if values != "linspace":
        assert not torch.equal(want, (g.double() * coef).to(dtype))  # torch's two roundings differ here
    param = torch.nn.Parameter(torch.zeros_like(g))
    param.grad = g.clone()
    if how == "clip_grad_norm_":
        dist_clip.clip_grad_norm_([param], max_norm)
    elif how == "clip_grads_with_norm_":
        dist_clip.clip_grads_with_norm_([param], max_norm, dist_clip.get_total_norm([param]))
    else:
        GradClipper(max_norm=max_norm, mode=how)({"w": param})
    assert torch.equal(param.grad, want), int((param.grad != want).sum())


@pytest.mark.parametrize("mode", ["per_param", "per_group"])
def test_slots_beside_a_subnormal_one_keep_their_own_rounding(mode):
    """Per slot, only the slots whose coefficient float32 holds as a subnormal take the float64 product: the
    others are their gradient times the float32 coefficient, rounded once, bit for bit as without the tiny
    slot beside them (they took the float64 product too: 99 of 1000 entries differed); a slot at 1 untouched."""
    from dist_clip import GradClipper

    torch.manual_seed(0)
    grads = {"a": torch.cat([torch.tensor([9.3e37]), torch.ones(10)]), "b": torch.randn(1000) * 0.1,
             "c": torch.full((4,), 0.1)}

    def clipped(names):
        params = {n: torch.nn.Parameter(torch.zeros_like(grads[n])) for n in names}
        for n, q in params.items():
            q.grad = grads[n].clone()
        groups = [{"params": [q], "max_norm": 1.0} for q in params.values()]
        extra = {"optimizer": torch.optim.SGD(groups, lr=0.1)} if mode == "per_group" else {}
        result = GradClipper(max_norm=1.0, mode=mode)(params, **extra)
        return {n: q.grad for n, q in params.items()}, result.clip_coef

    alone, _ = clipped(["b", "c"])
    beside, coefs = clipped(["a", "b", "c"])
    assert torch.equal(beside["b"], alone["b"]) and torch.equal(beside["b"], grads["b"] * coefs[1])
    assert torch.equal(beside["c"], grads["c"])
    tiny = 1.0 / (reference_norm([grads["a"]]) + 1e-6)
    assert tiny < 2.0**-126 and torch.equal(beside["a"], (grads["a"].double() * tiny).float())


def test_a_group_at_a_zero_limit_beside_a_subnormal_coefficient_is_zeroed():
    """per_group: a group whose max_norm is 0 (coefficient exactly 0) beside a group whose coefficient float32
    holds only as a subnormal (the call scales slot by slot through the float64 products): its gradients are
    zeroed as torch zeroes them under max_norm=0, and the tiny group takes its float64 product rounded once."""
    from dist_clip import GradClipper

    torch.manual_seed(0)
    grads = {"a": torch.cat([torch.tensor([9.3e37]), torch.ones(10)]), "d": torch.randn(6)}
    params = {n: torch.nn.Parameter(torch.zeros_like(g)) for n, g in grads.items()}
    for n, q in params.items():
        q.grad = grads[n].clone()
    groups = [{"params": [params["a"]], "max_norm": 1.0}, {"params": [params["d"]], "max_norm": 0.0}]
    GradClipper(max_norm=1.0, mode="per_group")(params, optimizer=torch.optim.SGD(groups, lr=0.1))
    assert torch.equal(params["d"].grad, torch.zeros(6))
    tiny = 1.0 / (reference_norm([grads["a"]]) + 1e-6)
    assert tiny < 2.0**-126 and torch.equal(params["a"].grad, (grads["a"].double() * tiny).float())


@pytest.mark.parametrize("max_norm", [1e-10, 1e-20])
@pytest.mark.parametrize("total_as", ["tensor", "float"])
def test_two_steps_apply_a_subnormal_coefficient_as_clip_grad_norm_does(max_norm, total_as):
    """get_total_norm then clip_grads_with_norm_ (torch's two steps) on a total float32 holds (1.26e30) with a
    tiny max_norm: the coefficient (8e-41, 8e-51) float32 holds as a subnormal or 0 was applied as such (2.4e-6
    off, or the gradients zeroed) where clip_grad_norm_ splits it into normal factors."""
    g = torch.tensor([1e30, -3e29, 7e29])
    want = reference_norm([g], 2.0)
    expected = g.double() * (max_norm / (want + 1e-6))
    total = dist_clip.get_total_norm([g])
    assert total.dtype == torch.float32 and math.isfinite(total.item())
    mine, theirs = g.clone(), torch.nn.Parameter(torch.zeros(3))
    theirs.grad = g.clone()
    dist_clip.clip_grads_with_norm_([mine], max_norm, total if total_as == "tensor" else float(total))
    dist_clip.clip_grad_norm_([theirs], max_norm)
    for got in (mine, theirs.grad):
        torch.testing.assert_close(got.double(), expected, rtol=2e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_subnormal_coefficient_scales_a_non_contiguous_gradient(dtype):
    """The float64 multiply of a coefficient float32 holds only as a subnormal (max_norm 1e-20 over a total of
    1.3e30: 8e-51) on a transposed gradient: it cannot be flattened with view(-1), and is scaled as a whole."""
    base = torch.tensor([[1e30, -3e29, 7e29], [2e29, 5e28, -1e30]]).to(dtype)
    g = base.t()
    assert not g.is_contiguous()
    want = reference_norm([g], 2.0)
    expected = (g.double() * (1e-20 / (want + 1e-6))).to(dtype)
    p = torch.nn.Parameter(torch.zeros(3, 2, dtype=dtype))
    p.grad = g
    dist_clip.clip_grad_norm_([p], 1e-20)
    assert p.grad.data_ptr() == base.data_ptr()  # scaled in place
    torch.testing.assert_close(p.grad.double(), expected.double(), rtol=2e-7 if dtype == torch.float32 else 0, atol=0)


@pytest.mark.parametrize("flush_denormal", [False, True])
def test_a_float32_total_above_2_to_the_126_is_divided_not_inverted(flush_denormal):
    """get_total_norm then clip_grads_with_norm_ on a float32 total of 3e38: the coefficient max_norm / total was
    torch's reciprocal-then-multiply, and 1 / 3e38 is a float32 subnormal: 1.1e-7 off the float64 formula (2-4
    ulps), and the gradients zeroed under torch.set_flush_denormal(True), where clip_grad_norm_ was exact."""
    g = torch.tensor([3e38, 1e38])
    total = dist_clip.get_total_norm([g], math.inf)
    assert total.dtype == torch.float32 and total.item() == g[0].item()
    expected = (g.double() * (torch.tensor(1e30).item() / (total.item() + 1e-6))).float()
    if not torch.set_flush_denormal(flush_denormal) and flush_denormal:
        pytest.skip("this CPU cannot flush denormals (x86 with SSE3 can)")
    try:
        mine = g.clone()
        dist_clip.clip_grads_with_norm_([mine], 1e30, total)
    finally:
        torch.set_flush_denormal(False)  # torch's default
    assert torch.equal(mine, expected), (mine.tolist(), expected.tolist())


@pytest.mark.parametrize("max_norm", [1e39, 1e300, np.float64(1e39)])
def test_a_max_norm_beyond_float32_leaves_float32_gradients_alone(max_norm):
    """A limit float32 cannot hold beside a float32 total (get_total_norm's): torch's full_like refused it
    ("value cannot be converted to type float without overflow") where it is infinite: nothing is clipped, as
    torch.nn.utils.clip_grads_with_norm_ does. GradClipper's total mode built its limit the same way."""
    g = torch.tensor([3.0, 4.0])
    total = dist_clip.get_total_norm([g])
    assert total.dtype == torch.float32
    mine = g.clone()
    dist_clip.clip_grads_with_norm_([mine], max_norm, total)
    assert torch.equal(mine, g)
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = g.clone()
    result = dist_clip.GradClipper(max_norm=max_norm)([param])
    assert torch.equal(param.grad, g) and result.clip_coef.item() == 1.0 and not bool(result.clipped)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("how", ["clip_grad_norm_", "total", "per_param"])
def test_a_coefficient_of_exactly_one_writes_nothing(dtype, how):
    """Gradients whose coefficient is exactly 1 are not multiplied on the CPU (README, Semantics): torch.equal
    cannot tell x * 1 from x, but a multiply bumps the version counter (a gradient autograd saved then raises
    "modified by an inplace operation") and, under torch.set_flush_denormal(True), flushes float32 and bfloat16
    subnormals to 0. 40 gradients (the native multi-tensor multiply for halves); per_param clips one more."""
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    grads = {f"g{i}": torch.full((64,), 1e-3, dtype=dtype) for i in range(40)}
    for g in grads.values():
        g[0] = torch.finfo(dtype).tiny / 4  # a subnormal
    if how == "per_param":
        grads["big"] = torch.full((64,), 10.0, dtype=dtype)
    params = {n: nn.Parameter(torch.zeros_like(g)) for n, g in grads.items()}
    for n, g in grads.items():
        params[n].grad = g.clone()
    kept = {n: params[n].grad._version for n in grads if n != "big"}
    torch.set_flush_denormal(True)  # (False where the CPU has no such mode: the version counters still tell)
    try:
        if how == "clip_grad_norm_":
            dist_clip.clip_grad_norm_(list(params.values()), 1.0)
        else:
            dist_clip.GradClipper(max_norm=1.0, mode=how)(params)
    finally:
        torch.set_flush_denormal(False)  # torch's default
    for n, version in kept.items():
        assert params[n].grad._version == version, n
        assert torch.equal(params[n].grad.view(bits), grads[n].view(bits)), n
    if how == "per_param":
        assert params["big"].grad.double().norm().item() == pytest.approx(1.0, rel=1e-2)


def test_large_fp32_tensor_accuracy_beats_torch():
    torch.manual_seed(0)
    g = torch.randn(1 << 24)
    want = reference_norm([g])
    ours = dist_clip.get_total_norm([g]).item()
    assert abs(ours - want) / want <= 1e-6
    torch_err = abs(torch.linalg.vector_norm(g).item() - want) / want
    assert torch_err > 1e-5  # torch's float32 norm is visibly off at this size: the bar is not trivial


def test_constant_inputs_do_not_accumulate_rounding_bias():
    g = torch.full((3 * _norm.BLOCK * 100 + 17,), 316.3)
    assert dist_clip.get_total_norm([g]).item() == pytest.approx(reference_norm([g]), rel=1e-6)


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0, 3.5, math.inf])
@pytest.mark.parametrize("n", [10, 100000])
def test_nan_anywhere_gives_nan_for_every_order(p, n):
    g = torch.randn(n)
    g[n // 2] = math.nan
    assert math.isnan(dist_clip.get_total_norm([torch.ones(3), g], p).item())


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_inf_gradient_gives_inf(p):
    g = torch.randn(100000)
    g[5] = math.inf
    assert dist_clip.get_total_norm([g], p).item() == math.inf


def test_l0_counts_non_zeros_and_treats_inf_as_non_zero():
    g = torch.tensor([0.0, 1.0, -2.0, 0.0, math.inf])
    assert dist_clip.get_total_norm([g, torch.zeros(4), torch.ones(3)], 0).item() == 6.0


def test_l0_differs_from_torch_which_counts_non_zero_tensors():
    grads = [torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 5.0])]
    assert dist_clip.get_total_norm(grads, 0).item() == 3.0  # the L0 "norm" of the concatenation
    assert torch.nn.utils.get_total_norm(grads, 0).item() == 2.0  # torch: non-zero per-tensor norms


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("p", [0.0, 1.0, 2.0, 3.0, math.inf])
def test_foreach_modes_agree(foreach, p):
    torch.manual_seed(1)
    grads = [torch.randn(n) for n in (3, 5000, 100000)] + [torch.randn(7, dtype=torch.bfloat16)]
    want = reference_norm(grads, p)
    assert dist_clip.get_total_norm(grads, p, foreach=foreach).item() == pytest.approx(want, rel=1e-6)


# --- the collective, mocked: a backend whose MAX drops NaN (fmax) must still give NaN -----------------


class _FakeBackend:
    """Stands in for a 2-rank group: the other rank's buffer is given, MAX is fmax (drops NaN), SUM adds."""

    def __init__(self, other: torch.Tensor):
        self.other = other
        self.calls = 0

    def all_reduce(self, buf, op=None, group=None):
        self.calls += 1
        other = self.other.to(buf.dtype)
        if op == torch.distributed.ReduceOp.MAX:
            buf.copy_(torch.fmax(buf, other))
        else:
            buf.add_(other)


@pytest.fixture
def fake_two_ranks(monkeypatch):
    def install(other_partials: torch.Tensor, op: str) -> _FakeBackend:
        if op == "max":
            nan = torch.isnan(other_partials)
            other = torch.cat([torch.where(nan, torch.zeros_like(other_partials), other_partials), nan.double()])
        else:
            other = other_partials
        fake = _FakeBackend(other)
        monkeypatch.setattr(_reduce, "group_size", lambda group: 2)
        monkeypatch.setattr(_reduce, "collective_device", lambda group, preferred: preferred)
        monkeypatch.setattr(_reduce.dist, "all_reduce", fake.all_reduce)
        return fake

    return install


def test_nan_survives_a_max_that_drops_it(fake_two_ranks):
    fake = fake_two_ranks(torch.tensor([3.0], dtype=torch.float64), "max")
    out = _reduce.all_reduce_partials(torch.tensor([math.nan], dtype=torch.float64), "max", group=object())
    assert math.isnan(out.item()) and fake.calls == 1
    # And from the other side: the NaN is on the peer.
    fake = fake_two_ranks(torch.tensor([math.nan], dtype=torch.float64), "max")
    out = _reduce.all_reduce_partials(torch.tensor([3.0], dtype=torch.float64), "max", group=object())
    assert math.isnan(out.item()) and fake.calls == 1


@pytest.mark.parametrize(
    ("config", "cuda", "want"),
    [
        # (backend config torch reports, CUDA available and initialized, then: the device of a buffer from the
        # CPU, from CUDA, of a rank holding nothing, whether the reduction of a CPU buffer / a CUDA one is on the host)
        ("cpu:gloo,cuda:gloo", True, ("cpu", "cuda", "cpu", True, True)),  # "gloo"
        ("cpu:gloo", False, ("cpu", "cpu", "cpu", True, True)),  # "undefined" or "cpu:gloo" without CUDA
        ("cpu:gloo,cuda:nccl", True, ("cpu", "cuda", "cuda", True, False)),  # "undefined" with CUDA
        ("cpu:gloo,cuda:nccl", False, ("cpu", "cuda", "cpu", True, False)),  # CUDA not available
        ("cuda:nccl", True, ("cuda", "cuda", "cuda", False, False)),  # "nccl"
        ("cpu:mpi,cuda:mpi", True, ("cpu", "cuda", "cpu", True, True)),  # "mpi"
        ("gloo", True, ("cpu", "cuda", "cpu", True, True)),  # one name for every device
        ("nccl", True, ("cuda", "cuda", "cuda", False, False)),
        # backends of the user's own: "cpugloo" registered for the CPU alone (its buffers are host tensors),
        # "anygloo" for the CPU and CUDA (taken as NCCL is: no agreement)
        ("cpu:cpugloo", True, ("cpu", "cpu", "cpu", True, True)),
        ("cpu:cpugloo,cuda:gloo", True, ("cpu", "cuda", "cuda", True, True)),
        ("cpu:anygloo,cuda:anygloo", True, ("cpu", "cuda", "cpu", False, False)),
        ("anygloo", True, ("cpu", "cuda", "cpu", False, False)),
    ],
)
def test_backend_config_picks_the_buffer_device_and_host_reduction(monkeypatch, config, cuda, want):
    """The backend by device comes from torch's config: ``dist.get_backend`` names a group started without a
    backend "undefined" and one started with "cpu:gloo" so, both gloo on the CPU, where the float64 flag rides
    (left out before: ranks returned float32 beside float64). A rank holding nothing in a job whose CUDA is in
    use reduces where NCCL does when the CPU's backend is another (its gloo buffer met the others' NCCL one)."""
    monkeypatch.setattr(_reduce.dist, "get_backend_config", lambda group: config)
    monkeypatch.setitem(_reduce.dist.Backend.backend_capability, "cpugloo", ["cpu"])
    monkeypatch.setitem(_reduce.dist.Backend.backend_capability, "anygloo", ["cpu", "cuda"])
    monkeypatch.setattr(_reduce, "group_size", lambda group: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    group = object()
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    got = (
        _reduce.collective_device(group, cpu).type,
        _reduce.collective_device(group, gpu).type,
        _reduce.home_device([], group).type,
        _reduce.reduces_on_host(group, cpu),
        _reduce.reduces_on_host(group, gpu),
    )
    assert got == want, got
    assert not _reduce.reduces_on_host(None, cpu)


def test_plain_fmax_would_have_dropped_it():
    assert torch.fmax(torch.tensor(math.nan), torch.tensor(3.0)).item() == 3.0


def test_sum_combines_partials(fake_two_ranks):
    fake_two_ranks(torch.tensor([9.0, 1.0], dtype=torch.float64), "sum")
    out = _reduce.all_reduce_partials(torch.tensor([16.0, 2.0], dtype=torch.float64), "sum", group=object())
    assert out.tolist() == [25.0, 3.0]


def test_finalize_roots():
    t = torch.tensor(16.0, dtype=torch.float64)
    assert _norm.finalize(t, 2.0).item() == 4.0
    assert _norm.finalize(t, 4.0).item() == pytest.approx(2.0)
    assert _norm.finalize(t, 0.0).item() == 16.0
    assert _norm.finalize(t, math.inf).item() == 16.0
    assert _norm.combine_op(math.inf) == "max" and _norm.combine_op(2.0) == "sum" and _norm.combine_op(0.0) == "sum"


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0, math.inf])
def test_only_empty_tensors_give_zero(p):
    # A rank whose every shard is empty: torch's vector_norm(inf) has no identity there; ours is 0.
    assert dist_clip.get_total_norm([torch.zeros(0), torch.zeros(0, 3)], p).item() == 0.0
    assert reference_norm([torch.zeros(0)], p) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["clip_grad_norm_", "total", "per_param"])
@pytest.mark.parametrize("case", ["beside float64", "max_norm 1e-30"])
def test_tiny_coefficients_stay_exact_beside_float64_and_below_two_to_the_minus_190(dtype, how, case):
    """A float64 gradient in the call turned the two-factor split off (the float64 coefficient was rounded to a
    float32 subnormal for the float32 gradients: 3e-3 off at max_norm 1e-3, 0 at 1e-6); and one split at 2**-64
    left the first factor subnormal below 2**-190 (max_norm 1e-30 on gradients of 3e38 zeroed them)."""
    from dist_clip import GradClipper

    g = torch.full((100,), 3e38).to(dtype)
    grads = {"w": g}
    max_norm = 1e-6 if case == "beside float64" else 1e-30
    if case == "beside float64":
        grads["v"] = torch.ones(3, dtype=torch.float64)
    params = {n: torch.nn.Parameter(torch.zeros_like(t)) for n, t in grads.items()}
    for n, t in grads.items():
        params[n].grad = t.clone()
    if how == "clip_grad_norm_":
        dist_clip.clip_grad_norm_(list(params.values()), max_norm)
        want_norm = reference_norm(list(grads.values()))
    else:
        GradClipper(max_norm=max_norm, mode=how)(params)
        want_norm = reference_norm([g]) if how == "per_param" else reference_norm(list(grads.values()))
    coef = max_norm / (want_norm + 1e-6)
    expected = (g.double() * coef).to(dtype)  # the exact product, rounded once to the gradient's dtype
    assert bool((expected != 0).all())
    torch.testing.assert_close(params["w"].grad, expected, rtol=2e-7 if dtype == torch.float32 else 2**-8, atol=0)


# -- bounded temporaries: the blocked passes, forced small, agree with the one-shot float64 reference ----------


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0, 3.5, math.inf])
def test_the_torch_path_rescue_and_nan_check_agree_in_small_pieces(monkeypatch, p):
    """The plain-torch path recomputed every suspicious row (all rows of a zero gradient) in one float64 copy
    (3x the gradient's bytes), and p = 0's NaN check made a bool copy: rows now go a chunk at a time (forced to
    2 rows here) and NaN is read off amax; the results are those of the float64 reference, NaN included."""
    monkeypatch.setattr(_norm, "_CHUNK", 2 * _norm.BLOCK)
    rescued = []
    rescue = _norm._rescue_rows_
    monkeypatch.setattr(_norm, "_rescue_rows_", lambda parts, body, q: rescued.append(1) or rescue(parts, body, q))
    g = torch.randn(100 * _norm.BLOCK + 7, dtype=torch.float32)  # above _SMALL: the blocked path
    g[: 10 * _norm.BLOCK] = 0.0
    g[10 * _norm.BLOCK: 20 * _norm.BLOCK] = 1e-30  # underflows in float32 squares: rescued
    g[30 * _norm.BLOCK] = 3e30  # overflows them: rescued
    assert g.numel() > _norm._SMALL
    for t in (g, g.to(torch.bfloat16)):
        got = _norm._torch_partials([t], p, torch.device("cpu"), True)[0].item()
        want = reference_norm([t], p) ** (p if 0 < p < math.inf else 1)
        assert _close(got, want, 1e-12), (t.dtype, p, got, want)
        bad = t.clone()
        bad[-1] = math.nan
        assert math.isnan(_norm._torch_partials([bad], p, torch.device("cpu"), True)[0].item())
    assert bool(rescued) == (p == 2.0)  # the rows' rescue ran where it exists (float32, p = 2)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 3.5])
def test_the_accelerator_sum_splits_large_gradients_into_pieces(monkeypatch, foreach, p):
    """On accelerators torch's vector_norm(dtype=float64) converts its whole input to float64 first (orders
    other than 1 and 2, or foreach off): gradients above _DEVICE_PIECE elements are measured in pieces whose
    sums are added per gradient on the device (run here on CPU tensors, pieces forced to 1000 elements)."""
    monkeypatch.setattr(_norm, "_DEVICE_PIECE", 1000)
    ts = [torch.randn(4321), torch.randn(0), torch.randn(999).to(torch.bfloat16), torch.randn(70, 30)]
    got = _norm._device_sum_pow(ts, p, torch.device("cpu"), foreach)
    want = [reference_norm([t], p) ** p for t in ts]
    assert got.dtype == torch.float64 and got.shape == (4,)
    for g, w in zip(got.tolist(), want):
        assert _close(g, w, 1e-12), (g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.5, math.inf])
def test_unit_wise_passes_in_blocks_agree_with_one_pass(monkeypatch, dtype, p):
    """AGC measured whole gradients and weights through vector_norm(dtype=float64) (a float64 copy of each) and
    scaled bf16 gradients through float32 copies: 1-4x their bytes. Blocks of _UNIT_BLOCK elements (forced to
    64 here: runs of rows, or pieces of one wide row) give the same unit norms and the same clipped gradients.
    The one pass is checked against the float64 reference AGC first (comparing the passes alone passed with AGC's
    limit doubled in both)."""
    from dist_clip import AGC, GradClipper, adaptive
    from dist_clip.testing import reference_agc_

    def draw() -> list[nn.Parameter]:
        torch.manual_seed(3)
        params = [nn.Parameter(torch.randn(shape).to(dtype)) for shape in ((50, 9), (3, 200), (300,), (4, 2, 20))]
        for q in params:
            q.grad = (torch.randn(q.shape) * 5).to(dtype)
        params[0].grad[7, 3] = math.nan
        return params

    def run() -> list[Tensor]:
        params = draw()
        GradClipper(mode="unitwise", norm_type=p, agc=AGC(clipping=0.01))(params)
        return [q.grad.clone() for q in params]

    whole = run()
    wide = {str(i): q.detach().double() for i, q in enumerate(draw())}
    want = {str(i): q.grad.double() for i, q in enumerate(draw())}
    reference_agc_(wide, want, 0.01, AGC().eps, p)
    elementwise = 1e-6 if dtype == torch.float32 else 2**-8  # the scaled element rounded to its dtype
    for i, got in enumerate(whole):
        torch.testing.assert_close(got.double(), want[str(i)], rtol=elementwise, atol=1e-30, equal_nan=True)
    monkeypatch.setattr(adaptive, "_UNIT_BLOCK", 64)
    assert len(adaptive._blocks(50, 9)) > 1 and len(adaptive._blocks(3, 200)) > 3
    for a, b in zip(whole, run()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_the_accelerator_scaling_branch_keeps_shapes():
    """Off the CPU a coefficient of another dtype multiplies as a 1-element operand (a 0-dim device one was cast
    to bf16/fp16 first; tests/test_gpu.py checks the values): run here on the meta device, it keeps every
    shape, 0-dim and empty gradients included, and the gradients' dtype."""
    from dist_clip import _scale

    group = [torch.empty(s, dtype=torch.bfloat16, device="meta") for s in ((), (0,), (3, 4), (2, 1, 5))]
    _scale.mul_group_(group, torch.empty((), dtype=torch.float32, device="meta"), None)
    assert [(tuple(t.shape), t.dtype) for t in group] == [((), torch.bfloat16), ((0,), torch.bfloat16),
                                                          ((3, 4), torch.bfloat16), ((2, 1, 5), torch.bfloat16)]
    with pytest.raises(RuntimeError, match="foreach=True was passed"):  # still required where asked for
        _scale.mul_group_(group, torch.empty((), dtype=torch.float32, device="meta"), True)
