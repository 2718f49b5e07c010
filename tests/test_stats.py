"""Bootstrap intervals and paired comparisons (kvcake.eval.stats), and how the summary and the report use them.

Expected values are worked out by hand: a bootstrap of a few 0/100 scores has a small, exactly known distribution
of resampled means, and its quantiles sit far from the edges of that distribution's steps, so 2,000 resamples land
on them whatever the seed.
"""

import random

import pytest

from kvcake.eval import stats
from kvcake.eval.comparison import compare_rows
from kvcake.eval.summary import summarise


def test_quantile_interpolates_between_order_statistics():
    values = [0.0, 1.0, 2.0, 3.0]
    assert stats.quantile(values, 0.0) == 0.0 and stats.quantile(values, 1.0) == 3.0
    assert stats.quantile(values, 0.5) == 1.5  # h = 1.5
    assert stats.quantile(values, 0.25) == 0.75  # h = 0.75
    assert stats.quantile([7.0], 0.975) == 7.0
    with pytest.raises(ValueError):
        stats.quantile([], 0.5)
    with pytest.raises(ValueError):
        stats.quantile(values, 1.5)


def test_a_constant_sample_has_a_zero_width_interval():
    low, high = stats.mean_interval([61.2] * 7)
    assert low == high == pytest.approx(61.2)
    assert stats.mean_interval([42.0]) == (42.0, 42.0)
    low, high = stats.macro_interval([("a", [10.0] * 3), ("b", [30.0] * 5)])
    assert low == high == pytest.approx(20.0)


def test_small_samples_have_their_hand_computed_intervals():
    # Two samples 0 and 100: resampled means are 0, 50, 100 with probabilities 1/4, 1/2, 1/4.
    assert stats.mean_interval([0.0, 100.0]) == (0.0, 100.0)
    # 0, 0, 0, 100: the mean is 25 k, k ~ Binomial(4, 1/4); P(k <= 2) = 243/256 = 0.949 < 0.975 < P(k <= 3) =
    # 255/256, and P(k = 0) = 81/256 > 0.025: the interval is [0, 75].
    assert stats.mean_interval([0.0, 0.0, 0.0, 100.0]) == (0.0, 75.0)
    assert stats.mean_interval([100.0, 100.0, 100.0, 0.0]) == (25.0, 100.0)


def test_a_large_sample_is_close_to_the_normal_interval():
    # 100 scores, half 0 and half 100: mean 50, standard error 50 / sqrt(100) = 5, normal interval 50 -+ 9.8.
    low, high = stats.mean_interval([0.0, 100.0] * 50)
    assert low == pytest.approx(40.2, abs=1.5) and high == pytest.approx(59.8, abs=1.5)


def test_the_average_resamples_each_task_within_itself():
    # Task a is constant (50), task b is {0, 100}: the average is (50 + m_b) / 2 with m_b in {0, 50, 100}.
    assert stats.macro_interval([("a", [50.0, 50.0, 50.0]), ("b", [0.0, 100.0])]) == (25.0, 75.0)
    # Each task keeps its own size: task c's single sample never moves.
    assert stats.macro_interval([("b", [0.0, 100.0]), ("c", [0.0])]) == (0.0, 50.0)


def test_intervals_are_deterministic_and_seeded():
    rng = random.Random(1)
    values = [rng.uniform(0, 100) for _ in range(30)]
    assert stats.mean_interval(values, stream="t") == stats.mean_interval(list(values), stream="t")
    assert stats.mean_interval(values, stream="t", seed=1) != stats.mean_interval(values, stream="t")
    low, high = stats.mean_interval(values, stream="t")
    assert low < sum(values) / len(values) < high
    # A task's part of the average does not depend on which other tasks are there.
    other = [rng.uniform(0, 100) for _ in range(30)]
    both = stats.macro_interval([("t", values), ("u", other)])
    assert both == stats.macro_interval([("t", values), ("u", other)])
    assert stats.macro_interval([("t", values), ("u", [5.0] * 30)]) == pytest.approx((low / 2 + 2.5, high / 2 + 2.5))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least one value"):
        stats.mean_interval([])
    with pytest.raises(ValueError, match="level"):
        stats.mean_interval([1.0], level=1.0)
    with pytest.raises(ValueError, match="2 scores against 3"):
        stats.compare([("t", [1.0, 2.0], [1.0, 2.0, 3.0])])


