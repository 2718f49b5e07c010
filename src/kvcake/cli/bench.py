"""``kvcake bench``: speed and memory, full cache vs methods vs a plain cache of the compressed size."""

from __future__ import annotations

from pathlib import Path

import typer

from kvcake.cli.common import app, fail, out


@app.command("bench")
def bench_command(
    model: str = typer.Option("small", "--model", help="Shape name (small, tiny, llama-3.2-1b, llama-3-8b, "
                                                      "mistral-7b), a local model folder, or 'default'."),
    lengths: str = typer.Option("2048,8192", help="Comma-separated prompt lengths."),
    methods: str = typer.Option("full,cake,snapkv", help="Comma-separated method names."),
    budget: int | None = typer.Option(1024, help="Tokens per layer kept by each method."),
    ratio: float | None = typer.Option(None, help="Instead of --budget: fraction of the prompt kept."),
    decode_tokens: int = typer.Option(16, help="Decoding steps timed per run."),
    repeats: int = typer.Option(3, help="Timed repetitions (medians are reported)."),
    warmup: int = typer.Option(1, help="Untimed warm-up rounds (memory is sampled in the last one)."),
    dtype: str | None = typer.Option(None, help="float32, bfloat16 or float16 (default: fp32 CPU, bf16 GPU)."),
    attn: str = typer.Option("sdpa", help="Attention backend: sdpa, eager or flash_attention_2."),
    sdpa_backend: str | None = typer.Option(None, help="With --attn sdpa: restrict torch's kernel to flash "
                                                          "(FlashAttention-2 in PyTorch), efficient, cudnn or math."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    threads: int | None = typer.Option(None, help="torch threads on CPU (1 is steadier on a loaded machine)."),
    out_dir: Path = typer.Option(Path("bench-results"), "--out", help="Folder for results.{json,csv,md} and plots."),
    compile_: bool = typer.Option(False, "--compile", help="Also time decoding through torch.compile (CUDA graphs on "
                                                           "CUDA), beside compiled StaticCache references."),
) -> None:
    """Measure prefill time, time per decoded token and KV memory, full cache vs methods vs a plain cache of the
    compressed size; write tables and plots."""
    from kvcake import bench as benchmark

    try:
        length_list = [int(x) for x in lengths.split(",") if x.strip()]
        method_list = [m.strip() for m in methods.split(",") if m.strip()]
        if ratio is not None:
            budget = None
        rows, paths = benchmark.bench(model=None if model == "default" else model, lengths=length_list,
                                      methods=method_list, budget=budget, ratio=ratio, decode_tokens=decode_tokens,
                                      repeats=repeats, warmup=warmup, dtype=dtype, attn_implementation=attn,
                                      device=device, out_dir=out_dir, threads=threads, sdpa=sdpa_backend,
                                      compile=compile_)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        fail(str(exc))
    for line in benchmark.summarise_targets(rows):
        out.print(line)
    out.print("written: " + ", ".join(str(p) for p in paths.values()))




@app.command("throughput")
def throughput_command(
    settings: str = typer.Option(
        "transformers:full,transformers:cake@0.1,transformers:snapkv@0.1,kvpress:snapkv@0.1,vllm:full,"
        "vllm:window@0.1,vllm:cake@0.1,vllm:snapkv@0.1,vllm:streamingllm@0.1",
        help="Comma-separated engine:method[@kept ratio] settings (engines: transformers, vllm, kvpress; "
             "vllm:window@R is vLLM's own sliding window over R of the prompt)."),
    model: str = typer.Option("smollm2-135m-instruct", help="Embedded model name or local model folder."),
    requests: int = typer.Option(32, help="Requests in the workload."),
    prompt_tokens: str = typer.Option("2048", help="Prompt length in tokens; several (comma-separated) sweep it."),
    spread: float = typer.Option(0.0, help="Prompt lengths drawn uniformly in length x (1 ± spread)."),
    output_tokens: int = typer.Option(256, help="Tokens generated per request, always exactly (ignore_eos)."),
    rate: float | None = typer.Option(None, help="Poisson arrivals at this many requests/s (default: all at once)."),
    pool: str = typer.Option("2", help="KV pool, in full-cache requests of the longest prompt + answer; several "
                                       "(comma-separated) sweep it."),
    max_batch: int | None = typer.Option(None, help="Cap on requests served at once (default: what the pool holds)."),
    vllm_python: str | None = typer.Option(None, help="python of the vLLM environment "
                                                      "(default: $KVCAKE_VLLM_PYTHON or /tmp/kvcake-vllm-venv)."),
    kvpress_python: str | None = typer.Option(None, help="python of the kvpress environment (default: "
                                                         "$KVCAKE_KVPRESS_PYTHON or /tmp/kvcake-kvpress-venv)."),
    seed: int = typer.Option(0, help="Seed of the prompts and arrivals."),
    out_dir: Path = typer.Option(Path("throughput-results"), "--out", help="Folder for results and plots; a run "
                                                                            "started again there resumes."),
) -> None:
    """Serve a workload of needle prompts under each engine x method setting at a fixed KV memory budget; report
    requests and tokens per second (end to end and decoding phase), concurrency, latency, KV memory, refusals and
    answers found."""
    from kvcake.bench.throughput.run import Plan, parse_floats, parse_ints, run
    from kvcake.bench.throughput.settings import parse_settings
    from kvcake.bench.throughput.workload import Workload

    try:
        lengths = parse_ints(prompt_tokens)
        workload = Workload(requests=requests, prompt_tokens=lengths[0], spread=spread, output_tokens=output_tokens,
                            arrival="all" if rate is None else "poisson", rate=rate, seed=seed)
        python = {k: v for k, v in (("vllm", vllm_python), ("kvpress", kvpress_python)) if v}
        plan = Plan(workload=workload, settings=parse_settings(settings), pools=parse_floats(pool),
                    prompt_lengths=lengths, model=model, python=python, max_batch=max_batch)
        run(plan, out_dir, log=out.print)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        fail(str(exc))
    out.print(f"written: {out_dir / 'results.md'}")
