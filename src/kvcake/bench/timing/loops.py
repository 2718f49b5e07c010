"""The measured calls: one prefill, and a hand-written greedy decoding loop at true positions."""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from kvcake.engines.transformers.compat import cache_keyword, output_cache, text_config


def device_of(model) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA), so that a clock read after it covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vocab_size(model) -> int:
    """Vocabulary size of the model's decoder."""
    return int(text_config(model).vocab_size)


def random_ids(vocab: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    """A random prompt of ``length`` token ids, the same for the same seed on any device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=generator).to(device)


def median(values: list[float]) -> float | None:
    """The median, None for no values."""
    return statistics.median(values) if values else None


def cache_tokens(cache) -> list[int]:
    """Tokens held by each layer of a transformers cache."""
    return [layer.keys.shape[-2] if getattr(layer, "keys", None) is not None else 0 for layer in cache.layers]


def cache_of(out):
    """The cache a forward returned; an error if the model returned none."""
    cache = output_cache(out)
    if cache is None:
        raise RuntimeError("the model returned no cache; is use_cache supported?")
    return cache


def prefill_kwargs(model) -> dict[str, Any]:
    """Only the last position's logits are needed (as in generate): the full logits would be S x vocab floats."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def prefill(model, ids: torch.Tensor, device: torch.device, cache=None):
    """One timed prefill (into ``cache`` when given, else a new one); the output and its seconds."""
    extra = {} if cache is None else {cache_keyword(model): cache}
    sync(device)
    start = time.perf_counter()
    out = model(ids, use_cache=True, **extra, **prefill_kwargs(model))
    sync(device)
    return out, time.perf_counter() - start


def greedy_steps(model, cache, logits: torch.Tensor, start_pos: int, steps: int, device: torch.device,
                 forward: Callable[..., Any] | None = None,
                 before_step: Callable[[], None] | None = None) -> tuple[list[float], list[int]]:
    """Greedy decoding by hand, one token per step at its true position; seconds of each step and the tokens.

    ``forward`` replaces ``model`` as the callable of each step (e.g. a ``torch.compile``'d forward);
    ``before_step`` runs untimed before each step (e.g. marking a CUDA-graph step).
    """
    call = forward if forward is not None else model
    name = cache_keyword(model)
    token = logits[:, -1].argmax(-1, keepdim=True)
    times, tokens = [], []
    for i in range(steps):
        position = torch.tensor([[start_pos + i]], device=device)
        if before_step is not None:
            before_step()
        sync(device)
        start = time.perf_counter()
        out = call(token, **{name: cache}, position_ids=position, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        times.append(time.perf_counter() - start)
        tokens.append(token)
    return times, [int(t) for t in tokens]


def decode(model, cache, logits: torch.Tensor, start_pos: int, steps: int, device: torch.device) -> list[float]:
    """Greedy decoding by hand, one token per step at its true position; seconds of each step."""
    return greedy_steps(model, cache, logits, start_pos, steps, device)[0]
