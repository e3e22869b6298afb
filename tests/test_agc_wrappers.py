"""Unit-wise AGC on DeepSpeed ZeRO 0-3 and fairscale (OSS + ShardedDDP, OSS + DDP, FSDP), against float64.

Each case runs a few steps (one per norm order p) of a wrapped ``tests/ds_cases.make_model`` and, at every step,
compares ``GradClipper(mode="unitwise", agc=AGC(...))`` with timm's ``adaptive_clip_grad`` run on the float64
unsharded model (``tests/test_adaptive.agc_reference``):

* the total norm and the per-parameter report (unscaled under fp16 loss scaling);
* every clipped gradient, gathered whole by the wrapper's own code (DeepSpeed's ``safe_get_full_grad``, an
  all-gather of fairscale's shards, the OSS owner's gradient);
* the parameters after the wrapper's own ``step()`` against the reference model clipped and stepped the same way;
* one collective per call (none at ZeRO stage 0, whose gradients are whole and identical everywhere).

The AGC ratio is picked from the reference so that about half of the units clip, and the parameter with the
largest ratio is excluded by name (so it would clip, and must not). ZeRO partition boundaries and fairscale
shards cut rows of the weights (and 1-D biases), whose partials travel in the same collective; the 3-rank cases
cut rows in the middle and one bias three ways.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
import torch
import torch.distributed as dist

from dist_clip import AGC, GradClipper
from dist_clip.adaptive import unit_pieces
from dist_clip.testing import count_collectives, reference_norm, reference_param_norms
from tests.fairscale_cases import LAYOUTS as FAIRSCALE_LAYOUTS
from tests.test_adaptive import agc_reference

TIMEOUT = 300
EPS = 1e-3
PS = (2.0, math.inf, 1.0)


# ------------------------------------------------------------------------------------------ shared checks


def _units(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


def choose_agc(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], p: float) -> tuple[float, str]:
    """(clipping ratio, excluded name): the ratio lies between two unit ratios near the middle of those of the
    parameters not excluded; the excluded one holds the largest ratio, so it would clip."""
    ratios: list[tuple[float, str]] = []
    for n, g in grads.items():
        gn = torch.linalg.vector_norm(_units(g.double()), p, dim=1)
        wn = torch.linalg.vector_norm(_units(params[n].double()), p, dim=1).clamp(min=EPS)
        ratios += [(float(r), n) for r in (gn / wn).tolist()]
    ratios.sort()
    excluded = ratios[-1][1]
    rest = [r for r, n in ratios if n != excluded]
    # The split nearest the middle whose two neighbours differ clearly (low-precision ratios may tie).
    for k in sorted(range(1, len(rest)), key=lambda k: abs(k - len(rest) // 2)):
        lo, hi = rest[k - 1], rest[k]
        if hi > lo * (1 + 1e-2):
            return math.sqrt(lo * hi), excluded
    raise AssertionError(f"no two unit ratios far enough apart: {rest}")


def expected(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], p: float
             ) -> tuple[AGC, dict[str, torch.Tensor]]:
    clipping, excluded = choose_agc(params, grads, p)
    want = agc_reference(params, grads, clipping, EPS, p)
    want[excluded] = grads[excluded].detach().double().clone()
    changed = torch.cat([(~torch.isclose(_units(want[n]), _units(grads[n].double()))).any(dim=1) for n in want])
    assert 0 < int(changed.sum()) < changed.numel(), "the case must clip some units and leave others alone"
    return AGC(clipping, EPS, exclude=(excluded,)), want


def clip_and_check(target: Any, agc: AGC, p: float, grads: dict[str, torch.Tensor], to: dict[str, str],
                   collectives: int, what: str) -> list:
    """Clip ``target`` (one call, counted), check total and report against ``grads``; the cut units."""
    cut = unit_pieces(target, None)[1]
    with count_collectives() as c:
        r = GradClipper(mode="unitwise", norm_type=p, agc=agc, report=True)(target)
    assert c.total == collectives, f"{what}: {c.total} collectives ({c.names}), expected {collectives}"
    want_total = reference_norm(list(grads.values()), p)
    assert float(r.total_norm) == pytest.approx(want_total, rel=1e-5), f"{what}: total"
    want_norms = {to[n]: v for n, v in reference_param_norms(grads, p).items()}
    assert r.norms is not None and set(r.norms) == set(want_norms), f"{what}: report names {sorted(r.norms or ())}"
    for n, v in want_norms.items():
        assert r.norms[n] == pytest.approx(v, rel=1e-5, abs=1e-12), f"{what}: report of {n}"
    assert bool(r.clipped) and float(r.clip_coef) < 1, f"{what}: nothing clipped"
    return [(n, uid) for n, uid in cut]


def grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], to: dict[str, str], what: str,
                rtol: float = 1e-5, atol: float = 1e-7) -> None:
    for n, w in want.items():
        g = got[to[n]].double().reshape(w.shape)
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, n=n: f"{what} {n}: {m}")


# ------------------------------------------------------------------------------------------ DeepSpeed


def case_deepspeed(stage: int, dtype: str = "fp32", offload: bool = False, ps: tuple[float, ...] = PS,
                   grad_accum_dtype: str | None = None, zero_extra: dict | None = None, groups: str = "layers") -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    from tests import ds_cases, ds_names_cases

    engine, _ = ds_names_cases.make_engine(stage, dtype, offload, zero_extra, grad_accum_dtype, groups)
    whole = type(engine.optimizer).__name__ == "BF16_Optimizer"  # whole fp32 gradients, the module's weights
    ref = ds_cases.Reference()
    names = [n for n, _ in ref.model.named_parameters()]
    to = {n: n for n in names}
    exact = dtype == "fp32"
    cuts = []
    for step, p in enumerate(ps):
        grads = ds_names_cases._backward(engine, ref, step)
        what = f"ZeRO-{stage} {dtype}{' offload' if offload else ''} p={p} step {step}"
        scale = float(getattr(engine.optimizer, "loss_scale", 1.0)) if dtype == "fp16" else 1.0
        assert scale > 1 or dtype != "fp16", "the fp16 case must exercise the loss scale"
        if exact:
            params = {n: q.detach().clone() for n, q in ref.model.named_parameters()}
            inputs = grads
        else:
            # Low-precision gradients differ from float64 ones by their rounding: the reference is DeepSpeed's own
            # gradient of each parameter (unscaled) and fp32 master weight, assembled by DeepSpeed.
            inputs = {n: g / scale for n, g in ds_names_cases._deepspeed_grads(engine).items()}
            params = {n: (q.detach() if whole else safe_get_full_fp32_param(q)).double()
                      for n, q in engine.module.named_parameters()}
        agc, want = expected(params, inputs, p)
        cuts.append(clip_and_check(engine, agc, p, inputs, to, ds_cases.expected_collectives(engine), what))
        got = {n: g / scale for n, g in ds_names_cases._deepspeed_grads(engine).items()}
        rtol = 1e-5 if exact or grad_accum_dtype == "fp32" else 2e-3 if dtype == "fp16" else 1e-2
        grads_close(got, want, to, what, rtol=rtol)
        engine.step()
        if exact:  # the reference clipped the same way, then stepped
            for n in names:
                grads[n].copy_(want[n])
            ref.opt.step()
            ds_names_cases._params_close(engine, ref, 1e-5, 1e-6, f"{what}: params after step")
    return {"cuts": cuts}


def case_deepspeed_fp16_overflow(stage: int, steps: int = 5) -> dict:
    """fp16 with a loss scale so high that the first steps overflow: AGC reports a non-finite total exactly on the
    steps DeepSpeed then skips (parameters untouched, loss scale lowered), and a finite one on the others."""
    from tests import ds_cases

    engine = ds_cases.make_engine(ds_cases.ds_config(stage, dtype="fp16", initial_scale_power=17))
    history = []
    for step in range(steps):
        before = ds_cases.full_params(engine)
        engine.backward(ds_cases.loss_fn(engine(ds_cases.batch(dist.get_rank(), step, 0).half())))
        r = GradClipper(mode="unitwise", agc=AGC(0.01))(engine)
        engine.step()
        skipped = not engine.was_step_applied()
        assert skipped == (not bool(r.finite)), f"step {step}: finite={bool(r.finite)} but skipped={skipped}"
        if skipped:
            ds_cases._params_close(ds_cases.full_params(engine), before, 0, 0, f"step {step} skipped, params moved")
        history.append((float(r.total_norm), skipped))
    assert 0 < sum(s for _, s in history) < steps, f"the case must both overflow and step: {history}"
    return {"history": history}


# ------------------------------------------------------------------------------------------ fairscale


def _fairscale_full_grads(kind: str, model: Any, opt: Any) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient, by the name of the unwrapped model, gathered from every rank.

    OSS: the gradient of the rank that owns (steps) the parameter. FSDP: every rank's shard all-gathered over
    the wrapper's group, padding dropped, split per original parameter (``FlatParameter.metadata()``).
    """
    from fairscale.nn import FullyShardedDataParallel as FSDP
    from fairscale.nn.misc.flatten_params_wrapper import FlatParameter

    out: dict[str, torch.Tensor] = {}
    if kind.startswith("oss"):
        owned = {id(q) for g in opt.partition_parameters()[opt.rank] for q in g["params"]}
        mine = {n: q.grad.detach().double().clone() for n, q in model.module.named_parameters() if id(q) in owned}
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        for e in everyone:
            out.update(e)
        return out
    names = {id(q): n for n, q in model.named_parameters()}
    for path, module in model.named_modules():
        if not isinstance(module, FSDP):
            continue
        for q in module.params:
            g = q.grad.detach().reshape(-1)
            if getattr(q, "_is_sharded", False):
                parts = [torch.empty_like(g) for _ in range(module.world_size)]
                dist.all_gather(parts, g, group=module.process_group)
                g = torch.cat(parts)
            if isinstance(q, FlatParameter):
                metas = zip(*q.metadata())
                own = [(f"{path}.{n}", shape, numel) for n, shape, numel in metas]
            else:
                own = [(names[id(q)], q._orig_size, q._orig_size.numel())]
            at = 0
            for n, shape, numel in own:
                clean = ".".join(c for c in n.split(".") if c and c not in ("_fsdp_wrapped_module", "_fpw_module"))
                out[clean] = g[at : at + numel].double().reshape(shape).clone()
                at += numel
    return out


