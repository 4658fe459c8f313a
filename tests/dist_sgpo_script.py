"""A few SGPO steps on a tiny model with scripted pairs; run by test_distributed.py in 1 and in 2 processes.

Under `accelerate launch` with 2 CPU processes (gloo DDP) each process gets half of each 4-prompt window; alone, one
process gets the whole window. The scripted sampler decides which pairs are dropped by their position in the global
window, so both runs train on the same pairs:

- step 1 drops position 1: process 0 keeps 1 pair, process 1 keeps 2;
- step 2 drops positions 0 and 1: process 0 keeps none (it runs a zero-gradient filler), process 1 keeps 2;
- step 3 drops every pair: the step is skipped everywhere.

Then ``evaluate()`` runs on 3 prompts, 2 a process: on 2 processes accelerate repeats prompt 0 to fill process 1's
batch, and the metrics must not count it. Prompt 0 gives an identical pair (dropped), so counting it twice would
show in the shares.

Each process writes what it ended with (its weights, pair counts, logged losses, eval metrics) to
<out>/rank<k>.json/.pt.
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


WINDOW = 4
SAME = "(same)"  # an eval prompt whose pair is identical
DROPS = {1: {1}, 2: {0, 1}, 3: {0, 1, 2, 3}}


class ScriptedByGlobalPosition:
    def __init__(self, tokenizer, process_index):
        eos = tokenizer.eos_token_id
        self.one = tokenizer("one", add_special_tokens=False)["input_ids"] + [eos]
        self.two = tokenizer("two two", add_special_tokens=False)["input_ids"] + [eos]
        self.process_index, self.window, self.decode = process_index, 0, tokenizer.batch_decode

    def __call__(self, model, prompt_ids, role):
        if role == "policy":
            self.window += 1
            return [list(self.one) for _ in prompt_ids]
        offset = self.process_index * len(prompt_ids)
        drop = DROPS.get(self.window, set())
        same = [offset + i in drop or SAME in text for i, text in enumerate(self.decode(prompt_ids))]
        return [list(self.one if s else self.two) for s in same]


def main(model_dir, out_dir):
    world = int(os.environ.get("WORLD_SIZE", "1"))  # PartialState learns the CPU setup only once the config is built
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompts = [[{"role": "user", "content": f"What is {i} times {i}?"}] for i in range(3 * WINDOW)]
    eval_prompts = [[{"role": "user", "content": f"What is {i} plus {i}? {SAME if i == 0 else ''}"}] for i in range(3)]
    args = SGPOConfig(
        output_dir=os.path.join(out_dir, "run"),
        per_device_train_batch_size=WINDOW // world,
        per_device_eval_batch_size=2,
        max_steps=3,
        max_new_tokens=6,
        max_length=128,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        gradient_checkpointing=False,
    )
    trainer = SGPOTrainer(
        model, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer
    )
    state = PartialState()
    trainer._sample = ScriptedByGlobalPosition(tokenizer, state.process_index)
    trainer.train()
    weights = {n: p.detach().cpu() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
    torch.save(weights, os.path.join(out_dir, f"rank{state.process_index}.pt"))
    result = {
        "rank": state.process_index,
        "world": state.num_processes,
        "pair_counts": trainer.pair_counts,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    result["eval"] = trainer.evaluate(Dataset.from_dict({"prompt": eval_prompts}))
    with open(os.path.join(out_dir, f"rank{state.process_index}.json"), "w") as f:
        json.dump(result, f)
    # As the recipes do: a gloo group still alive at interpreter exit can abort a rank during teardown
    # ("terminate called without an active exception"), after its work is done.
    state.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
