"""evaluate_models, `trl-sgpo eval` and the training callback on tiny random models, judged by the local stub."""

import json
import math
from types import SimpleNamespace

import pytest
from datasets import Dataset

from helpers.openai_stub import OpenAIStub
from helpers.tiny import build_tiny_model
from trl_sgpo.evaluation import evaluate_models
from trl_sgpo.evaluation.answers import TransformersGenerator, VLLMGenerator, generate_answers
from trl_sgpo.evaluation.callbacks import WinRateCallback
from trl_sgpo.evaluation.judges import OpenAIPairwiseJudge, PairwiseJudge, PointwiseJudge


KEY = "sk-eval-test"


def prompts(n=6):
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"Question number {i}?"}] for i in range(n)],
            "reference": [f"Reference {i}." for i in range(n)],
            "category": ["math" if i % 2 else "chat" for i in range(n)],
        }
    )


class ScriptedGenerator:
    """An answer generator that answers from a function of the rendered prompt (known, distinct answers)."""

    def __init__(self, name, answer):
        self.name, self.answer = name, answer

    def render(self, prompt):
        return prompt if isinstance(prompt, str) else prompt[-1]["content"]

    def generate(self, texts, seed):
        return [(self.answer(t), 5, True) for t in texts]


class LengthJudge(PointwiseJudge):
    """Longer wins, offline (counts its calls)."""

    name = "length"

    def __init__(self):
        self.calls = 0

    def scores(self, prompts, answers, references=None):
        self.calls += 1
        return [len(a) / 10 for a in answers]


def test_generate_answers_resumes_and_exports_alpaca_eval(tmp_path, tiny_model, tiny_tokenizer):
    gen = TransformersGenerator(tiny_model, tiny_tokenizer, max_new_tokens=8, name="tiny")
    out = tmp_path / "a" / "answers.jsonl"
    first = generate_answers(gen, prompts(3), out, batch_size=2, show_progress=False)
    calls = []
    original = gen.generate
    gen.generate = lambda texts, seed: calls.append(len(texts)) or original(texts, seed)
    again = generate_answers(gen, prompts(5), out, batch_size=2, show_progress=False)
    assert calls == [2]  # only the two new rows
    assert again["answer"][:3] == first["answer"]
    exported = json.loads((tmp_path / "a" / "model_outputs.json").read_text())
    assert [e["instruction"] for e in exported] == [f"Question number {i}?" for i in range(5)]
    assert exported[0]["output"] == first["answer"][0] and exported[0]["generator"] == "tiny"
    assert exported[1]["dataset"] == "math"


def test_vllm_generator_seam_with_a_stand_in(tmp_path, tiny_tokenizer):
    class Params(SimpleNamespace):
        pass

    class FakeLLM:
        def get_tokenizer(self):
            return tiny_tokenizer

        def generate(self, texts, params, use_tqdm=False):
            self.params = params
            out = SimpleNamespace(text=" hi ", token_ids=[1, 2], finish_reason="length")
            return [SimpleNamespace(outputs=[out]) for _ in texts]

    llm = FakeLLM()
    gen = VLLMGenerator(llm, max_new_tokens=7, sampling_params_cls=Params)
    rows = generate_answers(gen, prompts(2), tmp_path / "answers.jsonl", show_progress=False)
    assert rows["answer"] == ["hi", "hi"] and rows["answer_finished"] == [False, False]
    assert llm.params.max_tokens == 7 and llm.params.temperature == 0.0


