"""Run by test_distributed.py under `accelerate launch` with 2 CPU processes (gloo DDP): a few SGPO steps on a tiny model.

Rank 0 samples for real. Rank 1's improver repeats the policy's answer for one prompt in step 1 and for both in
step 2, so the ranks keep different numbers of pairs (2 vs 1, then 2 vs 0), which OnlineDPO's gathers must survive.
Each rank writes what it ended with (a weight checksum, the pair counts, the logged losses) to <out>/rank<k>.json.
"""

import json
import os
import sys


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_sgpo import SGPOConfig, SGPOTrainer


class RepeatingImprover:
    """Sampler for rank 1: the policy answers `one`; the improver writes `two two`, or repeats `one` (dropped)."""

    def __init__(self, tokenizer):
        eos = tokenizer.eos_token_id
        self.one = tokenizer("one", add_special_tokens=False)["input_ids"] + [eos]
        self.two = tokenizer("two two", add_special_tokens=False)["input_ids"] + [eos]
        self.improver_calls = 0

    def __call__(self, model, prompts_text, role):
        if role == "policy":
            return [list(self.one) for _ in prompts_text]
        self.improver_calls += 1
        repeats = 1 if self.improver_calls == 1 else len(prompts_text)
        return [list(self.one) if i < repeats else list(self.two) for i in range(len(prompts_text))]


def main(model_dir, out_dir):
    state = PartialState()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompts = [[{"role": "user", "content": f"What is {i} times {i}?"}] for i in range(8)]
    args = SGPOConfig(
        output_dir=os.path.join(out_dir, "run"),
        per_device_train_batch_size=2,
        max_steps=2,
        max_new_tokens=6,
        max_length=128,
        learning_rate=1e-2,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        gradient_checkpointing=False,
    )
    trainer = SGPOTrainer(
        model, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer
    )
    if state.process_index == 1:
        trainer._sample = RepeatingImprover(tokenizer)
    start = sum(p.double().sum().item() for p in trainer.model.parameters())
    trainer.train()
    result = {
        "rank": state.process_index,
        "world": state.num_processes,
        "start_checksum": start,
        "checksum": sum(p.double().sum().item() for p in trainer.model.parameters()),
        "pair_counts": trainer.pair_counts,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "kept_frac": [h["sgpo/kept_frac"] for h in trainer.state.log_history if "sgpo/kept_frac" in h],
    }
    with open(os.path.join(out_dir, f"rank{state.process_index}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
