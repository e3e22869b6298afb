"""DeepSpeed's own clipping vs dist_clip, isolated: what clipping adds to ``engine.backward()`` .. ``step()``.

Two gloo ranks on the CPU (one thread each), ZeRO 1/2/3, fp32, SGD, the issue's model: 8 x Linear(2500, 2500)
(50 M parameters, 25 M per rank's partition). Loops per stage, every one on the same model and batches:

* ``no clipping``: ``gradient_clipping`` 0 and, for ZeRO 1/2, ``zero_optimization.compute_grad_norm: false``
  (DeepSpeed computes no norm at all): the baseline;
* ``deepspeed``: ``gradient_clipping`` set, DeepSpeed measures (casting every gradient to float64) and clips
  inside ``step()``;
* ``dist_clip``: the baseline's config plus ``dist_clip.clip_grad_norm_(engine, ...)`` between backward and
  step;
* ``dist_clip, optimizer=``: the same call with ``optimizer=engine.optimizer``: the coefficient rides in
  ``step()``, multiplied into the gradients while ZeRO copies them into its flat partition buffer, so the
  call is the norm's read pass only.

The engines of one stage take turns step by step; the cost of clipping is the median over rounds of the time
from the end of ``backward()`` to the end of ``step()`` (the dist_clip call included) minus the baseline
engine's in the same round. ``step()`` itself swings by tens of ms (its all-gather, page faults), so the
isolated table below, which times exactly the added work on the same gradients, is the steadier figure. The
issue's target for ZeRO 1/2 is dist_clip's cost <= 0.1x DeepSpeed's. ZeRO-3 has no ``compute_grad_norm`` switch: its
baseline still pays DeepSpeed's norm, so only the dist_clip call itself is reported there. Also the collectives
of ``step()`` and of the dist_clip call. ``max_norm`` is half the norm of the first step's gradients (computed
once, untimed, on a plain copy of the model), so every step clips (a fixed 1e-3 gave a coefficient of ~0.9).
Untimed checks: the first round's dist_clip norms against that float64 norm; in the isolated table, dist_clip's
norm and its clipped partition against the float64 partition times ``min(1, max_norm / (norm + 1e-6))``; a
miss raises ``bench.common.CheckFailed``. ``python -m bench deepspeed``.
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

from .common import check_clipped, check_norm, fail_on, gather_problems, on_ranks, sharded_reference_norm, table

WORLD = 2
TARGET_VS_DEEPSPEED = 0.1  # the issue's: dist_clip's clipping cost / DeepSpeed's internal norm+clip (ZeRO 1/2)


def _first_norm(width: int, depth: int, x: Any) -> float:  # noqa: ANN401
    """The float64 norm of the first step's data-parallel gradient (the ranks' mean), on a plain copy of the
    model ``_engine`` builds: every engine starts from it."""
    import torch
    import torch.distributed as dist

    from dist_clip.testing import reference_norm

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers)
    model(x).pow(2).mean().backward()
    grads = [q.grad.double() for q in model.parameters()]
    for g in grads:
        dist.all_reduce(g)
        g /= dist.get_world_size()
    return reference_norm(grads)


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
    "dist_clip, optimizer=": (False, False, True),
}


def _measure(stage: int, quick: bool, problems: list[str]) -> dict[str, dict[str, float]]:
    """Every loop of ``MODES`` on its own engine, the engines taking turns step by step (so that drift in the
    machine's load hits them alike); what clipping adds is the median over steps of the paired difference
    with the baseline's step of the same round."""
    import gc

    import torch
    import torch.distributed as dist

    import dist_clip
    from dist_clip.testing import count_collectives

    width, depth, iters = (64, 2, 3) if quick else (2500, 8, 21)
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(dist.get_rank()))
    first = _first_norm(width, depth, x)
    max_norm = 0.5 * first  # every step clips (SGD at lr 1e-3 barely moves the norm over the rounds)
    engines = {}
    for mode, (ds_clips, ds_norm, _) in MODES.items():
        engines[mode] = _engine(stage, max_norm if ds_clips else 0.0, ds_norm or stage == 3, width, depth)
    rec: dict[str, dict[str, list[float]]] = {m: {"total": [], "after": [], "clip": []} for m in MODES}
    colls: dict[str, dict[str, int]] = {m: {} for m in MODES}
    for i in range(iters + 3):
        counting = i == iters + 2  # the last, untimed round counts collectives (the profiler costs time)
        for mode, engine in engines.items():
            ours = MODES[mode][2]
            loss = engine(x).pow(2).mean()
            dist.barrier()
            t0 = time.perf_counter()
            engine.backward(loss)
            t1 = time.perf_counter()
            if ours:
                handed = engine.optimizer if "optimizer=" in mode else None
                with count_collectives() if counting else contextlib.nullcontext() as c:
                    total = dist_clip.clip_grad_norm_(engine, max_norm, optimizer=handed)
                if counting:
                    colls[mode]["clip"] = c.total
                if i == 0:  # the first step's gradients: those of the plain copy
                    problems += check_norm(f"ZeRO-{stage} {mode}, first step", total, first, 2.0, torch.float32)
            t2 = time.perf_counter()
            with count_collectives() if counting else contextlib.nullcontext() as s:
                engine.step()
            t3 = time.perf_counter()
            if counting:
                colls[mode]["step"] = s.total
            elif i >= 2:  # warm-up
                rec[mode]["total"].append(t3 - t0)
                rec[mode]["after"].append(t3 - t1)  # clip call (if any) + step(), without backward's noise
                rec[mode]["clip"].append(t2 - t1)
    params = sum(p.numel() for p in engines["no clipping"].module.parameters())
    engines.clear()
    gc.collect()
    base = rec["no clipping"]["after"]
    out = {}
    for mode, r in rec.items():
        out[mode] = {"total_ms": 1e3 * statistics.median(r["total"]), "clip_ms": 1e3 * statistics.median(r["clip"]),
                     "after_ms": 1e3 * statistics.median(r["after"]),
                     "added_ms": 1e3 * statistics.median(a - b for a, b in zip(r["after"], base)),
                     "step_collectives": colls[mode]["step"], "clip_collectives": colls[mode].get("clip", 0),
                     "params": params}
    return out


