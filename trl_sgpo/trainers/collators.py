"""Data collator for improver SFT on externally written (GPT-4-referenced) targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..templates import DEFAULT_TEMPLATE, ImproverTemplate, end_of_turn_text, improver_prompt, render_prompt


def encode_improver_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt,
    response: str,
    target: str,
    template: ImproverTemplate = DEFAULT_TEMPLATE,
) -> tuple[list[int], list[int]]:
    """Token ids of the improver request for (``prompt``, ``response``) and of ``target`` plus its end-of-turn.

    The request is rendered exactly as :class:`~trl_sgpo.SGPOTrainer` renders it at generation time.
    """
    request = render_prompt(improver_prompt(prompt, response, template), tokenizer)
    prompt_ids = tokenizer(request, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target.strip() + end_of_turn_text(prompt, tokenizer), add_special_tokens=False)["input_ids"]
    return prompt_ids, target_ids


@dataclass
class DataCollatorForImproverTargets:
    """Collate raw ``{prompt, response, target}`` rows into causal-LM batches whose loss covers the target only.

    ``prompt`` is the question (standard string or chat messages), ``response`` the policy's own answer and ``target``
    the improved answer written by the external LLM. Each row becomes ``[improver request] + [target + end of turn]``;
    ``labels`` are ``-100`` on the request and on padding, so the model learns to write the target given the request.
    Rows longer than ``max_length`` keep the whole request and lose the end of the target (the trainer drops rows
    whose request alone does not fit, before training).

    Args:
        tokenizer: The policy's tokenizer (it needs a pad token).
        max_length: Maximum tokens per row, or ``None`` for no limit.
        template: The improver template; must match the SGPO trainer's.
        pad_to_multiple_of: Pad the batch length to a multiple of this.
    """

    tokenizer: PreTrainedTokenizerBase
    max_length: int | None = None
    template: ImproverTemplate = field(default_factory=lambda: DEFAULT_TEMPLATE)
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token = tokenizer.eos_token`.")
        rows, labels = [], []
        for example in examples:
            missing = [k for k in ("prompt", "response", "target") if k not in example]
            if missing:
                raise KeyError(
                    f"Improver SFT rows need `prompt`, `response` and `target`; this row lacks {missing}. Keep the "
                    "columns with `remove_unused_columns=False` (the ImproverSFTConfig default)."
                )
            prompt_ids, target_ids = encode_improver_example(
                self.tokenizer, example["prompt"], example["response"], example["target"], self.template
            )
            if self.max_length is not None:
                if len(prompt_ids) >= self.max_length:
                    raise ValueError(
                        f"An improver request of {len(prompt_ids)} tokens leaves no room for its target within "
                        f"max_length={self.max_length}. Raise `max_length` or drop long rows first."
                    )
                target_ids = target_ids[: self.max_length - len(prompt_ids)]
            rows.append(prompt_ids + target_ids)
            labels.append([-100] * len(prompt_ids) + target_ids)

        width = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
        }