def test_evaluate_models_with_the_openai_judge_resumes_without_asking_twice(tmp_path, monkeypatch):
    monkeypatch.setenv("SGPO_EVAL_KEY", KEY)

    def base_answer(text):  # drafts, and as improver: the draft itself, so base's improvements tie
        return "Draft." if "### Draft answer" not in text else "Draft."

    def new_answer(text):  # longer on questions 0-3, shorter on 4-5; as improver: adds a sentence
        if "### Draft answer" in text:
            return text.split("### Draft answer\n")[1] + " More."
        number = int(text.split("number ")[1].rstrip("?"))
        return "A longer answer." if number < 4 else "No."

    models = {"base": ScriptedGenerator("base", base_answer), "new": ScriptedGenerator("new", new_answer)}
    kwargs = dict(batch_size=4, n_bootstrap=50, show_progress=False, improver=True)
    with OpenAIStub(api_key=KEY, judge_rule="longer") as stub:

        def judge():
            return OpenAIPairwiseJudge("j", stub.base_url, api_key_env="SGPO_EVAL_KEY", timeout=5.0)

        report = evaluate_models(models, prompts(6), judge(), tmp_path, **kwargs)
        sent = len(stub.requests)
        assert sent > 0
        # Interrupted after the answers and judgments: a rerun (new judge, same folder) sends nothing.
        again = evaluate_models(models, prompts(6), judge(), tmp_path, **kwargs)
        assert len(stub.requests) == sent
        # Deleting the judgments leaves the request cache: still nothing sent.
        for path in (tmp_path / "judgments").iterdir():
            path.unlink()
        evaluate_models(models, prompts(6), judge(), tmp_path, **kwargs)
        assert len(stub.requests) == sent
    assert again["comparisons"] == report["comparisons"]
    assert sent == 2 * 6 + 2 * 6  # both orders of 6 comparisons, and of new's 6 improvements; base's tie unasked
    s = report["comparisons"]["new"]
    assert s["win_rate"] == pytest.approx((4 * 0.8 + 2 * 0.2) / 6)
    assert (s["wins"], s["ties"], s["losses"]) == (4, 0, 2)
    assert s["per_category"]["chat"]["win_rate"] == pytest.approx((2 * 0.8 + 0.2) / 3)  # questions 0, 2, 4
    assert report["improver"]["new"]["win_rate"] == pytest.approx(0.8)
    assert report["improver"]["base"]["win_rate"] == 0.5 and report["improver"]["base"]["ties"] == 6
    for name in ("report.json", "report.md", "win_rates.png", "lengths.png"):
        assert (tmp_path / name).is_file(), name
    assert "| new |" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["baseline"] == "base"


def test_improver_requests_use_the_improver_template(tmp_path, tiny_model, tiny_tokenizer):
    seen = []
    gen = TransformersGenerator(tiny_model, tiny_tokenizer, max_new_tokens=4, name="t")
    render = gen.render
    gen.render = lambda p: seen.append(p) or render(p)
    rows = Dataset.from_dict({"prompt": ["What is 1+1?"], "draft": ["It is 3."]})
    generate_answers(gen, rows, tmp_path / "imp.jsonl", improve=True, show_progress=False)
    assert "### Draft answer\nIt is 3." in seen[0] and "What is 1+1?" in seen[0]


