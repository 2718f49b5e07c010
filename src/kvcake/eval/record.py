"""``run.json``: what a folder's rows come from — the model, the suite, every setting's method parameters, and one
entry per invocation that wrote into the folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kvcake.eval.files import RECORD
from kvcake.eval.grid import Setting

#: Fields of a run record that belong to one invocation (kept per run in ``run.json``'s ``runs``).
RUN_KEYS = ("started", "command", "git_commit", "versions", "host", "max_length", "max_new_tokens", "shards")


def _git_commit() -> str | None:
    import subprocess

    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=False,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_record(model_name: str, model, settings: list[Setting], modes: list[str], tasks: list[str],
               options: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """What a run was: versions, model, method parameters, suite settings, seed, commit, command."""
    import datetime
    import platform
    import sys

    import transformers

    import kvcake

    config = model.config
    return {
        "model": model_name,
        "architecture": type(model).__name__,
        "layers": getattr(config, "num_hidden_layers", None),
        "dtype": str(next(model.parameters()).dtype),
        "attention": getattr(config, "_attn_implementation", None),
        "methods": {s.label: (s.build().parameters() if s.method != "full" else {"name": "full"}) for s in settings},
        "settings": [s.label for s in settings],
        "modes": modes,
        "tasks": tasks,
        "suite": options,
        "seed": options.get("seed"),
        "versions": {"kvcake": kvcake.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "git_commit": _git_commit(),
        "command": " ".join(sys.argv),
        "host": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                 "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def write_record(folder: Path, given: dict[str, Any], write: bool = True) -> dict[str, Any]:
    """Add the run ``given`` to ``folder``'s ``run.json`` (written only when ``write``, on rank 0) and return it.

    Every run into the folder is listed under ``runs`` (start, command, commit, tasks, modes, settings, answer
    cap); methods, tasks, modes and settings are the union over the runs.
    """
    path = folder / RECORD
    record = dict(given)
    this_run = {key: record.pop(key, None) for key in RUN_KEYS}
    this_run.update(tasks=record.get("tasks"), modes=record.get("modes"), settings=record.get("settings"))
    previous = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("model", "seed", "suite"):
        if key in previous and previous[key] != record.get(key):
            raise ValueError(f"{path} was written for {key}={previous[key]!r}, not {record.get(key)!r}: "
                             "use another --out folder, or the same settings to resume")
    for key in ("tasks", "modes", "settings"):
        record[key] = list(dict.fromkeys(previous.get(key, []) + (record.get(key) or [])))
    record["methods"] = {**previous.get("methods", {}), **record.get("methods", {})}
    record["runs"] = [r for r in previous.get("runs", []) if isinstance(r, dict)] + [this_run]
    if write:
        path.write_text(json.dumps(record, indent=2) + "\n")
    return record
