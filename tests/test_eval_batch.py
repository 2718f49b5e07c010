"""Batched answering (``kvcake eval --batch-size``) writes the rows the unbatched runner writes; the ``tail`` protocol
differs from ``whole`` only through the chat template's tail; resuming knows both."""

import json

import pytest
import torch

import kvcake
from conftest import prompt, tiny_llama
from kvcake import models
from kvcake.engines.transformers.replay import record_prefill, replay
from kvcake.eval import batching, runner
from kvcake.eval.batching import answer_batch
from kvcake.eval.files import Shard
from kvcake.eval.report import report
from kvcake.eval.sample import EvalDataError, Sample
from kvcake.methods import registry
from kvcake.pipeline import chat_tail_length

STORY = " ".join(f"Line {i}: the lighthouse keeper counted {i * 7} gulls before noon." for i in range(60))
#: Context lengths (characters) of the samples: three different prompt lengths, the longest first and last.
SIZES = [1500, 1200, 900, 1500]
TIMING = {"seconds"}


def sample(i: int, size: int, question: str | None = None, answer_tokens: int = 24) -> Sample:
    return Sample(task="ruler/niah_single", id=f"s{i}", prefix="Read the text.\n\n", context=STORY[:size],
                  question=question or f"\n\nHow many gulls on line {i}?", answers=[str(i * 7)],
                  metric="string_match_all", max_new_tokens=answer_tokens, meta={"size": size})


@pytest.fixture(scope="module")
def chat(chat_model_dir):
    return models.load(str(chat_model_dir))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's operations are too small to share: one thread, and no waiting on a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stops(model, tokenizer) -> list[int]:
    """The model's end tokens and every 9th token id: the random model then stops after a few to a few tens of
    tokens, at a different step in every row and setting."""
    return models.eos_token_ids(model, tokenizer) + list(range(3, len(tokenizer), 9))


def _run(chat, out, samples, settings, modes=("query-aware",), eos=None, **kw):
    model, tokenizer = chat
    rows = runner.EvalRun(model, tokenizer, samples, settings, list(modes), out,
                          _stops(model, tokenizer) if eos is None else eos,
                          record={"model": "tiny", "seed": 0, "suite": {}, "started": "now"}, progress=False,
                          **kw).run()
    return {r["key"]: r for r in rows}


@pytest.fixture
def batched_answers(monkeypatch):
    """The (method name, rows) of every batched answer given while the test runs."""
    given = []
    answer = batching._answer

    def counted(model, tokenizer, batch, i, *args):
        given.append((batch.methods[i].parameters()["name"] if batch.methods[i] else "full", len(batch.samples)))
        return answer(model, tokenizer, batch, i, *args)

    monkeypatch.setattr(batching, "_answer", counted)
    return given


def _same_rows(alone: dict, batched: dict) -> None:
    """Every field of every row equal, timing aside, and CAKE's preferences (floats) to within float32 rounding:
    in a batch, attention sums its terms over a longer, partly masked key axis, in another order, and the last
    bits of a float may differ (docs/evaluation.md, "Batches"); every discrete figure must be the same."""
    assert alone.keys() == batched.keys()
    for key, row in alone.items():
        other = batched[key]
        for field in row.keys() - TIMING:
            if field == "layer_preferences" and row[field] is not None:
                assert other[field] == pytest.approx(row[field], rel=1e-5, abs=0), (key, field)
            else:
                assert other[field] == row[field], (key, field)


METHODS = ["full", "cake", "snapkv", "h2o", "tova", "streamingllm", "ada-snapkv", "cake-authors-decoding"]


def test_batched_rows_equal_unbatched_rows_query_aware(chat, tmp_path, batched_answers):
    """Decode-evicting (CAKE, H2O, TOVA, StreamingLLM) and prefill-only methods, a budget below the prompts and one
    covering them, per-row stops: batches of 3 and 1 over 4 samples of different lengths write the same rows."""
    samples = [sample(i, n) for i, n in enumerate(SIZES)]
    settings = runner.grid(METHODS, budgets=[48, 4096])
    alone = _run(chat, tmp_path / "alone", samples, settings)
    assert not batched_answers
    batched = _run(chat, tmp_path / "batched", samples, settings, batch_size=3)
    # One batch of 3 answered every setting but StreamingLLM's covering one (its recent window of 2048 tokens
    # reaches past the rows' starts: answered one sample at a time); the 4th sample ran alone.
    assert len(batched_answers) == len(settings) - 1 and {n for _, n in batched_answers} == {3}
    _same_rows(alone, batched)
    lengths = {r["generated_tokens"] for r in alone.values()}
    assert min(lengths) < 12 and max(lengths) == 24  # rows stopped early and at the answer length
    assert len({r["compressed_tokens"] for r in alone.values()}) == 3
    assert json.loads((tmp_path / "batched" / "run.json").read_text())["runs"][-1]["batch_size"] == 3


