"""OnPolicyTrainer: the training step shared by the self-generated preference trainers (SGPO, SPPO, SSO).

A method trains on *items* it makes from the current model: one item per prompt, holding one or more completion
sequences (each with its own prompt), a ``keep`` flag, named boolean ``flags`` (why an item was dropped, or any other
condition worth counting) and per-item ``values`` (targets, weights, judge scores). The base owns everything else,
in the structure of TRL's ``GRPOTrainer``:

- **Buffered generation.** The train dataloader yields the prompts of a whole gradient-accumulation window (TRL's
  ``RepeatSampler``, repeated once per micro-batch); ``_prepare_inputs`` makes the items of the window once (one
  unwrap of the model, one call of :meth:`OnPolicyTrainer.make_items`), keeps the kept ones, computes their reference
  log-probs and slices the buffer into micro-batches (micro-batch ``i`` holds the kept items among the window's
  prompts ``[i * batch, (i + 1) * batch)``).
- **Loss normalization.** :meth:`compute_loss` sums the per-item losses of the micro-batch and divides by the number
  of kept items in the whole window over all processes (times the process count, which DDP divides back), so every
  kept item weighs the same whatever micro-batch or process it landed on. The loss is scaled for accumulation here
  (``loss_is_scaled_for_ga = True``), so ``Trainer.training_step``, which runs each micro-batch that holds items
  (backward, ``torch_empty_cache_steps``, DeepSpeed's ``scale_wrt_gas=False``), does not divide it again.
- **Empty windows.** When no process keeps an item in a window, no forward or backward runs and no optimizer step is
  made (gradients stay ``None``; an fp16 ``GradScaler`` neither unscales nor steps nor updates its scale), and the
  learning-rate schedule is held (:class:`EmptyWindowGuard`): weights, optimizer state, loss scale and schedule are
  bit-identical after the step. Skips are counted
  (``<prefix>/skipped_steps``), warned about past ``skipped_steps_warning_frac``, and a run whose first
  ``max_initial_empty_steps`` steps all keep nothing stops with an error built by :meth:`empty_window_hint`. On a
  single plain process a micro-batch that keeps nothing is skipped the same way, inside a window that trains; under
  DDP, DeepSpeed and FSDP it runs at weight 0 instead, so every process runs the same passes.
- **Log-probs** of completion tokens only (``logits_to_keep``, TRL's ``selective_log_softmax``), with position ids
  from the attention mask so left padding does not shift positions; the reference is ``ref_model`` or, under PEFT, the
  model with its adapter disabled. Under DeepSpeed ZeRO-3 without PEFT the reference is loaded again from the folder
  the policy's weights came from (:func:`reference_weights_source`).
- **Metrics and counts.** Item counts (``made``, ``kept``, one per flag, ``skipped_steps``) are kept over all processes
  in :attr:`counts`, saved beside each checkpoint and restored on resume, and shown in the model card. Per-step means
  of the flags, the sequence lengths and the loss metrics are logged under ``<prefix>/`` by :meth:`log`.

A method subclass says only what differs:

- ``_metric_prefix`` (e.g. ``"sgpo"``), ``_counts_file`` (checkpoint file of the counts), ``_item_name`` (``"pair"``),
  plus TRL's ``_tag_names``, ``_name`` and ``_paper``;
- :meth:`make_items` ``(generation_model, prompts, inputs) -> Items``: sample from the current model (use
  :meth:`generate_ids`) and decide which items train;
- :meth:`item_losses` ``(items, logps, ref_logps) -> (losses, metrics)``: per-item losses (shape ``(n,)``) from the
  summed completion log-probs of each named sequence under the policy and the reference, plus per-item metrics;
- optionally :meth:`empty_window_hint` (what to change when nothing is kept) and :meth:`prompt_room` (the prompt
  tokens left once the completions are counted, used to filter the dataset).

``Items.sequences`` maps a name to :class:`Sequences` (left-padded prompt ids, right-padded completion ids, one row
per item). SGPO uses ``{"chosen", "rejected"}`` under the same prompt; SPPO a single ``"completion"`` with a
``values["target"]``; SSO three completions each scored under its own prompt (``x``, ``x+``, ``x-``) with a
``values["weight"]``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import DistributedType, gather_object
from datasets import IterableDataset
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from trl.experimental.utils import empty_cache
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import RepeatSampler, selective_log_softmax

from ..data.checks import check_prompt_dataset
from ..models import DEFAULT_MODEL, load_model_and_tokenizer
from ..utils import apply_cpu_defaults
from .items_log import ItemsLog


logger = logging.getLogger(__name__)

# What this package still takes from TRL's experimental OnlineDPOTrainer (1.16). tests/test_onpolicy.py fails when one
# of them disappears, so a TRL upgrade that removes or renames one is caught before it changes training silently.
#   __init__: model loading, PEFT wrapping, the reference copy, dropout off, generation config, accelerator prep of
#             the reference and reward models, the server-mode vLLM client;
#   _move_model_to_vllm: weight sync to vLLM (PEFT merge, ZeRO-3 gather, FSDP); _sync_fsdp1/2_params_to_vllm,
#   _fix_param_name_to_vllm: SPPO's push of the reference (pi_t) through the same FSDP syncs and names;
#   _beta, eos_token_ids, generation_config, generation_kwargs, ref_model, reward_funcs, reward_processing_classes,
#   reward_weights (an optional judge, scored by SGPO itself so that an abstention drops a pair), use_vllm,
#   vllm_mode, llm, vllm_client, _last_loaded_step, _tokenizer: attributes set by __init__.
ONLINE_DPO_MEMBERS_USED = (
    "__init__",
    "_move_model_to_vllm",
    "_sync_fsdp1_params_to_vllm",
    "_sync_fsdp2_params_to_vllm",
    "_fix_param_name_to_vllm",
    "_beta",
    "eos_token_ids",
    "generation_config",
    "generation_kwargs",
    "ref_model",
    "reward_funcs",
    "reward_processing_classes",
    "reward_weights",
    "use_vllm",
    "vllm_mode",
    "llm",
    "vllm_client",
    "_last_loaded_step",
    "_tokenizer",
)


def _never_called(prompts, completions, **kwargs):
    # OnlineDPOTrainer requires `reward_funcs`; without a judge this stands in for it and is never scored.
    raise RuntimeError("OnPolicyTrainer does not use OnlineDPO's reward path without a judge.")


def reference_weights_source(model) -> str | None:
    """Where a second copy of ``model`` (the ZeRO-3 reference) is loaded from: the folder its weights came from.

    :func:`~trl_sgpo.load_model_and_tokenizer` records it as ``model.sgpo_weights_path``; ``config._name_or_path`` may
    be a card name (the Hub id a pipeline stage started from), and after a model object trained in this process its
    recorded path no longer holds its weights (:meth:`OnPolicyTrainer.train` clears it, ``save_model`` sets the new
    folder). Returns ``None`` when no local source is known.
    """
    if isinstance(model, str):
        return model
    if hasattr(model, "sgpo_weights_path"):
        return model.sgpo_weights_path
    path = model.config._name_or_path
    return path if path and os.path.isdir(path) else None


_FINISHED = "answers end at EOS (an answer without one is cut and never trained), so it would silently drop answers."
# `vllm_sampling_kwargs` keys the trainers set themselves, and why (the error names the setting to use instead).
VLLM_RESERVED_KEYS = {
    "max_tokens": "the budget is `max_new_tokens` (SGPO's improver: `improver_max_new_tokens`); use those.",
    "temperature": "use `temperature` (SGPO's improver: `improver_temperature`).",
    "top_p": "use `top_p`.",
    "top_k": "use `top_k`.",
    "min_p": "use `min_p`.",
    "repetition_penalty": "use `repetition_penalty`.",
    "n": "each call makes one answer per prompt (SPPO: set `num_samples`).",
    "best_of": "each call makes one answer per prompt (SPPO: set `num_samples`).",
    "detokenize": "the trainers read token ids, never vLLM's text.",
    "stop": _FINISHED,
    "stop_token_ids": _FINISHED,
    "ignore_eos": _FINISHED,
}


@dataclass
class OnPolicyConfig(OnlineDPOConfig):
    r"""
    Shared configuration of the on-policy trainers ([`SGPOConfig`] and the others), on top of TRL's
    [`~trl.experimental.online_dpo.OnlineDPOConfig`].

    `bf16` defaults to `True` only on a bf16-capable accelerator (TRL's `True` errors on CPU), and `use_cpu` is
    switched on when there is no accelerator (several CPU processes then train with gloo DDP). `generation_kwargs`
    go to `transformers`' `GenerationConfig` only (OnlineDPO also sends them to vLLM's `SamplingParams`, which
    refuses keys such as `use_cache`); vLLM's options go in `vllm_sampling_kwargs`. In vLLM colocate mode the
    number of processes must be a multiple of `vllm_tensor_parallel_size`: each tensor-parallel group of processes
    shares one engine, which answers the prompts of the whole group at once.

    Parameters:
        skipped_steps_warning_frac (`float`, *optional*, defaults to `0.25`):
            Warn (once) when more than this share of the optimizer steps so far kept no item and were skipped.
        max_initial_empty_steps (`int`, *optional*, defaults to `4`):
            Stop with an error when the first `max_initial_empty_steps` optimizer steps all keep no item (the
            settings cannot produce training data). `0` never stops.
        log_items (`bool`, *optional*, defaults to `True`):
            Write every item made (prompt, generated texts, kept or why dropped, judge scores, per-item loss
            figures such as DPO margins or SPPO targets) to `<output_dir>/items.jsonl`, one line per item, as
            training goes. See [`~trl_sgpo.trainers.items_log`].
        vllm_sampling_kwargs (`dict[str, Any]`, *optional*):
            Extra keyword arguments for vLLM's `SamplingParams` when `use_vllm=True` (e.g.
            `{"presence_penalty": 0.5}`). In server mode they are sent as the client's `generation_kwargs`. Not used
            without vLLM, as `generation_kwargs` are not used with it. Keys that have their own setting
            (`temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`, `max_tokens`: `max_new_tokens`, and
            SGPO's `improver_temperature`, `improver_max_new_tokens`) and keys that would change which answers count
            as finished or how many are made (`n`, `best_of`, `detokenize`, `stop`, `stop_token_ids`, `ignore_eos`:
            an answer is finished when it ends with EOS) are refused.
    """

    skipped_steps_warning_frac: float = field(
        default=0.25,
        metadata={"help": "Warn once when more than this share of optimizer steps kept nothing and were skipped."},
    )
    max_initial_empty_steps: int = field(
        default=4,
        metadata={"help": "Stop with an error when this many first optimizer steps all keep nothing (0: never)."},
    )
    log_items: bool = field(
        default=True,
        metadata={"help": "Write every item made (texts, kept or drop reason, scores, margins) to items.jsonl."},
    )
    # A JSON string on the command line (as TRL's GRPOConfig takes `generation_kwargs`).
    _VALID_DICT_FIELDS = OnlineDPOConfig._VALID_DICT_FIELDS + ["vllm_sampling_kwargs"]

    vllm_sampling_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Extra keyword arguments for vLLM's `SamplingParams` (with `use_vllm`); `generation_kwargs` go "
            "to transformers' `GenerationConfig` only."
        },
    )

    def __post_init__(self):
        apply_cpu_defaults(self)
        super().__post_init__()
        if not 0 <= self.skipped_steps_warning_frac <= 1:
            raise ValueError(f"`skipped_steps_warning_frac` must be in [0, 1], got {self.skipped_steps_warning_frac}.")
        if self.max_initial_empty_steps < 0:
            raise ValueError(f"`max_initial_empty_steps` must be >= 0, got {self.max_initial_empty_steps}.")
        parallel = self.parallelism_config
        if parallel is not None and (parallel.cp_enabled or parallel.sp_enabled):
            # Trainer splits `input_ids` of the batch across the group; these trainers build their sequences inside
            # the step, so there is nothing for it to split.
            raise ValueError(
                "`parallelism_config` with context or sequence parallelism (`cp_size` or `sp_size` > 1) is not "
                "supported by the on-policy trainers. Set `cp_size=1` and `sp_size=1` (data, tensor and FSDP "
                "parallelism are fine)."
            )
        for key in sorted(set(self.vllm_sampling_kwargs or {}) & set(VLLM_RESERVED_KEYS)):
            raise ValueError(
                f"`vllm_sampling_kwargs` may not set `{key}`: {VLLM_RESERVED_KEYS[key]} Remove it from "
                "`vllm_sampling_kwargs`."
            )
        if self.use_vllm and self.generation_kwargs:
            logger.warning(
                f"`generation_kwargs` {sorted(self.generation_kwargs)} are for transformers' `generate` and are not "
                "used with `use_vllm=True`; put vLLM `SamplingParams` options in `vllm_sampling_kwargs`."
            )
        if not self.use_vllm and self.vllm_sampling_kwargs:
            logger.warning(
                f"`vllm_sampling_kwargs` {sorted(self.vllm_sampling_kwargs)} are used with `use_vllm=True` only; "
                "put transformers generation options in `generation_kwargs`."
            )


def pad_rows(rows: list[list[int]], pad: int, side: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id rows to one width on ``side`` ("left" or "right"); returns ``(ids, mask)``."""
    width = max(1, max((len(r) for r in rows), default=0))
    ids, mask = [], []
    for r in rows:
        fill = [pad] * (width - len(r))
        ids.append(fill + list(r) if side == "left" else list(r) + fill)
        ones, zeros = [1] * len(r), [0] * (width - len(r))
        mask.append(zeros + ones if side == "left" else ones + zeros)
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


@dataclass
class Sequences:
    """Completion sequences, one row per item: left-padded prompts and right-padded completions."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    @classmethod
    def from_lists(cls, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad: int, device) -> Sequences:
        return cls(*pad_rows(prompt_ids, pad, "left", device), *pad_rows(completion_ids, pad, "right", device))

    def select(self, index: torch.Tensor) -> Sequences:
        return Sequences(*(t[index.to(t.device)] for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask

    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)

    @staticmethod
    def cat(parts: list[Sequences], pad: int) -> Sequences:
        """Stack ``parts`` row-wise, re-padding prompts on the left and completions on the right."""
        p_width = max(s.prompt_ids.size(1) for s in parts)
        c_width = max(s.completion_ids.size(1) for s in parts)

        def widen(t, width, value, left):
            extra = width - t.size(1)
            if extra == 0:
                return t
            fill = t.new_full((t.size(0), extra), value)
            return torch.cat([fill, t] if left else [t, fill], dim=1)

        return Sequences(
            torch.cat([widen(s.prompt_ids, p_width, pad, True) for s in parts]),
            torch.cat([widen(s.prompt_mask, p_width, 0, True) for s in parts]),
            torch.cat([widen(s.completion_ids, c_width, pad, False) for s in parts]),
            torch.cat([widen(s.completion_mask, c_width, 0, False) for s in parts]),
        )


@dataclass
class Items:
    """What a method made from one window of prompts: one item per prompt.

    Attributes:
        sequences: Named completion sequences, each with its own prompt, one row per item.
        keep: Which items train (bool, shape ``(n,)``).
        flags: Named bool ``(n,)`` conditions, counted and logged as ``<prefix>/<name>_frac`` (drop reasons and any
            other condition worth counting; they need not be exclusive).
        values: Named per-item tensors the loss reads (targets, weights, judge scores); the base adds
            ``ref_logps/<sequence name>``, ``weight`` (1 for real items, 0 for the zero-gradient filler a process
            runs when it holds no item in a micro-batch) and, with ``log_items``, ``item_index`` (the item's position
            in its window, for ``items.jsonl``).
        texts: Decoded texts, for inspection and tests.
    """

    sequences: dict[str, Sequences]
    keep: torch.Tensor
    flags: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    texts: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.keep.numel())

    def select(self, index: torch.Tensor) -> Items:
        index = torch.as_tensor(index, dtype=torch.long)
        positions = index.tolist()
        return Items(
            sequences={k: s.select(index) for k, s in self.sequences.items()},
            keep=self.keep[index.to(self.keep.device)],
            flags={k: v[index.to(v.device)] for k, v in self.flags.items()},
            values={k: v[index.to(v.device)] for k, v in self.values.items()},
            texts={k: [v[i] for i in positions] for k, v in self.texts.items()},
        )


def masked_filler(items: Items, index: int = 0) -> Items:
    """Item ``index`` of ``items`` with its completions masked out: a forward on it adds nothing to any log-prob
    sum."""
    part = items.select(torch.tensor([index]))
    for seqs in part.sequences.values():
        seqs.completion_mask = torch.zeros_like(seqs.completion_mask)
    return part


class EmptyWindowGuard(TrainerCallback):
    """Makes the optimizer step of a window that kept no item a no-op, learning-rate schedule included.

    ``Trainer`` steps the optimizer and the scheduler after every window. A skipped window has no gradient (``None``),
    so before that step (``on_pre_optimizer_step``) this callback turns off ``accelerator.sync_gradients``, which
    accelerate's optimizer wrapper reads as "no step": neither the optimizer nor an fp16 ``GradScaler`` (whose
    ``step`` and ``update`` need the inf checks of a backward) runs. It also saves the scheduler state and the
    param-group learning rates, and puts them and the flag back once the step is over (``on_step_end``).
    """

    def __init__(self, trainer: OnPolicyTrainer):
        self.trainer = trainer
        self.saved = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if not self.trainer._window_skipped:
            return
        self.trainer.accelerator.sync_gradients = False
        if lr_scheduler is not None:
            self.saved = (copy.deepcopy(lr_scheduler.state_dict()), [g["lr"] for g in optimizer.param_groups])

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if self.trainer._window_skipped:
            self.trainer.accelerator.sync_gradients = True
        if self.saved is not None:
            schedule, lrs = self.saved
            lr_scheduler.load_state_dict(schedule)
            for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            self.saved = None


class MicroBatch(dict):
    """One micro-batch cut from a window: ``skip``, and unless skipped ``items`` and ``num_items_in_window``."""


class OnPolicyTrainer(OnlineDPOTrainer):
    """Base of the on-policy trainers; see the module docstring for what it owns and what a subclass provides."""

    _metric_prefix = "onpolicy"
    _counts_file = "onpolicy_counts.json"
    _item_name = "item"
    # Values that mean nothing for a dropped item (SPPO's target): written as null in items.jsonl.
    _kept_only_values: tuple[str, ...] = ()

    def __init__(
        self,
        model,
        ref_model=None,
        reward_funcs=None,
        args: OnPolicyConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        reward_processing_classes=None,
        peft_config=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
    ) -> None:
        if args is None:
            raise ValueError("`args` is required (a subclass builds its default config).")
        model, ref_model, processing_class = self._load_models(model, ref_model, processing_class, args, peft_config)
        self._check_tokenizer(processing_class)
        room = self.prompt_room(args)
        train_dataset = check_prompt_dataset(train_dataset, processing_class, room, name="train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                key: check_prompt_dataset(ds, processing_class, room, name=f"eval_dataset[{key!r}]")
                for key, ds in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = check_prompt_dataset(eval_dataset, processing_class, room, name="eval_dataset")

        self.has_judge = reward_funcs is not None and reward_funcs != []
        colocate = args.use_vllm and args.vllm_mode == "colocate"
        super().__init__(
            model=model,
            ref_model=ref_model,
            reward_funcs=reward_funcs if self.has_judge else _never_called,
            args=self._online_dpo_args(args, colocate),
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
        self.args = args
        self._check_window(train_dataset)
        self.vllm_tp_group = None
        if colocate:
            self.use_vllm, self.vllm_mode = True, "colocate"
            self._last_loaded_step = -1
            self.vllm_tp_group = self.make_vllm_tp_group()
            self.llm = self._build_vllm_engine(model)
        if not self.has_judge:
            self.reward_funcs = None
        self._init_step_state()
        # OnlineDPO sets use_cache = not gradient_checkpointing; generation runs with checkpointing switched off
        # (unwrap_model_for_generation), so the KV cache is always safe, and generating without it is much slower.
        if not self.use_vllm and "use_cache" not in (args.generation_kwargs or {}):
            self.generation_kwargs["use_cache"] = True
            self.generation_config.use_cache = True

    @staticmethod
    def _load_models(model, ref_model, processing_class, args: OnPolicyConfig, peft_config):
        """``(model, ref_model, processing_class)``: the default model loaded, a model id's tokenizer, and under
        DeepSpeed ZeRO-3 without PEFT the reference loaded from the policy's weights."""
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
            # A ZeRO-3 partitioned policy cannot be deep-copied into a reference (trl#2532): load a second copy of
            # the weights this round starts from.
            source = reference_weights_source(model)
            if not source:
                raise ValueError(
                    "Under DeepSpeed ZeRO-3 without PEFT the reference model is loaded again from the policy's "
                    "weights folder, and this model has none that holds its current weights (it was built in memory "
                    "or trained in this process). Pass `ref_model`, or load the model with "
                    "`trl_sgpo.load_model_and_tokenizer(folder)` from the folder it was saved to."
                )
            ref_model = AutoModelForCausalLM.from_pretrained(source, **(args.model_init_kwargs or {}))
        return model, ref_model, processing_class

    def _check_tokenizer(self, processing_class) -> None:
        """A text tokenizer is required; one without a pad token pads with its EOS token."""
        if processing_class is None:
            raise ValueError("`processing_class` (the tokenizer) is required when `model` is not a model id or path.")
        if not isinstance(processing_class, PreTrainedTokenizerBase):
            raise TypeError(
                f"{type(self).__name__} supports text models only: `processing_class` must be a tokenizer, got "
                f"{type(processing_class).__name__}."
            )
        if processing_class.pad_token is None:
            if processing_class.eos_token is None:
                raise ValueError("The tokenizer has neither a pad token nor an EOS token; set `tokenizer.pad_token`.")
            processing_class.pad_token = processing_class.eos_token

    @staticmethod
    def _online_dpo_args(args: OnPolicyConfig, colocate: bool) -> OnPolicyConfig:
        """The config OnlineDPO's ``__init__`` is given: without vLLM in colocate mode, whose engine is built here
        (its ``max_model_len`` must cover this method's longest prompt, ``vllm_max_model_len``, and it must load the
        local weights, not a card name)."""
        tp = args.vllm_tensor_parallel_size
        if colocate and args.world_size % tp:
            raise ValueError(
                f"`vllm_tensor_parallel_size={tp}` must divide the number of processes ({args.world_size}) in vLLM "
                "colocate mode: each group of that many processes shares one engine. Launch a multiple of it, or "
                "change `vllm_tensor_parallel_size`."
            )
        init_args = copy.copy(args)
        if colocate:
            init_args.use_vllm = False
        elif args.use_vllm:  # OnlineDPO builds its (unused) server-mode SamplingParams from `generation_kwargs`
            init_args.generation_kwargs = args.vllm_sampling_kwargs
        return init_args

    def _check_window(self, train_dataset) -> None:
        """The sampler yields whole windows only: fewer prompts than one window would train nothing, silently."""
        window = self._window_size() * self.accelerator.num_processes
        if train_dataset is None or isinstance(train_dataset, IterableDataset) or len(train_dataset) >= window:
            return
        args = self.args
        raise ValueError(
            f"`train_dataset` has {len(train_dataset)} prompts, fewer than one optimizer step takes "
            f"(per_device_train_batch_size {args.per_device_train_batch_size} x gradient_accumulation_steps "
            f"{args.gradient_accumulation_steps} x {self.accelerator.num_processes} process(es) = {window}). "
            "Give more prompts or lower those settings."
        )

    def _init_step_state(self) -> None:
        """Metrics, counts and the window buffer of the step, and the callbacks that watch it."""
        self.stats = {}  # OnlineDPO's per-step stats are replaced by `_metrics` (logged by `log`)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._window_sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {"made": 0, "kept": 0, "skipped_steps": 0, "steps": 0}
        self._buffer: list[dict[str, Any]] | None = None
        self._micro_step = 0
        self._window_skipped = False
        self._skip_warned = False
        self._log_steps = 0
        self._log_skipped = 0
        self.add_callback(EmptyWindowGuard(self))
        self._items_log = ItemsLog(self)  # writes <output_dir>/items.jsonl at the end of each optimizer step
        self.add_callback(self._items_log)

    # ------------------------------------------------------------------ what a method provides

    def prompt_room(self, args) -> int:
        """Prompt tokens left in ``max_length`` once the longest completion is counted (prompts beyond are skipped)."""
        return args.max_length - args.max_new_tokens

    def make_items(self, model, prompts: list, inputs: dict[str, Any]) -> Items:
        """Make the items of ``prompts`` (a whole accumulation window) with ``model``, the unwrapped model to sample
        from (``None`` under vLLM). ``inputs`` is the collated window (extra dataset columns)."""
        raise NotImplementedError

    def item_losses(
        self, items: Items, logps: dict[str, torch.Tensor], ref_logps: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-item losses ``(n,)`` and per-item metrics from the summed completion log-probs of each sequence."""
        raise NotImplementedError

    def empty_window_hint(self) -> str:
        """What to change when the first optimizer steps keep nothing (appended to the error)."""
        dropped = {k: v for k, v in self.counts.items() if k not in ("made", "kept", "skipped_steps", "steps")}
        return f"Drop counts so far: {dropped}."

    # ------------------------------------------------------------------ generation helpers

    @property
    def beta(self):
        # OnlineDPO indexes the list with the float `state.epoch` and crashes on step 2 (trl#6806).
        if isinstance(self._beta, list):
            epoch = int(self.state.epoch or 0)
            return self._beta[min(epoch, len(self._beta) - 1)]
        return self._beta

    def tokenize_prompts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of rendered prompts. The rendered text already holds the template's special tokens (a BOS when
        the template writes one), so none are added: exactly one BOS reaches the model, whatever the sampler."""
        return self._tokenizer(text=texts, add_special_tokens=False)["input_ids"]

    @contextmanager
    def generation_model(self):
        """The model to sample from for one window: unwrapped once (DeepSpeed/FSDP gathered, checkpointing off), or
        ``None`` under vLLM, whose weights are synced once per optimizer step and woken once per window."""
        if self.use_vllm:
            with self._vllm_awake():
                yield None
            return
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                # OnlineDPO passes none, so a user's `use_reentrant` is lost after the first generation.
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            FSDP.summon_full_params(self.model_wrapped, recurse=False) if self.is_fsdp_enabled else nullcontext(),
        ):
            yield unwrapped_model

    @contextmanager
    def _vllm_awake(self):
        sleeps = self.vllm_mode == "colocate" and self.args.vllm_enable_sleep_mode
        if sleeps:
            empty_cache()
            self.llm.wake_up(tags=["weights"])
        if sleeps or self._vllm_needs_weights():
            self._load_vllm_weights()
            self._last_loaded_step = self.state.global_step
        if sleeps:
            self.llm.wake_up(tags=["kv_cache"])
        try:
            yield
        finally:
            if sleeps:
                self.llm.sleep(level=2)

    def _load_vllm_weights(self) -> None:
        """Push the weights to sample from into the vLLM engine: the policy's (TRL's sync)."""
        self._move_model_to_vllm()

    def _vllm_needs_weights(self) -> bool:
        """Whether the engine needs the policy's weights before this window (once per optimizer step)."""
        return self.state.global_step != self._last_loaded_step

    def vllm_max_model_len(self) -> int:
        """Longest sequence (prompt + completion) the vLLM engine must hold for this method."""
        return self.args.max_length + self.args.max_new_tokens

    def vllm_engine_kwargs(self, model) -> dict[str, Any]:
        """Arguments of the colocated ``vllm.LLM`` (OnlineDPO's, with this method's ``max_model_len``, a window of
        sequences at once, and the local weights folder)."""
        tp = self.args.vllm_tensor_parallel_size
        source = reference_weights_source(model) or self.accelerator.unwrap_model(self.model).name_or_path
        return {
            "model": source,
            "tensor_parallel_size": tp,
            "gpu_memory_utilization": self.args.vllm_gpu_memory_utilization,
            "model_impl": self.args.vllm_model_impl,
            "max_num_seqs": self._window_size() * tp,
            "max_model_len": self.vllm_max_model_len(),
            "distributed_executor_backend": "external_launcher",
            # Identical seeds within a tensor-parallel group, so its workers sample the same tokens.
            "seed": self.accelerator.process_index // tp,
            "max_num_batched_tokens": max(4096, self.vllm_max_model_len()),
            "enable_sleep_mode": self.args.vllm_enable_sleep_mode,
        }

    def make_vllm_tp_group(self):
        """The process group of this process's colocated engine (consecutive ranks, ``vllm_tensor_parallel_size`` of
        them), as TRL makes it; ``None`` without tensor parallelism. Collective: every process calls it."""
        tp = self.args.vllm_tensor_parallel_size
        if tp == 1:
            return None
        group, _ = torch.distributed.new_subgroups_by_enumeration(
            [list(range(i * tp, (i + 1) * tp)) for i in range(self.accelerator.num_processes // tp)]
        )
        return group

    def _build_vllm_engine(self, model):  # pragma: no cover - needs a GPU and vLLM
        from trl.import_utils import is_vllm_available

        if not is_vllm_available():
            raise ImportError("`use_vllm=True` needs vLLM: `pip install trl[vllm]`.")
        from trl.trainer.utils import ensure_master_addr_port
        from vllm import LLM

        os.environ["RANK"] = str(self.accelerator.process_index)
        os.environ["LOCAL_RANK"] = str(self.accelerator.local_process_index)
        os.environ["WORLD_SIZE"] = str(self.accelerator.num_processes)
        ensure_master_addr_port()
        llm = LLM(**self.vllm_engine_kwargs(model))
        if self.args.vllm_enable_sleep_mode:
            llm.sleep(level=2)
        self.accelerator.wait_for_everyone()
        return llm

    # ------------------------------------------------------------------ log-probs

    def sequence_logps(self, model, seqs: Sequences) -> torch.Tensor:
        """Summed log-probs of the completion tokens of ``seqs`` under ``model`` (shape ``(n,)``)."""
        prompt_ids, prompt_mask, completion_ids, completion_mask = seqs.tensors()
        cut = max(prompt_ids.size(1) + completion_ids.size(1) - self.args.max_length, 0)
        prompt_ids, prompt_mask = prompt_ids[:, cut:], prompt_mask[:, cut:]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        # Positions from the mask: left padding then does not shift the prompt, as in generation.
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        width = completion_ids.size(1)
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=width + 1,
            use_cache=False,
        ).logits[:, :-1]
        token_logps = selective_log_softmax(logits, completion_ids)
        return (token_logps * completion_mask).sum(1)

    def _all_logps(self, model, items: Items) -> dict[str, torch.Tensor]:
        # One forward for every sequence of the items (SGPO: chosen and rejected rows together).
        names = list(items.sequences)
        stacked = Sequences.cat([items.sequences[k] for k in names], self._tokenizer.pad_token_id)
        return dict(zip(names, self.sequence_logps(model, stacked).split(len(items)), strict=True))

    @torch.no_grad()
    def reference_logps(self, items: Items) -> dict[str, torch.Tensor]:
        """Summed completion log-probs under the reference: ``ref_model``, or the adapter-disabled model (PEFT)."""
        if self.ref_model is not None:
            return self._all_logps(self.ref_model, items)
        # The forward goes through `self.model` (the FSDP wrapper once training started, as in OnlineDPO): calling the
        # inner module would skip the root FSDP unit's unshard, leaving the embeddings and head sharded.
        with self.accelerator.unwrap_model(self.model).disable_adapter():
            return self._all_logps(self.model, items)

    # ------------------------------------------------------------------ data: one window per dataloader batch

    def _get_train_sampler(self, dataset=None):
        # Each dataloader batch holds the prompts of a whole accumulation window, repeated once per micro-batch (as
        # in GRPOTrainer); `_prepare_inputs` generates for the window at its first micro-batch and slices a buffer.
        dataset = dataset if dataset is not None else self.train_dataset
        return RepeatSampler(
            data_source=dataset,
            mini_repeat_count=1,
            batch_size=self._window_size() * self.accelerator.num_processes,
            repeat_count=self.args.gradient_accumulation_steps,
            shuffle=True,
            seed=self.args.seed,
        )

    def _window_size(self) -> int:
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps

    def get_train_dataloader(self):
        if isinstance(self.train_dataset, IterableDataset):
            raise NotImplementedError(
                f"{type(self).__name__} needs a map-style `train_dataset` (it samples whole accumulation windows); "
                "convert an IterableDataset with `Dataset.from_generator` or `Dataset.from_list`."
            )
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._window_size(),
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _prepare_inputs(self, inputs):
        if "image" in inputs:
            raise NotImplementedError(f"{type(self).__name__} supports text prompts only (found an `image` column).")
        if isinstance(inputs, MicroBatch):  # `Trainer.training_step` prepares what `training_step` cut already
            return inputs
        steps = self.args.gradient_accumulation_steps
        if self._micro_step % steps == 0 or self._buffer is None:
            self._buffer = self._make_window(inputs)
        return MicroBatch(self._buffer[self._micro_step % steps])

    def _gather_sum(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(values.to(self.accelerator.device), reduction="sum")

    def _record_items(self, items: Items) -> None:
        """Count and log the flags, lengths and keep share of a window over all processes."""
        flag_names = sorted(items.flags)
        seq_names = list(items.sequences)
        local = torch.stack(
            [items.keep.float().sum(), torch.tensor(float(len(items)), device=items.keep.device)]
            + [items.flags[k].float().sum() for k in flag_names]
            + [items.sequences[k].lengths().float().sum() for k in seq_names]
        )
        totals = self._gather_sum(local).tolist()
        kept, made = totals[0], totals[1]
        self.counts["made"] += int(made)
        self.counts["kept"] += int(kept)
        prefix = self._metric_prefix
        self._metrics[f"{prefix}/kept_frac"].append(kept / made if made else float("nan"))
        for i, name in enumerate(flag_names):
            self.counts[name] = self.counts.get(name, 0) + int(totals[2 + i])
            self._metrics[f"{prefix}/{name}_frac"].append(totals[2 + i] / made if made else float("nan"))
        for i, name in enumerate(seq_names):
            self._metrics[f"{prefix}/{name}_length"].append(totals[2 + len(flag_names) + i] / made if made else 0.0)

    def _make_window(self, inputs) -> list[dict[str, Any]]:
        steps = self.args.gradient_accumulation_steps
        prompts = list(inputs["prompt"])
        with self.generation_model() as model:
            items = self.make_items(model, prompts, inputs)
        self._items_log.add_window(items, prompts)
        self._record_items(items)
        keep = items.keep.cpu()
        n_window = int(self._gather_sum(keep.float().sum()).item())
        self.counts["steps"] += 1
        self._log_steps += 1
        self._window_skipped = n_window == 0
        if self._window_skipped:
            self._on_empty_window()
            return [{"skip": True}] * steps

        device = self.accelerator.device
        size = len(items) // steps
        batches = []
        for i in range(steps):
            # Micro-batch i holds the kept items among the window's prompts [i * size, (i + 1) * size).
            kept = [j for j in range(i * size, (i + 1) * size) if keep[j]]
            if kept:
                part = items.select(torch.tensor(kept))
                part.values["weight"] = torch.ones(len(kept), device=device)
            elif self.accelerator.distributed_type == DistributedType.NO:
                # A single plain process has no peer to keep in step: a micro-batch without a kept item is skipped
                # (no reference pass, no forward, no backward) rather than run at weight 0.
                batches.append({"skip": True})
                continue
            else:
                # Every process runs forward and backward on every micro-batch of a window that trains (DDP
                # all-reduces, DeepSpeed counts micro-steps): a process without an item here runs one with its
                # completions masked out and weight 0, which adds a zero gradient.
                part = masked_filler(items, i * size)
                part.values["weight"] = torch.zeros(1, device=device)
            ref = self.reference_logps(part)
            for name, value in ref.items():
                part.values[f"ref_logps/{name}"] = value
            batches.append({"skip": False, "items": part, "num_items_in_window": n_window})
        return batches

    def _on_empty_window(self) -> None:
        self.counts["skipped_steps"] += 1
        self._log_skipped += 1
        skipped, steps = self.counts["skipped_steps"], self.counts["steps"]
        limit = self.args.max_initial_empty_steps
        if limit and skipped == steps == limit:
            raise ValueError(
                f"The first {limit} optimizer steps kept no {self._item_name} on any process, so training cannot "
                f"start. {self.empty_window_hint()} (Set `max_initial_empty_steps=0` to keep going anyway.)"
            )
        if not self._skip_warned and steps >= 4 and skipped / steps > self.args.skipped_steps_warning_frac:
            self._skip_warned = True
            logger.warning(
                f"{skipped} of {steps} optimizer steps kept no {self._item_name} and were skipped (no update). "
                + self.empty_window_hint()
            )

    # ------------------------------------------------------------------ the step

    # `compute_loss` divides by the kept items of the whole window (all processes): Trainer must not divide by the
    # accumulation steps again.
    loss_is_scaled_for_ga = True

    def training_step(self, model, inputs, num_items_in_batch=None):
        """``Trainer.training_step`` on this micro-batch of the window, or nothing when it holds no kept item."""
        batch = self._prepare_inputs(inputs)
        self._micro_step += 1
        if batch["skip"]:
            # Nothing kept in this micro-batch (one process), or anywhere in this window: no forward, no backward. A
            # window that kept nothing makes no optimizer step either (EmptyWindowGuard).
            loss = torch.tensor(0.0, device=self.args.device)
        else:
            # Trainer's step (OnlineDPO's is bypassed): train modes, compute_loss, torch_empty_cache_steps, the
            # n_gpu > 1 mean, LOMO, backward with DeepSpeed's scale_wrt_gas=False.
            loss = super(OnlineDPOTrainer, self).training_step(model, batch, num_items_in_batch)
        if self._micro_step % self.args.gradient_accumulation_steps == 0:  # last micro-batch of the window
            self._flush_window_metrics()
        return loss

    def _clip_grad_norm(self, model):
        # A skipped window has no gradient to clip, and an fp16 GradScaler must not unscale without a backward.
        return None if self._window_skipped else super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        # A skipped window has no gradient: its logged `grad_norm` is NaN (as its loss), not a misleading 0.
        return float("nan") if self._window_skipped else super()._get_grad_norm(model, grad_norm)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        items: Items = inputs["items"]
        logps = self._all_logps(model, items)
        ref_logps = {name: items.values[f"ref_logps/{name}"] for name in items.sequences}
        losses, metrics = self.item_losses(items, logps, ref_logps)
        self._items_log.add_losses(items, losses, metrics)
        weight = items.values["weight"]
        # Sum over this micro-batch's kept items / kept items in the window over all processes. DDP averages the
        # processes' gradients, hence the process count: the update is the mean over every kept item of the window.
        loss = (losses * weight).sum() * self.accelerator.num_processes / inputs["num_items_in_window"]
        self._add_window_metrics(metrics, weight)
        return (loss, metrics) if return_outputs else loss

    def _add_window_metrics(self, metrics: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
        for key, value in metrics.items():
            # A zero-weight filler item counts for nothing, even where its value is NaN (a judge's abstention).
            total = torch.where(weight > 0, value.detach().float() * weight, 0.0).sum()
            self._window_sums[key] = self._window_sums.get(key, 0.0) + total
        self._window_sums["_count"] = self._window_sums.get("_count", 0.0) + weight.sum()

    def _flush_window_metrics(self) -> None:
        """Log the window's item-weighted means (after its last micro-batch); nothing when no micro-batch ran."""
        # `_gather_sum` is collective: the sums are empty on every process or on none, since micro-batches are skipped
        # mid-window on a single plain process only (several processes skip whole windows, all of them together).
        if self._window_sums:
            keys = sorted(self._window_sums)
            totals = self._gather_sum(torch.stack([torch.as_tensor(self._window_sums[k]) for k in keys]))
            sums = dict(zip(keys, totals.tolist(), strict=True))
            count = sums.pop("_count")
            for key, total in sums.items():
                self._metrics[key].append(total / count if count else float("nan"))
            self._window_sums = {}

    # ------------------------------------------------------------------ logging

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        # Trainer's version (OnlineDPO's copy logs `self.stats` and is tied to transformers internals).
        return super(OnlineDPOTrainer, self)._maybe_log_save_evaluate(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._log_steps:
            # Skipped steps add 0 to Trainer's running loss; report the mean over the steps that trained.
            trained = self._log_steps - self._log_skipped
            logs["loss"] = logs["loss"] * self._log_steps / trained if trained else float("nan")
        if "loss" in logs or any(k.startswith("train") for k in logs):
            for key, values in self._metrics.items():
                values = [v for v in values if v == v]
                if values:
                    logs[key] = sum(values) / len(values)
            logs[f"{self._metric_prefix}/skipped_steps"] = self.counts["skipped_steps"]
            logs["beta"] = self.beta
            self._metrics.clear()
            self._log_steps = self._log_skipped = 0
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints and resume

    def _save_checkpoint(self, model, trial):
        if self.args.should_save:  # written first: the parent may push the checkpoint folder to the Hub
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, self._counts_file), "w") as f:
                json.dump(self.counts, f)
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)) and os.path.isfile(os.path.join(checkpoint, self._counts_file)):
            with open(os.path.join(checkpoint, self._counts_file)) as f:
                self.counts.update(json.load(f))
        self._items_log.start(checkpoint if isinstance(checkpoint, (str, os.PathLike)) else None)
        self._buffer, self._micro_step = None, 0
        # From here on the in-memory weights differ from the folder they were loaded from: a later trainer built on
        # this model object must not load that folder as its reference (see `reference_weights_source`).
        # Set even on a model that never had it: its `config._name_or_path` folder holds the old weights too.
        self.accelerator.unwrap_model(self.model).sgpo_weights_path = None
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if not _internal_call:  # the saved folder now holds these weights
            self.accelerator.unwrap_model(self.model).sgpo_weights_path = output_dir or self.args.output_dir

    # ------------------------------------------------------------------ model card

    def training_figures(self) -> dict[str, float]:
        """Item counts so far and the last logged loss metrics, for summaries and the model card."""
        step_keys = ("steps", "skipped_steps")
        figures: dict[str, float] = {
            k if k in step_keys else f"{self._item_name}s_{k}": v for k, v in self.counts.items()
        }
        if self.counts["made"]:
            figures[f"{self._item_name}s_kept_frac"] = self.counts["kept"] / self.counts["made"]
        for entry in reversed(self.state.log_history):
            if "loss" in entry and any(k.startswith("rewards/") or k.startswith("logps/") for k in entry):
                for key, value in entry.items():
                    if key == "loss" or key.startswith(("rewards/", "logps/")):
                        figures[key] = value
                break
        return figures

    def model_card_intro(self) -> str:
        return f"Items made and kept by {self._name} training. Values at the last logged step."

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card (the subclass's tags, name and citation) plus a table of training figures and counts."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        rows = "\n".join(
            f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in self.training_figures().items()
        )
        section = (
            f"\n## {self._name} training figures\n\n{self.model_card_intro()}\n\n| figure | value |\n|---|---|\n"
            + rows
            + "\n"
        )
        with open(os.path.join(self.args.output_dir, "README.md"), "a", encoding="utf-8") as f:
            f.write(section)

    # ------------------------------------------------------------------ evaluation

    def _counted_eval_items(self, n_prompts: int, n_items: int) -> torch.Tensor:
        """Which of this batch's items count in the metrics: not those of the prompts accelerate repeats to even out
        the last batch over the processes (``even_batches``), dropped as ``gather_for_metrics`` drops them. Items are
        made prompt by prompt, the same number for each."""
        state = self.accelerator.gradient_state
        real = n_prompts
        if state.end_of_dataloader and state.remainder > 0:
            # Gathered in process order, the first `remainder` prompts of the last global batch are real.
            real = min(n_prompts, max(0, state.remainder - self.accelerator.process_index * n_prompts))
        per_prompt = n_items // n_prompts if n_prompts else 0
        return torch.arange(n_items) < real * per_prompt

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Make items on the eval prompts and report their loss metrics, keep share and flags (no training).

        OnlineDPO's ``evaluate`` crashes (trl#2464). Loss metrics are means over kept items; ``<prefix>/kept_frac``,
        the flag shares and lengths are over all items.
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
        prefix = self._metric_prefix
        sums: dict[str, float] = defaultdict(float)
        for batch in self.get_eval_dataloader(eval_dataset):
            with self.generation_model() as gen_model:
                items = self.make_items(gen_model, list(batch["prompt"]), batch)
            counted = self._counted_eval_items(len(batch["prompt"]), len(items)).to(items.keep.device)
            local = {f"{prefix}/kept_frac": (items.keep & counted).float().sum(), "_made": counted.float().sum()}
            local.update({f"{prefix}/{k}_frac": (v & counted).float().sum() for k, v in items.flags.items()})
            local.update(
                {f"{prefix}/{k}_length": (s.lengths() * counted).float().sum() for k, s in items.sequences.items()}
            )
            kept = items.select((items.keep & counted).nonzero().flatten().cpu())
            local["_kept"] = torch.tensor(float(len(kept)))
            if len(kept) or self.accelerator.distributed_type != DistributedType.NO:
                # Under ZeRO-3 and FSDP a forward is collective: a process that kept nothing runs a masked filler item
                # (as training does), so every process runs the same forwards; its results are not counted.
                scored = kept if len(kept) else masked_filler(items)
                with torch.no_grad():
                    ref = self.reference_logps(scored)
                    losses, item_metrics = self.item_losses(scored, self._all_logps(model, scored), ref)
                if len(kept):
                    local["loss"] = losses.sum()
                    local.update({k: v.float().sum() for k, v in item_metrics.items()})
            # Key sets may differ between processes (no kept item: no loss metrics), so gather dicts.
            for part in gather_object([{k: float(torch.as_tensor(v)) for k, v in local.items()}]):
                for key, total in part.items():
                    sums[key] += total
        if was_training:
            model.train()
        made, kept = sums.pop("_made"), sums.pop("_kept")
        metrics = {}
        for key, total in sums.items():
            over_all = key.startswith(f"{prefix}/")
            denominator = made if over_all else kept
            metrics[f"{metric_key_prefix}_{key}"] = total / denominator if denominator else float("nan")
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
