"""What one setting did: per-request times and counts, engine-wide phase clocks and memory, and the summary figures.

Standard library only: the vLLM and kvpress workers (other virtual environments) fill the same records.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """One request as served: seconds are from the start of the run; ``refused`` says why it was not served."""

    index: int
    prompt_tokens: int
    arrival_s: float
    output_tokens: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None
    found: bool | None = None
    refused: str | None = None

    def __post_init__(self) -> None:
        if self.output_tokens < 0:
            raise ValueError("output_tokens cannot be negative")

    @property
    def served(self) -> bool:
        return self.refused is None and self.finish_s is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_s is None or self.finish_s is None or self.output_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)


@dataclass
class Clock:
    """Engine-wide counters, read from the engine while it ran.

    ``prefill_s``: seconds of steps in which a prefill ran (whole or in part); ``decode_s`` and ``decode_tokens``:
    seconds of the steps in which no prefill ran and the tokens they produced. ``kv_samples``: KV bytes the engine
    held after each step (its own figure: cache tensors or pool blocks in use); ``kv_peak_bytes`` the highest it
    reported at any point it exposes (a compressed prefill's peak inside a forward included, where the engine tracks
    it). ``running``: requests running at once, after each step.
    """

    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0
    wall_s: float = 0.0
    steps: int = 0
    max_running: int = 0
    kv_peak_bytes: int = 0
    kv_samples: list[int] = field(default_factory=list)
    kv_source: str = ""

    def sample(self, held: int, running: int) -> None:
        self.kv_samples.append(int(held))
        self.kv_peak_bytes = max(self.kv_peak_bytes, int(held))
        self.max_running = max(self.max_running, int(running))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    where = (len(ordered) - 1) * q / 100
    low, high = math.floor(where), math.ceil(where)
    return ordered[low] + (ordered[high] - ordered[low]) * (where - low)


def summarise(requests: list[RequestRecord], clock: Clock, pool_bytes: int) -> dict[str, Any]:
    """The figures of one setting: throughput (end to end and decoding phase), concurrency, latency, memory,
    refusals and answers found."""
    served = [r for r in requests if r.served]
    tokens = sum(r.output_tokens for r in served)
    wall = clock.wall_s
    ttft = [t for r in served if (t := r.ttft_s) is not None]
    tpot = [t for r in served if (t := r.tpot_s) is not None]
    decode_samples = clock.kv_samples
    steady = sum(decode_samples) / len(decode_samples) if decode_samples else None
    found = [r.found for r in served if r.found is not None]
    return {
        "requests": len(requests),
        "served": len(served),
        "refused": len(requests) - len(served),
        "output_tokens": tokens,
        "wall_s": wall,
        "requests_per_s": len(served) / wall if wall > 0 else None,
        "output_tokens_per_s": tokens / wall if wall > 0 else None,
        "decode_tokens_per_s": clock.decode_tokens / clock.decode_s if clock.decode_s > 0 else None,
        "decode_tokens": clock.decode_tokens,
        "prefill_s": clock.prefill_s,
        "decode_s": clock.decode_s,
        "prefill_share": clock.prefill_s / wall if wall > 0 else None,
        "decode_share": clock.decode_s / wall if wall > 0 else None,
        "max_running": clock.max_running,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p99_s": percentile(tpot, 99),
        "kv_peak_bytes": clock.kv_peak_bytes,
        "kv_steady_bytes": None if steady is None else round(steady),
        "kv_source": clock.kv_source,
        "pool_bytes": pool_bytes,
        "within_pool": clock.kv_peak_bytes <= pool_bytes,
        "found": sum(found),
        "found_of": len(found),
    }
