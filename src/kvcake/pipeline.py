"""Answer a question about a long context with a compressed KV cache (the ``kvcake generate`` job)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvcake.engines.transformers.compat import output_cache, text_config
from kvcake.engines.transformers.session import compress
from kvcake.engines.transformers.storage import cache_kv_bytes


def static_compile_config(model):
    """transformers' CompileConfig for compiled decoding on the model's device (CUDA graphs on CUDA)."""
    from transformers import CompileConfig

    device = next(model.parameters()).device
    config = CompileConfig(fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else "default")
    if device.type not in ("cuda", "xpu"):
        config._compile_all_devices = True  # type: ignore[assignment]
    return config


class PromptTooLongError(ValueError):
    """The prompt and the answer do not fit in the model's positions."""


def check_fits(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse, before any model work, a prompt the model cannot attend over (it would run for minutes, then
    answer from positions it was never trained on)."""
    limit = getattr(text_config(model), "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_tokens + max_new_tokens > limit:
        raise PromptTooLongError(
            f"the prompt has {prompt_tokens} tokens and the answer may add {max_new_tokens}, but the model accepts "
            f"{limit} positions; shorten the input by at least {prompt_tokens + max_new_tokens - limit} tokens"
        )


def check_method_fits(method, prompt_tokens: int) -> None:
    """Options that cannot mean anything for this prompt are refused rather than silently ignored."""
    kernel = getattr(method.scorer, "kernel", None)
    if isinstance(kernel, int) and kernel > prompt_tokens:
        raise ValueError(f"the pooling kernel ({kernel}) is longer than the prompt ({prompt_tokens} tokens)")


@dataclass
class Answer:
    """The generated text and what it cost."""

    answer: str
    prompt_tokens: int
    generated_tokens: int
    layer_budgets: list[int]
    kv_bytes: int
    kv_bytes_full: int
    peak_kv_bytes: int
    seconds: float
    method: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


PROTOCOLS = ("whole", "tail")

_MARK = "\x00kvcake-end-of-question\x00"


def chat_tail_length(tokenizer) -> int:
    """Tokens the chat template adds after the user's message (end of the user turn, start of the assistant's):
    what the ``tail`` protocol leaves uncompressed. 0 without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return 0
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x" + _MARK}], tokenize=False,
                                         add_generation_prompt=True)
    head, tail = text.split(_MARK, 1)

    def count(part: str) -> int:
        return len(tokenizer(part, add_special_tokens=False)["input_ids"])

    return count(head + tail) - count(head)  # as tokenised in the whole prompt


def build_prompt(tokenizer, context: str, question: str) -> torch.Tensor:
    """Token ids ``(1, S)``: context then question, through the chat template when the tokenizer has one."""
    if not context.strip():
        raise ValueError("empty context: give a non-empty text with --input")
    if not question.strip():
        raise ValueError("empty question")
    content = f"{context.strip()}\n\nAnswer the question about the text above.\nQuestion: {question.strip()}"
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(content + "\nAnswer:", return_tensors="pt")["input_ids"]
    return ids


@torch.no_grad()
def answer(model, tokenizer, context: str, question: str, method, max_new_tokens: int = 64,
           protocol: str = "whole", compile: bool = False) -> Answer:
    """Greedy answer to ``question`` about ``context``; ``method`` None means the full cache.

    ``protocol``: ``whole`` compresses the whole templated prompt (the paper's protocol); ``tail`` leaves the chat
    template's tail uncompressed (kvpress's). ``compile``: decode with compiled steps (the full cache then uses
    transformers' static cache, compiled the same way).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    ids = build_prompt(tokenizer, context, question).to(model.device)
    check_fits(model, ids.shape[1], max_new_tokens)
    if method is not None:
        check_method_fits(method, ids.shape[1])
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                    pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
    start = time.perf_counter()
    if method is None:
        if compile:
            settings.update(cache_implementation="static", compile_config=static_compile_config(model))
        out = model.generate(ids, **settings)
        cache = output_cache(out)
        full = cache_kv_bytes(cache)
        n_layers = len(getattr(cache, "layers", []))
        summary: dict[str, Any] = dict(layer_budgets=[ids.shape[1]] * n_layers, kv_bytes=full, kv_bytes_full=full,
                                       peak_kv_bytes=full, method={"name": "full"}, report=None)
    else:
        tail = chat_tail_length(tokenizer) if protocol == "tail" else 0
        with compress(model, method, compile=compile, uncompressed_tail=tail) as press:
            if not press.new_cache().compressible:
                raise ValueError(f"{type(model).__name__} has only sliding-window attention layers, which kvcake "
                                 "does not compress; use --method full")
            out = model.generate(ids, **settings)
            report = press.report
        summary = dict(layer_budgets=report.kept_after_prefill[0], kv_bytes=report.kv_bytes,
                       kv_bytes_full=report.kv_bytes_full, peak_kv_bytes=report.peak_kv_bytes,
                       method=report.method, report=report.to_dict())
    seconds = time.perf_counter() - start
    new = out.sequences[0, ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True).strip()
    return Answer(answer=text, prompt_tokens=ids.shape[1], generated_tokens=int(new.numel()), seconds=seconds,
                  **summary)
