"""The evaluation runner: prompts, the grid, resuming, failures, metrics files, sharding and the report."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from kvcake import models
from kvcake.eval import runner
from kvcake.eval.prompts import question_length
from kvcake.eval.report import report
from kvcake.eval.sample import EvalDataError, Sample

STORY = " ".join(f"Line {i}: the lighthouse keeper counted {i * 7} gulls before noon." for i in range(60))


def sample(i: int = 0, **overrides) -> Sample:
    fields = dict(task="ruler/niah_single", id=f"s{i}", prefix="Read the text.\n\n", context=STORY,
                  question=f"\n\nHow many gulls on line {i}?", answers=[str(i * 7)], metric="string_match_all",
                  max_new_tokens=6, meta={"length": 700, "depth": 0.5})
    fields.update(overrides)
    return Sample(**fields)


@pytest.fixture(scope="module")
def chat(chat_model_dir):
    return models.load(str(chat_model_dir))


def test_encode_splits_the_chat_prompt_at_the_question(chat):
    _, tokenizer = chat
    s = sample()
    enc = runner.encode(tokenizer, s)
    whole = tokenizer.apply_chat_template([{"role": "user", "content": s.prefix + s.context + s.question}],
                                          tokenize=False, add_generation_prompt=True)
    head = tokenizer.decode(enc.context_ids[0])
    tail = tokenizer.decode(enc.question_ids[0])
    assert head + tail == whole
    assert tail.startswith(s.question) and head.endswith(s.context)


def test_answer_prefix_opens_the_assistant_turn(chat):
    _, tokenizer = chat
    s = sample(answer_prefix="Answer: it is")
    enc = runner.encode(tokenizer, s)
    whole = tokenizer.apply_chat_template([{"role": "user", "content": s.prefix + s.context + s.question}],
                                          tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(enc.context_ids[0]) + tokenizer.decode(enc.question_ids[0]) == whole + "Answer: it is"
    assert question_length(tokenizer, s) == enc.question_ids.shape[1]
    plain = runner.encode(tokenizer, sample(answer_prefix="Answer: it is", chat=False))
    assert tokenizer.decode(plain.question_ids[0]) == s.question + "Answer: it is"
    # the tail protocol leaves the answer prefix uncompressed with the template's tail
    from kvcake.eval.answering import tail_tokens
    from kvcake.pipeline import chat_tail_length

    added = len(tokenizer("Answer: it is", add_special_tokens=False)["input_ids"])
    assert tail_tokens(tokenizer, s, "query-aware", "tail") == chat_tail_length(tokenizer) + added
    assert tail_tokens(tokenizer, sample(), "query-aware", "tail") == chat_tail_length(tokenizer)
    assert tail_tokens(tokenizer, s, "query-aware", "whole") == 0


def test_sample_hash_without_answer_prefix_is_unchanged():
    # the hash of a sample without an answer prefix, as computed before the field existed: rows already written
    # for such samples stay valid
    s = Sample(task="ruler/niah_single", id="L2000_D0.5_R0", context="ctx", question="q?", answers=["1234567"],
               metric="string_match_all", max_new_tokens=128, prefix="p", meta={"depth": 0.5})
    assert s.digest() == "402e88c75508ff55"
    assert Sample(**{**s.to_dict(), "answer_prefix": "A:"}).digest() != s.digest()


def test_encode_without_chat_template_adds_bos_once(chat):
    _, tokenizer = chat
    enc = runner.encode(tokenizer, sample(chat=False))
    assert tokenizer.decode(enc.context_ids[0], skip_special_tokens=True) == sample().prefix + STORY
    assert enc.question_ids[0].tolist() == tokenizer(sample().question, add_special_tokens=False)["input_ids"]


def test_middle_truncation_keeps_both_ends_of_the_context(chat):
    _, tokenizer = chat
    full = runner.encode(tokenizer, sample())
    cut = runner.encode(tokenizer, sample(), max_length=300)
    assert cut.length <= 300 and cut.truncated > 0
    text = tokenizer.decode(cut.context_ids[0])
    assert "Line 0:" in text and "Line 59:" in text and "Line 30:" not in text
    assert torch.equal(cut.question_ids, full.question_ids)
    with pytest.raises(ValueError, match="without its context"):
        runner.encode(tokenizer, sample(prefix="word " * 400), max_length=100)


def test_grid_labels_and_validation():
    settings = runner.grid(["full", "cake", "snapkv"], budgets=[64], ratios=[0.5])
    assert [s.label for s in settings] == ["full", "cake@b64", "cake@r0.5", "snapkv@b64", "snapkv@r0.5"]
    assert runner.grid(["cake"], ratios=[0.25], params={"cake": {"gamma": 100}})[0].label == "cake@r0.25,gamma=100"
    with pytest.raises(ValueError, match="unknown method"):
        runner.grid(["nope"], ratios=[0.5])
    with pytest.raises(ValueError, match="no parameter"):
        runner.grid(["snapkv"], ratios=[0.5], params={"snapkv": {"gamma": 1}})
    with pytest.raises(ValueError, match="budget or ratio"):
        runner.grid(["cake"])


def _run(chat, out, samples, settings, modes=("query-aware",), **kw):
    model, tokenizer = chat
    return runner.EvalRun(model, tokenizer, samples, settings, list(modes), out,
                          models.eos_token_ids(model, tokenizer), record={"model": "tiny", "seed": 0, "suite": {},
                                                                          "started": "now"},
                          progress=False, **kw).run()


def test_run_writes_rows_metrics_and_resumes(chat, tmp_path):
    settings = runner.grid(["full", "cake", "snapkv"], ratios=[0.5], budgets=[2000])
    samples = [sample(0), sample(1)]
    rows = _run(chat, tmp_path, samples, settings, modes=runner.MODES)
    assert len(rows) == 2 * 5 * 2 and all(r["error"] is None for r in rows)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 20
    # A budget covering the prompt answers exactly as the full cache; a ratio keeps about half the KV bytes.
    by = {(r["id"], r["label"], r["mode"]): r for r in rows}
    for i in ("s0", "s1"):
        for mode in runner.MODES:
            assert by[(i, "cake@b2000", mode)]["prediction"] == by[(i, "full", mode)]["prediction"]
            assert by[(i, "cake@r0.5", mode)]["kv_bytes"] < 0.6 * by[(i, "full", mode)]["kv_bytes"]
    table = json.loads((tmp_path / "metrics.json").read_text())
    assert {t["task"] for t in table} == {"ruler/niah_single", "average"}
    assert (tmp_path / "metrics.csv").read_text().startswith("model,mode,protocol,label")
    # Resuming does nothing new; a lost row is redone, alone.
    _run(chat, tmp_path, samples, settings, modes=runner.MODES)
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 20
    kept = [line for line in lines if json.loads(line)["key"] != runner.row_key("ruler/niah_single", "s1", "cake@r0.5",
                                                                                "query-agnostic")]
    (tmp_path / "predictions.jsonl").write_text("\n".join(kept) + '\n{"torn": ')
    with pytest.warns(runner.EvalDataWarning, match="left out 1 line"):
        rows = _run(chat, tmp_path, samples, settings, modes=runner.MODES)
    assert len(rows) == 20
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 21  # 19 kept + torn line + 1 redone


def test_a_failing_sample_is_recorded_and_the_rest_goes_on(chat, tmp_path):
    settings = runner.grid(["full", "cake"], ratios=[0.5])
    bad = sample(1, metric="no_such_metric")
    huge = sample(2, prefix="word " * 5000)  # the prompt without context is longer than the limit
    rows = _run(chat, tmp_path, [sample(0), bad, huge], settings, max_length=1000)
    errors = {(r["id"], r["label"]): r["error"] for r in rows}
    assert errors[("s0", "full")] is None and errors[("s0", "cake@r0.5")] is None
    assert "no_such_metric" in errors[("s1", "full")] and "without its context exceeds" in errors[("s2", "cake@r0.5")]
    avg = [t for t in json.loads((tmp_path / "metrics.json").read_text()) if t["task"] == "average"]
    assert all(t["failed"] == 2 and t["samples"] == 1 for t in avg)
    # --retry-failed redoes exactly the failed rows.
    rows = _run(chat, tmp_path, [sample(0), bad, huge], settings, max_length=1000, retry_failed=True)
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 6 + 4


def test_record_refuses_another_model(chat, tmp_path):
    settings = runner.grid(["full"])
    _run(chat, tmp_path, [sample(0)], settings)
    model, tokenizer = chat
    other = runner.EvalRun(model, tokenizer, [sample(0)], settings, ["query-aware"], tmp_path, [],
                           record={"model": "other", "seed": 0, "suite": {}, "started": "now"}, progress=False)
    with pytest.raises(ValueError, match="model"):
        other.run()


def test_report_tables_and_plots(chat, tmp_path):
    settings = runner.grid(["full", "cake", "snapkv"], ratios=[0.5, 0.25])
    samples = [sample(i, meta={"length": n, "depth": d}, id=f"{n}-{d}") for i, (n, d) in
               enumerate([(500, 0.0), (500, 1.0), (1000, 0.0), (1000, 1.0)])]
    _run(chat, tmp_path / "run", samples, settings)
    path = report([tmp_path / "run"], tmp_path / "report")
    text = path.read_text()
    assert "| cake@r0.5 |" in text and "| full |" in text and "niah_single" in text
    names = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"report.md", "metrics.csv", "metrics.json", "comparison.csv", "comparison.json",
            "scores_tiny_query-aware.png", "allocation_tiny.png",
            "heatmap_tiny_query-aware_ruler_niah_single.png"} <= names
    # Every score has its interval, in the table and in the metrics files.
    table = json.loads((tmp_path / "report" / "metrics.json").read_text())
    for t in table:
        assert t["score_low"] <= t["score"] <= t["score_high"]
        cell = f"{t['score']:.1f} [{t['score_low']:.1f}, {t['score_high']:.1f}]"
        assert cell in text
    assert (tmp_path / "report" / "metrics.csv").read_text().startswith(
        "model,mode,protocol,label,method,budget,ratio,task,tasks,samples,failed,score,score_low,score_high,kv_fraction")
    # The paired comparison with snapkv at the same ratio, over the 4 samples.
    assert "## Paired comparison with snapkv" in text
    compared = {c["label"]: c for c in json.loads((tmp_path / "report" / "comparison.json").read_text())
                if c["task"] == "average"}
    assert set(compared) == {"cake@r0.5", "cake@r0.25"} and compared["cake@r0.25"]["reference"] == "snapkv@r0.25"
    assert all(c["pairs"] == 4 == c["wins"] + c["ties"] + c["losses"] for c in compared.values())
    assert f"| cake@r0.5 | snapkv@r0.5 | 1 | 4 | {compared['cake@r0.5']['wins']} |" in text
    with pytest.raises(EvalDataError, match="unknown reference method 'nope'"):
        report([tmp_path / "run"], tmp_path / "again", reference="nope")
    with pytest.raises(EvalDataError, match="no predictions"):
        report([tmp_path / "report"], tmp_path / "again")


def test_sharded_run_with_torchrun_merges(chat_model_dir, tmp_path):
    """Two processes under torchrun (gloo on CPU) split the samples and rank 0 merges them."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "kvcake.cli", "eval", "--models", str(chat_model_dir), "--tasks", "ruler/niah_single",
           "--lengths", "200", "--per-cell", "2", "--depths", "0.5", "--methods", "full,cake", "--ratios", "0.5",
           "--out", str(tmp_path), "--no-progress", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / chat_model_dir.name
    assert not list(folder.glob("predictions.rank*.jsonl"))
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 and {r["id"] for r in rows} and all(r["error"] is None for r in rows)
    record = json.loads((folder / "run.json").read_text())
    assert record["runs"][-1]["shards"] == 2 and record["runs"][-1]["versions"]["torch"] == torch.__version__