def test_batched_rows_equal_unbatched_rows_query_agnostic(chat, tmp_path, batched_answers):
    samples = [sample(i, n) for i, n in enumerate(SIZES)]
    settings = runner.grid(["full", "cake", "snapkv", "h2o", "streamingllm"], budgets=[48, 4096])
    alone = _run(chat, tmp_path / "alone", samples, settings, modes=["query-agnostic"])
    batched = _run(chat, tmp_path / "batched", samples, settings, modes=["query-agnostic"], batch_size=4)
    assert len(batched_answers) == len(settings) - 1 and {n for _, n in batched_answers} == {4}
    _same_rows(alone, batched)


def test_batches_share_task_mode_protocol_settings_and_question_length(chat, tmp_path):
    model, tokenizer = chat
    samples = [sample(0, 1500), sample(1, 1200, question="\n\nHow many?"), sample(2, 900), sample(3, 1400)]
    settings = runner.grid(["full", "cake"], budgets=[64])
    run = runner.EvalRun(model, tokenizer, samples, settings, ["query-aware", "query-agnostic"], tmp_path, [],
                         protocols=["whole", "tail"], batch_size=2, progress=False)
    done = {runner.row_key("ruler/niah_single", "s3", "full", "query-aware")}
    batches = [([s.id for s in members], mode, protocol, [s.label for s in todo])
               for members, mode, protocol, todo in run.batches(run.pending(done))]
    assert (["s0", "s1"], "query-aware", "whole", ["full", "cake@b64"]) in batches
    assert (["s2"], "query-aware", "whole", ["full", "cake@b64"]) in batches
    assert (["s3"], "query-aware", "whole", ["cake@b64"]) in batches  # its full row is done: other settings
    assert (["s2", "s3"], "query-aware", "tail", ["full", "cake@b64"]) in batches
    # Query-agnostic: the question is fed in one chunk, so only questions of one token length share a batch.
    assert (["s0", "s2"], "query-agnostic", "whole", ["full", "cake@b64"]) in batches
    assert (["s1"], "query-agnostic", "whole", ["full", "cake@b64"]) in batches
    assert sum(len(m) * len(t) for m, _, _, t in batches) == 4 * 2 * 2 * 2 - 1
    run.shard = Shard(rank=1, world=2)  # a shard batches its own samples only
    assert {s.id for members, *_ in run.batches(run.pending(set())) for s in members} == {"s1", "s3"}


