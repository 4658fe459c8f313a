"""Dataset checks shared by the trainers and the pipeline, and the prompt/reference set shipped with the package."""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

from datasets import Dataset, IterableDataset, load_dataset

from ..templates import render_prompt


logger = logging.getLogger(__name__)

DEFAULT_DATASET_FILE = "sgpo_default.jsonl"
CONCISE_INSTRUCTION = "Answer in at most three sentences."
"""Added to each shipped prompt by :func:`load_default_dataset`: the small default model then writes answers that end
within the demo's token budget (asked nothing, 51 of its 64 answers ran past 64 tokens), so that SGPO trains on
finished answers rather than drop cut-off ones."""


def load_default_dataset(conversational: bool = True, concise: bool = True) -> Dataset:
    """The prompt/reference set shipped inside the package (``prompt``, ``reference``, ``category``, ``id``).

    With ``conversational=True`` each prompt is a one-turn chat (``[{"role": "user", "content": ...}]``), so that
    instruct models see their chat template; TRL uses plain-string prompts as raw text. With ``concise=True`` each
    prompt ends with :data:`CONCISE_INSTRUCTION`.
    """
    path = resources.files("trl_sgpo.resources") / DEFAULT_DATASET_FILE
    with resources.as_file(path) as local:
        dataset = load_dataset("json", data_files=str(local), split="train")
    if concise:
        dataset = dataset.map(lambda row: {"prompt": f"{row['prompt']}\n\n{CONCISE_INSTRUCTION}"})
    if conversational:
        dataset = dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    return dataset


def warn_if_raw_prompts(dataset, tokenizer, name: str = "dataset") -> None:
    """Warn when string prompts meet a chat model: TRL feeds them raw, without the chat template."""
    raw = isinstance(dataset, Dataset) and len(dataset) and isinstance(dataset[0]["prompt"], str)
    if raw and getattr(tokenizer, "chat_template", None):
        logger.warning(
            "`%s` has plain-string prompts, which are used as raw text (TRL's standard format), but the tokenizer "
            "has a chat template. For an instruct model, give prompts as messages: "
            "`dataset.map(lambda r: {'prompt': [{'role': 'user', 'content': r['prompt']}]})`.",
            name,
        )


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):  # conversational: empty, or no message with text
        return not value or all(not str(m.get("content") or "").strip() for m in value)
    return False


def _show(rows: list[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, rows[:limit]))
    return shown + (f", ... ({len(rows)} rows)" if len(rows) > limit else "")


def check_columns(dataset, required: tuple[str, ...], name: str, hint: str = "") -> None:
    """Raise a ``ValueError`` naming the missing columns of ``dataset`` and how to fix it."""
    if dataset is None:
        raise ValueError(f"`{name}` is required.")
    columns = dataset.column_names
    if columns is None:  # an IterableDataset without known features: checked when rows arrive
        return
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(
            f"`{name}` is missing the column(s) {missing}; it has {list(columns)}. "
            f"It needs {list(required)}{hint}. Rename a column with `dataset.rename_column(old, new)`."
        )


def check_non_empty(dataset: Dataset, columns: tuple[str, ...], name: str) -> None:
    """Raise a ``ValueError`` listing the rows where any of ``columns`` is empty."""
    for column in columns:
        bad = [i for i, v in enumerate(dataset[column]) if _is_empty(v)]
        if bad:
            raise ValueError(
                f"`{name}` has an empty `{column}` in row(s) {_show(bad)}. Remove them, e.g. "
                f"`dataset.filter(lambda row: row['{column}'])`."
            )


def check_rows(
    dataset,
    required: tuple[str, ...],
    non_empty: tuple[str, ...] = (),
    name: str = "dataset",
    hint: str = "",
    no_rows_hint: str = "",
) -> None:
    """The input checks every stage starts with: ``required`` columns present, at least one row, ``non_empty`` filled.

    Raises a ``ValueError`` naming the missing columns (with ``hint`` on what they hold, see :func:`check_columns`),
    saying that ``dataset`` has no rows (followed by ``no_rows_hint``), or listing the rows where a ``non_empty``
    column is empty (see :func:`check_non_empty`). An ``IterableDataset`` only has its columns checked, when known:
    its rows are not read here.
    """
    check_columns(dataset, required, name, hint)
    if isinstance(dataset, IterableDataset):
        return
    if len(dataset) == 0:
        raise ValueError(f"`{name}` has no rows{no_rows_hint}.")
    check_non_empty(dataset, non_empty, name)


def check_prompt_dataset(dataset, tokenizer, max_prompt_tokens: int, name: str = "train_dataset"):
    """Validate a prompt dataset for SGPO and drop prompts too long to answer.

    A missing ``prompt`` column or empty prompts raise a ``ValueError`` (with row numbers). Prompts whose rendered
    length leaves fewer than ``max_new_tokens`` tokens of room within ``max_length`` (``max_prompt_tokens`` =
    ``max_length - max_new_tokens``) are dropped with a warning that counts them: their answers would be truncated
    away when scored.
    """
    check_rows(dataset, ("prompt",), ("prompt",), name, " (a string, or a list of chat messages)")
    if isinstance(dataset, IterableDataset):
        return dataset
    warn_if_raw_prompts(dataset, tokenizer, name)
    if max_prompt_tokens <= 0:
        raise ValueError(
            f"`max_length` must be larger than `max_new_tokens` (got room for {max_prompt_tokens} prompt tokens)."
        )
    lengths = [
        len(tokenizer(render_prompt(p, tokenizer), add_special_tokens=False)["input_ids"]) for p in dataset["prompt"]
    ]
    too_long = [i for i, n in enumerate(lengths) if n > max_prompt_tokens]
    if len(too_long) == len(dataset):
        raise ValueError(
            f"Every prompt of `{name}` is longer than {max_prompt_tokens} tokens (max_length - max_new_tokens); "
            f"the longest has {max(lengths)}. Raise `max_length` or shorten the prompts."
        )
    if too_long:
        logger.warning(
            "Skipping %d of %d prompts of `%s` longer than %d tokens (max_length - max_new_tokens): rows %s.",
            len(too_long),
            len(dataset),
            name,
            max_prompt_tokens,
            _show(too_long),
        )
        keep = sorted(set(range(len(dataset))) - set(too_long))
        dataset = dataset.select(keep)
    return dataset
