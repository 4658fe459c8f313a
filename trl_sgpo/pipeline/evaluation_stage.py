"""The recipe's evaluation stage: win rates on held-out prompts of the start model, the improver-SFT model and each
SGPO round, against the start model, and of each as improver of its own answers.

Held-out rows (``num_eval_prompts``, 64 by default) are drawn from the dataset before any stage takes its rows
(:func:`~trl_sgpo.data.splits.split_held_out`), so training never sees them; with a dataset under twice that size
none are held out and the stage is skipped, saying why.
The judge is the OpenAI-compatible one with ``--judge_model`` (at ``--base_url``, or api.openai.com; its cost is in
the report, priced by ``--judge_price_in/--judge_price_out`` or a known model's list price), else the offline
reference-similarity judge; rows with a ``reference`` are also judged by ROUGE-L against it, a second score.
Everything goes to the evaluation stage's folder under ``stages/`` (:data:`~.stages.STAGE_FOLDERS`; resumable, see
:func:`~trl_sgpo.evaluation.evaluate_models`); the report and figures are copied to ``<output_dir>/evaluation/``, the
final model card gains an "Evaluation" section, and the run summary the table.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers.trainer_utils import get_last_checkpoint

from ..data.splits import held_out_rows
from ..io.peers import Peers
from .stages import Stage, run_stage, stage_folder


logger = logging.getLogger(__name__)

CARD_START = "<!-- trl-sgpo evaluation -->"
CARD_END = "<!-- /trl-sgpo evaluation -->"
EVAL_DIR = "evaluation"


IMPROVER_CHOICES = ("start", "improver_sft", "final")


def _improver_names(value: str) -> list[str]:
    return [name.strip() for name in str(value).split(",") if name.strip()]


def improvers_to_judge(value: str, models: list[str]) -> list[str]:
    """The models of ``models`` (start, improver_sft, rounds) that ``eval_improver`` names, in their order."""
    names = set(_improver_names(value))
    if "all" in names:
        return list(models)
    if "final" in names and len(models) > 1:
        names.add(models[-1])
    return [m for m in models if m in names]


@dataclass
class EvaluationArguments:
    """Settings of the recipe's evaluation stage (mixed into ``SGPOScriptArguments``)."""

    num_eval_prompts: int = field(
        default=64,
        metadata={
            "help": "Held-out prompts, drawn before any stage takes its rows (never trained on), to compare the start, "
            "improver-SFT and SGPO models on; 0 skips the evaluation. None are held out (and the evaluation is "
            "skipped) when the dataset has fewer than twice as many rows."
        },
    )
    judge_model: str | None = field(
        default=None,
        metadata={
            "help": "Judge model name at `base_url` (or api.openai.com). Unset: the offline reference-similarity "
            "judge (needs `reference`)."
        },
    )
    judge_price_in: float | None = field(
        default=None,
        metadata={
            "help": "USD per 1M prompt tokens of the judge (`judge_model`), for its cost in the report. Unset: the "
            "list price of a known OpenAI model at api.openai.com (trl_sgpo.openai_client.KNOWN_PRICES_PER_1M), "
            "else the cost is reported as unknown. Give both prices or neither."
        },
    )
    judge_price_out: float | None = field(
        default=None, metadata={"help": "USD per 1M completion tokens of the judge (see `judge_price_in`)."}
    )
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Most tokens per evaluated answer (default: the SGPO `max_new_tokens`)."}
    )
    eval_improver: str = field(
        default="improver_sft",
        metadata={
            "help": "Models also judged as improvers (their improvements of their own answers against those "
            f"answers): comma-separated among {IMPROVER_CHOICES} (`final`: the last round), or `all`, or `none`. "
            "Each costs a generation pass; names the run has not trained are skipped."
        },
    )

    def __post_init__(self):
        if (self.judge_price_in is None) != (self.judge_price_out is None):
            raise ValueError(
                "Give both `judge_price_in` and `judge_price_out` (USD per 1M prompt / completion tokens), or neither "
                "(the list price of a known OpenAI judge model)."
            )
        if self.num_eval_prompts < 0:
            raise ValueError(f"`num_eval_prompts` must be >= 0 (0: no evaluation), got {self.num_eval_prompts}.")
        unknown = set(_improver_names(self.eval_improver)) - {*IMPROVER_CHOICES, "all", "none"}
        if unknown:
            raise ValueError(
                f"`eval_improver` {self.eval_improver!r} names {sorted(unknown)}; use names among "
                f"{IMPROVER_CHOICES}, separated by commas, or `all` or `none`."
            )


