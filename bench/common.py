"""Timing helpers shared by the scenarios: medians of repeated runs, markdown tables."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def median_ms(
    fn: Callable[[], object], repeats: int = 11, warmup: int = 2, setup: Callable[[], object] | None = None
) -> float:
    """Median wall time of ``fn`` in milliseconds; ``setup`` runs untimed before each call."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""

    def fmt(v: object) -> str:
        if isinstance(v, float):  # 3 digits; whole numbers from 999.5 up (.3g printed 999.7 as "1e+03")
            return f"{v:.3g}" if abs(v) < 999.5 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def diff_ratio(part: float, whole: float) -> float:
    """``part / whole`` for two differences of medians; NaN where noise made either negative (or the whole 0):
    unguarded, a loaded run printed -82.47 and 1.64 as if they meant something."""
    return part / whole if part >= 0 and whole > 0 else float("nan")


def verdict(ratio: float, target: float) -> str:
    """``"<= target: met"`` or ``"MISSED"``; a NaN ratio (differences of medians that noise made negative) says so."""
    import math

    return f"<= {target:g}: " + ("noise (rerun)" if math.isnan(ratio) else "met" if ratio <= target else "MISSED")


def _rank_entry(
    rank: int, world: int, store_path: str, out_path: str, body: Callable[..., object], args: tuple
) -> None:
    import json
    import os
    import sys
    from datetime import timedelta

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # ranks share the machine's cores; more threads per rank only spin
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=600))
    result = body(*args)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    # Out without the interpreter's teardown: a C++ thread left joinable there (torch's profiler or gloo's) was
    # seen to abort a rank ("terminate called without an active exception", SIGABRT) after its result was in,
    # 1 run in 3 of the quick FSDP benchmark, failing the run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def on_ranks(world: int, body: Callable[..., object], *args: object) -> object:
    """Run ``body(*args)`` on ``world`` spawned gloo ranks (one thread each); return rank 0's (JSON) result."""
    import json
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="dist_clip_bench_") as tmp:
        out = os.path.join(tmp, "out.json")
        mp.start_processes(
            _rank_entry, args=(world, os.path.join(tmp, "store"), out, body, args), nprocs=world, start_method="spawn"
        )
        with open(out) as f:
            return json.load(f)


# --- correctness checks of dist_clip's side (untimed): a benchmark of a wrong number must not pass --------------

#: The library's accuracy contract for the returned norm, relative to the float64 reference, by gradient dtype
#: (README, Semantics: "Accuracy"); p = 0 is an exact count (up to the returned dtype's rounding).
NORM_RTOL = {"float32": 1e-6, "float64": 1e-6, "bfloat16": 1e-5, "float16": 1e-5}


class CheckFailed(AssertionError):
    """dist_clip's norm or clipped gradients missed the float64 reference; ``output`` holds the tables."""

    def __init__(self, scenario: str, problems: Sequence[str], output: str = "") -> None:
        self.output = output
        super().__init__(f"bench {scenario}: dist_clip check FAILED on {len(problems)} row(s):\n"
                         + "\n".join(f"  {p}" for p in problems))


def _dtype_name(dtype: object) -> str:
    return str(dtype).replace("torch.", "")


def check_norm(row: str, got: object, want: float, p: float, dtype: object) -> list[str]:
    """Problems (empty: none) of dist_clip's returned norm ``got`` against the float64 reference ``want``."""
    import math

    import torch

    value = float(got)
    if p == 0:  # a count: exact, up to the rounding of the returned dtype (float32 holds counts to 2^24 exactly)
        rounded = want
        if isinstance(got, torch.Tensor):
            rounded = float(torch.tensor(want, dtype=torch.float64).to(got.dtype))
        return [] if value == rounded else [f"{row}: L0 norm {value!r} != exact count {want!r}"]
    if math.isnan(want) or math.isinf(want):
        ok = (math.isnan(value) and math.isnan(want)) or value == want
        return [] if ok else [f"{row}: norm {value!r}, reference {want!r}"]
    rtol = NORM_RTOL.get(_dtype_name(dtype), 1e-5)
    rel = abs(value - want) / abs(want) if want else abs(value)
    return [] if rel <= rtol else [f"{row}: norm {value!r} vs float64 reference {want!r}: relative error "
                                   f"{rel:.2e} > {rtol:g} ({_dtype_name(dtype)})"]