def test_batched_resume_answers_only_what_is_missing(chat, tmp_path):
    samples = [sample(i, n, answer_tokens=8) for i, n in enumerate(SIZES)]
    first = runner.grid(["full", "snapkv"], budgets=[64])
    both = runner.grid(["full", "snapkv", "cake"], budgets=[64])
    _run(chat, tmp_path / "b", samples[:3], first, batch_size=4)
    lines = (tmp_path / "b" / "predictions.jsonl").read_text().splitlines()
    (tmp_path / "b" / "predictions.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # torn line
    with pytest.warns(runner.EvalDataWarning):
        batched = _run(chat, tmp_path / "b", samples, both, batch_size=4)
    alone = _run(chat, tmp_path / "a", samples, both)
    _same_rows(alone, batched)
    written = [json.loads(line)["key"] for line in (tmp_path / "b" / "predictions.jsonl").read_text().splitlines()
               if line.startswith("{") and line.endswith("}")]
    assert len(written) == len(set(written)) == 4 * 3  # nothing answered twice


def test_a_failing_sample_in_a_batch_fails_alone(chat, tmp_path):
    model, tokenizer = chat
    samples = [sample(0, 1500, answer_tokens=4), sample(1, 1200, answer_tokens=4), sample(2, 900, answer_tokens=4)]
    samples[1].prefix = "word " * 800  # longer than --max-length without its context
    settings = runner.grid(["full", "cake"], budgets=[64])
    results = list(answer_batch(model, tokenizer, samples, settings, "query-aware", [], max_length=400))
    failed = {(s.id, setting.label) for s, setting, r in results if isinstance(r, Exception)}
    assert failed == {("s1", "full"), ("s1", "cake@b64")}
    assert len(results) == 6


def test_eval_greedy_beyond_the_default_horizon_equals_generate():
    """The harness's loop sizes a compressed cache's decoding buffers for the whole answer, as ``generate`` does:
    past 32 tokens (the default horizon) a prefill-only method still generates what ``generate`` does."""
    model = tiny_llama("sdpa")
    ids = prompt(80)
    for name in ("snapkv", "cake"):
        method = registry.build(name, budget=40)
        record, _ = record_prefill(model, ids, method)
        tokens = runner.greedy(model, replay(model, record, method), record.logits, 80, method, 60, eos=[])
        with kvcake.compress(model, registry.build(name, budget=40)):
            expected = model.generate(ids, max_new_tokens=60, min_new_tokens=60, do_sample=False)[0, 80:].tolist()
        assert tokens == expected, name


# -- protocols -------------------------------------------------------------------------------------------------------
def test_tail_protocol_differs_from_whole_only_through_the_tail(chat, tmp_path):
    model, tokenizer = chat
    tail = chat_tail_length(tokenizer)
    assert tail > 0
    samples = [sample(0, 1500, answer_tokens=8), sample(1, 1800, answer_tokens=8)]
    settings = runner.grid(["full", "cake", "snapkv"], budgets=[48, 4096])
    rows = _run(chat, tmp_path, samples, settings, modes=["query-aware", "query-agnostic"],
                protocols=["whole", "tail"], batch_size=2)
    assert len(rows) == 2 * len(settings) * 2 * 2
    by = {(r["id"], r["label"], r["mode"], r["protocol"]): r for r in rows.values()}
    for r in (r for r in rows.values() if r["protocol"] == "tail"):
        whole = by[(r["id"], r["label"], r["mode"], "whole")]
        assert r["key"] == whole["key"] + "|tail"
        fields = r.keys() - TIMING - {"key", "protocol"}
        covering = r["label"] in ("full", "cake@b4096", "snapkv@b4096")
        if r["mode"] == "query-agnostic":
            # The context is compressed alone; the template's tail comes with the question afterwards.
            assert {f: r[f] for f in fields} == {f: whole[f] for f in fields}
        elif covering:
            # A covering budget keeps everything under either protocol (CAKE's preferences are computed on the
            # prompt without its tail, so they differ).
            fields -= {"layer_preferences"}
            assert {f: r[f] for f in fields} == {f: whole[f] for f in fields}
            assert r["prediction"] == by[(r["id"], "full", r["mode"], "tail")]["prediction"]
        else:  # the budget is spent on the prompt without its tail, and the tail is kept on top in every layer
            layers = len(r["layer_kept"])
            assert sum(r["layer_kept"]) == sum(whole["layer_kept"]) + tail * layers
            assert r["kv_bytes"] * sum(whole["layer_kept"]) == whole["kv_bytes"] * sum(r["layer_kept"])
    # Under the tail protocol a small budget holds the tail in every layer: compressing a prompt whose tail is
    # protected keeps its last `tail` positions.
    ids = runner.encode(tokenizer, samples[0])
    full_ids = torch.cat([ids.context_ids, ids.question_ids], dim=1)
    method = registry.build("snapkv", budget=16, window=4)
    _, cache = record_prefill(model, full_ids, method, tail=tail)
    for layer in cache.layers_in_order():
        kept = layer.position_table()[0, 0].tolist()
        assert kept[-tail:] == list(range(full_ids.shape[1] - tail, full_ids.shape[1]))


def test_resume_knows_the_protocol(chat, tmp_path):
    samples = [sample(0, 1800, answer_tokens=4)]
    settings = runner.grid(["full", "cake"], budgets=[64])
    _run(chat, tmp_path, samples, settings)
    path = tmp_path / "predictions.jsonl"
    # A folder written before protocols existed: rows without the field, a record without protocols.
    old = [{k: v for k, v in json.loads(line).items() if k != "protocol"} for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in old))
    record = json.loads((tmp_path / "run.json").read_text())
    for key in ("protocols", "chat_tail"):
        record.pop(key)
    for run in record["runs"]:
        run.pop("protocols")
    (tmp_path / "run.json").write_text(json.dumps(record))
    rows = _run(chat, tmp_path, samples, settings, protocols=["whole", "tail"])
    assert len(path.read_text().splitlines()) == 4  # the old rows are the whole protocol's: only tail rows added
    assert {r.get("protocol", "whole") for r in rows.values()} == {"whole", "tail"}
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["protocols"] == ["whole", "tail"] and record["runs"][-1]["protocols"] == ["whole", "tail"]
    # Tail rows made with another chat template's tail are refused.
    record["chat_tail"] += 1
    (tmp_path / "run.json").write_text(json.dumps(record))
    with pytest.raises(EvalDataError, match="chat_tail"):
        _run(chat, tmp_path, samples, settings, protocols=["tail"])


def test_report_splits_tables_by_protocol(chat, tmp_path):
    samples = [sample(0, 1800, answer_tokens=4), sample(1, 1200, answer_tokens=4)]
    settings = runner.grid(["full", "cake", "snapkv"], budgets=[64])
    _run(chat, tmp_path / "run", samples, settings, protocols=["whole", "tail"], batch_size=2)
    text = report([tmp_path / "run"], tmp_path / "report", plots=False).read_text()
    assert "## tiny — query-aware\n" in text and "## tiny — query-aware, tail protocol" in text
    table = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert {(t["protocol"], t["task"]) for t in table if t["label"] == "cake@b64"} == {
        ("whole", "ruler/niah_single"), ("whole", "average"), ("tail", "ruler/niah_single"), ("tail", "average")}
    compared = json.loads((tmp_path / "report" / "comparison.json").read_text())
    assert {(c["protocol"], c["pairs"]) for c in compared if c["task"] == "average"} == {("whole", 2), ("tail", 2)}
