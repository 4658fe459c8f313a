"""Which rows go where: the held-out rows the recipe evaluates on, drawn before any stage takes its rows."""

from __future__ import annotations

from datasets import Dataset

from ..io.jsonl import stable_hash


def split_held_out(dataset: Dataset, n: int, seed: int) -> tuple[Dataset, Dataset]:
    """``(train, held_out)``: ``n`` rows drawn at random (``seed``) before anything trains, and the rest.

    The one rule for the recipe, ``recipes/compare.py`` and ``benchmarks/quality.py``, so that their held-out figures
    are taken on the same prompts. ``n`` of 0 holds nothing out.
    """
    if not n:
        return dataset, dataset.select([])
    parts = dataset.train_test_split(test_size=n, seed=seed)
    return parts["train"], parts["test"]


def held_out_rows(dataset: Dataset, used: list[Dataset]) -> Dataset:
    """The rows of ``dataset`` whose prompt is in none of ``used``."""
    seen = {stable_hash(p) for part in used for p in part["prompt"]}
    return dataset.select([i for i, p in enumerate(dataset["prompt"]) if stable_hash(p) not in seen])
