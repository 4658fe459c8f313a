"""Stage fingerprints come from the configuration dataclasses' fields, minus the documented OUTPUT_NEUTRAL list."""

import dataclasses

import pytest
from trl import ModelConfig

from trl_sgpo import SGPOConfig
from trl_sgpo.pipeline import SGPOScriptArguments
from trl_sgpo.pipeline.fingerprints import (
    OUTPUT_NEUTRAL,
    SCRIPT_SETTINGS,
    TRAINING_STAGES,
    fingerprint,
    model_fingerprint,
    script_fingerprint,
)
from trl_sgpo.trainers.improver_sft_config import ImproverSFTConfig


@dataclasses.dataclass
class NewerSGPOConfig(SGPOConfig):
    """SGPOConfig as a later release might have it: one field more, which nobody listed."""

    brand_new_setting: float = 1.0


@dataclasses.dataclass
class NewerScriptArguments(SGPOScriptArguments):
    brand_new_setting: int = 0


def test_a_new_config_field_changes_the_fingerprint_unless_listed(tmp_path, monkeypatch):
    a = NewerSGPOConfig(output_dir=str(tmp_path), report_to="none")
    b = NewerSGPOConfig(output_dir=str(tmp_path), report_to="none", brand_new_setting=2.0)
    assert fingerprint(a) != fingerprint(b)
    # Listed as not changing any output: left out.
    assert fingerprint(a, neutral=OUTPUT_NEUTRAL | {"brand_new_setting"}) == fingerprint(
        b, neutral=OUTPUT_NEUTRAL | {"brand_new_setting"}
    )
    # Listed settings never count; others always do.
    quiet = NewerSGPOConfig(output_dir=str(tmp_path / "elsewhere"), report_to="none", logging_steps=7, save_steps=3)
    assert fingerprint(quiet) == fingerprint(a)
    assert fingerprint(dataclasses.replace(a, beta=0.5)) != fingerprint(a)


def test_a_new_recipe_setting_changes_every_stage_unless_listed():
    a, b = NewerScriptArguments(), NewerScriptArguments(brand_new_setting=1)
    for stage in TRAINING_STAGES:
        assert script_fingerprint(a, stage) != script_fingerprint(b, stage)
    # A listed setting changes its stage and the later ones only.
    c = NewerScriptArguments(ppl_max_ratio=9.0)
    changed = [s for s in TRAINING_STAGES if script_fingerprint(a, s) != script_fingerprint(c, s)]
    assert changed == ["filter", "improver_sft", "sgpo"]
    assert script_fingerprint(a, "sample") == script_fingerprint(NewerScriptArguments(num_threads=3), "sample")


def test_every_recipe_setting_is_placed_and_every_listed_name_exists():
    names = {f.name for f in dataclasses.fields(SGPOScriptArguments)}
    # Each recipe setting belongs to a stage or is listed as neutral: none lands in every stage by oversight.
    assert names <= set(SCRIPT_SETTINGS) | OUTPUT_NEUTRAL
    assert set(SCRIPT_SETTINGS) <= names and set(SCRIPT_SETTINGS.values()) <= set(TRAINING_STAGES)
    # A listed name that no configuration has any more is a stale entry (it would silently list nothing).
    every = names | {f.name for cls in (SGPOConfig, ImproverSFTConfig, ModelConfig) for f in dataclasses.fields(cls)}
    assert every >= OUTPUT_NEUTRAL, sorted(OUTPUT_NEUTRAL - every)


def test_the_improver_sft_section_is_recorded_under_the_recipe_setting_names():
    # The keys of earlier runs' stage folders: a finished run stays finished.
    base = SGPOScriptArguments()
    assert {k: v for k, v in script_fingerprint(base, "improver_sft").items() if k.startswith("improver_sft")} == {
        "improver_sft_max_length": 768,
        "improver_sft_epochs": 2.0,
        "improver_sft_learning_rate": 1e-5,
        "improver_sft_batch_size": 2,
        "improver_sft_gradient_accumulation_steps": 4,
    }
    # max_length changes the filter (it scores rows that long) and the stages after it; the others improver SFT on.
    shorter = SGPOScriptArguments(improver_sft={"max_length": 256})
    assert [s for s in TRAINING_STAGES if script_fingerprint(base, s) != script_fingerprint(shorter, s)] == [
        "filter",
        "improver_sft",
        "sgpo",
    ]
    faster = SGPOScriptArguments(improver_sft='{"learning_rate": 1e-3}')
    changed = [s for s in TRAINING_STAGES if script_fingerprint(base, s) != script_fingerprint(faster, s)]
    assert changed == ["improver_sft", "sgpo"] and faster.improver_sft["max_length"] == 768


def test_the_improver_sft_section_takes_improver_sft_config_fields_only():
    with pytest.raises(ValueError, match=r"`improver_sft` has `learning_rat` \(did you mean `learning_rate`\?\)"):
        SGPOScriptArguments(improver_sft={"learning_rat": 1e-3})
    with pytest.raises(ValueError, match="`improver_sft` may not set `output_dir`"):
        SGPOScriptArguments(improver_sft={"output_dir": "x"})
    with pytest.raises(ValueError, match="`improver_sft` must be a JSON object"):
        SGPOScriptArguments(improver_sft="{learning_rate: 1}")


def test_lora_settings_count_for_training_stages_of_lora_runs_only():
    plain, lora = ModelConfig(lora_r=4), ModelConfig(use_peft=True, lora_r=4)
    assert "lora_r" not in model_fingerprint(plain, "m", with_lora=True)
    assert "lora_r" not in model_fingerprint(lora, "m", with_lora=False)
    assert model_fingerprint(lora, "m", with_lora=True)["lora_r"] == 4


def test_evaluation_settings_never_make_a_training_stage_rerun():
    # A finished run evaluated again with another judge must not be refused at stage 1.
    base = SGPOScriptArguments()
    other = dataclasses.replace(
        base,
        judge_model="judge",
        eval_max_new_tokens=7,
        eval_improver="all",
    )
    for stage in TRAINING_STAGES:
        assert script_fingerprint(base, stage) == script_fingerprint(other, stage), stage


def test_the_held_out_size_changes_every_stage():
    # The held-out rows are drawn before the training rows: another size changes which rows every stage uses.
    base = SGPOScriptArguments()
    other = dataclasses.replace(base, num_eval_prompts=base.num_eval_prompts + 1)
    for stage in TRAINING_STAGES:
        assert script_fingerprint(base, stage) != script_fingerprint(other, stage), stage


def test_stage_folders_keep_the_names_finished_runs_have():
    from trl_sgpo.pipeline.stages import STAGE_FOLDERS, stage_folder

    # A rerun finds its finished stages by these names: another name would redo that stage in every existing run.
    assert [stage_folder(name) for name in STAGE_FOLDERS if name != "sgpo"] == [
        "01_sample",
        "02_targets",
        "03_filter",
        "04_improver_sft",
        "06_evaluation",
    ]
    assert stage_folder("sgpo", method="sppo", iteration=2) == "05_sppo_iter2"
    assert TRAINING_STAGES == ("sample", "targets", "filter", "improver_sft", "sgpo")
