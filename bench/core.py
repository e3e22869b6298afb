"""Single-process benchmark: dist_clip against ``torch.nn.utils.clip_grad_norm_`` on the same tensors.

Run: ``python -m bench core`` (``--quick`` for a smoke run). Every figure is a median over repeats in which
the contenders take turns (torch, ours, torch, ours...), so machine noise hits both alike; ratios are
ours / torch. Before every timed call the gradients are restored from a copy (clipping changes them, and
torch's fp16 clip can zero them) and, on the CPU, the caches flushed, as after a backward pass over a large
model. The "torch err" and "ours err" columns are relative errors of the returned norm against the float64
reference on the same data. Untimed, every row also checks dist_clip's norm against that reference (the
library's contract: 1e-6 relative for fp32, 1e-5 for bf16/fp16, p = 0 exact to float32's 2^24) and its clipped gradients
against the reference gradients times ``min(1, max_norm / (norm + 1e-6))``; a miss raises
``bench.common.CheckFailed`` naming the row (``python -m bench`` then exits 1). torch's side is only reported.

Sections: the norm orders and dtypes on a 64 Mi-element tensor and on 100 tensors of the same total (256 MiB
fp32), clipping (max_norm below the norm) and not clipping (above it); the local pass against the read
bandwidth of ``torch.sum``; 1000 small tensors; clipping folded into a fused optimizer step; and the same on
CUDA when a GPU is present ("not measured" otherwise).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch

import dist_clip
from dist_clip import _native
from dist_clip.clip import local_total_partial
from dist_clip.testing import reference_norm

from .common import check_clipped, check_norm, device_reference_norm, diff_ratio, fail_on, table
from .common import verdict as _verdict

#: Target ratios (ours / torch) from the performance issue, by norm order, for fp32.
TARGET_CLIP = {2.0: 1.0, math.inf: 0.3}
TARGET_OTHER_P = 0.5
TARGET_NO_CLIP_P2 = 0.6
TARGET_HALF = 1.0  # bf16/fp16 p=2 against torch's (inaccurate) bf16/fp16 time
TARGET_BANDWIDTH = 0.8
TARGET_FUSED = 0.6
TARGET_SMALL = 1.0


def interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    setup: Callable[[], object] | None = None,
    sync: Callable[[], object] | None = None,
    budget_s: float = 20.0,
) -> dict[str, float]:
    """Median milliseconds of each function, the functions taking turns in every repeat.

    Slow rounds (seconds) cut the repeats down to what fits in about ``budget_s``, never below 5. Under a
    multi-rank process group every rank must call it (``fns`` may hold collectives, ``setup`` a barrier): the
    ranks take the smallest of their repeat counts, or one would wait forever for the others' extra rounds.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    r = 0
    while r < warmup + repeats:
        round_ms = 0.0
        for name, fn in fns.items():
            if setup is not None:
                setup()
            if sync is not None:
                sync()
            start = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            elapsed = (time.perf_counter() - start) * 1e3
            if r >= warmup:
                times[name].append(elapsed)
            round_ms += elapsed
        if r == warmup - 1 or (warmup == 0 and r == 0):
            repeats = _agreed(max(min(repeats, 5), min(repeats, int(budget_s * 1e3 / max(round_ms, 1e-3)))))
        r += 1
    return {k: statistics.median(v) for k, v in times.items()}


def _agreed(repeats: int) -> int:
    """The smallest ``repeats`` over the default process group's ranks (itself without a multi-rank group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([repeats], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())
    return repeats


def check_clip(
    row: str, ps: list[torch.nn.Parameter], saved: list[torch.Tensor], max_norm: float, p: float,
    restore: Callable[[], object] | None = None,
) -> list[str]:
    """Untimed: one ``dist_clip.clip_grad_norm_(ps, max_norm, p)`` on the gradients ``saved`` holds (restored
    first when ``restore`` is given), its norm against the float64 reference and its gradients against the
    reference's clip. Problems, or an empty list."""
    if restore is not None:
        restore()
    want = _reference(saved, p)
    total = dist_clip.clip_grad_norm_(ps, max_norm, p)
    return check_norm(row, total, want, p, saved[0].dtype) + check_clipped(
        row, [q.grad for q in ps], saved, want, max_norm
    )


def _reference(grads: Sequence[torch.Tensor], p: float) -> float:
    """The float64 reference: on the host for CPU gradients, on their device otherwise (same definition)."""
    if grads and grads[0].device.type != "cpu":
        return device_reference_norm(grads, p)
    return reference_norm(grads, p)


_SCRATCH: list[torch.Tensor] = []


