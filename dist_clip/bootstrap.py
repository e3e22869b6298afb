"""Start ``torch.distributed`` under whatever launched this process: torchrun, MPI, DeepSpeed, or nothing.

* ``RANK`` and ``WORLD_SIZE`` in the environment (torchrun, the DeepSpeed launcher, ``mp.spawn`` helpers):
  ``env://`` with the launcher's ``MASTER_ADDR``/``MASTER_PORT``.
* An MPI launcher (``mpiexec`` of MPICH, Intel MPI, MVAPICH or Open MPI): rank, world size and local rank
  come from mpi4py's ``COMM_WORLD`` (the local rank from a shared-memory split), and rank 0 broadcasts its
  address and the port of the rendezvous store it started, over MPI. Without mpi4py they come from the
  launcher's environment variables (``PMI_RANK``/``PMI_SIZE``/``MPI_LOCALRANKID`` for MPICH Hydra,
  ``OMPI_COMM_WORLD_*`` for Open MPI), and ``MASTER_ADDR``/``MASTER_PORT`` must be given
  (``launch/mpirun.sh`` exports them).
* Nothing: one process. A one-rank group (in-memory store) is started only when a wrapper needs one.

Then the process group is initialised with nccl on CUDA (a GPU for each rank of the node) or gloo on CPU
(``backend="auto"``). MPI only bootstraps: every collective afterwards goes through gloo or nccl.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "LaunchEnv", "LaunchError", "backend_problem", "detect_launch", "free_port", "init_distributed",
           "resolve_backend", "shutdown", "wait_for_every_rank"]

#: Seconds a collective may wait before the job fails (``DIST_CLIP_TIMEOUT_S`` overrides; tests lower it).
DEFAULT_TIMEOUT_S = 1800.0
#: The longest ``DIST_CLIP_TIMEOUT_S`` taken (about 31 years): far below where torch's C++ deadlines overflow.
MAX_TIMEOUT_S = 1e9
#: The shortest: torch's deadlines count whole milliseconds (a shorter one is 0 ms, every wait failing at once).
MIN_TIMEOUT_S = 0.001

# (rank, size, local rank, local size) variables set by MPI launchers, most specific first.
_MPI_VARS: tuple[tuple[str, str, str, str], ...] = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH Hydra, Intel MPI
    ("PMIX_RANK", "", "", ""),  # PMIx (srun, prterun): the size needs mpi4py
)


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process before any communication."""

    rank: int
    world_size: int  # 0 when only mpi4py can tell (PMIx)
    local_rank: int
    local_world_size: int
    launcher: str  # "torchrun", "deepspeed", "env", "mpi" or "single"
    #: Whether the launcher stated the local size (an ``env://`` launch without ``LOCAL_WORLD_SIZE`` or
    #: ``LOCAL_SIZE`` reads the world size there): backend ``auto`` weighs it against the node's GPUs only then.
    local_stated: bool = True


