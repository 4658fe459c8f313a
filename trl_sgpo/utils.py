"""Small helpers shared by the configs and trainers."""

from __future__ import annotations

import os
import textwrap

import torch


SGPO_PAPER = {
    "title": "SGPO: Self-Generated Preference Optimization based on Self-Improver",
    "id": "2507.20181",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @article{lee2025sgpo,
            title        = {{SGPO: Self-Generated Preference Optimization based on Self-Improver}},
            author       = {Hyeonji Lee and Daejin Jo and Seohwan Yun and Sungwoong Kim},
            year         = 2025,
            eprint       = {arXiv:2507.20181}
        }"""),
}


def bf16_supported() -> bool:
    """Whether an accelerator that trains in bf16 is present. TRL defaults ``bf16=True``, which errors on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(hasattr(torch, "xpu") and torch.xpu.is_available())


def has_accelerator() -> bool:
    """Whether torch sees any accelerator (CUDA, XPU, MPS, ...)."""
    if hasattr(torch, "accelerator"):
        return torch.accelerator.current_accelerator() is not None
    return torch.cuda.is_available()


def apply_cpu_defaults(config) -> None:
    """Defaults that work on a machine without an accelerator, applied before TRL's own ``__post_init__``.

    - An unset ``bf16`` becomes ``True`` only on a bf16-capable accelerator (TRL's ``True`` errors on CPU).
    - ``use_cpu`` is switched on when there is no accelerator at all: the device is the CPU either way, and it is what
      makes transformers set up gloo DDP when several CPU processes are launched.
    """
    if not has_accelerator():
        config.use_cpu = True
    if config.bf16 is None and not config.fp16:
        config.bf16 = bool(bf16_supported() and not config.use_cpu)


def set_cpu_threads(num_threads: int | None = None) -> int | None:
    """On a machine without an accelerator, give torch ``num_threads`` threads (default: the cores this process may
    use, shared among the local processes). Returns the number set, or ``None`` on an accelerator.

    `accelerate launch` without a config exports ``OMP_NUM_THREADS=1`` for a single non-``--cpu`` process, which
    halves a 2-core CPU run; a job that runs on the CPU should use the cores it has.
    """
    if has_accelerator():
        return None
    if num_threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_threads = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if num_threads < 1:
        raise ValueError(f"`num_threads` must be >= 1, got {num_threads}.")
    torch.set_num_threads(num_threads)
    return num_threads


SPPO_PAPER = {
    "title": "Self-Play Preference Optimization for Language Model Alignment",
    "id": "2405.00675",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @article{wu2024sppo,
            title        = {{Self-Play Preference Optimization for Language Model Alignment}},
            author       = {Yue Wu and Zhiqing Sun and Huizhuo Yuan and Kaixuan Ji and Yiming Yang and Quanquan Gu},
            year         = 2024,
            eprint       = {arXiv:2405.00675}
        }"""),
}

SSO_PAPER = {
    "title": "Aligning Large Language Models via Self-Steering Optimization",
    "id": "2410.17131",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @article{xiang2024sso,
            title        = {{Aligning Large Language Models via Self-Steering Optimization}},
            author       = {Hao Xiang and Bowen Yu and Hongyu Lin and Keming Lu and Yaojie Lu and Xianpei Han and Le Sun and Jingren Zhou and Junyang Lin},
            year         = 2024,
            eprint       = {arXiv:2410.17131}
        }"""),
}
