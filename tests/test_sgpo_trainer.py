import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from helpers.tiny import build_tiny_reward_model
from helpers.trainer_args import chat_prompts, tiny_config
from trl_sgpo import SGPOConfig, SGPOTrainer
from trl_sgpo.templates import improver_prompt, render_prompt


def conv_dataset(n=8):
    return chat_prompts(n)


def make_args(tmp_path, **kw):
    return tiny_config(SGPOConfig, tmp_path, **{**dict(max_steps=2, max_length=128, learning_rate=1e-3), **kw})


def judged_trainer(tmp_path, model, tokenizer, judge):
    """An SGPO trainer over 8 prompts in windows of 4, its pairs scored by ``judge`` and written by FixedAnswers."""
    trainer = SGPOTrainer(
        model,
        reward_funcs=judge,
        args=make_args(tmp_path, max_steps=2, per_device_train_batch_size=4),
        train_dataset=conv_dataset(8),
        processing_class=tokenizer,
    )
    trainer._sample = FixedAnswers(tokenizer)
    return trainer


class FixedAnswers:
    """Stand-in for the sampler: the policy always says `bad`, the improver always says `good`."""

    def __init__(self, tokenizer, bad="one", good="two two", improver=None):
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.ids = {
            "policy": tokenizer(bad, add_special_tokens=False)["input_ids"] + [eos],
            "improver": (improver if improver is not None else tokenizer(good, add_special_tokens=False)["input_ids"])
            + [eos],
        }
        self.calls = []

    def __call__(self, model, prompt_ids, role):
        self.calls.append((role, [self.tokenizer.decode(ids) for ids in prompt_ids]))
        return [list(self.ids[role]) for _ in prompt_ids]


def seq_logp(model, tokenizer, prompt, completion_ids):
    prompt_ids = tokenizer(render_prompt(prompt, tokenizer), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]
    return logits.log_softmax(-1).gather(1, torch.tensor(completion_ids)[:, None]).sum().item()


def test_improver_sees_exactly_x_and_y_with_the_sft_tokens(tmp_path, tiny_model, tiny_tokenizer):
    trainer = SGPOTrainer(
        tiny_model, args=make_args(tmp_path), train_dataset=conv_dataset(), processing_class=tiny_tokenizer
    )
    calls = []
    generate = trainer.model.generate

    def spy(**kwargs):
        out = generate(**kwargs)
        calls.append((kwargs["input_ids"], kwargs["attention_mask"], out[:, kwargs["input_ids"].size(1) :]))
        return out

    trainer.model.generate = spy
    prompts = [[{"role": "user", "content": "What is 3 plus 3?"}], [{"role": "user", "content": "Name a color."}]]
    pairs = trainer.generate_pairs(trainer.model, prompts)
    assert len(calls) == 2  # one policy generation, one improver generation, same model
    (p_ids, p_mask, _), (i_ids, i_mask, _) = calls
    for row, prompt in enumerate(prompts):
        # Policy prompt: the rendered question only.
        policy_tokens = p_ids[row][p_mask[row].bool()].tolist()
        assert (
            policy_tokens
            == tiny_tokenizer(render_prompt(prompt, tiny_tokenizer), add_special_tokens=False)["input_ids"]
        )
        # Improver prompt: token for token what improver SFT trains on, built from x and the decoded y.
        improver_tokens = i_ids[row][i_mask[row].bool()].tolist()
        # (tests/test_improver_sft.py checks that improver SFT's prepared rows start with these same tokens.)
        request = render_prompt(improver_prompt(prompt, pairs.texts["draft"][row]), tiny_tokenizer)
        sft_prompt_ids = tiny_tokenizer(request, add_special_tokens=False)["input_ids"]
        assert improver_tokens == sft_prompt_ids
        text = tiny_tokenizer.decode(improver_tokens)
        assert prompt[0]["content"] in text and f"### Draft answer\n{pairs.texts['draft'][row]}" in text


