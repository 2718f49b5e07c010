"""Cross-check kvcake's prefill eviction against NVIDIA kvpress (written against kvpress 0.5.5).

    python benchmarks/kvpress_crosscheck.py [--tokens 300] [--ratio 0.5] [--backends eager sdpa]
                                            [--dtype float32|bfloat16] [--model tiny|smollm2]

For each method, the same model and prompt are prefilled once under kvpress and once under kvcake, and the original
positions each side keeps are compared per (layer, batch row, KV head). Printed per method: how many (layer, row,
head) triples keep identical position sets, the overall Jaccard overlap (sum of intersections / sum of unions), and
how many triples are "tie-consistent" (kvcake's set is a valid top-k of kvpress's own scores, i.e. they differ at
most among tokens whose kvpress score ties at the cut-off). The exit status is non-zero if a method that should
match does not, or if a documented difference does not have exactly the expected form.

How kept positions are read
---------------------------
kvpress: its ``compress`` is wrapped; the keys it returns are matched row by row (exact equality; post-RoPE keys are
unique per position) against the full keys it received. For Ada-KV, which keeps every entry and only masks, the
positions in ``module.masked_key_indices`` are removed. kvpress's raw scores are captured from ``score``.
kvcake: ``layer.position_table()`` of the injected cache (``-1`` = filler slot of a head that keeps fewer).

Parameter mapping (kvpress -> kvcake)
-------------------------------------
* compression ratio r <-> budget n = ``kvpress.utils.compute_n_kept(q_len, r)`` = ``max(1, int(q_len * (1 - r)))``,
  the tokens kvpress keeps per layer (and per head); kvcake's ``budget`` is tokens per layer *including* the window.
  (kvcake's own ``ratio=`` is the kept fraction, 1 - r, and rounds the whole-model total instead of truncating per
  layer, so use ``budget=`` for an exact comparison.)
* ``SnapKVPress(r, window_size=W, kernel_size=K)`` <-> ``SnapKV(budget=n, window=W, kernel=K, pooling="avg")``
  (kvpress always average-pools; kvcake defaults are W=32, K=7, max pooling as in the SnapKV paper).
* ``StreamingLLMPress(r, n_sink=s)`` <-> ``StreamingLLM(budget=n, sinks=s, decode_eviction=False)``.
* ``TOVAPress(r)`` <-> ``TOVA(budget=n, decode_eviction=False)`` (both protect only the last token).
* ``KnormPress(r)`` and ``ExpectedAttentionPress(r)`` <-> ``Method(budget=n, window=1, scorer=KNormScores())`` and
  ``scorer=ExpectedAttentionScores()`` (the same defaults). kvpress protects no window, kvcake at least the last
  token: kvcake must keep exactly the last token plus the n - 1 best others by kvpress's own scores, and be
  identical wherever kvpress keeps the last token (rows "kvcake window 1"); the raw scores are also compared.
* ``AdaKVPress(SnapKVPress(...), alpha_safeguard=a)`` <-> ``AdaKV(SnapKV(...), alpha=a')``. kvpress guarantees
  each head its top ``int(a * n)`` entries *counting the window* (which always ranks first); kvcake guarantees
  ``int(a' * (n - W))`` entries *beyond the window* (the original Ada-KV code also takes its floor from the budget
  beyond the window). Same a: the floors differ and, where they bind, so do the per-head counts (kvpress's default
  a = 0.2 with W = 64 guarantees nothing beyond the window while n < 325). Equivalent: ``a'`` with
  ``int(a' * (n - W)) == max(0, int(a * n) - W)`` (``ada_equivalent_alpha``).
* ``PyramidKVPress(r, window_size=W, beta=b)`` <-> ``PyramidKV(budget=n, window=W, beta=b')``. kvpress spreads
  the *whole* per-layer count (window included) linearly from ``2m - m/b`` (layer 0) to ``m/b`` (top layer),
  m = q_len * (1 - r), rounding each layer with ``round``; if ``max >= q_len - W`` it sets max = q_len - W and
  min = 2m - max; and it falls back to a uniform SnapKV budget ``round(m)`` unless ``q_len >= max >= min >= W``.
  kvcake spreads only the evictable part ``n - W`` (from ``(n - W)(2 - 1/b)`` to ``(n - W)/b``, the window added
  to every layer, as the original PyramidKV code does), capped at the prompt, and apportions integers exactly.
  Same b: different per-layer budgets (same total). Equivalent: budget m and ``b' = (m - W) / (min - W)`` (b' = 1
  when kvpress falls back; none when min == W), exact whenever kvpress's per-layer budgets are integers, else
  within kvpress's per-layer rounding (``pyramid_equivalent``).

Low precision (``--dtype bfloat16``): kvpress scores in the model dtype, kvcake in float32, so score-based methods
are only reported; the extra row "kvcake scored in model dtype" plugs kvpress's arithmetic into kvcake and must then
differ only among tied scores.

Everything is prefill-only; kvpress compresses only during prefill.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

import kvcake

try:
    import kvpress
    from kvpress.utils import compute_n_kept
except ImportError:  # pragma: no cover - the script needs kvpress; the test skips without it
    kvpress = None

    def compute_n_kept(k_len: int, compression_ratio: float) -> int:
        return max(1, int(k_len * (1 - compression_ratio)))


# -- models and prompts ----------------------------------------------------------------------------------------------
def tiny_llama(impl: str = "sdpa", dtype: torch.dtype = torch.float32, layers: int = 4, seed: int = 0):
    """A tiny random Llama: vocab 128, hidden 64, 4 query heads, 2 KV heads, head_dim 16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM._from_config(cfg, attn_implementation=impl, dtype=dtype).eval()


