#!/usr/bin/env bash
# Launch `dist-clip` (python -m dist_clip) with MPI's mpiexec; every argument is passed through to dist-clip.
# MPI only starts the processes and tells each its rank (dist_clip.bootstrap reads mpi4py's COMM_WORLD, and
# rank 0 broadcasts its address and its rendezvous store's port); training then talks gloo (CPU) or nccl (CUDA).
#
#   launch/mpirun.sh train --config configs/fsdp2.yaml                     # one node, NPROC ranks
#   NNODES=2 HOSTS=node0,node1 launch/mpirun.sh train --config configs/hsdp.yaml   # from node 0, 2 x NPROC ranks
#
# Environment overrides:
#   NPROC       ranks per node (default 2)
#   NNODES      nodes (default 1); with more, HOSTS or HOSTFILE names them (ssh must reach each node)
#   HOSTS       comma-separated host names, node 0 first
#   HOSTFILE    an MPI host file instead of HOSTS
#   MPIEXEC     mpiexec to use (default: the repository's .venv/bin/mpiexec from the mpich wheel, else PATH)
#   MPI_FLAVOR  mpich | openmpi (default: read from `mpiexec --version`)
#   MPI_ARGS    extra mpiexec options, e.g. "-bind-to core" (MPICH) or "--mca btl_tcp_if_include eth0" (Open MPI)
#   PYTHON      interpreter (default: the repository's .venv, else python3 on PATH)
#   MASTER_ADDR, MASTER_PORT  rendezvous of torch.distributed; default: agreed through mpi4py. Without mpi4py
#               this script exports them (node 0 = first of HOSTS, else of HOSTFILE; a free port picked here;
#               a MASTER_PORT given that is in use on this machine, where rank 0 runs, is refused: exit status 2).
#
# With mpi4py, a rank that raises, or cannot start torch.distributed (MASTER_PORT in use), aborts the whole MPI job
# (dist_clip.cli); a clean exit status (0, 1, 2) does not.
#
# MPICH (the `mpich` wheel of `make install`, Intel MPI, MVAPICH): the environment is passed to every rank.
# Open MPI: variables are forwarded with -x (the usual ones and every DIST_CLIP_* one); as root it refuses to run
# unless OMPI_ALLOW_RUN_AS_ROOT=1 and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 (this script sets them when it runs as root).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"  # PYTHON, ROOT, PATH
if [[ -z "${MPIEXEC:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/mpiexec" ]]; then MPIEXEC="$ROOT/.venv/bin/mpiexec"; else MPIEXEC=mpiexec; fi
fi
NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
check_count NPROC 1
check_count NNODES 1
TOTAL=$((NPROC * NNODES))
if [[ -n "${MPI_FLAVOR:-}" ]]; then
    # (a misspelt flavour, "open-mpi", ran Open MPI's mpiexec with MPICH's options)
    case "$(echo "$MPI_FLAVOR" | tr '[:upper:]' '[:lower:]')" in
        mpich) MPI_FLAVOR=mpich ;;
        openmpi) MPI_FLAVOR=openmpi ;;
        *) echo "mpirun.sh: MPI_FLAVOR must be mpich or openmpi, got '$MPI_FLAVOR'" >&2; exit 2 ;;
    esac
else
    case "$("$MPIEXEC" --version 2>&1)" in
        *"Open MPI"*|*OpenRTE*|*"Open RTE"*|*PRRTE*) MPI_FLAVOR=openmpi ;;
        *) MPI_FLAVOR=mpich ;;  # HYDRA: MPICH, Intel MPI, MVAPICH
    esac
fi
# As torchrun does: one intra-op thread per rank unless told otherwise (spinning OpenMP threads of
# oversubscribed ranks slow everything down).
if [[ "$NPROC" -gt 1 ]]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi

if [[ "${DIST_CLIP_MPI4PY:-1}" == 0 ]] || ! "$PYTHON" -c "import mpi4py" 2>/dev/null; then
    # No mpi4py: the ranks read their rank from the launcher's environment and need the rendezvous given.
    FIRST_HOST=${HOSTS:-}; FIRST_HOST=${FIRST_HOST%%,*}
    if [[ -z "$FIRST_HOST" && -n "${HOSTFILE:-}" ]]; then
        # The host file's first host (MPICH "host:n", Open MPI "host slots=n"; comments and blank lines skipped):
        # without it every other node waited for a rendezvous at its own 127.0.0.1.
        FIRST_HOST=$(sed -e 's/#.*//' "$HOSTFILE" | awk 'NF { print $1; exit }')
        FIRST_HOST=${FIRST_HOST%%:*}
    fi
    # A MASTER_PORT given that a process of this machine listens on, where rank 0 runs here (no HOSTS or HOSTFILE,
    # or this machine first): rank 0 could not host the rendezvous store and exited 1 with one "error:" line, and
    # the other ranks waited for it for the 30-minute start-up wait (mpiexec ends no rank for another's exit status,
    # and without mpi4py no rank can abort the job). Refused here: one line, exit status 2.
    HERE=$(hostname 2>/dev/null || true)
    if [[ -n "${MASTER_PORT:-}" ]] && [[ -z "$FIRST_HOST" || "$FIRST_HOST" == localhost || "$FIRST_HOST" == 127.0.0.1 \
            || ( -n "$HERE" && ( "$FIRST_HOST" == "$HERE" || "$FIRST_HOST" == "${HERE%%.*}" ) ) ]] \
            && port_in_use "$MASTER_PORT"; then
        echo "mpirun.sh: MASTER_PORT $MASTER_PORT is in use on this machine, where rank 0 hosts the rendezvous;" \
             "give a free MASTER_PORT, or leave it unset (a free one is picked)" >&2
        exit 2
    fi
    export MASTER_ADDR=${MASTER_ADDR:-${FIRST_HOST:-127.0.0.1}}
    export MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}
fi

ARGS=(-n "$TOTAL")
if [[ "$MPI_FLAVOR" == openmpi ]]; then
    if [[ $EUID -eq 0 ]]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
    [[ -n "${HOSTS:-}" ]] && ARGS+=(--host "$(echo "$HOSTS" | sed "s/\([^,]*\)/\1:$NPROC/g")")
    [[ -n "${HOSTFILE:-}" ]] && ARGS+=(--hostfile "$HOSTFILE")
    ARGS+=(--map-by "ppr:$NPROC:node" --bind-to none)
    # Every DIST_CLIP_* variable (Open MPI gives a remote rank only those named): DIST_CLIP_NATIVE,
    # DIST_CLIP_CACHE_DIR and DIST_CLIP_ALLOW_UNTESTED_DEEPSPEED reached node 0's ranks alone.
    for v in PATH LD_LIBRARY_PATH PYTHONPATH DS_ACCELERATOR OMP_NUM_THREADS MASTER_ADDR MASTER_PORT \
             GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME $(compgen -e | grep '^DIST_CLIP_' || true); do
        [[ -n "${!v:-}" ]] && ARGS+=(-x "$v")
    done
else
    [[ -n "${HOSTS:-}" ]] && ARGS+=(-hosts "$HOSTS")
    [[ -n "${HOSTFILE:-}" ]] && ARGS+=(-f "$HOSTFILE")
    ARGS+=(-ppn "$NPROC")
fi
set -x
exec "$MPIEXEC" "${ARGS[@]}" ${MPI_ARGS:-} "$PYTHON" -m dist_clip "$@"
