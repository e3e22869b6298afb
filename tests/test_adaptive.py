"""AutoClip, ZClip and unit-wise AGC against single-process float64 reference implementations kept here.

The references below are deliberately naive transcriptions of the published algorithms (AutoClip: percentile
of the norm history, current norm included; ZClip: the paper's reference code with warm-up, EMA and z-score;
AGC: timm's ``adaptive_clip_grad``). The fast paths keep their state on the device and must agree with them,
with identical state on every rank, one collective per call, and AGC rows cut by FSDP1 flat shards combined
across ranks. Run: ``.venv/bin/python -m pytest tests/test_adaptive.py``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dist_clip import AGC, AutoClip, GradClipper, ZClip
from dist_clip.adaptive import unit_pieces
from dist_clip.testing import assert_clip_matches_unsharded, count_collectives, reference_agc_, reference_norm
from tests import beyond_cases as cases

# ------------------------------------------------------------------------------------------ references


def percentile_reference(values: list[float], q: float) -> float:
    """numpy.percentile(values, q) with linear interpolation, in plain Python."""
    s = sorted(values)
    pos = q / 100.0 * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def autoclip_reference(norms: list[float], percentile: float, window: int | None) -> list[float]:
    history: list[float] = []  # finite norms only: a window holds the last ``window`` of them
    coefs = []
    for g in norms:
        if math.isfinite(g):
            history.append(g)
        recent = history[-window:] if window else history
        threshold = percentile_reference(recent, percentile)
        coefs.append(min(1.0, threshold / (g + 1e-6)))
    return coefs


class ZClipReference:
    """The ZClip paper's reference algorithm, line by line, on Python floats."""

    def __init__(self, alpha, z_thresh, max_norm, eps, warmup, clip_option, clip_factor, skip_update_on_spike):  # noqa: ANN001
        self.alpha, self.z_thresh, self.max_norm, self.eps = alpha, z_thresh, max_norm, eps
        self.warmup, self.clip_option, self.clip_factor = warmup, clip_option, clip_factor
        self.skip = skip_update_on_spike
        self.buffer: list[float] = []
        self.initialized = False
        self.mean = self.var = 0.0

    def _clip_val(self, g: float) -> float | None:
        """The spike's replacement value once warmed up, or None when ``g`` is no spike."""
        std = self.var**0.5
        z = (g - self.mean) / (std + self.eps)
        if z <= self.z_thresh:
            return None
        if self.clip_option == "adaptive_scaling":
            return (self.mean + (self.z_thresh * std) / (z / self.z_thresh)) * self.clip_factor
        return self.mean

    def threshold(self, g: float) -> float:
        """The threshold ``step(g)`` applies, from the state before the step."""
        if not self.initialized:
            return self.max_norm if self.max_norm is not None else math.inf
        clip_val = self._clip_val(g)
        effective = clip_val if clip_val is not None else g
        return min(effective, self.max_norm) if self.max_norm is not None else effective

    def step(self, g: float) -> float:
        if not self.initialized:
            self.buffer.append(g)
            if len(self.buffer) >= self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.initialized = True
            return min(1.0, self.max_norm / (g + 1e-6)) if self.max_norm is not None else 1.0
        clip_val = self._clip_val(g)
        effective = self.threshold(g)
        coef = effective / (g + 1e-6) if g > effective else 1.0
        if clip_val is not None and self.skip:
            return coef
        fed = clip_val if clip_val is not None else g
        self.mean = self.alpha * self.mean + (1 - self.alpha) * fed
        self.var = self.alpha * self.var + (1 - self.alpha) * (fed - self.mean) ** 2
        return coef


def agc_reference(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], clipping: float, eps: float,
                  p: float) -> dict[str, torch.Tensor]:
    """timm's adaptive_clip_grad on float64 copies: unit = row along dim 0, whole tensor for 0/1-D."""
    out = {}
    for name, g in grads.items():
        g = g.detach().double().clone()
        w = params[name].detach().double()
        if g.dim() <= 1:
            wn, gn = torch.linalg.vector_norm(w, p), torch.linalg.vector_norm(g, p)
        else:
            dims = tuple(range(1, g.dim()))
            wn = torch.linalg.vector_norm(w, p, dim=dims, keepdim=True)
            gn = torch.linalg.vector_norm(g, p, dim=dims, keepdim=True)
        limit = wn.clamp(min=eps) * clipping
        out[name] = torch.where(gn < limit, g, g * (limit / gn.clamp(min=1e-6)))
    return out


def test_references_agree_with_known_values():
    assert percentile_reference([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile_reference([5.0], 10) == 5.0
    z = ZClipReference(0.5, 1.0, None, 0.0, 2, "mean", 1.0, False)
    assert [z.step(g) for g in (1.0, 3.0)] == [1.0, 1.0]  # warm-up: mean 2, std 1
    assert z.step(10.0) == pytest.approx(2.0 / (10.0 + 1e-6))  # z = 8 > 1: clipped to the mean


# ------------------------------------------------------------------------------------------ AutoClip, ZClip

NORMS_SCALE = [1.0, 1.1, 0.9, 1.2, 1.05, 30.0, 1.0, 0.95, 1.3, 50.0, 1.1, 1.0, 0.8, 1.2]


def _grads_with_norm(step: int, norm: float, rank: int, world: int) -> tuple[dict[str, torch.Tensor], float]:
    """This rank's pieces of a gradient of (about) the given norm, and the float64 reference norm."""
    g = torch.Generator().manual_seed(step)
    full = {"a": torch.randn(6, 5, generator=g, dtype=torch.float64),
            "b": torch.randn(9, generator=g, dtype=torch.float64)}
    scale = norm / reference_norm(list(full.values()))
    full = {k: v * scale for k, v in full.items()}
    mine = {k: torch.tensor_split(v.reshape(-1), world)[rank].float().clone() for k, v in full.items()}
    return mine, reference_norm(list(full.values()))


def body_thresholds() -> list:
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    thresholds = [
        AutoClip(percentile=10),
        AutoClip(percentile=50, window=5),
        ZClip(warmup_steps=4, max_norm=10.0),
        ZClip(warmup_steps=3, max_norm=None, clip_option="mean", alpha=0.9),
        ZClip(warmup_steps=3, z_thresh=1.5, clip_factor=0.8, skip_update_on_spike=True, max_norm=40.0),
    ]
    for threshold in thresholds:
        clipper = GradClipper(max_norm=threshold)
        if isinstance(threshold, AutoClip):
            ref_norms: list[float] = []
        else:
            zref = ZClipReference(threshold.alpha, threshold.z_thresh, threshold.max_norm, threshold.eps,
                                  threshold.warmup_steps, threshold.clip_option, threshold.clip_factor,
                                  threshold.skip_update_on_spike)
        got, want = [], []
        for step, scale in enumerate(NORMS_SCALE):
            mine, norm = _grads_with_norm(step, scale * 3.0, rank, world)
            before = {k: v.clone() for k, v in mine.items()}
            if step == 5:  # the profiler is slow: count the collectives of one call per threshold
                with count_collectives() as calls:
                    result = clipper(mine, group=dist.group.WORLD)
                assert calls.total == (1 if world > 1 else 0)
            else:
                result = clipper(mine, group=dist.group.WORLD)
            if isinstance(threshold, AutoClip):
                ref_norms.append(norm)
                coef = autoclip_reference(ref_norms, threshold.percentile, threshold.window)[-1]
            else:
                coef = zref.step(norm)
            got.append(result.clip_coef.item())
            want.append(coef)
            for k in mine:
                torch.testing.assert_close(mine[k].double(), before[k].double() * coef, rtol=1e-5, atol=1e-7)
        assert got == pytest.approx(want, rel=1e-5), (threshold, got, want)
        assert any(c < 0.999 for c in want) and any(c == 1.0 or c > 0.999 for c in want), want
        out.append(clipper.state_dict())
    return out


def _same_state(a, b) -> bool:  # noqa: ANN001
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0))
    if isinstance(a, float) and math.isnan(a):  # (a skipped norm in an AutoClip history)
        return isinstance(b, float) and math.isnan(b)
    return a == b


def test_autoclip_and_zclip_match_references_with_identical_state(run_ranks):
    states = run_ranks(2, body_thresholds)
    assert all(_same_state(s, states[0]) for s in states), "adaptive state differs across ranks"


def body_state_loaded_on_one_rank(kind: str) -> str:
    """Both ranks' clippers alike, but only rank 0 loads a state that has seen one norm (its history, and so its
    threshold, is another rank's): the next call must raise on every rank."""
    threshold = AutoClip(percentile=50) if kind == "autoclip" else ZClip(warmup_steps=1, max_norm=None)
    clipper = GradClipper(max_norm=threshold)
    if dist.get_rank() == 0:
        seen = GradClipper(max_norm=threshold)
        seen([torch.tensor([30.0, 40.0])])
        clipper.load_state_dict(seen.state_dict())
    g = torch.tensor([3.0, 4.0]) * (dist.get_rank() + 1)
    try:
        clipper({"g": g}, group=dist.group.WORLD)
    except RuntimeError as e:
        return "disagree on its settings" in str(e) and f"threshold_calls={1 - dist.get_rank()}" in str(e)
    return "measured"


@pytest.mark.parametrize("kind", ["autoclip", "zclip"])
def test_an_adaptive_state_loaded_on_one_rank_only_is_refused_on_every_rank(run_ranks, kind):
    """A checkpoint's clipper state loaded on one rank only gave each rank its own threshold (AutoClip: the median
    of the norms [50, 11.2] on rank 0, of [11.2] on rank 1; ZClip: rank 0 past its warm-up, rank 1 in it), so the
    pieces of one gradient could be scaled by different coefficients, unnoticed: how many norms each threshold has
    seen is part of the settings every rank's call compares."""
    assert run_ranks(2, body_state_loaded_on_one_rank, kind) == [True, True]


