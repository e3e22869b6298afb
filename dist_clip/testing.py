"""Helpers for users' own distributed CI (and ours): count collectives, compare with the unsharded norm."""

from __future__ import annotations

import contextlib
import fnmatch
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _norm

__all__ = ["CollectiveCount", "count_collectives", "reference_norm"]


@dataclass
class CollectiveCount:
    """Backend collectives seen inside :func:`count_collectives`, by name (``gloo:all_reduce``...)."""

    names: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.names)


_BACKEND_PREFIXES = ("gloo:", "nccl:", "mpi:", "ucc:", "xccl:")


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveCount]:
    """Count the process-group collectives issued in the block, as the profiler records them.

    Each backend collective appears once as a profiler event named ``<backend>:<op>`` whatever Python API
    issued it (``dist.all_reduce``, a wrapper's internal call, a DTensor redistribution), so the count is
    what the network sees, not what our code thinks it called.
    """
    from torch.profiler import ProfilerActivity, profile

    result = CollectiveCount()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield result
    result.names.extend(e.name for e in prof.events() if e.name.startswith(_BACKEND_PREFIXES))


def reference_norm(grads: Sequence[Tensor], norm_type: float | str = 2.0) -> float:
    """The definition: ``vector_norm`` of the concatenation of every full gradient, in float64, as a float."""
    return _reference_norm_on(grads, norm_type, "cpu")


def _reference_norm_on(grads: Sequence[Tensor], norm_type: float | str, device: str | None) -> float:
    """:func:`reference_norm` computed on ``device``, or (None) on the gradients' own device (one device: the
    benchmark's CUDA rows, where copying every row's gradients to the host took longer than the benchmark)."""
    p = _norm.parse_norm_type(norm_type)  # (a ValueError naming it: float() took -1 for an order, True for 1)
    flat = [_wide(g, device) for g in grads if g is not None]
    whole = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)
    if whole.numel() == 0:
        return 0.0  # the norm of nothing (vector_norm has no identity for inf on an empty tensor)
    value = torch.linalg.vector_norm(whole, p).item()
    if p == 0 and any(bool(torch.isnan(f).any()) for f in flat):
        return math.nan  # dist_clip's documented choice: NaN anywhere gives NaN for every p
    return value


def _wide(g: Tensor, device: str | None = "cpu") -> Tensor:
    """A gradient's values as one float64 (complex128 for complex) vector on ``device`` (None: where it lies), as
    the definition measures them: a sparse COO gradient by its coalesced values (duplicates summed), a complex one
    by its moduli (casting it to float64 kept the real part only: 3 for |3+4j, 1j| = 5.10)."""
    g = g.detach()
    if g.layout == torch.sparse_coo:
        g = g.coalesce().values()
    wide = torch.complex128 if g.is_complex() else torch.float64
    return g.reshape(-1).to(g.device if device is None else device, wide)


