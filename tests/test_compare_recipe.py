"""recipes/compare.py end to end on a tiny model, and recipes/sgpo.py --method for SPPO and SSO."""

import json

import pytest

from helpers.recipes import load_recipe
from trl_sgpo.evaluation.judges import PointwiseJudge


class LengthJudge(PointwiseJudge):
    """Offline stand-in judge: longer answers win (pointwise, so it also serves as online DPO's reward)."""

    name = "length"

    def scores(self, prompts, answers, references=None):
        return [float(len(str(a))) for a in answers]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    with open(path, "w") as f:
        for i in range(16):
            row = {"prompt": f"What is {i} plus {i}?", "reference": f"{i} plus {i} is {2 * i}."}
            f.write(json.dumps(row) + "\n")
    return path


def common_argv(model_dir, data, out):
    return [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
        "--num_improver_prompts", "4", "--num_sgpo_prompts", "4", "--max_steps", "1", "--max_new_tokens", "6",
        "--improver_sft", '{"num_train_epochs": 1}', "--ppl_max_ratio", "1000", "--logging_steps", "1", "--sample_batch_size", "4",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
    ]  # fmt: skip


def test_compare_trains_every_method_and_writes_one_table_and_plot(tiny_model_dir, prompt_file, tmp_path, capsys):
    compare = load_recipe("compare")
    out = tmp_path / "cmp"
    argv = common_argv(tiny_model_dir, prompt_file, out) + [
        "--num_eval_prompts", "4", "--eval_max_new_tokens", "6", "--n_bootstrap", "50",
        "--method_args", json.dumps({"sppo": {"num_samples": 2}}),
    ]  # fmt: skip
    args = compare.make_parser().parse_args_and_config(argv)
    result = compare.main(*args, judge=LengthJudge())

    methods = ["sgpo", "sppo", "sso", "online_dpo"]
    assert list(result["results"]) == methods
    # Each method trained from the same start on the training rows only; SGPO alone ran the improver stages.
    assert list(result["results"]["sgpo"]["stages"]) == ["sample", "targets", "filter", "improver_sft", "sgpo_iter1"]
    for name in methods[1:]:
        assert list(result["results"][name]["stages"]) == [f"{name}_iter1"]
        assert (out / name / "model.safetensors").is_file()
    train = [json.loads(line)["prompt"] for line in open(out / "data" / "train.jsonl")]
    held_out = [json.loads(line)["prompt"] for line in open(out / "data" / "eval.jsonl")]
    assert len(held_out) == 4 and len(train) == 12 and not set(map(str, held_out)) & set(map(str, train))
    # SPPO's round used the method's own settings, not SGPO's beta.
    sppo_stage = json.loads((out / "sppo" / "stages" / "05_sppo_iter1" / "stage.json").read_text())
    assert sppo_stage["settings"]["method_args"] == {"num_samples": 2}

    report = result["report"]
    assert report["baseline"] == "start" and set(report["comparisons"]) == set(methods)
    table = (out / "comparison.md").read_text()
    for name in methods:
        assert f"| {name} |" in table
    assert (
        "win rate vs start % (SE) [95% CI]" in table and "LC win rate % (SE)" in table and "train wall time" in table
    )
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["start", *methods]
    assert all(r["train_seconds"] > 0 for r in rows[1:])
    assert (out / "comparison.png").stat().st_size > 0
    assert "| sso |" in capsys.readouterr().out
    # Five models: ranked by Bradley-Terry in both tables.
    assert {m["model"] for m in report["ranking"]["models"]} == {"start", *methods}
    assert "Bradley-Terry ranking" in table and "Bradley-Terry ranking" in (out / "eval" / "report.md").read_text()
    assert json.loads((out / "comparison.json").read_text())["ranking"]["baseline"] == "start"


def test_sgpo_recipe_method_flag_skips_the_improver_stages(tiny_model_dir, prompt_file, tmp_path, capsys):
    recipe = load_recipe("sgpo")
    out = tmp_path / "sso"
    summary = recipe.main(*recipe.parse_args(common_argv(tiny_model_dir, prompt_file, out) + ["--method", "sso"]))
    assert list(summary["stages"]) == ["sso_iter1"]
    printed = capsys.readouterr().out
    assert "needs no improver: skipping stages sample, targets, filter and improver_sft" in printed
    card = (out / "README.md").read_text()
    assert "2410.17131" in card and "- sso" in card

    with pytest.raises(ValueError, match="needs a judge"):
        recipe.parse_args(common_argv(tiny_model_dir, prompt_file, out) + ["--method", "sppo"])
    with pytest.raises(ValueError, match="uses no judge"):
        recipe.parse_args(common_argv(tiny_model_dir, prompt_file, out) + ["--method", "sso", "--judge", "similarity"])


