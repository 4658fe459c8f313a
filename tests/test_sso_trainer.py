"""SSOTrainer: principles as system messages, which examples train, the loss of a step and its effect on weights."""

import json
import math

import pytest
import torch

from helpers.trainer_args import chat_prompts, tiny_config
from trl_sgpo import SSOConfig, SSOTrainer
from trl_sgpo.templates import render_prompt
from trl_sgpo.trainers.sso_principles import load_principles, steer, supports_system_role


RAISES_ON_SYSTEM = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DROPS_SYSTEM = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def conv_dataset(n=4):
    return chat_prompts(n)


def make_args(tmp_path, **kw):
    return tiny_config(SSOConfig, tmp_path, **{**dict(max_steps=1, max_length=512, learning_rate=1e-2), **kw})


class Steered:
    """Stand-in sampler: rows come as [x+ ; x- ; x]; answers y+, y-, y_o are fixed texts (``None``: cut)."""

    def __init__(self, tokenizer, good="two two", bad="one", plain="three three three"):
        eos = tokenizer.eos_token_id

        def ids(text):
            if text is None:
                return tokenizer("cut cut", add_special_tokens=False)["input_ids"]
            return tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]

        self.answers = [ids(good), ids(bad), ids(plain)]
        self.calls = []

    def __call__(self, model, prompt_ids, **kwargs):
        self.calls.append(prompt_ids)
        n = len(prompt_ids) // 3
        return [list(self.answers[i // n]) for i in range(len(prompt_ids))]


def build(tmp_path, model, tokenizer, sampler_kwargs=None, **kw):
    trainer = SSOTrainer(
        model, args=make_args(tmp_path, **kw), train_dataset=conv_dataset(), processing_class=tokenizer
    )
    trainer.generate_ids = Steered(tokenizer, **(sampler_kwargs or {}))
    return trainer


def test_shipped_principles_load_and_a_bad_file_names_the_field(tmp_path):
    principles = load_principles()
    assert len(principles) >= 7 and len({p.name for p in principles}) == len(principles)
    bad = tmp_path / "p.jsonl"
    bad.write_text(
        json.dumps({"name": "x", "good_adjective": "good", "bad_adjective": "bad", "good": "Be good."}) + "\n"
    )
    with pytest.raises(ValueError, match="line 1: principle without bad"):
        load_principles(str(bad))


def test_principles_reach_the_chat_template_as_system_messages(tmp_path, tiny_model, tiny_tokenizer):
    trainer = build(tmp_path, tiny_model, tiny_tokenizer)
    prompts = conv_dataset(2)["prompt"]
    trainer.make_items(None, prompts, {})
    (rows,) = trainer.generate_ids.calls
    texts = [tiny_tokenizer.decode(r) for r in rows]
    for i in range(2):
        good, bad, plain = texts[i], texts[2 + i], texts[4 + i]
        assert good.startswith("<|im_start|>system\nYour answer should be ")
        assert bad.startswith("<|im_start|>system\nYour answer should be ")
        assert good != bad
        # The plain prompt is exactly the user's prompt rendered by the template, with no principle.
        assert plain == render_prompt(prompts[i], tiny_tokenizer)
        assert good.endswith(plain.split("<|im_start|>system")[-1])
    # Good and bad system messages come from the same principle, the one the items record.
    items = trainer.make_items(None, prompts[:1], {})
    principle = next(p for p in trainer.principles if p.good in texts[0])
    assert principle.bad in texts[2]
    recorded = next(p for p in trainer.principles if p.name == items.texts["principle"][0])
    assert recorded.good in tiny_tokenizer.decode(trainer.generate_ids.calls[1][0])


def test_template_without_system_role_errors_or_falls_back(tmp_path, tiny_model, tiny_tokenizer):
    for template in (RAISES_ON_SYSTEM, DROPS_SYSTEM):
        tiny_tokenizer.chat_template = template
        assert not supports_system_role(tiny_tokenizer)
        with pytest.raises(ValueError, match="system_role_fallback='user_turn'"):
            build(tmp_path, tiny_model, tiny_tokenizer)
    trainer = build(tmp_path, tiny_model, tiny_tokenizer, system_role_fallback="user_turn")
    trainer.make_items(None, conv_dataset(1)["prompt"], {})
    good = tiny_tokenizer.decode(trainer.generate_ids.calls[0][0])
    assert good.startswith("<|im_start|>user\nYour answer should be ") and good.rstrip().endswith("assistant")
    assert "What is 0 plus 0?" in good


def test_steer_keeps_an_existing_system_message_and_string_prompts():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert steer(prompt, "P")[0] == {"role": "system", "content": "Be brief.\n\nP"}
    assert prompt[0]["content"] == "Be brief."  # not mutated
    assert steer("Hi", "P") == "P\n\nHi"


def test_examples_with_two_identical_answers_or_a_cut_one_are_dropped(tmp_path, tiny_model, tiny_tokenizer):
    cases = {
        "identical": {"good": "two two", "bad": "one", "plain": "two two"},
        "truncated": {"good": "two two", "bad": None, "plain": "three"},
    }
    for flag, answers in cases.items():
        trainer = build(tmp_path, tiny_model, tiny_tokenizer, sampler_kwargs=answers)
        items = trainer.make_items(None, conv_dataset(2)["prompt"], {})
        assert items.flags[flag].tolist() == [True, True]
        assert not items.keep.any()
    trainer = build(tmp_path, tiny_model, tiny_tokenizer)
    items = trainer.make_items(None, conv_dataset(2)["prompt"], {})
    assert items.keep.all() and not any(f.any() for f in items.flags.values())


def mean_logp(model, tokenizer, prompt, answer_ids):
    prompt_ids = tokenizer(render_prompt(prompt, tokenizer), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]
    return logits.log_softmax(-1).gather(1, torch.tensor(answer_ids)[:, None]).mean().item()


def test_loss_value_matches_hand_formula(tmp_path, tiny_model, tiny_tokenizer):
    trainer = build(tmp_path, tiny_model, tiny_tokenizer, per_device_train_batch_size=1)
    prompt = conv_dataset(1)["prompt"][0]
    good_ids, bad_ids, plain_ids = trainer.generate_ids.answers
    m_good = mean_logp(tiny_model, tiny_tokenizer, prompt, good_ids)
    m_bad = mean_logp(tiny_model, tiny_tokenizer, prompt, bad_ids)
    items = trainer.make_items(None, [prompt], {})

    # Each named sequence holds the right answer under the right prompt.
    x = tiny_tokenizer(render_prompt(prompt, tiny_tokenizer), add_special_tokens=False)["input_ids"]
    (rows,) = trainer.generate_ids.calls
    x_good, x_bad = rows[0], rows[1]
    expected = {
        "plain_chosen": (x, good_ids),
        "plain_rejected": (x, bad_ids),
        "good_chosen": (x_good, good_ids),
        "good_rejected": (x_good, bad_ids),
        "bad_chosen": (x_bad, plain_ids),
        "bad_rejected": (x_bad, good_ids),
    }
    for name, (prompt_ids, answer_ids) in expected.items():
        seqs = items.sequences[name]
        assert seqs.prompt_ids[0][seqs.prompt_mask[0].bool()].tolist() == prompt_ids, name
        assert seqs.completion_ids[0][seqs.completion_mask[0].bool()].tolist() == answer_ids, name

    logps = trainer._all_logps(trainer.model, items)
    # Reference log-probs below the policy's by a per-sequence offset: the DPO logits are then 1 (x; y+ > y-),
    # 2 (x+; y+ > y-) and -3 (x-; y_o > y+). IPO, beta 0.2 (target 2.5): 2.25 + 0.1 * (0.25 + 30.25) = 5.3.
    offsets = {"plain_chosen": 1.0, "good_chosen": 2.0, "bad_rejected": 3.0}
    ref = {k: v.detach() - offsets.get(k, 0.0) for k, v in logps.items()}
    losses, metrics = trainer.item_losses(items, logps, ref)
    w = 1 / (1 + math.exp(0.66 * m_good + 0.34 * m_bad))
    assert metrics["sso/weight"].item() == pytest.approx(w, rel=1e-5)
    assert losses.item() == pytest.approx(5.3 * w, rel=1e-5)


def test_step_moves_weights_only_when_something_was_kept(tmp_path, tiny_model, tiny_tokenizer):
    trainer = build(tmp_path, tiny_model, tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.counts["kept"] == 2
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())

    trainer = build(
        tmp_path, trainer.model, tiny_tokenizer, sampler_kwargs={"plain": "two two"}, max_initial_empty_steps=0
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.counts["kept"] == 0 and trainer.counts["identical"] == 2
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_model_card_names_sso(tmp_path, tiny_model, tiny_tokenizer):
    trainer = build(tmp_path, tiny_model, tiny_tokenizer)
    trainer.train()
    trainer.create_model_card(model_name="tiny-sso")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "SSO" in card and "2410.17131" in card and "Self-Steering Optimization" in card
