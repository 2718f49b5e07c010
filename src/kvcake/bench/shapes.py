"""Model shapes of the benchmark: named random-weight shapes, dtypes, and loading a model to measure."""

from __future__ import annotations

from typing import Any

import torch

#: Named model shapes for randomly initialised models. ``family`` picks the config class; the rest are its arguments.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(
        family="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
        max_position_embeddings=131072, tie_word_embeddings=False,
    ),
    "mistral-7b": dict(
        family="mistral", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=14336, vocab_size=32768, rope_theta=1000000.0,
        max_position_embeddings=131072, tie_word_embeddings=False, sliding_window=None,
    ),
    "llama-3.2-1b": dict(
        family="llama", num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, intermediate_size=8192, vocab_size=128256, rope_theta=500000.0,
        max_position_embeddings=131072, tie_word_embeddings=True,
    ),
    "small": dict(
        family="llama", num_hidden_layers=8, hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
        head_dim=64, intermediate_size=1536, vocab_size=32000, rope_theta=500000.0,
        max_position_embeddings=131072, tie_word_embeddings=False,
    ),
    "tiny": dict(
        family="llama", num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, vocab_size=128, rope_theta=10000.0,
        max_position_embeddings=131072, tie_word_embeddings=False,
    ),
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """``dtype`` as a torch dtype; None means float32 on CPU and bfloat16 on CUDA."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[key]


def shape_config(shape: str, max_positions: int | None = None):
    """The transformers config of a named shape (``max_positions`` raises max_position_embeddings if larger)."""
    from transformers import LlamaConfig, MistralConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    params = dict(SHAPES[shape])
    family = params.pop("family")
    theta = params.pop("rope_theta")
    if max_positions is not None:
        params["max_position_embeddings"] = max(params["max_position_embeddings"], int(max_positions))
    params["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    cls = {"llama": LlamaConfig, "mistral": MistralConfig}[family]
    return cls(**params)


def parameter_count(config) -> int:
    """Parameters of a Llama/Mistral-style decoder with this config (for the memory check before building)."""
    h, inter, vocab, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h
    embeddings = vocab * h * (1 if config.tie_word_embeddings else 2)
    return n * per_layer + embeddings + h


def _available_bytes(device: torch.device) -> int | None:
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 (no way to tell: skip the check)
        return None


def random_model(shape: str = "small", dtype: torch.dtype | str | None = None, attn_implementation: str = "sdpa",
                 device: torch.device | str = "cpu", *, max_positions: int | None = None, seed: int = 0):
    """A randomly initialised causal LM of a named shape (see :data:`SHAPES`), in eval mode, built on ``device``.

    Weights are drawn by transformers' own initialisation (normal, std 0.02; norms at 1) directly on the device, so
    activations stay finite; decoding speed does not depend on the values. Refuses, before allocating, a model whose
    weights would not fit in the device's free memory.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    config = shape_config(shape, max_positions)
    need = parameter_count(config) * torch.empty((), dtype=dtype).element_size()
    free = _available_bytes(device)
    if free is not None and need > free:
        raise MemoryError(
            f"shape {shape!r} needs {need / 2**30:.1f} GiB of weights in {dtype} but {device} has "
            f"{free / 2**30:.1f} GiB free; use a smaller shape, a 16-bit dtype or another device"
        )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def load_model(name_or_path: str | None = "small", dtype: torch.dtype | str | None = None,
               attn_implementation: str = "sdpa", device: torch.device | str = "cpu", *,
               max_positions: int | None = None, seed: int = 0):
    """A named random shape (:data:`SHAPES`), a local model folder, or None for the embedded default model."""
    if name_or_path in SHAPES:
        return random_model(name_or_path, dtype, attn_implementation, device, max_positions=max_positions, seed=seed)
    from kvcake import models

    device = torch.device(device)
    model, _ = models.load(name_or_path, dtype=resolve_dtype(dtype, device), attn_implementation=attn_implementation)
    return model.to(device).eval()
