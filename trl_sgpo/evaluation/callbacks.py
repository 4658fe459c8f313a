"""The win rate against the starting model, during training: :class:`WinRateCallback`."""

from __future__ import annotations

import logging
import os

from datasets import Dataset
from transformers import TrainerCallback

from ..io.jsonl import ensure_row_ids, load_rows
from .answers import TransformersGenerator
from .judges import PairwiseJudge
from .win_rates import compare_scores


logger = logging.getLogger(__name__)


class WinRateCallback(TrainerCallback):
    """Every ``eval_steps`` steps, answer a small held-out prompt set and log the win rate against the start model.

    At the start of training the model answers the prompts once (those are the baseline answers); then every
    ``eval_steps`` optimizer steps (and at the end) it answers them again, ``judge`` compares the two, and the callback
    logs ``eval_win_rate``, ``eval_win_rate_ci_low``/``_high``, ``eval_lc_win_rate`` and ``eval_avg_length`` through
    ``trainer.log``, so they reach every ``report_to`` backend (trackio, wandb, tensorboard...).

    Generation runs on every process (a sharded model, ZeRO-3 or FSDP, needs all of them); judging and logging on the
    main one. Keep the prompt set small (tens of rows): it runs in the training loop.

    Args:
        judge: Any :class:`~trl_sgpo.evaluation.judges.PairwiseJudge`.
        trainer: The trainer (its model, tokenizer, ``log``).
        eval_dataset: Rows with ``prompt`` (and ``reference`` for the similarity judge): a ``Dataset`` or a file.
            Use prompts training never sees.
        eval_steps: Steps between evaluations (default: ``trainer.args.eval_steps``, else ``logging_steps``).
        max_new_tokens, batch_size: Answer generation (greedy).
        n_bootstrap: Resamples for the interval.
    """

    def __init__(
        self,
        judge: PairwiseJudge,
        trainer,
        eval_dataset: Dataset | str | os.PathLike,
        *,
        eval_steps: int | None = None,
        max_new_tokens: int = 128,
        batch_size: int = 8,
        n_bootstrap: int = 200,
    ):
        self.judge = judge
        self.trainer = trainer
        self.dataset = ensure_row_ids(load_rows(eval_dataset))
        args = trainer.args
        self.eval_steps = eval_steps or getattr(args, "eval_steps", None) or args.logging_steps
        if isinstance(self.eval_steps, float):  # a float < 1 is a fraction of the run, as in TrainingArguments
            self.eval_steps = max(1, round(self.eval_steps * (trainer.state.max_steps or 1)))
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.n_bootstrap = n_bootstrap
        self.baseline_answers: list[str] | None = None
        self.history: list[dict[str, float]] = []
        self._last_step = -1

    def _answers(self, model) -> list[str]:
        tokenizer = self.trainer.processing_class
        generator = TransformersGenerator(model, tokenizer, max_new_tokens=self.max_new_tokens, temperature=0.0)
        prompts = self.dataset["prompt"]
        answers: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            texts = [generator.render(p) for p in prompts[start : start + self.batch_size]]
            answers += [text for text, _, _ in generator.generate(texts, seed=0)]
        return answers

    def _model(self, kwargs):
        model = kwargs.get("model") or self.trainer.model
        return self.trainer.accelerator.unwrap_model(model)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.baseline_answers is None:
            self.baseline_answers = self._answers(self._model(kwargs))

    def _evaluate(self, state, kwargs) -> None:
        if state.global_step == self._last_step:
            return
        self._last_step = state.global_step
        answers = self._answers(self._model(kwargs))
        if not state.is_world_process_zero:
            return
        references = self.dataset["reference"] if "reference" in self.dataset.column_names else None
        preferences = self.judge.judge(self.dataset["prompt"], answers, self.baseline_answers, references)
        s = compare_scores(preferences, answers, self.baseline_answers, n_bootstrap=self.n_bootstrap, n_bootstrap_lc=0)
        metrics = {
            "eval_win_rate": s["win_rate"],
            "eval_win_rate_ci_low": s["ci_low"],
            "eval_win_rate_ci_high": s["ci_high"],
            "eval_lc_win_rate": s["lc_win_rate"],
            "eval_avg_length": s["avg_length"],
        }
        self.history.append({"step": state.global_step, **metrics})
        self.trainer.log(metrics)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > 0 and state.global_step % self.eval_steps == 0:
            self._evaluate(state, kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        self._evaluate(state, kwargs)
