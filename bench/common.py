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
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _rank_entry(
    rank: int, world: int, store_path: str, out_path: str, body: Callable[..., object], args: tuple
) -> None:
    import json
    import os
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
