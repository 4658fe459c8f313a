import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.recipes import load_recipe


HERE = Path(__file__).parent
CPU_CONFIG = HERE.parent / "recipes" / "accelerate" / "cpu_2proc.yaml"


def launch(script, *args, port, timeout=420):
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
        str(port),
        str(HERE / script),
        *map(str, args),
    ]
    return run_killing_the_group(cmd, env, timeout)


def run_killing_the_group(cmd, env, timeout):
    """``subprocess.run`` whose timeout ends the launcher's workers too: ``run`` kills only the launcher, and a hung
    worker would then keep its port and cores (and the pipes open, so ``run`` itself would wait on it)."""
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.timeout(60)
def test_a_timed_out_launch_ends_every_process_it_started(tmp_path):
    # A parent that starts a child which outlives it, as `accelerate launch` starts its workers.
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(120)"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        run_killing_the_group([sys.executable, "-c", code], dict(os.environ), timeout=5)
    child = int(pid_file.read_text())
    for _ in range(50):  # the kill is delivered at once; give the kernel a moment to reap it
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/stat") as f:
            if f.read().split()[2] == "Z":  # a zombie is dead (its parent, also killed, can no longer reap it)
                return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the launcher's child outlived the timeout")


def data_stage_argv(model_dir, out):
    from test_pipeline import base_argv, write_prompts

    prompts = write_prompts(out.parent / f"{out.name}-prompts.jsonl")
    argv = base_argv(model_dir, prompts, out)
    argv[argv.index("--num_improver_prompts") + 1] = "8"
    argv[argv.index("--sample_batch_size") + 1] = "2"
    return argv + ["--temperature", "0", "--stop_after", "filter"]


@pytest.mark.slow
def test_data_stages_share_the_rows_over_processes_and_merge_what_one_process_makes(tmp_path, tiny_model_dir):

    from trl_sgpo.io.jsonl import read_jsonl

    two = tmp_path / "two"
    proc = launch("dist_pipeline_script.py", tmp_path, "--", *data_stage_argv(tiny_model_dir, two), port=29519)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recipe = load_recipe("sgpo")
    one = tmp_path / "one"
    recipe.main(*recipe.parse_args(data_stage_argv(tiny_model_dir, one)))

    # Each process answered and scored its own share: 4 batches of 2 rows, dealt 2 and 2.
    for stage, name in (("01_sample", "responses"), ("03_filter", "scores")):
        shares = [read_jsonl(two / "stages" / stage / "shards" / f"{name}.{k}-of-2.jsonl") for k in (0, 1)]
        ids = [{row["row_id"] for row in share} for share in shares]
        assert [len(i) for i in ids] == [4, 4] and not ids[0] & ids[1]
    # Greedy answers and their scores do not depend on how many processes made them.
    assert read_jsonl(two / "stages" / "01_sample" / "responses.jsonl") == read_jsonl(
        one / "stages" / "01_sample" / "responses.jsonl"
    )
    scores = [read_jsonl(run / "stages" / "03_filter" / "scores.jsonl") for run in (two, one)]
    assert [r["row_id"] for r in scores[0]] == [r["row_id"] for r in scores[1]]
    for a, b in zip(*scores, strict=True):
        assert a["target_ppl"] == pytest.approx(b["target_ppl"], rel=1e-5)
        assert a["response_ppl"] == pytest.approx(b["response_ppl"], rel=1e-5)
    assert (two / "stages" / "03_filter" / "improver_sft.jsonl").read_text() != ""


@pytest.mark.slow
def test_a_failure_on_the_main_process_ends_every_process_with_its_error(tmp_path, tiny_model_dir):
    argv = data_stage_argv(tiny_model_dir, tmp_path / "run")
    proc = launch("dist_pipeline_script.py", tmp_path, "targets", "--", *argv, port=29521, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    ends = [json.loads((tmp_path / f"rank{k}.exit").read_text()) for k in (0, 1)]
    # Both processes raised the main process's error, the other one within a minute of it (not after ddp_timeout).
    for end in ends:
        assert "injected failure in stage 2 on the main process" in end["error"], output[-3000:]
    assert ends[1]["error"].startswith("PeerFailedError: process 0 of 2 failed")
    assert 0 <= ends[1]["time"] - ends[0]["raised_at"] < 60
    assert "injected failure in stage 2 on the main process" in output


@pytest.mark.slow
def test_a_failure_in_the_evaluation_stage_ends_every_process_with_its_error(tmp_path, tiny_model_dir):
    from test_pipeline import base_argv, write_prompts

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    argv = [*base_argv(tiny_model_dir, prompts, tmp_path / "run"), "--num_eval_prompts", "2"]
    argv += ["--gradient_accumulation_steps", "1"]  # 2 processes x 2 x 1: one window of the 4 SGPO prompts
    proc = launch("dist_pipeline_script.py", tmp_path, "evaluation", "--", *argv, port=29523, timeout=400)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    ends = [json.loads((tmp_path / f"rank{k}.exit").read_text()) for k in (0, 1)]
    for end in ends:
        assert "injected failure in the evaluation stage" in end["error"], output[-3000:]
    assert ends[1]["error"].startswith("PeerFailedError: process 0 of 2 failed in the evaluation stage")
    assert 0 <= ends[1]["time"] - ends[0]["raised_at"] < 60


@pytest.mark.slow
def test_two_cpu_processes_give_the_update_of_one_process_with_the_same_pairs(tmp_path, tiny_model_dir):
    (tmp_path / "two").mkdir()
    proc = launch("dist_sgpo_script.py", tiny_model_dir, tmp_path / "two", port=29517)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The same script, in this (single) process.
    (tmp_path / "one").mkdir()
    subprocess.run(
        [sys.executable, str(HERE / "dist_sgpo_script.py"), str(tiny_model_dir), str(tmp_path / "one")],
        env={
            **os.environ,
            "TRL_EXPERIMENTAL_SILENCE": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
        },
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

    # evaluate() on 3 prompts: process 1's batch repeats prompt 0 (accelerate's even batches), counted once.
    assert one["eval"]["eval_sgpo/kept_frac"] == pytest.approx(2 / 3)
    for r in two:
        assert r["eval"] == pytest.approx(one["eval"], rel=1e-4, abs=1e-5)

    # items.jsonl: the main process wrote both processes' pairs once each, under the ids one process gives them.
    from trl_sgpo.trainers.items_log import read_items

    items_two, items_one = (read_items(tmp_path / run / "run" / "items.jsonl") for run in ("two", "one"))
    assert len(items_two) == 12 and len({i["id"] for i in items_two}) == 12
    assert sum(i["kept"] for i in items_two) == 5 and sum("identical" in i["flags"] for i in items_two) == 7

    def described(item):
        return item["id"], item["prompt"], item["texts"], item["kept"], item["flags"]

    assert [described(i) for i in items_two] == [described(i) for i in items_one]
    for a, b in zip(items_two, items_one, strict=True):
        assert (a["metrics"] is None) == (b["metrics"] is None) == (not a["kept"])
        if a["kept"]:
            assert a["metrics"]["rewards/margins"] == pytest.approx(b["metrics"]["rewards/margins"], abs=1e-4)

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
