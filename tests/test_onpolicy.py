"""The step OnPolicyTrainer owns, checked through SGPOTrainer: validity, empty windows, accumulation, OnlineDPO seams."""

import copy
import inspect
import math
import re

import pytest
import torch
from transformers import TrainerCallback
from trl.experimental.online_dpo import OnlineDPOTrainer

from helpers.trainer_args import chat_prompts, tiny_config
from trl_sgpo import SGPOConfig, SGPOTrainer
from trl_sgpo.trainers.onpolicy import ONLINE_DPO_MEMBERS_USED, OnPolicyTrainer


def prompts(n):
    return chat_prompts(n)


def make_args(tmp_path, **kw):
    return tiny_config(SGPOConfig, tmp_path, **{**dict(max_steps=2, max_length=128, learning_rate=1e-3), **kw})


class Scripted:
    """Stand-in sampler: the draft is `one`, the improvement `two two`; both end with EOS unless told otherwise.

    ``drop`` lists positions (in each call's list of prompts) whose improvement repeats the draft, so that pair is
    dropped as identical; ``plan`` maps a call number (one per window) to such a list.
    """

    def __init__(self, tokenizer, drop=(), plan=None, draft_eos=True, improved_eos=True, improver=None):
        eos = [tokenizer.eos_token_id]
        self.draft = tokenizer("one", add_special_tokens=False)["input_ids"] + (eos if draft_eos else [])
        improved = improver if improver is not None else tokenizer("two two", add_special_tokens=False)["input_ids"]
        self.improved = list(improved) + (eos if improved_eos else [])
        self.drop, self.plan, self.windows = set(drop), plan, 0

    def __call__(self, model, prompt_ids, role):
        if role == "policy":
            self.windows += 1
            return [list(self.draft) for _ in prompt_ids]
        drop = self.drop if self.plan is None else set(self.plan.get(self.windows, ()))
        return [list(self.draft) if i in drop else list(self.improved) for i in range(len(prompt_ids))]


def test_online_dpo_members_still_relied_on_exist(tmp_path, tiny_model, tiny_tokenizer):
    # SGPOTrainer still subclasses TRL's experimental OnlineDPOTrainer; these are the members it uses. A TRL release
    # that drops or renames one must fail here, not change training silently.
    assert issubclass(SGPOTrainer, OnPolicyTrainer) and issubclass(OnPolicyTrainer, OnlineDPOTrainer)
    init_source = inspect.getsource(OnlineDPOTrainer.__init__)
    for name in ONLINE_DPO_MEMBERS_USED:
        # A method OnlineDPOTrainer defines, or an attribute its __init__ sets.
        assert name in vars(OnlineDPOTrainer) or re.search(rf"\bself\.{name}\s*=", init_source), name
    trainer = SGPOTrainer(
        tiny_model, args=make_args(tmp_path), train_dataset=prompts(4), processing_class=tiny_tokenizer
    )
    # OnlineDPO sets these three only when vLLM is on; the rest every trainer has.
    vllm_only = {"llm", "vllm_client", "_last_loaded_step"}
    for name in ONLINE_DPO_MEMBERS_USED:
        assert name in vllm_only or hasattr(trainer, name), name
    # And the OnlineDPO machinery this package replaced is not used: no training_step of OnlineDPO's, no _generate.
    assert SGPOTrainer.training_step is OnPolicyTrainer.training_step
    assert "_generate" not in vars(OnPolicyTrainer) and "_pending_pairs" not in vars(trainer)


def _snapshot(trainer):
    return (
        {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        copy.deepcopy(trainer.optimizer.state_dict()),
        trainer.lr_scheduler.last_epoch,
        [g["lr"] for g in trainer.optimizer.param_groups],
    )


class Snapshots(TrainerCallback):
    def __init__(self):
        self.trainer, self.after = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.after.append(_snapshot(self.trainer))


def _assert_same(a, b):
    params_a, opt_a, epoch_a, lrs_a = a
    params_b, opt_b, epoch_b, lrs_b = b
    assert all(torch.equal(params_a[n], params_b[n]) for n in params_a)
    assert epoch_a == epoch_b and lrs_a == lrs_b
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for key, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][key][name])), (key, name)


