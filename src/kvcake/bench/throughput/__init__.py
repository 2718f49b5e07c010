"""Throughput at a fixed KV memory budget: many requests served by each engine × method setting.

A workload (:mod:`~kvcake.bench.throughput.workload`) of needle prompts with a fixed answer length is served under
each setting (:mod:`~kvcake.bench.throughput.settings`): transformers with the full cache or a kvcake method in static
batches as large as the pool allows (:mod:`~kvcake.bench.throughput.hf`), vLLM alone, with its own sliding window or
with kvcake's plugin, and NVIDIA kvpress's pipeline, the last two in their own environments
(:mod:`~kvcake.bench.throughput.external`). Per setting: requests and output tokens per second (end to end and in
the decoding phase alone), the most requests running at once, time to first token and per output token, the KV
memory each engine reports, refusals and answers found (:mod:`~kvcake.bench.throughput.record`).
:func:`~kvcake.bench.throughput.run.run` runs a plan, resumably, and writes results.{json,csv,md} and plots.
"""

from kvcake.bench.throughput.settings import Setting, parse_settings
from kvcake.bench.throughput.workload import Request, Workload

__all__ = ["Request", "Setting", "Workload", "parse_settings"]
