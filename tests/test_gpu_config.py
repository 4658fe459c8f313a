"""recipes/configs/sgpo_7b_gpu.yaml: every key is a setting of the recipe, and every stage starts with it.

The dry run swaps the Hub ids for local stand-ins (tiny model, a JSONL with UltraFeedback's columns, the local OpenAI
stub as writer and judge) and overrides only what needs a GPU or would take hours (bf16, vLLM, sizes); the test then
checks that nothing else differs from the file.
"""

import json
import os

import pytest
from test_pipeline import RECIPE, differing_settings, parse

from helpers.openai_stub import OpenAIStub


CONFIG = str(RECIPE.parent / "configs" / "sgpo_7b_gpu.yaml")
# Settings the dry run changes: Hub ids and endpoints for local stand-ins, GPU-only settings, and sizes.
OVERRIDES = {
    "model_name_or_path": None,  # the tiny model folder
    "dataset_name": None,  # a local JSONL
    "base_url": None,  # the stub
    "output_dir": None,
    "bf16": "false",
    "dtype": "float32",
    "use_vllm": "false",
    "num_eval_prompts": "2",
    "num_improver_prompts": "4",
    "num_sgpo_prompts": "4",
    "sample_batch_size": "4",
    "improver_sft": '{"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "max_length": 256}',
    "iterations": "2",
    "per_device_train_batch_size": "2",
    "gradient_accumulation_steps": "1",
    "max_steps": "1",
    "max_new_tokens": "8",
    "eval_max_new_tokens": "8",
    "max_length": "128",
    "ppl_max_ratio": "1000",
    "warmup_steps": "0",
}


def ultrafeedback_like(path, n=8):
    """Rows shaped like HuggingFaceH4/ultrafeedback_binarized: a string prompt, `chosen`/`rejected` chats."""
    with open(path, "w") as f:
        for i in range(n):
            prompt = f"What is {i} plus {i}?"
            chat = [{"role": "user", "content": prompt}]
            row = {
                "prompt": prompt,
                "prompt_id": f"p{i}",
                "chosen": chat + [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
                "rejected": chat + [{"role": "assistant", "content": "I do not know."}],
            }
            f.write(json.dumps(row) + "\n")
    return path


def argv(model_dir, data, base_url, out):
    values = {**OVERRIDES, "model_name_or_path": model_dir, "dataset_name": data, "base_url": base_url}
    values["output_dir"] = out
    return ["--config", CONFIG] + [item for key, value in values.items() for item in (f"--{key}", str(value))]


def test_gpu_config_keys_are_recipe_settings_that_assume_a_gpu(recipe):
    parsed = parse(recipe, "--config", CONFIG, "--bf16", "false")  # bf16 is refused on a CPU-only machine
    script, training, model, _ = parsed
    assert model.model_name_or_path == "Qwen/Qwen2.5-7B-Instruct" and model.use_peft is False
    assert script.dataset_name == "HuggingFaceH4/ultrafeedback_binarized" and script.reference_column == "chosen"
    assert script.writer_model and script.judge_model and script.base_url
    assert training.use_vllm and training.vllm_mode == "colocate" and training.activation_checkpointing
    assert training.gradient_accumulation_steps * training.per_device_train_batch_size * 8 == 128


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_config_dry_run_starts_every_stage(recipe, tiny_model_dir, tmp_path, monkeypatch):
    data = ultrafeedback_like(tmp_path / "ultrafeedback.jsonl")
    monkeypatch.setenv("OPENAI_API_KEY", "stub-key")
    with OpenAIStub(api_key="stub-key", judge_rule="longer") as stub:
        args = argv(tiny_model_dir, data, stub.base_url, tmp_path / "run")
        parsed = parse(recipe, *args)
        # Only the overridden settings differ from the file: every other key runs as written.
        as_written = parse(recipe, "--config", CONFIG, "--bf16", "false")
        derived = {"improver_max_new_tokens"}  # follows max_new_tokens when unset
        assert differing_settings(parsed, as_written) <= set(OVERRIDES) | derived
        summary = recipe.main(*parsed)
        writer_requests = [r for r in stub.requests if "[Start of answer A]" not in json.dumps(r)]
        judge_requests = len(stub.requests) - len(writer_requests)
    assert list(summary["stages"])[:5] == ["sample", "targets", "filter", "improver_sft", "sgpo_iter1"]
    assert "sgpo_iter2" in summary["stages"] and summary["stages"]["sgpo_iter2"]["pairs_made"] > 0
    assert writer_requests and judge_requests  # the writer and the judge both went to --base_url
    assert os.path.isfile(tmp_path / "run" / "model.safetensors")


def test_reference_column_reads_strings_or_the_last_assistant_message_and_names_bad_input():
    from datasets import Dataset

    from trl_sgpo.pipeline.run import _with_reference

    chats = [
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"}],
        [{"role": "user", "content": "q"}],
    ]
    rows = Dataset.from_dict({"prompt": ["x", "y"], "answer": ["s1", "s2"], "chosen": chats})
    assert _with_reference(rows, "answer")["reference"] == ["s1", "s2"]
    assert _with_reference(rows.select([0]), "chosen")["reference"] == ["a1"]
    with pytest.raises(ValueError, match=r"--reference_column 'chosen': row 1 holds neither"):
        _with_reference(rows, "chosen")
    with pytest.raises(ValueError, match=r"--reference_column 'nope': the dataset has no such column"):
        _with_reference(rows, "nope")