def test_a_step_that_keeps_nothing_leaves_weights_optimizer_and_schedule_bit_identical(
    tmp_path, tiny_model, tiny_tokenizer
):
    # AdamW with weight decay and a warmup schedule: momentum, decay and the schedule would all move a skipped step.
    args = make_args(
        tmp_path, max_steps=3, optim="adamw_torch", weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=2
    )
    trainer = SGPOTrainer(tiny_model, args=args, train_dataset=prompts(8), processing_class=tiny_tokenizer)
    trainer._sample = Scripted(tiny_tokenizer, plan={2: (0, 1)})  # window 2 keeps no pair
    snapshots = Snapshots()
    snapshots.trainer = trainer
    trainer.add_callback(snapshots)
    trainer.train()
    first, second, third = snapshots.after
    _assert_same(first, second)
    assert not all(torch.equal(first[0][n], third[0][n]) for n in first[0])  # step 3 trains again
    assert third[2] == first[2] + 1
    assert trainer.pair_counts["skipped_steps"] == 1 and trainer.pair_counts["identical"] == 2
    logs = [h for h in trainer.state.log_history if "sgpo/skipped_steps" in h and "loss" in h]
    assert [h["sgpo/skipped_steps"] for h in logs] == [0, 1, 1]
    assert logs[1]["loss"] != logs[1]["loss"]  # NaN: a skipped step reports no loss rather than a placeholder
    # Nor a gradient norm: NaN, not a 0 that reads as "gradients vanished" (the other steps clip at 1.0).
    assert math.isnan(logs[1]["grad_norm"]) and all(math.isfinite(logs[i]["grad_norm"]) for i in (0, 2))


def test_improvements_cut_at_the_budget_never_train(tmp_path, tiny_model, tiny_tokenizer):
    # A real tiny model whose improver can never write its EOS: every improvement hits the token budget. Cut drafts
    # are let through, so the improvement's own budget is what drops the pairs.
    args = make_args(
        tmp_path,
        max_steps=2,
        optim="adamw_torch",
        weight_decay=0.1,
        max_initial_empty_steps=0,
        keep_truncated_drafts=True,
    )
    trainer = SGPOTrainer(tiny_model, args=args, train_dataset=prompts(4), processing_class=tiny_tokenizer)
    trainer.improver_generation_config.suppress_tokens = list(trainer.eos_token_ids)
    trainer.improver_generation_config.min_new_tokens = args.improver_max_new_tokens
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.pair_counts["made"] == 4 and trainer.pair_counts["kept"] == 0
    assert trainer.pair_counts["truncated_improved"] == 4
    logs = [h for h in trainer.state.log_history if "sgpo/kept_frac" in h]
    assert logs and all(h["sgpo/truncated_improved_frac"] == 1.0 for h in logs)
    # Improvements ran to their own budget (twice the draft's by default), not to `max_new_tokens`.
    assert all(h["sgpo/chosen_length"] == args.improver_max_new_tokens == 12 for h in logs)
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_cut_drafts_are_dropped_unless_kept_on_purpose(tmp_path, tiny_model, tiny_tokenizer):
    for keep_truncated, kept in ((False, 0), (True, 4)):
        args = make_args(
            tmp_path / str(keep_truncated), keep_truncated_drafts=keep_truncated, max_initial_empty_steps=0
        )
        trainer = SGPOTrainer(tiny_model, args=args, train_dataset=prompts(4), processing_class=tiny_tokenizer)
        trainer._sample = Scripted(tiny_tokenizer, draft_eos=False)
        trainer.train()
        counts = trainer.pair_counts
        assert counts["truncated_policy"] == 4 and counts["truncated_improved"] == 0 and counts["kept"] == kept


def test_improver_budget_defaults_to_twice_the_draft_budget(tmp_path):
    assert make_args(tmp_path, max_new_tokens=6).improver_max_new_tokens == 12
    assert make_args(tmp_path, max_new_tokens=6, improver_max_new_tokens=7).improver_max_new_tokens == 7


