"""SGPO and SPPO, each with and without LoRA, on a sharded backend over 2 CPU processes; run by test_sharded.py.

    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml tests/dist_sharded_script.py BACKEND MODEL OUT

BACKEND is zero2, zero3, fsdp1 or fsdp2 (tests/helpers/sharded.py). One launch does every check, since a launch
costs far more than a step on 2 CPU cores. Pairs are scripted by their position in the global window (real generation
still runs, so the sharded generate path is exercised):

- step 1 drops positions 0 and 1: process 0 keeps no pair and runs a zero-weight filler;
- step 2 keeps every pair; a checkpoint is saved after it;
- step 3 drops every pair: the step is skipped everywhere;
- step 4 drops position 2: process 1 keeps one pair.

A second trainer resumes from the step-2 checkpoint and must end with the same weights (not under FSDP1, which saves
sharded on CPU). ``evaluate()`` runs on 4
prompts of which process 0's two give identical pairs (it keeps none). The final save is loaded back by the test. Under
ZeRO-3 without PEFT a second trainer built on the trained model must take pi_t as its reference. Each process writes
what it saw to OUT/<name>.rank<k>.json and its gathered weights to OUT/<name>.rank<k>.pt. SPPO samples its answers
through the real generate from pi_t (the reference engine or the adapter-disabled model); fixed texts replace them.
ZeRO-3 and FSDP2 clip gradients (max_grad_norm=1.0), the others do not.
"""

import json
import os
import sys
import time


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from accelerate import PartialState
from datasets import Dataset
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.sharded import backend_args, full_weights, on_cpu
from trl_sgpo import SGPOConfig, SGPOTrainer, SPPOConfig, SPPOTrainer
from trl_sgpo.trainers.sharding import sharding_evidence


PER_PROCESS = 2
DROPS = {1: {0, 1}, 2: set(), 3: {0, 1, 2, 3}, 4: {2}}
CLIPPED = {"zero3": 1.0, "fsdp2": 1.0}  # one ZeRO and one FSDP backend clip gradients (Trainer's default)
SAME = "(same)"  # an eval prompt whose pair is identical (dropped)


class ScriptedPairs:
    """Drafts "one"; the improved answer is "two two", or "one" (an identical pair, dropped) when scripted so."""

    def __init__(self, trainer, process_index):
        tokenizer = trainer.processing_class
        eos = tokenizer.eos_token_id
        self.one = tokenizer("one", add_special_tokens=False)["input_ids"] + [eos]
        self.two = tokenizer("two two", add_special_tokens=False)["input_ids"] + [eos]
        self.trainer, self.process_index, self.real = trainer, process_index, trainer._sample
        self.decode = tokenizer.batch_decode

    def __call__(self, model, prompt_ids, role):
        if model is not None:
            self.real(model, prompt_ids, role)  # the sharded generate path runs; its text is replaced
        if role == "policy":
            return [list(self.one) for _ in prompt_ids]
        texts = self.decode(prompt_ids)
        drop = DROPS.get(self.trainer.state.global_step + 1, set())
        offset = self.process_index * len(prompt_ids)
        same = [SAME in t if "plus" in t else offset + i in drop for i, t in enumerate(texts)]
        return [list(self.one if s else self.two) for s in same]


def prompts(n, template):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": template.format(i=i)}] for i in range(n)]})


def eval_prompts():
    """Process 0's batch (the first) gives identical pairs only: it keeps no item."""
    rows = [f"What is {i} plus {i}? {SAME if i < PER_PROCESS else ''}".strip() for i in range(2 * PER_PROCESS)]
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": r}] for r in rows]})


def sgpo_args(backend, out, peft, **overrides):
    settings = dict(
        output_dir=out,
        per_device_train_batch_size=PER_PROCESS,
        per_device_eval_batch_size=PER_PROCESS,
        max_steps=4,
        max_new_tokens=3,
        improver_max_new_tokens=3,
        max_length=96,
        optim="adamw_torch",  # FSDP's full optimizer state dict needs a stateful optimizer (SGD has none)
        learning_rate=5e-2 if peft else 1e-2,
        max_grad_norm=CLIPPED.get(backend, 0.0),  # clipping runs on a skipped window too (step 3)
        lr_scheduler_type="constant",
        report_to="none",
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        seed=0,
        gradient_checkpointing=False,
        max_initial_empty_steps=0,
        **backend_args(backend),
    )
    args = SGPOConfig(**{**settings, **overrides})
    on_cpu(backend)
    return args


