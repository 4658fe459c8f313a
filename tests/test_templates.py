from trl_sgpo.templates import (
    DEFAULT_TEMPLATE,
    ImproverTemplate,
    end_of_turn_text,
    improver_prompt,
    question_text,
    render_plain,
    render_prompt,
)


CONV = [{"role": "user", "content": "Name a prime number above 10."}]


def test_conversational_improver_prompt_is_one_user_turn_with_question_and_draft():
    out = improver_prompt(CONV, "  12 is prime.  ")
    assert len(out) == 1 and out[0]["role"] == "user"
    content = out[0]["content"]
    assert content == DEFAULT_TEMPLATE.request("Name a prime number above 10.", "12 is prime.")
    # Question before draft, each under its header, and the draft is stripped.
    assert content.index("### Question\nName a prime") < content.index("### Draft answer\n12 is prime.")
    assert content.endswith("12 is prime.")


def test_standard_improver_prompt_is_text_ending_with_answer_cue():
    out = improver_prompt("What is 2+2?", "5")
    assert isinstance(out, str)
    assert "### Question\nWhat is 2+2?" in out and "### Draft answer\n5" in out
    assert out.endswith("### Improved answer\n")


def test_multi_turn_context_is_shown_to_the_improver():
    prompt = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Say hello."},
    ]
    assert question_text(prompt) == "system: Answer in French.\nuser: Say hello."
    assert "system: Answer in French." in improver_prompt(prompt, "Bonjour")[0]["content"]


def test_custom_instruction_is_used():
    template = ImproverTemplate(instruction="Make it shorter.")
    assert improver_prompt(CONV, "x", template)[0]["content"].startswith("Make it shorter.\n\n")


def test_render_uses_chat_template_and_falls_back_to_plain_text(tiny_tokenizer):
    rendered = render_prompt(CONV, tiny_tokenizer)
    assert rendered == "<|im_start|>user\nName a prime number above 10.<|im_end|>\n<|im_start|>assistant\n"
    tiny_tokenizer.chat_template = None
    assert render_prompt(CONV, tiny_tokenizer) == "User: Name a prime number above 10.\n\nAssistant:"
    assert render_plain(CONV) == render_prompt(CONV, tiny_tokenizer)
    assert render_prompt("raw text", tiny_tokenizer) == "raw text"


def test_end_of_turn_text(tiny_tokenizer):
    assert end_of_turn_text(CONV, tiny_tokenizer) == "<|im_end|>"
    assert end_of_turn_text("plain", tiny_tokenizer) == tiny_tokenizer.eos_token
    tiny_tokenizer.chat_template = None
    assert end_of_turn_text(CONV, tiny_tokenizer) == tiny_tokenizer.eos_token
