"""SSO's principles: pairs of good and bad guidelines that steer the policy's answers, and how they reach the prompt.

SSO (arXiv 2410.17131) samples ``y+`` with a good principle and ``y-`` with the matching bad one as the **system
message** (paper version 2, footnote 3; both code releases). The shipped set (``resources/sso_principles.jsonl``)
covers the same ground as the official version-1 features (helpfulness, accuracy, logic, completeness, safety,
engagement, concision) plus clarity, written for this project. Each row has ``name``, ``good_adjective``,
``bad_adjective``, ``good`` and ``bad``; a file of the same shape can replace it (``SSOConfig.principles_file``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from importlib import resources

from trl.data_utils import is_conversational

from ..templates import Prompt


PRINCIPLES_FILE = "sso_principles.jsonl"
_FIELDS = ("name", "good_adjective", "bad_adjective", "good", "bad")
# Part of both system messages: a steered answer should follow the principle, not talk about it.
_DISCRETION = "Do not mention these instructions in your answer."


@dataclass(frozen=True)
class Principle:
    """One good/bad pair of guidelines about the same quality of an answer."""

    name: str
    good_adjective: str
    bad_adjective: str
    good: str
    bad: str

    def system_message(self, good: bool) -> str:
        """The system message that steers an answer toward (``good=True``) or away from this quality."""
        adjective, text = (self.good_adjective, self.good) if good else (self.bad_adjective, self.bad)
        return f"Your answer should be {adjective}. {text} {_DISCRETION}"


def load_principles(path: str | None = None) -> list[Principle]:
    """The principles in ``path`` (JSON lines with the fields of :class:`Principle`), or the shipped set."""
    if path is None:
        text = resources.files("trl_sgpo.resources").joinpath(PRINCIPLES_FILE).read_text(encoding="utf-8")
        where = f"trl_sgpo/resources/{PRINCIPLES_FILE}"
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        where = path
    principles = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [k for k in _FIELDS if not str(row.get(k, "")).strip()]
        if missing:
            raise ValueError(
                f"{where}, line {number}: principle without {', '.join(missing)}; each row needs {_FIELDS}."
            )
        principles.append(Principle(**{k: str(row[k]).strip() for k in _FIELDS}))
    if not principles:
        raise ValueError(f"{where} holds no principles.")
    return principles


def supports_system_role(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a system message (some raise, some drop it silently)."""
    if not getattr(tokenizer, "chat_template", None):
        return True  # the plain-text rendering writes every role
    marker = "SSO-SYSTEM-MARKER-7f3a"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": marker}, {"role": "user", "content": "hi"}],
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:  # templates refuse the role with their own exception types (jinja's TemplateError, ...)
        return False
    return marker in text


def steer(prompt: Prompt, system_text: str, in_user_turn: bool = False) -> Prompt:
    """``prompt`` with ``system_text`` added as a principle.

    - Conversational prompt: a system message first (appended below an existing system message, if any). With
      ``in_user_turn=True`` (for chat templates without a system role) the text goes above the first user message
      instead.
    - Standard (string) prompt: the text above the prompt, separated by a blank line (there is no chat template).
    """
    if not is_conversational({"prompt": prompt}):
        return f"{system_text}\n\n{prompt}"
    messages = copy.deepcopy(list(prompt))
    if in_user_turn:
        for message in messages:
            if message["role"] == "user":
                message["content"] = f"{system_text}\n\n{message['content']}"
                return messages
        raise ValueError("A conversational prompt without a user message cannot carry a principle.")
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{system_text}"
        return messages
    return [{"role": "system", "content": system_text}, *messages]
