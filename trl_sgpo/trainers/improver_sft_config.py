"""Configuration of :class:`~trl_sgpo.ImproverSFTTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from ..templates import DEFAULT_INSTRUCTION
from ..utils import apply_cpu_defaults


@dataclass
class ImproverSFTConfig(SFTConfig):
    r"""
    Configuration class for the [`ImproverSFTTrainer`].

    Only the parameters specific to improver SFT are listed here; see TRL's [`~trl.SFTConfig`] for the others. The
    defaults differ from `SFTConfig` where the improver data needs it: rows are collated from raw
    `{prompt, response, target}` columns by [`DataCollatorForImproverTargets`], so `remove_unused_columns=False` and
    `dataset_kwargs={"skip_prepare_dataset": True}`; `bf16` defaults to `True` only on a bf16-capable accelerator.

    Parameters:
        improver_instruction (`str`, *optional*):
            The instruction shown to the improver above the question and the draft answer. Defaults to
            [`~trl_sgpo.templates.DEFAULT_INSTRUCTION`]. Must match `SGPOConfig.improver_instruction`.
    """

    improver_instruction: str = field(
        default=DEFAULT_INSTRUCTION,
        metadata={"help": "Instruction shown to the improver above the question and the draft answer."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep the raw `prompt`/`response`/`target` columns for the improver collator."},
    )
    dataset_kwargs: dict[str, Any] | str | None = field(
        default_factory=lambda: {"skip_prepare_dataset": True},
        metadata={"help": "Dataset preparation is done by the improver collator."},
    )

    def __post_init__(self):
        apply_cpu_defaults(self)
        super().__post_init__()
        if not self.improver_instruction.strip():
            raise ValueError("`improver_instruction` is empty; leave it unset to use the default instruction.")
