"""Scores of a model against a baseline from per-row judge preferences.

A preference is P(model's answer beats the baseline's) in [0, 1] (``0.5`` a tie, ``nan`` an abstention, left out).

- :func:`win_rate`: the mean preference (a tie counts half a win, as in AlpacaEval) with a percentile bootstrap
  interval over rows, its standard error, and win/tie/loss counts.
- :func:`length_controlled_win_rate`: AlpacaEval 2's idea in its minimal form. A logistic model of the preference on
  the (squashed) length difference, ``P = sigmoid(theta + phi * tanh((len_m - len_b) / std))``, fitted with
  scikit-learn on soft labels; the length-controlled win rate is its prediction at zero length difference,
  ``sigmoid(theta)``: what the judge would prefer if both answers had the same length. A judge that only rewards
  length gives a high raw win rate and a length-controlled one near 0.5. The slope ``phi`` is reported with its
  interval, and the rate is reported as *not identified* (with the reason) when the data cannot separate length
  from quality; see :func:`length_controlled_win_rate` for the rule. (AlpacaEval's full GLM also has an
  instruction-difficulty term and regularizing "gamed" baselines, which need its leaderboard data.)
- :func:`compare_scores`: both, plus average lengths and a per-category table.

Standard errors: the win rate's is the standard error of the mean of the per-prompt preferences
(``std(ddof=1) / sqrt(n)``, AlpacaEval's ``standard_error``); the length-controlled rate's and the slope's are
bootstrap standard errors (the standard deviation of the refits over resampled prompts), as they have no closed form.

Lengths are in characters, as AlpacaEval's ``avg_length``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np


def _valid(preferences) -> np.ndarray:
    p = np.asarray(preferences, dtype=float)
    if p.ndim != 1:
        raise ValueError("`preferences` must be one number per row.")
    if np.any((p[~np.isnan(p)] < 0) | (p[~np.isnan(p)] > 1)):
        raise ValueError("Each preference must be a probability in [0, 1] (or nan for an abstention).")
    return p


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha])
    return float(low), float(high)


def _bootstrap_summary(samples: Sequence[float], confidence: float) -> tuple[float, float, float]:
    """``(ci_low, ci_high, se)`` of bootstrap replicates: percentile interval and their standard deviation."""
    samples = np.asarray(samples, dtype=float)
    if len(samples) == 0:
        return math.nan, math.nan, math.nan
    low, high = _interval(samples, confidence)
    se = float(samples.std(ddof=1)) if len(samples) > 1 else math.nan
    return low, high, se


def win_rate(
    preferences: Sequence[float], *, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Mean preference with a bootstrap interval and a standard error.

    Returns ``win_rate``, ``ci_low``, ``ci_high`` (percentile bootstrap: ``n_bootstrap`` resamples of the rows with
    ``numpy.random.default_rng(seed)``), ``se`` (standard error of the mean preference, ``std(ddof=1) / sqrt(n)``, as
    AlpacaEval reports it), ``wins``/``ties``/``losses`` (preference above / equal to / below 0.5), ``n`` (judged
    rows) and ``abstained`` (``nan`` rows, left out). No judged row: ``nan`` figures.
    """
    p = _valid(preferences)
    abstained = int(np.isnan(p).sum())
    p = p[~np.isnan(p)]
    n = len(p)
    result = {
        "n": n,
        "abstained": abstained,
        "wins": int((p > 0.5).sum()),
        "ties": int((p == 0.5).sum()),
        "losses": int((p < 0.5).sum()),
    }
    if n == 0:
        return {"win_rate": math.nan, "ci_low": math.nan, "ci_high": math.nan, "se": math.nan, **result}
    rng = np.random.default_rng(seed)
    means = p[rng.integers(0, n, size=(n_bootstrap, n))].mean(axis=1)
    low, high = _interval(means, confidence) if n_bootstrap else (math.nan, math.nan)
    se = float(p.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {"win_rate": float(p.mean()), "ci_low": low, "ci_high": high, "se": se, **result}


def _fit_lc(p: np.ndarray, x: np.ndarray, C: float) -> tuple[float, float]:
    """``(sigmoid(theta), phi)``: the preference predicted at equal lengths, and the length slope."""
    from sklearn.linear_model import LogisticRegression

    # Soft labels by duplication, as AlpacaEval fits them: each row once as a win with weight p, once as a loss with
    # weight 1 - p. L2 on the slope only (scikit-learn does not penalize the intercept) keeps the fit finite when the
    # judge's verdicts are separable by length.
    features = np.concatenate([x, x])[:, None]
    labels = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    weights = np.concatenate([p, 1 - p])
    if weights[: len(p)].sum() == 0 or weights[len(p) :].sum() == 0:
        return float(p.mean()), 0.0  # all losses or all wins: no model needed, and lbfgs cannot fit one class
    if np.ptp(x) == 0:
        return float(p.mean()), 0.0  # one length difference: the penalized fit's answer, without a singular solve
    model = LogisticRegression(C=C, fit_intercept=True, solver="newton-cholesky")
    model.fit(features, labels, sample_weight=weights)
    return float(1 / (1 + math.exp(-model.intercept_[0]))), float(model.coef_[0, 0])


def _unsupported_reason(delta: np.ndarray, min_sign_share: float, max_mean_to_spread: float) -> str | None:
    """Why equal lengths lie outside what the data cover (``None`` when they are covered)."""
    minority = min(float(np.mean(delta >= 0)), float(np.mean(delta <= 0)))
    mean, spread = float(delta.mean()), float(delta.std())
    if minority >= min_sign_share or abs(mean) <= max_mean_to_spread * spread:
        return None
    side = "longer" if mean > 0 else "shorter"
    return (
        f"length not identified: the model's answer is {side} than the baseline's on {1 - minority:.0%} of prompts "
        f"(need both signs on at least {min_sign_share:.0%}), by {mean:+.0f} characters on average with a spread of "
        f"{spread:.0f} (need the mean within {max_mean_to_spread:g} spreads of 0); equal lengths lie outside the "
        "data, so length and quality cannot be told apart"
    )


def length_controlled_win_rate(
    preferences: Sequence[float],
    model_lengths: Sequence[float],
    baseline_lengths: Sequence[float],
    *,
    n_bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    C: float = 1e4,
    min_sign_share: float = 0.1,
    max_mean_to_spread: float = 2.0,
    settle_tolerance: float = 0.02,
) -> dict[str, Any]:
    """The win rate the judge would give at equal lengths (see the module doc), its length slope, and whether the
    data identify it.

    The rate is a prediction at zero length difference, so it is identified only when the data reach zero and the
    fit, not its penalty, sets the slope. AlpacaEval gets length variation from down-weighted rows of "gamed"
    (verbose / concise) baselines; without them the model's own rows must supply it. The rule:

    1. *Support*: the length differences (model minus baseline) have both signs, each on at least ``min_sign_share``
       of the prompts (a difference of 0 counts for both), or their mean lies within ``max_mean_to_spread`` standard
       deviations of 0. Otherwise ``tanh(delta / std)`` is nearly constant, the slope is confounded with the
       intercept and the L2 penalty resolves it to ~0, which would report the raw rate as the length-controlled one.
    2. *Settled*: the reported fit has a weak L2 penalty on the slope (``C``); refitted with a 1000 times weaker one,
       the rate moves by at most ``settle_tolerance`` and the slope by at most ``settle_tolerance`` of its size (or
       of 1, when smaller). Otherwise the slope keeps growing as the penalty weakens (the verdicts are separated, or
       nearly, by length: a perfect length judge) or the penalty is strong enough to hold it, and the penalty, not
       the data, sets the number.

    When either fails, ``lc_win_rate`` and its interval are ``nan``, ``lc_identified`` is False and ``lc_reason``
    says why; the slope is still reported.

    Returns ``lc_win_rate``, ``lc_ci_low``, ``lc_ci_high``, ``lc_se``; ``lc_length_slope`` (``phi``: log-odds of the
    model's win per unit of ``tanh(delta / std)``; above 0 the judge prefers the longer answer), ``lc_slope_ci_low``,
    ``lc_slope_ci_high``, ``lc_slope_se``; ``lc_identified``, ``lc_reason`` (``None`` when identified); and
    ``mean_length_difference`` (model minus baseline, characters). Intervals and standard errors come from
    ``n_bootstrap`` refits on prompts resampled with replacement (percentiles; standard deviation of the refits).
    ``C``: inverse L2 strength on the slope of the reported fit (weak by default, so that the data set the slope).
    """
    p = _valid(preferences)
    delta = np.asarray(model_lengths, dtype=float) - np.asarray(baseline_lengths, dtype=float)
    if len(delta) != len(p):
        raise ValueError(f"Need one length per preference: {len(p)} preferences, {len(delta)} lengths.")
    keep = ~np.isnan(p)
    p, delta = p[keep], delta[keep]
    n = len(p)
    if n == 0:
        return _lc_result(math.nan, (math.nan,) * 3, math.nan, (math.nan,) * 3, "no judged rows", 0.0)
    scale = float(delta.std()) or 1.0
    x = np.tanh(delta / scale)
    reason = _unsupported_reason(delta, min_sign_share, max_mean_to_spread)
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        if reason is not None:  # x is ~constant: the solver's convergence warnings say what `reason` says
            warnings.simplefilter("ignore", ConvergenceWarning)
        lc, slope = _fit_lc(p, x, C)
    fits = _resample(p, x, C, n_bootstrap, seed)
    if reason is None:
        reason = _unsettled_reason(p, x, C, lc, slope, settle_tolerance)
    lc_spread = _bootstrap_summary([f[0] for f in fits], confidence)
    slope_spread = _bootstrap_summary([f[1] for f in fits], confidence)
    return _lc_result(lc, lc_spread, slope, slope_spread, reason, float(delta.mean()))


def _unsettled_reason(p: np.ndarray, x: np.ndarray, C: float, lc: float, slope: float, tolerance: float) -> str | None:
    """Why the fit at ``C`` is set by its penalty rather than the data (``None`` when a weaker penalty agrees)."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # Separated verdicts: the weaker fit runs toward an infinite slope, which is the finding, not a failure.
        warnings.simplefilter("ignore", ConvergenceWarning)
        weak_lc, weak_slope = _fit_lc(p, x, 1000 * C)
    if abs(weak_lc - lc) <= tolerance and abs(weak_slope - slope) <= tolerance * max(1.0, abs(slope)):
        return None
    return (
        f"length slope not settled by the data: with C={C:g} the slope is {slope:.2f} and the rate {100 * lc:.1f}%, "
        f"with a 1000 times weaker penalty {weak_slope:.2f} and {100 * weak_lc:.1f}%; the judge's verdicts are "
        "(nearly) separated by length or the penalty holds the slope, so the penalty, not the data, sets the number"
    )


def _resample(p: np.ndarray, x: np.ndarray, C: float, n_bootstrap: int, seed: int) -> list[tuple[float, float]]:
    """One fit per bootstrap resample of the rows (prompts)."""
    from sklearn.exceptions import ConvergenceWarning

    rng = np.random.default_rng(seed)
    fits = []
    with warnings.catch_warnings():
        # A resample of a few rows can hold a single length difference; the solver then falls back to lbfgs.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(n_bootstrap):
            idx = rng.integers(0, len(p), size=len(p))
            fits.append(_fit_lc(p[idx], x[idx], C))
    return fits


def _lc_result(lc, lc_spread, slope, slope_spread, reason, mean_difference) -> dict[str, Any]:
    if reason is not None:
        lc, lc_spread = math.nan, (math.nan,) * 3
    return {
        "lc_win_rate": lc,
        "lc_ci_low": lc_spread[0],
        "lc_ci_high": lc_spread[1],
        "lc_se": lc_spread[2],
        "lc_identified": reason is None,
        "lc_reason": reason,
        "lc_length_slope": slope,
        "lc_slope_ci_low": slope_spread[0],
        "lc_slope_ci_high": slope_spread[1],
        "lc_slope_se": slope_spread[2],
        "mean_length_difference": mean_difference,
    }


def compare_scores(
    preferences: Sequence[float],
    model_answers: Sequence[str],
    baseline_answers: Sequence[str],
    categories: Sequence[str] | None = None,
    *,
    n_bootstrap: int = 1000,
    n_bootstrap_lc: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Win rate, length-controlled win rate, average lengths and (with ``categories``) a per-category table."""
    model_lengths = [len(a or "") for a in model_answers]
    baseline_lengths = [len(a or "") for a in baseline_answers]
    result = scores_from_lengths(
        preferences,
        model_lengths,
        baseline_lengths,
        n_bootstrap=n_bootstrap,
        n_bootstrap_lc=n_bootstrap_lc,
        confidence=confidence,
        seed=seed,
    )
    if categories is not None:
        p = np.asarray(preferences, dtype=float)
        cats = np.asarray([str(c) for c in categories])
        table = {}
        for category in sorted(set(cats.tolist())):
            rows = cats == category
            table[category] = {
                **win_rate(p[rows], n_bootstrap=n_bootstrap, confidence=confidence, seed=seed),
                "avg_length": float(np.mean(np.asarray(model_lengths)[rows])),
                "baseline_avg_length": float(np.mean(np.asarray(baseline_lengths)[rows])),
            }
        result["per_category"] = table
    return result


def scores_from_lengths(
    preferences: Sequence[float],
    model_lengths: Sequence[int],
    baseline_lengths: Sequence[int],
    *,
    n_bootstrap: int = 1000,
    n_bootstrap_lc: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`win_rate`, :func:`length_controlled_win_rate` and average lengths, from lengths (the ``evaluate``
    metric module computes this)."""
    return {
        **win_rate(preferences, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed),
        **length_controlled_win_rate(
            preferences,
            model_lengths,
            baseline_lengths,
            n_bootstrap=n_bootstrap_lc,
            confidence=confidence,
            seed=seed,
        ),
        "avg_length": float(np.mean(model_lengths)) if len(model_lengths) else math.nan,
        "baseline_avg_length": float(np.mean(baseline_lengths)) if len(baseline_lengths) else math.nan,
    }
