"""What batched answering (`kvcake eval --batch-size`) costs per row: the prefill and one decoding step.

    python benchmarks/batch_cost.py [--model smollm2-135m-instruct] [--tokens 2000] [--rows 4] [--method cake]

Random token prompts (speed does not depend on the words), one torch thread, CPU seconds of this process
(``time.process_time``: a figure that another job on the machine inflates far less than wall-clock time).
Printed: the prefill's CPU seconds per row alone, in a left-padded batch of ``--rows`` rows of different lengths
(7 tokens apart), and in a batch of equal lengths (no padding); then the median CPU seconds of a decoding step
at 1 and at ``--rows`` rows under ``--method`` (``full`` for the full cache), the cache sized for a 64-token answer.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--method", default="cake")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from kvcake import models
    from kvcake.engines.transformers.compat import cache_keyword
    from kvcake.engines.transformers.replay import record_prefill
    from kvcake.eval.answering import attached, size_for_answer
    from kvcake.eval.batching import left_pad
    from kvcake.eval.grid import Setting

    model, _ = models.load(args.model)
    keyword = cache_keyword(model)
    generator = torch.Generator().manual_seed(0)
    padded = [torch.randint(100, 20000, (1, args.tokens - 7 * i), generator=generator) for i in range(args.rows)]
    equal = [torch.randint(100, 20000, (1, args.tokens), generator=generator) for _ in range(args.rows)]

    def build():
        return None if args.method == "full" else Setting(args.method, ratio=args.ratio).build()

    def prefill(rows):
        ids, mask = left_pad(rows, 0)
        start = time.process_time()
        _, cache = record_prefill(model, ids, build(), attention_mask=mask)
        return time.process_time() - start, cache, mask

    prefill(padded[:1])  # warm-up
    alone = statistics.median(prefill(padded[i:i + 1])[0] for i in range(min(args.rows, 2)))
    seconds_padded = prefill(padded)[0] / args.rows
    seconds_equal = prefill(equal)[0] / args.rows
    print(f"{args.model}, {args.tokens} tokens, {args.method}: CPU seconds of the prefill per row")
    print(f"  alone {alone:.2f} | padded batch of {args.rows} {seconds_padded:.2f} ({seconds_padded / alone:.2f}x) "
          f"| equal-length batch of {args.rows} {seconds_equal:.2f} ({seconds_equal / alone:.2f}x)")

    @torch.no_grad()
    def step_cost(rows):
        _, cache, mask = prefill(rows)
        size_for_answer(cache, 64)
        positions = torch.tensor([r.shape[1] for r in rows])
        costs = []
        method = build()
        with attached(model, method):
            for _ in range(args.steps):
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                start = time.process_time()
                out = model(input_ids=torch.full((len(rows), 1), 300), attention_mask=mask,
                            position_ids=positions[:, None], use_cache=True, logits_to_keep=1, **{keyword: cache})
                out.logits[:, -1].argmax(-1).tolist()
                costs.append(time.process_time() - start)
                positions = positions + 1
        return statistics.median(costs[2:])

    one, many = step_cost(padded[:1]), step_cost(padded)
    print(f"CPU seconds of a decoding step: 1 row {one:.3f} | {args.rows} rows {many:.3f} ({many / one:.2f}x)")


if __name__ == "__main__":
    main()
