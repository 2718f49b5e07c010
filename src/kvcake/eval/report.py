"""Turn evaluation result folders into a markdown report with plots (``kvcake report``): per-task and average
scores with their bootstrap intervals, a paired comparison of every setting with a reference method, the run
records, and the plots of :mod:`kvcake.eval.figures`."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from kvcake.eval import stats
from kvcake.eval.comparison import DEFAULT_REFERENCE, compare_rows, write_comparison
from kvcake.eval.figures import label_order, plot_allocation, plot_heatmaps, plot_scores
from kvcake.eval.files import PREDICTIONS, RECORD, has_predictions, protocol, read_predictions
from kvcake.eval.record import read_record
from kvcake.eval.sample import EvalDataError
from kvcake.eval.summary import write_metrics
from kvcake.methods.registry import METHODS


def load_results(folders: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All rows and run records under ``folders`` (each a run folder or a folder of run folders)."""
    rows, records = [], []
    runs = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise EvalDataError(f"{folder}: no such results folder")
        found = sorted({p.parent for p in folder.rglob(f"{PREDICTIONS}*.jsonl*") if has_predictions(p.parent)})
        if not found:
            raise EvalDataError(f"{folder}: no predictions*.jsonl(.gz) inside (run `kvcake eval --out {folder}` "
                                "first)")
        runs += found
    for run in runs:
        rows += read_predictions(run)
        if (run / RECORD).is_file():
            records.append(read_record(run))
    return rows, records


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def _with_interval(value, low, high) -> str:
    """``61.2 [48.0, 73.5]``; the value alone when there is no interval."""
    if value is None or low is None:
        return _fmt(value)
    return f"{value:.1f} [{low:.1f}, {high:.1f}]"


