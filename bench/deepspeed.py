"""DeepSpeed's own clipping vs dist_clip: time from ``engine.backward()`` to the end of ``engine.step()``.

Two gloo ranks on the CPU, ZeRO 1/2/3, fp32, SGD. Three loops per stage:

* ``deepspeed``: ``gradient_clipping`` set, DeepSpeed measures and clips inside ``step()``;
* ``dist_clip``: ``gradient_clipping`` 0, ``dist_clip.clip_grad_norm_(engine, ...)`` between backward and step
  (DeepSpeed still computes its own, unused, norm inside ``step()``);
* ``dist_clip, no DS norm``: the same with ``zero_optimization.compute_grad_norm: false`` (ZeRO 1/2 only), so
  the norm is computed once.

Also the collectives of DeepSpeed's ``step()`` and of the dist_clip call. ``python -m bench deepspeed``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import statistics
import time
import warnings
from typing import Any

from .common import on_ranks, table

WORLD = 2


def _engine(stage: int, clip: float, ds_norm: bool, width: int, depth: int) -> Any:
    import deepspeed
    import torch

    deepspeed.utils.logger.setLevel(logging.ERROR)
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers)
    zero: dict[str, Any] = {"stage": stage}
    if not ds_norm:
        zero["compute_grad_norm"] = False
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": clip, "zero_optimization": zero,
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def _measure(stage: int, mode: str, quick: bool) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    import dist_clip
    from dist_clip.testing import count_collectives

    width, depth, iters = (64, 2, 3) if quick else (512, 4, 11)
    max_norm = 1e-3  # below the norm: every step clips
    engine = _engine(stage, max_norm if mode == "deepspeed" else 0.0, mode != "dist_clip, no DS norm", width, depth)
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(dist.get_rank()))
    total, clip_only, colls = [], [], {}
    for i in range(iters + 3):
        counting = i == iters + 2  # the last, untimed iteration counts collectives (the profiler costs time)
        loss = engine(x).pow(2).mean()
        dist.barrier()
        t0 = time.perf_counter()
        engine.backward(loss)
        t1 = time.perf_counter()
        if mode != "deepspeed":
            with count_collectives() if counting else contextlib.nullcontext() as c:
                dist_clip.clip_grad_norm_(engine, max_norm)
            if counting:
                colls["clip"] = c.total
        t2 = time.perf_counter()
        with count_collectives() if counting else contextlib.nullcontext() as s:
            engine.step()
        t3 = time.perf_counter()
        if counting:
            colls["step"] = s.total
        elif i >= 2:  # warm-up
            total.append(t3 - t0)
            clip_only.append(t2 - t1)
    return {"total_ms": 1e3 * statistics.median(total), "clip_ms": 1e3 * statistics.median(clip_only),
            "step_collectives": colls["step"], "clip_collectives": colls.get("clip", 0),
            "params": (width * width + width) * depth}


def _rank(quick: bool) -> list[dict[str, Any]]:
    warnings.filterwarnings("ignore")
    results = []
    for stage in (1, 2, 3):
        modes = ["deepspeed", "dist_clip"] + (["dist_clip, no DS norm"] if stage < 3 else [])
        for mode in modes:
            results.append({"stage": stage, "mode": mode, **_measure(stage, mode, quick)})
    return results


def main(quick: bool = False) -> str:
    results = on_ranks(WORLD, _rank, quick)
    rows = []
    base = {r["stage"]: r["total_ms"] for r in results if r["mode"] == "deepspeed"}
    for r in results:
        rows.append([f"ZeRO-{r['stage']}", r["mode"], r["total_ms"], f"{r['total_ms'] / base[r['stage']]:.2f}x",
                     r["clip_ms"] if r["mode"] != "deepspeed" else "in step", r["step_collectives"],
                     r["clip_collectives"] if r["mode"] != "deepspeed" else "-"])
    n = results[0]["params"]
    head = (f"{WORLD} gloo ranks, 1 thread each, fp32, SGD, {n / 1e6:.2f} M parameters, every step clips; medians "
            f"{'(quick: tiny model)' if quick else ''}\n\n")
    return head + table(
        ["stage", "clipping", "backward..step (ms)", "vs DeepSpeed", "clip call (ms)", "collectives in step()",
         "collectives in clip"], rows)


if __name__ == "__main__":
    print(main(quick=bool(os.environ.get("QUICK"))))
