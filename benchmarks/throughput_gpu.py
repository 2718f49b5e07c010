"""The transformers rows of the throughput bench on one GPU, in one short window (no downloads, no tokenizer).

    python benchmarks/throughput_gpu.py --out DIR                    # on the GPU machine, from the repository root
    python benchmarks/throughput_gpu.py --dry-run --out DIR          # the same on the CPU at a tiny shape

Llama-3-8B-shaped random bfloat16 weights (speed does not depend on the values), random 32K-token prompts, a KV
pool sized for ``--pool`` full-cache requests: the full cache in static batches as large as the pool holds, then
each kvcake method in batches as large as its compressed cache allows (kvcake.bench.throughput.hf). Every request
generates exactly ``--output`` tokens. Each setting has its own deadline (``--seconds``), checked between batches,
so the whole run stays within the window; requests of a setting cut short are marked "not started". Writes
DIR/results.json with the same figures as ``kvcake throughput`` (decoding-phase and end-to-end tokens/s, requests at
once, KV memory read from the cache, prefill share of the wall time).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvcake.bench.shapes import random_model
from kvcake.bench.throughput import hf
from kvcake.bench.throughput.memory import bytes_per_token, pool_bytes
from kvcake.bench.throughput.record import summarise
from kvcake.bench.throughput.settings import Setting
from kvcake.bench.throughput.workload import Request


def random_requests(n: int, length: int, vocab: int, seed: int = 0) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    return [Request(index=i, ids=torch.randint(0, vocab, (length,), generator=g).tolist(), answer="")
            for i in range(n)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("throughput-gpu"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, short prompts (tests the script)")
    parser.add_argument("--settings", default="transformers:full,transformers:cake@0.1,transformers:snapkv@0.1")
    parser.add_argument("--requests", type=int, default=None, help="default 8 (dry run 6)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 32768; dry run 200)")
    parser.add_argument("--output", type=int, default=None, help="tokens per answer (default 128; dry run 6)")
    parser.add_argument("--pool", type=float, default=2.0, help="KV pool in full-cache requests")
    parser.add_argument("--seconds", type=float, default=None, help="deadline per setting (default 140; dry 60)")
    args = parser.parse_args(argv)
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    shape, dtype = ("tiny", torch.float32) if dry else ("llama-3-8b", torch.bfloat16)
    n = args.requests or (6 if dry else 8)
    length = args.prompt or (200 if dry else 32768)
    output = args.output or (6 if dry else 128)
    seconds = args.seconds or (60.0 if dry else 140.0)
    model = random_model(shape, dtype, "sdpa", device, max_positions=length + output + 8)
    per_token = bytes_per_token(model.config, torch.empty((), dtype=dtype).element_size())
    pool = pool_bytes(args.pool, length + output, per_token)
    requests = random_requests(n, length, model.config.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    cases = []
    for text in args.settings.split(","):
        setting = Setting.parse(text)
        records, clock, info = hf.serve(model, None, setting, requests, output, pool, per_token,
                                        deadline=time.perf_counter() + seconds)
        summary = summarise(records, clock, pool)
        cases.append({"setting": setting.to_dict(), "pool_bytes": pool, "prompt_tokens": length, "output": output,
                      "info": info, "summary": summary})
        print(json.dumps({"setting": setting.label, **{k: summary[k] for k in (
            "served", "decode_tokens_per_s", "output_tokens_per_s", "max_running", "kv_peak_bytes",
            "prefill_share")}}), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    result = {"shape": shape, "dtype": str(dtype), "device": torch.cuda.get_device_name() if device == "cuda" else
              "cpu", "torch": torch.__version__, "requests": n, "cases": cases}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
