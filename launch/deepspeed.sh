#!/usr/bin/env bash
# Launch `dist-clip` (python -m dist_clip) with the DeepSpeed launcher; every argument is passed through.
# Any config runs under it (the launcher only starts processes); the zero1/zero2/zero3 configs are the point.
#
#   launch/deepspeed.sh train --config configs/zero2.yaml                 # one node, NPROC ranks
#   HOSTFILE=hosts NNODES=2 launch/deepspeed.sh train --config ...        # from node 0; pdsh/ssh to the others
#   HOSTFILE=hosts NNODES=2 NO_SSH=1 NODE_RANK=<i> MASTER_ADDR=<node 0> launch/deepspeed.sh train ...
#                                                                         # on every node, no ssh
# A host file lists one node per line, node 0 first: "node0 slots=2".
#
# Environment overrides:
#   NPROC        ranks per node (default 2). Passed as --num_gpus, which the launcher also needs on the CPU
#                (without it a CPU node gets one rank per NUMA node).
#   NNODES       nodes (default 1)
#   HOSTFILE     the host file (needed for NNODES > 1)
#   NO_SSH       1: this node starts only its own ranks (--no_ssh), NODE_RANK says which node it is
#   NODE_RANK    with NO_SSH=1, this node's index in HOSTFILE
#   MASTER_ADDR  address of node 0 (several nodes; default: DeepSpeed asks node 0 over ssh)
#   MASTER_PORT  default: a free port on one node, 29500 on several
#   DS_LAUNCHER  multi-node backend: pdsh (default), openmpi, impi, mvapich. DeepSpeed 0.19.8's mpich and slurm
#                runners cannot start a module (refused, exit 2): launch/mpirun.sh runs MPICH; under slurm, NO_SSH=1
#                on every node
#   DS_ARGS      extra launcher options, e.g. "--bind_cores_to_rank"
#   PYTHON       interpreter (default: the repository's .venv, else python3 on PATH)
# DS_ACCELERATOR is set to cpu where there is no nvidia-smi (DeepSpeed's CPU accelerator then uses gloo).
# From node 0 (no NO_SSH) the other nodes get PATH, LD_LIBRARY_PATH, DS_ACCELERATOR, OMP_NUM_THREADS,
# GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME and every DIST_CLIP_* variable through an environment file of the run.
# SIGINT/SIGTERM to this script end every rank (see the end); exit status: the runner's, or 128 + the signal.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"  # PYTHON, ROOT, PATH
NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
check_count NPROC 1
check_count NNODES 1
if [[ -n "${MASTER_PORT:-}" ]]; then check_count MASTER_PORT 1 65536; fi
if [[ "${NO_SSH:-0}" == 1 && "$NNODES" != 1 ]]; then
    : "${NODE_RANK:?set NODE_RANK with NO_SSH=1}"
    check_count NODE_RANK 0 "$NNODES"
fi
# No NVIDIA driver: DeepSpeed's CPU accelerator (it would guess so too, after probing and a warning).
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; fi
if [[ "$NPROC" -gt 1 ]]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi

ARGS=(--num_gpus "$NPROC" --no_local_rank)
if [[ "$NNODES" == 1 && -z "${HOSTFILE:-}" ]]; then
    MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}
    # A host file that does not exist keeps a stray /job/hostfile (DeepSpeed's default) from making this a
    # multi-node run: the launcher then uses local resources only.
    ARGS+=(--hostfile "$(mktemp -u)" --master_port "$MASTER_PORT")
