"""A throughput run: every (memory budget, prompt length, setting) of a workload, resumable, with its results.

Each finished case is saved at once under ``OUT/cases/`` and skipped when the run is started again with the same
workload (a case that failed, e.g. its environment was missing, is run again), so a long run interrupted resumes
where it stopped. Cases are run with the settings innermost, so that the
settings compared at one budget run close together in time on a shared machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvcake.bench.throughput.memory import bytes_per_token, pool_bytes
from kvcake.bench.throughput.record import summarise
from kvcake.bench.throughput.settings import Setting
from kvcake.bench.throughput.workload import Request, Workload, build_requests


@dataclass
class Plan:
    """What to run: the workload, the settings, the budgets (in full-cache requests) and the prompt lengths."""

    workload: Workload
    settings: list[Setting]
    pools: list[float] = field(default_factory=lambda: [2.0])
    prompt_lengths: list[int] = field(default_factory=list)
    model: str = "smollm2-135m-instruct"
    python: dict[str, str] = field(default_factory=dict)
    max_batch: int | None = None

    def __post_init__(self) -> None:
        if not self.settings:
            raise ValueError("no settings to run")
        if not self.pools or any(p <= 0 for p in self.pools):
            raise ValueError("memory budgets are positive numbers of full-cache requests")
        if not self.prompt_lengths:
            self.prompt_lengths = [self.workload.prompt_tokens]

    def cases(self) -> list[tuple[float, int, Setting]]:
        return [(pool, length, s) for length in self.prompt_lengths for pool in self.pools for s in self.settings]


def case_name(pool: float, length: int, setting: Setting) -> str:
    safe = setting.label.replace(":", "-").replace("@", "-")
    return f"pool{pool:g}-prompt{length}-{safe}"


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, check=False, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_case(setting: Setting, requests: list[Request], workload: Workload, pool: int, per_token: int, model,
             tokenizer, folder: Path, plan: Plan, logs: Path,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Serve ``requests`` under one setting; the case's record (settings, summary, per-request records, clock)."""
    from kvcake.bench.throughput import external, hf

    info: dict[str, Any]
    error = None
    try:
        if setting.engine == "transformers":
            records, clock, info = hf.serve(model, tokenizer, setting, requests, workload.output_tokens, pool,
                                            per_token, progress=progress, max_batch=plan.max_batch)
        else:
            job = external.job_for(setting, requests, folder, workload.output_tokens, pool, model.config,
                                     per_token)
            if setting.engine == "vllm":
                job["max_num_seqs"] = plan.max_batch or 256
            result = external.run_worker(setting, job, plan.python.get(setting.engine), log=logs / "worker.log")
            info = result["info"]
            records, clock = external.to_records(result, requests)
    except (external.EnvironmentMissingError, RuntimeError) as exc:
        from kvcake.bench.throughput.record import Clock, RequestRecord

        error = str(exc)
        info = {}
        records = [RequestRecord(index=r.index, prompt_tokens=r.prompt_tokens, arrival_s=r.arrival_s,
                                 refused=error) for r in requests]
        clock = Clock()
    engine_pool = int(info.get("pool_bytes", pool))
    summary = summarise(records, clock, engine_pool)
    return {"setting": setting.to_dict(), "pool_bytes_asked": pool, "summary": summary, "info": info,
            "error": error, "clock": {k: v for k, v in clock.to_dict().items() if k != "kv_samples"},
            "requests": [vars(r) for r in records]}


def run(plan: Plan, out_dir: str | Path, progress: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """Run every case not already saved under ``out_dir``; write the results; return every case's record."""
    import torch

    from kvcake import models
    from kvcake.bench.throughput.writers import write_all

    out = Path(out_dir)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    folder = models.resolve(plan.model)
    model, tokenizer = models.load(plan.model, dtype=torch.float32)
    per_token = bytes_per_token(model.config, 4)
    meta: dict[str, Any] = {"plan": {"workload": plan.workload.to_dict(), "settings": [s.label for s in plan.settings],
                     "pools_full_requests": plan.pools, "prompt_lengths": plan.prompt_lengths, "model": plan.model,
                     "max_batch": plan.max_batch},
            "git_commit": _git_commit(), "versions": _versions(), "bytes_per_token": per_token}
    (out / "plan.json").write_text(json.dumps(meta, indent=1))
    bar = _bar(progress, len(plan.cases()) * plan.workload.requests)
    workloads: dict[int, list[Request]] = {}
    done = []
    workload_meta: dict[str, Any] = plan.workload.to_dict()
    for pool_requests, length, setting in plan.cases():
        path = out / "cases" / f"{case_name(pool_requests, length, setting)}.json"
        if length not in workloads:
            workloads[length] = build_requests(tokenizer, replace(plan.workload, prompt_tokens=length))
        requests = workloads[length]
        if path.is_file():
            case = json.loads(path.read_text())
            if case.get("plan") == workload_meta | {"prompt_tokens": length} and not case.get("error"):
                done.append(case)
                bar(len(requests))
                continue
        longest = max(r.prompt_tokens for r in requests) + plan.workload.output_tokens
        pool = pool_bytes(pool_requests, longest, per_token)
        log(f"{setting.label}: pool {pool / 2**20:.1f} MiB ({pool_requests:g} full requests), prompts ~{length}")
        started = time.time()
        case = run_case(setting, requests, plan.workload, pool, per_token, model, tokenizer, folder, plan,
                        out / "logs", progress=bar)
        case.update(plan=workload_meta | {"prompt_tokens": length}, pool_full_requests=pool_requests,
                    prompt_length=length, seconds=time.time() - started, model=plan.model,
                    git_commit=meta["git_commit"])
        path.write_text(json.dumps(case, indent=1))
        done.append(case)
        if setting.engine != "transformers":  # the other environments report at the end of their case
            bar(len(requests))
        s = case["summary"]
        log(f"  served {s['served']}/{s['requests']}, decode {s['decode_tokens_per_s'] or 0:.1f} tok/s, "
            f"at once {s['max_running']}, {case['error'] or ''}")
    write_all(done, meta, out)
    return done


def _versions() -> dict[str, Any]:
    import platform

    import torch
    import transformers

    from kvcake import __version__

    return {"kvcake": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu_cores": __import__("os").cpu_count()}


def _bar(enabled: bool, total: int) -> Callable[[int], None]:
    if not enabled:
        return lambda n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="kvcake throughput", unit="request")

    def advance(n: int) -> None:
        if n:
            bar.update(n)
    return advance


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_ints(text: str | Sequence[int]) -> list[int]:
    if isinstance(text, str):
        return [int(x) for x in text.split(",") if x.strip()]
    return list(text)
