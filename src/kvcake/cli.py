"""The ``kvcake`` command line."""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="CAKE KV-cache eviction for Hugging Face models: generate, compare, measure.")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=2)


def sample_text() -> str:
    return resources.files("kvcake").joinpath("data/sample.txt").read_text(encoding="utf-8")


@app.command()
def sample() -> None:
    """Print the bundled sample text (a short story with facts to ask about)."""
    sys.stdout.write(sample_text())


@app.command()
def methods() -> None:
    """List the methods and their parameters (defaults are each paper's)."""
    from kvcake.methods.registry import METHODS, parameters

    table = Table("method", "what it is", "parameters (defaults)")
    for name, entry in METHODS.items():
        params = ", ".join(f"{f.name}={f.default}" for f in parameters(name))
        if name.startswith("ada-"):
            params += ", alpha=0.2"
        budget = "--budget TOKENS | --ratio R; " if entry.cls is not None else ""
        table.add_row(name, entry.about, budget + params)
    out.print(table)


@app.command()
def generate(
    input: str = typer.Option(..., "--input", "-i", help="Context file, or - for standard input."),
    question: str = typer.Option(..., "--question", "-q", help="Question about the context."),
    method: str = typer.Option("cake", "--method", "-m", help="Method name (see `kvcake methods`)."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Tokens kept per layer, window included."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Fraction of the prompt's KV cache to keep, (0, 1]."),
    model: Optional[str] = typer.Option(None, "--model", help="Local model folder or embedded model name "
                                                              "(smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct, "
                                                              "gemma-3-270m); default: SmolLM2-135M."),
    window: Optional[int] = typer.Option(None, help="Observation window S_w (default 32)."),
    kernel: Optional[int] = typer.Option(None, help="Pooling kernel (default 5)."),
    gamma: Optional[float] = typer.Option(None, help="Variance weight of CAKE's indicator (default 200)."),
    tau1: Optional[float] = typer.Option(None, help="CAKE temperature for entropy (default 1)."),
    tau2: Optional[float] = typer.Option(None, help="CAKE temperature for variance (default 1)."),
    preset: Optional[str] = typer.Option(None, help="Use the authors' published tau for this model name."),
    sinks: Optional[int] = typer.Option(None, help="StreamingLLM: attention sinks kept (default 4)."),
    beta: Optional[float] = typer.Option(None, help="PyramidKV: top-to-mean budget ratio 1/beta (default 20)."),
    pooling: Optional[str] = typer.Option(None, help="SnapKV/PyramidKV pooling: max or avg (default max)."),
    alpha: Optional[float] = typer.Option(None, help="Ada-KV: per-head floor as a share of the budget (default 0.2)."),
    one_shot: bool = typer.Option(False, "--one-shot", help="Allocate once after prefill instead of cascading."),
    decode: Optional[bool] = typer.Option(None, "--decode-eviction/--prefill-only",
                                          help="Hold the budget while generating, or evict at prefill only "
                                               "(default: the method's own)."),
    max_new_tokens: int = typer.Option(64, help="Most tokens to generate."),
    attn: str = typer.Option("sdpa", help="Attention backend: sdpa, eager or flash_attention_2."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also save a bar chart of tokens kept per layer (PNG)."),
) -> None:
    """Answer a question about a long context with a compressed KV cache, and report the memory it kept."""
    from kvcake import models
    from kvcake.methods.cake import tau_preset
    from kvcake.methods.registry import build
    from kvcake.pipeline import answer

    if method.lower() != "full" and (budget is None) == (ratio is None):
        _fail("give exactly one of --budget TOKENS or --ratio R")
    try:
        if input == "-":
            context = sys.stdin.read()
        else:
            context = Path(input).read_text(encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot read --input {input!r}: {exc.strerror or exc}")
    if preset is not None:
        try:
            tau1, tau2 = tau_preset(preset, budget or 128)
        except KeyError as exc:
            _fail(str(exc.args[0]))
    try:
        chosen = build(method, budget=budget, ratio=ratio, window=window, kernel=kernel, gamma=gamma, tau1=tau1,
                       tau2=tau2, sinks=sinks, beta=beta, pooling=pooling, alpha=alpha,
                       cascade=False if one_shot else None, decode_eviction=decode)
    except (ValueError, TypeError) as exc:
        _fail(str(exc))
    try:
        with err.status("loading the model…"):
            lm, tokenizer = models.load(model, attn_implementation=attn)
    except (FileNotFoundError, OSError, ValueError) as exc:
        _fail(str(exc))
    try:
        with err.status("prefilling and generating…"):
            result = answer(lm, tokenizer, context, question, chosen, max_new_tokens=max_new_tokens)
    except ValueError as exc:
        _fail(str(exc))
    if plot is not None:
        from kvcake.plots import plot_layer_budgets

        title = f"{result.method.get('name')} on {model or models.DEFAULT_MODEL}"
        plot_layer_budgets(result.layer_budgets, result.prompt_tokens, plot, title=title)
        err.print(f"per-layer plot written to {plot}")
    if as_json:
        payload = result.to_dict()
        payload["model"] = model or models.DEFAULT_MODEL
        sys.stdout.write(json.dumps(payload) + "\n")
        return
    out.print(f"[bold]answer:[/bold] {result.answer}")
    _print_report(result)


@app.command("bench")
def bench_command(
    model: str = typer.Option("small", "--model", help="Shape name (small, tiny, llama-3.2-1b, llama-3-8b, "
                                                      "mistral-7b), a local model folder, or 'default'."),
    lengths: str = typer.Option("2048,8192", help="Comma-separated prompt lengths."),
    methods: str = typer.Option("full,cake,snapkv", help="Comma-separated method names."),
    budget: Optional[int] = typer.Option(1024, help="Tokens per layer kept by each method."),
    ratio: Optional[float] = typer.Option(None, help="Instead of --budget: fraction of the prompt kept."),
    decode_tokens: int = typer.Option(16, help="Decoding steps timed per run."),
    repeats: int = typer.Option(3, help="Timed repetitions (medians are reported)."),
    warmup: int = typer.Option(1, help="Untimed warm-up rounds (memory is sampled in the last one)."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: fp32 CPU, bf16 GPU)."),
    attn: str = typer.Option("sdpa", help="Attention backend: sdpa, eager or flash_attention_2."),
    sdpa_backend: Optional[str] = typer.Option(None, help="With --attn sdpa: restrict torch's kernel to flash "
                                                          "(FlashAttention-2 in PyTorch), efficient, cudnn or math."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    threads: Optional[int] = typer.Option(None, help="torch threads on CPU (1 is steadier on a loaded machine)."),
    out_dir: Path = typer.Option(Path("bench-results"), "--out", help="Folder for results.{json,csv,md} and plots."),
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
                                      device=device, out_dir=out_dir, threads=threads, sdpa=sdpa_backend)
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
    ratios: Optional[str] = typer.Option(None, help="Comma-separated fractions of the prompt to keep (default "
                                                    "0.5,0.25,0.1 unless --budgets is given)."),
    budgets: str = typer.Option("", help="Comma-separated budgets in tokens per layer (window included)."),
    models: str = typer.Option("", "--models", help="Comma-separated embedded model names or local folders "
                                                     "(default: the embedded SmolLM2-135M)."),
    modes: str = typer.Option("query-aware", help="query-aware (the whole prompt is compressed, the paper's "
                                                  "setting), query-agnostic (the context alone, question after), "
                                                  "or both, comma-separated."),
    data: Optional[Path] = typer.Option(None, help="LongBench data: folder of <task>.jsonl files or data.zip."),
    limit: Optional[int] = typer.Option(None, help="The first N samples of each task (every suite)."),
    lengths: str = typer.Option("1000,2000", help="Synthetic suites: context lengths in tokens."),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="Synthetic suites: needle depths in [0, 1]."),
    per_cell: int = typer.Option(1, help="Synthetic suites: samples per length (and depth)."),
    corpus: Optional[Path] = typer.Option(None, help="Haystack text: a .txt file or folder (default: Python's "
                                                     "standard-library docstrings)."),
    seed: int = typer.Option(0, help="Seed of the synthetic suites."),
    param: Optional[list[str]] = typer.Option(None, "--param", help="Method parameter, e.g. cake.gamma=100 "
                                                                    "(repeatable)."),
    max_length: Optional[int] = typer.Option(None, help="Cut prompts in the middle of the context to this many "
                                                        "tokens, answer included (default: the model's limit)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Cap every task's answer length (default: each "
                                                            "task's own)."),
    out_dir: Path = typer.Option(Path("eval-results"), "--out", help="Results folder (one subfolder per model); "
                                                                     "an interrupted run resumes from it."),
    device: str = typer.Option("cpu", help="cpu or cuda (with torchrun: one GPU per process)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    attn: str = typer.Option("sdpa", help="Attention backend: sdpa, eager or flash_attention_2."),
    threads: Optional[int] = typer.Option(None, help="torch threads on CPU."),
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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
