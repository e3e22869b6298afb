"""FSDP's own clipping vs dist_clip: median time per clip call and collectives per call.

About 50 M fp32 parameters (8 x ``Linear(2500, 2500)``) sharded over 2 and over 4 gloo ranks on the CPU, one
thread per rank. For p = 2 and inf, on the same gradients (restored, untimed, before every call so that every
call really scales):

* FSDP1 (``FullyShardedDataParallel``, FULL_SHARD): ``dist_clip.clip_grad_norm_(model)`` vs
  ``model.clip_grad_norm_``;
* FSDP2 (``fully_shard`` per layer and on the root): ``dist_clip.clip_grad_norm_(model)`` vs
  ``torch.nn.utils.clip_grad_norm_(model.parameters())`` on the DTensor gradients.

A third table times the same calls on many small gradients (96 blocks of 16 parameters each, every block an
FSDP unit: 1536 gradients, 0.31 M parameters), where host time, not memory traffic, is the cost.

Times are rank 0's medians of 21 calls, the two clips interleaved; every call ends in a collective, so the
ranks move in step. With 4 ranks on a
2-core machine the ranks share cores: compare rows of one world size, not across them. Untimed, every dist_clip
row is checked: its norm against the float64 norm of every rank's gradient shards (1e-6 relative), its
clipped shards against the float64 shards times ``min(1, max_norm / (norm + 1e-6))``; a miss raises
``bench.common.CheckFailed`` naming the row.
``python -m bench fsdp`` (``--quick``: a tiny model, 2 ranks, few repeats: seconds).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

from .common import (
    check_clipped,
    check_norm,
    diff_ratio,
    fail_on,
    gather_problems,
    on_ranks,
    sharded_reference_norm,
    table,
    verdict,
)

#: The issue's targets, dist_clip's time / the wrapper's own clip, by "p is inf".
TARGETS = {False: 0.8, True: 0.3}
#: Blocks of the many-small-gradients table, by ``quick``.
SMALL_BLOCKS = {True: 4, False: 96}


def _model(width: int, depth: int) -> Any:
    import torch

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers)


def _fsdp1(model: Any, unit: type, **kw: Any) -> Any:  # noqa: ANN401
    """FSDP1 FULL_SHARD on the CPU, an instance per ``unit`` module."""
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FullyShardedDataParallel(
        model, sharding_strategy=ShardingStrategy.FULL_SHARD, device_id=torch.device("cpu"),
        auto_wrap_policy=ModuleWrapPolicy({unit}), **kw,
    )


def _fsdp2(model: Any, unit: type) -> Any:  # noqa: ANN401
    """``fully_shard`` on every ``unit`` module and on the root, over one mesh of the world."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for module in model:
        if isinstance(module, unit):
            fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _ours_own(timed: dict[str, dict[str, float]]) -> tuple[dict[str, float], str, dict[str, float]]:
    """(dist_clip's timing, the wrapper clip's name, its timing) from one ``_time`` result."""
    ours = timed.pop("dist_clip")
    ((own_name, own),) = timed.items()
    return ours, own_name, own