def test_a_run_whose_first_steps_keep_nothing_stops_and_says_what_to_change(tmp_path, tiny_model, tiny_tokenizer):
    args = make_args(tmp_path, max_steps=5, max_initial_empty_steps=3)
    trainer = SGPOTrainer(tiny_model, args=args, train_dataset=prompts(10), processing_class=tiny_tokenizer)
    trainer._sample = Scripted(tiny_tokenizer, improved_eos=False)
    with pytest.raises(ValueError, match=r"first 3 optimizer steps kept no pair.*raise `improver_max_new_tokens`"):
        trainer.train()
    assert trainer.state.global_step == 2 and trainer.pair_counts["skipped_steps"] == 3


def test_many_skipped_steps_warn(tmp_path, tiny_model, tiny_tokenizer, caplog):
    args = make_args(tmp_path, max_steps=4, max_initial_empty_steps=0, skipped_steps_warning_frac=0.5)
    trainer = SGPOTrainer(tiny_model, args=args, train_dataset=prompts(8), processing_class=tiny_tokenizer)
    trainer._sample = Scripted(tiny_tokenizer, plan={1: (), 2: (0, 1), 3: (0, 1), 4: (0, 1)})
    trainer.train()
    assert "3 of 4 optimizer steps kept no pair" in caplog.text and "train the improver first" in caplog.text


def _delta(tmp_path, tokenizer, batch_size, accumulation, drop, forwards=None, logs=None):
    from helpers.tiny import build_tiny_model

    model = build_tiny_model(tokenizer)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = make_args(
        tmp_path / f"b{batch_size}ga{accumulation}",
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
    )
    trainer = SGPOTrainer(model, args=args, train_dataset=prompts(8), processing_class=tokenizer)
    trainer._sample = Scripted(tokenizer, drop=drop)
    if forwards is not None:  # counts the log-prob passes (policy and reference) over pairs
        logps = trainer.sequence_logps
        trainer.sequence_logps = lambda model, seqs: forwards.append(len(seqs.lengths())) or logps(model, seqs)
    trainer.train()
    assert trainer.pair_counts["kept"] == 8 - len(drop)
    if logs is not None:
        logs.extend(trainer.state.log_history)
    return {n: p.detach() - start[n] for n, p in trainer.model.named_parameters()}


def test_every_kept_pair_weighs_the_same_whatever_micro_batch_it_lands_on(tmp_path, tiny_tokenizer):
    # One window of 8 prompts. Accumulated: micro-batch 1 (positions 0-3) keeps 1 pair, micro-batch 2 (4-7) keeps 3.
    drop = (0, 2, 3, 7)
    full_logs, accumulated_logs, one_each_logs = [], [], []
    full = _delta(tmp_path, tiny_tokenizer, 8, 1, drop, logs=full_logs)
    accumulated = _delta(tmp_path, tiny_tokenizer, 4, 2, drop, logs=accumulated_logs)
    # The demo's shape: one prompt per micro-batch, so four of the eight hold no kept pair.
    one_each = _delta(tmp_path, tiny_tokenizer, 1, 8, drop, logs=one_each_logs)
    # ... and both log the window's loss and means (over its kept pairs, not over micro-batches) as one batch of 8 does.
    for key in ("loss", "rewards/margins", "logps/chosen"):
        logged = [
            [entry[key] for entry in logs if key in entry] for logs in (full_logs, accumulated_logs, one_each_logs)
        ]
        assert len(logged[0]) == 1, key
        assert logged[1] == pytest.approx(logged[0], rel=1e-4) and logged[2] == pytest.approx(logged[0], rel=1e-4), key
    assert sum(d.norm() ** 2 for d in full.values()) > 0
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(one_each[name], full[name], rtol=1e-4, atol=1e-7)


def test_a_micro_batch_without_a_kept_pair_costs_no_pass_on_one_process(tmp_path, tiny_tokenizer):
    # 1 x 8 with four prompts dropped: only the four micro-batches holding a kept pair run a reference pass and a
    # policy pass (chosen and rejected together: 2 sequences each).
    forwards, logs = [], []
    _delta(tmp_path, tiny_tokenizer, 1, 8, (0, 1, 2, 7), forwards, logs)
    assert forwards == [2] * 8
    # The window's last micro-batch was skipped, and the window's means are logged all the same.
    margins = [entry["rewards/margins"] for entry in logs if "rewards/margins" in entry]
    assert len(margins) == 1 and math.isfinite(margins[0])


