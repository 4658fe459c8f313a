"""Generation inside the on-policy trainers, with transformers or vLLM: completions for token-id prompts (SGPO), and
:class:`PolicySampler` for the trainers that have a single role (SPPO, SSO)."""

from __future__ import annotations

import torch
from accelerate.utils import broadcast_object_list, gather_object, is_peft_model
from trl.experimental.utils import truncate_right

from .onpolicy import pad_rows


def generate_ids_transformers(trainer, model, prompt_ids: list[list[int]], generation_config) -> list[list[int]]:
    """One completion per prompt with ``model.generate`` (token ids in and out), cut after the first EOS."""
    ids, mask = pad_rows(prompt_ids, trainer._tokenizer.pad_token_id, "left", trainer.accelerator.device)
    output = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation_config)
    completion_ids, completion_mask = truncate_right(
        output[:, ids.size(1) :], trainer.eos_token_ids, trainer._tokenizer.pad_token_id
    )
    return [c[m.bool()].tolist() for c, m in zip(completion_ids, completion_mask, strict=True)]


def generate_ids_vllm(
    trainer, prompt_ids: list[list[int]], params, label: str = "A prompt", fix: str = ""
) -> list[list[int]]:
    """One completion per prompt from the trainer's colocated vLLM engine or its server: token ids in (never text,
    so no second BOS), token ids out, cut after the first EOS. A prompt whose budget (``params.max_tokens``) does
    not fit the engine's ``max_model_len`` is an error before anything is sent (``label`` and ``fix`` word it).

    In colocate mode with tensor parallelism the processes of a group share one engine: the group's prompts are
    gathered, answered at once, and each process keeps its own share (as TRL's ``VLLMGeneration``)."""
    if trainer.vllm_mode == "colocate":
        completion_ids = _colocated_generate(trainer, prompt_ids, params, label, fix)
    else:
        _check_fits(trainer, prompt_ids, params, label, fix)
        all_prompts = gather_object([list(ids) for ids in prompt_ids])
        if trainer.accelerator.is_main_process:
            result = trainer.vllm_client.generate(
                prompts=all_prompts,
                n=1,
                repetition_penalty=params.repetition_penalty,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                min_p=params.min_p,
                max_tokens=params.max_tokens,
                generation_kwargs=trainer.args.vllm_sampling_kwargs,
            )
            completion_ids = result["completion_ids"]
        else:
            completion_ids = [None] * len(all_prompts)
        completion_ids = broadcast_object_list(completion_ids, from_process=0)
        start = trainer.accelerator.process_index * len(prompt_ids)
        completion_ids = completion_ids[start : start + len(prompt_ids)]
    cut = []
    for ids in completion_ids:  # cut at the first EOS, as truncate_right does on the transformers path
        ends = [i for i, t in enumerate(ids) if t in trainer.eos_token_ids]
        cut.append(list(ids[: ends[0] + 1]) if ends else list(ids))
    return cut


def _check_fits(trainer, prompt_ids, params, label, fix) -> None:
    budget, limit = params.max_tokens, trainer.vllm_max_model_len()
    longest = max(len(ids) for ids in prompt_ids)
    if longest + budget > limit:
        raise ValueError(
            f"{label} of {longest} tokens plus its {budget}-token budget does not fit vLLM's max_model_len={limit}. "
            + (fix or "Lower `max_new_tokens` or raise `max_length` (the engine is sized from them).")
        )


def _colocated_generate(trainer, prompt_ids, params, label, fix) -> list[list[int]]:
    group = getattr(trainer, "vllm_tp_group", None)
    if group is None:
        shares = [list(prompt_ids)]
        rank = 0
    else:
        shares = [None] * torch.distributed.get_world_size(group=group)
        torch.distributed.all_gather_object(shares, [list(ids) for ids in prompt_ids], group=group)
        rank = torch.distributed.get_rank(group=group)
    all_prompts = [ids for share in shares for ids in share]
    # Checked over the group's prompts, so every process of the group raises or none does (no one left waiting).
    _check_fits(trainer, all_prompts, params, label, fix)
    if group is not None and is_peft_model(trainer.model) and trainer.accelerator.device.type == "cuda":
        # PEFT's small gradient all-reduce can race with the engine's tensor-parallel NCCL calls and hang generate;
        # TRL drains NCCL with a barrier first (trl#3671).
        torch.distributed.barrier(device_ids=[trainer.accelerator.local_process_index])
    outputs = trainer.llm.generate([{"prompt_token_ids": ids} for ids in all_prompts], params, use_tqdm=False)
    start = sum(len(share) for share in shares[:rank])
    return [list(out.outputs[0].token_ids) for out in outputs[start : start + len(prompt_ids)]]


class PolicySampler:
    """Mixin for an :class:`~trl_sgpo.trainers.onpolicy.OnPolicyTrainer`: one answer per prompt with the trainer's
    generation settings, through transformers or vLLM (colocated or server), token ids in and out.

    Returned answers run up to and including the first EOS, or fill the whole ``max_new_tokens`` budget when there is
    none (an answer cut at the budget, which the trainers never train on).
    """

    def generate_ids(self, model, prompt_ids: list[list[int]]) -> list[list[int]]:
        if self.use_vllm:
            return generate_ids_vllm(self, prompt_ids, self._vllm_sampling_params())
        return generate_ids_transformers(self, model, prompt_ids, self.generation_config)

    def _vllm_sampling_params(self):  # pragma: no cover - needs vLLM (tests replace it)
        from vllm import SamplingParams

        return SamplingParams(
            n=1,
            repetition_penalty=self.repetition_penalty,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=-1 if not self.top_k else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            max_tokens=self.args.max_new_tokens,
            detokenize=False,
            **(self.args.vllm_sampling_kwargs or {}),
        )
