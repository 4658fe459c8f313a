"""scripts/gpu_check.py without a GPU: the table, the command of every path, and one path's worker run on CPU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


SCRIPTS = Path(__file__).parent.parent / "scripts"


def load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_table_has_one_aligned_row_per_path():
    check = load("gpu_check")
    rows = [check.Row("bf16", True, 41.4, 3.25), check.Row("vllm_colocate", False, 240.0, None, "timed out")]
    lines = check.format_table(rows).splitlines()
    assert lines[0].split() == ["path", "result", "seconds", "peak", "GPU", "memory"]
    assert lines[2].split() == ["bf16", "ok", "41", "3.2", "GiB"]
    assert lines[3].split() == ["vllm_colocate", "failed", "240", "-"]
    assert lines[2].index("ok") == lines[3].index("failed") == lines[0].index("result")


def test_every_path_has_a_launcher_config_and_flags_the_worker_takes(capsys):
    check, worker = load("gpu_check"), load("gpu_check_path")
    assert set(check.PATHS) == {"bf16", "fp16", "zero3", "fsdp2", "vllm_colocate", "sppo_zero3", "sppo_vllm_colocate"}
    assert check.main(["--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == list(check.PATHS)
    for path in check.PATHS:
        cmd = check.command(path, "out.json", gpus=2)
        if "--config_file" in cmd:
            assert Path(cmd[cmd.index("--config_file") + 1]).is_file()
            assert cmd[cmd.index("--num_processes") + 1] == "2"
        args = worker.parse_args(cmd[cmd.index(str(check.WORKER)) + 1 :])
        assert args.path == path and args.vllm == path.endswith("vllm_colocate")
        assert args.method == ("sppo" if path.startswith("sppo") else "sgpo")
        # A sharded path names the backend its config must turn on; the worker fails the path when it was not active.
        assert args.backend == ("zero3" if "zero3" in path else "fsdp2" if "fsdp2" in path else "none")
        assert (args.bf16, args.fp16) == ((False, True) if path == "fp16" else (True, False))


def run_worker(tmp_path, tiny_model_dir, *flags):
    out = tmp_path / "cpu.json"
    cmd = [sys.executable, str(SCRIPTS / "gpu_check_path.py"), "--path", "cpu", "--out", str(out)]
    cmd += ["--model", str(tiny_model_dir), "--steps", "1", *flags]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env)
    return proc, json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_path_runs_on_cpu_and_reports_its_result(tmp_path, tiny_model_dir):
    proc, result = run_worker(tmp_path, tiny_model_dir)
    assert proc.returncode == 0 and result["ok"], result.get("error", "") + proc.stderr[-2000:]
    # One optimizer step: 2 prompts x 2 accumulation steps x 1 process.
    assert result["path"] == "cpu" and result["made"] == 4 and result["peak_gib"] is None
    assert result["seconds"] > 0 and "eval_loss" in result
    assert result["backend"] == "none" and result["distributed_type"] == "DistributedType.NO"
    assert result["local_numel"] == result["full_numel"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_path_whose_backend_was_not_active_fails(tmp_path, tiny_model_dir):
    # As if an accelerate config for FSDP2 had been ignored: one plain process.
    proc, result = run_worker(tmp_path, tiny_model_dir, "--backend", "fsdp2", "--method", "sppo")
    assert proc.returncode == 1 and not result["ok"]
    assert "the `fsdp2` backend was requested but the run used DistributedType.NO" in result["error"]
