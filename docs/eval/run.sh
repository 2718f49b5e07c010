#!/usr/bin/env bash
# Regenerates docs/eval: the harness on the embedded models, CPU (2 cores, one torch thread per run), greedy,
# answers as long as each task allows. Every command resumes where it stopped; rerunning a finished one only
# rewrites the metrics. About 2 hours on 2 cores (SmolLM2 and Qwen in parallel): see docs/eval/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
METHODS=full,cake,snapkv,pyramidkv,h2o,tova,streamingllm,ada-snapkv
COMMON="--methods $METHODS --ratios 0.25,0.1,0.05 --threads 1 --no-progress"
R=docs/eval/results

smollm2() {
  # query-aware (the paper's setting), every method at 25%, 10% and 5% of a ~1K-token prompt
  kvcake eval --models smollm2-135m-instruct --tasks needlebench --lengths 1000 --depths 0,0.25,0.5,0.75,1 \
    $COMMON --out $R/needlebench
  kvcake eval --models smollm2-135m-instruct --tasks ruler --lengths 1000 --depths 0.5 --per-cell 2 \
    $COMMON --out $R/ruler
  # the same single needles, query-agnostic: the context is compressed before the question is seen
  kvcake eval --models smollm2-135m-instruct --tasks needlebench/single --lengths 1000 --depths 0,0.25,0.5,0.75,1 \
    --modes query-agnostic --methods full,cake,snapkv,pyramidkv --ratios 0.25,0.1 --threads 1 --no-progress \
    --out $R/needlebench
  # LongBench multi_news (the shared file), first 3 samples cut to 2K tokens, 128-token summaries
  kvcake eval --models smollm2-135m-instruct --tasks longbench/multi_news --data ../shared/data/longbench --limit 3 \
    --methods full,cake,snapkv,pyramidkv,streamingllm --ratios 0.25,0.1 --max-length 2048 --max-new-tokens 128 \
    --threads 1 --no-progress --out $R/longbench
  # depth x length heatmap of the single needle at 10%
  kvcake eval --models smollm2-135m-instruct --tasks needlebench/single --lengths 500,1000,2000 --depths 0,0.5,1 \
    --methods full,cake,snapkv --ratios 0.1 --threads 1 --no-progress --out $R/depth-length
}

qwen() {
  kvcake eval --models qwen2.5-coder-0.5b-instruct --tasks needlebench --lengths 2000 --depths 0,0.5,1 \
    $COMMON --out $R/needlebench
  kvcake eval --models qwen2.5-coder-0.5b-instruct --tasks ruler --lengths 2000 --depths 0.5 --per-cell 1 \
    $COMMON --out $R/ruler
}

report() {
  kvcake report $R/needlebench $R/ruler $R/longbench --out docs/eval
  kvcake report $R/depth-length --out docs/eval/depth-length
}

case "${1:-all}" in
  smollm2) smollm2 ;;
  qwen) qwen ;;
  report) ;;
  all) smollm2; qwen ;;
  *) echo "usage: $0 [all|smollm2|qwen|report]" >&2; exit 2 ;;
esac
report
