"""``kvcake calibrate``: CAKE's temperatures tau1, tau2 searched for a model, written to a tau.json that
``kvcake generate --preset`` and ``kvcake.CAKE.from_preset`` read."""

from __future__ import annotations

from pathlib import Path

import typer

from kvcake.cli.common import app, fail, out, split


@app.command("calibrate")
def calibrate_command(
    model: str | None = typer.Option(None, "--model", help="Embedded model name or local model folder (default: the "
                                                            "embedded SmolLM2-135M)."),
    budgets: str = typer.Option("", help="Comma-separated budgets in tokens per layer to calibrate for, e.g. "
                                         "128,1024."),
    ratios: str = typer.Option("", help="Comma-separated fractions of the prompt to calibrate for."),
    samples: int = typer.Option(8, help="Calibration prompts (taken in turn from --tasks)."),
    out_path: Path = typer.Option(Path("tau.json"), "--out", help="The tau file to write (.json)."),
    tasks: str = typer.Option(",".join(("ruler/niah_multikey", "needlebench/multi_retrieval", "ruler/vt")),
                              help="Synthetic tasks the calibration prompts come from."),
    grid: str = typer.Option("0.4,0.7,1,1.5,2.3", help="Temperatures tried for each of tau1 and tau2."),
    search: str = typer.Option("grid", help="grid (every pair of the grid) or coordinate (alternate tau1 and tau2 "
                                            "from 1, 1)."),
    score: str = typer.Option("auto", help="auto (the task metric and the KL proxy; the proxy chooses only where "
                                           "it ranks the settings as the metric does) or metric."),
    threshold: float = typer.Option(0.8, help="Least Spearman correlation between the KL proxy and the metric (every "
                                              "budget) for the proxy to choose."),
    lengths: str = typer.Option("1000", help="Context lengths of the calibration prompts, in tokens."),
    depths: str = typer.Option("0.25,0.5,0.75", help="Needle depths of the calibration prompts."),
    seed: int = typer.Option(0, help="Calibration seed n: prompts come from the string seed calibration-n, which "
                                     "no `kvcake eval --seed` can give."),
    kl_tokens: int = typer.Option(16, "--kl-tokens", help="Tokens of the full cache's answer the KL is "
                                                          "teacher-forced on."),
    max_new_tokens: int | None = typer.Option(None, help="Cap the answers the metric scores (default: each "
                                                            "task's own length)."),
    corpus: Path | None = typer.Option(None, help="Haystack text: a .txt file or folder (default: Python's "
                                                     "standard-library docstrings)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    attn: str = typer.Option("sdpa", help="Attention backend: sdpa, eager or flash_attention_2."),
    threads: int | None = typer.Option(None, help="torch threads on CPU."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Search CAKE's tau1, tau2 per budget (and ratio) on calibration prompts: prefill once per prompt, replay
    every setting, score it by the task metric and by the KL proxy; write tau.json for --preset."""
    from kvcake.calibrate import CalibrationError, check_arguments
    from kvcake.eval.sample import EvalDataError

    try:
        budget_list, ratio_list = split(budgets, int), split(ratios, float)
        grid_list = split(grid, float)
        check_arguments(budget_list, ratio_list, samples, grid_list, search, score, kl_tokens, out_path)
        if not -1 <= threshold <= 1:
            raise CalibrationError(f"--threshold is a correlation in [-1, 1], not {threshold:g}")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise CalibrationError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
        result = _run(model, budget_list, ratio_list, samples, out_path, split(tasks), grid_list, search, score,
                      split(lengths, int), split(depths, float), seed, kl_tokens, max_new_tokens, corpus, dtype,
                      attn, threads, progress, threshold)
    except (CalibrationError, EvalDataError, FileNotFoundError, ValueError) as exc:
        fail(" ".join(str(exc).split()))
    chosen = ", ".join(f"{k}: tau1={v[0]:g} tau2={v[1]:g}" for k, v in {**result["budgets"],
                                                                        **result["ratios"]}.items())
    out.print(f"{out_path}: {chosen} (by {result['score']}; Spearman {result['spearman']}; "
              f"{result['seconds']} s)", highlight=False)


def _run(model, budgets, ratios, samples, out_path, tasks, grid, search, score, lengths, depths, seed, kl_tokens,
         max_new_tokens, corpus, dtype, attn, threads, progress, threshold):
    import torch

    from kvcake.calibrate import calibrate

    if threads:
        torch.set_num_threads(threads)
    return calibrate(model, budgets, ratios, samples=samples, out=out_path, tasks=tasks, grid=grid,
                     lengths=lengths, depths=depths, seed=seed, search=search, score=score, k=kl_tokens,
                     max_new_tokens=max_new_tokens, corpus=corpus, dtype=dtype, attn=attn, progress=progress,
                     threshold=threshold)