def _blocks(count: int) -> Any:
    """``count`` transformer-shaped blocks of 16 small parameters (two LayerNorms, six Linears): many gradients."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            lin = torch.nn.Linear
            self.ln1, self.ln2 = torch.nn.LayerNorm(16), torch.nn.LayerNorm(16)
            self.q, self.k, self.v, self.o = lin(16, 16), lin(16, 16), lin(16, 16), lin(16, 16)
            self.up, self.down = lin(16, 64), lin(64, 16)

        def forward(self, x: Any) -> Any:  # noqa: ANN401
            h = self.ln1(x)
            x = x + self.o(self.q(h) + self.k(h) + self.v(h))
            return x + self.down(torch.relu(self.up(self.ln2(x))))

    torch.manual_seed(0)
    return torch.nn.Sequential(*[Block() for _ in range(count)])


def _many_small(count: int, repeats: int, warmup: int, problems: list[str]) -> list[dict[str, Any]]:
    """p=2 on ``_blocks(count)`` under FSDP1 (``use_orig_params=True``, a unit per block) and FSDP2."""
    import torch
    import torch.distributed as dist

    import dist_clip

    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(dist.get_rank()))
    rows = []
    model = _blocks(count)
    block_type = type(model[0])
    model = _fsdp1(model, block_type, use_orig_params=True)
    model(x).pow(2).mean().backward()
    m = _half_norm(model, 2.0)
    # Per-parameter clipping has no counterpart in the wrappers; a limit below every parameter's norm scales all.
    per_param = dist_clip.GradClipper(max_norm=1e-6, mode="per_param")
    rows.append({"wrapper": "FSDP1 use_orig_params", "grads": len(_local_grads(model)), "timed": _time(model, {
        "dist_clip": lambda: dist_clip.clip_grad_norm_(model, m),
        "FSDP1.clip_grad_norm_": lambda: model.clip_grad_norm_(m),
        "per_param": lambda: per_param(model),
    }, repeats, warmup)})
    problems += _check("small FSDP1 use_orig_params p=2", model, lambda: dist_clip.clip_grad_norm_(model, m), 2.0, m)
    model = _fsdp2(_blocks(count), block_type)
    model(x).pow(2).mean().backward()
    m2 = _half_norm(model, 2.0)
    rows.append({"wrapper": "FSDP2 fully_shard", "grads": len(_local_grads(model)), "timed": _time(model, {
        "dist_clip": lambda: dist_clip.clip_grad_norm_(model, m2),
        "torch clip on DTensors": lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), m2),
        "per_param": lambda: per_param(model),
    }, repeats, warmup)})
    problems += _check("small FSDP2 fully_shard p=2", model, lambda: dist_clip.clip_grad_norm_(model, m2), 2.0, m2)
    return rows


def _backward(model: Any, width: int) -> None:
    import torch
    import torch.distributed as dist

    x = torch.randn(4, width, generator=torch.Generator().manual_seed(dist.get_rank()))
    model(x).pow(2).mean().backward()


def _local_grads(model: Any) -> list[Any]:
    out = []
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad
            out.append(g._local_tensor if hasattr(g, "_local_tensor") else g)
    return out


def _time(model: Any, calls: dict[str, Any], repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median ms and collectives of each call, every call starting from the same gradients.

    The calls are interleaved (a, b, a, b, ...) so that load from outside hits them alike.
    """
    import statistics
    import time

    import torch.distributed as dist

    from dist_clip.testing import count_collectives

    grads = _local_grads(model)
    saved = [g.clone() for g in grads]

    def restore() -> None:
        for g, s in zip(grads, saved):
            g.copy_(s)
        dist.barrier()  # every rank starts the timed call together

    counts: dict[str, int] = {}
    for name, fn in calls.items():
        restore()
        with count_collectives() as c:
            fn()
        counts[name] = c.total
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + repeats):
        for name, fn in calls.items():
            restore()
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    restore()
    return {name: {"ms": statistics.median(times[name]), "collectives": counts[name]} for name in calls}


def _time_folded(model: Any, own_clip: Any, repeats: int, warmup: int) -> dict[str, dict[str, float]]:  # noqa: ANN401
    """p=2 with the step: a fused AdamW step alone, the wrapper's clip then the step, and dist_clip handing its
    coefficient to the step (``optimizer=``) instead of scaling: what clipping adds to the step either way."""
    import torch

    import dist_clip

    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    m = _half_norm(model, 2.0)
    opt.step()  # the optimizer state exists before timing
    return _time(model, {
        "step": opt.step,
        "own clip, step": lambda: (own_clip(m), opt.step()),
        "dist_clip(optimizer=), step": lambda: (dist_clip.clip_grad_norm_(model, m, optimizer=opt), opt.step()),
    }, repeats, warmup)


def _check(row: str, model: Any, call: Any, p: float, max_norm: float) -> list[str]:  # noqa: ANN401
    """Untimed, on every rank: one dist_clip ``call()`` on this rank's gradient shards, its norm against the
    float64 norm of every rank's shards, its clipped shards against theirs times the reference coefficient;
    the gradients are restored after. Problems, or an empty list."""
    grads = _local_grads(model)
    saved = [g.clone() for g in grads]
    want = sharded_reference_norm(saved, p)
    total = call()
    total = total[0] if isinstance(total, tuple) else total
    problems = check_norm(row, total, want, p, saved[0].dtype if saved else None)
    problems += check_clipped(row, grads, saved, want, max_norm)
    for g, s in zip(grads, saved):
        g.copy_(s)
    return problems


def _half_norm(model: Any, p: float) -> float:
    """Half the gradients' norm: every timed call scales (on the CPU dist_clip skips a coefficient of 1, the
    wrappers never do; with a fixed max_norm the inf norm of these gradients, ~3e-5, would not clip)."""
    import dist_clip

    return 0.5 * float(dist_clip.get_total_norm(model, p))


