"""ImproverSFTTrainer: teaches the model its improver role on externally written targets."""

from __future__ import annotations

import logging

from datasets import Dataset
from transformers import AutoTokenizer
from trl import SFTTrainer

from ..data.checks import check_rows
from ..models import DEFAULT_MODEL, resolve_model_path
from ..templates import SavesImproverTemplate, improver_template_for
from ..utils import SGPO_PAPER
from .collators import DataCollatorForImproverTargets
from .improver_sft_config import ImproverSFTConfig


logger = logging.getLogger(__name__)

IMPROVER_COLUMNS = ("prompt", "response", "target")


class ImproverSFTTrainer(SavesImproverTemplate, SFTTrainer):
    r"""
    Supervised fine-tuning of the model's **improver** role (the first stage of SGPO, arXiv 2507.20181).

    Each training row is `{prompt, response, target}`: the question, the policy's own answer, and the improved
    answer an external LLM wrote by moving that answer part of the way toward a reference (see
    `trl_sgpo.data.target_writers`). [`DataCollatorForImproverTargets`] renders each row as a prompt-completion row
    (prompt: the improver request for `(prompt, response)`, exactly as [`SGPOTrainer`] renders it; completion:
    `target`), and `SFTTrainer` trains on it with its completion-only loss.

    Rows with a missing column or an empty `prompt`/`response`/`target` raise a `ValueError` naming the rows. Rows
    whose request and target together exceed `args.max_length` tokens are dropped, never cut (a cut target teaches
    the improver to stop mid-answer); they are counted in `dropped_rows` and logged. The improver template is
    `args.improver_instruction` if set, else the one saved with `model`, else the default; it is saved as
    `improver_template.json` (and in the model card) with every saved model.

    Args:
        model: A `PreTrainedModel`, a Hub id, a local path, or `"smollm2-135m-instruct"` for the embedded default.
        args: An [`ImproverSFTConfig`]. Defaults to `ImproverSFTConfig("<model name>-ImproverSFT")`.
        train_dataset: A `datasets.Dataset` with `prompt`, `response` and `target` columns.
        processing_class: Tokenizer; loaded from `model` when `model` is a string.
        **kwargs: The other arguments of [`~trl.SFTTrainer`] (`peft_config`, `callbacks`, ...).
    """

    _tag_names = ["trl", "sgpo", "improver-sft"]
    _name = "SGPO Improver SFT"
    _paper = SGPO_PAPER

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, eval_dataset=None, **kwargs):
        if isinstance(model, str) and model == DEFAULT_MODEL:
            model = resolve_model_path(model)
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = ImproverSFTConfig(f"{str(name).rstrip('/').split('/')[-1]}-ImproverSFT")
        elif not isinstance(args, ImproverSFTConfig):
            raise TypeError(f"`args` must be an `ImproverSFTConfig`, got {type(args).__name__}.")
        tokenizer = kwargs.pop("processing_class", None)
        if tokenizer is None:
            if not isinstance(model, str):
                raise ValueError("`processing_class` (the tokenizer) is required when `model` is a model object.")
            tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=args.trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

        self.improver_template = improver_template_for(model, args.improver_instruction)
        collator = DataCollatorForImproverTargets(
            tokenizer.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of, template=self.improver_template
        )
        if data_collator is None and not (args.padding_free or args.packing):
            data_collator = collator  # else SFTTrainer builds its padding-free collator
        self.dropped_rows: dict[str, int] = {}
        train_dataset, eval_dataset = (
            self._render(dataset, collator, tokenizer, args.max_length, name)
            for dataset, name in ((train_dataset, "train_dataset"), (eval_dataset, "eval_dataset"))
        )
        super().__init__(
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            **kwargs,
        )

    def _render(self, dataset, collator, tokenizer, max_length: int | None, name: str):
        """Render `{prompt, response, target}` rows as prompt-completion rows; drop (and count) those that do not fit."""
        if isinstance(dataset, dict):
            return {k: self._render(v, collator, tokenizer, max_length, f"{name}[{k!r}]") for k, v in dataset.items()}
        if dataset is None and name != "train_dataset":
            return None
        if not isinstance(dataset, Dataset):
            raise TypeError(f"`{name}` must be a `datasets.Dataset` (rows are counted and filtered before training).")
        check_rows(dataset, IMPROVER_COLUMNS, IMPROVER_COLUMNS, name, " (see `trl-sgpo improver-data` to build them)")
        rendered = dataset.map(
            collator.render, fn_kwargs={"tokenizer": tokenizer}, remove_columns=dataset.column_names
        )

        def fits(row) -> bool:  # tokenized as SFTTrainer tokenizes prompt + completion
            if isinstance(row["prompt"], list):
                ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)
            else:
                ids = tokenizer(text=row["prompt"] + row["completion"] + tokenizer.eos_token)
            return len(ids["input_ids"]) <= max_length

        kept = rendered if max_length is None else rendered.filter(fits)
        self.dropped_rows[name] = len(rendered) - len(kept)
        if len(kept) == 0:
            raise ValueError(
                f"Every row of `{name}` is longer than max_length={max_length} tokens (improver request + target). "
                "Raise `max_length` or shorten the responses and targets."
            )
        if self.dropped_rows[name]:
            logger.warning(
                "Dropped %d of %d rows of `%s` whose improver request + target exceed max_length=%d tokens (targets "
                "are never cut).",
                self.dropped_rows[name],
                len(rendered),
                name,
                max_length,
            )
        return kept
