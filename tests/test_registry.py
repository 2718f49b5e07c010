"""A method is one file: registering a new method puts it in the invariant matrix, the command line, ``kvcake methods``
and the evaluation grid with no other edit. Proved with a throwaway method registered here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from typer.testing import CliRunner

import kvcake
import test_methods as matrix
from conftest import prompt, tiny_llama
from kvcake.cli import app
from kvcake.eval.runner import grid
from kvcake.methods import registry
from kvcake.methods.base import Method, Scorer

NAME = "throwaway-keyfeature"


@dataclass(frozen=True)
class KeyFeatureScores(Scorer):
    """Keeps the entries whose key has the largest ``feature``-th coordinate: a scorer that reads the keys, at prefill
    and while decoding (where the engine must hand them over in position order)."""

    feature: int = field(default=0, metadata={"help": "throwaway: which key coordinate scores an entry"})

    name: ClassVar[str] = "keyfeature"

    def __post_init__(self) -> None:
        if not isinstance(self.feature, int) or self.feature < 0:
            raise ValueError(f"feature must be a non-negative integer, got {self.feature!r}")

    def prefill(self, view, window):
        return view.keys[..., self.feature].float()

    def decode(self, view):
        return view.keys[..., self.feature].float()


class KeyFeature(Method):
    scorer_type = KeyFeatureScores
    default_window = 32
    default_decode_eviction = True


@pytest.fixture
def throwaway():
    registry.register(NAME, about="a throwaway method for the registry test")(KeyFeature)
    try:
        yield NAME
    finally:
        registry.unregister(NAME)


def test_a_registered_method_passes_the_invariant_matrix(throwaway, backend):
    matrix.test_budget_accounting(throwaway)
    matrix.test_prefill_is_exact_and_a_covering_budget_changes_nothing(throwaway, backend)
    matrix.test_cascade_equals_one_shot(throwaway)
    matrix.test_decoding_equals_reference_batch_and_padding(throwaway, backend)


def test_a_registered_method_keeps_its_top_scored_entries(throwaway):
    matrix.test_kept_positions_are_the_top_scored(throwaway)


def test_a_registered_method_is_on_the_command_line_and_in_the_grid(throwaway):
    runner = CliRunner()
    listing = runner.invoke(app, ["methods"])
    assert listing.exit_code == 0 and NAME in listing.stdout and "feature=0" in listing.stdout
    assert [s.label for s in grid([NAME], [64])] == [f"{NAME}@b64"]
    assert registry.build(NAME, budget=64, feature=3).scorer.feature == 3
    with pytest.raises(ValueError, match="feature"):
        registry.build(NAME, budget=64, feature=-1)


def test_decode_scorers_see_keys_in_position_order(throwaway):
    # The entry dropped at each step is the one whose key scores lowest among the entries outside the window, with
    # the keys read in position order: a scorer given keys in the cache's slot order would drop a different entry.
    model = tiny_llama("sdpa")
    ids = prompt(90)
    window = 8
    with kvcake.compress(model, registry.build(NAME, budget=24, window=window)) as press, torch.no_grad():
        cache = press.new_cache()
        token = model(ids, cache=cache).logits[:, -1:].argmax(-1)
        for step in range(12):
            before = [layer.entries() for layer in cache.layers]
            token = model(token, cache=cache, position_ids=torch.tensor([[90 + step]])).logits[:, -1:].argmax(-1)
            for layer, (keys, _, positions) in zip(cache.layers, before, strict=True):
                after = layer.position_table()[0]
                new_key = layer.entries()[0][0, :, -1]
                for head in range(keys.shape[1]):
                    held = positions[0, head].tolist() + [90 + step]
                    scores = torch.cat([keys[0, head, :, 0], new_key[head, :1]])
                    dropped = sorted(set(held) - set(after[head].tolist()))
                    assert len(dropped) == 1
                    candidates = scores[: len(held) - window]
                    assert float(scores[held.index(dropped[0])]) == float(candidates.min())
