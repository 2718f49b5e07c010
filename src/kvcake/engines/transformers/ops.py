"""A decoding step's slot work as operators that torch.compile calls but does not trace into.

Compiled decoding (``compress(..., compile=True)``) traces the model's forward into one graph. Each evicting layer's
slots have a capacity of their own (CAKE's budgets differ per layer and per prompt), so the slot axis of every layer
is a symbolic size of its own. Traced, each layer's slot write, its attention over the slots and the step's eviction
are operators over thirty such sizes, which dynamo, AOT autograd and inductor reason about slowly: on SmolLM2 they
made the compile 2.6 times the plain static cache's (docs/performance.md, issue 23).

Registered here as operators of the ``kvcake`` torch library (``torch.ops.kvcake``), with fake implementations that
give their outputs' shapes, they are three kinds of node in the graph, and what the graph computes around them is the
model's own work, of fixed shapes, as with a plain cache. The operators' declared writes (``Tensor(a!)``) keep them in
order with everything else that reads or writes those tensors.

* ``slot_attention``: one query per head over a layer's slots: the output and the probabilities (the scores' input);
* ``slot_write``: the new token into the slot chosen for it;
* ``evict_group``: the step's decode-time eviction of every evicting layer in one batch
  (:class:`~kvcake.engines.transformers.group.LayerGroup`, found from the group's ``index`` tensor). It is given
  every tensor a step writes, and the cursor; from the group it reads only what no step writes (its method, the
  layers' capacities and padding, the schedules).

Eager decoding calls the same operators (a few microseconds of dispatch each), so eager and compiled decoding run one
code and give the same tokens. The library is defined when this module is first imported; it patches nothing.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

_LIBRARY = torch.library.Library("kvcake", "DEF")
_LIBRARY.define("slot_attention(Tensor query, Tensor keys, Tensor values, Tensor positions, float scaling, "
                "float? softcap) -> (Tensor, Tensor)")
_LIBRARY.define("slot_write(Tensor key, Tensor value, Tensor(a!) keys, Tensor(b!) values, Tensor(c!) positions, "
                "Tensor(d!) count, Tensor(e!) cursor, Tensor(f!) overflow, Tensor(g!)? stored, "
                "Tensor? next_slot) -> ()")
_LIBRARY.define("evict_group(Tensor index, Tensor[] probs, Tensor(a!) order, Tensor(b!)[] nexts, "
                "Tensor(c!)[] positions, Tensor(d!)[] counts, Tensor(e!) overflow, Tensor cursor) -> ()")

#: The live layer groups by the address of their ``index`` tensor (an allocation of their own, never written after
#: it is made, so a compiled graph passes it as it is).
_GROUPS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def register_group(group: Any, index: torch.Tensor) -> None:
    """Let :func:`evict_group` find ``group`` from its ``index`` tensor."""
    _GROUPS[index.data_ptr()] = group


def slot_probs(query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, scaling: float,
               softcap: float | None) -> torch.Tensor:
    """Attention ``(B, Hkv, G, C)`` in float32 of one query per head over a layer's slots, free slots (position -1)
    at zero.

    The values of :func:`kvcake.methods.attention.attention_probs` with the free slots masked, bit for bit, in fewer
    operators: the scaling is applied in place, and the masked probabilities need no second masking, since the
    newest token always holds a slot (exp of the most negative float minus a finite logit is exactly 0). The mask
    is added: the most negative float times 1 for a free slot (the positions clamped at 0 give -1), times 0 for a
    token, whose logit stays as it was; a finite logit added to the most negative float rounds back to it, so the
    logits are those of a masked fill, at a third of its time on the CPU.
    """
    batch, q_heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    logits = torch.matmul(query.float().reshape(batch, kv_heads, q_heads // kv_heads, dim),
                          keys.float().transpose(-1, -2))
    logits.mul_(scaling)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    free = positions.clamp(max=0).to(logits.dtype).unsqueeze(2)  # -1 for a free slot, 0 for a token
    return torch.softmax(logits.add_(free, alpha=torch.finfo(torch.float32).max), dim=-1)


def _slot_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                    scaling: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output ``(B, 1, Hq, Dv)`` in the query's dtype and its probabilities ``(B, Hkv, G, C)``."""
    batch, q_heads = query.shape[:2]
    probs = slot_probs(query, keys, positions, scaling, softcap)
    out = torch.matmul(probs.to(values.dtype), values).view(batch, 1, q_heads, -1).to(query.dtype)
    return out, probs


