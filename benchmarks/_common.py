"""Helpers shared by ``benchmarks/step.py`` and ``benchmarks/generate.py``.

Import this module before ``transformers``/``trl``: it sets the offline and quiet environment they read at import.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path


# Test helpers (tiny model, OpenAI stub) live under tests/, outside the runtime package.
TESTS_DIR = _Path(__file__).resolve().parents[1] / "tests"
_sys.path.insert(0, str(TESTS_DIR))

import argparse
import copy
import os
import statistics
import time
import warnings


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*do_sample.*")  # greedy configs that keep TRL's temperature

import torch
from datasets import Dataset
from transformers.utils import logging as hf_logging


hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

# Questions that make an instruct model write more than a few dozen tokens, so that generation usually runs to
# `max_new_tokens` and both trainers generate comparable lengths.
QUESTIONS = [
    "Explain how photosynthesis works, step by step.",
    "Describe the water cycle and why it matters for farming.",
    "Why is the sky blue? Give a detailed explanation.",
    "Explain what a hash table is and how collisions are handled.",
    "Give five tips for writing clear technical documentation.",
    "Describe the causes of the French Revolution.",
    "How does a refrigerator keep food cold? Explain the physics.",
    "Explain the difference between weather and climate with examples.",
    "Write a short story about a robot who learns to paint.",
    "Explain how vaccines train the immune system.",
    "Describe how to plan a week of healthy meals on a budget.",
    "Explain recursion to a beginner programmer, with an example.",
    "What are the main differences between renewable and fossil energy?",
    "Describe how a bill becomes a law in a parliament.",
    "Explain how compound interest works, with a worked example.",
    "Give advice to a student preparing for a difficult exam.",
]


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="Random tiny Llama (helpers.tiny) instead of the default.")
    parser.add_argument("--model", default=None, help="Hub id or folder (default: embedded SmolLM2-135M-Instruct).")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--bf16", action="store_true", help="Train in bf16 mixed precision (default: fp32).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice).")
    parser.add_argument("--seed", type=int, default=0)


def setup_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def load_model(args):
    """The base model (on ``args.device``) and its tokenizer, plus a display name."""
    if args.tiny:
        from helpers.tiny import build_tiny_model, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, seed=args.seed)
        name = "tiny random Llama (helpers.tiny)"
    else:
        from trl_sgpo.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(args.model)
        name = args.model or "SmolLM2-135M-Instruct (embedded default)"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(args.device), tokenizer, name


def fresh_copy(model):
    """An independent copy of the weights, so each trainer starts from the same model."""
    return copy.deepcopy(model)


def prompt_dataset(n: int) -> Dataset:
    rows = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in rows]})


def trainer_kwargs(args, output_dir: str, **extra) -> dict:
    """Config arguments both trainers share: TRL's default gradient checkpointing, fp32 unless --bf16, no saving."""
    kwargs = {
        "output_dir": output_dir,
        "per_device_train_batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "max_length": args.max_length,
        "gradient_checkpointing": True,
        "bf16": bool(args.bf16),
        "use_cpu": not args.device.startswith("cuda"),
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 10_000,
        "disable_tqdm": True,
        "seed": args.seed,
        "data_seed": args.seed,
    }
    kwargs.update(extra)
    return kwargs


class Clock:
    """``perf_counter`` that waits for queued CUDA work first, so a GPU interval covers the work it launched."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "MISS"


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (what `/usr/bin/time -v` calls maximum resident set size)."""
    from trl_sgpo.pipeline.memory import peak_rss_gb as peak

    return peak()


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine_line(args, name: str) -> str:
    device = args.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device += f" ({torch.cuda.get_device_name(torch.device(args.device))})"
    return (
        f"model: {name} | device: {device} | {'bf16' if args.bf16 else 'fp32'} | torch threads: "
        f"{torch.get_num_threads()} of {os.cpu_count()} cores | load average: {load_average()}"
    )