def _judge(script_args, out: Path):
    """The evaluation's judge: the OpenAI-compatible ``judge_model`` when set (its key read on first use), else the
    reference-similarity one."""
    from ..evaluation.judge_factory import build_judge
    from .methods import judge_endpoint

    if not script_args.judge_model:
        return build_judge("similarity")
    endpoint = judge_endpoint(script_args)
    return build_judge("openai", read_api_key=False, cache_path=out / "judge_cache.jsonl", **endpoint)


def _card_section(report: dict[str, Any]) -> str:
    from ..evaluation.reports import markdown_table

    images = "".join(f"\n![{name}]({EVAL_DIR}/{name})\n" for name in report.get("files", {}) if name.endswith(".png"))
    return (
        f"{CARD_START}\n## Evaluation\n\nWin rates on {report['n_prompts']} held-out prompts that training never saw "
        f"(produced by the trl-sgpo recipe's evaluation stage).\n\n{markdown_table(report)}{images}{CARD_END}\n"
    )


def _update_card(card: Path, section: str) -> None:
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    pattern = re.compile(re.escape(CARD_START) + ".*?" + re.escape(CARD_END) + "\n?", re.DOTALL)
    text = pattern.sub("", text).rstrip("\n")
    card.write_text((text + "\n\n" if text else "") + section, encoding="utf-8")


@dataclass
class EvaluationOutput:
    """What the evaluation stage hands on to the run's summary and its Hub push."""

    summary: dict[str, Any] | None = None  # the stage's figures (this run's or a finished run's); None: no stage
    section: dict[str, Any] | None = None  # the report's path and table (main process), or why the stage was skipped
    files: list[str] = field(default_factory=list)  # main process: what it added to output_dir (relative paths)


def run_evaluation_stage(
    script_args,
    training_args,
    held_out: Dataset | None,
    used: list[Dataset],
    dataset_rows: int,
    model_name: str,
    stages_dir: Path,
    state,
    after: Stage | None,
    method: str = "sgpo",
) -> EvaluationOutput:
    """Run the evaluation stage on the ``held_out`` rows (main process; the others wait). Rows whose prompt is in
    ``used`` (the datasets trained on: a prompt repeated in several rows can be on both sides of the split) are left
    out. ``held_out`` is None when the dataset (``dataset_rows``) was too small to hold any out. Adds the table to the
    final card (``<last stage>/README.md``). ``method`` names the training rounds' folders
    (:func:`~trl_sgpo.pipeline.stages.stage_folder`). Returns what the run's summary and Hub push take from it."""
    if not script_args.num_eval_prompts:
        return EvaluationOutput()
    rows, skipped = _rows_to_judge(script_args, held_out, used, dataset_rows)
    if rows is None:
        return EvaluationOutput(section={"skipped": skipped})
    models, states = _trained_models(stages_dir, model_name, method, script_args.iterations)
    settings = {
        "models": list(models),
        "num_eval_prompts": script_args.num_eval_prompts,
        "judge": script_args.judge_model or "reference-similarity",
        "judge_base_url": script_args.base_url if script_args.judge_model else None,
        "max_new_tokens": script_args.eval_max_new_tokens or training_args.max_new_tokens,
        "improver": improvers_to_judge(script_args.eval_improver, list(models)),
        # A second, independent score where rows carry references, so a gain is not an artifact of one judge.
        "extra_judges": ["rouge_l"] if "reference" in rows.column_names else [],
        "seed": training_args.seed,
    }
    stage = Stage(stages_dir / stage_folder("evaluation"), "evaluation", settings, after=after)
    # Only the main process evaluates; the others wait on signal files, so an error there ends them too, at once,
    # with its message (a collective barrier would hold them until ddp_timeout).
    peers = Peers(stages_dir.parent / ".sync", state)
    message = f"[6/6] evaluating {', '.join(models)} on {len(rows)} held-out prompts"
    with peers.guard("the evaluation stage"), run_stage(stage, state, message, peers) as todo:
        if todo is not None and state.is_main_process:  # not finished yet
            todo.update(_evaluate(stage, models, rows, script_args, training_args, settings, states, state))
    if not state.is_main_process:  # the main process wrote everything
        return EvaluationOutput(stage.summary)
    report = json.loads((stage.root / "report.json").read_text(encoding="utf-8"))
    files, section = _publish_report(report, stage, Path(training_args.output_dir), models, model_name)
    return EvaluationOutput(stage.summary, section, files)


