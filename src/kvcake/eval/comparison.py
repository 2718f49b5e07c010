"""Each setting against a reference method on the same samples: wins, ties, losses and the paired bootstrap
interval of the mean score difference (:func:`kvcake.eval.stats.compare`).

A pair is one sample (model, mode, protocol, task, id) answered under both the setting and the reference; rows
that failed on either side, or that only one side has, make no pair. The reference of a setting is the reference
method at the same budget or ratio (its label without parameters when there are several, else the first label);
with ``full`` as the reference every setting is compared with the full cache.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from kvcake.eval import stats
from kvcake.eval.files import protocol

DEFAULT_REFERENCE = "snapkv"

#: The columns of ``comparison.csv``.
COLUMNS = ["model", "mode", "protocol", "label", "method", "budget", "ratio", "reference", "task", "tasks", "pairs",
           "wins", "ties", "losses", "difference", "difference_low", "difference_high"]


def _reference_label(label_rows: dict[str, dict[str, Any]], setting: dict[str, Any], reference: str) -> str | None:
    """The label of ``reference`` that ``setting`` (a row) is compared with, among the labels of ``label_rows``."""
    if reference == "full":
        return "full" if "full" in label_rows else None
    candidates = sorted(label for label, r in label_rows.items() if r["method"] == reference
                        and r["budget"] == setting["budget"] and r["ratio"] == setting["ratio"])
    plain = [label for label in candidates if not label_rows[label].get("params")]
    chosen = plain or candidates
    return chosen[0] if chosen else None


def _scored(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[tuple, float]]]:
    """Scores by (model, mode, protocol), then label, then (task, id): the rows that did not fail."""
    found: dict[tuple, dict[str, dict[tuple, float]]] = {}
    for r in rows:
        if r.get("error") is None and r.get("score") is not None:
            found.setdefault(_group(r), {}).setdefault(r["label"], {})[(r["task"], str(r["id"]))] = r["score"]
    return found


def _group(row: dict[str, Any]) -> tuple:
    """What a setting is compared within: the model, mode and protocol of a row."""
    return row.get("model"), row["mode"], protocol(row)


def _row(setting: dict[str, Any], ref: str, task: str, tasks: int | None, result: stats.Comparison) -> dict[str, Any]:
    return {"model": setting.get("model"), "mode": setting["mode"], "protocol": protocol(setting),
            "label": setting["label"],
            "method": setting["method"], "budget": setting["budget"], "ratio": setting["ratio"], "reference": ref,
            "task": task, **({"tasks": tasks} if tasks is not None else {}), "pairs": result.pairs,
            "wins": result.wins, "ties": result.ties, "losses": result.losses,
            "difference": round(result.difference, 2), "difference_low": round(result.low, 2),
            "difference_high": round(result.high, 2)}


def _pairs(mine: dict[tuple, float], theirs: dict[tuple, float]) -> dict[str, tuple[list[float], list[float]]]:
    """The paired scores per task, in the order of the sample ids."""
    by_task: dict[str, tuple[list[float], list[float]]] = {}
    for key in sorted(set(mine) & set(theirs)):
        a, b = by_task.setdefault(key[0], ([], []))
        a.append(mine[key])
        b.append(theirs[key])
    return by_task


def compare_rows(rows: list[dict[str, Any]], reference: str = DEFAULT_REFERENCE) -> list[dict[str, Any]]:
    """One row per (model, mode, protocol, setting, task) with pairs against its reference, and one per (model,
    mode, protocol, setting) for the ``average`` over the tasks with pairs (differences averaged over tasks; the
    interval resamples pairs within each task). ``full`` (unless it is the reference) and the reference's plain
    label are not compared; a variant of the reference method (other parameters) is compared with the plain one."""
    reference = reference.lower()
    scored = _scored(rows)
    label_rows: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        label_rows.setdefault(_group(r), {}).setdefault(r["label"], r)
    table: list[dict[str, Any]] = []
    for group in sorted(label_rows, key=lambda g: tuple(map(str, g))):
        labels = label_rows[group]
        for label in sorted(labels):
            setting = labels[label]
            ref = _reference_label(labels, setting, reference)
            # the reference's own variants (e.g. CAKE with calibrated temperatures) are compared with its plain label
            if setting["method"] == "full" or ref is None or ref == label:
                continue
            by_task = _pairs(scored.get(group, {}).get(label, {}), scored.get(group, {}).get(ref, {}))
            for task, (a, b) in by_task.items():
                table.append(_row(setting, ref, task, None, stats.compare([(task, a, b)])))
            if by_task:
                overall = stats.compare([(task, a, b) for task, (a, b) in by_task.items()])
                table.append(_row(setting, ref, "average", len(by_task), overall))
    return table


def write_comparison(folder: Path, table: list[dict[str, Any]]) -> None:
    """Write ``comparison.json`` and ``comparison.csv``."""
    (folder / "comparison.json").write_text(json.dumps(table, indent=2) + "\n")
    with (folder / "comparison.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(table)
