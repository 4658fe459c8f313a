"""One setting, one name: `trl-sgpo` and the recipe spell the settings they share alike."""

import dataclasses

import pytest

from trl_sgpo import SGPOConfig
from trl_sgpo.cli import build_parser
from trl_sgpo.pipeline import SGPOScriptArguments


SHARED = {
    "writer_model",
    "base_url",
    "api_key_env",
    "max_concurrency",
    "request_timeout",
    "step_fraction",
    "sample_batch_size",
    "ppl_max_ratio",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
}


def cli_options(command: str) -> dict[str, list[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.dest: a.option_strings for a in sub._actions}


def test_the_cli_and_the_recipe_share_names():
    recipe = {f.name for cls in (SGPOScriptArguments, SGPOConfig) for f in dataclasses.fields(cls)}
    options = cli_options("improver-data")
    assert recipe >= SHARED
    for name in SHARED:
        # The CLI's first spelling is the recipe's name with dashes (the recipe takes that spelling too).
        assert options[name][0] == "--" + name.replace("_", "-"), (name, options.get(name))


def test_the_unreleased_older_cli_spellings_are_gone():
    for old in ("--batch-size", "--timeout", "--max-ratio"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["improver-data", "--output-dir", "x", old, "3"])


def test_eval_spells_the_request_timeout_as_the_recipe_does(monkeypatch):
    from trl_sgpo.evaluation.cli import build_judge

    options = cli_options("eval")
    assert options["request_timeout"] == ["--request-timeout"] and "timeout" not in options
    monkeypatch.setenv("SGPO_TIMEOUT_KEY", "x")
    argv = ["eval", "--model", "a=x", "--model", "b=y", "--prompts", "p.jsonl", "--output-dir", "o"]
    argv += ["--judge", "openai", "--judge-model", "j", "--api-key-env", "SGPO_TIMEOUT_KEY", "--request-timeout", "7"]
    assert build_judge(build_parser().parse_args(argv)).timeout == 7.0
    assert build_judge(build_parser().parse_args(argv[:-2])).timeout == 120.0  # the recipe's default


def test_eval_offers_every_judge_kind_and_style_of_the_factory():
    from trl_sgpo.evaluation.judge_factory import JUDGE_KINDS, JUDGE_STYLES

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["eval"]
    choices = {a.dest: a.choices for a in sub._actions}
    assert tuple(choices["judge"]) == tuple(k for k in JUDGE_KINDS if k != "none")
    assert tuple(choices["judge_style"]) == JUDGE_STYLES
