"""Independent reference implementations used by the tests (deliberately simple, loop-based, float64)."""

from __future__ import annotations

import math

import torch


def brute_force_allocation(prefs: list[float], total: int, cap: int) -> list[int]:
    """Top-`total` bids P_l / (k + 1/2), k < cap, ties to fewer tokens held, then the lower layer: the definition,
    enumerated."""
    if cap * len(prefs) <= total:
        return [cap] * len(prefs)
    if sum(prefs) == 0:
        prefs = [1.0] * len(prefs)
    bids = [(p / (k + 0.5), 1 / (k + 0.5), -layer, layer) for layer, p in enumerate(prefs) for k in range(cap)]
    bids.sort(reverse=True)
    budgets = [0] * len(prefs)
    for *_, layer in bids[:total]:
        budgets[layer] += 1
    return budgets


def cake_reference(attn: torch.Tensor, kv_heads: int, gamma: float, kernel: int, tau1: float = 1.0, tau2: float = 1.0,
                   pooling: str = "avg"):
    """Preference (per row) and pooled, GQA-averaged indicator (B, Hkv, S - W) from window attention (B, Hq, W, S)."""
    a = attn.detach().double()
    batch, q_heads, window, seq = a.shape
    past = a[..., : seq - window]
    prefs, indicators = [], []
    for b in range(batch):
        h = 0.0
        v = 0.0
        per_head = []
        for head in range(q_heads):
            rows = past[b, head]  # (W, N)
            for x in rows.flatten().tolist():
                if x > 0:
                    h -= x * math.log(x)
            mean = rows.mean(0)
            var = ((rows - mean) ** 2).sum(0) / (window - 1)
            v += float(var.sum())
            score = mean + gamma * var
            n = score.shape[0]
            pooled = torch.zeros(n, dtype=torch.float64)
            for i in range(n):
                lo, hi = max(0, i - kernel // 2), min(n, i + kernel // 2 + 1)
                pooled[i] = score[lo:hi].sum() / kernel if pooling == "avg" else score[lo:hi].max()
            per_head.append(pooled)
        groups = q_heads // kv_heads
        stacked = torch.stack(per_head).reshape(kv_heads, groups, -1).mean(1)
        prefs.append(h ** (1 / tau1) * v ** (1 / tau2))
        indicators.append(stacked)
    return prefs, torch.stack(indicators)


# -- decoding reference: plain attention over exactly the given entries of each KV head ------------------------------

from transformers import AttentionInterface  # noqa: E402

#: layer -> per KV head (keys (n_h, D), values (n_h, D)) of one row.
REFERENCE_KV: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """softmax(q k^T * scaling) v for batch 1, each query head over its KV head's entries plus the new ones, float64."""
    groups = query.shape[1] // key.shape[1]
    outs, grown = [], []
    for h, (k_h, v_h) in enumerate(REFERENCE_KV[module.layer_idx]):
        k_all, v_all = torch.cat([k_h, key[0, h]], dim=0), torch.cat([v_h, value[0, h]], dim=0)
        grown.append((k_all, v_all))
        q = query[0, h * groups:(h + 1) * groups].double()
        probs = torch.softmax(q @ k_all.double().T * scaling, dim=-1)
        outs.append(probs @ v_all.double())
    REFERENCE_KV[module.layer_idx] = grown
    return torch.cat(outs, dim=0)[None].transpose(1, 2).to(query.dtype), None


AttentionInterface.register("kvcake_test_reference", _reference_attention)


def reference_logits(model, token, position, kv):
    """Logits of one decoding step computed with plain attention over exactly ``kv``; returns (logits, grown kv)."""
    REFERENCE_KV.clear()
    REFERENCE_KV.update(kv)
    saved = model.config._attn_implementation
    model.config._attn_implementation = "kvcake_test_reference"
    try:
        with torch.no_grad():
            out = model(token, position_ids=torch.tensor([[position]]), use_cache=False).logits
    finally:
        model.config._attn_implementation = saved
    return out[:, -1], dict(REFERENCE_KV)


def row_entries(cache, row, first_real):
    """Per layer and KV head, the keys/values of one row's real kept entries (fillers and padding dropped)."""
    kv = {}
    for i, layer in enumerate(cache.layers):
        keys, values, pos = layer.entries()
        pos = pos[row]
        heads = []
        for h in range(pos.shape[0]):
            keep = pos[h] >= first_real
            heads.append((keys[row, h][keep], values[row, h][keep]))
        kv[i] = heads
    return kv
