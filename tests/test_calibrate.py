"""tau calibration (``kvcake calibrate``): the search, the proxy's invariants, the decision rule, tau.json and its
loading by ``CAKE.from_preset`` and ``kvcake generate --preset``, and clear errors before any model work."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import kvcake
from kvcake import calibrate as cal
from kvcake import models
from kvcake.cli import app
from kvcake.eval.tasks import SuiteOptions, load_samples
from kvcake.methods.cake import tau_preset

TINY = dict(samples=2, lengths=[700], tasks=["ruler/niah_multikey", "ruler/vt"], max_new_tokens=6, progress=False)


@pytest.fixture(scope="module")
def chat(chat_model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield models.load(str(chat_model_dir))
    torch.set_num_threads(threads)


def test_spearman_by_hand():
    assert cal.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert cal.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties share their mean rank: x ranks 1, 2.5, 2.5, 4 against y's 1..4.
    rx, ry = [1, 2.5, 2.5, 4], [1, 2, 3, 4]
    mean = 2.5
    expected = sum((a - mean) * (b - mean) for a, b in zip(rx, ry, strict=True)) / math.sqrt(
        sum((a - mean) ** 2 for a in rx) * sum((b - mean) ** 2 for b in ry))
    assert cal.spearman([0, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(expected)
    assert cal.spearman([3, 3, 3], [1, 2, 3]) is None  # a constant metric ranks nothing
    assert cal.spearman([1, 2], [1, 2]) is None


def _points(metric, kl):
    grid = [0.5, 1.0, 2.0]
    pairs = [(a, b) for a in grid for b in grid]
    return [cal.Point(128, None, a, b, m, d) for (a, b), m, d in zip(pairs, metric, kl, strict=True)]


def test_the_proxy_chooses_only_where_it_ranks_settings_as_the_metric():
    metric = [10, 20, 30, 40, 50, 60, 70, 80, 75]
    agreeing = [9, 8, 7, 6, 5, 4, 3, 1, 2]  # lower KL where the metric is higher, best at (2.0, 1.0)
    criterion, best, rho = cal.choose({"128": _points(metric, agreeing)}, use_kl=True)
    assert criterion == "kl" and rho["128"] == pytest.approx(1.0) and best["128"] == [2.0, 1.0]
    reversed_ = [1, 2, 3, 4, 5, 6, 7, 9, 8]
    criterion, best, rho = cal.choose({"128": _points(metric, reversed_)}, use_kl=True)
    assert criterion == "metric" and rho["128"] == pytest.approx(-1.0) and best["128"] == [2.0, 1.0]
    # A constant metric: the correlation is undefined, so the metric decides and the KL breaks its ties.
    criterion, best, rho = cal.choose({"128": _points([50] * 9, reversed_)}, use_kl=True)
    assert criterion == "metric" and rho["128"] is None and best["128"] == [0.5, 0.5]
    # A loose agreement (0.73) is not enough at the default threshold (0.8), and is at a lower one.
    loose = [5, 9, 8, 7, 6, 1, 4, 3, 2]
    criterion, best, rho = cal.choose({"128": _points(list(range(10, 100, 10)), loose)}, use_kl=True)
    assert rho["128"] == pytest.approx(0.7333, abs=1e-4) and criterion == "metric" and best["128"] == [2.0, 2.0]
    criterion, best, _ = cal.choose({"128": _points(list(range(10, 100, 10)), loose)}, use_kl=True, threshold=0.7)
    assert criterion == "kl" and best["128"] == [1.0, 2.0]
    # One budget that disagrees is enough to keep the metric for all.
    criterion, _, _ = cal.choose({"128": _points(metric, agreeing), "1024": _points(metric, reversed_)}, use_kl=True)
    assert criterion == "metric"


def test_calibration_prompts_are_no_evaluation_prompts(chat):
    _, tokenizer = chat
    options = dict(lengths=[700], depths=[0.5], per_cell=2)
    evaluation = load_samples(["ruler/niah_multikey"], tokenizer, SuiteOptions(seed=0, **options))
    calibration = cal.search._samples(tokenizer, ["ruler/niah_multikey"], 2, [700], [0.5], 0, None)
    assert cal.calibration_seed(0) == "calibration-0"
    assert {s.context for s in evaluation}.isdisjoint({s.context for s in calibration})
    assert [s.id for s in evaluation] == [s.id for s in calibration]  # same cells, other prompts


def test_calibrate_writes_a_tau_file_that_presets_load(chat, chat_model_dir, tmp_path, monkeypatch):
    from kvcake.engines.transformers import replay as replay_module

    prefills = []
    record = replay_module.record_prefill

    def counted(*args, **kwargs):
        prefills.append(1)
        return record(*args, **kwargs)

    monkeypatch.setattr(replay_module, "record_prefill", counted)
    out = tmp_path / "tau.json"
    result = cal.calibrate("tiny", budgets=[48, 4096], ratios=[0.25], out=out, grid=[0.5, 1, 2], loaded=chat,
                           **TINY)
    assert len(prefills) == 2  # one prefill per calibration prompt, every setting replayed from it
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert set(data) >= {"model", "budgets", "ratios", "seed", "samples", "score", "spearman", "grid", "results"}
    assert data["seed"] == "calibration-0" and data["samples"] == 2 and data["grid"] == [0.5, 1.0, 2.0]
    assert set(data["budgets"]) == {"48", "4096"} and set(data["ratios"]) == {"0.25"}
    assert len(data["results"]) == 3 * 9 and data["score"] in ("metric", "kl")
    # A budget covering every prompt keeps the full cache whatever tau: KL 0 everywhere, the full cache's metric.
    covering = [r for r in data["results"] if r["budget"] == 4096]
    assert all(r["kl"] == 0 for r in covering) and {r["metric"] for r in covering} == {data["full_metric"]}
    assert data["spearman_by_budget"]["4096"] is None
    # The choice is the best point by the criterion the file names.
    for key, (t1, t2) in data["budgets"].items():
        points = [cal.Point(**r) for r in data["results"] if str(r["budget"]) == key]
        top = None
        for p in points:
            top = p if cal.choice._better(p, top, data["score"]) else top
        assert (top.tau1, top.tau2) == (t1, t2)
    # Loading: the nearest calibrated budget on a log scale (48 and 4096: the boundary is at sqrt(48 * 4096) = 443).
    assert tau_preset(str(out), 100) == tuple(data["budgets"]["48"])
    assert tau_preset(str(out), 1000) == tuple(data["budgets"]["4096"])
    assert tau_preset(str(out), None, ratio=0.3) == tuple(data["ratios"]["0.25"])
    cake = kvcake.CAKE.from_preset(str(out), budget=100)
    assert (cake.allocator.tau1, cake.allocator.tau2) == tuple(data["budgets"]["48"])
    assert kvcake.CAKE.from_preset(str(out), ratio=0.2).ratio == 0.2
    # kvcake generate --preset tau.json
    run = CliRunner().invoke(app, ["generate", "--model", str(chat_model_dir), "--input", "-", "--question", "Who?",
                                   "--method", "cake", "--budget", "100", "--preset", str(out), "--max-new-tokens",
                                   "2", "--json"], input="The keeper counted gulls. " * 40)
    assert run.exit_code == 0, run.output
    method = json.loads(run.stdout.strip().splitlines()[-1])["report"]["method"]
    assert (method["allocator"]["tau1"], method["allocator"]["tau2"]) == tuple(data["budgets"]["48"])


def test_coordinate_search_visits_fewer_points(chat, tmp_path):
    result = cal.calibrate("tiny", budgets=[48], out=None, grid=[0.4, 0.7, 1, 1.5, 2.3], search="coordinate",
                           score="metric", loaded=chat, **TINY)
    visited = {(r["tau1"], r["tau2"]) for r in result["results"]}
    assert (1.0, 1.0) in visited and len(visited) < 25
    assert result["score"] == "metric" and result["spearman"] is None
    assert all(r["kl"] is None for r in result["results"])  # --score metric computes no proxy


@pytest.mark.parametrize(("args", "message"), [
    (["--budgets", "128", "--grid", "1,-2"], "positive and finite"),
    (["--budgets", "128", "--grid", ","], "at least one temperature"),
    (["--budgets", "128", "--grid", "1,1"], "twice"),
    (["--budgets", "128", "--grid", "1,x"], "could not convert"),
    ([], "give --budgets and/or --ratios"),
    (["--budgets", "0"], "positive numbers of tokens"),
    (["--ratios", "1.5"], "fractions in (0, 1]"),
    (["--budgets", "128", "--search", "random"], "unknown --search"),
    (["--budgets", "128", "--model", "no-such-model"], "not a local model folder"),
    (["--budgets", "128", "--out", "/no/such/folder/tau.json"], "no such folder"),
    (["--budgets", "128", "--out", "tau.txt"], "name the file .json"),
    (["--budgets", "128", "--tasks", "nope"], "unknown task or suite"),
])
def test_bad_arguments_fail_before_any_model_loads(args, message, tmp_path, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load", no_loading)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["calibrate", "--no-progress", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_unreadable_tau_files_are_clear_errors(tmp_path):
    bad = tmp_path / "tau.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a tau file"):
        tau_preset(str(bad), 128)
    bad.write_text(json.dumps({"budgets": {}, "ratios": {"0.1": [1, 1]}}))
    with pytest.raises(ValueError, match="give a ratio"):
        tau_preset(str(bad), 128)
    with pytest.raises(KeyError, match="no published tau"):
        tau_preset(str(tmp_path / "missing.json"), 128)
