import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


HERE = Path(__file__).parent
CPU_CONFIG = HERE.parent / "recipes" / "accelerate" / "cpu_2proc.yaml"


@pytest.mark.slow
def test_sgpo_stage_under_accelerate_two_cpu_processes(tmp_path, tiny_model_dir):
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
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # DDP: both processes end with the same weights, which moved.
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=0, abs=1e-6)
    assert ranks[0]["checksum"] != pytest.approx(ranks[0]["start_checksum"], abs=1e-6)
    # Pair statistics are gathered over both processes: 2 steps x 2 prompts x 2 processes, of which rank 1 drops
    # three as identical (see dist_sgpo_script.py); rank 0's random tiny model rarely repeats itself.
    counts = ranks[0]["pair_counts"]
    assert counts == ranks[1]["pair_counts"]
    assert counts["made"] == 8 and counts["identical"] >= 3
    assert counts["kept"] == 8 - counts["identical"] - counts["empty"]
    assert ranks[0]["losses"] == ranks[1]["losses"]
