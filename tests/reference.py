"""Independent reference implementations used by the tests (deliberately simple, loop-based, float64)."""

from __future__ import annotations

import math

import torch


def brute_force_allocation(prefs: list[float], total: int, cap: int) -> list[int]:
    """Top-`total` bids P_l / (k + 1/2), k < cap, ties to the lower layer: the definition, enumerated."""
    if cap * len(prefs) <= total:
        return [cap] * len(prefs)
    if sum(prefs) == 0:
        prefs = [1.0] * len(prefs)
    bids = [(p / (k + 0.5), -layer, layer) for layer, p in enumerate(prefs) for k in range(cap)]
    bids.sort(reverse=True)
    budgets = [0] * len(prefs)
    for _, _, layer in bids[:total]:
        budgets[layer] += 1
    return budgets


def cake_reference(attn: torch.Tensor, kv_heads: int, gamma: float, kernel: int, tau1: float = 1.0, tau2: float = 1.0):
    """Preference (per row) and pooled, GQA-averaged indicator (B, Hkv, S - W) from window attention (B, Hq, W, S)."""
    a = attn.double()
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
                pooled[i] = score[lo:hi].sum() / kernel
            per_head.append(pooled)
        groups = q_heads // kv_heads
        stacked = torch.stack(per_head).reshape(kv_heads, groups, -1).mean(1)
        prefs.append(h ** (1 / tau1) * v ** (1 / tau2))
        indicators.append(stacked)
    return prefs, torch.stack(indicators)


def plain_attention(query, keys, values, scaling):
    """softmax(q k^T * scaling) v over every given key, GQA by repetition, float64; returns (B, q, Hq, D)."""
    q_heads, kv_heads = query.shape[1], keys.shape[1]
    k = keys.double().repeat_interleave(q_heads // kv_heads, dim=1)
    v = values.double().repeat_interleave(q_heads // kv_heads, dim=1)
    probs = torch.softmax(query.double() @ k.transpose(-1, -2) * scaling, dim=-1)
    return (probs @ v).transpose(1, 2).to(query.dtype)
