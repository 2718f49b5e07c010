"""The ``kvcake`` command line.

Arguments are checked before torch and transformers are imported (the method layer loads torch on first use only):
``kvcake --help``, ``kvcake methods`` and every argument error answer in a fraction of a second. The per-method
options of ``kvcake generate`` are generated from the method registry, so a new method's parameters appear here
without an edit.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="CAKE KV-cache eviction for Hugging Face models: generate, compare, measure.")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

BACKENDS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


class CLIError(Exception):
    """A bad argument or input, reported as one line on stderr with exit code 2."""


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    raise typer.Exit(code=2)


def sample_text() -> str:
    return resources.files("kvcake").joinpath("data/sample.txt").read_text(encoding="utf-8")


@app.command()
def sample() -> None:
    """Print the bundled sample text (a short story with facts to ask about)."""
    sys.stdout.write(sample_text())


def _default_text(param) -> str:
    return "none" if param.default is None else str(param.default)


@app.command()
def methods() -> None:
    """List the methods and their parameters (defaults are each paper's)."""
    from kvcake.methods.registry import entry, method_names

    table = Table("method", "what it is", "parameters (defaults)")
    for name in method_names():
        found = entry(name)
        params = ", ".join(f"{p.name}={_default_text(p)}" for p in found.parameters())
        budget = "--budget TOKENS | --ratio R; " if found.method is not None else ""
        table.add_row(name, found.about, budget + params)
    out.print(table)


# -- generate: fixed options, then one per method parameter found in the registry -------------------------------------
def _fixed_options() -> list[inspect.Parameter]:
    def option(name: str, kind: Any, default: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=default)

    return [
        option("input", str, typer.Option(..., "--input", "-i", help="Context file, or - for standard input.")),
        option("question", str, typer.Option(..., "--question", "-q", help="Question about the context.")),
        option("method", str, typer.Option("cake", "--method", "-m", help="Method name (see `kvcake methods`).")),
        option("budget", Optional[int], typer.Option(None, "--budget", help="Tokens kept per layer, window included.")),
        option("ratio", Optional[float], typer.Option(None, "--ratio",
                                                      help="Fraction of the prompt's KV cache to keep, (0, 1].")),
        option("model", Optional[str], typer.Option(
            None, "--model", help="Local model folder or embedded model name (smollm2-135m-instruct, "
                                  "qwen2.5-coder-0.5b-instruct, gemma-3-270m); default: SmolLM2-135M.")),
        option("preset", Optional[str], typer.Option(None, "--preset",
                                                     help="Use the authors' published tau for this model name.")),
        option("one_shot", bool, typer.Option(False, "--one-shot",
                                              help="Allocate once after prefill instead of cascading.")),
        option("decode", Optional[bool], typer.Option(
            None, "--decode-eviction/--prefill-only",
            help="Hold the budget while generating, or evict at prefill only (default: the method's own).")),
        option("max_new_tokens", int, typer.Option(64, "--max-new-tokens", min=1, help="Most tokens to generate.")),
        option("protocol", str, typer.Option("whole", "--protocol", help="whole: compress the whole templated prompt "
                                             "(the paper's protocol); tail: leave the chat template's tail "
                                             "uncompressed (kvpress's).")),
        option("compile", bool, typer.Option(False, "--compile", help="Decode with compiled steps (torch.compile; "
                                             "CUDA graphs on CUDA). The first step pays the compile (tens of "
                                             "seconds on CPU); the full cache then uses transformers' static "
                                             "cache, compiled the same way.")),
        option("attn", str, typer.Option("sdpa", "--attn", help=f"Attention backend: {', '.join(BACKENDS)}.")),
        option("as_json", bool, typer.Option(False, "--json", help="Print one JSON object instead of text.")),
        option("plot", Optional[Path], typer.Option(None, "--plot", help="Also save a bar chart of tokens kept per "
                                                                         "layer (PNG).")),
    ]


def _parameter_help(name: str, owners: list) -> str:
    """What a method parameter means, which methods take it, and each one's default (they differ)."""
    text = next((p.help for _, p in owners if p.help), name)
    defaults: dict[str, list[str]] = {}
    for method, p in owners:
        defaults.setdefault(_default_text(p), []).append(method)
    if len(defaults) == 1:
        (value, users), = defaults.items()
        return f"{text} (methods: {', '.join(users)}; default {value})."
    parts = "; ".join(f"{value} for {', '.join(users)}" for value, users in defaults.items())
    return f"{text} (default: {parts})."


def _method_options() -> list[inspect.Parameter]:
    from kvcake.methods.registry import all_parameters

    found = []
    for name, owners in all_parameters().items():
        if name in ("cascade", "decode_eviction"):  # --one-shot and --decode-eviction/--prefill-only
            continue
        kind = owners[0][1].kind
        flag = "--" + name.replace("_", "-")
        found.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
                                       default=typer.Option(None, flag, help=_parameter_help(name, owners))))
    return found