def _as64(x: Any) -> Any:
    """A copy of a tensor on the CPU, floating ones in float64 and complex ones in complex128, also inside a dict,
    list or tuple (a batch as a mapping reached the float64 model in float32: "mat1 and mat2 must have the same
    dtype"; token ids on an accelerator reached the CPU model there: "Expected all tensors to be on the same
    device"); anything else as it is."""
    if isinstance(x, Tensor):  # always a copy: a float64 or integer CPU tensor was the caller's own
        if x.is_floating_point() or x.is_complex():
            return x.to("cpu", torch.complex128 if x.is_complex() else torch.float64, copy=True)
        return x.to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _as64(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        items = [_as64(v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)  # (a namedtuple takes its fields)
    return x


# --------------------------------------------------------------------------------------------------------------
# assert_clip_matches_unsharded: the check users run in their own multi-GPU CI (appended; the helpers above are
# unchanged).

from typing import Any  # noqa: E402 - appended section

__all__ += ["assert_clip_matches_unsharded", "reference_agc_", "reference_param_norms"]  # noqa: PLE0605


def reference_param_norms(grads: dict[str, Tensor], norm_type: float | str = 2.0) -> dict[str, float]:
    """The norm of each full gradient in float64, by name: the definition of a per-parameter report, each as
    :func:`reference_norm` takes it (NaN for a gradient holding NaN for every order, L0 too: ``vector_norm``
    counts a NaN as a non-zero; 0 for an empty gradient, whose inf norm ``vector_norm`` refuses)."""
    return {n: reference_norm([g], norm_type) for n, g in grads.items()}


def _unit_norms(x: Tensor, p: float) -> Tensor:
    """The norm of each unit of ``x`` (a row along dim 0, kept as a dim of 1 elsewhere; the whole of a 0/1-D
    tensor), 0 for a unit of no elements (``vector_norm`` refuses the inf norm of nothing)."""
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x, p) if x.numel() else x.new_zeros(())
    if x.numel() == 0:
        return x.new_zeros((x.shape[0],) + (1,) * (x.dim() - 1))
    return torch.linalg.vector_norm(x, p, dim=tuple(range(1, x.dim())), keepdim=True)


def _agc_coefficients(weight: Tensor, grad: Tensor, clipping: float, eps: float, norm_type: float | str) -> Tensor:
    """Each unit's AGC coefficient of one full parameter, in float64, shaped to multiply ``grad``: ``limit / max(
    ||g_unit||, 1e-6)`` with ``limit = clipping * max(||w_unit||, eps)`` where ``||g_unit|| >= limit``, else 1;
    1 for a unit whose gradient is zero (with a NaN weight too, where timm's formula gives 0 * NaN) and, under
    ``clipping=inf``, for every unit whose gradient norm is not NaN."""
    from .adaptive import AGC

    AGC(clipping=clipping, eps=eps)  # (its checks: a ValueError or TypeError naming the bad one)
    p = _norm.parse_norm_type(norm_type)
    if p == 0:
        raise ValueError("unit-wise clipping needs a norm order p > 0 or inf, got norm_type=0")
    limit = _unit_norms(_wide(weight).reshape(weight.shape), p).clamp(min=eps) * clipping
    gn = _unit_norms(_wide(grad).reshape(grad.shape), p)
    keep = (gn < limit) | (gn == 0)
    if math.isinf(clipping):  # no limit: an inf unit norm too (inf / inf made it NaN), and a NaN weight's unit
        keep = keep | ~gn.isnan()
    return torch.where(keep, torch.ones_like(gn), limit / gn.clamp(min=1e-6))


def reference_agc_(
    params: dict[str, Tensor], grads: dict[str, Tensor], clipping: float, eps: float, norm_type: float | str = 2.0
) -> None:
    """Unit-wise AGC on full tensors in place, single process (the timm formulation, a unit whose gradient is
    zero left as it is: :func:`_agc_coefficients`): the reference of ``mode="unitwise"``. A unit is a row along
    dim 0 (the whole tensor for 0/1-D parameters). Norms and products are taken in float64, each product rounded
    once to the gradient's dtype (taken in a bf16 gradient's own dtype, they were 2.4e-4 off dist_clip's clip of
    entries near 0.05, which rounds once)."""
    for name, g in grads.items():
        coef = _agc_coefficients(params[name].detach(), g, clipping, eps, norm_type)
        g.copy_(_wide(g).reshape(g.shape) * coef)


def _coef(max_norm: float, norm: float) -> float:
    """``min(1, max_norm / (norm + 1e-6))`` as the clip computes it: NaN for a NaN norm (Python's ``min(1.0,
    nan)`` is 1.0, and correct NaN clips failed the check)."""
    return math.nan if math.isnan(norm) else min(1.0, max_norm / (norm + 1e-6))


def _agree(want: float, got: float, rtol: float, atol: float) -> bool:
    """Within tolerance, or the same non-finite value (inf - inf is NaN: matching infinite norms failed; and a
    tolerance relative to inf took any number for it)."""
    if not (math.isfinite(want) and math.isfinite(got)):
        return want == got or (math.isnan(want) and math.isnan(got))
    return abs(want - got) <= atol + rtol * abs(want)


def _diff_table(want: dict[str, float], got: dict[str, float], rtol: float, atol: float, what: str) -> list[str]:
    rows = []
    bad = False
    for name in sorted(set(want) | set(got)):
        w, g = want.get(name), got.get(name)
        ok = w is not None and g is not None and _agree(w, g, rtol, atol)
        bad |= not ok
        rel = "" if w is None or g is None or w == 0 else f"{abs(g - w) / abs(w):.2e}"
        rows.append(f"  {'!!' if not ok else '  '} {name:<40} {w!s:>24} {g!s:>24} {rel:>10}")
    if not bad:
        return []
    return [f"{what} per parameter (!! = mismatch, rtol={rtol}, atol={atol}):",
            f"     {'name':<40} {'unsharded reference':>24} {'sharded (dist_clip)':>24} {'rel err':>10}", *rows]


def _check_rank(
    build_model: Any, wrap_fn: Any, batch_fn: Any, loss_fn: Any, norm_type: float | str, max_norm: float,
    mode: str, agc: Any, rtol: float | None, atol: float, seed: int,
) -> dict[str, float]:
    """One rank's side of :func:`assert_clip_matches_unsharded`; raises AssertionError with a readable diff."""
    import copy

    import torch.distributed as dist

    from .adaptive import AGC
    from .clipper import GradClipper

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    p = float(norm_type)
    loss_of = loss_fn if loss_fn is not None else (lambda out: out.float().square().mean())
    torch.manual_seed(seed)
    model = build_model()
    ref = copy.deepcopy(model)._apply(lambda t: _as64(t).to("cpu"))  # complex stays complex (Module.to: real)
    if rtol is None:  # the float64 model differs from a low-precision one by its rounding, not by the clip
        dtypes = {q.dtype for q in model.parameters() if q.is_floating_point()}
        rtol = max((_LOW_PRECISION_RTOL.get(d, 1e-5) for d in dtypes), default=1e-5)
    target = wrap_fn(model)
    # Every rank's batch drawn once, in rank order, from one seeded state on every rank, and fed to both models:
    # a batch_fn drawing from torch's global generator (torch.randn without a generator) was called for this
    # rank's batch and again for the reference's, which then saw other inputs (a correct clip failed, up to 0.47 off).
    # (seed + 1: not the stream the weights were drawn from; the CPU generator is put back afterwards.)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed + 1) % 2**64)
        batches = [batch_fn(r, world) for r in range(world)]
    # The float64 model's copies, taken before the wrapped forward: a model changing its input in place (x += pos,
    # ids.masked_fill_) changed this rank's batch first, and the float64 model was fed the changed one (a correct
    # DDP or FSDP2 clip failed, total norm 7.69 against 5.36).
    batches64 = [_as64(b) for b in batches]

    def forward_of(r: int, run: Any) -> Tensor:
        # Rank r's forward, wrapped or float64, starts from one seed: dropout in training mode drew its masks
        # from different points of the generator, and a correct clip failed (0.4-23% off). On the CPU the masks
        # agree whatever the dtype; an accelerator's generator is another one (README).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((seed + 2 + r) % 2**64)
            return loss_of(run())

    forward_of(rank, lambda: target(batches[rank])).backward()
    local_before = _local_pieces(target) if mode != "unitwise" else []

    torch.stack([forward_of(r, lambda b=b: ref(b)) for r, b in enumerate(batches64)]).mean().backward()
    ref_params = dict(ref.named_parameters())
    ref_grads = {n: q.grad for n, q in ref_params.items() if q.grad is not None}
    before = reference_param_norms(ref_grads, p)
    total = reference_norm(list(ref_grads.values()), p)
    agc_cfg = agc if agc is not None else AGC()
    smallest = 1.0  # unitwise: the float64 model's smallest unit coefficient (NaN where one is NaN)
    if mode == "total":
        coef = _coef(max_norm, total)
        for g in ref_grads.values():
            g.mul_(coef)
    elif mode == "per_param":
        for n, g in ref_grads.items():
            g.mul_(_coef(max_norm, before[n]))
    else:  # "unitwise" (assert_clip_matches_unsharded checked the mode); excluded parameters stay as they are
        clipped = {n: g for n, g in ref_grads.items() if not any(fnmatch.fnmatchcase(n, x) for x in agc_cfg.exclude)}
        units = [_agc_coefficients(ref_params[n], g, agc_cfg.clipping, agc_cfg.eps, p).reshape(-1)
                 for n, g in clipped.items()]
        smallest = float(torch.cat([torch.ones(1, dtype=torch.float64), *units]).min())  # (torch's min keeps NaN)
        reference_agc_(ref_params, clipped, agc_cfg.clipping, agc_cfg.eps, p)
    after = reference_param_norms(ref_grads, p)

    clipper = GradClipper(max_norm=max_norm, norm_type=norm_type, mode=mode, agc=agc_cfg, report=True)
    with count_collectives() as calls:
        result = clipper(target)
    got_before = result.norms or {}
    # The applied clip, checked before anything else touches the gradients.
    scaling = _scaling_problems(local_before, result, got_before, max_norm, mode, p)
    # Measured per parameter: an infinite limit leaves finite slots alone (coefficient 1), where in one total a
    # NaN or inf norm multiplied every gradient by NaN.
    got_after = GradClipper(max_norm=math.inf, norm_type=norm_type, mode="per_param", report=True)(target).norms or {}
    problems: list[str] = []
    if calls.total > 1:
        problems.append(f"the clip issued {calls.total} collectives, expected at most 1: {calls.names}")
    got_total = float(result.total_norm)
    if not _agree(total, got_total, rtol, atol):
        problems.append(f"total norm: unsharded reference {total!r}, sharded {got_total!r}")
    # A trainable parameter the forward did not reach has no gradient in the float64 model; FSDP1 and ZeRO 1-3
    # zero-fill its gradient and report it at 0 (README "A norm report"): that 0 is not a mismatch (every such
    # setup failed the check). Any other value for it still is.
    unused = {n for n, q in ref_params.items() if q.requires_grad and q.grad is None}
    got_before, got_after = ({n: v for n, v in got.items() if not (n in unused and v == 0.0)}
                             for got in (got_before, got_after))
    problems += _diff_table(before, got_before, rtol, atol, "gradient norm before clipping")
    problems += _diff_table(after, got_after, rtol, atol, "gradient norm after clipping")
    problems += scaling
    problems += _verdict_problems(result, total, smallest, got_before, mode, rtol, atol)
    if problems:
        raise AssertionError(
            f"dist_clip on rank {rank}/{world} does not match the unsharded float64 model "
            f"(norm_type={norm_type}, mode={mode}, max_norm={max_norm}, rtol={rtol}):\n" + "\n".join(problems)
            + "\n(a wrapper computing in low precision on float32 parameters, such as FSDP2's MixedPrecisionPolicy "
            "with bf16 params, differs from the float64 model by its roundings, not by the clip: pass rtol, about "
            "5e-2 for bf16 per-parameter norms; dropout on an accelerator draws other masks than the float64 CPU "
            "model: build the model with dropout 0 for the check)"
        )
    return got_before


# Default rtol against the float64 model for models holding low-precision parameters: their gradients differ
# from the float64 model's by a few roundings of the dtype (measured up to 4.9e-3 for bf16), not by the clip.
_LOW_PRECISION_RTOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _local_pieces(target: Any) -> list[tuple[str, Tensor, Tensor]]:
    """(name, this rank's gradient piece, a copy of it) for every piece dist_clip would scale here."""
    from ._slots import named_shards

    out = []
    seen: set[int] = set()
    for shard in named_shards(target, None).shards:
        for name, t in zip(shard.names, shard.tensors):
            t = getattr(t, "_local_tensor", t)
            if id(t) not in seen and t.is_floating_point():
                seen.add(id(t))
                out.append((name, t, t.detach().clone()))
    return out


def _combined(norms: Sequence[float], p: float) -> float:
    """The total of per-parameter norms of order ``p``, in float64."""
    if not norms:
        return 0.0
    if any(math.isnan(n) for n in norms):
        return math.nan  # (Python's max skips a NaN after the first entry)
    if math.isinf(p):
        return max(norms)
    if p == 0:
        return math.fsum(norms)
    try:
        return math.fsum(n**p for n in norms) ** (1.0 / p)
    except OverflowError:  # p-th powers summing beyond float64: the total measured is inf too (the check raised)
        return math.inf


def _scaling_problems(
    pieces: list[tuple[str, Tensor, Tensor]], result: Any, norms: dict[str, float], max_norm: float, mode: str,
    p: float,
) -> list[str]:
    """The clip applied here is exactly the one its total implies: ``clip_coef`` is ``min(1, max_norm / (norm +
    1e-6))`` of the returned total (per parameter: of the reported norm), and every local piece is its copy times
    that coefficient, multiplied in float32 (float64 for float64 gradients) and rounded to the gradient's dtype,
    bit for bit. This holds whatever the dtype: a coefficient off by 1e-3 hides within a bf16 model's tolerance
    against the float64 model, not here."""
    from . import _scale

    problems = []
    coefs = result.clip_coef.detach().to("cpu", torch.float64).reshape(-1)
    if mode == "total":
        want = {"": _coef(max_norm, float(result.total_norm))}
        index = {"": 0}
    else:
        index = {n: i for i, n in enumerate(result.slots)}
        want = {n: _coef(max_norm, norms[n]) for n in index if n in norms}
    for key, w in want.items():
        got = float(coefs[index[key]])
        if not ((math.isnan(w) and math.isnan(got)) or abs(got - w) <= 1e-6 * abs(w) + 1e-30):
            problems.append(f"clip_coef{' of ' + key if key else ''}: {got!r}, but its norm implies {w!r}")
    if mode == "total" and norms:  # the float64 total, where the returned float32 one may be rounded or inf
        want[""] = _coef(max_norm, _combined(list(norms.values()), p))
    wrong = []
    for name, now, then in pieces:
        key = "" if mode == "total" else name
        at = index.get(key)
        if at is None:
            continue
        tiny = 0.0 < want.get(key, math.nan) < 2.0**-126
        if tiny and then.is_floating_point():
            # A coefficient float32 holds only as a subnormal: one float64 product, rounded once (README
            # "Accuracy"), not clip_coef's float32 value (a correct clip failed here). In mode "total" the float64
            # total is known from the reported norms to about 1e-15, so one rounding of the dtype either way.
            expected = then.to(torch.float64) * want[key]
            if mode == "total":
                finfo = torch.finfo(then.dtype)
                bad = (now.detach().to(torch.float64) - expected).abs() > (
                    expected.abs() * finfo.eps + finfo.smallest_normal * finfo.eps)
            else:
                bad = _scale.round_once(expected, then.dtype).to(then.dtype) != now.detach()
        else:
            op = torch.float64 if then.dtype == torch.float64 else torch.float32
            expected = (then.to(op) * coefs[at].to(device=then.device, dtype=op)).to(then.dtype)
            bad = expected != now.detach()
        differ = int(bad.logical_and(~(expected.isnan() & now.detach().isnan())).sum())
        if differ:
            wrong.append(f"{name} ({differ} of {now.numel()} entries)")
    if wrong:
        problems.append("gradient pieces on this rank not equal to their copy before the clip times clip_coef: "
                        + ", ".join(wrong[:8]) + (f" and {len(wrong) - 8} more" if len(wrong) > 8 else ""))
    return problems


def _verdict_problems(result: Any, total: float, smallest: float, norms: dict[str, float], mode: str, rtol: float,
                      atol: float) -> list[str]:
    """``finite`` against the float64 model (its total finite, and in mode "unitwise" no unit coefficient NaN),
    ``clipped`` against the coefficients returned (one below 1 whose norm is not zero, in a finite call), and in
    mode "unitwise" ``clip_coef`` against the float64 model's smallest unit coefficient (to twice ``rtol``: a ratio
    of two norms). A wrong flag, or a unit-wise ``clip_coef`` of 1 over clipped rows, passed every other check."""
    problems = []
    coefs = result.clip_coef.detach().to("cpu", torch.float64).reshape(-1)
    finite = bool(result.finite)
    want = math.isfinite(total) and not math.isnan(smallest)
    if finite != want:
        problems.append(f"finite: {finite}, but the unsharded total norm is {total!r}"
                        + (f" and its smallest unit coefficient {smallest!r}" if mode == "unitwise" else ""))
    if mode == "unitwise":
        got = float(coefs[0])
        if not _agree(smallest, got, 2 * rtol, atol):
            problems.append(f"clip_coef (the smallest unit coefficient): unsharded reference {smallest!r}, sharded "
                            f"{got!r}")
        scaled = got < 1
    elif mode == "total":
        scaled = float(coefs[0]) < 1 and float(result.total_norm) > 0
    else:  # a slot whose gradients are all zero, or absent, is left as it was whatever its coefficient
        scaled = any(float(coefs[i]) < 1 and norms.get(n, 0.0) > 0 for i, n in enumerate(result.slots))
    if bool(result.clipped) != (finite and scaled):
        problems.append(f"clipped: {bool(result.clipped)}, but clip_coef {coefs.tolist()[:8]} and finite {finite} "
                        f"say {finite and scaled}")
    return problems


#: The longest the spawned ranks' groups wait (about 3 years): gloo holds its timeout in nanoseconds, and from about
#: 9.2e9 s (timeout_s=1e10) on it overflowed: one rank's init_process_group failed "Invalid timeout" while the
#: other waited, and the call waited the whole timeout_s for it (a hang).
_GROUP_TIMEOUT_CAP_S = 1e8


def _spawned(rank: int, world: int, store_path: str, args: tuple[Any, ...], out: Any, deadline: float) -> None:
    import time
    import traceback
    from datetime import timedelta

    import torch.distributed as dist

    made: list[Any] = []
    try:
        torch.set_num_threads(1)
        store = dist.FileStore(store_path, world)

        def bounded(seconds: float) -> timedelta:  # 1 s at least (a deadline past), the cap at most
            return timedelta(seconds=min(max(seconds, 1.0), _GROUP_TIMEOUT_CAP_S))

        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=bounded(deadline - time.time()))
        # The process group's timeout follows the call's: 0.9 of the time it leaves (``deadline``, wall clock)
        # once every rank is up, 5 s less at least, so that a collective that hangs fails on the ranks, with their
        # tracebacks, before the call gives up on them. A fixed 120 s failed a wrap_fn taking longer on one rank,
        # a DeepSpeed op build say, under timeout_s=600; 0.9 x timeout_s counted from each rank's own start,
        # seconds after the call's (spawning, importing torch, the other ranks' start under load), so under
        # timeout_s=30 or 60 the call gave up first and told no rank's traceback.
        left = deadline - time.time()  # (5 s at least for the traceback to reach the call on a busy machine)
        timeout = bounded(min(0.9 * left, left - 5.0))
        dist.distributed_c10d._set_pg_timeout(timeout)
        # Groups wrap_fn makes (dist.new_group: DeepSpeed's clone of the world group, HSDP's replicate and shard
        # groups) take torch's default, 30 minutes, not the default group's: a hang in one was reported only as
        # "ranks [0, 1] did not report". This process is the call's own, so its default is the call's too.
        dist.distributed_c10d.default_pg_timeout = timeout
        wrap_fn = args[1]

        def wrap(model: Any) -> Any:  # what wrap_fn made, let go of below
            target = wrap_fn(model)
            made.append(target)
            return target

        try:
            report = (rank, True, _check_rank(args[0], wrap, *args[2:]))
        except BaseException:  # noqa: BLE001 - as text: the traceback's frames, holding the model, are let go
            report = (rank, False, traceback.format_exc())
        out.put(report)
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put((rank, False, traceback.format_exc()))
    finally:
        # The wrapped model is collected before the group ends (bootstrap.shutdown: gc first): destroyed while
        # DDP's or FSDP2's reference cycles still held it, gloo's threads could abort the rank at interpreter exit
        # ("terminate called without an active exception", 19 exits in 60 with DDP and FSDP2), after its report.
        # A DeepSpeed engine is held out of gc's sight (its ZeRO hooks, ZeRO-3's globals) until it is released.
        from .bootstrap import shutdown

        try:
            _release(made)
        finally:
            shutdown()