def _isolated(stage: int, quick: bool, problems: list[str]) -> dict[str, float]:
    """ZeRO-1/2 at a boundary, on the same reduced gradients: DeepSpeed's own norm + clip, called as ``step()``
    calls them (``scaled_global_norm`` with its all-reduce, then ``unscale_and_clip_grads`` on the flat fp32
    partition ``step()`` builds), against one ``dist_clip.clip_grad_norm_(engine)``; the two take turns, the
    gradients are restored (untimed) before every call."""
    import torch
    import torch.distributed as dist

    import dist_clip

    width, depth, repeats = (64, 2, 3) if quick else (2500, 8, 15)
    engine = _engine(stage, 1.0, True, width, depth)
    opt = engine.optimizer
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(dist.get_rank()))
    engine.backward(engine(x).pow(2).mean())
    pieces = [t for i in sorted(opt.averaged_gradients) for t in opt.averaged_gradients[i]]
    saved = [t.clone() for t in pieces]
    want = sharded_reference_norm(saved, 2.0)  # each rank's partition: float64 over the ranks
    max_norm = opt.clip_grad = 0.5 * want  # both clip
    flats = [torch.empty(int(size)) for size in opt.partition_size]

    def theirs() -> None:
        norm = opt.scaled_global_norm()
        opt.unscale_and_clip_grads(flats, norm)

    def ours() -> None:
        dist_clip.clip_grad_norm_(engine, max_norm)

    def our_norm() -> None:
        dist_clip.get_total_norm(engine)

    from torch._utils import _flatten_dense_tensors

    from dist_clip.adapters.deepspeed import _scaled_flatten

    coef = torch.tensor(0.5)

    def flatten() -> None:  # what step() does anyway
        for src in opt.averaged_gradients.values():
            _flatten_dense_tensors(src)

    def scaled_flatten() -> None:  # what it does with optimizer=: the coefficient multiplied in while copying
        for src in opt.averaged_gradients.values():
            _scaled_flatten(src, coef)

    times: dict[str, list[float]] = {"deepspeed": [], "dist_clip": [], "dist_clip norm": [], "flatten": [],
                                     "scaled flatten": []}
    for r in range(repeats + 1):
        for name, fn in (("deepspeed", theirs), ("dist_clip", ours), ("dist_clip norm", our_norm),
                         ("flatten", flatten), ("scaled flatten", scaled_flatten)):
            torch._foreach_copy_(pieces, saved)
            for f, src in zip(flats, opt.averaged_gradients.values()):  # what step() flattens, untimed
                torch.cat([t.reshape(-1) for t in src], out=f[: sum(t.numel() for t in src)])
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    torch._foreach_copy_(pieces, saved)  # untimed: dist_clip's norm and clipped partition against float64
    problems += check_norm(f"ZeRO-{stage} isolated", dist_clip.clip_grad_norm_(engine, max_norm), want, 2.0,
                           torch.float32)
    problems += check_clipped(f"ZeRO-{stage} isolated", pieces, saved, want, max_norm)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}  # the engine goes with this frame


