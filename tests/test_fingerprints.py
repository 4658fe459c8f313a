"""Stage fingerprints come from the configuration dataclasses' fields, minus the documented OUTPUT_NEUTRAL list."""

import dataclasses

import pytest
from trl import ModelConfig

from trl_sgpo import SGPOConfig
from trl_sgpo.pipeline import SGPOScriptArguments
from trl_sgpo.pipeline.fingerprints import (
    OUTPUT_NEUTRAL,
    SCRIPT_SETTINGS,
    STAGE_ORDER,
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
    for stage in STAGE_ORDER:
        assert script_fingerprint(a, stage) != script_fingerprint(b, stage)
    # A listed setting changes its stage and the later ones only.
    c = NewerScriptArguments(ppl_max_ratio=9.0)
    changed = [s for s in STAGE_ORDER if script_fingerprint(a, s) != script_fingerprint(c, s)]
    assert changed == ["filter", "improver_sft", "sgpo"]
    assert script_fingerprint(a, "sample") == script_fingerprint(NewerScriptArguments(num_threads=3), "sample")


def test_every_recipe_setting_is_placed_and_every_listed_name_exists():
    names = {f.name for f in dataclasses.fields(SGPOScriptArguments)}
    # Each recipe setting belongs to a stage or is listed as neutral: none lands in every stage by oversight.
    assert names <= set(SCRIPT_SETTINGS) | OUTPUT_NEUTRAL
    assert set(SCRIPT_SETTINGS) <= names and set(SCRIPT_SETTINGS.values()) <= set(STAGE_ORDER)
    # A listed name that no configuration has any more is a stale entry (it would silently list nothing).
    every = names | {f.name for cls in (SGPOConfig, ImproverSFTConfig, ModelConfig) for f in dataclasses.fields(cls)}
    assert every >= OUTPUT_NEUTRAL, sorted(OUTPUT_NEUTRAL - every)


def test_deprecated_aliases_resolve_to_the_one_name():
    with pytest.warns(FutureWarning, match="`target_model` is deprecated; use `writer_model`"):
        args = SGPOScriptArguments(target_model="gpt-x", offline_fraction=0.25)
    assert (args.writer_model, args.step_fraction, args.target_model, args.offline_fraction) == (
        "gpt-x",
        0.25,
        None,
        None,
    )
    assert script_fingerprint(args, "targets") == script_fingerprint(
        SGPOScriptArguments(writer_model="gpt-x", step_fraction=0.25), "targets"
    )


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
    for stage in STAGE_ORDER:
        assert script_fingerprint(base, stage) == script_fingerprint(other, stage), stage


def test_the_held_out_size_changes_every_stage():
    # The held-out rows are drawn before the training rows: another size changes which rows every stage uses.
    base = SGPOScriptArguments()
    other = dataclasses.replace(base, num_eval_prompts=base.num_eval_prompts + 1)
    for stage in STAGE_ORDER:
        assert script_fingerprint(base, stage) != script_fingerprint(other, stage), stage
