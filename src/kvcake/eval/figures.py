"""The plots of ``kvcake report``: score vs budget with bootstrap error bars, depth × length heatmaps, and the
tokens each layer kept."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from kvcake.eval.files import protocol
from kvcake.eval.summary import summarise
from kvcake.methods.registry import color as method_color
from kvcake.methods.registry import method_names
from kvcake.plots import pyplot, save


def label_order(table: list[dict[str, Any]]) -> list[str]:
    """Labels: methods in the registry's order (full, cake, then the baselines), larger budgets first."""
    known = method_names()
    methods = sorted({t["method"] for t in table}, key=lambda m: (known.index(m) if m in known else len(known), m))

    def key(t):
        size = t["ratio"] if t["ratio"] is not None else (t["budget"] or 0)
        return methods.index(t["method"]), t["ratio"] is None, -size

    labels: list[str] = []
    for t in sorted(table, key=key):
        if t["label"] not in labels:
            labels.append(t["label"])
    return labels



def _size(t: dict[str, Any]) -> float:
    return t["ratio"] if t["ratio"] is not None else t["budget"]


def _line(ax, points: list[tuple], method: str) -> None:
    """One method's scores against budget, with error bars from the bootstrap interval (``score_low``,
    ``score_high``) where the points have one."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    below = [p[1] - p[2] if p[2] is not None else 0.0 for p in points]
    above = [p[3] - p[1] if p[3] is not None else 0.0 for p in points]
    ax.errorbar(xs, ys, yerr=[below, above], marker="o", label=method, color=method_color(method), capsize=3,
                elinewidth=0.8, linewidth=2.5 if method == "cake" else 1.2)


def plot_scores(table: list[dict[str, Any]], out: Path) -> list[Path]:
    """Score vs budget, one panel per task (and the average), one line per method with the 95% bootstrap interval
    of every point as an error bar (a band around the full cache's dashed line)."""
    plt = pyplot()
    written = []
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for t in table:
        groups[(t["model"], t["mode"], protocol(t))].append(t)
    for (model, mode, prot), members in groups.items():
        tasks = [t for t in dict.fromkeys(m["task"] for m in members) if t != "average"] + ["average"]
        cols = min(4, len(tasks))
        rows = -(-len(tasks) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
        ratios = any(m["ratio"] is not None for m in members)
        for ax, task in zip(axes.flat, tasks, strict=False):
            here = [m for m in members if m["task"] == task and m["score"] is not None]
            for m in here:
                if m["method"] == "full":
                    ax.axhline(m["score"], color="black", linestyle="--", linewidth=1, label="full")
                    if m.get("score_low") is not None:
                        ax.axhspan(m["score_low"], m["score_high"], color="black", alpha=0.08, linewidth=0)
            by_method: dict[str, list] = defaultdict(list)
            order = label_order(here)
            for m in sorted(here, key=lambda m: order.index(m["label"])):
                if m["method"] != "full" and (m["ratio"] is not None) == ratios:
                    by_method[m["method"]].append((_size(m), m["score"], m.get("score_low"), m.get("score_high")))
            for method, points in by_method.items():
                points.sort(key=lambda p: p[0])
                _line(ax, points, method)
            ax.set_xscale("log")
            sizes = sorted({_size(m) for m in here if m["method"] != "full" and (m["ratio"] is not None) == ratios})
            ax.set_xticks(sizes, [f"{v:.0%}" if ratios else str(v) for v in sizes])
            ax.minorticks_off()
            ax.set_title(task.split("/", 1)[-1], fontsize=10)
            ax.set_xlabel("budget (share of the prompt)" if ratios else "budget (tokens per layer)")
            ax.set_ylim(-3, 103)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(tasks):]:
            ax.axis("off")
        handles, labels = axes.flat[len(tasks) - 1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(8, len(labels)), frameon=False)
        fig.suptitle(f"{model} — {_view(mode, prot)}: score vs cache budget")
        fig.tight_layout(rect=(0, 0.06, 1, 0.96))
        written.append(save(fig, out / f"scores_{_slug(model)}_{_file_view(mode, prot)}.png"))
    return written


def plot_heatmaps(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """NeedleBench-style heatmaps: mean score by needle depth × context length, per method and budget."""
    plt = pyplot()
    written = []
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        meta = r.get("meta") or {}
        if r.get("error") is None and "depth" in meta and "length" in meta:
            groups[(r.get("model"), r["mode"], protocol(r), r["task"])].append(r)
    for (model, mode, prot, task), members in groups.items():
        lengths = sorted({r["meta"]["length"] for r in members})
        depths = sorted({r["meta"]["depth"] for r in members})
        if len(lengths) * len(depths) < 2:
            continue  # one cell: the table says it all
        table = summarise(members)
        labels = label_order([t for t in table if t["task"] != "average"])
        cols = min(5, len(labels))
        nrows = -(-len(labels) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols + 1, 2.4 * nrows + 0.6), squeeze=False)
        image = None
        for ax, label in zip(axes.flat, labels, strict=False):
            cell: dict[tuple, list[float]] = defaultdict(list)
            for r in members:
                if r["label"] == label:
                    cell[(r["meta"]["depth"], r["meta"]["length"])].append(r["score"])
            grid = [[sum(cell[(d, n)]) / len(cell[(d, n)]) if cell[(d, n)] else float("nan") for n in lengths]
                    for d in depths]
            image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            if len(depths) * len(lengths) <= 40:
                for y, line in enumerate(grid):
                    for x, value in enumerate(line):
                        if not math.isnan(value):
                            ax.text(x, y, f"{value:.0f}", ha="center", va="center", fontsize=7)
            ax.set_title(label, fontsize=8)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        for ax in list(axes.flat)[len(labels):]:
            ax.axis("off")
        if image is not None:
            fig.colorbar(image, ax=axes, shrink=0.6, label="score")
        fig.suptitle(f"{model} — {task} ({_view(mode, prot)}): depth × context length")
        written.append(save(fig, out / f"heatmap_{_slug(model)}_{_file_view(mode, prot)}_{_slug(task)}.png"))
    return written


def plot_allocation(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Tokens kept per layer after prefill for one sample, every method at each budget CAKE ran at."""
    plt = pyplot()
    written = []
    by_model: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("error") is None and r.get("layer_kept"):
            by_model[r.get("model")].append(r)
    for model, members in by_model.items():
        cake = [r for r in members if r["method"] == "cake"]
        if not cake:
            continue
        first = cake[0]
        sample = [r for r in members if (r["task"], r["id"], r["mode"], protocol(r))
                  == (first["task"], first["id"], first["mode"], protocol(first))]
        sizes = sorted({_size(r) for r in sample if r["method"] == "cake"}, reverse=True)
        fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 3.4), squeeze=False)
        for ax, size in zip(axes.flat, sizes, strict=False):
            for r in sample:
                if r["method"] != "full" and _size(r) == size:
                    ax.plot(range(len(r["layer_kept"])), r["layer_kept"], label=r["method"],
                            color=method_color(r["method"]), linewidth=2.5 if r["method"] == "cake" else 1)
            ax.set_title(f"{size:.0%} of the prompt" if size <= 1 and isinstance(size, float) else f"budget {size}",
                         fontsize=10)
            ax.set_xlabel("layer")
            ax.set_ylabel("tokens kept")
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"{model}: tokens kept per layer after prefill, {first['compressed_tokens']}-token prompt — "
                     f"{first['task']} {first['id']} ({_view(first['mode'], protocol(first))})", fontsize=10)
        fig.tight_layout()
        written.append(save(fig, out / f"allocation_{_slug(model)}.png"))
    return written


def _view(mode: str, prot: str) -> str:
    """A mode and protocol as titles name them (the ``whole`` protocol, the default, unnamed)."""
    return mode if prot == "whole" else f"{mode}, {prot} protocol"


def _file_view(mode: str, prot: str) -> str:
    """A mode and protocol as file names carry them (``whole`` unnamed: the names of earlier reports)."""
    return mode if prot == "whole" else f"{mode}_{prot}"


def _slug(text: Any) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in str(text))