def _release(made: list[Any]) -> None:
    """Release the DeepSpeed engines among ``made`` and empty it (a function of its own: a loop variable in the
    caller's frame would hold the last target past the collection)."""
    from .adapters import deepspeed as deepspeed_adapter

    try:
        for target in made:
            if deepspeed_adapter.matches(target):
                deepspeed_adapter.release(target)
    finally:
        made.clear()


def assert_clip_matches_unsharded(
    build_model: Any,
    wrap_fn: Any,
    batch_fn: Any,
    *,
    world_size: int | None = None,
    norm_type: float | str = 2.0,
    max_norm: float = 1.0,
    mode: str = "total",
    agc: Any = None,
    loss_fn: Any = None,
    rtol: float | None = None,
    atol: float = 1e-7,
    seed: int = 0,
    timeout_s: float = 300.0,
) -> dict[str, float]:
    """Check that dist_clip on your sharded model clips exactly like the unsharded model; for your own CI.

    Every rank seeds torch with ``seed``, calls ``build_model()``, keeps a float64 CPU copy, wraps the model
    with ``wrap_fn(model)`` (DDP, FSDP1, ``fully_shard``...: whatever your training does; return the object to
    clip and to call), runs ``loss_fn(target(batch_fn(rank, world)))`` (default: mean of squares) backward and
    clips with :class:`dist_clip.GradClipper` (``mode`` "total", "per_param" or "unitwise"). The copy is fed
    every rank's batch (the mean of their losses, which is what data parallelism averages), and clipped by the
    single-process float64 definition. Norms per parameter before and after clipping, the total, and the
    number of collectives (at most one) must agree; otherwise ``AssertionError`` with a table of norms per
    parameter. Each rank also checks that the clip it applied is exactly the one the returned norms imply
    (``clip_coef`` from the total, or per parameter, and every local gradient piece equal to its copy before
    the clip times that coefficient, bit for bit, in modes "total" and "per_param"): that check does not
    depend on the model's precision. ``finite`` must match the float64 model, ``clipped`` the coefficients
    returned, and in mode "unitwise" ``clip_coef`` the float64 model's smallest unit coefficient.

    Args:
        build_model: ``() -> nn.Module``; called on every rank (and picklable when ``world_size`` is given).
        wrap_fn: ``(model) -> target`` run on every rank inside the process group.
        batch_fn: ``(rank, world_size) -> input`` of that rank; called once per rank of the world on every
            rank, in rank order, after ``wrap_fn``, with torch seeded by ``seed + 1``: each rank feeds its own
            batch to the wrapped model and all of them to the float64 model.
        world_size: spawn this many CPU gloo ranks (the functions must be module-level); ``None`` runs inside
            the existing process group, on every rank, like any collective.
        norm_type, max_norm, mode, agc: the clip to check.
        loss_fn: ``(output) -> scalar loss``.
        rtol, atol: tolerance of every comparison with the float64 model. ``rtol=None``: 1e-5, or 2e-2 for
            a model holding bf16 parameters and 5e-3 for fp16 ones (their gradients differ from the float64
            model's by the dtype's roundings); pass it for mixed-precision wrappers that compute in low
            precision on float32 parameters.
        seed: seeds the model on every rank (an int >= 0); ``seed + 1`` the batches, ``seed + 2 + r`` rank r's
            forward, wrapped and float64 (dropout draws the same masks in both on the CPU).
        timeout_s: how long spawned ranks may take (seconds, > 0, from the call's start); their process group's
            timeout is 0.9 of what is left of it when they start the group (5 s less at least), so that a
            collective that hangs fails on the ranks, with their tracebacks, before the call gives up.

    Returns:
        The sharded per-parameter norms before clipping (name -> float), from this rank (or rank 0 when spawned).
    """
    # Checked here, before any rank starts, so that a bad argument is a ValueError, not a failure of the ranks.
    from .clip import _check_max_norm

    _norm.parse_norm_type(norm_type)
    _check_max_norm(max_norm)
    if mode not in ("total", "per_param", "unitwise"):
        raise ValueError(f"mode must be 'total', 'per_param' or 'unitwise', got {mode!r}")
    from .adaptive import AGC
    from .clipper import ClipperConfig

    # What the ranks would build, checked here (unitwise needs p > 0, agc must be an AGC, ...).
    ClipperConfig(max_norm=max_norm, norm_type=norm_type, mode=mode, agc=agc if agc is not None else AGC())
    if agc is not None and mode != "unitwise":  # it was ignored, and the check passed
        raise ValueError(f"agc= is the setting of mode='unitwise'; got it with mode={mode!r}")
    for name, fn in (("build_model", build_model), ("wrap_fn", wrap_fn), ("batch_fn", batch_fn),
                     ("loss_fn", loss_fn)):
        if not callable(fn) and not (name == "loss_fn" and fn is None):  # surfaced as a rank's traceback
            raise TypeError(f"{name} must be callable, got {type(fn).__name__} {fn!r}")
    for name, tol in (("rtol", _norm.numpy_scalar(rtol)), ("atol", _norm.numpy_scalar(atol))):
        if name == "rtol" and tol is None:
            continue
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= tol < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {tol!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:  # (torch.manual_seed's range)
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
    args = (build_model, wrap_fn, batch_fn, loss_fn, norm_type, max_norm, mode, agc, rtol, atol, seed)
    if world_size is None:
        return _check_rank(*args)
    import os
    import queue
    import tempfile
    import time

    import torch.multiprocessing as mp

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be None or an int >= 1, got {world_size!r}")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    deadline = time.monotonic() + timeout_s
    wall_deadline = time.time() + timeout_s  # the ranks' (another process's monotonic clock need not be ours)
    with tempfile.TemporaryDirectory(prefix="dist_clip_check_") as tmp:
        procs = [
            ctx.Process(target=_spawned, args=(r, world_size, os.path.join(tmp, "store"), args, out, wall_deadline),
                        daemon=True)
            for r in range(world_size)
        ]
        results: dict[int, tuple[bool, Any]] = {}
        try:
            for proc in procs:
                proc.start()
            while len(results) < world_size and time.monotonic() < deadline:
                try:
                    rank, ok, value = out.get(timeout=1.0)
                except queue.Empty:
                    # A rank that died before reporting ends the wait; ranks that reported and exited do not.
                    waiting = [proc for r, proc in enumerate(procs) if r not in results]
                    if any(not proc.is_alive() for proc in waiting) and out.empty():
                        time.sleep(1.0)
                        if out.empty():
                            break
                    continue
                results[rank] = (ok, value)
        finally:  # whatever happened here (an interrupt too), no rank outlives the call
            for proc in procs:
                if proc.pid is not None:
                    proc.join(timeout=5)
                    if proc.is_alive():
                        proc.kill()
                        proc.join(timeout=5)
    failures = {r: v for r, (ok, v) in results.items() if not ok}
    missing = sorted(set(range(world_size)) - results.keys())
    if failures or missing:
        detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        lost = f" ranks {missing} did not report within {timeout_s:.0f}s or died;" if missing else ""
        raise AssertionError(f"assert_clip_matches_unsharded failed on {world_size} ranks:{lost}{detail}")
    return results[0][1]
