#!/usr/bin/env bash
# The evaluation of docs/eval/v2: enough samples to read, with 95% intervals. CPU (2 cores), float32, sdpa, greedy,
# query-aware (the paper's setting), answers as long as each task allows. Every command resumes where it stopped
# (rerun this script after an interruption); results are committed as they land.
#
#     bash docs/eval/v2/run.sh [smollm2|calibrate|ablations|qwen|qwen-ablations|qwen-vt|report|all]
#     SHARDS=2 bash docs/eval/v2/run.sh qwen     # Qwen's runs as two shards, one per core (torchrun)
#
# Tasks: the single needle, NeedleBench multi-retrieval and RULER niah_multikey, niah_multivalue, niah_multiquery
# (~2K-token prompts, 5 depths x 10 repetitions = 50 samples each) and RULER vt (50 samples, full cache only).
# Answers are capped at 64 tokens (--max-new-tokens): the answers these tasks ask for take 20-45 tokens, and rows
# that run on past that repeat themselves (docs/eval/v2/README.md). R=folder puts the results elsewhere.
set -euo pipefail
cd "$(dirname "$0")/../../.."
R=${R:-docs/eval/v2/results}
TASKS=needlebench/single,needlebench/multi_retrieval,ruler/niah_multikey,ruler/niah_multivalue,ruler/niah_multiquery
METHODS=full,cake,snapkv,pyramidkv,ada-snapkv,cake-knorm,cake-expected-attention
COMMON="--lengths 2000 --threads ${THREADS:-1} --no-progress --seed 1 --batch-size ${BATCH:-8} --max-new-tokens 64"

