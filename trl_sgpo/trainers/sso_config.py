"""Configuration of :class:`~trl_sgpo.SSOTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .onpolicy import OnPolicyConfig


SSO_LOSS_TYPES = ("ipo", "sigmoid")
SYSTEM_ROLE_FALLBACKS = ("error", "user_turn")


@dataclass
class SSOConfig(OnPolicyConfig):
    r"""
    Configuration class for the [`SSOTrainer`] (Self-Steering Optimization, arXiv 2410.17131, version 1).

    Only the parameters specific to SSO are listed here; generation, vLLM and training parameters are those of TRL's
    [`~trl.experimental.online_dpo.OnlineDPOConfig`] and [`~transformers.TrainingArguments`], the empty-step
    settings and CPU defaults those of [`OnPolicyConfig`].

    Parameters:
        beta (`float`, *optional*, defaults to `0.2`):
            Temperature of the base loss (`pref_beta` in the official launch script).
        loss_type (`str`, *optional*, defaults to `"ipo"`):
            Base loss `L`: `"ipo"` (the paper's version 1) or `"sigmoid"` (DPO). On sequence-summed log-probs.
        theta (`float`, *optional*, defaults to `0.1`):
            Weight of the self-steering term `G = L(x+; y+ > y-) + L(x-; y_o > y+)`.
        alpha (`float`, *optional*, defaults to `0.66`):
            Share of `y+` in the weight `W = sigmoid(-(alpha * m(y+) + (1 - alpha) * m(y-)))`, `m` being the
            length-normalized log-prob under the plain prompt.
        principles_file (`str`, *optional*):
            JSON-lines file of principles (fields `name`, `good_adjective`, `bad_adjective`, `good`, `bad`). Defaults
            to the set shipped in `trl_sgpo/resources/sso_principles.jsonl`.
        system_role_fallback (`str`, *optional*, defaults to `"error"`):
            What to do when the chat template has no system role (it raises on one or drops it): `"error"` stops with
            an explanation; `"user_turn"` puts the principle above the user's message instead (a deviation from the
            paper, which uses system messages).
    """

    beta: list[float] = field(
        default_factory=lambda: [0.2], metadata={"help": "Base-loss temperature (official launch script: 0.2)."}
    )
    loss_type: str = field(
        default="ipo", metadata={"help": "Base loss: `ipo` (paper v1) or `sigmoid`.", "choices": SSO_LOSS_TYPES}
    )
    theta: float = field(default=0.1, metadata={"help": "Weight of the self-steering term G."})
    alpha: float = field(default=0.66, metadata={"help": "Share of y+ in the weight W."})
    principles_file: str | None = field(
        default=None, metadata={"help": "JSON-lines principles file; default: the shipped set."}
    )
    system_role_fallback: str = field(
        default="error",
        metadata={
            "help": "Chat template without a system role: `error`, or `user_turn` (principle above the user message).",
            "choices": SYSTEM_ROLE_FALLBACKS,
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in SSO_LOSS_TYPES:
            raise ValueError(f"`loss_type` must be one of {SSO_LOSS_TYPES}, got {self.loss_type!r}.")
        if self.theta < 0:
            raise ValueError(f"`theta` must be >= 0, got {self.theta}.")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"`alpha` must be in [0, 1], got {self.alpha}.")
        if self.system_role_fallback not in SYSTEM_ROLE_FALLBACKS:
            raise ValueError(
                f"`system_role_fallback` must be one of {SYSTEM_ROLE_FALLBACKS}, got {self.system_role_fallback!r}."
            )
        if self.missing_eos_penalty is not None:
            raise ValueError("`missing_eos_penalty` is not used by SSO: unfinished answers are never trained on.")
