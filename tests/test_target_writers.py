"""Target writers against a real local HTTP server (helpers.openai_stub.OpenAIStub) through the real `openai` client."""

import errno
import json
import logging

import pytest
from datasets import Dataset

from helpers.openai_stub import OpenAIStub
from trl_sgpo.data.target_prompts import (
    MalformedTargetError,
    TargetPromptConfig,
    build_target_messages,
    parse_target,
)
from trl_sgpo.data.target_writers import (
    OpenAITargetWriter,
    ReferenceStepWriter,
    TargetWriterAbort,
    TransformersTargetWriter,
    reference_step,
    split_sentences,
    write_targets,
)
from trl_sgpo.io import jsonl
from trl_sgpo.io.jsonl import ROW_ID, read_jsonl, stable_hash


KEY = "sk-test-SECRET-0123456789"


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("SGPO_TEST_KEY", KEY)
    return KEY


@pytest.fixture
def stub():
    with OpenAIStub(api_key=KEY) as server:
        yield server


def rows(n, markers=None):
    markers = markers or {}
    return Dataset.from_dict(
        {
            "id": [f"r{i}" for i in range(n)],
            "prompt": [f"Question {i}? {markers.get(i, '')}".strip() for i in range(n)],
            "response": [f"Answer {i} is short." for i in range(n)],
            "reference": [f"Reference answer {i}. It is complete." for i in range(n)],
        }
    )


def make_writer(stub, **kw):
    defaults = dict(api_key_env="SGPO_TEST_KEY", backoff_base=0.01, backoff_max=0.05, timeout=5.0)
    defaults.update(kw)
    return OpenAITargetWriter("stub-model", stub.base_url, **defaults)


def failures(tmp_path):
    return {f[ROW_ID]: f["reason"] for f in read_jsonl(tmp_path / "targets.failures.jsonl", missing_ok=True)}


def test_writes_parsed_targets_and_accounts_tokens_and_cost(tmp_path, stub, api_key):
    writer = make_writer(stub, price_input_per_1m=2.0, price_output_per_1m=10.0, temperature=0.3, max_tokens=99)
    out = write_targets(writer, rows(5), tmp_path / "targets.jsonl", show_progress=False)
    assert out["id"] == [f"r{i}" for i in range(5)]
    assert out["target"][0] == "Answer 0 is short. It is also worth adding one clarifying detail."  # tag stripped
    assert set(out["target_writer"]) == {"openai:stub-model"}
    body = stub.requests[0]
    assert body["model"] == "stub-model" and body["temperature"] == 0.3 and body["max_tokens"] == 99
    user = body["messages"][-1]["content"]
    assert "## Current answer\nAnswer" in user and "## Reference answer\nReference answer" in user
    stats = writer.stats
    assert stats.requests == len(stub.requests) == 5 and stats.retries == 0 and stats.written == 5
    assert stats.prompt_tokens == sum(out["target_prompt_tokens"]) > 0
    assert stats.completion_tokens == sum(out["target_completion_tokens"]) > 0
    assert stats.cost_usd == pytest.approx((stats.prompt_tokens * 2.0 + stats.completion_tokens * 10.0) / 1e6)
    assert len(read_jsonl(tmp_path / "targets.cache.jsonl")) == 5


def test_retries_429_500_timeouts_and_malformed_bodies(tmp_path, stub, api_key):
    markers = {
        0: "[[stub:429*2]]",
        1: "[[stub:500*1]]",
        2: "[[stub:slow=3*1]]",
        3: "[[stub:malformed*1]]",
        4: "[[stub:nochoices*1]]",
        5: "[[stub:503*1]]",
    }
    writer = make_writer(stub, timeout=1.0, max_retries=3)
    out = write_targets(writer, rows(7, markers), tmp_path / "targets.jsonl", show_progress=False)
    assert len(out) == 7 and failures(tmp_path) == {}
    for i, marker in markers.items():
        expected = 3 if i == 0 else 2
        assert stub.count(marker) == expected, marker
    assert writer.stats.retries == 2 + 1 + 1 + 1 + 1 + 1
    assert writer.stats.requests == 7 + writer.stats.retries