def test_pairs_put_improved_first_and_score_both_under_the_policy_prompt(tmp_path, tiny_model, tiny_tokenizer):
    trainer = SGPOTrainer(
        tiny_model, args=make_args(tmp_path), train_dataset=conv_dataset(), processing_class=tiny_tokenizer
    )
    fixed = FixedAnswers(tiny_tokenizer)
    trainer._sample = fixed
    prompts = [[{"role": "user", "content": "Hi?"}], [{"role": "user", "content": "What is 1 plus 1?"}]]
    pairs = trainer.generate_pairs(trainer.model, prompts)
    B = len(prompts)
    chosen, rejected = pairs.sequences["chosen"], pairs.sequences["rejected"]
    for seqs, expected in ((chosen, fixed.ids["improver"]), (rejected, fixed.ids["policy"])):
        ids = [row[mask.bool()].tolist() for row, mask in zip(seqs.completion_ids, seqs.completion_mask)]
        assert ids == [expected] * B
    for row in range(B):
        policy = tiny_tokenizer(render_prompt(prompts[row], tiny_tokenizer), add_special_tokens=False)["input_ids"]
        for seqs in (chosen, rejected):
            assert seqs.prompt_ids[row][seqs.prompt_mask[row].bool()].tolist() == policy
    assert pairs.keep.all()
    # The improver was asked about the policy's answer.
    role, texts = fixed.calls[1]
    assert role == "improver" and all("### Draft answer\none" in t for t in texts)


def test_chosen_is_improved_and_rejected_is_original_in_the_loss(tmp_path, tiny_model, tiny_tokenizer):
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Hi?"}]] * 4})
    trainer = SGPOTrainer(
        tiny_model, args=make_args(tmp_path, max_steps=1), train_dataset=dataset, processing_class=tiny_tokenizer
    )
    fixed = FixedAnswers(tiny_tokenizer)
    trainer._sample = fixed
    ref = trainer.ref_model
    good = seq_logp(ref, tiny_tokenizer, dataset[0]["prompt"], fixed.ids["improver"])
    bad = seq_logp(ref, tiny_tokenizer, dataset[0]["prompt"], fixed.ids["policy"])
    assert abs(good - bad) > 1e-3
    trainer.train()
    logs = next(h for h in trainer.state.log_history if "logps/chosen" in h)
    # Logged before the update, when the policy still equals the reference.
    assert logs["logps/chosen"] == pytest.approx(good, abs=1e-3)
    assert logs["logps/rejected"] == pytest.approx(bad, abs=1e-3)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_training_raises_the_improved_over_original_log_ratio(tmp_path, tiny_model, tiny_tokenizer, loss_type):
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Hi?"}]] * 16})
    args = make_args(tmp_path, max_steps=8, learning_rate=5e-3, loss_type=loss_type, beta=0.1)
    trainer = SGPOTrainer(tiny_model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer)
    fixed = FixedAnswers(tiny_tokenizer)
    trainer._sample = fixed
    prompt = dataset[0]["prompt"]

    def log_ratio(model):
        return seq_logp(model, tiny_tokenizer, prompt, fixed.ids["improver"]) - seq_logp(
            model, tiny_tokenizer, prompt, fixed.ids["policy"]
        )

    before = log_ratio(trainer.model) - log_ratio(trainer.ref_model)
    trainer.train()
    after = log_ratio(trainer.model) - log_ratio(trainer.ref_model)
    assert before == pytest.approx(0.0, abs=1e-5)
    assert after > 0.5
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    assert margins[-1] > margins[0]


def test_generation_uses_kv_cache_with_gradient_checkpointing(tmp_path, tiny_model, tiny_tokenizer):
    trainer = SGPOTrainer(
        tiny_model,
        args=make_args(tmp_path, gradient_checkpointing=True),
        train_dataset=conv_dataset(),
        processing_class=tiny_tokenizer,
    )
    assert trainer.generation_config.use_cache is True
    assert trainer.improver_generation_config.use_cache is True
    seen = []
    generate = trainer.model.generate

    def spy(**kwargs):
        seen.append((kwargs["generation_config"].use_cache, trainer.model.is_gradient_checkpointing))
        return generate(**kwargs)

    trainer.model.generate = spy
    trainer.train()
    assert seen and all(cache and not ckpt for cache, ckpt in seen)
    assert trainer.model.is_gradient_checkpointing  # switched back on for the backward pass


def test_user_can_turn_the_cache_off(tmp_path, tiny_model, tiny_tokenizer):
    args = make_args(tmp_path, generation_kwargs={"use_cache": False})
    trainer = SGPOTrainer(tiny_model, args=args, train_dataset=conv_dataset(), processing_class=tiny_tokenizer)
    assert trainer.generation_config.use_cache is False


