"""Dropping rows of a batch mid-answer (``KVCakeCache.batch_select_indices``, as a batched runner drops its finished
rows): the rows that remain decode exactly as they would have with the dropped rows still there."""

import pytest
import torch

import kvcake
from conftest import prompt, tiny_llama

METHODS = {
    "cake": lambda: kvcake.CAKE(budget=24, window=4),
    "h2o": lambda: kvcake.H2O(budget=24),
    "tova": lambda: kvcake.TOVA(budget=24),
    "streamingllm": lambda: kvcake.StreamingLLM(budget=24),
    "snapkv": lambda: kvcake.SnapKV(budget=24, window=4),
    "cake-authors-decoding": lambda: kvcake.methods.build("cake-authors-decoding", budget=24, window=4),
}


def _batch():
    rows = [prompt(n, seed=s)[0] for n, s in ((60, 1), (45, 2), (52, 3))]
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):], mask[i, longest - len(r):] = r, 1
    return ids, mask


@torch.no_grad()
def _decode(model, method, steps: int, drop_at: int | None, keep: list[int]) -> dict[int, tuple[list, list]]:
    """Greedy tokens and last logits of every row in ``keep``; the other rows are dropped after ``drop_at`` steps."""
    ids, mask = _batch()
    positions = mask.sum(-1)
    rows = list(range(ids.shape[0]))
    tokens: dict[int, list] = {r: [] for r in rows}
    logits: dict[int, list] = {r: [] for r in rows}
    with kvcake.compress(model, method) as press:
        cache = press.new_cache()
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1]
        for step in range(steps):
            if step == drop_at:
                where = [rows.index(r) for r in keep]
                cache.batch_select_indices(torch.tensor(where))
                mask, positions, nxt, rows = mask[where], positions[where], nxt[where], keep
            for i, r in enumerate(rows):
                tokens[r].append(int(nxt[i].argmax()))
                logits[r].append(nxt[i])
            feed = nxt.argmax(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            out = model(input_ids=feed, attention_mask=mask, position_ids=positions[:, None], past_key_values=cache,
                        use_cache=True)
            positions, nxt = positions + 1, out.logits[:, -1]
    return {r: (tokens[r], logits[r]) for r in keep}


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("drop_at", [0, 5])
def test_remaining_rows_decode_as_if_the_dropped_rows_were_there(name, drop_at):
    model = tiny_llama()
    keep = [0, 2]
    reference = _decode(model, METHODS[name](), 40, None, keep)
    dropped = _decode(model, METHODS[name](), 40, drop_at, keep)
    for r in keep:
        assert dropped[r][0] == reference[r][0]
        torch.testing.assert_close(torch.stack(dropped[r][1]), torch.stack(reference[r][1]), rtol=1e-5, atol=1e-5)
