"""The ``dist-clip`` command: ``train`` (the demo run) and ``check`` (the replay equivalence check alone).

Exit status: 0 when the run agrees with its unsharded replay (or no replay was asked for), 1 when it does not
or the job failed, 2 for a bad config or bad arguments (one line on stderr, from rank 0 only; a config check that
fails on another node only is said by that node's first rank).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import IO, Any

from .config import (
    ConfigError,
    TrainConfig,
    check_data_size,
    check_world_size,
    data_files,
    from_dict,
    load_config,
    read_config_data,
    read_files,
    stdlib_files,
    training_text_limit,
    with_overrides,
)

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """Usage errors and help from rank 0 only: under a launcher every rank parses the same arguments. No
    abbreviated options: ``train --val`` was taken for the hidden ``--validate-only``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def _print_message(self, message: str, file: IO[str] | None = None) -> None:
        if _is_main_rank():
            super()._print_message(message, file)


def _common(suppress: bool) -> argparse.ArgumentParser:
    """The options taken before and after the subcommand. After it (``suppress``) they default to absent, so
    that ``dist-clip --config X train`` keeps X (the subcommand's defaults overwrote what came before it)."""
    kw: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="YAML", help="run config (default: the built-in one, = configs/fsdp2.yaml)",
                        **kw)
    common.add_argument("--data", metavar="PATH", help="train on this file or folder instead of the config's data",
                        **kw)
    common.add_argument("--steps", type=int, metavar="N", help="override the config's number of steps", **kw)
    common.add_argument("--out", metavar="DIR", help="write the run folder under DIR instead of the config's out_dir",
                        **kw)
    # The DeepSpeed launcher (and torch.distributed.launch) pass --local_rank; the environment says the same.
    common.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS, **kw)
    # launch/torchrun.sh checks the arguments in one process first: torchrun turns a rank's exit 2 into its own 1.
    common.add_argument("--validate-only", action="store_true", help=argparse.SUPPRESS, **kw)
    # ... and, on one node, tells it the number of ranks torchrun will start: a config that cannot take it
    # (wrapper: none, an hsdp mesh of another size) was refused by every started rank, which torchrun reported as 1.
    common.add_argument("--validate-world-size", type=int, metavar="N", help=argparse.SUPPRESS, **kw)
    return common


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dist-clip",
        description="Train a small transformer LM under a distributed wrapper, clipping gradients with dist_clip, "
        "and check it against the same steps replayed unsharded on one process.",
        parents=[_common(suppress=False)],
    )
    after = _common(suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,check}")
    train = sub.add_parser(
        "train", parents=[after], help="train, log, plot, replay and check (exit 1 on disagreement)"
    )
    train.add_argument("--no-replay", action="store_true", help="skip the unsharded replay and its check")
    train.add_argument("--no-plot", action="store_true", help="do not draw the PNG plot")
    sub.add_parser("check", parents=[after], help="the equivalence check alone, for CI: exit status 0 agrees, 1 not")
    return parser


def _is_main_rank() -> bool:
    """Rank 0 of the launch, or any rank when the launcher's variables cannot be read (every rank then prints)."""
    from .bootstrap import detect_launch

    try:  # values that cannot belong to one job (RANK=2 WORLD_SIZE=2) still say which rank is 0
        return detect_launch(check=False).rank == 0
    except RuntimeError:  # RANK=x: main() reports it
        return True


def _fail(message: str, code: int) -> int:
    if _is_main_rank():
        print(message, file=sys.stderr, flush=True)
    return code


def _load(args: argparse.Namespace) -> tuple[TrainConfig, str]:
    if args.config is not None and not args.config.strip():  # --config "": the built-in config ran silently
        raise ConfigError("--config", "", f"expected the path of a YAML file, got {args.config!r}")
    source = args.config or "<built-in config>"
    cfg = load_config(args.config) if args.config is not None else from_dict({}, source)
    steps_or_data = {"steps": args.steps, "data": args.data, "out_dir": args.out}
    if any(v is not None for v in steps_or_data.values()):
        source = f"{source} (with command-line overrides)"
        cfg = with_overrides(cfg, source, **steps_or_data)
    return cfg, source


#: The files a run writes into its run folder (``out_dir/name``), and the only ones it removes.
RUN_OUTPUTS = ("log.jsonl", "plot.png")