def test_paired_comparison_counts_and_interval():
    result = stats.compare([("t", [1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 4.0])])
    assert (result.pairs, result.wins, result.ties, result.losses) == (4, 1, 2, 1)
    assert result.difference == pytest.approx(-0.25)
    assert result.low <= result.difference <= result.high
    # A constant difference is known exactly, however much the scores themselves vary: pairing cancels them.
    b = [0.0, 100.0, 20.0, 80.0, 50.0]
    shifted = stats.compare([("t", [x + 5 for x in b], b)])
    assert (shifted.wins, shifted.ties, shifted.losses) == (5, 0, 0)
    assert shifted.difference == shifted.low == shifted.high == pytest.approx(5.0)
    same = stats.compare([("t", b, b)])
    assert (same.ties, same.difference, same.low, same.high) == (5, 0.0, 0.0, 0.0)
    # Over tasks: the mean of the per-task mean differences (10 and 0), resampled within each task.
    two = stats.compare([("a", [10.0, 20.0], [0.0, 10.0]), ("b", [3.0, 7.0, 9.0], [3.0, 7.0, 9.0])])
    assert (two.pairs, two.wins, two.ties, two.losses) == (5, 2, 3, 0)
    assert two.difference == two.low == two.high == pytest.approx(5.0)
    # One pair 0 against 100 and one 100 against 0: differences -100 and +100, like the {0, 100} mean above.
    swing = stats.compare([("t", [0.0, 100.0], [100.0, 0.0])])
    assert (swing.difference, swing.low, swing.high) == (0.0, -100.0, 100.0)


def _row(label, task, sid, score, *, mode="query-aware", error=None):
    method, _, size = label.partition("@")
    ratio = float(size[1:]) if size.startswith("r") else None
    budget = int(size[1:]) if size.startswith("b") else None
    return {"key": f"{task}|{sid}|{label}|{mode}", "model": "m", "mode": mode, "label": label, "method": method,
            "budget": budget, "ratio": ratio, "params": {}, "task": task, "id": sid,
            "score": None if error else score, "error": error, "kv_bytes": 50, "kv_bytes_full": 100}


def test_summary_carries_intervals_that_do_not_depend_on_row_order():
    rows = [_row("cake@r0.5", "a", f"s{i}", s) for i, s in enumerate([0.0, 0.0, 0.0, 100.0])]
    rows += [_row("cake@r0.5", "b", f"s{i}", 40.0) for i in range(3)] + [_row("cake@r0.5", "b", "bad", 0, error="E")]
    table = summarise(rows)
    cell = {t["task"]: t for t in table}
    assert (cell["a"]["score"], cell["a"]["score_low"], cell["a"]["score_high"]) == (25.0, 0.0, 75.0)
    assert (cell["b"]["score"], cell["b"]["score_low"], cell["b"]["score_high"]) == (40.0, 40.0, 40.0)
    # The average's interval: (m_a + 40) / 2 resampled, task a's samples within task a.
    assert (cell["average"]["score"], cell["average"]["score_low"], cell["average"]["score_high"]) == (32.5, 20.0,
                                                                                                         57.5)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    assert summarise(shuffled) == table


def test_comparison_pairs_only_samples_both_answered():
    rows = []
    for i, (mine, ref) in enumerate([(100.0, 0.0), (50.0, 50.0), (0.0, 100.0), (100.0, 100.0)]):
        rows += [_row("cake@r0.5", "t", f"s{i}", mine), _row("snapkv@r0.5", "t", f"s{i}", ref)]
    rows.append(_row("cake@r0.5", "t", "only-mine", 100.0))  # no reference row: no pair
    rows += [_row("cake@r0.5", "t", "failed", 0.0), _row("snapkv@r0.5", "t", "failed", 0, error="E")]
    rows += [_row("cake@r0.25", "t", "s0", 100.0), _row("snapkv@r0.1", "t", "s0", 0.0)]  # no snapkv at 0.25
    rows += [_row("full", "t", "s0", 100.0)]
    table = compare_rows(rows)
    assert {(c["label"], c["task"]) for c in table} == {("cake@r0.5", "t"), ("cake@r0.5", "average")}
    average = next(c for c in table if c["task"] == "average")
    assert average["reference"] == "snapkv@r0.5" and average["tasks"] == 1
    assert (average["pairs"], average["wins"], average["ties"], average["losses"]) == (4, 1, 2, 1)
    assert average["difference"] == 0.0 and average["difference_low"] < 0 < average["difference_high"]
    # Against the full cache every compressed setting is compared (on the one sample full answered).
    against_full = {c["label"]: c for c in compare_rows(rows, "full") if c["task"] == "average"}
    assert set(against_full) == {"cake@r0.5", "cake@r0.25", "snapkv@r0.5", "snapkv@r0.1"}
    assert against_full["snapkv@r0.1"]["losses"] == 1 and against_full["cake@r0.25"]["ties"] == 1


