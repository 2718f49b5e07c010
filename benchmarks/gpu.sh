#!/usr/bin/env bash
# The GPU run of docs/performance.md in one short window (about 8 minutes on one GPU of >= 80 GiB, no downloads):
# the correctness checks (benchmarks/gpu_checks.py: backends, decode step vs a plain cache of the kept entries, CPU
# vs CUDA, compiled = eager), then `kvcake bench --compile` on the llama-3-8b shape (random bfloat16 weights, sdpa)
# at 32K and 128K: every case eagerly and with CUDA graphs (torch.compile mode "reduce-overhead"), the full cache in
# transformers' DynamicCache (eager) and StaticCache (compiled), CAKE and SnapKV at 1024 tokens per layer, each beside
# a plain static cache of the size it keeps; last, benchmarks/decode_profile.py --parts at 8K (where an eager CAKE
# step's time goes, operator by operator and part by part, against a plain cache of the kept size). Every step has its
# own timeout, so one failure does not stop the rest.
#
#     bash benchmarks/gpu.sh OUT_DIR                 # on the GPU machine, from the repository root
#     DRY_RUN=1 bash benchmarks/gpu.sh OUT_DIR       # the same steps on the CPU with a tiny shape (tests the script)
#
# Writes OUT_DIR/log.txt, OUT_DIR/checks.json, OUT_DIR/compile-<length>.json (kvcake bench's results.json) and
# OUT_DIR/decode_profile.txt;
# `python benchmarks/merge_results.py OUT_DIR/compile-*.json --out DIR` makes the tables and plots.
set -u
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "${DRY_RUN:-0}" = 1 ]; then
    device=cpu model=tiny dtype=float32 budget=40 short=96 long=160 checks=400 first=300 second=300 profiled=96
else
    device=cuda model=llama-3-8b dtype=bfloat16 budget=1024 short=32768 long=131072 checks=90 first=150 second=210
    profiled=8192
fi
bench() {  # bench LENGTH METHODS SECONDS
    timeout "$3" python -m kvcake.cli bench --model "$model" --device "$device" --dtype "$dtype" --attn sdpa \
        --lengths "$1" --methods "$2" --budget "$budget" --decode-tokens 32 --repeats 1 --warmup 0 --compile \
        --out "/tmp/kvcake-compile-$1" \
        && cp "/tmp/kvcake-compile-$1/results.json" "$out/compile-$1.json"
}
{
    if [ "$device" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
    python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    timeout "$checks" python benchmarks/gpu_checks.py --device "$device" --out "$out/checks.json"
    bench "$short" full,cake,snapkv "$first"
    bench "$long" full,cake "$second"
    timeout 120 python benchmarks/decode_profile.py --model "$model" --device "$device" --length "$profiled" \
        --budget "$budget" --rows 25 --parts > "$out/decode_profile.txt"
} 2>&1 | tee "$out/log.txt"
