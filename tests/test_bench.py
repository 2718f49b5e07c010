"""The speed/memory benchmark: structure and invariants of its rows and outputs (never timings' values)."""

import copy
import csv
import json

import pytest
import torch

from kvcake import bench

LENGTHS = [64, 128]
BUDGET = 32
DECODE = 3


@pytest.fixture(scope="module")
def rows():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads only add synchronisation, and the CPU may be shared
    try:
        model = bench.random_model("tiny")
        yield bench.run_bench(model, LENGTHS, ["full", "cake", "snapkv"], budget=BUDGET, ratio=None,
                              decode_tokens=DECODE, repeats=1, warmup=0, progress=False)
    finally:
        torch.set_num_threads(threads)


def bytes_per_token_layer():
    cfg = bench.shape_config("tiny")
    return 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # keys + values, float32


def by_key(rows):
    return {(r["length"], r["method"]): r for r in rows}


def test_grid_and_positive_times(rows):
    assert [(r["length"], r["method"]) for r in rows] == [(n, m) for n in LENGTHS for m in ("full", "cake", "snapkv")]
    for r in rows:
        assert r["prefill_s"] > 0 and r["decode_step_s"] > 0
        assert len(r["decode_steps_s"]) == DECODE and all(t > 0 for t in r["decode_steps_s"])
        if r["method"] != "full":
            assert r["one_shot_prefill_s"] > 0
            assert r["physical_limit_decode_step_s"] > 0
            assert len(r["physical_limit_decode_steps_s"]) == DECODE


def test_kv_bytes(rows):
    per = bytes_per_token_layer()
    layers = bench.shape_config("tiny").num_hidden_layers
    index = by_key(rows)
    for n in LENGTHS:
        full = index[(n, "full")]
        assert full["bytes_per_token_layer"] == per
        assert full["kv_bytes_prefill"] == n * layers * per
        assert full["kv_bytes_end"] == (n + DECODE) * layers * per
        for m in ("cake", "snapkv"):
            r = index[(n, m)]
            assert r["kv_bytes_prefill"] == BUDGET * layers * per
            assert r["kv_bytes_full_prefill"] == full["kv_bytes_prefill"]
            assert sum(r["kept_per_layer"]) == BUDGET * layers
        # CAKE holds its budget while decoding, plus the one spare slot per layer that the next token is written
        # into (counted: it is memory held); SnapKV evicts at prefill only, so its cache grows by one per step.
        assert index[(n, "cake")]["kv_bytes_end"] == (BUDGET + 1) * layers * per
        assert index[(n, "snapkv")]["kv_bytes_end"] == (BUDGET + DECODE) * layers * per


def test_peaks(rows):
    index = by_key(rows)
    for n in LENGTHS:
        full_kv = index[(n, "full")]["kv_bytes_prefill"]
        assert index[(n, "full")]["peak_kv_bytes_prefill"] == full_kv
        for m in ("cake", "snapkv"):
            r = index[(n, m)]
            assert r["cascade"] is True
            assert r["peak_kv_bytes_prefill"] <= r["peak_bound_bytes"]
            assert r["peak_kv_bytes_prefill"] < full_kv  # the prompt exceeds the budget: the cascade saves memory
            assert r["peak_kv_bytes_one_shot"] == full_kv
            assert r["one_shot_same_cache"] is True


def test_physical_limit_matches_compressed_size(rows):
    for r in rows:
        if r["method"] == "full":
            assert r["physical_limit_tokens"] is None
            continue
        assert r["physical_limit_tokens"] * r["layers"] == sum(r["kept_per_layer"])
        assert r["physical_limit_kv_bytes"] == r["kv_bytes_prefill"]


def test_process_memory_fields(rows):
    for r in rows:
        assert r["prefill_cuda_peak_bytes"] is None and r["decode_cuda_peak_bytes"] is None  # CPU run
        assert r["prefill_rss_peak_bytes"] > 0 and r["prefill_rss_delta_bytes"] >= 0
        assert r["decode_rss_peak_bytes"] > 0 and r["decode_rss_delta_bytes"] >= 0
        if r["method"] != "full":
            assert r["one_shot_prefill_rss_peak_bytes"] > 0


def test_writers(rows, tmp_path):
    paths = bench.write_results(rows, tmp_path, meta={"args": {"lengths": LENGTHS}})
    for name in ("results.json", "results.csv", "results.md", "decode_latency.png", "kv_memory.png",
                 "prefill_time.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    for name in ("decode_latency.png", "kv_memory.png", "prefill_time.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["args"] == {"lengths": LENGTHS}
    hw = data["meta"]["hardware"]
    assert hw["torch"] == torch.__version__ and hw["transformers"] and hw["cpu_cores"]
    assert data["meta"]["run"]["dtype"] == "float32" and data["meta"]["run"]["attn_implementation"] == "sdpa"
    assert len(data["rows"]) == len(rows) and data["summary"] == bench.summarise_targets(rows)
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"length", "method", "prefill_s", "decode_step_s"} <= set(table[0])
    md = (tmp_path / "results.md").read_text()
    assert "| prompt tokens | full | cake | snapkv |" in md
    assert "Decode speedup vs full" in md and "physical limit" in md
    assert set(paths) >= {"json", "csv", "md", "decode_latency", "kv_memory", "prefill_time"}


