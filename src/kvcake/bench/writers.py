"""Writing benchmark results: results.json, results.csv, results.md (tables, ratios, notes) and the plots."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from kvcake.bench.env import hardware
from kvcake.bench.row import BenchRow, as_rows
from kvcake.bench.summary import MIB, Grid, ratio, summarise_targets


def _mib(value) -> str:
    return "—" if value is None else f"{value / MIB:.2f}"


def _ms(value) -> str:
    return "—" if value is None else f"{value * 1000:.2f}"


def _s(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def _x(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _tokens(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def _int(value) -> str:
    return "—" if value is None else str(value)


class Cell(NamedTuple):
    """What a table cell is computed from: its row and the full-cache row of its length, and for a compiled row
    the eager row of its case and the eager full-cache row (for an eager row, the same rows again)."""

    row: BenchRow
    full: BenchRow | None
    eager: BenchRow | None
    eager_full: BenchRow | None


class Table(NamedTuple):
    """A table of results.md: rows = prompt length, columns = method."""

    title: str
    value: Callable[[Cell], Any]
    fmt: Callable[[Any], str]
    which: str  # "all" methods, or only the "compressed" ones


def _step(row: BenchRow | None) -> float | None:
    return row.decode_step_s if row else None


EAGER_TABLES = [
    Table("Prefill time (s, median)", lambda c: c.row.prefill_s, _s, "all"),
    Table("Prefill time, one-shot allocation (s, one run)", lambda c: c.row.one_shot_prefill_s, _s, "compressed"),
    Table("Decode time per token (ms, median of steps)", lambda c: c.row.decode_step_s, _ms, "all"),
    Table("Decode time per token, physical limit: plain cache of the kept size (ms)",
          lambda c: c.row.physical_limit_decode_step_s, _ms, "compressed"),
    Table("Tokens kept per layer after prefill (mean)", lambda c: c.row.kept_mean, _tokens, "all"),
    Table("KV cache after prefill (MiB)", lambda c: c.row.kv_bytes_prefill, _mib, "all"),
    Table("KV cache after decoding (MiB)", lambda c: c.row.kv_bytes_end, _mib, "all"),
    Table("Peak KV during prefill, as run: cascade for methods (MiB)", lambda c: c.row.peak_kv_bytes_prefill, _mib,
          "all"),
    Table("Peak KV during prefill, one-shot allocation (MiB)", lambda c: c.row.peak_kv_bytes_one_shot, _mib,
          "compressed"),
    Table("SPEC bound on the cascade's peak (MiB)", lambda c: c.row.peak_bound_bytes, _mib, "compressed"),
    Table("Process RSS growth during prefill (MiB, CPU)", lambda c: c.row.prefill_rss_delta_bytes, _mib, "all"),
    Table("Process RSS growth during one-shot prefill (MiB, CPU)", lambda c: c.row.one_shot_prefill_rss_delta_bytes,
          _mib, "compressed"),
    Table("Process RSS growth during decoding (MiB, CPU)", lambda c: c.row.decode_rss_delta_bytes, _mib, "all"),
    Table("CUDA peak allocated during prefill (MiB)", lambda c: c.row.prefill_cuda_peak_bytes, _mib, "all"),
    Table("CUDA peak allocated during one-shot prefill (MiB)", lambda c: c.row.one_shot_prefill_cuda_peak_bytes,
          _mib, "compressed"),
    Table("CUDA peak allocated during decoding (MiB)", lambda c: c.row.decode_cuda_peak_bytes, _mib, "all"),
    Table("Prefill time relative to full (method / full)",
          lambda c: ratio(c.row.prefill_s, c.full.prefill_s if c.full else None), _x, "compressed"),
    Table("Decode speedup vs full (full / method, per token)", lambda c: ratio(_step(c.full), c.row.decode_step_s),
          _x, "compressed"),
    Table("Decode time relative to the physical limit (method / plain cache of the kept size)",
          lambda c: ratio(c.row.decode_step_s, c.row.physical_limit_decode_step_s), _x, "compressed"),
]

COMPILED_TABLES = [
    Table("Compiled: decode time per token (ms; full: transformers' StaticCache)", lambda c: c.row.decode_step_s,
          _ms, "all"),
    Table("Compiled: decode time per token, plain static cache of the kept size (ms)",
          lambda c: c.row.physical_limit_decode_step_s, _ms, "compressed"),
    Table("Compiled: first compiled step, the compilation (s, not in the medians)", lambda c: c.row.compile_s, _s,
          "all"),
    Table("Compiled: first compiled step of the plain static cache of the kept size (s)",
          lambda c: c.row.physical_limit_compile_s, _s, "compressed"),
    Table("Compiled: graph breaks", lambda c: c.row.graph_breaks, _int, "all"),
    Table("Compiled: graph breaks, plain static cache of the kept size", lambda c: c.row.physical_limit_graph_breaks,
          _int, "compressed"),
    Table("Compiled: recompilations during the timed steps", lambda c: c.row.recompiles, _int, "all"),
    Table("Compiled: recompilations during the timed steps, plain static cache of the kept size",
          lambda c: c.row.physical_limit_recompiles, _int, "compressed"),
    Table("Compiled vs eager decode step (compiled / eager; full: StaticCache / DynamicCache)",
          lambda c: ratio(c.row.decode_step_s, _step(c.eager)), _x, "all"),
    Table("Compiled vs eager physical limit (compiled StaticCache / eager DynamicCache of the kept size)",
          lambda c: ratio(c.row.physical_limit_decode_step_s, c.eager.physical_limit_decode_step_s if c.eager
                          else None), _x, "compressed"),
    Table("Compiled method step / compiled plain static cache of the kept size",
          lambda c: ratio(c.row.decode_step_s, c.row.physical_limit_decode_step_s), _x, "compressed"),
    Table("Compiled method step / transformers' default full-cache step (eager DynamicCache)",
          lambda c: ratio(c.row.decode_step_s, _step(c.eager_full)), _x, "compressed"),
    Table("Compiled method step / compiled full StaticCache step", lambda c: ratio(c.row.decode_step_s,
                                                                                   _step(c.full)), _x, "compressed"),
]


def _cells(grid: Grid, compiled: bool) -> dict[tuple[int, str], Cell]:
    index = grid.compiled if compiled else grid.eager
    return {(n, m): Cell(row, index.get((n, "full")), grid.eager.get((n, m)), grid.full(n))
            for (n, m), row in index.items()}


def render_tables(tables: list[Table], grid: Grid, compiled: bool = False) -> list[str]:
    """Markdown of ``tables`` over the eager (or the compiled) rows; a table with no measured cell is left out."""
    lines: list[str] = []
    index = _cells(grid, compiled)
    for table in tables:
        cols = [m for m in grid.methods if table.which == "all" or m != "full"]
        cells = {(n, m): table.value(index[(n, m)]) for n in grid.lengths for m in cols if (n, m) in index}
        if not cols or all(v is None for v in cells.values()):
            continue
        lines += [f"## {table.title}", "", "| prompt tokens | " + " | ".join(cols) + " |",
                  "|---:|" + "---:|" * len(cols)]
        for n in grid.lengths:
            lines.append(f"| {n} | " + " | ".join(table.fmt(cells.get((n, m))) for m in cols) + " |")
        lines.append("")
    return lines


def _header(rows: list[BenchRow], meta: Mapping[str, Any]) -> list[str]:
    lines = []
    hw = meta.get("hardware", {})
    if hw:
        lines.append(f"- hardware: {hw.get('gpu') or hw.get('cpu')} ({hw.get('cpu_cores')} CPU cores, "
                     f"{hw.get('torch_threads')} torch threads); torch {hw.get('torch')}, "
                     f"transformers {hw.get('transformers')}")
    if rows:
        r0 = rows[0]
        kernel = f" (sdpa kernel: {r0.sdpa_backend})" if r0.sdpa_backend else ""
        lines.append(f"- model: {r0.model}; dtype {r0.dtype}; attention {r0.attn_implementation}{kernel}; "
                     f"device {r0.device}")
        lines.append(f"- budget {r0.budget} tokens per layer" if r0.budget is not None
                     else f"- ratio {r0.ratio} of the prompt")
        lines.append(f"- {r0.decode_tokens} decoded tokens, {r0.repeats} measured runs after {r0.warmup} warm-up "
                     f"runs per case")
    return lines


def markdown_report(rows: Iterable[Mapping[str, Any]], meta: Mapping[str, Any] | None = None) -> str:
    """results.md: one table per metric (rows = prompt length, columns = method), ratios, targets and notes."""
    grid = Grid(rows)
    meta = meta or {}
    lines = ["# kvcake benchmark", ""] + _header(grid.rows, meta) + [""]
    lines += render_tables(EAGER_TABLES, grid)
    if grid.compiled:
        lines += render_tables(COMPILED_TABLES, grid, compiled=True)
    lines += ["## What the measurements say", ""] + [f"- {s}" for s in summarise_targets(grid.rows)] + [""]
    notes = [(r.length, r.method, note) for r in grid.rows for note in r.notes]
    lines += ["## What is measured, and why some cells are empty", ""]
    lines += [f"- {n}" for n in measurement_notes(grid.rows)]
    lines += [f"- {n} tokens, {m}: {note}" for n, m, note in notes] + [""]
    return "\n".join(lines)


def measurement_notes(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Why whole columns are None, and what the memory columns measure (written to results.json and results.md)."""
    notes = [
        "times: time.perf_counter around each prefill call and each decoding step (forward + greedy argmax), with "
        "torch.cuda.synchronize before and after on CUDA; prefill = median of the measured runs, decode = median of "
        "all steps of all measured runs; the one-shot prefill is a single run; at each length the cases run round "
        "after round (full, each method followed by its physical limit) so that a drifting load falls on all alike",
        "process memory is measured in an untimed round (the last warm-up round, or one extra round when there is "
        "no warm-up), so that sampling never slows a timed run; the one-shot run is timed and sampled at "
        "once (its sampler can add about a millisecond per forward on CPU)",
        "KV bytes: key and value tensors held (kvcake's report for methods, summed cache tensors for full); kvcake's "
        "own position bookkeeping is metadata_bytes, not included",
        "full rows have no one-shot peak, SPEC bound or physical limit (nothing is evicted: the full cache is its own "
        "physical limit); their prefill peak is the cache size after prefill, since a DynamicCache only grows",
    ]
    rows = as_rows(rows)
    devices = {r.device or "" for r in rows}
    if any(not d.startswith("cuda") for d in devices):
        notes.append("CPU rows: *_cuda_* columns are None (no GPU used); *_rss_peak_bytes is the highest resident set "
                     "size sampled every 2 ms by a background thread during the phase, *_rss_delta_bytes that peak "
                     "minus the RSS at the start of the phase (after gc and malloc_trim); the delta is a lower bound "
                     "of what the phase allocated (memory the allocator kept from earlier phases is reused without "
                     "raising RSS, spikes shorter than 2 ms can be missed)")
    if any(d.startswith("cuda") for d in devices):
        notes.append("CUDA rows: *_rss_* columns are None (host RSS says nothing about GPU memory); "
                     "*_cuda_peak_bytes is torch.cuda.max_memory_allocated after reset_peak_memory_stats at the start "
                     "of the phase, *_cuda_delta_bytes that peak minus memory_allocated at the start (weights "
                     "excluded)")
    if any(r.compiled for r in rows):
        notes += COMPILED_NOTES
    return notes


