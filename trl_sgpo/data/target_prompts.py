"""The prompt that asks a strong external LLM to write an improver target.

SGPO's improver is trained to make an *incremental yet discernible* improvement to the policy's own answer (arXiv
2507.20181). Its SFT targets are written by a strong LLM that sees three texts:

- the question ``x`` (as the improver sees it: :func:`trl_sgpo.templates.question_text`),
- the current answer ``y``, sampled from the policy,
- the reference answer (the SFT answer for ``x``),

and rewrites ``y`` one step toward the reference. The step must be small enough that the policy could plausibly have
written it (a perplexity filter, :mod:`trl_sgpo.perplexity`, later drops targets that are not), and large enough that
the change is visible. The reference is a direction, not a destination: copying it would teach the improver to
ignore ``y``.

:class:`TargetPromptConfig` holds every constraint as a field, so that each is explicit and can be changed without
editing the text. :func:`build_target_messages` renders the chat messages sent to the writer and
:func:`parse_target` extracts the target from its answer. Changing any field changes the request, hence the cache key
of the OpenAI writer: answers cached under another prompt are never reused by mistake.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..templates import Prompt, question_text


DEFAULT_SYSTEM = (
    "You are an expert editor who improves answers written by a smaller assistant model. You make one incremental, "
    "clearly noticeable improvement at a time, so that the smaller model can learn to make the same kind of edit "
    "itself."
)


class MalformedTargetError(ValueError):
    """The writer's answer does not hold a usable target (empty, unterminated tag, ...)."""


@dataclass(frozen=True)
class TargetPromptConfig:
    """Constraints of the target-writing request. Every field is stated explicitly in the prompt.

    Args:
        system: System message: who the writer is.
        min_length_ratio: The target should be at least this times as long as the current answer, in words.
        max_length_ratio: ... and at most this times as long. Keeping the length close keeps the edit incremental.
        max_edits: At most this many separate changes (sentences fixed, added or removed); ``None`` for no limit.
        keep_style: Ask to keep the current answer's tone, format (lists, code blocks, Markdown) and wording where
            it is already fine.
        forbid_copying_reference: Ask not to copy the reference or large parts of it.
        extra_constraints: More constraints, one sentence each, appended to the list.
        output_tag: The target is asked between ``<output_tag>`` and ``</output_tag>``, which makes the answer
            unambiguous to parse. ``None`` asks for the bare improved answer.
        require_tag: With ``output_tag`` set: whether an answer without the opening tag is malformed (``True``) or is
            taken whole as the target (``False``, tolerant of writers that forget the tag).
    """

    system: str = DEFAULT_SYSTEM
    min_length_ratio: float = 0.8
    max_length_ratio: float = 1.5
    max_edits: int | None = 3
    keep_style: bool = True
    forbid_copying_reference: bool = True
    extra_constraints: tuple[str, ...] = field(default_factory=tuple)
    output_tag: str | None = "improved_answer"
    require_tag: bool = False

    def __post_init__(self):
        if not 0 < self.min_length_ratio <= self.max_length_ratio:
            raise ValueError(
                f"Need 0 < min_length_ratio <= max_length_ratio, got {self.min_length_ratio} and "
                f"{self.max_length_ratio}."
            )
        if self.max_edits is not None and self.max_edits < 1:
            raise ValueError(f"`max_edits` must be >= 1 or None, got {self.max_edits}.")
        if self.output_tag is not None and not re.fullmatch(r"[A-Za-z_][\w-]*", self.output_tag):
            raise ValueError(f"`output_tag` must be a plain tag name like 'improved_answer', got {self.output_tag!r}.")

    def constraints(self, response: str) -> list[str]:
        """The numbered constraints for one request (the length bounds are given in words for this answer)."""
        words = len(response.split())
        low, high = max(1, round(words * self.min_length_ratio)), max(1, round(words * self.max_length_ratio))
        items = [
            "Start from the current answer and improve it by one incremental step toward the quality of the reference "
            "answer: fix what is wrong, add what is most important and missing, or make it clearer.",
            "The improvement must be discernible: a reader comparing both versions should see that yours is better.",
        ]
        if self.max_edits is not None:
            items.append(f"Make at most {self.max_edits} separate changes; leave the rest of the answer as it is.")
        if self.keep_style:
            items.append(
                "Keep the current answer's style: its tone, format (lists, code blocks, Markdown) and wording "
                "wherever they are already fine."
            )
        items.append(
            f"Keep roughly the current length: between {low} and {high} words (the current answer has {words})."
        )
        if self.forbid_copying_reference:
            items.append(
                "Do not copy the reference answer or large parts of it. Use it only to decide what to fix or add."
            )
        items.extend(self.extra_constraints)
        if self.output_tag:
            items.append(
                f"Reply with the improved answer only, between <{self.output_tag}> and </{self.output_tag}>, with no "
                f"comments before or after."
            )
        else:
            items.append("Reply with the improved answer only, with no comments before or after.")
        return items


DEFAULT_TARGET_PROMPT = TargetPromptConfig()


def build_target_messages(
    prompt: Prompt, response: str, reference: str, config: TargetPromptConfig = DEFAULT_TARGET_PROMPT
) -> list[dict[str, str]]:
    """The chat messages (system + user) asking for an improved version of ``response``.

    ``prompt`` is the question in TRL's standard (string) or conversational (messages) format; a multi-turn
    conversation is shown as ``role: content`` lines, as the improver itself sees it.
    """
    constraints = "\n".join(f"{i}. {c}" for i, c in enumerate(config.constraints(response), start=1))
    user = (
        "Improve the current answer to the question below, using the reference answer as guidance.\n\n"
        f"## Question\n{question_text(prompt)}\n\n"
        f"## Current answer\n{response.strip()}\n\n"
        f"## Reference answer\n{reference.strip()}\n\n"
        f"## Constraints\n{constraints}"
    )
    return [{"role": "system", "content": config.system}, {"role": "user", "content": user}]


def parse_target(text: str | None, config: TargetPromptConfig = DEFAULT_TARGET_PROMPT) -> str:
    """Extract the target from the writer's answer, or raise :class:`MalformedTargetError` saying why."""
    if text is None or not text.strip():
        raise MalformedTargetError("the answer is empty")
    text = text.strip()
    if config.output_tag:
        tag = re.escape(config.output_tag)
        opened = re.search(rf"<{tag}>", text)
        if opened:
            closed = re.search(rf"</{tag}>", text[opened.end() :])
            if closed is None:
                raise MalformedTargetError(f"<{config.output_tag}> is never closed (the answer may be cut off)")
            text = text[opened.end() : opened.end() + closed.start()].strip()
        elif config.require_tag:
            raise MalformedTargetError(f"the answer has no <{config.output_tag}> tag")
    if not text:
        raise MalformedTargetError("the improved answer is empty")
    return text
