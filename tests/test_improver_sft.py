import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from trl_sgpo import DataCollatorForImproverTargets, ImproverSFTConfig, ImproverSFTTrainer
from trl_sgpo.templates import improver_prompt, render_prompt
from trl_sgpo.trainers.collators import encode_improver_example


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


@pytest.mark.parametrize("conversational", [True, False])
def test_labels_cover_the_target_and_end_of_turn_only(tiny_tokenizer, conversational):
    row = improver_rows(1, conversational)[0]
    batch = DataCollatorForImproverTargets(tiny_tokenizer)([row, improver_rows(2, conversational)[1]])
    ids, labels, mask = batch["input_ids"][0], batch["labels"][0], batch["attention_mask"][0]
    request = render_prompt(improver_prompt(row["prompt"], row["response"]), tiny_tokenizer)
    n_prompt = len(tiny_tokenizer(request, add_special_tokens=False)["input_ids"])
    assert (labels[:n_prompt] == -100).all()
    learned = labels[labels != -100]
    assert tiny_tokenizer.decode(learned) == row["target"] + "<|im_end|>"
    assert tiny_tokenizer.decode(ids[mask.bool()]) == request + row["target"] + "<|im_end|>"
    assert (labels[~mask.bool()] == -100).all()


def test_collator_truncates_the_target_not_the_request(tiny_tokenizer):
    row = improver_rows(1)[0]
    prompt_ids, target_ids = encode_improver_example(tiny_tokenizer, row["prompt"], row["response"], row["target"])
    limit = len(prompt_ids) + 2
    batch = DataCollatorForImproverTargets(tiny_tokenizer, max_length=limit)([row])
    assert batch["input_ids"].shape[1] == limit
    assert batch["input_ids"][0, : len(prompt_ids)].tolist() == prompt_ids
    assert batch["labels"][0, len(prompt_ids) :].tolist() == target_ids[:2]
    with pytest.raises(ValueError, match="leaves no room"):
        DataCollatorForImproverTargets(tiny_tokenizer, max_length=len(prompt_ids))([row])


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


def test_bad_rows_raise_or_are_counted(tmp_path, tiny_model, tiny_tokenizer, caplog):
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
    rows = improver_rows(3).to_dict()
    rows["response"][1] = "very long answer " * 100
    trainer = ImproverSFTTrainer(
        tiny_model,
        args=make_args(tmp_path, max_length=256),
        train_dataset=Dataset.from_dict(rows),
        processing_class=tiny_tokenizer,
    )
    assert len(trainer.train_dataset) == 2
    assert "Skipping 1 of 3 rows" in caplog.text
