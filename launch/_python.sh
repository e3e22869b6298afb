# Sourced by the launch scripts: picks the interpreter and puts its bin/ first on PATH.
#   PYTHON  interpreter (default: the repository's .venv, else python3 on PATH)
# The interpreter's bin first on PATH: its ninja builds DeepSpeed's ops, and a different ninja on a later run
# would rebuild them (about 25 s) every time.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ "$PYTHON" == */* ]]; then export PATH="$(cd "$(dirname "$PYTHON")" && pwd):$PATH"; fi

# check_count NAME MIN [BOUND]: the variable NAME must be a decimal integer >= MIN (and < BOUND), else one line on
# stderr and exit 2, before anything starts: NPROC=0 was a bare AssertionError traceback from torchrun's agent,
# NNODES=0 another, mpiexec -n 0 died of signal 8 (status 136), NPROC=abc under mpirun.sh "abc: unbound variable",
# NODE_RANK=00 on node 0 was not "0", so that no node hosted torchrun's rendezvous and every node waited, and
# MASTER_PORT=abc or 70000 on several nodes was a ValueError traceback from torchrun.
check_count() {
    local name=$1 min=$2 bound=${3:-} value=${!1:-} want
    want="an integer >= $min"; [[ -z "$bound" ]] || want="an integer from $min to $((bound - 1))"
    if [[ ! "$value" =~ ^[0-9]{1,9}$ ]] || (( 10#$value < min )) || { [[ -n "$bound" ]] && (( 10#$value >= bound )); }
    then
        echo "$(basename "$0"): $name must be $want, got '$value'" >&2
        exit 2
    fi
    printf -v "$name" '%d' "$((10#$value))"  # 02 is 2
}

# port_in_use PORT: whether a process of this machine listens on TCP port PORT (a number), found by connecting on
# loopback; where bash cannot open /dev/tcp, nothing is found. A rendezvous host whose port is taken fails to
# start, and the ranks of other processes wait for it.
port_in_use() {
    [[ "$1" =~ ^[0-9]{1,5}$ ]] && timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"' "$1" 2>/dev/null
}
