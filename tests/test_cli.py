"""The command line on a tiny random model saved with the embedded model's tokenizer."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvcake.cli import app, sample_text
from kvcake.methods.registry import build, method_names

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_folder(chat_model_dir):
    return chat_model_dir


def run(*args, input=None):
    return runner.invoke(app, list(args), input=input)


def test_generate_json_reports_budgets_and_memory(tiny_folder, tmp_path):
    context = tmp_path / "context.txt"
    context.write_text(sample_text())
    result = run("generate", "--model", str(tiny_folder), "--input", str(context), "--question", "Who kept the light?",
                 "--method", "cake", "--budget", "64", "--max-new-tokens", "5", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("answer", "prompt_tokens", "layer_budgets", "kv_bytes", "kv_bytes_full", "peak_kv_bytes"):
        assert key in payload
    assert payload["prompt_tokens"] > 64
    assert len(payload["layer_budgets"]) == 3 and sum(payload["layer_budgets"]) == 64 * 3
    assert payload["kv_bytes"] < payload["peak_kv_bytes"] < payload["kv_bytes_full"]
    assert payload["report"]["method"]["name"] == "cake"


def test_generate_from_stdin_prints_answer_report_and_plot(tiny_folder, tmp_path):
    picture = tmp_path / "layers.png"
    result = run("generate", "--model", str(tiny_folder), "--input", "-", "--question", "Who kept the light?",
                 "--ratio", "0.5", "--max-new-tokens", "3", "--plot", str(picture), input=sample_text())
    assert result.exit_code == 0, result.output
    assert "answer:" in result.stdout and "tokens kept per layer" in result.stdout and "MiB" in result.stdout
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_method_needs_no_budget(tiny_folder):
    result = run("generate", "--model", str(tiny_folder), "--input", "-", "--question", "q", "--method", "full",
                 "--max-new-tokens", "2", "--json", input="Some context that is short.")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["kv_bytes"] == payload["kv_bytes_full"]


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "positive"),
    (["--ratio", "1.5"], "(0, 1]"),
    (["--ratio", "0"], "(0, 1]"),
    (["--budget", "64", "--ratio", "0.5"], "exactly one"),
    ([], "exactly one"),
    (["--budget", "64", "--method", "nope"], "unknown method"),
    (["--budget", "64", "--kernel", "4"], "odd"),
])
def test_bad_arguments_give_clear_errors(tiny_folder, args, message):
    result = run("generate", "--model", str(tiny_folder), "--input", "-", "--question", "q", *args, input="text")
    assert result.exit_code == 2
    assert message in result.output


def test_missing_input_file_and_empty_context(tiny_folder, tmp_path):
    result = run("generate", "--model", str(tiny_folder), "--input", str(tmp_path / "nope.txt"), "--question", "q",
                 "--budget", "64")
    assert result.exit_code == 2 and "cannot read" in result.output
    result = run("generate", "--model", str(tiny_folder), "--input", "-", "--question", "q", "--budget", "64",
                 input="   \n")
    assert result.exit_code == 2 and "empty context" in result.output


def test_missing_model_folder(tmp_path):
    result = run("generate", "--model", str(tmp_path), "--input", "-", "--question", "q", "--budget", "64", input="x")
    assert result.exit_code == 2 and "not a local model folder" in result.output


def test_methods_and_sample_commands():
    listing = run("methods")
    assert listing.exit_code == 0 and "gamma=200.0" in listing.stdout and "sinks=4" in listing.stdout
    for name in ("full", "cake", "snapkv", "pyramidkv", "h2o", "tova", "streamingllm", "ada-snapkv"):
        assert name in listing.stdout
    text = run("sample")
    assert text.exit_code == 0 and "Margaret Ellen" in text.stdout


@pytest.mark.parametrize("method", [m for m in method_names() if m != "full"])
def test_every_method_runs_by_name(tiny_folder, method):
    result = run("generate", "--model", str(tiny_folder), "--input", "-", "--question", "Who kept the light?",
                 "--method", method, "--budget", "64", "--max-new-tokens", "3", "--json", input=sample_text())
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert sum(payload["layer_budgets"]) == 64 * 3
    assert payload["report"]["method"]["name"] == build(method, budget=64).label


@pytest.mark.parametrize(("args", "message"), [
    (["--tasks", "nope"], "unknown task or suite 'nope'"),
    (["--tasks", "longbench/multi_news"], "needs the LongBench data"),
    (["--tasks", "longbench/multi_news", "--data", "/no/such/folder"], "/no/such/folder"),
    (["--tasks", "ruler", "--corpus", "/no/such/corpus.txt"], "/no/such/corpus.txt"),
    (["--methods", "cake", "--ratios", ""], "needs at least one budget or ratio"),
    (["--methods", "cake", "--ratios", "0.5", "--param", "cake.nope=1"], "no parameter"),
    (["--methods", "full", "--modes", "sideways"], "unknown mode"),
    (["--methods", "full", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["--methods", "full", "--device", "tpu"], "unknown device 'tpu'"),
    (["--methods", "full", "--protocols", "middle"], "unknown protocol 'middle'"),
    (["--methods", "full", "--protocols", ""], "--protocols needs at least one"),
    (["--methods", "full", "--batch-size", "0"], "--batch-size takes a positive number"),
])
def test_eval_bad_input_is_a_clear_error(tiny_folder, tmp_path, args, message):
    result = run("eval", "--models", str(tiny_folder), "--out", str(tmp_path), *args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_eval_then_report(tiny_folder, tmp_path):
    result = run("eval", "--models", str(tiny_folder), "--tasks", "needlebench/single,ruler/vt", "--lengths", "600",
                 "--depths", "0,1", "--methods", "full,cake,streamingllm", "--ratios", "0.5", "--param",
                 "streamingllm.sinks=2", "--max-new-tokens", "4", "--out", str(tmp_path / "r"), "--no-progress")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "r" / tiny_folder.name
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == (2 + 1) * 3 and all(r["error"] is None for r in rows)
    assert {r["label"] for r in rows} == {"full", "cake@r0.5", "streamingllm@r0.5,sinks=2"}
    record = json.loads((folder / "run.json").read_text())
    assert record["methods"]["streamingllm@r0.5,sinks=2"]["scorer"]["sinks"] == 2
    assert record["suite"]["lengths"] == [600] and record["runs"][-1]["max_new_tokens"] == 4
    # A second run into the folder (another mode, another method) adds to the record instead of replacing it.
    result = run("eval", "--models", str(tiny_folder), "--tasks", "needlebench/single", "--lengths", "600",
                 "--depths", "0,1", "--methods", "snapkv", "--ratios", "0.5", "--modes", "query-agnostic",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "r"), "--no-progress")
    assert result.exit_code == 0, result.output
    record = json.loads((folder / "run.json").read_text())
    assert len(record["runs"]) == 2 and record["modes"] == ["query-aware", "query-agnostic"]
    assert {"full", "cake@r0.5", "snapkv@r0.5"} <= set(record["methods"])
    result = run("report", str(tmp_path / "r"), "--out", str(tmp_path / "rep"))
    assert result.exit_code == 0, result.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| streamingllm@r0.5,sinks=2 |" in text
    assert "No setting shares samples with snapkv at its budget." in text  # snapkv ran in the other mode only
    result = run("report", str(tmp_path / "r"), "--out", str(tmp_path / "rep-full"), "--reference", "full",
                 "--no-plots")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "rep-full" / "report.md").read_text()
    assert "## Paired comparison with full" in text and "| cake@r0.5 | full | 2 | 3 |" in text
    result = run("report", str(tmp_path / "r"), "--reference", "nope")
    assert result.exit_code == 2 and "unknown reference method" in result.output
    assert run("report", str(tmp_path / "missing")).exit_code == 2


def test_eval_batches_and_protocols(tiny_folder, tmp_path):
    result = run("eval", "--models", str(tiny_folder), "--tasks", "needlebench/single", "--lengths", "600",
                 "--depths", "0,1", "--methods", "full,cake", "--ratios", "0.5", "--max-new-tokens", "4",
                 "--protocols", "whole,tail", "--batch-size", "2", "--out", str(tmp_path / "r"), "--no-progress")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "r" / tiny_folder.name
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert sorted((r["protocol"], r["label"]) for r in rows) == sorted(
        (p, label) for p in ("whole", "tail") for label in ("full", "cake@r0.5") for _ in range(2))
    assert all(r["error"] is None for r in rows)
    record = json.loads((folder / "run.json").read_text())
    assert record["protocols"] == ["whole", "tail"] and record["runs"][-1]["batch_size"] == 2


def test_eval_resume_with_another_answer_setting_is_refused_before_a_model_loads(tiny_folder, tmp_path, monkeypatch):
    base = ["eval", "--models", str(tiny_folder), "--tasks", "ruler/niah_single", "--lengths", "500", "--depths",
            "0.5", "--methods", "full,cake", "--ratios", "0.5", "--out", str(tmp_path), "--no-progress"]
    assert run(*base, "--max-new-tokens", "2").exit_code == 0
    record = (tmp_path / tiny_folder.name / "run.json").read_text()

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("kvcake.models.load", no_load)
    for extra, named in ((["--max-new-tokens", "3"], "max_new_tokens=2, not 3 (--max-new-tokens)"),
                         (["--max-new-tokens", "2", "--max-length", "900"], "max_length=4096, not 900"),
                         (["--max-new-tokens", "2", "--seed", "1"], "seed=0, not 1"),
                         (["--max-new-tokens", "2", "--dtype", "bfloat16"], "dtype='torch.float32'")):
        result = run(*base, *extra)
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and named in result.output
    assert (tmp_path / tiny_folder.name / "run.json").read_text() == record


def test_eval_limit_applies_to_the_synthetic_suites(tiny_folder, tmp_path):
    result = run("eval", "--models", str(tiny_folder), "--tasks", "ruler/niah_single,needlebench/single",
                 "--lengths", "500", "--depths", "0,0.5,1", "--limit", "2", "--methods", "full",
                 "--max-new-tokens", "2", "--out", str(tmp_path), "--no-progress")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / tiny_folder.name / "predictions.jsonl").read_text().splitlines()]
    assert sorted((r["task"], r["id"]) for r in rows) == [
        ("needlebench/single", "L500_D0.5_R0"), ("needlebench/single", "L500_D0_R0"),
        ("ruler/niah_single", "L500_D0.5_R0"), ("ruler/niah_single", "L500_D0_R0")]
    result = run("eval", "--models", str(tiny_folder), "--tasks", "ruler/vt", "--limit", "0", "--out", str(tmp_path))
    assert result.exit_code == 2 and "--limit takes a positive number" in result.output


SHARED_LONGBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "longbench"


@pytest.mark.skipif(not (SHARED_LONGBENCH / "multi_news.jsonl").is_file(), reason="shared LongBench data absent")
def test_eval_longbench_task_cuts_long_prompts(tiny_folder, tmp_path):
    result = run("eval", "--models", str(tiny_folder), "--tasks", "longbench/multi_news", "--data",
                 str(SHARED_LONGBENCH), "--limit", "2", "--methods", "full,cake", "--ratios", "0.25", "--modes",
                 "query-aware,query-agnostic", "--max-length", "700", "--max-new-tokens", "3", "--out",
                 str(tmp_path), "--no-progress")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / tiny_folder.name / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 and all(r["error"] is None for r in rows)
    assert all(r["prompt_tokens"] <= 700 - 3 and r["truncated_tokens"] > 0 for r in rows)
    assert all(r["metric"] == "rouge" and 0 <= r["score"] <= 100 for r in rows)
    agnostic = [r for r in rows if r["mode"] == "query-agnostic"]
    assert all(r["compressed_tokens"] < r["prompt_tokens"] for r in agnostic)
