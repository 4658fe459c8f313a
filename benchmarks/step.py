"""Training-step time: SGPOTrainer vs TRL's OnlineDPOTrainer, and the SGPO step broken into its parts.

Both trainers get a fresh copy of the same weights, the same prompts, batch size, ``max_new_tokens`` and
``max_length``, TRL's default ``gradient_checkpointing=True``, fp32 (unless ``--bf16``) and default sampling
(temperature 0.9). OnlineDPO gets a trivial reward function (all zeros). Both are built once in this process, then take
turns, A B A B: a warm-up turn each (``--warmup`` steps, not timed), then ``--rounds`` rounds of ``--steps`` steps of
SGPO followed by ``--steps`` steps of OnlineDPO. Every turn is one ``trainer.train()`` call with
``max_steps=--steps`` (the optimizer persists across calls; each call restarts the data loader, so every turn sees the
same prompt batches), and the global seed is reset to ``seed + round`` before each turn.

A step is the wall time from the ``on_step_begin`` to the ``on_step_end`` callback: ``training_step`` (generation,
log-probs, loss, backward), gradient clipping, ``optimizer.step``, scheduler and ``zero_grad``. Batch loading and
logging fall outside. The parts are timed inside the same steps by wrapping instance attributes:

    policy generation / improver generation   SGPOTrainer._sample, by role (OnlineDPO: _generate)
    policy forward                             SGPO: compute_loss; OnlineDPO: _forward(model, ...)
    policy backward                            accelerator.backward
    reference forward                          SGPO: reference_logps; OnlineDPO: _forward(ref_model, ...)
    optimizer step                             _clip_grad_norm + optimizer.step

This is a cost benchmark: every SGPO pair trains, whatever its validity (a cut answer would otherwise drop its pair
and skip the forward and backward), so the SGPO step always holds the whole work; the share of pairs a real run
would keep is printed beside it.

Per-pair cost with accumulation: a third trainer, SGPO with ``gradient_accumulation_steps=4`` (same batch size), takes
its turns too. It generates the whole window (4 batches) at once; the ratio printed is its step time per pair over
the accumulation-1 step time per pair.

    python benchmarks/step.py            # embedded SmolLM2-135M-Instruct, batch 4, 64 new tokens: ~10 min on 2 cores
    python benchmarks/step.py --tiny     # random tiny model, seconds
    python benchmarks/step.py --device cuda --batch-size 16 --max-new-tokens 128 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict

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
from transformers import PrinterCallback, TrainerCallback, set_seed
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

from trl_sgpo import SGPOConfig, SGPOTrainer


TARGET_STEP_RATIO = 0.5  # SGPO step / OnlineDPO step
TARGET_STEP_OVER_PARTS = 1.1  # SGPO step / sum of its parts
TARGET_PAIR_COST_GA4 = 1.0  # SGPO time per pair, accumulation 4 / accumulation 1
ACCUMULATION = 4

SGPO_PARTS = (
    "policy generation",
    "improver generation",
    "policy forward",
    "policy backward",
    "reference forward",
    "optimizer step",
)
ONLINE_DPO_PARTS = ("generation", "policy forward", "policy backward", "reference forward", "optimizer step")


def zero_reward(completions, **kwargs):
    return [0.0] * len(completions)


class StepRecorder(TrainerCallback):
    """Times each optimizer step and collects the part timings the wrappers add while it runs."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.records: list[dict[str, float]] = []
        self.current: dict[str, float] | None = None
        self._start = self._opt_start = 0.0

    def add(self, key: str, value: float) -> None:
        if self.current is not None:
            self.current[key] += value

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = defaultdict(float)
        self._start = self.clock()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._opt_start = self.clock()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.add("optimizer step", self.clock() - self._opt_start)

    def on_step_end(self, args, state, control, **kwargs):
        record = dict(self.current)
        record["step"] = self.clock() - self._start
        self.records.append(record)
        self.current = None

    def take(self) -> list[dict[str, float]]:
        records, self.records = self.records, []
        return records


def _timed(recorder: StepRecorder, key, fn, after=None):
    """Wrap ``fn``; ``key`` is a part name or a function of the call's arguments returning one."""
    clock = recorder.clock

    def wrapper(*args, **kwargs):
        start = clock()
        out = fn(*args, **kwargs)
        recorder.add(key(*args, **kwargs) if callable(key) else key, clock() - start)
        if after is not None:
            after(out, *args, **kwargs)
        return out

    return wrapper


