"""Spawned gloo ranks reused across tests, with timeouts that fail instead of hanging.

One :class:`RankPool` per world size lives for the whole pytest session: its processes rendezvous once through
a FileStore (no fixed ports), then run test bodies sent through per-rank queues. A body is a module-level
function called on every rank; its return values come back as a list indexed by rank. A test passes only if
every rank passes (the verdict is agreed in the parent). A rank that fails makes the pool wait a short grace
period for the others, so a peer stuck in a collective does not stall the suite; a test that runs past its
timeout gets the Python stacks of every rank dumped into its failure message, and the pool is rebuilt.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import queue
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp

GRACE_S = 10.0


class RankFailure(AssertionError):
    pass


def outcome(call: Callable[[], object], error: type[Exception], expected: Callable[[str], bool]) -> str | bool:
    """What a rank reports for a call that should be refused: "measured" when it returned, else whether it
    raised ``error`` with a message ``expected`` accepts (another exception propagates)."""
    try:
        call()
    except error as e:
        return expected(str(e))
    return "measured"


def settle_heap() -> None:
    """Collect a task's garbage, then move what survives (torch, DeepSpeed once imported, their modules) out of
    the collector's sight. A full collection walked the ~400k objects of a rank's heap: 0.23 s of CPU each, and
    DeepSpeed's ZeRO-3 runs one per engine built (``defragment``), 95% of the engine's set-up. Frozen objects are
    still freed when their last reference goes; only cycles among them are no longer looked for."""
    gc.collect()
    gc.freeze()


def _refcounts(groups: set[Any]) -> dict[Any, int]:
    return {pg: sys.getrefcount(pg) for pg in groups}


def own_refcount(world_size: int) -> int:
    """The reference count of a group that only torch's own tables hold, as :func:`_refcounts` reads it: a group
    made and destroyed at start-up on every rank (the same ``new_group`` every rank calls)."""
    import torch.distributed as dist

    made = {dist.new_group(list(range(world_size)))}
    (count,) = _refcounts(made).values()
    for pg in made:
        dist.destroy_process_group(pg)
    return count


def drop_task_groups(startup_groups: set[Any], own: int) -> None:
    """Destroy the process groups the earlier tasks made (meshes, ``new_group``, FSDP's, DeepSpeed's) that nothing
    but torch's own tables holds: a group a module or an object kept for later (DeepSpeed's world clone and expert
    groups, fairscale's group cache, a wrapper still alive) has more references and is left. Each gloo group keeps
    a TCP loop thread waking every 10 ms: a 4-rank pool had ~100 groups a rank by mid-suite (~300 threads) and spent
    half a core idling, beside every later test. Called when the next task arrives: every rank finished the last
    one (a failure breaks the pool), so no collective still runs on them."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    world = distributed_c10d.GroupMember.WORLD  # a task may have made the world's group anew
    made = {pg for pg in list(distributed_c10d._world.pg_map) if pg not in startup_groups and pg is not world}
    if not made:
        return
    if "torch.distributed.tensor" in sys.modules:
        # DTensor's caches (sharding propagation, redistribute plans) keep the specs, so the device meshes, so the
        # groups of every FSDP2/DTensor model run (a 4-rank pool reached ~200 threads a rank with them): a cache only
        from torch.distributed.tensor import _redistribute
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache

        _clear_sharding_prop_cache()
        _redistribute._gen_transform_infos.cache_clear()
        gc.collect()  # (meshes in cycles; the heap is frozen, so this walks the last task's survivors only)
    for pg, count in _refcounts(made).items():
        if count <= own:
            dist.destroy_process_group(pg)


