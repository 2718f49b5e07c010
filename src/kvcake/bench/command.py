"""All in one, for the command line: load the model, measure, write the results (:func:`bench`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kvcake.bench.env import load_average, sdpa_backend
from kvcake.bench.row import BenchRow
from kvcake.bench.shapes import load_model
from kvcake.bench.timing.runner import run_bench
from kvcake.bench.writers import write_results


def bench(model: str | None = "small", lengths: Sequence[int] = (2048, 8192),
          methods: Sequence[str] = ("full", "cake", "snapkv"),
          budget: int | None = 1024, ratio: float | None = None, decode_tokens: int = 16, repeats: int = 3,
          warmup: int = 1, dtype: torch.dtype | str | None = None, attn_implementation: str = "sdpa",
          device: str | None = None, out_dir: str | Path | None = "bench-results", progress: bool = True,
          seed: int = 0, method_options: dict[str, Any] | None = None,
          threads: int | None = None, sdpa: str | None = None,
          compile: bool = False) -> tuple[list[BenchRow], dict[str, Path]]:
    """Load (or build) the model, run :func:`run_bench`, write the results to ``out_dir`` (None: do not write).

    ``model``: a shape name from :data:`SHAPES` (random weights), a local model folder, or None for the embedded
    default. ``device`` None: CUDA when available, else CPU. ``threads``: torch CPU threads (None: leave as is; on a
    CPU shared with other jobs, 1 thread avoids OpenMP barriers waiting on a descheduled thread). ``sdpa``: restrict
    the sdpa backend to one kernel (see :func:`sdpa_backend`; e.g. ``flash``). ``compile``: also time compiled
    decoding, with compiled StaticCache references (see :func:`run_bench`). Returns the rows and the paths written.
    """
    args = dict(model=model, lengths=list(lengths), methods=list(methods), budget=budget, ratio=ratio,
                decode_tokens=decode_tokens, repeats=repeats, warmup=warmup,
                dtype=None if dtype is None else str(dtype), attn_implementation=attn_implementation, device=device,
                out_dir=None if out_dir is None else str(out_dir), seed=seed, method_options=method_options,
                threads=threads, sdpa=sdpa)
    if compile:
        args["compile"] = True
    context = sdpa_backend(sdpa)  # checks the name before the model loads
    if threads is not None:
        torch.set_num_threads(int(threads))
    load_before = load_average()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = load_model(model, dtype, attn_implementation, device, max_positions=max(lengths) + decode_tokens + 1,
                    seed=seed)
    name = model if model is not None else "embedded default"
    with context:
        rows = run_bench(lm, list(lengths), list(methods), budget=budget, ratio=ratio, decode_tokens=decode_tokens,
                         repeats=repeats, warmup=warmup, progress=progress, seed=seed, method_options=method_options,
                         model_name=name, compile=compile)
    for row in rows:
        row.record_sdpa_backend(sdpa)
    meta = {"args": args, "load_average_at_start": load_before}
    paths = {} if out_dir is None else write_results(rows, out_dir, meta=meta)
    return rows, paths
