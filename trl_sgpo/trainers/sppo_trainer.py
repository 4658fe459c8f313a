"""SPPOTrainer: Self-Play Preference Optimization (arXiv 2405.00675) with win rates estimated by a judge."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from accelerate.utils import is_peft_model
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from trl.models.utils import unwrap_model_for_generation

from ..templates import question_text, render_prompt
from ..utils import SPPO_PAPER
from .generation import PolicySampler
from .onpolicy import Items, OnPolicyTrainer, Sequences
from .sppo_config import SPPOConfig
from .sppo_loss import estimated_win_rates, judge_win_probabilities, sppo_loss


def deepspeed_gathered(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


class SPPOTrainer(PolicySampler, OnPolicyTrainer):
    r"""
    Trainer for Self-Play Preference Optimization (SPPO, [arXiv 2405.00675](https://huggingface.co/papers/2405.00675)).

    For each prompt the round's starting policy `pi_t` samples `num_samples` (K) answers (`sample_from="reference"`,
    the paper; `"policy"` samples from the policy as it trains). A judge compares them, and each answer gets
    its estimated win rate against the model's own answers, `P_hat(y_i) = mean_k P(y_i beats y_k)` (the answer
    itself included, a tie). Each trained answer regresses its log-ratio to the reference onto
    `(P_hat(y) - 1/2) / beta` (squared loss, sequence-summed log-probs). By default only the best and the worst
    answer of each prompt train (the official code); `train_on="all"` trains every finished answer.

    The reference is the policy at the start of the round (a frozen copy made when the trainer is built, or the
    adapter-disabled model under PEFT). SPPO's iterations are rounds: build a new trainer from the last round's model
    on a new, disjoint share of the prompts ([`~trl_sgpo.pipeline.methods.round_prompts`]); the recipe does this.

    Answers are items: an answer cut at `max_new_tokens` (no EOS) or empty is never trained and takes no part in the
    comparisons (`sppo/truncated_frac`, `sppo/empty_frac`); a prompt with fewer than two finished answers trains
    nothing (`sppo/too_few_frac`), nor does one whose answers all tie (`sppo/tied_frac`, e.g. identical answers) or
    where the judge abstained (`sppo/abstained_frac`). `sppo/not_selected_frac` counts finished answers that are
    neither best nor worst under `train_on="best_worst"`.

    Args:
        model: Model to train (as for [`SGPOTrainer`]).
        judge: Any judge of [`trl_sgpo.evaluation`]: pointwise (`scores(prompts, answers, references=None)`, e.g.
            `RewardModelJudge`, `ReferenceSimilarityJudge`) or pairwise (`judge(prompts, answers_a, answers_b,
            references=None)`, e.g. `OpenAIPairwiseJudge`). A dataset column `reference` is passed to it.
        ref_model: Reference model. Defaults to a frozen copy of `model` (the round's start).
        args: An [`SPPOConfig`].
        train_dataset: Dataset with a `prompt` column (and `reference` for judges that need one).
        processing_class: Tokenizer.
        **kwargs: The other arguments of [`OnPolicyTrainer`].
    """

    _tag_names = ["trl", "sppo"]
    _name = "SPPO"
    _paper = SPPO_PAPER
    _metric_prefix = "sppo"
    _counts_file = "sppo_counts.json"
    _item_name = "answer"
    _kept_only_values = ("target",)  # items.jsonl: a dropped answer has no target

    def __init__(self, model, judge=None, ref_model=None, args: SPPOConfig | None = None, **kwargs) -> None:
        if judge is None:
            raise ValueError(
                "SPPOTrainer needs a `judge` to estimate win rates: a pointwise judge (e.g. "
                "`trl_sgpo.evaluation.RewardModelJudge`, or `ReferenceSimilarityJudge` for prompts with references) "
                "or a pairwise one (`OpenAIPairwiseJudge`)."
            )
        if not (hasattr(judge, "scores") or hasattr(judge, "judge")):
            raise TypeError(
                f"`judge` must have a `scores(prompts, answers, references=None)` or a `judge(prompts, answers_a, "
                f"answers_b, references=None)` method, got {type(judge).__name__}."
            )
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = SPPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-SPPO")
        elif not isinstance(args, SPPOConfig):
            raise TypeError(f"`args` must be an `SPPOConfig`, got {type(args).__name__}.")
        self.judge = judge
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)

    # ------------------------------------------------------------------ items

    @contextmanager
    def generation_model(self):
        """The model answers are sampled from: by default ``pi_t``, the reference (the round's start)."""
        if self.args.sample_from == "policy" or self.use_vllm:
            with super().generation_model() as model:
                yield model
        elif self.ref_model is None:  # PEFT: pi_t is the model with its adapter disabled
            with super().generation_model() as model, model.disable_adapter():
                yield model
        else:
            with (
                unwrap_model_for_generation(
                    self.ref_model, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation
                ) as model,
                torch.no_grad(),
                FSDP.summon_full_params(self.ref_model, recurse=False) if self.is_fsdp_enabled else nullcontext(),
            ):
                yield model

    def _vllm_needs_weights(self) -> bool:
        if self.args.sample_from == "policy":
            return super()._vllm_needs_weights()
        # The engine keeps pi_t: pushed once, before this process first samples. On a run resumed mid-round that is
        # a step > 0, and the engine (a server in particular) holds no weights of this round yet.
        return self._last_loaded_step < 0

    def _load_vllm_weights(self) -> None:
        if self.args.sample_from == "policy":
            return super()._load_vllm_weights()
        # pi_t is the reference, not the policy (which has moved on from it on a resumed run).
        if self.vllm_mode == "server" and self.accelerator.is_main_process:
            with self.vllm_client.weight_update():
                self._push_reference_to_vllm()
            self.vllm_client.reset_prefix_cache()
        else:
            self._push_reference_to_vllm()
            if self.vllm_mode == "colocate":
                self.llm.reset_prefix_cache()

    def _push_reference_to_vllm(self) -> None:
        """The reference's weights into the engine: the frozen copy, or under PEFT the base weights (no adapter)."""
        module = self.ref_model if self.ref_model is not None else self.model
        if self.is_fsdp_enabled:  # TRL's FSDP syncs take the module to push
            if self.accelerator.state.fsdp_plugin.fsdp_version == 1:
                return self._sync_fsdp1_params_to_vllm(module)
            return self._sync_fsdp2_params_to_vllm(module)  # under PEFT: skips the adapter, keeps the base weights
        module = self.accelerator.unwrap_model(module)  # ZeRO-3's reference is a DeepSpeed engine
        plugin = self.accelerator.state.deepspeed_plugin
        zero3 = plugin is not None and plugin.zero_stage == 3
        peft = is_peft_model(module)
        for name, param in module.named_parameters():
            if peft and (module.prefix in name or "modules_to_save" in name):
                continue  # trained parts: pi_t is the base model (its `original_module` copies)
            name = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")
            name = self._fix_param_name_to_vllm(name)
            with deepspeed_gathered([param]) if zero3 else nullcontext():
                if self.vllm_mode == "colocate":
                    llm_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
                    llm_model.load_weights([(name, param.data)])
                elif self.accelerator.is_main_process:
                    self.vllm_client.update_named_param(name, param.data)

    def make_items(self, model, prompts: list, inputs: dict[str, Any]) -> Items:
        k = self.args.num_samples
        tokenizer = self._tokenizer
        device = self.accelerator.device
        prompt_ids = self.tokenize_prompts([render_prompt(p, tokenizer) for p in prompts])
        # Answer j of prompt i is row i * K + j.
        repeated = [ids for ids in prompt_ids for _ in range(k)]
        completion_ids = self.generate_ids(model, repeated)
        answers = [t.strip() for t in tokenizer.batch_decode(completion_ids, skip_special_tokens=True)]
        finished = [bool(ids) and ids[-1] in self.eos_token_ids for ids in completion_ids]
        empty = [not a for a in answers]

        n = len(repeated)
        flags = {name: torch.zeros(n, dtype=torch.bool) for name in ("truncated", "empty", "too_few", "tied")}
        flags["abstained"] = torch.zeros(n, dtype=torch.bool)
        flags["not_selected"] = torch.zeros(n, dtype=torch.bool)
        keep = torch.zeros(n, dtype=torch.bool)
        win_rate = torch.full((n,), float("nan"))
        target = torch.zeros(n)

        groups: list[list[int]] = []  # rows of the finished, non-empty answers of each prompt
        for i in range(len(prompts)):
            rows = []
            for row in range(i * k, (i + 1) * k):
                if not finished[row]:
                    flags["truncated"][row] = True
                elif empty[row]:
                    flags["empty"][row] = True
                else:
                    rows.append(row)
            groups.append(rows)

        judged = [i for i, rows in enumerate(groups) if len(rows) >= 2]
        for rows in groups:
            if len(rows) < 2:
                flags["too_few"][rows] = True
        references = inputs.get("reference")
        matrices = judge_win_probabilities(
            self.judge,
            [question_text(prompts[i]) for i in judged],
            [[answers[row] for row in groups[i]] for i in judged],
            [references[i] for i in judged] if references is not None else None,
            batch_size=self.args.judge_batch_size,
        )
        for i, matrix in zip(judged, matrices, strict=True):
            rows = torch.tensor(groups[i])
            if torch.isnan(matrix).any():
                flags["abstained"][rows] = True
                continue
            rates = estimated_win_rates(matrix)
            win_rate[rows] = rates
            if rates.max() == rates.min():  # no answer is preferred: nothing to learn
                flags["tied"][rows] = True
                continue
            if self.args.train_on == "all":
                keep[rows] = True
                target[rows] = rates
                continue
            best, worst = rows[rates.argmax()], rows[rates.argmin()]
            keep[best] = keep[worst] = True
            hard = self.args.loss_type == "sppo_hard"
            target[best] = 1.0 if hard else rates.max()
            target[worst] = 0.0 if hard else rates.min()
            flags["not_selected"][rows] = ~keep[rows]

        sequences = {"completion": Sequences.from_lists(repeated, completion_ids, tokenizer.pad_token_id, device)}
        return Items(
            sequences=sequences,
            keep=keep.to(device),
            flags={name: flag.to(device) for name, flag in flags.items()},
            values={"target": target.to(device), "win_rate": win_rate.to(device)},
            texts={"completion": answers},
        )

    def item_losses(self, items: Items, logps: dict[str, torch.Tensor], ref_logps: dict[str, torch.Tensor]):
        policy, ref = logps["completion"], ref_logps["completion"]
        target = items.values["target"]
        losses = sppo_loss(policy, ref, target, self.beta)
        metrics = {
            "logps/completion": policy.detach(),
            "sppo/log_ratio": (policy - ref).detach(),
            "sppo/target_log_ratio": (target - 0.5) / self.beta,
            "sppo/target_win_rate": target,
        }
        return losses, metrics

    def empty_window_hint(self) -> str:
        return (
            super().empty_window_hint()
            + " SPPO trains an answer only when it finished within `max_new_tokens` and the judge prefers some of a "
            "prompt's finished answers to others: raise `max_new_tokens`, raise `temperature` (identical answers "
            "tie), or check the judge."
        )

    def model_card_intro(self) -> str:
        return (
            f"Answers sampled ({self.args.num_samples} per prompt) and trained by SPPO (train_on="
            f"`{self.args.train_on}`, loss `{self.args.loss_type}`, beta {self.beta}). Values at the last logged step."
        )