def flush_caches() -> None:
    """Read 64 MiB of unrelated memory (twice this machine's L3): the gradients a setup just wrote are then
    in DRAM, as after a backward pass over a large model, and their dirty lines are no longer in the way."""
    if not _SCRATCH:
        _SCRATCH.append(torch.ones(16 << 20))
    _SCRATCH[0].sum()


def _grads(layout: str, dtype: torch.dtype, quick: bool, device: str = "cpu") -> list[torch.Tensor]:
    total = (1 << 16) if quick else (64 << 20)
    if layout.startswith("1 x"):
        sizes = [total]
    elif layout.startswith("100 x"):
        sizes = [total // 100] * 100
    else:
        sizes = [64 if quick else 1024] * 1000
    g = torch.Generator().manual_seed(0)
    out = []
    for n in sizes:
        out.append((torch.randn(n, generator=g) * 0.01).to(device=device, dtype=dtype))
    return out


def _restore(grads: list[torch.Tensor], saved: list[torch.Tensor], flush: bool) -> None:
    torch._foreach_copy_(grads, saved)
    if flush:
        flush_caches()


def _clip_pair(ps: list[torch.nn.Parameter], max_norm: float, p: float) -> dict[str, Callable[[], object]]:
    return {
        "torch": lambda: torch.nn.utils.clip_grad_norm_(ps, max_norm, p, foreach=True),
        "ours": lambda: dist_clip.clip_grad_norm_(ps, max_norm, p),
    }


def _step_fns(
    ps: list[torch.nn.Parameter], opt: torch.optim.Optimizer, max_norm: float
) -> dict[str, Callable[[], object]]:
    return {
        "step": opt.step,
        "clip then step": lambda: (dist_clip.clip_grad_norm_(ps, max_norm), opt.step()),
        "fused clip+step": lambda: (dist_clip.clip_grad_norm_(ps, max_norm, optimizer=opt), opt.step()),
        "torch clip then step": lambda: (torch.nn.utils.clip_grad_norm_(ps, max_norm), opt.step()),
        "norm alone": lambda: dist_clip.get_total_norm(ps),  # one read pass: the floor of any clipping
    }


def _params(grads: Sequence[torch.Tensor]) -> list[torch.nn.Parameter]:
    ps = []
    for g in grads:
        # A zero-stride stand-in: the parameter's values are never read, so it needs no memory of its own.
        p = torch.nn.Parameter(torch.zeros(1, dtype=g.dtype, device=g.device).expand(g.shape))
        p.grad = g
        ps.append(p)
    return ps


def _rel(got: float, want: float) -> float:
    if math.isnan(want) or want == 0:
        return float("nan") if got != want else 0.0
    return abs(got - want) / abs(want)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _p_name(p: float) -> str:
    return "inf" if math.isinf(p) else f"{p:g}"


def _target(p: float, dtype: torch.dtype, clipping: bool) -> float:
    if dtype in (torch.bfloat16, torch.float16):
        return TARGET_HALF if p == 2 else TARGET_CLIP.get(p, TARGET_OTHER_P)
    if p == 2 and not clipping:
        return TARGET_NO_CLIP_P2
    return TARGET_CLIP.get(p, TARGET_OTHER_P)


def _fmt_ratio(ratio: float, target: float | None) -> tuple[str, str]:
    """The ratio and its verdict; a NaN ratio (differences of medians that noise made negative) says so."""
    if target is None:
        return f"{ratio:.2f}", ""
    return f"{ratio:.2f}", _verdict(ratio, target)


def bench_orders(quick: bool, device: str = "cpu", problems: list[str] | None = None) -> str:
    """The main table: every order, dtype, layout, clipping or not. Failed checks are appended to ``problems``."""
    problems = [] if problems is None else problems
    sync = torch.cuda.synchronize if device == "cuda" else None
    repeats = 3 if quick else 15
    orders = [0.0, 2.0, math.inf] if quick else [0.0, 1.0, 2.0, 3.0, math.inf]  # (0: the exact count checked)
    rows = []
    layouts = ["100 x 0.64 Mi"] if quick else ["1 x 64 Mi", "100 x 0.64 Mi"]
    dtypes = (torch.float32, torch.bfloat16) if quick else (torch.float32, torch.bfloat16, torch.float16)
    for layout in layouts:
        for dtype in dtypes:
            grads = _grads(layout, dtype, quick, device)
            ps = _params(grads)
            saved = [g.clone() for g in grads]
            nbytes = sum(g.numel() * g.element_size() for g in grads)
            restore = partial(_restore, grads, saved, device == "cpu")

            for p in orders:
                want = _reference(grads, p)
                torch_total = torch.nn.utils.get_total_norm(grads, p, foreach=True).item()
                ours_total = dist_clip.get_total_norm(ps, p)
                for clipping in (True, False):
                    if p == 0 and clipping and dtype != torch.float32:
                        continue  # L0 with clipping: one row (fp32) is enough
                    max_norm = want * 0.5 if clipping else want * 2 + 1.0
                    # Every call starts from the same gradients: clipping changes them, and torch's fp16 L1
                    # norm overflows to inf, which makes its clip zero them (its coefficient is 0).
                    t = interleaved(_clip_pair(ps, max_norm, p), repeats, setup=restore, sync=sync)
                    row = f"{device} {layout} {_dtype_name(dtype)} p={_p_name(p)} clips={'yes' if clipping else 'no'}"
                    problems += check_norm(row + " (get_total_norm)", ours_total, want, p, dtype)
                    problems += check_clip(row, ps, saved, max_norm, p, restore)
                    target = _target(p, dtype, clipping)
                    ratio, verdict = _fmt_ratio(t["ours"] / t["torch"], target)
                    rows.append(
                        [
                            layout,
                            str(dtype).replace("torch.", ""),
                            _p_name(p),
                            "yes" if clipping else "no",
                            f"{t['torch']:.2f}",
                            f"{t['ours']:.2f}",
                            ratio,
                            verdict,
                            f"{_rel(torch_total, want):.1e}",
                            f"{_rel(ours_total.item(), want):.1e}",
                            f"{nbytes / t['ours'] / 1e6:.1f}",
                        ]
                    )
    headers = ["layout", "dtype", "p", "clips", "torch ms", "ours ms", "ratio", "target", "torch err", "ours err",
               "ours GB/s"]
    return table(headers, rows)


def bench_bandwidth(quick: bool, problems: list[str] | None = None) -> str:
    """The local norm pass (``local_total_partial``: this rank's partial, before the collective and the root)
    against torch.sum on the same bytes; the whole ``get_total_norm`` call for comparison."""
    problems = [] if problems is None else problems
    repeats = 5 if quick else 21
    nbytes = (1 << 18) if quick else (256 << 20)  # the same bytes for every dtype
    rows = []
    for dtype in (torch.float32,) if quick else (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(nbytes // dtype.itemsize) * 0.01).to(dtype)
        for p in (2.0, math.inf) if quick else (0.0, 1.0, 2.0, 3.0, 3.5, math.inf):
            fns = {
                "sum": x.sum,
                "local": partial(local_total_partial, [x], p, None, x.device),
                "full": partial(dist_clip.get_total_norm, [x], p),
            }
            t = interleaved(fns, repeats)
            problems += check_norm(f"bandwidth {_dtype_name(dtype)} p={_p_name(p)}", dist_clip.get_total_norm([x], p),
                                   reference_norm([x], p), p, dtype)
            frac = t["sum"] / t["local"]
            target = TARGET_BANDWIDTH if p != 3.5 else None
            rows.append(
                [
                    str(dtype).replace("torch.", ""),
                    _p_name(p),
                    f"{nbytes / t['sum'] / 1e6:.1f}",
                    f"{nbytes / t['local'] / 1e6:.1f}",
                    f"{frac:.2f}",
                    (f">= {target:g}: " + ("met" if frac >= target else "MISSED")) if target else "(no target)",
                    f"{nbytes / t['full'] / 1e6:.1f}",
                ]
            )
    headers = ["dtype", "p", "torch.sum GB/s", "local pass GB/s", "fraction", "target", "get_total_norm GB/s"]
    return table(headers, rows)


def bench_small(quick: bool, problems: list[str] | None = None, device: str = "cpu") -> str:
    """1000 tensors of 1 Ki elements: per-call overhead."""
    repeats = 5 if quick else 51
    sync = torch.cuda.synchronize if device == "cuda" else None
    rows = []
    for dtype in (torch.float32,) if quick else (torch.float32, torch.bfloat16):
        grads = _grads("1000 x 1 Ki", dtype, quick, device)
        ps = _params(grads)
        saved = [g.clone() for g in grads]
        for p in (2.0,) if quick else (2.0, math.inf, 1.0):
            want = _reference(grads, p)
            for clipping in (True, False):
                max_norm = want * 0.5 if clipping else want * 2 + 1.0
                restore = partial(_restore, grads, saved, False)
                t = interleaved(_clip_pair(ps, max_norm, p), repeats, warmup=3, setup=restore, sync=sync)
                if problems is not None:
                    problems += check_clip(f"1000 x 1 Ki {_dtype_name(dtype)} p={_p_name(p)} "
                                           f"clips={'yes' if clipping else 'no'}", ps, saved, max_norm, p, restore)
                ratio, verdict = _fmt_ratio(t["ours"] / t["torch"], TARGET_SMALL)
                rows.append(
                    [str(dtype).replace("torch.", ""), _p_name(p), "yes" if clipping else "no",
                     f"{t['torch']:.3f}", f"{t['ours']:.3f}", ratio, verdict]
                )
    return table(["dtype", "p", "clips", "torch ms", "ours ms", "ratio", "target"], rows)


def bench_fused(quick: bool, problems: list[str] | None = None, device: str = "cpu") -> str:
    """Clipping folded into torch's fused optimizers vs clipping then stepping, on the same parameters."""
    repeats = 3 if quick else 15
    sync = torch.cuda.synchronize if device == "cuda" else None
    n_tensors, size = (4, 1 << 14) if quick else (16, 4 << 20)
    rows = []
    makers = [
        ("AdamW(fused)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
        ("SGD(fused, momentum)", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True)),
    ]
    for name, make in makers[:1] if quick else makers:
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(size, generator=g).to(device)) for _ in range(n_tensors)]
        saved = [torch.randn(size, generator=g).to(device) for _ in range(n_tensors)]
        for p in ps:
            p.grad = torch.empty(size, device=device)
        opt = make(ps)
        want = _reference(saved, 2.0)
        max_norm = want * 0.5

        grads = [p.grad for p in ps]
        restore = partial(_restore, grads, saved, device == "cpu")
        t = interleaved(_step_fns(ps, opt, max_norm), repeats, setup=restore, sync=sync)
        if problems is not None:  # the plain clip's gradients; the fused call's norm (its coefficient rides the step)
            restore()
            total = dist_clip.clip_grad_norm_(ps, max_norm, optimizer=opt)
            opt.step()  # takes the handed coefficient
            problems += check_norm(f"fused {name} optimizer=", total, want, 2.0, torch.float32)
            problems += check_clip(f"fused {name}", ps, saved, max_norm, 2.0, restore)
        sep = t["clip then step"] - t["step"]
        fused = t["fused clip+step"] - t["step"]
        torch_part = t["torch clip then step"] - t["step"]
        ratio = diff_ratio(fused, sep)
        rows.append(
            [name, f"{n_tensors * size / 2**20:g} Mi", f"{t['step']:.1f}", f"{t['torch clip then step']:.1f}",
             f"{t['clip then step']:.1f}", f"{t['fused clip+step']:.1f}", f"{torch_part:.1f}", f"{sep:.1f}",
             f"{fused:.1f}", f"{ratio:.2f}", _fmt_ratio(ratio, TARGET_FUSED)[1],
             f"{diff_ratio(fused, torch_part):.2f}", f"{t['norm alone']:.1f}",
             f"{diff_ratio(fused, t['norm alone']):.2f}"]
        )
    headers = ["optimizer", "params", "step ms", "torch clip+step", "clip then step", "fused clip+step",
               "torch clip part", "our clip part", "fused clip part", "fused / separate", "target",
               "fused / torch's part", "norm alone (one read)", "fused part / one read"]
    return table(headers, rows)


def _gpu_section(quick: bool, problems: list[str] | None = None) -> str:
    if not torch.cuda.is_available():
        return (
            "GPU: not measured (no CUDA device on this machine). The CUDA path runs the same benchmark with "
            "`python -m bench core` (or `python -m bench gpu`, the CUDA tables alone) on a GPU machine; rows to fill: "
            "p = 0, 1, 2, 3, inf in fp32/bf16/fp16 against torch, the local pass against a device copy's bandwidth, "
            "1000 small tensors, the fused optimizer step, zero host syncs (`tests/test_gpu.py`)."
        )
    problems = [] if problems is None else problems
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    head = (f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}. Medians over interleaved repeats, each call "
            f"synchronized; the float64 references computed on the device.")
    return "\n\n".join([
        head,
        "#### Norm orders and dtypes (CUDA)\n\n" + bench_orders(quick, device="cuda", problems=problems),
        "#### Local pass vs a device copy's bandwidth (CUDA, 1 GiB)\n\n" + _gpu_bandwidth(quick, problems),
        "#### 1000 tensors of 1 Ki elements (CUDA)\n\n" + bench_small(quick, problems, device="cuda"),
        "#### Clipping folded into a fused optimizer step (CUDA)\n\n" + bench_fused(quick, problems, device="cuda"),
        "#### Host syncs on the default path (CUDA)\n\n" + _gpu_syncs(problems),
    ])