def _remove_outputs(cfg: TrainConfig) -> None:
    """Remove a previous run's outputs from the run folder (main rank; a run starting or a config refused): a
    failed run left the old log with its passing check line, and ``train --no-plot`` or ``check`` left the old
    plot beside a new log. Only the files named in :data:`RUN_OUTPUTS`; what cannot be removed is left."""
    from pathlib import Path

    run = Path(cfg.out_dir) / cfg.name
    for name in RUN_OUTPUTS:
        path = run / name
        try:
            if path.is_symlink() or path.is_file():
                path.unlink()
        except OSError:  # a run folder that cannot be read or written: reported by _check_out_dir
            pass


def _refused_run(args: argparse.Namespace) -> TrainConfig | None:
    """The run folder of a config refused as it was read (a bad value in the file, or in ``--steps``/``--data``):
    its ``name`` and ``out_dir`` alone, validated as usual, and ``--out``; None where they cannot be told (no such
    file, invalid YAML, a bad name or out_dir, ``--config ""``). Its previous outputs are then removed like those
    of any other refused run: they were left, with their passing check line, where the file itself was refused."""
    try:
        if args.config is None:
            data: object = {}
            stem = None
        elif not args.config.strip():
            return None
        else:
            data, stem = read_config_data(args.config)
        if not isinstance(data, dict):
            return None
        keep = {k: v for k, v in data.items() if k in ("name", "out_dir")}
        if args.out is not None:  # the file's own out_dir, good or bad, does not count then
            keep["out_dir"] = args.out
        return from_dict(keep, "<refused config>", name=stem)
    except (ValueError, OSError):
        return None


def _check_out_dir(cfg: TrainConfig, source: str, main_rank: bool = True) -> None:
    """The run folder (``out_dir/name``) must be, or be makeable as, a writable folder, and its log and plot not
    folders: found now rather than after training and replay. Every rank checks (a rank that went on alone
    waited in MPI_Init for a rank 0 that had exited); only the main rank makes the folder."""
    import os
    from pathlib import Path

    out = Path(cfg.out_dir)
    run = out / cfg.name
    if main_rank:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(source, "out_dir", f"cannot be made a folder: {out} ({e.strerror})") from None
    try:
        if out.exists() and not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(source, "out_dir", f"is not writable: {out}")
        if out.exists() and not out.is_dir():
            raise ConfigError(source, "out_dir", f"is not a folder: {out}")
        if run.exists() and not run.is_dir():
            raise ConfigError(source, "out_dir", f"holds a file where the run folder goes: {run}")
        for name in RUN_OUTPUTS:
            if (run / name).is_dir():
                raise ConfigError(source, "out_dir", f"holds a folder where the run's {name} goes: {run / name}")
    except OSError as e:  # a name over the file system's limit: "File name too long", a traceback before
        raise ConfigError(source, "out_dir", f"cannot hold the run folder {run} ({e.strerror or e})") from None


def _check_machine(cfg: TrainConfig, source: str) -> None:
    """What the config needs of this machine, whatever the number of ranks: found by ``--validate-only`` (before
    torchrun starts the ranks) rather than by every rank once it has started."""
    # Read up to the bytes one training window needs, and no more than the run reads, as every rank would: the
    # standard library too (model.seq_len: 3000000 passed, then every started rank failed on its 2 MiB).
    _, files = stdlib_files() if cfg.data == "stdlib" else data_files(cfg.data, source)
    limit = min(training_text_limit(cfg.data), cfg.model.seq_len + 2)
    check_data_size(len(read_files(files, limit)), cfg.data, source, cfg.model.seq_len)
    if cfg.backend == "nccl":  # torch imported only for it
        from .bootstrap import backend_problem

        problem = backend_problem(cfg.backend)
        if problem is not None:
            raise ConfigError(source, "backend", f"{problem}; use gloo or auto")


#: The framework each wrapper imports, and the pip extra that installs it.
_FRAMEWORKS = {"zero1": ("deepspeed", "DeepSpeed"), "zero2": ("deepspeed", "DeepSpeed"),
               "zero3": ("deepspeed", "DeepSpeed"), "fairscale-oss": ("fairscale", "fairscale")}


def _installed(module: str) -> bool:
    """Whether ``import module`` would find it, without importing it (DeepSpeed's import takes seconds)."""
    if module in sys.modules:
        return sys.modules[module] is not None  # None: an import blocked on purpose
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _check_installed(cfg: TrainConfig, source: str, args: argparse.Namespace) -> None:
    """The optional packages the run will import, found before any rank starts: a wrapper's framework failed
    with a traceback once the process group and the data were set up, and matplotlib after the whole run."""
    module, name = _FRAMEWORKS.get(cfg.wrapper, (None, None))
    if module is not None and not _installed(module):
        raise ConfigError(source, "wrapper", f"{cfg.wrapper} needs {name}, which is not installed: "
                          f"pip install 'dist_clip[{module}]'")
    if args.command == "train" and not args.no_plot and not _installed("matplotlib"):
        raise ConfigError(source, "", "the plot needs matplotlib, which is not installed: "
                          "pip install 'dist_clip[train]', or pass --no-plot")