def _worker(rank: int, world_size: int, workdir: str, pg_timeout_s: float, tasks: Any, results: Any) -> None:
    stack_file = open(os.path.join(workdir, f"stacks.{rank}"), "w")  # noqa: SIM115 - lives with the process
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size)
    )
    from dist_clip.bootstrap import wait_for_every_rank

    store = dist.FileStore(os.path.join(workdir, "store"), world_size)
    # Start-up waits for the other ranks as long as a normal pool's collectives would (spawned ranks arrived up to
    # 3.8 s apart under load, and a 3 s pool failed to start, 3 times in 15); a short timeout is the collectives'.
    wait_for_every_rank(store, world_size, timedelta(seconds=max(pg_timeout_s, 60.0)))
    store.set_timeout(timedelta(seconds=pg_timeout_s))
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s)
    )
    settle_heap()
    from torch.distributed import distributed_c10d

    startup_groups = set(distributed_c10d._world.pg_map)
    own = own_refcount(world_size)
    results.put((rank, True, "ready"))
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs = item
        try:
            drop_task_groups(startup_groups, own)
            value = fn(*args, **kwargs)
            results.put((rank, True, value))
        except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
            results.put((rank, False, traceback.format_exc()))
        settle_heap()
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


class RankPool:
    """``world_size`` gloo ranks on the CPU, spawned once and fed test bodies."""

    def __init__(self, world_size: int, pg_timeout_s: float = 60.0) -> None:
        self.world_size = world_size
        self.pg_timeout_s = pg_timeout_s
        self._tmp = tempfile.TemporaryDirectory(prefix=f"dist_clip_ranks{world_size}_")
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, self._tmp.name, pg_timeout_s, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self.broken = False
        try:
            self._collect(timeout_s=120.0, what="start-up")
        except BaseException:
            # No PoolCache holds a pool that failed to start, so nothing else ends its ranks: left running, they
            # stayed until pytest exited, each next test spawned another pool beside them, and on busy cores
            # each start-up then timed out too (11 ranks of 3 failed pools alive at once in one run of test_fsdp.py).
            self.close()
            raise

    def _stacks(self) -> str:
        for p in self._procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGUSR1)
        time.sleep(0.5)  # faulthandler writes from a signal handler; give it a moment
        out = []
        for r in range(self.world_size):
            path = os.path.join(self._tmp.name, f"stacks.{r}")
            if not os.path.exists(path):  # (a rank that died before it set up faulthandler)
                out.append(f"--- rank {r} --- (no stacks written)")
                continue
            with open(path) as f:
                out.append(f"--- rank {r} ---\n{f.read()[-6000:]}")
        return "\n".join(out)

    def _collect(self, timeout_s: float, what: str) -> list[Any]:
        values: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(values) + len(failures) < self.world_size:
            if failures:
                deadline = min(deadline, time.monotonic() + GRACE_S)
            remaining = deadline - time.monotonic()
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in values and r not in failures]
            if remaining <= 0 or dead:
                self.broken = True
                missing = sorted(set(range(self.world_size)) - values.keys() - failures.keys())
                detail = "".join(f"\n--- rank {r} failed ---\n{tb}" for r, tb in failures.items())
                raise RankFailure(
                    f"{what}: ranks {missing} did not answer within {timeout_s:.0f}s"
                    f"{' (dead: ' + str(dead) + ')' if dead else ''}{detail}\n{self._stacks()}"
                )
            try:
                rank, ok, value = self._results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            (values if ok else failures)[rank] = value
        if failures:
            self.broken = True  # a failed rank may have left its peers mid-collective: rebuild the pool
            detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
            raise RankFailure(f"{what} failed on ranks {sorted(failures)}:{detail}")
        return [values[r] for r in range(self.world_size)]

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 120.0, **kwargs: Any) -> list[Any]:
        """Call ``fn(*args, **kwargs)`` on every rank; return the values by rank or raise with every failure."""
        for q in self._tasks:
            q.put((fn, args, kwargs))
        return self._collect(timeout_s, f"{getattr(fn, '__qualname__', fn)}")

    def close(self) -> None:
        for q in self._tasks:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + (2.0 if not self.broken else 0.0)
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._tmp.cleanup()


class PoolCache:
    """One live pool per (world size, pg timeout); a broken pool is replaced on next use."""

    def __init__(self) -> None:
        self._pools: dict[tuple[int, float], RankPool] = {}

    def get(self, world_size: int, pg_timeout_s: float = 60.0) -> RankPool:
        key = (world_size, pg_timeout_s)
        pool = self._pools.get(key)
        if pool is None or pool.broken:
            if pool is not None:
                pool.close()
            pool = self._pools[key] = RankPool(world_size, pg_timeout_s)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


