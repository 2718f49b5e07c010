#!/usr/bin/env bash
# The CPU measurements of compiled decoding in docs/performance.md (2 cores, 1 torch thread), one after the other:
#
#     bash benchmarks/cpu_compile.sh [small-2k|small-32k|smollm2|all]
set -eu
cd "$(dirname "$0")/.."
small_2k() {
    kvcake bench --model small --lengths 2048 --methods cake,snapkv --budget 1024 --decode-tokens 32 --repeats 5 \
        --warmup 1 --threads 1 --compile --out docs/bench/cpu-small-compile
}
small_32k() {
    kvcake bench --model small --lengths 32768 --methods full,cake --budget 1024 --decode-tokens 16 --repeats 1 \
        --warmup 0 --threads 1 --compile --out docs/bench/cpu-small-32k-compile
}
smollm2() {
    kvcake bench --model default --lengths 2048 --methods cake,h2o --budget 1024 --decode-tokens 16 --repeats 3 \
        --warmup 1 --threads 1 --compile --out docs/bench/cpu-smollm2-compile
}
case "${1:-all}" in
    small-2k) small_2k ;;
    small-32k) small_32k ;;
    smollm2) smollm2 ;;
    all) small_2k; smollm2; small_32k ;;
    *) echo "usage: $0 [small-2k|small-32k|smollm2|all]" >&2; exit 2 ;;
esac