def test_a_shard_reads_the_folder_only_after_rank_0_merged(chat, tmp_path, monkeypatch):
    """Rank 0's merge removes the shard files: a shard that read the folder meanwhile could list a file and find it
    gone when opening it (a CI run failed so). Rank 1 runs here in-process; the barrier stands in for rank 0."""
    from kvcake.eval import run as run_module
    from kvcake.eval.files import Shard
    from kvcake.eval.summary import merge

    phase = []

    def barrier(shard):  # rank 0 merges between the first barrier and the second
        phase.append("merging" if not phase else "merged")
        if phase[-1] == "merged":
            merge(tmp_path)

    scan = run_module.scan_predictions

    def guarded_scan(folder):
        assert phase[-1:] != ["merging"], "rank 1 read the shard files while rank 0 was removing them"
        return scan(folder)

    monkeypatch.setattr(run_module, "barrier", barrier)
    monkeypatch.setattr(run_module, "scan_predictions", guarded_scan)
    rows = _run(chat, tmp_path, [sample(0), sample(1)], runner.grid(["full"]), shard=Shard(1, 2))
    assert phase == ["merging", "merged"] and [r["id"] for r in rows] == ["s1"]
    assert not list(tmp_path.glob("predictions.rank*.jsonl")) and (tmp_path / "predictions.jsonl").is_file()


