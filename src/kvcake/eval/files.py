"""The files of a run folder: predictions (one JSON row per answer, appended), shards and their barrier.

A run appends each row to ``predictions.jsonl`` (``predictions.rank<r>.jsonl`` for shard ``r``) as soon as it is
answered, so that a killed run loses at most the line it was writing; reading takes the last row of each key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PREDICTIONS = "predictions"
RECORD = "run.json"


def row_key(task: str, sample_id: str, label: str, mode: str) -> str:
    """The identity of a row: one sample of one task under one setting in one mode."""
    return f"{task}|{sample_id}|{label}|{mode}"


def read_predictions(folder: Path) -> list[dict[str, Any]]:
    """Every row of every predictions file in ``folder`` (shards included); the last row of a key wins."""
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob(f"{PREDICTIONS}*.jsonl")):
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    # A run killed mid-write leaves a torn last line: that sample is simply redone.
                    continue
                rows[row["key"]] = row
    return list(rows.values())


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
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

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
