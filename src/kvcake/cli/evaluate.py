"""``kvcake eval`` and ``kvcake report``: the evaluation harness on the command line."""

from __future__ import annotations

from pathlib import Path

import typer

from kvcake.cli.common import app, fail, out, split


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
    protocols: str = typer.Option("whole", help="whole (the whole templated prompt is compressed, the paper's "
                                                "protocol), tail (the chat template's tail after the user message "
                                                "is left uncompressed, kvpress's protocol), or both, "
                                                "comma-separated."),
    batch_size: int = typer.Option(1, "--batch-size", help="Samples of one task answered together: one "
                                                            "left-padded prefill and batched decoding (1: one at a "
                                                            "time)."),
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
    from kvcake.eval.sample import EvalDataError

    try:
        settings, options = _arguments(methods, budgets, ratios, param, data, lengths, depths, per_cell, seed, corpus,
                                       limit, modes, device, dtype, tasks, protocols, batch_size)
        folders = _evaluate(models, tasks, settings, modes, options, out_dir, device, dtype, attn, threads,
                            max_length, max_new_tokens, retry_failed, progress, protocols, batch_size)
    except (EvalDataError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    for folder in folders:
        out.print(f"results: {folder} (predictions.jsonl, metrics.csv, metrics.json, run.json)")


def _parameters(items: list[str] | None) -> dict[str, dict]:
    """``--param METHOD.NAME=VALUE`` options as ``{method: {name: value}}``."""
    params: dict[str, dict] = {}
    for item in items or []:
        name, _, value = item.partition("=")
        method, _, key = name.partition(".")
        if not key or not value:
            raise ValueError(f"--param {item!r}: write METHOD.NAME=VALUE, e.g. cake.gamma=100")
        params.setdefault(method.lower(), {})[key] = _param_value(value)
    return params


def _arguments(methods, budgets, ratios, param, data, lengths, depths, per_cell, seed, corpus, limit, modes, device,
               dtype, tasks, protocols="whole", batch_size=1):
    """Every argument checked, before torch or a model is loaded: the grid and the suite options."""
    from kvcake.eval.grid import check_run_options, grid
    from kvcake.eval.tasks import SuiteOptions, check

    if ratios is None:
        ratios = "" if budgets.strip() else "0.5,0.25,0.1"
    settings = grid(split(methods), split(budgets, int), split(ratios, float), _parameters(param))
    options = SuiteOptions(data=data, lengths=split(lengths, int), depths=split(depths, float), per_cell=per_cell,
                           seed=seed, corpus=corpus, limit=limit)
    check_run_options(split(modes), device, dtype, split(protocols), batch_size)
    check(split(tasks), options)
    return settings, options


def _evaluate(models, tasks, settings, modes, options, out_dir, device, dtype, attn, threads, max_length,
              max_new_tokens, retry_failed, progress, protocols="whole", batch_size=1):
    import torch

    from kvcake.eval import runner

    if threads:
        torch.set_num_threads(threads)
    return runner.evaluate(split(models) or [None], split(tasks), settings, split(modes), options, out_dir,
                           device=device, dtype=dtype, attn=attn, max_length=max_length,
                           max_new_tokens=max_new_tokens, retry_failed=retry_failed, progress=progress,
                           protocols=split(protocols), batch_size=batch_size)


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
        fail(str(exc))
    out.print(f"report: {path}")


