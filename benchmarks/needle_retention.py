"""Single-needle retrieval of the embedded model under CAKE at several cache ratios.

    python benchmarks/needle_retention.py --tokens 2000 --depths 10 --ratios 0.5 0.25 0.1 [--prefill-only]
    python benchmarks/needle_retention.py --methods cake snapkv pyramidkv h2o --ratios 0.5 0.25

Prints one line per (method, ratio, depth) and the retrieval rate of each ("full" = no eviction).
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm

from kvcake import models
from kvcake.methods.registry import build
from kvcake.needle import needle_case
from kvcake.pipeline import answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--depths", type=int, default=10)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--methods", nargs="+", default=["cake"], help="method names (see `kvcake methods`)")
    parser.add_argument("--prefill-only", action="store_true", help="no decode-time eviction")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer = models.load(args.model)
    depths = [i / (args.depths - 1) for i in range(args.depths)] if args.depths > 1 else [0.5]
    settings = [("full", None)]
    for name in args.methods:
        for r in args.ratios:
            method = build(name, ratio=r)
            if args.prefill_only and method.decode_eviction:
                method = method.with_options(decode_eviction=False)
            settings.append((f"{name}@{r:g}", method))
    results = {}
    for name, method in settings:
        hits = 0
        rows = []
        for d, depth in enumerate(tqdm(depths, desc=name)):
            case = needle_case(tokenizer, args.tokens, depth, seed=d)
            out = answer(model, tokenizer, case.context, case.question, method, max_new_tokens=16)
            hit = case.answer in out.answer
            hits += hit
            rows.append({"depth": round(depth, 3), "answer": out.answer, "expected": case.answer, "hit": hit,
                         "prompt_tokens": out.prompt_tokens, "kv_bytes": out.kv_bytes,
                         "kv_bytes_full": out.kv_bytes_full})
            print(f"{name:10s} depth {depth:.2f}: {'HIT ' if hit else 'miss'} {out.answer!r} (expected {case.answer})",
                  flush=True)
        results[name] = {"rate": hits / len(depths), "cases": rows}
        print(f"{name}: retrieved {hits}/{len(depths)}", flush=True)
    print("summary: " + ", ".join(f"{k} {v['rate']:.0%}" for k, v in results.items()))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
