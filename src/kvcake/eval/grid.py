"""The grid of a run: every method at every budget and ratio, each a :class:`Setting` with a label."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kvcake.methods import registry


@dataclass(frozen=True)
class Setting:
    """One method at one budget (``budget`` tokens per layer, or ``ratio`` of the compressed prompt)."""

    method: str
    budget: int | None = None
    ratio: float | None = None
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """``full``, or ``method@b<budget>`` / ``method@r<ratio>`` followed by ``,name=value`` per parameter."""
        if self.method == "full":
            return "full"
        size = f"b{self.budget}" if self.budget is not None else f"r{self.ratio:g}"
        extra = "".join(f",{k}={v}" for k, v in self.params)
        return f"{self.method}@{size}{extra}"

    def build(self):
        """A fresh method object for this setting (``None`` for the full cache)."""
        return registry.build(self.method, budget=self.budget, ratio=self.ratio, **dict(self.params))


def grid(methods: Iterable[str], budgets: Iterable[int] = (), ratios: Iterable[float] = (),
         params: dict[str, dict[str, Any]] | None = None) -> list[Setting]:
    """Every method at every budget and ratio (``full`` once); validates names and parameters."""
    budgets, ratios, params = list(budgets), list(ratios), params or {}
    settings: list[Setting] = []
    for name in methods:
        name = name.lower()
        if name == "full":
            settings.append(Setting("full"))
            continue
        if not budgets and not ratios:
            raise ValueError(f"method {name!r} needs at least one budget or ratio")
        extra = tuple(sorted(params.get(name, {}).items()))
        settings += [Setting(name, budget=b, params=extra) for b in budgets]
        settings += [Setting(name, ratio=r, params=extra) for r in ratios]
    for s in settings:
        s.build()  # fail before any model work on an unknown method or a bad parameter
    if len({s.label for s in settings}) != len(settings):
        raise ValueError("the grid names a method and budget twice")
    return settings


MODES = ("query-aware", "query-agnostic")
PROTOCOLS = ("whole", "tail")
DTYPES = ("float32", "bfloat16", "float16")


def check_run_options(modes: Iterable[str], device: str, dtype: str, protocols: Iterable[str] = ("whole",),
                      batch_size: int = 1) -> None:
    """The run's modes, protocols, device, dtype and batch size (no torch needed: the command line checks them
    first)."""
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    protocols = list(protocols)
    if not protocols:
        raise ValueError("--protocols needs at least one of whole, tail")
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size takes a positive number of samples, not {batch_size!r}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose cpu or cuda")