def test_nonfinite_norms_stay_out_of_the_history():
    clipper = GradClipper(max_norm=AutoClip(percentile=100))
    clipper([torch.full((4,), 1.0)])
    result = clipper([torch.tensor([math.inf, 0.0])])
    assert not bool(result.finite)
    result = clipper([torch.full((4,), 0.5)])  # history {2, 1}: the inf was not recorded
    assert result.max_norm.item() == pytest.approx(2.0)
    z = GradClipper(max_norm=ZClip(warmup_steps=2, max_norm=None))
    for g in (1.0, math.nan, 3.0, 2.0):
        z([torch.tensor([g])])
    state = z.state_dict()["threshold"]
    # Warm-up collects finite norms: {1, 3} gives mean 2, var 1; then 2 (z = 0) feeds the EMA.
    assert state["mean"].item() == 2.0 and state["var"].item() == pytest.approx(0.97, rel=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_zclip_moments_after_warm_up_ignore_nonfinite_norms(bad):
    """After the warm-up a non-finite norm leaves the EMA alone, as in the warm-up: fed a NaN, the mean stayed
    NaN and every later spike passed unclipped; fed an inf (a spike clipped to the mean), the variance shrank."""
    z = GradClipper(max_norm=ZClip(warmup_steps=2, max_norm=None), on_nonfinite="skip")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    for g in (1.0, 3.0):
        z([torch.tensor([g], dtype=torch.float64)], optimizer=opt)
    before = z.state_dict()["threshold"]
    assert before["mean"].item() == 2.0 and before["var"].item() == 1.0
    assert not bool(z([torch.tensor([bad], dtype=torch.float64)], optimizer=opt).finite)
    after = z.state_dict()["threshold"]
    assert after["mean"].item() == 2.0 and after["var"].item() == 1.0
    grad = torch.tensor([100.0], dtype=torch.float64)
    result = z([grad], optimizer=opt)  # z = 98 / (1 + eps): clipped to mean + 2.5 * std / (z / 2.5)
    want = 2.0 + 2.5 / (98.0 / (1.0 + 1e-6) / 2.5)
    assert result.max_norm.item() == pytest.approx(want, rel=1e-9)
    assert grad.item() == pytest.approx(want, rel=1e-6)


def test_a_new_config_assigned_between_calls_takes_effect():
    """The adaptive threshold was built once from the first config: assigning ``clipper.config`` another policy
    kept clipping at the old one's threshold (AutoClip(10) -> AutoClip(90) gave the 10th percentile), a fixed
    limit after AutoClip clipped at the AutoClip threshold, and AutoClip after a fixed limit raised a bare
    TypeError. A changed policy starts afresh, as a new clipper would; the same policy keeps its history."""

    def coefs(clipper: GradClipper, norms: list[float]) -> list[float]:
        return [clipper([torch.tensor([n, 0.0])]).clip_coef.item() for n in norms]

    first, then = [1.0, 2.0, 3.0, 4.0], [5.0, 4.5, 1.0]
    cases = [(AutoClip(percentile=10), AutoClip(percentile=90)), (AutoClip(percentile=50), 0.5),
             (1.0, AutoClip(percentile=50)), (ZClip(warmup_steps=2), AutoClip(percentile=25)),
             (AutoClip(percentile=50), ZClip(warmup_steps=2, max_norm=1.0)), (2.0, 0.5)]
    for before, after in cases:
        clipper = GradClipper(max_norm=before)
        coefs(clipper, first)
        clipper.config = dataclasses.replace(clipper.config, max_norm=after)
        assert coefs(clipper, then) == pytest.approx(coefs(GradClipper(max_norm=after), then), rel=1e-12), after
    # the same policy (another field changed) keeps its history: the 90th percentile of all seven norms
    kept, plain = GradClipper(max_norm=AutoClip(percentile=90)), GradClipper(max_norm=AutoClip(percentile=90))
    coefs(kept, first), coefs(plain, first)
    kept.config = dataclasses.replace(kept.config, on_nonfinite="zero")
    assert coefs(kept, then) == pytest.approx(coefs(plain, then), rel=1e-12)
    # another norm order starts afresh (2-norms of 0.1s set the limit for inf-norms: a 20x spike passed), and the
    # same order spelled otherwise does not
    for policy in (AutoClip(percentile=10), ZClip(warmup_steps=2)):
        switched = GradClipper(max_norm=policy)
        for _ in range(5):
            switched([torch.full((1000,), 0.1)])
        switched.config = dataclasses.replace(switched.config, norm_type="inf")
        fresh = GradClipper(max_norm=policy, norm_type=math.inf)
        for _ in range(5):  # both now see inf-norms of 0.1 only (the kept history held 2-norms of 3.16)
            switched([torch.full((1000,), 0.1)])
            fresh([torch.full((1000,), 0.1)])
        got = switched([torch.full((1000,), 2.0)]).clip_coef.item()
        assert got == pytest.approx(fresh([torch.full((1000,), 2.0)]).clip_coef.item(), rel=1e-9)
        assert fresh.state_dict()["threshold"]["norm_type"] == switched.state_dict()["threshold"]["norm_type"]
    same = GradClipper(max_norm=AutoClip(percentile=10), norm_type=math.inf)
    coefs(same, first)
    same.config = dataclasses.replace(same.config, norm_type="inf")
    assert same.state_dict()["threshold"]["count"] == 4
    with pytest.raises(TypeError, match="config must be a ClipperConfig, got dict"):
        kept.config = {"max_norm": 1.0}  # type: ignore[assignment]


def test_a_clipper_pickled_before_config_was_a_property_loads():
    """A pickle made before ``config`` became a property holds "config" in the instance dict: it loaded, then
    every use raised AttributeError ('_config'). ``pickle`` hands the old dict to ``__setstate__``."""
    import pickle

    new = GradClipper(max_norm=AutoClip(percentile=10))
    legacy = dict(vars(new))
    legacy["config"] = legacy.pop("_config")
    old = GradClipper.__new__(GradClipper)
    old.__setstate__(legacy)
    assert old.config == new.config and "_config" in vars(old) and "config" not in vars(old)
    assert old([torch.tensor([3.0, 4.0])]).total_norm.item() == 5.0 and old.state_dict()["step"] == 1
    assert pickle.loads(pickle.dumps(old)).config == new.config


@pytest.mark.parametrize("policy", ["skip", "zero", "ignore", "error"])
def test_autoclip_window_holds_the_last_finite_norms(policy):
    """The window's write position moved on every call: three skipped NaN steps in a window of 3 evicted every
    finite norm, so the spike of 1000 that followed set its own threshold (1000) and passed unclipped."""
    clipper = GradClipper(max_norm=AutoClip(percentile=10, window=3), on_nonfinite=policy)
    norms = [1.0, 2.0, 1.5, math.nan, math.inf, math.nan, 1000.0, 3.0, math.nan, 0.5]
    want = autoclip_reference(norms, 10, 3)
    for i, g in enumerate(norms):
        grad = torch.tensor([g, 0.0])
        opt = torch.optim.SGD([torch.nn.Parameter(grad.clone())], lr=0.1) if policy == "skip" else None
        if policy == "error" and not math.isfinite(g):
            with pytest.raises(RuntimeError, match="gradient norm of order 2.0 is non-finite"):
                clipper([grad])
            continue
        result = clipper([grad], optimizer=opt)
        if math.isfinite(g):
            assert result.clip_coef.item() == pytest.approx(want[i], rel=1e-6), (i, g)
            assert grad[0].item() == pytest.approx(g * want[i], rel=1e-6)
    assert want[6] == pytest.approx(1.6 / 1000.0, rel=1e-6)  # 10th percentile of {2, 1.5, 1000}, not 1000


def test_autoclip_percentile_spelled_out_is_torch_s_below_its_limit():
    """AutoClip's percentile past torch's limit (:func:`dist_clip.adaptive.nanquantile` beyond ``limit`` values,
    forced here on small histories) is ``torch.nanquantile``'s linear one bit for bit, NaN entries (skipped norms)
    left out, and NaN where every entry is: the thresholds below the limit are the ones torch gave."""
    from dist_clip.adaptive import nanquantile

    for seed in range(120):
        g = torch.Generator().manual_seed(seed)
        n = [1, 2, 3, 7, 64, 1000][seed % 6]
        values = torch.rand(n, dtype=torch.float64, generator=g) * 10.0 ** (seed % 7 - 3)
        values[torch.rand(n, generator=g) < (seed % 4) / 4] = math.nan  # (every one, some, none)
        for percentile in (0.0, 100.0, 50.0, 10.0, 33.3, 99.9, 100.0 * torch.rand((), generator=g).item()):
            want = torch.nanquantile(values, percentile / 100.0, interpolation="linear")
            got = nanquantile(values, percentile / 100.0, limit=0)
            assert got.shape == () and got.dtype == torch.float64, (seed, percentile)
            assert torch.equal(got, want) or (want.isnan() and got.isnan()), (seed, percentile, got, want)


def test_autoclip_keeps_clipping_past_2_24_norms():
    """Call 2^24 + 1 of an AutoClip keeping every norm (about 16.8 M steps in) raised torch's "quantile() input
    tensor is too large" (``torch.nanquantile`` takes at most 2^24 values), and a ``window`` over 2^24 was refused:
    the threshold of 2^24 + 1 norms (a history set directly, a tenth of them skipped) is numpy's percentile of the
    finite ones (to the last bit's rounding of torch's interpolation)."""
    np = pytest.importorskip("numpy")
    from dist_clip.adaptive import _AutoClipState

    assert AutoClip(window=2**24 + 1).window == 2**24 + 1
    state = _AutoClipState(AutoClip(percentile=10))
    g = torch.Generator().manual_seed(0)
    history = torch.rand(2**24, dtype=torch.float64, generator=g) * 100.0
    history[::10] = math.nan
    state.buffer = torch.cat([history, torch.full((2**24,), math.nan, dtype=torch.float64)])
    state.count = 2**24
    total = torch.tensor(37.5, dtype=torch.float64)
    threshold = state.threshold(total, torch.tensor(True)).item()
    kept = torch.cat([history, total.reshape(1)]).numpy()
    want = float(np.nanpercentile(kept, 10.0))
    assert math.isclose(threshold, want, rel_tol=1e-15), (threshold, want)


def test_autoclip_window_state_round_trips_mid_ring():
    """A windowed history saved after the ring wrapped (non-finite norms among the calls) reloads into a
    clipper that continues exactly as the saved one, in a fresh clipper and across a save of a save."""
    norms = [1.0, math.nan, 2.0, 4.0, 3.0, math.inf, 5.0, 0.5, 2.5, 7.0, math.nan, 1.2]
    first = GradClipper(max_norm=AutoClip(percentile=40, window=4))
    for g in norms[:7]:
        first([torch.tensor([g])])
    state = first.state_dict()
    assert state["threshold"]["history"] == [2.0, 4.0, 3.0, 5.0]
    second = GradClipper(max_norm=AutoClip(percentile=40, window=4))
    second.load_state_dict(state)
    assert _same_state(second.state_dict(), state)
    want = autoclip_reference(norms, 40, 4)
    for i, g in enumerate(norms[7:], start=7):
        a, b = first([torch.tensor([g])]), second([torch.tensor([g])])
        assert a.clip_coef.nan_to_num(-1).item() == b.clip_coef.nan_to_num(-1).item()
        if math.isfinite(g):
            assert a.clip_coef.item() == pytest.approx(want[i], rel=1e-6)
    few = GradClipper(max_norm=AutoClip(percentile=40, window=4))
    for g in (math.nan, 1.0, math.nan):  # fewer finite norms than calls: NaN in front, as many entries as calls
        few([torch.tensor([g])])
    assert torch.tensor(few.state_dict()["threshold"]["history"]).nan_to_num(-1).tolist() == [-1.0, -1.0, 1.0]


def test_unitwise_refuses_a_gradient_whose_elements_share_memory_before_scaling():
    """A bias gradient that is an expand() (stride 0): AGC scaled the weight's rows, then torch's copy into the
    bias refused it (half-clipped). Its units would share memory, each with its own coefficient: refused first."""
    m = torch.nn.Linear(3, 4)
    m.weight.grad = torch.full((4, 3), 50.0)
    m.bias.grad = torch.full((1,), 50.0).expand(4)
    before = m.weight.grad.clone()
    with pytest.raises(ValueError, match=r"'bias''s has stride 0 .*clone\(\) first"):
        GradClipper(mode="unitwise", agc=AGC(clipping=0.01))(m)
    assert torch.equal(m.weight.grad, before)


def test_autoclip_state_of_another_window_is_refused_naming_the_window():
    """A state saved with window=4 loaded into window=3 (or no window) was refused with "must be a 1-D float
    tensor of 3 norms" only: the message names the window and what the state holds."""
    saved = GradClipper(max_norm=AutoClip(percentile=40, window=4))
    for g in (1.0, 2.0, 3.0, 4.0, 5.0):
        saved([torch.tensor([g])])
    state = saved.state_dict()
    with pytest.raises(ValueError, match=r"window=3 norms and the state counts 5 calls; it holds 4 norms"):
        GradClipper(max_norm=AutoClip(percentile=40, window=3)).load_state_dict(state)
    with pytest.raises(ValueError, match=r"counts 5 calls \(this AutoClip has no window\); it holds 4 norms"):
        GradClipper(max_norm=AutoClip(percentile=40)).load_state_dict(state)
    other = GradClipper(max_norm=AutoClip(percentile=90, window=4))  # another percentile: the norms load
    other.load_state_dict(state)
    assert other.state_dict()["threshold"]["history"] == [2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("value", [torch.tensor([True, False]), 1, "yes"])
def test_an_autoclip_state_whose_oldest_first_is_no_bool_is_refused_naming_it(value):
    """'oldest_first' was read by its truth value: a 2-element tensor raised torch's ambiguity RuntimeError, a
    string or a 1 were taken for True."""
    clipper = GradClipper(max_norm=AutoClip(window=3))
    for g in (1.0, 2.0, 1.5, 1.2):
        clipper([torch.tensor([g])])
    state = clipper.state_dict()
    state["threshold"]["oldest_first"] = value
    with pytest.raises(TypeError, match="oldest_first"):
        clipper.load_state_dict(state)


def test_autoclip_window_state_saved_in_ring_order_still_loads():
    """States saved before the window held finite norms only keep the window in ring order (the oldest at
    count % window) and have no "oldest_first": read as oldest first, the newest norm was evicted next."""
    clipper = GradClipper(max_norm=AutoClip(percentile=0, window=4))
    old = {"version": 1, "step": 6, "num_clipped": torch.tensor(0), "num_nonfinite": torch.tensor(0),
           "threshold": {"kind": "AutoClip", "count": 6, "history": torch.tensor([5.0, 6.0, 3.0, 4.0],
                                                                                dtype=torch.float64)}}
    clipper.load_state_dict(old)  # norms 1..6 seen: the window is 3, 4, 5, 6; a 7 evicts the 3
    assert clipper([torch.tensor([7.0])]).max_norm.item() == 4.0
    assert clipper.state_dict()["threshold"]["history"] == [4.0, 5.0, 6.0, 7.0]
    with pytest.raises(ValueError, match="AutoClip state has unknown keys"):
        clipper.load_state_dict({**old, "threshold": {**old["threshold"], "extra": 1}})


def test_autoclip_window_state_in_ring_order_with_a_skipped_norm_keeps_its_finite_norms():
    """An old ring-order state holds NaN where a call's norm was not finite: only its finite norms enter the
    window, oldest first, so the next norm fills the free place instead of evicting the oldest finite one
    (the NaN taken as a norm's place evicted the 3 at once: limit 5 for 3)."""
    clipper = GradClipper(max_norm=AutoClip(percentile=0, window=4))
    old = {"version": 1, "step": 6, "num_clipped": torch.tensor(0), "num_nonfinite": torch.tensor(1),
           "threshold": {"kind": "AutoClip", "count": 6, "history": torch.tensor([5.0, 6.0, 3.0, math.nan],
                                                                                dtype=torch.float64)}}
    clipper.load_state_dict(old)  # norms 1, 2, 3, NaN, 5, 6 in a ring of 4: finite 3, 5, 6 remain
    assert torch.tensor(clipper.state_dict()["threshold"]["history"]).nan_to_num(-1).tolist() == [-1.0, 3.0, 5.0, 6.0]
    assert clipper([torch.tensor([7.0])]).max_norm.item() == 3.0
    assert clipper.state_dict()["threshold"]["history"] == [3.0, 5.0, 6.0, 7.0]
    assert clipper([torch.tensor([8.0])]).max_norm.item() == 5.0  # now the 3 leaves


def test_adaptive_coefficients_of_nonfinite_norms_follow_torch_under_ignore():
    """With on_nonfinite="ignore" the coefficient is torch's: 0 for an inf norm (AutoClip's first call, with no
    finite history, gave NaN and turned finite entries NaN) and NaN for a NaN norm (ZClip after warm-up gave 1:
    NaN > threshold is False)."""
    auto = GradClipper(max_norm=AutoClip(percentile=10), on_nonfinite="ignore")
    grad = torch.tensor([math.inf, 1.0])
    assert auto([grad]).clip_coef.item() == 0.0
    assert grad[1].item() == 0.0
    z = GradClipper(max_norm=ZClip(warmup_steps=2), on_nonfinite="ignore")
    for g in (1.0, 1.1, 1.05):
        z([torch.tensor([g])])
    grad = torch.tensor([math.nan, 5.0])
    assert math.isnan(z([grad]).clip_coef.item())
    assert math.isnan(grad[1].item())
    grad = torch.tensor([math.inf, 5.0])
    assert z([grad]).clip_coef.item() == 0.0


def test_adaptive_coefficients_divide_by_the_norm_plus_1e_6():
    """Both policies clip as torch.nn.utils.clip_grad_norm_ at their threshold: threshold / (norm + 1e-6), so a
    norm of 1e-6 at a threshold of 1e-6 is halved (a coefficient of threshold / norm left it as it was)."""
    auto = GradClipper(max_norm=AutoClip(percentile=0))
    assert auto([torch.tensor([1e-6], dtype=torch.float64)]).clip_coef.item() == pytest.approx(0.5, rel=1e-12)
    z = GradClipper(max_norm=ZClip(warmup_steps=1, max_norm=1e-6))
    assert z([torch.tensor([1e-6], dtype=torch.float64)]).clip_coef.item() == pytest.approx(0.5, rel=1e-12)
    # after the warm-up: no spike (z = 1), the threshold is max_norm
    assert z([torch.tensor([2e-6], dtype=torch.float64)]).clip_coef.item() == pytest.approx(1 / 3, rel=1e-12)


def test_zclip_a_z_score_equal_to_z_thresh_is_no_spike():
    """A spike is a norm whose z-score exceeds z_thresh (the paper's reference code: ``z <= z_thresh`` is none):
    after a warm-up of equal norms (std 0), a norm whose z is exactly z_thresh passes unclipped, as the reference
    gives; taken for a spike, it was clipped to the mean (coefficient 0.5)."""
    threshold = ZClip(warmup_steps=2, z_thresh=2.0, eps=0.5, max_norm=None)
    clipper = GradClipper(max_norm=threshold)
    ref = ZClipReference(threshold.alpha, threshold.z_thresh, None, threshold.eps, 2, threshold.clip_option,
                         threshold.clip_factor, threshold.skip_update_on_spike)
    coefs = [clipper([torch.tensor([g], dtype=torch.float64)]).clip_coef.item() for g in (1.0, 1.0, 2.0)]
    assert coefs == [ref.step(g) for g in (1.0, 1.0, 2.0)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("max_norm", [None, 10.0])
def test_zclip_warm_up_collects_finite_norms_only(max_norm):
    """Warm-up counted calls: a warm-up of non-finite norms only (fp16 overflows in the first steps) left the
    mean NaN for good, and every later spike went unclipped (coef 1.0 for a norm of 100 among norms near 1).
    It must end after warmup_steps finite norms, as the reference fed those norms only."""
    threshold = ZClip(warmup_steps=3, max_norm=max_norm)
    clipper = GradClipper(max_norm=threshold)
    ref = ZClipReference(threshold.alpha, threshold.z_thresh, max_norm, threshold.eps, 3, threshold.clip_option,
                         threshold.clip_factor, threshold.skip_update_on_spike)
    norms = [math.inf, math.nan, math.inf, 1.0, 1.2, math.nan, 0.9, 1.1, 1.0, 100.0, 1.05]
    coefs = []
    for g in norms:
        result = clipper([torch.tensor([g, 0.0], dtype=torch.float64)])
        if math.isfinite(g):
            coefs.append(result.clip_coef.item())
            assert coefs[-1] == pytest.approx(ref.step(g), rel=1e-12), (g, coefs)
    assert coefs[-2] < 0.05  # the spike of 100 is clipped
    state = clipper.state_dict()
    assert state["step"] == len(norms) and int(state["num_nonfinite"]) == 4
    assert state["threshold"]["mean"].item() == pytest.approx(ref.mean, rel=1e-12)


def test_zclip_without_max_norm_leaves_warm_up_gradients_alone():
    """max_norm=None clips nothing during warm-up: a non-finite norm there gave inf / NaN = NaN as the
    coefficient, and every finite gradient became NaN under the default policy (after warm-up a NaN norm
    already left them alone)."""
    for bad in (math.nan, math.inf):
        clipper = GradClipper(max_norm=ZClip(warmup_steps=3, max_norm=None))
        finite_piece = torch.tensor([3.0, 4.0])
        result = clipper([finite_piece, torch.tensor([bad, 1.0])])
        assert result.clip_coef.item() == 1.0 and not bool(result.finite)
        assert torch.equal(finite_piece, torch.tensor([3.0, 4.0]))


def test_step_and_counters_move_once_per_measured_call():
    """The step counter moved on calls that raised on bad input before measuring anything; the "error" policy
    raised before counting its non-finite call (num_nonfinite stayed 0 while the step moved)."""
    clipper = GradClipper(max_norm=ZClip(warmup_steps=2), on_nonfinite="error")
    clipper([torch.tensor([0.5])])
    with pytest.raises(RuntimeError, match="non-finite"):
        clipper([torch.tensor([math.nan])])
    with pytest.raises(TypeError):
        clipper([torch.tensor([1, 2])])  # integer gradients
    state = clipper.state_dict()
    assert state["step"] == 2 and int(state["num_nonfinite"]) == 1 and int(state["num_clipped"]) == 0
    assert state["threshold"]["seen"].item() == 1.0  # the NaN took no warm-up slot


@pytest.mark.parametrize("key,value,error", [
    ("step", -5, ValueError), ("step", "3", TypeError), ("num_clipped", torch.tensor([1, 2]), ValueError),
    ("num_clipped", 2.7, TypeError), ("num_nonfinite", torch.tensor(1.5), ValueError),
    ("mean", torch.zeros(2), ValueError), ("mean", "1.0", ValueError), ("seen", torch.tensor(9.0), ValueError),
    ("kind", None, ValueError),
    # Taken as they came before: a NaN mean after the warm-up (ZClip off for good), a negative
    # variance, a fractional or bool 'seen', an inf warm-up norm, a counter above the step, unknown keys.
    ("mean", torch.tensor(math.nan, dtype=torch.float64), ValueError),
    ("var", torch.tensor(-1.0, dtype=torch.float64), ValueError), ("seen", torch.tensor(2.5), ValueError),
    ("seen", torch.tensor(True), ValueError), ("warmup", torch.tensor([1.0, math.inf, 1.5]), ValueError),
    ("num_clipped", 9, ValueError), ("extra", 1, ValueError), ("zzz", 1, ValueError),
    ("num_clipped", 5, ValueError), ("num_nonfinite", torch.tensor(5), ValueError),  # one above the 4 steps
    # Meta tensors raised torch's RuntimeError / NotImplementedError from deep in the load; another norm order
    # was taken (a history of 2-norms set the limit for inf-norms).
    ("mean", torch.empty((), dtype=torch.float64, device="meta"), ValueError),
    ("num_clipped", torch.empty((), dtype=torch.int64, device="meta"), ValueError),
    ("norm_type", math.inf, ValueError), ("norm_type", 1, ValueError), ("norm_type", "fro", ValueError),
    # A version compared with != (True and 1.0 passed; a tensor raised torch's ambiguity RuntimeError); a kind
    # compared likewise (a tensor raised the same RuntimeError, a number a message naming no key).
    ("version", True, ValueError), ("version", 1.0, ValueError), ("version", torch.tensor([1, 1]), ValueError),
    ("version", "1", ValueError), ("kind", torch.tensor([1, 2]), TypeError), ("kind", 5, TypeError),
    ("version", 2, ValueError), ("version", 0, ValueError),  # an integer, but not this format's
])
def test_bad_state_is_refused_and_leaves_the_clipper_as_it_was(key, value, error):
    """A bad state was half loaded (the ZClip count replaced, then a RuntimeError on the mean's shape) or taken
    as is (a negative step, a float counter cut to an int, the values below)."""
    clipper = GradClipper(max_norm=ZClip(warmup_steps=3))
    for g in (1.0, 2.0, 1.5, 1.2):
        clipper([torch.tensor([g])])
    before = clipper.state_dict()
    state = clipper.state_dict()
    where = state["threshold"] if key in ("mean", "var", "seen", "warmup", "kind", "zzz", "norm_type") else state
    if value is None:
        del where[key]
    else:
        where[key] = value
    with pytest.raises(error):
        clipper.load_state_dict(state)
    assert _same_state(clipper.state_dict(), before)


def test_a_state_loads_only_into_a_clipper_of_the_same_norm_order():
    """An AutoClip history of 2-norms loaded into an inf-norm clipper and set its limit, unnoticed. The order
    now travels with the state; a state saved before it did (no "norm_type") loads as before."""
    saved = GradClipper(max_norm=AutoClip(percentile=50.0))
    for g in (1.0, 2.0, 3.0):
        saved([torch.tensor([g, g])])
    state = saved.state_dict()
    assert state["threshold"]["norm_type"] == 2.0
    other = GradClipper(max_norm=AutoClip(percentile=50.0), norm_type="inf")
    with pytest.raises(ValueError, match=r"norms of order 2.0, this clipper takes norms of order inf"):
        other.load_state_dict(state)
    assert other.state_dict()["step"] == 0
    same = GradClipper(max_norm=AutoClip(percentile=50.0), norm_type=2)
    same.load_state_dict(state)
    assert _same_state(same.state_dict(), state)
    del state["threshold"]["norm_type"]
    other.load_state_dict(state)
    assert other.state_dict()["step"] == 3


def test_a_zclip_state_with_moments_beyond_float64_reloads():
    """float64 norms near the top of the range (1e300, p = 1) give ZClip an infinite variance, which it saves:
    the state it saved itself must load (the validation refused +inf at first)."""
    p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    clipper = GradClipper(max_norm=ZClip(warmup_steps=2, max_norm=None), norm_type=1.0)
    for n in (1e300, 1.0, 1e200):
        p.grad = torch.full((1,), n, dtype=torch.float64)
        clipper([p])
    state = clipper.state_dict()
    assert math.isinf(state["threshold"]["var"].item())
    again = GradClipper(max_norm=ZClip(warmup_steps=2, max_norm=None), norm_type=1.0)
    again.load_state_dict(state)
    assert _same_state(again.state_dict(), state)


@pytest.mark.parametrize("form", [list, lambda v: torch.tensor(v, dtype=torch.float64)], ids=["list", "tensor"])
@pytest.mark.parametrize("bad", [-5.0, math.inf, -math.inf])
def test_autoclip_history_must_hold_norms(bad, form):
    """A negative saved norm made the threshold negative and flipped the gradients' signs ([3, 4] became
    [-3, -4], clipped True); an infinite one made them NaN with finite True. NaN (a skipped norm) loads. The same
    in a history saved as a list (as state_dict() saves it) or a tensor (as it saved it before)."""
    clipper = GradClipper(max_norm=AutoClip(percentile=50))
    for g in (1.0, 2.0):
        clipper([torch.tensor([g])])
    state = clipper.state_dict()
    state["threshold"]["history"] = form([bad, 1.0])
    with pytest.raises(ValueError, match="AutoClip state 'history' must hold norms"):
        clipper.load_state_dict(state)
    state["threshold"]["history"] = form([math.nan, 1.0])
    clipper.load_state_dict(state)
    g = torch.tensor([3.0, 4.0])
    clipper([g])
    assert torch.all(g > 0)


def test_zero_norms_in_a_saved_state_reload():
    """Zero is a norm: a step whose gradients were all zero saves 0.0 in the AutoClip history and the ZClip
    warm-up, and a warm-up of equal norms a ZClip variance of exactly 0.0; the states a clipper saves must load
    and resume identically (a check taking only positive norms refused them)."""
    auto = GradClipper(max_norm=AutoClip(percentile=50.0))
    zclip = GradClipper(max_norm=ZClip(warmup_steps=2, max_norm=None))
    for clipper, norms in ((auto, (0.0, 2.0, 0.0)), (zclip, (0.0, 3.0, 3.0, 3.0))):
        for g in norms:
            clipper([torch.tensor([g], dtype=torch.float64)])
    assert auto.state_dict()["threshold"]["history"] == [0.0, 2.0, 0.0]
    assert zclip.state_dict()["threshold"]["warmup"].tolist() == [0.0, 3.0]
    zero_var = GradClipper(max_norm=ZClip(warmup_steps=2, max_norm=None))
    for g in (3.0, 3.0):
        zero_var([torch.tensor([g], dtype=torch.float64)])
    assert zero_var.state_dict()["threshold"]["var"].item() == 0.0
    for clipper in (auto, zclip, zero_var):
        again = GradClipper(clipper.config)
        again.load_state_dict(clipper.state_dict())
        assert _same_state(again.state_dict(), clipper.state_dict())
        a, b = torch.tensor([5.0], dtype=torch.float64), torch.tensor([5.0], dtype=torch.float64)
        assert clipper([a]).clip_coef.item() == again([b]).clip_coef.item()
        assert torch.equal(a, b)


@pytest.mark.parametrize("policy", [ZClip(warmup_steps=2), AutoClip(percentile=50.0), AutoClip(window=3)])
def test_a_state_saved_before_the_first_call_reloads(policy):
    """A checkpoint written before the first clip (step 0) holds the empty threshold state: it must load, and
    the clipper then runs as a new one."""
    saved = GradClipper(max_norm=policy)
    state = saved.state_dict()
    again = GradClipper(max_norm=policy)
    again.load_state_dict(state)
    assert _same_state(again.state_dict(), state)
    for g in (1.0, 2.0, 9.0):
        a, b = torch.tensor([g], dtype=torch.float64), torch.tensor([g], dtype=torch.float64)
        assert saved([a]).clip_coef.item() == again([b]).clip_coef.item()
        assert torch.equal(a, b)


@pytest.mark.parametrize("window", [None, 4])
def test_autoclip_history_is_a_list_of_its_float64_norms_that_loads_as_saved_and_as_saved_before(window):
    """The history is saved as a list of Python floats (torch.distributed.checkpoint loads such a value whole;
    a tensor it loads into the fresh clipper's empty one, and refused): each the float64 norm measured, exactly
    (0.1-like norms whose float32 rounding would show), NaN for a skipped call. torch.load(weights_only=True)
    reads it, and a state whose history is a tensor, as saved before, loads as it did; both resume alike."""
    import io

    norms = [0.1, 0.7, math.inf, 1 / 3, 2.0 ** 0.5, 1e-30, 5.5, math.nan, 0.2, 3.0]
    clipper = GradClipper(max_norm=AutoClip(percentile=40, window=window))
    seen = [clipper([torch.tensor([g], dtype=torch.float64)]).total_norm.item() for g in norms[:7]]
    hist = clipper.state_dict()["threshold"]["history"]
    assert type(hist) is list and all(type(x) is float for x in hist)
    finite = [x for x in seen if math.isfinite(x)]
    if window is None:
        assert [x for x in hist if not math.isnan(x)] == finite == [0.1, 0.7, 1 / 3, 2.0 ** 0.5, 1e-30, 5.5]
        assert len(hist) == 7 and math.isnan(hist[2])
    else:
        assert hist == finite[-4:]
    buf = io.BytesIO()
    torch.save(clipper.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert _same_state(state, clipper.state_dict())
    old = {**state, "threshold": {**state["threshold"],
                                  "history": torch.tensor(state["threshold"]["history"], dtype=torch.float64)}}
    resumed = []
    for saved in (state, old):
        again = GradClipper(max_norm=AutoClip(percentile=40, window=window))
        again.load_state_dict(saved)
        assert _same_state(again.state_dict(), clipper.state_dict())
        resumed.append(again)
    for g in norms[7:]:
        want = clipper([torch.tensor([g], dtype=torch.float64)])
        for again in resumed:
            got = again([torch.tensor([g], dtype=torch.float64)])
            assert got.max_norm.nan_to_num(-1).item() == want.max_norm.nan_to_num(-1).item()
            assert got.clip_coef.nan_to_num(-1).item() == want.clip_coef.nan_to_num(-1).item()


@pytest.mark.parametrize("history", [[True, 1.0], ["1.0", 2.0], [[1.0], 2.0], [torch.tensor(1.0), 2.0], "12",
                                     torch.tensor([[1.0, 2.0]]), torch.tensor([1, 2]), {0: 1.0, 1: 2.0}, 2.0])
def test_autoclip_history_that_is_no_list_of_numbers_is_refused(history):
    """A saved history is a list of numbers (or a 1-D float tensor of them, as saved before); a bool, a string,
    a nested list or a tensor among them is refused with the count it must hold, as is any other container."""
    clipper = GradClipper(max_norm=AutoClip(percentile=50))
    for g in (1.0, 2.0):
        clipper([torch.tensor([g])])
    state = clipper.state_dict()
    state["threshold"]["history"] = history
    with pytest.raises(ValueError, match=r"AutoClip state 'history' must be a list of 2 norms \(or a 1-D float "
                                         r"tensor of them\) \(the state counts 2 calls"):
        clipper.load_state_dict(state)
    state["threshold"]["history"] = [2.0, 10**400]
    with pytest.raises(ValueError, match="must fit a float64"):
        clipper.load_state_dict(state)
    state["threshold"]["history"] = [2.0, torch.empty((), device="meta")]
    with pytest.raises(ValueError, match=r"meta tensors.*\['history'\]\[1\]"):
        clipper.load_state_dict(state)
    state["threshold"]["history"] = [2, 1]  # whole numbers are norms too
    clipper.load_state_dict(state)
    assert clipper.state_dict()["threshold"]["history"] == [2.0, 1.0]
    state["threshold"]["history"] = (2.0, 1)  # and a tuple of them, as a list
    clipper.load_state_dict(state)
    assert clipper.state_dict()["threshold"]["history"] == [2.0, 1.0]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_dcp_checkpoint_of_a_tensor_history_loads_into_a_state_holding_an_empty_one(tmp_path):
    """README: a DCP checkpoint of a state saved before the history was a list holds a tensor there (those saved
    before the first call, of 0 norms, were the only ones DCP loaded). It reads into a state whose history is set
    to an empty float64 tensor; a checkpoint of the list reads into that state too (DCP replaces the value)."""
    import torch.distributed.checkpoint as dcp

    old = GradClipper(max_norm=AutoClip()).state_dict()
    old["threshold"]["history"] = torch.empty(0, dtype=torch.float64)
    dcp.save({"clipper": old}, checkpoint_id=str(tmp_path / "old"), no_dist=True)
    with pytest.raises(dcp.api.CheckpointException, match="expected BytesStorageMetadata"):  # (as it is now)
        dcp.load({"clipper": GradClipper(max_norm=AutoClip()).state_dict()},
                 checkpoint_id=str(tmp_path / "old"), no_dist=True)
    grown = GradClipper(max_norm=AutoClip())
    for g in (3.0, 1.0):
        grown([torch.tensor([g], dtype=torch.float64)])
    dcp.save({"clipper": grown}, checkpoint_id=str(tmp_path / "new"), no_dist=True)
    for name, want in (("old", []), ("new", [3.0, 1.0])):
        clipper = GradClipper(max_norm=AutoClip())
        state = clipper.state_dict()
        state["threshold"]["history"] = torch.empty(0, dtype=torch.float64)
        app = {"clipper": state}
        dcp.load(app, checkpoint_id=str(tmp_path / name), no_dist=True)
        clipper.load_state_dict(app["clipper"])
        assert clipper.state_dict()["threshold"]["history"] == want and clipper.step == len(want)


def _int_grads(step: int, rank: int, world: int) -> dict[str, Tensor]:
    """One 12-element gradient per step, split over ``world`` ranks (1, 2 or 3), of whole numbers: its squares
    add exactly in any order, so every world measures the same total norm, bit for bit; step 2 reads inf."""
    g = torch.Generator().manual_seed(step)
    full = torch.randint(-9, 10, (12,), generator=g).float() * (1 + step % 4)
    if step == 2:
        full[5] = math.inf
    n = 12 // world
    return {"w": full[rank * n : (rank + 1) * n].clone()}


# (policy, saved after this many calls): no window; a window of 8 saved half full (5 calls, one of them inf);
# a window of 3 saved full, after its ring wrapped
_AUTOCLIP_DCP = ((AutoClip(percentile=30), 6), (AutoClip(percentile=30, window=8), 5),
                 (AutoClip(percentile=60, window=3), 7))


def body_autoclip_dcp_save(path: str) -> list:
    import torch.distributed.checkpoint as dcp

    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for i, (policy, cut) in enumerate(_AUTOCLIP_DCP):
        clipper = GradClipper(max_norm=policy)
        coefs, saved = [], None
        for s in range(cut + 6):
            if s == cut:  # the clipper as DCP's Stateful, beside a tensor (as an app state holds a model's)
                dcp.save({"clipper": clipper, "other": torch.ones(2)}, checkpoint_id=f"{path}/{i}")
                saved = clipper.state_dict()
            coefs.append(clipper(_int_grads(s, rank, world), group=dist.group.WORLD).clip_coef.item())
        out.append([coefs[cut:], saved])
    return out


def body_autoclip_dcp_load(path: str) -> list:
    import torch.distributed.checkpoint as dcp

    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for i, (policy, cut) in enumerate(_AUTOCLIP_DCP):
        clipper = GradClipper(max_norm=policy)
        if i % 2:  # as a Stateful, or its state_dict() loaded in place, then handed to load_state_dict
            dcp.load({"clipper": clipper, "other": torch.zeros(2)}, checkpoint_id=f"{path}/{i}")
        else:
            app = {"clipper": GradClipper(max_norm=policy).state_dict(), "other": torch.zeros(2)}
            dcp.load(app, checkpoint_id=f"{path}/{i}")
            clipper.load_state_dict(app["clipper"])
        loaded = clipper.state_dict()
        out.append([[clipper(_int_grads(s, rank, world), group=dist.group.WORLD).clip_coef.item()
                     for s in range(cut, cut + 6)], loaded])
    return out


def test_autoclip_state_saved_by_dcp_on_two_ranks_resumes_on_one_two_and_three(run_ranks, tmp_path):
    """An AutoClip history grows with the norms seen: torch.distributed.checkpoint, which loads a tensor into the
    fresh clipper's (empty) one, refused it ("Size mismatch between saved torch.Size([6]) and current:
    torch.Size([0]) for clipper.threshold.history"; README: torch.save it beside). Saved as a list of floats, it
    is pickled and loaded back whole: saved on 2 ranks mid-history, half a window and a full (wrapped) window in,
    loaded on 1, 2 and 3, the state is the saved one, float for float (NaN for the inf call), and the next 6
    coefficients are the uninterrupted run's, bit for bit (whole-number gradients: every world's norm is exact)."""
    straight = run_ranks(2, body_autoclip_dcp_save, str(tmp_path))
    assert _same_state(straight[0], straight[1])
    for _, saved in straight[0][:2]:  # the inf call is in the history as a skipped (NaN) norm
        assert any(math.isnan(x) for x in saved["threshold"]["history"])
    assert all(any(c < 1 for c in coefs) and any(c == 1 for c in coefs) for coefs, _ in straight[0])
    for world in (1, 2, 3):
        got = run_ranks(world, body_autoclip_dcp_load, str(tmp_path))
        for rank_got in got:
            for (want_coefs, saved), (coefs, loaded) in zip(straight[0], rank_got):
                assert _same_state(loaded, saved), (world, loaded, saved)
                assert coefs == want_coefs, (world, coefs, want_coefs)


def test_zclip_state_saved_when_warm_up_counted_calls_still_loads():
    """A state without 'seen' (saved by the version whose warm-up counted calls) resumes with its finite
    warm-up norms; a finished warm-up stays finished."""
    old = {"version": 1, "step": 2, "num_clipped": torch.tensor(0), "num_nonfinite": torch.tensor(1),
           "threshold": {"kind": "ZClip", "count": 2, "warmup": torch.tensor([math.nan, 2.0, math.nan],
                                                                             dtype=torch.float64),
                         "mean": torch.tensor(math.nan, dtype=torch.float64),
                         "var": torch.tensor(math.nan, dtype=torch.float64)}}
    clipper = GradClipper(max_norm=ZClip(warmup_steps=3))
    clipper.load_state_dict(old)
    for g in (4.0, 3.0):
        clipper([torch.tensor([g], dtype=torch.float64)])
    state = clipper.state_dict()["threshold"]
    assert state["seen"].item() == 3.0 and state["mean"].item() == 3.0
    done = {**old, "threshold": {**old["threshold"], "count": 5, "mean": torch.tensor(2.0, dtype=torch.float64),
                                 "var": torch.tensor(0.5, dtype=torch.float64)}}
    clipper = GradClipper(max_norm=ZClip(warmup_steps=3))
    clipper.load_state_dict(done)
    assert clipper.state_dict()["threshold"]["seen"].item() == 3.0
    # saved on the call that ended the warm-up (count == warmup_steps, a NaN among its norms): finished too,
    # not resumed for two more norms with the mean it had
    at_end = {**done, "step": 3, "threshold": {**done["threshold"], "count": 3}}
    clipper = GradClipper(max_norm=ZClip(warmup_steps=3, max_norm=None))
    clipper.load_state_dict(at_end)
    assert clipper.state_dict()["threshold"]["seen"].item() == 3.0
    assert clipper([torch.tensor([2.0], dtype=torch.float64)]).clip_coef.item() == 1.0
    assert clipper.state_dict()["threshold"]["mean"].item() == pytest.approx(2.0, rel=1e-12)
    # checked as the current format is (a negative mean loaded and flipped a spike's gradients: -0.06; a
    # negative variance turned spike detection off)
    for key, value in (("mean", -3.0), ("var", -4.0), ("warmup", torch.tensor([1.0, -2.0, 1.5]))):
        bad = {**done, "threshold": {**done["threshold"]}}
        bad["threshold"][key] = value if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.float64)
        if key == "warmup":
            bad["threshold"][key] = value.to(torch.float64)
        with pytest.raises(ValueError, match=f"ZClip state '{key}'"):
            GradClipper(max_norm=ZClip(warmup_steps=3)).load_state_dict(bad)


# ------------------------------------------------------------------------------------------ AGC


def test_agc_single_process_matches_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4), nn.LayerNorm(4))
    model(torch.randn(5, 2, 4, 4)).square().sum().backward()
    for p in (2.0, 1.0, math.inf):
        params = {n: q.detach().clone() for n, q in model.named_parameters()}
        grads = {n: q.grad.clone() for n, q in model.named_parameters()}
        want = agc_reference(params, grads, 0.2, 1e-3, p)
        result = GradClipper(mode="unitwise", norm_type=p, agc=AGC(0.2, 1e-3, exclude=("3.*",)))(model)
        for n, q in model.named_parameters():
            expect = grads[n].double() if n.startswith("3.") else want[n]
            torch.testing.assert_close(q.grad.double(), expect, rtol=1e-5, atol=1e-8)
            q.grad.copy_(grads[n])
        assert bool(result.clipped) and result.clip_coef.item() < 1
        assert result.max_norm.item() == pytest.approx(0.2)  # the AGC ratio, not its eps
        changed = [
            (~torch.isclose(want[n], grads[n].double())).reshape(want[n].shape[0] if want[n].dim() > 1 else 1, -1)
            .any(dim=1)
            for n in want
        ]
        units = torch.cat(changed)
        assert 0 < int(units.sum()) < units.numel()  # some units clipped, some left alone


def _full_grads_after(target, name: str) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Every full gradient on every rank, whatever the wrapper (a test-side all-gather)."""
    from dist_clip import _slots

    if name in ("ddp", "none"):
        inner = target.module if name == "ddp" else target
        return {n: q.grad.detach().double() for n, q in inner.named_parameters()}
    if name in ("fsdp2", "hsdp"):
        return {n: q.grad.full_tensor().detach().double() for n, q in target.named_parameters()}
    layout = _slots.fsdp1_pieces(target)
    local = [(pc.name, pc.start, pc.grad.detach().double().clone()) for pc in layout.pieces if pc.grad is not None]
    local += [(n, 0, q.grad.detach().double().reshape(-1).clone()) for n, q in layout.unmanaged]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    full = {n: torch.zeros(shape, dtype=torch.float64).reshape(-1) for n, (shape, _) in layout.geometry.items()}
    for pieces in gathered:
        for n, start, values in pieces:
            full[n][start : start + values.numel()] = values
    return {n: full[n].reshape(layout.geometry[n][0]) for n in full}


def body_agc_plain_pieces_with_group() -> list:
    """Plain tensors with group= are pieces of the same parameters (by position): a 1-D one is one unit cut
    across the ranks, its weight and gradient norms combined as for a Shard(0) DTensor (each rank clipped its
    piece as a whole unit: 0.01 where the float64 reference is 0.0063 on 2 ranks). 2-D pieces are whole rows."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(3)
    full_w = {"b": torch.randn(11, generator=g, dtype=torch.float64),
              "w": torch.randn(7, 4, generator=g, dtype=torch.float64)}
    full_g = {"b": torch.randn(11, generator=g, dtype=torch.float64) * 3.0,
              "w": torch.randn(7, 4, generator=g, dtype=torch.float64) * 0.05}
    full_g["w"][2] *= 100.0  # one row clipped, the others not
    out = []
    for p, absent in ((2.0, False), (1.0, False), (math.inf, False), (2.0, True), (math.inf, True)):
        # absent: the last rank's piece of "b" has no gradient (read as zeros: its weight piece still counts in
        # the unit's weight norm; left out, the other ranks clipped by their own pieces' limit, 10x too far)
        grads = dict(full_g)
        if absent:
            grads["b"] = full_g["b"].clone()
            grads["b"][torch.tensor_split(torch.arange(11), world)[world - 1]] = 0.0
        want = agc_reference(full_w, grads, 0.05, 1e-3, p)
        mine, got_back = {}, {}
        for name in full_w:
            piece = torch.tensor_split(torch.arange(full_w[name].shape[0]), world)[rank]  # uneven: 6/5 and 4/3 rows
            q = nn.Parameter(full_w[name][piece].float().clone())
            if not (absent and name == "b" and rank == world - 1):
                q.grad = grads[name][piece].float().clone()
            mine[name], got_back[name] = q, piece
        GradClipper(mode="unitwise", norm_type=p, agc=AGC(clipping=0.05, eps=1e-3))(mine, group=dist.group.WORLD)
        for name, q in mine.items():
            if q.grad is not None:
                torch.testing.assert_close(q.grad.double(), want[name][got_back[name]], rtol=1e-5, atol=1e-9)
        out.append(float(mine["w"].grad.double().norm()))
    # A 1-D parameter without a gradient on any rank stays out of the report, as in every mode (its zero stand-in
    # for the weight norm was reported at 0)
    nothing = nn.Parameter(torch.ones(3))
    report = GradClipper(mode="unitwise", report=True)({"w": mine["w"], "none": nothing}, group=dist.group.WORLD)
    assert set(report.norms) == {"w"} and nothing.grad is None, report.norms
    # An excluded cut unit is left alone and stays out of clip_coef and clipped (its coefficient, 0.0175, was
    # reported as the smallest applied, and the call counted as clipped, though nothing was scaled)
    for name, q in mine.items():
        q.grad = (full_g[name][got_back[name]] * (1.0 if name == "b" else 1e-4)).float()
    before = {name: q.grad.clone() for name, q in mine.items()}
    result = GradClipper(mode="unitwise", agc=AGC(clipping=0.05, exclude=("b",)))(mine, group=dist.group.WORLD)
    assert all(torch.equal(q.grad, before[name]) for name, q in mine.items())
    assert result.clip_coef.item() == 1.0 and not bool(result.clipped), result
    return out


def test_agc_plain_one_dimensional_pieces_with_group_are_one_cut_unit(run_ranks):
    for world in (2, 3):
        run_ranks(world, body_agc_plain_pieces_with_group)


def body_scaling_that_raises_on_one_rank() -> list:
    """Rank 1's gradients are inference tensors (made under torch.inference_mode()): measured and combined like
    any others, but torch refuses to scale them in place, on that rank only, after the collective. Its clipper
    had not counted the call (step 2 where rank 0's read 3, with an AutoClip count of 3 on both): checkpoints
    saved on different ranks differed. Every rank now counts a measured call before scaling."""
    rank = dist.get_rank()
    out = []
    for mode, limit in (("total", 1.0), ("total", AutoClip(percentile=50.0)), ("per_param", 1.0), ("unitwise", 1.0)):
        kwargs = {"agc": AGC(clipping=0.01)} if mode == "unitwise" else {"max_norm": limit}
        clipper = GradClipper(mode=mode, **kwargs)
        params = [nn.Parameter(torch.ones(3, 4)), nn.Parameter(torch.ones(4))]
        for call in range(3):
            for q in params:
                q.grad = torch.full_like(q, 10.0 + call + rank)
                if call == 1 and rank == 1:
                    with torch.inference_mode():
                        q.grad = torch.full_like(q, 11.0 + rank)
            try:
                clipper({"w": params[0], "b": params[1]}, group=dist.group.WORLD)
                out.append("ok")
            except RuntimeError as e:
                out.append("inference" if "nference" in str(e) else str(e))
        state = clipper.state_dict()
        counts = [state["step"], int(state["num_clipped"]), int(state["num_nonfinite"])]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, counts)
        out.append(everyone)
    return out


