"""DeepSpeed's own clipping vs dist_clip, isolated: what clipping adds to ``engine.backward()`` .. ``step()``.

Two gloo ranks on the CPU (one thread each), ZeRO 1/2/3, fp32, SGD, the issue's model: 8 x Linear(2500, 2500)
(50 M parameters, 25 M per rank's partition). Loops per stage, every one on the same model and batches:

* ``no clipping``: ``gradient_clipping`` 0 and, for ZeRO 1/2, ``zero_optimization.compute_grad_norm: false``
  (DeepSpeed computes no norm at all): the baseline;
* ``deepspeed``: ``gradient_clipping`` set, DeepSpeed measures (casting every gradient to float64) and clips
  inside ``step()``;
* ``dist_clip``: the baseline's config plus ``dist_clip.clip_grad_norm_(engine, ...)`` between backward and
  step.

The cost of clipping is each loop's median time from the end of ``backward()`` to the end of ``step()`` (the
dist_clip call included) minus the baseline's: the whole step swings by tens of ms with backward. The issue's
target for ZeRO 1/2 is dist_clip's cost <= 0.1x DeepSpeed's. ZeRO-3 has no ``compute_grad_norm`` switch: its
baseline still pays DeepSpeed's norm, so only the dist_clip call itself is reported there. Also the collectives
of ``step()`` and of the dist_clip call. ``python -m bench deepspeed``.
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
TARGET_VS_DEEPSPEED = 0.1  # the issue's: dist_clip's clipping cost / DeepSpeed's internal norm+clip (ZeRO 1/2)


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


#: loop name -> (DeepSpeed clips, DeepSpeed computes its norm, dist_clip clips)
MODES = {
    "no clipping": (False, False, False),
    "deepspeed": (True, True, False),
    "dist_clip": (False, False, True),
}


def _measure(stage: int, mode: str, quick: bool) -> dict[str, float]:
    import gc

    import torch
    import torch.distributed as dist

    import dist_clip
    from dist_clip.testing import count_collectives

    width, depth, iters = (64, 2, 3) if quick else (2500, 8, 15)
    max_norm = 1e-3  # below the norm: every step clips
    ds_clips, ds_norm, ours = MODES[mode]
    engine = _engine(stage, max_norm if ds_clips else 0.0, ds_norm or stage == 3, width, depth)
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(dist.get_rank()))
    total, after, clip_only, colls = [], [], [], {}
    for i in range(iters + 3):
        counting = i == iters + 2  # the last, untimed iteration counts collectives (the profiler costs time)
        loss = engine(x).pow(2).mean()
        dist.barrier()
        t0 = time.perf_counter()
        engine.backward(loss)
        t1 = time.perf_counter()
        if ours:
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
            after.append(t3 - t1)  # clip call (if any) + step(): where clipping costs, without backward's noise
            clip_only.append(t2 - t1)
    params = sum(p.numel() for p in engine.module.parameters())
    del engine
    gc.collect()
    return {"total_ms": 1e3 * statistics.median(total), "clip_ms": 1e3 * statistics.median(clip_only),
            "after_ms": 1e3 * statistics.median(after),
            "step_collectives": colls["step"], "clip_collectives": colls.get("clip", 0), "params": params}


def _isolated(stage: int, quick: bool) -> dict[str, float]:
    """ZeRO-1/2 at a boundary, on the same reduced gradients: DeepSpeed's own norm + clip, called as ``step()``
    calls them (``scaled_global_norm`` with its all-reduce, then ``unscale_and_clip_grads`` on the flat fp32
    partition ``step()`` builds), against one ``dist_clip.clip_grad_norm_(engine)``; the two take turns, the
    gradients are restored (untimed) before every call."""
    import torch
    import torch.distributed as dist

    import dist_clip

    width, depth, repeats = (64, 2, 3) if quick else (2500, 8, 15)
    max_norm = 1e-3
    engine = _engine(stage, max_norm, True, width, depth)
    opt = engine.optimizer
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(dist.get_rank()))
    engine.backward(engine(x).pow(2).mean())
    pieces = [t for i in sorted(opt.averaged_gradients) for t in opt.averaged_gradients[i]]
    saved = [t.clone() for t in pieces]
    flats = [torch.empty(int(size)) for size in opt.partition_size]

    def theirs() -> None:
        norm = opt.scaled_global_norm()
        opt.unscale_and_clip_grads(flats, norm)

    def ours() -> None:
        dist_clip.clip_grad_norm_(engine, max_norm)

    def our_norm() -> None:
        dist_clip.get_total_norm(engine)

    times: dict[str, list[float]] = {"deepspeed": [], "dist_clip": [], "dist_clip norm": []}
    for r in range(repeats + 1):
        for name, fn in (("deepspeed", theirs), ("dist_clip", ours), ("dist_clip norm", our_norm)):
            torch._foreach_copy_(pieces, saved)
            for f, src in zip(flats, opt.averaged_gradients.values()):  # what step() flattens, untimed
                torch.cat([t.reshape(-1) for t in src], out=f[: sum(t.numel() for t in src)])
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}  # the engine goes with this frame


def _rank(quick: bool) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    loops = []
    for stage in (1, 2, 3):
        for mode in MODES:
            loops.append({"stage": stage, "mode": mode, **_measure(stage, mode, quick)})
    isolated = [{"stage": stage, **_isolated(stage, quick)} for stage in (1, 2)]
    return {"loops": loops, "isolated": isolated}


def main(quick: bool = False) -> str:
    out = on_ranks(WORLD, _rank, quick)
    results = out["loops"]
    rows = []
    base = {r["stage"]: r["after_ms"] for r in results if r["mode"] == "no clipping"}
    for r in results:
        stage, mode = r["stage"], r["mode"]
        added = "-" if mode == "no clipping" else f"{r['after_ms'] - base[stage]:.1f}"
        rows.append([f"ZeRO-{stage}", mode, r["total_ms"], r["after_ms"], added,
                     r["clip_ms"] if mode == "dist_clip" else "-", r["step_collectives"],
                     r["clip_collectives"] if mode == "dist_clip" else "-"])
    iso = []
    for r in out["isolated"]:
        ratio = r["dist_clip"] / r["deepspeed"]
        iso.append([f"ZeRO-{r['stage']}", r["deepspeed"], r["dist_clip"], f"{ratio:.2f}x",
                    f"<= {TARGET_VS_DEEPSPEED:g}: " + ("met" if ratio <= TARGET_VS_DEEPSPEED else "MISSED"),
                    r["dist_clip norm"], f"{r['dist_clip norm'] / r['deepspeed']:.2f}x"])
    n = results[0]["params"]
    head = (f"{WORLD} gloo ranks, 1 thread each, fp32, SGD, {n / 1e6:.1f} M parameters, every step clips; medians "
            f"{'(quick: tiny model)' if quick else ''}\n\n")
    loops = table(
        ["stage", "clipping", "backward..step (ms)", "clip call + step() (ms)", "added by clipping (ms)",
         "dist_clip call (ms)", "collectives in step()", "collectives in clip"], rows)
    isolated = table(["stage", "DeepSpeed norm + clip (ms)", "dist_clip call (ms)", "ours / DeepSpeed's", "target",
                      "dist_clip norm alone (ms)", "norm alone / DeepSpeed's"], iso)
    return (head + loops + "\n\nThe same gradients, the two clippings taking turns (DeepSpeed's called as step() "
            "calls them):\n\n" + isolated)


if __name__ == "__main__":
    print(main(quick=bool(os.environ.get("QUICK"))))
