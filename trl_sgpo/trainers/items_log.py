"""What each optimizer step trained on: the items of every window, one JSON line each, in ``<output_dir>/items.jsonl``.

TRL's ``GRPOTrainer`` logs its completions (``log_completions``); for the preference trainers the thing to inspect is
the items themselves. :class:`ItemsLog` (a callback of :class:`~trl_sgpo.trainers.onpolicy.OnPolicyTrainer`, on when
``log_items``) writes one line per item made, kept or not:

- ``step``: the optimizer step the window belongs to (1-based, as ``checkpoint-<step>``); ``index``: the item's
  position in the window over all processes (process ``p`` of ``P`` holds positions ``[p * n, (p + 1) * n)``), so
  ``id`` (``"<step>-<index>"``) does not depend on which process made the item; ``prompt_index``: the position of its
  prompt (SPPO makes ``num_samples`` items per prompt);
- ``prompt`` and ``texts`` (the method's decoded texts: SGPO ``draft``/``improved``, SPPO ``completion``, SSO
  ``principle``/``y+``/``y-``/``yo``);
- ``kept``, and ``flags``: the names of the item's true flags (for a dropped item, why it was dropped);
- ``values``: what the method computed for every item (judge scores and margins, SPPO win rates), ``null`` if none;
- ``metrics``: for kept items, the per-item loss and the figures of ``item_losses`` (DPO reward margins, SPPO
  targets); ``null`` for dropped items.

Items are made on every process; the main process gathers them (``gather_object``) and appends the window's lines once
its last micro-batch has run (``on_step_end``), so a skipped window still writes its dropped items. Resuming from
``checkpoint-<N>`` keeps the lines of steps up to ``N`` and drops the rest (those windows are made again); a fresh run
starts a new file. Values that are not numbers (``nan``) are written as ``null``.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback, TrainerState


if TYPE_CHECKING:
    from .onpolicy import Items, OnPolicyTrainer

ITEMS_FILE = "items.jsonl"

# Carried in `Items.values` from the window to every micro-batch slice: which window position each row is.
ITEM_INDEX = "item_index"

# Values the base adds for the loss, not worth a column.
_INTERNAL_VALUES = ("weight", ITEM_INDEX)


def _number(value: float) -> float | None:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _step(line: str) -> float:
    # A line cut by a crash mid-write belongs to a window after the last checkpoint: it sorts as the latest step.
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def read_items(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of an ``items.jsonl`` file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class ItemsLog(TrainerCallback):
    """Collects the items of each window and writes them to ``<output_dir>/items.jsonl`` (see the module docstring).

    The trainer calls :meth:`start` when training starts, :meth:`add_window` when a window's items are made and
    :meth:`add_losses` for each micro-batch's loss; the window is written at the end of the optimizer step.
    """

    def __init__(self, trainer: OnPolicyTrainer):
        self.trainer = trainer
        self.window: list[dict[str, Any]] | None = None
        self.losses: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []

    @property
    def enabled(self) -> bool:
        return bool(getattr(self.trainer.args, "log_items", False))

    @property
    def path(self) -> str:
        return os.path.join(self.trainer.args.output_dir, ITEMS_FILE)

    def start(self, checkpoint: str | os.PathLike | None) -> None:
        """Keep the lines of the steps up to ``checkpoint``'s (none for a fresh run): later windows are made again."""
        self.window, self.losses = None, []
        if not self.enabled or not self.trainer.is_world_process_zero() or not os.path.isfile(self.path):
            return
        last = 0
        state_file = os.path.join(checkpoint, "trainer_state.json") if checkpoint else None
        if state_file and os.path.isfile(state_file):
            last = TrainerState.load_from_json(state_file).global_step
        tmp = self.path + ".tmp"
        with open(self.path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
            dst.writelines(line for line in src if _step(line) <= last)
        os.replace(tmp, self.path)

    def add_window(self, items: Items, prompts: list) -> None:
        """Record this process's items of the window and tag them with their position (``values[ITEM_INDEX]``)."""
        if not self.enabled:
            return
        n = len(items)
        items.values[ITEM_INDEX] = torch.arange(n, device=items.keep.device)
        per_prompt = max(n // max(len(prompts), 1), 1)
        first = self.trainer.accelerator.process_index * n
        flags = {name: flag.tolist() for name, flag in items.flags.items()}
        kept_only = self.trainer._kept_only_values
        values = {
            name: [_number(v) for v in value.float().tolist()]
            for name, value in items.values.items()
            if name not in _INTERNAL_VALUES and value.dim() == 1
        }
        keep = items.keep.tolist()
        self.window = []
        for i in range(n):
            item_values = {k: (v[i] if keep[i] or k not in kept_only else None) for k, v in values.items()}
            self.window.append(
                {
                    "index": first + i,
                    "prompt_index": (first + i) // per_prompt,
                    "prompt": prompts[i // per_prompt],
                    "texts": {name: texts[i] for name, texts in items.texts.items()},
                    "kept": bool(keep[i]),
                    "flags": [name for name, flag in flags.items() if flag[i]],
                    "values": item_values or None,
                    "metrics": None,
                }
            )

    def add_losses(self, items: Items, losses: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        """Attach a micro-batch's per-item loss and metrics to its items (filler rows of weight 0 are left out)."""
        if self.window is None or ITEM_INDEX not in items.values:
            return
        # Kept on the device until the step ends: reading them now would wait for the forward before the backward.
        columns = {k: v.detach().float() for k, v in {"loss": losses, **metrics}.items() if v.dim() == 1}
        self.losses.append((items.values[ITEM_INDEX], items.values["weight"] > 0, columns))

    def _attach_losses(self) -> None:
        for index, real, columns in self.losses:
            real = real.cpu()
            values = {k: v.cpu()[real].tolist() for k, v in columns.items()}
            for row, i in enumerate(index.cpu()[real].tolist()):
                self.window[i]["metrics"] = {k: _number(v[row]) for k, v in values.items()}
        self.losses = []

    def on_step_end(self, args, state, control, **kwargs):
        if not self.enabled:
            return
        if self.window is not None:
            self._attach_losses()
        # Collective: every process made a window for this step.
        lines = gather_object(self.window or [])
        self.window = None
        if not self.trainer.is_world_process_zero():
            return
        os.makedirs(args.output_dir, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for line in lines:
                record = {"step": state.global_step, "id": f"{state.global_step}-{line['index']}", **line}
                f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