@dataclass(frozen=True)
class DistInfo:
    """This rank's place in the job once ``torch.distributed`` is up (or not needed)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str
    backend: str | None  # None: no process group (one process, no wrapper)
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(environ: os._Environ[str] | dict[str, str], name: str, default: int) -> int:
    value = environ.get(name, "") if name else ""
    try:
        return int(value) if value != "" else default
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def detect_launch(environ: os._Environ[str] | dict[str, str] | None = None, *, check: bool = True) -> LaunchEnv:
    """Rank, world size and local rank as the launcher's environment states them (no communication).

    With ``check`` (the default) values that cannot belong to one job are a :class:`LaunchError` (a
    ``RuntimeError``) naming the variables: a world size under 1, a rank outside ``[0, world size)``, a local size
    under 1 or over the world size, a local rank given outside ``[0, local size)``. ``RANK=2 WORLD_SIZE=2`` and
    ``RANK=-1`` waited for the whole 30-minute start-up wait, ``WORLD_SIZE=-1`` was an ``IndexError`` traceback.

    Where :func:`init_distributed` wrote ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` into this
    process's environment and they still hold its values, the launch it read before writing them: a lone process
    (or ``mpirun -n 1``) read its own ``RANK=0 WORLD_SIZE=1`` as an ``env://`` launch after
    ``destroy_process_group``, and a second ``init_distributed`` failed for want of ``MASTER_PORT``. Where
    ``RANK`` or ``WORLD_SIZE`` has been set since (a new launch), the others it wrote that still hold its values
    are read as they were before it wrote them: a rank set up after a lone run read its ``LOCAL_RANK=0
    LOCAL_WORLD_SIZE=1`` as its own, and under hsdp built a mesh of another shape than its peers."""
    if environ is None and _written is not None:
        environ = _launch_environ()
        if environ is None:
            return _written[2]
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK", 0), _int(env, "WORLD_SIZE", 1)
        local_size_var = next((v for v in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if v in env), "")
        local_world = _int(env, local_size_var, world)
        if "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
            launcher = "deepspeed"
        else:
            launcher = "env"
        launch = LaunchEnv(rank, world, _int(env, "LOCAL_RANK", rank), local_world, launcher, bool(local_size_var))
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK" if "LOCAL_RANK" in env else "", local_size_var)
    else:
        for names in _MPI_VARS:
            rank_var, size_var, local_var, local_size_var = names
            if rank_var in env:
                rank = _int(env, rank_var, 0)
                world = _int(env, size_var, 0)
                launch = LaunchEnv(
                    rank, world, _int(env, local_var, rank), _int(env, local_size_var, world), "mpi",
                    bool(local_size_var) and local_size_var in env,
                )
                names = tuple(v if v in env else "" for v in names)
                break
        else:
            return LaunchEnv(0, 1, 0, 1, "single")
    if check:
        _check_consistent(launch, names)
    return launch


def _check_consistent(launch: LaunchEnv, names: tuple[str, ...]) -> None:
    """Raise ``RuntimeError`` where the launcher's numbers cannot belong to one job (see :func:`detect_launch`)."""
    rank_var, size_var, local_var, local_size_var = names
    rank, world, local_rank, local_world = (
        launch.rank, launch.world_size, launch.local_rank, launch.local_world_size)
    if not size_var and world == 0:  # PMIx states no size: mpi4py's COMM_WORLD tells
        return
    rank_s = f"{rank_var}={rank}"
    world_s = f"{size_var}={world}" if size_var else f"a world size of {world}"
    local_world_s = f"{local_size_var}={local_world}" if local_size_var else f"a local size of {local_world}"
    problem, mine = None, True
    if world < 1:
        problem, mine = f"{world_s}: a job has at least one rank", False
    elif not 0 <= rank < world:
        problem = f"{rank_s} is not a rank of {world_s} (0 to {world - 1})"
    elif not 1 <= local_world <= world:
        problem, mine = f"{local_world_s} is not a number of ranks on one node of {world_s} (1 to {world})", False
    elif local_var and not 0 <= local_rank < local_world:  # unset, it is the rank (as before)
        problem = f"{local_var}={local_rank} is not a local rank of {local_world_s} (0 to {local_world - 1})"
    if problem is not None:
        raise LaunchError(f"inconsistent launcher environment: {problem}", mine)


class LaunchError(RuntimeError):
    """Launcher variables that cannot belong to one job. ``mine``: this process's own rank or local rank is off
    (the other ranks may be fine, so this one says why it stops), not a size that every rank reads alike."""

    def __init__(self, message: str, mine: bool) -> None:
        super().__init__(message)
        self.mine = mine


def backend_problem(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine, or None: read when the ranks start and by ``--validate-only``."""
    if backend == "nccl" and not torch.cuda.is_available():
        return "nccl needs CUDA, and this machine has none"
    return None


def resolve_backend(backend: str, local_world_size: int = 1) -> str:
    """``auto`` means nccl where CUDA is present with a GPU for each of the node's ``local_world_size`` ranks, and
    gloo otherwise: NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), and ``make demo``'s 2 ranks on a
    machine of one GPU failed in their first collective. ``nccl`` with fewer GPUs than ranks is a RuntimeError."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto":
        return "nccl" if gpus and local_world_size <= gpus else "gloo"
    problem = backend_problem(backend)
    if problem is None and backend == "nccl" and local_world_size > gpus:
        problem = (f"nccl needs a GPU for each rank of a node (NCCL refuses two ranks on one GPU): {local_world_size} "
                   f"ranks on this node, {gpus} GPU(s)")
    if problem is not None:
        raise RuntimeError(f"backend {problem}; use backend: gloo or auto")
    return backend


def free_port() -> int:
    """A TCP port free right now on this host (the OS picks; never a fixed number)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_comm():  # noqa: ANN202 - mpi4py's Comm, or None
    """mpi4py's COMM_WORLD, or None when mpi4py is absent or disabled (``DIST_CLIP_MPI4PY=0``)."""
    if os.environ.get("DIST_CLIP_MPI4PY", "1") == "0":
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def _from_mpi(launch: LaunchEnv) -> tuple[LaunchEnv, dist.Store | None]:
    """Rank facts from mpi4py, and MASTER_ADDR/MASTER_PORT agreed through it: without them given, rank 0 starts
    the rendezvous store on a port the OS picks and broadcasts it (picking a free port first and binding it later
    left a window in which another process could take it). Returns rank 0's store in that case."""
    comm = _mpi_comm()
    if comm is None:
        if launch.world_size <= 0:
            raise RuntimeError(
                "launched by an MPI launcher that does not state the world size in the environment; "
                "install mpi4py (pip install 'dist_clip[mpi]') so that it can be read from COMM_WORLD"
            )
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing and launch.world_size > 1:
            raise RuntimeError(
                f"launched by MPI without mpi4py, and {' and '.join(missing)} not set: export MASTER_ADDR (the "
                "address of rank 0's host) and MASTER_PORT to every rank (launch/mpirun.sh does), or install "
                "mpi4py (pip install 'dist_clip[mpi]')"
            )
        return launch, None
    from mpi4py import MPI

    rank, world = comm.Get_rank(), comm.Get_size()
    if launch.world_size > 0 and world != launch.world_size:
        # mpi4py built for another MPI than the launcher's starts as a singleton: every process would be rank 0.
        raise RuntimeError(
            f"the launcher says {launch.world_size} ranks but mpi4py's COMM_WORLD has {world}: mpi4py was built "
            "for another MPI than the mpiexec that started this job; use that MPI's mpiexec, install mpi4py for "
            "this MPI, or set DIST_CLIP_MPI4PY=0 (then export MASTER_ADDR and MASTER_PORT, as launch/mpirun.sh does)"
        )
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_world = local.Get_rank(), local.Get_size()
    local.Free()
    store = None
    if os.environ.get("MASTER_ADDR") and _given_port():
        addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]  # the user knows better
    else:
        chosen = None
        if rank == 0:
            # One node: loopback. Several: rank 0's host name, which the other nodes resolve.
            host = "127.0.0.1" if local_world == world else socket.gethostname()
            addr, port = os.environ.get("MASTER_ADDR") or host, _given_port()
            if world > 1 and not port:
                store = dist.TCPStore(addr, 0, world, is_master=True, timeout=_startup_timeout(),
                                      wait_for_workers=False)
                port = store.port
            chosen = (addr, str(port or free_port()))
        addr, port = comm.bcast(chosen, root=0)
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port))
    return LaunchEnv(rank, world, local_rank, local_world, "mpi"), store


def _given_port() -> str | None:
    """``MASTER_PORT`` where it names a port: 0 (any port the OS gives) is a port only rank 0 would know."""
    port = os.environ.get("MASTER_PORT") or None
    try:
        return None if port is not None and int(port) == 0 else port
    except ValueError:
        return port  # torch's rendezvous names it


def _timeout() -> timedelta:
    raw = os.environ.get("DIST_CLIP_TIMEOUT_S", DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"DIST_CLIP_TIMEOUT_S must be a number of seconds > 0, got {raw!r}")
    if seconds < MIN_TIMEOUT_S:
        # torch's deadlines count whole milliseconds: 0.0004 passed and every wait failed at once in init
        # ("wait timeout after 0ms"), as a 0 would.
        raise ValueError(f"DIST_CLIP_TIMEOUT_S must be at least {MIN_TIMEOUT_S} seconds (torch counts whole "
                         f"milliseconds), got {raw!r}")
    if seconds > MAX_TIMEOUT_S:
        # Past what torch's C++ deadlines hold (nanoseconds in a signed 64-bit integer: 2**63 ns is about 9.2e9 s),
        # however far within timedelta's: 9e9 spun forever in gloo, 1e10 was a traceback, 5e13 "Invalid timeout".
        raise ValueError(f"DIST_CLIP_TIMEOUT_S must be at most {MAX_TIMEOUT_S:.0f} seconds (about 31 years), "
                         f"got {raw!r}")
    return timedelta(seconds=seconds)


def _startup_timeout() -> timedelta:
    """How long start-up waits for every rank: the collective timeout, but never under 30 minutes (ranks start
    seconds apart: imports, a slow node; DIST_CLIP_TIMEOUT_S=2 failed a correct job in init under load)."""
    return max(_timeout(), timedelta(seconds=DEFAULT_TIMEOUT_S))


def init_distributed(backend: str = "auto", *, need_group: bool = True) -> DistInfo:
    """Initialise ``torch.distributed`` for this process, whatever launched it; idempotent.

    Args:
        backend: ``auto``, ``gloo`` or ``nccl``.
        need_group: start a one-rank group even when this is the only process (wrappers such as DDP and FSDP
            need a process group); with ``False`` a lone process runs without one.

    Returns:
        The rank facts, the backend in use and the device this rank computes on (``cuda:<local rank>`` with
        nccl, the CPU otherwise).
    """
    launch = detect_launch(check=not (dist.is_available() and dist.is_initialized()))
    if dist.is_available() and dist.is_initialized():
        name = dist.get_backend()
        device = _started_device()
        return DistInfo(
            dist.get_rank(), dist.get_world_size(), launch.local_rank, launch.local_world_size,
            launch.launcher, name, device,
        )
    store = None
    read = launch
    if launch.launcher == "mpi":
        launch, store = _from_mpi(launch)
    # The node's size where the launcher states it: a plain env:// launch without LOCAL_WORLD_SIZE reads the world
    # size there, which on nodes of one GPU each would have taken gloo where nccl works.
    name = resolve_backend(backend, launch.local_world_size if launch.local_stated else 1)
    if name == "nccl":
        device = torch.device("cuda", launch.local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if launch.world_size == 1 and not need_group:
        return DistInfo(0, 1, 0, 1, launch.launcher, None, device)
    kwargs = {"device_id": device} if name == "nccl" else {}
    if launch.world_size == 1 and launch.launcher in ("single", "mpi"):
        # No launcher rendezvous to join: an in-memory store needs no port at all. The variables a launcher
        # would set are set too: DeepSpeed's initialize() asserts LOCAL_RANK (zero1-3 run directly crashed).
        _write_launch_variables(read, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        dist.init_process_group(name, store=dist.HashStore(), rank=0, world_size=1, timeout=_timeout(), **kwargs)
    else:
        _write_launch_variables(
            read, RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank),
            LOCAL_WORLD_SIZE=str(launch.local_world_size),
        )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        # The env:// rendezvous init_process_group would run, done here so that start-up can wait longer than
        # a collective (_startup_timeout). The store and the group then take the collective timeout (lowering it
        # on a group once made missed TORCH_DISTRIBUTED_DEBUG=DETAIL's wrapper, which kept 30 minutes).
        startup = _startup_timeout()
        if store is None and launch.world_size > 1 and os.environ.get("MASTER_PORT") and _given_port() is None:
            # Rank 0 listened on a port the OS gave, which the others cannot know: every rank waited for the whole
            # start-up wait (30 minutes).
            raise ValueError(f"MASTER_PORT={os.environ['MASTER_PORT']} is no rendezvous port for {launch.world_size} "
                             "ranks: rank 0 would listen on a port the OS picks, which the other ranks cannot know; "
                             "give a free port (under mpirun with mpi4py, or launch/deepspeed.sh, leave it unset)")
        if store is None:  # rank 0 under MPI may hold it already, on the port it broadcast
            store, _, _ = next(dist.rendezvous("env://", launch.rank, launch.world_size, timeout=startup))
        round_name = wait_for_every_rank(store, launch.world_size, startup, rank=launch.rank)
        store.set_timeout(_timeout())
        # The group's keys under the round's name: gloo's addresses of a failed attempt stay on torchrun's store,
        # and under the fixed "default_pg" a restarted rank 0 read rank 1's dead address and hung in init.
        dist.init_process_group(
            name, store=dist.PrefixStore(f"{round_name}/default_pg", store), rank=launch.rank,
            world_size=launch.world_size, timeout=_timeout(), **kwargs,
        )
    _later_groups_time_out_alike()
    return DistInfo(
        launch.rank, launch.world_size, launch.local_rank, launch.local_world_size, launch.launcher, name, device
    )


#: The variables init_distributed last wrote into the environment, their values before (None: unset), and the
#: launch it had read before writing them.
_written: tuple[dict[str, str], dict[str, str | None], LaunchEnv] | None = None


def _launch_environ() -> dict[str, str] | os._Environ[str] | None:
    """The environment as a launcher left it, for :func:`detect_launch`: None while the variables
    init_distributed wrote all still hold its values (its remembered launch stands); where ``RANK`` or
    ``WORLD_SIZE`` has changed since (a new launch), the others it wrote that still hold its values as they were
    before it wrote them."""
    if _written is None:
        return os.environ
    wrote, before, _ = _written
    held = {k for k, v in wrote.items() if os.environ.get(k) == v}
    if held == set(wrote):
        return None
    if {"RANK", "WORLD_SIZE"} <= held:
        return os.environ
    environ = dict(os.environ)
    for k in held - {"RANK", "WORLD_SIZE"}:
        if before[k] is None:
            del environ[k]
        else:
            environ[k] = before[k]
    return environ


def _write_launch_variables(read: LaunchEnv, **variables: str) -> None:
    global _written
    environ = _launch_environ()
    if environ is None:  # the same launch again: what stood before the first write still does
        before = _written[1]
    else:
        before = {k: environ.get(k) for k in variables}
    os.environ.update(variables)
    _written = (variables, before, read)


def _started_device() -> torch.device:
    """The device of a process group started elsewhere: CUDA where its backend reduces CUDA tensors on NCCL. A
    group started without a backend (torchrun's usual ``init_process_group()``) is named ``"undefined"`` though
    it runs NCCL on CUDA: its name alone took the CPU on a GPU machine."""
    from ._reduce import backends

    table = backends(dist.group.WORLD)
    if table.get("cuda", table.get("")) == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wait_for_every_rank(store: dist.Store, world_size: int, timeout: timedelta, rank: int | None = None) -> str:
    """Return once every one of ``world_size`` ranks has called this on ``store``; ``RuntimeError`` after
    ``timeout``. ``rank`` defaults to ``RANK`` from the environment. Returns the round's name, the same on every
    rank (``init_distributed`` keeps the group's keys under it).

    Each rank sets a key of its own and waits for every rank's; a round is named by this process's count of calls,
    so calls repeated in the processes of one job (a second init) are rounds of their own. Arrivals were counted
    on the store, every ``world_size`` of them one round: torchrun's workers share the agent's store across
    restarts (``--max-restarts``), and the ranks of a failed attempt that had arrived shifted every later round
    (after a restart rank 1 was released alone and rank 0 waited for the whole start-up wait). The keys are not
    deleted: with a lazily connected group (NCCL) rank 0 cannot tell when the last rank has read them.

    torchrun's attempt (``TORCHELASTIC_RESTART_COUNT``) names the round too, but only in a job of one node
    (``GROUP_WORLD_SIZE`` 1): every agent counts its own restarts, and a healthy node restarted for another node's
    failure keeps its count (torch: "membership changes do not count as retries"), so on two nodes rank 0 waited
    for keys of attempt 0 and rank 1 for keys of attempt 1, both for the whole start-up wait. Across nodes a key
    left by a failed attempt at most ends its rank's wait early; the group's connection then waits for that rank
    for the collective timeout."""
    rank = int(os.environ["RANK"]) if rank is None else rank
    one_agent = os.environ.get("GROUP_WORLD_SIZE") == "1"
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if one_agent else "any"
    round_name = f"{_ARRIVED}/{attempt}/{next(_ROUNDS)}"
    keys = [f"{round_name}/{r}" for r in range(world_size)]
    store.set(keys[rank], "1")
    store.wait(keys, timeout)
    return round_name


_ROUNDS = itertools.count()
_ARRIVED = "dist_clip/arrived"


def _later_groups_time_out_alike() -> None:
    """Groups made after this one without a timeout of their own (DeepSpeed's data-parallel groups, device
    meshes) take torch's default, 30 minutes, which ``dist.new_group`` reads from these module globals at call
    time: set them to ours, so that a hung peer fails every collective at ``DIST_CLIP_TIMEOUT_S``."""
    from torch.distributed import distributed_c10d as c10d

    timeout = _timeout()
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = timeout


def shutdown() -> None:
    """Destroy the default process group if one is up (safe to call twice).

    Wrappers that made groups of their own (fairscale) are collected first: a gloo group whose last reference
    dies only at interpreter exit can abort the process ("terminate called without an active exception"). Where
    DeepSpeed's communication is up, the group ends through DeepSpeed, which then lets go of the groups it keeps in
    its module globals (the world group's clone, data-parallel groups): they lived until interpreter exit.
    """
    import gc
    import sys

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        deepspeed_comm = sys.modules.get("deepspeed.comm.comm")  # never imported here: only where a job did
        if getattr(deepspeed_comm, "cdb", None) is not None and hasattr(deepspeed_comm, "destroy_process_group"):
            deepspeed_comm.destroy_process_group()  # torch's, then DeepSpeed's references released
        else:
            dist.destroy_process_group()
    gc.collect()
