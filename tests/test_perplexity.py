import json
import math

import pytest
import torch
from datasets import Dataset, load_from_disk

from helpers.tiny import build_tiny_model
from trl_sgpo.data.perplexity import (
    PerplexityFilterConfig,
    _encode,
    completion_nll,
    drop_reasons,
    filter_targets,
    perplexities,
    score_targets,
)
from trl_sgpo.io.jsonl import read_jsonl


KNOWN = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def fox_model(tiny_tokenizer_session):
    """The tiny random model after a few steps on one sentence: that sentence becomes likely, other text is not."""
    tokenizer = tiny_tokenizer_session
    model = build_tiny_model(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    batch = tokenizer([KNOWN] * 4, return_tensors="pt")
    for _ in range(15):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def reference_nll(model, tokenizer, prompt, completion, max_length=1024):
    prompt_ids, completion_ids = _encode(tokenizer, prompt, completion, max_length)
    ids = torch.tensor([prompt_ids + completion_ids])
    labels = ids.clone()
    labels[0, : len(prompt_ids)] = -100
    with torch.no_grad():
        return model(ids, labels=labels).loss.item(), len(completion_ids)


def test_batched_scores_equal_one_sequence_at_a_time(tiny_model, tiny_tokenizer):
    prompts = ["Hi", [{"role": "user", "content": "Explain why the sky is blue, please."}], "Question: 1 + 1?", "Q"]
    completions = [
        "Hello! How can I help you today?",
        "Sunlight scatters.",
        "2",
        "A good answer is correct and clear.",
    ]
    scores = completion_nll(tiny_model, tiny_tokenizer, prompts, completions, batch_size=3)
    for (total, n), p, c in zip(scores, prompts, completions, strict=True):
        mean, expected_n = reference_nll(tiny_model, tiny_tokenizer, p, c)
        assert n == expected_n
        assert total / n == pytest.approx(mean, rel=1e-4)
    # The end of turn is scored too: "<|im_end|>" after conversational answers, the EOS after standard ones.
    assert scores[2][1] == len(tiny_tokenizer("2<|im_end|>", add_special_tokens=False)["input_ids"])


def test_long_sequences_lose_the_prompt_first(tiny_model, tiny_tokenizer):
    prompt, completion = "word " * 50, "The sea is wide and blue."
    full_prompt = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tiny_tokenizer(completion + tiny_tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert len(full) < 11
    prompt_ids, completion_ids = _encode(tiny_tokenizer, prompt, completion, max_length=12)
    assert completion_ids == full and prompt_ids == full_prompt[-(12 - len(full)) :]
    prompt_ids, completion_ids = _encode(tiny_tokenizer, prompt, completion, max_length=4)
    assert completion_ids == full[:3] and prompt_ids == full_prompt[-1:]  # one prompt token still conditions
    [(total, n)] = completion_nll(tiny_model, tiny_tokenizer, [prompt], [completion], max_length=12)
    assert total / n == pytest.approx(reference_nll(tiny_model, tiny_tokenizer, prompt, completion, 12)[0], rel=1e-4)


def test_perplexity_tracks_what_the_model_knows(fox_model, tiny_tokenizer):
    known, edited, garbage = perplexities(
        fox_model,
        tiny_tokenizer,
        ["Write a sentence."] * 3,
        [KNOWN, "The quick red fox jumps over the lazy dog.", "zq#x9 vv!!k 77 QQ jjj ~~ xk zzz"],
    )
    assert known < edited < 2 * known < garbage / 10


def scored(rows):
    return Dataset.from_list(rows)


def test_drop_rule_order_and_thresholds():
    base = {"prompt": "q", "response": "r", "reference": "ref", "response_ppl": 10.0}
    rows = [
        {**base, "target": "ok", "target_ppl": 25.0},  # ratio 2.5
        {**base, "target": "  ", "target_ppl": 1.0},
        {**base, "target": " r ", "target_ppl": 1.0},
        {**base, "target": "ref", "target_ppl": 1.0},
        {**base, "target": "far", "target_ppl": 40.0},  # ratio 4
        {**base, "target": "nan", "target_ppl": math.nan},
        {**base, "target": "high", "response_ppl": 100.0, "target_ppl": 150.0},
    ]
    reasons, _ = drop_reasons(scored(rows), PerplexityFilterConfig(max_ratio=3.0))
    assert reasons == [None, "empty_target", "same_as_response", "copies_reference", "ppl_ratio", "nonfinite", None]
    reasons, thresholds = drop_reasons(scored(rows), PerplexityFilterConfig(max_ratio=None, max_quantile=0.5))
    assert thresholds["response_ppl_quantile"] == 10.0
    assert reasons[0] == "ppl_quantile" and reasons[4] == "ppl_quantile" and reasons[6] == "ppl_quantile"
    reasons, _ = drop_reasons(
        scored(rows), PerplexityFilterConfig(max_ratio=None, max_ppl=30.0, drop_same_as_response=False)
    )
    assert reasons[:5] == [None, "empty_target", None, "copies_reference", "ppl_max"]
    with pytest.raises(ValueError, match="max_quantile"):
        PerplexityFilterConfig(max_quantile=1.5)


def test_filter_keeps_plausible_targets_and_drops_the_rest(tmp_path, fox_model, tiny_tokenizer):
    prompt = [{"role": "user", "content": "Write a sentence."}]
    rows = Dataset.from_dict(
        {
            "id": ["edit", "garbage", "same", "copy", "empty"],
            "prompt": [prompt] * 5,
            "response": [KNOWN] * 5,
            "reference": ["A fox jumped."] * 5,
            "target": [
                "The quick red fox jumps over the lazy dog.",
                "zq#x9 vv!!k 77 QQ jjj ~~ xk zzz",
                KNOWN,
                "A fox jumped.",
                "",
            ],
        }
    )
    kept, _ = filter_targets(
        fox_model,
        tiny_tokenizer,
        rows,
        tmp_path,
        PerplexityFilterConfig(max_ratio=5.0),
        batch_size=2,
        show_progress=False,
    )
    assert kept["id"] == ["edit"]
    assert 1 < kept["ppl_ratio"][0] < 5
    report = json.loads((tmp_path / "filter_report.json").read_text())
    assert report["kept"] == 1 and report["dropped_by_reason"] == {
        "ppl_ratio": 1,
        "same_as_response": 1,
        "copies_reference": 1,
        "empty_target": 1,
    }
    dropped = {r["id"]: r["drop_reason"] for r in read_jsonl(tmp_path / "dropped.jsonl")}
    assert dropped["garbage"] == "ppl_ratio"
    on_disk = load_from_disk(str(tmp_path / "improver_sft"))
    assert on_disk["id"] == ["edit"] and {"prompt", "response", "target", "target_ppl"} <= set(on_disk.column_names)
    assert [r["id"] for r in read_jsonl(tmp_path / "improver_sft.jsonl")] == ["edit"]

    # New thresholds on the same rows: no model call, only the rule is applied again.
    forward = fox_model.forward
    fox_model.forward = lambda *a, **k: pytest.fail("rescored a row already in scores.jsonl")
    try:
        kept, _ = filter_targets(
            fox_model, tiny_tokenizer, rows, tmp_path, PerplexityFilterConfig(max_ratio=1e9), show_progress=False
        )
    finally:
        fox_model.forward = forward
    assert kept["id"] == ["edit", "garbage"]


def test_scoring_resumes_from_its_output(tmp_path, tiny_model, tiny_tokenizer):
    rows = Dataset.from_dict({"prompt": [f"q{i}" for i in range(5)], "response": ["a"] * 5, "target": ["b"] * 5})
    out = tmp_path / "scores.jsonl"
    first = score_targets(tiny_model, tiny_tokenizer, rows.select(range(3)), out, show_progress=False)
    calls = []
    forward = tiny_model.forward
    tiny_model.forward = lambda *a, **k: calls.append(k["input_ids"].size(0)) or forward(*a, **k)
    try:
        again = score_targets(tiny_model, tiny_tokenizer, rows, out, show_progress=False)
    finally:
        tiny_model.forward = forward
    assert calls == [4]  # two new rows, a response and a target each
    assert again["target_ppl"][:3] == first["target_ppl"] and len(read_jsonl(out)) == 5


def test_filter_needs_targets(tmp_path, tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"missing the column\(s\) \['target'\]"):
        filter_targets(tiny_model, tiny_tokenizer, Dataset.from_dict({"prompt": ["q"], "response": ["a"]}), tmp_path)


def test_filter_returns_its_report_and_replaces_an_earlier_kept_set(tmp_path, tiny_model, tiny_tokenizer):
    rows = Dataset.from_dict({"prompt": ["q0", "q1"], "response": ["a", "a"], "target": ["b", "c"]})
    kept, report = filter_targets(
        tiny_model, tiny_tokenizer, rows, tmp_path, PerplexityFilterConfig(max_ratio=None), show_progress=False
    )
    assert len(kept) == 2 and report == json.loads((tmp_path / "filter_report.json").read_text())
    assert report["rows"] == report["kept"] == 2 and (tmp_path / "improver_sft").is_dir()
    # A stricter rule keeps nothing: the earlier kept set must not stay behind.
    kept, report = filter_targets(
        tiny_model, tiny_tokenizer, rows, tmp_path, PerplexityFilterConfig(max_ppl=1e-9), show_progress=False
    )
    assert len(kept) == 0 and report["dropped_by_reason"] == {"ppl_max": 2}
    assert not (tmp_path / "improver_sft").exists()


def test_a_kept_set_that_cannot_be_removed_is_an_error(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    from trl_sgpo.data import perplexity

    rows = Dataset.from_dict({"prompt": ["q0"], "response": ["a"], "target": ["b"]})
    (tmp_path / "improver_sft").mkdir()  # a set from an earlier run

    def rmtree(path, ignore_errors=False, **kwargs):  # a removal that fails, e.g. permission denied
        if not ignore_errors:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(perplexity.shutil, "rmtree", rmtree)
    with pytest.raises(PermissionError):
        filter_targets(tiny_model, tiny_tokenizer, rows, tmp_path, PerplexityFilterConfig(max_ppl=1e-9))
