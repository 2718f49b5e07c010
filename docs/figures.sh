#!/usr/bin/env bash
# Every figure under docs/ again, from the committed rows alone (no model is run): the evaluation reports
# (report.md, metrics, comparisons and plots) from the packed predictions under docs/eval, and the benchmark plots
# from each docs/bench/**/results.json.
#
#     bash docs/figures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash docs/eval/run.sh report
bash docs/eval/v2/run.sh report
python - <<'PY'
import json
from pathlib import Path

from kvcake.bench.plots import plot

for results in sorted(Path("docs/bench").rglob("results.json")):
    for path in plot(json.loads(results.read_text())["rows"], results.parent):
        print(path)
PY