def _rank(quick: bool) -> dict[str, Any]:
    import torch

    import dist_clip

    warnings.filterwarnings("ignore")
    width, depth, repeats, warmup = (64, 2, 3, 1) if quick else (2500, 8, 21, 3)
    results: list[dict[str, Any]] = []
    problems: list[str] = []

    full = _model(width, depth)
    n_params = sum(p.numel() for p in full.parameters())
    model = _fsdp1(full, torch.nn.Linear)
    _backward(model, width)
    for p in (2.0, math.inf):
        max_norm = _half_norm(model, p)
        timed = _time(model, {
            "dist_clip": lambda p=p, m=max_norm: dist_clip.clip_grad_norm_(model, m, p),
            "FSDP1.clip_grad_norm_": lambda p=p, m=max_norm: model.clip_grad_norm_(m, p),
        }, repeats, warmup)
        results.append({"wrapper": "FSDP1 FULL_SHARD", "p": p, "timed": timed})
        problems += _check(f"FSDP1 FULL_SHARD p={p:g}", model, lambda p=p, m=max_norm: dist_clip.clip_grad_norm_(
            model, m, p), p, max_norm)
    folded = [{"wrapper": "FSDP1 FULL_SHARD", "timed": _time_folded(model, model.clip_grad_norm_, repeats, warmup)}]
    del model, full

    model = _fsdp2(_model(width, depth), torch.nn.Linear)
    _backward(model, width)
    for p in (2.0, math.inf):
        max_norm = _half_norm(model, p)
        timed = _time(model, {
            "dist_clip": lambda p=p, m=max_norm: dist_clip.clip_grad_norm_(model, m, p),
            "torch clip on DTensors": lambda p=p, m=max_norm: torch.nn.utils.clip_grad_norm_(model.parameters(), m, p),
        }, repeats, warmup)
        results.append({"wrapper": "FSDP2 fully_shard", "p": p, "timed": timed})
        problems += _check(f"FSDP2 fully_shard p={p:g}", model, lambda p=p, m=max_norm: dist_clip.clip_grad_norm_(
            model, m, p), p, max_norm)
    folded.append({"wrapper": "FSDP2 fully_shard", "timed": _time_folded(
        model, lambda m: torch.nn.utils.clip_grad_norm_(model.parameters(), m), repeats, warmup)})

    small = _many_small(SMALL_BLOCKS[quick], repeats, warmup, problems)
    return {"params": n_params, "rows": results, "folded": folded, "small": small,
            "problems": gather_problems(problems)}


def _size(params: int) -> str:
    return f"{params / 1e6:.2f} M" if params >= 1e5 else f"{params:,}"


def main(quick: bool = False) -> str:

    rows = []
    folded_by_world: list[tuple[int, list[dict[str, Any]]]] = []
    small_rows = []
    params = 0
    problems: list[str] = []
    for world in (2,) if quick else (2, 4):
        result = on_ranks(world, _rank, quick)
        params = result["params"]
        problems += [f"{world} ranks, {p}" for p in result["problems"]]
        folded_by_world.append((world, result["folded"]))
        for r in result["small"]:
            per_param = r["timed"].pop("per_param")
            ours, own_name, own = _ours_own(r["timed"])
            small_rows.append([world, r["wrapper"], r["grads"], ours["ms"], own_name, own["ms"],
                               f"{ours['ms'] / own['ms']:.2f}x", per_param["ms"], per_param["collectives"]])
        for r in result["rows"]:
            ours, own_name, own = _ours_own(r["timed"])
            ratio = ours["ms"] / own["ms"]
            target = TARGETS[math.isinf(r["p"])]
            rows.append([world, r["wrapper"], "inf" if math.isinf(r["p"]) else f"{r['p']:g}", ours["ms"], own_name,
                         own["ms"], f"{ratio:.2f}x", f"<= {target:g}: " + ("met" if ratio <= target else "MISSED"),
                         f"{ours['collectives']} / {own['collectives']}"])
    folded_rows = []
    for world, result in folded_by_world:
        for r in result:
            t = r["timed"]
            step = t["step"]["ms"]
            own = t["own clip, step"]["ms"] - step
            ours = t["dist_clip(optimizer=), step"]["ms"] - step
            ratio = diff_ratio(ours, own)  # differences of medians: NaN where noise made one negative
            folded_rows.append([world, r["wrapper"], step, own, ours, f"{ratio:.2f}x", verdict(ratio, TARGETS[False])])
    size = f"{params / 1e6:.1f} M" if params >= 1e5 else f"{params:,}"
    blocks = SMALL_BLOCKS[quick]
    small_params = sum(p.numel() for p in _blocks(blocks).parameters())
    head = (f"gloo ranks on the CPU, 1 thread each, fp32, {size} parameters"
            f"{' (quick: tiny model)' if quick else ''}, every call clips; median ms per call (rank 0)\n\n")
    return fail_on("fsdp", problems, head + table(
        ["ranks", "wrapping", "p", "dist_clip (ms)", "own clip", "own clip (ms)", "dist_clip / own", "target",
         "collectives dist_clip / own"], rows) + (
        "\n\np = 2 with a fused AdamW step: what clipping adds to `step()` when the wrapper's clip scales the "
        "gradients, and when dist_clip hands the coefficient to the step (`optimizer=opt`):\n\n") + table(
        ["ranks", "wrapping", "fused AdamW step (ms)", "own clip + step - step (ms)",
         "dist_clip(optimizer=) + step - step (ms)", "ours / own", "target"], folded_rows) + (
        f"\n\nMany small gradients ({blocks} blocks of 16 parameters, a unit per block, {_size(small_params)} "
        "parameters), p = 2: host time per call\n\n") + table(
        ["ranks", "wrapping", "gradients on rank 0", "dist_clip (ms)", "own clip", "own clip (ms)",
         "dist_clip / own", "GradClipper per_param (ms)", "its collectives"], small_rows))


if __name__ == "__main__":
    import sys

    print(main(quick="--quick" in sys.argv or bool(os.environ.get("QUICK"))))
