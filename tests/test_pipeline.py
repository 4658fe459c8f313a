"""The recipe's pipeline end to end on a tiny model: stages, resume, foreign folders, bad arguments, Hub push."""

import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from trl_sgpo.pipeline.stages import StageConfigMismatchError


RECIPE = Path(__file__).parent.parent / "recipes" / "sgpo.py"


def write_prompts(path):
    with open(path, "w") as f:
        for i in range(12):
            row = {
                "prompt": f"What is {i} plus {i}?",
                "reference": f"{i} plus {i} is {2 * i}. Doubling a number adds it to itself.",
            }
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def prompt_file(tmp_path):
    return write_prompts(tmp_path / "prompts.jsonl")


def parse(recipe, *argv):
    return recipe.parse_args(list(argv))


def base_argv(model_dir, data, out):
    return [
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
        "--num_improver_prompts",
        "6",
        "--num_sgpo_prompts",
        "4",
        "--max_steps",
        "2",
        "--max_new_tokens",
        "8",
        "--improver_sft",
        '{"num_train_epochs": 1}',
        "--ppl_max_ratio",
        "1000",
        "--logging_steps",
        "1",
        "--sample_batch_size",
        "4",
        "--use_peft",  # full fine-tuning unless a test asks for LoRA (the demo default)
        "false",
        "--per_device_train_batch_size",  # windows of 2 x 2 prompts: the demo's 8 would not fit 4 SGPO prompts
        "2",
        "--gradient_accumulation_steps",
        "2",
    ]


def test_full_run_writes_every_stage_and_the_final_model(
    recipe, tiny_model_dir, prompt_file, tmp_path, capsys, monkeypatch
):
    import trl_sgpo.pipeline.memory as memory

    trims = []
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(1))
    out = tmp_path / "run"
    summary = recipe.main(*parse(recipe, *base_argv(tiny_model_dir, prompt_file, out)))
    # Both trainers give the freed heap back after every optimizer step: improver SFT's (its rows in steps of 1 x 4,
    # the demo's), then SGPO's 2.
    assert summary["heap_fragmentation_limited"] is (memory._glibc() is not None)
    if summary["heap_fragmentation_limited"]:
        assert len(trims) == math.ceil(summary["stages"]["improver_sft"]["rows"] / 4) + 2
    assert list(summary["stages"]) == ["sample", "targets", "filter", "improver_sft", "sgpo_iter1"]
    # 12 rows cannot hold out the default 64 prompts: the evaluation is skipped and the summary says why.
    assert summary["evaluation"]["skipped"].startswith("skipped: the dataset has 12 rows")
    assert summary["stages"]["sample"]["rows"] == 6
    assert summary["stages"]["sgpo_iter1"]["pairs_made"] == 8
    for stage in ("01_sample", "02_targets", "03_filter", "04_improver_sft", "05_sgpo_iter1"):
        assert json.loads((out / "stages" / stage / "stage.json").read_text())["done"] is True
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    card = (out / "README.md").read_text()
    assert "sgpo" in card and "2507.20181" in card and "pairs_made" in card
    printed = capsys.readouterr().out
    assert "SGPO summary" in printed and "pairs made 8" in printed and f"model saved to {out}" in printed
    assert f"items each round trained on: {out / 'items' / 'items.jsonl'}" in printed
    assert json.loads((out / "sgpo_summary.json").read_text())["saved_to"] == str(out)


def test_step_fraction_1_trains_on_the_references(recipe, tiny_model_dir, tmp_path):
    # Long references (5 sentences, more edits than the writer's usual cap of 3): the target is the whole reference,
    # and the filter keeps it instead of dropping it as a copy of the reference.
    data = tmp_path / "long.jsonl"
    reference = "One fact. Two facts. Three facts. Four facts. Five facts."
    data.write_text(
        "".join(json.dumps({"prompt": f"Question {i}?", "reference": reference}) + "\n" for i in range(10))
    )
    out = tmp_path / "run"
    argv = [*base_argv(tiny_model_dir, data, out), "--step_fraction", "1.0", "--stop_after", "filter"]
    summary = recipe.main(*parse(recipe, *argv))
    targets = [json.loads(line)["target"] for line in open(out / "stages" / "02_targets" / "targets.jsonl")]
    assert targets and all(t == reference for t in targets)
    assert "copies_reference" not in summary["stages"]["filter"]["dropped_by_reason"]
    assert summary["stages"]["filter"]["kept"] > 0


