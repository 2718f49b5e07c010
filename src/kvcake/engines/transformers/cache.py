"""A transformers cache whose full-attention layers can hold different numbers of tokens.

:class:`KVCakeCache` stores each full-attention layer in a
:class:`~kvcake.engines.transformers.storage.CompressedLayer`, scores a layer when its prefill ends (through the
method's scorer and allocator) and evicts what the request's :class:`~kvcake.methods.budget.RequestBudget` says, keeps
the memory figures, and builds the report. Sliding-window layers (Gemma-2/3, Mistral with a window) keep transformers'
own bounded cache and are left out of the allocation. How a request moves through it (its phases, and what moves it
from one to the next) is written in :mod:`kvcake.engines.transformers.state`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from kvcake.engines.transformers import turns
from kvcake.engines.transformers.errors import UnsupportedCacheError
from kvcake.engines.transformers.group import LayerGroup
from kvcake.engines.transformers.masks import key_valid
from kvcake.engines.transformers.prefill import PrefillLayer, Recording, Stage
from kvcake.engines.transformers.report import Report
from kvcake.engines.transformers.sizing import decode_sizing
from kvcake.engines.transformers.state import Memory, Phase, Request, Settings
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
        self.settings = Settings()  # what the session decided (horizon, compiled decoding, tail)
        self.request = Request()  # the request held now: its phase and per-request state (see state.py)
        self.memory = Memory()  # the request's peak memory
        #: A :class:`Recording` here makes the prefill record every layer's attention inputs
        #: (:mod:`kvcake.engines.transformers.replay`).
        self.recording: Recording | None = None
        #: Layer index -> the group whose decode-time eviction it runs in, one batch per step (a layer not here
        #: evicts on its own).
        self.layer_groups: dict[int, LayerGroup] = {}

    @property
    def is_compileable(self) -> bool:
        """Compileable when compiled decoding was asked for and every layer can decode in fixed shapes."""
        return self.settings.compiled and all(getattr(layer, "is_compileable", False) for layer in self.layers)

    @property
    def decode_horizon(self) -> int | None:
        """Tokens the decoding buffers are sized for (:attr:`Settings.decode_horizon`)."""
        return self.settings.decode_horizon

    @decode_horizon.setter
    def decode_horizon(self, tokens: int | None) -> None:
        self.settings.decode_horizon = tokens

    # -- the request -------------------------------------------------------------------------------------------------
    @property
    def plan(self) -> RequestBudget | None:
        """The request's budgets, from its first prefilled layer on."""
        return self.request.plan

    @property
    def prompt_tokens(self) -> list[int] | None:
        """Real (non-padding) prompt tokens per row, once the prefill has started."""
        plan = self.request.plan
        return None if plan is None else [n + plan.tail for n in plan.prompt_tokens]

    def compressed_layer(self, layer_idx: int) -> CompressedLayer | None:
        """The layer's storage if kvcake compresses it (None for sliding-window and unknown layers)."""
        return self.layers[layer_idx] if layer_idx in self._slot else None  # type: ignore[return-value]

    def slot_of(self, layer_idx: int) -> int:
        """The index of a compressed layer among the compressed layers (its column in budgets and targets)."""
        return self._slot[layer_idx]

    def layers_in_order(self) -> list[CompressedLayer]:
        return [self.layers[i] for i in self.compressible]  # type: ignore[misc]

    def reset(self) -> None:
        """Empty every layer and forget the request (prompt, budgets, scores), ready for a new prefill."""
        super().reset()
        self.request.clear()
        self.memory = Memory()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.request.select_rows(beam_idx.tolist())
        if self.request.phase is Phase.DECODING:
            for group in set(self.layer_groups.values()):
                group.resort()  # the rows moved in place under the group's position order

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices`` (e.g. dropping the finished rows of a batch): the layers go back to the
        prefill layout and the next single-token step sizes new decoding buffers for the rows that remain."""
        super().batch_select_indices(indices)
        self.request.select_rows(torch.as_tensor(indices).tolist())
        self.request.thawed()

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
        return sum(layer.metadata_bytes() for layer in self.layers_in_order())

    def kv_bytes_full(self) -> int:
        """What the same cache would hold without eviction."""
        return sum(layer.nbytes_full() if isinstance(layer, CompressedLayer) else layer_kv_bytes(layer)
                   for layer in self.layers)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.feeder is None:
            raise UnsupportedCacheError(turns.UNFED)
        if self.request.prefill_done and not torch.compiler.is_compiling() and layer_idx in self._slot:
            if key_states.shape[2] > 1:
                self.request.thawed()  # the layers go back to the prefill layout for a multi-token feed
            elif self._slot[layer_idx] == 0:
                self.ensure_frozen()
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if not self.request.prefill_done:  # peak is a prefill figure
            self.memory.track(self.kv_bytes())
        return out

    # -- prefill -----------------------------------------------------------------------------------------------------
    def record(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, query: torch.Tensor | None = None,
               key_valid: torch.Tensor | None = None, scaling: float | None = None, softcap: float | None = None,
               positions: torch.Tensor | None = None, rotary: Any = None) -> None:
        """While recording, keep a copy of what the layer's prefill attention saw (once per layer)."""
        recording = self.recording
        if recording is None or layer_idx in recording.layers:
            return
        if query is not None and recording.queries is not None and recording.queries < query.shape[2]:
            # A slice keeps the whole tensor alive: copy the rows kept so the full queries can be freed.
            query = query[:, :, -recording.queries:].clone()
        recording.layers[layer_idx] = PrefillLayer(key.clone(), value.clone(), query, key_valid, scaling, softcap,
                                                positions, rotary)

    def prefill_key_valid(self, attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """The prompt's non-padding columns ``(B, S)`` (None: no padding), read from the mask once per prefill."""
        if self.request.plan is not None:  # every layer of a prefill sees the same mask
            return self.request.prompt_valid
        return key_valid(attention_mask, length)

    @torch.no_grad()
    def prefill_layer(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None,
                      key_valid: torch.Tensor | None, scaling: float, softcap: float | None,
                      positions: torch.Tensor | None = None, rotary: Any = None) -> None:
        """Score a prefilled layer under the method, then evict (cascade) or wait for the last layer."""
        tail, request = self.settings.tail, self.request
        if request.plan is None:
            prompt = [key.shape[2]] * key.shape[0] if key_valid is None else [int(n) for n in key_valid.sum(-1)]
            request.start(RequestBudget(self.method, len(self.compressible), [n - tail for n in prompt],
                                        key.shape[2], tail), key_valid)
        plan = request.plan
        assert plan is not None
        method = self.method
        slot = self._slot[layer_idx]
        scored = key.shape[2] - tail  # prompt tokens the scorer and the allocator see: all but the tail
        view = LayerView(query=query[:, :, : query.shape[2] - tail], keys=key[:, :, :scored], scaling=scaling,
                         key_valid=None if key_valid is None else key_valid[:, :scored], softcap=softcap, layer=slot,
                         num_layers=len(self.compressible), values=None if value is None else value[:, :, :scored],
                         positions=None if positions is None else positions[..., :scored], rotary=rotary,
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
        layer.valid_counts = [n + tail for n in plan.prompt_tokens]
        request.nonfinite.note(torch.isnan(scores).any())  # NaN or inf logits make NaN scores: raised at the end
        if plan.push(preference, key.device):
            request.pending.append(Stage(plan.layers_handed_in, plan.device_shares()))
        last = plan.layers_handed_in == len(self.compressible)
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
        pending, plan = self.request.pending, self.request.plan
        ready = [i for i, stage in enumerate(pending) if wait or stage.ready()]
        if not ready:
            return
        stage = pending[ready[-1]]
        del pending[: ready[-1] + 1]
        assert plan is not None
        plan.set_shares(stage.host())
        self._evict_handed_in(stage.layers)

    def _evict_handed_in(self, layers: int) -> None:
        """Evict the first ``layers`` layers down to their shares at the latest stage applied."""
        plan = self.request.plan
        assert plan is not None
        for slot in range(layers):
            if plan.keeps_everything(slot):
                continue  # the layer keeps every real token: leave it untouched (bit-identical to a full cache)
            layer = self.layers[self.compressible[slot]]
            assert isinstance(layer, CompressedLayer) and layer.scores is not None
            ranked = layer.ranking(layer.scores, self.method.window + self.settings.tail)
            layer.keep(plan.keep_counts(slot, ranked), ranked)
        self.memory.track(self.kv_bytes())

    def _finish_prefill(self) -> None:
        """PREFILLING → PREFILLED (→ DECODING with ``freeze_after_prefill``)."""
        plan = self.request.plan
        assert plan is not None
        bad_scores = self.request.nonfinite.take()
        plan.finish_device()  # a non-finite preference is raised first
        if bad_scores:
            raise NonFiniteAttentionError("attention logits of the prefill contain NaN or inf; refusing to score "
                                          "tokens on them")
        layers = self.layers_in_order()
        if not self.keeps_scores_while_decoding:
            for layer in layers:
                layer.scores = None
        self.request.prefilled([[layer.valid_counts[row] for layer in layers]  # type: ignore[index]
                                for row in range(plan.rows)])
        if self.settings.freeze_after_prefill:
            self._freeze(self.settings.decode_horizon or HORIZON)

    # -- the decoding layout -----------------------------------------------------------------------------------------
    def ensure_frozen(self) -> None:
        """Before a single-token step reaches the first compressed layer (or after a forward of compiled decoding):
        the layers in fixed-shape buffers with room for the step (host-side checks only; nothing here runs inside
        compiled code)."""
        request = self.request
        if request.phase is not Phase.DECODING:
            self._freeze(self.settings.decode_horizon or HORIZON)
            return
        assert request.sized_for is not None and request.plan is not None
        grown = self.layers_in_order()[0].appended - request.plan.prefill_length  # tokens fed past the prompt
        if grown >= request.sized_for:  # the buffers are full: regrow them (a copy, outside compiled code)
            for layer in self.layers_in_order():
                layer.thaw()
            self._freeze(max(2 * request.sized_for, HORIZON) - grown)

    def _freeze(self, horizon: int) -> None:
        """Size each layer's decoding buffers for ``horizon`` more tokens and move its entries there (→ DECODING)."""
        plan = self.request.plan
        assert plan is not None
        layers = self.layers_in_order()
        grown = layers[0].appended - plan.prefill_length if layers else 0
        sizing = decode_sizing(self.method, plan, [layer.length for layer in layers], grown, horizon)
        schedule, keep_scores = sizing.schedule, self.keeps_scores_while_decoding
        drops = [0 if schedule is None else schedule.max_drops(slot) for slot in range(len(layers))]
        rows = None
        if self.settings.compiled and schedule is not None:
            # What the compiled step is traced for must not change from one request to the next (CompiledShape): one
            # bound of drops for every layer, and schedules of one length (a schedule stops where its targets no
            # longer change, which differs between requests).
            shape = self.settings.compiled_shape
            shape.max_drops = max(shape.max_drops, *drops)
            drops = [shape.max_drops] * len(layers)
            rows = grown + horizon + 1
        for slot, layer in enumerate(layers):
            layer.freeze(sizing.capacities[slot], None if schedule is None else schedule.layer(slot, rows),
                         plan.prefill_length, drops[slot], keep_scores, self.request.prompt_valid)
        # Compiled decoding keeps one group whatever the spread: which layers go together is part of its step.
        self.group_layers(None if self.settings.compiled else LayerGroup.SPREAD)
        self.request.frozen(sizing.sized_for)

    def group_layers(self, spread: float | None) -> int:
        """Group the frozen layers' decode-time eviction (:meth:`LayerGroup.split`); the number of groups. Also
        between two decoding steps (``benchmarks/group_spread.py``)."""
        groups = LayerGroup.split(self.method, dict(zip(self.compressible, self.layers_in_order(), strict=True)),
                                  spread)
        self.layer_groups = {i: group for group in groups for i in group.members}
        return len(groups)

    def check_finite(self) -> None:
        """Raise what a compiled decoding step could only flag (compiled code cannot raise mid-step): NaN or inf
        attention, or more tokens than the decoding buffers were sized for."""
        if self.request.prefill_done and self.request.nonfinite.take():
            raise NonFiniteAttentionError("attention at decode time produced NaN or inf")
        if any(bool(layer.slots.overflow) for layer in self.layers_in_order() if layer.slots is not None):
            raise RuntimeError(f"more tokens were decoded than the decoding buffers were sized for "
                               f"({self.settings.decode_horizon} new tokens): pass max_new_tokens to generate, "
                               "compress() or new_cache() (compiled decoding cannot regrow them)")

    # -- decoding ----------------------------------------------------------------------------------------------------
    def decoding(self) -> bool:
        """Whether the prefill is over and the method holds the budget while decoding."""
        return self.method.decode_eviction and self.request.prefill_done

    @property
    def keeps_scores_while_decoding(self) -> bool:
        """Whether the layers keep their scores past the prefill: a method that evicts while decoding with a scorer
        that accumulates them (H2O)."""
        return self.method.decode_eviction and self.method.scorer.keeps_scores

    def tracks_scores(self) -> bool:
        """Whether a step after the prefill updates the layers' kept scores (H2O accumulates at every step, evicting
        or not)."""
        return self.request.prefill_done and self.keeps_scores_while_decoding

    def decode_targets(self, logical_len: int) -> list[list[int]]:
        assert self.request.plan is not None
        return self.request.plan.decode_targets(logical_len)

    def end_layer(self, layer_idx: int, scored: bool, out) -> None:
        """After a compressed layer's decoding step: note whether it scored its entries and, after the last one,
        check the step (one host sync per step, not one per layer).

        NaN or inf in a layer's attention probabilities makes that layer's output NaN, and NaN stays NaN through
        every later layer (residual additions, norms, projections), so the last compressed layer's attention output
        is finite exactly when no layer scored on garbage this step.
        """
        if self._slot[layer_idx] != len(self.compressible) - 1:
            if not torch.compiler.is_compiling():
                self.request.scored_this_step = self.request.scored_this_step or scored
            return
        if torch.compiler.is_compiling():  # no host sync in compiled code: flag it, raise at the next check
            hidden = out[0] if isinstance(out, tuple) else out
            self.request.nonfinite.note(~torch.isfinite(hidden.sum()))
            return
        if self.request.scored_this_step or scored:
            self.request.scored_this_step = False
            hidden = out[0] if isinstance(out, tuple) else out
            if not bool(torch.isfinite(hidden.sum())):
                raise NonFiniteAttentionError("attention at decode time produced NaN or inf")

    # -- reading what happened -----------------------------------------------------------------------------------------
    def report(self) -> Report:
        """What the request did: budgets, kept lengths and memory
        (see :class:`~kvcake.engines.transformers.report.Report`)."""
        self.check_finite()
        plan, layers = self.request.plan, self.layers_in_order()
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
            kept_after_prefill=[list(r) for r in (self.request.kept_after_prefill or [])],
            kept_now=[list(row) for row in zip(*(layer.kept_per_row(rows) for layer in layers), strict=True)]
            if layers and rows else [],
            layer_lengths=[layer.length for layer in layers], kv_bytes=self.kv_bytes(),
            kv_bytes_full=self.kv_bytes_full(), peak_kv_bytes=self.memory.peak_kv_bytes, peak_bound_bytes=bound,
            metadata_bytes=self.metadata_bytes(), padding_bytes=padding,
            spare_bytes=sum(layer.spare_bytes() for layer in layers),
        )


__all__ = ["CompressedLayer", "KVCakeCache", "Phase", "PrefillLayer", "UnsupportedCacheError", "cache_kv_bytes"]