def test_a_saved_model_is_asked_to_improve_with_its_own_template(tmp_path, tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from trl_sgpo.templates import ImproverTemplate

    folder = tmp_path / "improver"
    tiny_model.save_pretrained(folder)
    ImproverTemplate(instruction="Polish this draft, one step.").save_pretrained(folder)
    gen = TransformersGenerator(AutoModelForCausalLM.from_pretrained(folder), tiny_tokenizer, max_new_tokens=4)
    seen = []
    render = gen.render
    gen.render = lambda p: seen.append(p) or render(p)
    rows = Dataset.from_dict({"prompt": ["What is 1+1?"], "draft": ["It is 3."]})
    generate_answers(gen, rows, tmp_path / "imp.jsonl", improve=True, show_progress=False)
    assert "Polish this draft, one step." in str(seen[0])


def test_cli_eval_end_to_end_on_tiny_models(tmp_path, tiny_model, tiny_tokenizer, tiny_model_dir, capsys):
    from trl_sgpo.cli import main

    other = tmp_path / "other"
    build_tiny_model(tiny_tokenizer, seed=2).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    data = tmp_path / "prompts.jsonl"
    rows = prompts(4)
    with open(data, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    trainer_state = tmp_path / "trainer_state.json"
    trainer_state.write_text(
        json.dumps({"log_history": [{"step": 1, "loss": 0.7, "rewards/margins": 0.1}, {"step": 2, "loss": 0.6}]})
    )
    argv = [
        "-q",
        "eval",
        "--model",
        f"base={tiny_model_dir}",
        "--model",
        f"new={other}",
        "--prompts",
        str(data),
        "--output-dir",
        str(tmp_path / "eval"),
        "--max-new-tokens",
        "8",
        "--n-bootstrap",
        "50",
        "--trainer-state",
        f"new={trainer_state}",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["judge"].startswith("reference-similarity") and report["n_prompts"] == 4
    assert 0 <= report["comparisons"]["new"]["win_rate"] <= 1
    assert (tmp_path / "eval" / "training_curves.png").is_file()
    assert "vs base" in capsys.readouterr().out
    # Bad input: a clear error, exit 1.
    assert main(["eval", "--model", f"base={tiny_model_dir}", "--prompts", str(data), "--output-dir", "x"]) == 1
    assert "at least two --model" in capsys.readouterr().err


def test_win_rate_callback_logs_against_the_start_model(tiny_model, tiny_tokenizer):
    logged = []
    trainer = SimpleNamespace(
        args=SimpleNamespace(eval_steps=2, logging_steps=1),
        state=SimpleNamespace(max_steps=4),
        model=tiny_model,
        processing_class=tiny_tokenizer,
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
        log=logged.append,
    )
    judge = LengthJudge()
    callback = WinRateCallback(judge, trainer, prompts(3), max_new_tokens=6, n_bootstrap=20)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    callback.on_train_begin(None, state, None, model=tiny_model)
    for step in (1, 2, 3):
        state.global_step = step
        callback.on_step_end(None, state, None, model=tiny_model)
    assert [h["step"] for h in callback.history] == [2]
    # The model did not change: it ties with itself.
    assert logged[0]["eval_win_rate"] == 0.5 and not math.isnan(logged[0]["eval_avg_length"])
    state.global_step = 4
    callback.on_step_end(None, state, None, model=tiny_model)
    callback.on_train_end(None, state, None, model=tiny_model)  # step 4 already evaluated: not twice
    assert [h["step"] for h in callback.history] == [2, 4] and len(logged) == 2


def test_judgments_on_disk_are_not_judged_again(tmp_path):
    models = {
        "base": ScriptedGenerator("base", lambda t: "Base."),
        "new": ScriptedGenerator("new", lambda t: "Newer!"),
    }
    judge = LengthJudge()
    kwargs = dict(n_bootstrap=20, show_progress=False, plots=False)
    first = evaluate_models(models, prompts(4), judge, tmp_path, **kwargs)
    assert judge.calls == 1
    evaluate_models(models, prompts(4), judge, tmp_path, **kwargs)
    assert judge.calls == 1  # every row already judged on these very texts
    evaluate_models(models, prompts(5), judge, tmp_path, **kwargs)
    assert judge.calls == 2  # only the new row
    assert first["comparisons"]["new"]["win_rate"] == pytest.approx(1 / (1 + math.exp(-0.1)))


def test_abstentions_are_asked_again_on_a_rerun(tmp_path):
    class FlakyJudge(PairwiseJudge):
        """Abstains on its first call (a request that failed for good), answers afterwards."""

        name = "flaky"

        def __init__(self):
            self.calls = 0

        def judge(self, prompts, answers_a, answers_b, references=None):
            self.calls += 1
            return [math.nan if self.calls == 1 else 1.0 for _ in prompts]

    models = {"base": ScriptedGenerator("base", lambda t: "Base."), "new": ScriptedGenerator("new", lambda t: "New.")}
    judge = FlakyJudge()
    kwargs = dict(n_bootstrap=20, show_progress=False, plots=False)
    evaluate_models(models, prompts(3), judge, tmp_path, **kwargs)
    report = evaluate_models(models, prompts(3), judge, tmp_path, **kwargs)
    assert judge.calls == 2 and report["comparisons"]["new"]["win_rate"] == 1.0


def test_an_extra_judge_scores_the_same_pairs_and_shows_in_the_tables(tmp_path):
    from trl_sgpo.evaluation.judges import ReferenceRougeJudge
    from trl_sgpo.evaluation.reports import markdown_table, text_table

    # "new" copies the reference (ROUGE-L 1) but is shorter than "base", which shares no word with it: the two
    # judges disagree, so each column must come from its own judge.
    models = {
        "base": ScriptedGenerator("base", lambda t: "Something else entirely, and at length."),
        "new": ScriptedGenerator("new", lambda t: "Reference " + t.split()[-1].rstrip("?") + "."),
    }
    kwargs = dict(n_bootstrap=20, show_progress=False, plots=False, improver=True)
    report = evaluate_models(
        models, prompts(4), LengthJudge(), tmp_path, extra_judges={"rouge_l": ReferenceRougeJudge()}, **kwargs
    )
    assert report["comparisons"]["new"]["win_rate"] < 0.5
    rouge = report["extra_judges"]["rouge_l"]
    assert rouge["judge"] == "reference-rouge-l" and rouge["comparisons"]["new"]["win_rate"] == 1.0
    assert set(rouge["improver"]) == {"base", "new"}
    assert (tmp_path / "judgments" / "rouge_l" / "new.jsonl").is_file()
    table = markdown_table(report)
    assert "| rouge_l win rate % (SE) [95% CI] |" in table
    new_row = next(line for line in table.splitlines() if line.startswith("| new |"))
    assert new_row.endswith("| 100.0 (0.0) [100.0, 100.0] |") and new_row.count("|") == 11  # 9 columns + the extra
    text_row = next(line for line in text_table(report).splitlines() if line.startswith("new "))
    assert "rouge_l [CI]" in text_table(report) and text_row.rstrip().endswith("100.0 (0.0) [100.0, 100.0]")
    # A model the extra judge did not judge gets n/a in its column, keeping the columns aligned.
    del report["extra_judges"]["rouge_l"]["comparisons"]["new"]
    new_row = next(line for line in markdown_table(report).splitlines() if line.startswith("| new |"))
    assert new_row.endswith("| n/a |") and new_row.count("|") == 11
    with pytest.raises(TypeError, match="not a string"):
        evaluate_models(models, prompts(4), LengthJudge(), tmp_path, **{**kwargs, "improver": "new"})
    with pytest.raises(ValueError, match=r"`improver` names \['old'\]"):
        evaluate_models(models, prompts(4), LengthJudge(), tmp_path, **{**kwargs, "improver": ["old"]})


def _no_bare_constants(name):
    raise AssertionError(f"report.json holds a bare {name}, which is not JSON")


def test_report_counts_cut_answers_prices_the_judge_and_is_valid_json(tmp_path, monkeypatch):
    monkeypatch.setenv("SGPO_EVAL_KEY", KEY)

    class Cut(ScriptedGenerator):
        def generate(self, texts, seed):  # questions 0 and 1 hit the token budget
            return [(self.answer(t), 5, "number 0?" not in t and "number 1?" not in t) for t in texts]

    # The new model is longer on every prompt by about the same amount and the judge prefers longer answers: the
    # length-controlled win rate is not identified (nan in memory, null in report.json, n/i in report.md).
    models = {
        "base": ScriptedGenerator("base", lambda t: "Draft."),
        "new": Cut("new", lambda t: f"A longer answer to {t}"),
    }
    kwargs = dict(n_bootstrap=50, show_progress=False)
    with OpenAIStub(api_key=KEY, judge_rule="longer") as stub:
        endpoint = dict(api_key_env="SGPO_EVAL_KEY", timeout=5.0)
        priced = OpenAIPairwiseJudge("j", stub.base_url, price_input_per_1m=2.0, price_output_per_1m=8.0, **endpoint)
        evaluate_models(models, prompts(6), priced, tmp_path / "priced", **kwargs)
        evaluate_models(
            models, prompts(6), OpenAIPairwiseJudge("j", stub.base_url, **endpoint), tmp_path / "unpriced", **kwargs
        )

    report = json.loads((tmp_path / "priced" / "report.json").read_text(), parse_constant=_no_bare_constants)
    s = report["comparisons"]["new"]
    assert s["lc_identified"] is False and s["lc_win_rate"] is None and "longer" in s["lc_reason"]
    assert s["win_rate"] > 0.5 and s["se"] > 0 and s["lc_length_slope"] is not None
    assert (report["models"]["new"]["cut_at_budget"], report["models"]["base"]["cut_at_budget"]) == (2, 0)
    cost = report["judge_cost"]
    assert cost["prompt_tokens"] > 0 and cost["price_source"] == "prices given"
    assert cost["usd"] == pytest.approx((2.0 * cost["prompt_tokens"] + 8.0 * cost["completion_tokens"]) / 1e6)

    md = (tmp_path / "priced" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    row = next(line for line in md.splitlines() if line.startswith("| new |"))
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")], strict=True))
    assert cells["cut at budget"] == "2/6"
    assert cells["length-controlled % (SE) [95% CI]"] == "n/i (1)"
    assert cells["win rate % (SE) [95% CI]"].startswith(f"{100 * s['win_rate']:.1f} ({100 * s['se']:.1f}) [")
    assert cells["length slope [95% CI]"].startswith(f"{s['lc_length_slope']:+.2f} [")
    assert "1. new: length not identified: the model's answer is longer" in md
    assert "**base**, 0/6 of its answers cut at the token budget" in md
    assert f"Judge cost: ${cost['usd']:.4f}" in md

    unpriced = json.loads((tmp_path / "unpriced" / "report.json").read_text(), parse_constant=_no_bare_constants)
    assert unpriced["judge_cost"]["usd"] is None and unpriced["judge_cost"]["prompt_tokens"] > 0
    assert unpriced["judge_stats"]["cost_usd"] is None and report["judge_stats"]["cost_usd"] == cost["usd"]
    assert "Judge cost: unknown" in (tmp_path / "unpriced" / "report.md").read_text()


def test_judge_cost_counts_only_the_evaluations_requests(tmp_path, monkeypatch):
    # The recipe hands its training judge to the evaluation: the requests it sent in training are not this run's.
    monkeypatch.setenv("SGPO_EVAL_KEY", KEY)
    models = {
        "base": ScriptedGenerator("base", lambda t: "Draft."),
        "new": ScriptedGenerator("new", lambda t: f"A longer answer to {t}"),
    }
    with OpenAIStub(api_key=KEY, judge_rule="longer") as stub:
        prices = dict(price_input_per_1m=1.0, price_output_per_1m=0.0)
        judge = OpenAIPairwiseJudge("j", stub.base_url, api_key_env="SGPO_EVAL_KEY", timeout=5.0, **prices)
        judge.judge(["training prompt"] * 3, ["a", "bb", "ccc"], ["dddd", "e", "ff"])  # "training"
        trained = judge.stats.as_dict()
        assert trained["requests"] > 0 and trained["prompt_tokens"] > 0
        report = evaluate_models(models, prompts(4), judge, tmp_path, n_bootstrap=20, show_progress=False)
        sent = len(stub.requests) - trained["requests"]
    cost, stats = report["judge_cost"], report["judge_stats"]
    assert sent > 0 and cost["requests"] == stats["requests"] == sent
    assert stats["rows"] == judge.stats.rows - trained["rows"]
    assert cost["prompt_tokens"] == judge.stats.prompt_tokens - trained["prompt_tokens"]
    assert cost["usd"] == pytest.approx(cost["prompt_tokens"] / 1e6)