def test_failures_are_recorded_then_retried_without_resending_successes(tmp_path, stub, api_key):
    markers = {0: "[[stub:500*inf]]", 1: "[[stub:400*1]]", 2: "[[stub:empty*1]]", 3: "[[stub:length*1]]"}
    ds = rows(6, markers)
    writer = make_writer(stub, max_retries=2)
    out = write_targets(writer, ds, tmp_path / "targets.jsonl", show_progress=False)
    assert out["id"] == ["r4", "r5"]
    reasons = failures(tmp_path)
    assert set(reasons) == {"r0", "r1", "r2", "r3"}
    assert "gave up after 3 attempts" in reasons["r0"] and "HTTP 500" in reasons["r0"]
    assert reasons["r1"].startswith("HTTP 400")
    assert "empty" in reasons["r2"] and "cut off" in reasons["r3"]
    assert stub.count("[[stub:500*inf]]") == 3 and stub.count("[[stub:400*1]]") == 1  # 4xx: no retry

    # A rerun retries the failed rows only; the answers already paid for are never asked again.
    stub.reset_counters()
    writer = make_writer(stub, max_retries=2)
    out = write_targets(writer, ds, tmp_path / "targets.jsonl", show_progress=False)
    assert out["id"] == ["r1", "r2", "r3", "r4", "r5"]
    assert stub.count("Question 4?") == stub.count("Question 5?") == 0
    assert stub.count("[[stub:400*1]]") == stub.count("[[stub:empty*1]]") == stub.count("[[stub:length*1]]") == 1
    assert writer.stats.rows == 4 and writer.stats.written == 3 and writer.stats.failed == 1


