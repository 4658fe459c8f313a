"""The perplexity filter: keep the improver targets that the current policy could plausibly have written.

SGPO's improver should make *incremental* improvements the policy can learn to make itself (arXiv 2507.20181). A
target written by a much stronger LLM can be far from anything the policy writes; training on it teaches style
transfer rather than improvement. So each target is scored under the policy and compared with the policy's own answer.

How perplexity is computed. For a row ``{prompt, response, target}``, both the response and the target are scored as
*answers to the question*: the completion of the rendered policy prompt ``render_prompt(prompt)``, followed by the
end-of-turn text (:func:`~trl_sgpo.templates.end_of_turn_text`), tokenized without special tokens, exactly as improver
SFT appends it. The conditioning is identical for the two, so their ratio compares like with like. Perplexity is
``exp(mean negative log-likelihood)`` over the completion tokens. Sequences longer than ``max_length`` lose the left
part of the prompt first, then the end of the completion.

The rule (:class:`PerplexityFilterConfig`), applied in this order, first failing check wins:

1. ``empty_target``: the target is empty.
2. ``same_as_response``: the target equals the response (up to whitespace): nothing to learn.
3. ``copies_reference``: the target equals the reference: not an incremental step.
4. ``nonfinite``: a perplexity is NaN or infinite.
5. ``ppl_max``: ``target_ppl > max_ppl`` (off by default).
6. ``ppl_quantile``: ``target_ppl`` is above the ``max_quantile`` quantile of the *responses'* perplexities over the
   whole set, i.e. more surprising to the policy than most of its own answers (off by default).
7. ``ppl_ratio``: ``target_ppl > max_ratio * response_ppl``: far more surprising than the answer it edits (default
   ``max_ratio=3``).

:func:`filter_targets` scores the rows (resumable), applies the rule, and writes the kept rows ready for
:class:`~trl_sgpo.ImproverSFTTrainer`, the dropped ones with their reason, and a report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from tqdm.auto import tqdm

from ..io.jsonl import ROW_ID, JsonlWriter, ensure_row_ids, load_done, rows_in_order, shard_order, write_jsonl_atomic
from ..templates import end_of_turn_text, render_prompt
from .checks import check_rows


logger = logging.getLogger(__name__)

SCORES_FILE = "scores.jsonl"
KEPT_FILE = "improver_sft.jsonl"
KEPT_DIR = "improver_sft"
DROPPED_FILE = "dropped.jsonl"
REPORT_FILE = "filter_report.json"
_MAX_MEAN_NLL = 80.0  # exp(80) ~ 5e34: keeps perplexities finite and JSON-safe for garbage text


@dataclass(frozen=True)
class PerplexityFilterConfig:
    """Which scored targets to keep; see the module docstring for the order of the checks.

    Args:
        max_ratio: Keep a target only if ``target_ppl <= max_ratio * response_ppl``. ``None`` disables the check.
        max_quantile: Keep a target only if ``target_ppl`` is at most this quantile (in ``(0, 1]``) of the
            responses' perplexities over the whole set. ``None`` disables the check.
        max_ppl: Keep a target only if ``target_ppl <= max_ppl``. ``None`` disables the check.
        drop_same_as_response: Drop targets equal to the response (up to whitespace).
        drop_reference_copies: Drop targets equal to the reference (up to whitespace).
    """

    max_ratio: float | None = 3.0
    max_quantile: float | None = None
    max_ppl: float | None = None
    drop_same_as_response: bool = True
    drop_reference_copies: bool = True

    def __post_init__(self):
        if self.max_ratio is not None and self.max_ratio <= 0:
            raise ValueError(f"`max_ratio` must be > 0 or None, got {self.max_ratio}.")
        if self.max_quantile is not None and not 0 < self.max_quantile <= 1:
            raise ValueError(f"`max_quantile` must be in (0, 1] or None, got {self.max_quantile}.")
        if self.max_ppl is not None and self.max_ppl <= 0:
            raise ValueError(f"`max_ppl` must be > 0 or None, got {self.max_ppl}.")


def _encode(
    tokenizer, prompt, completion: str, max_length: int, end_of_turn: str | None = None
) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(render_prompt(prompt, tokenizer), add_special_tokens=False)["input_ids"]
    if end_of_turn is None:
        end_of_turn = end_of_turn_text(prompt, tokenizer)
    completion_ids = tokenizer(completion.strip() + end_of_turn, add_special_tokens=False)["input_ids"]
    completion_ids = completion_ids[: max_length - 1]  # at least one prompt token conditions the first prediction
    room = max_length - len(completion_ids)
    return prompt_ids[-room:], completion_ids


@torch.no_grad()
def completion_nll(
    model,
    tokenizer,
    prompts: list,
    completions: list[str],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
) -> list[tuple[float, int]]:
    """Summed negative log-likelihood and token count of each completion given its prompt, under ``model``.

    Each pair is encoded as ``render_prompt(prompt)`` + ``completion`` + end-of-turn (see the module docstring).
    Sequences are grouped by length and left-padded, so every completion ends at the last position and the LM head is
    only applied to the last ``max completion length + 1`` positions (``logits_to_keep``) instead of the whole
    sequence: most of the cost of a plain forward pass on a large vocabulary is in the LM head.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"Got {len(prompts)} prompts and {len(completions)} completions.")
    # end_of_turn_text renders a chat template; it only depends on the prompt's format, so render it once per format.
    endings = dict.fromkeys((True, False))

    def ending(prompt) -> str:
        fmt = isinstance(prompt, list)
        if endings[fmt] is None:
            endings[fmt] = end_of_turn_text(prompt, tokenizer)
        return endings[fmt]

    encoded = [_encode(tokenizer, p, c, max_length, ending(p)) for p, c in zip(prompts, completions, strict=True)]
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            seqs = [encoded[i][0] + encoded[i][1] for i in batch]
            lengths = [len(encoded[i][1]) for i in batch]
            width, keep = max(map(len, seqs)), max(lengths)
            input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=model.device)
            attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=model.device)
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = _last_logits(model, input_ids, attention_mask, position_ids, keep + 1)[:, :-1].float()
            labels = input_ids[:, width - keep :]
            # Column j predicts token width-keep+j; it belongs to row r's completion when j >= keep - length_r.
            columns = torch.arange(keep, device=model.device)
            mask = columns[None, :] >= (keep - torch.tensor(lengths, device=model.device))[:, None]
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="none")
            sums = (nll.view(len(batch), keep) * mask).sum(-1).tolist()
            for i, total, n in zip(batch, sums, lengths, strict=True):
                results[i] = (total, n)
    finally:
        model.train(was_training)
    return results


