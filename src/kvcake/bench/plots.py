"""The benchmark's plots: decode latency, KV memory and prefill time against prompt length.

matplotlib is imported inside the plotting functions only, so that measuring never needs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kvcake.bench.summary import MIB, Grid
from kvcake.methods.registry import color


class _Figures:
    """What every plot shares: the grid of eager rows, one colour per method, the axes' layout."""

    def __init__(self, rows: Iterable[Mapping[str, Any]], out_dir: Path):
        from kvcake.plots import pyplot, save

        self.plt = pyplot()
        self.save = save
        self.grid = Grid(rows)
        self.out_dir = out_dir
        self.colors = {m: color(m) for m in self.grid.methods}  # each method's colour in every plot
        self.written: list[Path] = []

    def series(self, method: str, key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
        """(lengths, values) of one measured column of one method's eager rows."""
        xs, ys = [], []
        for n in self.grid.lengths:
            row = self.grid.eager.get((n, method))
            value = None if row is None else row.get(key)
            if value is not None:
                xs.append(n)
                ys.append(value * scale)
        return xs, ys

    def axes(self, ax, ylabel: str, title: str, fontsize: int = 8) -> None:
        """Prompt tokens on a log-2 axis at the measured lengths, labels, grid and legend."""
        lengths = self.grid.lengths
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(n) for n in lengths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=fontsize)

    def finish(self, fig, name: str) -> None:
        fig.tight_layout()
        self.written.append(self.save(fig, self.out_dir / name, dpi=120))


def _decode_latency(figs: _Figures) -> None:
    """ms per token; one dashed line per distinct physical limit (methods keeping the same sizes share it)."""
    fig, ax = figs.plt.subplots(figsize=(6.5, 4))
    limits: dict[tuple, list[str]] = {}
    for m in figs.grid.methods:
        xs, ys = figs.series(m, "decode_step_s", 1000)
        if xs:
            ax.plot(xs, ys, marker="o", color=figs.colors[m], label=m)
        xs, ys = figs.series(m, "physical_limit_decode_step_s", 1000)
        if xs:
            tokens = tuple(figs.grid.eager[(n, m)].physical_limit_tokens for n in xs)
            limits.setdefault((tuple(xs), tuple(ys), tokens), []).append(m)
    for (xs, ys, tokens), owners in limits.items():
        size = f"{tokens[0]} tokens per layer" if len(set(tokens)) == 1 else "the kept size"
        color = figs.colors[owners[0]] if len(owners) == 1 else "black"
        ax.plot(xs, ys, linestyle="--", marker="x", color=color,
                label=f"physical limit: plain cache of {size} ({', '.join(owners)})")
    figs.axes(ax, "ms per decoded token", "Decode latency per token")
    figs.finish(fig, "decode_latency.png")


def _kv_memory(figs: _Figures) -> None:
    """KV after prefill; peak during prefill (full, cascade, one-shot, SPEC bound)."""
    fig, (left, right) = figs.plt.subplots(1, 2, figsize=(12, 4.2))
    for m in figs.grid.methods:
        color = figs.colors[m]
        xs, ys = figs.series(m, "kv_bytes_prefill", 1 / MIB)
        if xs:
            left.plot(xs, ys, marker="o", color=color, label=m)
        xs, ys = figs.series(m, "peak_kv_bytes_prefill", 1 / MIB)
        if xs:
            right.plot(xs, ys, marker="o", color=color, label=f"{m}" if m == "full" else f"{m} cascade")
        xs, ys = figs.series(m, "peak_kv_bytes_one_shot", 1 / MIB)
        if xs:
            right.plot(xs, ys, linestyle="--", marker="s", color=color, label=f"{m} one-shot")
        xs, ys = figs.series(m, "peak_bound_bytes", 1 / MIB)
        if xs:
            right.plot(xs, ys, linestyle=":", color=color, label=f"{m} SPEC bound")
    for ax, title in ((left, "KV cache after prefill"), (right, "Peak KV during prefill")):
        ax.set_yscale("log")
        figs.axes(ax, "MiB", title, fontsize=7)
    figs.finish(fig, "kv_memory.png")


def _prefill_time(figs: _Figures) -> None:
    """Prefill seconds: the cascade (as run) and one-shot allocation."""
    fig, ax = figs.plt.subplots(figsize=(6.5, 4))
    for m in figs.grid.methods:
        xs, ys = figs.series(m, "prefill_s")
        if xs:
            ax.plot(xs, ys, marker="o", color=figs.colors[m], label=m if m == "full" else f"{m} (cascade)")
        xs, ys = figs.series(m, "one_shot_prefill_s")
        if xs:
            ax.plot(xs, ys, linestyle="--", marker="s", color=figs.colors[m], label=f"{m} one-shot")
    ax.set_yscale("log")
    figs.axes(ax, "seconds", "Prefill time")
    figs.finish(fig, "prefill_time.png")


def plot(rows: Iterable[Mapping[str, Any]], out_dir: Path) -> list[Path]:
    """decode_latency.png, kv_memory.png and prefill_time.png in ``out_dir``; the paths written."""
    figs = _Figures(rows, out_dir)
    _decode_latency(figs)
    _kv_memory(figs)
    _prefill_time(figs)
    return figs.written