kv_eval() {  # kvcake eval, as SHARDS processes side by side (one core each) when SHARDS > 1
  if [ "${SHARDS:-1}" -gt 1 ]; then torchrun --standalone --nproc-per-node "$SHARDS" -m kvcake.cli eval "$@"
  else kvcake eval "$@"; fi
}
qwen() {  # Qwen2.5-Coder-0.5B-Instruct at 10% and 5% kept, the five tasks in one run: it answers in rounds (one
  # sample of every task and depth, then the next), so a run stopped part-way holds a balanced part of each
  kv_eval --models qwen2.5-coder-0.5b-instruct --tasks $TASKS --depths 0,0.25,0.5,0.75,1 --per-cell 10 \
    --methods $METHODS --ratios 0.1,0.05 $COMMON --out $R/qwen
}
qwen_ablations() {  # on Qwen's grid samples: CAKE's allocation with SnapKV's scorer, CAKE's indicator split
  # uniformly, and max-pooled; paired against CAKE they split its per-task differences from SnapKV's into the
  # allocation's part and the indicator's
  kv_eval --models qwen2.5-coder-0.5b-instruct --tasks $TASKS --depths 0,0.25,0.5,0.75,1 --per-cell 10 \
    --methods cake-snapkv,uniform-cake,cake-max-pooling --ratios 0.1,0.05 $COMMON --out $R/qwen-ablations
}
# RULER vt, full cache only: a floor check. Both models score near 0 on it under the full cache (they copy the
# one-shot example's variable names), so it cannot rank methods; VT_METHODS=$METHODS runs the grid anyway.
VT_METHODS=${VT_METHODS:-full}
qwen_vt() {
  kv_eval --models qwen2.5-coder-0.5b-instruct --tasks ruler/vt --depths 0.5 --per-cell 50 \
    --methods $VT_METHODS --ratios 0.1,0.05 $COMMON --out $R/qwen-vt
}
smollm2() {  # SmolLM2-135M-Instruct at 25% kept
  for task in ${TASKS//,/ }; do
    kvcake eval --models smollm2-135m-instruct --tasks "$task" --depths 0,0.25,0.5,0.75,1 --per-cell 10 \
      --methods $METHODS --ratios 0.25 $COMMON --out $R/smollm2
  done
  kvcake eval --models smollm2-135m-instruct --tasks ruler/vt --depths 0.5 --per-cell 50 \
    --methods $VT_METHODS --ratios 0.25 $COMMON --out $R/smollm2-vt
}
calibrate() {  # CAKE's temperatures for SmolLM2 at 25% kept, on calibration prompts (seed calibration-0)
  kvcake calibrate --model smollm2-135m-instruct --ratios 0.25 --samples 12 \
    --tasks needlebench/single,ruler/niah_multikey --lengths 2000 --depths 0.25,0.5,0.75 --grid 0.4,0.7,1,1.5,2.3 \
    --max-new-tokens 64 --threads ${THREADS:-1} --out docs/eval/v2/calibration/tau-smollm2.json
}
ablations() {  # what the allocation, the indicator and its pooling each contribute; the authors' decoding; the
  # calibrated temperatures; every method under both protocols (the chat tail compressed or kept). The whole
  # protocol's full, cake, snapkv and pyramidkv rows are in $R/smollm2 (the same samples).
  local tau
  tau=$(python -c "import json; t = json.load(open('docs/eval/v2/calibration/tau-smollm2.json'))['ratios']['0.25']; \
print(f'--param cake.tau1={t[0]:g} --param cake.tau2={t[1]:g}')")
  kvcake eval --models smollm2-135m-instruct --tasks needlebench/single --depths 0,0.25,0.5,0.75,1 --per-cell 10 \
    --methods cake-snapkv,uniform-cake,cake-max-pooling,cake-authors-decoding,h2o,tova,cake $tau --ratios 0.25 \
    $COMMON --out $R/smollm2-ablations
  kvcake eval --models smollm2-135m-instruct --tasks needlebench/single --depths 0,0.25,0.5,0.75,1 --per-cell 10 \
    --methods full,cake,snapkv,pyramidkv,ada-snapkv,h2o,tova,cake-authors-decoding --ratios 0.25 --protocols tail \
    $COMMON --out $R/smollm2-tail
  # H2O and TOVA evicting at prefill only (kvpress's presses do not evict while decoding): protocol or policy?
  kvcake eval --models smollm2-135m-instruct --tasks needlebench/single --depths 0,0.25,0.5,0.75,1 --per-cell 10 \
    --methods h2o,tova --param h2o.decode_eviction=false --param tova.decode_eviction=false --ratios 0.25 \
    --protocols whole,tail $COMMON --out $R/smollm2-ablations
  # the newer scorers under a uniform split: whether their deficit is the scorer or CAKE's allocation
  kvcake eval --models smollm2-135m-instruct --tasks needlebench/single --depths 0,0.25,0.5,0.75,1 --per-cell 10 \
    --methods knorm,expected-attention --ratios 0.25 $COMMON --out $R/smollm2-ablations
}
report() {  # the reports of whatever has landed (a folder not written yet is left out)
  have() { for f in "$@"; do if [ -d "$f" ]; then echo "$f"; fi; done; }
  if [ -d $R/qwen ]; then kvcake report $(have $R/qwen $R/qwen-vt) --out docs/eval/v2/qwen; fi
  if [ -d $R/smollm2 ]; then kvcake report $(have $R/smollm2 $R/smollm2-vt) --out docs/eval/v2/smollm2; fi
  if [ -d $R/qwen-ablations ]; then
    kvcake report $R/qwen $R/qwen-ablations --out docs/eval/v2/qwen-ablations --reference cake
  fi
  if [ -d $R/smollm2-ablations ]; then
    kvcake report $(have $R/smollm2 $R/smollm2-ablations $R/smollm2-tail) --out docs/eval/v2/ablations --reference cake
  fi
}
case "${1:-all}" in
  qwen) qwen ;;
  qwen-ablations) qwen_ablations ;;
  qwen-vt) qwen_vt ;;
  smollm2) smollm2 ;;
  calibrate) calibrate ;;
  ablations) ablations ;;
  report) report ;;
  all) smollm2; calibrate; ablations; qwen; qwen_ablations; qwen_vt; report ;;
  *) echo "usage: $0 [qwen|qwen-ablations|qwen-vt|smollm2|calibrate|ablations|report|all]" >&2; exit 2 ;;
esac
