"""SGPO and SPPO (each full and LoRA) on DeepSpeed ZeRO-2/3 and FSDP1/FSDP2 over 2 CPU processes (gloo).

One launch of tests/dist_sharded_script.py per backend runs every check (a launch costs far more than a step on 2 CPU
cores); this file reads what each process wrote. See the script's docstring for the scripted windows.
"""

import importlib.util
import json
import math
import os

import pytest
import torch
from test_distributed import launch


BACKENDS = {"zero2": 29631, "zero3": 29633, "fsdp1": 29635, "fsdp2": 29637}
PAIRS = {"made": 16, "kept": 9, "identical": 7, "skipped_steps": 1, "steps": 4}


def needs_deepspeed(backend):
    """DeepSpeed backends skip where deepspeed is not installed, except in CI (CI=true), where that is a failure."""
    if backend.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("deepspeed is not installed in CI: .ci/run installs it (`pip install deepspeed`).")
        pytest.skip("deepspeed is not installed (`pip install 'trl-sgpo[deepspeed]'`)")


def rank_results(out, name):
    return [json.loads((out / f"{name}.rank{k}.json").read_text()) for k in (0, 1)]


def check_backend_active(backend, evidence):
    """The config really applied: a silently ignored one would train plain DDP (no engine, whole parameters)."""
    if backend.startswith("zero"):
        assert evidence["wrapper"] == "DeepSpeedEngine" and evidence["zero_stage"] == int(backend[-1]), evidence
    else:
        assert evidence["distributed_type"] == "DistributedType.FSDP", evidence
        assert evidence["fsdp_version"] == int(backend[-1]), evidence
    # Sharded: this process holds at most about half of the parameters (ZeRO-2: of the optimizer's master weights).
    assert 0 <= evidence["local_numel"] <= evidence["full_numel"] // 2 + 64, evidence


def check_sgpo(backend, out, name):
    ranks = rank_results(out, name)
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        check_backend_active(backend, r["evidence"])
        # Counted over both processes: process 0 kept no pair at step 1 (zero-weight filler), step 3 kept nothing.
        assert {k: r["pair_counts"][k] for k in PAIRS} == PAIRS
        assert math.isnan(r["losses"][2]) and all(math.isfinite(x) for i, x in enumerate(r["losses"]) if i != 2)
        # The skipped step 3 has no gradient (NaN, also where the backend clips); the others have one.
        assert math.isnan(r["grad_norms"][2]) and all(
            math.isfinite(x) for i, x in enumerate(r["grad_norms"]) if i != 2
        )
        # evaluate(): process 0 kept no item and neither hung nor unpaired the gather.
        assert r["eval"]["eval_sgpo/kept_frac"] == 0.5 and r["eval"]["eval_sgpo/identical_frac"] == 0.5
        assert math.isfinite(r["eval"]["eval_loss"])
        if backend != "fsdp1":  # FSDP1 saves sharded on CPU processes (see tests/helpers/sharded.py)
            # Resuming from the step-2 checkpoint ends with the same weights and counts.
            assert r["resume_max_diff"] <= 1e-6
            assert {k: r["resumed_pair_counts"][k] for k in PAIRS} == PAIRS
    assert ranks[0]["losses"][:2] == pytest.approx(ranks[1]["losses"][:2])
    assert ranks[0]["eval"] == pytest.approx(ranks[1]["eval"])
    return ranks


def check_final_save(out, name, model_dir, lora):
    """The final save loads back as a plain model (LoRA: base + adapter) with each process's trained weights."""
    from transformers import AutoModelForCausalLM

    weights = [torch.load(out / f"{name}.rank{k}.pt") for k in (0, 1)]
    model = AutoModelForCausalLM.from_pretrained(out / f"{name}-final")
    if lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / f"{name}-final")
    loaded = dict(model.named_parameters())
    initial = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
    assert set(weights[0]) == set(loaded)
    moved = 0.0
    for key, value in loaded.items():
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0)
        torch.testing.assert_close(value, weights[0][key], rtol=0, atol=1e-6)
        if key in initial:
            moved += (value - initial[key]).abs().sum().item()
        elif "lora_B" in key:  # LoRA's B starts at zero
            moved += value.abs().sum().item()
    assert moved > 0


@pytest.mark.slow
@pytest.mark.timeout(540)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sgpo_and_sppo_train_evaluate_resume_and_save_on_a_sharded_backend(backend, tmp_path, tiny_model_dir):
    needs_deepspeed(backend)
    proc = launch("dist_sharded_script.py", backend, tiny_model_dir, tmp_path, port=BACKENDS[backend], timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    for name, lora in (("sgpo_full", False), ("sgpo_lora", True)):
        ranks = check_sgpo(backend, tmp_path, name)
        if backend == "fsdp1":
            weights = [torch.load(tmp_path / f"{name}.rank{k}.pt") for k in (0, 1)]
            for key, value in weights[0].items():
                torch.testing.assert_close(value, weights[1][key], rtol=0, atol=0)
        else:
            check_final_save(tmp_path, name, tiny_model_dir, lora)
        if backend == "zero3" and not lora:
            # A second round built on the trained model: its reference is pi_t (the trained policy), not pi_0.
            for r in ranks:
                assert r["second_round"]["reference"] == pytest.approx(r["second_round"]["policy"], abs=1e-4)
                # Before the save no folder holds pi_t: building the second round is refused, not silently pi_0.
                assert "trained in this process" in (r["unsaved_second_round"] or "")
    for name in ("sppo_full", "sppo_lora"):
        for r in rank_results(tmp_path, name):
            check_backend_active(backend, r["evidence"])
            assert r["counts"]["made"] == 24 and r["counts"]["kept"] == 16 and r["counts"]["steps"] == 2
            assert all(math.isfinite(x) for x in r["losses"])
            # Each window's answers were really generated on the backend, by pi_t (the reference), 3 tokens at most.
            assert len(r["generations"]) == 2 and all(g["from_reference"] for g in r["generations"]), r["generations"]
            assert all(len(g["lengths"]) == 6 and 0 < max(g["lengths"]) <= 3 for g in r["generations"])
