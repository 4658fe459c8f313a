"""The improver prompt: how a question ``x`` and a draft answer ``y`` are shown to the model acting as improver.

This module is the single home of that format. Improver SFT (:class:`~trl_sgpo.DataCollatorForImproverTargets`) and
SGPO generation (:class:`~trl_sgpo.SGPOTrainer`) both call :func:`improver_prompt` then :func:`render_prompt`, so the
improver sees the same tokens at training time and at preference-optimization time (a test checks this token for
token).

Format choice. The improver request is one user turn holding an instruction, the question and the draft, with
Markdown-style headers. One user turn (rather than, say, a fake assistant turn holding the draft) works with every
chat template, including those that reject consecutive or leading assistant turns, and the headers make the two
parts unambiguous in plain text too. The instruction asks for an *incremental* improvement that keeps the draft's
style and length, which is what SGPO's improver is trained to do (arXiv 2507.20181).

Prompt formats follow TRL: a ``str`` prompt is "standard" and is used as raw text (no chat template), a list of
``{"role", "content"}`` messages is "conversational" and goes through the tokenizer's chat template. A tokenizer
without a chat template gets a plain-text rendering (:func:`render_plain`) instead of an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trl.data_utils import is_conversational


Messages = list[dict[str, Any]]
Prompt = str | Messages

DEFAULT_INSTRUCTION = (
    "Below is a question and a draft answer. Write an improved version of the draft answer: fix mistakes, fill in "
    "what is missing and make it clearer, but keep the draft's style and roughly its length. Reply with the "
    "improved answer only."
)


@dataclass(frozen=True)
class ImproverTemplate:
    """The text around ``x`` and ``y`` in the improver request.

    Args:
        instruction: What the improver is asked to do.
        question_header: Header line above the question.
        draft_header: Header line above the draft answer.
        answer_cue: Only for standard (string) prompts, which get no chat template: the line that ends the prompt
            and cues the answer.
    """

    instruction: str = DEFAULT_INSTRUCTION
    question_header: str = "### Question"
    draft_header: str = "### Draft answer"
    answer_cue: str = "### Improved answer"

    def request(self, question: str, draft: str) -> str:
        return f"{self.instruction}\n\n{self.question_header}\n{question}\n\n{self.draft_header}\n{draft}"


DEFAULT_TEMPLATE = ImproverTemplate()


def _content_text(content: Any) -> str:
    # Multimodal-style content is a list of parts; keep the text parts.
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def question_text(prompt: Prompt) -> str:
    """The question as the improver reads it.

    A single user turn is shown as is. A longer conversation (system prompt, earlier turns) is shown as ``role:
    content`` lines so that the improver sees the whole context the policy answered.
    """
    if isinstance(prompt, str):
        return prompt.strip()
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return _content_text(prompt[0]["content"]).strip()
    return "\n".join(f"{m['role']}: {_content_text(m['content']).strip()}" for m in prompt)


def improver_prompt(prompt: Prompt, response: str, template: ImproverTemplate = DEFAULT_TEMPLATE) -> Prompt:
    """Build the improver request for question ``prompt`` and draft answer ``response``.

    Returns a prompt of the same format as ``prompt``: a one-turn conversation for a conversational prompt, a string
    ending with ``template.answer_cue`` for a standard one.
    """
    request = template.request(question_text(prompt), response.strip())
    if is_conversational({"prompt": prompt}):
        return [{"role": "user", "content": request}]
    return f"{request}\n\n{template.answer_cue}\n"


def render_plain(messages: Messages) -> str:
    """Plain-text rendering of a conversation for tokenizers that have no chat template."""
    turns = "".join(f"{m['role'].capitalize()}: {_content_text(m['content']).strip()}\n\n" for m in messages)
    return turns + "Assistant:"


def render_prompt(prompt: Prompt, tokenizer) -> str:
    """The exact text that is tokenized (with ``add_special_tokens=False``) to prompt the model.

    Conversational prompts get the chat template with the generation prompt (TRL's ``maybe_apply_chat_template``),
    or :func:`render_plain` when the tokenizer has none; standard prompts are returned unchanged.
    """
    if not is_conversational({"prompt": prompt}):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return render_plain(prompt)


def end_of_turn_text(prompt: Prompt, tokenizer) -> str:
    """The text that ends an answer to ``prompt``: what the chat template writes after an assistant message (e.g.
    ``<|im_end|>``), or the tokenizer's EOS for standard prompts and template-less tokenizers.

    Improver SFT appends it to each target so the improver learns to stop where SGPO generation stops.
    """
    eos = tokenizer.eos_token or ""
    if not is_conversational({"prompt": prompt}) or not getattr(tokenizer, "chat_template", None):
        return eos
    sentinel = "\x00SGPO_SENTINEL\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}], tokenize=False
    )
    suffix = text.split(sentinel, 1)[1].rstrip() if sentinel in text else ""
    return suffix or eos
