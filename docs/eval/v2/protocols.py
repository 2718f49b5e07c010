"""The protocol table of docs/eval/v2/README.md: each method under the whole-prompt protocol and the tail protocol
(the chat template's tail kept uncompressed), paired on the same single-needle samples.

    python docs/eval/v2/protocols.py
"""

from pathlib import Path

from kvcake.eval.files import read_predictions
from kvcake.eval.stats import compare

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    rows = []
    for folder in sorted(RESULTS.glob("smollm2*/smollm2-135m-instruct")):
        rows += read_predictions(folder)
    scores: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r["task"] == "needlebench/single" and r.get("error") is None:
            scores.setdefault((r["label"], r.get("protocol", "whole")), {})[r["id"]] = r["score"]
    print("| method | whole | tail | pairs | tail vs whole: w/t/l | difference [95%] |")
    print("|---|---:|---:|---:|---|---|")
    for label in sorted({label for label, _ in scores}):
        whole, tail = scores.get((label, "whole"), {}), scores.get((label, "tail"), {})
        ids = sorted(set(whole) & set(tail))
        if not ids:
            continue
        c = compare([("single", [tail[i] for i in ids], [whole[i] for i in ids])])
        mean_whole = sum(whole[i] for i in ids) / len(ids)
        mean_tail = sum(tail[i] for i in ids) / len(ids)
        print(f"| {label} | {mean_whole:.1f} | {mean_tail:.1f} | {len(ids)} | {c.wins}/{c.ties}/{c.losses} | "
              f"{c.difference:+.1f} [{c.low:+.1f}, {c.high:+.1f}] |")


if __name__ == "__main__":
    main()