def _gpu_bandwidth(quick: bool, problems: list[str] | None = None) -> str:
    """The local pass (this rank's partial) and the whole ``get_total_norm`` against a device-to-device copy of
    the same bytes (counted read + write, as the copy moves both); the norm reads its bytes once."""
    problems = [] if problems is None else problems
    nbytes = (1 << 18) if quick else (1 << 30)
    rows = []
    for dtype in (torch.float32,) if quick else (torch.float32, torch.bfloat16):
        x = (torch.randn(nbytes // dtype.itemsize, device="cuda") * 0.01).to(dtype)
        y = torch.empty_like(x)
        for p in (2.0, math.inf) if quick else (0.0, 1.0, 2.0, 3.0, math.inf):
            fns = {
                "copy": partial(y.copy_, x),
                "local": partial(local_total_partial, [x], p, None, x.device),
                "full": partial(dist_clip.get_total_norm, [x], p),
            }
            t = interleaved(fns, 5 if quick else 31, sync=torch.cuda.synchronize)
            problems += check_norm(f"cuda bandwidth {_dtype_name(dtype)} p={_p_name(p)}",
                                   dist_clip.get_total_norm([x], p), device_reference_norm([x], p), p, dtype)
            copy_bw = 2 * nbytes / t["copy"] / 1e6
            local_bw = nbytes / t["local"] / 1e6
            frac = local_bw / copy_bw
            rows.append([_dtype_name(dtype), _p_name(p), f"{copy_bw:.0f}", f"{local_bw:.0f}", f"{frac:.2f}",
                         f">= {TARGET_BANDWIDTH:g}: " + ("met" if frac >= TARGET_BANDWIDTH else "MISSED"),
                         f"{nbytes / t['full'] / 1e6:.0f}"])
        del x, y
    return table(["dtype", "p", "device copy GB/s", "local pass GB/s", "fraction", "target",
                  "get_total_norm GB/s"], rows)


def _gpu_syncs(problems: list[str]) -> str:
    """Each default-path call under ``torch.cuda.set_sync_debug_mode("error")``: "none" or the error (a problem:
    ``python -m bench`` then exits 1, as for a wrong norm)."""
    rows = []
    grads = _grads("100 x 0.64 Mi", torch.float32, True, "cuda")
    ps = _params(grads)
    calls = {
        "get_total_norm p=2": lambda: dist_clip.get_total_norm(ps),
        "clip_grad_norm_ p=2": lambda: dist_clip.clip_grad_norm_(ps, 1e-3),
        "clip_grad_norm_ p=inf": lambda: dist_clip.clip_grad_norm_(ps, 1e-3, math.inf),
        "clip_grad_norm_ p=1, foreach=False": lambda: dist_clip.clip_grad_norm_(ps, 1e-3, 1.0,
                                                                                         foreach=False),
    }
    for name, fn in calls.items():
        fn()  # warm-up: lazy initialisation may sync once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            seen = "none"
        except RuntimeError as e:  # "called a synchronizing CUDA operation", or another failure named as such
            kind = "SYNC" if "synchroniz" in str(e) else "ERROR"
            seen = f"{kind}: {str(e).splitlines()[0][:80]}"
            problems.append(f"cuda host syncs {name}: {seen}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        rows.append([name, seen])
    return table(["call", "host syncs"], rows)


def main(quick: bool = False) -> str:
    """The tables; ``bench.common.CheckFailed`` (carrying them) when a check of dist_clip's side failed."""
    problems: list[str] = []
    threads = torch.get_num_threads()
    kernel = "native kernel" if _native.available() else f"plain torch ({_native.status()})"
    parts = [
        f"torch {torch.__version__}, {threads} threads, CPU path: {kernel}. Medians, ours / torch."
        + (" Quick run: sizes cut about 1000x, fewer orders and dtypes; the headings and layouts name the full "
           "run's sizes." if quick else ""),
        "### Norm orders and dtypes (CPU)\n\n" + bench_orders(quick, problems=problems),
        "### Local pass vs torch.sum read bandwidth (CPU, one tensor of 256 MiB)\n\n"
        + bench_bandwidth(quick, problems),
        "### 1000 tensors of 1 Ki elements (CPU)\n\n" + bench_small(quick, problems),
        "### Clipping folded into a fused optimizer step (CPU)\n\n" + bench_fused(quick, problems),
        "### CUDA\n\n" + _gpu_section(quick, problems),
    ]
    return fail_on("core", problems, "\n\n".join(parts))


if __name__ == "__main__":
    import sys

    print(main(quick="--quick" in sys.argv))