def instrument(trainer, recorder: StepRecorder, sgpo: bool) -> None:
    """Wrap the trainer's seams (instance attributes) so each step records its parts."""
    if sgpo:

        def count(ids, model, prompt_ids, role):
            recorder.add(f"tokens/{role}", sum(len(r) for r in ids))
            recorder.add(f"width/{role}", max((len(r) for r in ids), default=0))

        trainer._sample = _timed(recorder, lambda model, ids, role: f"{role} generation", trainer._sample, count)
        make_items = trainer.make_items

        def train_every_pair(*args, **kwargs):
            items = make_items(*args, **kwargs)
            recorder.add("pairs", len(items))
            recorder.add("valid pairs", float(items.keep.sum()))
            items.keep = torch.ones_like(items.keep)  # cost benchmark: every pair trains (see the docstring)
            return items

        trainer.make_items = train_every_pair
        trainer.compute_loss = _timed(recorder, "policy forward", trainer.compute_loss)
        trainer.reference_logps = _timed(recorder, "reference forward", trainer.reference_logps)
    else:

        def count(out, *args, **kwargs):
            recorder.add("tokens/generation", float(out[3].sum()))
            recorder.add("width/generation", out[2].size(1))

        trainer._generate = _timed(recorder, "generation", trainer._generate, count)
        ref = trainer.ref_model
        trainer._forward = _timed(
            recorder,
            lambda model, *a, **k: "reference forward" if model is ref else "policy forward",
            trainer._forward,
        )
    trainer.accelerator.backward = _timed(recorder, "policy backward", trainer.accelerator.backward)
    trainer._clip_grad_norm = _timed(recorder, "optimizer step", trainer._clip_grad_norm)
    trainer.training_step = _timed(recorder, "training_step", trainer.training_step)


def run_turn(trainer, steps: int, seed: int) -> None:
    set_seed(seed)
    trainer.args.max_steps = steps
    trainer.train()


def breakdown(records, parts) -> list[tuple[str, float]]:
    rows = [(part, median(r.get(part, 0.0) for r in records)) for part in parts]
    rows.append(("sum of parts", median(sum(r.get(p, 0.0) for p in parts) for r in records)))
    rows.append(
        (
            "training_step outside the parts",
            median(r["training_step"] - sum(r.get(p, 0.0) for p in parts if p != "optimizer step") for r in records),
        )
    )
    rows.append(
        (
            "step outside training_step + optimizer",
            median(r["step"] - r["training_step"] - r.get("optimizer step", 0.0) for r in records),
        )
    )
    rows.append(("step", median(r["step"] for r in records)))
    return rows


