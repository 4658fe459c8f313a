"""Win rates, intervals and the length-controlled win rate against hand-computed values; the `evaluate` module."""

import math

import numpy as np
import pytest

from trl_sgpo.evaluation.scores import compare_scores, length_controlled_win_rate, scores_from_lengths, win_rate


def test_win_rate_counts_ties_as_half_and_leaves_out_abstentions():
    s = win_rate([1, 1, 0.5, 0, 1, float("nan")], n_bootstrap=50)
    assert s["win_rate"] == pytest.approx(3.5 / 5)
    assert (s["wins"], s["ties"], s["losses"], s["n"], s["abstained"]) == (3, 1, 1, 5, 1)


def test_bootstrap_interval_matches_the_normal_approximation():
    # 300 wins, 100 losses: 0.75 +- 1.96 * sqrt(0.75 * 0.25 / 400) = [0.7076, 0.7924].
    s = win_rate([1.0] * 300 + [0.0] * 100, n_bootstrap=4000, seed=1)
    half = 1.96 * math.sqrt(0.75 * 0.25 / 400)
    assert s["win_rate"] == 0.75
    assert s["ci_low"] == pytest.approx(0.75 - half, abs=0.006)
    assert s["ci_high"] == pytest.approx(0.75 + half, abs=0.006)


def test_bootstrap_interval_is_the_percentiles_of_resampled_means():
    p = np.array([1.0, 0.0, 0.5, 1.0, 0.25])
    s = win_rate(p, n_bootstrap=500, seed=3)
    means = p[np.random.default_rng(3).integers(0, 5, size=(500, 5))].mean(axis=1)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert win_rate([1.0] * 10, n_bootstrap=100)["ci_low"] == 1.0  # no spread, no interval


def test_rejects_values_outside_zero_one():
    with pytest.raises(ValueError, match=r"probability in \[0, 1\]"):
        win_rate([0.2, 1.5])


def _length_judged(rule):
    # 40 rows: the model is longer on 32 and shorter on 8, by varied amounts.
    rng = np.random.default_rng(0)
    deltas = np.concatenate([rng.integers(20, 200, 32), -rng.integers(20, 200, 8)])
    base = rng.integers(200, 400, 40)
    prefs = rule(deltas)
    return prefs, base + deltas, base


def test_a_length_only_judge_gives_a_high_raw_and_a_neutral_length_controlled_win_rate():
    prefs, model_len, base_len = _length_judged(lambda d: np.where(d > 0, 0.8, 0.2))
    s = scores_from_lengths(prefs, model_len, base_len, n_bootstrap=200, n_bootstrap_lc=50)
    assert s["win_rate"] == pytest.approx((32 * 0.8 + 8 * 0.2) / 40)
    assert abs(s["lc_win_rate"] - 0.5) < 0.06
    assert s["lc_ci_low"] < 0.5 < s["lc_ci_high"]


def test_length_control_keeps_a_win_that_is_not_about_length():
    # Same lengths, but the judge prefers the model on every row whatever the length: LC stays high.
    prefs, model_len, base_len = _length_judged(lambda d: np.full(len(d), 0.8))
    s = length_controlled_win_rate(prefs, model_len, base_len, n_bootstrap=0)
    assert s["lc_win_rate"] == pytest.approx(0.8, abs=0.02)


def test_compare_reports_lengths_and_categories():
    s = compare_scores(
        [1.0, 0.0, 0.5, 1.0],
        ["aaaa", "b", "cc", "dddddd"],
        ["aa", "bbb", "cc", "d"],
        ["math", "math", "chat", "chat"],
        n_bootstrap=20,
        n_bootstrap_lc=0,
    )
    assert s["avg_length"] == pytest.approx(13 / 4) and s["baseline_avg_length"] == pytest.approx(8 / 4)
    assert s["per_category"]["math"]["win_rate"] == 0.5 and s["per_category"]["chat"]["win_rate"] == 0.75
    assert s["per_category"]["chat"]["n"] == 2


def test_evaluate_module_loads_offline_and_matches_the_python_api(monkeypatch, tmp_path):
    import evaluate

    from trl_sgpo.evaluation import WIN_RATE_METRIC_PATH

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    metric = evaluate.load(WIN_RATE_METRIC_PATH)
    kwargs = dict(
        preferences=[1.0, 0.5, 0.0, 1.0, 0.75, float("nan")],
        model_lengths=[120, 80, 60, 150, 90, 10],
        baseline_lengths=[100, 100, 100, 90, 95, 10],
    )
    got = metric.compute(**kwargs, n_bootstrap=100, n_bootstrap_lc=20)
    want = scores_from_lengths(**kwargs, n_bootstrap=100, n_bootstrap_lc=20)
    assert got == pytest.approx(want)
    assert got["win_rate"] == pytest.approx(3.25 / 5)