def case_fairscale(kind: str, ps: tuple[float, ...] = PS, **fsdp_kwargs: Any) -> dict:
    from tests import ds_cases
    from tests.fairscale_cases import cpu_stream_shim, full_params
    from tests.test_fairscale_names import _backward, _build

    shim = cpu_stream_shim() if kind.startswith("fsdp") else contextlib.nullcontext()
    cuts = []
    with shim:
        model, opt, target, to, _ = _build(kind, **fsdp_kwargs)
        ref = ds_cases.Reference()
        names = [n for n, _ in ref.model.named_parameters()]
        for step, p in enumerate(ps):
            what = f"fairscale {kind} {fsdp_kwargs} p={p} step {step}"
            grads = _backward(model, ref, step)
            params = {n: q.detach().clone() for n, q in ref.model.named_parameters()}
            agc, want = expected(params, grads, p)
            agc = AGC(agc.clipping, agc.eps, exclude=tuple(to[n] for n in agc.exclude))
            cuts.append(clip_and_check(target, agc, p, grads, to, 1, what))
            grads_close(_fairscale_full_grads(kind, model, opt), want, {n: n for n in names}, what)
            opt.step()
            for n in names:
                grads[n].copy_(want[n])
            ref.opt.step()
            for n, a, b in zip(names, full_params(kind, model), ref.params()):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"{what}: {n} after step"
    return {"cuts": cuts}


