"""The throughput bench's counters, on a tiny random model: requests and tokens counted, memory read from the
cache the engine holds, batches sized from the pool, refusals instead of crashes; and its pure parts (settings,
summary, results files, the workers' job and engine arguments)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

import kvcake
from conftest import tiny_llama
from kvcake.bench.throughput import external, hf, writers
from kvcake.bench.throughput.memory import BLOCK_TOKENS, bytes_per_token, pool_bytes
from kvcake.bench.throughput.record import Clock, RequestRecord, percentile, summarise
from kvcake.bench.throughput.settings import Setting, parse_settings
from kvcake.bench.throughput.vllm_worker import engine_arguments
from kvcake.bench.throughput.workload import Request, Workload, arrival_times
from kvcake.engines.transformers.compat import cache_keyword
from kvcake.engines.transformers.storage import cache_kv_bytes


class _Tokenizer:
    """What the transformers rows use of a tokenizer: a pad id and decode (token ids as text)."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def _requests(n: int, length: int, seed: int = 1) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    return [Request(index=i, ids=torch.randint(3, 128, (length,), generator=g).tolist(), answer="no such text",
                    arrival_s=0.0) for i in range(n)]


# -- settings and workload -----------------------------------------------------------------------------------------
def test_settings_parse_and_refuse_nonsense():
    got = parse_settings("transformers:full, vllm:cake@0.1,kvpress:snapkv@0.2,vllm:window@0.1,vllm:full")
    assert [s.label for s in got] == ["transformers:full", "vllm:cake@0.1", "kvpress:snapkv@0.2", "vllm:window@0.1",
                                      "vllm:full"]
    assert got[1].uses_kvcake and not got[2].uses_kvcake and not got[3].uses_kvcake
    for bad in ("transformers", "gpu:full", "transformers:cake", "transformers:full@0.1", "kvpress:full",
                "transformers:window@0.1", "kvpress:cake@0.1", "transformers:nosuch@0.1", "vllm:cake@1.5",
                "vllm:cake@x"):
        with pytest.raises(ValueError):
            parse_settings(bad)


def test_workload_validation_and_arrivals():
    with pytest.raises(ValueError):
        Workload(requests=0)
    with pytest.raises(ValueError):
        Workload(arrival="poisson")
    assert arrival_times(Workload(requests=4)) == [0.0] * 4
    times = arrival_times(Workload(requests=50, arrival="poisson", rate=2.0))
    assert times[0] == 0.0 and all(b > a for a, b in zip(times, times[1:], strict=False))
    assert 10 < times[-1] < 50  # 49 gaps of mean 0.5 s


def test_pool_is_whole_blocks_of_full_requests():
    model = tiny_llama(layers=3)
    per_token = bytes_per_token(model.config, 4)
    cache = DynamicCache(config=model.config)
    model(torch.randint(3, 128, (1, 10)), use_cache=True, **{cache_keyword(model): cache})
    assert per_token * 10 == cache_kv_bytes(cache)  # the formula is what a plain cache holds
    assert pool_bytes(2, BLOCK_TOKENS + 1, per_token) == 2 * 2 * BLOCK_TOKENS * per_token
    with pytest.raises(ValueError):
        pool_bytes(0, 10, per_token)


