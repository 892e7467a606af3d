#!/usr/bin/env bash
# The GPU measurements (issues 6 and 7) as one prepared script for a lent GPU machine; it ends
# within 5 minutes (each part has its own time limit; together 300 s). Needs python3 with a CUDA build of torch,
# numpy, Pillow, safetensors, PyYAML, tqdm and matplotlib; vaelab is read from src/.
#
#   bash benchmarks/gpu.sh [RESULTS_DIR]    (default: $OUT where set, else benchmarks/results)
#
# Writes RESULTS_DIR/gpu.log (everything printed), throughput_gpu.json (CelebA-64 network, with
# torch.compile at batch 144), throughput_gpu_mnist.json and epoch_gpu.jsonl (one line per epoch:
# fp32, bf16 and fp16, each with its validation ELBO, to compare what precision does to it; then
# two epochs with torch.compile, whose second epoch shows the speed once compiled).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-benchmarks/results}}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
PY=${PYTHON:-python3}
LOG="$RESULTS/gpu.log"
rm -f "$RESULTS/epoch_gpu.jsonl"
run() {  # run LIMIT_SECONDS COMMAND...: a part that may fail or time out without stopping the rest
    local limit=$1; shift
    echo "== $* (limit ${limit} s)" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "== exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$LOG"
}
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
    nproc
} 2>&1 | tee "$LOG"
# A small epoch first: fails fast if something is wrong.
run 20 "$PY" benchmarks/epoch.py --device cuda --train-images 2880 --precision bf16
run 40 "$PY" benchmarks/throughput.py --device cuda --nets mnist --batches 144 --min-seconds 0.2 \
    --out "$RESULTS/throughput_gpu_mnist.json"
run 100 "$PY" benchmarks/throughput.py --device cuda --nets celeba64 --min-seconds 0.3 --compile \
    --out "$RESULTS/throughput_gpu.json"
for part in "30 --precision fp32" "30 --precision bf16 --channels-last" \
    "30 --precision fp16 --channels-last" \
    "50 --precision bf16 --channels-last --compile --epochs 2"; do
    # shellcheck disable=SC2086
    run ${part%% *} "$PY" benchmarks/epoch.py --device cuda ${part#* } \
        --out "$RESULTS/epoch_gpu.jsonl"
done
echo "== epochs (162,770 train + 19,867 val images, batch 144):" | tee -a "$LOG"
cat "$RESULTS/epoch_gpu.jsonl" 2>/dev/null | tee -a "$LOG"