COMPILED_NOTES = [
    "compiled rows (compiled=True; the eager rows of the same run have compiled=False): decoding steps through "
    "torch.compile(model.forward, fullgraph=True, mode=compile_mode) — default on CPU, reduce-overhead (CUDA graphs) "
    "on CUDA — in the same hand-written greedy loop at true positions; the prefill stays eager and untimed, so "
    "compiled rows carry no prefill or memory figures (see the eager row of the case)",
    "compiled references: the full cache in transformers' StaticCache (prompt + decode_tokens slots per layer), and "
    "the physical limit in a StaticCache of physical_limit_tokens + decode_tokens slots (a random prompt as long as "
    "the compressed cache's mean kept tokens per layer); a StaticCache attends over all its slots, the unwritten "
    "ones masked",
    "each compiled case runs alone after torch._dynamo.reset() (not in the rounds: compiling anew every round would "
    "cost a compilation per round): untimed runs (at least one, at least warmup, and at least 3 steps, so that CUDA "
    "graphs are recorded before timing) whose first step is compile_s, never in the medians, then repeats timed runs",
    "graph_breaks: torch._dynamo.utils.counters['graph_break'] summed, from the first compiled step to the last timed "
    "one (with fullgraph=True a graph break stops the case, and its note says why); recompiles: graphs dynamo "
    "produced during the timed steps (counters['stats']['unique_graphs']), the first guard failure's reason in the "
    "notes",
]