def device_reference_norm(grads: Sequence[object], p: float) -> float:
    """``dist_clip.testing.reference_norm`` computed in float64 on the gradients' own device (one device): the
    same definition, without copying every row's gradients to the host (on a GPU that copy dominated the run)."""
    from dist_clip.testing import _reference_norm_on

    return _reference_norm_on(grads, p, None)  # type: ignore[arg-type]


def check_clipped(row: str, after: Sequence[object], before: Sequence[object], want: float,
                  max_norm: float) -> list[str]:
    """Problems of the gradients ``after`` dist_clip's clip against ``before`` (copies taken before it) times
    ``coef = min(1, max_norm / (want + 1e-6))`` of the float64 reference norm ``want``, element by element: each
    must lie between ``before`` times the lowest and the highest coefficient the norm's tolerance allows, both
    products rounded to the gradient's dtype (rounding is monotone, so any coefficient in between lands there;
    widened by float32's rounding of the coefficient and of the product a half multiply computes in). A bound
    of the dtype's eps per element let a bf16 coefficient 0.5% off pass."""
    import torch

    coef = min(1.0, max_norm / (want + 1e-6))
    for i, (a, b) in enumerate(zip(after, before, strict=True)):
        if a.numel() == 0:
            continue
        slack = NORM_RTOL.get(_dtype_name(a.dtype), 1e-5) + 2.0**-22
        # float64 where the gradients lie: on a GPU, copying 256 MiB to the host for every row took longer than
        # the benchmark itself (float64 elementwise products are exact there as here).
        wide = b.detach().to(torch.float64)
        ends = [(wide * c).to(a.dtype).double() for c in (coef * (1 - slack), min(1.0, coef * (1 + slack)))]
        low, high = torch.minimum(*ends), torch.maximum(*ends)
        got = a.detach().to(wide.device, torch.float64)
        ok = ((got >= low) & (got <= high)) | (got.isnan() & (wide * coef).isnan())
        if not bool(ok.all()):
            k = int(torch.argmin(ok.to(torch.uint8)))
            return [f"{row}: clipped gradient {i} element {k} is {got.reshape(-1)[k].item()!r}, expected "
                    f"{(wide * coef).reshape(-1)[k].item()!r} rounded to {_dtype_name(a.dtype)} (before "
                    f"{b.reshape(-1)[k].item()!r} x coef {coef:.6g})"]
    return []


def sharded_reference_norm(local: Sequence[object], p: float) -> float:
    """The float64 norm of gradients split across the ranks (each element on one rank): every rank's float64
    partial of ``local``, combined over the default group. Without a process group: ``local``'s norm."""
    import math

    import torch
    import torch.distributed as dist

    flat = [g.detach().reshape(-1).to("cpu", torch.float64) for g in local]
    whole = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)
    if math.isinf(p):
        part, op = (whole.abs().max() if whole.numel() else torch.zeros((), dtype=torch.float64)), "MAX"
    elif p == 0:
        part, op = (whole != 0).sum().to(torch.float64), "SUM"
    else:
        part, op = whole.abs().pow(p).sum(), "SUM"
    part = part.reshape(1).clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(part, op=getattr(dist.ReduceOp, op))
    value = float(part)
    return value if math.isinf(p) or p == 0 else value ** (1.0 / p)


def gather_problems(problems: list[str]) -> list[str]:
    """Every rank's problems, on every rank (rank-prefixed); unchanged without a multi-rank process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return problems
    everyone: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problems)
    return [f"rank {r}: {p}" for r, ps in enumerate(everyone) for p in ps]


def fail_on(scenario: str, problems: Sequence[str], output: str) -> str:
    """``output``, or ``CheckFailed`` carrying it when a check found problems."""
    if problems:
        raise CheckFailed(scenario, problems, output)
    return output
