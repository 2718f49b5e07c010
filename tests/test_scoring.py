"""Window attention and CAKE statistics against loop-based references."""

import pytest
import torch

from kvcake.methods import CAKE
from kvcake.methods.scoring import NonFiniteAttentionError, cake_statistics, window_attention
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


def test_statistics_match_the_reference():
    q, k = _qk()
    attn = window_attention(q, k, scaling=0.25)
    method = CAKE(budget=16, window=8, tau1=1.6, tau2=0.6)
    prefs, indicator = method.layer_scores(attn, kv_heads=2)
    ref_prefs, ref_indicator = cake_reference(attn, 2, method.gamma, method.kernel, method.tau1, method.tau2)
    torch.testing.assert_close(prefs, torch.tensor(ref_prefs, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(indicator.double(), ref_indicator, rtol=1e-4, atol=1e-7)


def test_padded_row_scores_like_the_row_alone():
    q, k = _qk(batch=1, seq=40)
    pad = 12
    k_padded = torch.cat([torch.randn(1, 2, pad, 16), k], dim=2)
    valid = torch.ones(1, 40 + pad, dtype=torch.bool)
    valid[:, :pad] = False
    alone = cake_statistics(window_attention(q, k, 0.25), 2, 200.0, 5)
    padded = cake_statistics(window_attention(q, k_padded, 0.25, key_valid=valid), 2, 200.0, 5)
    torch.testing.assert_close(padded.entropy, alone.entropy)
    torch.testing.assert_close(padded.variance, alone.variance)
    torch.testing.assert_close(padded.indicator[..., pad:], alone.indicator)


def test_non_finite_logits_raise():
    q, k = _qk()
    k[0, 1, 3, 0] = float("nan")
    with pytest.raises(NonFiniteAttentionError):
        window_attention(q, k, 0.25)
