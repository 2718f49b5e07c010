"""kvcake against NVIDIA kvpress (checked with 0.5.5): the same kept positions per layer and KV head.

Same tiny random Llama (float32), same 300-token prompt, parameters mapped as documented in
``benchmarks/kvpress_crosscheck.py`` (kvpress ``compression_ratio`` r <-> kvcake ``budget`` = ``compute_n_kept``).
Where the two differ by design, the test asserts the exact expected relationship and says why.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

try:
    kvpress = pytest.importorskip("kvpress")  # not installed: skip
except ImportError as exc:  # installed but not importable with this transformers (kvpress 0.5.5 needs < 5.3)
    pytest.skip(f"kvpress does not import here: {exc}", allow_module_level=True)

from kvpress.utils import compute_n_kept  # noqa: E402

import kvcake  # noqa: E402

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kvpress_crosscheck.py"
_spec = importlib.util.spec_from_file_location("kvpress_crosscheck", _SCRIPT)
xc = importlib.util.module_from_spec(_spec)
sys.modules["kvpress_crosscheck"] = xc
_spec.loader.exec_module(xc)

TOKENS = 300
LAYERS = 4


@pytest.fixture(scope="module")
def models():
    return {impl: xc.tiny_llama(impl, layers=LAYERS) for impl in ("eager", "sdpa")}


@pytest.fixture(scope="module")
def ids():
    return xc.random_prompt(TOKENS)


def run(model, press, method, input_ids) -> xc.Result:
    kept_press, scores = xc.kvpress_kept(model, press, input_ids)
    return xc.compare(kept_press, xc.kvcake_kept(model, method, input_ids), scores)


def avg_snapkv(budget, window, kernel=5, **kw):
    return kvcake.SnapKV(budget=budget, window=window, kernel=kernel, pooling="avg", **kw)


# (id, backends, kvpress press, kvcake method): expected to keep identical positions in every (layer, row, head).
N50 = compute_n_kept(TOKENS, 0.5)  # 150
N90 = compute_n_kept(TOKENS, 0.9)  # 29, not 30: int(300 * (1 - 0.9)) = int(29.999999999999993)
IDENTICAL = [
    ("snapkv", ("eager", "sdpa"),
     lambda: kvpress.SnapKVPress(compression_ratio=0.5, window_size=64, kernel_size=5),
     lambda: avg_snapkv(N50, 64)),
    ("snapkv-r0.3-W16-K7", ("sdpa",),
     lambda: kvpress.SnapKVPress(compression_ratio=0.3, window_size=16, kernel_size=7),
     lambda: avg_snapkv(compute_n_kept(TOKENS, 0.3), 16, kernel=7)),
    ("streamingllm", ("eager", "sdpa"),
     lambda: kvpress.StreamingLLMPress(compression_ratio=0.5, n_sink=4),
     lambda: kvcake.StreamingLLM(budget=N50, sinks=4, decode_eviction=False)),
    ("tova", ("eager", "sdpa"),
     lambda: kvpress.TOVAPress(compression_ratio=0.5),
     lambda: kvcake.TOVA(budget=N50, decode_eviction=False)),
    # PyramidKV with beta mapped: kvpress budgets m*w_l(5) = [270, 190, 110, 30] (window included), kvcake's
    # W + (m - W) w_l(b') with b' = (m - W) / (m/5 - W) = 134/14 gives the same integers.
    ("pyramidkv-mapped-beta", ("eager", "sdpa"),
     lambda: kvpress.PyramidKVPress(compression_ratio=0.5, window_size=16, kernel_size=5, beta=5),
     lambda: kvcake.PyramidKV(budget=150, window=16, kernel=5, pooling="avg", beta=134 / 14)),
    # kvpress falls back to uniform SnapKV with round(q (1 - r)) = 60 when min = m/beta < W; kvcake: beta = 1.
    ("pyramidkv-kvpress-fallback", ("sdpa",),
     lambda: kvpress.PyramidKVPress(compression_ratio=0.8, window_size=16, kernel_size=5, beta=20),
     lambda: kvcake.PyramidKV(budget=60, window=16, kernel=5, pooling="avg", beta=1.0)),
    # Ada-KV with alpha mapped so that kvcake's floor beyond the window, int(a' (n - W)), equals kvpress's
    # int(a n) - W = int(0.7 * 29) - 8 = 12 (AdaKVPress refuses eager attention).
    ("adakv-mapped-alpha", ("sdpa",),
     lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=0.9, window_size=8, kernel_size=5),
                                alpha_safeguard=0.7),
     lambda: kvcake.AdaKV(avg_snapkv(N90, 8), alpha=xc.ada_equivalent_alpha(N90, 8, 0.7))),
    ("adakv-default-alpha", ("sdpa",),  # floor not binding here: kvpress's int(0.2 * 150) = 30 < W = 64 keeps none
     lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=0.5, window_size=64, kernel_size=5)),
     lambda: kvcake.AdaKV(avg_snapkv(N50, 64), alpha=0.0)),
]
PARAMS = [pytest.param(backend, press, method, id=f"{name}-{backend}")
          for name, backends, press, method in IDENTICAL for backend in backends]


@pytest.mark.parametrize("backend, make_press, make_method", PARAMS)
def test_identical_kept_positions(models, ids, backend, make_press, make_method):
    res = run(models[backend], make_press(), make_method(), ids)
    assert res.identical == res.triples, (
        f"{res.triples - res.identical}/{res.triples} (layer, row, head) differ, Jaccard {res.jaccard:.4f}; "
        f"kvpress kept {res.kvpress_counts.flatten().tolist()}, kvcake {res.kvcake_counts.flatten().tolist()}"
    )


def test_parameter_mappings():
    assert N50 == 150 and N90 == 29  # kvpress truncates: int(300 * (1 - 0.9)) = int(29.999999999999993)
    assert xc.pyramid_equivalent(TOKENS, 0.5, 16, 5, LAYERS) == (150, pytest.approx(134 / 14), True)
    assert xc.pyramid_equivalent(TOKENS, 0.8, 16, 20, LAYERS) == (60, 1.0, True)  # kvpress's fallback
    assert xc.kvpress_pyramid_budgets(TOKENS, 0.5, 16, 5, LAYERS) == [270, 190, 110, 30]
    assert xc.kvcake_pyramid_budgets(150, 16, 134 / 14, TOKENS, LAYERS) == [270, 190, 110, 30]
    assert int(xc.ada_equivalent_alpha(29, 8, 0.7) * (29 - 8)) == int(0.7 * 29) - 8 == 12


def test_pyramidkv_same_beta_differs_by_design(models, ids):
    """Same beta: kvpress builds the pyramid over each layer's whole count *including* the window (top layer m/beta),
    kvcake (like the original PyramidKV code) over the evictable part n - W, adding the window to every layer (top
    layer W + (n - W)/beta). Both keep the top-k of identical scores, so per layer the sets are nested."""
    res = run(models["sdpa"],
              kvpress.PyramidKVPress(compression_ratio=0.5, window_size=16, kernel_size=5, beta=5),
              kvcake.PyramidKV(budget=150, window=16, kernel=5, pooling="avg", beta=5), ids)
    assert res.kvpress_counts[:, 0, 0].tolist() == [270, 190, 110, 30]  # 150 * (1.8, 1.267, 0.733, 0.2)
    assert res.kvcake_counts[:, 0, 0].tolist() == [257, 186, 114, 43]   # 16 + 134 * (1.8, 1.267, 0.733, 0.2)
    assert res.kvpress_counts.sum() == res.kvcake_counts.sum()           # same total memory
    assert res.nested == res.triples
    assert res.identical == 0


def test_pyramidkv_kvpress_clamp_leaves_top_layer_only_its_window(models, ids):
    """kvpress defaults (W=64, beta=20) on a short prompt: its clamp max = q_len - W (inherited from the original,
    where max was a count *beyond* the window) makes layer 0 keep 236 of 300 and the top layer only its window. No
    finite kvcake beta gives a layer zero evictable tokens; the script reports this case instead of comparing it."""
    budgets = xc.kvpress_pyramid_budgets(TOKENS, 0.5, 64, 20, LAYERS)
    assert budgets == [236, 179, 121, 64]
    press = kvpress.PyramidKVPress(compression_ratio=0.5, window_size=64, kernel_size=5, beta=20)
    kept, _ = xc.kvpress_kept(models["sdpa"], press, ids)
    assert kept[-1][..., -64:].all() and not kept[-1][..., :-64].any()


def test_adakv_same_alpha_differs_by_design(models, ids):
    """Same alpha: kvpress guarantees each head its top int(alpha n) entries counting the window (which always
    ranks first), kvcake int(alpha (n - W)) entries beyond the window (the original Ada-KV's base_capacity - window).
    When the floor binds, heads get different counts; the layer total is the same and each head keeps a top-k of
    the same scores, so per head the sets are nested."""
    n, window, alpha = N90, 8, 0.7
    res = run(models["sdpa"],
              kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=0.9, window_size=window, kernel_size=5),
                                 alpha_safeguard=alpha),
              kvcake.AdaKV(avg_snapkv(n, window), alpha=alpha), ids)
    assert xc.check_ada(n, window, alpha)(res) == []
    assert int(res.kvpress_counts.min()) >= int(alpha * n)                    # 20
    assert int(res.kvcake_counts.min()) >= window + int(alpha * (n - window))  # 22
    assert res.identical < res.triples  # the floors differ (12 vs 14 beyond the window) and bind in some layers


def test_ratio_mode_rounds_instead_of_truncating(models, ids):
    """kvcake's ``ratio`` is the kept fraction and rounds the total over layers; kvpress truncates per layer:
    r = 0.8 keeps int(300 * 0.19999999999999996) = 59 in kvpress, round(0.2 * 300 * 4) / 4 = 60 in kvcake."""
    res = run(models["sdpa"], kvpress.SnapKVPress(compression_ratio=0.8, window_size=32, kernel_size=5),
              avg_snapkv(None, 32, ratio=0.2), ids)
    assert set(res.kvpress_counts.flatten().tolist()) == {59}
    assert set(res.kvcake_counts.flatten().tolist()) == {60}
    assert res.nested == res.triples


def test_budget_below_window_kvpress_keeps_part_of_its_window(models, ids):
    """kvpress accepts n_kept < window_size: it then keeps n_kept of the window's W entries, which all score
    max + 1 (a tie, resolved by torch.topk). kvcake refuses a budget below the window."""
    n = compute_n_kept(TOKENS, 0.9)  # 29 < 64
    kept, _ = xc.kvpress_kept(models["sdpa"], kvpress.SnapKVPress(compression_ratio=0.9, window_size=64), ids)
    for layer in kept:
        assert not layer[..., :-64].any() and (layer.sum(-1) == n).all()
    with pytest.raises(ValueError, match="smaller than the window"):
        avg_snapkv(n, 64)


def test_bfloat16_differences_are_only_score_precision_and_ties(ids):
    """In bfloat16 kvpress scores in the model dtype (softmax cast back to bf16, then mean, pool and GQA mean in
    bf16) while kvcake scores in float32, and bf16 scores tie massively. With kvpress's arithmetic plugged into
    kvcake as its scorer, every remaining difference is only the choice among tied scores (kvcake: earliest
    position; kvpress: whatever torch.topk returns)."""
    model = xc.tiny_llama("sdpa", torch.bfloat16, layers=LAYERS)
    press = kvpress.SnapKVPress(compression_ratio=0.5, window_size=64, kernel_size=5)
    res = run(model, press, kvcake.SnapKV(budget=N50, window=64, scorer=xc.ModelDtypeSnapKVScores(5)), ids)
    assert res.tie_consistent == res.triples
    float32_scored = run(model, press, avg_snapkv(N50, 64), ids)
    assert float32_scored.identical < float32_scored.triples


# -- KNorm and Expected Attention ----------------------------------------------------------------------------------

NEW_SCORERS = [
    *(case[:4] for case in xc.last_token_cases(0.5)),
    ("expected-attention-no-cov-eps", lambda: kvpress.ExpectedAttentionPress(
        compression_ratio=0.5, n_future_positions=64, n_sink=2, use_covariance=False, epsilon=0.01),
     lambda: kvcake.ExpectedAttentionScores(n_future_positions=64, n_sink=2, use_covariance=False, epsilon=0.01),
     1e-5),
]
NEW_PARAMS = [pytest.param(backend, press, scorer, rtol, id=f"{name}-{backend}")
              for name, press, scorer, rtol in NEW_SCORERS for backend in ("eager", "sdpa")]


@pytest.mark.parametrize("backend, make_press, make_scorer, rtol", NEW_PARAMS)
def test_new_scorers_match_kvpress_and_differ_only_by_the_protected_last_token(models, ids, backend, make_press,
                                                                                make_scorer, rtol):
    """Same definition: kvcake's raw scores equal kvpress's (KNorm bit for bit; Expected Attention to float32
    rounding, since kvcake un-rotates the post-RoPE queries where kvpress projects the hidden states again).

    By design KnormPress and ExpectedAttentionPress protect no window, while kvcake always keeps the last
    ``window >= 1`` tokens (default 1). So at the same kept count n, per (layer, row, head), kvcake keeps exactly the
    last token plus the n - 1 best others by kvpress's own scores (ties to the earlier position) and kvpress a top-n
    of the same scores: where kvpress keeps the last token and its cut-off is not tied, the sets are identical;
    elsewhere kvcake keeps the last token instead of kvpress's lowest-scored kept entry. (Exact ties occur with KNorm
    in the first layer: RoPE preserves norms, so a repeated token has the same key norm at every position.)"""
    res = xc.run_last_token(models[backend], make_press(), make_scorer(), ids)
    assert res.score_rel_diff <= rtol
    assert res.kvpress_top_n == res.triples
    assert res.rule == res.triples
    assert res.identical_where_expected == res.expected_identical > 0
    assert res.expected_identical <= res.identical < res.triples  # the last token is not always among kvpress's


def test_expected_attention_keeps_the_sinks_like_kvpress(models, ids):
    press = kvpress.ExpectedAttentionPress(compression_ratio=0.9)
    kept_press, _ = xc.kvpress_kept(models["sdpa"], press, ids)
    kept_cake = xc.kvcake_kept(models["sdpa"], kvcake.ExpectedAttention(budget=N90), ids)
    for a, b in zip(kept_press, kept_cake, strict=True):
        assert bool(a[..., :4].all()) and bool(b[..., :4].all())
