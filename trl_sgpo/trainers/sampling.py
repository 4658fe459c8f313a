"""Sampling answers from the policy for the on-policy trainers that have a single role (SPPO, SSO)."""

from __future__ import annotations

from accelerate.utils import broadcast_object_list, gather_object
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
    not fit the engine's ``max_model_len`` is an error before anything is sent (``label`` and ``fix`` word it)."""
    budget, limit = params.max_tokens, trainer.vllm_max_model_len()
    longest = max(len(ids) for ids in prompt_ids)
    if longest + budget > limit:
        raise ValueError(
            f"{label} of {longest} tokens plus its {budget}-token budget does not fit vLLM's max_model_len={limit}. "
            + (fix or "Lower `max_new_tokens` or raise `max_length` (the engine is sized from them).")
        )
    if trainer.vllm_mode == "colocate":
        outputs = trainer.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        completion_ids = [list(out.outputs[0].token_ids) for out in outputs]
    else:
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
                generation_kwargs=trainer.args.generation_kwargs,
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
            **(self.args.generation_kwargs or {}),
        )