def random_prompt(tokens: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, tokens), generator=g)


def smollm2(impl: str, dtype: torch.dtype, tokens: int, batch: int = 1):
    """The embedded SmolLM2-135M (kvcake.models.load) and ``tokens`` tokens of kvcake's sample text."""
    import importlib.resources

    import transformers

    from kvcake import models

    transformers.utils.logging.disable_progress_bar()
    model, tokenizer = models.load(dtype=dtype, attn_implementation=impl)
    text = (importlib.resources.files("kvcake") / "data" / "sample.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids
    while ids.shape[1] < tokens:
        ids = torch.cat([ids, ids], dim=1)
    return model, ids[:, :tokens].expand(batch, -1).contiguous()


# -- reading what each side kept ---------------------------------------------------------------------------------------
def _rows_in(full: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Bool ``(B, H, S)``: which rows of ``full`` (B, H, S, D) appear in ``kept`` (B, H, n, D), by exact equality."""
    batch, heads, seq, _ = full.shape
    mask = torch.zeros(batch, heads, seq, dtype=torch.bool)
    if kept.shape == full.shape and torch.equal(kept, full):
        mask[:] = True
        return mask
    for b in range(batch):
        for h in range(heads):
            eq = (kept[b, h][:, None, :] == full[b, h][None, :, :]).all(-1)  # (n, S)
            hits = eq.sum(-1)
            if not bool((hits == 1).all()):
                raise RuntimeError(f"row {b} head {h}: a kept key matches {hits.tolist()} positions, expected one")
            idx = eq.int().argmax(-1).cpu()
            if idx.unique().numel() != idx.numel():
                raise RuntimeError(f"row {b} head {h}: kvpress kept a position twice")
            mask[b, h, idx] = True
    return mask


def kvpress_kept(model, press, input_ids) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Kept masks ``(B, Hkv, S)`` per layer under ``press`` and kvpress's raw scores ``(B, Hkv, S)`` (float32)."""
    kept: dict[int, torch.Tensor] = {}
    scores: dict[int, torch.Tensor] = {}
    scorer = press.press if isinstance(press, kvpress.AdaKVPress) else press
    original_score, original_compress = scorer.score, press.compress

    def score(module, *args, **kwargs):
        s = original_score(module, *args, **kwargs)
        scores[module.layer_idx] = s.detach().float().cpu().clone()  # AdaKV edits its scores in place afterwards
        return s

    def compress(module, hidden_states, keys, values, attentions, kwargs):
        module.masked_key_indices = None
        new_keys, new_values = original_compress(module, hidden_states, keys, values, attentions, kwargs)
        mask = _rows_in(keys, new_keys)
        masked = getattr(module, "masked_key_indices", None)
        if masked is not None:  # Ada-KV: entries stay in the cache but are masked out of attention
            b, h, s = (t.cpu() for t in masked)
            mask[b, h, s] = False
        kept[module.layer_idx] = mask
        return new_keys, new_values

    scorer.score, press.compress = score, compress
    try:
        with torch.no_grad(), press(model):
            model(input_ids, use_cache=True)
    finally:
        del scorer.score, press.compress
        for module in model.modules():  # leave nothing for kvpress's attention patch to apply later
            if hasattr(module, "masked_key_indices"):
                module.masked_key_indices = None
    order = sorted(kept)
    return [kept[i] for i in order], [scores[i] for i in order]


def kvcake_kept(model, method, input_ids) -> list[torch.Tensor]:
    """Kept masks ``(B, Hkv, S)`` per layer under the kvcake ``method``."""
    seq = input_ids.shape[1]
    out = []
    with torch.no_grad(), kvcake.compress(model, method) as press:
        model(input_ids, use_cache=True)
        for layer in press.cache.layers:
            pos = layer.position_table().cpu()
            valid = pos >= 0
            mask = torch.zeros(*pos.shape[:2], seq + 1, dtype=torch.bool)
            mask.scatter_(-1, torch.where(valid, pos, seq), True)
            mask = mask[..., :seq]
            if not torch.equal(mask.sum(-1), valid.sum(-1)):
                raise RuntimeError("kvcake holds a position twice")
            out.append(mask)
    return out


# -- comparing -------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    triples: int
    identical: int
    jaccard: float
    tie_consistent: int
    nested: int
    kvpress_counts: torch.Tensor  # (L, B, H)
    kvcake_counts: torch.Tensor

    @property
    def identical_fraction(self) -> float:
        return self.identical / self.triples


def compare(a: list[torch.Tensor], b: list[torch.Tensor], scores: list[torch.Tensor]) -> Result:
    """``a`` kvpress masks, ``b`` kvcake masks, ``scores`` kvpress's raw scores; all per layer ``(B, H, S)``."""
    A, B, S = torch.stack(a), torch.stack(b), torch.stack(scores)  # (L, B, H, S)
    same = (A == B).all(-1)
    inter, union = (A & B).sum(), (A | B).sum()
    nested = ((A & ~B).sum(-1) == 0) | ((B & ~A).sum(-1) == 0)
    thr = torch.where(A, S, torch.full_like(S, float("inf"))).amin(-1, keepdim=True)  # kvpress's cut-off score
    consistent = ((thr < S) <= B).all(-1) & ((thr <= S) >= B).all(-1) & (A.sum(-1) == B.sum(-1))
    return Result(
        triples=same.numel(), identical=int(same.sum()), jaccard=float(inter) / max(1, float(union)),
        tie_consistent=int(consistent.sum()), nested=int(nested.sum()), kvpress_counts=A.sum(-1),
        kvcake_counts=B.sum(-1),
    )


# -- parameter mappings ----------------------------------------------------------------------------------------------
def kvpress_pyramid_budgets(q_len: int, ratio: float, window: int, beta: float, num_layers: int) -> list[int]:
    """kvpress's own per-layer kept counts (``PyramidKVPress.get_layer_budget``)."""
    press = kvpress.PyramidKVPress(compression_ratio=ratio, window_size=window, beta=beta)
    config = SimpleNamespace(num_hidden_layers=num_layers)
    return [press.get_layer_budget(SimpleNamespace(config=config, layer_idx=i), q_len) for i in range(num_layers)]


def kvcake_pyramid_budgets(budget: int, window: int, beta: float, q_len: int, num_layers: int) -> list[int]:
    """kvcake's per-layer kept counts for ``PyramidKV(budget, window, beta)`` (window included)."""
    shares = kvcake.Pyramid(beta=beta).split([1.0] * num_layers, (budget - window) * num_layers, q_len - window,
                                             num_layers)
    return [s + window for s in shares]


def pyramid_equivalent(q_len: int, ratio: float, window: int, beta: float, num_layers: int):
    """kvcake ``(budget, beta)`` reproducing kvpress's PyramidKV budgets, and whether the match is exact.

    Mirrors ``PyramidKVPress.get_layer_budget``: m = q_len (1 - r), min = m / beta, max = 2m - min (clamped to
    q_len - W), layer l keeps max - l (max - min) / (L - 1) tokens, window included. kvcake's layer l keeps
    W + (budget - W) w_l with w_l linear from 2 - 1/b' to 1/b': equal when budget = m and b' = (m - W) / (min - W).
    """
    m = q_len * (1 - ratio)
    min_num = m / beta
    max_num = 2 * m - min_num
    if max_num >= q_len - window:
        max_num = q_len - window
        min_num = 2 * m - max_num
    if not (q_len >= max_num >= min_num >= window) or num_layers == 1:
        fallback = max(1, round(m))  # kvpress falls back to a uniform SnapKV budget
        return fallback, 1.0, True
    budget = round(m)
    if min_num - window <= 0:
        return budget, float("inf"), False
    steps = (max_num - min_num) / (num_layers - 1)
    continuous = [max_num - i * steps for i in range(num_layers)]
    exact = abs(m - budget) < 1e-9 and all(abs(t - round(t)) < 1e-9 for t in continuous)
    return budget, (m - window) / (min_num - window), exact


def ada_equivalent_alpha(n_kept: int, window: int, alpha: float) -> float:
    """kvcake ``alpha`` whose floor ``int(alpha (n - W))`` equals kvpress's effective floor beyond the window."""
    n_safe = int(n_kept * alpha)
    if alpha > 0:
        n_safe = max(1, n_safe) if n_kept > 0 else 0
    floor = max(0, n_safe - window)
    if floor == 0 or n_kept <= window:
        return 0.0
    return min(1.0, (floor + 0.5) / (n_kept - window))


@dataclass(frozen=True)
class ModelDtypeSnapKVScores:
    """A kvcake scorer doing kvpress's SnapKV arithmetic (``SnapKVPress.compute_window_attention`` + ``score``) in the
    model's dtype instead of kvcake's float32: used to show that low-precision differences come only from that."""

    kernel: int = 5
    name = "snapkv-model-dtype"
    keeps_scores = False

    def prefill(self, view, window: int) -> torch.Tensor:
        import torch.nn.functional as F
        from transformers.models.llama.modeling_llama import repeat_kv

        query, keys = view.query[:, :, -window:], view.keys
        batch, q_heads, _, dim = query.shape
        kv_heads, seq = keys.shape[1], keys.shape[2]
        attn = torch.matmul(query, repeat_kv(keys, q_heads // kv_heads).transpose(2, 3)) / math.sqrt(dim)
        attn = attn + torch.triu(torch.ones_like(attn) * float("-inf"), diagonal=seq - window + 1)
        attn = torch.softmax(attn, dim=-1, dtype=torch.float32).to(query.dtype)[..., :-window]
        scores = F.avg_pool1d(attn.mean(dim=-2), kernel_size=self.kernel, padding=self.kernel // 2, stride=1)
        scores = scores.view(batch, kv_heads, q_heads // kv_heads, seq - window).mean(2).float()
        return torch.cat([scores, scores.new_full((batch, kv_heads, window), float("inf"))], dim=-1)

    def decode(self, ctx):  # pragma: no cover - prefill-only comparison
        raise NotImplementedError


# -- scorers kvpress applies without a window: KNorm, Expected Attention ---------------------------------------------
class RecordingScorer:
    """Wraps a kvcake scorer and keeps its raw prefill scores per layer (what the engine ranks), float32 on the CPU."""

    def __init__(self, scorer):
        self.scorer, self.scores = scorer, {}

    def __getattr__(self, name):
        return getattr(self.scorer, name)

    def prefill(self, view, window: int) -> torch.Tensor:
        scores = self.scorer.prefill(view, window)
        self.scores[view.layer] = scores.detach().float().cpu().clone()
        return scores


@dataclass
class LastTokenResult:
    """kvpress (no window) against kvcake (window 1) at the same kept count n, per (layer, row, head).

    ``rule``: kvcake keeps exactly the last token plus the n - 1 best other entries by kvpress's own scores (ties to
    the earlier position). ``identical_where_expected`` of ``expected_identical``: the triples where kvpress keeps the
    last token and its cut-off score is not tied, and the two sets are identical there. ``score_rel_diff``: the
    largest relative difference between kvcake's and kvpress's raw scores.
    """

    triples: int
    identical: int
    rule: int
    kvpress_top_n: int
    expected_identical: int
    identical_where_expected: int
    score_rel_diff: float
    jaccard: float


def last_token_comparison(kept_press, kept_cake, press_scores, cake_scores, n: int) -> LastTokenResult:
    """Compare per-layer kept masks ``(B, H, S)`` and raw scores of kvpress (no window) and kvcake (window 1)."""
    triples = identical = rule = top_n = expected = matched = 0
    inter = union = 0
    rel = 0.0
    for a, b, s, c in zip(kept_press, kept_cake, press_scores, cake_scores, strict=True):
        rel = max(rel, float(((c - s).abs() / s.abs().clamp_min(torch.finfo(s.dtype).tiny)).max()))
        last = s.shape[-1] - 1
        inter, union = inter + int((a & b).sum()), union + int((a | b).sum())
        for row in range(a.shape[0]):
            for head in range(a.shape[1]):
                pa, pb, ps = a[row, head], b[row, head], s[row, head]
                triples += 1
                same = torch.equal(pa, pb)
                identical += int(same)
                top_n += int(int(pa.sum()) == n and float(ps[pa].min()) >= float(ps[~pa].max()))
                best = torch.sort(ps[:last], descending=True, stable=True).indices[: n - 1]
                want = torch.zeros_like(pb)
                want[best] = True
                want[last] = True
                rule += int(torch.equal(pb, want))
                if bool(pa[last]) and int((ps == ps[pa].min()).sum()) == 1:
                    expected += 1
                    matched += int(same)
    return LastTokenResult(triples, identical, rule, top_n, expected, matched, rel, inter / max(1, union))


def run_last_token(model, press, scorer, input_ids) -> LastTokenResult:
    """Prefill under ``press`` and under kvcake's ``scorer`` with window 1 at the count kvpress keeps."""
    n = compute_n_kept(input_ids.shape[1], press.compression_ratio)
    recorder = RecordingScorer(scorer)
    kept_press, press_scores = kvpress_kept(model, press, input_ids)
    kept_cake = kvcake_kept(model, kvcake.Method(budget=n, window=1, scorer=recorder), input_ids)
    cake_scores = [recorder.scores[i] for i in sorted(recorder.scores)]
    return last_token_comparison(kept_press, kept_cake, press_scores, cake_scores, n)


def last_token_cases(ratio: float) -> list[tuple[str, Callable, Callable, float, bool]]:
    """(name, kvpress press, kvcake scorer, largest relative score difference accepted in float32, whether both
    sides also score alike in low precision). KnormPress takes the norm in float32 like kvcake;
    ExpectedAttentionPress computes in the model dtype, so in bfloat16 it is only reported."""
    return [
        ("knorm", lambda: kvpress.KnormPress(compression_ratio=ratio), lambda: kvcake.KNormScores(), 0.0, True),
        ("expected-attention", lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
         lambda: kvcake.ExpectedAttentionScores(), 1e-4, False),
    ]


# -- the cases -------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    make_press: Callable
    make_method: Callable
    expect: str  # "identical", "tie-consistent", or "relationship" (a documented difference, exact expected form)
    relationship: Callable[[Result], list[str]] | None = None
    score_based: bool = True
    backends: tuple[str, ...] = ("eager", "sdpa")
    note: str = ""
    results: dict = field(default_factory=dict)


def check_pyramid(kp_budgets: list[int], kc_budgets: list[int]) -> Callable[[Result], list[str]]:
    def check(res: Result) -> list[str]:
        problems = []
        kp = torch.tensor(kp_budgets)[:, None, None].expand_as(res.kvpress_counts)
        kc = torch.tensor(kc_budgets)[:, None, None].expand_as(res.kvcake_counts)
        if not torch.equal(res.kvpress_counts, kp):
            problems.append(f"kvpress kept {res.kvpress_counts[:, 0, 0].tolist()} per layer, expected {kp_budgets}")
        if not torch.equal(res.kvcake_counts, kc):
            problems.append(f"kvcake kept {res.kvcake_counts[:, 0, 0].tolist()} per layer, expected {kc_budgets}")
        if res.nested != res.triples:
            problems.append(f"only {res.nested}/{res.triples} kept sets are nested (same scores, top-k of each)")
        return problems

    return check


def check_ada(n_kept: int, window: int, alpha: float) -> Callable[[Result], list[str]]:
    def check(res: Result) -> list[str]:
        problems = []
        heads = res.kvpress_counts.shape[-1]
        if not torch.equal(res.kvpress_counts.sum(-1), torch.full_like(res.kvpress_counts.sum(-1), heads * n_kept)):
            problems.append("kvpress does not keep heads * n entries per layer")
        if not torch.equal(res.kvcake_counts.sum(-1), res.kvpress_counts.sum(-1)):
            problems.append("kvcake and kvpress keep different totals per layer")
        n_safe = max(1, int(n_kept * alpha)) if alpha > 0 else 0
        if int(res.kvpress_counts.min()) < max(window, n_safe):
            problems.append(f"a kvpress head keeps fewer than max(W, int(alpha n)) = {max(window, n_safe)}")
        kc_floor = window + int(alpha * (n_kept - window))
        if int(res.kvcake_counts.min()) < kc_floor:
            problems.append(f"a kvcake head keeps fewer than W + int(alpha (n - W)) = {kc_floor}")
        if res.nested != res.triples:
            problems.append(f"only {res.nested}/{res.triples} per-head kept sets are nested")
        return problems

    return check


def build_cases(q_len: int, ratio: float, window: int, kernel: int, sinks: int, alpha: float,
                pyramid_window: int, beta: float, num_layers: int, notes: list[str] | None = None,
                low_precision: bool = False) -> list[Case]:
    """The kvpress/kvcake pairs; reasons for leaving a pair out are appended to ``notes``."""
    n = compute_n_kept(q_len, ratio)
    notes = [] if notes is None else notes
    cases = []
    if n >= window:
        cases.append(Case(
            f"snapkv W={window} K={kernel}",
            lambda: kvpress.SnapKVPress(compression_ratio=ratio, window_size=window, kernel_size=kernel),
            lambda: kvcake.SnapKV(budget=n, window=window, kernel=kernel, pooling="avg"),
            "identical",
        ))
        if low_precision:
            cases.append(Case(
                f"snapkv W={window} K={kernel}, kvcake scored in model dtype",
                lambda: kvpress.SnapKVPress(compression_ratio=ratio, window_size=window, kernel_size=kernel),
                lambda: kvcake.SnapKV(budget=n, window=window, scorer=ModelDtypeSnapKVScores(kernel)),
                "tie-consistent", score_based=False,
                note="kvpress's arithmetic in kvcake: what is left is the choice among tied scores",
            ))
    cases.append(Case(
        f"streamingllm sinks={sinks}",
        lambda: kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=sinks),
        lambda: kvcake.StreamingLLM(budget=n, sinks=sinks, decode_eviction=False),
        "identical", score_based=False,
    ))
    cases.append(Case(
        "tova",
        lambda: kvpress.TOVAPress(compression_ratio=ratio),
        lambda: kvcake.TOVA(budget=n, decode_eviction=False),
        "identical",
    ))
    # PyramidKV, same beta: kvpress's pyramid is over the whole count (window included), kvcake's over n - W.
    kp_budgets = kvpress_pyramid_budgets(q_len, ratio, pyramid_window, beta, num_layers)
    if n >= pyramid_window:
        cases.append(Case(
            f"pyramidkv W={pyramid_window} beta={beta:g} (same beta)",
            lambda: kvpress.PyramidKVPress(compression_ratio=ratio, window_size=pyramid_window, kernel_size=kernel,
                                           beta=beta),
            lambda: kvcake.PyramidKV(budget=n, window=pyramid_window, kernel=kernel, pooling="avg", beta=beta),
            "relationship",
            check_pyramid(kp_budgets, kvcake_pyramid_budgets(n, pyramid_window, beta, q_len, num_layers)),
            note=f"kvpress per-layer {kp_budgets} vs kvcake "
                 f"{kvcake_pyramid_budgets(n, pyramid_window, beta, q_len, num_layers)}",
        ))
    budget, beta_eq, exact = pyramid_equivalent(q_len, ratio, pyramid_window, beta, num_layers)
    if not math.isfinite(beta_eq):
        notes.append(f"pyramidkv: kvpress's top layer keeps only its window ({kp_budgets}); kvcake's Pyramid needs a "
                     "finite beta, so no kvcake setting reproduces it exactly")
    elif budget < pyramid_window:
        notes.append(f"pyramidkv: kvpress's mean budget {budget} is below the window; kvcake requires budget >= window")
    else:
        kc_budgets = kvcake_pyramid_budgets(budget, pyramid_window, beta_eq, q_len, num_layers)
        cases.append(Case(
            f"pyramidkv W={pyramid_window} beta={beta:g} -> kvcake beta={beta_eq:.4g}",
            lambda: kvpress.PyramidKVPress(compression_ratio=ratio, window_size=pyramid_window, kernel_size=kernel,
                                           beta=beta),
            lambda: kvcake.PyramidKV(budget=budget, window=pyramid_window, kernel=kernel, pooling="avg",
                                     beta=beta_eq),
            "identical" if exact else "relationship",
            None if exact else check_pyramid(kp_budgets, kc_budgets),
            note="" if exact else f"kvpress rounds each layer ({kp_budgets}), kvcake apportions exactly "
                                  f"({kc_budgets})",
        ))
    if n >= window:
        cases.append(Case(
            f"ada-snapkv W={window} alpha={alpha:g} (same alpha)",
            lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio, window_size=window,
                                                           kernel_size=kernel), alpha_safeguard=alpha),
            lambda: kvcake.AdaKV(kvcake.SnapKV(budget=n, window=window, kernel=kernel, pooling="avg"), alpha=alpha),
            "relationship", check_ada(n, window, alpha), backends=("sdpa",),
            note=f"floor beyond the window: kvpress max(0, int(a n) - W) = {max(0, int(alpha * n) - window)}, "
                 f"kvcake int(a (n - W)) = {int(alpha * (n - window))}",
        ))
        alpha_eq = ada_equivalent_alpha(n, window, alpha)
        cases.append(Case(
            f"ada-snapkv W={window} alpha={alpha:g} -> kvcake alpha={alpha_eq:.4g}",
            lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio, window_size=window,
                                                           kernel_size=kernel), alpha_safeguard=alpha),
            lambda: kvcake.AdaKV(kvcake.SnapKV(budget=n, window=window, kernel=kernel, pooling="avg"),
                                 alpha=alpha_eq),
            "identical", backends=("sdpa",),  # kvpress's AdaKVPress refuses eager attention
        ))
    return cases


def run_case(case: Case, model, input_ids) -> Result:
    press, method = case.make_press(), case.make_method()
    a, scores = kvpress_kept(model, press, input_ids)
    b = kvcake_kept(model, method, input_ids)
    return compare(a, b, scores)


def verdict(case: Case, res: Result, exact_scores: bool) -> list[str]:
    """Problems with ``res`` (empty: as expected). Score-based methods are only reported in low precision."""
    if case.score_based and not exact_scores:
        return []
    if case.expect == "identical":
        return [] if res.identical == res.triples else [f"{res.triples - res.identical} (layer, row, head) differ"]
    if case.expect == "tie-consistent":
        bad = res.triples - res.tie_consistent
        return [] if bad == 0 else [f"{bad} (layer, row, head) differ beyond ties in kvpress's scores"]
    return case.relationship(res)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=300, help="prompt length")
    parser.add_argument("--ratio", type=float, default=0.5, help="kvpress compression_ratio")
    parser.add_argument("--window", type=int, default=64, help="SnapKV / Ada-KV window (kvpress default 64)")
    parser.add_argument("--kernel", type=int, default=5, help="pooling kernel (kvpress default 5)")
    parser.add_argument("--sinks", type=int, default=4, help="StreamingLLM sinks (kvpress default 4)")
    parser.add_argument("--alpha", type=float, default=0.2, help="Ada-KV safeguard (kvpress default 0.2)")
    parser.add_argument("--pyramid-window", type=int, default=16,
                        help="PyramidKV window (small enough that kvpress does not fall back to SnapKV)")
    parser.add_argument("--beta", type=float, default=5.0, help="PyramidKV beta")
    parser.add_argument("--backends", nargs="+", default=["eager", "sdpa"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if kvpress is None:
        print("kvpress is not installed: pip install kvpress==0.5.5", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    exact_scores = dtype == torch.float32
    import transformers

    print(f"kvpress {kvpress.__version__ if hasattr(kvpress, '__version__') else _dist_version('kvpress')}, "
          f"kvcake {kvcake.__version__} ({kvcake.__file__}), transformers {transformers.__version__}, "
          f"torch {torch.__version__}")
    n = compute_n_kept(args.tokens, args.ratio)
    print(f"model={args.model} dtype={args.dtype} tokens={args.tokens} batch={args.batch} ratio={args.ratio} -> "
          f"kvcake budget n = {n} tokens per layer")
    if not exact_scores:
        print("low precision: kvpress scores in the model dtype, kvcake in float32 -> score-based methods are "
              "reported only (tie-consistent = differences only among tokens tied in kvpress's scores)")
    failures = []
    notes: list[str] = []
    header = f"{'method':52s} {'backend':7s} {'expect':14s} {'identical':>13s} {'jaccard':>8s} {'tie-cons':>9s}  status"
    print(header)
    print("-" * len(header))
    for backend in args.backends:
        if args.model == "tiny":
            model = tiny_llama(backend, dtype)
            ids = random_prompt(args.tokens, args.batch)
        else:
            model, ids = smollm2(backend, dtype, args.tokens, args.batch)
        num_layers = model.config.num_hidden_layers
        cases = build_cases(ids.shape[1], args.ratio, args.window, args.kernel, args.sinks, args.alpha,
                            args.pyramid_window, args.beta, num_layers, notes, low_precision=not exact_scores)
        for case in cases:
            if backend not in case.backends:
                continue
            res = run_case(case, model, ids)
            problems = verdict(case, res, exact_scores)
            expect = case.expect if (exact_scores or not case.score_based) else "report"
            status = "OK" if not problems else "FAIL: " + "; ".join(problems)
            print(f"{case.name:52s} {backend:7s} {expect:14s} {res.identical:5d}/{res.triples:<5d}"
                  f"{res.identical_fraction:5.2f} {res.jaccard:8.4f} {res.tie_consistent:4d}/{res.triples:<4d} "
                  f" {status}")
            if case.note:
                print(f"{'':52s} note: {case.note}")
            if problems:
                failures.append((case.name, backend, problems))
        for name, make_press, make_scorer, tolerance, low_precision_alike in last_token_cases(args.ratio):
            res = run_last_token(model, make_press(), make_scorer(), ids)
            checked = exact_scores or low_precision_alike
            problems = []
            if checked and (res.rule != res.triples or res.kvpress_top_n != res.triples):
                problems.append(f"the last-token rule holds in {res.rule}/{res.triples}")
            if checked and res.identical_where_expected != res.expected_identical:
                problems.append("sets differ where kvpress keeps the last token")
            if exact_scores and res.score_rel_diff > tolerance:
                problems.append(f"scores differ by {res.score_rel_diff:.2e} (relative)")
            status = "OK" if not problems else "FAIL: " + "; ".join(problems)
            expect = "last-token" if checked else "report"
            print(f"{name + ' (kvcake window 1)':52s} {backend:7s} {expect:14s} {res.identical:5d}/"
                  f"{res.triples:<5d}{res.identical / res.triples:5.2f} {res.jaccard:8.4f} {'':9s}  {status}")
            print(f"{'':52s} note: kvcake = last token + top-(n-1) of kvpress's scores in {res.rule}/{res.triples}; "
                  f"scores within {res.score_rel_diff:.1e} (relative)")
            if problems:
                failures.append((name, backend, problems))
    if n < args.window:
        notes.append(f"snapkv/ada-snapkv skipped: kvpress keeps n = {n} < window {args.window} (only part of its "
                     "window, chosen among tied scores); kvcake requires budget >= window")
    for note in dict.fromkeys(notes):
        print(note)
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main())
