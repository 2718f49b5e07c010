"""Reading transformers' attention masks: the one parser of the project.

Transformers hands attention functions a mask built for the logical sequence: ``(B, S)`` padding masks for
flash-attention, ``(B, 1, q, S)`` boolean (sdpa) or additive float (eager) masks otherwise, or None when nothing is
masked. kvcake needs two things from it: which prompt columns are padding (at prefill) and which logical columns each
query may see (after eviction, to build a layer's own mask over its kept positions).
"""

from __future__ import annotations

import torch


def allowed_columns(attention_mask: torch.Tensor | None, q_len: int, logical_len: int) -> torch.Tensor | None:
    """Transformers' mask as bool ``(B, q_len, logical_len)`` (True = may attend), or None when there is none."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:  # flash-attention style: (B, logical_len) padding mask
        mask = attention_mask.bool()[:, None, :].expand(-1, q_len, -1)
    elif attention_mask.dim() == 4:
        mask = attention_mask[:, 0]
        mask = mask if mask.dtype == torch.bool else mask == 0
    else:
        raise ValueError(f"unexpected attention mask of shape {tuple(attention_mask.shape)}")
    if mask.shape[-1] != logical_len:
        raise ValueError(
            f"attention mask covers {mask.shape[-1]} positions but the sequence has {logical_len}; kvcake needs the "
            "mask of the full logical sequence"
        )
    return mask[:, -q_len:]


def key_valid(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """Non-padding columns ``(B, S)`` of a prefill mask (the last query sees every real key), or None if all are."""
    allowed = allowed_columns(attention_mask, 1, attention_mask.shape[-1]) if attention_mask is not None else None
    if allowed is None:
        return None
    valid = allowed[:, 0, :length]
    return None if bool(valid.all()) else valid


__all__ = ["allowed_columns", "key_valid"]
