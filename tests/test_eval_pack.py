"""Packed predictions: ``predictions*.jsonl.gz`` read like the plain files, resumed on, merged and reported."""

import gzip
import json
import shutil

import pytest

from kvcake import models
from kvcake.eval import runner
from kvcake.eval.files import prediction_files, scan_predictions
from kvcake.eval.pack import main, pack, pack_file
from kvcake.eval.report import load_results
from kvcake.eval.sample import Sample
from kvcake.eval.summary import merge

STORY = " ".join(f"Line {i}: the ferry left the harbour with {i * 3} crates." for i in range(50))


def _row(key: str, score: float, **extra) -> dict:
    return {"key": key, "task": "t", "id": key, "mode": "query-aware", "label": "full", "method": "full",
            "budget": None, "ratio": None, "score": score, "error": None, "kv_bytes": 8, "kv_bytes_full": 8, **extra}


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_packing_keeps_every_line_and_the_last_row_of_a_key_wins(tmp_path):
    _write(tmp_path / "predictions.jsonl", [_row("a", 1.0), _row("b", 2.0), _row("a", 3.0)])
    before = scan_predictions(tmp_path).rows
    packed = pack_file(tmp_path / "predictions.jsonl")
    assert packed.name == "predictions.jsonl.gz" and not (tmp_path / "predictions.jsonl").exists()
    assert scan_predictions(tmp_path).rows == before == [_row("a", 3.0), _row("b", 2.0)]
    # Lines appended since (a resumed run writes a plain file) win over the packed ones, before and after packing
    # them in.
    _write(tmp_path / "predictions.jsonl", [_row("b", 5.0), _row("c", 6.0)])
    assert [p.name for p in prediction_files(tmp_path)] == ["predictions.jsonl.gz", "predictions.jsonl"]
    both = scan_predictions(tmp_path).rows
    assert {r["key"]: r["score"] for r in both} == {"a": 3.0, "b": 5.0, "c": 6.0}
    pack(tmp_path)
    assert [p.name for p in prediction_files(tmp_path)] == ["predictions.jsonl.gz"]
    assert scan_predictions(tmp_path).rows == both
    assert len(gzip.decompress((tmp_path / "predictions.jsonl.gz").read_bytes()).splitlines()) == 5


def test_packing_is_deterministic_and_shards_keep_their_names(tmp_path):
    rows = [_row(k, float(i)) for i, k in enumerate("xyz")]
    for folder in (tmp_path / "one", tmp_path / "two"):
        folder.mkdir()
        _write(folder / "predictions.rank0.jsonl", rows[:2])
        _write(folder / "predictions.rank1.jsonl", rows[2:])
    assert main([str(tmp_path / "one")]) == 0 and main([str(tmp_path / "two")]) == 0
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["predictions.rank0.jsonl.gz", "predictions.rank1.jsonl.gz"]
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert scan_predictions(tmp_path / "one").rows == rows
    # Merging a packed folder writes every row to one plain file and leaves no other predictions file.
    merged = merge(tmp_path / "one")
    assert [p.name for p in prediction_files(tmp_path / "one")] == ["predictions.jsonl"]
    assert sorted(r["key"] for r in merged) == ["x", "y", "z"]


def test_a_torn_line_in_a_packed_file_is_left_out_and_counted(tmp_path):
    (tmp_path / "predictions.jsonl").write_text(json.dumps(_row("a", 1.0)) + '\n{"torn": ')
    pack(tmp_path)
    found = scan_predictions(tmp_path)
    assert found.rows == [_row("a", 1.0)] and found.ignored == {"predictions.jsonl.gz": 1}


def test_the_report_reads_packed_folders_like_plain_ones(tmp_path):
    plain = tmp_path / "plain" / "model"
    plain.mkdir(parents=True)
    _write(plain / "predictions.jsonl", [_row("a", 1.0), _row("b", 0.0)])
    shutil.copytree(tmp_path / "plain", tmp_path / "packed")
    pack(tmp_path / "packed")
    assert not list((tmp_path / "packed").rglob("*.jsonl"))
    assert load_results([tmp_path / "packed"]) == load_results([tmp_path / "plain"])


@pytest.fixture(scope="module")
def chat(chat_model_dir):
    return models.load(str(chat_model_dir))


def _sample(i: int) -> Sample:
    return Sample(task="ruler/niah_single", id=f"s{i}", prefix="Read the text.\n\n", context=STORY,
                  question=f"\n\nHow many crates on line {i}?", answers=[str(i * 3)], metric="string_match_all",
                  max_new_tokens=4, meta={"length": 600, "depth": 0.5})


def _run(chat, out, samples, settings):
    model, tokenizer = chat
    return runner.EvalRun(model, tokenizer, samples, settings, ["query-aware"], out,
                          models.eos_token_ids(model, tokenizer),
                          record={"model": "tiny", "seed": 0, "suite": {}, "started": "now"}, progress=False).run()


def test_a_run_resumes_on_a_packed_folder(chat, tmp_path):
    settings = runner.grid(["full", "cake"], ratios=[0.5])
    samples = [_sample(0), _sample(1)]
    first = _run(chat, tmp_path, samples, settings)
    assert len(first) == 4
    pack(tmp_path)
    # Nothing is redone on a packed folder: the rows and the metrics are the same.
    metrics = (tmp_path / "metrics.json").read_text()
    again = _run(chat, tmp_path, samples, settings)
    assert sorted(again, key=lambda r: r["key"]) == sorted(first, key=lambda r: r["key"])
    assert (tmp_path / "metrics.json").read_text() == metrics
    assert not (tmp_path / "predictions.jsonl").is_file() or not (tmp_path / "predictions.jsonl").read_text()
    # A row lost from the packed file is redone alone, into a plain file beside it.
    packed = tmp_path / "predictions.jsonl.gz"
    lines = gzip.decompress(packed.read_bytes()).decode().splitlines()
    lost = json.loads(lines[-1])["key"]
    packed.write_bytes(gzip.compress(("\n".join(lines[:-1]) + "\n").encode()))
    rows = _run(chat, tmp_path, samples, settings)
    assert len(rows) == 4 and lost in {r["key"] for r in rows}
    redone = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["key"] for r in redone] == [lost]
