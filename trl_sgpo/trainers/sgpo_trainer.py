"""SGPOTrainer: on-policy DPO where one model answers (policy) and then improves its own answer (improver)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase
from trl.data_utils import apply_chat_template, is_conversational

from ..templates import SavesImproverTemplate, improver_prompt, improver_template_for, render_prompt
from ..utils import SGPO_PAPER
from .generation import generate_ids_transformers, generate_ids_vllm
from .onpolicy import Items, OnPolicyTrainer, Sequences
from .sgpo_config import SGPOConfig
from .sgpo_loss import sgpo_loss


# Pair counts beside each checkpoint: TrainerState does not hold them, and a resumed run should report totals.
PAIR_COUNTS_NAME = "sgpo_pair_counts.json"

# Why a pair does not train. Not exclusive: a pair whose draft and improvement were both cut counts in both. The
# judge's reasons count only pairs that would otherwise train: it abstained (None or NaN for an answer) or did not
# prefer the improvement by more than `judge_margin`.
PAIR_FLAGS = ("truncated_policy", "truncated_improved", "empty", "identical", "judge_abstained", "judge_rejected")


# SGPOTrainer is an OnlineDPOTrainer (through OnPolicyTrainer). The OnlineDPO members it still relies on are listed in
# `onpolicy.ONLINE_DPO_MEMBERS_USED` (constructor, vLLM weight sync, the judge's reward functions and weights, and
# the attributes they set); tests/test_onpolicy.py fails if one disappears.
class SGPOTrainer(SavesImproverTemplate, OnPolicyTrainer):
    r"""
    Trainer for Self-Generated Preference Optimization (SGPO, [arXiv 2507.20181](https://huggingface.co/papers/2507.20181)).

    For each prompt `x` of a batch, the model being trained first answers as the **policy** (`y`), then, prompted
    with `x` and `y` through [`~trl_sgpo.templates.improver_prompt`], rewrites the answer as the **improver** (`y'`).
    Both roles use the same weights (and the same LoRA adapter, if any). The pair (chosen `y'`, rejected `y`), both
    scored as answers to `x`, trains with OnlineDPO's loss (`loss_type="sigmoid"` or `"ipo"`) against the reference
    model (a frozen copy, or the model with its adapter disabled under PEFT).

    A pair trains only when it means what it says: the improvement ended with EOS within `improver_max_new_tokens`,
    is non-empty and differs from the draft, and the draft ended with EOS within `max_new_tokens` (unless
    `keep_truncated_drafts`). With a judge in `reward_funcs`, a pair also needs the judge to score `y'` more than
    `judge_margin` above `y`; a pair the judge abstains on (any reward function returns `None` or NaN for either
    answer, even one whose `reward_weights` entry is 0) is dropped as `judge_abstained`. Every reason is counted ([`pair_counts`]) and logged
    (`sgpo/<reason>_frac`).

    The step is [`OnPolicyTrainer`]'s: pairs for a whole accumulation window are generated once in `_prepare_inputs`,
    every kept pair weighs the same in the update whatever micro-batch or process it landed on, and a step that keeps
    no pair anywhere leaves weights, optimizer state and learning-rate schedule untouched (`sgpo/skipped_steps`).

    Args:
        model: Model to train: a `PreTrainedModel`, a Hub id, a local path, or `"smollm2-135m-instruct"` for the
            embedded default. A string is loaded with `args.model_init_kwargs` (with `device_map=None` so that
            distributed launches work).
        ref_model: Reference model. Defaults to a frozen copy of `model`, or to the adapter-disabled model under PEFT.
        reward_funcs: Optional judge(s), in OnlineDPO's `reward_funcs` format (callables, sequence-classification
            models or model ids), summed with `reward_weights`. Used only to drop pairs, never to pick the chosen
            answer. A callable may abstain on an answer (`None` or NaN): its pair is then dropped, whatever the
            callable's weight (a weight of 0 does not make a function's abstention count less).
        args: An [`SGPOConfig`]. Defaults to `SGPOConfig("<model name>-SGPO")`.
        train_dataset: Dataset with a `prompt` column (standard string or conversational messages).
        processing_class: Tokenizer. Defaults to the tokenizer of `model` when `model` is a string.
        **kwargs: The other arguments of [`~trl.experimental.online_dpo.OnlineDPOTrainer`].
    """

    _tag_names = ["trl", "sgpo"]
    _name = "SGPO"
    _paper = SGPO_PAPER
    _metric_prefix = "sgpo"
    _counts_file = PAIR_COUNTS_NAME
    _item_name = "pair"

    def __init__(
        self,
        model,
        ref_model=None,
        reward_funcs=None,
        args: SGPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        reward_processing_classes=None,
        peft_config=None,
        compute_metrics: Callable | None = None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = SGPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-SGPO")
        elif not isinstance(args, SGPOConfig):
            raise TypeError(f"`args` must be an `SGPOConfig`, got {type(args).__name__}.")
        # The template improver SFT saved with the model, unless the config names an instruction.
        self.improver_template = improver_template_for(model, args.improver_instruction)
        super().__init__(
            model=model,
            ref_model=ref_model,
            reward_funcs=reward_funcs,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            peft_config=peft_config,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        for name in PAIR_FLAGS:
            self.counts.setdefault(name, 0)
        if not self.use_vllm:
            improver_kwargs = dict(self.generation_kwargs)
            if args.improver_temperature is not None:
                improver_kwargs["temperature"] = args.improver_temperature
                if args.improver_temperature == 0:
                    improver_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None)
            improver_kwargs["max_new_tokens"] = args.improver_max_new_tokens
            self.improver_generation_config = GenerationConfig(
                **{k: v for k, v in improver_kwargs.items() if v is not None}
            )

    @property
    def pair_counts(self) -> dict[str, int]:
        """Pairs made, kept and dropped by reason (over all processes), and optimizer steps skipped so far."""
        return self.counts

    # ------------------------------------------------------------------ budgets

    def prompt_room(self, args) -> int:
        # The prompt plus the longer of the two answers must fit in max_length, or scoring cuts the prompt's start.
        return args.max_length - max(args.max_new_tokens, args.improver_max_new_tokens)

    def improver_overhead(self) -> int:
        """Tokens the improver request adds around the question and the draft (instruction, headers, template)."""
        tokenizer = self._tokenizer
        overhead = 0
        for empty in ("", [{"role": "user", "content": ""}]):
            request = render_prompt(improver_prompt(empty, "", self.improver_template), tokenizer)
            overhead = max(overhead, len(self.tokenize_prompts([request])[0]))
        return overhead + 8  # BPE merges across the joins may add a few tokens

    def vllm_max_model_len(self) -> int:
        """The improver's sequence is the longest: its request (instruction + question + draft) and the improvement."""
        args = self.args
        return self.prompt_room(args) + self.improver_overhead() + args.max_new_tokens + args.improver_max_new_tokens

    # ------------------------------------------------------------------ sampling

    def _sample(self, model, prompt_ids: list[list[int]], role: str) -> list[list[int]]:
        """Sample one completion per prompt (token ids); returns ids up to and including the first EOS, or the whole
        budget when there is none (a cut answer)."""
        if self.use_vllm:
            return self._sample_vllm(prompt_ids, role)
        config = self.generation_config if role == "policy" else self.improver_generation_config
        return generate_ids_transformers(self, model, prompt_ids, config)

    def _max_tokens(self, role: str) -> int:
        return self.args.max_new_tokens if role == "policy" else self.args.improver_max_new_tokens

    def _vllm_sampling_params(self, role: str):
        from vllm import SamplingParams

        params = {
            "n": 1,  # OnlineDPO samples n=2 per prompt; SGPO samples once per role
            "repetition_penalty": self.repetition_penalty,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": -1 if not self.top_k else self.top_k,
            "min_p": 0.0 if self.min_p is None else self.min_p,
            "max_tokens": self._max_tokens(role),
            "detokenize": False,
            **(self.args.vllm_sampling_kwargs or {}),
        }
        if role == "improver":
            if self.args.improver_temperature is not None:
                params["temperature"] = self.args.improver_temperature
            params["max_tokens"] = self.args.improver_max_new_tokens
        return SamplingParams(**params)

    def _sample_vllm(self, prompt_ids: list[list[int]], role: str) -> list[list[int]]:
        """vLLM counterpart of :meth:`_sample`: token ids in (never text, so no second BOS), token ids out."""
        fix = (
            "Lower `max_new_tokens`/`improver_max_new_tokens`, shorten `improver_instruction`, or raise `max_length` "
            "(the engine is sized from them)."
        )
        label = "An improver prompt" if role == "improver" else "A policy prompt"
        return generate_ids_vllm(self, prompt_ids, self._vllm_sampling_params(role), label, fix)

    def _finished(self, ids: list[int]) -> bool:
        return bool(ids) and ids[-1] in self.eos_token_ids

    # ------------------------------------------------------------------ the pairs

    def make_items(self, model, prompts: list, inputs: dict[str, Any]) -> Items:
        """Let the model answer each prompt, then improve its own answer; return the pairs and which train.

        Sequences: ``chosen`` (the improvement) and ``rejected`` (the draft), both scored under the policy prompt.
        """
        tokenizer, device = self._tokenizer, self.accelerator.device
        policy_ids = self.tokenize_prompts([render_prompt(p, tokenizer) for p in prompts])
        draft_ids = self._sample(model, policy_ids, role="policy")
        drafts = [t.strip() for t in tokenizer.batch_decode(draft_ids, skip_special_tokens=True)]
        improver_ids = self.tokenize_prompts(
            [
                render_prompt(improver_prompt(p, y, self.improver_template), tokenizer)
                for p, y in zip(prompts, drafts, strict=True)
            ]
        )
        improved_ids = self._sample(model, improver_ids, role="improver")
        improved = [t.strip() for t in tokenizer.batch_decode(improved_ids, skip_special_tokens=True)]

        def flag(values):
            return torch.tensor(values, dtype=torch.bool, device=device)

        truncated_policy = flag([not self._finished(ids) for ids in draft_ids])
        truncated_improved = flag([not self._finished(ids) for ids in improved_ids])
        empty = flag([not t for t in improved])
        identical = flag([a == b for a, b in zip(improved, drafts, strict=True)]) & ~empty
        keep = ~truncated_improved & ~empty & ~identical
        if not self.args.keep_truncated_drafts:
            keep &= ~truncated_policy
        values = {}
        judge_abstained, judge_rejected = torch.zeros_like(keep), torch.zeros_like(keep)
        if self.has_judge:
            scores = self._judge(prompts, improved + drafts, improved_ids + draft_ids, inputs)
            better, worse = scores.split(len(prompts))
            values["judge_margin"] = better - worse
            values["score_chosen"], values["score_rejected"] = better, worse  # shown in items.jsonl
            judge_abstained = keep & (better.isnan() | worse.isnan())
            keep &= ~judge_abstained
            judge_rejected = keep & ~((better - worse) > self.args.judge_margin)
            keep &= ~judge_rejected

        pad = tokenizer.pad_token_id
        return Items(
            sequences={
                "chosen": Sequences.from_lists(policy_ids, improved_ids, pad, device),
                "rejected": Sequences.from_lists(policy_ids, draft_ids, pad, device),
            },
            keep=keep,
            flags={
                "truncated_policy": truncated_policy,
                "truncated_improved": truncated_improved,
                "empty": empty,
                "identical": identical,
                "judge_abstained": judge_abstained,
                "judge_rejected": judge_rejected,
            },
            values=values,
            texts={"draft": drafts, "improved": improved},
        )

    def generate_pairs(self, model, prompts: list, inputs: dict[str, Any] | None = None) -> Items:
        """Public form of :meth:`make_items` for one batch of prompts (unwraps ``model`` for generation itself)."""
        with self.generation_model() as gen_model:
            return self.make_items(gen_model if gen_model is not None else model, prompts, inputs or {})

    def _judge(self, prompts, completions, completion_ids, inputs) -> torch.Tensor:
        """The judge's score of each completion: the reward functions' scores weighted by ``reward_weights`` and
        summed, NaN where any function abstained (returned ``None`` or NaN), so the pair is dropped."""
        if is_conversational({"prompt": prompts[0]}):
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        extra = {k: (v * 2 if isinstance(v, (list, tuple)) else v) for k, v in inputs.items() if k != "prompt"}
        prompts = 2 * list(prompts)
        columns = [
            self._reward_scores(func, processing_class, prompts, completions, completion_ids, extra)
            for func, processing_class in zip(self.reward_funcs, self.reward_processing_classes, strict=True)
        ]
        scores = torch.stack(columns, dim=1)
        if self.reward_weights is not None:
            scores = scores * self.reward_weights.to(scores.device)
        # A plain sum, where OnlineDPO's `_calculate_rewards_from_functions` takes `nansum`: an abstention scores 0
        # there, so an answer the judge could not score would lose to any positive score instead of being dropped.
        return scores.sum(dim=1)

    def _reward_scores(self, func, processing_class, prompts, completions, completion_ids, extra) -> torch.Tensor:
        """One reward function's scores, as OnlineDPO computes them (``None`` becomes NaN)."""
        device = self.accelerator.device
        if not isinstance(func, nn.Module):
            scores = func(
                prompts=prompts,
                completions=completions,
                completion_ids=completion_ids,
                trainer_state=self.state,
                **extra,
            )
            return torch.tensor([float("nan") if x is None else float(x) for x in scores], device=device)
        if is_conversational({"prompt": prompts[0]}):
            texts = [
                apply_chat_template({"messages": p + c}, processing_class)["text"]
                for p, c in zip(prompts, completions, strict=True)
            ]
        else:
            texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        encoded = processing_class(
            text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
        )
        with torch.inference_mode():
            return func(**{k: v.to(device) for k, v in encoded.items()}).logits[:, 0].float()

    # ------------------------------------------------------------------ the loss

    def item_losses(self, items, logps, ref_logps):
        """DPO (sigmoid) or IPO loss of each pair, as OnlineDPO defines them, and the usual reward statistics."""
        losses, metrics = sgpo_loss(logps, ref_logps, self.beta, self.args.loss_type)
        if "judge_margin" in items.values:
            metrics["objective/scores_margin"] = items.values["judge_margin"].float()
        return losses, metrics

    def empty_window_hint(self) -> str:
        counts = self.counts
        made = max(counts["made"], 1)
        shares = {k: counts.get(k, 0) / made for k in PAIR_FLAGS}
        fixes = {
            "truncated_improved": "raise `improver_max_new_tokens` (improvements are cut before their EOS)",
            "truncated_policy": "raise `max_new_tokens` or set `keep_truncated_drafts=True` (drafts are cut)",
            "empty": "train the improver first (improver SFT): it writes empty improvements",
            "identical": "train the improver first (improver SFT) or raise `improver_temperature`: it repeats drafts",
            "judge_abstained": "check the judge in `reward_funcs`: it returns None or NaN for these answers",
            "judge_rejected": "lower `judge_margin` or check the judge in `reward_funcs`",
        }
        main = max(shares, key=shares.get)
        detail = ", ".join(f"{k} {v:.0%}" for k, v in shares.items() if v)
        return f"Pairs dropped because: {detail or 'none recorded'}. Most likely fix: {fixes[main]}."

    def model_card_intro(self) -> str:
        return (
            "Pairs are (chosen: the model's improvement of its own answer, rejected: its answer). A pair trains only "
            "when the improvement finished (EOS within its budget), is non-empty and differs from the draft, and the "
            "draft finished unless `keep_truncated_drafts`. Counts are totals over the run (`truncated_*`, `empty`, "
            "`identical`, `judge_abstained`, `judge_rejected` are not exclusive); loss figures are at the last "
            "logged step."
        )