#: ``--validate-only``'s status when the arguments asked for help (printed): nothing to run. launch/torchrun.sh
#: then exits 0 without starting torchrun, whose ranks printed the help a second time.
HELP_SHOWN = 3


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dist-clip`` and ``python -m dist_clip``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse's help (0) or a usage error (2)
        if e.code == 0 and "--validate-only" in argv:
            return HELP_SHOWN
        raise
    from .bootstrap import _timeout, detect_launch

    try:
        main_rank = detect_launch().rank == 0
    except RuntimeError as e:  # RANK=x, PMI_RANK=x: a traceback from every rank before
        if getattr(e, "mine", False):  # RANK=2 with WORLD_SIZE=2: this process alone is off, and says so
            print(f"config error: {e}", file=sys.stderr, flush=True)
            return 2
        return _fail(f"config error: {e}", 2)
    cfg: TrainConfig | None = None
    try:
        cfg, source = _load(args)
        _check_machine(cfg, source)
        _check_installed(cfg, source, args)
        _check_out_dir(cfg, source, main_rank=main_rank)
        if args.validate_world_size is not None:
            check_world_size(cfg, source, args.validate_world_size)
        # Read when the ranks start, checked by --validate-only too: under torchrun every started rank found a bad
        # value, and torchrun reported their 2 as its own 1 with a traceback.
        _timeout()
    except ValueError as e:  # ConfigError, or _timeout's ValueError
        if cfg is None:  # refused as it was read: its run folder from its name and out_dir alone, where they hold
            cfg = _refused_run(args)
        refusal = f"config error: {e}"
    except Exception as e:  # no config error: the other ranks would wait for this one's verdict for good
        _abort_before_agreement(e)
        raise
    else:
        refusal = None
    refused, say = _refused_anywhere(refusal)
    if refused:
        if cfg is not None and main_rank:  # a refused run leaves no previous run's verdict behind
            _remove_outputs(cfg)
        if say:
            print(refusal, file=sys.stderr, flush=True)
        return 2
    if args.validate_only:  # the ranks of the run that follows (launch/torchrun.sh) remove the old outputs
        return 0
    if main_rank:  # before anything can fail: a run that fails leaves no previous run's log or plot
        _remove_outputs(cfg)

    from . import bootstrap, train

    try:
        info = bootstrap.init_distributed(cfg.backend, need_group=cfg.wrapper != "none")
    except ValueError as e:  # torch's rendezvous on a half-set or bad MASTER_PORT: every rank sees it alike
        return _fail(f"config error: rendezvous environment: {e}", 2)
    except RuntimeError as e:  # e.g. MASTER_PORT taken: this rank cannot join, the others would wait 30 minutes
        world = _running_mpi_world()
        if world is None:
            return _fail(f"error: {e}", 1)
        # Under mpiexec with mpi4py a plain return waited in MPI_Finalize while the other ranks retried the
        # rendezvous for the whole start-up wait. The rank that failed says why (whichever it is) and ends the job.
        print(f"error: {e}", file=sys.stderr, flush=True)
        _end_mpi_job(world, 1)
        return 1  # not reached: MPI_Abort ends this process too
    try:
        check = args.command == "check"
        return train.run_job(
            cfg, info, source=source, out_dir=cfg.out_dir, replay_check=check or not args.no_replay,
            show_progress=not check, make_plot=not check and not args.no_plot,
        )
    except ConfigError as e:  # found once the world is known (mesh shape, wrapper none on several ranks)
        return _fail(f"config error: {e}", 2)
    except BaseException as e:
        _abort_mpi_job(e)
        raise
    finally:
        bootstrap.shutdown()


