"""vLLM + kvcake CAKE at tensor_parallel_size 1 and 2 on CPU: the kept entries per layer and the tokens of each.

Qwen2.5-Coder-0.5B (2 KV heads: one per rank at TP 2), a 900-token passage of the bundled sample text and a
question, CAKE at 20%, 16 greedy tokens. Each size runs in a fresh process (vLLM's CPU build needs the ranks' threads
bound by hand on a one-NUMA-node machine: ``VLLM_CPU_OMP_THREADS_BIND``). Run with the vLLM environment's python:

    $VLLM_PY benchmarks/vllm_tensor_parallel.py --out docs/bench/vllm/tensor-parallel.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(tp: int, model: str) -> dict:
    from vllm import LLM, SamplingParams

    from kvcake import models
    from kvcake.engines.vllm import engine_args

    llm = LLM(model=str(models.resolve(model)), dtype="float32", enforce_eager=True, block_size=32, max_model_len=2048,
              max_num_batched_tokens=2048, tensor_parallel_size=tp, seed=0,
              distributed_executor_backend="mp" if tp > 1 else None, **engine_args("cake", ratio=0.2))
    tokenizer = llm.get_tokenizer()
    text = (ROOT / "src" / "kvcake" / "data" / "sample.txt").read_text()
    passage = tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids[:900])
    chat = tokenizer.apply_chat_template([{"role": "user", "content": passage + "\nWho is Margaret?"}],
                                         tokenize=False, add_generation_prompt=True)
    out = llm.generate([chat], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler  # in-process engine core (see main)
    return {"tensor_parallel": tp, "tokens": list(out.token_ids), "text": out.text,
            "kept": list(scheduler.kept_after_prefill.values())[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/vllm/tensor-parallel.json"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.model)), flush=True)
        return
    rows = []
    for tp in (1, 2):
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(c) for c in range(tp)) if tp > 1 else "auto"}
        run = subprocess.run([sys.executable, __file__, "--one", str(tp), "--model", args.model], env=env,
                             capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode != 0 or not lines:
            sys.exit(f"tensor_parallel_size={tp} failed:\n{run.stderr[-4000:]}")
        rows.append(json.loads(lines[-1][7:]))
        print(json.dumps(rows[-1]), flush=True)
    same = rows[0]["tokens"] == rows[1]["tokens"] and rows[0]["kept"] == rows[1]["kept"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "rows": rows, "identical": same}, indent=1))
    print(f"tokens and kept entries per layer identical at 1 and 2 ranks: {same}")


if __name__ == "__main__":
    main()