def test_lora_shares_one_adapter_and_reference_is_adapter_off(tmp_path, tiny_model, tiny_tokenizer):
    base = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = SGPOTrainer(
        tiny_model,
        args=make_args(tmp_path, learning_rate=1e-2),
        train_dataset=conv_dataset(),
        processing_class=tiny_tokenizer,
        peft_config=peft_config,
    )
    assert trainer.ref_model is None
    seen_models = []
    sample = FixedAnswers(tiny_tokenizer)

    def spy(model, prompt_ids, role):
        seen_models.append((role, model))
        return sample(model, prompt_ids, role)

    trainer._sample = spy
    trainer.train()
    assert {role for role, _ in seen_models} == {"policy", "improver"}
    assert len({id(m) for _, m in seen_models}) == 1  # policy and improver: the same (adapted) model
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: non-zero means it trained
    for name, param in trainer.model.get_base_model().named_parameters():
        if "lora_" not in name:
            clean = name.replace(".base_layer", "")
            torch.testing.assert_close(param, base[clean])
    # The reference is the adapter-disabled model, not the trained one.
    pairs = trainer.generate_pairs(trainer.model, [conv_dataset(1)[0]["prompt"]])
    ref = trainer.reference_logps(pairs)
    with trainer.model.disable_adapter(), torch.no_grad():
        expected = trainer._all_logps(trainer.model, pairs)
    with torch.no_grad():
        adapted = trainer._all_logps(trainer.model, pairs)
    torch.testing.assert_close(ref["chosen"], expected["chosen"])
    assert not torch.allclose(ref["chosen"], adapted["chosen"])


def test_full_finetune_changes_weights_and_save_load_round_trip(tmp_path, tiny_model, tiny_tokenizer):
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    trainer = SGPOTrainer(
        tiny_model, args=make_args(tmp_path), train_dataset=conv_dataset(), processing_class=tiny_tokenizer
    )
    trainer._sample = FixedAnswers(tiny_tokenizer)
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    trainer.create_model_card(model_name="saved")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, param in trainer.model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], param)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "sgpo" in card and "2507.20181" in card and "SGPO" in card
    assert "| pairs_made | 4 |" in card and "rewards/margins" in card
    for row in ("| pairs_kept | 4 |", "| pairs_truncated_policy | 0 |", "| pairs_truncated_improved | 0 |"):
        assert row in card
    assert "| skipped_steps | 0 |" in card and "| pairs_kept_frac | 1 |" in card