def case_oss_rank_without_parameters() -> dict:
    """3 ranks, 2 parameters: OSS gives the third rank nothing to own. It still joins the one collective, and every
    rank returns the same total; the owners clip their units as the float64 reference does."""
    from fairscale.optim import OSS
    from torch.nn.parallel import DistributedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(3)
    net = torch.nn.Linear(3, 2)
    ref = torch.nn.Linear(3, 2).double()
    ref.load_state_dict(net.state_dict())
    model = DistributedDataParallel(net)
    opt = OSS(model.parameters(), optim=torch.optim.SGD, lr=0.1)
    owned = {id(q) for g in opt.partition_parameters()[opt.rank] for q in g["params"]}
    xs = [torch.randn(4, 3, generator=torch.Generator().manual_seed(r)) * (1 + 3 * r) for r in range(world)]
    model(xs[rank]).square().sum().backward()
    for x in xs:
        (ref(x.double()).square().sum() / world).backward()
    params = {n: q.detach() for n, q in ref.named_parameters()}
    grads = {n: q.grad for n, q in ref.named_parameters()}
    ratios = sorted(float(r) for n, g in grads.items() for r in (
        torch.linalg.vector_norm(_units(g), dim=1) / torch.linalg.vector_norm(_units(params[n]), dim=1).clamp(min=EPS)))
    clipping = math.sqrt(ratios[0] * ratios[1])  # one unit left alone, two clipped
    want = agc_reference(params, grads, clipping, EPS, 2.0)
    with count_collectives() as c:
        r = GradClipper(mode="unitwise", agc=AGC(clipping, EPS))(opt)
    assert c.total == 1, c.names
    assert float(r.total_norm) == pytest.approx(reference_norm(list(grads.values())), rel=1e-5)
    for n, q in net.named_parameters():
        if id(q) in owned:
            torch.testing.assert_close(q.grad.double(), want[n], rtol=1e-5, atol=1e-7)
    return {"owned": len(owned), "total": float(r.total_norm)}


