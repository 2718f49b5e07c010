"""Where a decoding step's time goes: torch.profiler over a few steps of a method's cache and of a plain cache of
the same size (operator counts and self CPU time per step, and CUDA time on a GPU).

    python benchmarks/decode_profile.py --model small --length 2048 --device cpu --threads 1
    python benchmarks/decode_profile.py --model llama-3-8b --length 8192 --device cuda

Prints, per cache, the time per step and the operators that take the most self CPU time, with their calls per step.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

import kvcake
from kvcake.bench import _decode, random_model
from kvcake.engines.transformers.session import cache_keyword, output_cache
from kvcake.methods.registry import build


def steps(model, cache, logits, start: int, count: int, device) -> float:
    """Greedy decoding steps at their true positions (the benchmark's own loop); mean seconds per step."""
    return statistics.mean(_decode(model, cache, logits, start, count, device))


def show(title: str, model, cache, logits, start: int, count: int, device, rows: int) -> None:
    steps(model, cache, logits, start, 4, device)  # warm
    per_step = steps(model, cache, logits, start + 4, count, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        steps(model, cache, logits, start + 4 + count, count, device)
    events = prof.key_averages()
    # cudaLaunchKernel, cudaLaunchKernelExC and the driver's cuLaunchKernelEx (cuBLAS, Triton) all launch kernels.
    kernels = sum(e.count for e in events if "LaunchKernel" in e.key)
    print(f"\n## {title}: {per_step * 1e3:.2f} ms per step (unprofiled mean of {count})")
    if device.type == "cuda":
        print(f"CUDA kernel launches per step: {kernels / count:.0f}")
    print(f"{'operator':<48} {'calls/step':>10} {'self CPU us/step':>17}")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]:
        print(f"{e.key[:48]:<48} {e.count / count:>10.1f} {e.self_cpu_time_total / count:>17.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="a shape name of kvcake.bench.SHAPES")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--method", default="cake")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = random_model(args.model, device=device, max_positions=args.length + 64)
    name = cache_keyword(model)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    method = build(args.method, budget=args.budget)
    with torch.no_grad():
        with kvcake.compress(model, method) as press:
            out = model(ids, **{name: press.new_cache()}, use_cache=True, logits_to_keep=1)
            show(f"{method.label} at {args.budget} per layer, {args.length}-token prompt", model, output_cache(out),
                 out.logits, args.length, args.steps, device, args.rows)
        plain = DynamicCache(config=model.config)
        out = model(ids[:, -args.budget:], **{name: plain}, use_cache=True, logits_to_keep=1)
        show(f"plain cache of {args.budget} tokens", model, plain, out.logits, args.budget, args.steps, device,
             args.rows)


if __name__ == "__main__":
    main()
