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

import gc
import itertools
import logging
import math
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from datasets import Dataset

from ..data.checks import check_rows
from ..io.jsonl import ROW_ID, JsonlWriter, ensure_row_ids, load_rows, read_jsonl, stable_hash
from ..openai_client import OpenAIEndpoint, cost_summary
from .answers import TransformersGenerator, generate_answers
from .identity import identity_hash, rerun_line, weights_identity
from .judges import OpenAIPairwiseJudge, PairwiseJudge
from .scores import compare_scores


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
    judged again, unless the judge abstained. Each new verdict is appended to ``path`` as ``{row_id, preference, key,
    judge, pair}``; one log line says how many verdicts were reused and why the others were not."""
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
    if todo:
        preferences = judge.judge(
            [prompts[i] for i in todo],
            [answers[i] for i in todo],
            [baseline_answers[i] for i in todo],
            [references[i] for i in todo] if references is not None else None,
        )
        with JsonlWriter(path) as writer:
            rows = []
            for i, p in zip(todo, preferences, strict=True):
                p = float(p)
                done[keys[i]] = p
                preference = None if math.isnan(p) else p
                rows.append(
                    {
                        ROW_ID: row_ids[i],
                        "preference": preference,
                        "key": keys[i],
                        "judge": judge_key,
                        "pair": pairs[i],
                    }
                )
            writer.write_many(rows)
    return [math.nan if done[key] is None else float(done[key]) for key in keys]


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

    if not models:
        raise ValueError("`models` is empty: give at least a baseline and one model to compare with it.")
    if len(models) < 2 and not improver:
        raise ValueError("Need at least two models (the first is the baseline), or `improver=True`.")
    if not isinstance(improver, bool):
        if isinstance(improver, str):
            raise TypeError(
                f"`improver` takes True/False or a collection of model names, not a string: [{improver!r}]."
            )
        improver = set(improver)
        if improver - set(models):
            raise ValueError(
                f"`improver` names {sorted(improver - set(models))}, not among the models {list(models)}."
            )
    out = Path(output_dir)
    dataset = load_rows(prompts_dataset) if not isinstance(prompts_dataset, Dataset) else prompts_dataset
    check_rows(dataset, ("prompt",), ("prompt",), "prompts_dataset", " (a string, or a list of chat messages)")
    dataset = ensure_row_ids(dataset)
    if isinstance(judge, OpenAIPairwiseJudge) and judge.cache_path is None:
        judge.cache_path = out / "judge_cache.jsonl"
    references = dataset[reference_column] if reference_column in dataset.column_names else None
    categories = dataset[category_column] if category_column in dataset.column_names else None
    prompts, row_ids = dataset["prompt"], dataset[ROW_ID]

    names = list(models)
    baseline = names[0]
    answers: dict[str, list[str]] = {}
    improvements: dict[str, list[str]] = {}
    report_models: dict[str, Any] = {}
    for name in names:
        folder = out / "answers" / _safe(name)
        generator, owned = _generator(models[name], max_new_tokens, temperature, device, name)
        answered = generate_answers(
            generator,
            dataset,
            folder / "answers.jsonl",
            batch_size=batch_size,
            seed=seed,
            show_progress=show_progress,
        )
        answers[name] = answered["answer"]
        entry = {
            "answers": str(folder / "answers.jsonl"),
            "model_outputs": str(folder / "model_outputs.json"),
            "avg_length": sum(len(a) for a in answers[name]) / max(1, len(answers[name])),
            "cut_at_budget": sum(1 for f in answered["answer_finished"] if not f),
        }
        if improver is True or (improver and name in improver):  # every model, or the named ones
            drafts = answered.rename_column("answer", "draft").select_columns([ROW_ID, "prompt", "draft"])
            improved = generate_answers(
                generator,
                drafts,
                folder / "improvements.jsonl",
                batch_size=batch_size,
                seed=seed,
                improve=True,
                show_progress=show_progress,
            )
            improvements[name] = improved["answer"]
            entry["improvements"] = str(folder / "improvements.jsonl")
            entry["improvements_cut_at_budget"] = sum(1 for f in improved["answer_finished"] if not f)
        report_models[name] = entry
        if owned:
            del generator
            gc.collect()

    verdicts: dict[tuple[str, str], list[float]] = {}  # the main judge's, for the ranking

    def judged_by(judge: PairwiseJudge, folder: Path, record: dict | None = None) -> tuple[dict, dict]:
        """Each model against the baseline, and each improver against its own drafts."""

        def score(mine: list[str], theirs: list[str], file: str, pair: tuple[str, str] = ()) -> dict[str, Any]:
            preferences = judge_rows(judge, prompts, mine, theirs, row_ids, references, folder / file)
            if record is not None and pair:
                record[pair] = preferences
            return compare_scores(
                preferences,
                mine,
                theirs,
                categories,
                n_bootstrap=n_bootstrap,
                n_bootstrap_lc=n_bootstrap // 5,
                confidence=confidence,
                seed=seed,
            )

        versus_baseline = {
            n: score(answers[n], answers[baseline], f"{_safe(n)}.jsonl", (n, baseline)) for n in names[1:]
        }
        versus_drafts = {n: score(improvements[n], answers[n], f"{_safe(n)}.improver.jsonl") for n in improvements}
        return versus_baseline, versus_drafts

    comparisons, improver_scores = judged_by(judge, out / "judgments", verdicts)
    second = {}
    for label, other in (extra_judges or {}).items():
        other_comparisons, other_improver = judged_by(other, out / "judgments" / _safe(label))
        second[label] = {"judge": other.name, "judge_settings": other.identity(), "comparisons": other_comparisons}
        if improver:
            second[label]["improver"] = other_improver

    report: dict[str, Any] = {
        "baseline": baseline,
        "judge": judge.name,
        "judge_settings": judge.identity(),
        "n_prompts": len(dataset),
        "confidence": confidence,
        "models": report_models,
        "comparisons": comparisons,
    }
    if improver:
        report["improver"] = improver_scores
    if second:
        report["extra_judges"] = second
    if len(names) >= 3:
        from .ranking import bradley_terry

        others = itertools.combinations(names[1:], 2) if rank_all_pairs else []
        for a, b in others:
            file = out / "judgments" / f"{_safe(a)}.vs.{_safe(b)}.jsonl"
            verdicts[a, b] = judge_rows(judge, prompts, answers[a], answers[b], row_ids, references, file)
        report["ranking"] = bradley_terry(
            verdicts, names, n_bootstrap=min(n_bootstrap, 100), confidence=confidence, seed=seed
        )
    stats = getattr(judge, "stats", None)
    if stats is not None and hasattr(stats, "as_dict"):
        report["judge_stats"] = stats.as_dict()
    if isinstance(judge, OpenAIEndpoint) and "judge_stats" in report:
        report["judge_cost"] = cost_summary(judge, stats)
        report["judge_stats"]["cost_usd"] = report["judge_cost"]["usd"]  # None, not $0, when no price is known
    answer_lengths = {name: [len(a) for a in answers[name]] for name in names}
    return write_report(report, out, answer_lengths=answer_lengths, trainer_states=trainer_states, plots=plots)