def _last_logits(model, input_ids, attention_mask, position_ids, keep: int) -> torch.Tensor:
    try:
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=keep,
            use_cache=False,
        ).logits
    except TypeError:  # a model without `logits_to_keep`: full logits, then slice
        return model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits[:, -keep:]


def perplexities(model, tokenizer, prompts: list, completions: list[str], **kwargs) -> list[float]:
    """Perplexity of each completion given its prompt (see :func:`completion_nll` for the arguments)."""
    return [_ppl(total, n) for total, n in completion_nll(model, tokenizer, prompts, completions, **kwargs)]


def _ppl(total: float, n: int) -> float:
    if n == 0:
        return float("nan")
    return math.exp(min(total / n, _MAX_MEAN_NLL))


def score_targets(
    model,
    tokenizer,
    dataset: Dataset,
    output_path: str | os.PathLike,
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    id_column: str = "id",
    show_progress: bool = True,
    shard: tuple[int, int] | None = None,
    before_batch: Callable[[], None] | None = None,
) -> Dataset:
    """Add ``response_ppl``, ``target_ppl`` and ``ppl_ratio`` (target / response) to every row, under ``model``.

    Args:
        model, tokenizer: The current policy (the model the improver SFT will train).
        dataset: Rows with ``prompt``, ``response`` and ``target`` (e.g. from
            :func:`~trl_sgpo.target_writers.write_targets`).
        output_path: JSONL of scored rows, appended per batch; rows already in it are not scored again.
        batch_size: Rows per batch (each row is two sequences: response and target).
        max_length: Most tokens per scored sequence (prompt + completion).
        shard: ``(index, count)``: score only this process's share of the rows, into its own ``output_path``
            (see :func:`~trl_sgpo.io.jsonl.shard_order`).
        before_batch: Called before each batch; it may raise to stop (the recipe stops when another process failed).

    Returns:
        The scored rows (of the shard) in input order, also with ``response_ppl_tokens`` and ``target_ppl_tokens``.
    """
    check_rows(
        dataset,
        ("prompt", "response", "target"),
        hint=" (targets come from `trl-sgpo targets`)",
        no_rows_hint=": no target was written (see the targets' failures file)",
    )
    dataset = ensure_row_ids(dataset, id_column)
    done = load_done(output_path, dataset, ("prompt", "response", "target"))
    # In input order (the scoring groups each batch by length itself): the shares only need to be balanced.
    mine = sorted(shard_order([0] * len(dataset), batch_size, shard))
    row_ids = dataset[ROW_ID]
    pending = [i for i in mine if row_ids[i] not in done]
    with (
        JsonlWriter(output_path) as writer,
        tqdm(
            total=len(mine), initial=len(mine) - len(pending), desc="Scoring targets", disable=not show_progress
        ) as bar,
    ):
        for start in range(0, len(pending), batch_size):
            if before_batch is not None:
                before_batch()
            rows = [dataset[i] for i in pending[start : start + batch_size]]
            prompts = [r["prompt"] for r in rows]
            scores = completion_nll(
                model,
                tokenizer,
                prompts + prompts,
                [r["response"] or "" for r in rows] + [r["target"] or "" for r in rows],
                batch_size=2 * batch_size,
                max_length=max_length,
            )
            for k, row in enumerate(rows):
                (r_total, r_n), (t_total, t_n) = scores[k], scores[len(rows) + k]
                row["response_ppl"], row["target_ppl"] = _ppl(r_total, r_n), _ppl(t_total, t_n)
                row["ppl_ratio"] = row["target_ppl"] / row["response_ppl"]
                row["response_ppl_tokens"], row["target_ppl_tokens"] = r_n, t_n
                done[row[ROW_ID]] = row
            writer.write_many(rows)
            bar.update(len(rows))
    return rows_in_order(dataset if shard is None else dataset.select(mine), done)


