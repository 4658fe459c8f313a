"""SGPOTrainer: on-policy DPO where one model answers (policy) and then improves its own answer (improver)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType, broadcast_object_list, gather_object
from datasets import Dataset, IterableDataset
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl.data_utils import is_conversational
from trl.experimental.online_dpo import OnlineDPOTrainer
from trl.experimental.utils import empty_cache, truncate_right
from trl.models.utils import unwrap_model_for_generation

from ..data.checks import check_prompt_dataset
from ..models import DEFAULT_MODEL, load_model_and_tokenizer
from ..templates import ImproverTemplate, improver_prompt, render_prompt
from ..utils import SGPO_PAPER
from .sgpo_config import SGPOConfig


# Pair counts beside each checkpoint: TrainerState does not hold them, and a resumed run should report totals.
PAIR_COUNTS_NAME = "sgpo_pair_counts.json"

SGPO_STATS = (
    "sgpo/policy_length",
    "sgpo/improved_length",
    "sgpo/empty_frac",
    "sgpo/identical_frac",
    "sgpo/judge_dropped_frac",
    "sgpo/kept_frac",
)


def _weights_path(model) -> str:
    """Where ``model``'s weights can be loaded again. ``load_model_and_tokenizer`` records it: ``_name_or_path`` may
    then hold a card name (the Hub id of the embedded default, the base model of a pipeline stage)."""
    return getattr(model, "sgpo_weights_path", None) or model.config._name_or_path


@contextmanager
def _named_by_weights_path(model):
    if isinstance(model, str) or _weights_path(model) == model.config._name_or_path:
        yield
        return
    card_name, model.config._name_or_path = model.config._name_or_path, _weights_path(model)
    try:
        yield
    finally:
        model.config._name_or_path = card_name


def _placeholder_reward(completions, **kwargs):
    # OnlineDPOTrainer requires `reward_funcs`; SGPO needs none (the improved answer is the chosen one).
    return [0.0] * len(completions)


@dataclass
class SGPOPairs:
    """One micro-batch of self-generated pairs, in OnlineDPO's block layout: rows ``[improved; original]``.

    ``keep`` marks the pairs that train; the tensors hold every pair (``B`` prompts, ``2B`` rows).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    responses: list[str]
    improved: list[str]
    keep: torch.Tensor
    empty: torch.Tensor  # improved answer is empty
    identical: torch.Tensor  # improved answer repeats a non-empty original
    judge_scores: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> SGPOPairs:
        """The pairs at ``index`` (positions among the ``B`` prompts), keeping the block layout."""
        batch_size = len(self.responses)
        rows = torch.cat([index, index + batch_size])
        scores = None if self.judge_scores is None else self.judge_scores[rows.to(self.judge_scores.device)]
        idx = index.tolist()
        return SGPOPairs(
            prompt_ids=self.prompt_ids[rows],
            prompt_mask=self.prompt_mask[rows],
            completion_ids=self.completion_ids[rows],
            completion_mask=self.completion_mask[rows],
            responses=[self.responses[i] for i in idx],
            improved=[self.improved[i] for i in idx],
            keep=self.keep[index],
            empty=self.empty[index],
            identical=self.identical[index],
            judge_scores=scores,
        )


