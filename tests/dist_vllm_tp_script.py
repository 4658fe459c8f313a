"""vLLM colocate with tensor parallelism 2 over 2 processes, with a stand-in engine; run by test_vllm_seam.py.

Both processes form one tensor-parallel group sharing one engine. Process 0 holds 2 questions, process 1 holds 3
(uneven shares); the stand-in engine answers each prompt with the number of its question, so each process can check
it got its own prompts' answers back. Each process writes what its engine saw and what it got to <out>/rank<k>.json.
"""

import json
import os
import re
import sys
from types import SimpleNamespace


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_sgpo import SGPOConfig, SGPOTrainer


class NumberEcho:
    """A colocated `vllm.LLM` stand-in: answers each prompt with its question's number (the improver: twice)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def generate(self, prompts, params, use_tqdm=False):
        numbers = [
            int(re.search(r"What is (\d+)", self.tokenizer.decode(p["prompt_token_ids"])).group(1)) for p in prompts
        ]
        self.calls.append(numbers)
        texts = [f"{n} {n}" if params.role == "improver" else f"{n}" for n in numbers]
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id] for t in texts]
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=row)]) for row in ids]


def main(model_dir, out_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = SGPOConfig(
        output_dir=os.path.join(out_dir, "run"),
        per_device_train_batch_size=2,
        max_new_tokens=8,
        max_length=128,
        vllm_tensor_parallel_size=2,
        report_to="none",
        save_strategy="no",
    )
    dataset = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(4)]}
    )
    trainer = SGPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    # Switch the built trainer to a stand-in colocated engine (building a real one needs a GPU).
    trainer.use_vllm, trainer.vllm_mode = True, "colocate"
    trainer.vllm_tp_group = trainer.make_vllm_tp_group()
    trainer._last_loaded_step = trainer.state.global_step
    trainer._vllm_sampling_params = lambda role: SimpleNamespace(max_tokens=trainer._max_tokens(role), role=role)
    trainer.llm = NumberEcho(tokenizer)
    rank = PartialState().process_index
    numbers = [10 * rank + i for i in range(2 + rank)]
    prompts = [[{"role": "user", "content": f"What is {n} plus {n}?"}] for n in numbers]
    pairs = trainer.generate_pairs(trainer.model, prompts)
    result = {"numbers": numbers, "engine_calls": trainer.llm.calls, **pairs.texts}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    PartialState().destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
