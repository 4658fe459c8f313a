"""The Arena-Hard style judge against the local stub, with scripted verdicts."""

import json
import math
import re

import pytest

from helpers.openai_stub import OpenAIStub
from trl_sgpo.evaluation.arena_hard import REASK_PROMPT, ArenaHardJudge, parse_verdict


KEY = "sk-arena-test"
ANSWER = re.compile(r"<<<Answer of assistant ([AB])>>>\n(.*?)\n<<<End of answer", re.DOTALL)


def label_for(a: str, b: str) -> str:
    """The verdict of a consistent judge on answers carrying `quality N`: a gap of 2+ is strong, 1 weak."""
    gap = int(a.split("quality ")[1][0]) - int(b.split("quality ")[1][0])
    return {2: "A>>B", 1: "A>B", 0: "A=B", -1: "B>A", -2: "B>>A"}[max(-2, min(2, gap))]


def scripted(body):
    """Replies of a judge: own answer, reasoning, verdict. Answers marked `unclear` get no verdict on the first ask;
    an answer marked `never` shown as A gets none at all."""
    messages = body["messages"]
    answers = dict(ANSWER.findall(messages[1]["content"]))
    label = label_for(answers["A"], answers["B"])
    if "never" in answers["A"]:
        return "My own answer would be short. I cannot say which is better."
    if messages[-1]["content"] == REASK_PROMPT:
        return f"[[{label}]]"
    if "unclear" in answers["A"] + answers["B"]:
        return "My own answer: 4.\n\nBoth answers have merits; it is hard to say."
    # An early label in the reasoning, the final one last: the last one counts.
    return f"My own answer: 4.\n\nAt first sight [[A=B]], but on a closer look A and B differ.\n\nFinal verdict: [[{label}]]"


def judge(stub, tmp_path=None, **kwargs):
    cache = tmp_path / "cache.jsonl" if tmp_path is not None else None
    return ArenaHardJudge("judge", stub.base_url, api_key_env="SGPO_ARENA_KEY", cache_path=cache, timeout=5, **kwargs)


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("SGPO_ARENA_KEY", KEY)


def test_parse_verdict_takes_the_last_label_and_its_fallbacks():
    assert parse_verdict("first [[A>B]] then, final verdict: [[B>>A]]") == "B>>A"
    assert parse_verdict("My final verdict is [[b=a]].") == "A=B"
    assert parse_verdict("Final verdict: [A<<B]") == "B>>A"  # single brackets when no double ones
    assert parse_verdict("[[C>A]] and [[A>B]] and [[nonsense]]") == "A>B"
    assert parse_verdict("no verdict at all") is None and parse_verdict(None) is None


def test_five_level_verdicts_in_both_orders_map_to_preferences():
    prompts = ["Q1", "Q2", "Q3", "Q4", "Q5"]
    a = ["x quality 3", "x quality 2", "x quality 1", "x quality 1", "same quality 1"]
    b = ["y quality 1", "y quality 1", "y quality 1", "y quality 3", "same quality 1"]
    with OpenAIStub(api_key=KEY, reply=scripted) as stub:
        j = judge(stub)
        p = j.judge(prompts, a, b)
        assert len(stub.requests) == 8  # two games for each pair but the identical one
        swapped = j.judge(prompts, b, a)
        requests = stub.requests
    assert p == [1.0, 1.0, 0.5, 0.0, 0.5]  # a weak win in both games is a win, as in Arena-Hard's battles
    assert swapped == [1 - v for v in p]
    assert j.stats.games == 16 and j.stats.reasked == 0 and j.stats.dropped == 0
    assert j.stats.verdicts["A>>B"] == 4 and j.stats.verdicts["B>>A"] == 4 and j.stats.verdicts["A=B"] == 4
    first = requests[0]
    assert first["temperature"] == 0.0 and first["max_tokens"] == 4096 and "logprobs" not in first
    assert "your own answer" in first["messages"][0]["content"] and "[[A>>B]]" in first["messages"][0]["content"]
    # Game 2 shows the pair the other way round.
    shown = [dict(ANSWER.findall(r["messages"][1]["content"]))["A"] for r in requests[:8]]
    assert sorted(shown[:2]) == ["x quality 3", "y quality 1"]


def games(first: str, second: str):
    """A judge that gives `first` when the model's answer (`m ...`) is shown as A, `second` when it is shown as B."""

    def reply(body):
        answers = dict(ANSWER.findall(body["messages"][1]["content"]))
        return f"Final verdict: [[{first if answers['A'].startswith('m ') else second}]]"

    return reply


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("A>B", "B>A", 1.0),  # weak wins in both games: a full win, not 0.75
        ("A>>B", "A>B", 0.75),  # a strong win (3 battles won), then a weak loss (1 lost): (3 * 1 + 1 * 0) / 4
        ("B>A", "A>>B", 0.0),
        ("A=B", "B>>A", (0.5 + 3 * 1) / 4),  # a tie is one battle scored 0.5
        ("A=B", "A=B", 0.5),
    ],
)
def test_a_prompts_preference_weighs_its_games_as_arena_hard_counts_battles(first, second, expected):
    with OpenAIStub(api_key=KEY, reply=games(first, second)) as stub:
        assert judge(stub).judge(["Q"], ["m answer"], ["b answer"]) == [pytest.approx(expected)]


