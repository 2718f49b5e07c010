"""``run.json``: what a folder's rows come from — the model, the suite, every setting's method parameters, and one
entry per invocation that wrote into the folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kvcake.eval.files import RECORD
from kvcake.eval.grid import Setting
from kvcake.eval.sample import EvalDataError

#: Fields of a run record that belong to one invocation (kept per run in ``run.json``'s ``runs``).
RUN_KEYS = ("started", "command", "git_commit", "versions", "host", "max_length", "max_new_tokens", "shards",
            "batch_size")

#: The settings that change an answer, and the option that sets each. Every run into a folder must have the same
#: value of each (rows are reused by key, which does not hold them); they are kept at the top of ``run.json``.
ANSWER_SETTINGS = {
    "model": "--models", "seed": "--seed",
    "suite": "the suite options --data, --lengths, --depths, --per-cell, --corpus, --limit",
    "dtype": "--dtype", "attention": "--attn", "max_length": "--max-length", "max_new_tokens": "--max-new-tokens",
    "chat_tail": "the model's chat template: the tokens it adds after the user's message, left uncompressed by the "
                 "tail protocol",
}


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
        "methods": method_parameters(settings),
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


def method_parameters(settings: list[Setting]) -> dict[str, dict[str, Any]]:
    """Every setting's full method parameters, by label."""
    return {s.label: (s.build().parameters() if s.method != "full" else {"name": "full"}) for s in settings}


def default_parameters(settings: list[Setting]) -> dict[str, dict[str, Any]]:
    """Each setting's method at its budget or ratio with no parameter given: the defaults, by label."""
    return {s.label: (Setting(s.method, s.budget, s.ratio).build().parameters() if s.method != "full"
                      else {"name": "full"}) for s in settings}


def read_record(folder: Path) -> dict[str, Any]:
    """``folder``'s ``run.json`` (empty when there is none)."""
    path = folder / RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{path} is not valid JSON ({exc}): repair it or use another --out folder") from exc
    if not isinstance(record, dict):
        raise EvalDataError(f"{path} holds no run record (a JSON {type(record).__name__}): use another --out folder")
    return record


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists, ...), to compare with what a record holds."""
    return json.loads(json.dumps(value))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _previous(previous: dict[str, Any], key: str) -> list[Any]:
    """The values ``key`` took in the runs that wrote ``previous``: its top-level value, else (a record written
    before it was kept there) every run's."""
    if key in previous:
        return [previous[key]]
    return [r[key] for r in previous.get("runs", []) if isinstance(r, dict) and key in r]


def check_resume(previous: dict[str, Any], record: dict[str, Any], path: Path,
                 defaults: dict[str, dict[str, Any]] | None = None) -> None:
    """Refuse to add ``record``'s run to a folder whose rows were made under other answer-changing settings.

    Compared are the :data:`ANSWER_SETTINGS` that ``record`` holds and the full method parameters of every label
    the two share; a mismatch raises :class:`EvalDataError` naming the setting. A parameter the earlier run did not
    have (added to kvcake since) passes when this run gives it its default (``defaults``:
    :func:`default_parameters`): a parameter is added with the default that keeps the earlier behaviour.
    """
    for key, option in ANSWER_SETTINGS.items():
        if key not in record:
            continue
        new = _plain(record[key])
        for old in _previous(previous, key):
            if old != new:
                raise EvalDataError(f"{path} holds answers made with {key}={old!r}, not {new!r} ({option}): use "
                                    "another --out folder, or the same settings to resume")
    known = previous.get("methods") or {}
    for label, params in (record.get("methods") or {}).items():
        if label not in known:
            continue
        old, new = _flat(known[label]), _flat(_plain(params))
        default = _flat(_plain((defaults or {}).get(label, {})))
        for name in sorted(set(old) | set(new)):
            if name not in old and name in default and new.get(name) == default[name]:
                continue  # added since, at its default
            if old.get(name) != new.get(name):
                raise EvalDataError(f"{path} holds {label} answers made with {name}={old.get(name)!r}, not "
                                    f"{new.get(name)!r} (another kvcake version?): use another --out folder")


def _write(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)  # readers (other shards) never see half a file


def add_run(folder: Path, given: dict[str, Any], previous: dict[str, Any], write: bool = True,
            **facts: Any) -> dict[str, Any]:
    """``previous`` (``folder``'s record) with the run ``given`` added, its status ``running``; written to
    ``run.json`` when ``write`` (rank 0), ``facts`` added to the run's entry. Call :func:`check_resume` first.

    Every run into the folder is listed under ``runs`` (start, command, commit, tasks, modes, protocols,
    settings, answer cap, batch size, status); methods, tasks, modes, protocols and settings are the union over the
    runs (a folder written before protocols existed holds ``whole`` rows); the answer-changing settings are the
    same for every run, and kept at the top too.
    """
    record = dict(given)
    this_run = {key: record.get(key) if key in ANSWER_SETTINGS else record.pop(key, None) for key in RUN_KEYS}
    this_run.update(tasks=record.get("tasks"), modes=record.get("modes"), protocols=record.get("protocols"),
                    settings=record.get("settings"), status="running", **facts)
    if not previous.get("protocols") and previous.get("runs"):
        previous = {**previous, "protocols": ["whole"]}  # a folder written before protocols existed
    for key in ("tasks", "modes", "protocols", "settings"):
        record[key] = list(dict.fromkeys(previous.get(key, []) + (record.get(key) or [])))
    record["methods"] = {**previous.get("methods", {}), **record.get("methods", {})}
    record["runs"] = [r for r in previous.get("runs", []) if isinstance(r, dict)] + [this_run]
    if write:
        _write(folder / RECORD, record)
    return record


def finish_run(folder: Path, record: dict[str, Any], status: str, write: bool = True, **facts: Any) -> None:
    """Mark the last run of ``record`` ``completed``, ``failed`` or ``interrupted`` (with ``facts`` such as the
    error), with its end time, and write ``run.json`` when ``write``."""
    import datetime

    run = record["runs"][-1]
    run.update(status=status, finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               **facts)
    if write:
        _write(folder / RECORD, record)