def _read_context(path: str) -> str:
    """The context text from a file or standard input, as UTF-8 (one clear error for anything else)."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read --input {path!r}: {exc.strerror or exc}") from None
    except AttributeError:  # a text-only stdin (tests, some shells)
        data = sys.stdin.read().encode("utf-8")
    if b"\x00" in data:
        raise CLIError(f"--input {path!r} is a binary file, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CLIError(f"--input {path!r} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if not text.strip():
        raise CLIError("empty context: give a non-empty text with --input")
    return text


def check_attention(attn: str) -> None:
    """A backend kvcake wraps, and its package installed (checked without importing torch)."""
    if attn not in BACKENDS:
        raise CLIError(f"unknown attention backend {attn!r}; use one of {', '.join(BACKENDS)}")
    package = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}.get(attn)
    if package is not None and importlib.util.find_spec(package) is None:
        raise CLIError(f"--attn {attn} needs the {package} package, which is not installed; use --attn sdpa")


def check_output_path(path: Path | None, what: str) -> None:
    """A file we will write later must be writable now (never lose an answer to a late failure)."""
    if path is None:
        return
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise CLIError(f"{what} {str(path)!r} is a folder; give a file name")
    if not folder.is_dir():
        raise CLIError(f"{what} {str(path)!r}: no such folder {str(folder)!r}")
    if not os.access(folder, os.W_OK):
        raise CLIError(f"{what} {str(path)!r}: the folder is not writable")


def _build_method(name: str, budget, ratio, preset, one_shot, decode, params: dict[str, Any]):
    from kvcake.methods.cake import tau_preset
    from kvcake.methods.registry import build

    if name.lower() == "full":
        given = sorted(k for k, v in {**params, "budget": budget, "ratio": ratio}.items() if v is not None)
        if given:
            raise CLIError(f"--method full keeps the whole cache; it takes no {', '.join('--' + g for g in given)}")
        return None
    if (budget is None) == (ratio is None):
        raise CLIError("give exactly one of --budget TOKENS or --ratio R")
    if preset is not None:
        try:
            params["tau1"], params["tau2"] = tau_preset(preset, budget or 128)
        except KeyError as exc:
            raise CLIError(str(exc.args[0])) from None
    try:
        return build(name, budget=budget, ratio=ratio, cascade=False if one_shot else None, decode_eviction=decode,
                     **params)
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None


def generate(**options: Any) -> None:
    """Answer a question about a long context with a compressed KV cache, and report the memory it kept."""
    fixed = {p.name for p in _fixed_options()}
    params = {k: v for k, v in options.items() if k not in fixed}
    o = {k: v for k, v in options.items() if k in fixed}
    try:
        chosen = _build_method(o["method"], o["budget"], o["ratio"], o["preset"], o["one_shot"], o["decode"], params)
        check_attention(o["attn"])
        if o["protocol"] not in ("whole", "tail"):
            raise CLIError(f"unknown --protocol {o['protocol']!r}; use whole or tail")
        check_output_path(o["plot"], "--plot")
        context = _read_context(o["input"])
        if not o["question"].strip():
            raise CLIError("empty question")
    except CLIError as exc:
        _fail(str(exc))
    _generate(chosen, context, o)


def _generate(chosen, context: str, o: dict[str, Any]) -> None:
    from kvcake import models
    from kvcake.pipeline import PromptTooLongError, answer

    try:
        with err.status("loading the model…"):
            lm, tokenizer = models.load(o["model"], attn_implementation=o["attn"])
    except (FileNotFoundError, OSError, ValueError, ImportError) as exc:
        _fail(_one_line(exc))
    try:
        with err.status("prefilling and generating…"):
            result = answer(lm, tokenizer, context, o["question"], chosen, max_new_tokens=o["max_new_tokens"],
                            protocol=o["protocol"], compile=o["compile"])
    except (ValueError, PromptTooLongError) as exc:
        _fail(_one_line(exc))
    name = o["model"] or models.DEFAULT_MODEL
    if o["as_json"]:
        payload = result.to_dict()
        payload["model"] = name
        sys.stdout.write(json.dumps(payload) + "\n")
    else:
        out.print(f"[bold]answer:[/bold] {result.answer}")
        _print_report(result)
    if o["plot"] is not None:  # optional output comes after the answer
        from kvcake.plots import plot_layer_budgets

        try:
            plot_layer_budgets(result.layer_budgets, result.prompt_tokens, o["plot"],
                               title=f"{result.method.get('name')} on {name}")
        except OSError as exc:
            _fail(f"could not write --plot {str(o['plot'])!r}: {exc.strerror or exc}")
        err.print(f"per-layer plot written to {o['plot']}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


generate.__signature__ = inspect.Signature([*_fixed_options(), *_method_options()])  # type: ignore[attr-defined]
app.command("generate")(generate)


@app.command("bench")
def bench_command(
    model: str = typer.Option("small", "--model", help="Shape name (small, tiny, llama-3.2-1b, llama-3-8b, "
                                                      "mistral-7b), a local model folder, or 'default'."),
    lengths: str = typer.Option("2048,8192", help="Comma-separated prompt lengths."),
    methods: str = typer.Option("full,cake,snapkv", help="Comma-separated method names."),
    budget: int | None = typer.Option(1024, help="Tokens per layer kept by each method."),
    ratio: float | None = typer.Option(None, help="Instead of --budget: fraction of the prompt kept."),
    decode_tokens: int = typer.Option(16, help="Decoding steps timed per run."),
    repeats: int = typer.Option(3, help="Timed repetitions (medians are reported)."),
    warmup: int = typer.Option(1, help="Untimed warm-up rounds (memory is sampled in the last one)."),
    dtype: str | None = typer.Option(None, help="float32, bfloat16 or float16 (default: fp32 CPU, bf16 GPU)."),
    attn: str = typer.Option("sdpa", help="Attention backend: sdpa, eager or flash_attention_2."),
    sdpa_backend: str | None = typer.Option(None, help="With --attn sdpa: restrict torch's kernel to flash "
                                                          "(FlashAttention-2 in PyTorch), efficient, cudnn or math."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    threads: int | None = typer.Option(None, help="torch threads on CPU (1 is steadier on a loaded machine)."),
    out_dir: Path = typer.Option(Path("bench-results"), "--out", help="Folder for results.{json,csv,md} and plots."),
    compile_: bool = typer.Option(False, "--compile", help="Also time decoding through torch.compile (CUDA graphs on "
                                                           "CUDA), beside compiled StaticCache references."),
) -> None:
    """Measure prefill time, time per decoded token and KV memory, full cache vs methods vs a plain cache of the
    compressed size; write tables and plots."""
    from kvcake import bench as benchmark

    try:
        length_list = [int(x) for x in lengths.split(",") if x.strip()]
        method_list = [m.strip() for m in methods.split(",") if m.strip()]
        if ratio is not None:
            budget = None
        rows, paths = benchmark.bench(model=None if model == "default" else model, lengths=length_list,
                                      methods=method_list, budget=budget, ratio=ratio, decode_tokens=decode_tokens,
                                      repeats=repeats, warmup=warmup, dtype=dtype, attn_implementation=attn,
                                      device=device, out_dir=out_dir, threads=threads, sdpa=sdpa_backend,
                                      compile=compile_)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        _fail(str(exc))
    for line in benchmark.summarise_targets(rows):
        out.print(line)
    out.print("written: " + ", ".join(str(p) for p in paths.values()))


def _split(text: str, kind=str) -> list:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def _param_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


@app.command("eval")
def eval_command(
    tasks: str = typer.Option("needlebench,ruler", "--tasks", "-t",
                              help="Comma-separated suites (needlebench, ruler, longbench, longbench-zh) or tasks "
                                   "(ruler/vt, longbench/multi_news, ...)."),
    methods: str = typer.Option("full,cake,snapkv,pyramidkv,h2o,tova,streamingllm,ada-snapkv", "--methods", "-m",
                                help="Comma-separated method names (see `kvcake methods`)."),
    ratios: str | None = typer.Option(None, help="Comma-separated fractions of the prompt to keep (default "
                                                    "0.5,0.25,0.1 unless --budgets is given)."),
    budgets: str = typer.Option("", help="Comma-separated budgets in tokens per layer (window included)."),
    models: str = typer.Option("", "--models", help="Comma-separated embedded model names or local folders "
                                                     "(default: the embedded SmolLM2-135M)."),
    modes: str = typer.Option("query-aware", help="query-aware (the whole prompt is compressed, the paper's "
                                                  "setting), query-agnostic (the context alone, question after), "
                                                  "or both, comma-separated."),
    data: Path | None = typer.Option(None, help="LongBench data: folder of <task>.jsonl files or data.zip."),
    limit: int | None = typer.Option(None, help="The first N samples of each task (every suite)."),
    lengths: str = typer.Option("1000,2000", help="Synthetic suites: context lengths in tokens."),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="Synthetic suites: needle depths in [0, 1]."),
    per_cell: int = typer.Option(1, help="Synthetic suites: samples per length (and depth)."),
    corpus: Path | None = typer.Option(None, help="Haystack text: a .txt file or folder (default: Python's "
                                                     "standard-library docstrings)."),
    seed: int = typer.Option(0, help="Seed of the synthetic suites."),
    param: list[str] | None = typer.Option(None, "--param", help="Method parameter, e.g. cake.gamma=100 "
                                                                    "(repeatable)."),
    max_length: int | None = typer.Option(None, help="Cut prompts in the middle of the context to this many "
                                                        "tokens, answer included (default: the model's limit)."),
    max_new_tokens: int | None = typer.Option(None, help="Cap every task's answer length (default: each "
                                                            "task's own)."),
    out_dir: Path = typer.Option(Path("eval-results"), "--out", help="Results folder (one subfolder per model); "
                                                                     "an interrupted run resumes from it."),
    device: str = typer.Option("cpu", help="cpu or cuda (with torchrun: one GPU per process)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    attn: str = typer.Option("sdpa", help="Attention backend: sdpa, eager or flash_attention_2."),
    threads: int | None = typer.Option(None, help="torch threads on CPU."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Redo samples that failed in an earlier run."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Evaluate methods × budgets on benchmark suites: predictions, metrics and a run record per model.

    Shard across processes with `torchrun --nproc-per-node N -m kvcake.cli eval ...` (or `accelerate launch`); each
    process takes every N-th sample and rank 0 merges the shards.
    """
    import torch

    from kvcake.eval import runner
    from kvcake.eval.sample import EvalDataError
    from kvcake.eval.tasks import SuiteOptions
    from kvcake.models import ModelNotAvailableError

    try:
        params: dict[str, dict] = {}
        for item in param or []:
            name, _, value = item.partition("=")
            method, _, key = name.partition(".")
            if not key or not value:
                raise ValueError(f"--param {item!r}: write METHOD.NAME=VALUE, e.g. cake.gamma=100")
            params.setdefault(method.lower(), {})[key] = _param_value(value)
        if ratios is None:
            ratios = "" if budgets.strip() else "0.5,0.25,0.1"
        settings = runner.grid(_split(methods), _split(budgets, int), _split(ratios, float), params)
        options = SuiteOptions(data=data, lengths=_split(lengths, int), depths=_split(depths, float),
                               per_cell=per_cell, seed=seed, corpus=corpus, limit=limit)
        if threads:
            torch.set_num_threads(threads)
        folders = runner.evaluate(_split(models) or [None], _split(tasks), settings, _split(modes), options, out_dir,
                                  device=device, dtype=dtype, attn=attn, max_length=max_length,
                                  max_new_tokens=max_new_tokens, retry_failed=retry_failed, progress=progress)
    except (EvalDataError, ModelNotAvailableError, ValueError) as exc:
        _fail(str(exc))
    for folder in folders:
        out.print(f"results: {folder} (predictions.jsonl, metrics.csv, metrics.json, run.json)")


