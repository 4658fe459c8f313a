"""Generation throughput: SGPOTrainer's generation path vs a plain cached ``model.generate`` on the same inputs.

The trainer path is what a training step runs for the policy answers: ``trainer._sample(model, prompt_ids,
"policy")`` on the trainer's model, in train mode with TRL's default gradient checkpointing on (the trainer switches
it off around ``generate`` and back on after), including its tokenization of the prompt texts and the cut at the
first EOS. The plain path is ``model.generate(**inputs, generation_config=..., use_cache=True)`` on a separate copy of
the same weights in eval mode, on the prompts tokenized once beforehand, with the same generation settings. Both
decode greedily by default (``do_sample=False``), so they write the same tokens, and tokens/s counts the generated
tokens up to and including each row's first EOS. The two alternate, A B A B: one untimed call each, then ``--rounds``
timed calls each; the ratio is of the median times.

For context it also times TRL's ``OnlineDPOTrainer._generate`` on the same prompts: two completions per prompt
(2 x batch rows) and, with gradient checkpointing on, no KV cache (``--online-dpo-rounds 0`` skips it).

    python benchmarks/generate.py             # embedded SmolLM2-135M-Instruct, batch 4, 64 new tokens: ~1-2 min on 2 cores
    python benchmarks/generate.py --tiny      # random tiny model, seconds
    python benchmarks/generate.py --device cuda --batch-size 32 --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

# _common sets the offline/quiet environment; it must be imported before transformers and trl.
import _common
import torch
from _common import (
    Clock,
    add_common_args,
    fresh_copy,
    load_model,
    machine_line,
    median,
    prompt_dataset,
    setup_threads,
    trainer_kwargs,
    verdict,
)
from transformers import set_seed
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from trl.experimental.utils import truncate_right

from trl_sgpo import SGPOConfig, SGPOTrainer
from trl_sgpo.templates import render_prompt


TARGET = 1.2  # plain cached generate tokens/s / trainer path tokens/s


def zero_reward(completions, **kwargs):
    return [0.0] * len(completions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per generate call (default: 4)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="(default: 64)")
    parser.add_argument("--max-length", type=int, default=512, help="trainer max_length (default: 512)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per path, alternating (default: 3)")
    parser.add_argument(
        "--sample", action="store_true", help="sample (TRL's temperature 0.9, seeded alike per call) instead of greedy"
    )
    parser.add_argument(
        "--online-dpo-rounds", type=int, default=1, help="timed OnlineDPO._generate calls, for context (default: 1)"
    )
    args = parser.parse_args()
    setup_threads(args.threads)
    started = time.perf_counter()

    model, tokenizer, name = load_model(args)
    prompts = prompt_dataset(args.batch_size)["prompt"]
    clock = Clock(args.device)
    tmp = tempfile.TemporaryDirectory(prefix="sgpo-bench-generate-")
    generation_kwargs = None if args.sample else {"do_sample": False}

    # The plain model is copied before a trainer touches the weights or switches gradient checkpointing on.
    plain_model = fresh_copy(model).eval()
    trainer = SGPOTrainer(
        fresh_copy(model),
        args=SGPOConfig(**trainer_kwargs(args, f"{tmp.name}/sgpo", generation_kwargs=generation_kwargs)),
        train_dataset=prompt_dataset(max(args.batch_size, 8)),
        processing_class=tokenizer,
    )
    trainer.model.train()  # as in a training step
    texts = [render_prompt(p, tokenizer) for p in prompts]
    inputs = tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    inputs = inputs.to(args.device)
    plain_config = copy.deepcopy(trainer.generation_config)
    plain_config.use_cache = True

    def trainer_path():
        # What a window's policy generation runs: tokenize once, unwrap once, sample.
        with trainer.generation_model() as model:
            ids = trainer._sample(model, trainer.tokenize_prompts(texts), "policy")
        return ids, sum(len(r) for r in ids)

    @torch.no_grad()
    def plain_path():
        out = plain_model.generate(**inputs, generation_config=plain_config, use_cache=True)
        ids, mask = truncate_right(
            out[:, inputs["input_ids"].size(1) :], trainer.eos_token_ids, tokenizer.pad_token_id
        )
        return [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True)], int(mask.sum())

    def timed(fn, seed):
        set_seed(seed)
        start = clock()
        out = fn()
        return out, clock() - start

    print(machine_line(args, name))
    print(
        f"batch {args.batch_size} prompts | max_new_tokens {args.max_new_tokens} | "
        f"{'sampling (temperature 0.9)' if args.sample else 'greedy'} | trainer: gradient_checkpointing "
        f"{trainer.model.is_gradient_checkpointing}, use_cache {trainer.generation_config.use_cache} | plain: "
        f"use_cache True | 1 warm-up + {args.rounds} timed calls each, A B A B"
    )
    timed(trainer_path, args.seed)
    timed(plain_path, args.seed)
    results = {"trainer": [], "plain": []}
    same = True
    print("\nround   trainer tok/s   plain tok/s   plain/trainer")
    for r in range(args.rounds):
        (ours, n_ours), t_ours = timed(trainer_path, args.seed + 1 + r)
        (plain, n_plain), t_plain = timed(plain_path, args.seed + 1 + r)
        same &= ours == plain
        results["trainer"].append((n_ours, t_ours))
        results["plain"].append((n_plain, t_plain))
        print(
            f"{r + 1:>5}   {n_ours / t_ours:13.1f}   {n_plain / t_plain:11.1f}   {(n_plain / t_plain) / (n_ours / t_ours):13.2f}"
        )

    def rate(key):
        tokens = median(n for n, _ in results[key])
        seconds = median(t for _, t in results[key])
        return tokens, seconds, tokens / seconds

    n_ours, t_ours, r_ours = rate("trainer")
    n_plain, t_plain, r_plain = rate("plain")
    print(
        f"\ntrainer path (SGPOTrainer._sample):  {r_ours:8.1f} tokens/s  ({n_ours:.0f} tokens in {t_ours:.2f}s, median)"
    )
    print(
        f"plain model.generate, KV cache:      {r_plain:8.1f} tokens/s  ({n_plain:.0f} tokens in {t_plain:.2f}s, median)"
    )
    if not args.sample:
        print(f"same generated tokens on both paths: {'yes' if same else 'NO'}")

    if args.online_dpo_rounds > 0:
        online = OnlineDPOTrainer(
            fresh_copy(model),
            reward_funcs=zero_reward,
            args=OnlineDPOConfig(
                **trainer_kwargs(args, f"{tmp.name}/online-dpo", generation_kwargs=generation_kwargs)
            ),
            train_dataset=prompt_dataset(max(args.batch_size, 8)),
            processing_class=tokenizer,
        )
        online.model.train()
        runs = []
        for r in range(args.online_dpo_rounds):
            out, seconds = timed(lambda: online._generate(online.model, prompts), args.seed + 1 + r)
            runs.append((int(out[3].sum()), seconds))
        n_dpo, t_dpo = median(n for n, _ in runs), median(t for _, t in runs)
        print(
            f"OnlineDPOTrainer._generate:          {n_dpo / t_dpo:8.1f} tokens/s  ({n_dpo:.0f} tokens, "
            f"{2 * args.batch_size} rows, in {t_dpo:.2f}s; use_cache {online.generation_config.use_cache}; context only)"
        )
        print(f"  trainer path / OnlineDPO tokens/s: {r_ours / (n_dpo / t_dpo):.2f}x")

    ratio = r_plain / r_ours
    print("\nratio                                          measured   target   verdict")
    print(f"  plain tokens/s / trainer path tokens/s       {ratio:8.2f}   <= {TARGET:<4}  {verdict(ratio, TARGET)}")
    print(f"\nwall time {time.perf_counter() - started:.0f}s | load average at the end: {_common.load_average()}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
