"""SSOTrainer: Self-Steering Optimization (arXiv 2410.17131, version 1), the policy trained on principle-steered pairs."""

from __future__ import annotations

import random
from typing import Any

import torch
from trl.data_utils import is_conversational

from ..templates import render_prompt
from ..utils import SSO_PAPER
from .generation import PolicySampler
from .onpolicy import Items, OnPolicyTrainer, Sequences
from .sso_config import SSOConfig
from .sso_loss import sso_loss
from .sso_principles import load_principles, steer, supports_system_role


# Sequence name -> (prompt, answer): x is the plain prompt, x+ / x- carry the good / bad principle.
SSO_SEQUENCES = {
    "plain_chosen": ("x", "y+"),
    "plain_rejected": ("x", "y-"),
    "good_chosen": ("x+", "y+"),
    "good_rejected": ("x+", "y-"),
    "bad_chosen": ("x-", "yo"),
    "bad_rejected": ("x-", "y+"),
}


class SSOTrainer(PolicySampler, OnPolicyTrainer):
    r"""
    Trainer for Self-Steering Optimization (SSO, [arXiv 2410.17131](https://huggingface.co/papers/2410.17131)),
    paper version 1: the policy itself is trained on its own principle-steered answers, on-policy.

    For each prompt `x` a principle is drawn from the set (shipped in `trl_sgpo/resources/sso_principles.jsonl`, or
    `args.principles_file`); the model answers `x+` (the good principle as system message) with `y+`, `x-` (the bad
    one) with `y-`, and the plain `x` with `y_o`. The loss, against the reference (a frozen copy of the start model,
    or the adapter-disabled model under PEFT), is

        W * [L(x; y+ > y-) + theta * (L(x+; y+ > y-) + L(x-; y_o > y+))],
        W = sigmoid(-(alpha * m(y+) + (1 - alpha) * m(y-)))

    with `L` IPO or DPO on summed log-probs and `m` the policy's mean per-token log-prob under `x` (the gradient flows
    through `W`). See [`~trl_sgpo.trainers.sso_loss`].

    Where this differs from the published versions: version 1's code chooses 2 of 7 features per query with the
    model itself and writes longer principle paragraphs, and its IPO divides log-probs by the answer length; here a
    principle is drawn at random from a fixed set and `L` uses summed log-probs (as TRL's OnlineDPO and SGPO do).
    Version 2 (ACL Findings 2025) trains a separate data generator and is not implemented. The released version-1 code
    (Nov. 2024) weights only the `G` term with `W`; this trainer follows the paper and the Oct. 2024 code (`W`
    weights everything).

    An example trains only when all three answers finished within `max_new_tokens` (`sso/truncated_frac`), none is
    empty (`sso/empty_frac`) and no two of them are identical (`sso/identical_frac`): a pair of equal answers carries
    no preference, and `y_o == y+` would make the bad-principle pair prefer an answer to itself.

    Args:
        model: Model to train (as for [`SGPOTrainer`]).
        ref_model: Reference model. Defaults to a frozen copy of `model`.
        args: An [`SSOConfig`].
        train_dataset: Dataset with a `prompt` column.
        processing_class: Tokenizer. Its chat template must render a system message, unless
            `args.system_role_fallback="user_turn"`.
        **kwargs: The other arguments of [`OnPolicyTrainer`].
    """

    _tag_names = ["trl", "sso"]
    _name = "SSO"
    _paper = SSO_PAPER
    _metric_prefix = "sso"
    _counts_file = "sso_counts.json"
    _item_name = "example"

    def __init__(self, model, ref_model=None, args: SSOConfig | None = None, **kwargs) -> None:
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = SSOConfig(f"{str(name).rstrip('/').split('/')[-1]}-SSO")
        elif not isinstance(args, SSOConfig):
            raise TypeError(f"`args` must be an `SSOConfig`, got {type(args).__name__}.")
        self.principles = load_principles(args.principles_file)
        tokenizer = kwargs.get("processing_class")
        self.principles_in_user_turn = False
        if tokenizer is not None and not supports_system_role(tokenizer):
            if args.system_role_fallback == "error":
                raise ValueError(
                    "SSO steers answers with principles given as system messages, and this tokenizer's chat template "
                    "has no system role (it refuses or drops a system message). Use a model whose template has one, "
                    "or set `system_role_fallback='user_turn'` to put the principle above the user's message instead "
                    "(a deviation from the paper)."
                )
            self.principles_in_user_turn = True
        # Room the principle takes in the prompt, counted before the dataset check (`prompt_room`).
        self._principle_tokens = 0
        if tokenizer is not None:
            longest = max((p.system_message(g) for p in self.principles for g in (True, False)), key=len)
            self._principle_tokens = len(tokenizer(longest, add_special_tokens=False)["input_ids"]) + 16
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        self._rng = random.Random(args.seed + self.accelerator.process_index)

    def prompt_room(self, args) -> int:
        return args.max_length - args.max_new_tokens - self._principle_tokens

    # ------------------------------------------------------------------ items

    def steered_prompts(self, prompt) -> tuple[Any, Any, str]:
        """``(x+, x-, principle name)`` for ``prompt``, with a principle drawn from the set."""
        principle = self._rng.choice(self.principles)
        in_user = self.principles_in_user_turn and is_conversational({"prompt": prompt})
        return (
            steer(prompt, principle.system_message(good=True), in_user_turn=in_user),
            steer(prompt, principle.system_message(good=False), in_user_turn=in_user),
            principle.name,
        )

    def make_items(self, model, prompts: list, inputs: dict[str, Any]) -> Items:
        tokenizer = self._tokenizer
        device = self.accelerator.device
        n = len(prompts)
        good, bad, names = [], [], []
        for prompt in prompts:
            x_good, x_bad, name = self.steered_prompts(prompt)
            good.append(x_good)
            bad.append(x_bad)
            names.append(name)
        prompt_ids = {
            key: self.tokenize_prompts([render_prompt(p, tokenizer) for p in group])
            for key, group in (("x", prompts), ("x+", good), ("x-", bad))
        }
        # One sampling call: rows [x+ ; x- ; x] give y+, y-, y_o.
        completions = self.generate_ids(model, prompt_ids["x+"] + prompt_ids["x-"] + prompt_ids["x"])
        answer_ids = {"y+": completions[:n], "y-": completions[n : 2 * n], "yo": completions[2 * n :]}
        texts = {
            key: [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
            for key, ids in answer_ids.items()
        }

        def per_item(condition) -> torch.Tensor:
            return torch.tensor([condition(i) for i in range(n)], dtype=torch.bool, device=device)

        truncated = per_item(
            lambda i: any(not ids[i] or ids[i][-1] not in self.eos_token_ids for ids in answer_ids.values())
        )
        empty = per_item(lambda i: any(not t[i] for t in texts.values()))
        identical = per_item(lambda i: len({texts["y+"][i], texts["y-"][i], texts["yo"][i]}) < 3) & ~empty
        keep = ~truncated & ~empty & ~identical

        pad = tokenizer.pad_token_id
        sequences = {
            name: Sequences.from_lists(prompt_ids[x], answer_ids[y], pad, device)
            for name, (x, y) in SSO_SEQUENCES.items()
        }
        return Items(
            sequences=sequences,
            keep=keep,
            flags={"truncated": truncated, "empty": empty, "identical": identical},
            texts={"principle": names, "y+": texts["y+"], "y-": texts["y-"], "yo": texts["yo"]},
        )

    def item_losses(self, items: Items, logps: dict[str, torch.Tensor], ref_logps: dict[str, torch.Tensor]):
        def logits(chosen: str, rejected: str) -> torch.Tensor:
            return (logps[chosen] - ref_logps[chosen]) - (logps[rejected] - ref_logps[rejected])

        plain = logits("plain_chosen", "plain_rejected")
        # Lengths count the answer's tokens (EOS included); a filler item has none, hence the clamp.
        mean_chosen = logps["plain_chosen"] / items.sequences["plain_chosen"].lengths().clamp(min=1)
        mean_rejected = logps["plain_rejected"] / items.sequences["plain_rejected"].lengths().clamp(min=1)
        losses, weights = sso_loss(
            plain,
            logits("good_chosen", "good_rejected"),
            logits("bad_chosen", "bad_rejected"),
            mean_chosen,
            mean_rejected,
            beta=self.beta,
            theta=self.args.theta,
            alpha=self.args.alpha,
            loss_type=self.args.loss_type,
        )
        margins = (self.beta * plain).detach()
        metrics = {
            "sso/weight": weights.detach(),
            "rewards/margins": margins,
            "rewards/accuracies": (margins > 0).float(),
            "logps/chosen": logps["plain_chosen"].detach(),
            "logps/rejected": logps["plain_rejected"].detach(),
        }
        return losses, metrics

    def empty_window_hint(self) -> str:
        return (
            super().empty_window_hint()
            + " SSO trains an example only when y+, y- and y_o all finished within `max_new_tokens` and differ from "
            "each other: raise `max_new_tokens` or `temperature`."
        )

    def model_card_intro(self) -> str:
        return (
            f"Examples (y+ under a good principle, y- under the bad one, y_o without) made and trained by SSO "
            f"(loss `{self.args.loss_type}`, beta {self.beta}, theta {self.args.theta}, alpha {self.args.alpha}). "
            "Values at the last logged step."
        )