# -- transformers rows: the counters --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["full", "cake"])
def test_transformers_rows_count_requests_tokens_and_memory(method):
    model = tiny_llama(layers=3)
    per_token = bytes_per_token(model.config, 4)
    length, answer, n = 300, 6, 5
    requests = _requests(n, length)
    pool = 2 * (length + answer) * per_token  # two full-cache requests, exactly
    setting = Setting("transformers", method, None if method == "full" else 0.25)
    records, clock, info = hf.serve(model, _Tokenizer(), setting, requests, answer, pool, per_token)
    summary = summarise(records, clock, pool)
    assert summary["served"] == n and summary["refused"] == 0
    assert all(r.output_tokens == answer for r in records)
    assert summary["output_tokens"] == n * answer
    assert clock.decode_tokens == n * (answer - 1)  # the first token of each request comes from its prefill
    batch = info["batch"]
    assert clock.max_running == batch
    assert clock.steps == -(-n // batch) * answer  # one prefill and answer-1 steps per batch
    if method == "full":
        assert batch == 2
        # the plain cache holds the prompt and every fed answer token: read from the tensors, it matches
        assert clock.kv_samples[-1] == (n - 2 * (n // 2)) * (length + answer - 1) * per_token
        assert clock.kv_peak_bytes == 2 * (length + answer - 1) * per_token <= pool
    else:
        assert batch > 2  # a compressed request holds less: more of them fit the same pool
        assert clock.kv_peak_bytes <= pool
        assert clock.kv_peak_bytes >= max(clock.kv_samples)
    assert summary["within_pool"]
    assert summary["prefill_s"] > 0 and summary["decode_s"] > 0
    assert all(r.first_token_s is not None and r.finish_s >= r.first_token_s for r in records)


def test_transformers_rows_plan_from_what_one_request_held_for_its_whole_answer():
    """A method that evicts while decoding holds its budget whatever the answer's length; a prefill-only one grows
    by a token a step: the planned bytes per request follow what the engine held, not a rule."""
    model = tiny_llama(layers=3)
    per_token = bytes_per_token(model.config, 4)
    requests = _requests(2, 200)
    pool = 100 * 200 * per_token

    def planned(method, answer):
        _, per_request, info = hf.plan_batch(model, Setting("transformers", method, 0.25), kvcake.build(
            method, ratio=0.25, window=8), requests, answer, pool, per_token, 0)
        assert per_request >= info["probe_peak_bytes"] >= info["probe_end_bytes"]
        return info["probe_peak_bytes"]

    assert planned("cake", 200) == planned("cake", 8)
    assert planned("snapkv", 200) >= planned("snapkv", 8) + 100 * per_token  # 50 kept + 200 answer > the prefill peak


def test_a_batch_of_cake_rows_is_planned_within_the_pool():
    """CAKE splits each request's budget by its own preference, and a batch's layers are as wide as their widest row:
    a batch holds more than its rows alone. The planner checks the first batch's prefill and shrinks the batch until
    it fits (the run of record had held 19% over its pool when planned from one request alone)."""
    model = tiny_llama(layers=6, seed=3)
    per_token = bytes_per_token(model.config, 4)
    g = torch.Generator().manual_seed(5)
    requests = [Request(index=i, ids=(torch.randint(3, 128, (40,), generator=g).repeat(30)[:1000] if i % 2 else
                                      torch.randint(3, 128, (1000,), generator=g)).tolist(),
                        answer="no such text", arrival_s=0.0) for i in range(8)]  # rows of different preferences
    probe = hf.BatchRun(model, kvcake.build("cake", ratio=0.1), 0)  # the method serve builds for this setting
    pool = 6 * probe.run([requests[0].ids], 4, None, 0.0)[2]  # six times what one request held alone
    records, clock, info = hf.serve(model, _Tokenizer(), Setting("transformers", "cake", 0.1), requests, 4, pool,
                                    per_token)
    assert clock.kv_peak_bytes <= pool and all(r.output_tokens == 4 for r in records)
    checks = info["batch_checks"]
    assert checks[0]["batch"] == 6 and checks[0]["needed_bytes"] > pool  # six held more than six times one
    assert 1 <= info["batch"] < 6 and checks[-1]["needed_bytes"] <= pool


def test_transformers_rows_decode_as_each_request_alone():
    model = tiny_llama(layers=2)
    per_token = bytes_per_token(model.config, 4)
    requests = _requests(3, 24, seed=5)
    pool = 3 * (24 + 5) * per_token
    records, _, info = hf.serve(model, _Tokenizer(), Setting("transformers", "full"), requests, 5, pool, per_token)
    assert info["batch"] == 3
    runner = hf.BatchRun(model, None, 0)
    for r in requests:
        alone, *_ = runner.run([r.ids], 5, None, 0.0)
        out = model.generate(torch.tensor([r.ids]), max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert alone[0] == out[0, 24:].tolist()


def test_a_request_that_cannot_fit_is_refused_with_a_message():
    model = tiny_llama(layers=2)
    per_token = bytes_per_token(model.config, 4)
    requests = _requests(2, 30)
    records, clock, info = hf.serve(model, _Tokenizer(), Setting("transformers", "full"), requests, 4,
                                    10 * per_token, per_token)
    assert info["batch"] == 0 and clock.steps == 0
    assert all(r.refused and "refused before running" in r.refused for r in records)
    assert summarise(records, clock, 10 * per_token)["served"] == 0


# -- summary, results, workers' plumbing ---------------------------------------------------------------------------
def test_summary_figures():
    records = [RequestRecord(index=i, prompt_tokens=10, arrival_s=0.0, output_tokens=5, first_token_s=1.0 + i,
                             finish_s=3.0 + i, found=i % 2 == 0) for i in range(3)]
    records.append(RequestRecord(index=3, prompt_tokens=10, arrival_s=0.0, refused="too long"))
    clock = Clock(prefill_s=2.0, decode_s=4.0, decode_tokens=12, wall_s=8.0, max_running=2, kv_peak_bytes=100,
                  kv_samples=[50, 100])
    s = summarise(records, clock, pool_bytes=80)
    assert (s["served"], s["refused"], s["output_tokens"]) == (3, 1, 15)
    assert s["requests_per_s"] == 3 / 8 and s["output_tokens_per_s"] == 15 / 8 and s["decode_tokens_per_s"] == 3
    assert s["prefill_share"] == 0.25 and s["ttft_p50_s"] == 2.0 and s["tpot_p50_s"] == 0.5
    assert s["kv_steady_bytes"] == 75 and not s["within_pool"] and (s["found"], s["found_of"]) == (2, 3)
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)


def _case(engine, method, ratio, decode, running):
    summary = summarise([], Clock(decode_s=1.0, decode_tokens=decode, wall_s=2.0, max_running=running), 10)
    return {"setting": Setting(engine, method, ratio).to_dict(), "pool_full_requests": 2.0, "prompt_length": 100,
            "summary": summary, "error": None, "requests": []}


def test_results_files_and_ratios(tmp_path):
    cases = [_case("vllm", "full", None, 10, 2), _case("vllm", "cake", 0.1, 30, 12),
             _case("transformers", "snapkv", 0.1, 20, 4), _case("kvpress", "snapkv", 0.1, 5, 1)]
    ratios = {r["comparison"]: r for r in writers.comparisons(cases)}
    assert ratios["vllm:cake@0.1 / vllm:full"]["decode_tokens_per_s"] == 3.0
    assert ratios["vllm:cake@0.1 / vllm:full"]["max_running"] == 6.0
    assert ratios["transformers:snapkv@0.1 / kvpress:snapkv@0.1"]["decode_tokens_per_s"] == 4.0
    assert ratios["vllm:cake@0.1 / vllm:full"]["found"] is None  # no request records: nothing to pair
    cases[1]["git_commit"], cases[2]["git_commit"] = "abcdef0123", "1234567890"  # cases[2] resumed from this run
    paths = writers.write_all(cases, {"plan": {"model": "tiny"}, "git_commit": "1234567890"}, tmp_path)
    assert json.loads(paths["json"].read_text())["cases"][1]["setting"]["label"] == "vllm:cake@0.1"
    assert len(paths["csv"].read_text().splitlines()) == 5
    assert "3.00×" in paths["md"].read_text()
    assert "Rows run at another commit: vllm:cake@0.1 at abcdef0." in paths["md"].read_text()


def test_needles_found_are_paired_on_the_same_requests():
    base = _case("transformers", "full", None, 1, 1)
    mine = _case("transformers", "cake", 0.1, 1, 1)
    base["requests"] = [{"index": i, "found": True} for i in range(10)]
    mine["requests"] = [{"index": i, "found": i != 3} for i in range(10)] + [{"index": 10, "found": False}]
    f = writers.found_difference(mine, base)
    assert f["pairs"] == 10 and f["difference"] == pytest.approx(-0.1) and f["low"] <= -0.1 <= f["high"] <= 0


def test_worker_job_and_engine_arguments():
    model = tiny_llama(layers=3)
    requests = [Request(index=0, ids=[5] * 100, answer="1"), Request(index=1, ids=[5] * 300, answer="2")]
    job = external.job_for(Setting("vllm", "window", 0.1), requests, "/m", 8, 1000, model.config)
    assert job["window_tokens"] == 20 and job["max_model_len"] == 300 + 8 + 16 and job["layers"] == 3
    args = engine_arguments(job)
    assert args["hf_overrides"]["layer_types"] == ["sliding_attention"] * 3
    assert args["kv_cache_memory_bytes"] == 1000 and "additional_config" not in args
    job["setting"] = Setting("vllm", "cake", 0.1).to_dict()
    args = engine_arguments(job)
    assert args["additional_config"] == {"kvcake": {"method": "cake", "ratio": 0.1}} and "hf_overrides" not in args
    if "scheduler_cls" in args:  # kvcake's vLLM engine is importable: its classes come with the config
        assert args["worker_cls"].startswith("kvcake.") and not args["enable_chunked_prefill"]
    job["setting"] = Setting("vllm", "full").to_dict()
    assert {"additional_config", "hf_overrides"}.isdisjoint(engine_arguments(job))
    result = {"requests": [dict(index=0, prompt_tokens=100, arrival_s=0.0, output_tokens=8, first_token_s=1.0,
                                finish_s=2.0, text="it is 1"),
                           dict(index=1, prompt_tokens=300, arrival_s=0.0, refused="no room")],
              "clock": Clock(wall_s=2.0).to_dict()}
    records, clock = external.to_records(result, requests)
    assert records[0].found is True and records[1].found is None and clock.wall_s == 2.0


def test_gpu_script_runs_at_a_tiny_shape_on_the_cpu(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput_gpu.py"
    spec = importlib.util.spec_from_file_location("throughput_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--dry-run", "--out", str(tmp_path), "--requests", "4", "--output", "4"])
    full, cake = (c["summary"] for c in result["cases"][:2])
    assert full["served"] == cake["served"] == 4 and full["output_tokens"] == 16
    assert cake["max_running"] > full["max_running"] == 2  # a pool of two full requests
    assert (tmp_path / "results.json").is_file()


def test_deadline_stops_new_batches():
    model = tiny_llama(layers=2)
    per_token = bytes_per_token(model.config, 4)
    requests = _requests(4, 20)
    records, _, info = hf.serve(model, None, Setting("transformers", "full"), requests, 3, 2 * 23 * per_token,
                                per_token, deadline=0.0)
    assert info["cut_at_deadline"] == 4 and all("deadline" in r.refused for r in records)


def test_run_writes_results_resumes_and_refuses_a_missing_environment(chat_model_dir, tmp_path, monkeypatch):
    from kvcake.bench.throughput.run import Plan, run

    plan = Plan(workload=Workload(requests=2, prompt_tokens=64, output_tokens=3),
                settings=parse_settings("transformers:full,vllm:full"), model=str(chat_model_dir),
                python={"vllm": str(tmp_path / "no-such-python")})
    cases = run(plan, tmp_path / "out", progress=False, log=lambda line: None)
    full, missing = cases
    assert full["summary"]["served"] == 2 and full["summary"]["output_tokens"] == 6
    assert full["summary"]["found_of"] == 2  # the needle was looked for in each answer
    assert missing["summary"]["served"] == 0 and "no python at" in missing["error"]
    for name in ("results.json", "results.csv", "results.md", "throughput_vs_budget.png",
                 "concurrency_vs_prompt.png", "headline.png"):
        assert (tmp_path / "out" / name).is_file()
    assert "no python at" in (tmp_path / "out" / "results.md").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a saved case was run again")

    monkeypatch.setattr(hf, "serve", refuse)
    again = run(plan, tmp_path / "out", progress=False, log=lambda line: None)
    assert again[0]["summary"] == full["summary"]  # resumed from its file; the failed case was tried again
    assert "no python at" in again[1]["error"]


def test_cli_refuses_bad_settings_with_a_message():
    from typer.testing import CliRunner

    from kvcake.cli import app

    result = CliRunner().invoke(app, ["throughput", "--settings", "transformers:cake"])
    assert result.exit_code != 0 and "ratio" in result.output


def test_vllm_block_bytes_count_an_aliased_pool_once():
    from types import SimpleNamespace

    from kvcake.bench.throughput.vllm_worker import block_bytes

    page = 2 * 128 * 3 * 64 * 4  # one layer's keys and values for 128 tokens
    one_group = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=SimpleNamespace(
        page_size_bytes=page), layer_names=[f"l{i}" for i in range(30)])])
    per_layer = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=SimpleNamespace(
        page_size_bytes=page), layer_names=[f"l{i}"]) for i in range(30)])
    assert block_bytes(one_group) == 30 * page and block_bytes(per_layer) == page
    # the same pool: 13 thirty-layer blocks or 390 one-layer blocks
    assert 13 * block_bytes(one_group) == 390 * block_bytes(per_layer)