def sgpo_trainer(args, model_dir, tokenizer, peft, model=None):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0) if peft else None
    trainer = SGPOTrainer(
        model if model is not None else AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=prompts(8 * PER_PROCESS, "What is {i} times {i}?"),
        eval_dataset=eval_prompts(),
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer._sample = ScriptedPairs(trainer, PartialState().process_index)
    return trainer


def run_sgpo(backend, model_dir, out, peft):
    name = f"sgpo_{'lora' if peft else 'full'}"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    started = time.time()
    trainer = sgpo_trainer(sgpo_args(backend, os.path.join(out, name), peft), model_dir, tokenizer, peft)
    state = PartialState()  # the distributed setup is known once the config is built
    result = {"rank": state.process_index, "world": state.num_processes}
    trainer.train()
    result["evidence"] = sharding_evidence(trainer)
    result["pair_counts"] = trainer.pair_counts
    result["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result["grad_norms"] = [h.get("grad_norm") for h in trainer.state.log_history if "loss" in h]
    result["eval"] = trainer.evaluate()
    if backend == "zero3" and not peft:
        result["unsaved_second_round"] = unsaved_second_round(trainer, model_dir, tokenizer)
    final = os.path.join(out, f"{name}-final")
    trainer.save_model(final)
    weights = full_weights(trainer)
    torch.save(weights, os.path.join(out, f"{name}.rank{state.process_index}.pt"))
    if backend == "zero3" and not peft:
        result["second_round"] = second_round_reference(trainer, backend, model_dir, out, tokenizer)

    if backend != "fsdp1":  # FSDP1 saves sharded on CPU (tests/helpers/sharded.py): resume is checked on GPUs
        resumed = sgpo_trainer(sgpo_args(backend, os.path.join(out, name), peft), model_dir, tokenizer, peft)
        resumed.train(resume_from_checkpoint=os.path.join(out, name, "checkpoint-2"))
        result["resumed_pair_counts"] = resumed.pair_counts
        again = full_weights(resumed)
        result["resume_max_diff"] = max((again[k] - weights[k]).abs().max().item() for k in weights)
    result["seconds"] = time.time() - started
    with open(os.path.join(out, f"{name}.rank{state.process_index}.json"), "w") as f:
        json.dump(result, f)


def unsaved_second_round(trainer, model_dir, tokenizer):
    """A trainer built on the trained model before it is saved: no folder holds pi_t, so it must refuse to start
    (rather than load the folder the model came from, pi_0, as its reference)."""
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    try:  # the trainer's own arguments: building new ones would reset the distributed state it still uses
        sgpo_trainer(trainer.args, model_dir, tokenizer, False, model=model)
    except ValueError as e:
        return str(e)
    return None


@torch.no_grad()
def second_round_reference(trainer, backend, model_dir, out, tokenizer):
    """A trainer built on the trained (and saved) model: its reference must be pi_t, the trained policy."""
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    args = sgpo_args(backend, os.path.join(out, "round2"), False, save_strategy="no")
    second = sgpo_trainer(args, model_dir, tokenizer, False, model=model)
    items = second.make_items(None, list(prompts(PER_PROCESS, "What is {i} times {i}?")["prompt"]), {})
    trainer.model_wrapped.eval()
    policy = trainer._all_logps(trainer.model_wrapped, items)
    reference = second.reference_logps(items)
    return {"policy": policy["chosen"].tolist(), "reference": reference["chosen"].tolist()}


class FixedAnswers:
    """Answer j of every prompt is ``texts[j]``, ending with EOS. The real generation runs first (the round's
    reference, pi_t, samples on the sharded backend) and its text is replaced; the calls are recorded."""

    def __init__(self, trainer, texts):
        tokenizer = trainer.processing_class
        self.rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
        self.trainer, self.real, self.calls = trainer, trainer.generate_ids, []

    def __call__(self, model, prompt_ids, **kwargs):
        generated = self.real(model, prompt_ids, **kwargs)
        self.calls.append({"lengths": [len(g) for g in generated], "from_reference": self.is_reference(model)})
        return [list(self.rows[i % len(self.rows)]) for i in range(len(prompt_ids))]

    def is_reference(self, model):
        """pi_t: the frozen copy (not the trained module), or under PEFT the model with every adapter layer off."""
        if self.trainer.ref_model is not None:
            return model is not self.trainer.accelerator.unwrap_model(self.trainer.model_wrapped)
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        return bool(layers) and all(m.disable_adapters for m in layers)


class LengthScores:
    def scores(self, prompts, answers, references=None):
        return [float(len(a)) for a in answers]


def run_sppo(backend, model_dir, out, peft):
    name = f"sppo_{'lora' if peft else 'full'}"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = SPPOConfig(
        output_dir=os.path.join(out, name),
        per_device_train_batch_size=PER_PROCESS,
        max_steps=2,
        max_new_tokens=3,
        max_length=96,
        num_samples=3,
        optim="adamw_torch",
        learning_rate=5e-2 if peft else 1e-2,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        gradient_checkpointing=False,
        **backend_args(backend),
    )
    on_cpu(backend)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0) if peft else None
    trainer = SPPOTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        judge=LengthScores(),
        args=args,
        train_dataset=prompts(4 * PER_PROCESS, "What is {i} minus {i}?"),
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.generate_ids = answers = FixedAnswers(trainer, ["a", "bb bb", "ccc ccc ccc"])
    trainer.train()
    state = PartialState()
    result = {"evidence": sharding_evidence(trainer), "counts": trainer.counts, "generations": answers.calls}
    result["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    with open(os.path.join(out, f"{name}.rank{state.process_index}.json"), "w") as f:
        json.dump(result, f)


def main(backend, model_dir, out, parts):
    for part in parts.split(","):
        if part.startswith("sppo"):
            run_sppo(backend, model_dir, out, peft=part == "sppo_lora")
        else:
            run_sgpo(backend, model_dir, out, peft=part == "sgpo_lora")
    PartialState().destroy_process_group()
    # Every result is written and the group is gone. DeepSpeed's CPU backend can still abort a process during
    # interpreter teardown ("terminate called without an active exception": a native thread left joinable), seen
    # once in a few dozen ZeRO-2 launches after all work had finished; leave without that teardown. A failure
    # before this line still ends the process with its error.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:4], sys.argv[4] if len(sys.argv) > 4 else "sgpo_full,sgpo_lora,sppo_full,sppo_lora")
