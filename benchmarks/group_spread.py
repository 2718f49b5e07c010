"""How eager decode-time eviction's grouping of layers affects a decoding step: one compressed request decoded in
interleaved rounds with its evicting layers grouped at several spreads (the largest ratio of capacities within a
group, ``none`` for one group of every layer, ``alone`` for every layer evicting on its own), beside a plain cache
of the budget's size (timed after them: it cannot decode inside the compress block). The same prompt as
``kvcake bench`` (random token ids); greedy steps at their true positions.

    python benchmarks/group_spread.py --model default --length 8192 --budget 1024 --spreads alone,none,2,1.5 \\
        --steps 16 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics

import torch
from transformers import DynamicCache

import kvcake
from kvcake.bench import _decode, load_model
from kvcake.bench.timing.loops import random_ids, vocab_size
from kvcake.engines.transformers.session import cache_keyword, output_cache


def regroup(cache, spread: str) -> int:
    """Regroup the cache's evicting layers (between two steps); the number of groups."""
    if spread == "alone":
        cache.layer_groups = {}
        return 0
    return cache.group_layers(None if spread == "none" else float(spread))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' (the embedded model), a shape or a folder")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--spreads", default="alone,none,2")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spreads = args.spreads.split(",")
    device = torch.device("cpu")
    model = load_model(None if args.model == "default" else args.model, max_positions=args.length + 1024)
    keyword = cache_keyword(model)
    ids = random_ids(vocab_size(model), args.length, 0, device)
    total = (1 + args.rounds * len(spreads)) * args.steps
    times: dict[str, list[float]] = {s: [] for s in [*spreads, "plain"]}
    with torch.no_grad():
        plain = DynamicCache(config=model.config)
        out = model(ids[:, -args.budget:], **{keyword: plain}, use_cache=True, logits_to_keep=1)
        plain_logits, plain_at = out.logits, args.budget
        with kvcake.compress(model, kvcake.CAKE(budget=args.budget), max_new_tokens=total + 8) as press:
            out = model(ids, **{keyword: press.new_cache()}, use_cache=True, logits_to_keep=1)
            cache, logits, at = output_cache(out), out.logits, args.length
            _decode(model, cache, logits, at, args.steps, device)  # warm: the layers freeze into their slots
            at += args.steps
            capacities = [layer.slots.capacity for layer in cache.layers_in_order()]
            groups = {}
            for _ in range(args.rounds):
                for spread in spreads:
                    groups[spread] = regroup(cache, spread)
                    times[spread] += _decode(model, cache, logits, at, args.steps, device)
                    at += args.steps
        # The plain cache decodes outside the block (inside it, kvcake would adopt it as a compressed cache), so
        # its rounds follow the grouped ones instead of alternating with them.
        _decode(model, plain, plain_logits, plain_at, args.steps, device)
        plain_at += args.steps
        for _ in range(args.rounds):
            times["plain"] += _decode(model, plain, plain_logits, plain_at, args.steps, device)
            plain_at += args.steps
    print(f"capacities per layer: min {min(capacities)}, mean {statistics.mean(capacities):.0f}, "
          f"max {max(capacities)}")
    base = statistics.median(times["plain"])
    print(f"{'grouping':<24}{'groups':>8}{'median step ms':>16}{'/ plain':>10}")
    for spread in spreads:
        step = statistics.median(times[spread])
        print(f"{spread:<24}{groups[spread]:>8}{step * 1e3:>16.2f}{step / base:>10.3f}")
    print(f"{'plain cache (budget)':<24}{'':>8}{base * 1e3:>16.2f}{1:>10.3f}")


if __name__ == "__main__":
    main()
