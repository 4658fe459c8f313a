"""The items every round trained on, as one dataset beside the final model (and on the Hub beside the pushed model).

Each round's trainer writes ``stages/05_<method>_iter<k>/items.jsonl`` (:mod:`trl_sgpo.trainers.items_log`). At the
end of the run :func:`collect_items` joins them into ``<output_dir>/items/items.jsonl``, each line with its ``round``
and ``method``, plus a dataset card; with ``--push_to_hub``, :func:`push_items` uploads that folder as the dataset
repository ``<model repo>-items``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..trainers.items_log import ITEMS_FILE, read_items


ITEMS_DIR = "items"

CARD = """---
tags:
- trl
- trl-sgpo
- {method}
---

# Items trained on by {model}

One line per item made during {method} training, {rounds} round(s), {lines} items: `round`, `step` (optimizer step
of the round) and `id`; the `prompt`; the generated `texts`; `kept`, and `flags` (why a dropped item was dropped);
`values` (judge scores, win rates) and, for kept items, `metrics` (the per-item loss and its figures, such as the DPO
reward margin). Written by trl-sgpo.

```python
from datasets import load_dataset

items = load_dataset("{repo}", split="train")
```
"""


def collect_items(out: Path, round_dirs: list[Path], method: str, model: str) -> Path | None:
    """Join the rounds' ``items.jsonl`` into ``out/items/`` (with a card); ``None`` when no round wrote items."""
    sources = [(k, d / ITEMS_FILE) for k, d in enumerate(round_dirs, start=1) if (d / ITEMS_FILE).is_file()]
    if not sources:
        return None
    folder = out / ITEMS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    lines = 0
    with open(folder / ITEMS_FILE, "w", encoding="utf-8") as dst:
        for k, path in sources:
            for item in read_items(path):
                dst.write(json.dumps({"round": k, "method": method, **item}, ensure_ascii=False) + "\n")
                lines += 1
    card = CARD.format(method=method, model=model, rounds=len(sources), lines=lines, repo=f"{model}-items")
    (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


def push_items(api, model_repo: str, folder: Path, args) -> str:
    """Upload ``folder`` (from :func:`collect_items`) as the dataset ``<model_repo>-items``; returns its repo id."""
    repo_id = api.create_repo(
        f"{model_repo}-items", token=args.hub_token, private=args.hub_private_repo, exist_ok=True, repo_type="dataset"
    ).repo_id
    # The card was written before the repository existed: name it as created (a bare id gains the user's namespace).
    card = folder / "README.md"
    text = re.sub(r'load_dataset\("[^"]*"', f'load_dataset("{repo_id}"', card.read_text(encoding="utf-8"))
    card.write_text(re.sub(r"(?m)^# Items trained on by .*$", f"# Items trained on by {model_repo}", text))
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="dataset",
        allow_patterns=[ITEMS_FILE, "README.md"],
        commit_message="Items of each training round",
        token=args.hub_token,
        revision=args.hub_revision,
    )
    return repo_id