def test_rerun_skips_finished_stages_and_resumes_the_rest(recipe, tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    import trl_sgpo.data.sampling as sampling
    import trl_sgpo.pipeline.run as pipeline

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


@pytest.mark.parametrize("stop_after", ["targets", "sgpo"])
def test_stop_after_ends_the_run_after_that_stage(recipe, tiny_model_dir, prompt_file, tmp_path, stop_after):
    out = tmp_path / "run"
    argv = [*base_argv(tiny_model_dir, prompt_file, out), "--num_eval_prompts", "2", "--stop_after", stop_after]
    summary = recipe.main(*parse(recipe, *argv))
    ran = {"targets": ["01_sample", "02_targets"], "sgpo": ["01_sample", "02_targets", "03_filter",
           "04_improver_sft", "05_sgpo_iter1"]}[stop_after]  # fmt: skip
    assert sorted(p.name for p in (out / "stages").iterdir()) == ran
    assert list(summary["stages"])[-1] == {"targets": "targets", "sgpo": "sgpo_iter1"}[stop_after]
    assert "evaluation" not in summary
    # After the rounds the final model is still saved, without an evaluation.
    assert (out / "model.safetensors").exists() is (stop_after == "sgpo")


def test_folder_from_another_config_is_refused(recipe, tiny_model_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    argv = base_argv(tiny_model_dir, prompt_file, out)
    recipe.main(*parse(recipe, *argv, "--stop_after", "sample"))
    with pytest.raises(StageConfigMismatchError, match=r"max_new_tokens: 8 -> 12"):
        recipe.main(*parse(recipe, *argv, "--max_new_tokens", "12", "--stop_after", "sample"))


def test_redoing_a_stage_redoes_the_stages_after_it(recipe, tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    import weakref

    import trl_sgpo.pipeline.run as pipeline

    trained, trainers = [], weakref.WeakSet()  # trainers and their models
    train_and_save = pipeline._train_and_save

    def recording(trainer, tokenizer, root, *args, **kwargs):
        trained.append(root.name)
        trainers.update((trainer, trainer.model))
        return train_and_save(trainer, tokenizer, root, *args, **kwargs)

    load, loaded = pipeline.load_model_and_tokenizer, weakref.WeakSet()

    def load_after_freeing(name, **kwargs):
        # Each stage's model (the data stages' policy, each trainer's) is gone before the next model loads.
        assert not list(trainers), f"a finished stage's trainer or model is still in memory while {name} loads"
        assert not list(loaded), f"an earlier stage's model is still in memory while {name} loads"
        model, tokenizer = load(name, **kwargs)
        loaded.add(model)
        return model, tokenizer

    monkeypatch.setattr(pipeline, "_train_and_save", recording)
    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", load_after_freeing)
    out = tmp_path / "run"
    argv = base_argv(tiny_model_dir, prompt_file, out) + ["--iterations", "2"]
    recipe.main(*parse(recipe, *argv))
    assert trained == ["04_improver_sft", "05_sgpo_iter1", "05_sgpo_iter2"]

    stages = out / "stages"
    old_sft_checkpoints = sorted((stages / "04_improver_sft").glob("checkpoint-*"))
    assert old_sft_checkpoints
    shutil.rmtree(stages / "03_filter")
    (stages / "04_improver_sft" / "leftover.txt").write_text("from the run before")
    trained.clear()
    recipe.main(*parse(recipe, *argv))
    assert trained == ["04_improver_sft", "05_sgpo_iter1", "05_sgpo_iter2"]
    assert not (stages / "04_improver_sft" / "leftover.txt").exists()  # redone from scratch, not resumed
    markers = {p.name: json.loads((p / "stage.json").read_text()) for p in stages.iterdir()}
    for before, after in zip(sorted(markers)[:-1], sorted(markers)[1:]):
        assert markers[after]["after"] == {"stage": before, "run": markers[before]["run"]}

    shutil.rmtree(stages / "05_sgpo_iter1")
    trained.clear()
    recipe.main(*parse(recipe, *argv))
    assert trained == ["05_sgpo_iter1", "05_sgpo_iter2"]
    trained.clear()
    recipe.main(*parse(recipe, *argv))
    assert trained == []


@pytest.mark.parametrize(
    ("change", "stage", "setting"),
    [
        (["--dataset_config", "other"], "sample", "dataset_config: None -> 'other'"),
        (["--model_revision", "v2"], "sample", "model_revision: 'main' -> 'v2'"),
        (["--improver_sft", '{"max_length": 256}'], "filter", "improver_sft_max_length: 768 -> 256"),
        (["--lr_scheduler_type", "constant"], "sgpo iteration 1", "lr_scheduler_type: 'linear' -> 'constant'"),
        (["--warmup_steps", "1"], "sgpo iteration 1", "warmup_steps: 0 -> 1"),
        (["--max_grad_norm", "0.5"], "sgpo iteration 1", "max_grad_norm: 1.0 -> 0.5"),
        (["--improver_sft", '{"max_grad_norm": 0.5}'], "improver_sft", "improver_sft.max_grad_norm: 1.0 -> 0.5"),
    ],
)
def test_changed_settings_are_refused_at_the_first_stage_they_change(recipe, finished_run, change, stage, setting):
    with pytest.raises(StageConfigMismatchError, match=rf"'{stage}' stage .*{re.escape(setting)}"):
        recipe.main(*parse(recipe, *finished_run, *change))


@pytest.fixture(scope="module")
def finished_run(recipe, tmp_path_factory):
    """One finished run shared by the tests that only rerun it with other settings (which fail before training)."""
    from helpers.tiny import build_tiny_model, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("finished")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    argv = base_argv(root / "model", write_prompts(root / "prompts.jsonl"), root / "run")
    recipe.main(*parse(recipe, *argv))
    return argv


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
    # Without improver stages, the similarity judge still needs references: said before anything trains.
    argv = [*base_argv(tiny_model_dir, no_ref, tmp_path / "c2"), "--skip_improver_sft", "--judge", "similarity"]
    with pytest.raises(ValueError, match=r"--judge similarity .* no `reference` column.*--judge none"):
        recipe.main(*parse(recipe, *argv))
    assert not (tmp_path / "c2" / "stages").exists()
    with pytest.raises(ValueError, match="--writer_model"):
        recipe.main(
            *parse(
                recipe, *base_argv(tiny_model_dir, prompt_file, tmp_path / "d"), "--base_url", "http://127.0.0.1:9/v1"
            )
        )


class LocalHub:
    """Stand-in for `huggingface_hub.HfApi`: keeps what would be uploaded in a local folder and records the calls."""

    def __init__(self, root: Path):
        self.root = root
        self.repos = []
        self.uploads = []

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        repo_type = kwargs.get("repo_type") or "model"
        self.repos.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok, "repo_type": repo_type})
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"local-user/{repo_id}")

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        folder = Path(folder_path)
        every = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        files = sorted(filter_repo_objects(every, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        target = self.root / repo_id
        for name in files:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, target / name)
        self.uploads.append({"repo_id": repo_id, "files": files, **kwargs})
        return SimpleNamespace(commit_url=f"local://{repo_id}")


# What `save_pretrained` writes for the tiny model and tokenizer, plus the card: nothing else may be pushed.
PUSHED_FILES = [
    "README.md",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "improver_template.json",  # the improver travels with the model
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]


def check_pushed_items(repo: Path, round_dir: Path):
    from datasets import load_dataset

    from trl_sgpo.trainers.items_log import read_items

    made = read_items(round_dir / "items.jsonl")
    pushed = read_items(repo / "items.jsonl")
    assert len(made) == 8  # 2 steps of 4 pairs ("| pairs_made | 8 |")
    assert pushed == [{"round": 1, "method": "sgpo", **item} for item in made]
    dataset = load_dataset("json", data_files=str(repo / "items.jsonl"), split="train")
    assert dataset.num_rows == 8 and {"prompt", "texts", "kept", "flags", "metrics"} <= set(dataset.column_names)
    assert f'load_dataset("{repo.parent.name}/{repo.name}"' in (repo / "README.md").read_text()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_push_to_hub_uploads_the_final_model_and_its_card(
    recipe, tiny_model_dir, prompt_file, tmp_path, monkeypatch, lora
):
    from safetensors.torch import load_file

    import trl_sgpo.pipeline.run as pipeline

    hub = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(pipeline, "hub_api", lambda: hub)
    # The run starts from a Hub id, served from the local tiny model.
    load = pipeline.load_model_and_tokenizer
    monkeypatch.setattr(
        pipeline,
        "load_model_and_tokenizer",
        lambda name, **kw: load(str(tiny_model_dir) if name == "trl-sgpo/tiny-random-llama" else name, **kw),
    )
    out = tmp_path / "run"
    argv = base_argv("trl-sgpo/tiny-random-llama", prompt_file, out) + [
        "--push_to_hub",
        "--hub_model_id",
        "me/tiny-sgpo",
        "--hub_private_repo",
        "true",
        "--hub_revision",
        "v1",
    ]
    if lora:
        argv += ["--use_peft", "--lora_r", "4", "--lora_alpha", "8"]
    summary = recipe.main(*parse(recipe, *argv))
    assert hub.repos == [
        {"repo_id": "me/tiny-sgpo", "private": True, "exist_ok": True, "repo_type": "model"},
        {"repo_id": "me/tiny-sgpo-items", "private": True, "exist_ok": True, "repo_type": "dataset"},
    ]
    assert [(u["repo_id"], u["files"], u["revision"], u.get("repo_type")) for u in hub.uploads] == [
        ("me/tiny-sgpo", PUSHED_FILES, "v1", None),
        ("me/tiny-sgpo-items", ["README.md", "items.jsonl"], "v1", "dataset"),
    ]
    assert summary["pushed_to"] == "me/tiny-sgpo" and summary["push_commit"] == "local://me/tiny-sgpo"
    # Beside the model, the pairs the round trained on, as a dataset: every line of the round's items.jsonl.
    assert summary["items_pushed_to"] == "me/tiny-sgpo-items"
    check_pushed_items(tmp_path / "hub" / "me" / "tiny-sgpo-items", out / "stages" / "05_sgpo_iter1")
    repo = tmp_path / "hub" / "me" / "tiny-sgpo"
    # Full weights, merged for LoRA: every tensor of the base model under its own name, no adapter.
    pushed = load_file(repo / "model.safetensors")
    assert set(pushed) == set(load_file(tiny_model_dir / "model.safetensors"))
    card = (repo / "README.md").read_text()
    assert "- sgpo" in card and "- trl" in card
    assert "base_model: trl-sgpo/tiny-random-llama" in card
    assert str(prompt_file) in card  # the dataset used
    assert "@article{lee2025sgpo" in card and "| pairs_made | 8 |" in card
    assert 'model="me/tiny-sgpo"' in card

    # Every round is done: a rerun only pushes, with the card of the finished run (no new trainer to lose its
    # figures), here under a bare id that the Hub completes with the user's namespace.
    class NoTrainer:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a push-only rerun built a trainer")

    import trl_sgpo.trainers.sgpo_trainer as sgpo_trainer  # the method registry builds SGPO rounds from here

    monkeypatch.setattr(sgpo_trainer, "SGPOTrainer", NoTrainer)
    shutil.rmtree(tmp_path / "hub")
    argv[argv.index("me/tiny-sgpo")] = "tiny-sgpo"
    summary = recipe.main(*parse(recipe, *argv))
    assert summary["pushed_to"] == "local-user/tiny-sgpo" and hub.uploads[-2]["files"] == PUSHED_FILES
    assert summary["items_pushed_to"] == "local-user/tiny-sgpo-items"
    check_pushed_items(tmp_path / "hub" / "local-user" / "tiny-sgpo-items", out / "stages" / "05_sgpo_iter1")
    card = (tmp_path / "hub" / "local-user" / "tiny-sgpo" / "README.md").read_text()
    assert "| pairs_made | 8 |" in card and 'model="local-user/tiny-sgpo"' in card
    assert card == (out / "README.md").read_text()


@pytest.mark.parametrize(
    ("skip", "stop_after"),
    [
        (["--improver_data", "improver.jsonl"], "filter"),
        (["--improver_data", "improver.jsonl"], "sample"),
        (["--skip_improver_sft"], "targets"),
        (["--skip_improver_sft"], "improver_sft"),
    ],
)
def test_stop_after_a_skipped_stage_is_refused_up_front(recipe, skip, stop_after):
    flag = skip[0]
    with pytest.raises(ValueError, match=rf"`--stop_after {stop_after}` names a stage that `{flag}` skips"):
        parse(recipe, *skip, "--stop_after", stop_after)


def test_unknown_settings_are_refused(recipe, tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("ppl_max_raito: 9\niterations: 2\n")
    with pytest.raises(ValueError, match=r"`ppl_max_raito` \(did you mean `ppl_max_ratio`\?\) in the --config file"):
        parse(recipe, "--config", str(config))
    with pytest.raises(ValueError, match=r"`ppl_max_raito` \(did you mean `ppl_max_ratio`\?\) on the command line"):
        parse(recipe, "--ppl_max_raito", "9")
    # YAML values are argparse defaults, which argparse does not check against the choices.
    config.write_text("stop_after: filtr\n")
    with pytest.raises(ValueError, match=r"`stop_after` must be one of .* got 'filtr'"):
        parse(recipe, "--config", str(config))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_saved_model_comes_from_the_gathered_state_dict(
    recipe, tiny_model_dir, prompt_file, tmp_path, monkeypatch, lora
):
    """Under ZeRO-3 and FSDP only `accelerator.get_state_dict` (on every rank) sees the full weights: the saved model
    must be built from it, not from the local module."""
    import torch
    from accelerate import Accelerator
    from safetensors.torch import load_file

    marked = "lora_B.default.weight" if lora else "model.norm.weight"
    get_state_dict = Accelerator.get_state_dict

    def gathered(self, model, unwrap=True):
        state_dict = get_state_dict(self, model, unwrap)
        # Weights the local module would not hold, marked to be found in the saved model.
        return {k: torch.full_like(v, 0.5) if k.endswith(marked) else v for k, v in state_dict.items()}

    monkeypatch.setattr(Accelerator, "get_state_dict", gathered)
    out = tmp_path / "run"
    argv = base_argv(tiny_model_dir, prompt_file, out) + ["--stop_after", "improver_sft"]
    if lora:
        argv += ["--use_peft", "--lora_r", "4", "--lora_alpha", "8"]
    recipe.main(*parse(recipe, *argv))
    saved = load_file(out / "stages" / "04_improver_sft" / "model" / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert set(saved) == set(base)
    if lora:
        # Merged q_proj = base + (alpha / r) * B @ A with the marked B: far from the base, which the trained B (a few
        # steps from zero) would barely move.
        name = "model.layers.0.self_attn.q_proj.weight"
        assert (saved[name] - base[name]).abs().max() > 1e-2
    else:
        assert torch.all(saved["model.norm.weight"] == 0.5)


def differing_settings(parsed, other) -> set[str]:
    """Names of the settings whose values differ between two parses of the recipe (every dataclass)."""
    import dataclasses

    return {
        f.name
        for a, b in zip(parsed, other)
        for f in dataclasses.fields(a)
        if getattr(a, f.name) != getattr(b, f.name)
    }


def test_yaml_config_spells_out_the_defaults_and_the_command_line_wins(recipe):
    config = str(RECIPE.parent / "configs" / "sgpo_smollm2.yaml")
    from_yaml = parse(recipe, "--config", config, "--iterations", "3")
    bare = parse(recipe)
    assert differing_settings(from_yaml, bare) <= {"iterations", "model_name_or_path"}
    assert from_yaml[0].iterations == 3 and from_yaml[2].model_name_or_path == "smollm2-135m-instruct"
    assert bare[1].learning_rate == 1e-4 and bare[1].activation_checkpointing is True
    assert bare[2].use_peft is True and bare[2].lora_target_modules == "all-linear" and bare[1].num_train_epochs == 1


def test_full_data_config_trains_on_every_row_not_held_out(recipe):
    from trl_sgpo.data.checks import load_default_dataset
    from trl_sgpo.data.splits import split_held_out

    config = str(RECIPE.parent / "configs" / "sgpo_smollm2_full.yaml")
    full, bare = parse(recipe, "--config", config), parse(recipe)
    assert differing_settings(full, bare) == {
        "output_dir",
        "num_improver_prompts",
        "num_sgpo_prompts",
        "improver_sft",
        "sample_batch_size",
    }
    train, _ = split_held_out(load_default_dataset(), bare[0].num_eval_prompts, bare[1].seed)
    assert full[0].num_improver_prompts == len(train)
    assert (full[0].num_sgpo_prompts, full[0].improver_sft["num_train_epochs"], full[0].sample_batch_size) == (
        64,
        2,
        64,
    )
    assert full[1].output_dir == "outputs/sgpo-smollm2-135m-full"


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
    # The LoRA settings are part of each training stage's settings.
    with pytest.raises(StageConfigMismatchError, match=r"'improver_sft' stage .*lora_alpha: 8 -> 16"):
        recipe.main(*parse(recipe, *argv[:-1], "16"))


def test_evaluation_stage_compares_every_model_on_held_out_prompts(recipe, tiny_model_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    argv = [*base_argv(tiny_model_dir, prompt_file, out), "--num_eval_prompts", "2", "--eval_max_new_tokens", "6"]
    summary = recipe.main(*parse(recipe, *argv))
    assert list(summary["stages"])[-1] == "evaluation"
    assert set(summary["stages"]["evaluation"]) >= {"win_rate/improver_sft", "win_rate/sgpo_iter1"}
    assert summary["evaluation"]["report"] == str(out / "evaluation" / "report.json")
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert report["baseline"] == "start" and list(report["comparisons"]) == ["improver_sft", "sgpo_iter1"]
    assert list(report["improver"]) == ["improver_sft"]  # the default: the improver that writes SGPO's pairs
    assert report["n_prompts"] == 2 and report["judge"].startswith("reference-similarity")
    # The rows carry references: ROUGE-L judges the same pairs as a second score.
    assert list(report["extra_judges"]["rouge_l"]["comparisons"]) == ["improver_sft", "sgpo_iter1"]
    # Held out: no evaluated prompt was sampled for improver data or trained on by SGPO.
    stage = out / "stages" / "06_evaluation"
    evaluated = {r["prompt"] for r in map(json.loads, open(stage / "answers" / "start" / "answers.jsonl"))}
    sampled = {r["prompt"] for r in map(json.loads, open(out / "stages" / "01_sample" / "responses.jsonl"))}
    all_prompts = {json.loads(line)["prompt"] for line in open(prompt_file)}
    assert len(evaluated) == 2 and not evaluated & sampled
    rows = [json.loads(line) for line in open(prompt_file)]
    from datasets import Dataset

    from trl_sgpo.data.splits import split_held_out

    assert evaluated == set(split_held_out(Dataset.from_list(rows), 2, seed=42)[1]["prompt"])  # the recipe's seed
    assert len(all_prompts - sampled - evaluated) == 4  # the SGPO prompts, also not evaluated
    card = (out / "README.md").read_text()
    assert card.count("## Evaluation") == 1 and "evaluation/win_rates.png" in card
    assert (out / "evaluation" / "win_rates.png").is_file()
    # A rerun redoes nothing and does not repeat the card section.
    summary = recipe.main(*parse(recipe, *argv))
    assert (out / "README.md").read_text().count("## Evaluation") == 1
    assert "Win rates on held-out prompts" in recipe.format_summary(summary)


def test_a_prompt_repeated_in_a_training_row_is_not_evaluated(recipe, tiny_model_dir, tmp_path):
    from datasets import Dataset

    from trl_sgpo.data.splits import split_held_out

    base = [{"prompt": f"What is {i} plus {i}?", "reference": f"It is {2 * i}."} for i in range(12)]
    # Repeat one prompt (another reference) so that one copy is held out and the other trains.
    for i in range(12):
        rows = [*base, {"prompt": base[i]["prompt"], "reference": "Another reference."}]
        train, held = split_held_out(Dataset.from_list(rows), 2, seed=42)
        if base[i]["prompt"] in held["prompt"] and base[i]["prompt"] in train["prompt"]:
            break
    else:
        pytest.fail("no repeated prompt falls on both sides of the split")
    data = tmp_path / "repeated.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = [*base_argv(tiny_model_dir, data, out), "--num_eval_prompts", "2", "--num_improver_prompts", "11"]
    recipe.main(*parse(recipe, *argv, "--eval_max_new_tokens", "4", "--eval_improver", "none"))
    answers = out / "stages" / "06_evaluation" / "answers" / "start" / "answers.jsonl"
    evaluated = [json.loads(line)["prompt"] for line in open(answers)]
    assert evaluated == [p for p in held["prompt"] if p != base[i]["prompt"]]


def test_eval_improver_names_the_models_judged_as_improvers():
    from trl_sgpo.pipeline.evaluation_stage import EvaluationArguments, improvers_to_judge

    models = ["start", "improver_sft", "sgpo_iter1", "sgpo_iter2"]
    assert improvers_to_judge("improver_sft", models) == ["improver_sft"]
    assert improvers_to_judge("final, start", models) == ["start", "sgpo_iter2"]
    assert improvers_to_judge("all", models) == models and improvers_to_judge("none", models) == []
    assert improvers_to_judge("improver_sft", ["start", "sppo_iter1"]) == []  # not trained: skipped
    with pytest.raises(ValueError, match=r"`eval_improver` 'True' names \['True'\]"):
        EvaluationArguments(eval_improver="True")


def test_held_out_rows_are_drawn_first_and_training_rows_wrap_around(recipe):
    from datasets import Dataset

    from trl_sgpo.data.splits import held_out_rows, split_held_out
    from trl_sgpo.pipeline.run import SGPOScriptArguments, _hold_out, _split

    data = Dataset.from_dict({"prompt": [f"q{i}" for i in range(12)], "reference": ["r"] * 12})
    train, held_out = _hold_out(data, 4, seed=0)
    assert len(held_out) == 4 and len(train) == 8 and not set(train["prompt"]) & set(held_out["prompt"])
    assert (
        held_out["prompt"] == split_held_out(data, 4, seed=0)[1]["prompt"] != split_held_out(data, 4, 1)[1]["prompt"]
    )
    assert _hold_out(data, 6, seed=0)[1] is not None and _hold_out(data, 7, seed=0)[1] is None  # needs 2x rows
    # SGPO takes the rows improver SFT left, then wraps around into the improver rows.
    args = SGPOScriptArguments(num_improver_prompts=5, num_sgpo_prompts=6, num_eval_prompts=4)
    improver, sgpo = _split(train, args, seed=0)
    assert len(improver) == 5 and len(sgpo) == 6 and len(set(sgpo["prompt"])) == 6
    assert set(train["prompt"]) - set(improver["prompt"]) <= set(sgpo["prompt"])
    improver_all, sgpo_all = _split(train, SGPOScriptArguments(num_improver_prompts=None, num_sgpo_prompts=None), 0)
    assert sorted(improver_all["prompt"]) == sorted(sgpo_all["prompt"]) == sorted(train["prompt"])
    # Rows of a given --improver_data are left out of the evaluation.
    assert held_out_rows(held_out, [held_out.select([0])])["prompt"] == held_out["prompt"][1:]
    with pytest.raises(ValueError, match="`num_sgpo_prompts` must be >= 1"):
        SGPOScriptArguments(num_sgpo_prompts=0)
    with pytest.raises(ValueError, match="`num_eval_prompts` must be >= 0"):
        SGPOScriptArguments(num_eval_prompts=-1)


def test_summary_prints_the_finished_share_of_drafts_and_improvements(recipe):
    summary = {
        "stages": {
            "sample": {"rows": 8, "finished": 6, "finished_frac": 0.75},
            "sgpo_iter1": {
                "pairs_made": 10,
                "pairs_kept": 4,
                "pairs_truncated_policy": 2,
                "pairs_truncated_improved": 5,
            },
        }
    }
    text = recipe.format_summary(summary)
    assert "drafts finished within max_new_tokens: 6/8 (75%)" in text
    assert "sgpo_iter1 finished within budget: drafts 8/10 (80%), improvements 5/10 (50%)" in text
    assert "kept 4 (40% of prompts gave a trained pair)" in text


def test_improver_sft_takes_every_sft_setting_over_the_demo_section(recipe, tmp_path):
    from trl_sgpo.pipeline.run import improver_sft_config

    sft = '{"lr_scheduler_type": "constant", "warmup_steps": 3, "max_grad_norm": 0.5, "seed": 7}'
    script_args, training_args, *_ = parse(recipe, "--improver_sft", sft, "--learning_rate", "0.5")
    config = improver_sft_config(script_args, training_args, tmp_path / "sft")
    assert (config.lr_scheduler_type, config.warmup_steps, config.max_grad_norm, config.seed) == (
        "constant",
        3,
        0.5,
        7,
    )
    # The command line changes the keys it names: the demo's others stay, and the rounds' learning rate is their own.
    assert (config.learning_rate, config.per_device_train_batch_size, config.num_train_epochs) == (3e-4, 1, 1)
    assert config.output_dir == str(tmp_path / "sft") and config.report_to == training_args.report_to
    # A --config file's section is merged over the demo's in the same way.
    extra = tmp_path / "sft.yaml"
    extra.write_text("improver_sft:\n  warmup_steps: 2\n")
    script_args = parse(recipe, "--config", str(extra))[0]
    assert script_args.improver_sft["warmup_steps"] == 2 and script_args.improver_sft["learning_rate"] == 3e-4


def test_settings_a_method_does_not_use_are_refused(recipe, tiny_model_dir, prompt_file, tmp_path):
    argv = [*base_argv(tiny_model_dir, prompt_file, tmp_path / "run"), "--method", "sppo", "--judge", "similarity"]
    with pytest.raises(ValueError, match=r"`beta` \(0.5\) does not apply to --method sppo.*\"sppo\": \{\"beta\""):
        recipe.main(*parse(recipe, *argv, "--beta", "0.5"))
    with pytest.raises(ValueError, match=r"`loss_type` \('ipo'\) does not apply to --method sso"):
        recipe.main(
            *parse(
                recipe,
                *base_argv(tiny_model_dir, prompt_file, tmp_path / "r2"),
                "--method",
                "sso",
                "--loss_type",
                "ipo",
            )
        )
    with pytest.raises(ValueError, match=r"`judge_margin` \(0.3\) does not apply to --method sppo \(`SPPOConfig`"):
        recipe.main(*parse(recipe, *argv, "--judge_margin", "0.3"))
    with pytest.raises(ValueError, match=r"`log_items` \(False\) does not apply to --method online_dpo"):
        recipe.main(*parse(recipe, *argv, "--method", "online_dpo", "--log_items", "false"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "r2").exists()
    # method_args is keyed by method, as in recipes/compare.py.
    with pytest.raises(ValueError, match=r"`method_args` has settings for \['sso'\], but --method is sppo"):
        parse(recipe, *argv, "--method_args", '{"sso": {"beta": 0.1}}')
    with pytest.raises(ValueError, match="`method_args` must map method names to objects of settings"):
        parse(recipe, *argv, "--method_args", '{"num_samples": 4}')
    assert parse(recipe, *argv, "--method_args", '{"sppo": {"num_samples": 4}}')[3].parsed_method_args() == {
        "num_samples": 4
    }