def test_args_none_and_model_path(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = SGPOTrainer(str(tiny_model_dir), train_dataset=conv_dataset())
    assert trainer.args.output_dir.endswith("tiny-model-SGPO")
    assert trainer.args.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert trainer.processing_class.pad_token is not None


def test_per_epoch_beta_list(tmp_path, tiny_model, tiny_tokenizer):
    args = make_args(tmp_path, max_steps=-1, num_train_epochs=2, beta=[0.1, 0.3], per_device_train_batch_size=2)
    trainer = SGPOTrainer(tiny_model, args=args, train_dataset=conv_dataset(4), processing_class=tiny_tokenizer)
    trainer._sample = FixedAnswers(tiny_tokenizer)
    trainer.train()
    betas = [h["beta"] for h in trainer.state.log_history if "beta" in h]
    assert betas[0] == pytest.approx(0.1) and betas[-1] == pytest.approx(0.3)


def test_evaluate_reports_pair_metrics(tmp_path, tiny_model, tiny_tokenizer):
    trainer = SGPOTrainer(
        tiny_model,
        args=make_args(tmp_path),
        train_dataset=conv_dataset(),
        eval_dataset=conv_dataset(4),
        processing_class=tiny_tokenizer,
    )
    fixed = FixedAnswers(tiny_tokenizer)
    trainer._sample = fixed
    metrics = trainer.evaluate()
    assert metrics["eval_sgpo/kept_frac"] == 1.0
    # Before training, policy == reference: the DPO logit is 0 and the loss is log 2.
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["eval_sgpo/chosen_length"] == len(fixed.ids["improver"])
    assert metrics["eval_sgpo/rejected_length"] == len(fixed.ids["policy"])
    trainer.train()
    assert trainer.evaluate()["eval_rewards/margins"] > 0


def test_judge_drops_pairs_it_does_not_prefer(tmp_path, tiny_model, tiny_tokenizer):
    def judge(prompts, completions, **kwargs):
        # Prefers the improved answer only for even-numbered questions.
        scores = []
        for prompt, completion in zip(prompts, completions):
            even = int(prompt[0]["content"].split()[2]) % 2 == 0
            improved = completion[0]["content"] == "two two"
            scores.append(1.0 if improved == even else 0.0)
        return scores

    trainer = judged_trainer(tmp_path, tiny_model, tiny_tokenizer, judge)
    trainer.train()
    counts = trainer.pair_counts
    assert {k: counts[k] for k in ("made", "kept", "empty", "identical", "judge_rejected")} == {
        "made": 8,
        "kept": 4,
        "empty": 0,
        "identical": 0,
        "judge_rejected": 4,
    }
    logs = [h for h in trainer.state.log_history if "sgpo/kept_frac" in h]
    assert all(h["sgpo/kept_frac"] == 0.5 and h["sgpo/judge_rejected_frac"] == 0.5 for h in logs)
    assert all(h["objective/scores_margin"] == 1.0 for h in logs)  # only preferred pairs trained


def test_a_judge_that_abstains_drops_the_pair(tmp_path, tiny_model, tiny_tokenizer):
    def judge(prompts, completions, **kwargs):
        # Prefers every improvement, but cannot score the improvement of question 0 (None) nor the drafts of
        # questions 1 (None) and 2 (NaN).
        scores = []
        for prompt, completion in zip(prompts, completions):
            question = int(prompt[0]["content"].split()[2])
            improved = completion[0]["content"] == "two two"
            abstains = question == 0 if improved else question in (1, 2)
            score = 1.0 if improved else 0.0
            scores.append((float("nan") if question == 2 else None) if abstains else score)
        return scores

    trainer = judged_trainer(tmp_path, tiny_model, tiny_tokenizer, judge)
    pairs = trainer.generate_pairs(
        trainer.model, [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in (0, 1, 2, 3)]
    )
    assert pairs.keep.tolist() == [False, False, False, True]
    assert pairs.flags["judge_abstained"].tolist() == [True, True, True, False]
    assert not pairs.flags["judge_rejected"].any()
    trainer.train()
    counts = trainer.pair_counts
    assert {k: counts[k] for k in ("made", "kept", "judge_abstained", "judge_rejected")} == {
        "made": 8,
        "kept": 5,
        "judge_abstained": 3,
        "judge_rejected": 0,
    }
    logs = [h for h in trainer.state.log_history if "sgpo/judge_abstained_frac" in h]
    assert logs and sum(h["sgpo/judge_abstained_frac"] for h in logs) == pytest.approx(3 / 4)
    assert all(h["objective/scores_margin"] == 1.0 for h in logs)  # only scored pairs trained


def test_judge_scores_match_online_dpo_when_no_function_abstains(tmp_path, tiny_model, tiny_tokenizer):
    # SGPO scores its reward functions itself (a plain sum, so an abstention is NaN): without abstentions the scores
    # are OnlineDPO's, for a reward model and a callable, weighted.
    reward_model = build_tiny_reward_model(tiny_tokenizer)

    def length(prompts, completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]

    trainer = SGPOTrainer(
        tiny_model,
        reward_funcs=[reward_model, length],
        reward_processing_classes=[tiny_tokenizer, None],
        args=make_args(tmp_path, reward_weights=[2.0, 0.5]),
        train_dataset=conv_dataset(4),
        processing_class=tiny_tokenizer,
    )
    prompts = conv_dataset(2)["prompt"]
    completions = ["two two", "one three", "one", "seven"]
    ids = [tiny_tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    ours = trainer._judge(prompts, completions, ids, {})
    theirs = trainer._calculate_rewards_from_functions(
        prompts=2 * list(prompts),
        completions=[[{"role": "assistant", "content": c}] for c in completions],
        completion_ids_list=ids,
    )
    torch.testing.assert_close(ours, theirs)


def test_empty_or_identical_improvements_are_skipped_without_an_update(tmp_path, tiny_model, tiny_tokenizer):
    args = make_args(tmp_path, optim="sgd", learning_rate=1.0, weight_decay=0.0, max_steps=2)
    trainer = SGPOTrainer(tiny_model, args=args, train_dataset=conv_dataset(), processing_class=tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    answers = FixedAnswers(tiny_tokenizer, improver=[])  # the improver writes nothing
    trainer._sample = answers
    trainer.train()
    assert trainer.pair_counts["empty"] == 4 and trainer.pair_counts["kept"] == 0
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert all(h["sgpo/empty_frac"] == 1.0 for h in trainer.state.log_history if "sgpo/empty_frac" in h)

    trainer2 = SGPOTrainer(
        tiny_model, args=make_args(tmp_path / "b"), train_dataset=conv_dataset(), processing_class=tiny_tokenizer
    )
    trainer2._sample = FixedAnswers(tiny_tokenizer, bad="same", good="same")
    trainer2.train()
    assert trainer2.pair_counts["identical"] == 4 and trainer2.pair_counts["kept"] == 0


def test_bad_inputs_raise_clear_errors(tmp_path, tiny_model, tiny_tokenizer):
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match=r"missing the column\(s\) \['prompt'\]"):
        SGPOTrainer(
            tiny_model,
            args=args,
            train_dataset=Dataset.from_dict({"question": ["q"]}),
            processing_class=tiny_tokenizer,
        )
    with pytest.raises(ValueError, match=r"empty `prompt` in row\(s\) 1"):
        SGPOTrainer(
            tiny_model,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["ok", "  "]}),
            processing_class=tiny_tokenizer,
        )
    with pytest.raises(ValueError, match="missing_eos_penalty"):
        make_args(tmp_path, missing_eos_penalty=1.0)
    with pytest.raises(ValueError, match="`judge_margin` must be >= 0"):
        make_args(tmp_path, judge_margin=-0.5)
    with pytest.raises(ValueError, match="Every prompt"):
        SGPOTrainer(
            tiny_model,
            args=make_args(tmp_path, max_length=16, max_new_tokens=8, improver_max_new_tokens=8),
            train_dataset=Dataset.from_dict({"prompt": ["a long prompt " * 10]}),
            processing_class=tiny_tokenizer,
        )


