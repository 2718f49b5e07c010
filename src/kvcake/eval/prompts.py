"""A sample's prompt as token ids, split at the context/question boundary and cut in the middle to fit.

Both modes tokenise ``prefix + context`` and ``question`` separately, so they see the same tokens; under a chat
template the boundary is found by rendering the template around a marker.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kvcake.eval.sample import Sample

SPLIT = "\x00kvcake-question\x00"


@dataclass
class Encoded:
    context_ids: torch.Tensor  # (1, n): template head, prefix and context
    question_ids: torch.Tensor  # (1, m): question, template tail (generation prompt) and answer prefix
    truncated: int  # context tokens removed from the middle

    @property
    def length(self) -> int:
        return self.context_ids.shape[1] + self.question_ids.shape[1]


def _split_template(tokenizer, sample: Sample, context: str) -> tuple[str, str, bool]:
    """The prompt text before and after the context/question boundary, and whether to add special tokens. The
    answer prefix ends the second part (after the chat template's generation prompt)."""
    if sample.chat and getattr(tokenizer, "chat_template", None):
        content = sample.prefix + context + SPLIT + sample.question
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        head, tail = text.split(SPLIT)
        return head, tail + sample.answer_prefix, False
    return sample.prefix + context, sample.question + sample.answer_prefix, True


def encode(tokenizer, sample: Sample, max_length: int | None = None) -> Encoded:
    """Token ids of ``sample``'s prompt, the context cut in the middle (as LongBench does) to fit ``max_length``."""
    head, tail, special = _split_template(tokenizer, sample, sample.context)
    ids = tokenizer(head, add_special_tokens=special, return_tensors="pt")["input_ids"]
    q_ids = tokenizer(tail, add_special_tokens=False, return_tensors="pt")["input_ids"]
    removed = 0
    if max_length is not None and ids.shape[1] + q_ids.shape[1] > max_length:
        ctx = tokenizer(sample.context, add_special_tokens=False)["input_ids"]
        over = ids.shape[1] + q_ids.shape[1] - max_length
        for _ in range(3):  # re-tokenising the joined halves can shift a token or two
            keep = max(0, len(ctx) - over - removed)
            removed = len(ctx) - keep
            text = tokenizer.decode(ctx[: keep // 2]) + tokenizer.decode(ctx[len(ctx) - (keep - keep // 2):])
            head, tail, special = _split_template(tokenizer, sample, text)
            ids = tokenizer(head, add_special_tokens=special, return_tensors="pt")["input_ids"]
            over = ids.shape[1] + q_ids.shape[1] - max_length
            if over <= 0:
                break
        if over > 0:
            raise ValueError(f"{sample.task}/{sample.id}: the prompt without its context exceeds {max_length} tokens")
    return Encoded(ids, q_ids, removed)


def question_length(tokenizer, sample: Sample) -> int:
    """Tokens of the question part of ``sample``'s prompt (question and template tail), as :func:`encode` gives
    them: cutting the context to fit never changes it."""
    _, tail, _ = _split_template(tokenizer, sample, sample.context)
    return len(tokenizer(tail, add_special_tokens=False)["input_ids"])


def answer_prefix_length(tokenizer, sample: Sample) -> int:
    """Tokens the answer prefix adds at the end of the prompt, as :func:`encode` tokenises it."""
    if not sample.answer_prefix:
        return 0
    return question_length(tokenizer, sample) - question_length(tokenizer, replace(sample, answer_prefix=""))
