"""Where a decoding step's time goes: torch.profiler over a few steps of a method's cache and of a plain cache of
the same size (operator counts and self CPU time per step, and CUDA time on a GPU), side by side, and the time of
each part of a compressed layer's step.

    python benchmarks/decode_profile.py --model small --length 2048 --device cpu --threads 1
    python benchmarks/decode_profile.py --model small --length 2048 --threads 1 --parts
    python benchmarks/decode_profile.py --model llama-3-8b --length 8192 --device cuda

Prints, per cache, the time per step and the operators that take the most self CPU time, with their calls per step;
then one table of every operator of either cache, the method's and the plain cache's calls and self CPU time per
step, sorted by what the method adds. ``--parts`` also times, per layer call, the parts of the compressed layer's
step (the slot write, the attention over the slots, the position order, the scorer, choosing and freeing the slot)
and the plain cache's own (its append and its attention call), by wrapping those functions in timers for this run
only; the rounds alternate between the two caches.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import kvcake
from kvcake.bench import _decode, load_model
from kvcake.engines.transformers import attention, decode, group, slots
from kvcake.engines.transformers.session import cache_keyword, output_cache
from kvcake.methods.registry import build


def steps(model, cache, logits, start: int, count: int, device) -> float:
    """Greedy decoding steps at their true positions (the benchmark's own loop); mean seconds per step."""
    return statistics.mean(_decode(model, cache, logits, start, count, device))


def show(title: str, model, cache, logits, start: int, count: int, device, rows: int) -> dict[str, tuple[float, float]]:
    """Print the top operators of ``count`` profiled steps; return every operator's (calls, self CPU us) per step."""
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
    return {e.key: (e.count / count, e.self_cpu_time_total / count) for e in events}


def compare(method: dict[str, tuple[float, float]], plain: dict[str, tuple[float, float]], label: str) -> None:
    """Every operator of either profile: calls and self CPU time per step, largest added time first."""
    print(f"\n## operators per step: {label} against the plain cache (self CPU us; sorted by what {label} adds)")
    print(f"{'operator':<48} {'calls':>7} {'plain':>7} {'us':>9} {'plain us':>9} {'added us':>9}")
    none = (0.0, 0.0)
    keys = sorted(set(method) | set(plain), key=lambda k: plain.get(k, none)[1] - method.get(k, none)[1])
    for key in keys:
        (calls, us), (p_calls, p_us) = method.get(key, none), plain.get(key, none)
        if max(us, p_us) >= 1.0:
            print(f"{key[:48]:<48} {calls:>7.1f} {p_calls:>7.1f} {us:>9.1f} {p_us:>9.1f} {us - p_us:>9.1f}")
    total, p_total = sum(v[1] for v in method.values()), sum(v[1] for v in plain.values())
    calls, p_calls = sum(v[0] for v in method.values()), sum(v[0] for v in plain.values())
    print(f"{'all operators':<48} {calls:>7.1f} {p_calls:>7.1f} {total:>9.1f} {p_total:>9.1f} {total - p_total:>9.1f}")


class Timers:
    """Seconds and calls of wrapped functions, per name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    def wrap(self, function: Callable, name: str) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1
        return timed


def parts(model, method, cache, logits, plain, plain_logits, start: int, plain_start: int, count: int, device,
          rounds: int = 4) -> None:
    """Time the parts of a layer's step, per call, for the compressed and the plain cache (alternating rounds)."""
    timers = Timers()
    scorer = type(method.scorer)
    patched: list[tuple[object, str, object]] = []

    def patch(owner, name: str, label: str) -> None:
        if not hasattr(owner, name):  # a part this version of kvcake does not have
            return
        patched.append((owner, name, getattr(owner, name)))
        setattr(owner, name, timers.wrap(getattr(owner, name), label))

    patch(attention, "attend_slots", "kvcake: attention + eviction (all below but the write)")
    patch(slots.Slots, "write", "kvcake: write the new token into a slot")
    patch(decode, "slot_probs", "kvcake:   attention probabilities over the slots")
    patch(decode, "attention_probs", "kvcake:   attention probabilities over the slots (attention_probs)")
    patch(slots.Slots, "order", "kvcake:   position order of the slots (sort)")
    patch(scorer, "decode", f"kvcake:   scores ({scorer.__name__}.decode: group mean, pooling)")
    patch(decode, "lowest_candidate", "kvcake:   lowest score outside the window (argmin)")
    patch(slots.Slots, "target", "kvcake:   the layer's target at this step")
    patch(slots.Slots, "drop_one", "kvcake:   free the chosen slot")
    patch(decode, "select_drops", "kvcake:   choose the dropped entries (select_drops: argmin and mask)")
    patch(slots.Slots, "drop", "kvcake:   free the slots of a mask (Slots.drop)")
    patch(group.LayerGroup, "evict", "kvcake:   score and evict every layer of the group (once per step)")
    patch(DynamicLayer, "update", "plain: append the new token (DynamicLayer.update)")
    base = model.config._attn_implementation
    own = ALL_ATTENTION_FUNCTIONS[base]
    ALL_ATTENTION_FUNCTIONS[base] = timers.wrap(own, f"plain: attention ({base})")
    try:
        timed = collections.defaultdict(float)
        for r in range(rounds):
            with kvcake.compress(model, method):
                begin = time.perf_counter()
                steps(model, cache, logits, start + r * count, count, device)
                timed["kvcake step"] += time.perf_counter() - begin
            begin = time.perf_counter()
            steps(model, plain, plain_logits, plain_start + r * count, count, device)
            timed["plain step"] += time.perf_counter() - begin
    finally:
        for owner, name, value in patched:
            setattr(owner, name, value)
        ALL_ATTENTION_FUNCTIONS[base] = own
    print(f"\n## parts of a layer's step ({rounds} alternating rounds of {count} steps; us per call)")
    for name in timers.seconds:
        print(f"{name:<70} {timers.seconds[name] / timers.calls[name] * 1e6:>9.1f} us  ({timers.calls[name]} calls)")
    for name, seconds in timed.items():
        print(f"{name:<70} {seconds / (rounds * count) * 1e3:>9.2f} ms per step (timers included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small",
                        help="a shape of kvcake.bench.SHAPES, a local model folder, or 'default' (the embedded model)")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--method", default="cake")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--parts", action="store_true", help="also time the parts of a layer's step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_model(None if args.model == "default" else args.model, device=device,
                       max_positions=args.length + 256)
    name = cache_keyword(model)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    method = build(args.method, budget=args.budget)
    with torch.no_grad():
        plain = DynamicCache(config=model.config)
        out = model(ids[:, -args.budget:], **{name: plain}, use_cache=True, logits_to_keep=1)
        plain_logits = out.logits
        with kvcake.compress(model, method, max_new_tokens=128) as press:
            out = model(ids, **{name: press.new_cache()}, use_cache=True, logits_to_keep=1)
            cache, logits = output_cache(out), out.logits
            ours = show(f"{method.label} at {args.budget} per layer, {args.length}-token prompt", model, cache, logits,
                        args.length, args.steps, device, args.rows)
        # The plain cache decodes outside the block (inside it, kvcake would adopt it as a compressed cache).
        theirs = show(f"plain cache of {args.budget} tokens", model, plain, plain_logits, args.budget, args.steps,
                      device, args.rows)
        compare(ours, theirs, method.label)
        if args.parts:
            used = 4 + 2 * args.steps
            parts(model, method, cache, logits, plain, plain_logits, args.length + used, args.budget + used,
                  args.steps, device)


if __name__ == "__main__":
    main()