def _rows_to_judge(script_args, held_out: Dataset | None, used: list[Dataset], dataset_rows: int):
    """``(rows, None)``: the held-out rows to evaluate on, or ``(None, why the stage is skipped)``."""
    n = script_args.num_eval_prompts
    rows = held_out_rows(held_out, used) if held_out is not None else None
    if not rows:
        message = (
            f"skipped: the dataset has {dataset_rows} rows; holding out --num_eval_prompts {n} needs at least "
            f"{2 * n} (as many left to train on). Give more data or lower --num_eval_prompts (0: no evaluation)."
            if held_out is None
            else "skipped: every held-out prompt was also trained on (in another row of the dataset or in "
            "--improver_data)."
        )
        if held_out is not None:  # a dataset too small was warned about when the run started
            logger.warning("Evaluation %s", message)
        return None, message
    if len(rows) < len(held_out):
        logger.warning(
            "Evaluation: %d held-out prompts were also trained on (in another row or --improver_data): left out.",
            len(held_out) - len(rows),
        )
    if not script_args.judge_model and "reference" not in rows.column_names:
        raise ValueError(
            "The offline evaluation judge compares answers with each row's `reference`; the dataset has none. Pass "
            "--judge_model (and --base_url) for an LLM judge, or --num_eval_prompts 0 to skip the evaluation."
        )
    return rows, None


def _trained_models(stages_dir: Path, model_name: str, method: str, iterations: int):
    """``(models, states)``: ``{name: model}`` of the start model and every model the run trained (improver SFT, each
    round), and ``{name: trainer_state.json}`` of those with a checkpoint."""
    models = {"start": model_name}
    states = {}
    trained = [("improver_sft", stage_folder("improver_sft"))] + [
        (f"{method}_iter{i}", stage_folder("sgpo", method, i)) for i in range(1, iterations + 1)
    ]
    for name, folder in trained:
        root = stages_dir / folder
        if (root / "model").is_dir():
            models[name] = str(root / "model")
            checkpoint = get_last_checkpoint(str(root))
            if checkpoint and (Path(checkpoint) / "trainer_state.json").is_file():
                states[name] = str(Path(checkpoint) / "trainer_state.json")
    return models, states


def _publish_report(report, stage: Stage, out: Path, models: dict[str, str], model_name: str):
    """Copy the report and figures to ``<out>/evaluation/`` and add the table to the final card; return the files
    added (relative paths) and the summary's section (the report's path and table)."""
    from ..evaluation.reports import text_table

    target = out / EVAL_DIR
    target.mkdir(parents=True, exist_ok=True)
    added = []
    for name in report.get("files", {}):
        shutil.copy2(stage.root / name, target / name)
        added.append(f"{EVAL_DIR}/{name}")
    last_model = next(reversed(models.values()))
    if last_model != model_name:
        _update_card(Path(last_model).parent / "README.md", _card_section(report))
    return added, {"report": str(target / "report.json"), "table": text_table(report)}


def _evaluate(stage, models, rows, script_args, training_args, settings, states, state) -> dict[str, Any]:
    """Evaluate into the stage's folder (``report.json`` and figures) and return the stage's figures."""
    from ..evaluation.compare import evaluate_models  # heavy (sentence-transformers, scikit-learn): on use only
    from ..evaluation.judges import ReferenceRougeJudge

    report = evaluate_models(
        models,
        rows,
        _judge(script_args, stage.root),
        stage.root,
        improver=settings["improver"],
        extra_judges={"rouge_l": ReferenceRougeJudge()} if "rouge_l" in settings["extra_judges"] else None,
        max_new_tokens=settings["max_new_tokens"],
        batch_size=script_args.sample_batch_size,
        seed=training_args.seed,
        device=str(state.device),
        trainer_states=states,
    )
    figures = {f"win_rate/{k}": v["win_rate"] for k, v in report["comparisons"].items()}
    figures.update({f"improver_win_rate/{k}": v["win_rate"] for k, v in report.get("improver", {}).items()})
    for label, other in report.get("extra_judges", {}).items():
        figures.update({f"{label}/win_rate/{k}": v["win_rate"] for k, v in other["comparisons"].items()})
    return figures