else
    : "${HOSTFILE:?set HOSTFILE to a host file listing the NNODES nodes (one 'host slots=N' per line)}"
    # DeepSpeed 0.19.8's mpich and slurm runners cannot start a module: mpich runs `python -u -m
    # .../launcher_helper.py`, slurm `python -u dist_clip` (no -m: every rank failed, "attempted relative import
    # with no known parent package" from the repository's folder, "can't open file" elsewhere). Refused before the
    # runner starts anything. (NO_SSH=1, or one node, starts this node's ranks itself, whatever DS_LAUNCHER says.)
    case "$(echo "${DS_LAUNCHER:-pdsh}" | tr '[:upper:]' '[:lower:]'),${NO_SSH:-0},$([[ "$NNODES" == 1 ]] && echo 1)" in
        mpich,0,|slurm,0,)
            echo "launch/deepspeed.sh: DS_LAUNCHER=${DS_LAUNCHER}: DeepSpeed's ${DS_LAUNCHER} runner cannot start" \
                 "a module (python -m dist_clip); run NO_SSH=1 NODE_RANK=<i> launch/deepspeed.sh on every node" \
                 "(e.g. from an sbatch script), or MPICH with launch/mpirun.sh" >&2
            exit 2 ;;
    esac
    ARGS+=(--hostfile "$HOSTFILE" --num_nodes "$NNODES" --master_port "${MASTER_PORT:-29500}" --launcher "${DS_LAUNCHER:-pdsh}")
    case "$(echo "${DS_LAUNCHER:-pdsh}" | tr '[:upper:]' '[:lower:]'),${NO_SSH:-0}" in
        # DeepSpeed's MPI runners refuse --num_gpus and --num_nodes ("openmpi backend does not support limiting
        # num nodes/gpus"): they start the host file's slots on every node of it. (NO_SSH=1 launches locally.)
        openmpi,0|impi,0|mvapich,0)
            KEEP=()
            for ((i = 0; i < ${#ARGS[@]}; i++)); do
                case "${ARGS[i]}" in --num_gpus|--num_nodes) i=$((i + 1)) ;; *) KEEP+=("${ARGS[i]}") ;; esac
            done
            ARGS=("${KEEP[@]}") ;;
    esac
    [[ -n "${MASTER_ADDR:-}" ]] && ARGS+=(--master_addr "$MASTER_ADDR")
    [[ "${NO_SSH:-0}" == 1 ]] && ARGS+=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK with NO_SSH=1}")
    if [[ "${NO_SSH:-0}" != 1 ]]; then
        # The runner starts the other nodes (pdsh, mpirun...) with only the variables it names (PYTHON*, NCCL* on
        # CUDA...) and those of its environment file: DS_ACCELERATOR, OMP_NUM_THREADS, GLOO_SOCKET_IFNAME and
        # DIST_CLIP_TIMEOUT_S reached node 0's ranks alone. They go into an environment file of this run, after
        # what the runner's own file(s) hold (DS_ENV_FILE, default .deepspeed_env in ~ and here), unless those set
        # them: the user's value for the other nodes wins (the runner takes a name's last line).
        ENV_NAME=${DS_ENV_FILE:-.deepspeed_env}
        ENV_FILE=$(mktemp)
        trap 'rm -f "$ENV_FILE"' EXIT
        if [[ "$ENV_NAME" == /* ]]; then SOURCES=("$ENV_NAME"); else SOURCES=(~/"$ENV_NAME" "./$ENV_NAME"); fi
        GIVEN=" "  # the names the user's file(s) set: their values are kept (the runner takes a name's last line)
        for f in "${SOURCES[@]}"; do
            if [[ -f "$f" ]]; then
                cat "$f" >> "$ENV_FILE"; [[ -z "$(tail -c 1 "$f")" ]] || echo >> "$ENV_FILE"
                GIVEN+="$(sed -n 's/^[[:space:]]*\([^=[:space:]]*\)[[:space:]]*=.*/\1/p' "$f" | tr '\n' ' ')"
            fi
        done
        # The runner strips a value and wraps it in double quotes unless it is all of [\w@%+=:,./-]: pdsh's remote
        # shell then expanded $ and ` in it, a " left every node's command a syntax error, and the MPI and slurm
        # launchers pass the quotes on as part of the value. Such a value is not passed on (said on stderr).
        LAUNCHER=$(echo "${DS_LAUNCHER:-pdsh}" | tr '[:upper:]' '[:lower:]')
        PLAIN='^[A-Za-z0-9_@%+=:,./-]*$'
        for v in PATH LD_LIBRARY_PATH DS_ACCELERATOR OMP_NUM_THREADS GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME \
                 $(compgen -e | grep '^DIST_CLIP_' || true); do
            [[ -n "${!v:-}" && "$GIVEN" != *" $v "* ]] || continue
            VALUE=${!v}
            if ! [[ "$VALUE" =~ $PLAIN ]] && [[ "$LAUNCHER" != pdsh || "$VALUE" == *[\"\$\`\\]* \
                    || "$VALUE" == *$'\n'* || "$VALUE" == [[:space:]]* || "$VALUE" == *[[:space:]] ]]; then
                if [[ "$LAUNCHER" == pdsh ]]; then CAN='no ", $, `, \, newline, or space at either end'
                else CAN='nothing but [A-Za-z0-9_@%+=:,./-]'; fi
                echo "launch/deepspeed.sh: $v is not passed to the nodes DeepSpeed's $LAUNCHER launcher starts, which" \
                     "cannot carry its value ($CAN): they run without it" >&2
                continue
            fi
            echo "$v=$VALUE" >> "$ENV_FILE"
        done
        export DS_ENV_FILE=$ENV_FILE
    fi
fi
# Not exec'd: the DeepSpeed launcher forwards SIGINT/SIGTERM to the ranks only for multi-node pdsh, so a signal to
# this script's PID (or the runner's) left every rank running. The runner gets a process group of its own (set -m;
# its ranks join it), a signal to this script goes to that whole group, and what is left of it after 10 s is
# killed. Exit status: the runner's, or 128 + the signal's number (129 HUP, 130 INT, 131 QUIT, 143 TERM). HUP
# (the terminal or ssh session closed) is forwarded too: the kernel sends it to the terminal's foreground group
# only, which the runner's group is not. For the same reason a rank cannot read the terminal (pdb stops it) and
# Ctrl-Z stops this script only.
RECEIVED="" SENT=""
for SIG in HUP INT QUIT TERM; do trap "RECEIVED=$SIG" "$SIG"; done
set -m -x
"$PYTHON" -m deepspeed.launcher.runner "${ARGS[@]}" ${DS_ARGS:-} --module dist_clip "$@" &
{ RUNNER=$!; set +m +x; } 2>/dev/null
while :; do
    STATUS=0
    # (a signal trapped before wait started is not seen by it: wait blocked until the runner ended by itself)
    [[ -n "$RECEIVED" ]] || { wait "$RUNNER" || STATUS=$?; }
    [[ -z "$RECEIVED" ]] && break  # the runner is done
    kill -s "$RECEIVED" -- "-$RUNNER" 2>/dev/null || true  # wait returned for the signal: forward it, wait again
    SENT=$RECEIVED RECEIVED=""
done
if [[ -n "$SENT" ]]; then
    for _ in $(seq 100); do kill -0 -- "-$RUNNER" 2>/dev/null || break; sleep 0.1; done
    kill -s KILL -- "-$RUNNER" 2>/dev/null || true
    case "$SENT" in HUP) exit 129 ;; INT) exit 130 ;; QUIT) exit 131 ;; *) exit 143 ;; esac
fi
exit "$STATUS"
