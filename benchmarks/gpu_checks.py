"""Correctness of kvcake on a CUDA device, per attention backend (the CPU test suite cannot see device issues).

    python benchmarks/gpu_checks.py --out gpu_checks.json            # on a machine with a GPU
    python benchmarks/gpu_checks.py --device cpu --out /tmp/c.json   # the same checks on CPU (a dry run)

On small random Llama models built in the script (no downloads), it checks:

1. **budget covering the prompt = full cache**: greedy tokens with CAKE at a budget larger than the prompt equal the
   full cache's, for eager, sdpa (PyTorch's choice of kernel), sdpa restricted to the flash, memory-efficient and
   cuDNN kernels, and transformers' flash_attention_2 when the flash-attn package is installed;
2. **decoding over exactly the kept tokens**: after a CAKE generation with decode-time eviction, one more decoding
   step through kvcake gives the logits of a plain transformers cache that holds exactly the kept entries (in
   position order) with the new token at its true position;
3. **CPU and CUDA agree**: the same float32 model and prompt, compressed on both devices, keep the same positions
   and generate the same tokens (near-ties may differ by rounding; the share that agrees is reported);
4. **compiled decoding = eager decoding**: ``kvcake.compress(..., compile=True)`` (CUDA graphs on CUDA) generates
   the eager tokens for CAKE (decode-time eviction) and SnapKV (prefill-only), float32, batch 1 and a left-padded
   batch of 3, with one graph and no recompilation across two requests of different lengths.

Prints one line per check and writes them as JSON; exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvcake
from kvcake.bench import hardware, sdpa_backend
from kvcake.engines.transformers.compat import cache_keyword, output_cache
from kvcake.engines.transformers.compiled import CompileCounts

PROMPT, NEW, BUDGET = 200, 24, 64


def build(attn: str, dtype: torch.dtype, device: str, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=32, intermediate_size=512, vocab_size=512, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.config._attn_implementation = attn
    return model.to(device).eval()


def prompt(device: str) -> torch.Tensor:
    return torch.randint(0, 512, (1, PROMPT), generator=torch.Generator().manual_seed(1)).to(device)


def greedy(model, ids, method=None):
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if method is None:
            return model.generate(ids, **kwargs)
        with kvcake.compress(model, method):
            return model.generate(ids, **kwargs)


def covering_budget(device: str) -> list[dict]:
    """Check 1 for every backend this machine can run."""
    cases = [("eager", None, torch.float32), ("sdpa", None, torch.float32), ("sdpa", None, torch.bfloat16),
             ("sdpa", "flash", torch.bfloat16), ("sdpa", "efficient", torch.bfloat16)]
    if device == "cuda":
        cases.append(("sdpa", "cudnn", torch.bfloat16))
    try:
        import flash_attn  # noqa: F401

        cases.append(("flash_attention_2", None, torch.bfloat16))
    except ImportError:
        pass
    results = []
    for attn, kernel, dtype in cases:
        name = f"{attn}{'/' + kernel if kernel else ''} {str(dtype).removeprefix('torch.')}"
        try:
            model = build(attn, dtype, device)
            ids = prompt(device)
            with sdpa_backend(kernel):
                full = greedy(model, ids)
                cake = greedy(model, ids, kvcake.CAKE(budget=PROMPT + NEW + 8))
            ok = torch.equal(full, cake)
            results.append(dict(check="covering budget = full cache", backend=name, passed=ok,
                                detail=f"{NEW} greedy tokens {'identical' if ok else 'differ'}"))
        except Exception as exc:  # noqa: BLE001 (a kernel this machine lacks is reported, not fatal)
            results.append(dict(check="covering budget = full cache", backend=name, passed=None,
                                detail=f"not run: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
    return results


def kept_entries_step(device: str, dtype: torch.dtype) -> dict:
    """Check 2: one kvcake decoding step against a plain cache of exactly the kept entries."""
    model = build("sdpa", dtype, device)
    ids = prompt(device)
    name = cache_keyword(model)
    with torch.no_grad(), kvcake.compress(model, kvcake.CAKE(budget=BUDGET)):
        out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
        cache = output_cache(out)
        frozen = sum(layer.slots is not None for layer in cache.layers)
        plain = DynamicCache(config=model.config)
        for i, layer in enumerate(cache.layers):
            keys, values, _ = layer.entries()
            plain.update(keys.clone(), values.clone(), i)
        token = out.sequences[:, -1:]
        position = torch.tensor([[out.sequences.shape[1] - 1]], device=device)
        compressed = model(token, **{name: cache}, position_ids=position).logits[:, -1].float()
    with torch.no_grad():
        reference = model(token, **{name: plain}, position_ids=position).logits[:, -1].float()
    diff = float((compressed - reference).abs().max())
    scale = float(reference.abs().max())
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    return dict(check="decode step = plain cache of the kept entries", backend=f"sdpa {str(dtype)[6:]}",
                passed=diff <= tolerance * max(1.0, scale),
                detail=f"max |logit diff| {diff:.2e} (logits up to {scale:.2f}); {frozen} of "
                       f"{len(cache.layers)} layers in fixed-shape decoding slots")


def cpu_vs_device(device: str) -> dict:
    """Check 3: the same float32 model compressed on CPU and on the device."""
    runs = {}
    for where in ("cpu", device):
        model = build("sdpa", torch.float32, where)
        with torch.no_grad(), kvcake.compress(model, kvcake.CAKE(budget=BUDGET)) as press:
            seq = model.generate(prompt(where), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0)
            positions = [layer.entries()[2].cpu() for layer in press.cache.layers]
        runs[where] = (seq.cpu(), positions)
    (seq_a, pos_a), (seq_b, pos_b) = runs["cpu"], runs[device]
    same_tokens = float((seq_a == seq_b).float().mean())
    shared = sum(len(set(a.flatten().tolist()) & set(b.flatten().tolist())) for a, b in zip(pos_a, pos_b, strict=False))
    total = sum(len(set(a.flatten().tolist())) for a in pos_a)
    return dict(check=f"cpu vs {device}", backend="sdpa float32", passed=same_tokens == 1.0,
                detail=f"tokens agree {same_tokens:.1%}; kept positions shared {shared / max(total, 1):.1%}")


def compiled_equals_eager(device: str) -> list[dict]:
    """Check 4: compiled decoding (CUDA graphs on CUDA) gives the eager tokens, with one graph for two requests."""
    results = []
    model = build("sdpa", torch.float32, device)
    for method in (kvcake.CAKE(budget=BUDGET), kvcake.SnapKV(budget=BUDGET)):
        for rows in (1, 3):
            ids = torch.randint(0, 512, (rows, PROMPT), generator=torch.Generator().manual_seed(rows)).to(device)
            mask = torch.ones_like(ids)
            if rows == 3:
                mask[1, :40], mask[2, :90] = 0, 0
            kwargs = dict(attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                          pad_token_id=0)
            try:
                with torch.no_grad(), kvcake.compress(model, method) as press:
                    eager = model.generate(ids, **kwargs)
                CompileCounts.start()
                with torch.no_grad(), kvcake.compress(model, method, compile=True) as press:
                    compiled = model.generate(ids, **kwargs)
                    model.generate(ids[:, 20:], **{**kwargs, "attention_mask": mask[:, 20:]})  # another length
                    mode = press.mode()
                counts = CompileCounts.read()
                ok = torch.equal(eager, compiled) and counts.graph_breaks == 0 and counts.graphs == 1
                same = "identical" if torch.equal(eager, compiled) else "differ"
                results.append(dict(check="compiled decoding = eager", backend=f"{method.label} batch {rows} {mode}",
                                    passed=ok, detail=f"tokens {same}; {counts.graphs} graph(s), "
                                                      f"{counts.graph_breaks} break(s)"))
            except Exception as exc:  # noqa: BLE001 (reported, the other checks still run)
                results.append(dict(check="compiled decoding = eager", backend=f"{method.label} batch {rows}",
                                    passed=False, detail=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="gpu_checks.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; pass --device cpu for a dry run")
    results = covering_budget(args.device)
    results.append(kept_entries_step(args.device, torch.float32))
    results.append(kept_entries_step(args.device, torch.bfloat16))
    if args.device != "cpu":
        results.append(cpu_vs_device(args.device))
    results += compiled_equals_eager(args.device)
    for r in results:
        mark = {True: "PASS", False: "FAIL", None: "SKIP"}[r["passed"]]
        print(f"{mark}  {r['check']} [{r['backend']}]: {r['detail']}")
    with open(args.out, "w") as f:
        json.dump({"hardware": hardware(), "results": results}, f, indent=2)
    return 1 if any(r["passed"] is False for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
