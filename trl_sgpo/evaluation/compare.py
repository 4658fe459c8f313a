"""Compare models against a baseline on a prompt set: :func:`evaluate_models`, the Python API behind ``trl-sgpo eval``,
the recipe's evaluation stage and the training callback.

Layout of ``output_dir`` (every file written as it goes; a rerun redoes only the answers whose model or generation
settings changed and the verdicts whose judge or texts changed, see :mod:`~trl_sgpo.evaluation.identity`)::

    answers/<model>/answers.jsonl         each model's answers, keyed by the model's identity and settings
    answers/<model>/model_outputs.json    the same, in AlpacaEval's format
    answers/<model>/improvements.jsonl    with improver=True: the model's improvements of its own answers
    judgments/<model>.jsonl               per row: P(model beats the baseline), keyed by the judge's identity and the
                                          exact texts judged
    judgments/<model>.improver.jsonl      per row: P(improvement beats the draft)
    judgments/<label>/...                 the same, by each of ``extra_judges``
    judgments/<a>.vs.<b>.jsonl            with rank_all_pairs: P(a beats b) for two non-baseline models
    judge_cache.jsonl                     the OpenAI judge's answer cache (no request is sent twice)
    report.json, report.md, *.png         see trl_sgpo.evaluation.reports
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import logging
import math
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

from ..data.checks import check_rows
from ..io.jsonl import ROW_ID, ensure_row_ids, load_rows, read_jsonl, stable_hash, write_jsonl_atomic
from ..openai_client import OpenAIEndpoint, cost_summary
from .answers import TransformersGenerator, generate_answers
from .identity import identity_hash, rerun_line, weights_identity
from .judges import OpenAIPairwiseJudge, PairwiseJudge
from .win_rates import compare_scores


logger = logging.getLogger(__name__)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _generator(spec: Any, max_new_tokens: int, temperature: float, device: str | None, name: str):
    """A generator for ``spec``: a generator object, a ``(model, tokenizer)`` pair, or a Hub id / folder to load."""
    if hasattr(spec, "generate") and hasattr(spec, "render"):
        return spec, False
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        model, tokenizer = spec
        owned = False
        identity = None  # an object that may have changed since it was loaded: its parameters are hashed
    elif isinstance(spec, (str, os.PathLike)):
        import torch

        from ..models import load_model_and_tokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model, tokenizer = load_model_and_tokenizer(str(spec), dtype=dtype)
        model.to(device)
        owned = True
        # Just loaded: the folder's files (or the Hub commit) are the weights, no need to hash them in memory.
        identity = weights_identity(model.sgpo_weights_path, model)
    else:
        raise TypeError(
            f"Model {name!r}: expected a Hub id or folder, a (model, tokenizer) pair or an answer generator, got "
            f"{type(spec).__name__}."
        )
    generator = TransformersGenerator(
        model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, name=name, model_identity=identity
    )
    return generator, owned


def judge_rows(
    judge: PairwiseJudge,
    prompts: list[Any],
    answers: list[str],
    baseline_answers: list[str],
    row_ids: list[str],
    references: list[str] | None,
    path: str | os.PathLike,
) -> list[float]:
    """``judge`` on every row, resuming from ``path``: a row judged before on the very same texts by a judge of the
    same identity (:meth:`~trl_sgpo.evaluation.judges.PairwiseJudge.identity`: class, settings, weights) is not
    judged again, unless the judge abstained. ``path`` then holds one row per prompt, ``{row_id, preference, key,
    judge, pair}``, this run's verdict (rewritten in one step); one log line says how many verdicts were reused and why
    the others were not."""
    judge_key = identity_hash(judge.identity())
    pairs = [
        stable_hash([p, a, b, r])
        for p, a, b, r in zip(prompts, answers, baseline_answers, references or [None] * len(prompts), strict=True)
    ]
    keys = [stable_hash([judge_key, pair]) for pair in pairs]
    saved = read_jsonl(path, missing_ok=True)
    # Abstentions (NaN, stored as None) are asked again: a request that failed for good is retried on a rerun, and an
    # unreadable reply comes back from the request cache without a new request.
    done = {e["key"]: e["preference"] for e in saved if e.get("preference") is not None}
    todo = [i for i, key in enumerate(keys) if key not in done]
    _log_verdict_reuse(judge, path, saved, row_ids, todo, judge_key, pairs)
    judged = {}
    if todo:
        preferences = judge.judge(
            [prompts[i] for i in todo],
            [answers[i] for i in todo],
            [baseline_answers[i] for i in todo],
            [references[i] for i in todo] if references is not None else None,
        )
        for i, p in zip(todo, preferences, strict=True):
            p = float(p)
            done[keys[i]] = None if math.isnan(p) else p
            judged[keys[i]] = {
                ROW_ID: row_ids[i],
                "preference": done[keys[i]],
                "key": keys[i],
                "judge": judge_key,
                "pair": pairs[i],
            }
    _rewrite_judgments(path, saved, judged, keys, row_ids)
    return [math.nan if done[key] is None else float(done[key]) for key in keys]


def _rewrite_judgments(path, saved: list[dict], judged: dict[str, dict], keys: list[str], row_ids: list[str]) -> None:
    """Rewrite ``path`` in one step with the current verdict of each row (a stale one, by another judge or on other
    texts, leaves the file, so that no reader takes it for this run's), plus the last row of each prompt this run
    does not cover, as answers.jsonl keeps them."""
    current = set(row_ids)
    others = {e[ROW_ID]: e for e in saved if ROW_ID in e and e[ROW_ID] not in current}
    latest = {e["key"]: e for e in saved if "key" in e}
    latest.update(judged)
    # Two prompts with the same texts share a verdict; each keeps its own row.
    rows = [
        *others.values(),
        *({**latest[key], ROW_ID: i} for key, i in zip(keys, row_ids, strict=True) if key in latest),
    ]
    if rows != saved:
        write_jsonl_atomic(path, rows)


def _log_verdict_reuse(judge, path, saved, row_ids, todo, judge_key, pairs) -> None:
    """The one line on how many verdicts in ``path`` were reused and why the others (``todo``) are asked again."""
    last = {e[ROW_ID]: e for e in saved if ROW_ID in e}
    changed: dict[str | None, int] = {}
    stale = 0
    for i in todo:
        old = last.get(row_ids[i])
        if old is None:
            continue
        stale += 1
        if "judge" not in old:
            reasons = [None]
        else:
            reasons = [
                r
                for r, differs in (("judge", old["judge"] != judge_key), ("pair", old["pair"] != pairs[i]))
                if differs
            ]
        for reason in reasons or ["abstained"]:
            changed[reason] = changed.get(reason, 0) + 1
    labels = {
        "judge": "judge changed",
        "pair": "answers changed",
        "abstained": "abstained before",
        None: "written without the judge's identity",
    }
    what = f"verdicts of {judge.name} in {Path(path).parent.name}/{Path(path).name}"
    logger.info(rerun_line(what, len(row_ids) - len(todo), stale, len(todo) - stale, changed, labels))


def evaluate_models(
    models: Mapping[str, Any],
    prompts_dataset: Dataset | str | os.PathLike,
    judge: PairwiseJudge,
    output_dir: str | os.PathLike,
    *,
    improver: bool | Collection[str] = False,
    extra_judges: Mapping[str, PairwiseJudge] | None = None,
    reference_column: str = "reference",
    category_column: str = "category",
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    batch_size: int = 8,
    seed: int = 0,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    device: str | None = None,
    trainer_states: Mapping[str, str | os.PathLike] | None = None,
    plots: bool = True,
    show_progress: bool = True,
    rank_all_pairs: bool = False,
) -> dict[str, Any]:
    """Answer ``prompts_dataset`` with every model, judge each against the first (the baseline), and report.

    Args:
        models: ``{name: model}``, in order; the first is the baseline. A model is a Hub id or folder (loaded, used,
            freed one at a time), a ``(model, tokenizer)`` pair, or an answer generator
            (:class:`~trl_sgpo.evaluation.answers.TransformersGenerator`, ``VLLMGenerator``).
        prompts_dataset: Rows with ``prompt`` (and ``reference`` for the similarity judge, ``category`` for the
            per-category table): a ``Dataset``, a JSONL/JSON file or a ``save_to_disk`` folder.
        judge: Any :class:`~trl_sgpo.evaluation.judges.PairwiseJudge`. An :class:`OpenAIPairwiseJudge` without a
            ``cache_path`` gets ``<output_dir>/judge_cache.jsonl``.
        output_dir: Where everything is written (see the module doc). A rerun resumes.
        improver: Also evaluate each model (``True``) or the named ones (a collection of names) as improver: its
            improvements of its own answers against those answers (the signal SGPO trains on), reported under
            ``improver``.
        extra_judges: ``{label: judge}`` that judge the same pairs again, as a check that a gain is not an artifact
            of one judge (e.g. ``{"rouge_l": ReferenceRougeJudge()}``); reported under ``extra_judges[label]``.
        reference_column, category_column: Column names (used when present).
        max_new_tokens, temperature, batch_size, seed: Answer generation (greedy by default).
        n_bootstrap, confidence: Bootstrap resamples and level of the intervals (the length-controlled interval refits
            a logistic model per resample, so it uses ``n_bootstrap // 5``).
        device: Device for models loaded from a name (default: cuda when available).
        trainer_states: ``{label: trainer_state.json path}`` to plot training curves from.
        plots: Write the matplotlib figures.
        show_progress: Progress bars.
        rank_all_pairs: With three or more models, also judge every pair of non-baseline models for the
            Bradley-Terry ranking (without: each model against the baseline only).

    Returns:
        The report (also in ``report.json``, where a missing figure is ``null``): ``baseline``, ``judge``,
        ``n_prompts``, ``models`` (answer files, average lengths, answers cut at the token budget), ``comparisons``
        (per non-baseline model: win rate, interval and standard error, length-controlled win rate or why it is not
        identified, its length slope with interval, counts, lengths, per category), with ``improver``, ``improver``
        (per model, improvement vs draft), with ``extra_judges``, ``extra_judges`` (per label: ``judge``,
        ``comparisons``, ``improver``), and for an OpenAI-compatible judge ``judge_cost`` (tokens sent in this run and
        their cost, ``usd`` null when no price is known), and with three or more
        models ``ranking`` (:func:`~trl_sgpo.evaluation.ranking.bradley_terry`).
    """
    from .reports import write_report

    improver = _check_models(models, improver)
    stats_before = _snapshot(getattr(judge, "stats", None))  # a judge used before (in training) has counted already
    out = Path(output_dir)
    rows = _prompt_rows(prompts_dataset, reference_column, category_column)
    if isinstance(judge, OpenAIPairwiseJudge) and judge.cache_path is None:
        judge.cache_path = out / "judge_cache.jsonl"
    generation = _Generation(max_new_tokens, temperature, batch_size, seed, device, show_progress)
    answered = _answer_all(models, rows, out / "answers", generation, improver)
    scoring = _Scoring(rows, answered, n_bootstrap, confidence, seed)
    verdicts: dict[tuple[str, str], list[float]] = {}  # the main judge's, for the ranking
    comparisons, improver_scores = scoring.judged_by(judge, out / "judgments", verdicts)
    extra = _extra_judge_scores(scoring, extra_judges or {}, out / "judgments", bool(improver))
    report = _report(judge, rows, answered, confidence, comparisons, improver_scores if improver else None, extra)
    if len(models) >= 3:
        report["ranking"] = _ranking(scoring, judge, out / "judgments", verdicts, rank_all_pairs)
    _add_judge_cost(report, judge, stats_before)
    answer_lengths = {name: [len(a) for a in answers] for name, answers in answered.answers.items()}
    return write_report(report, out, answer_lengths=answer_lengths, trainer_states=trainer_states, plots=plots)


def _check_models(models: Mapping[str, Any], improver: bool | Collection[str]) -> bool | set[str]:
    """``improver`` as ``True``/``False`` or the set of names it picks, after checking it and ``models``."""
    if not models:
        raise ValueError("`models` is empty: give at least a baseline and one model to compare with it.")
    if len(models) < 2 and not improver:
        raise ValueError("Need at least two models (the first is the baseline), or `improver=True`.")
    if isinstance(improver, bool):
        return improver
    if isinstance(improver, str):
        raise TypeError(f"`improver` takes True/False or a collection of model names, not a string: [{improver!r}].")
    improver = set(improver)
    if improver - set(models):
        raise ValueError(f"`improver` names {sorted(improver - set(models))}, not among the models {list(models)}.")
    return improver


@dataclass
class _PromptRows:
    """The prompt set and the columns the judges and the per-category table read."""

    dataset: Dataset
    prompts: list[Any]
    row_ids: list[str]
    references: list[str] | None
    categories: list[str] | None


def _prompt_rows(prompts_dataset, reference_column: str, category_column: str) -> _PromptRows:
    dataset = load_rows(prompts_dataset) if not isinstance(prompts_dataset, Dataset) else prompts_dataset
    check_rows(dataset, ("prompt",), ("prompt",), "prompts_dataset", " (a string, or a list of chat messages)")
    dataset = ensure_row_ids(dataset)
    return _PromptRows(
        dataset,
        dataset["prompt"],
        dataset[ROW_ID],
        dataset[reference_column] if reference_column in dataset.column_names else None,
        dataset[category_column] if category_column in dataset.column_names else None,
    )


@dataclass
class _Generation:
    """How every model answers (see :func:`evaluate_models`)."""

    max_new_tokens: int
    temperature: float
    batch_size: int
    seed: int
    device: str | None
    show_progress: bool


@dataclass
class _Answers:
    """Every model's answers (in the models' order, the baseline first), the improvers' improvements of their own
    answers, and each model's entry of the report."""

    answers: dict[str, list[str]] = field(default_factory=dict)
    improvements: dict[str, list[str]] = field(default_factory=dict)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def baseline(self) -> str:
        return next(iter(self.answers))


def _answer_all(
    models: Mapping[str, Any], rows: _PromptRows, folder: Path, generation: _Generation, improver: bool | set[str]
) -> _Answers:
    """Each model's answers (and improvements, for the improvers), one model loaded at a time."""
    answered = _Answers()
    for name, spec in models.items():
        generator, owned = _generator(spec, generation.max_new_tokens, generation.temperature, generation.device, name)
        improve = improver is True or (bool(improver) and name in improver)  # every model, or the named ones
        _answer_one(generator, name, rows.dataset, folder / _safe(name), generation, improve, answered)
        if owned:
            del generator
            gc.collect()
    return answered


def _answer_one(
    generator, name: str, dataset: Dataset, folder: Path, generation: _Generation, improve: bool, answered: _Answers
) -> None:
    """``name``'s answers (and, with ``improve``, its improvements of them) into ``answered``."""
    settings = dict(batch_size=generation.batch_size, seed=generation.seed, show_progress=generation.show_progress)
    answers = generate_answers(generator, dataset, folder / "answers.jsonl", **settings)
    answered.answers[name] = answers["answer"]
    entry = {
        "answers": str(folder / "answers.jsonl"),
        "model_outputs": str(folder / "model_outputs.json"),
        "avg_length": sum(len(a) for a in answers["answer"]) / max(1, len(answers["answer"])),
        "cut_at_budget": sum(1 for f in answers["answer_finished"] if not f),
    }
    if improve:
        drafts = answers.rename_column("answer", "draft").select_columns([ROW_ID, "prompt", "draft"])
        improved = generate_answers(generator, drafts, folder / "improvements.jsonl", improve=True, **settings)
        answered.improvements[name] = improved["answer"]
        entry["improvements"] = str(folder / "improvements.jsonl")
        entry["improvements_cut_at_budget"] = sum(1 for f in improved["answer_finished"] if not f)
    answered.entries[name] = entry


@dataclass
class _Scoring:
    """Judges pairs of answers on the prompt rows and turns the verdicts into win-rate figures."""

    rows: _PromptRows
    answered: _Answers
    n_bootstrap: int
    confidence: float
    seed: int

    def score(
        self, judge: PairwiseJudge, mine: list[str], theirs: list[str], path: Path, record=None, pair=()
    ) -> dict[str, Any]:
        """``mine`` against ``theirs`` by ``judge`` (verdicts resumed from ``path``; kept in ``record[pair]``)."""
        rows = self.rows
        preferences = judge_rows(judge, rows.prompts, mine, theirs, rows.row_ids, rows.references, path)
        if record is not None and pair:
            record[pair] = preferences
        return compare_scores(
            preferences,
            mine,
            theirs,
            rows.categories,
            n_bootstrap=self.n_bootstrap,
            n_bootstrap_lc=self.n_bootstrap // 5,
            confidence=self.confidence,
            seed=self.seed,
        )

    def judged_by(self, judge: PairwiseJudge, folder: Path, record: dict | None = None) -> tuple[dict, dict]:
        """Each model against the baseline, and each improver against its own drafts."""
        answers, baseline = self.answered.answers, self.answered.baseline
        versus_baseline = {
            n: self.score(judge, answers[n], answers[baseline], folder / f"{_safe(n)}.jsonl", record, (n, baseline))
            for n in list(answers)[1:]
        }
        versus_drafts = {
            n: self.score(judge, improved, answers[n], folder / f"{_safe(n)}.improver.jsonl")
            for n, improved in self.answered.improvements.items()
        }
        return versus_baseline, versus_drafts


def _extra_judge_scores(
    scoring: _Scoring, extra_judges: Mapping[str, PairwiseJudge], folder: Path, improver: bool
) -> dict[str, Any]:
    """``{label: {judge, judge_settings, comparisons[, improver]}}``: the same pairs judged by each extra judge."""
    second = {}
    for label, other in extra_judges.items():
        other_comparisons, other_improver = scoring.judged_by(other, folder / _safe(label))
        second[label] = {"judge": other.name, "judge_settings": other.identity(), "comparisons": other_comparisons}
        if improver:
            second[label]["improver"] = other_improver
    return second


def _report(
    judge: PairwiseJudge,
    rows: _PromptRows,
    answered: _Answers,
    confidence: float,
    comparisons: dict[str, Any],
    improver_scores: dict[str, Any] | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "baseline": answered.baseline,
        "judge": judge.name,
        "judge_settings": judge.identity(),
        "n_prompts": len(rows.dataset),
        "confidence": confidence,
        "models": answered.entries,
        "comparisons": comparisons,
    }
    if improver_scores is not None:
        report["improver"] = improver_scores
    if extra:
        report["extra_judges"] = extra
    return report


def _ranking(
    scoring: _Scoring,
    judge: PairwiseJudge,
    folder: Path,
    verdicts: dict[tuple[str, str], list[float]],
    rank_all_pairs: bool,
) -> dict[str, Any]:
    """The Bradley-Terry ranking from ``verdicts`` (each model against the baseline), plus every pair of
    non-baseline models judged now with ``rank_all_pairs``."""
    from .ranking import bradley_terry

    rows, answers = scoring.rows, scoring.answered.answers
    names = list(answers)
    for a, b in itertools.combinations(names[1:], 2) if rank_all_pairs else []:
        file = folder / f"{_safe(a)}.vs.{_safe(b)}.jsonl"
        verdicts[a, b] = judge_rows(judge, rows.prompts, answers[a], answers[b], rows.row_ids, rows.references, file)
    n_bootstrap = min(scoring.n_bootstrap, 100)
    return bradley_terry(verdicts, names, n_bootstrap=n_bootstrap, confidence=scoring.confidence, seed=scoring.seed)


def _snapshot(stats: Any) -> Any:
    return copy.deepcopy(stats) if dataclasses.is_dataclass(stats) else None


def _stats_since(before: Any, after: Any) -> Any:
    """The counts ``after`` gathered since ``before`` (same dataclass): numbers and per-key counts subtracted; a peak
    is not a count and stays as it is."""
    if before is None:
        return after
    delta = {}
    for f in dataclasses.fields(after):
        old, new = getattr(before, f.name), getattr(after, f.name)
        if f.name.startswith("peak"):
            delta[f.name] = new
        elif isinstance(new, dict):
            delta[f.name] = {k: v - old.get(k, 0) for k, v in new.items()}
        elif isinstance(new, (int, float)) and not isinstance(new, bool):
            delta[f.name] = new - old
    return dataclasses.replace(after, **delta)


def _add_judge_cost(report: dict[str, Any], judge: PairwiseJudge, before: Any = None) -> None:
    """The judge's request counts in this run (since ``before``, a snapshot of its ``stats``) and, for an
    OpenAI-compatible judge, their cost (``None``, not $0, when no price is known)."""
    stats = getattr(judge, "stats", None)
    if stats is not None and hasattr(stats, "as_dict"):
        stats = _stats_since(before, stats)
        report["judge_stats"] = stats.as_dict()
    if isinstance(judge, OpenAIEndpoint) and "judge_stats" in report:
        report["judge_cost"] = cost_summary(judge, stats)
        report["judge_stats"]["cost_usd"] = report["judge_cost"]["usd"]
