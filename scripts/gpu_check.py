"""Run every GPU path of trl-sgpo for a few steps and print one table: path, ok/failed, seconds, peak GPU memory.

Usage, on a machine with CUDA (one GPU is enough; every GPU is used by the sharded paths):

    pip install -e '.[test,demo,vllm,deepspeed]'
    scripts/gpu_check.sh                      # every path: bf16, fp16, zero3, fsdp2, vllm_colocate, sppo_*
    scripts/gpu_check.sh --paths zero3 fsdp2  # some of them
    scripts/gpu_check.sh --dry-run            # print each path's command and run nothing (any machine)

Each path trains SGPO (the sppo_* paths: SPPO, sampling from pi_t) for 3 optimizer steps on the embedded default
model (SmolLM2-135M-Instruct, converted from its GGUF, no download), evaluates it and saves it
(scripts/gpu_check_path.py), in its own process under its launcher: plain python for bf16, fp16 and vLLM colocate;
`accelerate launch` with recipes/accelerate/deepspeed_zero3.yaml or fsdp.yaml, one process per GPU, for ZeRO-3 and
FSDP2 (a path fails when its backend was not active, e.g. the config was ignored). The whole run takes under 10
minutes on one H100 (each path is stopped after --timeout seconds, 240 by default). The exit status is 1 when any
path failed; the failures' tracebacks follow the table. Peak memory is torch's `max_memory_allocated`, the largest
over the processes (vLLM's own pool, set by `vllm_gpu_memory_utilization`, is not in it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "scripts" / "gpu_check_path.py"
ACCELERATE = ROOT / "recipes" / "accelerate"
# name: (accelerate config for a sharded run, or None for one plain process; the worker's flags)
PATHS: dict[str, tuple[str | None, list[str]]] = {
    "bf16": (None, ["--bf16"]),
    "fp16": (None, ["--fp16"]),
    "zero3": ("deepspeed_zero3.yaml", ["--bf16", "--backend", "zero3"]),
    "fsdp2": ("fsdp.yaml", ["--bf16", "--backend", "fsdp2"]),
    "vllm_colocate": (None, ["--bf16", "--vllm"]),
    # SPPO samples from pi_t: through the ZeRO-3 reference engine, and pushed to vLLM as the reference's weights.
    "sppo_zero3": ("deepspeed_zero3.yaml", ["--bf16", "--backend", "zero3", "--method", "sppo"]),
    "sppo_vllm_colocate": (None, ["--bf16", "--vllm", "--method", "sppo"]),
}


@dataclass
class Row:
    path: str
    ok: bool
    seconds: float
    peak_gib: float | None = None
    error: str = ""


def command(path: str, out: str, gpus: int, port: int = 29650) -> list[str]:
    """The command line that runs ``path`` and writes its JSON result to ``out``."""
    config, flags = PATHS[path]
    worker = [str(WORKER), "--path", path, "--out", out, *flags]
    if config is None:
        return [sys.executable, *worker]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / config)]
    return [*launch, "--num_processes", str(gpus), "--main_process_port", str(port), *worker]


def run_path(path: str, gpus: int, timeout: float) -> Row:
    out = os.path.join(tempfile.mkdtemp(prefix="gpu-check-"), f"{path}.json")
    started = time.time()
    try:
        proc = subprocess.run(command(path, out, gpus), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Row(path, False, time.time() - started, error=f"timed out after {timeout:.0f} s")
    seconds = time.time() - started
    if not os.path.isfile(out):
        return Row(path, False, seconds, error=f"exit status {proc.returncode}\n{proc.stderr[-3000:]}")
    result = json.loads(Path(out).read_text())
    ok = result["ok"] and proc.returncode == 0
    error = result.get("error", "") or ("" if ok else proc.stderr[-3000:])
    return Row(path, ok, seconds, result.get("peak_gib"), error)


def format_table(rows: list[Row]) -> str:
    """One line per path: name, ok/failed, wall seconds (launch included), peak GPU memory in GiB."""
    header = ("path", "result", "seconds", "peak GPU memory")
    cells = [
        (
            r.path,
            "ok" if r.ok else "failed",
            f"{r.seconds:.0f}",
            "-" if r.peak_gib is None else f"{r.peak_gib:.1f} GiB",
        )
        for r in rows
    ]
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(str(c[i]).ljust(widths[i]) for i in range(len(header))).rstrip() for c in [header, *cells]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS), help="Paths to run.")
    parser.add_argument("--timeout", type=float, default=240.0, help="Seconds one path may take.")
    parser.add_argument("--dry-run", action="store_true", help="Print each path's command; run nothing.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    gpus = torch.cuda.device_count()
    if args.dry_run:
        for path in args.paths:
            print(f"{path}: {' '.join(command(path, f'<tmp>/{path}.json', max(gpus, 1)))}")
        return 0
    if gpus == 0:
        print("No CUDA device: this check needs a GPU (`--dry-run` prints the commands).", file=sys.stderr)
        return 2
    rows = []
    for path in args.paths:
        rows.append(run_path(path, gpus, args.timeout))
        print(f"{path}: {'ok' if rows[-1].ok else 'failed'} ({rows[-1].seconds:.0f} s)", flush=True)
    print()
    print(format_table(rows))
    for row in rows:
        if not row.ok:
            print(f"\n--- {row.path} ---\n{row.error}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
