"""The ratios the benchmark reports, stated from measured rows only (:func:`summarise_targets`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from kvcake.bench.row import BenchRow, as_rows

MIB = 2**20


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, None when either is missing or ``den`` is 0."""
    return None if num is None or den is None or den == 0 else num / den


class Grid:
    """Rows by (prompt length, method): the eager rows, and those of compiled decoding apart."""

    def __init__(self, rows: Iterable[Mapping[str, Any]]):
        self.rows = as_rows(rows)
        self.lengths = sorted({r.length for r in self.rows})
        self.methods = list(dict.fromkeys(r.method for r in self.rows))
        self.compressed = [m for m in self.methods if m != "full"]
        self.eager = {(r.length, r.method): r for r in self.rows if not r.compiled}
        self.compiled = {(r.length, r.method): r for r in self.rows if r.compiled}

    def full(self, length: int) -> BenchRow | None:
        """The eager full-cache row at ``length``."""
        return self.eager.get((length, "full"))

    def measured(self) -> Iterator[tuple[int, str, BenchRow]]:
        """(length, method, eager row) for every compressed case that was measured, lengths first."""
        for n in self.lengths:
            for m in self.compressed:
                if (r := self.eager.get((n, m))) is not None:
                    yield n, m, r


def _prefill_overhead(grid: Grid, lines: list[str]) -> None:
    for n, m, r in grid.measured():
        full = grid.full(n)
        value = ratio(r.prefill_s, full.prefill_s if full else None)
        if value is None or full is None or r.prefill_s is None or full.prefill_s is None:
            lines.append(f"{m} at {n} tokens: prefill overhead vs full not measured")
        else:
            lines.append(f"prefill overhead, {m} at {n} tokens: {value:.3f}× full "
                         f"({r.prefill_s:.3f} s vs {full.prefill_s:.3f} s, {100 * (value - 1):+.1f}%)")


def _vs_physical_limit(grid: Grid, lines: list[str]) -> None:
    for n, m, r in grid.measured():
        value = ratio(r.decode_step_s, r.physical_limit_decode_step_s)
        if value is None or r.decode_step_s is None or r.physical_limit_decode_step_s is None:
            lines.append(f"{m} at {n} tokens: decode time vs the physical limit not measured")
        else:
            lines.append(f"decode step vs physical limit, {m} at {n} tokens: {value:.3f}× a plain cache of "
                         f"{r.physical_limit_tokens} tokens per layer ({1000 * r.decode_step_s:.2f} ms vs "
                         f"{1000 * r.physical_limit_decode_step_s:.2f} ms)")


def _speedup_at_longest(grid: Grid, lines: list[str]) -> None:
    longest = grid.lengths[-1]
    full = grid.full(longest)
    full_step = full.decode_step_s if full else None
    for m in grid.compressed:
        r = grid.eager.get((longest, m))
        if r is None:
            continue
        speedup = ratio(full_step, r.decode_step_s)
        if speedup is None or full_step is None or r.decode_step_s is None:
            lines.append(f"{m} at {longest} tokens: decode speedup vs full not measured")
        else:
            lines.append(f"decode speedup vs full at the longest prompt ({longest} tokens), {m}: {speedup:.2f}× "
                         f"({1000 * full_step:.2f} ms → {1000 * r.decode_step_s:.2f} ms per token)")