def test_summarise_targets_reports_from_rows_only(rows):
    before = copy.deepcopy(rows)
    lines = bench.summarise_targets(rows)
    assert rows == before  # pure
    text = "\n".join(lines)
    for m in ("cake", "snapkv"):
        for n in LENGTHS:
            assert f"prefill overhead, {m} at {n} tokens" in text
            assert f"decode step vs physical limit, {m} at {n} tokens" in text
            assert f"cascade peak vs SPEC bound, {m} at {n} tokens" in text
            assert f"one-shot peak vs full cache, {m} at {n} tokens: 1.000×" in text
        assert f"decode speedup vs full at the longest prompt ({LENGTHS[-1]} tokens), {m}" in text
    # A missing figure is said to be missing, never invented.
    damaged = copy.deepcopy(rows)
    for r in damaged:
        r["physical_limit_decode_step_s"] = None
    assert any("decode time vs the physical limit not measured" in s for s in bench.summarise_targets(damaged))
    assert bench.summarise_targets([]) == ["no rows measured"]


def test_bad_arguments():
    model = bench.random_model("tiny")
    with pytest.raises(ValueError, match="exactly one"):
        bench.run_bench(model, [64], ["cake"], budget=32, ratio=0.5, progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        bench.run_bench(model, [64], ["cake"], progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        bench.run_bench(model, [64], ["nope"], budget=32, progress=False)
    with pytest.raises(ValueError, match="unknown model shape"):
        bench.random_model("llama-9000")


def test_named_shapes():
    cfg = bench.shape_config("llama-3-8b")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (32, 4096, 32, 8, 14336, 128256)
    assert cfg.rope_parameters["rope_theta"] == 500000.0
    assert 8.0e9 < bench.parameter_count(cfg) < 8.1e9  # Llama-3-8B has 8.03B parameters
    mistral = bench.shape_config("mistral-7b")
    assert mistral.vocab_size == 32768 and mistral.sliding_window is None  # every layer is full attention
    assert 7.2e9 < bench.parameter_count(mistral) < 7.3e9  # Mistral-7B-v0.3: 7.25B
    small_llama = bench.shape_config("llama-3.2-1b")
    assert small_llama.tie_word_embeddings and small_llama.num_hidden_layers == 16
    assert 1.2e9 < bench.parameter_count(small_llama) < 1.3e9  # Llama-3.2-1B: 1.24B
    assert bench.shape_config("small", max_positions=200_000).max_position_embeddings == 200_000


def test_rss_without_psutil(monkeypatch):
    """psutil is optional: on Linux the RSS is read from /proc/self/statm."""
    import os
    import sys

    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
    read = bench._rss_reader()
    if not os.path.exists("/proc/self/statm"):
        assert read is None
        return
    assert read() > 0
    probe = bench.PhaseMemory(torch.device("cpu"))
    with probe:
        block = torch.ones(8 * 2**20, dtype=torch.uint8)  # 8 MiB, touched
        block.add_(1)
    assert probe.delta is not None and probe.peak >= probe.start


def test_sdpa_backend_is_pinned_recorded_and_checked(tmp_path):
    # The math kernel exists on every build: pinning it must change nothing but the record.
    rows, paths = bench.bench("tiny", lengths=[64], methods=["cake"], budget=32, decode_tokens=2, repeats=1,
                              warmup=0, out_dir=tmp_path, progress=False, sdpa="math")
    assert {r["sdpa_backend"] for r in rows} == {"math"}
    assert json.loads(paths["json"].read_text())["meta"]["run"]["sdpa_backend"] == "math"
    assert "sdpa kernel: math" in paths["md"].read_text()
    with pytest.raises(ValueError, match="unknown sdpa backend 'fast'"):
        bench.bench("tiny", lengths=[64], out_dir=None, progress=False, sdpa="fast")


def test_merge_results_joins_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    files = []
    for n in (64, 96):
        _, paths = bench.bench("tiny", lengths=[n], methods=["cake"], budget=32, decode_tokens=1, repeats=1,
                               warmup=0, out_dir=tmp_path / str(n), progress=False)
        files.append(str(paths["json"]))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_results.py"
    subprocess.run([sys.executable, str(script), *files, "--out", str(tmp_path / "all")], check=True,
                   capture_output=True)
    data = json.loads((tmp_path / "all" / "results.json").read_text())
    assert sorted({r["length"] for r in data["rows"]}) == [64, 96]
    assert [m["file"] for m in data["meta"]["merged_from"]] == ["results.json", "results.json"]
    assert "| 96 |" in (tmp_path / "all" / "results.md").read_text()
