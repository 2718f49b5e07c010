"""Serve a throughput workload with NVIDIA kvpress's pipeline (run by the kvpress environment's python).

    python kvpress_worker.py JOB.json RESULT.json

Standard library, torch, transformers and kvpress only. kvpress answers one request at a time through its
``kv-press-text-generation`` pipeline, which is what its users get: the context is prefilled and compressed by the
press, the question is fed uncompressed, then tokens are decoded one by one. The decoder's forwards (every one of
them: kvpress prefills the context through the decoder alone) are clocked by forward hooks (a forward of more than
one token is prefill, of one token a decoding step), and the cache passed to the pipeline is read after every
forward. The end-of-sequence check of the pipeline is given no token to stop at, so that every answer has exactly
the workload's length.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


class _Clocked:
    """Forward hooks that time every forward of the model and sample the cache after it."""

    def __init__(self, model, clock: dict[str, Any]) -> None:
        self.clock = clock
        self.cache: Any = None
        self.tokens = 0
        self.last_end: float | None = None
        self.first_token_at: float | None = None
        self._start = 0.0
        self._width = 0
        self.handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                        model.register_forward_hook(self._post, with_kwargs=True)]

    def _pre(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._width = int(ids.shape[-1]) if ids is not None else 1
        self._start = time.perf_counter()

    def _post(self, module, args, kwargs, output) -> None:
        end = time.perf_counter()
        if self._width > 1:
            self.clock["prefill_s"] += end - self._start
            self.first_token_at = end  # the question's forward gives the first token
        else:
            since = self.last_end if self.last_end is not None else self._start
            self.clock["decode_s"] += end - since
            self.clock["decode_tokens"] += 1
            self.tokens += 1
        self.last_end = end
        self.clock["steps"] += 1
        if self.cache is not None:
            held = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel()
                       * layer.values.element_size() for layer in self.cache.layers
                       if getattr(layer, "keys", None) is not None)
            self.clock["kv_samples"].append(int(held))
            self.clock["kv_peak_bytes"] = max(self.clock["kv_peak_bytes"], int(held))


def serve(job: dict[str, Any]) -> dict[str, Any]:
    import kvpress
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline

    records = [dict(index=r["index"], prompt_tokens=len(r["ids"]), arrival_s=r["arrival_s"]) for r in job["requests"]]
    clock: dict[str, Any] = dict(prefill_s=0.0, decode_s=0.0, decode_tokens=0, wall_s=0.0, steps=0, max_running=0,
                                 kv_peak_bytes=0, kv_samples=[],
                                 kv_source="the DynamicCache given to kvpress's pipeline, after every forward (its "
                                           "per-layer peak inside the prefill forward is not visible)")
    setting = job["setting"]
    presses = {"snapkv": "SnapKVPress", "streamingllm": "StreamingLLMPress", "knorm": "KnormPress",
               "tova": "TOVAPress", "expected_attention": "ExpectedAttentionPress"}
    press = getattr(kvpress, presses[setting["method"]])(compression_ratio=1.0 - float(setting["ratio"]))
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(job["model"], local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32, attn_implementation="sdpa",
                                                 local_files_only=True).eval()
    model.generation_config.eos_token_id = [-1]  # no token stops an answer: fixed-length answers
    pipe: Any = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)  # type: ignore[call-overload]
    hooks = _Clocked(model.model, clock)  # the decoder: kvpress prefills the context through it, not the LM head
    info = dict(kvpress=getattr(kvpress, "__version__", None), transformers=transformers.__version__,
                torch=torch.__version__, press=repr(press))
    pending = sorted(job["requests"], key=lambda r: (r["arrival_s"], r["index"]))
    start = time.perf_counter()
    for r in pending:
        now = time.perf_counter() - start
        if r["arrival_s"] > now:
            time.sleep(r["arrival_s"] - now)
        rec = records[r["index"]]
        hooks.cache = DynamicCache()
        hooks.last_end = None
        hooks.tokens = 0
        clock["max_running"] = 1
        with torch.no_grad():
            answer = pipe(r["context"], question=r["question"], press=press, max_new_tokens=int(job["output_tokens"]),
                          cache=hooks.cache)["answer"]
        rec["finish_s"] = time.perf_counter() - start
        rec["first_token_s"] = None if hooks.first_token_at is None else hooks.first_token_at - start
        rec["output_tokens"] = hooks.tokens + 1
        rec["text"] = answer
    clock["wall_s"] = time.perf_counter() - start
    for h in hooks.handles:
        h.remove()
    return dict(requests=records, clock=clock, info=info)


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        job = json.load(f)
    result = serve(job)
    with open(argv[2], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
