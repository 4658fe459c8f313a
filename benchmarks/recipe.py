"""The recipe end to end: wall time and peak resident memory per stage, against the demo's targets.

Runs ``recipes/sgpo.py`` in this process with the given recipe arguments (default: a bare run, i.e. the demo on the
embedded SmolLM2-135M-Instruct) and prints each stage's seconds and peak resident memory (``peak_rss_gb``: this
process's ``VmHWM``, reset when the stage starts) with the finished fractions of the generations. Targets of a bare
run on 2 CPU cores: under 20 minutes and under 3 GB.

    nice python benchmarks/recipe.py --output_dir /tmp/sgpo-bench
    python benchmarks/recipe.py --output_dir /tmp/sgpo-bench --config recipes/configs/sgpo_smollm2.yaml

Stages found finished in ``--output_dir`` report the figures of the run that made them; use a fresh folder.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import _common


TARGET_SECONDS = 20 * 60
TARGET_PEAK_GB = 3.0
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sgpo.py"


def main(argv: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("sgpo_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    started = time.perf_counter()
    summary = recipe.main(*recipe.parse_args(argv))
    wall = time.perf_counter() - started

    print(f"\nrecipe args: {' '.join(argv) or '(none: the demo)'} | load average at the end: {_common.load_average()}")
    print(f"{'stage':<14} {'seconds':>8} {'peak RSS GB':>12}")
    for name, stage in summary["stages"].items():
        print(f"{name:<14} {stage.get('seconds', float('nan')):8.0f} {stage.get('peak_rss_gb', float('nan')):12.2f}")
    peak = max((s.get("peak_rss_gb", 0.0) for s in summary["stages"].values()), default=0.0)
    print("\nfigure                      measured   target   verdict")
    print(
        f"wall time, minutes          {wall / 60:8.1f} {TARGET_SECONDS / 60:8.0f}   {_common.verdict(wall, TARGET_SECONDS)}"
    )
    print(f"peak resident memory, GB    {peak:8.2f} {TARGET_PEAK_GB:8.1f}   {_common.verdict(peak, TARGET_PEAK_GB)}")
    for line in recipe.finished_lines(summary):
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
