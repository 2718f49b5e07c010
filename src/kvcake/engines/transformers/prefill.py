"""What a prefill hands on: a layer's attention inputs (for replay, gathered in a :class:`Recording`), and a cascade
stage's shares on their way from the device to the host."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PrefillLayer:
    """What a layer's prefill attention call saw: enough to compress the layer again under another method."""

    key: torch.Tensor
    value: torch.Tensor
    query: torch.Tensor | None = None  # None for layers kvcake leaves alone (sliding-window)
    key_valid: torch.Tensor | None = None
    scaling: float | None = None
    softcap: float | None = None
    positions: torch.Tensor | None = None  # RoPE positions (position_ids) of the prompt, None: 0 .. S-1
    rotary: Any = None  # the layer's rotary embedding (kvcake.engines.transformers.rope.Rotary), None if it has none


@dataclass
class Recording:
    """A prefill being recorded (:mod:`kvcake.engines.transformers.replay`): every layer's attention inputs, once."""

    queries: int | None = None  # keep only each layer's last this-many queries (None: all of them)
    layers: dict[int, PrefillLayer] = field(default_factory=dict)


class Stage:
    """A cascade stage's shares ``(B, m)`` on their way from the device to the host (copied without waiting)."""

    def __init__(self, layers: int, shares: torch.Tensor) -> None:
        self.layers = layers
        self._event = None
        if shares.device.type == "cuda":
            host = torch.empty(shares.shape, dtype=shares.dtype, pin_memory=True)
            host.copy_(shares, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            shares = host
        self._shares = shares

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def host(self) -> list[list[int]]:
        if self._event is not None:
            self._event.synchronize()
        return self._shares.cpu().tolist()


__all__ = ["PrefillLayer", "Recording", "Stage"]
