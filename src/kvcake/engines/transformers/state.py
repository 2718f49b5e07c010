"""How one request moves through the transformers engine: its phase, the settings it runs under, its state, and the
memory figures kept along the way. Read this first.

A :class:`~kvcake.engines.transformers.cache.KVCakeCache` holds one request at a time; its attributes fall in
separate objects:

* :class:`Settings`: what the session decided before the request (how many tokens the decoding buffers are sized
  for, compiled decoding, the uncompressed tail). Set by :mod:`~kvcake.engines.transformers.session` (and
  :mod:`~kvcake.engines.transformers.replay`); a request reads them and never changes them.
* :class:`Request`: the request itself: its :class:`Phase`, its budgets
  (:class:`~kvcake.methods.budget.RequestBudget`), the prompt's padding, what each layer kept when the prefill ended,
  the cascade stages on their way to the host, and the one device flag for non-finite attention
  (:class:`NonFiniteFlag`). ``KVCakeCache.reset`` clears it for the next request.
* :class:`Memory`: the figures that cannot be read from the layers afterwards (the prefill's peak).
* the layers (:class:`~kvcake.engines.transformers.storage.CompressedLayer`): keys and values, in the prefill layout
  (position order) or in fixed-shape decoding slots (:mod:`~kvcake.engines.transformers.slots`).

The phases, in order (``KVCakeCache.reset`` goes back to :attr:`Phase.EMPTY` from any of them):

``EMPTY``
    No prompt yet. The next forward is the prefill: each compressed layer appends the whole prompt and runs the
    model's own attention unchanged (prefill outputs are exact), then is scored (``KVCakeCache.prefill_layer``).
    → ``PREFILLING`` when the first compressed layer is scored: the request's budgets are made from its prompt.
``PREFILLING``
    Layers are scored one by one, each handing its preference to the budget; the cascade evicts the layers scored so
    far as their shares reach the host. The peak of the keys and values held is tracked. → ``PREFILLED`` after the
    last compressed layer: non-finite scores are raised, and what each layer kept is recorded. With
    ``Settings.freeze_after_prefill`` (compiled decoding) it goes straight on to ``DECODING``.
``PREFILLED``
    Every layer holds its budget, in position order. Several tokens fed at once (a question after a compressed
    context, a chat's next turn) append to the layers and attend over their kept entries with each layer's own mask
    (:func:`~kvcake.engines.transformers.decode.attend_compressed`), evicting under a decode-time method.
    → ``DECODING`` before the first compressed layer of a single-token step (or after a forward, with
    ``freeze_after_prefill``): the layers move into fixed-shape buffers sized for ``Settings.decode_horizon``.
``DECODING``
    One token at a time in fixed-shape slots (:func:`~kvcake.engines.transformers.decode.attend_slots`): no host
    synchronisation, no changing shape, so a step compiles; decode-time eviction frees slots in place, and a compiled
    step can only flag non-finite attention (raised by ``KVCakeCache.check_finite`` after it). → ``PREFILLED`` when
    several tokens are fed at once or rows are selected (the layers thaw back to position order); → ``DECODING``
    again, regrown by a copy outside compiled code, when the buffers are full.

Within ``PREFILLING`` each layer also knows whether its own prefill is still to come
(:meth:`~kvcake.engines.transformers.storage.CompressedLayer.awaits_prefill`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvcake.engines.transformers.prefill import Stage
    from kvcake.methods.budget import RequestBudget


class Phase(Enum):
    """Where a request is (see the module docstring for what moves it on)."""

    EMPTY = "empty"  # no prompt yet: the next forward prefills
    PREFILLING = "prefilling"  # compressed layers are being scored and evicted one by one
    PREFILLED = "prefilled"  # every layer at its budget, in position order (several tokens at once attend here)
    DECODING = "decoding"  # the layers in fixed-shape slots, one token at a time (compiled steps run here)


@dataclass
class CompiledShape:
    """What a session's compiled decoding step was traced for, kept from one request to the next: a host constant of
    the step that a new request changed would recompile it (minutes on a CPU). One per ``compress`` block, shared by
    its caches."""

    #: The most entries an evicting layer may drop in one step, the same for every evicting layer. A layer's own bound
    #: comes from its decode schedule and differs between requests (1 for most, 2 or 3 where capped layers take a token
    #: more each step and the others give it up); below the bound it takes the general drop, which drops exactly the
    #: entries the single drop does (lowest score first, earlier on ties), so the tokens are the same. A request whose
    #: layers drop more raises it once.
    max_drops: int = 1


@dataclass
class Settings:
    """What the session decided for the requests of a cache (not changed by a request)."""

    #: Tokens the caller will generate, when known (``generate``'s ``max_new_tokens``): the decoding buffers are sized
    #: for them once. Unknown (None): sized for :data:`~kvcake.engines.transformers.cache.HORIZON` and regrown outside
    #: compiled code.
    decode_horizon: int | None = None
    #: Freeze into the fixed-shape decoding layout as soon as prefill ends (compiled decoding needs it then).
    freeze_after_prefill: bool = False
    #: Decoding runs compiled: transformers may treat the cache as compileable (fixed shapes after prefill).
    compiled: bool = False
    #: Tokens at the end of the prompt left uncompressed and always kept (the chat template's tail under the ``tail``
    #: protocol): the scorers see the prompt without them, the allocation counts without them.
    tail: int = 0
    #: Compiled decoding: what the step was traced for (shared by the block's caches).
    compiled_shape: CompiledShape = field(default_factory=CompiledShape)


class NonFiniteFlag:
    """The request's one record of non-finite attention not yet raised: a device flag, so that neither a prefill layer
    nor a compiled decoding step synchronises with the host to check it. The prefill flags NaN scores and raises once,
    after its last layer; a compiled decoding step (which cannot raise) flags a non-finite output, raised by the next
    ``KVCakeCache.check_finite``. Kept at one address across requests (zeroed in place), so that a compiled step that
    writes it keeps working.

    The budget's own check of the preferences (:meth:`~kvcake.methods.budget.RequestBudget.finish_device`) stays in the
    methods layer, apart from this flag: both engines rely on it, and the vLLM engine has no kvcake cache.
    """

    def __init__(self) -> None:
        self.flag: torch.Tensor | None = None  # () bool, made on the device of the first check

    def note(self, bad: torch.Tensor) -> None:
        """Flag the request if ``bad`` (a () bool tensor on the device) is set, without synchronising."""
        if self.flag is None:
            if torch.compiler.is_compiling():
                return  # never so: a compiled step decodes after a prefill, which made the flag
            with torch.inference_mode(False):  # written outside inference mode too (in place)
                self.flag = torch.zeros((), dtype=torch.bool, device=bad.device)
            torch._dynamo.mark_static_address(self.flag)
        self.flag.logical_or_(bad)

    def take(self) -> bool:
        """Whether the request was flagged (one host synchronisation); the flag is cleared."""
        if self.flag is None or not bool(self.flag):
            return False
        self.flag.zero_()
        return True

    def clear(self) -> None:
        if self.flag is not None:
            self.flag.zero_()  # kept, at the same address, for the next request


class Request:
    """The state of the request a cache holds (see the module docstring); the transitions are its methods."""

    def __init__(self) -> None:
        self.nonfinite = NonFiniteFlag()
        self.clear()

    def clear(self) -> None:
        """Forget the request (prompt, budgets, scores): :attr:`Phase.EMPTY`."""
        self.phase = Phase.EMPTY
        #: The request's budgets, from its first prefilled layer on.
        self.plan: RequestBudget | None = None
        #: ``(B, S)`` False on the prompt's padding (None: no padding).
        self.prompt_valid: torch.Tensor | None = None
        #: ``[row][layer]`` real tokens each compressed layer held when the prefill ended.
        self.kept_after_prefill: list[list[int]] | None = None
        #: Cascade stages whose shares are on their way to the host.
        self.pending: list[Stage] = []
        #: :attr:`Phase.DECODING`: tokens past the prompt the decoding buffers have room for.
        self.sized_for: int | None = None
        #: Some compressed layer scored its entries in the decoding step under way (then its output is checked).
        self.scored_this_step = False
        self.nonfinite.clear()

    @property
    def prefill_done(self) -> bool:
        """Whether the prefill is over (:attr:`Phase.PREFILLED` or :attr:`Phase.DECODING`)."""
        return self.phase is Phase.PREFILLED or self.phase is Phase.DECODING

    def start(self, plan: RequestBudget, prompt_valid: torch.Tensor | None) -> None:
        """EMPTY → PREFILLING: the first compressed layer was prefilled."""
        self.phase, self.plan, self.prompt_valid = Phase.PREFILLING, plan, prompt_valid

    def prefilled(self, kept: list[list[int]]) -> None:
        """PREFILLING → PREFILLED: the last layer was scored and evicted."""
        self.phase, self.kept_after_prefill = Phase.PREFILLED, kept

    def frozen(self, sized_for: int) -> None:
        """→ DECODING: the layers are in fixed-shape buffers with room for ``sized_for`` tokens past the prompt."""
        self.phase, self.sized_for = Phase.DECODING, sized_for

    def thawed(self) -> None:
        """DECODING → PREFILLED: the layers go back to position order (several tokens fed, rows selected)."""
        if self.phase is Phase.DECODING:
            self.phase = Phase.PREFILLED
        self.sized_for = None

    def select_rows(self, rows: list[int]) -> None:
        """Keep the per-row state in step with the rows of the tensors (beam search, batch selection)."""
        if self.plan is None:
            return
        self.plan.select_rows(rows)
        if self.kept_after_prefill is not None:
            self.kept_after_prefill = [self.kept_after_prefill[i] for i in rows]
        if self.prompt_valid is not None:
            self.prompt_valid = self.prompt_valid[torch.as_tensor(rows, device=self.prompt_valid.device)]


@dataclass
class Memory:
    """Memory figures kept along a request (what the layers hold now is counted from them when asked)."""

    peak_kv_bytes: int = 0  # the most key and value bytes held at any moment of the prefill

    def track(self, held: int) -> None:
        self.peak_kv_bytes = max(self.peak_kv_bytes, held)


__all__ = ["CompiledShape", "Memory", "NonFiniteFlag", "Phase", "Request", "Settings"]