class SGPOTrainer(OnlineDPOTrainer):
    r"""
    Trainer for Self-Generated Preference Optimization (SGPO, [arXiv 2507.20181](https://huggingface.co/papers/2507.20181)).

    For each prompt `x` of a batch, the model being trained first answers as the **policy** (`y`), then, prompted
    with `x` and `y` through [`~trl_sgpo.templates.improver_prompt`], rewrites the answer as the **improver** (`y'`).
    Both roles use the same weights (and the same LoRA adapter, if any). The pair (chosen `y'`, rejected `y`), both
    scored as answers to `x`, trains with OnlineDPO's loss (`loss_type="sigmoid"` or `"ipo"`) against the reference
    model (a frozen copy, or the model with its adapter disabled under PEFT).

    Pairs whose improved answer is empty or identical to the original are dropped (they carry no preference). With a
    judge in `reward_funcs`, pairs where the judge does not score `y'` more than `args.judge_margin` above `y` are
    dropped too. Dropped pairs are counted in the `sgpo/*` logs and in [`pair_counts`].

    What this subclass changes in TRL's `OnlineDPOTrainer` (1.16), besides the SGPO pairs:
    - generation uses the KV cache even with gradient checkpointing on;
    - the loss is divided by the gradient-accumulation steps before `backward` (OnlineDPO sums micro-batches);
    - `evaluate()` works (it reports the DPO loss and reward margins of self-generated pairs, without training);
    - a per-epoch `beta` list works; `args=None`, `reward_funcs=None` and a model id without `processing_class` work.

    Args:
        model: Model to train: a `PreTrainedModel`, a Hub id, a local path, or `"smollm2-135m-instruct"` for the
            embedded default. A string is loaded with `args.model_init_kwargs` (with `device_map=None` so that
            distributed launches work).
        ref_model: Reference model. Defaults to a frozen copy of `model`, or to the adapter-disabled model under PEFT.
        reward_funcs: Optional judge(s), in OnlineDPO's `reward_funcs` format (callables, sequence-classification
            models or model ids). Used only to drop pairs, never to pick the chosen answer.
        args: An [`SGPOConfig`]. Defaults to `SGPOConfig("<model name>-SGPO")`.
        train_dataset: Dataset with a `prompt` column (standard string or conversational messages).
        processing_class: Tokenizer. Defaults to the tokenizer of `model` when `model` is a string.
        **kwargs: The other arguments of [`~trl.experimental.online_dpo.OnlineDPOTrainer`].
    """

    _tag_names = ["trl", "sgpo"]
    _name = "SGPO"
    _paper = SGPO_PAPER

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

        if model == DEFAULT_MODEL:
            # Loaded here rather than by OnlineDPO so the model card names the Hub model, not the cache folder.
            model, default_tokenizer = load_model_and_tokenizer(DEFAULT_MODEL, **(args.model_init_kwargs or {}))
            args.model_init_kwargs = None
            processing_class = processing_class or default_tokenizer
        if isinstance(model, str):
            # OnlineDPO defaults string models to device_map="auto", which accelerate refuses under DDP/FSDP.
            args.model_init_kwargs = {"device_map": None, **(args.model_init_kwargs or {})}
            if processing_class is None:
                processing_class = AutoTokenizer.from_pretrained(
                    model, trust_remote_code=args.trust_remote_code, revision=args.model_init_kwargs.get("revision")
                )
        if ref_model is None and peft_config is None and is_deepspeed_zero3_enabled():
            # OnlineDPO cannot deep-copy a ZeRO-3 partitioned policy into a reference (trl#2532): load a second copy.
            source = model if isinstance(model, str) else _weights_path(model)
            if not source or not (os.path.isdir(source) or "/" in source):
                raise ValueError(
                    "Under DeepSpeed ZeRO-3 without PEFT, pass `ref_model` (the reference cannot be copied from a "
                    "partitioned model) or a model id/path the trainer can load it from."
                )
            ref_model = AutoModelForCausalLM.from_pretrained(source, **(args.model_init_kwargs or {}))
        if processing_class is None:
            raise ValueError("`processing_class` (the tokenizer) is required when `model` is not a model id or path.")
        if not isinstance(processing_class, PreTrainedTokenizerBase):
            raise TypeError(
                "SGPOTrainer supports text models only: `processing_class` must be a tokenizer, got "
                f"{type(processing_class).__name__}."
            )
        if processing_class.pad_token is None:
            if processing_class.eos_token is None:
                raise ValueError("The tokenizer has neither a pad token nor an EOS token; set `tokenizer.pad_token`.")
            processing_class.pad_token = processing_class.eos_token

        self.improver_template = ImproverTemplate(instruction=args.improver_instruction)
        # The prompt plus the longer of the two answers must fit in max_length, or OnlineDPO cuts the prompt's start.
        room = args.max_length - max(args.max_new_tokens, args.improver_max_new_tokens or 0)
        train_dataset = check_prompt_dataset(train_dataset, processing_class, room, name="train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                key: check_prompt_dataset(ds, processing_class, room, name=f"eval_dataset[{key!r}]")
                for key, ds in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = check_prompt_dataset(eval_dataset, processing_class, room, name="eval_dataset")

        self.has_judge = reward_funcs is not None and reward_funcs != []
        with _named_by_weights_path(model):  # OnlineDPO's colocated vLLM engine loads `model.name_or_path`
            super().__init__(
                model=model,
                ref_model=ref_model,
                reward_funcs=reward_funcs if self.has_judge else _placeholder_reward,
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

        if not self.has_judge:
            # Without a judge OnlineDPO's score statistics would only echo the placeholder.
            self.reward_funcs = None
            for key in ("objective/rlhf_reward", "objective/scores_margin", "objective/scores"):
                self.stats.pop(key, None)
        for key in SGPO_STATS:
            self.stats[key] = []
        self.pair_counts = {"made": 0, "kept": 0, "empty": 0, "identical": 0, "judge_rejected": 0}
        self._pending_pairs: SGPOPairs | None = None

        if not self.use_vllm:
            # OnlineDPO sets use_cache = not gradient_checkpointing; generation runs with checkpointing switched off
            # (unwrap_model_for_generation), so the cache is always safe and about 6x faster.
            user_kwargs = args.generation_kwargs or {}
            if "use_cache" not in user_kwargs:
                self.generation_kwargs["use_cache"] = True
                self.generation_config.use_cache = True
            improver_kwargs = dict(self.generation_kwargs)
            if args.improver_temperature is not None:
                improver_kwargs["temperature"] = args.improver_temperature
                if args.improver_temperature == 0:
                    improver_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None)
            if args.improver_max_new_tokens is not None:
                improver_kwargs["max_new_tokens"] = args.improver_max_new_tokens
            self.improver_generation_config = GenerationConfig(
                **{k: v for k, v in improver_kwargs.items() if v is not None}
            )

    # ------------------------------------------------------------------ schedule and loss scaling fixes

    @property
    def beta(self):
        # OnlineDPO indexes the list with the float `state.epoch` and crashes on step 2 (trl#6806).
        if isinstance(self._beta, list):
            epoch = int(self.state.epoch or 0)
            return self._beta[min(epoch, len(self._beta) - 1)]
        return self._beta

    @contextmanager
    def _patched_accelerator(self, loss_weight: float = 1.0, rows_valid: bool = True):
        """Patch ``accelerator.backward`` and ``gather_for_metrics`` for the duration of OnlineDPO's training step.

        - ``backward`` divides the loss by the accumulation steps, as ``Trainer.training_step`` does (OnlineDPO 1.16
          sums micro-batches, except under DeepSpeed, whose engine divides by itself), and applies ``loss_weight``.
        - ``gather_for_metrics`` accepts per-pair tensors of different lengths on different processes (each keeps
          its own pairs; a plain all-gather needs equal shapes), and leaves out a process's rows when
          ``rows_valid`` is false (it kept no pair and trains on masked placeholders).
        Patching these two calls fixes both without copying OnlineDPO's training step.
        """
        accelerator = self.accelerator
        backward, gather_for_metrics = accelerator.backward, accelerator.gather_for_metrics
        steps = self.current_gradient_accumulation_steps

        def scaled_backward(loss, **kwargs):
            if accelerator.distributed_type == DistributedType.DEEPSPEED:
                kwargs["scale_wrt_gas"] = False
            return backward(loss * loss_weight / steps, **kwargs)

        def gather_rows(data, *args, **kwargs):
            if accelerator.num_processes == 1 or not torch.is_tensor(data) or data.dim() == 0:
                return gather_for_metrics(data, *args, **kwargs)
            sizes = accelerator.gather(torch.tensor([data.size(0) if rows_valid else 0], device=data.device)).tolist()
            if sum(sizes) == 0:  # no process kept a pair: report the placeholders rather than nothing
                return gather_for_metrics(data, *args, **kwargs)
            padded = accelerator.pad_across_processes(data, dim=0)
            rows = accelerator.gather(padded).split(padded.size(0))
            return torch.cat([r[:n] for r, n in zip(rows, sizes, strict=True)])

        accelerator.backward, accelerator.gather_for_metrics = scaled_backward, gather_rows
        try:
            yield
        finally:
            accelerator.backward, accelerator.gather_for_metrics = backward, gather_for_metrics

    # ------------------------------------------------------------------ generation of the pairs

    def _sample(self, model, prompts_text: list[str], role: str) -> list[list[int]]:
        """Sample one completion per prompt text; returns token ids up to and including the first EOS."""
        if self.use_vllm:
            return self._sample_vllm(prompts_text, role)
        config = self.generation_config if role == "policy" else self.improver_generation_config
        inputs = self._tokenizer(
            text=prompts_text, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        ).to(self.accelerator.device)
        with (
            unwrap_model_for_generation(
                model,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                # OnlineDPO passes none, so a user's `use_reentrant` is lost after the first generation.
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            FSDP.summon_full_params(self.model_wrapped, recurse=False) if self.is_fsdp_enabled else nullcontext(),
        ):
            output = unwrapped_model.generate(**inputs, generation_config=config)
        completion_ids, completion_mask = truncate_right(
            output[:, inputs["input_ids"].size(1) :], self.eos_token_ids, self._tokenizer.pad_token_id
        )
        return [ids[mask.bool()].tolist() for ids, mask in zip(completion_ids, completion_mask, strict=True)]

    def _vllm_sampling_params(self, role: str):
        from vllm import SamplingParams

        params = {
            "n": 1,  # OnlineDPO samples n=2 per prompt; SGPO samples once per role
            "repetition_penalty": self.repetition_penalty,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": -1 if not self.top_k else self.top_k,
            "min_p": 0.0 if self.min_p is None else self.min_p,
            "max_tokens": self.args.max_new_tokens,
            "detokenize": False,
            **(self.args.generation_kwargs or {}),
        }
        # OnlineDPO already turned `vllm_structured_outputs_regex` / a `structured_outputs` dict into vLLM's object.
        if getattr(self.generation_config, "structured_outputs", None) is not None:
            params["structured_outputs"] = self.generation_config.structured_outputs
        if role == "improver":
            if self.args.improver_temperature is not None:
                params["temperature"] = self.args.improver_temperature
            if self.args.improver_max_new_tokens is not None:
                params["max_tokens"] = self.args.improver_max_new_tokens
        return SamplingParams(**params)

    @contextmanager
    def _vllm_awake(self):
        """vLLM ready for both roles of a step: weights synced once per optimizer step, and with sleep mode, woken
        once for the policy and the improver (a level-2 sleep drops the weights, so they are loaded again)."""
        if not self.use_vllm:
            yield
            return
        sleeps = self.vllm_mode == "colocate" and self.args.vllm_enable_sleep_mode
        if sleeps:
            empty_cache()
            self.llm.wake_up(tags=["weights"])
        if sleeps or self.state.global_step != self._last_loaded_step:
            self._move_model_to_vllm()
            self._last_loaded_step = self.state.global_step
        if sleeps:
            self.llm.wake_up(tags=["kv_cache"])
        try:
            yield
        finally:
            if sleeps:
                self.llm.sleep(level=2)

    def _sample_vllm(self, prompts_text: list[str], role: str) -> list[list[int]]:
        """vLLM counterpart of :meth:`_sample` (colocate or server mode), inside :meth:`_vllm_awake`."""
        params = self._vllm_sampling_params(role)
        if self.vllm_mode == "colocate":
            outputs = self.llm.generate(prompts_text, params, use_tqdm=False)
            completion_ids = [list(out.outputs[0].token_ids) for out in outputs]
        else:
            all_prompts = gather_object(prompts_text)
            if self.accelerator.is_main_process:
                result = self.vllm_client.generate(
                    prompts=all_prompts,
                    n=1,
                    repetition_penalty=params.repetition_penalty,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=params.top_k,
                    min_p=params.min_p,
                    max_tokens=params.max_tokens,
                    generation_kwargs=self.args.generation_kwargs,
                )
                completion_ids = result["completion_ids"]
            else:
                completion_ids = [None] * len(all_prompts)
            completion_ids = broadcast_object_list(completion_ids, from_process=0)
            start = self.accelerator.process_index * len(prompts_text)
            completion_ids = completion_ids[start : start + len(prompts_text)]
        # Cut at the first EOS, like truncate_right on the transformers path.
        cut = []
        for ids in completion_ids:
            ends = [i for i, t in enumerate(ids) if t in self.eos_token_ids]
            cut.append(ids[: ends[0] + 1] if ends else list(ids))
        return cut

    def _pad_right(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, max(len(r) for r in rows))
        pad = self._tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.accelerator.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.accelerator.device)
        return ids, mask

    def generate_pairs(self, model, prompts: list, inputs: dict[str, Any] | None = None) -> SGPOPairs:
        """Let ``model`` answer each prompt, then improve its own answer; return the pairs and which to keep.

        ``inputs`` (the collated batch) supplies the extra dataset columns a judge may read.
        """
        tokenizer = self._tokenizer
        policy_texts = [render_prompt(p, tokenizer) for p in prompts]
        with self._vllm_awake():
            response_ids = self._sample(model, policy_texts, role="policy")
            responses = [t.strip() for t in tokenizer.batch_decode(response_ids, skip_special_tokens=True)]

            improver_texts = [
                render_prompt(improver_prompt(p, y, self.improver_template), tokenizer)
                for p, y in zip(prompts, responses, strict=True)
            ]
            improved_ids = self._sample(model, improver_texts, role="improver")
            improved = [t.strip() for t in tokenizer.batch_decode(improved_ids, skip_special_tokens=True)]

        # Both answers are scored as answers to x: the prompt is the policy prompt, repeated for the two halves.
        prompt_inputs = tokenizer(
            text=policy_texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        ).to(self.accelerator.device)
        completion_ids, completion_mask = self._pad_right(improved_ids + response_ids)

        device = self.accelerator.device
        empty = torch.tensor([not t for t in improved], dtype=torch.bool, device=device)
        identical = (
            torch.tensor([a == b for a, b in zip(improved, responses)], dtype=torch.bool, device=device) & ~empty
        )
        keep = ~empty & ~identical
        judge_scores = None
        if self.has_judge:
            judge_scores = self._judge(prompts, improved + responses, improved_ids + response_ids, inputs or {})
            better, worse = judge_scores.split(len(prompts))
            # NaN (a judge that abstains) compares False: the pair is dropped.
            keep &= (better - worse) > self.args.judge_margin

        return SGPOPairs(
            prompt_ids=prompt_inputs["input_ids"].repeat(2, 1),
            prompt_mask=prompt_inputs["attention_mask"].repeat(2, 1),
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            responses=responses,
            improved=improved,
            keep=keep,
            empty=empty,
            identical=identical,
            judge_scores=judge_scores,
        )

    def _judge(self, prompts, completions, completion_ids, inputs) -> torch.Tensor:
        if is_conversational({"prompt": prompts[0]}):
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        extra = {k: (v * 2 if isinstance(v, (list, tuple)) else v) for k, v in inputs.items() if k != "prompt"}
        return super()._calculate_rewards_from_functions(
            prompts=2 * list(prompts), completions=completions, completion_ids_list=completion_ids, **extra
        )

    def _record_pair_stats(self, pairs: SGPOPairs) -> int:
        """Log the pair statistics of this micro-batch over all processes; return the number of pairs kept there."""
        batch_size = len(pairs.responses)
        lengths = pairs.completion_mask.sum(1).float()
        empty, identical, keep = pairs.empty.float(), pairs.identical.float(), pairs.keep.float()
        judge_dropped = 1 - keep - empty - identical
        per_pair = torch.stack(
            [lengths[batch_size:], lengths[:batch_size], empty, identical, judge_dropped, keep], dim=1
        )
        per_pair = self.accelerator.gather(per_pair)
        for key, column in zip(SGPO_STATS, per_pair.mean(0).tolist(), strict=True):
            self.stats[key].append(column)
        totals = per_pair.sum(0).tolist()
        self.pair_counts["made"] += per_pair.size(0)
        self.pair_counts["empty"] += int(totals[2])
        self.pair_counts["identical"] += int(totals[3])
        self.pair_counts["judge_rejected"] += int(round(totals[4]))
        self.pair_counts["kept"] += int(totals[5])
        return int(totals[5])

    # ------------------------------------------------------------------ OnlineDPO seams

    def training_step(self, model, inputs, num_items_in_batch=None):
        if "image" in inputs:
            raise NotImplementedError("SGPOTrainer supports text prompts only (the dataset has an `image` column).")
        pairs = self.generate_pairs(model, inputs["prompt"], inputs)
        kept_everywhere = self._record_pair_stats(pairs)

        kept = pairs.keep.nonzero().flatten().cpu()
        if len(kept) > 0:
            pairs = pairs.select(kept)
            # OnlineDPO reads only `prompt` (its length sets the batch size); the judge already ran.
            inputs = {"prompt": [inputs["prompt"][i] for i in kept.tolist()]}
        else:
            # Nothing to learn from, but every process must still run backward (DDP all-reduces there): train on
            # the pairs with their completions masked out, which gives a zero gradient.
            pairs.completion_mask = torch.zeros_like(pairs.completion_mask)
        # Processes keep different numbers of pairs; DDP averages their gradients, so weigh each process's mean
        # loss by its share of the kept pairs: the update is then the mean over every kept pair.
        weight = 1.0
        if self.accelerator.num_processes > 1 and kept_everywhere > 0:
            weight = self.accelerator.num_processes * len(kept) / kept_everywhere
        self._pending_pairs = pairs
        try:
            with self._patched_accelerator(loss_weight=weight, rows_valid=len(kept) > 0):
                return super().training_step(model, inputs, num_items_in_batch) * weight
        finally:
            self._pending_pairs = None

    def _take_pending(self):
        if self._pending_pairs is None:
            raise RuntimeError("SGPO pairs are generated in `training_step`; `_generate` cannot be called on its own.")
        p = self._pending_pairs
        return p.prompt_ids, p.prompt_mask, p.completion_ids, p.completion_mask

    def _generate(self, model, prompts, images=None):
        return (*self._take_pending(), None)

    def _generate_vllm(self, prompts, images=None):
        return self._take_pending()

    def _calculate_rewards_from_functions(self, prompts, completions, completion_ids_list, **reward_kwargs):
        # The first half (improved answers) is the chosen one. Judge scores are reported when there is a judge;
        # kept pairs already satisfy improved > original there.
        if self._pending_pairs is not None and self._pending_pairs.judge_scores is not None:
            return self._pending_pairs.judge_scores
        batch_size = len(prompts) // 2
        return torch.cat([torch.ones(batch_size), torch.zeros(batch_size)]).to(self.accelerator.device)

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model, trial):
        if self.args.should_save:  # written first: the parent may push the checkpoint folder to the Hub
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, PAIR_COUNTS_NAME), "w") as f:
                json.dump(self.pair_counts, f)
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)) and os.path.isfile(os.path.join(checkpoint, PAIR_COUNTS_NAME)):
            with open(os.path.join(checkpoint, PAIR_COUNTS_NAME)) as f:
                self.pair_counts.update(json.load(f))
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval
        )

    # ------------------------------------------------------------------ model card

    def training_figures(self) -> dict[str, float]:
        """Pair counts so far and the last logged loss and reward statistics, for summaries and the model card."""
        figures: dict[str, float] = {f"pairs_{k}": v for k, v in self.pair_counts.items()}
        for entry in reversed(self.state.log_history):
            if "rewards/margins" in entry:
                for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
                    if key in entry:
                        figures[key] = entry[key]
                break
        return figures

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card (tags ``trl``, ``sgpo``, the SGPO citation) plus a table of SGPO training figures."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        rows = "\n".join(
            f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in self.training_figures().items()
        )
        section = (
            "\n## SGPO training figures\n\nPairs are (chosen: the model's improvement of its own answer, rejected: "
            "its answer). Values at the last logged step.\n\n| figure | value |\n|---|---|\n" + rows + "\n"
        )
        path = os.path.join(self.args.output_dir, "README.md")
        with open(path, "a", encoding="utf-8") as f:
            f.write(section)

    # ------------------------------------------------------------------ evaluation

    def _pair_losses(self, model, pairs: SGPOPairs) -> dict[str, torch.Tensor]:
        """DPO loss and implicit rewards of ``pairs`` (no gradient): OnlineDPO's objective, evaluated."""
        args = (pairs.prompt_ids, pairs.prompt_mask, pairs.completion_ids, pairs.completion_mask)
        with torch.no_grad():
            logps = (self._forward(model, *args) * pairs.completion_mask).sum(1)
            if self.ref_model is not None:
                ref_logps = (self._forward(self.ref_model, *args) * pairs.completion_mask).sum(1)
            else:
                with self.accelerator.unwrap_model(self.model).disable_adapter():
                    ref_logps = (self._forward(self.model, *args) * pairs.completion_mask).sum(1)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        logits = (chosen - rejected) - (ref_chosen - ref_rejected)
        if self.args.loss_type == "sigmoid":
            loss = -F.logsigmoid(self.beta * logits)
        else:
            loss = (logits - 1 / (2 * self.beta)) ** 2
        margins = self.beta * logits
        return {"loss": loss, "rewards/margins": margins, "rewards/accuracies": (margins > 0).float()}

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Generate pairs on the eval prompts and report their DPO loss and reward margins (no training).

        OnlineDPO's ``evaluate`` crashes (trl#2464); this one reports ``{prefix}_loss``, ``{prefix}_rewards/margins``,
        ``{prefix}_rewards/accuracies``, ``{prefix}_sgpo/kept_frac`` and the answer lengths.
        """
        eval_dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(eval_dataset, dict):
            metrics = {}
            for key, ds in eval_dataset.items():
                metrics.update(self.evaluate(ds, ignore_keys, f"{metric_key_prefix}_{key}"))
            return metrics
        if eval_dataset is None:
            raise ValueError("`evaluate` needs an `eval_dataset` (pass one to the trainer or to `evaluate`).")

        model = self.model
        was_training = model.training
        model.eval()
        # Per pair: kept, lengths, and loss/margin/accuracy counted on kept pairs only. Fixed-size rows per batch so
        # every process gathers the same shapes.
        columns = (
            "sgpo/kept_frac",
            "sgpo/policy_length",
            "sgpo/improved_length",
            "loss",
            "rewards/margins",
            "rewards/accuracies",
        )
        totals = torch.zeros(len(columns), dtype=torch.float64)
        n_pairs = 0
        for batch in self.get_eval_dataloader(eval_dataset):
            pairs = self.generate_pairs(model, batch["prompt"], batch)
            batch_size = len(pairs.responses)
            keep = pairs.keep.float()
            lengths = pairs.completion_mask.sum(1).float()
            losses = self._pair_losses(model, pairs)
            per_pair = torch.stack(
                [keep, lengths[batch_size:], lengths[:batch_size]] + [losses[k] * keep for k in columns[3:]], dim=1
            )
            per_pair = self.accelerator.gather_for_metrics(per_pair)
            totals += per_pair.sum(0).double().cpu()
            n_pairs += per_pair.size(0)
        if was_training:
            model.train()

        n_kept = totals[0].item()
        metrics = {}
        for key, total in zip(columns, totals.tolist(), strict=True):
            denominator = n_kept if key in columns[3:] else n_pairs
            metrics[f"{metric_key_prefix}_{key}"] = total / denominator if denominator else float("nan")
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