def test_long_prompts_are_skipped_and_missing_pad_token_is_filled(tmp_path, tiny_model, tiny_tokenizer, caplog):
    tiny_tokenizer.pad_token = None
    dataset = Dataset.from_dict({"prompt": ["short", "a long prompt " * 40, "also short"]})
    trainer = SGPOTrainer(
        tiny_model,
        args=make_args(tmp_path, max_length=64, max_new_tokens=8),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    assert trainer.train_dataset["prompt"] == ["short", "also short"]
    assert "Skipping 1 of 3 prompts" in caplog.text
    assert tiny_tokenizer.pad_token == tiny_tokenizer.eos_token


def test_prompt_room_leaves_space_for_the_longer_answer(tmp_path, tiny_model, tiny_tokenizer):
    # Rendered lengths: 4 and 28 tokens. With max_length 64, a 16-token policy answer leaves room for both prompts,
    # but a 48-token improved answer (scored under the same prompt) leaves room for 16 prompt tokens only.
    dataset = Dataset.from_dict({"prompt": ["short", "a long prompt " * 3]})
    kept = SGPOTrainer(
        tiny_model,
        args=make_args(tmp_path, max_length=64, max_new_tokens=16, per_device_train_batch_size=1),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    ).train_dataset
    assert len(kept) == 2
    kept = SGPOTrainer(
        tiny_model,
        args=make_args(
            tmp_path, max_length=64, max_new_tokens=16, improver_max_new_tokens=48, per_device_train_batch_size=1
        ),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    ).train_dataset
    assert kept["prompt"] == ["short"]


def test_standard_text_prompts_train(tmp_path, tiny_model, tiny_tokenizer):
    dataset = Dataset.from_dict({"prompt": [f"Question {i}: what is {i} times 2?" for i in range(4)]})
    trainer = SGPOTrainer(tiny_model, args=make_args(tmp_path), train_dataset=dataset, processing_class=tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    fixed = FixedAnswers(tiny_tokenizer)
    trainer._sample = fixed
    trainer.train()
    # A standard prompt is used as raw text (no chat template); the improver gets the plain-text request.
    role, texts = fixed.calls[0]
    assert role == "policy" and all(t.startswith("Question ") for t in texts)
    assert fixed.calls[1][1][0].endswith("### Improved answer\n") or "### Improved answer" in fixed.calls[1][1][0]
    assert trainer.pair_counts["kept"] == 4
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_pair_counts_survive_a_resume_from_checkpoint(tmp_path, tiny_model_dir, tiny_tokenizer):
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    first = SGPOTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=conv_dataset(),
        processing_class=tiny_tokenizer,
    )
    first._sample = FixedAnswers(tiny_tokenizer)
    first.train()
    assert first.pair_counts["made"] == 8 and first.pair_counts["kept"] == 8

    # A run that stopped after step 2 resumes from checkpoint-2 and reports the totals of the whole run.
    resumed = SGPOTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=conv_dataset(),
        processing_class=tiny_tokenizer,
    )
    resumed._sample = FixedAnswers(tiny_tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert len(resumed._sample.calls) == 4  # steps 3 and 4 only, policy then improver
    assert resumed.pair_counts == first.pair_counts


def test_zero3_reference_is_the_weights_the_round_starts_from(tmp_path, tiny_model_dir, monkeypatch):
    import trl_sgpo.trainers.onpolicy as onpolicy
    from trl_sgpo import load_model_and_tokenizer

    # Under ZeRO-3 the reference is loaded again from the folder the policy's weights came from. The pipeline renames
    # `_name_or_path` to the base model's Hub id for the model card; the copy must still come from the local weights.
    monkeypatch.setattr(onpolicy, "is_deepspeed_zero3_enabled", lambda: True)
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    model.config._name_or_path = "someone/base-model-not-on-this-machine"
    loaded = []
    from_pretrained = onpolicy.AutoModelForCausalLM.from_pretrained

    def spy(source, **kwargs):
        loaded.append(str(source))
        return from_pretrained(source, **kwargs)

    monkeypatch.setattr(onpolicy.AutoModelForCausalLM, "from_pretrained", spy)
    args = make_args(tmp_path, max_steps=1)
    trainer = SGPOTrainer(model, args=args, train_dataset=conv_dataset(), processing_class=tokenizer)
    assert loaded == [str(tiny_model_dir)]
    assert trainer.model.config._name_or_path == "someone/base-model-not-on-this-machine"  # the card keeps its name
    for (name, p), (_, q) in zip(model.named_parameters(), trainer.ref_model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)

    # Round 1 trains this model object in memory: its folder no longer holds its weights.
    trainer._sample = FixedAnswers(tokenizer)
    trainer.train()
    assert onpolicy.reference_weights_source(model) is None
    with pytest.raises(ValueError, match="Pass `ref_model`"):
        SGPOTrainer(model, args=args, train_dataset=conv_dataset(), processing_class=tokenizer)
    # Saved, the round's folder is the next round's reference.
    trainer.save_model(str(tmp_path / "round1"))
    assert onpolicy.reference_weights_source(model) == str(tmp_path / "round1")
    next_round = SGPOTrainer(model, args=args, train_dataset=conv_dataset(), processing_class=tokenizer)
    assert loaded[-1] == str(tmp_path / "round1")
    for (name, p), (_, q) in zip(model.named_parameters(), next_round.ref_model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_sgpo_reads_the_template_saved_with_the_model_and_saves_it_again(tmp_path, tiny_model, tiny_tokenizer):
    from trl_sgpo.templates import TEMPLATE_FILE, ImproverTemplate

    folder = tmp_path / "improver-sft"
    tiny_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    ImproverTemplate(instruction="Make the answer one step better.").save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)

    trainer = SGPOTrainer(
        model, args=make_args(tmp_path), train_dataset=conv_dataset(), processing_class=tiny_tokenizer
    )
    assert trainer.improver_template.instruction == "Make the answer one step better."
    # An explicit instruction wins over the saved one.
    explicit = SGPOTrainer(
        model,
        args=make_args(tmp_path, improver_instruction="Fix it."),
        train_dataset=conv_dataset(),
        processing_class=tiny_tokenizer,
    )
    assert explicit.improver_template.instruction == "Fix it."

    trainer.save_model(str(tmp_path / "saved"))
    assert ImproverTemplate.from_pretrained(tmp_path / "saved") == trainer.improver_template
    assert (tmp_path / "saved" / TEMPLATE_FILE).is_file()


def test_fewer_prompts_than_one_window_is_an_error(tmp_path, tiny_model, tiny_tokenizer):
    # The sampler yields whole accumulation windows: 2 prompts and windows of 2 x 2 would train nothing, silently.
    args = make_args(tmp_path)
    args.per_device_train_batch_size, args.gradient_accumulation_steps = 2, 2
    with pytest.raises(ValueError, match=r"`train_dataset` has 2 prompts, fewer than one optimizer step takes .* = 4"):
        SGPOTrainer(tiny_model, args=args, train_dataset=chat_prompts(2), processing_class=tiny_tokenizer)