def _normalized(text: Any) -> str:
    return " ".join(str(text or "").split())


def drop_reasons(scored: Dataset, config: PerplexityFilterConfig) -> tuple[list[str | None], dict[str, Any]]:
    """The reason each scored row is dropped (``None``: kept) under ``config``, and the thresholds used."""
    responses_ppl = [p for p in scored["response_ppl"] if math.isfinite(p)]
    thresholds: dict[str, Any] = {}
    quantile_cut = None
    if config.max_quantile is not None and responses_ppl:
        quantile_cut = float(torch.quantile(torch.tensor(responses_ppl, dtype=torch.float64), config.max_quantile))
        thresholds["response_ppl_quantile"] = quantile_cut
    has_reference = "reference" in scored.column_names
    reasons: list[str | None] = []
    for row in scored:
        target, r_ppl, t_ppl = _normalized(row["target"]), row["response_ppl"], row["target_ppl"]
        if not target:
            reason = "empty_target"
        elif config.drop_same_as_response and target == _normalized(row["response"]):
            reason = "same_as_response"
        elif config.drop_reference_copies and has_reference and target == _normalized(row["reference"]):
            reason = "copies_reference"
        elif not (math.isfinite(r_ppl) and math.isfinite(t_ppl)):
            reason = "nonfinite"
        elif config.max_ppl is not None and t_ppl > config.max_ppl:
            reason = "ppl_max"
        elif quantile_cut is not None and t_ppl > quantile_cut:
            reason = "ppl_quantile"
        elif config.max_ratio is not None and t_ppl > config.max_ratio * r_ppl:
            reason = "ppl_ratio"
        else:
            reason = None
        reasons.append(reason)
    return reasons, thresholds


