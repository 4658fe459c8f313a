"""A ranking of several models by Bradley-Terry, fitted on all their pairwise verdicts, as Arena-Hard ranks them.

Each verdict is a per-prompt preference ``P(a beats b)`` in [0, 1] (soft verdicts count as fractional wins: a row is
a win of ``a`` with weight ``p`` and a win of ``b`` with weight ``1 - p``; ``nan`` rows are left out). The model
``P(a beats b) = sigmoid(beta_a - beta_b)`` is fitted with scikit-learn's ``LogisticRegression`` (no intercept, one
column per model but the baseline, whose ``beta`` is 0), as Arena-Hard's ``compute_mle_elo`` does. Reported per model:

- ``elo``: ``1000 + 400 * beta / ln(10)``, the Elo scale Arena-Hard and Chatbot Arena use (the baseline is 1000);
- ``win_prob``: ``sigmoid(beta)``, the fitted probability of beating the baseline;
- intervals of both from a percentile bootstrap over prompts (the same resampled prompts for every pair, so
  verdicts on one prompt stay together).

A weak L2 penalty (``C``) keeps the fit finite when a model wins (or loses) every verdict, where the maximum-likelihood
estimate is infinite; with ``C=1e4`` a clean sweep of 50 prompts sits near +2000 Elo over the baseline rather than at
infinity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


ELO_SCALE = 400 / math.log(10)
ELO_BASE = 1000.0


def _design(
    pairs: Mapping[tuple[str, str], Sequence[float]], names: list[str], rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (+1 for ``a``, -1 for ``b``, baseline column dropped), labels and weights of the soft battles of the
    prompt indices ``rows`` (a bootstrap sample may repeat a prompt)."""
    column = {name: i - 1 for i, name in enumerate(names)}  # the baseline (names[0]) has no column
    features, preferences = [], []
    for (a, b), values in pairs.items():
        p = np.asarray(values, dtype=float)[rows]
        keep = ~np.isnan(p)
        x = np.zeros((int(keep.sum()), len(names) - 1))
        if column[a] >= 0:
            x[:, column[a]] = 1.0
        if column[b] >= 0:
            x[:, column[b]] = -1.0
        features.append(x)
        preferences.append(p[keep])
    x, p = np.concatenate(features), np.concatenate(preferences)
    # Soft labels by duplication: each battle once as a win of `a` (weight p), once as a win of `b` (weight 1 - p).
    return np.concatenate([x, x]), np.concatenate([np.ones_like(p), np.zeros_like(p)]), np.concatenate([p, 1 - p])


def _fit(pairs, names: list[str], rows: np.ndarray, C: float) -> np.ndarray:
    """``beta`` per model (the baseline's is 0)."""
    from sklearn.linear_model import LogisticRegression

    x, y, w = _design(pairs, names, rows)
    if w.sum() == 0:
        return np.full(len(names), math.nan)
    if w[y == 1].sum() == 0 or w[y == 0].sum() == 0:
        # One-sided battles: scikit-learn refuses a single class. Mirroring each battle (features and label flipped)
        # leaves the likelihood unchanged and gives it both classes.
        x, y, w = np.concatenate([x, -x]), np.concatenate([y, 1 - y]), np.concatenate([w, w])
    model = LogisticRegression(C=C, fit_intercept=False, solver="lbfgs", max_iter=1000, tol=1e-8)
    model.fit(x, y, sample_weight=w)
    return np.concatenate([[0.0], model.coef_[0]])


def _check(pairs: Mapping[tuple[str, str], Sequence[float]], names: list[str]) -> int:
    if len(names) < 2:
        raise ValueError(f"A ranking needs at least two models, got {names}.")
    lengths = {len(v) for v in pairs.values()}
    if len(lengths) != 1:
        raise ValueError(f"Every pair needs one verdict per prompt (the same prompts), got lengths {sorted(lengths)}.")
    for a, b in pairs:
        if a not in names or b not in names or a == b:
            raise ValueError(f"Pair {(a, b)} names a model not in {names} (or the same model twice).")
    seen = {m for pair in pairs for m in pair}
    if seen != set(names):
        raise ValueError(f"Models {sorted(set(names) - seen)} have no verdicts; judge them against another model.")
    return lengths.pop()


