"""Judges: the OpenAI judge against the local stub, the reward-model judge on a tiny classifier, the similarity judge on
the bundled embedder."""

import math

import pytest

from helpers.openai_stub import OpenAIStub
from helpers.recipes import load_recipe
from helpers.tiny import build_tiny_reward_model
from trl_sgpo.evaluation.judges import (
    OpenAIPairwiseJudge,
    PointwiseJudge,
    ReferenceSimilarityJudge,
    RewardModelJudge,
)


KEY = "sk-judge-test"


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("SGPO_JUDGE_KEY", KEY)


def make_judge(stub, **kw):
    defaults = dict(api_key_env="SGPO_JUDGE_KEY", backoff_base=0.01, backoff_max=0.05, timeout=5.0)
    defaults.update(kw)
    return OpenAIPairwiseJudge("judge-model", stub.base_url, **defaults)


PROMPTS = ["Q1?", "Q2?", "Q3?"]
LONG = ["A long and careful answer.", "Short.", "Same length!"]
SHORT = ["Brief.", "A much longer answer here.", "Same-length!"]


def test_asks_both_orders_and_cancels_position_bias(api_key):
    # The stub prefers the longer answer with p=0.8 and adds 0.1 to whatever is shown first.
    with OpenAIStub(api_key=KEY, judge_rule="longer", judge_strength=0.8, judge_bias=0.1) as stub:
        judge = make_judge(stub)
        got = judge.judge(PROMPTS, LONG, SHORT)
        assert len(stub.requests) == 6  # 3 pairs x 2 orders
        shown_first = [
            r["messages"][1]["content"].split("[Start of answer A]\n")[1].split("\n")[0] for r in stub.requests
        ]
        assert sorted(shown_first) == sorted(LONG + SHORT)
        assert all(r["logprobs"] is True and r["max_tokens"] == 1 for r in stub.requests)
    # a first: 0.8 + 0.1; a second: 1 - (0.2 + 0.1). The mean cancels the bias.
    assert got == pytest.approx([0.8, 0.2, 0.5])
    assert judge.stats.requests == 6 and judge.stats.written == 6


def test_reads_the_text_verdict_without_logprobs(api_key):
    with OpenAIStub(api_key=KEY, judge_rule="marker", logprobs=False) as stub:
        judge = make_judge(stub)
        got = judge.judge(["Q?", "Q?", "Q?"], ["good [[good]]", "plain", "x"], ["plain", "good [[good]]", "y"])
    # Without logprobs, each order gives a hard verdict; a tie shows A both times and averages to 0.5.
    assert got == [1.0, 0.0, 0.5]


def test_identical_answers_are_a_tie_without_a_request(api_key):
    with OpenAIStub(api_key=KEY) as stub:
        got = make_judge(stub).judge(["Q?"], ["same"], ["same "])
        assert got == [0.5] and stub.requests == []


def test_a_second_judge_call_sends_no_request_twice(api_key, tmp_path):
    with OpenAIStub(api_key=KEY) as stub:
        make_judge(stub, cache_path=tmp_path / "cache.jsonl").judge(PROMPTS[:2], LONG[:2], SHORT[:2])
        first = len(stub.requests)
        judge = make_judge(stub, cache_path=tmp_path / "cache.jsonl")  # a new process, the same cache file
        got = judge.judge(PROMPTS, LONG, SHORT)
        assert first == 4 and len(stub.requests) == 6  # only the new pair was asked
        assert judge.stats.cache_hits == 4
    assert got == pytest.approx([0.8, 0.2, 0.5])


def test_unanswerable_rows_abstain(api_key):
    with OpenAIStub(api_key=KEY) as stub:
        judge = make_judge(stub, max_retries=1)
        got = judge.judge(["Q? [[stub:500*inf]]", "Q2?"], ["long answer", "long answer"], ["short", "short"])
    assert math.isnan(got[0]) and got[1] == pytest.approx(0.8)
    assert judge.stats.failed == 2


def test_reward_model_judge_is_bradley_terry_on_a_tiny_classifier(tiny_tokenizer, tmp_path):
    build_tiny_reward_model(tiny_tokenizer).save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    judge = RewardModelJudge(str(tmp_path / "rm"), device="cpu", batch_size=2)
    prompts = ["What is 2+2?", "Name a colour."]
    a, b = ["It is 4.", "Blue."], ["Five, I think, or maybe more.", "Red is a colour."]
    ra, rb = judge.scores(prompts, a), judge.scores(prompts, b)
    assert len(set(ra + rb)) == 4  # a random model still gives distinct rewards
    got = judge.judge(prompts, a, b)
    assert got == pytest.approx([1 / (1 + math.exp(-(x - y))) for x, y in zip(ra, rb)])
    # Batched like one by one (padding must not change a reward).
    assert judge.scores(prompts[:1], a[:1]) == pytest.approx(ra[:1], abs=1e-5)
    reward = judge.as_reward_func()
    completions = [[{"role": "assistant", "content": t}] for t in a]
    assert reward(prompts, completions) == pytest.approx(ra, abs=1e-5)


