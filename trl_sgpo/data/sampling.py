"""Sample the policy's own answers ``y`` to a prompt/reference set: the first stage of improver-data building.

The improver learns to edit *the policy's* answers, so its SFT targets must start from answers the policy actually
writes. :func:`sample_responses` renders and tokenizes prompts exactly like :class:`~trl_sgpo.SGPOTrainer`'s policy
generation (``render_prompt``, ``add_special_tokens=False``, left padding, KV cache, stop at the first end-of-turn),
so that, with the same sampling settings, the answers come from the distribution SGPO will see.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import nullcontext

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import GenerationConfig

from ..io.jsonl import ROW_ID, JsonlWriter, batch_seed, ensure_row_ids, load_done, rows_in_order, shard_order
from ..templates import render_prompt
from .checks import check_rows


logger = logging.getLogger(__name__)


def check_prompt_reference(dataset: Dataset, name: str = "dataset") -> None:
    """Raise a ``ValueError`` naming the missing ``prompt``/``reference`` column or the rows where one is empty."""
    columns = ("prompt", "reference")
    check_rows(dataset, columns, columns, name, " (`prompt`: a string or chat messages; `reference`: a string)")


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-answer ids: the tokenizer's EOS plus every EOS of the model's generation config (e.g. ``<|im_end|>``)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in [extra] if isinstance(extra, int) else list(extra or []):
        if i not in ids:
            ids.append(i)
    return ids


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    texts: list[str],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.9,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> list[tuple[list[int], bool]]:
    """Generate one completion per already-rendered prompt text.

    Returns ``(token ids up to and including the first stop token, finished)`` per text, where ``finished`` says
    whether a stop token was produced before ``max_new_tokens``. ``temperature=0`` means greedy decoding; ``top_k``
    ``None`` or ``0`` means no top-k filtering, as in TRL's ``OnlineDPOConfig``. ``seed``
    fixes the sampling RNG for this call without disturbing the caller's RNG state.
    """
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = temperature > 0
    # A fresh config with explicit values, as TRL's OnlineDPO builds it (generate() fills the rest from the model's).
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=(top_k or 0) if sampling else None,  # 0 disables top-k; None would mean transformers' default, 50
        repetition_penalty=1.0,
        use_cache=True,
        eos_token_id=stops,
        pad_token_id=pad,
    )
    inputs = tokenizer(
        text=texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    ).to(model.device)
    devices = [model.device] if model.device.type == "cuda" else []
    rng = torch.random.fork_rng(devices=devices) if seed is not None else nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        output = model.generate(**inputs, generation_config=config)
    results = []
    for row in output[:, inputs["input_ids"].size(1) :].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        results.append((row[: end + 1], True) if end is not None else (row, False))
    return results


def sample_responses(
    model,
    tokenizer,
    dataset: Dataset,
    output_path: str | os.PathLike,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 0.9,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    id_column: str = "id",
    show_progress: bool = True,
    shard: tuple[int, int] | None = None,
    before_batch: Callable[[], None] | None = None,
) -> Dataset:
    """Answer every prompt of ``dataset`` with ``model`` and add the answers as a ``response`` column.

    Args:
        model: The policy (a causal LM); it is used in eval mode on its current device.
        tokenizer: Its tokenizer (needs a pad token; :func:`~trl_sgpo.models.load_model_and_tokenizer` sets one).
        dataset: Rows with a ``prompt`` (string or chat messages); every other column is passed through.
        output_path: JSONL file written as batches finish (appended, fsynced). If it exists, rows already in it (by
            ``row_id``) are not sampled again, so an interrupted run resumes where it stopped.
        batch_size: Prompts per ``generate`` call (prompts are grouped by length to limit padding).
        max_new_tokens, temperature, top_p, top_k: Sampling settings; use those of your ``SGPOConfig`` so that the
            answers match what SGPO's policy generation produces (TRL's defaults are temperature 0.9, top-p 1).
            ``temperature=0`` is greedy.
        seed: Each batch is sampled with a seed derived from ``seed`` and its row ids, so reruns are reproducible.
        id_column: Column to take ``row_id`` from when present (see :func:`~trl_sgpo.jsonl.ensure_row_ids`).
        show_progress: Show a tqdm progress bar.
        shard: ``(index, count)``: answer only this process's share of the rows (see
            :func:`~trl_sgpo.io.jsonl.shard_order`), into its own ``output_path``; the shares of ``count``
            processes hold the same batches as one process's run, so the merged answers do not depend on ``count``.
        before_batch: Called before each batch; it may raise to stop (the recipe stops when another process failed).

    Returns:
        The input rows (of the shard) that have a response, in input order, with ``row_id``, ``response`` (decoded
        without special tokens, stripped), ``response_tokens`` and ``response_finished`` (``False`` when cut at ``max_new_tokens``).
    """
    check_rows(dataset, ("prompt",), ("prompt",), "dataset", " (a string, or a list of chat messages)")
    dataset = ensure_row_ids(dataset, id_column)
    done = load_done(output_path, dataset, ("prompt",))
    texts = [render_prompt(prompt, tokenizer) for prompt in dataset["prompt"]]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    mine = shard_order(lengths, batch_size, shard)
    row_ids = dataset[ROW_ID]
    pending = [i for i in mine if row_ids[i] not in done]
    if done:
        logger.info("Resuming %s: %d of %d rows already sampled.", output_path, len(mine) - len(pending), len(mine))

    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    was_training = model.training
    model.eval()
    try:
        with (
            JsonlWriter(output_path) as writer,
            tqdm(
                total=len(mine),
                initial=len(mine) - len(pending),
                desc="Sampling responses",
                disable=not show_progress,
            ) as bar,
        ):
            for start in range(0, len(pending), batch_size):
                if before_batch is not None:
                    before_batch()
                batch = pending[start : start + batch_size]
                rows = [dataset[i] for i in batch]
                _answer_batch(model, tokenizer, rows, [texts[i] for i in batch], sampling, seed)
                done.update((row[ROW_ID], row) for row in rows)
                writer.write_many(rows)
                bar.update(len(rows))
    finally:
        model.train(was_training)

    result = rows_in_order(dataset if shard is None else dataset.select(sorted(mine)), done)
    _warn_empty(result)
    return result


def _warn_empty(result: Dataset) -> None:
    empty = sum(1 for r in result["response"] if not r) if len(result) else 0
    if empty:
        logger.warning(
            "%d of %d responses are empty; the target writers will record them as failures.", empty, len(result)
        )


def _answer_batch(model, tokenizer, rows: list[dict], texts: list[str], sampling: dict, seed: int) -> None:
    """Sample one answer per row (seeded by ``seed`` and the rows' ids) and add ``response``, ``response_tokens`` and
    ``response_finished`` to each."""
    outputs = generate_completions(model, tokenizer, texts, **sampling, seed=batch_seed(seed, rows))
    for row, (ids, finished) in zip(rows, outputs, strict=True):
        row["response"] = tokenizer.decode(ids, skip_special_tokens=True).strip()
        row["response_tokens"] = len(ids)
        row["response_finished"] = finished
