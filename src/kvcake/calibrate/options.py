"""The arguments of a calibration run, checked before any model is loaded, and the seed of its prompts."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

#: The grid of temperatures searched by default: the span of the authors' published values.
DEFAULT_GRID = (0.4, 0.7, 1.0, 1.5, 2.3)
#: Calibration tasks by default: retrieval of one and of several facts, and a multi-hop chain.
DEFAULT_TASKS = ("ruler/niah_multikey", "needlebench/multi_retrieval", "ruler/vt")
SEARCHES = ("grid", "coordinate")
SCORES = ("auto", "metric")
#: The least Spearman correlation (every budget) for the KL proxy to choose.
THRESHOLD = 0.8


class CalibrationError(ValueError):
    """A bad calibration argument (grid, budgets, output path, model)."""


def calibration_seed(seed: int) -> str:
    """The seed calibration prompts are generated from: a string, so it differs from every integer seed of
    ``kvcake eval`` (the generators hash ``"<seed>/<suite>/<task>/..."``)."""
    return f"calibration-{seed}"


# -- arguments --------------------------------------------------------------------------------------------------------
def check_grid(grid: Iterable[float]) -> list[float]:
    values = [float(v) for v in grid]
    if not values:
        raise CalibrationError("--grid needs at least one temperature, e.g. 0.4,0.7,1,1.5,2.3")
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise CalibrationError(f"--grid temperatures must be positive and finite, not {bad[0]:g}")
    if len(set(values)) != len(values):
        raise CalibrationError("--grid names a temperature twice")
    return sorted(values)


def check_arguments(budgets: Sequence[int], ratios: Sequence[float], samples: int, grid: Iterable[float],
                    search: str, score: str, k: int, out: Path | None) -> list[float]:
    """Every argument, before a model is loaded; returns the sorted grid."""
    values = check_grid(grid)
    if not budgets and not ratios:
        raise CalibrationError("give --budgets and/or --ratios to calibrate for")
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
            raise CalibrationError(f"--budgets are positive numbers of tokens per layer, not {b!r}")
    for r in ratios:
        if not 0 < r <= 1:
            raise CalibrationError(f"--ratios are fractions in (0, 1], not {r!r}")
    if len(set(budgets)) != len(budgets) or len(set(ratios)) != len(ratios):
        raise CalibrationError("a budget or ratio is given twice")
    if samples < 1:
        raise CalibrationError(f"--samples takes a positive number, not {samples}")
    if search not in SEARCHES:
        raise CalibrationError(f"unknown --search {search!r}; choose {' or '.join(SEARCHES)}")
    if score not in SCORES:
        raise CalibrationError(f"unknown --score {score!r}; choose {' or '.join(SCORES)}")
    if k < 2:
        raise CalibrationError(f"--kl-tokens must be at least 2 (the first token's distribution is the prefill's), "
                               f"not {k}")
    if out is not None:
        check_writable(out)
    return values


def check_writable(out: Path) -> None:
    """``out`` can be written now (a calibration run is long: never lose it to a bad path at the end)."""
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise CalibrationError(f"--out {str(out)!r} is a folder; give a file name such as tau.json")
    if not out.name.lower().endswith(".json"):
        raise CalibrationError(f"--out {str(out)!r}: name the file .json (kvcake generate --preset reads .json files)")
    if not folder.is_dir():
        raise CalibrationError(f"--out {str(out)!r}: no such folder {str(folder)!r}")
    if not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise CalibrationError(f"--out {str(out)!r} is not writable")


__all__ = ["DEFAULT_GRID", "DEFAULT_TASKS", "SCORES", "SEARCHES", "THRESHOLD", "CalibrationError",
           "calibration_seed", "check_arguments", "check_grid", "check_writable"]
