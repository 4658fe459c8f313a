"""Configuration of :class:`~trl_sgpo.SGPOTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .onpolicy import OnPolicyConfig


# Improver targets may be about 1.5x the draft (see the improver SFT data); 2x leaves room for them to finish.
IMPROVER_TOKENS_FACTOR = 2


@dataclass
class SGPOConfig(OnPolicyConfig):
    r"""
    Configuration class for the [`SGPOTrainer`].

    Only the parameters specific to SGPO are listed here; the generation, loss (`beta`, `loss_type`), vLLM and
    training parameters are those of TRL's [`~trl.experimental.online_dpo.OnlineDPOConfig`] and
    [`~transformers.TrainingArguments`], the empty-step settings those of [`OnPolicyConfig`]. Differences from
    `OnlineDPOConfig`:

    - `bf16` defaults to `True` only when a bf16-capable accelerator is present (TRL's `True` errors on CPU), and
      `use_cpu` is switched on when there is no accelerator (so several CPU processes train with gloo DDP).
    - A pair trains only when it means what it says: the improved answer ended with EOS within
      `improver_max_new_tokens`, is non-empty and differs from the draft, and (by default) the draft ended with EOS
      within `max_new_tokens`. An answer cut at its token budget is not "better" than anything.
    - Generation always uses the KV cache, also with `gradient_checkpointing=True` (TRL's OnlineDPO generates
      without it there, about 6x slower); set `generation_kwargs={"use_cache": False}` to opt out.
      `generation_kwargs` go to transformers' `generate` only; vLLM's `SamplingParams` options go in
      `vllm_sampling_kwargs` ([`OnPolicyConfig`]).
    - `missing_eos_penalty` is rejected: SGPO's chosen answer is always the improved one, so a reward penalty cannot
      reorder a pair. Pass a judge as `reward_funcs` to drop pairs instead.

    Parameters:
        improver_instruction (`str`, *optional*):
            The instruction shown to the model in its improver role, above the question and the draft answer. Defaults
            to the template saved with the model (`improver_template.json`, written by improver SFT), else
            [`~trl_sgpo.templates.DEFAULT_INSTRUCTION`]. Must be the same as the one used for improver SFT.
        improver_temperature (`float`, *optional*):
            Sampling temperature of the improver generation. Defaults to `temperature`.
        improver_max_new_tokens (`int`, *optional*):
            Maximum number of tokens the improver may write. Defaults to `2 * max_new_tokens` (improver targets may
            be about 1.5x the draft; an improvement cut at this budget drops its pair).
        keep_truncated_drafts (`bool`, *optional*, defaults to `False`):
            Keep pairs whose draft (the rejected answer) was cut at `max_new_tokens`. By default they are dropped and
            counted as `truncated_policy`: a finished improvement of a cut draft is preferred partly for finishing.
            Set it when drafts are long by nature and the budget cannot grow.
        judge_margin (`float`, *optional*, defaults to `0.0`):
            Only used when `reward_funcs` (a judge) is given: a pair is kept when the judge scores the improved answer
            more than `judge_margin` above the original one; other pairs are dropped from the batch and counted
            (`judge_rejected`). A pair the judge abstains on (`None` or NaN for either answer) is dropped and
            counted as `judge_abstained`.
    """

    improver_instruction: str | None = field(
        default=None,
        metadata={"help": "Instruction shown to the improver above the question and the draft answer."},
    )
    improver_temperature: float | None = field(
        default=None,
        metadata={"help": "Sampling temperature of the improver. Defaults to `temperature`."},
    )
    improver_max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Maximum number of tokens the improver may write. Defaults to `2 * max_new_tokens`."},
    )
    keep_truncated_drafts: bool = field(
        default=False,
        metadata={"help": "Keep pairs whose draft was cut at `max_new_tokens` (dropped by default)."},
    )
    judge_margin: float = field(
        default=0.0,
        metadata={
            "help": "With a judge in `reward_funcs`: keep a pair only when the judge scores the improved answer more "
            "than this above the original."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.improver_max_new_tokens is None:
            self.improver_max_new_tokens = IMPROVER_TOKENS_FACTOR * self.max_new_tokens
        if self.missing_eos_penalty is not None:
            raise ValueError(
                "`missing_eos_penalty` is not supported by SGPO: the improved answer is always the chosen one, so a "
                "reward penalty cannot reorder a pair. Unset it, or pass a judge as `reward_funcs` to drop pairs."
            )
        if self.improver_temperature is not None and self.improver_temperature < 0:
            raise ValueError(f"`improver_temperature` must be >= 0, got {self.improver_temperature}.")
        if self.improver_max_new_tokens is not None and self.improver_max_new_tokens < 1:
            raise ValueError(f"`improver_max_new_tokens` must be >= 1, got {self.improver_max_new_tokens}.")
        if self.judge_margin < 0:
            raise ValueError(
                f"`judge_margin` must be >= 0, got {self.judge_margin}: a negative margin would keep pairs whose "
                "improved answer the judge scores lower, training toward the worse answer."
            )
        if self.improver_instruction is not None and not self.improver_instruction.strip():
            raise ValueError("`improver_instruction` is empty; leave it unset to use the default instruction.")
