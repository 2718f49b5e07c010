"""Serve a throughput workload with vLLM (run by the vLLM environment's python, not imported by kvcake).

    python vllm_worker.py JOB.json RESULT.json

Standard library and vLLM only. The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so that
every step can be clocked and the scheduler read between steps: which requests computed prompt tokens in the step
(a step with any is a prefill step, the others are decoding steps), how many requests were running, and how many
blocks of the KV pool were in use. Requests are added when their arrival time comes; every one generates exactly
the workload's answer length (``ignore_eos``), greedily.
"""

from __future__ import annotations

import json
import os
import sys
import time
from importlib import metadata
from typing import Any


def _plugin_missing() -> str | None:
    names = [ep.value for ep in metadata.entry_points(group="vllm.general_plugins")]
    if any(value.startswith("kvcake") for value in names):
        return None
    return ("kvcake's vLLM plugin is not installed in this vLLM environment (no 'vllm.general_plugins' entry point "
            f"from kvcake; found {names or 'none'}): install kvcake there (pip install -e PATH_TO_KVCAKE) once the "
            "vLLM engine has landed; this row is refused, not run")


def kvcake_arguments(method: str, ratio: float) -> dict[str, Any]:
    """What kvcake's vLLM engine asks ``LLM`` for (its ``engine_args``: ``additional_config`` and its scheduler and
    worker classes); without the engine installed, its ``additional_config`` alone (vLLM then refuses or ignores it,
    and the row says so)."""
    try:
        from kvcake.engines.vllm import engine_args
    except ImportError:
        return {"additional_config": {"kvcake": {"method": method, "ratio": ratio}}}
    return dict(engine_args(method, ratio=ratio))


def engine_arguments(job: dict[str, Any]) -> dict[str, Any]:
    """LLM(...) keyword arguments of a job's setting: vLLM alone, its own sliding window, or kvcake's plugin.

    Every row runs with prefix caching off (the prompts are distinct anyway) and without chunked prefill (kvcake's
    engine scores a prompt in one piece), so that the rows differ only in what their KV cache holds."""
    setting = job["setting"]
    kwargs: dict[str, Any] = dict(model=job["model"], dtype=job.get("dtype", "float32"), enforce_eager=True,
                                  max_model_len=job["max_model_len"], kv_cache_memory_bytes=int(job["pool_bytes"]),
                                  enable_prefix_caching=False, enable_chunked_prefill=False,
                                  max_num_seqs=int(job.get("max_num_seqs", 256)), seed=0)
    method = setting["method"]
    if method == "window":
        kwargs["hf_overrides"] = {"layer_types": ["sliding_attention"] * int(job["layers"]),
                                  "sliding_window": int(job["window_tokens"]), "use_sliding_window": True}
    elif method != "full":
        kwargs.update(kvcake_arguments(method, setting["ratio"]))
    return kwargs


def block_bytes(config: Any) -> int:
    """Bytes one block of the pool holds: its group's page (one layer's keys and values for a block of tokens)
    times the layers of that group. Not the sum of the cache tensors' sizes: when every layer has a group of its own
    (kvcake's vLLM engine), the groups' tensors alias one allocation and that sum counts it once per group."""
    return max(int(g.kv_cache_spec.page_size_bytes) * len(g.layer_names) for g in config.kv_cache_groups)


