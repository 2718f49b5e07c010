"""The budget state of one request: what each compressed layer may keep, during the cascade and while decoding.

This is the policy half of the engine, with no transformers in it: the cache (an engine's) stores the
tensors and asks a :class:`RequestBudget` how many entries each layer keeps.

* Prefill (CAKE §3.3): every compressed layer, once prefilled, hands in its preference as a device tensor
  (:meth:`RequestBudget.push`); in the cascade the whole evictable budget is re-split over the layers handed in so far
  on the device (:meth:`RequestBudget.device_shares`), the engine reads the shares back when they land
  (:meth:`RequestBudget.set_shares`) and evicts every layer handed in to its share plus the window; after the last
  layer :meth:`RequestBudget.finish_device` brings the preferences to the host and refuses NaN or inf. Shares come
  from the allocator's exact capped divisor method, so they never grow from one stage to the next and the last
  stage is the one-shot split.
* Head-wise (Ada-KV): a layer's count per KV head comes from :func:`kvcake.methods.allocation.head_counts`.
* Decoding (CAKE §3.4): each layer's target is its share plus the window, re-split with caps that grow with the
  generated tokens (:meth:`RequestBudget.decode_targets`), so a layer capped by a short prompt may fill up to its
  share and a budget covering prompt and answer evicts nothing; or, with ``decode_budget="prefill"`` (the authors'
  code), every layer's prefill budget.

Every row of a batch is budgeted on its own, as if it ran alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvcake._lazy import torch
from kvcake.methods.allocation import head_counts
from kvcake.methods.attention import NonFiniteAttentionError

if TYPE_CHECKING:
    from kvcake.methods.base import Method


class DecodeSchedule:
    """Per generated token, per row and layer, the entries a layer may hold (budget plus window).

    ``targets[s][row][layer]`` is the target once ``s`` tokens have been generated (``s = 0``: after prefill);
    ``stable`` says the last step holds for every later one.
    """

    def __init__(self, targets: list[list[list[int]]], stable: bool) -> None:
        self.targets = targets
        self.stable = stable

    @property
    def steps(self) -> int:
        """Generated tokens covered (the last index)."""
        return len(self.targets) - 1

    def layer(self, slot: int, rows: int | None = None) -> list[list[int]]:
        """``[step][row]`` targets of one layer; ``rows``: at least that many steps, the last one repeated (it holds
        after the schedule's end anyway), so that schedules of one length serve every request."""
        table = [[row[slot] for row in step] for step in self.targets]
        return table + table[-1:] * ((rows or 0) - len(table))

    def capacity(self, slot: int, kept: int) -> int:
        """Slots a layer needs: the most it ever holds (its entries after prefill, or any later target), plus the
        one the next token is written into."""
        return max(kept, *(t for step in self.layer(slot) for t in step)) + 1

    def max_drops(self, slot: int) -> int:
        """The most entries any row of a layer drops in one step (usually 1: the new token pushes one out)."""
        targets = self.layer(slot)
        return max((max(0, before + 1 - after) for prev, cur in zip(targets, targets[1:], strict=False)
                    for before, after in zip(prev, cur, strict=True)), default=1)


class RequestBudget:
    """The budgets of one request (one prefill and the decoding after it).

    Parameters
    ----------
    method : Method
        The eviction method (its allocator, window, cascade and head-wise options).
    num_layers : int
        Number of compressed layers.
    prompt_tokens : list of int
        Real (non-padding) prompt tokens per row.
    prefill_length : int
        The padded prompt length (the logical length after prefill).
    tail : int
        Tokens at the end of every row's prompt left out of the compression and always kept (the chat template's
        tail under the ``tail`` protocol): ``prompt_tokens`` counts the rest.

    Attributes
    ----------
    totals : list of int
        Evictable budget per row (window excluded).
    preferences : list of list of float
        Per row, the preference of each layer handed in so far.
    shares : list of list of int
        Per row, each handed-in layer's evictable share at the latest stage.
    """

    def __init__(self, method: Method, num_layers: int, prompt_tokens: list[int], prefill_length: int,
                 tail: int = 0) -> None:
        if not prompt_tokens or min(prompt_tokens) <= 0:
            raise ValueError("empty prompt: a row has no tokens to attend to" if tail == 0 else
                             f"a row has no tokens to compress before its {tail}-token uncompressed tail")
        self.method = method
        self.tail = tail
        self.num_layers = num_layers
        self.prompt_tokens = list(prompt_tokens)
        self.prefill_length = prefill_length
        self.totals = [method.total_budget(n, num_layers) for n in self.prompt_tokens]
        self.preferences: list[list[float]] = [[] for _ in self.prompt_tokens]
        self.shares: list[list[int]] = [[] for _ in self.prompt_tokens]
        self.layers_handed_in = 0  # layers whose preference was handed in (:meth:`push`)
        self._device: torch.Tensor | None = None  # (B, m) float64 preferences handed in as device tensors
        # A device flag: some handed-in preference was NaN or inf. The methods layer's own check, raised by
        # finish_device: every engine relies on it (the vLLM engine has no other), whereas the transformers engine's
        # flag (engines/transformers/state.NonFiniteFlag) is about the attention it runs, scores and decoding steps.
        self._nonfinite: torch.Tensor | None = None
        self._targets: tuple[int, list[list[int]]] | None = None

    @property
    def rows(self) -> int:
        return len(self.prompt_tokens)

    def caps(self, grown: int = 0) -> list[int]:
        """Per row, the most evictable tokens a layer can keep (its real tokens outside the window), once ``grown``
        tokens have been generated."""
        return [max(0, n + grown - self.method.window) for n in self.prompt_tokens]

    def protected(self, grown: int = 0) -> list[int]:
        """Per row, the entries every layer keeps on top of its share: the window (and the uncompressed tail), once
        ``grown`` tokens have been generated."""
        return [min(self.method.window, n + grown) + self.tail for n in self.prompt_tokens]

    def budgets(self) -> list[list[int]]:
        """Per row and handed-in layer, the entries it is allowed after the latest stage (share plus window)."""
        return [[share + p for share in shares] for shares, p in zip(self.shares, self.protected(), strict=True)]

    def targets(self, grown: int) -> tuple[list[list[int]], bool]:
        """Per row and layer, the entries a layer may hold once ``grown`` tokens have been generated: its share of
        the row's budget re-split with the caps grown by them, plus the protected entries; and whether some layer's
        cap binds (then more generated tokens may still change a share)."""
        targets, binding = [], False
        for prefs, total, cap, protected in zip(self.preferences, self.totals, self.caps(grown),
                                                self.protected(grown), strict=True):
            shares = self.split(prefs, total, cap)
            binding = binding or any(share >= cap for share in shares)
            targets.append([share + protected for share in shares])
        return targets, binding

    # -- prefill: the preferences stay on the device, no host synchronisation per layer ----------------------------
    def evicts_now(self) -> bool:
        """Whether the layers handed in so far are evicted at this stage: after every layer in the cascade, else
        after the last."""
        return self.method.cascade or self.layers_handed_in == self.num_layers

    def push(self, preference: torch.Tensor | None, device: torch.device) -> bool:
        """Hand in the next layer's preference ``(B,)`` as a device tensor (None: fixed weights); returns whether
        the layers handed in are evicted now (then :meth:`device_shares` gives their shares)."""
        column = (torch.ones(self.rows, 1, dtype=torch.float64, device=device) if preference is None
                  else preference.detach().to(device=device, dtype=torch.float64).view(-1, 1))
        bad = ~torch.isfinite(column).all()
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        self._device = column if self._device is None else torch.cat([self._device, column], dim=1)
        self.layers_handed_in += 1
        return self.evicts_now()

    def device_shares(self) -> torch.Tensor:
        """``(B, m)`` shares of the layers handed in so far, on the device (exactly :meth:`split` row by row)."""
        assert self._device is not None
        device = self._device.device
        totals = torch.tensor(self.totals, dtype=torch.long, device=device)
        caps = torch.tensor(self.caps(), dtype=torch.long, device=device)
        prefs = torch.nan_to_num(self._device, nan=0.0, posinf=0.0, neginf=0.0)  # garbage is raised at the end
        return self.method.allocator.split_tensor(prefs, totals, caps, self.num_layers)

    def set_shares(self, shares: list[list[int]]) -> None:
        """The shares of a stage, read back on the host (rows of the first ``len(shares[0])`` layers)."""
        self.shares = [list(row) for row in shares]

    def finish_device(self) -> None:
        """After the last layer: the handed-in preferences on the host (one synchronisation), checked."""
        if self._device is None:
            return
        if self._nonfinite is not None and bool(self._nonfinite):
            raise NonFiniteAttentionError("a layer's preference is NaN or inf")
        self.preferences = self._device.tolist()

    def split(self, preferences: list[float], total: int, cap: int) -> list[int]:
        """The allocator's split of ``total`` over the layers handed in so far (capped, exact)."""
        return self.method.allocator.split(preferences, total, cap, self.num_layers)

    def keeps_everything(self, slot: int) -> bool:
        """Whether layer ``slot`` keeps every real token of every row at the latest stage (nothing to evict)."""
        return all(s[slot] >= cap for s, cap in zip(self.shares, self.caps(), strict=True))

    def keep_counts(self, slot: int, ranked: torch.Tensor) -> list[int] | torch.Tensor:
        """How many entries layer ``slot`` keeps: one count per row, or ``(B, Hkv)`` counts with head-wise budgets.

        ``ranked`` ``(B, Hkv, L)`` are the layer's scores with the window protected (+inf), as eviction sorts them.
        """
        shares = [s[slot] for s in self.shares]
        protected = self.protected()
        alpha = self.method.head_alpha
        if alpha is None:
            return [share + p for share, p in zip(shares, protected, strict=True)]
        evictable = ranked[..., : max(0, ranked.shape[-1] - self.method.window - self.tail)]
        return torch.stack([head_counts(evictable[row], share, alpha) + protected[row]
                            for row, share in enumerate(shares)])

    # -- decoding ----------------------------------------------------------------------------------------------------
    def decode_targets(self, logical_len: int) -> list[list[int]]:
        """Per row and layer, the entries a layer may hold at this step (budget plus window).

        The budget is re-split with the caps grown by the generated tokens: a layer that was capped by a short
        prompt may fill up to its share, and nothing is evicted until the whole budget is used.
        """
        if self._targets is not None and self._targets[0] == logical_len:
            return self._targets[1]
        if self.method.decode_budget == "prefill":  # the authors' decoding: every layer at its prefill budget
            return self.budgets()
        targets, _ = self.targets(logical_len - self.prefill_length)
        self._targets = (logical_len, targets)
        return targets

    def decode_schedule(self, horizon: int) -> DecodeSchedule:
        """The decode targets of every layer for the next ``horizon`` generated tokens, for fixed-shape decoding.

        Targets change only while some layer is capped by the generated length (a short prompt); once no layer is,
        they are constant, so the schedule stops there (``stable``) and its last step holds for ever after.
        """
        if self.method.decode_budget == "prefill":
            return DecodeSchedule([self.budgets()], stable=True)
        steps: list[list[list[int]]] = []  # [step][row][layer], step 0 = after prefill
        stable = False
        for grown in range(horizon + 1):
            targets, binding = self.targets(grown)
            steps.append(targets)
            if not binding and grown > 0:
                stable = True  # no cap binds: more generated tokens change no share
                break
        return DecodeSchedule(steps, stable)

    def select_rows(self, rows: list[int]) -> None:
        """Follow a reordering or selection of the batch rows (beam search)."""
        self.prompt_tokens = [self.prompt_tokens[i] for i in rows]
        self.totals = [self.totals[i] for i in rows]
        self.preferences = [self.preferences[i] for i in rows]
        self.shares = [self.shares[i] for i in rows]
        self._targets = None


__all__ = ["DecodeSchedule", "RequestBudget"]
