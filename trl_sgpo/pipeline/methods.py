"""The training methods the recipes run, and what each one needs: one home for ``--method``.

| method | stages before training | judge | rounds | trainer |
|---|---|---|---|---|
| ``sgpo`` | sample, targets, filter, improver SFT | optional (drops pairs) | same prompts | :class:`~trl_sgpo.SGPOTrainer` |
| ``sppo`` | none | required (win rates) | disjoint prompt shares | :class:`~trl_sgpo.SPPOTrainer` |
| ``sso`` | none | none | same prompts | :class:`~trl_sgpo.SSOTrainer` |
| ``online_dpo`` | none | required, pointwise (picks chosen) | same prompts | TRL's ``OnlineDPOTrainer`` |

Every round starts from the last round's saved model and builds a fresh trainer, so the reference (a frozen copy of
the model the trainer is given, or the adapter-disabled model under PEFT, merged between rounds by the pipeline) is
re-anchored to the policy at the start of each round, as SPPO's iterations require.

A method's config is made from the recipe's training arguments: every field the method's config shares with them is
copied (optimizer, schedule, batch sizes, generation), except the loss settings a method defines for itself
(``beta``, ``loss_type`` for SPPO and SSO, whose defaults differ from SGPO's), which come from the method's defaults
and ``method_args``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset

from ..evaluation.judge_factory import JUDGE_KINDS


@dataclass(frozen=True)
class Method:
    """What a training method needs and how it builds one round's trainer.

    Attributes:
        name: The ``--method`` value.
        title: Name and paper, for logs and reports.
        needs_improver_sft: Whether the improver stages (sample, targets, filter, improver SFT) run first.
        judge: ``"required"``, ``"optional"`` or ``"none"``.
        disjoint_rounds: Whether each round trains on its own share of the prompts.
        own_fields: Config fields that come from the method's defaults (and ``method_args``), not the recipe's
            training arguments.
    """

    name: str
    title: str
    needs_improver_sft: bool
    judge: str
    disjoint_rounds: bool
    config_class: Callable[[], type]
    build: Callable[..., Any]
    own_fields: tuple[str, ...] = field(default_factory=tuple)

    def make_config(self, training_args, method_args: dict[str, Any] | None = None, **changes):
        """This method's config: the fields shared with ``training_args`` (minus ``own_fields``), then
        ``method_args`` and ``changes``."""
        config_class = self.config_class()
        if type(training_args) is config_class and not self.own_fields:
            return dataclasses.replace(training_args, **(method_args or {}), **changes)
        names = {f.name for f in dataclasses.fields(config_class) if f.init}
        values = {
            f.name: getattr(training_args, f.name)
            for f in dataclasses.fields(training_args)
            if f.init and f.name in names and f.name not in self.own_fields
        }
        unknown = sorted(set(method_args or {}) - names)
        if unknown:
            raise ValueError(
                f"`method_args` for {self.name} has unknown fields {unknown}; see `{config_class.__name__}` for the "
                "fields it takes."
            )
        values.update(method_args or {})
        values.update(changes)
        # TrainingArguments' derived fields (set by __post_init__) must be recomputed by the new config.
        for derived in ("logging_dir",):
            values.pop(derived, None)
        return config_class(**values)

    def unused_defaults(self, training_args) -> dict[str, Any]:
        """The fields of ``training_args`` this method does not take from it, with their unset values: its
        ``own_fields`` and every field its config lacks (SGPO's pair settings for SPPO, say)."""
        taken = {f.name for f in dataclasses.fields(self.config_class()) if f.init}
        values = {}
        for f in dataclasses.fields(training_args):
            if not f.init or (f.name in taken and f.name not in self.own_fields):
                continue
            value = f.default_factory() if f.default is dataclasses.MISSING else f.default
            # OnlineDPOConfig keeps a single `beta` as a float, its default being the list [0.1].
            values[f.name] = value[0] if isinstance(value, list) and len(value) == 1 else value
        if values.get("improver_max_new_tokens", 0) is None:  # unset, it follows max_new_tokens
            from ..trainers.sgpo_config import IMPROVER_TOKENS_FACTOR

            values["improver_max_new_tokens"] = IMPROVER_TOKENS_FACTOR * training_args.max_new_tokens
        return values

    def refuse_unused_settings(self, training_args) -> None:
        """Raise when ``training_args`` sets a field this method does not take from it: the value would do
        nothing."""
        for name, default in self.unused_defaults(training_args).items():
            value = getattr(training_args, name)
            if value == default:
                continue
            if name in self.own_fields:
                raise ValueError(
                    f"`{name}` ({value!r}) does not apply to --method {self.name}, which keeps its own default; drop "
                    f'it, or set it for this method with `method_args`, e.g. {{"{self.name}": {{"{name}": ...}}}}.'
                )
            raise ValueError(
                f"`{name}` ({value!r}) does not apply to --method {self.name} (`{self.config_class().__name__}` has no "
                "such setting); drop it."
            )

    def build_trainer(self, model, tokenizer, args, train_dataset: Dataset, peft_config=None, judge=None):
        """One round's trainer. ``judge`` is a judge of :mod:`trl_sgpo.evaluation` (or ``None``)."""
        if self.judge == "required" and judge is None:
            raise ValueError(f"--method {self.name} needs a judge; pass one (see `--judge`).")
        return self.build(model, tokenizer, args, train_dataset, peft_config, judge)


def _sgpo_config():
    from ..trainers.sgpo_config import SGPOConfig

    return SGPOConfig


def _sppo_config():
    from ..trainers.sppo_config import SPPOConfig

    return SPPOConfig


def _sso_config():
    from ..trainers.sso_config import SSOConfig

    return SSOConfig


def _online_dpo_config():
    from trl.experimental.online_dpo import OnlineDPOConfig

    return OnlineDPOConfig


def _reward_funcs(judge):
    # SGPO and OnlineDPO take TRL reward functions; pointwise judges of trl_sgpo.evaluation provide one.
    if judge is None:
        return None
    if hasattr(judge, "as_reward_func"):
        return judge.as_reward_func()
    if callable(judge) and not hasattr(judge, "judge"):
        return judge
    raise ValueError(
        f"{type(judge).__name__} compares answers in pairs; this method needs a pointwise judge (a reward model or "
        "the reference-similarity judge), whose scores act as a TRL reward function."
    )


def _build_sgpo(model, tokenizer, args, train_dataset, peft_config, judge):
    from ..trainers.sgpo_trainer import SGPOTrainer

    return SGPOTrainer(
        model,
        reward_funcs=_reward_funcs(judge),
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def _build_sppo(model, tokenizer, args, train_dataset, peft_config, judge):
    from ..trainers.sppo_trainer import SPPOTrainer

    return SPPOTrainer(
        model, judge=judge, args=args, train_dataset=train_dataset, processing_class=tokenizer, peft_config=peft_config
    )


def _build_sso(model, tokenizer, args, train_dataset, peft_config, judge):
    from ..trainers.sso_trainer import SSOTrainer

    return SSOTrainer(
        model, args=args, train_dataset=train_dataset, processing_class=tokenizer, peft_config=peft_config
    )


def _build_online_dpo(model, tokenizer, args, train_dataset, peft_config, judge):
    from trl.experimental.online_dpo import OnlineDPOTrainer

    return OnlineDPOTrainer(
        model,
        reward_funcs=_reward_funcs(judge),
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


METHODS: dict[str, Method] = {
    "sgpo": Method(
        name="sgpo",
        title="SGPO (arXiv 2507.20181)",
        needs_improver_sft=True,
        judge="optional",
        disjoint_rounds=False,
        config_class=_sgpo_config,
        build=_build_sgpo,
    ),
    "sppo": Method(
        name="sppo",
        title="SPPO (arXiv 2405.00675)",
        needs_improver_sft=False,
        judge="required",
        disjoint_rounds=True,
        config_class=_sppo_config,
        build=_build_sppo,
        own_fields=("beta", "loss_type"),
    ),
    "sso": Method(
        name="sso",
        title="SSO (arXiv 2410.17131, version 1)",
        needs_improver_sft=False,
        judge="none",
        disjoint_rounds=False,
        config_class=_sso_config,
        build=_build_sso,
        own_fields=("beta", "loss_type"),
    ),
    "online_dpo": Method(
        name="online_dpo",
        title="Online DPO (TRL, arXiv 2402.04792)",
        needs_improver_sft=False,
        judge="required",
        disjoint_rounds=False,
        config_class=_online_dpo_config,
        build=_build_online_dpo,
    ),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {sorted(METHODS)}.")
    return METHODS[name]


def round_prompts(prompts: Dataset, round_index: int, num_rounds: int) -> Dataset:
    """The prompts of round ``round_index`` (1-based) of ``num_rounds``: contiguous, disjoint, near-equal shares.

    SPPO's iterations each use a different share of the prompts (the paper splits UltraFeedback in three).
    """
    if not 1 <= round_index <= num_rounds:
        raise ValueError(f"`round_index` must be in [1, {num_rounds}], got {round_index}.")
    if len(prompts) < num_rounds:
        raise ValueError(
            f"{len(prompts)} prompts cannot be split into {num_rounds} disjoint rounds; use more prompts or fewer "
            "iterations."
        )
    return prompts.shard(num_shards=num_rounds, index=round_index - 1, contiguous=True)


def method_prompts(method: Method, prompts: Dataset, round_index: int, num_rounds: int) -> Dataset:
    """The prompts one round of ``method`` trains on: its disjoint share, or all of them."""
    return round_prompts(prompts, round_index, num_rounds) if method.disjoint_rounds else prompts


JUDGES = tuple(kind for kind in JUDGE_KINDS if kind != "local")
"""The judges a method trains with: every kind of :func:`~trl_sgpo.evaluation.judge_factory.build_judge` but the
in-process LM, which evaluations only use."""


@dataclass
class JudgeArguments:
    """The training judge's settings, the same in both recipes (``recipes/sgpo.py``, ``recipes/compare.py``); the
    judge is made by :func:`trl_sgpo.evaluation.judge_factory.build_judge`, its endpoint taken from the script arguments."""

    judge: str = field(
        default="none",
        metadata={
            "help": "Judge for methods that need one (sppo, online_dpo) or can use one (sgpo drops pairs): none, "
            "similarity (offline; rows need a `reference`), reward-model (--reward_model) or openai "
            "(--judge_model at --base_url, key from --api_key_env).",
            "choices": list(JUDGES),
        },
    )
    reward_model: str | None = field(default=None, metadata={"help": "reward-model judge: Hub id or folder."})
    similarity_temperature: float = field(
        default=0.05, metadata={"help": "similarity judge: P(a beats b) = sigmoid((sim_a - sim_b) / T)."}
    )

    def __post_init__(self):
        # A --config YAML sets defaults, which argparse does not check against `choices`.
        if self.judge not in JUDGES:
            raise ValueError(f"`judge` must be one of {JUDGES}, got {self.judge!r}.")

    def judge_settings(self) -> dict[str, Any]:
        """The fields of :class:`JudgeArguments`, as keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(JudgeArguments)}

    def build_judge(self, script_args=None):
        """The judge of :mod:`trl_sgpo.evaluation` named by ``judge`` (``None`` for ``"none"``), made by
        :func:`trl_sgpo.evaluation.judge_factory.build_judge`. The openai judge takes its endpoint from ``script_args``
        (:func:`judge_endpoint`), the settings the recipe's evaluation stage uses too."""
        from ..evaluation.judge_factory import build_judge

        return build_judge(
            self.judge,
            reward_model=self.reward_model,
            similarity_temperature=self.similarity_temperature,
            **judge_endpoint(script_args),
        )


def judge_endpoint(script_args=None) -> dict[str, Any]:
    """The OpenAI-compatible judge's settings in the recipe's ``script_args`` (``judge_model``, ``base_url``,
    ``api_key_env``, ``judge_price_in``/``judge_price_out``, ``max_concurrency``, ``request_timeout``), as keyword
    arguments of :func:`trl_sgpo.evaluation.judge_factory.build_judge`; settings it lacks keep the judge's defaults."""
    settings = {
        "model": getattr(script_args, "judge_model", None),
        "base_url": getattr(script_args, "base_url", None),
        "api_key_env": getattr(script_args, "api_key_env", "OPENAI_API_KEY"),
        "price_input_per_1m": getattr(script_args, "judge_price_in", None),
        "price_output_per_1m": getattr(script_args, "judge_price_out", None),
    }
    for name, option in (("max_concurrency", "max_concurrency"), ("timeout", "request_timeout")):
        if getattr(script_args, option, None) is not None:
            settings[name] = getattr(script_args, option)
    return settings


@dataclass
class MethodArguments(JudgeArguments):
    """Which method the recipe trains with (``recipes/sgpo.py --method``), its own settings and its judge."""

    method: str = field(
        default="sgpo",
        metadata={
            "help": "Training method: sgpo (improver stages then SGPO), sppo, sso or online_dpo (no improver stages).",
            "choices": list(METHODS),
        },
    )
    method_args: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Settings of the method's config that differ from the shared training arguments, keyed by method "
            '(a YAML mapping, or JSON on the command line), e.g. \'{"sppo": {"num_samples": 4, "beta": 0.01}}\' '
            "(SPPO's and SSO's `beta` and `loss_type` otherwise keep the method's defaults). The same shape as "
            "`recipes/compare.py`'s `method_args`."
        },
    )

    def __post_init__(self):
        # A --config YAML sets defaults, which argparse does not check against `choices`.
        get_method(self.method)
        super().__post_init__()
        if METHODS[self.method].judge == "required" and self.judge == "none":
            raise ValueError(
                f"--method {self.method} needs a judge: add `--judge similarity` (offline, prompts with references), "
                "`--judge reward-model --reward_model <id>` or `--judge openai --judge_model <name>`."
            )
        if METHODS[self.method].judge == "none" and self.judge != "none":
            raise ValueError(f"--method {self.method} uses no judge; drop `--judge {self.judge}`.")
        self.parsed_method_args()  # bad JSON fails here, before any model loads

    def parsed_method_args(self) -> dict[str, Any]:
        """The settings ``method_args`` holds for ``method`` (``{}`` when none)."""
        value = parse_method_args(self.method_args)
        stray = sorted(set(value) - {self.method})
        if stray:
            raise ValueError(
                f"`method_args` has settings for {stray}, but --method is {self.method}; key them by {self.method!r} "
                f"or drop them."
            )
        return dict(value.get(self.method, {}))


def parse_method_args(value: dict[str, Any] | str | None) -> dict[str, dict[str, Any]]:
    """``method_args`` as ``{method: {setting: value}}``, from a mapping or its JSON text."""
    if not value:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"`method_args` must be a JSON object, got {value!r}: {e}") from e
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError(
            f'`method_args` must map method names to objects of settings, e.g. {{"sppo": {{"num_samples": 4}}}}; '
            f"got {value!r}."
        )
    unknown = sorted(set(value) - set(METHODS))
    if unknown:
        raise ValueError(f"`method_args` names unknown method(s) {unknown}; choose among {sorted(METHODS)}.")
    return value


def round_figures(trainer) -> dict[str, Any]:
    """Counts and last logged figures of a finished round, for the summary (TRL's OnlineDPO has no counts)."""
    if hasattr(trainer, "training_figures"):
        return trainer.training_figures()
    for entry in reversed(trainer.state.log_history):
        if "loss" in entry:
            return {k: v for k, v in entry.items() if k in ("loss", "rewards/margins", "rewards/accuracies")}
    return {}