def _median(values: list[float]) -> float | None:
    finite = sorted(v for v in values if math.isfinite(v))
    return finite[len(finite) // 2] if finite else None


def _remove_tree(path: Path) -> None:
    """Remove the folder ``path`` if it exists; an error (e.g. permission denied) is raised, not ignored."""
    if path.exists():
        shutil.rmtree(path)


def filter_targets(
    model,
    tokenizer,
    dataset: Dataset,
    output_dir: str | os.PathLike,
    config: PerplexityFilterConfig | None = None,
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    id_column: str = "id",
    show_progress: bool = True,
) -> tuple[Dataset, dict[str, Any]]:
    """Score every target under the policy and keep those that pass ``config``; write the improver-SFT set.

    Files written in ``output_dir``:

    - ``scores.jsonl``: every row with its perplexities (resumable: a rerun scores only new rows, so changing the
      thresholds and rerunning costs no model call);
    - ``improver_sft.jsonl`` and ``improver_sft/`` (``Dataset.save_to_disk``): the kept rows, with at least
      ``prompt``, ``response``, ``target`` and the perplexity columns, ready for :class:`~trl_sgpo.ImproverSFTTrainer`
      (``datasets.load_from_disk(output_dir / "improver_sft")``);
    - ``dropped.jsonl``: the dropped rows with a ``drop_reason``;
    - ``filter_report.json``: counts kept and dropped per reason, the rule and thresholds, median perplexities.

    Args:
        model, tokenizer: The current policy.
        dataset: Rows with ``prompt``, ``response`` and ``target`` (``reference`` too, to drop copies of it).
        output_dir: Folder for the files above.
        config: The keep rule; defaults to :class:`PerplexityFilterConfig()` (``max_ratio=3``).
        batch_size, max_length: Scoring batch size (rows) and most tokens per scored sequence.

    Returns:
        ``(kept, report)``: the kept rows, in input order, and the report written to ``filter_report.json`` (what was
        dropped and why).
    """
    config = config or PerplexityFilterConfig()
    output_dir = Path(output_dir)
    scored = score_targets(
        model,
        tokenizer,
        dataset,
        output_dir / SCORES_FILE,
        batch_size=batch_size,
        max_length=max_length,
        id_column=id_column,
        show_progress=show_progress,
    )
    return apply_filter(scored, output_dir, config)


def apply_filter(
    scored: Dataset, output_dir: str | os.PathLike, config: PerplexityFilterConfig | None = None
) -> tuple[Dataset, dict[str, Any]]:
    """The second half of :func:`filter_targets`: apply ``config`` to rows scored by :func:`score_targets` and write
    the kept set, the dropped rows and the report into ``output_dir``. Returns ``(kept, report)``."""
    config = config or PerplexityFilterConfig()
    output_dir = Path(output_dir)
    reasons, thresholds = drop_reasons(scored, config)
    kept_idx = [i for i, r in enumerate(reasons) if r is None]
    kept = scored.select(kept_idx)
    dropped = [{**scored[i], "drop_reason": r} for i, r in enumerate(reasons) if r is not None]
    counts: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            counts[r] = counts.get(r, 0) + 1
    report = {
        "rows": len(scored),
        "kept": len(kept),
        "dropped": len(dropped),
        "dropped_by_reason": counts,
        "rule": asdict(config),
        "thresholds": thresholds,
        "median_response_ppl": _median(scored["response_ppl"]) if len(scored) else None,
        "median_target_ppl": _median(scored["target_ppl"]) if len(scored) else None,
        "median_ppl_ratio": _median(scored["ppl_ratio"]) if len(scored) else None,
    }
    write_jsonl_atomic(output_dir / KEPT_FILE, kept.to_list())
    write_jsonl_atomic(output_dir / DROPPED_FILE, dropped)
    # Never leave a stale set from an earlier run; a removal that fails raises rather than leave it there unnoticed.
    _remove_tree(output_dir / KEPT_DIR)
    if len(kept):
        tmp = output_dir / (KEPT_DIR + ".tmp")
        _remove_tree(tmp)
        kept.save_to_disk(str(tmp))
        os.replace(tmp, output_dir / KEPT_DIR)
    with open(output_dir / REPORT_FILE, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    logger.info(
        "Perplexity filter: kept %d of %d targets; dropped %s (%s).",
        len(kept),
        len(scored),
        counts or "none",
        output_dir / REPORT_FILE,
    )
    if len(scored) and not len(kept):
        logger.warning("The filter dropped every target; see %s and loosen the rule.", output_dir / REPORT_FILE)
    return kept, report
