import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


HERE = Path(__file__).parent
CPU_CONFIG = HERE.parent / "recipes" / "accelerate" / "cpu_2proc.yaml"


@pytest.mark.slow
def test_two_cpu_processes_give_the_update_of_one_process_with_the_same_pairs(tmp_path, tiny_model_dir):
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CPU_CONFIG),
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
        str(HERE / "dist_sgpo_script.py"),
        str(tiny_model_dir),
        str(tmp_path / "two"),
    ]
    (tmp_path / "two").mkdir()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The same script, in this (single) process.
    (tmp_path / "one").mkdir()
    subprocess.run(
        [sys.executable, str(HERE / "dist_sgpo_script.py"), str(tiny_model_dir), str(tmp_path / "one")],
        env={**env, "PYTHONPATH": os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])},
        check=True,
        capture_output=True,
        timeout=300,
    )
    two = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert [r["world"] for r in two] == [2, 2] and one["world"] == 1

    # Pairs counted over both processes: 3 windows of 4, of which 1 + 2 + 4 dropped as identical; one step skipped.
    for counts in (two[0]["pair_counts"], two[1]["pair_counts"], one["pair_counts"]):
        assert {k: counts[k] for k in ("made", "kept", "identical", "skipped_steps")} == {
            "made": 12,
            "kept": 5,
            "identical": 7,
            "skipped_steps": 1,
        }
    # Losses: the mean over the window's kept pairs, whichever process holds them; the skipped step logs none.
    for a, b in zip(two[0]["losses"], one["losses"], strict=True):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-4)

    rank0, rank1 = torch.load(tmp_path / "two" / "rank0.pt"), torch.load(tmp_path / "two" / "rank1.pt")
    alone = torch.load(tmp_path / "one" / "rank0.pt")
    from transformers import AutoModelForCausalLM

    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    moved = 0.0
    for name in alone:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)  # DDP: the same weights everywhere
        torch.testing.assert_close(rank0[name], alone[name], rtol=1e-5, atol=1e-6)
        moved += (alone[name] - initial[name].detach()).abs().sum().item()
    assert moved > 0
