import pytest
import torch
from datasets import Dataset

from trl_sgpo.data.sampling import check_prompt_reference, generate_completions, sample_responses
from trl_sgpo.io.jsonl import ROW_ID, read_jsonl
from trl_sgpo.templates import render_prompt


def prompt_rows(n, conversational=False):
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(n)]
    if conversational:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    return Dataset.from_dict(
        {"prompt": prompts, "reference": [f"{2 * i}." for i in range(n)], "extra": list(range(n))}
    )


def count_generated_rows(model):
    """Wrap model.generate to count the prompts it is asked to answer."""
    calls = []
    generate = model.generate

    def counting(**kwargs):
        calls.append(kwargs["input_ids"].size(0))
        return generate(**kwargs)

    model.generate = counting
    return calls


@pytest.mark.parametrize("conversational", [False, True])
def test_adds_responses_in_input_order_and_writes_them(tmp_path, tiny_model, tiny_tokenizer, conversational):
    ds = prompt_rows(5, conversational)
    out = tmp_path / "responses.jsonl"
    result = sample_responses(tiny_model, tiny_tokenizer, ds, out, batch_size=2, max_new_tokens=6, show_progress=False)
    assert result["extra"] == list(range(5))  # input order, extra columns passed through
    assert result["prompt"] == ds["prompt"]
    assert all(isinstance(r, str) and r == r.strip() for r in result["response"])
    assert all(1 <= n <= 6 for n in result["response_tokens"])
    written = read_jsonl(out)
    assert sorted(r[ROW_ID] for r in written) == sorted(result[ROW_ID])


def test_greedy_responses_match_the_trainers_generation_path(tmp_path, tiny_model, tiny_tokenizer):
    """Same rendering and tokenization as SGPOTrainer: render_prompt, no special tokens added, left padding."""
    ds = prompt_rows(3, conversational=True)
    result = sample_responses(
        tiny_model,
        tiny_tokenizer,
        ds,
        tmp_path / "r.jsonl",
        batch_size=3,
        max_new_tokens=5,
        temperature=0,
        show_progress=False,
    )
    texts = [render_prompt(p, tiny_tokenizer) for p in ds["prompt"]]
    inputs = tiny_tokenizer(
        text=texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    out = tiny_model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = tiny_tokenizer.batch_decode(out[:, inputs["input_ids"].size(1) :], skip_special_tokens=True)
    # sample_responses batches prompts by length but returns them in input order, like `expected`.
    assert [e.strip() for e in expected] == result["response"]


def test_stops_at_the_first_end_of_turn_of_the_generation_config(tiny_model, tiny_tokenizer):
    text = render_prompt([{"role": "user", "content": "Hello!"}], tiny_tokenizer)
    [(free, _)] = generate_completions(tiny_model, tiny_tokenizer, [text], max_new_tokens=8, temperature=0)
    stop = free[3]
    first = free.index(stop)
    tiny_model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, stop]  # e.g. <|im_end|> and <|eot|>
    [(ids, finished)] = generate_completions(tiny_model, tiny_tokenizer, [text], max_new_tokens=8, temperature=0)
    assert finished and ids == free[: first + 1]


def test_sampling_is_reproducible_and_leaves_the_callers_rng_alone(tmp_path, tiny_model, tiny_tokenizer):
    ds = prompt_rows(4)
    kw = dict(batch_size=2, max_new_tokens=8, temperature=1.0, seed=3, show_progress=False)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = sample_responses(tiny_model, tiny_tokenizer, ds, tmp_path / "a.jsonl", **kw)["response"]
    assert torch.rand(1) == before
    b = sample_responses(tiny_model, tiny_tokenizer, ds, tmp_path / "b.jsonl", **kw)["response"]
    assert a == b


def test_resumes_without_sampling_done_rows_again(tmp_path, tiny_model, tiny_tokenizer):
    out = tmp_path / "responses.jsonl"
    first = sample_responses(tiny_model, tiny_tokenizer, prompt_rows(4), out, max_new_tokens=4, show_progress=False)
    calls = count_generated_rows(tiny_model)
    again = sample_responses(tiny_model, tiny_tokenizer, prompt_rows(6), out, max_new_tokens=4, show_progress=False)
    assert sum(calls) == 2  # only the two new prompts were answered
    assert again["response"][:4] == first["response"]
    assert len(read_jsonl(out)) == 6
    calls.clear()
    sample_responses(tiny_model, tiny_tokenizer, prompt_rows(6), out, max_new_tokens=4, show_progress=False)
    assert calls == []


def test_bad_input_names_the_column_or_rows(tmp_path, tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"missing the column\(s\) \['prompt'\]"):
        sample_responses(tiny_model, tiny_tokenizer, Dataset.from_dict({"question": ["q"]}), tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match=r"empty `prompt` in row\(s\) 1"):
        sample_responses(tiny_model, tiny_tokenizer, Dataset.from_dict({"prompt": ["q", " "]}), tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match=r"empty `reference` in row\(s\) 0, 2"):
        check_prompt_reference(Dataset.from_dict({"prompt": ["a", "b", "c"], "reference": ["", "r", None]}))
    with pytest.raises(ValueError, match=r"missing the column\(s\) \['reference'\]"):
        check_prompt_reference(Dataset.from_dict({"prompt": ["a"]}))
    assert not (tmp_path / "o.jsonl").exists()


def test_no_rows_is_an_error(tmp_path, tiny_model, tiny_tokenizer):
    empty = Dataset.from_dict({"prompt": [], "reference": []})
    with pytest.raises(ValueError, match="`dataset` has no rows"):
        sample_responses(tiny_model, tiny_tokenizer, empty, tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="`prompts` has no rows"):
        check_prompt_reference(empty, "prompts")
