"""What the ``trl-sgpo`` subcommands share: the policy model options, and loading the input rows and the model.

Its own module so that :mod:`trl_sgpo.cli`, :mod:`trl_sgpo.improve` and :mod:`trl_sgpo.evaluation.cli` import it
rather than each other.
"""

from __future__ import annotations

import argparse


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The policy model options (``--model``, ``--device``, ``--dtype``) every model-bound command takes."""
    g = p.add_argument_group("policy model")
    g.add_argument(
        "--model",
        default=None,
        help="Policy: Hub id, local folder, or smollm2-135m-instruct (the embedded default, used when unset).",
    )
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on GPU, float32 on CPU.",
    )


def load_input(path):
    """The rows of ``path`` (see :func:`~trl_sgpo.io.jsonl.load_rows`), or the shipped default set when ``None``."""
    from .io.jsonl import load_rows

    if path is None:
        from .data.checks import load_default_dataset

        return load_default_dataset()
    return load_rows(path)


def load_model(name, device: str, dtype: str):
    """Model and tokenizer on ``device``; ``auto`` picks CUDA when present and bfloat16 on it, else CPU and float32."""
    import torch

    from .models import load_model_and_tokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model, tokenizer = load_model_and_tokenizer(name, dtype=getattr(torch, dtype))
    return model.to(device), tokenizer