def print_breakdown(title: str, records, parts) -> None:
    rows = breakdown(records, parts)
    step = rows[-1][1]
    print(f"\n{title} (median over {len(records)} timed steps, seconds)")
    for name, value in rows:
        print(f"  {name:<42} {value:9.3f}  {100 * value / step:5.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=4, help="per_device_train_batch_size (default: 4)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="(default: 64)")
    parser.add_argument("--max-length", type=int, default=512, help="prompt + completion for log-probs (default: 512)")
    parser.add_argument("--rounds", type=int, default=2, help="timed A B rounds (default: 2)")
    parser.add_argument("--steps", type=int, default=1, help="steps per trainer per round (default: 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per trainer first (default: 1)")
    parser.add_argument("--json", default=None, help="also write every timed step's record to this JSON file")
    args = parser.parse_args()
    setup_threads(args.threads)
    started = time.perf_counter()

    model, tokenizer, name = load_model(args)
    dataset = prompt_dataset(max(ACCUMULATION * args.batch_size * max(args.steps, args.warmup), 8))
    clock = Clock(args.device)
    tmp = tempfile.TemporaryDirectory(prefix="sgpo-bench-step-")

    sgpo = SGPOTrainer(
        fresh_copy(model),
        args=SGPOConfig(**trainer_kwargs(args, f"{tmp.name}/sgpo")),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    sgpo_ga = SGPOTrainer(
        fresh_copy(model),
        args=SGPOConfig(**trainer_kwargs(args, f"{tmp.name}/sgpo-ga", gradient_accumulation_steps=ACCUMULATION)),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    online = OnlineDPOTrainer(
        fresh_copy(model),
        reward_funcs=zero_reward,
        args=OnlineDPOConfig(**trainer_kwargs(args, f"{tmp.name}/online-dpo")),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    del model
    recorders = {}
    turns = (("sgpo", sgpo), ("online", online), ("sgpo_ga", sgpo_ga))
    for key, trainer in turns:
        recorders[key] = StepRecorder(clock)
        trainer.add_callback(recorders[key])
        trainer.remove_callback(PrinterCallback)  # the end-of-train summary each turn would clutter the report
        instrument(trainer, recorders[key], sgpo=key != "online")

    print(machine_line(args, name))
    print(
        f"batch {args.batch_size} prompts | max_new_tokens {args.max_new_tokens} | max_length {args.max_length} | "
        f"gradient_checkpointing True | warm-up {args.warmup} step(s) each, then {args.rounds} rounds x "
        f"{args.steps} step(s) each, A B C A B C in one process (C: SGPO with accumulation {ACCUMULATION})"
    )
    print(
        f"generation KV cache: SGPO {sgpo.generation_config.use_cache}, OnlineDPO {online.generation_config.use_cache}"
    )

    if args.warmup:
        for key, trainer in turns:
            run_turn(trainer, args.warmup, args.seed)
            recorders[key].take()
    records = {key: [] for key, _ in turns}
    print("\nround   SGPO step s   OnlineDPO step s   ratio")
    for r in range(args.rounds):
        for key, trainer in turns:
            run_turn(trainer, args.steps, args.seed + 1 + r)
            records[key] += [{**rec, "round": r} for rec in recorders[key].take()]
        s = median(rec["step"] for rec in records["sgpo"] if rec["round"] == r)
        o = median(rec["step"] for rec in records["online"] if rec["round"] == r)
        print(f"{r + 1:>5}   {s:11.2f}   {o:16.2f}   {s / o:5.2f}")

    print_breakdown("SGPO step", records["sgpo"], SGPO_PARTS)
    print_breakdown("OnlineDPO step", records["online"], ONLINE_DPO_PARTS)
    print_breakdown(f"SGPO step, accumulation {ACCUMULATION}", records["sgpo_ga"], SGPO_PARTS)

    def tokens(recs, role):
        return median(rec.get(f"tokens/{role}", 0) for rec in recs), median(
            rec.get(f"width/{role}", 0) for rec in recs
        )

    print("\ngenerated tokens per step (median: total over rows / decode steps of the batch)")
    for label, recs, role, rows in (
        ("SGPO policy", records["sgpo"], "policy", args.batch_size),
        ("SGPO improver", records["sgpo"], "improver", args.batch_size),
        ("OnlineDPO", records["online"], "generation", 2 * args.batch_size),
    ):
        total, width = tokens(recs, role)
        print(f"  {label:<14} {rows:>3} rows: {total:6.0f} tokens / {width:4.0f} decode steps")

    sgpo_step = median(rec["step"] for rec in records["sgpo"])
    online_step = median(rec["step"] for rec in records["online"])
    step_ratio = sgpo_step / online_step
    over_parts = median(rec["step"] / sum(rec.get(p, 0.0) for p in SGPO_PARTS) for rec in records["sgpo"])
    per_pair = {
        key: median(rec["step"] / max(rec.get("pairs", 0.0), 1.0) for rec in records[key])
        for key in ("sgpo", "sgpo_ga")
    }
    pair_ratio = per_pair["sgpo_ga"] / per_pair["sgpo"]
    valid = sum(rec.get("valid pairs", 0.0) for rec in records["sgpo"]) / max(
        sum(rec.get("pairs", 0.0) for rec in records["sgpo"]), 1.0
    )
    print(
        f"\nSGPO time per pair: accumulation 1 {per_pair['sgpo']:.3f}s, accumulation {ACCUMULATION} "
        f"{per_pair['sgpo_ga']:.3f}s | pairs a real run would keep (EOS within budget, non-empty, changed): "
        f"{100 * valid:.0f}%"
    )
    print("\nratio                                      measured   target   verdict")
    print(
        f"  SGPO step / OnlineDPO step (medians)     {step_ratio:8.2f}   <= {TARGET_STEP_RATIO:<4}  "
        f"{verdict(step_ratio, TARGET_STEP_RATIO)}"
    )
    print(
        f"  SGPO step / sum of its parts (median)    {over_parts:8.2f}   <= {TARGET_STEP_OVER_PARTS:<4}  "
        f"{verdict(over_parts, TARGET_STEP_OVER_PARTS)}"
    )
    print(
        f"  SGPO per pair, accumulation {ACCUMULATION} / 1      {pair_ratio:8.2f}   <= {TARGET_PAIR_COST_GA4:<4}  "
        f"{verdict(pair_ratio, TARGET_PAIR_COST_GA4)}"
    )
    print(
        f"\nwall time {time.perf_counter() - started:.0f}s | peak resident memory {_common.peak_rss_gb():.2f} GB | "
        f"load average at the end: {_common.load_average()}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "records": records}, f, indent=1)
    tmp.cleanup()


# ---------------------------------------------------------------------------------------------- SPPO and SSO steps

TARGET_METHOD_STEP_OVER_PARTS = 1.2  # SPPO / SSO step / sum of its parts
METHOD_PARTS = ("generation", "judge", "policy forward", "policy backward", "reference forward", "optimizer step")


class LengthJudge:
    """Stand-in pointwise judge for the SPPO step (scores = answer length): the judge's own cost is its business;
    what is measured is that the step adds nothing beyond its parts."""

    def scores(self, prompts, answers, references=None):
        return [float(len(a)) for a in answers]


def instrument_method(trainer, recorder: StepRecorder) -> None:
    """Wrap the on-policy base's seams (instance attributes): sampling, judge, log-probs, backward, optimizer."""
    ref = trainer.ref_model
    trainer.generate_ids = _timed(recorder, "generation", trainer.generate_ids)
    if getattr(trainer, "judge", None) is not None:
        trainer.judge.scores = _timed(recorder, "judge", trainer.judge.scores)
    trainer.sequence_logps = _timed(
        recorder,
        lambda model, *a, **k: "reference forward" if model is ref else "policy forward",
        trainer.sequence_logps,
    )
    trainer.accelerator.backward = _timed(recorder, "policy backward", trainer.accelerator.backward)
    trainer._clip_grad_norm = _timed(recorder, "optimizer step", trainer._clip_grad_norm)
    trainer.training_step = _timed(recorder, "training_step", trainer.training_step)


def methods_main(argv=None) -> None:
    """``python benchmarks/step.py --methods [--tiny] ...``: SPPO and SSO steps against the sum of their parts."""
    from trl_sgpo import SPPOConfig, SPPOTrainer, SSOConfig, SSOTrainer

    parser = argparse.ArgumentParser(description="SPPO and SSO steps broken into their parts.")
    parser.add_argument("--methods", action="store_true")
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=4, help="per_device_train_batch_size (default: 4)")
    parser.add_argument("--num-samples", type=int, default=4, help="SPPO answers per prompt (default: 4)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="(default: 64)")
    parser.add_argument("--max-length", type=int, default=768, help="(default: 768; SSO prompts carry a principle)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method first (default: 1)")
    parser.add_argument(
        "--eos-bias",
        type=float,
        default=0.0,
        help="logit bias on EOS while sampling (generate's `sequence_bias`), so that answers finish and the loss "
        "parts run; e.g. 4 with --tiny, whose random answers never end otherwise (default: 0)",
    )
    args = parser.parse_args(argv)
    setup_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer, name = load_model(args)
    dataset = prompt_dataset(max(args.batch_size * (args.steps + args.warmup), 8))
    clock = Clock(args.device)
    tmp = tempfile.TemporaryDirectory(prefix="sgpo-bench-methods-")
    # Nothing kept (answers cut at the budget) still times every part but the loss: never stop on empty steps.
    common = {"max_initial_empty_steps": 0}
    if args.eos_bias:
        common["generation_kwargs"] = {"sequence_bias": {(tokenizer.eos_token_id,): args.eos_bias}}
    trainers = {
        "SPPO": SPPOTrainer(
            fresh_copy(model),
            judge=LengthJudge(),
            args=SPPOConfig(**trainer_kwargs(args, f"{tmp.name}/sppo", num_samples=args.num_samples, **common)),
            train_dataset=dataset,
            processing_class=tokenizer,
        ),
        "SSO": SSOTrainer(
            fresh_copy(model),
            args=SSOConfig(**trainer_kwargs(args, f"{tmp.name}/sso", **common)),
            train_dataset=dataset,
            processing_class=tokenizer,
        ),
    }
    del model
    print(machine_line(args, name))
    print(
        f"batch {args.batch_size} prompts | SPPO K={args.num_samples} | max_new_tokens {args.max_new_tokens} | "
        f"max_length {args.max_length} | gradient_checkpointing True | EOS bias {args.eos_bias} | {args.warmup} "
        f"warm-up + {args.steps} timed steps"
    )
    print("\nratio                                      measured   target   verdict")
    results = {}
    for label, trainer in trainers.items():
        recorder = StepRecorder(clock)
        trainer.add_callback(recorder)
        trainer.remove_callback(PrinterCallback)
        instrument_method(trainer, recorder)
        run_turn(trainer, args.warmup, args.seed)
        recorder.take()
        run_turn(trainer, args.warmup + args.steps, args.seed + 1)  # max_steps counts from the warm-up's end
        records = recorder.take()
        results[label] = records
        over = median(r["step"] / sum(r.get(p, 0.0) for p in METHOD_PARTS) for r in records)
        print(
            f"  {label} step / sum of its parts (median)  {over:8.2f}   <= {TARGET_METHOD_STEP_OVER_PARTS:<4}  "
            f"{verdict(over, TARGET_METHOD_STEP_OVER_PARTS)}   (kept {trainer.counts['kept']} of "
            f"{trainer.counts['made']} {trainer._item_name}s)"
        )
    for label, records in results.items():
        print_breakdown(f"{label} step", records, METHOD_PARTS)
    print(f"\nwall time {time.perf_counter() - started:.0f}s | load average at the end: {_common.load_average()}")
    tmp.cleanup()


if __name__ == "__main__":
    import sys

    if "--methods" in sys.argv:
        methods_main()
    else:
        main()
