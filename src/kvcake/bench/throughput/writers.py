"""results.{json,csv,md} and the plots of a throughput run."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvcake.bench.throughput.memory import mib

COLUMNS = ("requests", "served", "refused", "output_tokens", "wall_s", "requests_per_s", "output_tokens_per_s",
           "decode_tokens_per_s", "prefill_share", "decode_share", "max_running", "ttft_p50_s", "ttft_p99_s",
           "tpot_p50_s", "tpot_p99_s", "kv_peak_bytes", "kv_steady_bytes", "pool_bytes", "within_pool", "found",
           "found_of")


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def baseline_of(case: Mapping[str, Any], cases: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The row a case is compared with at the same budget and prompt length: its engine's full cache; for kvpress,
    kvcake's transformers row of the same method and ratio."""
    s = case["setting"]
    if s["engine"] == "kvpress":
        want = {"engine": "transformers", "method": s["method"], "ratio": s["ratio"]}
    elif s["method"] == "full":
        return None
    else:
        want = {"engine": s["engine"], "method": "full", "ratio": None}
    for other in cases:
        o = other["setting"]
        if (other["pool_full_requests"], other["prompt_length"]) == (case["pool_full_requests"],
                                                                       case["prompt_length"]) and \
                all(o[k] == v for k, v in want.items()):
            return other
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def found_difference(case: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any] | None:
    """Needles found, ``case`` minus ``base``, paired on the requests both served, with the eval's bootstrap
    interval (:func:`kvcake.eval.stats.compare`); None without such pairs."""
    from kvcake.eval.stats import compare

    mine = {r["index"]: r["found"] for r in case.get("requests", []) if r.get("found") is not None}
    theirs = {r["index"]: r["found"] for r in base.get("requests", []) if r.get("found") is not None}
    both = sorted(set(mine) & set(theirs))
    if not both:
        return None
    result = compare([("needle", [float(mine[i]) for i in both], [float(theirs[i]) for i in both])])
    return {"pairs": len(both), "difference": result.difference, "low": result.low, "high": result.high}


