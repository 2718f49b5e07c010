"""Merge several ``kvcake bench`` results.json files (e.g. one per prompt length) into one set of tables and plots.

    python benchmarks/merge_results.py run-a/results.json run-b/results.json --out merged/

Rows are concatenated in the order given; the environment recorded in the first file (its hardware, versions and
arguments) is kept, with every file's arguments listed under ``merged_from``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvcake.bench import summarise_targets, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    loaded = [json.loads(path.read_text()) for path in args.files]
    rows = [row for data in loaded for row in data["rows"]]
    meta = {key: value for key, value in loaded[0]["meta"].items() if key not in ("notes", "run")}
    meta["merged_from"] = [{"file": path.name, "args": data["meta"].get("args")} for path, data in
                           zip(args.files, loaded, strict=False)]
    paths = write_results(rows, args.out, meta=meta)
    print("\n".join(summarise_targets(rows)))
    print("written: " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
