"""Run by test_distributed.py under `accelerate launch --num_processes 2 --cpu`: a few SGPO steps on a tiny model.

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


def main(model_dir, out_dir):
    state = PartialState()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompts = [[{"role": "user", "content": f"What is {i} times {i}?"}] for i in range(8)]
    args = SGPOConfig(
        output_dir=os.path.join(out_dir, "run"), per_device_train_batch_size=2, max_steps=2, max_new_tokens=6,
        max_length=128, learning_rate=1e-2, report_to="none", logging_steps=1, save_strategy="no", seed=0,
        gradient_checkpointing=False,
    )
    trainer = SGPOTrainer(model, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)
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
