"""fairscale's ``OSS.clip_grad_norm`` vs ``dist_clip.clip_grad_norm_(oss, ...)``: the clipping call alone.

Two gloo ranks on the CPU, OSS + torch DDP, fp32 (and bf16 for the accuracy column): after one backward the
same gradients are clipped by each in turn (restored in between; each scales the gradients of the parameters
its rank's OSS partition owns), p = 2 and inf, ``max_norm`` half the float64
norm of the row's gradients so that both really multiply (a fixed 1e-3 sat above the full model's inf norm,
1.9e-4: those rows timed the norm alone). Untimed, dist_clip's norm is checked against the float64 norm (1e-6
relative for fp32, 1e-5 for bf16) and its clipped gradients against the float64 gradients times
``min(1, max_norm / (norm + 1e-6))``; a miss raises ``bench.common.CheckFailed``. ``python -m bench fairscale``.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import warnings
from typing import Any

from .common import check_clipped, check_norm, fail_on, gather_problems, on_ranks, table

WORLD = 2


def _rank(quick: bool) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    from fairscale.optim import OSS
    from torch.nn.parallel import DistributedDataParallel

    import dist_clip
    from dist_clip.testing import count_collectives, reference_norm

    width, depth, iters = (64, 2, 5) if quick else (1024, 4, 41)
    results = []
    problems: list[str] = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = []
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
        model = torch.nn.Sequential(*layers).to(dtype)
        opt = OSS(model.parameters(), optim=torch.optim.SGD, lr=1e-3)
        ddp = DistributedDataParallel(model)
        x = torch.randn(8, width, generator=torch.Generator().manual_seed(dist.get_rank())).to(dtype)
        ddp(x).float().pow(2).mean().backward()
        params = list(model.parameters())
        saved = [p.grad.clone() for p in params]
        exact_grads = [g.double() for g in saved]  # DDP: whole and identical on every rank

        def restore(params: list = params, saved: list = saved) -> None:
            for p, g in zip(params, saved):
                p.grad.copy_(g)

        for p in (2.0, math.inf):
            exact = reference_norm(exact_grads, p)
            max_norm = 0.5 * exact  # both clips multiply: a fixed limit may sit above a small (inf) norm
            row: dict = {"dtype": str(dtype).replace("torch.", ""), "p": p, "exact": exact}
            calls = {"fairscale": lambda opt=opt, p=p, m=max_norm: opt.clip_grad_norm(m, p),
                     "dist_clip": lambda opt=opt, p=p, m=max_norm: dist_clip.clip_grad_norm_(opt, m, p)}
            times: dict[str, list[float]] = {name: [] for name in calls}
            values = {}
            for i in range(iters):  # the two take turns, so that load from outside hits them alike
                for name, fn in calls.items():
                    restore()
                    dist.barrier()
                    t0 = time.perf_counter()
                    values[name] = fn()
                    if i:  # the first round warms up
                        times[name].append(time.perf_counter() - t0)
            for name, fn in calls.items():
                restore()
                with count_collectives() as c:  # untimed: the profiler costs time
                    fn()
                value = values[name]
                row[name] = {"ms": 1e3 * statistics.median(times[name]), "collectives": c.total, "norm": float(value),
                             "norm_dtype": str(value.dtype).replace("torch.", "")}
            restore()  # untimed: dist_clip's norm and gradients against the float64 reference
            name = f"{row['dtype']} p={'inf' if math.isinf(p) else int(p)}"
            problems += check_norm(name, calls["dist_clip"](), exact, p, dtype)
            # OSS (fairscale's clip and dist_clip alike) scales the gradients of the parameters this rank steps
            owned = {id(q) for g in opt.partition_parameters()[opt.rank] for q in g["params"]}
            for mine, m in ((True, max_norm), (False, math.inf)):  # the others untouched: coefficient 1
                pick = [i for i, q in enumerate(params) if (id(q) in owned) == mine]
                problems += check_clipped(f"{name} ({'owned' if mine else 'not owned'})",
                                          [params[i].grad for i in pick], [saved[i] for i in pick], exact, m)
            results.append(row)
        n = sum(p.numel() for p in params)
    return {"rows": results, "params": n, "problems": gather_problems(problems)}


def main(quick: bool = False) -> str:
    data = on_ranks(WORLD, _rank, quick)
    rows = []
    for r in data["rows"]:
        fs, dc = r["fairscale"], r["dist_clip"]
        exact = r["exact"]
        rel = lambda v, exact=exact: abs(v - exact) / exact  # noqa: E731
        rows.append([r["dtype"], "inf" if math.isinf(r["p"]) else int(r["p"]), fs["ms"], dc["ms"],
                     f"{fs['collectives']} / {dc['collectives']}", f"{fs['norm_dtype']}, {rel(fs['norm']):.1e}",
                     f"{dc['norm_dtype']}, {rel(dc['norm']):.1e}"])
    head = (f"{WORLD} gloo ranks, 1 thread each, OSS + torch DDP, {data['params'] / 1e6:.2f} M parameters, "
            f"clipping call alone, max_norm = half the norm (both multiply), medians"
            f"{' (quick: tiny model)' if quick else ''}\n\n")
    out = head + table(["grads", "p", "fairscale OSS.clip_grad_norm (ms)", "dist_clip (ms)",
                        "collectives fairscale / dist_clip", "fairscale norm: dtype, rel. error",
                        "dist_clip norm: dtype, rel. error"], rows)
    return fail_on("fairscale", data["problems"], out)


if __name__ == "__main__":
    import sys

    print(main(quick="--quick" in sys.argv or bool(os.environ.get("QUICK"))))
