"""Win rates, intervals and the length-controlled win rate against hand-computed values; the `evaluate` module."""

import math

import numpy as np
import pytest

from trl_sgpo.evaluation.win_rates import compare_scores, length_controlled_win_rate, scores_from_lengths, win_rate


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


def test_standard_error_is_that_of_the_mean_preference():
    p = np.array([1.0, 0.0, 0.5, 1.0, 0.25])
    s = win_rate(p, n_bootstrap=50)
    assert s["se"] == pytest.approx(p.std(ddof=1) / math.sqrt(5))
    assert math.isnan(win_rate([1.0], n_bootstrap=10)["se"])  # one row: no spread to estimate


def test_lc_is_not_identified_when_the_model_is_longer_everywhere_by_a_similar_amount():
    # The case: a judge that rewards length only, the model longer on every prompt by ~N(300, 30) characters.
    # tanh(delta / std) is then ~1 everywhere and the slope is confounded with the intercept: a penalized fit puts it
    # at ~0 and would report LC = raw = 0.80.
    rng = np.random.default_rng(0)
    delta = rng.normal(300, 30, 200)
    base = rng.integers(300, 900, 200)
    for prefs in (np.full(200, 0.8), (rng.random(200) < 0.8).astype(float)):  # soft and hard verdicts
        s = scores_from_lengths(prefs, base + delta, base, n_bootstrap=50, n_bootstrap_lc=20)
        assert s["win_rate"] == pytest.approx(0.8, abs=0.06)
        assert s["lc_identified"] is False
        assert math.isnan(s["lc_win_rate"]) and math.isnan(s["lc_ci_low"]) and math.isnan(s["lc_se"])
        assert "longer than the baseline's on 100% of prompts" in s["lc_reason"]
        assert math.isfinite(s["lc_length_slope"])  # the slope is still reported


def test_lc_with_mixed_sign_lengths_is_identified_and_moves_against_the_length_bias():
    # A judge that rewards length only; the model longer on 32 prompts (shorter on 8), then shorter on 32.
    for sign in (1, -1):
        prefs, model_len, base_len = _length_judged(lambda d, sign=sign: np.where(sign * d > 0, 0.8, 0.2))
        model_len = base_len + sign * (model_len - base_len)
        s = scores_from_lengths(prefs, model_len, base_len, n_bootstrap=200, n_bootstrap_lc=50)
        assert s["lc_identified"] is True and s["lc_reason"] is None
        assert sign * (s["win_rate"] - 0.5) > 0.15  # raw: far from 0.5, in the direction of the length bias
        assert sign * (s["win_rate"] - s["lc_win_rate"]) > 0.1  # LC: the length part removed
        assert s["lc_length_slope"] > 0 and s["lc_slope_ci_low"] > 0  # the judge prefers longer answers
        assert 0 < s["lc_slope_se"] < s["lc_length_slope"] and 0 < s["lc_se"] < 0.05


def test_without_a_length_effect_the_slope_interval_covers_zero():
    rng = np.random.default_rng(1)
    delta = rng.normal(0, 100, 200)
    prefs = rng.uniform(0.3, 1.0, 200)  # independent of length
    s = length_controlled_win_rate(prefs, 500 + delta, np.full(200, 500), n_bootstrap=100)
    assert s["lc_identified"] is True
    assert s["lc_slope_ci_low"] < 0 < s["lc_slope_ci_high"]
    assert s["lc_win_rate"] == pytest.approx(prefs.mean(), abs=0.02)
    assert s["lc_ci_low"] < prefs.mean() < s["lc_ci_high"]


def test_a_slope_held_by_the_penalty_is_not_identified():
    # Mixed signs, a strong length effect, and a penalty so strong (C=0.01) that the slope stays near 0: the rate
    # would then be close to the raw one, set by the penalty rather than the data.
    prefs, model_len, base_len = _length_judged(lambda d: np.where(d > 0, 0.9, 0.1))
    s = length_controlled_win_rate(prefs, model_len, base_len, n_bootstrap=10, C=0.01)
    assert s["lc_identified"] is False and "not settled by the data" in s["lc_reason"]
    assert math.isnan(s["lc_win_rate"]) and s["lc_length_slope"] < 0.5
    assert length_controlled_win_rate(prefs, model_len, base_len, n_bootstrap=0)["lc_identified"] is True


@pytest.mark.parametrize("seed", range(5))
def test_a_steep_but_smooth_length_effect_is_identified(seed):
    # Soft verdicts sigmoid(0.5 + 6 tanh(d / sd)) on 32 prompts: the data pin the slope (~6) and the rate at equal
    # lengths, sigmoid(0.5) = 0.622. A fit penalized as hard as C=10 gives 0.56-0.61 and moves when the penalty is
    # relaxed; the rate must be the settled fit's, not refused.
    rng = np.random.default_rng(seed)
    delta = rng.normal(0, 300, 32)
    prefs = 1 / (1 + np.exp(-(0.5 + 6 * np.tanh(delta / delta.std()))))
    s = length_controlled_win_rate(prefs, 500 + delta, np.full(32, 500), n_bootstrap=0)
    assert s["lc_identified"] is True, s["lc_reason"]
    assert s["lc_win_rate"] == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.01)
    assert s["lc_length_slope"] == pytest.approx(6, abs=0.1)


@pytest.mark.parametrize("cut", [0, 50])
def test_verdicts_separated_by_length_are_not_identified(cut):
    # A hard judge that picks the longer answer (longer by more than `cut` characters): the slope grows without bound
    # as the penalty weakens, and the rate at equal lengths is whatever the penalty makes it.
    rng = np.random.default_rng(3)
    delta = rng.normal(0, 300, 64)
    prefs = (delta > cut).astype(float)
    s = length_controlled_win_rate(prefs, 500 + delta, np.full(64, 500), n_bootstrap=5)
    assert s["lc_identified"] is False and "not settled by the data" in s["lc_reason"]
    assert math.isnan(s["lc_win_rate"]) and s["lc_length_slope"] > 10


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
    assert got == pytest.approx(want, nan_ok=True)  # 5 rows: LC not identified (nan)
    assert got["win_rate"] == pytest.approx(3.25 / 5)
