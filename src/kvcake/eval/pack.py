"""Compress the predictions of finished runs: every ``predictions*.jsonl`` below some folders becomes
``predictions*.jsonl.gz`` (the lines unchanged, gzip at level 9 with no name or time in the header, so packing the
same lines twice gives the same bytes).

The readers (:func:`kvcake.eval.files.scan_predictions`, ``kvcake report``) take compressed and plain files alike,
and a run resumed on a packed folder appends to a fresh plain file; packing again folds those lines in after the
packed ones, so the last row of a key still wins. Pack a folder only when no run is writing into it (a run
appending to a file that packing removes would lose its rows)::

    python -m kvcake.eval.pack docs/eval/results docs/eval/v2/results
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

from kvcake.eval.files import PREDICTIONS


def pack_file(plain: Path) -> Path:
    """Fold ``plain`` (a predictions file) into ``plain.gz`` after the lines already there, and remove it."""
    packed = plain.with_name(plain.name + ".gz")
    data = gzip.decompress(packed.read_bytes()) if packed.is_file() else b""
    if data and not data.endswith(b"\n"):
        data += b"\n"
    data += plain.read_bytes()
    tmp = packed.with_name(f".{packed.name}.tmp")
    with tmp.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as gz:
        gz.write(data)
    tmp.replace(packed)
    plain.unlink()
    return packed


def pack(folder: Path) -> list[Path]:
    """Pack every plain predictions file below ``folder``; returns the compressed files written."""
    return [pack_file(path) for path in sorted(Path(folder).rglob(f"{PREDICTIONS}*.jsonl"))]


def main(argv: list[str] | None = None) -> int:
    folders = sys.argv[1:] if argv is None else argv
    if not folders:
        print("usage: python -m kvcake.eval.pack FOLDER...", file=sys.stderr)
        return 2
    for folder in folders:
        for path in pack(Path(folder)):
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
