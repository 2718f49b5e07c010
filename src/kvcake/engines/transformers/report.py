"""What a compression did: budgets, kept lengths and memory, as plain data (built by ``KVCakeCache.report()``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Report:
    """Per-request record of a kvcake compression.

    Lists indexed ``[row][layer]`` follow the order of ``layers`` (the compressed full-attention layers).

    Attributes
    ----------
    method : dict
        The method's name and parameters.
    layers : list[int]
        Indices of the compressed layers (sliding-window layers are left to transformers).
    prompt_tokens : list[int]
        Real (non-padding) prompt tokens per row.
    uncompressed_tail : int
        Tokens at the end of each prompt left out of the compression and kept (the ``tail`` protocol), counted in
        ``prompt_tokens`` and in every layer's budget.
    total_budget : list[int]
        Evictable tokens per row over all compressed layers (window excluded), as requested.
    preferences : list[list[float]]
        Layer preference P_l per row.
    budgets : list[list[int]]
        Tokens each layer was allowed after prefill (its share plus the window), per row.
    kept_after_prefill : list[list[int]]
        Real tokens each layer held when prefill ended, per row (equals ``budgets`` unless a layer had fewer tokens).
    kept_now : list[list[int]]
        Real tokens each layer holds now, per row.
    layer_lengths : list[int]
        Physical entries per head stored per layer now (rows padded to the longest with masked filler slots).
    kv_bytes : int
        Key and value bytes held now, all layers.
    kv_bytes_full : int
        Key and value bytes a cache without eviction would hold now.
    peak_kv_bytes : int
        Highest key and value bytes held at any moment of prefill.
    peak_bound_bytes : int
        SPEC bound on that peak for the cascade: B_total + (L-1) * S_w tokens of earlier layers plus one full layer.
    metadata_bytes : int
        kvcake's own bookkeeping (kept positions), not included in ``kv_bytes``.
    padding_bytes : int
        Part of ``kv_bytes`` held by masked filler slots: rows of a batch keeping fewer tokens than the longest row,
        and, with head-wise (Ada-KV) allocation, heads keeping fewer than the layer's longest head. The cascade bound
        ``peak_bound_bytes`` counts kept tokens; the padded layout may exceed it by these slots.
    spare_bytes : int
        Part of ``kv_bytes`` held by free slots: between decoding steps, a layer that evicted holds the slot of the
        entry it dropped, which the next token is written into in place (it saves a copy of the layer per step).
    """

    method: dict[str, Any]
    layers: list[int]
    prompt_tokens: list[int]
    total_budget: list[int]
    preferences: list[list[float]]
    budgets: list[list[int]]
    kept_after_prefill: list[list[int]]
    kept_now: list[list[int]]
    layer_lengths: list[int]
    kv_bytes: int
    kv_bytes_full: int
    peak_kv_bytes: int
    peak_bound_bytes: int
    metadata_bytes: int
    uncompressed_tail: int = 0
    padding_bytes: int = 0
    spare_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self, row: int = 0) -> str:
        """A few human-readable lines about one row."""
        if not self.prompt_tokens:
            return "no prefill recorded"
        kept = self.kept_after_prefill[row] if self.kept_after_prefill else []
        mib = 1 / 2**20
        lines = [
            f"method: {self.method['name']} "
            + ", ".join(f"{k}={v}" for k, v in self.method.items()
                        if k not in ("name", "scorer", "allocator") and v is not None),
            f"prompt tokens: {self.prompt_tokens[row]}; compressed layers: {len(self.layers)}",
            f"kept per layer after prefill: min {min(kept, default=0)}, max {max(kept, default=0)}, "
            f"total {sum(kept)} of {self.prompt_tokens[row] * len(self.layers)}",
            f"KV memory now: {self.kv_bytes * mib:.2f} MiB vs {self.kv_bytes_full * mib:.2f} MiB full "
            f"({100 * self.kv_bytes / max(self.kv_bytes_full, 1):.1f}%)",
            f"peak KV memory during prefill: {self.peak_kv_bytes * mib:.2f} MiB",
        ]
        return "\n".join(lines)