def _slot_attention_shapes(query, keys, values, positions, scaling, softcap):
    batch, q_heads = query.shape[:2]
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    return (query.new_empty(batch, 1, q_heads, values.shape[-1]),
            query.new_empty(batch, kv_heads, q_heads // kv_heads, capacity, dtype=torch.float32))


def _slot_write(key: torch.Tensor, value: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                positions: torch.Tensor, count: torch.Tensor, cursor: torch.Tensor, overflow: torch.Tensor,
                stored: torch.Tensor | None, next_slot: torch.Tensor | None) -> None:
    """Store one new token per row and head ``(B, Hkv, 1, D)`` in ``next_slot`` (chosen by the layer's group, which
    checks for overflow) or else the first free slot, at the logical cursor (see :meth:`Slots.write`)."""
    batch, heads, capacity = positions.shape
    if next_slot is not None:
        free = next_slot
    else:
        # The first free slot is the first minimum of the positions (free slots hold -1, tokens their position >= 0).
        free = positions.argmin(dim=-1)  # (B, H)
        # A row with no free slot would overwrite its oldest token: flagged (the cache raises at its next check), so
        # it can never pass unnoticed; the buffers are sized so that it does not happen.
        overflow.logical_or_((positions.gather(-1, free.unsqueeze(-1)) >= 0).any())
    # index_copy_ on flattened views writes one row per head: a scatter_ along the slot axis would copy the buffer.
    flat = (free + torch.arange(batch * heads, device=free.device).view(batch, heads) * capacity).view(-1)
    keys.view(-1, keys.shape[-1]).index_copy_(0, flat, key.reshape(batch * heads, -1))
    values.view(-1, values.shape[-1]).index_copy_(0, flat, value.reshape(batch * heads, -1).to(values.dtype))
    positions.view(-1).index_copy_(0, flat, cursor.expand(batch * heads))
    if stored is not None:
        stored.view(-1).index_fill_(0, flat, 0.0)
    count.add_(1)
    cursor.add_(1)


def _evict_group(index: torch.Tensor, probs: list[torch.Tensor], order: torch.Tensor, nexts: list[torch.Tensor],
                 positions: list[torch.Tensor], counts: list[torch.Tensor], overflow: torch.Tensor,
                 cursor: torch.Tensor) -> None:
    group = _GROUPS.get(index.data_ptr())
    if group is None:
        raise RuntimeError("kvcake::evict_group was given the index of no live layer group")
    group.evict_tensors(probs, order, nexts, positions, counts, overflow, cursor)


def _nothing(*args) -> None:
    return None


for _name, _kernel in (("slot_attention", _slot_attention), ("slot_write", _slot_write),
                       ("evict_group", _evict_group)):
    _LIBRARY.impl(_name, _kernel, "CompositeExplicitAutograd")
torch.library.register_fake("kvcake::slot_attention", _slot_attention_shapes, lib=_LIBRARY)
torch.library.register_fake("kvcake::slot_write", _nothing, lib=_LIBRARY)
torch.library.register_fake("kvcake::evict_group", _nothing, lib=_LIBRARY)


def slot_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                   scaling: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``kvcake::slot_attention``: the output ``(B, 1, Hq, Dv)`` and probabilities ``(B, Hkv, G, C)`` of one query per
    head over a layer's slots (:func:`slot_probs`)."""
    out, probs = torch.ops.kvcake.slot_attention(query, keys, values, positions, float(scaling), softcap)
    return out, probs


__all__ = ["register_group", "slot_attention", "slot_probs"]