# -- the resume contract and a run's record ---------------------------------------------------------------------------
def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize(("change", "named"), [
    ({"max_new_tokens": 3}, "max_new_tokens=None, not 3"),
    ({"max_length": 900}, "max_length=None, not 900"),
])
def test_resume_refuses_other_answer_limits(chat, tmp_path, change, named):
    settings = runner.grid(["full"])
    _run(chat, tmp_path, [sample(0)], settings)
    before = _files(tmp_path)
    with pytest.raises(EvalDataError, match=named):
        _run(chat, tmp_path, [sample(0)], settings, **change)
    assert _files(tmp_path) == before  # refused before anything is written
    _run(chat, tmp_path, [sample(0)], settings)  # the same settings resume
    assert len(json.loads((tmp_path / "run.json").read_text())["runs"]) == 2


def test_resume_refuses_other_method_parameters_and_other_samples(chat, tmp_path):
    settings = runner.grid(["cake"], ratios=[0.5])
    _run(chat, tmp_path, [sample(0)], settings)
    path = tmp_path / "run.json"
    record = json.loads(path.read_text())
    record["methods"]["cake@r0.5"]["scorer"]["gamma"] = 100.0  # as another version's default would have it
    path.write_text(json.dumps(record))
    with pytest.raises(EvalDataError, match=r"cake@r0.5 answers made with scorer.gamma=100.0, not 200.0"):
        _run(chat, tmp_path, [sample(0)], settings)
    record["methods"]["cake@r0.5"]["scorer"]["gamma"] = 200.0
    # A parameter added to kvcake since the folder was written resumes at its default, and is refused at another
    # value: folders written before CAKE's indicator had a pooling option resume.
    del record["methods"]["cake@r0.5"]["scorer"]["pooling"]
    path.write_text(json.dumps(record))
    _run(chat, tmp_path, [sample(0)], settings)
    from kvcake.eval.record import check_resume

    old = {"methods": {"cake@r0.5": {"scorer": {"gamma": 200.0}}}}
    new = {"methods": {"cake@r0.5": {"scorer": {"gamma": 200.0, "pooling": "max"}}}}
    with pytest.raises(EvalDataError, match=r"cake@r0.5 answers made with scorer.pooling=None, not 'max'"):
        check_resume(old, new, path, {"cake@r0.5": {"scorer": {"gamma": 200.0, "pooling": "avg"}}})
    # Another chat rule (or prompt) under the same task and id is another sample: its rows are not reused.
    for changed in (sample(0, chat=False), sample(0, context=STORY[:-1])):
        with pytest.raises(EvalDataError, match="another version of sample ruler/niah_single s0"):
            _run(chat, tmp_path, [changed], settings)
    assert len(_run(chat, tmp_path, [sample(0), sample(1)], settings)) == 2


