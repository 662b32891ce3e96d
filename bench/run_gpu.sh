#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one run of about ten minutes on one GPU:
#   bash bench/run_gpu.sh OUT_FOLDER
# Writes log.txt (everything printed), the benchmarks' JSON files and the GPU demo's score.txt to OUT_FOLDER.
# Each stage has its own time limit, so a slow stage costs its own figures only.
set -uo pipefail
out=$(realpath "${1:?usage: bash bench/run_gpu.sh OUT_FOLDER}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
log="$out/log.txt"
stage() {
    local limit=$1
    shift
    echo "== $(date -u +%H:%M:%S) $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "== exit ${PIPESTATUS[0]}" | tee -a "$log"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } 2>&1 | tee -a "$log"
stage 140 "$py" bench/bench_train_step.py --compile off --seconds 2 --json "$out/train_step.json"
stage 170 "$py" trainECAPAModel.py --demo --gpu_augment --n_cpu 8 --save_path /tmp/demo_gpu
cp /tmp/demo_gpu/score.txt "$out/demo_gpu_score.txt" 2>/dev/null
stage 150 "$py" bench/bench_loader.py --seconds 3 --json "$out/loader.json"
stage 60 "$py" bench/bench_eval.py --json "$out/eval.json"
stage 100 "$py" bench/bench_train_step.py --compile on --encoders ecapa-tdnn --batch_sizes 128 --amp bf16 \
    --seconds 2 --json "$out/train_step_compiled.json"