def comparisons(cases: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each case against its baseline (:func:`baseline_of`): decoding-phase and end-to-end throughput and the
    requests running at once, as ratios (for kvpress rows: kvcake's figure over kvpress's), and the needles found,
    paired (:func:`found_difference`)."""
    rows = []
    for case in cases:
        base = baseline_of(case, cases)
        if base is None:
            continue
        a, b = case["summary"], base["summary"]
        if case["setting"]["engine"] == "kvpress":  # kvcake over kvpress
            a, b = b, a
            label = f"{base['setting']['label']} / {case['setting']['label']}"
        else:
            label = f"{case['setting']['label']} / {base['setting']['label']}"
        rows.append({"pool_full_requests": case["pool_full_requests"], "prompt_length": case["prompt_length"],
                     "comparison": label,
                     "decode_tokens_per_s": ratio(a["decode_tokens_per_s"], b["decode_tokens_per_s"]),
                     "output_tokens_per_s": ratio(a["output_tokens_per_s"], b["output_tokens_per_s"]),
                     "requests_per_s": ratio(a["requests_per_s"], b["requests_per_s"]),
                     "max_running": ratio(a["max_running"], b["max_running"]),
                     "found": found_difference(case, base) if case["setting"]["engine"] != "kvpress" else
                     found_difference(base, case)})
    return rows


def _other_commits(cases: list[Mapping[str, Any]], meta: Mapping[str, Any]) -> list[str]:
    """A line naming the rows run at another commit than the run's (a resumed run keeps the cases it finds), if any;
    rows saved before cases recorded their commit are not named."""
    other = [f"{case['setting']['label']} at {case['git_commit'][:7]}" for case in cases
             if case.get("git_commit") and case["git_commit"] != meta.get("git_commit")]
    return [f"Rows run at another commit: {', '.join(other)}.", ""] if other else []


def markdown(cases: list[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    plan = meta.get("plan", {})
    lines = ["# kvcake throughput", "",
             f"Model {plan.get('model')}; workload {json.dumps(plan.get('workload'))}; commit "
             f"{meta.get('git_commit')}; versions {json.dumps(meta.get('versions'))}.", "",
             *_other_commits(cases, meta),
             "| pool (full req.) | prompt | setting | served | req/s | out tok/s | decode tok/s | prefill share | "
             "at once | TTFT p50/p99 s | TPOT p50/p99 ms | KV peak / steady MiB | pool MiB | needle found |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        s = case["summary"]
        tpot = "/".join("—" if v is None else f"{1000 * v:.0f}" for v in (s["tpot_p50_s"], s["tpot_p99_s"]))
        lines.append(
            f"| {case['pool_full_requests']:g} | {case['prompt_length']} | {case['setting']['label']} | "
            f"{s['served']}/{s['requests']} | {_num(s['requests_per_s'], 3)} | {_num(s['output_tokens_per_s'])} | "
            f"{_num(s['decode_tokens_per_s'])} | {_num(s['prefill_share'])} | {s['max_running']} | "
            f"{_num(s['ttft_p50_s'], 1)}/{_num(s['ttft_p99_s'], 1)} | {tpot} | "
            f"{mib(s['kv_peak_bytes'])} / {mib(s['kv_steady_bytes'])}{'' if s['within_pool'] else ' (over)'} | "
            f"{mib(s['pool_bytes'])} | {s['found']}/{s['found_of']} |")
    ratios = comparisons(cases)
    if ratios:
        lines += ["", "| pool | prompt | comparison | decode tok/s | out tok/s | req/s | at once | needles found, "
                  "paired difference [95% interval] |", "|---|---|---|---|---|---|---|---|"]
        for r in ratios:
            f = r["found"]
            found = "—" if f is None else f"{f['difference']:+.2f} [{f['low']:+.2f}, {f['high']:+.2f}] ({f['pairs']})"
            lines.append(f"| {r['pool_full_requests']:g} | {r['prompt_length']} | {r['comparison']} | "
                         + " | ".join(_num(r[k]) + ("×" if r[k] is not None else "") for k in
                                      ("decode_tokens_per_s", "output_tokens_per_s", "requests_per_s",
                                       "max_running")) + f" | {found} |")
    notes = [f"- {c['setting']['label']} (pool {c['pool_full_requests']:g}, prompt {c['prompt_length']}): "
             f"{c['error'] or next((r['refused'] for r in c['requests'] if r['refused']), '')}"
             for c in cases if c["error"] or c["summary"]["refused"]]
    if notes:
        lines += ["", "Refused or failed:", "", *notes]
    lines += ["", "Decode tok/s counts only the steps in which no prefill ran; prefill share is the part of the wall "
              "time spent in steps with a prefill. KV figures are read from each engine (see each case's "
              "kv_source in results.json)."]
    return "\n".join(lines) + "\n"


def write_all(cases: list[Mapping[str, Any]], meta: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """results.json (everything but per-request records, which stay in cases/), results.csv, results.md, plots."""
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md"}
    slim = [{k: v for k, v in c.items() if k != "requests"} for c in cases]
    paths["json"].write_text(json.dumps({"meta": meta, "cases": slim, "comparisons": comparisons(list(cases))},
                                        indent=1))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["engine", "method", "ratio", "pool_full_requests", "prompt_length", *COLUMNS, "error"])
        for c in cases:
            s = c["setting"]
            writer.writerow([s["engine"], s["method"], s["ratio"], c["pool_full_requests"], c["prompt_length"],
                             *(c["summary"][k] for k in COLUMNS), c["error"] or ""])
    paths["md"].write_text(markdown(list(cases), meta))
    try:
        from kvcake.bench.throughput.plots import plot_all

        paths.update(plot_all(list(cases), out))
    except ImportError:  # matplotlib missing: the tables are written anyway
        pass
    return paths