@pytest.fixture(scope="module")
def similarity_judge():
    return ReferenceSimilarityJudge()


def test_similarity_judge_prefers_the_answer_closer_to_the_reference(similarity_judge):
    refs = ["Paris is the capital of France.", "Water boils at 100 degrees Celsius at sea level."]
    close = ["The capital of France is Paris.", "At sea level water boils at 100 °C."]
    far = ["I like turtles and long walks.", "Bananas are yellow."]
    got = similarity_judge.judge(["Capital of France?", "Boiling point?"], close, far, refs)
    assert all(p > 0.9 for p in got)
    assert similarity_judge.judge(["Q"], close[:1], close[:1], refs[:1]) == [0.5]
    s_close, s_far = similarity_judge.scores(["Q"] * 2, [close[0], far[0]], [refs[0]] * 2)
    assert got[0] == pytest.approx(1 / (1 + math.exp(-(s_close - s_far) / 0.05)))
    assert similarity_judge.scores(["Q"], [""], refs[:1]) == [-1.0]  # an empty answer is the farthest possible


def test_similarity_reward_func_reads_the_reference_column(similarity_judge):
    reward = similarity_judge.as_reward_func()
    got = reward(
        ["Q", "Q"], ["Paris is the capital of France.", "Bananas."], reference=["Paris is France's capital."] * 2
    )
    assert got[0] > got[1]
    with pytest.raises(ValueError, match="needs a non-empty `reference`"):
        reward(["Q"], ["Paris."])


def test_pointwise_judge_scores_each_answer_once():
    calls = []

    class Counting(PointwiseJudge):
        name = "counting"

        def scores(self, prompts, answers, references=None):
            calls.append(len(answers))
            return [float(len(a)) for a in answers]

    got = Counting().judge(["q", "q"], ["aaa", "a"], ["a", "a"])
    assert calls == [4]  # one batched call for both sides
    assert got == pytest.approx([1 / (1 + math.exp(-2)), 0.5])


def test_rouge_judge_is_rouge_l_f1_with_hard_verdicts():
    from trl_sgpo.evaluation.judges import ReferenceRougeJudge

    judge = ReferenceRougeJudge()
    # LCS("the cat sat", "The cat sat on the mat.") = 3 words: F1 = 2 * 3 / (3 + 6).
    assert judge.rouge_l("the cat sat", "The cat sat on the mat.") == pytest.approx(2 / 3)
    # A subsequence, not a substring: "cat ... mat" in order counts, "mat cat" counts one word.
    assert judge.rouge_l("cat mat", "the cat sat on the mat") == pytest.approx(2 * 2 / 8)
    assert judge.rouge_l("mat cat", "the cat sat on the mat") == pytest.approx(2 * 1 / 8)
    assert judge.rouge_l("", "the cat") == 0.0
    verdicts = judge.judge(
        ["q"] * 3, ["the cat sat", "dog", "cat"], ["dog", "the cat sat", "cat"], ["the cat sat"] * 3
    )
    assert verdicts == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="reference"):
        judge.judge(["q"], ["a"], ["b"], None)


def test_judge_prices_given_known_or_unknown(api_key):
    from trl_sgpo.evaluation.cli import build_judge
    from trl_sgpo.openai_client import KNOWN_PRICES_PER_1M

    given = OpenAIPairwiseJudge("my-judge", "http://localhost:1/v1", price_input_per_1m=1.0, price_output_per_1m=3.0)
    assert (given.price_input_per_1m, given.price_output_per_1m, given.price_source) == (1.0, 3.0, "prices given")
    # A known OpenAI model at api.openai.com, dated snapshot included: its list price, from the documented table.
    for name in ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"):
        judge = OpenAIPairwiseJudge(name)
        assert (judge.price_input_per_1m, judge.price_output_per_1m) == KNOWN_PRICES_PER_1M["gpt-4o-mini"]
    assert OpenAIPairwiseJudge("gpt-4-0613").price_output_per_1m == KNOWN_PRICES_PER_1M["gpt-4"][1]
    # Unknown model, or a known name at another endpoint: the cost is unknown, not $0.
    for judge in (OpenAIPairwiseJudge("Qwen/Qwen2.5-72B-Instruct"), OpenAIPairwiseJudge("gpt-4o", "http://x/v1")):
        assert judge.price_input_per_1m is None and "no price known" in judge.price_source
    with pytest.raises(ValueError, match="both `price_input_per_1m` and `price_output_per_1m`"):
        OpenAIPairwiseJudge("j", price_input_per_1m=1.0)

    from trl_sgpo.cli import build_parser

    argv = ["eval", "--model", "a=x", "--model", "b=y", "--output-dir", "o", "--judge", "openai"]
    argv += ["--judge-model", "j", "--base-url", "http://localhost:1/v1", "--api-key-env", "SGPO_JUDGE_KEY"]
    judge = build_judge(build_parser().parse_args(argv + ["--judge-price-in", "0.5", "--judge-price-out", "2"]))
    assert (judge.price_input_per_1m, judge.price_output_per_1m) == (0.5, 2.0)
    assert build_judge(build_parser().parse_args(argv)).price_input_per_1m is None


