"""The recipe's pipeline end to end on a tiny model: stages, resume, foreign folders, bad arguments, Hub push."""

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from trl_sgpo.stages import StageConfigMismatchError

RECIPE = Path(__file__).parent.parent / "recipes" / "sgpo.py"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("sgpo_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    with open(path, "w") as f:
        for i in range(12):
            row = {"prompt": f"What is {i} plus {i}?", "reference": f"{i} plus {i} is {2 * i}. Doubling a number adds it to itself."}
            f.write(json.dumps(row) + "\n")
    return path


def parse(recipe, *argv):
    return recipe.make_parser().parse_args_and_config(args=list(argv), fail_with_unknown_args=True)[:3]


def base_argv(model_dir, data, out):
    return [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
        "--num_improver_prompts", "6", "--num_sgpo_prompts", "4", "--max_steps", "2", "--max_new_tokens", "8",
        "--improver_sft_epochs", "1", "--ppl_max_ratio", "1000", "--logging_steps", "1", "--sample_batch_size", "4",
    ]


def test_full_run_writes_every_stage_and_the_final_model(recipe, tiny_model_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "run"
    summary = recipe.main(*parse(recipe, *base_argv(tiny_model_dir, prompt_file, out)))
    assert list(summary["stages"]) == ["sample", "targets", "filter", "improver_sft", "sgpo_iter1"]
    assert summary["stages"]["sample"]["rows"] == 6
    assert summary["stages"]["sgpo_iter1"]["pairs_made"] == 8
    for stage in ("01_sample", "02_targets", "03_filter", "04_improver_sft", "05_sgpo_iter1"):
        assert json.loads((out / "stages" / stage / "stage.json").read_text())["done"] is True
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    card = (out / "README.md").read_text()
    assert "sgpo" in card and "2507.20181" in card and "pairs_made" in card
    printed = capsys.readouterr().out
    assert "SGPO summary" in printed and "pairs made 8" in printed and f"model saved to {out}" in printed
    assert json.loads((out / "sgpo_summary.json").read_text())["saved_to"] == str(out)


def test_rerun_skips_finished_stages_and_resumes_the_rest(recipe, tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    import trl_sgpo.pipeline as pipeline
    import trl_sgpo.sampling as sampling

    out = tmp_path / "run"
    argv = base_argv(tiny_model_dir, prompt_file, out)
    recipe.main(*parse(recipe, *argv, "--stop_after", "filter"))
    assert not (out / "stages" / "04_improver_sft").exists()

    # An interruption inside improver SFT, after the stage started.
    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.ImproverSFTTrainer, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(*parse(recipe, *argv))
    assert json.loads((out / "stages" / "04_improver_sft" / "stage.json").read_text())["done"] is False
    monkeypatch.undo()

    # The rerun must not sample again: the finished stages are skipped.
    def no_sampling(*a, **k):
        raise AssertionError("sample stage ran again")

    monkeypatch.setattr(sampling, "sample_responses", no_sampling)
    summary = recipe.main(*parse(recipe, *argv))
    assert summary["stages"]["improver_sft"]["rows"] == summary["stages"]["filter"]["kept"]
    assert (out / "model.safetensors").is_file()


def test_folder_from_another_config_is_refused(recipe, tiny_model_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    argv = base_argv(tiny_model_dir, prompt_file, out)
    recipe.main(*parse(recipe, *argv, "--stop_after", "sample"))
    with pytest.raises(StageConfigMismatchError, match=r"max_new_tokens: 8 -> 12"):
        recipe.main(*parse(recipe, *argv, "--max_new_tokens", "12", "--stop_after", "sample"))


def test_bad_arguments_give_clear_errors(recipe, tiny_model_dir, prompt_file, tmp_path):
    with pytest.raises(OSError, match="no-such-model"):
        recipe.main(*parse(recipe, *base_argv(tmp_path / "no-such-model", prompt_file, tmp_path / "a")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "reference": "r"}\n')
    with pytest.raises(ValueError, match=r"missing the column\(s\) \['prompt'\]"):
        recipe.main(*parse(recipe, *base_argv(tiny_model_dir, bad, tmp_path / "b")))
    no_ref = tmp_path / "noref.jsonl"
    no_ref.write_text('{"prompt": "q"}\n' * 4)
    with pytest.raises(ValueError, match=r"missing the column\(s\) \['reference'\]"):
        recipe.main(*parse(recipe, *base_argv(tiny_model_dir, no_ref, tmp_path / "c")))
    with pytest.raises(ValueError, match="--target_model"):
        recipe.main(*parse(recipe, *base_argv(tiny_model_dir, prompt_file, tmp_path / "d"), "--base_url", "http://127.0.0.1:9/v1"))


class LocalHub:
    """Stand-in for the Hub API that transformers' Trainer calls: keeps what would be uploaded in a local folder."""

    def __init__(self, root: Path):
        self.root = root
        self.uploads = []

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"local-user/{repo_id}")

    def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
        import fnmatch

        target = self.root / repo_id
        for item in Path(folder_path).iterdir():
            if any(fnmatch.fnmatch(item.name, pattern) for pattern in ignore_patterns):
                continue
            dest = target / item.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(item, dest) if item.is_dir() else shutil.copy2(item, dest)
        self.uploads.append(repo_id)
        return SimpleNamespace(commit_url=f"local://{repo_id}")


def test_push_to_hub_uploads_the_model_and_its_card(recipe, tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    import transformers.trainer

    import trl_sgpo.pipeline as pipeline

    hub = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    # The run starts from a Hub id, served from the local tiny model.
    load = pipeline.load_model_and_tokenizer
    monkeypatch.setattr(
        pipeline, "load_model_and_tokenizer",
        lambda name, **kw: load(str(tiny_model_dir) if name == "trl-sgpo/tiny-random-llama" else name, **kw),
    )
    out = tmp_path / "run"
    argv = base_argv("trl-sgpo/tiny-random-llama", prompt_file, out) + ["--push_to_hub", "--hub_model_id", "me/tiny-sgpo"]
    summary = recipe.main(*parse(recipe, *argv))
    assert hub.uploads == ["me/tiny-sgpo"] and summary["pushed_to"] == "me/tiny-sgpo"
    repo = tmp_path / "hub" / "me" / "tiny-sgpo"
    assert {"model.safetensors", "config.json", "tokenizer_config.json", "README.md"} <= {p.name for p in repo.iterdir()}
    assert not any(p.name.startswith("checkpoint-") for p in repo.iterdir())
    card = (repo / "README.md").read_text()
    assert "- sgpo" in card and "- trl" in card
    assert "base_model: trl-sgpo/tiny-random-llama" in card
    assert str(prompt_file) in card  # the dataset used
    assert "@article{lee2025sgpo" in card and "| pairs_made | 8 |" in card


def test_yaml_config_spells_out_the_defaults_and_the_command_line_wins(recipe):
    import dataclasses

    config = str(RECIPE.parent / "configs" / "sgpo_smollm2.yaml")
    from_yaml = parse(recipe, "--config", config, "--iterations", "3")
    bare = parse(recipe)
    for a, b in zip(from_yaml, bare):
        differ = {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}
        assert differ <= {"iterations", "model_name_or_path"}
    assert from_yaml[0].iterations == 3 and from_yaml[2].model_name_or_path == "smollm2-135m-instruct"
    assert bare[1].learning_rate == 1e-6 and bare[1].gradient_checkpointing is False


def test_lora_run_merges_each_stage_into_a_plain_model(recipe, tiny_model_dir, prompt_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    argv = base_argv(tiny_model_dir, prompt_file, out) + ["--use_peft", "--lora_r", "4", "--lora_alpha", "8"]
    summary = recipe.main(*parse(recipe, *argv))
    assert summary["stages"]["sgpo_iter1"]["pairs_made"] == 8
    for folder in (out / "stages" / "04_improver_sft" / "model", out):
        assert not (folder / "adapter_config.json").exists()
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert not any("lora_" in name for name, _ in model.named_parameters())