def test_a_variant_of_the_reference_method_is_compared_with_its_plain_label():
    # CAKE with calibrated temperatures against CAKE (reference "cake"): it used to be skipped as "the reference's
    # own setting", so calibrated vs default temperatures had no paired comparison.
    rows = []
    for i, (plain, tuned) in enumerate([(0.0, 100.0), (100.0, 100.0), (0.0, 0.0)]):
        variant = _row("cake@r0.5", "t", f"s{i}", tuned)
        variant.update(label="cake@r0.5,tau1=0.7", key=f"t|s{i}|cake@r0.5,tau1=0.7|query-aware", params={"tau1": 0.7})
        rows += [_row("cake@r0.5", "t", f"s{i}", plain), variant, _row("snapkv@r0.5", "t", f"s{i}", 0.0)]
    table = {(c["label"], c["task"]): c for c in compare_rows(rows, "cake")}
    assert set(table) == {(label, task) for label in ("cake@r0.5,tau1=0.7", "snapkv@r0.5") for task in ("t", "average")}
    tuned = table[("cake@r0.5,tau1=0.7", "average")]
    assert tuned["reference"] == "cake@r0.5" and (tuned["wins"], tuned["ties"], tuned["losses"]) == (1, 2, 0)


def test_the_score_plot_draws_each_interval_as_an_error_bar(tmp_path, monkeypatch):
    from matplotlib.container import ErrorbarContainer

    from kvcake.eval import figures

    rows = []
    for label in ("cake@r0.5", "cake@r0.25", "snapkv@r0.5", "full"):
        rows += [_row(label, "t", f"s{i}", s) for i, s in enumerate([0.0, 0.0, 0.0, 100.0])]
    table = summarise(rows)
    drawn = []
    monkeypatch.setattr(figures, "save", lambda fig, path: drawn.append(fig) or path)
    figures.plot_scores(table, tmp_path)
    (fig,) = drawn
    panel = fig.axes[0]  # task t
    bars = {c.get_label(): c for c in panel.containers if isinstance(c, ErrorbarContainer)}
    assert set(bars) == {"cake", "snapkv"}
    line, _, (segments,) = bars["cake"].lines
    for (_, y), segment in zip(line.get_xydata(), segments.get_segments(), strict=True):
        assert y == 25.0 and segment[:, 1].tolist() == [0.0, 75.0]  # the interval of 0, 0, 0, 100
    band = [p for p in panel.patches if p.get_alpha() == pytest.approx(0.08)]
    assert len(band) == 1  # the full cache's interval, around its dashed line


def test_every_registered_method_has_its_own_colour():
    """A report of the v2 grid showed Expected Attention and SnapKV in one blue, KNorm and PyramidKV in one orange
    (the methods without a colour took matplotlib's cycle). Colours are compared as drawn (RGB), not by name."""
    from matplotlib.colors import is_color_like, to_rgb

    from kvcake.methods.registry import color, method_names

    colours = {name: color(name) for name in method_names()}
    assert all(is_color_like(c) for c in colours.values()), colours
    assert len({to_rgb(c) for c in colours.values()}) == len(colours), colours


def test_the_report_pairs_each_task_as_well_as_the_average():
    # cake leads snapkv on task a and trails on task b: the average (0) hides both, the per-task table shows them.
    from kvcake.eval.report import markdown

    rows = []
    for i in range(2):
        rows += [_row("cake@r0.5", "a", f"s{i}", 100.0), _row("snapkv@r0.5", "a", f"s{i}", 0.0)]
        rows += [_row("cake@r0.5", "b", f"s{i}", 0.0), _row("snapkv@r0.5", "b", f"s{i}", 100.0)]
    text = markdown(summarise(rows), [], compare_rows(rows))
    assert "| cake@r0.5 | snapkv@r0.5 | 2 | 4 | 2 | 0 | 2 | +0.0 [+0.0, +0.0] |" in text
    assert "| method | reference | a | b |" in text
    assert "| cake@r0.5 | snapkv@r0.5 | 2/0/0, +100.0 [+100.0, +100.0] | 0/0/2, -100.0 [-100.0, -100.0] |" in text
    # one task: the average says it all, no second table
    one = [r for r in rows if r["task"] == "a"]
    assert "| method | reference | a |" not in markdown(summarise(one), [], compare_rows(one))
