"""fairscale's ``OSS.clip_grad_norm`` vs ``dist_clip.clip_grad_norm_(oss, ...)``: the clipping call alone.

Two gloo ranks on the CPU, OSS + torch DDP, fp32 (and bf16 for the accuracy column): after one backward the
same gradients are clipped by each in turn (restored in between), p = 2 and inf. ``python -m bench fairscale``.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import warnings
from typing import Any

from .common import on_ranks, table

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
            row: dict = {"dtype": str(dtype).replace("torch.", ""), "p": p, "exact": reference_norm(exact_grads, p)}
            calls = {"fairscale": lambda opt=opt, p=p: opt.clip_grad_norm(1e-3, p),
                     "dist_clip": lambda opt=opt, p=p: dist_clip.clip_grad_norm_(opt, 1e-3, p)}
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
            results.append(row)
        n = sum(p.numel() for p in params)
    return {"rows": results, "params": n}


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
            f"clipping call alone, medians{' (quick: tiny model)' if quick else ''}\n\n")
    return head + table(["grads", "p", "fairscale OSS.clip_grad_norm (ms)", "dist_clip (ms)",
                         "collectives fairscale / dist_clip", "fairscale norm: dtype, rel. error",
                         "dist_clip norm: dtype, rel. error"], rows)


if __name__ == "__main__":
    print(main(quick=bool(os.environ.get("QUICK"))))
