"""Evaluation: win rates of models against a baseline on held-out prompts, with pluggable judges.

- :mod:`~trl_sgpo.evaluation.answers`: generate answers (batched, resumable, AlpacaEval ``model_outputs.json``).
- :mod:`~trl_sgpo.evaluation.judges`: ``PairwiseJudge`` and its implementations (OpenAI-compatible LLM, reward
  model, reference similarity, ROUGE-L against the reference).
- :mod:`~trl_sgpo.evaluation.arena_hard`: ``ArenaHardJudge``, Arena-Hard style judging (own answer, five-level
  verdict, two games).
- :mod:`~trl_sgpo.evaluation.local_judge`: ``LocalPairwiseJudge``, a causal LM judging in this process.
- :mod:`~trl_sgpo.evaluation.judge_factory`: :func:`build_judge`, a judge by kind (the one factory of the CLI and the
  recipes).
- :mod:`~trl_sgpo.evaluation.ranking`: Bradley-Terry ranking of several models with bootstrap intervals.
- :mod:`~trl_sgpo.evaluation.win_rates`: win rate with a bootstrap interval, length-controlled win rate, per category.
- :mod:`~trl_sgpo.evaluation.win_rate_metric`: the same as an ``evaluate`` module (``evaluate.load(WIN_RATE_METRIC_PATH)``).
- :mod:`~trl_sgpo.evaluation.reports`: ``report.json``, ``report.md`` and figures.
- :mod:`~trl_sgpo.evaluation.compare`: :func:`evaluate_models`, the whole comparison (the module; the scores of one
  comparison are :func:`~trl_sgpo.evaluation.win_rates.compare_scores`).
- :mod:`~trl_sgpo.evaluation.identity`: what a saved answer or verdict was made by (content hashes of weights).
- :mod:`~trl_sgpo.evaluation.callbacks`: :class:`WinRateCallback`, the win rate during training.
- :mod:`~trl_sgpo.evaluation.cli`: ``trl-sgpo eval``.
"""

import importlib
from pathlib import Path


WIN_RATE_METRIC_PATH = str(Path(__file__).with_name("win_rate_metric.py"))
"""Path for ``evaluate.load``: the win-rate metric module shipped in the package."""

_EXPORTS = {
    "evaluate_models": "compare",
    "judge_rows": "compare",
    "generate_answers": "answers",
    "TransformersGenerator": "answers",
    "VLLMGenerator": "answers",
    "PairwiseJudge": "judges",
    "PointwiseJudge": "judges",
    "OpenAIPairwiseJudge": "judges",
    "RewardModelJudge": "judges",
    "ReferenceSimilarityJudge": "judges",
    "ReferenceRougeJudge": "judges",
    "build_judge": "judge_factory",
    "ArenaHardJudge": "arena_hard",
    "LocalPairwiseJudge": "local_judge",
    "bradley_terry": "ranking",
    "win_rate": "win_rates",
    "length_controlled_win_rate": "win_rates",
    "compare_scores": "win_rates",
    "write_report": "reports",
    "WinRateCallback": "callbacks",
}

__all__ = ["WIN_RATE_METRIC_PATH", *_EXPORTS]


def __getattr__(name):
    # Lazy: `import trl_sgpo.evaluation` must not pull in torch, sklearn or sentence-transformers.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
