"""Checks on the prompt/reference set shipped inside the package (trl_sgpo/resources/sgpo_default.jsonl)."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest


DATA_FILE = Path(__file__).resolve().parents[1] / "trl_sgpo" / "resources" / "sgpo_default.jsonl"


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


@pytest.fixture(scope="module")
def rows():
    lines = DATA_FILE.read_text(encoding="utf-8").splitlines()
    parsed = []
    for number, line in enumerate(lines, 1):
        assert line.strip(), f"blank line {number}"
        row = json.loads(line)
        assert isinstance(row, dict), f"line {number} is not a JSON object"
        parsed.append(row)
    return parsed


def test_row_count(rows):
    assert len(rows) >= 200


def test_fields_are_non_empty_strings(rows):
    for row in rows:
        for key in ("id", "category", "prompt", "reference"):
            assert isinstance(row.get(key), str) and row[key].strip(), f"{row.get('id')}: bad `{key}`"


def test_ids_unique_and_match_category(rows):
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), [i for i, c in Counter(ids).items() if c > 1]
    for row in rows:
        assert re.fullmatch(re.escape(row["category"]) + r"-\d{3}", row["id"]), row["id"]


def test_prompts_unique_after_normalization(rows):
    counts = Counter(_normalize(row["prompt"]) for row in rows)
    assert not [p for p, c in counts.items() if c > 1]


def test_reference_word_counts(rows):
    bad = [(row["id"], n) for row in rows if not 10 <= (n := len(row["reference"].split())) <= 150]
    assert not bad, bad


def test_categories_balanced(rows):
    counts = Counter(row["category"] for row in rows)
    big = {c: n for c, n in counts.items() if n >= 10}
    assert len(big) >= 8, counts