def _refused_anywhere(refusal: str | None) -> tuple[bool, bool]:
    """Whether the run is refused, and whether this rank says why. Under mpiexec with mpi4py (several ranks) one
    all-reduce tells every rank whether any refused its config, and the lowest that did says why: a check that
    fails on one node only (a ``--data`` path or a writable ``out_dir`` there, DeepSpeed installed there) had that
    rank exit 2 without a word (not rank 0) and the others wait for it at start-up for 30 minutes (mpiexec kills
    no one for a rank's exit status). Elsewhere this rank's own verdict, said by rank 0 and by the first rank of
    every other node (local rank 0): torchrun and the DeepSpeed launcher end every rank when one exits non-zero,
    and a check that failed on another node than rank 0's (its --data path, DeepSpeed installed there) ended the
    job without a word."""
    from .bootstrap import _mpi_comm, detect_launch

    launch = detect_launch(check=False)
    comm = _mpi_comm() if launch.launcher == "mpi" and launch.world_size != 1 else None
    if comm is None or comm.Get_size() < 2:
        return refusal is not None, refusal is not None and (launch.rank == 0 or launch.local_rank == 0)
    from mpi4py import MPI

    size = comm.Get_size()
    first = comm.allreduce(comm.Get_rank() if refusal is not None else size, op=MPI.MIN)
    return first < size, first == comm.Get_rank()


def _abort_before_agreement(error: Exception) -> None:
    """Under mpiexec with mpi4py (several ranks), end every rank when this one's config checks raised something
    other than a config error: it exited with its traceback without ever starting MPI, and the others waited in
    MPI_Init and in :func:`_refused_anywhere`'s all-reduce, neither of which times out, for good. MPI is started
    here (the others are in MPI_Init too) so that the abort reaches them. Not for Ctrl-C, which every rank gets:
    one that had already left could keep this one waiting in MPI_Init."""
    from .bootstrap import _mpi_comm, detect_launch

    try:
        launch = detect_launch(check=False)
    except RuntimeError:
        return
    if launch.launcher == "mpi" and launch.world_size != 1 and _mpi_comm() is not None:
        _abort_mpi_job(error)


def _running_mpi_world() -> Any:
    """mpi4py's COMM_WORLD when this process is a rank of a running MPI job of 2 ranks or more (MPI initialized,
    not yet finalized), else None."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized() or mpi.COMM_WORLD.Get_size() < 2:
        return None
    return mpi.COMM_WORLD


def _abort_mpi_job(error: BaseException) -> None:
    """Under mpiexec with mpi4py, end every rank now when this one fails. Otherwise this rank finalizes MPI
    cleanly and waits there, mpiexec kills no one, and the others wait in their next collective for the full
    ``DIST_CLIP_TIMEOUT_S`` (30 minutes by default). The exit statuses of a clean return (0, 1, 2) are left
    alone: those every rank reaches together."""
    world = _running_mpi_world()
    if isinstance(error, SystemExit) or world is None:
        return
    import traceback

    rank = world.Get_rank()  # prefixed as torch prints an uncaught exception of a rank
    sys.stdout.flush()
    print("".join(f"[rank{rank}]: {line}\n" for line in traceback.format_exc().splitlines()), end="",
          file=sys.stderr, flush=True)
    _end_mpi_job(world, 130 if isinstance(error, KeyboardInterrupt) else 1)


def _end_mpi_job(world: Any, code: int) -> None:
    """Abort the MPI job with ``code`` (every rank ends), once what this rank wrote has been read."""
    try:
        _wait_until_read((sys.stdout, sys.stderr))
    finally:  # a second Ctrl-C while waiting still ends every rank
        world.Abort(code)


def _wait_until_read(streams: Sequence[IO[str]], limit_s: float = 5.0) -> None:
    """Wait (at most ``limit_s``) until the launcher has read what this process wrote to its output pipes.
    mpiexec's proxy reads a rank's stdout/stderr pipes and its PMI socket in one loop: an abort it handles first
    kills the job with the traceback still in the pipe, and it never reaches the user (seen under load, about
    1 job in 12). A pipe it has read is forwarded before the abort. Outputs that are not pipes are left alone."""
    import fcntl
    import os
    import stat
    import termios
    import time

    fds = []
    for stream in streams:
        try:
            fd = stream.fileno()
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                fds.append(fd)
        except (AttributeError, OSError, ValueError):  # replaced by a stream without a file, or closed
            continue
    deadline = time.monotonic() + limit_s
    unread = bytearray(4)
    while fds and time.monotonic() < deadline:
        try:
            fds = [fd for fd in fds if fcntl.ioctl(fd, termios.FIONREAD, unread) == 0
                   and int.from_bytes(unread, sys.byteorder) > 0]
        except OSError:
            return
        if fds:
            time.sleep(0.005)


if __name__ == "__main__":
    sys.exit(main())