def test_compare_evaluation_judge_options(monkeypatch, tiny_model_dir):
    compare = load_recipe("compare")
    base = ["--output_dir", "o", "--judge", "openai", "--judge_model", "j", "--base_url", "http://127.0.0.1:9/v1"]
    base += ["--writer_model", "w"]  # the recipe shares --base_url between the writer and the judge
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    endpoint = ["--judge_price_in", "1.5", "--judge_price_out", "6"]
    endpoint += ["--max_concurrency", "3", "--request_timeout", "7"]
    argv = [*base, *endpoint, "--judge_style", "arena-hard"]
    compare_args, script_args, *_ = compare.make_parser().parse_args_and_config(argv)
    training = object()
    arena = compare.evaluation_judge(compare_args, script_args, training)
    assert type(arena).__name__ == "ArenaHardJudge" and arena.model == "j" and arena.base_url == script_args.base_url
    # The user's prices and request settings reach the evaluation's judge (its cost is otherwise unknown or wrong).
    assert (arena.price_input_per_1m, arena.price_output_per_1m, arena.price_source) == (1.5, 6.0, "prices given")
    assert (arena.max_concurrency, arena.timeout) == (3, 7.0)
    trained = compare_args.build_judge(script_args)  # the training judge: the same endpoint settings
    assert (trained.price_input_per_1m, trained.max_concurrency, trained.timeout) == (1.5, 3, 7.0)
    compare_args, script_args, *_ = compare.make_parser().parse_args_and_config(base)
    assert compare.evaluation_judge(compare_args, script_args, training) is training
    local = ["--output_dir", "o", "--eval_judge", "local", "--local_judge_model", str(tiny_model_dir)]
    compare_args, script_args, *_ = compare.make_parser().parse_args_and_config(local)
    judge = compare.evaluation_judge(compare_args, script_args, training)
    assert type(judge).__name__ == "LocalPairwiseJudge" and judge.name == f"local:{tiny_model_dir}"
    with pytest.raises(ValueError, match="applies to `judge openai`"):
        compare.make_parser().parse_args_and_config(["--output_dir", "o", "--judge_style", "arena-hard"])
    with pytest.raises(ValueError, match="needs `local_judge_model`"):
        compare.make_parser().parse_args_and_config(["--output_dir", "o", "--eval_judge", "local"])


def test_compare_refuses_stop_after(tiny_model_dir, prompt_file, tmp_path):
    compare = load_recipe("compare")
    argv = [*common_argv(tiny_model_dir, prompt_file, tmp_path), "--stop_after", "sgpo"]
    parsed = compare.make_parser().parse_args_and_config(argv)
    with pytest.raises(ValueError, match="`--stop_after sgpo`: the comparison evaluates every method's final model"):
        compare.main(*parsed)
    assert not (tmp_path / "data").exists()  # refused before any work


def test_comparison_table_shows_standard_errors():
    compare = load_recipe("compare")
    row = dict(method="sgpo", win_rate=0.625, ci_low=0.5, ci_high=0.75, se=0.061, lc_win_rate=0.58, lc_se=0.052)
    row.update(lc_identified=True, lc_reason=None, wins=5, ties=0, losses=3, avg_length=120.0, train_seconds=60.0)
    unknown = {**row, "method": "sso", "se": None, "lc_se": float("nan")}
    table = compare.markdown([row, unknown], {"n_prompts": 8, "judge": "length", "confidence": 0.95})
    assert "| method | win rate vs start % (SE) [95% CI] | LC win rate % (SE) |" in table
    assert "| sgpo | 62.5 (6.1) [50.0, 75.0] | 58.0 (5.2) | 5 / 0 / 3 | 120 | 1.0 min |" in table
    assert "| sso | 62.5 (n/a) [50.0, 75.0] | 58.0 (n/a) |" in table


def test_the_held_out_rows_read_references_from_reference_column(tmp_path):
    from test_gpu_config import ultrafeedback_like

    compare = load_recipe("compare")
    data = ultrafeedback_like(tmp_path / "uf.jsonl", n=8)
    argv = [
        "--output_dir",
        "o",
        "--dataset_name",
        str(data),
        "--reference_column",
        "chosen",
        "--num_eval_prompts",
        "3",
    ]
    compare_args, script_args, training_args, _ = compare.make_parser().parse_args_and_config(argv)
    train_rows, eval_rows = compare.split_rows(script_args, compare_args, training_args.seed)
    # The similarity and ROUGE judges score the held-out answers against these: the chat's last assistant message.
    assert len(eval_rows) == 3 and len(train_rows) == 5
    assert all(row["reference"].endswith(".") and " plus " in row["reference"] for row in eval_rows)
