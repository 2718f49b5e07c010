"""The command line never shows a traceback for bad input: one line on stderr and exit code 2, checked before torch
or transformers is imported; and output is never lost to a late failure."""

import contextlib
import io
import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcake.cli import sample_text

PROBE = r"""
import sys
sys.argv = ["kvcake"] + ARGS
from kvcake.cli import main
code = 0
try:
    main()
except SystemExit as done:
    code = done.code
print("\nCODE", code, "TORCH", "torch._C" in sys.modules, "TRANSFORMERS", "transformers" in sys.modules)
"""


def probe(args, stdin=""):
    done = subprocess.run([sys.executable, "-c", PROBE.replace("ARGS", repr(args))], input=stdin,
                          capture_output=True, text=True, timeout=300)
    last = done.stdout.strip().splitlines()[-1].split()
    return int(last[1]), last[3] == "True", last[5] == "True", done.stderr


@pytest.mark.parametrize("args", [
    ["--help"],
    ["methods"],
    ["generate", "--input", "-", "--question", "q", "--budget", "0"],
    ["generate", "--input", "-", "--question", "q", "--method", "cake-snapkv", "--budget", "64", "--gamma", "3"],
    ["generate", "--input", "-", "--question", "q", "--budget", "64", "--attn", "bogus"],
    ["eval", "--tasks", "nope"],
    ["eval", "--methods", "cake", "--ratios", "2"],
])
def test_help_listing_and_argument_errors_load_neither_torch_nor_transformers(args):
    code, torch_loaded, transformers_loaded, stderr = probe(args, stdin="text")
    assert not torch_loaded and not transformers_loaded, args
    assert code in (0, 2, None)
    if code == 2:
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run(*args, input=None):
    """The command line as the console entry point runs it (kvcake.cli.main), its streams captured."""
    from kvcake.cli import main

    data = (input or "").encode("utf-8") if not isinstance(input, bytes) else input
    stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    saved = sys.stdin
    sys.stdin = stdin
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main(list(args))
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    finally:
        sys.stdin = saved
    return Result(code, stdout.getvalue(), stderr.getvalue())


def _one_clean_line(result):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01\x02binary\xff", "binary"),
    (b"caf\xe9 au lait", "not UTF-8"),
    (b"   \n\t ", "empty context"),
])
def test_bad_input_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "input.bin"
    path.write_bytes(content)
    result = run("generate", "--input", str(path), "--question", "q", "--budget", "64")
    _one_clean_line(result)
    assert message in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--attn", "bogus"], "unknown attention backend 'bogus'"),
    (["--attn", "flash_attention_2"], "needs the flash_attn package"),
    (["--plot", "/no/such/dir/x.png"], "no such folder"),
    (["--window", "8", "--method", "h2o", "--gamma", "1"], "no parameter"),
    (["--protocol", "middle"], "unknown --protocol"),
    (["--method", "full", "--budget", "64"], "takes no --budget"),
])
def test_bad_options_fail_before_any_model_work(args, message):
    result = run("generate", "--input", "-", "--question", "q", "--budget", "64", *args, input="some text")
    _one_clean_line(result)
    assert message in result.stderr


def test_the_answer_is_printed_before_an_optional_plot_that_fails(chat_model_dir, tmp_path, monkeypatch):
    # The plot is checked before generating; should writing it still fail, the answer is already out.
    import kvcake.plots

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kvcake.plots, "plot_layer_budgets", broken)
    result = run("generate", "--model", str(chat_model_dir), "--input", "-", "--question", "Who?", "--ratio", "0.5",
                 "--max-new-tokens", "2", "--json", "--plot", str(tmp_path / "x.png"), input=sample_text())
    assert result.exit_code == 2
    assert "answer" in json.loads(result.stdout.strip().splitlines()[-1])
    assert "could not write --plot" in result.stderr


def test_a_prompt_longer_than_the_model_is_refused_before_generating(chat_model_dir):
    long_text = "word " * 5000  # the tiny chat model accepts 4096 positions
    result = run("generate", "--model", str(chat_model_dir), "--input", "-", "--question", "q", "--budget", "64",
                 input=long_text)
    _one_clean_line(result)
    assert "accepts 4096 positions" in result.stderr


def test_a_kernel_longer_than_the_prompt_is_refused(chat_model_dir):
    result = run("generate", "--model", str(chat_model_dir), "--input", "-", "--question", "q", "--budget", "64",
                 "--kernel", "999", input="short")
    _one_clean_line(result)
    assert "kernel (999) is longer than the prompt" in result.stderr


OPTIONS = ["--budget", "--ratio", "--window", "--kernel", "--gamma", "--tau1", "--tau2", "--sinks", "--beta",
           "--pooling", "--alpha", "--method", "--max-new-tokens", "--attn", "--preset", "--decode-budget"]
VALUES = st.one_of(st.integers(-5, 5).map(str), st.sampled_from(["nan", "inf", "-1e9", "", "x", "0.5", "1.5"]),
                   st.text(alphabet="abc-_ ", max_size=6))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(st.sampled_from(OPTIONS), VALUES), min_size=1, max_size=4))
def test_random_bad_arguments_never_show_a_traceback(pairs):
    args = [x for pair in pairs for x in pair]
    result = run("generate", "--model", "/no/such/model", "--input", "-", "--question", "q", *args, input="t")
    # Every combination is refused (the model folder does not exist): as one line, exit code 2.
    _one_clean_line(result)


EVAL_OPTIONS = ["--tasks", "--methods", "--ratios", "--budgets", "--modes", "--lengths", "--depths", "--per-cell",
                "--limit", "--param", "--dtype", "--device", "--max-length"]


@settings(max_examples=40, deadline=None)
@given(pairs=st.lists(st.tuples(st.sampled_from(EVAL_OPTIONS), VALUES), min_size=1, max_size=4))
def test_random_bad_eval_arguments_never_show_a_traceback(tmp_path_factory, pairs):
    args = [x for pair in pairs for x in pair]
    out = tmp_path_factory.mktemp("eval")
    result = run("eval", "--models", "/no/such/model", "--out", str(out), *args)
    _one_clean_line(result)
