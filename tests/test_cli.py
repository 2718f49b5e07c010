"""The command line on a tiny random model saved with the embedded model's tokenizer."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from kvcake import models
from kvcake.cli import app, sample_text
from kvcake.methods.registry import build

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(models.resolve(None))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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


@pytest.mark.parametrize("method", ["cake", "snapkv", "pyramidkv", "h2o", "tova", "streamingllm", "ada-snapkv",
                                    "ada-cake", "cake-snapkv", "cake-h2o", "uniform-cake"])
def test_every_method_runs_by_name(tiny_folder, method):
    result = run("generate", "--model", str(tiny_folder), "--input", "-", "--question", "Who kept the light?",
                 "--method", method, "--budget", "64", "--max-new-tokens", "3", "--json", input=sample_text())
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert sum(payload["layer_budgets"]) == 64 * 3
    assert payload["report"]["method"]["name"] == build(method, budget=64).label
