"""What a cache holds, counted without building it: the bytes of one entry of a layer, and the entries each
compressed layer's fixed-shape decoding buffers hold once sized for an answer.

An evaluation that answers several samples in one batch reports each row's memory as a batch of one would hold it;
these are the engine's own rules for that count, so that it never re-derives them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from transformers.cache_utils import DynamicCache, DynamicLayer

from kvcake.engines.transformers.compat import text_config
from kvcake.methods.budget import DecodeSchedule, RequestBudget


def full_attention_only(model: Any) -> bool:
    """Whether the model's cache has only plain full-attention layers (a sliding-window layer keeps transformers'
    own bounded cache, whose size is not counted here)."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=text_config(model)).layers)


def entry_bytes(layer: Any) -> int:
    """Bytes of one entry (one token of one row, every KV head) of a cache layer holding tokens."""
    keys, values = layer.keys, layer.values
    return keys.shape[1] * (keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size())


def row_plan(plan: RequestBudget, row: int) -> RequestBudget:
    """The budgets of one row of a batch's plan, as a batch of one holding that row alone has them (a copy)."""
    alone = copy.deepcopy(plan)
    alone.select_rows([row])
    return alone


@dataclass(frozen=True)
class DecodeSizing:
    """How a cache sizes its layers' decoding buffers (the one rule, for :class:`KVCakeCache` and for counting).

    ``capacities``: slots per compressed layer; ``schedule``: the decode schedule the buffers follow (None: the method
    evicts nothing while decoding); ``sized_for``: tokens past the prompt the buffers have room for (unbounded when the
    schedule is stable: a layer that evicts holds a constant size).
    """

    capacities: list[int]
    schedule: DecodeSchedule | None
    sized_for: int


#: ``DecodeSizing.sized_for`` of buffers that never fill up (a stable decode schedule).
UNBOUNDED = 1 << 62


def decode_sizing(method: Any, plan: RequestBudget | None, held: list[int], grown: int, horizon: int) -> DecodeSizing:
    """The decoding buffers ``KVCakeCache`` sizes for ``horizon`` more tokens, when each compressed layer holds
    ``held`` entries and ``grown`` tokens have been fed past the prompt: per layer, the most it ever holds under
    ``plan``'s decode schedule plus the slot the next token is written into, or, for a method that does not evict
    while decoding, its entries plus the horizon."""
    if not method.decode_eviction:
        return DecodeSizing([n + horizon for n in held], None, grown + horizon)
    assert plan is not None
    schedule = plan.decode_schedule(grown + horizon)
    return DecodeSizing([schedule.capacity(slot, n) for slot, n in enumerate(held)], schedule,
                        grown + (UNBOUNDED if schedule.stable else horizon))


def decode_capacity(method: Any, plan: RequestBudget | None, held: list[int], grown: int, horizon: int) -> list[int]:
    """Entries per compressed layer of the decoding buffers (:func:`decode_sizing`). ``tests/test_sizing.py`` checks
    it against a cache's buffers."""
    return decode_sizing(method, plan, held, grown, horizon).capacities


__all__ = ["UNBOUNDED", "DecodeSizing", "decode_capacity", "decode_sizing", "entry_bytes", "full_attention_only",
           "row_plan"]
