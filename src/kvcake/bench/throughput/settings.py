"""The engine × method settings a throughput run compares, written ``engine:method[@ratio]``.

``transformers:full``, ``transformers:cake@0.1``, ``vllm:full``, ``vllm:window@0.1`` (vLLM's own sliding window over
the same number of tokens as a 10% budget), ``vllm:cake@0.1`` (kvcake's vLLM plugin), ``kvpress:snapkv@0.1``
(NVIDIA kvpress's SnapKV press keeping 10%, through its pipeline).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ENGINES = ("transformers", "vllm", "kvpress")
#: Methods kvpress rows can use (its press classes of the same name).
KVPRESS_METHODS = ("snapkv", "streamingllm", "knorm", "tova", "expected_attention")


@dataclass(frozen=True)
class Setting:
    """One row of the comparison: an engine and a method keeping ``ratio`` of each prompt (None for ``full``)."""

    engine: str
    method: str = "full"
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; use one of {', '.join(ENGINES)}")
        if self.method == "full":
            if self.ratio is not None:
                raise ValueError("the full cache takes no ratio")
            if self.engine == "kvpress":
                raise ValueError("kvpress rows need a press, e.g. kvpress:snapkv@0.1")
            return
        if self.ratio is None or not 0.0 < self.ratio < 1.0:
            raise ValueError(f"{self.label}: a method needs a kept ratio in (0, 1), e.g. {self.engine}:"
                             f"{self.method}@0.1")
        if self.method == "window" and self.engine != "vllm":
            raise ValueError("the sliding-window baseline is vLLM's own (vllm:window@RATIO)")
        if self.engine == "kvpress" and self.method not in KVPRESS_METHODS:
            raise ValueError(f"kvpress rows use one of {', '.join(KVPRESS_METHODS)}, got {self.method!r}")
        if self.engine == "transformers" and self.method != "window":
            from kvcake.methods.registry import method_names

            if self.method not in method_names():
                raise ValueError(f"unknown kvcake method {self.method!r}; use one of {', '.join(method_names())}")

    @property
    def label(self) -> str:
        return f"{self.engine}:{self.method}" + ("" if self.ratio is None else f"@{self.ratio:g}")

    @property
    def uses_kvcake(self) -> bool:
        """Whether kvcake evicts in this row."""
        return self.engine != "kvpress" and self.method not in ("full", "window")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``engine:method[@ratio]``, e.g. ``vllm:cake@0.1``."""
        engine, sep, rest = text.strip().partition(":")
        if not sep or not rest:
            raise ValueError(f"a setting is engine:method[@ratio], e.g. transformers:cake@0.1; got {text!r}")
        method, at, ratio = rest.partition("@")
        try:
            value = float(ratio) if at else None
        except ValueError:
            raise ValueError(f"{text!r}: the ratio after @ must be a number") from None
        return cls(engine=engine.strip(), method=method.strip().lower(), ratio=value)


def parse_settings(text: str) -> list[Setting]:
    """Comma-separated settings, in order, without repeats."""
    found = [Setting.parse(part) for part in text.split(",") if part.strip()]
    if not found:
        raise ValueError("no settings given")
    return list(dict.fromkeys(found))
