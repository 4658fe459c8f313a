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

The template travels with the model: :meth:`ImproverTemplate.save_pretrained` writes it next to the weights as
``improver_template.json`` (and :func:`save_improver_template` also into the model card), and
:func:`improver_template_for` reads it back, so whoever loads a trained model rebuilds the exact improver prompt.

Prompt formats follow TRL: a ``str`` prompt is "standard" and is used as raw text (no chat template), a list of
``{"role", "content"}`` messages is "conversational" and goes through the tokenizer's chat template. A tokenizer
without a chat template gets a plain-text rendering (:func:`render_plain`) instead of an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trl.data_utils import is_conversational


logger = logging.getLogger(__name__)

Messages = list[dict[str, Any]]
Prompt = str | Messages

TEMPLATE_FILE = "improver_template.json"
"""File name of the improver template saved next to a model's weights."""

TEMPLATE_FORMAT_VERSION = 1
"""Version of the request layout (:meth:`ImproverTemplate.request`, :func:`improver_prompt`); bumped when it changes."""

CARD_HEADING = "## Improver template"

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

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": TEMPLATE_FORMAT_VERSION, **dataclasses.asdict(self)}

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the template to ``save_directory/improver_template.json`` and return that path."""
        path = Path(save_directory) / TEMPLATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, revision: str | None = None) -> ImproverTemplate:
        """Read the template saved with a model: a local folder (or the JSON file itself) or a Hub model id.

        Raises ``FileNotFoundError`` when the model has no saved template, ``ValueError`` when the file is not one.
        """
        path = Path(path_or_id)
        if path.is_dir():
            path = path / TEMPLATE_FILE
        if not path.is_file():
            if Path(path_or_id).exists() or os.path.isabs(path_or_id) or str(path_or_id).startswith("."):
                raise FileNotFoundError(
                    f"{path} does not exist: this model was saved without an improver template. Pass the instruction "
                    "explicitly, or save one with `ImproverTemplate(...).save_pretrained(folder)`."
                )
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

            try:
                path = Path(hf_hub_download(str(path_or_id), TEMPLATE_FILE, revision=revision))
            except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, ValueError) as e:
                raise FileNotFoundError(
                    f"No {TEMPLATE_FILE} for {path_or_id!r} on the Hub (or in the local cache when offline): the model "
                    f"was pushed without an improver template. Pass the instruction explicitly. ({type(e).__name__})"
                ) from e
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}).") from e
        version = data.pop("format_version", None)
        if version != TEMPLATE_FORMAT_VERSION:
            raise ValueError(
                f"{path} has format_version {version!r}; this trl-sgpo reads version {TEMPLATE_FORMAT_VERSION}. "
                "Upgrade trl-sgpo, or pass the instruction explicitly."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"{path} has unknown field(s) {unknown}; expected {sorted(fields)}.")
        return cls(**data)

    def card_section(self) -> str:
        """The model card section that shows the template and how to use the model as an improver."""
        return (
            f"\n{CARD_HEADING}\n\nThis model was trained as its own improver (SGPO). To ask it to improve an answer, "
            f"send the request below as one user turn (`trl_sgpo.templates.improver_prompt` builds it; the template is "
            f"also in `{TEMPLATE_FILE}`), or run `trl-sgpo improve --model <this model> --input prompts.jsonl "
            f"--output out.jsonl`.\n\n```json\n{json.dumps(self.to_dict(), indent=2, ensure_ascii=False)}\n```\n"
        )


DEFAULT_TEMPLATE = ImproverTemplate()


def improver_template_for(model: Any = None, instruction: str | None = None) -> ImproverTemplate:
    """The improver template to use with ``model``: an explicit ``instruction`` first, then the template saved with
    the model, then :data:`DEFAULT_TEMPLATE`.

    ``model`` is a local folder, a Hub id, a model object (its template is looked up in the local folder it was
    loaded from, never on the Hub), or ``None``. An explicit instruction replaces the saved one (the saved headers
    are kept) and a warning says so when the two differ.
    """
    from .models import DEFAULT_MODEL

    source = model
    if model is not None and not isinstance(model, (str, os.PathLike)):
        source = getattr(model, "sgpo_weights_path", None) or getattr(model.config, "_name_or_path", None)
        if not source or not Path(source).is_dir():
            source = None
    if source == DEFAULT_MODEL or (instruction is not None and source and not Path(source).is_dir()):
        source = None  # nothing saved with the embedded default; no Hub lookup when the instruction is given
    saved = None
    if source:
        try:
            saved = ImproverTemplate.from_pretrained(source)
        except FileNotFoundError:
            saved = None
        except OSError as e:  # a Hub lookup that failed for another reason (network, gated repo)
            logger.warning("Could not read the improver template of %s (%s); using the default.", source, e)
    if instruction is None:
        return saved or DEFAULT_TEMPLATE
    if saved is not None and saved.instruction != instruction:
        logger.warning("%s was trained with another improver instruction; using the one given explicitly.", source)
    return dataclasses.replace(saved or DEFAULT_TEMPLATE, instruction=instruction)


def save_improver_template(trainer_or_template: Any, output_dir: str | os.PathLike) -> Path:
    """Save the improver template next to a saved model: ``improver_template.json``, and a section of the model card
    (``README.md``) when the folder has one.

    ``trainer_or_template`` is an :class:`ImproverTemplate` or a trainer with an ``improver_template`` attribute
    (:class:`~trl_sgpo.ImproverSFTTrainer`, :class:`~trl_sgpo.SGPOTrainer`). Returns the JSON file's path.
    """
    template = getattr(trainer_or_template, "improver_template", trainer_or_template)
    if not isinstance(template, ImproverTemplate):
        raise TypeError(f"Expected an ImproverTemplate or a trainer holding one, got {type(trainer_or_template)}.")
    path = template.save_pretrained(output_dir)
    card = Path(output_dir) / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        # Replace the section an earlier save wrote (up to the next section), keep the rest of the card.
        text = re.sub(rf"\n*{CARD_HEADING}\n.*?(?=\n## |\Z)", "\n", text, flags=re.S).rstrip("\n") + "\n"
        card.write_text(text + template.card_section(), encoding="utf-8")
    return path


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


class SavesImproverTemplate:
    """Trainer mixin (put it before the trainer base): every saved model and checkpoint, and the model card, carry the
    trainer's ``improver_template`` (:func:`save_improver_template`), so the improver travels with the weights."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            save_improver_template(self, output_dir or self.args.output_dir)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            save_improver_template(self, self.args.output_dir)
