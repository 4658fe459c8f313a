"""`report_to: trackio` (offline, local) logs both trainers of the recipe, each under its own run name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


RECIPE = Path(__file__).parent.parent / "recipes" / "sgpo.py"


@pytest.mark.slow
def test_trackio_logs_improver_sft_and_sgpo(tmp_path, tiny_model_dir):
    from test_pipeline import base_argv, write_prompts

    out = tmp_path / "tracked"
    argv = base_argv(tiny_model_dir, write_prompts(tmp_path / "prompts.jsonl"), out)
    # trackio reads TRACKIO_DIR when imported: a fresh process keeps the test's database out of the user's cache.
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": str(RECIPE.parent.parent)}
    cmd = [sys.executable, str(RECIPE), *argv, "--report_to", "trackio", "--project", "sgpo-test"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    read = (
        "import json, trackio; api = trackio.Api(); "
        "print(json.dumps(sorted(run.name for run in api.runs('sgpo-test'))))"
    )
    runs = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, timeout=120)
    assert runs.returncode == 0, runs.stderr[-3000:]
    assert json.loads(runs.stdout.strip().splitlines()[-1]) == ["tracked-improver_sft", "tracked-sgpo_iter1"]
