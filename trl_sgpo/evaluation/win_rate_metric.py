"""Win rate against a baseline, as an ``evaluate`` metric module (shipped with trl-sgpo, loads offline).

```python
import evaluate
from trl_sgpo.evaluation import WIN_RATE_METRIC_PATH

metric = evaluate.load(WIN_RATE_METRIC_PATH)
metric.compute(preferences=[1.0, 0.5, 0.0, 1.0], model_lengths=[120, 80, 60, 150], baseline_lengths=[100] * 4)
```

The numbers are those of :func:`trl_sgpo.evaluation.win_rates.compare_scores` (the same code runs).
"""

import datasets
import evaluate


_DESCRIPTION = """Win rate of a model against a baseline from a judge's per-row preferences P(model beats baseline),
with ties as half a win, a percentile bootstrap interval and standard error, and a length-controlled win rate (a logistic model of the
preference on the length difference, read at zero difference, with its length slope; lengths in characters, as
AlpacaEval)."""

_KWARGS_DESCRIPTION = """
Args:
    preferences (`list` of `float`): per row, P(model's answer beats the baseline's) in [0, 1]; nan: abstained.
    model_lengths (`list` of `int`): length of the model's answer per row (characters).
    baseline_lengths (`list` of `int`): length of the baseline's answer per row.
    n_bootstrap (`int`, defaults to 1000): bootstrap resamples for the win-rate interval.
    n_bootstrap_lc (`int`, defaults to 200): bootstrap refits for the length-controlled interval.
    confidence (`float`, defaults to 0.95): interval level.
    seed (`int`, defaults to 0): bootstrap seed.
Returns:
    win_rate, ci_low, ci_high, se, lc_win_rate, lc_ci_low, lc_ci_high, lc_se, lc_identified, lc_reason,
    lc_length_slope, lc_slope_ci_low, lc_slope_ci_high, lc_slope_se, wins, ties, losses, n, abstained, avg_length,
    baseline_avg_length, mean_length_difference. `lc_win_rate` is nan (and `lc_reason` says why) when the data do not
    identify it (see `trl_sgpo.evaluation.win_rates.length_controlled_win_rate`).
"""

_CITATION = """@article{dubois2024length,
  title={Length-Controlled AlpacaEval: A Simple Way to Debias Automatic Evaluators},
  author={Dubois, Yann and Galambosi, Bal{\\'a}zs and Liang, Percy and Hashimoto, Tatsunori B},
  journal={arXiv preprint arXiv:2404.04475},
  year={2024}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WinRateMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "preferences": datasets.Value("float64"),
                    "model_lengths": datasets.Value("int64"),
                    "baseline_lengths": datasets.Value("int64"),
                }
            ),
        )

    def _compute(
        self,
        preferences,
        model_lengths,
        baseline_lengths,
        n_bootstrap=1000,
        n_bootstrap_lc=200,
        confidence=0.95,
        seed=0,
    ):
        from trl_sgpo.evaluation.win_rates import scores_from_lengths

        return scores_from_lengths(
            preferences,
            model_lengths,
            baseline_lengths,
            n_bootstrap=n_bootstrap,
            n_bootstrap_lc=n_bootstrap_lc,
            confidence=confidence,
            seed=seed,
        )
