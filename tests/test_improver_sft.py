import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from trl_sgpo import DataCollatorForImproverTargets, ImproverSFTConfig, ImproverSFTTrainer
from trl_sgpo.templates import TEMPLATE_FILE, ImproverTemplate, improver_prompt, render_prompt


def improver_rows(n=8, conversational=True):
    prompts = [f"What is {i} plus {i}?" for i in range(n)]
    if conversational:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    return Dataset.from_dict(
        {"prompt": prompts, "response": ["It is four."] * n, "target": [f"{i} plus {i} is {2 * i}." for i in range(n)]}
    )


def make_args(tmp_path, **kw):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=3,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-2,
        max_length=256,
    )
    defaults.update(kw)
    return ImproverSFTConfig(**defaults)


def sgpo_request_ids(tokenizer, row, template=None):
    """The improver prompt as SGPOTrainer tokenizes it at generation time."""
    request = render_prompt(improver_prompt(row["prompt"], row["response"], template or ImproverTemplate()), tokenizer)
    return tokenizer(request, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("conversational", [True, False])
def test_prepared_rows_are_the_sgpo_request_then_the_target_with_loss_on_the_target_only(
    tmp_path, tiny_model, tiny_tokenizer, conversational
):
    rows = improver_rows(3, conversational)
    trainer = ImproverSFTTrainer(
        tiny_model, args=make_args(tmp_path), train_dataset=rows, processing_class=tiny_tokenizer
    )
    # After the trainer's eos: ChatML writes "<|im_end|>\n" after an assistant turn; plain text gets the EOS.
    end = "<|im_end|>\n" if conversational else "<|im_end|>"
    for row, prepared in zip(rows, trainer.train_dataset, strict=True):
        request = sgpo_request_ids(tiny_tokenizer, row)
        ids, labels = prepared["input_ids"], prepared["labels"]
        assert ids[: len(request)] == request  # token for token what SGPO generation shows the improver
        assert labels[: len(request)] == [-100] * len(request)  # no loss on the request
        assert labels[len(request) :] == ids[len(request) :]  # loss on every target token
        assert tiny_tokenizer.decode(ids[len(request) :]) == row["target"] + end
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[2]])
    assert isinstance(trainer.data_collator, DataCollatorForImproverTargets)
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["labels"][padding] == -100).all()


def test_rows_that_do_not_fit_are_dropped_and_counted_never_cut(tmp_path, tiny_model, tiny_tokenizer, caplog):
    rows = improver_rows(4).to_dict()
    rows["target"][1] = "A much longer improved answer that goes on and on. " * 6
    rows["response"][3] = "very long answer " * 100  # the request alone does not fit
    full = ImproverSFTTrainer(
        tiny_model,
        args=make_args(tmp_path, max_length=None),
        train_dataset=Dataset.from_dict(rows),
        processing_class=tiny_tokenizer,
    )
    lengths = [len(r["input_ids"]) for r in full.train_dataset]
    limit = max(lengths[0], lengths[2])  # rows 0 and 2 just fit; row 1 (long target) and 3 (long request) do not
    assert lengths[1] > limit and lengths[3] > limit
    trainer = ImproverSFTTrainer(
        tiny_model,
        args=make_args(tmp_path, max_length=limit),
        train_dataset=Dataset.from_dict(rows),
        eval_dataset={"held_out": Dataset.from_dict(rows)},
        processing_class=tiny_tokenizer,
    )
    assert trainer.dropped_rows == {"train_dataset": 2, "eval_dataset['held_out']": 2}
    assert trainer.eval_dataset["held_out"]["input_ids"] == trainer.train_dataset["input_ids"]
    assert "Dropped 2 of 4 rows of `train_dataset`" in caplog.text
    # The kept rows are whole: each ends with its full target and the end of turn.
    kept = [tiny_tokenizer.decode([t for t in r["labels"] if t != -100]) for r in trainer.train_dataset]
    assert kept == [rows["target"][0] + "<|im_end|>\n", rows["target"][2] + "<|im_end|>\n"]
    with pytest.raises(ValueError, match="Every row of `train_dataset` is longer than max_length=5"):
        ImproverSFTTrainer(
            tiny_model,
            args=make_args(tmp_path, max_length=5),
            train_dataset=improver_rows(2),
            processing_class=tiny_tokenizer,
        )


def test_full_finetune_lowers_the_target_loss(tmp_path, tiny_model, tiny_tokenizer):
    trainer = ImproverSFTTrainer(
        tiny_model,
        args=make_args(tmp_path, max_steps=10),
        train_dataset=improver_rows(),
        processing_class=tiny_tokenizer,
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 0.5
    card_tags = trainer.model.model_tags if hasattr(trainer.model, "model_tags") else []
    assert "sgpo" in card_tags and "improver-sft" in card_tags


def test_lora_trains_the_adapter_only(tmp_path, tiny_model, tiny_tokenizer):
    base = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    trainer = ImproverSFTTrainer(
        tiny_model,
        args=make_args(tmp_path),
        train_dataset=improver_rows(),
        processing_class=tiny_tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    trainer.train()
    assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)
    for name, param in trainer.model.get_base_model().named_parameters():
        if "lora_" not in name:
            torch.testing.assert_close(param, base[name.replace(".base_layer", "")])


def test_bad_rows_and_settings_raise(tmp_path, tiny_model, tiny_tokenizer):
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match=r"missing the column\(s\) \['target'\]"):
        ImproverSFTTrainer(
            tiny_model,
            args=args,
            train_dataset=improver_rows().remove_columns("target"),
            processing_class=tiny_tokenizer,
        )
    rows = improver_rows(3).to_dict()
    rows["target"][2] = " "
    with pytest.raises(ValueError, match=r"empty `target` in row\(s\) 2"):
        ImproverSFTTrainer(
            tiny_model, args=args, train_dataset=Dataset.from_dict(rows), processing_class=tiny_tokenizer
        )
    with pytest.raises(ValueError, match="trains on the target only"):
        make_args(tmp_path, completion_only_loss=False)


def test_saved_model_carries_its_template_and_is_read_back(tmp_path, tiny_model, tiny_tokenizer):
    custom = "Improve the draft: fix errors only."
    trainer = ImproverSFTTrainer(
        tiny_model,
        args=make_args(tmp_path, max_steps=1, improver_instruction=custom),
        train_dataset=improver_rows(4),
        processing_class=tiny_tokenizer,
    )
    trainer.train()
    saved = tmp_path / "saved"
    trainer.save_model(str(saved))
    trainer.create_model_card(model_name="m")
    assert json.loads((saved / TEMPLATE_FILE).read_text())["instruction"] == custom
    assert custom in (tmp_path / "out" / "README.md").read_text()  # the card shows it (and is pushed with it)
    assert (tmp_path / "out" / TEMPLATE_FILE).is_file()

    # Given the saved folder and no instruction, the trainer uses the saved template and trains on its prompts.
    again = ImproverSFTTrainer(str(saved), args=make_args(tmp_path / "2", max_steps=1), train_dataset=improver_rows(2))
    assert again.improver_template.instruction == custom
    row = improver_rows(2)[0]
    request = sgpo_request_ids(again.processing_class, row, ImproverTemplate(instruction=custom))
    assert again.train_dataset[0]["input_ids"][: len(request)] == request
    # An explicit instruction wins over the saved one.
    explicit = ImproverSFTTrainer(
        str(saved), args=make_args(tmp_path / "3", improver_instruction="Other."), train_dataset=improver_rows(2)
    )
    assert explicit.improver_template.instruction == "Other."
