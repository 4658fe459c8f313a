"""Scores of a model against a baseline from per-row judge preferences.

A preference is P(model's answer beats the baseline's) in [0, 1] (``0.5`` a tie, ``nan`` an abstention, left out).

- :func:`win_rate`: the mean preference (a tie counts half a win, as in AlpacaEval) with a percentile bootstrap
  interval over rows, and win/tie/loss counts.
- :func:`length_controlled_win_rate`: AlpacaEval 2's idea in its minimal form. A logistic model of the preference on
  the (squashed) length difference, ``P = sigmoid(theta + phi * tanh((len_m - len_b) / std))``, fitted with
  scikit-learn on soft labels; the length-controlled win rate is its prediction at zero length difference,
  ``sigmoid(theta)``: what the judge would prefer if both answers had the same length. A judge that only rewards
  length gives a high raw win rate and a length-controlled one near 0.5. (AlpacaEval's full GLM also has an
  instruction-difficulty term and regularizing "gamed" baselines, which need its leaderboard data.)
- :func:`compare_scores`: both, plus average lengths and a per-category table.

Lengths are in characters, as AlpacaEval's ``avg_length``.
"""

from __future__ import annotations

import math
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


def win_rate(
    preferences: Sequence[float], *, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Mean preference with a bootstrap interval.

    Returns ``win_rate``, ``ci_low``, ``ci_high`` (percentile bootstrap: ``n_bootstrap`` resamples of the rows with
    ``numpy.random.default_rng(seed)``), ``wins``/``ties``/``losses`` (preference above / equal to / below 0.5),
    ``n`` (judged rows) and ``abstained`` (``nan`` rows, left out). No judged row: ``nan`` figures.
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
        return {"win_rate": math.nan, "ci_low": math.nan, "ci_high": math.nan, **result}
    rng = np.random.default_rng(seed)
    means = p[rng.integers(0, n, size=(n_bootstrap, n))].mean(axis=1)
    low, high = _interval(means, confidence)
    return {"win_rate": float(p.mean()), "ci_low": low, "ci_high": high, **result}


def _fit_lc(p: np.ndarray, x: np.ndarray, C: float) -> float:
    from sklearn.linear_model import LogisticRegression

    # Soft labels by duplication, as AlpacaEval fits them: each row once as a win with weight p, once as a loss with
    # weight 1 - p. L2 on the slope only (scikit-learn does not penalize the intercept) keeps the fit finite when the
    # judge's verdicts are separable by length.
    features = np.concatenate([x, x])[:, None]
    labels = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    weights = np.concatenate([p, 1 - p])
    if weights[: len(p)].sum() == 0 or weights[len(p) :].sum() == 0:
        return float(p.mean())  # all losses or all wins: no model needed, and lbfgs cannot fit one class
    model = LogisticRegression(C=C, fit_intercept=True, solver="newton-cholesky")
    model.fit(features, labels, sample_weight=weights)
    return float(model.predict_proba(np.zeros((1, 1)))[0, 1])


def length_controlled_win_rate(
    preferences: Sequence[float],
    model_lengths: Sequence[float],
    baseline_lengths: Sequence[float],
    *,
    n_bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    C: float = 10.0,
) -> dict[str, Any]:
    """The win rate the judge would give at equal lengths (see the module doc), with a bootstrap interval.

    Returns ``lc_win_rate``, ``lc_ci_low``, ``lc_ci_high`` (``n_bootstrap`` refits on resampled rows) and
    ``mean_length_difference`` (model minus baseline, characters). ``C``: inverse L2 strength on the length slope.
    """
    p = _valid(preferences)
    delta = np.asarray(model_lengths, dtype=float) - np.asarray(baseline_lengths, dtype=float)
    if len(delta) != len(p):
        raise ValueError(f"Need one length per preference: {len(p)} preferences, {len(delta)} lengths.")
    keep = ~np.isnan(p)
    p, delta = p[keep], delta[keep]
    n = len(p)
    if n == 0:
        return {"lc_win_rate": math.nan, "lc_ci_low": math.nan, "lc_ci_high": math.nan, "mean_length_difference": 0.0}
    scale = float(delta.std()) or 1.0
    x = np.tanh(delta / scale)
    lc = _fit_lc(p, x, C)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, n, size=n)
        samples.append(_fit_lc(p[idx], x[idx], C))
    low, high = _interval(np.asarray(samples), confidence) if samples else (math.nan, math.nan)
    return {"lc_win_rate": lc, "lc_ci_low": low, "lc_ci_high": high, "mean_length_difference": float(delta.mean())}


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


compare = compare_scores
"""Former name of :func:`compare_scores`, kept for ``from trl_sgpo.evaluation.scores import compare``. The package
exports only ``compare_scores``: ``trl_sgpo.evaluation.compare`` is the module of :func:`evaluate_models`."""