def _by_group(table: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """The rows of a table by model, mode and protocol: one table of the report each."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for t in table:
        groups[(t["model"], t["mode"], protocol(t))].append(t)
    return groups


def _view(mode: str, prot: str) -> str:
    """A mode and protocol as headings name them (the ``whole`` protocol, the default, unnamed)."""
    return mode if prot == "whole" else f"{mode}, {prot} protocol (the chat template's tail left uncompressed)"


INTERVALS = (f"`[low, high]` is the {stats.LEVEL:.0%} percentile-bootstrap interval of the mean over samples "
             f"({stats.RESAMPLES:,} resamples, fixed seed); for `average`, every resample draws each task's samples "
             "within that task and averages the task means.")


def _score_table(model, mode, members: list[dict[str, Any]]) -> list[str]:
    tasks = [t for t in dict.fromkeys(m["task"] for m in members) if t != "average"] + ["average"]
    cells = {(m["label"], m["task"]): m for m in members}
    lines = [f"## {model} — {mode}", "",
             ("Scores are in [0, 100] (the metric of each task); `KV kept` is the KV-cache bytes after prefill "
              "over the full cache's, averaged over samples. Failed samples are counted in `failed`. " + INTERVALS),
             ""]
    shared = max((m.get("tasks") or 0 for m in members if m["task"] == "average"), default=0)
    if shared < len(tasks) - 1:
        lines += [f"`average` is over the {shared} tasks every setting ran; the other columns are shown apart.", ""]
    lines.append("| method | KV kept | " + " | ".join(t.split("/", 1)[-1] for t in tasks) + " | failed |")
    lines.append("|---|---|" + "---|" * len(tasks) + "---|")
    for label in label_order(members):
        avg = cells.get((label, "average"))
        kept = f"{100 * avg['kv_fraction']:.1f}%" if avg and avg["kv_fraction"] is not None else "–"
        scores = [_with_interval(c["score"], c.get("score_low"), c.get("score_high")) if (c := cells.get((label, t)))
                  else "" for t in tasks]
        failed = avg["failed"] if avg else 0
        lines.append(f"| {label} | {kept} | " + " | ".join(scores) + f" | {failed} |")
    samples: dict[str, int] = {}
    for m in members:
        samples[m["task"]] = max(samples.get(m["task"], 0), m["samples"] + m["failed"])
    lines += ["", "Samples per task: " + ", ".join(f"{k.split('/', 1)[-1]} {v}" for k, v in samples.items()
                                                   if k != "average"), ""]
    return lines


def _comparison_table(model, mode, members: list[dict[str, Any]], reference: str) -> list[str]:
    """The paired comparison of every setting of (model, mode) with the reference: the ``average`` rows, then the
    tasks'."""
    average = [c for c in members if c["task"] == "average"]
    lines = [f"### {model} — {mode}: paired comparison with {reference}", "",
             (f"Each setting against {reference} at the same budget, on the samples both answered (same task, id "
              f"and mode): wins, ties and losses count samples; `difference` is the mean score difference "
              f"(setting − {reference}, averaged over the tasks with pairs) with its {stats.LEVEL:.0%} paired "
              "bootstrap interval (pairs resampled within each task)."), "",
             "| method | reference | tasks | pairs | wins | ties | losses | difference |",
             "|---|---|---|---|---|---|---|---|"]
    for label in label_order(average):
        c = next(c for c in average if c["label"] == label)
        lines.append(f"| {label} | {c['reference']} | {c['tasks']} | {c['pairs']} | {c['wins']} | {c['ties']} | "
                     f"{c['losses']} | {_difference(c)} |")
    return lines + [""] + _comparison_by_task(members)


def _difference(c: dict[str, Any]) -> str:
    return f"{c['difference']:+.1f} [{c['difference_low']:+.1f}, {c['difference_high']:+.1f}]"


def _comparison_by_task(members: list[dict[str, Any]]) -> list[str]:
    """The same comparison task by task (when there is more than one): a setting may lead on one task and trail on
    another, which the average hides."""
    tasks = [t for t in dict.fromkeys(c["task"] for c in members) if t != "average"]
    if len(tasks) < 2:
        return []
    cells = {(c["label"], c["task"]): c for c in members}
    lines = ["By task: wins/ties/losses, then the mean difference [its interval] on that task's pairs.", "",
             "| method | reference | " + " | ".join(t.split("/", 1)[-1] for t in tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]
    for label in label_order([c for c in members if c["task"] == "average"]):
        row = [f"{c['wins']}/{c['ties']}/{c['losses']}, {_difference(c)}" if (c := cells.get((label, t))) else ""
               for t in tasks]
        lines.append(f"| {label} | {cells[label, 'average']['reference']} | " + " | ".join(row) + " |")
    return lines + [""]


def _runs(records: list[dict[str, Any]]) -> list[str]:
    lines = ["## Runs", ""]
    for r in records:
        lines.append(f"- {r.get('model')} ({r.get('architecture')}, {r.get('dtype')}, {r.get('attention')}), "
                     f"seed {r.get('seed')}, suite options {json.dumps(r.get('suite'))}:")
        for run in (x for x in r.get("runs", []) if isinstance(x, dict)):
            versions = ", ".join(f"{k} {v}" for k, v in (run.get("versions") or {}).items())
            cap = run.get("max_new_tokens")
            status = run.get("status")
            unfinished = "" if status in (None, "completed") else (
                f"; **{'did not finish' if status == 'running' else status}**"
                + (f" ({run['error']})" if run.get("error") else ""))
            lines.append(f"  - {run.get('started')}: `{run.get('command')}` — commit "
                         f"{str(run.get('git_commit'))[:10]}; {versions}"
                         + (f"; answers capped at {cap} tokens" if cap else "") + unfinished)
    return lines + [""]


def markdown(table: list[dict[str, Any]], records: list[dict[str, Any]],
             comparison: list[dict[str, Any]] | None = None, reference: str = DEFAULT_REFERENCE) -> str:
    """``report.md``: a score table per model, mode and protocol, the paired comparisons with ``reference``, the
    runs."""
    lines = ["# kvcake evaluation", ""]
    for (model, mode, prot), members in _by_group(table).items():
        lines += _score_table(model, _view(mode, prot), members)
    if comparison is not None:
        groups = _by_group(comparison)
        lines += [f"## Paired comparison with {reference}", ""]
        if not groups:
            lines += [f"No setting shares samples with {reference} at its budget.", ""]
        for (model, mode, prot), members in groups.items():
            lines += _comparison_table(model, _view(mode, prot), members, reference)
    if records:
        lines += _runs(records)
    return "\n".join(lines)


def report(folders: list[Path], out: Path, plots: bool = True, reference: str = DEFAULT_REFERENCE) -> Path:
    """Write ``report.md``, ``metrics.csv``/``metrics.json``, ``comparison.csv``/``comparison.json`` (every
    setting against ``reference``, a method name) and the plots for the results in ``folders``."""
    reference = reference.lower()
    if reference not in METHODS:
        raise EvalDataError(f"unknown reference method {reference!r}; known: {', '.join(METHODS)}")
    rows, records = load_results(folders)
    out.mkdir(parents=True, exist_ok=True)
    table = write_metrics(out, rows)
    comparison = compare_rows(rows, reference)
    write_comparison(out, comparison)
    text = markdown(table, records, comparison, reference)
    if plots:
        images = plot_scores(table, out) + plot_heatmaps(rows, out) + plot_allocation(rows, out)
        text += "\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n"
    path = out / "report.md"
    path.write_text(text)
    return path
