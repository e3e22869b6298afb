"""Scaling benchmark: time of one clip against gradient size and world size, as a table and a PNG.

Run: ``python -m bench scaling`` (``--quick`` for a smoke run). Left panel: one process, fp32, p=2, clipping,
1 Mi to 256 Mi elements in 8 tensors, torch's ``clip_grad_norm_`` against ours (and our norm alone). Right
panel: ours on 1, 2 and 4 gloo ranks spawned on this machine (``bench.common.on_ranks``), each rank holding
that many elements of its own (``group=`` over plain tensors: one all-reduce per call), the slowest rank's
median. The 2-core CI machine runs 4 ranks on 2 cores (2 // world threads each, at least one), so the 4-rank
line measures oversubscription as well.
Untimed, every size checks dist_clip's norm against the float64 norm (over every rank's elements) and its
clipped gradients against the float64 ones times ``min(1, max_norm / (norm + 1e-6))``; a miss raises
``bench.common.CheckFailed``. The ranks agree on the repeat count (``bench.core.interleaved``).
The PNG goes to ``docs/notes/scaling.png`` (``$DIST_CLIP_BENCH_DIR`` overrides; quick runs use a temporary
directory).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

import dist_clip

from .common import (
    check_clipped,
    check_norm,
    fail_on,
    gather_problems,
    on_ranks,
    sharded_reference_norm,
    table,
)
from .core import _params, interleaved

N_TENSORS = 8


def _grads(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n // N_TENSORS, generator=g) for _ in range(N_TENSORS)]


def _clip_cycle(grads: list[torch.Tensor]) -> tuple[float, Callable[[], object]]:
    """``max_norm`` that halves the gradients, and a setup that doubles them back (exact in binary)."""
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
    return float(torch.linalg.vector_norm(norms)) * 0.5, partial(torch._foreach_mul_, grads, 2.0)


def _clip_pair(params: list[torch.nn.Parameter], max_norm: float) -> dict[str, Callable[[], object]]:
    return {
        "torch": lambda: torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True),
        "ours": lambda: dist_clip.clip_grad_norm_(params, max_norm),
    }


def _check(row: str, grads: list[torch.Tensor], clip: Callable[[], object], max_norm: float) -> list[str]:
    """Untimed: one ``clip()`` of ``grads`` (p=2), its norm and gradients against the float64 reference over
    every rank's ``grads`` (this process's alone without a process group)."""
    saved = [g.clone() for g in grads]
    want = sharded_reference_norm(saved, 2.0)
    return check_norm(row, clip(), want, 2.0, torch.float32) + check_clipped(row, grads, saved, want, max_norm)


def sweep_size(
    sizes: list[int], repeats: int, problems: list[str] | None = None
) -> list[tuple[int, float, float, float]]:
    rows = []
    for n in sizes:
        grads = _grads(n)
        params = _params(grads)  # torch's clip reads .grad of parameters
        max_norm, setup = _clip_cycle(grads)
        t = interleaved(_clip_pair(params, max_norm), repeats, setup=setup)
        if problems is not None:
            setup()
            problems += _check(f"one process, {n / 2**20:g} Mi", grads, _clip_pair(params, max_norm)["ours"], max_norm)
        t_norm = interleaved({"norm": partial(dist_clip.get_total_norm, grads)}, repeats)["norm"]
        rows.append((n, t["torch"], t["ours"], t_norm))
    return rows


def _world_body(sizes: list[int], repeats: int) -> dict[str, list]:
    """On every rank: the median time of one clip per size; rank 0 returns the slowest rank's medians and the
    checks' problems of every rank."""
    import torch.distributed as dist

    world = dist.get_world_size()
    torch.set_num_threads(max(1, 2 // world))  # the 2-core machine's cores, shared between the ranks
    out = []
    problems: list[str] = []
    for n in sizes:
        grads = _grads(n, seed=dist.get_rank())
        # Every rank must clip by the same coefficient: max_norm from the global norm halves the gradients.
        max_norm = float(dist_clip.get_total_norm(grads, group=dist.group.WORLD)) * 0.5
        t = interleaved(
            {"ours": partial(dist_clip.clip_grad_norm_, grads, max_norm, group=dist.group.WORLD)},
            repeats,
            setup=partial(_double_then_barrier, grads),
        )
        out.append(t["ours"])
        _double_then_barrier(grads)
        problems += _check(f"{world} ranks, {n / 2**20:g} Mi per rank", grads, partial(
            dist_clip.clip_grad_norm_, grads, max_norm, group=dist.group.WORLD), max_norm)
    slowest = torch.tensor(out, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return {"ms": slowest.tolist(), "problems": gather_problems(problems)}


def _double_then_barrier(grads: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    torch._foreach_mul_(grads, 2.0)  # undo the last clip's halving (exact in binary)
    dist.barrier()  # start each timed call together, as a training step would


def sweep_world(world: int, sizes: list[int], repeats: int, problems: list[str] | None = None) -> list[float]:
    result = on_ranks(world, _world_body, sizes, repeats)
    if problems is not None:
        problems += result["problems"]
    return list(result["ms"])


def _plot(path: Path, size_rows, world_rows: dict[int, list[float]], world_sizes: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    mi = [n / 2**20 for n, *_ in size_rows]
    a.plot(mi, [r[1] for r in size_rows], "o-", label="torch clip_grad_norm_ (foreach)")
    a.plot(mi, [r[2] for r in size_rows], "s-", label="dist_clip clip_grad_norm_")
    a.plot(mi, [r[3] for r in size_rows], "^--", label="dist_clip norm only")
    a.set(xscale="log", yscale="log", xlabel="fp32 elements (Mi)", ylabel="ms per call (median)",
          title="one process, p=2, clipping")
    a.grid(True, which="both", alpha=0.3)
    a.legend()
    wmi = [n / 2**20 for n in world_sizes]
    for world, times in world_rows.items():
        b.plot(wmi, times, "o-", label=f"{world} rank{'s' if world > 1 else ''}")
    b.set(xscale="log", yscale="log", xlabel="fp32 elements per rank (Mi)", ylabel="ms per call (slowest rank)",
          title="gloo ranks on one machine, group=WORLD")
    b.grid(True, which="both", alpha=0.3)
    b.legend()
    fig.suptitle(f"dist_clip scaling, torch {torch.__version__}, {os.cpu_count()} cores")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(quick: bool = False) -> str:
    if quick:
        sizes = [1 << 16, 1 << 18]
        world_sizes_el = [1 << 16, 1 << 18]
        worlds = [1, 2]
        repeats = 3
        out_dir = Path(tempfile.mkdtemp(prefix="dist_clip_bench_"))
    else:
        sizes = [1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]
        world_sizes_el = [1 << 20, 4 << 20, 16 << 20, 64 << 20]
        worlds = [1, 2, 4]
        repeats = 9
        out_dir = Path(os.environ.get("DIST_CLIP_BENCH_DIR", Path(__file__).resolve().parent.parent / "docs" / "notes"))
    problems: list[str] = []
    size_rows = sweep_size(sizes, repeats, problems)
    world_rows = {w: sweep_world(w, world_sizes_el, repeats, problems) for w in worlds}
    png = out_dir / "scaling.png"
    _plot(png, size_rows, world_rows, world_sizes_el)
    t1 = table(
        ["elements", "torch clip ms", "ours clip ms", "ratio", "ours norm ms", "norm GB/s"],
        [[f"{n / 2**20:g} Mi", f"{tt:.2f}", f"{to:.2f}", f"{to / tt:.2f}", f"{tn:.2f}", f"{n * 4 / tn / 1e6:.1f}"]
         for n, tt, to, tn in size_rows],
    )
    t2 = table(
        ["elements per rank", *[f"{w} rank{'s' if w > 1 else ''} ms" for w in worlds]],
        [[f"{n / 2**20:g} Mi", *[f"{world_rows[w][i]:.2f}" for w in worlds]] for i, n in enumerate(world_sizes_el)],
    )
    return fail_on("scaling", problems, f"{t1}\n\n{t2}\n\nPNG: {png}")


if __name__ == "__main__":
    import sys

    print(main(quick="--quick" in sys.argv))
