"""Rows served in another virtual environment (vLLM, kvpress): a worker script run by that environment's python.

The job (setting, model folder, pool, requests) goes to the worker as JSON and its records come back as JSON, so the
main environment never imports vLLM or kvpress (they pin other transformers versions).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from kvcake.bench.throughput.memory import BLOCK_TOKENS
from kvcake.bench.throughput.record import Clock, RequestRecord
from kvcake.bench.throughput.settings import Setting
from kvcake.bench.throughput.workload import Request

HERE = Path(__file__).resolve().parent
#: Default interpreters of the two environments (as .ci/run and docs/performance.md build them).
DEFAULT_PYTHON = {"vllm": "/tmp/kvcake-vllm-venv/bin/python", "kvpress": "/tmp/kvcake-kvpress-venv/bin/python"}
WORKERS = {"vllm": HERE / "vllm_worker.py", "kvpress": HERE / "kvpress_worker.py"}


class EnvironmentMissingError(FileNotFoundError):
    """The other environment's python is not there."""


def job_for(setting: Setting, requests: list[Request], model_folder: str | Path, output_tokens: int, pool: int,
            config: Any, per_token: int = 0) -> dict[str, Any]:
    """The JSON job of a worker. vLLM's pool is given one block more than ``pool`` (``per_token`` bytes per token):
    vLLM keeps its first block as a null block that no request may use, so requests get the same room as elsewhere."""
    text = getattr(config, "text_config", None) or config
    longest = max(r.prompt_tokens for r in requests)
    window = None
    if setting.ratio is not None:
        window = max(1, round(setting.ratio * sum(r.prompt_tokens for r in requests) / len(requests)))
    return {
        "setting": setting.to_dict(),
        "model": str(model_folder),
        "pool_bytes": int(pool + (BLOCK_TOKENS * per_token if setting.engine == "vllm" else 0)),
        "output_tokens": int(output_tokens),
        "max_model_len": int(longest + output_tokens + 16),
        "layers": int(text.num_hidden_layers),
        "window_tokens": window,
        "requests": [dict(index=r.index, ids=r.ids, arrival_s=r.arrival_s, context=r.extra.get("context"),
                          question=r.extra.get("question")) for r in requests],
    }


def run_worker(setting: Setting, job: dict[str, Any], python: str | Path | None = None, log: Path | None = None,
               timeout: float | None = None) -> dict[str, Any]:
    """Run the setting's worker in its environment; the worker's result (records, clock, info)."""
    interpreter = Path(python or os.environ.get(f"KVCAKE_{setting.engine.upper()}_PYTHON") or
                       DEFAULT_PYTHON[setting.engine])
    if not interpreter.is_file():
        raise EnvironmentMissingError(
            f"{setting.label}: no python at {interpreter} for the {setting.engine} environment; build it as "
            "docs/performance.md says, or pass its path")
    with tempfile.TemporaryDirectory(prefix="kvcake-throughput-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        with open(log or os.devnull, "a") as sink:
            done = subprocess.run([str(interpreter), str(WORKERS[setting.engine]), str(job_path), str(result_path)],
                                  stdout=sink, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False)
        if done.returncode != 0 or not result_path.is_file():
            where = f"; its log: {log}" if log else ""
            raise RuntimeError(f"{setting.label}: the {setting.engine} worker failed (exit {done.returncode}){where}")
        result: dict[str, Any] = json.loads(result_path.read_text())
    return result


def to_records(result: dict[str, Any], requests: list[Request]) -> tuple[list[RequestRecord], Clock]:
    """The worker's plain records as :class:`RequestRecord` and :class:`Clock`, the needle checked here."""
    answers = {r.index: r.answer for r in requests}
    records = []
    for item in result["requests"]:
        text = item.pop("text", None)
        rec = RequestRecord(**item)
        if rec.served and text is not None:
            rec.found = answers[rec.index] in text
        records.append(rec)
    return records, Clock(**result["clock"])