def serve(job: dict[str, Any]) -> dict[str, Any]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    records = [dict(index=r["index"], prompt_tokens=len(r["ids"]), arrival_s=r["arrival_s"]) for r in job["requests"]]
    clock: dict[str, Any] = dict(prefill_s=0.0, decode_s=0.0, decode_tokens=0, wall_s=0.0, steps=0, max_running=0,
                                 kv_peak_bytes=0, kv_samples=[],
                                 kv_source="vLLM block pool: blocks in use x bytes per block, after every step")
    info: dict[str, Any] = {}
    if job["setting"]["method"] not in ("full", "window"):
        reason = _plugin_missing()
        if reason is not None:
            for rec in records:
                rec["refused"] = reason
            return dict(requests=records, clock=clock, info={"refused": reason})
    import vllm
    from vllm import LLM, SamplingParams

    kwargs = engine_arguments(job)
    started = time.perf_counter()
    llm = LLM(**kwargs)
    info["engine_start_s"] = time.perf_counter() - started
    info["vllm"] = vllm.__version__
    info["engine_arguments"] = {k: v for k, v in kwargs.items() if k != "model"}
    if "scheduler_cls" in kwargs:
        import kvcake

        info["kvcake_engine_from"] = kvcake.__file__
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    config = scheduler.kv_cache_config
    block_pool = scheduler.kv_cache_manager.block_pool
    usable = block_pool.num_gpu_blocks - 1  # block 0 is vLLM's null block
    per_block = block_bytes(config)
    pool = config.num_blocks * per_block
    block_tokens = scheduler.cache_config.block_size
    info.update(pool_bytes=int(usable * per_block), engine_pool_bytes=pool, num_blocks=config.num_blocks,
                block_tokens=block_tokens,
                kv_cache_groups=len(config.kv_cache_groups))
    params = SamplingParams(max_tokens=int(job["output_tokens"]), ignore_eos=True, temperature=0.0)
    pending = sorted(job["requests"], key=lambda r: (r["arrival_s"], r["index"]))
    ids: dict[str, int] = {}
    seen: dict[str, int] = {}
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        if pending and not engine.has_unfinished_requests() and pending[0]["arrival_s"] > now:
            time.sleep(pending[0]["arrival_s"] - now)
            now = time.perf_counter() - start
        while pending and pending[0]["arrival_s"] <= now:
            r = pending.pop(0)
            need = len(r["ids"]) + int(job["output_tokens"])
            if -(-need // block_tokens) * len(config.kv_cache_groups) > usable:  # a block per group
                held = usable // len(config.kv_cache_groups) * block_tokens
                records[r["index"]]["refused"] = (f"needs {need} tokens of KV, the pool holds {held}: refused "
                                                  "before running")
                continue
            try:
                rid = engine.add_request(f"r{r['index']}", {"prompt_token_ids": r["ids"]}, params)
            except (ValueError, RuntimeError) as exc:
                records[r["index"]]["refused"] = f"vLLM refused it: {exc}"
                continue
            ids[rid] = ids[f"r{r['index']}"] = r["index"]  # outputs may carry either id
        if not engine.has_unfinished_requests():
            continue
        before = {rid: (req.num_computed_tokens, req.num_prompt_tokens) for rid, req in scheduler.requests.items()}
        t0 = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - t0
        prefill = False
        for rid, (computed, prompt) in before.items():
            after = scheduler.requests.get(rid)
            if computed < prompt and after is not None and after.num_computed_tokens > computed:
                prefill = True
        at = time.perf_counter() - start
        produced = 0
        for out in outputs:
            index = ids.get(out.request_id)
            if index is None:
                continue
            rec = records[index]
            count = len(out.outputs[0].token_ids)
            produced += count - seen.get(out.request_id, 0)
            if count and seen.get(out.request_id, 0) == 0:
                rec["first_token_s"] = at
            seen[out.request_id] = count
            rec["output_tokens"] = count
            if out.finished:
                rec["finish_s"] = at
                rec["text"] = out.outputs[0].text
        if prefill:
            clock["prefill_s"] += elapsed
        else:
            clock["decode_s"] += elapsed
            clock["decode_tokens"] += produced
        clock["steps"] += 1
        held = int((usable - block_pool.get_num_free_blocks()) * per_block)
        clock["kv_samples"].append(held)
        clock["kv_peak_bytes"] = max(clock["kv_peak_bytes"], held)
        clock["max_running"] = max(clock["max_running"], len(scheduler.running))
    clock["wall_s"] = time.perf_counter() - start
    return dict(requests=records, clock=clock, info=info)


def main(argv: list[str]) -> int:
    job_path, result_path = argv[1], argv[2]
    with open(job_path) as f:
        job = json.load(f)
    result = serve(job)
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