def test_a_scaling_that_raises_on_one_rank_leaves_the_ranks_states_alike(run_ranks):
    got = run_ranks(2, body_scaling_that_raises_on_one_rank)
    for rank, calls in enumerate(got):
        for k in range(4):
            assert calls[4 * k: 4 * k + 3] == ["ok", "inference" if rank else "ok", "ok"], calls
            mine, theirs = calls[4 * k + 3]
            assert mine == theirs and mine[0] == 3 and mine[2] == 0, calls


def body_agc(names: list[str]) -> list[int]:
    cuts = []
    for name in names:
        for p in (2.0, math.inf):
            target, ref = cases.trained(name, seed=5)
            ref_params = {n: q.detach() for n, q in ref.named_parameters()}
            ref_grads = {n: q.grad for n, q in ref.named_parameters()}
            want = agc_reference(ref_params, ref_grads, 0.02, 1e-3, p)
            cut = unit_pieces(target, None)[1]
            with count_collectives() as calls:
                result = GradClipper(mode="unitwise", norm_type=p, agc=AGC(0.02))(target)
            assert calls.total == (0 if name in ("ddp", "fsdp1_noshard") else 1), (name, calls.names)
            assert result.total_norm.item() == pytest.approx(reference_norm(list(ref_grads.values()), p), rel=1e-5)
            got = _full_grads_after(target, name)
            for n, w in want.items():
                where = f"{name} {n} p={p}"
                torch.testing.assert_close(got[n], w, rtol=1e-5, atol=1e-8, msg=lambda m, where=where: f"{where}: {m}")
            changed = sum(int((~torch.isclose(want[n], ref_grads[n])).any()) for n in want)
            assert 0 < changed, name
            # The smallest unit coefficient of the whole model, on every rank (each rank reported its own:
            # clipped=False and 1.0 on a rank whose units were all left alone).
            smallest = min(
                float((torch.linalg.vector_norm(want[n].reshape(len(want[n]), -1), p, dim=1)
                       / torch.linalg.vector_norm(ref_grads[n].reshape(len(want[n]), -1), p, dim=1)).min())
                for n in want if want[n].dim() > 1
            )
            smallest = min([smallest] + [float(torch.linalg.vector_norm(want[n], p) / torch.linalg.vector_norm(
                ref_grads[n], p)) for n in want if want[n].dim() <= 1])
            # (the coefficient is float32: 1e-6)
            assert result.clip_coef.item() == pytest.approx(smallest, rel=1e-6), (name, p, result.clip_coef, smallest)
            assert bool(result.clipped), (name, p)
            cuts.append(len(cut))
    return cuts


