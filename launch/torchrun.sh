#!/usr/bin/env bash
# Launch `dist-clip` (python -m dist_clip) with torchrun; every argument is passed through to dist-clip.
#
#   launch/torchrun.sh train --config configs/fsdp2.yaml                 # one node, NPROC ranks (--standalone)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh train ...  # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh train ...  # on node 1 (c10d rendezvous)
#
# Environment overrides:
#   NPROC        ranks per node (default 2)
#   NNODES       nodes (default 1: --standalone, a free port picked by torchrun)
#   NODE_RANK    this node's rank, 0..NNODES-1 (default 0); node 0 hosts the rendezvous store
#   MASTER_ADDR  address of node 0 (default 127.0.0.1)
#   MASTER_PORT  rendezvous port on node 0 (default 29500)
#   RDZV_ID      rendezvous id shared by the nodes of one job (default dist-clip)
#   PYTHON       interpreter (default: the repository's .venv, else python3 on PATH)
#   TORCHRUN_ARGS  extra torchrun options, e.g. "--max-restarts 1"
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"  # PYTHON, ROOT, PATH
NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-dist-clip}
check_count NPROC 1
check_count NNODES 1
if [[ "$NNODES" != 1 ]]; then check_count NODE_RANK 0 "$NNODES"; check_count MASTER_PORT 1 65536; fi

# Arguments and config checked in one process first: torchrun reports a rank's exit status 2 (bad config or
# arguments) as its own 1 with a traceback; this way a bad config is one line and exit status 2. Status 3: the
# arguments asked for help, which the check printed; nothing to run (the ranks printed it a second time). On one
# node the check is told the number of ranks (wrapper: none or an hsdp mesh of another size on NPROC ranks), unless
# TORCHRUN_ARGS sets it itself; on several, each node's NPROC may differ and the ranks check it.
CHECK=(--validate-only)
if [[ "$NNODES" == 1 && "${TORCHRUN_ARGS:-}" != *nproc* && "${TORCHRUN_ARGS:-}" != *nnodes* ]]; then
    CHECK+=(--validate-world-size "$NPROC")
fi
STATUS=0
"$PYTHON" -m dist_clip "$@" "${CHECK[@]}" || STATUS=$?
if [[ "$STATUS" == 3 ]]; then exit 0; fi
if [[ "$STATUS" != 0 ]]; then exit "$STATUS"; fi
# Node 0 of several hosts the rendezvous store on MASTER_PORT: a port that a process of this machine listens on was
# torchrun's RendezvousConnectionError traceback (EADDRINUSE) and exit 1, while the other nodes waited. (Checked by
# connecting on loopback; where bash cannot open /dev/tcp, nothing is found and torchrun says it.)
if [[ "$NNODES" != 1 && "$NODE_RANK" == 0 ]] && port_in_use "$MASTER_PORT"; then
    echo "$(basename "$0"): MASTER_PORT $MASTER_PORT is in use on this machine, where node 0 hosts the rendezvous;" \
         "give every node a free MASTER_PORT" >&2
    exit 2
fi

if [[ "$NNODES" == 1 ]]; then
    # One node: torchrun's own rendezvous on a free local port.
    set -x
    exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NPROC" \
        ${TORCHRUN_ARGS:-} -m dist_clip "$@"
fi

# Several nodes: c10d rendezvous hosted by node 0 at MASTER_ADDR:MASTER_PORT. is_host tells node 0 to host
# the store even when every node resolves MASTER_ADDR to itself (all agents on one machine, as in the tests).
IS_HOST=$([[ "$NODE_RANK" == 0 ]] && echo true || echo false)
set -x
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
    --rdzv-conf "is_host=$IS_HOST" ${TORCHRUN_ARGS:-} -m dist_clip "$@"
