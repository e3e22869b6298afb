# Sourced by the launch scripts: picks the interpreter and puts its bin/ first on PATH.
#   PYTHON  interpreter (default: the repository's .venv, else python3 on PATH)
# The interpreter's bin first on PATH: its ninja builds DeepSpeed's ops, and a different ninja on a later run
# would rebuild them (about 25 s) every time.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ "$PYTHON" == */* ]]; then export PATH="$(cd "$(dirname "$PYTHON")" && pwd):$PATH"; fi