def test_cache_answers_an_interrupted_run_without_any_request(tmp_path, stub, api_key):
    ds = rows(8)
    write_targets(make_writer(stub), ds, tmp_path / "targets.jsonl", show_progress=False)
    assert len(stub.requests) == 8
    # The run "crashed" after caching the answers but before writing some rows: the rows are lost, the answers not.
    lines = (tmp_path / "targets.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "targets.jsonl").write_text("".join(lines[:3]) + lines[3][:20])
    writer = make_writer(stub)
    out = write_targets(writer, ds, tmp_path / "targets.jsonl", show_progress=False)
    assert len(out) == 8 and len(stub.requests) == 8  # not one more request
    assert writer.stats.cache_hits == 5 and writer.stats.requests == 0
    assert sum(out["target_cached"]) == 5
    # Each request is keyed by its exact content: another sampling parameter is a new request.
    (tmp_path / "targets.jsonl").unlink()
    write_targets(make_writer(stub, temperature=0.1), ds.select([0]), tmp_path / "targets.jsonl", show_progress=False)
    assert len(stub.requests) == 9


def test_identical_rows_share_one_request(tmp_path, stub, api_key):
    ds = Dataset.from_dict({"prompt": ["Same?"] * 3, "response": ["Same."] * 3, "reference": ["Same ref."] * 3})
    out = write_targets(make_writer(stub), ds, tmp_path / "targets.jsonl", show_progress=False)
    assert len(out) == 3 and len(set(out["row_id"])) == 3
    assert len(stub.requests) == 1


def test_concurrency_reaches_its_bound_and_never_exceeds_it(tmp_path, api_key):
    with OpenAIStub(api_key=KEY, latency=0.1) as stub:
        writer = make_writer(stub, max_concurrency=4)
        write_targets(writer, rows(24), tmp_path / "targets.jsonl", show_progress=False)
        assert stub.peak_in_flight == 4
    assert writer.stats.peak_in_flight == 4


@pytest.mark.parametrize(
    "status, message", [(401, "rejected the API key"), (403, "rejected the API key"), (404, "answered 404")]
)
def test_fatal_answers_stop_the_run_after_one_request(tmp_path, api_key, status, message):
    with OpenAIStub() as stub:
        ds = rows(20, dict.fromkeys(range(20), f"[[stub:{status}*inf]]"))
        writer = make_writer(stub, max_concurrency=8)
        with pytest.raises(TargetWriterAbort, match=message):
            write_targets(writer, ds, tmp_path / "targets.jsonl", show_progress=False)
        assert len(stub.requests) == 1 and writer.stats.retries == 0
    assert failures(tmp_path) == {}  # not a row failure: nothing to retry row by row


def test_a_retry_the_abort_stops_before_it_is_sent_is_not_counted(tmp_path, stub, api_key):
    # One request at a time. The probe (row 0) gets a 429 and waits to retry while row 1 takes the only slot and gets
    # a 401: the run stops, so the retry of row 0 is never sent and must not be counted.
    writer = make_writer(stub, max_concurrency=1)
    ds = rows(2, {0: "[[stub:429*1]]", 1: "[[stub:401*inf]]"})
    with pytest.raises(TargetWriterAbort, match="rejected the API key"):
        write_targets(writer, ds, tmp_path / "targets.jsonl", show_progress=False)
    assert len(stub.requests) == writer.stats.requests == 2
    assert writer.stats.retries == 0


def test_a_bad_key_is_one_clear_error_and_is_never_written(tmp_path, stub, monkeypatch, caplog):
    monkeypatch.setenv("SGPO_TEST_KEY", "sk-wrong-key-42")
    writer = make_writer(stub, max_concurrency=16)
    with pytest.raises(TargetWriterAbort, match=r"rejected the API key from \$SGPO_TEST_KEY \(HTTP 401") as e:
        write_targets(writer, rows(30), tmp_path / "targets.jsonl", show_progress=False)
    assert len(stub.requests) == 1
    assert "Incorrect API key provided: ***" in str(e.value)  # the server echoes the key; we scrub it
    assert "sk-wrong-key-42" not in str(e.value) + repr(writer) + caplog.text


def test_the_first_request_retries_alone_until_the_endpoint_answers(tmp_path, stub, api_key):
    # A 500 on the first request says nothing about the key: the other rows wait until it is answered.
    writer = make_writer(stub, max_concurrency=8)
    write_targets(writer, rows(6, {0: "[[stub:500*2]]"}), tmp_path / "targets.jsonl", show_progress=False)
    first_three = [body["messages"][-1]["content"] for body in stub.requests[:3]]
    assert all("Question 0? [[stub:500*2]]" in text for text in first_three)
    assert failures(tmp_path) == {} and writer.stats.retries == 2 and writer.stats.written == 6


def test_the_key_is_written_nowhere(tmp_path, stub, api_key, caplog):
    caplog.set_level(logging.DEBUG)  # retry reasons are logged at DEBUG
    ds = rows(4, {0: "[[stub:500*1]]", 1: "[[stub:400*1]]", 2: "[[stub:empty*1]]"})
    writer = make_writer(stub)
    write_targets(writer, ds, tmp_path / "targets.jsonl", show_progress=False)
    assert {p.name for p in tmp_path.iterdir()} == {"targets.jsonl", "targets.cache.jsonl", "targets.failures.jsonl"}
    for path in tmp_path.iterdir():
        assert KEY not in path.read_text(), path
    assert KEY not in repr(writer) + caplog.text + str(writer.stats.as_dict())


def test_missing_key_variable_fails_before_any_request(tmp_path, stub, monkeypatch):
    monkeypatch.delenv("SGPO_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="SGPO_TEST_KEY .* not set"):
        write_targets(make_writer(stub), rows(2), tmp_path / "targets.jsonl", show_progress=False)
    assert stub.requests == []


def test_bad_input_is_named_and_empty_responses_are_recorded(tmp_path, stub, api_key):
    with pytest.raises(ValueError, match=r"missing the column\(s\) \['reference'\]"):
        write_targets(make_writer(stub), rows(2).remove_columns("reference"), tmp_path / "t.jsonl")
    bad = rows(3).map(lambda r, i: {"reference": "" if i == 2 else r["reference"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"empty `reference` in row\(s\) 2"):
        write_targets(make_writer(stub), bad, tmp_path / "t.jsonl")
    empty = rows(3).map(lambda r, i: {"response": "  " if i == 1 else r["response"]}, with_indices=True)
    out = write_targets(make_writer(stub), empty, tmp_path / "targets.jsonl", show_progress=False)
    assert out["id"] == ["r0", "r2"] and "empty response" in failures(tmp_path)["r1"]
    assert len(stub.requests) == 2


class FillingDisk:
    """Files opened for appending by io.jsonl whose writes fail with ENOSPC once ``budget`` writes are spent."""

    def __init__(self, budget):
        self.budget = budget

    def __call__(self, path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        return handle if "a" not in mode else _Full(handle, self)


class _Full:
    def __init__(self, handle, disk):
        self.handle, self.disk = handle, disk

    def write(self, text):
        self.disk.budget -= 1
        if self.disk.budget < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.handle.write(text)

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_a_full_disk_stops_the_run_and_loses_nothing_paid_for(tmp_path, stub, api_key, monkeypatch):
    # One request at a time; each success writes the cache, then the row: the 7th write (row 4's answer) fails.
    monkeypatch.setattr(jsonl, "open", FillingDisk(budget=6), raising=False)
    ds = rows(12)
    with pytest.raises(TargetWriterAbort, match=r"Disk full while writing .*targets.cache.jsonl.*rerun"):
        write_targets(make_writer(stub, max_concurrency=1), ds, tmp_path / "targets.jsonl", show_progress=False)
    assert len(stub.requests) == 4  # stopped at once
    assert [r["id"] for r in read_jsonl(tmp_path / "targets.jsonl")] == ["r0", "r1", "r2"]

    monkeypatch.undo()  # space freed
    monkeypatch.setenv("SGPO_TEST_KEY", KEY)
    out = write_targets(make_writer(stub), ds, tmp_path / "targets.jsonl", show_progress=False)
    assert out["id"] == [f"r{i}" for i in range(12)]
    bodies = [json.dumps(b, sort_keys=True) for b in stub.requests]
    repeated = [b for b in set(bodies) if bodies.count(b) > 1]
    assert len(bodies) == 13 and len(repeated) == 1  # only the answer whose save failed was bought again
    assert "Question 3?" in repeated[0]


# ---------------------------------------------------------------------------- prompt


def test_target_prompt_shows_the_three_texts_and_explicit_constraints():
    config = TargetPromptConfig(max_edits=2, extra_constraints=("Use British spelling.",))
    system, user = build_target_messages(
        [{"role": "user", "content": "Why?"}], "Because it is. " * 10, "Because of physics.", config
    )
    assert system["role"] == "system" and user["role"] == "user"
    text = user["content"]
    assert "## Question\nWhy?" in text and "## Current answer\nBecause it is." in text
    assert "## Reference answer\nBecause of physics." in text
    assert "at most 2 separate changes" in text and "between 24 and 45 words (the current answer has 30)" in text
    assert "Do not copy the reference" in text and "Use British spelling." in text
    assert "<improved_answer>" in text
    loose = build_target_messages("Why?", "Because.", "Physics.", TargetPromptConfig(forbid_copying_reference=False))
    assert "Do not copy" not in loose[1]["content"]
    with pytest.raises(ValueError, match="min_length_ratio"):
        TargetPromptConfig(min_length_ratio=2, max_length_ratio=1)


def test_parse_target():
    assert parse_target("Sure!\n<improved_answer>\n Better. </improved_answer>\nDone") == "Better."
    assert parse_target("Just the answer.") == "Just the answer."
    with pytest.raises(MalformedTargetError, match="never closed"):
        parse_target("<improved_answer>cut off")
    with pytest.raises(MalformedTargetError, match="no <improved_answer> tag"):
        parse_target("Just the answer.", TargetPromptConfig(require_tag=True))
    for empty in ("", "  ", None, "<improved_answer> </improved_answer>"):
        with pytest.raises(MalformedTargetError, match="empty"):
            parse_target(empty)


# ---------------------------------------------------------------------------- offline writers


def test_reference_step_moves_part_of_the_way():
    response = "Paris is in France. It is big. I like it."
    reference = "Paris is the capital of France. It has two million people. It has the Eiffel Tower."
    assert reference_step(response, reference, 1 / 3) == "Paris is the capital of France. It is big. I like it."
    assert reference_step(response, reference, 0.5) == (
        "Paris is the capital of France. It has two million people. I like it."
    )
    assert reference_step(response, reference, 1.0) == reference
    assert reference_step(response, reference, 1.0, max_edits=1) == reference  # 1: the reference, whatever the cap
    assert reference_step(response, reference, 0.99, max_edits=1) == reference_step(response, reference, 1 / 3)
    assert reference_step("A. B. C.", "A. X. C. D.", 0.5) == "A. X. C."  # shared sentences stay
    assert reference_step("Same.", "Same.", 0.5) == "Same."
    text = "One. Two!\n- item\nThree? Four"
    assert "".join(split_sentences(text)) == text and len(split_sentences(text)) == 5


def test_reference_step_writer_through_write_targets(tmp_path):
    ds = rows(3)
    writer = ReferenceStepWriter(fraction=0.5)
    out = write_targets(writer, ds, tmp_path / "targets.jsonl", show_progress=False)
    assert out["target"][0] == "Reference answer 0."
    assert writer.stats.written == 3 and writer.stats.requests == 0


def test_transformers_writer_records_every_row(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    import trl_sgpo.data.target_writers as target_writers

    # The random tiny model cannot write a tagged answer, so the generation is scripted; the writer's own parsing,
    # cut-off check and bookkeeping run as they are.
    answers = {
        "Answer 0 is short.": ("<improved_answer>Answer 0 is short but clear.</improved_answer>", True),
        "Answer 1 is short.": ("<improved_answer>Answer 1 is", False),  # hit max_new_tokens
        "Answer 2 is short.": ("", True),  # an empty answer
        "Answer 3 is short.": ("<improved_answer>Answer 3, better.</improved_answer>", True),
    }
    batches = []

    def scripted(model, tokenizer, texts, **kwargs):
        batches.append(len(texts))
        outputs = []
        for text in texts:
            answer, finished = next(v for k, v in answers.items() if f"## Current answer\n{k}" in text)
            outputs.append((tokenizer(answer, add_special_tokens=False)["input_ids"], finished))
        return outputs

    monkeypatch.setattr(target_writers, "generate_completions", scripted)
    ds = rows(4)
    writer = TransformersTargetWriter(tiny_model, tiny_tokenizer, max_new_tokens=3, batch_size=2)
    out = write_targets(writer, ds, tmp_path / "targets.jsonl", show_progress=False)
    assert batches == [2, 2]
    assert dict(zip(out["id"], out["target"])) == {"r0": "Answer 0 is short but clear.", "r3": "Answer 3, better."}
    reasons = failures(tmp_path)
    assert set(reasons) == {"r1", "r2"}
    assert "cut off at max_new_tokens=3" in reasons["r1"] and "unusable answer" in reasons["r2"]
    assert writer.stats.written == 2 and writer.stats.failed == 2
    # The request is the documented target prompt, rendered with the writer's chat template.
    assert "## Reference answer\nReference answer 0." in writer.render(ds[0])


def test_transformers_writer_generates_with_a_real_model(tmp_path, tiny_model, tiny_tokenizer):
    # Unscripted: the random model's answers are cut off or untagged, and every row still ends up somewhere.
    writer = TransformersTargetWriter(tiny_model, tiny_tokenizer, max_new_tokens=3, batch_size=2)
    out = write_targets(writer, rows(4), tmp_path / "targets.jsonl", show_progress=False)
    assert len(out) + len(failures(tmp_path)) == 4 == writer.stats.written + writer.stats.failed


def test_cache_key_is_the_exact_request(stub):
    writer = make_writer(stub)
    row = rows(1)[0]
    request = writer.build_request(row)
    assert request["messages"] == build_target_messages(row["prompt"], row["response"], row["reference"])
    other = make_writer(stub, prompt_config=TargetPromptConfig(max_edits=1)).build_request(row)
    assert stable_hash(request) != stable_hash(other)


def test_fraction_1_gives_the_reference_whatever_the_edit_cap():
    from trl_sgpo.data.target_writers import ReferenceStepWriter, reference_step

    draft, reference = "A one. A two.", "B one. B two. B three. B four."
    assert reference_step(draft, reference, 1.0, max_edits=1) == reference
    assert reference_step(draft, reference, 0.5, max_edits=1) != reference  # the cap applies below 1
    assert ReferenceStepWriter(1.0).writes_references and not ReferenceStepWriter(0.5).writes_references