def bradley_terry(
    pairs: Mapping[tuple[str, str], Sequence[float]],
    names: Sequence[str],
    *,
    n_bootstrap: int = 100,
    confidence: float = 0.95,
    seed: int = 0,
    C: float = 1e4,
) -> dict[str, Any]:
    """Rank ``names`` (the first is the baseline) by Bradley-Terry on the verdicts of ``pairs``.

    Args:
        pairs: ``{(a, b): preferences}``, one ``P(a beats b)`` per prompt (``nan``: no verdict), the same prompts
            in the same order for every pair. Each model must appear in some pair (against the baseline at least).
        names: The models; ``names[0]`` is the baseline (Elo 1000, win probability 0.5).
        n_bootstrap, confidence, seed: Percentile bootstrap over prompts.
        C: Inverse L2 strength (see the module doc).

    Returns:
        ``{"baseline", "confidence", "n_prompts", "n_bootstrap", "pairs": [[a, b], ...], "models": [...]}``, models
        sorted best first (equal scores share a rank), each ``{"model", "rank", "elo", "elo_ci_low", "elo_ci_high", "win_prob",
        "win_prob_ci_low", "win_prob_ci_high"}``.
    """
    names = list(names)
    n = _check(pairs, names)
    beta = _fit(pairs, names, np.arange(n), C)
    rng = np.random.default_rng(seed)
    samples = np.array([_fit(pairs, names, rng.integers(0, n, size=n), C) for _ in range(n_bootstrap)])
    alpha = (1 - confidence) / 2
    if len(samples):
        low, high = np.nanquantile(samples, alpha, axis=0), np.nanquantile(samples, 1 - alpha, axis=0)
    else:
        low = high = np.full(len(names), math.nan)
    models = []
    for i, name in enumerate(names):
        models.append(
            {
                "model": name,
                "elo": ELO_BASE + ELO_SCALE * float(beta[i]),
                "elo_ci_low": ELO_BASE + ELO_SCALE * float(low[i]),
                "elo_ci_high": ELO_BASE + ELO_SCALE * float(high[i]),
                "win_prob": _sigmoid(beta[i]),
                "win_prob_ci_low": _sigmoid(low[i]),
                "win_prob_ci_high": _sigmoid(high[i]),
            }
        )
    models.sort(key=lambda m: -m["elo"])
    for m in models:  # models with equal scores share a rank (1, 1, 3, ...)
        m["rank"] = 1 + sum(other["elo"] > m["elo"] + 1e-3 for other in models)
    return {
        "baseline": names[0],
        "confidence": confidence,
        "n_prompts": n,
        "n_bootstrap": n_bootstrap,
        "pairs": [list(pair) for pair in pairs],
        "models": models,
    }


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-float(value))) if not math.isnan(value) else math.nan


def ranking_markdown(ranking: Mapping[str, Any]) -> str:
    """The ranking as a Markdown table."""
    level = round(100 * ranking["confidence"])
    lines = [
        f"Bradley-Terry ranking on {len(ranking['pairs'])} judged pairs of models over {ranking['n_prompts']} "
        f"prompts (soft verdicts as fractional wins; {level}% intervals from {ranking['n_bootstrap']} bootstrap "
        f"resamples of the prompts; baseline **{ranking['baseline']}** = Elo 1000).",
        "",
        f"| rank | model | Elo [{level}% CI] | P(beats {ranking['baseline']}) % [{level}% CI] |",
        "|---|---|---|---|",
    ]
    for m in ranking["models"]:
        lines.append(
            f"| {m['rank']} | {m['model']} | {m['elo']:.0f} [{m['elo_ci_low']:.0f}, {m['elo_ci_high']:.0f}] "
            f"| {100 * m['win_prob']:.1f} [{100 * m['win_prob_ci_low']:.1f}, {100 * m['win_prob_ci_high']:.1f}] |"
        )
    return "\n".join(lines) + "\n"


def plot_ranking(ranking: Mapping[str, Any], path, title: str = "") -> None:
    """Elo per model with its interval (best on top), the baseline's 1000 marked."""
    import matplotlib.pyplot as plt

    models = list(reversed(ranking["models"]))
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(models) + 1.5))
    for y, m in enumerate(models):
        ax.errorbar(
            m["elo"],
            y,
            xerr=[[m["elo"] - m["elo_ci_low"]], [m["elo_ci_high"] - m["elo"]]],
            fmt="o",
            capsize=4,
            color="grey" if m["model"] == ranking["baseline"] else "C0",
        )
    ax.axvline(ELO_BASE, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(models)), [m["model"] for m in models])
    ax.set_xlabel(f"Bradley-Terry Elo (baseline {ranking['baseline']} = 1000), {round(100 * ranking['confidence'])}%")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
