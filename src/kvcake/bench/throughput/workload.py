"""The requests of a throughput run: needle prompts of a chosen length, a fixed answer length, arrival times."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

ARRIVALS = ("all", "poisson")


@dataclass
class Workload:
    """What is asked of every setting.

    Attributes
    ----------
    requests : int
        How many requests.
    prompt_tokens : int
        Mean prompt length in tokens (the haystack; the chat template and question add a few).
    spread : float
        Prompt lengths are drawn uniformly in ``prompt_tokens * (1 ± spread)``.
    output_tokens : int
        Tokens generated per request, always exactly (the end-of-sequence token does not stop a request), so that
        every setting does the same work.
    arrival : str
        ``all``: every request arrives at time 0; ``poisson``: exponential gaps at ``rate`` requests per second.
    rate : float | None
        Requests per second for ``poisson``.
    seed : int
        Seed of the prompt lengths, needle depths, numbers and arrival gaps.
    """

    requests: int = 32
    prompt_tokens: int = 2048
    spread: float = 0.0
    output_tokens: int = 256
    arrival: str = "all"
    rate: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ValueError(f"requests must be at least 1, got {self.requests}")
        if self.prompt_tokens < 16:
            raise ValueError(f"prompt_tokens must be at least 16, got {self.prompt_tokens}")
        if not 0.0 <= self.spread < 1.0:
            raise ValueError(f"spread must be in [0, 1), got {self.spread}")
        if self.output_tokens < 1:
            raise ValueError(f"output_tokens must be at least 1, got {self.output_tokens}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"unknown arrival {self.arrival!r}; use one of {', '.join(ARRIVALS)}")
        if self.arrival == "poisson" and (self.rate is None or self.rate <= 0):
            raise ValueError("a poisson arrival needs a positive rate (requests per second)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Request:
    """One prompt, as token ids, with the needle's number it should find and when it arrives (seconds)."""

    index: int
    ids: list[int]
    answer: str
    arrival_s: float = 0.0
    depth: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)


def arrival_times(workload: Workload) -> list[float]:
    """Arrival time of each request in seconds from the start (all 0, or Poisson gaps)."""
    if workload.arrival == "all":
        return [0.0] * workload.requests
    rng = random.Random(workload.seed + 1)
    times, now = [], 0.0
    for _ in range(workload.requests):
        times.append(now)
        now += rng.expovariate(float(workload.rate or 1.0))
    return times


def build_requests(tokenizer, workload: Workload) -> list[Request]:
    """The workload's prompts: each a distinct needle-in-a-haystack case (:func:`kvcake.needle.needle_case`) through
    the chat template (:func:`kvcake.pipeline.build_prompt`), with its own length, depth and number."""
    from kvcake.needle import needle_case
    from kvcake.pipeline import build_prompt

    rng = random.Random(workload.seed)
    arrivals = arrival_times(workload)
    requests = []
    for i in range(workload.requests):
        low, high = workload.prompt_tokens * (1 - workload.spread), workload.prompt_tokens * (1 + workload.spread)
        tokens = max(16, round(rng.uniform(low, high)))
        depth = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9])
        case = needle_case(tokenizer, tokens, depth, seed=workload.seed * 1000 + i)
        ids = build_prompt(tokenizer, case.context, case.question)[0].tolist()
        requests.append(Request(index=i, ids=[int(t) for t in ids], answer=case.answer, arrival_s=arrivals[i],
                                depth=depth, extra={"context": case.context, "question": case.question}))
    return requests