def test_lines_that_are_not_rows_are_left_out_and_counted(chat, tmp_path):
    settings = runner.grid(["full"])
    _run(chat, tmp_path, [sample(0), sample(1)], settings)
    path = tmp_path / "predictions.jsonl"
    lines = path.read_text().splitlines()
    dropped = json.loads(lines[1])["key"]
    path.write_text("\n".join([lines[0], "[1, 2]", '"x"', "3", "null", '{"key": "no other field"}']) + "\n")
    with pytest.warns(runner.EvalDataWarning, match="left out 5 line"):
        rows = _run(chat, tmp_path, [sample(0), sample(1)], settings)
    assert sorted(r["key"] for r in rows) == sorted([json.loads(lines[0])["key"], dropped])  # the lost row redone
    run = json.loads((tmp_path / "run.json").read_text())["runs"][-1]
    assert run["ignored_lines"] == 5 and run["status"] == "completed"
    with pytest.warns(runner.EvalDataWarning, match="predictions.jsonl: 5"):
        assert len(runner.read_predictions(tmp_path)) == 2


def test_a_run_that_fails_is_recorded_as_failed(chat, tmp_path, monkeypatch):
    settings = runner.grid(["full"])

    def broken(*args, **kwargs):
        raise RuntimeError("the device went away")
        yield

    monkeypatch.setattr("kvcake.eval.run.answer_batch", broken)
    with pytest.raises(RuntimeError, match="went away"):
        _run(chat, tmp_path, [sample(0)], settings)
    runs = json.loads((tmp_path / "run.json").read_text())["runs"]
    assert runs[-1]["status"] == "failed" and "went away" in runs[-1]["error"]
    monkeypatch.undo()
    _run(chat, tmp_path, [sample(0)], settings)
    runs = json.loads((tmp_path / "run.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["failed", "completed"] and "finished" in runs[-1]


def test_a_run_stopped_by_sigterm_is_recorded_as_interrupted(chat, tmp_path, monkeypatch):
    settings = runner.grid(["full"])

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # what `kill PID` does to a run
        yield

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr("kvcake.eval.run.answer_batch", killed)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        _run(chat, tmp_path, [sample(0)], settings)
    runs = json.loads((tmp_path / "run.json").read_text())["runs"]
    assert runs[-1]["status"] == "interrupted" and "SIGTERM" in runs[-1]["error"] and "finished" in runs[-1]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler lasts only while the run answers
