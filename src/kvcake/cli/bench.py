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