def test_the_recipe_passes_judge_prices_to_its_evaluation_judge(tmp_path):
    from types import SimpleNamespace

    from trl_sgpo.pipeline.evaluation_stage import EvaluationArguments, _judge

    endpoint = dict(judge_model="my-judge", base_url="http://localhost:1/v1", api_key_env="K", max_concurrency=1)
    script_args = SimpleNamespace(**endpoint, request_timeout=5.0, judge_price_in=0.5, judge_price_out=2.0)
    judge = _judge(script_args, tmp_path)
    assert (judge.price_input_per_1m, judge.price_output_per_1m) == (0.5, 2.0)
    unpriced = SimpleNamespace(**{**vars(script_args), "judge_price_in": None, "judge_price_out": None})
    assert _judge(unpriced, tmp_path).price_input_per_1m is None  # unknown model: cost unknown, not $0
    with pytest.raises(ValueError, match="both `judge_price_in` and `judge_price_out`"):
        EvaluationArguments(judge_price_in=1.0)


def test_one_judge_factory_builds_every_kind_and_names_the_missing_option(monkeypatch):
    from trl_sgpo.evaluation.arena_hard import ArenaHardJudge
    from trl_sgpo.evaluation.judge_factory import build_judge

    endpoint = dict(model="j", base_url="http://localhost:1/v1", api_key_env="SGPO_FACTORY_KEY")
    assert build_judge("none") is None
    monkeypatch.delenv("SGPO_FACTORY_KEY", raising=False)
    judge = build_judge("openai", **endpoint, read_api_key=False, max_retries=2, price_input_per_1m=1.0,
                        price_output_per_1m=2.0)  # fmt: skip
    assert type(judge) is OpenAIPairwiseJudge and judge.logprobs and judge.max_retries == 2
    assert (judge.price_input_per_1m, judge.price_output_per_1m) == (1.0, 2.0)
    with pytest.raises(ValueError, match="SGPO_FACTORY_KEY"):  # read before any answer is generated
        build_judge("openai", **endpoint)
    monkeypatch.setenv("SGPO_FACTORY_KEY", "x")
    arena = build_judge("openai", **endpoint, style="arena-hard")
    assert type(arena) is ArenaHardJudge and not arena.logprobs and arena.base_url == endpoint["base_url"]
    assert build_judge("openai", **endpoint, logprobs=False).logprobs is False
    with pytest.raises(ValueError, match="--judge openai needs --judge_model"):
        build_judge("openai")
    with pytest.raises(ValueError, match="--judge local needs --judge-model"):
        build_judge("local", flag_separator="-")
    with pytest.raises(ValueError, match="--judge reward-model needs --reward_model"):
        build_judge("reward-model")
    with pytest.raises(ValueError, match="applies to --judge openai only, not --judge similarity"):
        build_judge("similarity", style="arena-hard")
    with pytest.raises(ValueError, match="must be one of"):
        build_judge("gpt")


def test_the_recipes_share_the_judge_settings():
    import dataclasses

    from trl_sgpo.pipeline.methods import JudgeArguments, MethodArguments

    compare = load_recipe("compare")
    assert issubclass(compare.CompareArguments, JudgeArguments) and issubclass(MethodArguments, JudgeArguments)
    compare_args = compare.CompareArguments(judge="reward-model", reward_model="rm", similarity_temperature=0.2)
    method_args = compare_args.method_arguments("online_dpo")
    judge_fields = [f.name for f in dataclasses.fields(JudgeArguments)]
    assert [getattr(method_args, name) for name in judge_fields] == ["reward-model", "rm", 0.2]
    assert compare_args.method_arguments("sso").judge == "none"
    with pytest.raises(ValueError, match="the comparison judges every method"):
        compare.CompareArguments(judge="none")
