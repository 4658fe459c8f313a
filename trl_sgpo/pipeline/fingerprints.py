"""What each stage's output depends on: the fields of the configuration it runs with, minus a documented list.

A stage's fingerprint (its ``settings`` in ``stage.json``, compared when the run is repeated) holds every field of the
dataclasses it is made from (``SGPOConfig`` with the ``TrainingArguments`` under it, the ``ImproverSFTConfig`` the
recipe builds, ``trl.ModelConfig``, :class:`~trl_sgpo.pipeline.SGPOScriptArguments`) except those listed in
:data:`OUTPUT_NEUTRAL`. A field added to any of them (by a new TRL or transformers release, or a new recipe setting) is
thus part of every fingerprint until someone lists it here: a rerun refuses a folder made with another value rather
than reuse outputs that may not match.

Recipe settings belong to the first stage whose output they change (:data:`SCRIPT_SETTINGS`); later stages hold them
too (a stage's fingerprint includes the one it is made from, see :class:`~trl_sgpo.pipeline.stages.Stage`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .stages import TRAINING_STAGES


OUTPUT_NEUTRAL = frozenset(
    {
        # where outputs go, what is logged and saved, what is pushed
        "output_dir",
        "run_name",
        "project",
        "report_to",
        "trackio_space_id",
        "trackio_bucket_id",
        "trackio_static_space_id",
        "log_level",
        "log_level_replica",
        "log_on_each_node",
        "logging_steps",
        "logging_strategy",
        "logging_first_step",
        "logging_nan_inf_filter",
        "disable_tqdm",
        "skip_memory_metrics",
        "include_num_input_tokens_seen",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "save_only_model",
        "save_on_each_node",
        "enable_jit_checkpoint",
        "resume_from_checkpoint",
        "restore_callback_states_from_checkpoint",
        "push_to_hub",
        "hub_model_id",
        "hub_strategy",
        "hub_token",
        "hub_private_repo",
        "hub_always_push",
        "hub_revision",
        "log_items",  # writes items.jsonl beside the round; what trains is the same
        # evaluation (the recipe trains only)
        "do_train",
        "do_eval",
        "do_predict",
        "eval_strategy",
        "eval_steps",
        "eval_delay",
        "eval_on_start",
        "eval_accumulation_steps",
        "eval_do_concat_batches",
        "eval_use_gather_object",
        "per_device_eval_batch_size",
        "batch_eval_metrics",
        "include_for_metrics",
        "prediction_loss_only",
        "metric_for_best_model",
        "greater_is_better",
        "load_best_model_at_end",
        "bf16_full_eval",
        "fp16_full_eval",
        # where and how fast it runs, not what it computes
        "local_rank",
        "use_cpu",
        "debug",
        "ddp_backend",
        "ddp_timeout",
        "ddp_broadcast_buffers",
        "ddp_bucket_cap_mb",
        "ddp_find_unused_parameters",
        "ddp_static_graph",
        "deepspeed",
        "fsdp",
        "fsdp_config",
        "parallelism_config",
        "dataloader_num_workers",
        "dataloader_pin_memory",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "dataloader_multiprocessing_context",
        "dataset_num_proc",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "activation_checkpointing",
        "activation_checkpointing_kwargs",
        "activation_offloading",
        "torch_compile",
        "torch_compile_backend",
        "torch_compile_mode",
        "torch_empty_cache_steps",
        "tf32",
        "use_liger_kernel",
        "liger_kernel_config",
        "attn_implementation",
        "ds3_gather_for_generation",
        "cache_implementation",
        "vllm_mode",
        "vllm_model_impl",
        "vllm_server_base_url",
        "vllm_server_host",
        "vllm_server_port",
        "vllm_server_timeout",
        "vllm_group_port",
        "vllm_gpu_memory_utilization",
        "vllm_enable_sleep_mode",
        "vllm_tensor_parallel_size",
        # recipe settings that steer the run, not a stage's result
        "stop_after",
        "iterations",
        "num_threads",
        "limit_heap_fragmentation",
        "api_key_env",
        "max_concurrency",
        "request_timeout",
        # the evaluation stage: it runs after training on rows training never saw, and records its own settings
        "judge_model",
        "judge_price_in",
        "judge_price_out",
        "eval_max_new_tokens",
        "eval_improver",
    }
)
"""Settings that change no stage's output: where outputs go, logging, saving and pushing, evaluation, the device,
the parallelism and speed settings. Every other field of the configuration dataclasses is in the fingerprints."""

SCRIPT_SETTINGS = {
    "dataset_name": "sample",
    "dataset_config": "sample",
    "dataset_split": "sample",
    "reference_column": "sample",
    "num_eval_prompts": "sample",  # the held-out rows are drawn first: their number changes every split
    "num_improver_prompts": "sample",
    "sample_batch_size": "sample",  # which rows share a batch, hence its sampling seed
    "base_url": "targets",
    "writer_model": "targets",
    "step_fraction": "targets",
    "ppl_max_ratio": "filter",
    "improver_sft": "filter",  # recorded as IMPROVER_SFT_SETTINGS, each from its own stage on
    "improver_data": "improver_sft",
    "skip_improver_sft": "improver_sft",
    "num_sgpo_prompts": "sgpo",
}
"""The first stage each recipe setting (:class:`~trl_sgpo.pipeline.SGPOScriptArguments`) changes. A setting that is
neither here nor in :data:`OUTPUT_NEUTRAL` is in every stage's fingerprint."""