def _csv_value(value):
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


_RUN_KEYS = ("model", "dtype", "attn_implementation", "sdpa_backend", "device", "budget", "ratio", "decode_tokens",
             "repeats", "warmup", "seed")


def _run_meta(rows: list[BenchRow]) -> dict[str, Any]:
    run: dict[str, Any] = {k: rows[0].get(k) for k in _RUN_KEYS}
    run["lengths"] = sorted({r.length for r in rows})
    run["methods"] = list(dict.fromkeys(r.method for r in rows))
    if any(r.compiled for r in rows):
        run["compile"] = True
        run["compile_mode"] = next(r.compile_mode for r in rows if r.compiled)
    return run


def write_csv(rows: list[BenchRow], path: Path) -> None:
    """results.csv: one line per row, the columns of all rows in order; list columns as JSON."""
    dicts = [r.to_dict() for r in rows]
    columns = list(dict.fromkeys(k for d in dicts for k in d))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for d in dicts:
            writer.writerow({k: _csv_value(d.get(k)) for k in columns})


def write_results(rows: Iterable[Mapping[str, Any]], out_dir: str | Path, meta: dict[str, Any] | None = None,
                  plots: bool = True) -> dict[str, Path]:
    """Write results.json (environment, arguments, rows, summary), results.csv, results.md and PNG plots.

    ``rows``: :class:`BenchRow` or their dict form (e.g. read back from results.json). ``meta`` is stored in
    results.json as given (the CLI puts its exact arguments there under ``args``); the hardware and library versions
    of this process are added under ``hardware``. Returns the paths written by name.
    """
    rows = as_rows(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    meta.setdefault("hardware", hardware())
    meta.setdefault("notes", measurement_notes(rows))
    if rows and "run" not in meta:
        meta["run"] = _run_meta(rows)
    summary = summarise_targets(rows)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md"}
    data = {"meta": meta, "rows": [r.to_dict() for r in rows], "summary": summary}
    paths["json"].write_text(json.dumps(data, indent=2, default=str))
    write_csv(rows, paths["csv"])
    paths["md"].write_text(markdown_report(rows, meta))
    if plots and rows:
        from kvcake.bench.plots import plot

        for p in plot(rows, out):
            paths[p.stem] = p
    return paths
