"""kvcake on every supported model family, with tiny randomly initialised models (no downloads).

For each family (Llama, Mistral, Qwen2, Qwen3, Gemma-2, Gemma-3, Phi-3) and each attention backend (eager, sdpa)
we build a 64-wide model from a config with a fixed seed and check, on a 96-token random prompt:

1. prefill logits under compression are bit-identical to the full-cache logits (eviction happens after each layer's
   own attention);
2. with budget 40 / window 8 the report lists exactly the full-attention layers (Gemma's sliding layers are left
   alone), the layers keep exactly ``budget * layers`` tokens in total, and generation starts with the full-cache
   first token;
3. with a budget that covers prompt and generation nothing is evicted and greedy generation equals the full-cache
   generation token for token;
4. a left-padded batch of two generates, per row, what that row generates alone.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers as tf

import kvcake

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2
PROMPT = 96
NEW = 8
BUDGET, WINDOW = 40, 8
SLIDING = 16  # smaller than the prompt, so Gemma's sliding layers really truncate

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)

# family -> (config class, model class, extra config fields)
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(head_dim=16)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(head_dim=16, sliding_window=None)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict()),  # head_dim = hidden / heads = 16
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=16)),
    # Gemma-2 defaults: layers alternate sliding/full (1 and 3 are full), attention logit softcapping 50.
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,
               dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=SLIDING)),
    # Gemma-3: one full layer every second layer (layers 1 and 3), the rest sliding.
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
               dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=SLIDING,
                    layer_types=["sliding_attention", "full_attention"] * 2)),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(sliding_window=None)),  # fused qkv_proj, head_dim 16
}

CASES = [pytest.param(family, impl, id=f"{family}-{impl}") for family in FAMILIES for impl in ("eager", "sdpa")]


@functools.cache
def tiny_model(family: str, impl: str) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    extra = dict(extra)
    build_impl = impl
    if family == "gemma2" and impl == "sdpa":
        # transformers refuses sdpa for Gemma-2 because sdpa cannot softcap attention logits: drop the softcap and
        # switch the backend after construction.
        extra["attn_logit_softcapping"] = None
        build_impl = "eager"
    config = config_cls(**COMMON, **extra)
    torch.manual_seed(0)
    model = model_cls._from_config(config, attn_implementation=build_impl)
    model.config._attn_implementation = impl
    model.eval()
    return model


def full_attention_layers(model) -> list[int]:
    config = model.config
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [i for i, kind in enumerate(types) if kind == "full_attention"]


def prompt(batch: int = 1, length: int = PROMPT, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)  # no pad/bos/eos inside the prompt


def generate(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    out = model.generate(ids, attention_mask=attention_mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD)
    return out[:, ids.shape[1]:]


def cake(budget: int = BUDGET) -> kvcake.CAKE:
    return kvcake.CAKE(budget=budget, window=WINDOW)


@pytest.mark.parametrize("family, impl", CASES)
@torch.no_grad()
def test_prefill_logits_exact(family, impl):
    model = tiny_model(family, impl)
    ids = prompt()
    full = model(ids).logits
    with kvcake.compress(model, cake()) as press:
        compressed = model(ids).logits
    assert model.config._attn_implementation == impl  # backend restored on exit
    assert torch.equal(compressed, full)
    # the forward really went through a compressed cache and evicted
    report = press.report
    assert report.prompt_tokens == [PROMPT]
    assert sum(report.kept_after_prefill[0]) == BUDGET * len(report.layers)


@pytest.mark.parametrize("family, impl", CASES)
@torch.no_grad()
def test_budget_split_and_generation(family, impl):
    model = tiny_model(family, impl)
    ids = prompt()
    expected_layers = full_attention_layers(model)
    assert expected_layers and len(expected_layers) <= model.config.num_hidden_layers
    full = generate(model, ids)
    with kvcake.compress(model, cake()) as press:
        out = generate(model, ids)
    report = press.report
    assert report.layers == expected_layers
    if family.startswith("gemma"):
        assert len(report.layers) < model.config.num_hidden_layers  # sliding layers are left alone
    assert report.prompt_tokens == [PROMPT]
    kept = report.kept_after_prefill[0]
    assert len(kept) == len(report.layers)
    assert sum(kept) == BUDGET * len(report.layers)
    assert all(WINDOW <= k <= PROMPT for k in kept)
    assert report.budgets[0] == kept
    assert report.kv_bytes < report.kv_bytes_full
    assert out.shape == (1, NEW)
    assert out[0, 0] == full[0, 0]  # prefill is exact, so the first token is the full-cache one


@pytest.mark.parametrize("family, impl", CASES)
@torch.no_grad()
def test_budget_covering_prompt_is_lossless(family, impl):
    model = tiny_model(family, impl)
    ids = prompt()
    budget = 512
    assert budget >= PROMPT + NEW
    full = generate(model, ids)
    with kvcake.compress(model, cake(budget)) as press:
        out = generate(model, ids)
    assert press.report.kept_after_prefill[0] == [PROMPT] * len(press.report.layers)
    assert torch.equal(out, full)


def _same_generation(batched_row: torch.Tensor, alone: torch.Tensor) -> None:
    """A row of a batch continues with padding after EOS where the row alone simply stops."""
    n = alone.shape[-1]
    assert batched_row[:n].tolist() == alone.tolist()
    assert (batched_row[n:] == PAD).all()
    if n < NEW:
        assert alone[-1] == EOS


@pytest.mark.parametrize("family, impl", CASES)
@torch.no_grad()
def test_left_padded_batch_matches_rows_alone(family, impl):
    model = tiny_model(family, impl)
    pad = 20
    ids = prompt(batch=2, seed=2)
    mask = torch.ones_like(ids)
    ids[1, :pad] = PAD
    mask[1, :pad] = 0

    with kvcake.compress(model, cake()) as press:
        batched = generate(model, ids, mask)
    report = press.report
    assert report.prompt_tokens == [PROMPT, PROMPT - pad]
    for row in range(2):
        assert sum(report.kept_after_prefill[row]) == BUDGET * len(report.layers)

    alone = []
    for row, start in ((0, 0), (1, pad)):
        with kvcake.compress(model, cake()) as press_alone:
            alone.append(generate(model, ids[row:row + 1, start:]))
        assert press_alone.report.kept_after_prefill[0] == report.kept_after_prefill[row]

    for row in range(2):
        _same_generation(batched[row], alone[row][0])
