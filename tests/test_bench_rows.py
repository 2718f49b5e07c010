"""Benchmark rows: the typed row writes exactly the keys results have always had, and reads results back.

The results read here are the tests' own copies (``tests/data/bench``: an eager CPU run, a ``--compile`` CPU run and a
GPU run, as the benchmark wrote them), so that rerunning a benchmark into docs/bench never changes what is tested.
"""

import csv
import json
from pathlib import Path

import pytest

from kvcake import bench
from kvcake.bench import BenchRow

COMMITTED = sorted((Path(__file__).resolve().parent / "data" / "bench").rglob("results.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.parent.name)
def test_committed_rows_round_trip(path):
    data = json.loads(path.read_text())
    compiled_run = bool(data["meta"]["run"].get("compile"))
    for row in data["rows"]:
        typed = BenchRow.from_dict(row)
        assert typed.to_dict() == row and dict(typed) == row
        assert set(typed) == set(row) and len(typed) == len(row)
        # an eager run writes no compile columns; a --compile run writes them on every row
        assert ("compiled" in typed) == compiled_run and ("graph_breaks" in typed) == compiled_run


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.parent.name)
def test_committed_results_are_rewritten_with_their_columns(path, tmp_path):
    data = json.loads(path.read_text())
    meta = {k: v for k, v in data["meta"].items() if k not in ("notes", "run")}
    paths = bench.write_results(data["rows"], tmp_path, meta=meta, plots=False)
    again = json.loads(paths["json"].read_text())
    assert again["rows"] == data["rows"] and again["summary"] == data["summary"]
    assert again["meta"]["run"] == data["meta"]["run"]
    with paths["csv"].open() as f, (path.parent / "results.csv").open() as g:
        header, committed = next(csv.reader(f)), next(csv.reader(g))
    assert set(header) == set(committed)
    if all(not r["device"].startswith("cuda") for r in data["rows"]):  # CPU runs: the same column order
        assert header == committed


def test_keys_depend_on_the_row_as_before():
    full = BenchRow(length=8, method="full")
    cake = BenchRow(length=8, method="cake")
    method_only = {"stored_per_layer", "kept_end_per_layer", "padding_bytes"}
    assert not method_only & set(full) and method_only <= set(cake)
    assert "sdpa_backend" not in cake  # run_bench alone does not know the kernel
    cake["sdpa_backend"] = None
    assert "sdpa_backend" in cake and cake["sdpa_backend"] is None
    eager_of_compiled_run = BenchRow(length=8, method="cake", compiled=False)
    assert {"compiled", "compile_s", "graph_breaks", "recompiles"} <= set(eager_of_compiled_run)
    assert set(bench.MEANINGS) == {name for name in BenchRow.__dataclass_fields__ if name != "sdpa_recorded"}
    assert all(bench.MEANINGS.values())


def test_bad_rows_are_refused():
    with pytest.raises(ValueError, match="unknown benchmark row keys"):
        BenchRow.from_dict({"length": 8, "method": "full", "speed": 3})
    with pytest.raises(KeyError):
        BenchRow()["speed"] = 3
    with pytest.raises(KeyError):
        BenchRow(method="full")["padding_bytes"]


def test_the_fixtures_are_there():
    assert [p.parent.name for p in COMMITTED] == ["cpu-compile", "cpu-eager", "gpu"]