# ------------------------------------------------------------------------------------------ tests


def _same_cuts_on_every_rank(results: list[dict]) -> list:
    assert all(r["cuts"] == results[0]["cuts"] for r in results), [r["cuts"] for r in results]
    return results[0]["cuts"][0]


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage,dtype,offload,accum", [
    (0, "fp32", False, None), (1, "fp32", False, None), (2, "fp32", False, None), (2, "fp32", True, None),
    (3, "fp32", False, None), (3, "fp32", True, None), (2, "fp16", False, None), (3, "fp16", False, None),
    (2, "bf16", False, None), (1, "bf16", False, "fp32"),
], ids=["zero0", "zero1", "zero2", "zero2-offload", "zero3", "zero3-offload", "zero2-fp16", "zero3-fp16",
        "zero2-bf16", "zero1-bf16-fp32accum"])
def test_agc_on_deepspeed_matches_reference(run_ranks, stage, dtype, offload, accum):
    pytest.importorskip("deepspeed")
    cuts = _same_cuts_on_every_rank(run_ranks(2, case_deepspeed, stage, dtype, offload, grad_accum_dtype=accum,
                                              timeout_s=TIMEOUT))
    if stage == 0 or accum:  # whole gradients (stage 0; ZeRO-1 bf16 + fp32 accumulation is BF16_Optimizer's)
        assert cuts == []  # whole gradients: nothing to combine
    else:  # 2 ranks cut 0.weight mid-row (ZeRO-1/2 at 26 of 42; ZeRO-3 at 21)
        assert ("0.weight", 26 // 6 if stage < 3 else 21 // 6) in cuts, cuts


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_agc_on_deepspeed_fp16_overflow_skips_the_step(run_ranks, stage):
    pytest.importorskip("deepspeed")
    results = run_ranks(2, case_deepspeed_fp16_overflow, stage, timeout_s=TIMEOUT)
    assert repr(results[0]) == repr(results[1]), results  # repr: NaN totals compare equal


@pytest.mark.deepspeed
def test_agc_on_deepspeed_round_robin_aligned_partitions(run_ranks):
    pytest.importorskip("deepspeed")
    # ds_names_cases "shuffled" groups with parameter_alignment: group 1 (2.weight, 4.weight, 2.bias, ...) is
    # padded per parameter and cut at 50, in the padding after 2.weight; group 0 (0.weight alone) at 22, mid-row.
    extra = {"round_robin_gradients": True, "parameter_alignment": True}
    cuts = _same_cuts_on_every_rank(run_ranks(2, case_deepspeed, 2, zero_extra=extra, groups="shuffled",
                                              timeout_s=TIMEOUT))
    assert cuts == [("0.weight", 22 // 6)], cuts


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage,extra", [
    (2, {"overlap_comm": True, "contiguous_gradients": False, "reduce_bucket_size": 16, "reduce_scatter": False}),
    (3, {"overlap_comm": False, "reduce_bucket_size": 16, "stage3_prefetch_bucket_size": 16, "sub_group_size": 10,
         "offload_param": {"device": "cpu"}}),
], ids=["zero2-tiny-buckets-overlap-allreduce", "zero3-tiny-buckets-subgroups-offload-param"])
def test_agc_on_deepspeed_zero_switches(run_ranks, stage, extra):
    pytest.importorskip("deepspeed")
    _same_cuts_on_every_rank(run_ranks(2, case_deepspeed, stage, ps=(2.0, math.inf), zero_extra=extra,
                                       timeout_s=TIMEOUT))

@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_agc_on_deepspeed_three_ranks_uneven(run_ranks, stage):
    pytest.importorskip("deepspeed")
    cuts = _same_cuts_on_every_rank(run_ranks(3, case_deepspeed, stage, ps=(2.0, math.inf), timeout_s=TIMEOUT))
    if stage == 2:  # group 1 (88 -> 90 elements, 30 per rank) cuts 2.weight (rows of 7) at 30: row 4
        assert ("2.weight", 4) in cuts, cuts
    else:  # 0.weight: 14 per rank, cut at 14 and 28 (rows 2 and 4); 0.bias (7): 3 per rank, one unit cut twice
        assert {("0.weight", 2), ("0.weight", 4), ("2.weight", 2), ("0.bias", 0)} <= set(cuts), cuts
        assert cuts.count(("0.bias", 0)) == 1, cuts


@pytest.mark.fairscale
@pytest.mark.parametrize("kind,kwargs", [pytest.param(k, kw, id=i) for k, kw, i in FAIRSCALE_LAYOUTS])
def test_agc_on_fairscale_matches_reference(run_ranks, kind, kwargs):
    pytest.importorskip("fairscale")
    cuts = _same_cuts_on_every_rank(run_ranks(2, case_fairscale, kind, timeout_s=TIMEOUT, **kwargs))
    if kind.startswith("oss"):
        assert cuts == []  # whole parameters, each measured by its owner
    else:
        assert cuts, "the flat shards must cut some unit across ranks"


@pytest.mark.fairscale
def test_agc_on_fairscale_fsdp_three_ranks(run_ranks):
    pytest.importorskip("fairscale")
    # One flat parameter of 137 elements, 46 per rank: cut at 46 inside 0.bias (elements 42-48, one unit) and at
    # 92 inside 2.weight (elements 49-97, rows of 7): its element 43, in the middle of row 6.
    cuts = _same_cuts_on_every_rank(run_ranks(3, case_fairscale, "fsdp", ps=(2.0, math.inf), timeout_s=TIMEOUT))
    assert ("0.bias", 0) in cuts and ("2.weight", 43 // 7) in cuts, cuts


@pytest.mark.fairscale
def test_agc_on_oss_with_a_rank_owning_nothing(run_ranks):
    pytest.importorskip("fairscale")
    results = run_ranks(3, case_oss_rank_without_parameters, timeout_s=TIMEOUT)
    assert sorted(r["owned"] for r in results) == [0, 1, 1], results
    assert len({r["total"] for r in results}) == 1, results


def body_agc_excludes_a_cut_unit(p: float) -> list[float]:
    """FSDP2 cuts a 1-D bias across the ranks (one unit, two pieces): excluded by name, it is left alone and its
    coefficient stays out of ``clip_coef`` (a mutation run passed both an exclude ignored for cut units and their
    coefficients counted in the smallest: no test excluded a cut unit)."""
    import copy

    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from tests.fsdp_cases import mesh

    torch.manual_seed(0)
    model = nn.Linear(4, 6)
    ref = copy.deepcopy(model).double()
    fully_shard(model, mesh=mesh((dist.get_world_size(),)))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))  # the same batch on every rank
    model(x).square().sum().backward()
    ref(x.double()).square().sum().backward()
    model.bias.grad._local_tensor.mul_(100.0)  # the bias's ratio the largest: it would clip most
    ref.bias.grad.mul_(100.0)
    assert unit_pieces(model, None)[1], "the bias must be a cut unit"
    params = {n: q.detach().clone() for n, q in ref.named_parameters()}
    grads = {n: q.grad.detach().clone() for n, q in ref.named_parameters()}
    agc, want = expected(params, grads, p)
    assert agc.exclude == ("bias",), agc.exclude
    result = GradClipper(mode="unitwise", norm_type=p, agc=agc)(model)
    for n, q in model.named_parameters():
        torch.testing.assert_close(q.grad.full_tensor().double(), want[n], rtol=1e-5, atol=1e-7, msg=n)
    for q, g in zip(ref.parameters(), grads.values()):
        q.grad = g.clone()
    alone = GradClipper(mode="unitwise", norm_type=p, agc=agc)(ref)  # one process: no unit is cut
    assert result.clip_coef.item() == pytest.approx(alone.clip_coef.item(), rel=1e-5)
    return [result.clip_coef.item()]


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_agc_excludes_a_cut_unit(run_ranks, p):
    a, b = run_ranks(2, body_agc_excludes_a_cut_unit, p, timeout_s=120)
    assert a == b, (a, b)
