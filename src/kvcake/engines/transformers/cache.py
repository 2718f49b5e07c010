"""A transformers cache whose full-attention layers can hold different numbers of tokens.

:class:`KVCakeCache` stores each full-attention layer in a
:class:`~kvcake.engines.transformers.storage.CompressedLayer`, scores a layer when its prefill ends (through the
method's scorer and allocator) and evicts what the request's :class:`~kvcake.methods.budget.RequestBudget` says, keeps
the memory figures, and builds the report. Sliding-window layers (Gemma-2/3, Mistral with a window) keep transformers'
own bounded cache and are left out of the allocation.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from kvcake.engines.transformers import turns
from kvcake.engines.transformers.errors import UnsupportedCacheError
from kvcake.engines.transformers.masks import key_valid
from kvcake.engines.transformers.prefill import PrefillLayer, Stage
from kvcake.engines.transformers.report import Report
from kvcake.engines.transformers.storage import CompressedLayer, cache_kv_bytes, layer_kv_bytes
from kvcake.methods.attention import NonFiniteAttentionError
from kvcake.methods.base import Method
from kvcake.methods.budget import RequestBudget
from kvcake.methods.views import LayerView

#: Who may feed a cache without a compress block's forward: :func:`kvcake.engines.transformers.replay.replay`.
REPLAY = "replay"


#: Generated tokens the decoding buffers are sized for when the caller does not say.
HORIZON = 32


class KVCakeCache(DynamicCache):
    """Dynamic cache whose full-attention layers are compressed by a kvcake method.

    Create it through :func:`kvcake.compress` or :meth:`Compression.new_cache`.
    """

    @classmethod
    def adopt(cls, cache: DynamicCache, config: Any, method: Method) -> KVCakeCache:
        """Turn an empty :class:`DynamicCache` the caller passed in into a kvcake cache, in place.

        The caller's object itself becomes compressed (its class and layers change), so a hand-written loop that
        keeps passing its own cache keeps its context. A cache of another kind, or one that already holds tokens,
        cannot be compressed: :class:`UnsupportedCacheError`.
        """
        if type(cache) is not DynamicCache:
            raise UnsupportedCacheError(
                f"kvcake compresses a DynamicCache or its own cache; got a {type(cache).__name__}: pass no cache, a "
                "DynamicCache, or press.new_cache()")
        held = cache.get_seq_length()
        if held:
            raise UnsupportedCacheError(
                f"the cache passed in already holds {held} tokens (a prefix from an earlier forward); kvcake "
                "compresses a request from its first token: pass an empty cache, or the kvcake cache of that earlier "
                "request")
        fresh = cls(config, method)
        cache.__class__ = cls
        cache.__dict__.clear()
        cache.__dict__.update(fresh.__dict__)
        return cache  # type: ignore[return-value]

    def __init__(self, config: Any, method: Method) -> None:
        super().__init__(config=config)
        #: The decoder configuration of the model the cache was made for: it continues on that model only.
        self.model_config = config
        #: The compress block whose forward is feeding the cache now (set and cleared around each forward by the
        #: block's hooks), or :data:`REPLAY`. None: no block is running the cache, and ``update`` refuses: a forward
        #: outside the block would read the compressed or slot-laid-out entries as a plain cache.
        self.feeder: Any = None
        for i, layer in enumerate(self.layers):
            if type(layer) is DynamicLayer:
                self.layers[i] = CompressedLayer()
        self.method = method
        self.compressible = [i for i, layer in enumerate(self.layers) if isinstance(layer, CompressedLayer)]
        self._slot = {layer_idx: n for n, layer_idx in enumerate(self.compressible)}
        self.plan: RequestBudget | None = None  # the request's budgets, from its first prefilled layer on
        self._pending: list[Stage] = []  # cascade stages whose shares are on their way to the host
        self._bad_scores: torch.Tensor | None = None  # a device flag: some layer scored NaN
        self.prompt_valid: torch.Tensor | None = None  # (B, S) False on the prompt's padding
        self.prefill_kept: list[list[int]] | None = None
        #: Tokens the caller will generate, when known (``generate``'s ``max_new_tokens``): the decoding buffers are
        #: sized for them once. Unknown (None): sized for :data:`HORIZON` and regrown outside compiled code.
        self.decode_horizon: int | None = None
        #: Freeze into the fixed-shape decoding layout as soon as prefill ends (compiled decoding needs it then).
        self.freeze_after_prefill = False
        #: Decoding runs compiled: transformers may treat the cache as compileable (fixed shapes after prefill).
        self.compiled = False
        #: Tokens at the end of the prompt left uncompressed and always kept (the chat template's tail under the
        #: ``tail`` protocol): the scorers see the prompt without them, the allocation counts without them.
        self.tail = 0
        self._frozen_for: int | None = None  # generated tokens the decoding buffers are sized for
        self._nonfinite: torch.Tensor | None = None
        self.peak_kv_bytes = 0
        self._scored_this_step = False
        #: A dict here makes the prefill record every layer's attention inputs
        #: (:mod:`kvcake.engines.transformers.replay`).
        self.recorder: dict | None = None
        #: With a recorder: keep only the last this-many queries of each layer (None: all of them).
        self.record_queries: int | None = None

    @property
    def is_compileable(self) -> bool:
        """Compileable when compiled decoding was asked for and every layer can decode in fixed shapes."""
        return self.compiled and all(getattr(layer, "is_compileable", False) for layer in self.layers)

    # -- the request -------------------------------------------------------------------------------------------------
    @property
    def prompt_tokens(self) -> list[int] | None:
        """Real (non-padding) prompt tokens per row, once the prefill has started."""
        return None if self.plan is None else [n + self.plan.tail for n in self.plan.prompt_tokens]

    def compressed_layer(self, layer_idx: int) -> CompressedLayer | None:
        """The layer's storage if kvcake compresses it (None for sliding-window and unknown layers)."""
        return self.layers[layer_idx] if layer_idx in self._slot else None  # type: ignore[return-value]

    def layers_in_order(self) -> list[CompressedLayer]:
        return [self.layers[i] for i in self.compressible]  # type: ignore[misc]

    def reset(self) -> None:
        """Empty every layer and forget the request (prompt, budgets, scores), ready for a new prefill."""
        super().reset()
        self.plan, self.prefill_kept, self.prompt_valid = None, None, None
        self._pending, self._bad_scores = [], None
        self.peak_kv_bytes = 0
        self._scored_this_step = False
        self._frozen_for = None
        if self._nonfinite is not None:
            self._nonfinite.zero_()  # kept, at the same address, for the next request

    def _reorder_rows(self, rows: list[int]) -> None:
        """Keep the per-row request state in step with the rows of the tensors (beam search, batch selection)."""
        if self.plan is None:
            return
        self.plan.select_rows(rows)
        if self.prefill_kept is not None:
            self.prefill_kept = [self.prefill_kept[i] for i in rows]
        if self.prompt_valid is not None:
            self.prompt_valid = self.prompt_valid[torch.as_tensor(rows, device=self.prompt_valid.device)]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._reorder_rows(beam_idx.tolist())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices`` (e.g. dropping the finished rows of a batch): the layers go back to the
        prefill layout and the next single-token step sizes new decoding buffers for the rows that remain."""
        super().batch_select_indices(indices)
        self._reorder_rows(torch.as_tensor(indices).tolist())
        self._frozen_for = None

    @property
    def is_croppable(self) -> bool:
        """Whether :meth:`crop` puts the cache back as it was: not under decode-time eviction."""
        return not self.method.decode_eviction and all(getattr(layer, "is_croppable", True) for layer in self.layers)

    def crop(self, max_length: int) -> None:
        """Forget the newest ``-max_length`` tokens (a count <= 0), as prompt-lookup and assisted decoding do with
        rejected draft tokens: see :func:`kvcake.engines.transformers.turns.crop`."""
        turns.crop(self, max_length)

    # -- memory accounting -------------------------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        """Bytes of keys and values held now, all layers."""
        return cache_kv_bytes(self)

    def metadata_bytes(self) -> int:
        """Bytes of kvcake's own bookkeeping (kept positions, slot order)."""
        tables = [table for layer in self.layers_in_order() for table in (
            (layer.positions,) if layer.slots is None else
            (layer.slots.positions, layer.slots.count, layer.slots.stored, layer.slots.targets)) if table is not None]
        return sum(t.numel() * t.element_size() for t in tables)

    def kv_bytes_full(self) -> int:
        """What the same cache would hold without eviction."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, CompressedLayer) and layer.keys is not None and layer.values is not None:
                batch, heads, _, k_dim = layer.keys.shape
                v_dim = layer.values.shape[-1]
                per_token = k_dim * layer.keys.element_size() + v_dim * layer.values.element_size()
                total += batch * heads * layer.logical_length() * per_token
            else:
                total += layer_kv_bytes(layer)
        return total

    def _track_peak(self) -> None:
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes())

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.feeder is None:
            raise UnsupportedCacheError(turns.UNFED)
        if self.prefill_kept is not None and not torch.compiler.is_compiling() and layer_idx in self._slot:
            if key_states.shape[2] > 1:
                self._frozen_for = None  # the layers go back to the prefill layout for a multi-token feed
            elif self._slot[layer_idx] == 0:
                self._ensure_frozen()
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.prefill_kept is None:  # peak is a prefill figure
            self._track_peak()
        return out

    # -- prefill -----------------------------------------------------------------------------------------------------
    def record(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, query: torch.Tensor | None = None,
               key_valid: torch.Tensor | None = None, scaling: float | None = None, softcap: float | None = None,
               positions: torch.Tensor | None = None, rotary: Any = None) -> None:
        """With a recorder set, keep a copy of what the layer's prefill attention saw (once per layer)."""
        if self.recorder is None or layer_idx in self.recorder:
            return
        if query is not None and self.record_queries is not None and self.record_queries < query.shape[2]:
            # A slice keeps the whole tensor alive: copy the rows kept so the full queries can be freed.
            query = query[:, :, -self.record_queries:].clone()
        self.recorder[layer_idx] = PrefillLayer(key.clone(), value.clone(), query, key_valid, scaling, softcap,
                                                positions, rotary)

    def prefill_key_valid(self, attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """The prompt's non-padding columns ``(B, S)`` (None: no padding), read from the mask once per prefill."""
        if self.plan is not None:  # every layer of a prefill sees the same mask
            return self.prompt_valid
        return key_valid(attention_mask, length)

    @torch.no_grad()
    def prefill_layer(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None,
                      key_valid: torch.Tensor | None, scaling: float, softcap: float | None,
                      positions: torch.Tensor | None = None, rotary: Any = None) -> None:
        """Score a prefilled layer under the method, then evict (cascade) or wait for the last layer."""
        tail = self.tail
        if self.plan is None:
            prompt = [key.shape[2]] * key.shape[0] if key_valid is None else [int(n) for n in key_valid.sum(-1)]
            self.plan = RequestBudget(self.method, len(self.compressible), [n - tail for n in prompt], key.shape[2],
                                      tail)
            self.prompt_valid = key_valid
        method = self.method
        slot = self._slot[layer_idx]
        seen = key.shape[2] - tail  # what the scorer and the allocator see: the prompt without its tail
        view = LayerView(query=query[:, :, : query.shape[2] - tail], keys=key[:, :, :seen], scaling=scaling,
                         key_valid=None if key_valid is None else key_valid[:, :seen], softcap=softcap, layer=slot,
                         num_layers=len(self.compressible), values=None if value is None else value[:, :, :seen],
                         positions=None if positions is None else positions[..., :seen], rotary=rotary,
                         check_finite=False)
        preference = method.allocator.preference(view, method.window)
        scores = method.scorer.prefill(view, method.window)
        if tail:
            scores = torch.cat([scores, scores.new_full((*scores.shape[:2], tail), float("inf"))], dim=-1)
        if key_valid is not None:
            scores = scores.masked_fill(~key_valid.to(scores.device)[:, None, :], float("-inf"))
        layer = self.layers[layer_idx]
        assert isinstance(layer, CompressedLayer)
        layer.scores = scores
        layer.valid_counts = [n + tail for n in self.plan.prompt_tokens]
        bad = torch.isnan(scores).any()  # NaN or inf logits make NaN scores: checked once, at the end
        self._bad_scores = bad if self._bad_scores is None else self._bad_scores | bad
        if self.plan.push(preference, key.device):
            self._pending.append(Stage(self.plan.seen, self.plan.device_shares()))
        last = self.plan.seen == len(self.compressible)
        self._apply_stages(wait=last)
        if last:
            self._finish_prefill()

    def _apply_stages(self, wait: bool) -> None:
        """Evict to the newest stage whose shares have reached the host.

        The shares of each cascade stage are computed on the device and copied back without waiting; a stage is
        applied once its copy has landed (on the CPU at once), so the host never stalls the device mid-prefill. As
        shares never grow from stage to stage and eviction is nested, applying a later stage directly gives what
        applying every stage in turn gives. ``wait``: the last layer, everything is applied.
        """
        ready = [i for i, stage in enumerate(self._pending) if wait or stage.ready()]
        if not ready:
            return
        stage = self._pending[ready[-1]]
        del self._pending[: ready[-1] + 1]
        assert self.plan is not None
        self.plan.set_shares(stage.host())
        self._evict_seen(stage.layers)

    def _evict_seen(self, layers: int) -> None:
        """Evict the first ``layers`` layers down to their shares at the latest stage applied."""
        assert self.plan is not None
        for slot in range(layers):
            if self.plan.keeps_everything(slot):
                continue  # the layer keeps every real token: leave it untouched (bit-identical to a full cache)
            layer = self.layers[self.compressible[slot]]
            assert isinstance(layer, CompressedLayer) and layer.scores is not None
            ranked = layer.ranking(layer.scores, self.method.window + self.tail)
            layer.keep(self.plan.keep_counts(slot, ranked), ranked)
        self._track_peak()

    def _finish_prefill(self) -> None:
        assert self.plan is not None
        self.plan.finish_device()
        if self._bad_scores is not None and bool(self._bad_scores):
            raise NonFiniteAttentionError("attention logits of the prefill contain NaN or inf; refusing to score "
                                          "tokens on them")
        keep_scores = self.method.decode_eviction and self.method.scorer.keeps_scores
        layers = self.layers_in_order()
        for layer in layers:
            if not keep_scores:
                layer.scores = None
        assert self.plan is not None
        self.prefill_kept = [[layer.valid_counts[row] for layer in layers]  # type: ignore[index]
                             for row in range(self.plan.rows)]
        if self.freeze_after_prefill:
            self._freeze(self.decode_horizon or HORIZON)

    # -- the decoding layout -----------------------------------------------------------------------------------------
    def _ensure_frozen(self) -> None:
        """Before a single-token step reaches the first compressed layer: the layers in fixed-shape buffers with room
        for the step (host-side checks only; nothing here runs inside compiled code)."""
        if self._frozen_for is None:
            self._freeze(self.decode_horizon or HORIZON)
            return
        first = self.layers_in_order()[0]
        done = first.seen - (self.plan.prefill_length if self.plan is not None else 0)
        if done >= self._frozen_for:  # the buffers are full: regrow them (a copy, outside compiled code)
            for layer in self.layers_in_order():
                layer.thaw()
            self._freeze(max(2 * self._frozen_for, HORIZON) - done)

    def _freeze(self, horizon: int) -> None:
        """Size each layer's decoding buffers for ``horizon`` more tokens and move its entries there."""
        plan = self.plan
        assert plan is not None
        layers = self.layers_in_order()
        grown = layers[0].seen - plan.prefill_length if layers else 0
        schedule = plan.decode_schedule(grown + horizon) if self.method.decode_eviction else None
        keep_scores = self.method.decode_eviction and self.method.scorer.keeps_scores
        for slot, layer in enumerate(layers):
            length = layer.length
            if schedule is None:
                layer.freeze(length + horizon, None, plan.prefill_length, 0, keep_scores, self.prompt_valid)
                continue
            layer.freeze(schedule.capacity(slot, length), schedule.layer(slot), plan.prefill_length,
                         schedule.max_drops(slot), keep_scores, self.prompt_valid)
        self._frozen_for = grown + (horizon if schedule is None or not schedule.stable else 1 << 62)
        if layers and layers[0].keys is not None and self._nonfinite is None:
            self._nonfinite = torch.zeros((), dtype=torch.bool, device=layers[0].keys.device)
            torch._dynamo.mark_static_address(self._nonfinite)

    def check_finite(self) -> None:
        """Raise what a compiled decoding step could only flag (compiled code cannot raise mid-step): NaN or inf
        attention, or more tokens than the decoding buffers were sized for."""
        if self._nonfinite is not None and bool(self._nonfinite):
            self._nonfinite.zero_()
            raise NonFiniteAttentionError("attention at decode time produced NaN or inf")
        if any(bool(layer.slots.overflow) for layer in self.layers_in_order() if layer.slots is not None):
            raise RuntimeError(f"more tokens were decoded than the decoding buffers were sized for "
                               f"({self.decode_horizon} new tokens): pass max_new_tokens to generate, compress() or "
                               "new_cache() (compiled decoding cannot regrow them)")

    # -- decoding ----------------------------------------------------------------------------------------------------
    def decoding(self) -> bool:
        """Whether the prefill is over and the method holds the budget while decoding."""
        return self.method.decode_eviction and self.prefill_kept is not None

    def decode_targets(self, logical_len: int) -> list[list[int]]:
        assert self.plan is not None
        return self.plan.decode_targets(logical_len)

    def end_layer(self, layer_idx: int, scored: bool, out) -> None:
        """After a compressed layer's decoding step: note whether it scored its entries and, after the last one,
        check the step (one host sync per step, not one per layer).

        NaN or inf in a layer's attention probabilities makes that layer's output NaN, and NaN stays NaN through
        every later layer (residual additions, norms, projections), so the last compressed layer's attention output
        is finite exactly when no layer scored on garbage this step.
        """
        if self._slot[layer_idx] != len(self.compressible) - 1:
            if not torch.compiler.is_compiling():
                self._scored_this_step = self._scored_this_step or scored
            return
        if torch.compiler.is_compiling():  # no host sync in compiled code: flag it, raise at the next check
            if self._nonfinite is not None:
                hidden = out[0] if isinstance(out, tuple) else out
                self._nonfinite.logical_or_(~torch.isfinite(hidden.sum()))
            return
        if self._scored_this_step or scored:
            self._scored_this_step = False
            hidden = out[0] if isinstance(out, tuple) else out
            if not bool(torch.isfinite(hidden.sum())):
                raise NonFiniteAttentionError("attention at decode time produced NaN or inf")

    # -- reading what happened -----------------------------------------------------------------------------------------
    def report(self) -> Report:
        """What the request did: budgets, kept lengths and memory
        (see :class:`~kvcake.engines.transformers.report.Report`)."""
        self.check_finite()
        plan, layers = self.plan, self.layers_in_order()
        rows = 0 if plan is None else plan.rows
        entry_bytes = max((layer.slot_bytes() // max(rows, 1) for layer in layers), default=0)
        other = self.kv_bytes() - sum(layer.nbytes() for layer in layers)
        bound = 0
        if plan is not None:
            worst = max(plan.totals) + (len(layers) - 1) * self.method.window
            bound = rows * entry_bytes * (worst + plan.prefill_length) + other
        padding = sum(layer.padding_bytes() for layer in layers)
        return Report(
            method=self.method.parameters(), layers=list(self.compressible),
            prompt_tokens=[] if plan is None else [n + plan.tail for n in plan.prompt_tokens],
            uncompressed_tail=0 if plan is None else plan.tail,
            total_budget=[] if plan is None else list(plan.totals),
            preferences=[] if plan is None else [list(p) for p in plan.preferences],
            budgets=[] if plan is None else plan.budgets(),
            kept_after_prefill=[list(r) for r in (self.prefill_kept or [])],
            kept_now=[list(row) for row in zip(*(layer.kept_per_row(rows) for layer in layers), strict=True)]
            if layers and rows else [],
            layer_lengths=[layer.length for layer in layers], kv_bytes=self.kv_bytes(),
            kv_bytes_full=self.kv_bytes_full(), peak_kv_bytes=self.peak_kv_bytes, peak_bound_bytes=bound,
            metadata_bytes=self.metadata_bytes(), padding_bytes=padding,
            spare_bytes=sum(layer.spare_bytes() for layer in layers),
        )


__all__ = ["CompressedLayer", "KVCakeCache", "PrefillLayer", "UnsupportedCacheError", "cache_kv_bytes"]
