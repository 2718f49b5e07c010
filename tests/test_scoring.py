"""Window attention and CAKE statistics against loop-based references."""

import pytest
import torch

from kvcake.methods import CAKE
from kvcake.methods.attention import NonFiniteAttentionError, window_attention
from kvcake.methods.cake import window_statistics
from kvcake.methods.views import LayerView
from reference import cake_reference


def _qk(batch=2, q_heads=4, kv_heads=2, seq=40, window=8, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, window, dim, generator=g)
    k = torch.randn(batch, kv_heads, seq, dim, generator=g)
    return q, k


def test_window_attention_matches_dense_causal_softmax():
    q, k = _qk()
    attn = window_attention(q, k, scaling=0.25)
    seq, window = k.shape[2], q.shape[2]
    kk = k.repeat_interleave(2, dim=1)
    logits = q @ kk.transpose(-1, -2) * 0.25
    causal = torch.arange(seq)[None, :] <= torch.arange(seq - window, seq)[:, None]
    expected = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    torch.testing.assert_close(attn, expected, atol=1e-6, rtol=1e-5)
    assert torch.all(attn.sum(-1).sub(1).abs() < 1e-5)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_statistics_match_the_reference(pooling):
    q, k = _qk()
    method = CAKE(budget=16, window=8, tau1=1.6, tau2=0.6, pooling=pooling)
    full_q = torch.cat([torch.randn(2, 4, 32, 16), q], dim=2)
    view = LayerView(query=full_q, keys=k, scaling=0.25, key_valid=None, softcap=None, layer=0, num_layers=1)
    attn = view.window_attention(8)
    torch.testing.assert_close(attn, window_attention(q, k, scaling=0.25))
    prefs = method.allocator.preference(view, 8)
    indicator = method.scorer.prefill(view, 8)[..., : 40 - 8]
    ref_prefs, ref_indicator = cake_reference(attn, 2, method.gamma, method.kernel, method.tau1, method.tau2, pooling)
    torch.testing.assert_close(prefs, torch.tensor(ref_prefs, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(indicator.double(), ref_indicator, rtol=1e-4, atol=1e-7)


def test_padded_row_scores_like_the_row_alone():
    q, k = _qk(batch=1, seq=40)
    pad = 12
    k_padded = torch.cat([torch.randn(1, 2, pad, 16), k], dim=2)
    valid = torch.ones(1, 40 + pad, dtype=torch.bool)
    valid[:, :pad] = False
    alone = window_statistics(window_attention(q, k, 0.25))
    padded = window_statistics(window_attention(q, k_padded, 0.25, key_valid=valid))
    torch.testing.assert_close(padded.entropy, alone.entropy)
    torch.testing.assert_close(padded.variance, alone.variance)
    torch.testing.assert_close(padded.indicator(200.0, 5, 2)[..., pad:], alone.indicator(200.0, 5, 2))


def test_non_finite_logits_raise():
    q, k = _qk()
    k[0, 1, 3, 0] = float("nan")
    with pytest.raises(NonFiniteAttentionError):
        window_attention(q, k, 0.25)


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("decode_pooling", ["all", "outside-window"])
def test_decode_scores_pool_each_head_then_average_the_group(pooling, decode_pooling):
    """CAKE's decode-time score (§3.4), against a loop: each query head's attention pooled along the entries (the
    window's own entries unpooled under ``outside-window``), then averaged over the heads sharing a KV head."""
    from kvcake.methods.cake import CakeScores
    from kvcake.methods.views import DecodeView

    g = torch.Generator().manual_seed(3)
    probs = torch.rand(2, 4, 12, generator=g)
    positions = torch.arange(12).expand(2, 2, 12)
    view = DecodeView(query=torch.zeros(2, 4, 1, 8), scaling=1.0, softcap=None, positions=positions, allowed=None,
                      stored=None, probs=probs, window=3)
    got = CakeScores(kernel=5, pooling=pooling, decode_pooling=decode_pooling).decode(view)
    cut = 12 - 3 if decode_pooling == "outside-window" else 12
    expected = torch.zeros(2, 2, 12)
    for b in range(2):
        for head in range(4):
            row = probs[b, head]
            pooled = row.clone()
            for i in range(cut):
                part = row[max(0, i - 2): min(cut, i + 3)]
                pooled[i] = part.sum() / 5 if pooling == "avg" else part.max()
            expected[b, head // 2] += pooled / 2
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
@pytest.mark.parametrize("length", [1, 2, 6, 33])
def test_max_pooling_equals_torchs_max_pool(kernel, length):
    # Max pooling is written with slices (max_pool1d made compiled decoding specialise the entry axis); its values
    # must be exactly max_pool1d's, -inf padding included.
    from kvcake.methods.attention import pool_scores

    x = torch.randn(2, 3, length, generator=torch.Generator().manual_seed(length))
    expected = torch.nn.functional.max_pool1d(x, kernel, stride=1, padding=kernel // 2) if kernel > 1 else x
    assert torch.equal(pool_scores(x, kernel, "max"), expected)
    assert torch.equal(pool_scores(x.reshape(6, length), kernel, "max"), expected.reshape(6, length))


@pytest.mark.parametrize("kernel", [1, 3, 5, 7, 9, 11])
@pytest.mark.parametrize("length", [1, 2, 6, 33, 2245])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_average_pooling_equals_torchs_avg_pool(kernel, length, dtype):
    # Average pooling is written with slices (a seventh of avg_pool1d's time on the CPU); its values must be exactly
    # avg_pool1d's with the zero padding counted, so that kept tokens do not move by a rounding.
    from kvcake.methods.attention import pool_scores

    generator = torch.Generator().manual_seed(length * kernel)
    x = torch.softmax(torch.randn(2, 3, length, generator=generator, dtype=dtype) * 4, dim=-1)
    x = torch.cat([x, torch.randn(1, 3, length, generator=generator, dtype=dtype) * 1e3])  # mixed magnitudes
    expected = (torch.nn.functional.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
                if kernel > 1 else x)
    assert torch.equal(pool_scores(x, kernel, "avg"), expected)
    assert torch.equal(pool_scores(x.reshape(9, length), kernel, "avg"), expected.reshape(9, length))
