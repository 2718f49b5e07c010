"""The files of a run folder: predictions (one JSON row per answer, appended), shards and their barrier.

A run appends each row to ``predictions.jsonl`` (``predictions.rank<r>.jsonl`` for shard ``r``) as soon as it is
answered, so that a killed run loses at most the line it was writing; reading takes the last row of each key.
A finished folder may hold its predictions gzip-compressed (``predictions.jsonl.gz``, :mod:`kvcake.eval.pack`):
readers take both, the compressed lines before the plain ones of the same file, so a run resumed on a packed
folder appends to the plain file and its rows win as they would have.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvcake.eval.sample import EvalDataError

PREDICTIONS = "predictions"
RECORD = "run.json"


def row_key(task: str, sample_id: str, label: str, mode: str, protocol: str = "whole") -> str:
    """The identity of a row: one sample of one task under one setting in one mode and protocol (the ``whole``
    protocol's keys name no protocol: the keys of folders written before protocols existed)."""
    key = f"{task}|{sample_id}|{label}|{mode}"
    return key if protocol == "whole" else f"{key}|{protocol}"


def protocol(row: dict[str, Any]) -> str:
    """A row's protocol (rows written before protocols existed compressed the whole prompt)."""
    return row.get("protocol") or "whole"


class EvalDataWarning(UserWarning):
    """Something in a results folder was left out (a line of a predictions file that is not a row)."""


#: The fields every row has; a line without them is not a row (a foreign or hand-edited line).
ROW_FIELDS = ("key", "task", "id", "mode", "label", "method", "budget", "ratio", "score", "error")


@dataclass
class Predictions:
    """The rows of a folder's predictions files (the last row of a key wins), and the lines that were left out."""

    rows: list[dict[str, Any]]
    ignored: dict[str, int]  # file name -> lines that are not rows

    @property
    def ignored_lines(self) -> int:
        return sum(self.ignored.values())


def _row(line: str) -> dict[str, Any] | None:
    """The row a line holds, or None: a torn line (a run killed mid-write), valid JSON that is not an object
    (``[1, 2]``, ``"x"``, ``3``), or an object without the fields of a row."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("key"), str) or any(k not in row for k in ROW_FIELDS):
        return None
    return row


def prediction_files(folder: Path) -> list[Path]:
    """The predictions files of ``folder`` (shards included, plain or gzip-compressed) in the order they are read:
    by name, a file's compressed lines (written first, then packed) before its plain ones (appended since)."""
    found = [*folder.glob(f"{PREDICTIONS}*.jsonl"), *folder.glob(f"{PREDICTIONS}*.jsonl.gz")]
    return sorted(found, key=lambda p: (p.name.removesuffix(".gz"), p.suffix != ".gz"))


def has_predictions(folder: Path) -> bool:
    """Whether ``folder`` holds a predictions file (plain or compressed)."""
    return bool(prediction_files(folder))


def open_lines(path: Path):
    """A predictions file opened for reading text, decompressed when its name ends in ``.gz``."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def scan_predictions(folder: Path) -> Predictions:
    """Every row of every predictions file in ``folder`` (shards included, plain or compressed), and how many lines
    of each file are not rows and were left out; such a line's sample is simply redone."""
    rows: dict[str, dict[str, Any]] = {}
    ignored: dict[str, int] = {}
    for path in prediction_files(folder):
        with open_lines(path) as f:
            for line in f:
                if not line.strip():
                    continue
                row = _row(line)
                if row is None:
                    ignored[path.name] = ignored.get(path.name, 0) + 1
                    continue
                rows[row["key"]] = row
    return Predictions(list(rows.values()), ignored)


def read_predictions(folder: Path) -> list[dict[str, Any]]:
    """Every row of every predictions file in ``folder`` (shards included); the last row of a key wins. Lines that
    are not rows are left out with an :class:`EvalDataWarning` that counts them."""
    found = scan_predictions(folder)
    if found.ignored:
        where = ", ".join(f"{name}: {n}" for name, n in found.ignored.items())
        warnings.warn(f"{folder}: left out lines that are not prediction rows (torn by a killed run, or not a JSON "
                      f"object with a row's fields) — {where}", EvalDataWarning, stacklevel=2)
    return found.rows


def ends_mid_line(path: Path) -> bool:
    """Whether ``path`` exists and its last byte is not a newline (a run was killed while writing)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


@dataclass
class Shard:
    """This process's part of a sharded run (torchrun / accelerate launch set RANK and WORLD_SIZE)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Shard:
        """This process's shard from the launcher's environment. A sharded environment that lacks what the shards
        meet by at the end (``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) is refused now, not after the work: a
        shard without its rank would answer rank 0's samples and then fail to join the others."""
        env = os.environ
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
        except ValueError:
            raise EvalDataError(f"RANK={env.get('RANK')!r} and WORLD_SIZE={env.get('WORLD_SIZE')!r} must be "
                                "whole numbers (torchrun sets them)") from None
        if world > 1:
            missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in env]
            if missing:
                raise EvalDataError(f"WORLD_SIZE={world} asks for a sharded run, but {', '.join(missing)} "
                                    f"{'is' if len(missing) == 1 else 'are'} not set: launch with torchrun "
                                    "--nproc-per-node N (or accelerate launch), or unset WORLD_SIZE")
        if world < 1 or not 0 <= rank < world:
            raise EvalDataError(f"RANK={rank} is not a shard of WORLD_SIZE={world}")
        return cls(rank, world)

    @property
    def filename(self) -> str:
        return f"{PREDICTIONS}.jsonl" if self.world == 1 else f"{PREDICTIONS}.rank{self.rank}.jsonl"

    def mine(self, index: int) -> bool:
        return index % self.world == self.rank


def barrier(shard: Shard) -> None:
    """Wait for every shard (gloo on CPU, NCCL on GPUs) so that rank 0 merges complete results."""
    if shard.world == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    dist.barrier()
