"""``bench --compile``: compiled StaticCache references, counted with torch's own counters (never timings' values).

A first compilation costs tens of seconds on CPU: two tests compile, on the ``tiny`` shape with a short prompt."""

import json

import pytest
import torch
from typer.testing import CliRunner

from kvcake import bench
from kvcake.bench.timing.compiled import DynamoCounts, compiled_static_case
from kvcake.bench.timing.loops import cache_of, greedy_steps

STEPS = 4


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield bench.random_model("tiny")  # float32 on CPU
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def test_compiled_static_full_cache_decodes_the_eager_tokens_in_one_graph(model):
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    out = model(ids, use_cache=True)
    _, eager = greedy_steps(model, cache_of(out), out.logits, ids.shape[1], STEPS, torch.device("cpu"))
    before = DynamoCounts.read()
    timing = compiled_static_case(model, ids, STEPS, warm_runs=1, timed_runs=1, device=torch.device("cpu"))
    assert DynamoCounts.read().since(before).graphs >= 1  # it really ran compiled
    assert timing.tokens == eager
    assert timing.graph_breaks == 0 and timing.recompiles == 0 and timing.mode == "default"
    assert len(timing.steps) == STEPS and timing.compile_s is not None and timing.compile_s > 0


def test_compiled_run_has_eager_and_compiled_rows_with_counters(model, tmp_path):
    rows = bench.run_bench(model, [24], ["cake"], budget=16, decode_tokens=3, repeats=1, warmup=0, progress=False,
                           method_options={"window": 8}, compile=True)
    assert [(r.method, r.compiled) for r in rows] == [("full", False), ("cake", False), ("full", True),
                                                      ("cake", True)]
    for r in rows:
        assert {"compiled", "compile_mode", "compile_s", "graph_breaks", "recompiles"} <= set(r)
    eager_cake, full, cake = rows[1], rows[2], rows[3]
    assert eager_cake.graph_breaks is None and eager_cake.decode_step_s > 0  # the eager case, as without compile
    # transformers' StaticCache, compiled: one graph for every timed step
    assert full.decode_step_s > 0 and len(full.decode_steps_s) == 3 and full.compile_s > 0
    assert full.graph_breaks == 0 and full.recompiles == 0
    # the method, compiled: one graph for every timed step too
    assert cake.decode_step_s > 0 and len(cake.decode_steps_s) == 3 and cake.compile_s > 0
    assert cake.graph_breaks == 0 and cake.recompiles == 0
    # its physical limit: a compiled StaticCache of the kept size
    assert cake.physical_limit_tokens == eager_cake.physical_limit_tokens == 16
    assert cake.physical_limit_decode_step_s > 0 and cake.physical_limit_compile_s > 0
    assert cake.physical_limit_graph_breaks == 0 and cake.physical_limit_recompiles == 0
    summary = "\n".join(bench.summarise_targets(rows))
    assert "compiled vs eager step (StaticCache / DynamicCache), full at 24 tokens" in summary
    assert "compiled vs eager physical limit (StaticCache / DynamicCache), cake at 24 tokens" in summary
    for what in ("compiled vs eager cake step", "compiled cake step / compiled plain static cache of the same size",
                 "compiled cake vs transformers' default full-cache step"):
        assert what in summary
    measured = [line for line in summary.splitlines() if "compiled cake" in line and "cake at 24 tokens" in line]
    assert len(measured) == 3 and not any("not measured" in line for line in measured)
    paths = bench.write_results(rows, tmp_path, plots=False)
    data = json.loads(paths["json"].read_text())
    assert data["rows"] == [r.to_dict() for r in rows] and data["meta"]["run"]["compile"] is True
    assert [bench.BenchRow.from_dict(d) for d in data["rows"]] == rows
    assert "## Compiled: decode time per token" in paths["md"].read_text()


def test_cli_passes_compile(monkeypatch, tmp_path):
    from kvcake.cli import app

    seen = {}

    def fake_bench(**kwargs):
        seen.update(kwargs)
        return [], {}

    monkeypatch.setattr(bench, "bench", fake_bench)
    result = CliRunner().invoke(app, ["bench", "--model", "tiny", "--lengths", "16", "--compile", "--out",
                                      str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen["compile"] is True
    CliRunner().invoke(app, ["bench", "--model", "tiny", "--lengths", "16", "--out", str(tmp_path)])
    assert seen["compile"] is False


def test_both_compiled_cases_trace_without_autograd(model, monkeypatch):
    # Decoding computes no gradients: a case compiled with autograd on traces a forward and backward graph (minutes
    # more to compile on SmolLM2, and slower steps), so a comparison of compile times must hold it off for both.
    from kvcake.bench.timing import compiled
    from kvcake.methods.registry import build

    seen = []

    def steps(*args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return [0.0] * STEPS, [0] * STEPS

    monkeypatch.setattr(compiled, "greedy_steps", steps)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    compiled.compiled_static_case(model, ids, STEPS, warm_runs=1, timed_runs=1, device=torch.device("cpu"))
    compiled.compiled_method_case(model, ids, build("cake", budget=16, window=4), STEPS, warm_runs=1, timed_runs=1,
                                  device=torch.device("cpu"))
    assert seen == [False] * 4
