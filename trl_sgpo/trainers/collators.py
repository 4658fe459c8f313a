"""Data collator for improver SFT on externally written (GPT-4-referenced) targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ..templates import DEFAULT_TEMPLATE, ImproverTemplate, improver_prompt, render_prompt


@dataclass
class DataCollatorForImproverTargets(DataCollatorForLanguageModeling):
    """Improver SFT's collator: renders ``{prompt, response, target}`` rows as prompt-completion rows, and pads.

    :meth:`render` turns a row into ``prompt`` = the improver request for (``prompt``, ``response``), built by
    :mod:`trl_sgpo.templates` exactly as :class:`~trl_sgpo.SGPOTrainer` builds it, and ``completion`` = ``target``.
    :class:`~trl_sgpo.ImproverSFTTrainer` renders its datasets with it; ``SFTTrainer`` then tokenizes them and its
    completion-only loss puts ``-100`` on the request, so batches only need padding (TRL's
    ``DataCollatorForLanguageModeling``, which this class is).

    Args:
        pad_token_id: Token id used for padding.
        template: The improver template; must match the SGPO trainer's.
        **kwargs: The other fields of ``DataCollatorForLanguageModeling`` (``pad_to_multiple_of``, ...).
    """

    template: ImproverTemplate = field(default_factory=lambda: DEFAULT_TEMPLATE)

    def render(self, example: dict[str, Any], tokenizer) -> dict[str, Any]:
        request = improver_prompt(example["prompt"], example["response"], self.template)
        target = example["target"].strip()
        if isinstance(request, list) and getattr(tokenizer, "chat_template", None):
            return {"prompt": request, "completion": [{"role": "assistant", "content": target}]}
        # Without a chat template SGPO shows the request as plain text (`render_prompt`); SFTTrainer appends the EOS.
        return {"prompt": render_prompt(request, tokenizer), "completion": target}