def test_an_fp16_window_that_keeps_nothing_is_skipped_with_the_grad_scaler_untouched(
    tmp_path, tiny_model, tiny_tokenizer
):
    # fp16 on a GPU: accelerate scales the loss with a GradScaler and unscales before clipping. On CPU it makes
    # neither, so the test installs both; the optimizer is prepared (with the scaler) when training starts.
    args = make_args(tmp_path, max_steps=3, fp16=True, optim="adamw_torch", weight_decay=0.1)
    trainer = SGPOTrainer(tiny_model, args=args, train_dataset=prompts(8), processing_class=tiny_tokenizer)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.accelerator.native_amp = True
    # Window 1 keeps nothing (the scaler has not scaled anything yet), window 2 trains, window 3 keeps nothing.
    trainer._sample = Scripted(tiny_tokenizer, plan={1: (0, 1), 3: (0, 1)})
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    scaler_states = []

    class ScalerSnapshots(Snapshots):
        def on_step_end(self, args, state, control, **kwargs):
            super().on_step_end(args, state, control, **kwargs)
            scaler_states.append(copy.deepcopy(trainer.accelerator.scaler.state_dict()))

    snapshots = ScalerSnapshots()
    snapshots.trainer = trainer
    trainer.add_callback(snapshots)
    trainer.train()
    first, second, third = snapshots.after
    assert all(torch.equal(start[n], first[0][n]) for n in start)
    assert not all(torch.equal(first[0][n], second[0][n]) for n in start)  # an fp16 step that keeps pairs trains
    _assert_same(second, third)
    assert scaler_states[1] == scaler_states[2] and scaler_states[1]["scale"] == 2.0**16
    assert trainer.pair_counts["skipped_steps"] == 2


def test_an_fp16_window_with_a_skipped_micro_batch_trains_through_the_grad_scaler(tmp_path, tiny_tokenizer):
    # One process, 1 x 2 accumulation: the window's first micro-batch keeps nothing (no pass), its second trains.
    from helpers.tiny import build_tiny_model

    args = make_args(tmp_path, max_steps=1, fp16=True, per_device_train_batch_size=1, gradient_accumulation_steps=2)
    trainer = SGPOTrainer(
        build_tiny_model(tiny_tokenizer), args=args, train_dataset=prompts(4), processing_class=tiny_tokenizer
    )
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.accelerator.native_amp = True
    trainer._sample = Scripted(tiny_tokenizer, drop=(0,))
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.pair_counts["kept"] == 1 and trainer.pair_counts["skipped_steps"] == 0
    assert trainer.accelerator.scaler.state_dict()["_growth_tracker"] == 1  # one unskipped scaler step
    assert not all(torch.equal(start[n], p) for n, p in trainer.model.named_parameters())


def test_trainer_step_features_still_act(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    # `torch_empty_cache_steps` is applied by Trainer.training_step, which the on-policy step runs on each micro-batch
    # that holds kept items; transformers calls accelerate's `clear_device_cache` for it.
    import transformers.trainer

    calls = []
    monkeypatch.setattr(transformers.trainer, "clear_device_cache", lambda *a, **k: calls.append(1))
    args = make_args(tmp_path, max_steps=2, torch_empty_cache_steps=1, gradient_accumulation_steps=2)
    trainer = SGPOTrainer(tiny_model, args=args, train_dataset=prompts(8), processing_class=tiny_tokenizer)
    trainer._sample = Scripted(tiny_tokenizer)
    trainer.train()
    assert len(calls) == 4  # 2 optimizer steps x 2 micro-batches


def test_context_and_sequence_parallelism_are_refused_with_the_field_named(tmp_path):
    from accelerate.parallelism_config import ParallelismConfig

    with pytest.raises(ValueError, match=r"`parallelism_config`.*`cp_size=1`"):
        make_args(tmp_path, parallelism_config=ParallelismConfig(cp_size=2))
