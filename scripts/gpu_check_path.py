"""One path of scripts/gpu_check.py: a few SGPO (or SPPO) steps, an evaluation and a save on the embedded default
model.

Run by gpu_check.py under `accelerate launch` (the sharded paths) or plain `python`; writes one JSON object to --out
(main process): ok, seconds, peak GPU memory over the processes, items made and kept, the last loss and eval loss, and
what shows the requested --backend was active (distributed type, ZeRO stage or FSDP version, the parameter elements
held by the process and by the whole model). A backend that was not active (an ignored accelerate config) fails the
path. Without CUDA it runs on CPU (the dry mode of the tests, with a tiny model folder as --model).
"""

import argparse
import json
import os
import tempfile
import time
import traceback


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl_sgpo.trainers.sharding import BACKENDS, backend_mismatch, sharding_evidence


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", required=True, help="Name of the path, for the report.")
    parser.add_argument("--out", required=True, help="JSON file the main process writes.")
    parser.add_argument("--model", default=None, help="Model id or folder (default: the embedded SmolLM2-135M).")
    parser.add_argument("--steps", type=int, default=3)
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true")
    precision.add_argument("--fp16", action="store_true")
    parser.add_argument("--vllm", action="store_true", help="Generate with a colocated vLLM engine.")
    parser.add_argument("--method", choices=["sgpo", "sppo"], default="sgpo", help="SPPO samples from pi_t.")
    parser.add_argument(
        "--backend", choices=list(BACKENDS), default="none", help="The backend the launcher's config must turn on."
    )
    return parser.parse_args(argv)


class LengthScores:
    """SPPO's judge here: longer answers win (the check is about the training path, not the judge)."""

    def scores(self, prompts, answers, references=None):
        return [float(len(a)) for a in answers]


def build_trainer(args, prompts, world):
    from trl_sgpo import DEFAULT_MODEL, SGPOConfig, SGPOTrainer, SPPOConfig, SPPOTrainer

    settings = dict(
        output_dir=tempfile.mkdtemp(prefix=f"gpu-check-{args.path}-"),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=args.steps,
        max_new_tokens=32,
        max_length=384,
        learning_rate=1e-6,
        bf16=args.bf16,
        fp16=args.fp16,
        use_vllm=args.vllm,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.25,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_initial_empty_steps=0,
    )
    data = dict(
        train_dataset=prompts.select(range(8 * world * args.steps)),
        eval_dataset=prompts.select(range(200, 200 + 2 * world)),
    )
    if args.method == "sppo":
        config = SPPOConfig(num_samples=4, **settings)
        return SPPOTrainer(args.model or DEFAULT_MODEL, judge=LengthScores(), args=config, **data)
    return SGPOTrainer(args.model or DEFAULT_MODEL, args=SGPOConfig(**settings), **data)


def train(args) -> dict:
    import torch
    from accelerate import PartialState

    from trl_sgpo.data.checks import load_default_dataset

    prompts = load_default_dataset().select_columns(["prompt"])
    trainer = build_trainer(args, prompts, PartialState().num_processes)
    trainer.train()
    evidence = sharding_evidence(trainer)
    mismatch = backend_mismatch(args.backend, evidence, trainer.accelerator.num_processes)
    if mismatch:
        raise RuntimeError(f"{mismatch} {evidence}")
    metrics = trainer.evaluate()
    trainer.save_model()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "made": trainer.counts["made"],
        "kept": trainer.counts["kept"],
        "last_loss": losses[-1] if losses else None,
        "eval_loss": metrics.get("eval_loss"),
        "cuda": torch.cuda.is_available(),
        "backend": args.backend,
        **evidence,
    }


def peak_gib() -> float | None:
    """Peak GPU memory allocated by torch, the largest over the processes (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    import torch.distributed as dist

    peak = torch.tensor(float(torch.cuda.max_memory_allocated()), device="cuda")
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.item() / 2**30


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    try:
        result = {"ok": True, **train(args)}
    except Exception:  # the report names the failure; the exit status carries it too
        result = {"ok": False, "error": traceback.format_exc(limit=8)}
    result.update(path=args.path, seconds=time.time() - started, peak_gib=peak_gib())
    from accelerate import PartialState

    if PartialState().is_main_process:
        with open(args.out, "w") as f:
            json.dump(result, f)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
