"""The per-task tables of docs/eval/v2/README.md from a `kvcake report` folder: each setting's mean score with its 95%
interval per task, and each setting paired with the report's reference (wins/ties/losses, mean difference [95%]).

    python docs/eval/v2/tables.py docs/eval/v2/qwen
"""

import csv
import sys
from pathlib import Path

TASKS = ["needlebench/single", "needlebench/multi_retrieval", "ruler/niah_multikey", "ruler/niah_multivalue",
         "ruler/niah_multiquery", "ruler/vt"]


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


METHODS = ["full", "cake", "snapkv", "pyramidkv", "ada-snapkv", "cake-knorm", "cake-expected-attention"]


def _order(label: str) -> tuple:
    """full first, then by budget (largest first), then in run.sh's order of methods."""
    method, _, budget = label.partition("@")
    return (method != "full", -float(budget.lstrip("rb") or "inf"),
            METHODS.index(method) if method in METHODS else len(METHODS), method)


def _cell(low: str, high: str, value: str, sign: bool = False) -> str:
    number = (lambda x: f"{float(x):+.1f}") if sign else (lambda x: f"{float(x):.1f}")
    return f"{number(value)} [{number(low)}, {number(high)}]".replace("-", "−")


def main(folder: Path) -> None:
    metrics = [r for r in _read(folder / "metrics.csv") if r["protocol"] == "whole"]
    tasks = [t for t in TASKS if any(r["task"] == t for r in metrics)]
    names = [t.split("/", 1)[1] for t in tasks]
    by = {(r["label"], r["task"]): r for r in metrics}
    print("| setting | KV kept | " + " | ".join(names) + " |")
    print("|---|---:|" + "---|" * len(tasks))
    for label in sorted({r["label"] for r in metrics}, key=_order):
        cells = [_cell(by[label, t]["score_low"], by[label, t]["score_high"], by[label, t]["score"])
                 if (label, t) in by else "" for t in tasks]
        kept = [float(r["kv_fraction"]) for r in metrics if r["label"] == label and r["kv_fraction"]]
        print(f"| {label} | {sum(kept) / len(kept):.0%} | " + " | ".join(cells) + " |")
    counts = {t: max(int(by[label, t]["samples"]) for label, task in by if task == t) for t in tasks}
    print("| samples | | " + " | ".join(str(counts[t]) for t in tasks) + " |")
    print()
    pairs = [r for r in _read(folder / "comparison.csv") if r["protocol"] == "whole"]
    print("| setting | reference | " + " | ".join(names) + " | all tasks |")
    print("|---|---|" + "---|" * (len(tasks) + 1))
    for label in sorted({r["label"] for r in pairs}, key=_order):
        mine = {r["task"]: r for r in pairs if r["label"] == label}
        cells = []
        for task in tasks + [""]:
            r = mine.get(task or "average")
            cells.append(f"{r['wins']}/{r['ties']}/{r['losses']}, "
                         + _cell(r["difference_low"], r["difference_high"], r["difference"], sign=True) if r else "")
        reference = next(iter(mine.values()))["reference"]
        print(f"| {label} | {reference} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
