#!/usr/bin/env bash
# One short run on a GPU machine: the gpu-marked tests, the CUDA benchmark, and the training job on one GPU
# (nccl), each under its own time limit; every log goes to $OUT (default ./gpu_out) and a summary is printed last.
# Uses the machine's own python3 (no install: such machines may reach no package registry):
#     OUT=/tmp/gpu bash bench/gpu_lease.sh
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3}
summary=()
stage() {  # stage NAME SECONDS command...: run it under a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    summary+=("$name: exit $rc in $(( $(date +%s) - start )) s")
    tail -n "${TAIL:-25}" "$OUT/$name.log"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  "$PYTHON" -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda,
torch.cuda.get_device_name())'; } >"$OUT/machine.log" 2>&1
cat "$OUT/machine.log"
stage gpu_tests "${TESTS_S:-200}" "$PYTHON" -m pytest tests/test_gpu.py -q -p no:cacheprovider -o addopts= \
    --timeout 120 -rfE --junitxml="$OUT/gpu_tests.xml"
TAIL=200 stage bench_gpu "${BENCH_S:-200}" "$PYTHON" -m bench gpu
for cfg in ${CONFIGS:-fsdp2 fsdp2-bf16}; do
    stage "train_$cfg" "${TRAIN_S:-60}" env NPROC=1 bash launch/torchrun.sh train --config "configs/$cfg.yaml"
done
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.log"