def _rank(quick: bool) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    loops = []
    problems: list[str] = []
    for stage in (1, 2, 3):
        for mode, r in _measure(stage, quick, problems).items():
            loops.append({"stage": stage, "mode": mode, **r})
    isolated = [{"stage": stage, **_isolated(stage, quick, problems)} for stage in (1, 2)]
    return {"loops": loops, "isolated": isolated, "problems": gather_problems(problems)}


def main(quick: bool = False) -> str:
    out = on_ranks(WORLD, _rank, quick)
    results = out["loops"]
    rows = []
    theirs = {r["stage"]: r["added_ms"] for r in results if r["mode"] == "deepspeed"}
    for r in results:
        stage, mode = r["stage"], r["mode"]
        added = "-" if mode == "no clipping" else f"{r['added_ms']:.1f}"
        vs = (f"{r['added_ms'] / theirs[stage]:.2f}x" if mode.startswith("dist_clip") and stage != 3
              and theirs[stage] > 0 else "-")
        ours = mode.startswith("dist_clip")
        rows.append([f"ZeRO-{stage}", mode, r["total_ms"], r["after_ms"], added, vs,
                     r["clip_ms"] if ours else "-", r["step_collectives"], r["clip_collectives"] if ours else "-"])
    def verdict(ratio: float) -> str:
        return f"<= {TARGET_VS_DEEPSPEED:g}: " + ("met" if ratio <= TARGET_VS_DEEPSPEED else "MISSED")

    iso = []
    for r in out["isolated"]:
        ratio = r["dist_clip"] / r["deepspeed"]
        # The scaled copy is often faster than DeepSpeed's own flatten (torch.cat, single-threaded): not counted
        # as a gain, the cost of clipping is then the norm's read alone.
        folded = r["dist_clip norm"] + max(0.0, r["scaled flatten"] - r["flatten"])
        iso.append([f"ZeRO-{r['stage']}", r["deepspeed"], r["dist_clip"], f"{ratio:.2f}x", verdict(ratio),
                    r["dist_clip norm"], f"{r['scaled flatten'] - r['flatten']:+.2f}", folded,
                    f"{folded / r['deepspeed']:.2f}x", verdict(folded / r["deepspeed"])])
    n = results[0]["params"]
    size = f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"  # (the quick model's 8,320 printed as "0.0 M")
    head = (f"{WORLD} gloo ranks, 1 thread each, fp32, SGD, {size} parameters, every step clips "
            f"(max_norm: half the first step's norm); medians "
            f"{'(quick: tiny model)' if quick else ''}\n\n")
    loops = table(
        ["stage", "clipping", "backward..step (ms)", "clip call + step() (ms)", "added by clipping (ms)",
         "added / DeepSpeed's added",
         "dist_clip call (ms)", "collectives in step()", "collectives in clip"], rows)
    isolated = table(["stage", "DeepSpeed norm + clip (ms)", "dist_clip call (ms)", "ours / DeepSpeed's", "target",
                      "optimizer=: the call (norm alone, ms)", "step()'s copy, scaled - plain (ms)",
                      "optimizer=: total (ms, a faster copy not counted)", "ours / DeepSpeed's", "target"], iso)
    return fail_on("deepspeed", out["problems"], head + loops + "\n\nThe same gradients, the two clippings taking "
                   "turns (DeepSpeed's called as step() calls them):\n\n" + isolated)


if __name__ == "__main__":
    import sys

    print(main(quick="--quick" in sys.argv or bool(os.environ.get("QUICK"))))
