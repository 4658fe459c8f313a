"""Configuration of :class:`~trl_sgpo.SPPOTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .onpolicy import OnPolicyConfig


SPPO_LOSS_TYPES = ("sppo", "sppo_hard")
SPPO_TRAIN_ON = ("best_worst", "all")
SPPO_SAMPLE_FROM = ("reference", "policy")


@dataclass
class SPPOConfig(OnPolicyConfig):
    r"""
    Configuration class for the [`SPPOTrainer`] (Self-Play Preference Optimization, arXiv 2405.00675).

    Only the parameters specific to SPPO are listed here; generation, vLLM and training parameters are those of TRL's
    [`~trl.experimental.online_dpo.OnlineDPOConfig`] and [`~transformers.TrainingArguments`], the empty-step
    settings and CPU defaults those of [`OnPolicyConfig`].

    Parameters:
        num_samples (`int`, *optional*, defaults to `5`):
            Answers sampled per prompt (the paper's K). Each answer's win rate `P_hat` is its mean win probability
            against the prompt's finished answers, itself included (a tie, 1/2); answers cut at `max_new_tokens` or
            empty take no part in the comparisons and never train.
        beta (`float`, *optional*, defaults to `1e-3`):
            `1 / eta` in the loss `(log pi/pi_ref(y) - eta * (P_hat(y) - 1/2))^2` (sequence-summed log-probs). The
            official runs use `1e-3` (`eta = 1000`), so targets span +-500 nats and raw losses are in the thousands.
        loss_type (`str`, *optional*, defaults to `"sppo"`):
            `"sppo"`: regress on the estimated win rates `P_hat`. `"sppo_hard"`: hard labels, 1 for the best answer
            and 0 for the worst (TRL's `DPOTrainer(loss_type="sppo_hard")`, averaged over the two answers instead of
            summed); needs `train_on="best_worst"`.
        train_on (`str`, *optional*, defaults to `"best_worst"`):
            `"best_worst"`: train on the answers with the highest and lowest `P_hat` of each prompt (the official
            code). `"all"`: train on every finished answer (the paper's Algorithm 1 with all K selected).
        judge_batch_size (`int`, *optional*, defaults to `64`):
            Comparisons (or answers, for a pointwise judge) sent to the judge per call.
        sample_from (`str`, *optional*, defaults to `"reference"`):
            Which model samples each round's K answers. `"reference"`: `pi_t`, the policy the round starts from (the
            paper and the official code, which sample once per round): the frozen reference copy, or the model with
            its adapter disabled under PEFT, at no extra memory. `"policy"`: the policy as it trains (fresher samples,
            no longer the paper's estimate of `P(y > pi_t)`). Under vLLM, `"reference"` loads the weights into the
            engine before the round's first step only, so it needs `vllm_enable_sleep_mode=False`; a run resumed
            mid-round samples from the weights the engine holds (in colocate mode, those the round started from).
    """

    num_samples: int = field(default=5, metadata={"help": "Answers sampled per prompt (K)."})
    beta: list[float] = field(
        default_factory=lambda: [1e-3],
        metadata={"help": "1/eta of the SPPO loss (official runs: 1e-3). A list sets one per epoch."},
    )
    loss_type: str = field(
        default="sppo",
        metadata={
            "help": "`sppo` (estimated win rates) or `sppo_hard` (1 best / 0 worst).",
            "choices": SPPO_LOSS_TYPES,
        },
    )
    train_on: str = field(
        default="best_worst",
        metadata={"help": "`best_worst` (official code) or `all` finished answers.", "choices": SPPO_TRAIN_ON},
    )
    judge_batch_size: int = field(default=64, metadata={"help": "Comparisons or answers per judge call."})
    sample_from: str = field(
        default="reference",
        metadata={
            "help": "`reference`: sample each round's answers from pi_t, the policy the round starts from (the "
            "paper); `policy`: from the policy as it trains.",
            "choices": SPPO_SAMPLE_FROM,
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.num_samples < 2:
            raise ValueError(
                f"`num_samples` must be >= 2 (SPPO compares answers with each other), got {self.num_samples}."
            )
        if self.loss_type not in SPPO_LOSS_TYPES:
            raise ValueError(f"`loss_type` must be one of {SPPO_LOSS_TYPES}, got {self.loss_type!r}.")
        if self.train_on not in SPPO_TRAIN_ON:
            raise ValueError(f"`train_on` must be one of {SPPO_TRAIN_ON}, got {self.train_on!r}.")
        if self.loss_type == "sppo_hard" and self.train_on != "best_worst":
            raise ValueError(
                "`loss_type='sppo_hard'` labels the best answer 1 and the worst 0; the others have no hard label. "
                "Use `train_on='best_worst'`, or `loss_type='sppo'` to train on all answers."
            )
        betas = self.beta if isinstance(self.beta, list) else [self.beta]
        if any(b <= 0 for b in betas):
            raise ValueError(f"`beta` must be > 0 (eta = 1/beta), got {self.beta}.")
        if self.sample_from not in SPPO_SAMPLE_FROM:
            raise ValueError(f"`sample_from` must be one of {SPPO_SAMPLE_FROM}, got {self.sample_from!r}.")
        if self.sample_from == "reference" and self.use_vllm and self.vllm_enable_sleep_mode:
            raise ValueError(
                "`sample_from='reference'` keeps the round's starting weights in the vLLM engine, which "
                "`vllm_enable_sleep_mode=True` discards at every window. Set `vllm_enable_sleep_mode=False`, or "
                "`sample_from='policy'`."
            )
        if self.judge_batch_size < 1:
            raise ValueError(f"`judge_batch_size` must be >= 1, got {self.judge_batch_size}.")
        if self.missing_eos_penalty is not None:
            raise ValueError(
                "`missing_eos_penalty` is not used by SPPO: unfinished answers are never trained on. Unset it."
            )