def test_a_position_biased_judge_is_cancelled_by_the_swapped_game():
    with OpenAIStub(api_key=KEY, reply=lambda body: "Final verdict: [[A>B]]") as stub:
        assert judge(stub).judge(["Q"], ["x quality 3"], ["y quality 1"]) == [0.5]


def test_an_unreadable_verdict_is_asked_again_once_and_a_rerun_asks_nothing(tmp_path):
    with OpenAIStub(api_key=KEY, reply=scripted) as stub:
        j = judge(stub, tmp_path)
        assert j.judge(["Q"], ["unclear quality 3"], ["y quality 2"]) == [1.0]
        assert len(stub.requests) == 4 and j.stats.reasked == 2 and j.stats.dropped == 0
        reask = stub.requests[-1]["messages"]
        assert [m["role"] for m in reask] == ["system", "user", "assistant", "user"]
        assert "hard to say" in reask[2]["content"] and reask[3]["content"] == REASK_PROMPT
        again = judge(stub, tmp_path)
        assert again.judge(["Q"], ["unclear quality 3"], ["y quality 2"]) == [1.0]
        assert len(stub.requests) == 4 and again.stats.cache_hits == 4
    cached = [json.loads(line) for line in (tmp_path / "cache.jsonl").read_text().splitlines()]
    assert len(cached) == 4  # every reply, readable or not, is kept


def test_a_game_without_a_verdict_after_the_reask_is_dropped_and_counted():
    with OpenAIStub(api_key=KEY, reply=scripted) as stub:
        j = judge(stub)
        # `never` shown as A (game 1 here) never gets a verdict: the prompt is judged by game 2 alone.
        p = j.judge(["Q", "R"], ["never quality 3", "never quality 1"], ["y quality 1", "never quality 2"])
        assert len(stub.requests) == 4 + 3  # 4 games, and a re-ask for game 1 of Q and both games of R
    assert p[0] == 1.0  # game 2: B>>A with the model as B
    assert math.isnan(p[1])  # both games of R unreadable: an abstention
    assert j.stats.reasked == 3 and j.stats.dropped == 3 and j.stats.failed == 3 and j.stats.written == 1


def by_length(body):
    """A judge that prefers the longer answer: strongly when it is twice as long."""
    answers = dict(ANSWER.findall(body["messages"][1]["content"]))
    a, b = len(answers["A"]), len(answers["B"])
    label = "A=B" if a == b else ("A>>B" if a >= 2 * b else "A>B") if a > b else ("B>>A" if b >= 2 * a else "B>A")
    return f"My own answer first.\n\nThen the comparison.\n\nMy final verdict: [[{label}]]"


def test_cli_eval_arena_hard_end_to_end_against_the_stub(tmp_path, tiny_tokenizer, capsys):
    from helpers.tiny import build_tiny_model
    from trl_sgpo.cli import main

    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"prompt": f"Question number {i}?"}) + "\n")
    argv = ["-q", "eval", "--prompts", str(tmp_path / "prompts.jsonl"), "--output-dir", str(tmp_path / "eval")]
    for seed in (0, 1, 2):
        build_tiny_model(tiny_tokenizer, seed=seed).save_pretrained(tmp_path / f"m{seed}")
        tiny_tokenizer.save_pretrained(tmp_path / f"m{seed}")
        argv += ["--model", f"m{seed}={tmp_path / f'm{seed}'}"]
    # Sampled (seeded): the random tiny models answer greedily with the same empty text.
    argv += [
        "--max-new-tokens",
        "6",
        "--temperature",
        "1.0",
        "--n-bootstrap",
        "20",
        "--device",
        "cpu",
        "--api-key-env",
        "SGPO_ARENA_KEY",
    ]
    with OpenAIStub(api_key=KEY, reply=by_length) as stub:
        argv += ["--judge", "openai", "--judge-style", "arena-hard", "--base-url", stub.base_url, "--judge-model", "j"]
        assert main(argv) == 0
        asked = len(stub.requests)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["judge"] == "arena-hard:j"
    stats = report["judge_stats"]
    assert asked > 0 and stats["games"] == asked and stats["reasked"] == stats["dropped"] == 0
    assert sum(stats["verdicts"].values()) == asked
    markdown = (tmp_path / "eval" / "report.md").read_text()
    assert "Bradley-Terry" in markdown and f"Arena-Hard games judged in this run: {asked} (A>>B " in markdown
    assert (tmp_path / "eval" / "ranking.png").is_file()
    bad = ["eval", "--model", "a=x", "--model", "b=y", "--output-dir", "o", "--judge-style", "arena-hard"]
    assert main(bad) == 1
    assert "applies to --judge openai only" in capsys.readouterr().err


def test_the_request_cache_tells_endpoints_apart(tmp_path):
    # Two servers serving a model of the same name, one cache file: the second server's judge must be asked, not
    # answered from the first one's replies.
    with OpenAIStub(api_key=KEY, reply=lambda body: "[[A>>B]]") as first:
        assert judge(first, tmp_path).judge(["Q"], ["x"], ["y"]) == [0.5]  # a position-biased judge, both games
    with OpenAIStub(api_key=KEY, reply=lambda body: "[[A=B]]") as second:
        j = judge(second, tmp_path)
        assert j.judge(["Q"], ["x"], ["y"]) == [0.5]
        assert len(second.requests) == 2 and j.stats.verdicts["A=B"] == 2
