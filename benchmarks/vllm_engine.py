"""What kvcake's vLLM engine frees and buys, measured in vLLM's CPU build (run with the vLLM environment's python).

Every measurement runs vLLM in a fresh process (an engine per process, as vLLM is used), alternating plain vLLM and
vLLM + kvcake ``--rounds`` times:

* ``startup``: seconds from ``LLM(...)`` to a ready engine, with and without kvcake;
* ``blocks``: after one prompt's prefill, the blocks each layer holds (read from vLLM's block managers) against the
  entries it keeps, and what one block table shared by all layers would hold (the largest layer's blocks x layers);
* ``decode``: output tokens per second while decoding one request (steps after the prefill step), same prompt;
* ``concurrency``: the most requests running at once when ``--requests`` prompts arrive together at a KV pool that
  holds ``--pool-requests`` full-cache prompts (``num_gpu_blocks_override``: vLLM's blocks hold every layer, kvcake's
  one layer each, so kvcake gets as many more blocks as there are layers: the same bytes), and the time to serve them.

    VLLM_PY=/tmp/kvcake-vllm-venv/bin/python
    $VLLM_PY benchmarks/vllm_engine.py --model smollm2-135m-instruct --prompt-tokens 4096 --ratio 0.1 \
        --out docs/bench/vllm/smollm2.json

``--method`` and ``--params`` (JSON) choose the kvcake rows' method (CAKE by default; e.g. ``--params
'{"decode_eviction": false}'`` for CAKE without decode-time eviction).

Results are written as they land (a rerun skips measurements already in ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ONE = "--one"


def _prompt(tokenizer, length: int, seed: int) -> list[int]:
    text = (Path(__file__).resolve().parents[1] / "src" / "kvcake" / "data" / "sample.txt").read_text()
    body = tokenizer(text, add_special_tokens=False).input_ids
    while len(body) < length + 200 * seed + 64:
        body = body + body
    code = 4000 + 97 * seed
    filler = tokenizer.decode(body[200 * seed: 200 * seed + length - 40])
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"The pass code is {code}.\n{filler}\nWhat is the pass code?"}],
        tokenize=False, add_generation_prompt=True)
    return tokenizer(chat, add_special_tokens=False).input_ids


def _engine(args, kvcake: bool):
    from vllm import LLM

    from kvcake.engines.vllm import engine_args

    extra = engine_args(args.method, ratio=args.ratio, **json.loads(args.params)) if kvcake else {
        "enable_prefix_caching": False}
    if args.what == "concurrency":  # the pool in bytes: vLLM's blocks of all layers, or kvcake's of one layer each
        extra["num_gpu_blocks_override"] = args.pool_blocks * (args.layers if kvcake else 1)
    return LLM(model=args.folder, dtype="float32", enforce_eager=True, block_size=args.block_size,
               max_model_len=args.prompt_tokens + 512, max_num_batched_tokens=2 * (args.prompt_tokens + 512),
               max_num_seqs=64, seed=0, **extra)


def one(args) -> dict:
    """One measurement in this process (the parent runs each in a fresh one)."""
    from vllm import SamplingParams

    kvcake = args.kvcake == "on"
    began = time.perf_counter()
    llm = _engine(args, kvcake)
    startup = time.perf_counter() - began
    if args.what == "startup":
        return {"startup_s": startup}
    core = llm.llm_engine.engine_core.engine_core
    tokenizer = llm.get_tokenizer()
    engine = llm.llm_engine
    if args.what in ("blocks", "decode"):
        prompt = _prompt(tokenizer, args.prompt_tokens, 0)
        engine.add_request("r0", {"prompt_token_ids": prompt},
                           SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True))
        times, texts = [], None
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            results = engine.step()
            times.append(time.perf_counter() - start)
            if len(times) == 1 and kvcake:
                held = next(iter(core.scheduler.held_after_prefill.values()))  # vLLM suffixes request ids
                kept = next(iter(core.scheduler.kept_after_prefill.values()))
            for r in results:
                if r.finished:
                    texts = r.outputs[0].text
        out = {"prompt_tokens": len(prompt), "decode_steps": len(times) - 1,
               "decode_tokens_per_s": (len(times) - 1) / sum(times[1:]), "prefill_step_s": times[0],
               "answer": texts}
        if kvcake:
            out.update(held_blocks=held, kept_entries=kept, block_size=args.block_size)
        return out
    prompts = [_prompt(tokenizer, args.prompt_tokens, i) for i in range(args.requests)]
    params = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"c{i}", {"prompt_token_ids": p}, params)
    most, steps, found = 0, 0, 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for r in engine.step():
            if r.finished:
                found += str(4000 + 97 * int(r.request_id[1:])) in r.outputs[0].text
        most = max(most, len(core.scheduler.running))
        steps += 1
    return {"most_running": most, "steps": steps, "wall_s": time.perf_counter() - start, "requests": len(prompts),
            "needles_found": found, "pool_blocks": core.scheduler.kv_cache_manager.block_pool.num_gpu_blocks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--method", default="cake", help="the kvcake method of the kvcake rows")
    parser.add_argument("--params", default="{}", help='its parameters as JSON, e.g. \'{"decode_eviction": false}\'')
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--pool-requests", type=float, default=2.0, help="full-cache prompts the KV pool holds")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--what", default="startup,blocks,decode,concurrency")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/vllm/results.json"))
    parser.add_argument(ONE, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kvcake", default="on", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--pool-blocks", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return
    from transformers import AutoConfig

    from kvcake import models

    folder = str(models.resolve(args.model))

    config = AutoConfig.from_pretrained(folder)
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (
        config.hidden_size // config.num_attention_heads) * 4
    from transformers import AutoTokenizer

    longest = max(len(_prompt(AutoTokenizer.from_pretrained(folder), args.prompt_tokens, i))
                  for i in range(args.requests))  # the chat template adds a few tokens to --prompt-tokens
    args.pool_blocks = int(args.pool_requests * -(-(longest + args.decode_tokens) // args.block_size))
    args.layers = config.num_hidden_layers
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    done.update(model=args.model, prompt_tokens=args.prompt_tokens, ratio=args.ratio, block_size=args.block_size,
                decode_tokens=args.decode_tokens, requests=args.requests, pool_blocks=args.pool_blocks,
                pool_bytes=args.pool_blocks * args.block_size * per_token)
    setting = args.method + ("" if args.params == "{}" else " " + args.params)
    have = {(r["what"], r["kvcake"], r["round"], r.get("setting", "cake")) for r in done["rows"]}
    for round_ in range(args.rounds):
        for what in args.what.split(","):
            for kvcake in ("off", "on"):
                if (what, kvcake, round_, setting if kvcake == "on" else "cake") in have or (
                        what == "blocks" and kvcake == "off"):
                    continue
                env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}
                command = [sys.executable, __file__, ONE, "--kvcake", kvcake, "--folder", folder, "--what", what,
                           *sum(([f"--{k.replace('_', '-')}", str(getattr(args, k))] for k in
                                 ("prompt_tokens", "ratio", "method", "params", "block_size", "decode_tokens",
                                  "requests", "pool_blocks", "layers")), [])]
                run = subprocess.run(command, env=env, capture_output=True, text=True)
                lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
                if run.returncode != 0 or not lines:
                    sys.exit(f"{what} kvcake={kvcake} failed:\n{run.stderr[-4000:]}")
                row = {"what": what, "kvcake": kvcake, "round": round_,
                       **({"setting": setting} if kvcake == "on" else {}), **json.loads(lines[-1][7:])}
                done["rows"].append(row)
                args.out.write_text(json.dumps(done, indent=1))
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
