#!/usr/bin/env bash
# The GPU checks and benchmark behind docs/bench/gpu-llama-3-8b (see docs/performance.md). Run from the repository
# root on a machine with one CUDA GPU of at least 80 GiB, torch and transformers installed (no downloads needed):
#
#     bash benchmarks/gpu.sh OUT_DIR
#
# Writes OUT_DIR/log.txt, OUT_DIR/checks.json (benchmarks/gpu_checks.py) and one results JSON per benchmark run
# (sdpa-<length>.json: sdpa with PyTorch's choice of kernel; flash-<length>.json: sdpa restricted to PyTorch's
# FlashAttention-2 kernel). `python benchmarks/merge_results.py OUT_DIR/sdpa-*.json --out DIR` turns the JSON files
# into the tables and plots. Each run is bounded by a timeout so that one failure does not stop the others.
set -u
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
bench() {  # bench NAME LENGTH [extra kvcake bench options]
    local name=$1 length=$2
    shift 2
    timeout 300 python -m kvcake.cli bench --model llama-3-8b --device cuda --dtype bfloat16 --attn sdpa \
        --lengths "$length" --methods full,cake --budget 1024 --decode-tokens 32 --repeats 1 --warmup 0 \
        --out "/tmp/kvcake-$name-$length" "$@" \
        && cp "/tmp/kvcake-$name-$length/results.json" "$out/$name-$length.json"
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    timeout 120 python benchmarks/gpu_checks.py --out "$out/checks.json"
    bench sdpa 32768
    bench sdpa 131072
    bench flash 131072 --sdpa-backend flash
    bench sdpa 65536
    bench flash 32768 --sdpa-backend flash
} 2>&1 | grep --line-buffered -v "kvcake bench:" | tee "$out/log.txt"
