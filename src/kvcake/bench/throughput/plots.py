"""Plots of a throughput run: decoding-phase throughput against the KV budget, concurrency against prompt length."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _series(cases: list[Mapping[str, Any]], x: str, y: str, fixed: str) -> dict[str, tuple[list, list]]:
    """Per setting: points (x, y) at the first value of ``fixed`` (the other axis of the sweep)."""
    first = cases[0][fixed] if cases else None
    out: dict[str, tuple[list, list]] = {}
    for c in cases:
        if c[fixed] != first or c["summary"][y] is None:
            continue
        xs, ys = out.setdefault(c["setting"]["label"], ([], []))
        xs.append(c["summary"]["pool_bytes"] / 2**20 if x == "pool" else c[x])
        ys.append(c["summary"][y])
    return out


def plot_all(cases: list[Mapping[str, Any]], out: Path) -> dict[str, Path]:
    from kvcake.plots import pyplot, save

    plt = pyplot()
    paths = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, (xs, ys) in _series(cases, "pool", "decode_tokens_per_s", "prompt_length").items():
        axes[0].plot(xs, ys, marker="o", label=label)
    for label, (xs, ys) in _series(cases, "pool", "output_tokens_per_s", "prompt_length").items():
        axes[1].plot(xs, ys, marker="o", label=label)
    axes[0].set(xlabel="KV pool (MiB)", ylabel="output tokens/s, decoding phase", title="Decoding phase")
    axes[1].set(xlabel="KV pool (MiB)", ylabel="output tokens/s, end to end", title="End to end")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths["throughput_vs_budget"] = save(fig, out / "throughput_vs_budget.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in _series(cases, "prompt_length", "max_running", "pool_full_requests").items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(xlabel="prompt tokens", ylabel="most requests running at once", title="Concurrency at a fixed pool")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths["concurrency_vs_prompt"] = save(fig, out / "concurrency_vs_prompt.png")
    paths["headline"] = plot_headline(cases, out)
    return paths


def plot_headline(cases: list[Mapping[str, Any]], out: Path) -> Path:
    """Bars per setting at the first budget and prompt length: decoding-phase output tokens/s, requests running
    at once, and answers found (a fast setting that loses the needle shows it)."""
    from kvcake.plots import pyplot, save

    plt = pyplot()
    first = [c for c in cases if (c["pool_full_requests"], c["prompt_length"]) ==
             (cases[0]["pool_full_requests"], cases[0]["prompt_length"]) and not c.get("error")] if cases else []
    labels = [c["setting"]["label"] for c in first]
    panels = [("decode_tokens_per_s", "output tokens/s, decoding phase"), ("max_running", "requests at once"),
              ("found", "needles found")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [c["summary"][key] or 0 for c in first]
        ax.barh(range(len(labels)), values, color=[plt.cm.tab10(i % 10) for i in range(len(labels))])
        ax.set_yticks(range(len(labels)), labels if ax is axes[0] else [""] * len(labels), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}" if isinstance(v, float) else f" {v}", va="center", fontsize=8)
    if first:
        c = first[0]
        fig.suptitle(f"Same KV pool ({c['summary']['pool_bytes'] / 2**20:.0f} MiB, {c['pool_full_requests']:g} "
                     f"full-cache requests), {c['summary']['requests']} requests of ~{c['prompt_length']} tokens",
                     fontsize=10)
    fig.tight_layout()
    return save(fig, out / "headline.png")