class _AfterPadding(nn.Module):
    """``a`` (1 element) then ``b`` (4 x 3): under FSDP1's ``use_orig_params=True`` the flat parameter aligns ``b``
    to 4 elements (3 of padding between), so the 2-rank shard boundary, at 8, cuts ``b`` at 4, inside row 1."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.5]))
        self.b = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.b.T * self.a).square().mean()


class _OneRow(nn.Module):
    """One weight row of 2 elements: a flat parameter of 2 elements, one on each of 2 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, 2))

    def forward(self, x: Tensor) -> Tensor:
        return (x[:, :2] @ self.w.T).square().mean()


def body_agc_fsdp1_cut_rows() -> list[bool]:
    """FSDP1 rows cut where the shard boundary falls, on 2 ranks: in a parameter lying after the alignment padding
    of ``use_orig_params=True`` (an offset counted without the padding put the boundary in row 2, and each rank
    clipped its part of row 1 as a whole unit), and in a flat parameter of 2 elements, one per rank (shards of
    one element cut nothing, and each rank clipped its half of the one row alone)."""
    import copy

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    rank, world = dist.get_rank(), dist.get_world_size()
    xs = [torch.randn(5, 3, generator=torch.Generator().manual_seed(r)) * 4 for r in range(world)]
    out = []
    for make, orig, cut in ((_AfterPadding, True, [("b", 1)]), (_OneRow, False, [("w", 0)])):
        torch.manual_seed(7)
        model = make()
        ref = copy.deepcopy(model).double()
        target = FSDP(model, device_id=torch.device("cpu"), use_orig_params=orig)
        target(xs[rank]).backward()
        torch.stack([ref(x.double()) for x in xs]).mean().backward()
        want = agc_reference(dict(ref.named_parameters()), {n: q.grad for n, q in ref.named_parameters()}, 0.02,
                             1e-3, 2.0)
        out.append(unit_pieces(target, None)[1] == cut)
        GradClipper(mode="unitwise", agc=AGC(0.02))(target)
        got = _full_grads_after(target, "fsdp1_orig")
        out.append(all(torch.allclose(got[n], w, rtol=1e-5, atol=1e-8) for n, w in want.items()))
    return out