def _peaks(grid: Grid, lines: list[str]) -> None:
    for n, m, r in grid.measured():
        peak, bound, per_token = r.peak_kv_bytes_prefill, r.peak_bound_bytes, r.bytes_per_token_layer
        if peak is None or bound is None or not per_token:
            lines.append(f"{m} at {n} tokens: cascade peak vs SPEC bound not measured")
        else:
            gap = (bound - peak) / per_token
            window = r.window or 0
            windows = f" = {gap / window:.2f} windows of {window}" if window else ""
            lines.append(f"cascade peak vs SPEC bound, {m} at {n} tokens: peak {peak / MIB:.2f} MiB, bound "
                         f"{bound / MIB:.2f} MiB; the peak is {gap:.1f} tokens of one layer "
                         f"{'below' if gap >= 0 else 'ABOVE'} the bound{windows}")
        one_shot, full_kv = r.peak_kv_bytes_one_shot, r.kv_bytes_full_prefill
        value = ratio(one_shot, full_kv)
        if value is None or one_shot is None or full_kv is None:
            lines.append(f"{m} at {n} tokens: one-shot peak vs full not measured")
        else:
            cascade = ratio(peak, full_kv)
            extra = f"; the cascade's peak is {cascade:.3f}× full" if cascade is not None else ""
            lines.append(f"one-shot peak vs full cache, {m} at {n} tokens: {value:.3f}× "
                         f"({one_shot / MIB:.2f} MiB vs {full_kv / MIB:.2f} MiB){extra}")


def _ms_ratio(what: str, where: str, num: float | None, den: float | None, lines: list[str]) -> None:
    """``what, where: num/den× (num ms vs den ms)``, or ``where: what not measured``."""
    value = ratio(num, den)
    if value is None or num is None or den is None:
        lines.append(f"{where}: {what} not measured")
    else:
        lines.append(f"{what}, {where}: {value:.3f}× ({1000 * num:.2f} ms vs {1000 * den:.2f} ms)")


def _compiled(grid: Grid, lines: list[str]) -> None:
    """Compiled decoding: compiled vs eager, and compiled methods vs the compiled references and the default."""
    for n in grid.lengths:
        full, cfull = grid.full(n), grid.compiled.get((n, "full"))
        full_step, cfull_step = full.decode_step_s if full else None, cfull.decode_step_s if cfull else None
        _ms_ratio("compiled vs eager step (StaticCache / DynamicCache)", f"full at {n} tokens", cfull_step,
                  full_step, lines)
        for m in grid.compressed:
            c, e = grid.compiled.get((n, m)), grid.eager.get((n, m))
            if c is None:
                continue
            where = f"{m} at {n} tokens"
            _ms_ratio(f"compiled vs eager {m} step", where, c.decode_step_s, e.decode_step_s if e else None, lines)
            _ms_ratio(f"compiled {m} step / compiled plain static cache of the same size "
                      f"({c.physical_limit_tokens} tokens per layer)", where, c.decode_step_s,
                      c.physical_limit_decode_step_s, lines)
            _ms_ratio(f"compiled {m} vs transformers' default full-cache step (eager DynamicCache)", where,
                      c.decode_step_s, full_step, lines)
            _ms_ratio(f"compiled {m} vs compiled full StaticCache step", where, c.decode_step_s, cfull_step, lines)
            _ms_ratio("compiled vs eager physical limit (StaticCache / DynamicCache)", where,
                      c.physical_limit_decode_step_s, e.physical_limit_decode_step_s if e else None, lines)


def summarise_targets(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The ratios the project cares about, stated from measured rows only (nothing is asserted or estimated).

    Prefill overhead of each method vs full at each length; decode step time vs the physical-limit plain cache;
    decode speedup vs full at the longest length; the cascade's peak vs the SPEC bound (in tokens of one layer, and
    in windows); one-shot peak vs the full cache. With compiled rows: compiled vs eager steps, and each compiled
    method vs the compiled plain static cache of its size, vs transformers' default full cache (eager DynamicCache)
    and vs the compiled full StaticCache. Rows are :class:`BenchRow` or their dict form.
    """
    grid = Grid(rows)
    if not grid.rows:
        return ["no rows measured"]
    lines: list[str] = []
    _prefill_overhead(grid, lines)
    _vs_physical_limit(grid, lines)
    _speedup_at_longest(grid, lines)
    _peaks(grid, lines)
    if grid.compiled:
        _compiled(grid, lines)
    return lines
