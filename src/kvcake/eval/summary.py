"""Per-task and average scores of a folder's rows with their bootstrap intervals, the metrics files, and merging
the shards' predictions."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from kvcake.eval import stats
from kvcake.eval.files import PREDICTIONS, prediction_files, protocol, scan_predictions

#: The columns of ``metrics.csv``.
COLUMNS = ["model", "mode", "protocol", "label", "method", "budget", "ratio", "task", "tasks", "samples", "failed",
           "score", "score_low", "score_high", "kv_fraction"]


def _rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _scores(members: list[dict[str, Any]]) -> list[float]:
    """The scores of the rows that did not fail, in the order of their sample ids (so that an interval does not
    depend on the order rows were written in)."""
    ok = sorted((r for r in members if r.get("error") is None), key=lambda r: str(r["id"]))
    return [r["score"] for r in ok]


def _per_task(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[tuple, list[float]]]:
    """Mean score (with its bootstrap interval) and KV fraction per (model, mode, protocol, label, task), over the
    rows that did not fail; and those rows' scores per group."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("model"), r["mode"], protocol(r), r["label"], r["task"]), []).append(r)
    table, scores = [], {}
    for key, members in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        model, mode, prot, label, task = key
        ok = [r for r in members if r.get("error") is None]
        scores[key] = _scores(members)
        low, high = stats.mean_interval(scores[key], stream=str(task)) if ok else (None, None)
        first = members[0]
        table.append({
            "model": model, "mode": mode, "protocol": prot, "label": label, "method": first["method"],
            "budget": first["budget"],
            "ratio": first["ratio"], "task": task, "samples": len(ok), "failed": len(members) - len(ok),
            "score": round(sum(r["score"] for r in ok) / len(ok), 2) if ok else None,
            "score_low": _rounded(low), "score_high": _rounded(high),
            "kv_fraction": round(sum(r["kv_bytes"] / r["kv_bytes_full"] for r in ok) / len(ok), 4) if ok else None,
        })
    return table, scores


def _averages(table: list[dict[str, Any]], scores: dict[tuple, list[float]]) -> list[dict[str, Any]]:
    """The average over tasks per (model, mode, protocol, label), with the stratified bootstrap interval
    (:func:`~kvcake.eval.stats.macro_interval`: each replicate resamples every task's samples within the task).

    It runs over the tasks every setting of a (model, mode, protocol) has a score for, so that averages compare
    like with like when some settings ran on more tasks than others; ``tasks`` says how many.
    """
    scored_tasks: dict[tuple, dict[str, set[str]]] = {}
    for t in table:
        if t["score"] is not None:
            scored_tasks.setdefault((t["model"], t["mode"], t["protocol"]), {}).setdefault(t["label"], set()).add(
                t["task"])
    common = {group: set.intersection(*labels.values()) for group, labels in scored_tasks.items()}
    averages: dict[tuple, list[dict[str, Any]]] = {}
    for t in table:
        averages.setdefault((t["model"], t["mode"], t["protocol"], t["label"]), []).append(t)
    out = []
    for (model, mode, prot, label), members in averages.items():
        shared = common.get((model, mode, prot), set())
        scored = [t for t in members if t["score"] is not None and t["task"] in shared]
        groups = [(str(t["task"]), scores[(model, mode, prot, label, t["task"])]) for t in scored]
        low, high = stats.macro_interval(groups) if groups else (None, None)
        first = members[0]
        out.append({
            "model": model, "mode": mode, "protocol": prot, "label": label, "method": first["method"],
            "budget": first["budget"],
            "ratio": first["ratio"], "task": "average", "samples": sum(t["samples"] for t in members),
            "failed": sum(t["failed"] for t in members), "tasks": len(scored),
            "score": round(sum(t["score"] for t in scored) / len(scored), 2) if scored else None,
            "score_low": _rounded(low), "score_high": _rounded(high),
            "kv_fraction": round(sum(t["kv_fraction"] for t in scored) / len(scored), 4) if scored else None,
        })
    return out


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean score per (model, mode, protocol, label, task) and the average over tasks, each with its 95% bootstrap
    interval (``score_low``, ``score_high``); failed rows are counted, not scored."""
    table, scores = _per_task(rows)
    return table + _averages(table, scores)


def write_metrics(folder: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write ``metrics.json`` and ``metrics.csv`` (per task and average) for the rows of ``folder``."""
    table = summarise(rows)
    (folder / "metrics.json").write_text(json.dumps(table, indent=2) + "\n")
    with (folder / "metrics.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(table)
    return table


def merge(folder: Path) -> list[dict[str, Any]]:
    """Merge the shards' prediction files of ``folder`` (and a packed one) into one ``predictions.jsonl`` and write
    the metrics (lines that are not rows are dropped)."""
    rows = scan_predictions(folder).rows
    rows.sort(key=lambda r: (r["task"], str(r["id"]), r["mode"], protocol(r), r["label"]))
    tmp = folder / f".{PREDICTIONS}.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    merged = folder / f"{PREDICTIONS}.jsonl"
    tmp.replace(merged)
    for path in prediction_files(folder):  # the shards, and a packed file: every row is in the merged file now
        if path != merged:
            path.unlink()
    write_metrics(folder, rows)
    return rows