def test_agc_on_every_wrapper_matches_reference(run_ranks):
    assert run_ranks(2, body_agc_fsdp1_cut_rows) == [[True] * 4] * 2
    names = ["ddp", "fsdp2", "fsdp1_flat", "fsdp1_orig", "fsdp1_noshard"]
    cuts = run_ranks(2, body_agc, names)
    assert cuts[0] == cuts[1]
    by_name = dict(zip(names, cuts[0][::2]))
    # FSDP1 flat shards cut rows of both weights; FSDP2 keeps rows whole and cuts only the 1-D biases.
    assert by_name["ddp"] == 0 and by_name["fsdp1_noshard"] == 0
    assert by_name["fsdp1_flat"] >= 1 and by_name["fsdp1_orig"] >= 1
    assert by_name["fsdp2"] == 3  # three biases, each one unit split over 2 ranks


def body_agc_four() -> list[int]:
    cases.WRAPS["hsdp"] = cases.wrap_hsdp
    out = body_agc(["hsdp", "fsdp1_flat"])
    assert_clip_matches_unsharded(cases.build_mlp, cases.wrap_fsdp2, cases.batch, mode="unitwise",
                                  agc=AGC(0.02), norm_type=1.0)
    return out


def test_agc_on_four_ranks(run_ranks):
    results = run_ranks(4, body_agc_four)
    assert all(r == results[0] for r in results)