IMPROVER_SFT_SETTINGS = {
    "max_length": ("improver_sft_max_length", "filter"),  # the filter scores rows truncated to this length
    "num_train_epochs": ("improver_sft_epochs", "improver_sft"),
    "learning_rate": ("improver_sft_learning_rate", "improver_sft"),
    "per_device_train_batch_size": ("improver_sft_batch_size", "improver_sft"),
    "gradient_accumulation_steps": ("improver_sft_gradient_accumulation_steps", "improver_sft"),
}
"""Keys of the recipe's ``improver_sft`` section recorded in the recipe settings, as ``{key: (name, stage)}``. The
improver-SFT stage records its whole ``ImproverSFTConfig`` as well (``improver_sft.<field>``); these names keep the
stage folders of runs made before the section existed valid, and place ``max_length`` in the filter stage."""

SAMPLING_SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")
"""The ``SGPOConfig`` fields stage 1 samples with (so that its answers come from SGPO's own policy distribution)."""

LORA_SETTINGS_PREFIXES = ("lora_", "use_rslora", "use_dora")
"""``ModelConfig`` fields that only matter with ``use_peft``; left out of the fingerprints of runs without LoRA."""


def fingerprint(config, prefix: str = "", neutral: frozenset[str] = OUTPUT_NEUTRAL) -> dict[str, Any]:
    """Every field of the dataclass ``config`` but the ``neutral`` ones, as ``{prefix + name: value}``."""
    return {prefix + f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in neutral}


def script_fingerprint(script_args, stage: str) -> dict[str, Any]:
    """The recipe settings that change ``stage``'s output or that of a stage before it."""
    upto = TRAINING_STAGES[: TRAINING_STAGES.index(stage) + 1]
    settings = fingerprint(script_args)
    placed = dict(SCRIPT_SETTINGS)
    section = settings.pop("improver_sft", None) or {}
    for key, (name, first) in IMPROVER_SFT_SETTINGS.items():
        if key in section:
            settings[name], placed[name] = section[key], first
    return {
        name: value
        for name, value in settings.items()
        if placed.get(name, stage) in upto  # unlisted: in every stage
    }


def model_fingerprint(model_args, model_name: str, with_lora: bool) -> dict[str, Any]:
    """The ``ModelConfig`` settings; LoRA's only for stages that train (``with_lora``) and only when ``use_peft``."""
    settings = fingerprint(model_args)
    settings["model_name_or_path"] = model_name  # None means the embedded default
    lora = [k for k in settings if k == "use_peft" or k.startswith(LORA_SETTINGS_PREFIXES)]
    for key in lora:
        if not with_lora or (key != "use_peft" and not model_args.use_peft):
            del settings[key]
    return settings
