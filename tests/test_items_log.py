"""items.jsonl: every item each window made, kept or why dropped, with its judge scores and per-item loss figures."""

import copy
import json
import math
from collections import Counter

import pytest
from test_sgpo_trainer import seq_logp
from test_sppo_trainer import sigmoid, trainer_with
from transformers import AutoModelForCausalLM

from helpers.trainer_args import chat_prompts, tiny_config
from trl_sgpo import SGPOConfig, SGPOTrainer
from trl_sgpo.trainers.items_log import read_items


IMPROVED = ["two two", "two two two", "two two two two", "fox"]


class ByWindowPosition:
    """Stand-in sampler: the draft is always "one"; the improvement at window position i is ``IMPROVED[i]``, or "one"
    (identical, dropped) at the positions ``drops`` lists for the window."""

    def __init__(self, tokenizer, drops):
        self.tokenizer, self.drops, self.window = tokenizer, drops, 0

    def ids(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def __call__(self, model, prompt_ids, role):
        if role == "policy":
            self.window += 1
            return [self.ids("one") for _ in prompt_ids]
        drop = self.drops.get(self.window, set())
        return [self.ids("one" if i in drop else IMPROVED[i]) for i in range(len(prompt_ids))]


def length_judge(prompts, completions, **kwargs):
    return [float(len(c[0]["content"])) for c in completions]


def sgpo(tmp_path, model, tokenizer, drops, **kw):
    args = tiny_config(
        SGPOConfig,
        tmp_path,
        **{**dict(max_steps=2, max_length=128, gradient_accumulation_steps=2, learning_rate=1e-2), **kw},
    )
    trainer = SGPOTrainer(
        model, reward_funcs=length_judge, args=args, train_dataset=chat_prompts(12), processing_class=tokenizer
    )
    trainer._sample = ByWindowPosition(tokenizer, drops)
    return trainer


def test_sgpo_writes_one_line_per_pair_with_its_drop_reasons_scores_and_margins(tmp_path, tiny_model, tiny_tokenizer):
    # Window 1: position 1 identical, position 3 ("fox", as long as "one") rejected by the judge. Window 2: the first
    # micro-batch keeps nothing (skipped on one process). Window 3: everything identical, so the step is skipped.
    initial = copy.deepcopy(tiny_model)
    trainer = sgpo(tmp_path, tiny_model, tiny_tokenizer, drops={1: {1}, 2: {0, 1}, 3: {0, 1, 2, 3}}, max_steps=3)
    trainer.train()
    items = read_items(tmp_path / "out" / "items.jsonl")
    counts = trainer.pair_counts
    assert counts["skipped_steps"] == 1
    assert len(items) == counts["made"] == 12
    assert [(i["step"], i["index"]) for i in items] == [(s, k) for s in (1, 2, 3) for k in range(4)]
    assert len({i["id"] for i in items}) == 12
    assert sum(i["kept"] for i in items) == counts["kept"] == 3
    flags = Counter(f for i in items for f in i["flags"])
    assert {k: flags[k] for k in ("identical", "judge_rejected", "empty")} == {
        k: counts[k] for k in ("identical", "judge_rejected", "empty")
    }
    assert [i["flags"] for i in items[:8]] == [[], ["identical"], [], ["judge_rejected"]] + [
        ["identical"],
        ["identical"],
        [],
        ["judge_rejected"],
    ]
    assert all(i["flags"] == ["identical"] and not i["kept"] for i in items[8:])  # the skipped window's items
    for item in items:
        assert item["texts"]["draft"] == "one"
        assert item["values"]["score_chosen"] == len(item["texts"]["improved"])
        assert item["values"]["judge_margin"] == len(item["texts"]["improved"]) - 3
        assert (item["metrics"] is not None) == item["kept"]
    # Each kept pair carries its own log-probs and margin, computed by the policy of step 1 (still the reference).
    for item in (i for i in items[:4] if i["kept"]):
        chosen_ids = trainer._sample.ids(item["texts"]["improved"])
        expected = seq_logp(initial, tiny_tokenizer, item["prompt"], chosen_ids)
        assert item["metrics"]["logps/chosen"] == pytest.approx(expected, abs=1e-4)
        assert item["metrics"]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
        assert item["metrics"]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert items[6]["metrics"]["rewards/margins"] != 0  # step 2 trains on the policy after one update


def test_resume_keeps_the_lines_up_to_the_checkpoint_and_writes_the_rest_once(
    tmp_path, tiny_model_dir, tiny_tokenizer
):
    def run(drops, **kw):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        trainer = sgpo(tmp_path, model, tiny_tokenizer, drops, max_steps=3, save_strategy="steps", save_steps=1)
        trainer.train(**kw)
        return read_items(tmp_path / "out" / "items.jsonl")

    first = run({})
    assert [i["step"] for i in first] == [1] * 4 + [2] * 4 + [3] * 4
    with open(tmp_path / "out" / "items.jsonl", "a") as f:
        f.write('{"step": 4, "id": "4-0", "pro')  # a line cut by a crash mid-write
    # Resumed from step 1, drops everywhere: steps 2 and 3 are made again and replace the old lines.
    resumed = run({1: {0, 1, 2, 3}, 2: {0, 1, 2, 3}}, resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    assert [i["step"] for i in resumed] == [1] * 4 + [2] * 4 + [3] * 4
    assert resumed[:4] == first[:4]
    assert not any(i["kept"] for i in resumed[4:])
    # A fresh run into the same folder starts a new file.
    fresh = run({1: {0, 1, 2, 3}})
    assert [i["step"] for i in fresh] == [1] * 4 + [2] * 4 + [3] * 4 and not any(i["kept"] for i in fresh[:4])


def test_log_items_false_writes_nothing(tmp_path, tiny_model, tiny_tokenizer):
    trainer = sgpo(tmp_path, tiny_model, tiny_tokenizer, drops={}, max_steps=1, log_items=False)
    trainer.train()
    assert trainer.pair_counts["made"] == 4  # it trained
    assert not (tmp_path / "out" / "items.jsonl").exists()


def test_sppo_writes_every_answer_with_its_win_rate_and_the_kept_ones_target(tmp_path, tiny_model, tiny_tokenizer):
    trainer = trainer_with(tmp_path, tiny_model, tiny_tokenizer, ["one", "two two two", "two two"])
    trainer.train()
    items = read_items(tmp_path / "out" / "items.jsonl")
    # One step of 2 prompts x 3 answers; lengths 3, 11, 7 (the judge scores length).
    assert len(items) == trainer.counts["made"] == 6
    assert [i["prompt_index"] for i in items] == [0, 0, 0, 1, 1, 1]
    assert items[0]["prompt"] == items[2]["prompt"] != items[3]["prompt"]
    best = (0.5 + sigmoid(8) + sigmoid(4)) / 3
    worst = (0.5 + sigmoid(-8) + sigmoid(-4)) / 3
    middle = (0.5 + sigmoid(4) + sigmoid(-4)) / 3
    for item, rate, kept in zip(items, [worst, best, middle] * 2, [True, True, False] * 2, strict=True):
        assert item["values"]["win_rate"] == pytest.approx(rate)
        assert item["kept"] == kept
        if kept:
            assert item["values"]["target"] == pytest.approx(rate)
            assert item["metrics"]["sppo/target_win_rate"] == pytest.approx(rate)
            assert item["metrics"]["loss"] >= 0
        else:
            assert item["flags"] == ["not_selected"]
            assert item["values"]["target"] is None and item["metrics"] is None


def test_sso_writes_its_three_answers_and_the_principle(tmp_path, tiny_model, tiny_tokenizer):
    from test_sso_trainer import build

    trainer = build(tmp_path, tiny_model, tiny_tokenizer)
    trainer.train()
    items = read_items(tmp_path / "out" / "items.jsonl")
    assert len(items) == trainer.counts["made"] == 2 and all(i["kept"] for i in items)
    for item in items:
        assert {k: item["texts"][k] for k in ("y+", "y-", "yo")} == {
            "y+": "two two",
            "y-": "one",
            "yo": "three three three",
        }
        assert item["texts"]["principle"] in {p.name for p in trainer.principles}
        assert {"loss", "sso/weight", "rewards/margins"} <= set(item["metrics"])


def test_rounds_are_joined_with_their_number_and_pushed_as_a_dataset(tmp_path):
    from types import SimpleNamespace

    from test_pipeline import LocalHub

    from trl_sgpo.pipeline.items_dataset import collect_items, push_items

    rounds = [tmp_path / "stages" / f"05_sppo_iter{k}" for k in (1, 2, 3)]
    for k, folder in enumerate(rounds, start=1):
        folder.mkdir(parents=True)
        if k != 2:  # a round run with log_items=False wrote no items
            lines = [{"step": 1, "id": f"1-{i}", "kept": i == 0, "metrics": None} for i in range(k)]
            (folder / "items.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "run"
    assert collect_items(out, rounds[1:2], "sppo", "tiny") is None
    folder = collect_items(out, rounds, "sppo", "tiny")
    joined = read_items(folder / "items.jsonl")
    assert [(i["round"], i["method"], i["id"]) for i in joined] == [(1, "sppo", "1-0")] + [
        (3, "sppo", f"1-{i}") for i in range(3)
    ]
    hub = LocalHub(tmp_path / "hub")
    args = SimpleNamespace(hub_token=None, hub_private_repo=None, hub_revision=None)
    assert push_items(hub, "local-user/tiny", folder, args) == "local-user/tiny-items"
    card = (tmp_path / "hub" / "local-user" / "tiny-items" / "README.md").read_text()
    assert 'load_dataset("local-user/tiny-items"' in card and "# Items trained on by local-user/tiny" in card
    assert "2 round(s), 4 items" in card