@pytest.mark.parametrize("as_dict", [True, False])
def test_agc_counts_and_scales_a_weight_listed_twice_once(as_dict):
    """A tied weight named twice ({"emb": w, "head": w}, or [w, w, b]) was two units lists: its norm counted
    twice (14.10 for 10.04) and its rows scaled twice (the coefficient squared), unlike every other mode."""
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    w.grad, b.grad = torch.randn(4, 3) * 5, torch.randn(4) * 5
    grads = {"emb": w.grad.clone(), "b": b.grad.clone()}
    want = agc_reference({"emb": w.detach().clone(), "b": b.detach().clone()}, grads, 0.05, 1e-3, 2.0)
    target = {"emb": w, "head": w, "b": b} if as_dict else [w, w, b]
    result = GradClipper(mode="unitwise", agc=AGC(0.05, 1e-3), report=True)(target)
    total = torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads.values()])).item()
    assert result.total_norm.item() == pytest.approx(total, rel=1e-6)
    torch.testing.assert_close(w.grad.double(), want["emb"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(b.grad.double(), want["b"], rtol=1e-5, atol=1e-8)
    assert len(result.norms) == 2


def test_agc_exclude_given_as_a_set_is_a_sorted_tuple():
    """A set's order follows each process's hash seed: in the call's settings fingerprint the ranks read as
    disagreeing (RuntimeError on a correct call)."""
    assert AGC(exclude={"zz.*", "head.*", "b*"}).exclude == ("b*", "head.*", "zz.*")
    assert AGC(exclude=["y", "x"]).exclude == ("y", "x")
    clipper = GradClipper(mode="unitwise", agc=AGC(exclude=frozenset({"q", "p"})))
    assert "exclude=('p', 'q')" in clipper.config.settings


def test_adaptive_threshold_settings_compare_numbers_as_floats():
    """The settings fingerprint held the threshold's repr: AutoClip(percentile=10) on one rank and 10.0 on
    another raised on a correct call; different percentiles must still differ."""
    def settings(m):  # noqa: ANN001, ANN202
        return GradClipper(max_norm=m).config.settings

    assert settings(AutoClip(percentile=10)) == settings(AutoClip(percentile=10.0))
    assert settings(AutoClip(percentile=10)) != settings(AutoClip(percentile=90))
    assert settings(ZClip(max_norm=1)) == settings(ZClip(max_norm=1.0)) != settings(ZClip(max_norm=5.0))


def test_agc_scales_low_precision_gradients_in_float32():
    """AGC rounded each unit coefficient to the gradient's dtype before multiplying: in fp16 a coefficient of
    1e-9 became 0 and zeroed a row of 500s (fp16 holds 500e-9 as 4.8e-7), and fp16-subnormal coefficients lost
    0.1-3%. Now the product is taken in float32 and rounded once, as the other modes scale."""
    for dtype in (torch.float16, torch.bfloat16):
        w = nn.Parameter(torch.ones(3, 4, dtype=dtype))
        w.grad = torch.tensor([[500.0] * 4, [1.0, 2.0, 3.0, 4.0], [0.01] * 4], dtype=dtype)
        before = w.grad.clone()
        result = GradClipper(mode="unitwise", agc=AGC(clipping=5e-7, eps=1e-3))({"w": w})
        assert bool(result.clipped)
        limit = 2.0 * 5e-7  # ||w_row|| = 2: row 0 (norm 1000) gets a coefficient of 1e-9
        for row in range(3):
            gn = before[row].double().norm().item()
            coef = torch.tensor(min(1.0, limit / gn) if gn >= limit else 1.0, dtype=torch.float32)
            want = (before[row].float() * coef).to(dtype)
            assert torch.equal(w.grad[row], want), (dtype, row, w.grad[row], want)
        assert bool((w.grad[0] != 0).all())


def test_agc_leaves_zero_gradient_units_alone_and_unclipped():
    """With eps=0 a unit whose weight and gradient are zero has a limit of 0, and the formula gave it a
    coefficient of 0: clip_coef 0 and clipped True while nothing changed (FSDP2: a bias without gradient)."""
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.bias.zero_()
    lin.weight.grad = torch.full((3, 4), 1e-3)
    lin.bias.grad = torch.zeros(3)
    result = GradClipper(mode="unitwise", agc=AGC(clipping=1e6, eps=0.0))(lin)
    assert result.clip_coef.item() == 1.0 and not bool(result.clipped)
    assert torch.equal(lin.weight.grad, torch.full((3, 4), 1e-3))


def test_clipped_counts_only_slots_whose_gradients_were_scaled():
    """A group with max_norm 0 whose parameter has no gradient (coefficient 0 on nothing) made clipped True."""
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    b.grad = torch.tensor([0.1, 0.2, 0.3])
    opt = torch.optim.SGD([{"params": [a], "max_norm": 0.0}, {"params": [b], "max_norm": 10.0}], lr=0.1)
    result = GradClipper(mode="per_group")({"a": a, "b": b}, optimizer=opt)
    assert not bool(result.clipped) and torch.equal(b.grad, torch.tensor([0.1, 0.2, 0.3]))
    b.grad = torch.tensor([30.0, 40.0, 0.0])
    assert bool(GradClipper(mode="per_group")({"a": a, "b": b}, optimizer=opt).clipped)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("good_calls", [0, 64])
def test_a_state_saved_after_a_call_refused_together_reloads(window, good_calls):
    """A call refused together counts once without writing a norm: an AutoClip that saved right after it (a
    refused first call, or call 65 after 64 norms) wrote a history shorter than its count, which its own
    load_state_dict refused ("must be a 1-D float tensor of 1 norms, got tensor([])"). The refused call reads as
    a NaN (skipped) norm, as it does on the ranks that did not refuse, and the reloaded clipper goes on alike."""
    clipper = GradClipper(max_norm=AutoClip(percentile=50, window=window))
    for i in range(good_calls):
        clipper([torch.tensor([1.0 + i])])
    clipper._count_refused_call()  # what a call refused together leaves (tests/test_dist_core.py runs the real one)
    state = clipper.state_dict()
    assert state["threshold"]["count"] == good_calls + 1
    again = GradClipper(max_norm=AutoClip(percentile=50, window=window))
    again.load_state_dict(state)
    for g in (3.0, 70.0, 0.5):
        a, b = clipper([torch.tensor([g])]), again([torch.tensor([g])])
        assert a.max_norm.item() == b.max_norm.item() and a.total_norm.item() == b.total_norm.item()
    assert _same_state(clipper.state_dict(), again.state_dict())


def test_agc_floors_a_zero_weight_at_eps():
    """AGC's limit is clipping x max(||w||, eps): a zero-initialised bias's gradient is scaled to clipping x
    eps, not zeroed (a limit of clipping x ||w|| passed the suite: no test had a zero weight row)."""
    lin = nn.Linear(4, 3)
    nn.init.zeros_(lin.bias)
    lin.weight.grad = torch.zeros_like(lin.weight)
    lin.bias.grad = torch.tensor([1.0, 2.0, 2.0])  # norm 3
    GradClipper(mode="unitwise", agc=AGC(clipping=0.01, eps=1e-3))(lin)
    got = torch.linalg.vector_norm(lin.bias.grad.double()).item()
    assert got == pytest.approx(0.01 * 1e-3, rel=1e-5), got
    assert torch.equal(lin.weight.grad, torch.zeros_like(lin.weight))


def test_agc_divides_by_a_gradient_norm_floored_at_1e_6():
    """timm's formula (and AGC's docstring): a clipped unit is scaled by max / max(||g_unit||, 1e-6), so a
    gradient norm below 1e-6 above a smaller limit (zero weight, eps 1e-8) is scaled by 1e-10 / 1e-6, not to the
    limit (1e-10 / 5e-7 passed the suite: no test had a clipped gradient norm under 1e-6)."""
    bias = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    bias.grad = torch.tensor([3e-7, 4e-7, 0.0], dtype=torch.float64)  # norm 5e-7
    grads = {"b": bias.grad.clone()}
    want = agc_reference({"b": bias.detach()}, grads, 0.01, 1e-8, 2.0)["b"]
    result = GradClipper(mode="unitwise", agc=AGC(clipping=0.01, eps=1e-8))({"b": bias})
    torch.testing.assert_close(bias.grad, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(bias.grad, grads["b"] * 1e-4, rtol=1e-12, atol=0)
    assert result.clip_coef.item() == pytest.approx(1e-4, rel=1e-12)


def test_agc_a_gradient_norm_equal_to_a_limit_below_1e_6_is_scaled_by_the_floored_formula():
    """timm's test is ``||g_unit|| < max`` (AGC's docstring: a unit with ``||g_unit|| >= max`` is scaled): a unit
    whose gradient norm equals a limit below 1e-6 is scaled by max / 1e-6 (2**-25 / 1e-6 here, powers of two so
    that the norm equals the limit exactly); left alone as unclipped under ``<=``, which passed the suite."""
    bias = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    bias.grad = torch.tensor([2.0**-25], dtype=torch.float64)
    grads = {"b": bias.grad.clone()}
    want = agc_reference({"b": bias.detach()}, grads, 2.0**-15, 2.0**-10, 2.0)["b"]
    GradClipper(mode="unitwise", agc=AGC(clipping=2.0**-15, eps=2.0**-10))({"b": bias})
    torch.testing.assert_close(bias.grad, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(bias.grad, grads["b"] * (2.0**-25 / 1e-6), rtol=1e-12, atol=0)


@pytest.mark.parametrize("grad,p", [
    ([[2e3, 1.0, 1.0], [0.5, 0.5, 0.5]], 100.0),  # finite entries whose 100th powers overflow float64
    ([[math.inf, 1.0, 1.0], [0.5, 0.5, 0.5]], 2.0),  # an inf entry
])
def test_agc_an_infinite_clipping_leaves_a_unit_alone_whose_norm_is_inf(grad, p):
    """AGC(clipping=inf) is no limit, as max_norm=inf is: a unit whose gradient norm reads inf met inf / inf =
    NaN, and its finite entries became NaN (row 0 all NaN, clip_coef NaN, on one process) where the gradients
    should be left as they are. A finite clipping still scales that unit by 0, as a finite max_norm does."""
    w = nn.Parameter(torch.ones(2, 3))
    g = torch.tensor(grad)
    w.grad = g.clone()
    result = GradClipper(mode="unitwise", norm_type=p, agc=AGC(clipping=math.inf))({"w": w})
    assert torch.equal(w.grad, g), w.grad
    assert result.clip_coef.item() == 1.0 and not bool(result.clipped) and result.total_norm.item() == math.inf
    want = {"w": g.clone()}
    reference_agc_({"w": w.detach()}, want, math.inf, 1e-3, p)
    assert torch.equal(want["w"], g), want
    w.grad = g.clone()
    GradClipper(mode="unitwise", norm_type=p, agc=AGC(clipping=1.0))({"w": w})  # row 1 under its limit
    assert w.grad[0, 1:].tolist() == [0.0, 0.0] and torch.equal(w.grad[1], g[1]), w.grad


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("policy", ["skip", "zero", "error", "ignore"])
def test_agc_a_nan_weight_row_makes_the_call_non_finite(policy, fused):
    """A NaN in a weight row makes AGC's limit clipping * max(||w_row||, eps) NaN, and with a gradient not zero the
    unit's coefficient NaN: it wrote NaN into the row's finite gradient while the call said finite, so "skip"
    took the step (the whole row and its exp_avg turned NaN, fused AdamW or not), "zero" zeroed nothing and
    "error" did not raise. Such a call is a non-finite one now, under every policy (timm's formula writes the
    NaN, as "ignore" still does)."""
    w = nn.Parameter(torch.tensor([[math.nan, 1.0, 2.0], [1.0, 1.0, 1.0]]))
    w.grad = torch.full_like(w, 5.0)
    opt = torch.optim.AdamW([w], lr=0.1, fused=fused)
    clipper = GradClipper(mode="unitwise", on_nonfinite=policy)
    if policy == "error":
        with pytest.raises(RuntimeError, match=r"NaN .* non-finite weights on rank 0: w\b"):
            clipper({"w": w}, optimizer=opt)
        assert torch.equal(w.grad, torch.full_like(w, 5.0)) and clipper.num_nonfinite.item() == 1
        return
    result = clipper({"w": w}, optimizer=opt)
    assert not bool(result.finite) and not bool(result.clipped) and clipper.num_nonfinite.item() == 1, result
    assert result.total_norm.item() == pytest.approx(5.0 * 6.0 ** 0.5)  # the gradients are finite
    opt.step()
    state = [v for v in opt.state[w].values() if v.dim()]
    if policy == "ignore":  # scaled by the NaN coefficient, as timm does: row 0 all NaN
        assert math.isnan(result.clip_coef.item()) and bool(w.grad[0].isnan().all()) and bool(w[0].isnan().all())
        return
    if policy == "skip":  # no step: the weights as they were, Adam's moments (a fused first step's zeros) finite
        assert result.clip_coef.item() == 1.0 and torch.equal(w.grad, torch.full_like(w, 5.0))
        assert w[0, 1:].tolist() == [1.0, 2.0] and w[1].tolist() == [1.0, 1.0, 1.0]
    else:  # "zero": a step on zeroed gradients (AdamW's decay alone)
        assert result.clip_coef.item() == 0.0 and torch.equal(w.grad, torch.zeros_like(w))
        assert bool(w[0, 1:].isfinite().all()) and bool(w[1].isfinite().all()), w
    assert all(bool(v.isfinite().all()) for v in state), state


def test_agc_a_nonfinite_weight_that_writes_no_nan_leaves_the_call_finite():
    """Only a NaN coefficient makes the call non-finite: a NaN weight row whose gradient is zero is left alone
    (coefficient 1, as every zero-gradient unit), an inf weight row has an inf limit (no limit, as
    clipping=inf: its finite gradient passes whole), and under AGC(clipping=inf) a NaN weight sets no limit
    either (the limit inf * NaN made its coefficient NaN: row 0 all NaN with finite gradients, clip_coef NaN)
    nor in a parameter AGC excludes. The gradients stay finite, and so does the call: a step is taken."""
    g = torch.tensor([[5.0, 5.0, 5.0], [5.0, 5.0, 5.0]])
    for weight, grad, agc in (
        ([[math.nan, 1.0, 2.0], [1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0], [5.0, 5.0, 5.0]], AGC()),
        ([[math.inf, 1.0, 2.0], [1.0, 1.0, 1.0]], g.tolist(), AGC()),
        ([[math.nan, 1.0, 2.0], [1.0, 1.0, 1.0]], g.tolist(), AGC(clipping=math.inf)),
        ([[math.nan, 1.0, 2.0], [1.0, 1.0, 1.0]], g.tolist(), AGC(exclude=("w",))),
    ):
        w = nn.Parameter(torch.tensor(weight))
        w.grad = torch.tensor(grad)
        clipped_row_1 = math.isfinite(agc.clipping) and not agc.exclude  # 0.01 * sqrt(3) for a norm of 5 sqrt(3)
        want = torch.tensor([grad[0], [0.01 if clipped_row_1 else 5.0] * 3])
        result = GradClipper(mode="unitwise", on_nonfinite="error", agc=agc)({"w": w})
        assert bool(result.finite), (weight, grad, agc, result)
        torch.testing.assert_close(w.grad, want, rtol=1e-6, atol=0, msg=lambda m, a=agc: f"{a}: {m}")
        assert result.clip_coef.item() == pytest.approx(0.002 if clipped_row_1 else 1.0, rel=1e-5), result
        if math.isinf(agc.clipping):  # the float64 reference too (timm's formula, less its inf / inf)
            ref = {"w": torch.tensor(grad)}
            reference_agc_({"w": w.detach()}, ref, agc.clipping, agc.eps, 2.0)
            assert torch.equal(ref["w"], torch.tensor(grad)), ref


def body_agc_nan_weight_on_one_rank() -> list:
    """A NaN in rank 1's weight alone: in a row of a 2-D piece it holds whole (plain tensors with group=), in
    its piece of a 1-D unit cut across the ranks, and in a row of its FSDP2 shard. Each rank's smallest unit
    coefficient travels in the call's one all-reduce (NaN-safe), so every rank reads the call as non-finite and
    takes the same verdict: before, every rank read finite and stepped, rank 1's row (or the cut unit on every
    rank) turned NaN, and "error" raised nowhere."""
    rank = dist.get_rank()
    out = []
    for where in ("w", "b", "fsdp2"):
        for policy in ("skip", "zero", "error", "ignore"):
            if where == "fsdp2":
                model = cases.trained("fsdp2", seed=7)[0]
                params = dict(model.named_parameters())
                bad = params["0.weight"]
                if rank == 1:
                    with torch.no_grad():
                        bad.to_local()[0, 0] = math.nan
            else:
                params = {"w": nn.Parameter(torch.full((2, 3), 1.0 + rank)), "b": nn.Parameter(torch.ones(3))}
                if rank == 1:
                    with torch.no_grad():
                        params[where].view(-1)[1] = math.nan
                params["w"].grad = torch.full((2, 3), 5.0)
                params["b"].grad = torch.full((3,), 1e-3)  # under its limit
            before = {n: (q.detach().clone() if where != "fsdp2" else q.to_local().detach().clone(),
                          (q.grad if where != "fsdp2" else q.grad.to_local()).clone()) for n, q in params.items()}
            opt = torch.optim.SGD(list(params.values()), lr=0.1)
            clipper = GradClipper(mode="unitwise", on_nonfinite=policy)
            try:
                result = clipper(model if where == "fsdp2" else params, optimizer=opt,
                                 group=None if where == "fsdp2" else dist.group.WORLD)
            except RuntimeError as e:
                out.append((where, policy, str(e)))
                continue
            opt.step()
            local = {n: (q.detach() if where != "fsdp2" else q.to_local().detach(),
                         q.grad if where != "fsdp2" else q.grad.to_local()) for n, q in params.items()}
            nan_grads = sorted(n for n, (_, gr) in local.items() if bool(gr.isnan().any()))
            stepped = sorted(n for n, (wt, _) in local.items()
                             if not torch.equal(wt.nan_to_num(7.0), before[n][0].nan_to_num(7.0)))
            zeroed = all(bool((gr == 0).all()) for _, gr in local.values())
            out.append((where, policy, bool(result.finite), bool(result.clipped), nan_grads, stepped, zeroed))
    return out


def test_agc_a_nan_weight_on_one_rank_makes_every_rank_take_the_non_finite_verdict(run_ranks):
    got = run_ranks(2, body_agc_nan_weight_on_one_rank)
    for rank, calls in enumerate(got):
        by = {(c[0], c[1]): c[2:] for c in calls}
        for where in ("w", "b", "fsdp2"):
            name = "0.weight" if where == "fsdp2" else where
            (message,) = by[(where, "error")]
            assert "non-finite weights on rank 1: " + name in message, (rank, message)
            assert by[(where, "skip")][:2] == (False, False) and by[(where, "skip")][2:4] == ([], []), (rank, where, by)
            finite, _, nan_grads, stepped, zeroed = by[(where, "zero")]
            assert not finite and nan_grads == [] and zeroed, (rank, where, by)
            finite, _, nan_grads, _, _ = by[(where, "ignore")]
            # scaled by the NaN coefficient where one is: rank 1's row, or the cut unit's pieces on every rank
            assert not finite and nan_grads == ([name] if where == "b" or rank == 1 else []), (rank, where, by)


def test_zclip_warm_up_clips_at_max_norm():
    """README: ZClip's warm-up is clipped at max_norm (the suite's warm-up norms stayed below it, so a warm-up
    that ignored max_norm passed)."""
    clipper = GradClipper(max_norm=ZClip(warmup_steps=3, max_norm=1.0))
    for step in range(3):
        g = torch.tensor([3.0, 4.0]) * (step + 1)  # norms 5, 10, 15: all in the warm-up, all above 1
        result = clipper([g])
        want = 1.0 / (5.0 * (step + 1) + 1e-6)
        assert result.clip_coef.item() == pytest.approx(want, rel=1e-6), (step, result.clip_coef.item())
        assert torch.linalg.vector_norm(g).item() == pytest.approx(1.0, rel=1e-5)


def test_autoclip_window_keeps_finite_norms_through_a_non_finite_call():
    """README: AutoClip(window=N) takes its percentile over the last N finite norms: an inf call neither takes a
    slot of the ring (it evicted the 1.0: limit 2.0, history [nan, 2, 3]) nor moves the limit."""
    clipper = GradClipper(max_norm=AutoClip(percentile=0, window=3), on_nonfinite="skip")
    p = nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=0.1)
    for v in (1.0, 2.0, 3.0, math.inf):
        p.grad = torch.tensor([v])
        result = clipper([p], optimizer=opt)
        opt.zero_grad()
    assert result.max_norm.item() == 1.0, result.max_norm
    assert clipper.state_dict()["threshold"]["history"] == [1.0, 2.0, 3.0]


def test_autoclip_history_grows_past_its_first_buffer():
    """AutoClip without a window keeps every norm: the 65th call grows the buffer (64 at first; the only long
    test refused its 65th call, so a buffer grown one call late, an IndexError there, passed)."""
    import numpy as np

    clipper = GradClipper(max_norm=AutoClip(percentile=10))
    p = nn.Parameter(torch.ones(1))
    seen = []
    for i in range(70):
        seen.append(float(i % 7 + 1))
        p.grad = torch.tensor([seen[-1]])
        result = clipper([p])
        assert result.max_norm.item() == pytest.approx(float(np.percentile(seen, 10)), rel=1e-6), i
    assert clipper.step == 70


def test_zclip_after_warm_up_never_above_max_norm():
    """ZClip's threshold after the warm-up is never above max_norm (its mean of 5 gave 5 with the cap gone)."""
    clipper = GradClipper(max_norm=ZClip(warmup_steps=2, max_norm=1.0))
    p = nn.Parameter(torch.ones(1))
    for _ in range(3):
        p.grad = torch.tensor([5.0])
        result = clipper([p])
    assert result.max_norm.item() == 1.0 and p.grad.item() == pytest.approx(1.0, rel=1e-5)


def test_an_autoclip_state_without_oldest_first_loads_in_ring_order():
    """README: AutoClip states saved before the window held finite norms only (no 'oldest_first': entries in ring
    order, the oldest at count % window) still load: norms 1-4 in a window of 3 were saved as [4, 2, 3]."""
    clipper = GradClipper(max_norm=AutoClip(percentile=0, window=3))
    state = clipper.state_dict()
    state["step"] = 4
    state["threshold"] = {"kind": "AutoClip", "norm_type": 2.0, "count": 4,
                          "history": torch.tensor([4.0, 2.0, 3.0], dtype=torch.float64)}
    clipper.load_state_dict(state)
    assert clipper.state_dict()["threshold"]["history"] == [2.0, 3.0, 4.0]
    assert clipper([torch.tensor([10.0])]).max_norm.item() == 3.0  # the window [3, 4, 10]: the 2 left first
