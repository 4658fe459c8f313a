"""ImproverSFTTrainer: teaches the model its improver role on externally written targets."""

from __future__ import annotations

import logging

from datasets import Dataset, IterableDataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from trl import SFTTrainer

from ..data.checks import _show, check_rows
from ..models import DEFAULT_MODEL, resolve_model_path
from ..templates import ImproverTemplate
from ..utils import SGPO_PAPER
from .collators import DataCollatorForImproverTargets, encode_improver_example
from .improver_sft_config import ImproverSFTConfig


logger = logging.getLogger(__name__)

IMPROVER_COLUMNS = ("prompt", "response", "target")


class ImproverSFTTrainer(SFTTrainer):
    r"""
    Supervised fine-tuning of the model's **improver** role (the first stage of SGPO, arXiv 2507.20181).

    Each training row is `{prompt, response, target}`: the question, the policy's own answer, and the improved
    answer an external LLM wrote by moving that answer part of the way toward a reference (see
    `trl_sgpo.target_writers`). The model is trained to write `target` when shown the improver request for
    `(prompt, response)`, with the loss on the target tokens only ([`DataCollatorForImproverTargets`]). The request
    is rendered by `trl_sgpo.templates`, exactly as [`SGPOTrainer`] renders it when the model improves its own
    answers during preference optimization.

    Before training, rows with a missing column or an empty `prompt`/`response`/`target` raise a `ValueError` naming
    the rows; rows whose improver request alone exceeds `args.max_length` are dropped with a counted warning.

    Args:
        model: A `PreTrainedModel`, a Hub id, a local path, or `"smollm2-135m-instruct"` for the embedded default.
        args: An [`ImproverSFTConfig`]. Defaults to `ImproverSFTConfig("<model name>-ImproverSFT")`.
        train_dataset: Dataset with `prompt`, `response` and `target` columns.
        processing_class: Tokenizer; loaded from `model` when `model` is a string.
        **kwargs: The other arguments of [`~trl.SFTTrainer`] (`peft_config`, `callbacks`, ...).
    """

    _tag_names = ["trl", "sgpo", "improver-sft"]
    _name = "SGPO Improver SFT"
    _paper = SGPO_PAPER

    def __init__(
        self,
        model,
        args: ImproverSFTConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        **kwargs,
    ):
        if isinstance(model, str) and model == DEFAULT_MODEL:
            model = resolve_model_path(model)
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = ImproverSFTConfig(f"{str(name).rstrip('/').split('/')[-1]}-ImproverSFT")
        elif not isinstance(args, ImproverSFTConfig):
            raise TypeError(f"`args` must be an `ImproverSFTConfig`, got {type(args).__name__}.")
        if processing_class is None:
            if not isinstance(model, str):
                raise ValueError("`processing_class` (the tokenizer) is required when `model` is a model object.")
            processing_class = AutoTokenizer.from_pretrained(model, trust_remote_code=args.trust_remote_code)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token

        self.improver_template = ImproverTemplate(instruction=args.improver_instruction)
        train_dataset = self._check_dataset(train_dataset, processing_class, args.max_length, "train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                k: self._check_dataset(v, processing_class, args.max_length, f"eval_dataset[{k!r}]")
                for k, v in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = self._check_dataset(eval_dataset, processing_class, args.max_length, "eval_dataset")

        if data_collator is None:
            data_collator = DataCollatorForImproverTargets(
                processing_class,
                max_length=args.max_length,
                template=self.improver_template,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )

    def _check_dataset(self, dataset, tokenizer, max_length: int | None, name: str):
        check_rows(dataset, IMPROVER_COLUMNS, IMPROVER_COLUMNS, name, " (see `trl-sgpo improver-data` to build them)")
        if isinstance(dataset, IterableDataset):
            return dataset
        if max_length is None:
            return dataset
        too_long = [
            i
            for i, row in enumerate(dataset.select_columns(list(IMPROVER_COLUMNS)))
            if len(encode_improver_example(tokenizer, row["prompt"], row["response"], "", self.improver_template)[0])
            >= max_length
        ]
        if len(too_long) == len(dataset):
            raise ValueError(
                f"Every improver request in `{name}` is longer than max_length={max_length} tokens. Raise "
                "`max_length` or shorten the responses."
            )
        if too_long:
            logger.warning(
                "Skipping %d of %d rows of `%s` whose improver request exceeds max_length=%d: rows %s.",
                len(too_long),
                len(dataset),
                name,
                max_length,
                _show(too_long),
            )
            dataset = dataset.select(sorted(set(range(len(dataset))) - set(too_long)))
        return dataset
