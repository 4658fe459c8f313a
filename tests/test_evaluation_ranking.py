"""Bradley-Terry ranking of several models: known orders recovered, intervals, and its place in evaluate_models."""

import math

import numpy as np
import pytest
from datasets import Dataset

from trl_sgpo.evaluation import evaluate_models
from trl_sgpo.evaluation.judges import PointwiseJudge
from trl_sgpo.evaluation.ranking import ELO_SCALE, bradley_terry


STRENGTH = {"base": 0.0, "weak": 0.4, "mid": 1.0, "strong": 1.8}


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_soft_verdicts_recover_the_strengths_that_made_them():
    # Every pair, every prompt: the exact Bradley-Terry probability as a soft verdict.
    names = list(STRENGTH)
    pairs = {(a, b): [sigmoid(STRENGTH[a] - STRENGTH[b])] * 30 for i, a in enumerate(names) for b in names[i + 1 :]}
    ranking = bradley_terry(pairs, names, n_bootstrap=10)
    assert [m["model"] for m in ranking["models"]] == ["strong", "mid", "weak", "base"]
    for m in ranking["models"]:
        assert m["elo"] == pytest.approx(1000 + ELO_SCALE * STRENGTH[m["model"]], abs=2)
        assert m["win_prob"] == pytest.approx(sigmoid(STRENGTH[m["model"]]), abs=1e-3)
    assert [m["rank"] for m in ranking["models"]] == [1, 2, 3, 4]


def test_hard_noisy_verdicts_against_the_baseline_keep_the_order_and_intervals_hold_the_estimate():
    rng = np.random.default_rng(1)
    n = 200
    pairs = {}
    for name in ("weak", "mid", "strong"):
        wins = rng.random(n) < sigmoid(STRENGTH[name])
        pairs[name, "base"] = np.where(wins, 1.0, 0.0).tolist()
    pairs["mid", "base"][:4] = [0.5, 0.5, math.nan, math.nan]  # ties and abstentions are fine
    ranking = bradley_terry(pairs, list(STRENGTH), n_bootstrap=60, seed=3)
    assert [m["model"] for m in ranking["models"]] == ["strong", "mid", "weak", "base"]
    for m in ranking["models"]:
        assert m["elo_ci_low"] <= m["elo"] <= m["elo_ci_high"]
        assert m["win_prob_ci_low"] <= m["win_prob"] <= m["win_prob_ci_high"]
        if m["model"] != "base":
            assert m["elo_ci_high"] - m["elo_ci_low"] > 10  # a real interval, not a point
    base = next(m for m in ranking["models"] if m["model"] == "base")
    assert (base["elo"], base["elo_ci_low"], base["elo_ci_high"], base["win_prob"]) == (1000, 1000, 1000, 0.5)


def test_a_clean_sweep_is_finite_and_inputs_are_checked():
    ranking = bradley_terry({("a", "base"): [1.0] * 20, ("b", "base"): [0.0] * 20}, ["base", "a", "b"], n_bootstrap=5)
    elo = {m["model"]: m["elo"] for m in ranking["models"]}
    assert elo["a"] > 1000 > elo["b"] and all(math.isfinite(v) for v in elo.values())
    ties = bradley_terry({("a", "base"): [0.5] * 5, ("b", "base"): [0.5] * 5}, ["base", "a", "b"], n_bootstrap=5)
    assert [m["rank"] for m in ties["models"]] == [1, 1, 1]  # no order where the verdicts give none
    with pytest.raises(ValueError, match="have no verdicts"):
        bradley_terry({("a", "base"): [1.0]}, ["base", "a", "c"])
    with pytest.raises(ValueError, match="one verdict per prompt"):
        bradley_terry({("a", "base"): [1.0], ("c", "base"): [1.0, 0.0]}, ["base", "a", "c"])
    with pytest.raises(ValueError, match="not in"):
        bradley_terry({("a", "x"): [1.0]}, ["base", "a"])


class LengthJudge(PointwiseJudge):
    name = "length"

    def scores(self, prompts, answers, references=None):
        return [len(a) / 5 for a in answers]


class Fixed:
    """An answer generator with one fixed answer (its length sets its strength under LengthJudge)."""

    def __init__(self, name, answer):
        self.name, self.answer = name, answer

    def render(self, prompt):
        return prompt

    def generate(self, texts, seed):
        return [(f"{self.answer} {t[-1]}", 5, True) for t in texts]


def test_evaluate_models_ranks_three_or_more_models_in_the_report(tmp_path):
    rows = Dataset.from_dict({"prompt": [f"Question {i}" for i in range(8)]})
    models = {"base": Fixed("base", "ok"), "long": Fixed("long", "a much longer answer"), "mid": Fixed("mid", "okay!")}
    kwargs = dict(n_bootstrap=20, show_progress=False)
    report = evaluate_models(models, rows, LengthJudge(), tmp_path / "three", **kwargs)
    ranking = report["ranking"]
    assert [m["model"] for m in ranking["models"]] == ["long", "mid", "base"]
    assert ranking["pairs"] == [["long", "base"], ["mid", "base"]]
    markdown = (tmp_path / "three" / "report.md").read_text()
    assert "Bradley-Terry ranking" in markdown and "| 1 | long |" in markdown and "ranking.png" in markdown
    assert (tmp_path / "three" / "ranking.png").is_file()
    # Every pair judged: the non-baseline pair too, saved like the others.
    report = evaluate_models(models, rows, LengthJudge(), tmp_path / "all", rank_all_pairs=True, **kwargs)
    assert report["ranking"]["pairs"] == [["long", "base"], ["mid", "base"], ["long", "mid"]]
    assert (tmp_path / "all" / "judgments" / "long.vs.mid.jsonl").is_file()
    # Two models: nothing to rank.
    report = evaluate_models(dict(list(models.items())[:2]), rows, LengthJudge(), tmp_path / "two", **kwargs)
    assert "ranking" not in report and not (tmp_path / "two" / "ranking.png").exists()