@app.command("report")
def report_command(
    folders: list[Path] = typer.Argument(..., help="Result folders written by `kvcake eval`."),
    out_dir: Path = typer.Option(Path("eval-report"), "--out", help="Folder for report.md, metrics and plots."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw score-vs-budget, heatmaps and allocation."),
    reference: str = typer.Option("snapkv", "--reference", help="Method every setting is compared with, pair by "
                                                                "pair, at the same budget (full: the full cache)."),
) -> None:
    """Turn `kvcake eval` results into a markdown table (method × budget, per task and average, with 95% bootstrap
    intervals), a paired comparison with a reference method, and plots."""
    from kvcake.eval.report import report
    from kvcake.eval.sample import EvalDataError

    try:
        path = report(folders, out_dir, plots=plots, reference=reference)
    except EvalDataError as exc:
        _fail(str(exc))
    out.print(f"report: {path}")


def _print_report(result) -> None:
    mib = 1 / 2**20
    out.print(f"method: {result.method.get('name')}   prompt tokens: {result.prompt_tokens}   "
              f"generated: {result.generated_tokens}   time: {result.seconds:.1f} s")
    budgets = result.layer_budgets
    out.print("tokens kept per layer after prefill: " + " ".join(str(b) for b in budgets))
    share = 100 * result.kv_bytes / max(result.kv_bytes_full, 1)
    out.print(f"KV memory after generation: {result.kv_bytes * mib:.2f} MiB of {result.kv_bytes_full * mib:.2f} MiB "
              f"full ({share:.1f}%); peak during prefill {result.peak_kv_bytes * mib:.2f} MiB")


def main() -> None:
    """The console entry point: one line on stderr for anything that goes wrong, never a traceback (set
    KVCAKE_DEBUG=1 to see one)."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence of the command line
        if os.environ.get("KVCAKE_DEBUG"):
            raise
        err.print(f"error: {type(exc).__name__}: {_one_line(exc)} (KVCAKE_DEBUG=1 shows the traceback)",
                  markup=False, highlight=False)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
