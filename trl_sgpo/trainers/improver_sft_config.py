"""Configuration of :class:`~trl_sgpo.ImproverSFTTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from ..utils import apply_cpu_defaults


@dataclass
class ImproverSFTConfig(SFTConfig):
    r"""
    Configuration class for the [`ImproverSFTTrainer`].

    Only the parameters specific to improver SFT are listed here; see TRL's [`~trl.SFTConfig`] for the others.
    Improver SFT always trains on the target only (`completion_only_loss` may not be `False`); `bf16` defaults to
    `True` only on a bf16-capable accelerator.

    Parameters:
        improver_instruction (`str`, *optional*):
            The instruction shown to the improver above the question and the draft answer. Defaults to the one saved
            with the model (`improver_template.json`), else [`~trl_sgpo.templates.DEFAULT_INSTRUCTION`]. Must match
            `SGPOConfig.improver_instruction`.
    """

    improver_instruction: str | None = field(
        default=None,
        metadata={
            "help": "Instruction shown to the improver above the question and the draft answer. Default: the one "
            "saved with the model, else trl_sgpo.templates.DEFAULT_INSTRUCTION."
        },
    )

    def __post_init__(self):
        apply_cpu_defaults(self)
        super().__post_init__()
        if self.improver_instruction is not None and not self.improver_instruction.strip():
            raise ValueError("`improver_instruction` is empty; leave it unset to use the default instruction.")
        if self.completion_only_loss is False:
            raise ValueError(
                "Improver SFT trains on the target only: `completion_only_loss=False` would also train the model to "
                "write the improver request. Leave it unset."
            )
