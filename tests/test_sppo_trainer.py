"""SPPOTrainer: which answers train, with which targets, and what a step does to the weights."""

import math
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from helpers.trainer_args import chat_prompts, tiny_config
from trl_sgpo import SPPOConfig, SPPOTrainer
from trl_sgpo.pipeline.methods import round_prompts
from trl_sgpo.templates import render_prompt


def conv_dataset(n=8):
    return chat_prompts(n)


def make_args(tmp_path, **kw):
    return tiny_config(
        SPPOConfig,
        tmp_path,
        **{**dict(max_steps=1, max_length=128, learning_rate=1e-2, num_samples=3, beta=0.1), **kw},
    )


class LengthScores:
    """Pointwise stand-in judge: an answer's score is its length in characters."""

    def scores(self, prompts, answers, references=None):
        return [float(len(a)) for a in answers]


class FixedAnswers:
    """Stand-in sampler: answer j of every prompt is ``texts[j]`` (``None`` marks an answer cut at the budget)."""

    def __init__(self, tokenizer, texts, k):
        eos = tokenizer.eos_token_id
        self.rows = [
            tokenizer("cut cut cut", add_special_tokens=False)["input_ids"]
            if t is None
            else tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]
            for t in texts
        ]
        self.k = k
        self.calls = []

    def __call__(self, model, prompt_ids, **kwargs):
        self.calls.append(prompt_ids)
        return [list(self.rows[i % self.k]) for i in range(len(prompt_ids))]


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def trainer_with(tmp_path, model, tokenizer, texts, **kw):
    args = make_args(tmp_path, **kw)
    trainer = SPPOTrainer(
        model, judge=LengthScores(), args=args, train_dataset=conv_dataset(), processing_class=tokenizer
    )
    trainer.generate_ids = FixedAnswers(tokenizer, texts, args.num_samples)
    return trainer


def test_best_and_worst_train_with_their_estimated_win_rates(tmp_path, tiny_model, tiny_tokenizer):
    trainer = trainer_with(tmp_path, tiny_model, tiny_tokenizer, ["one", "two two two", "two two"])
    items = trainer.make_items(None, conv_dataset(2)["prompt"], {})
    # K = 3 per prompt; every prompt sees the same 3 answers, all with one sampling call.
    assert len(trainer.generate_ids.calls) == 1 and len(trainer.generate_ids.calls[0]) == 6
    assert items.keep.tolist() == [True, True, False] * 2
    assert items.flags["not_selected"].tolist() == [False, False, True] * 2
    # Lengths 3, 11, 7: P_hat = mean over the 3 answers of sigmoid(s_i - s_k), the self term 1/2 included.
    best = (0.5 + sigmoid(8) + sigmoid(4)) / 3
    worst = (0.5 + sigmoid(-8) + sigmoid(-4)) / 3
    middle = (0.5 + sigmoid(4) + sigmoid(-4)) / 3
    assert items.values["target"][:2].tolist() == pytest.approx([worst, best])
    assert items.values["win_rate"][:3].tolist() == pytest.approx([worst, best, middle])


def test_hard_labels_and_all_answers(tmp_path, tiny_model, tiny_tokenizer):
    texts = ["one", "two two two", "two two"]
    hard = trainer_with(tmp_path, tiny_model, tiny_tokenizer, texts, loss_type="sppo_hard")
    items = hard.make_items(None, conv_dataset(1)["prompt"], {})
    assert items.values["target"][:2].tolist() == [0.0, 1.0]

    every = trainer_with(tmp_path, tiny_model, tiny_tokenizer, texts, train_on="all")
    items = every.make_items(None, conv_dataset(1)["prompt"], {})
    assert items.keep.tolist() == [True, True, True]
    assert items.values["target"].tolist() == pytest.approx(items.values["win_rate"].tolist())
    with pytest.raises(ValueError, match="best_worst"):
        make_args(tmp_path, loss_type="sppo_hard", train_on="all")


def test_cut_answers_neither_train_nor_count_in_the_win_rates(tmp_path, tiny_model, tiny_tokenizer):
    trainer = trainer_with(tmp_path, tiny_model, tiny_tokenizer, ["one", None, "two two"])
    items = trainer.make_items(None, conv_dataset(1)["prompt"], {})
    assert items.flags["truncated"].tolist() == [False, True, False]
    assert items.keep.tolist() == [True, False, True]
    # Only the two finished answers (lengths 3 and 7) are compared: P_hat = (1/2 + sigmoid(+-4)) / 2.
    assert items.values["target"][[0, 2]].tolist() == pytest.approx([(0.5 + sigmoid(-4)) / 2, (0.5 + sigmoid(4)) / 2])


def test_prompts_without_a_preference_train_nothing(tmp_path, tiny_model, tiny_tokenizer):
    too_few = trainer_with(tmp_path, tiny_model, tiny_tokenizer, ["one", None, None])
    items = too_few.make_items(None, conv_dataset(1)["prompt"], {})
    assert not items.keep.any() and items.flags["too_few"].tolist() == [True, False, False]

    tied = trainer_with(tmp_path, tiny_model, tiny_tokenizer, ["same", "same", "same"])
    items = tied.make_items(None, conv_dataset(1)["prompt"], {})
    assert not items.keep.any() and items.flags["tied"].all()


def test_step_loss_and_weights(tmp_path, tiny_model, tiny_tokenizer):
    trainer = trainer_with(tmp_path, tiny_model, tiny_tokenizer, ["one", "two two two", "two two"])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    # First step: the policy is its own reference, so each log-ratio is 0 and the loss is the mean of the squared
    # targets (P_hat - 1/2) / beta over the kept answers (best and worst, the same for every prompt).
    best = (0.5 + sigmoid(8) + sigmoid(4)) / 3
    worst = (0.5 + sigmoid(-8) + sigmoid(-4)) / 3
    expected = (((best - 0.5) / 0.1) ** 2 + ((worst - 0.5) / 0.1) ** 2) / 2
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-4)
    assert trainer.counts["kept"] == 4 and trainer.counts["made"] == 6
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_nothing_kept_leaves_weights_bit_identical(tmp_path, tiny_model, tiny_tokenizer):
    trainer = trainer_with(tmp_path, tiny_model, tiny_tokenizer, [None, None, "one"], max_initial_empty_steps=0)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.counts["kept"] == 0
    assert trainer.counts["truncated"] == 4 and trainer.counts["too_few"] == 2
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_rounds_reanchor_the_reference_on_disjoint_prompts(tmp_path, tiny_model, tiny_tokenizer):
    prompts = conv_dataset(8)
    splits = [round_prompts(prompts, r, 2) for r in (1, 2)]
    texts = [set(map(str, s["prompt"])) for s in splits]
    assert not texts[0] & texts[1] and len(texts[0] | texts[1]) == 8

    start = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    first = SPPOTrainer(
        tiny_model,
        judge=LengthScores(),
        args=make_args(tmp_path),
        train_dataset=splits[0],
        processing_class=tiny_tokenizer,
    )
    first.generate_ids = FixedAnswers(tiny_tokenizer, ["one", "two two two", "two two"], 3)
    first.train()
    trained = {n: p.detach().clone() for n, p in first.model.named_parameters()}
    assert any(not torch.equal(start[n], trained[n]) for n in start)
    # Round 1's reference is the start model.
    assert all(torch.equal(start[n], p) for n, p in first.ref_model.named_parameters())

    second = SPPOTrainer(
        first.model,
        judge=LengthScores(),
        args=make_args(tmp_path / "r2"),
        train_dataset=splits[1],
        processing_class=tiny_tokenizer,
    )
    # Round 2's reference is the policy as round 1 left it, not the start model.
    assert all(torch.equal(trained[n], p) for n, p in second.ref_model.named_parameters())


class ProbingAnswers(FixedAnswers):
    """FixedAnswers that also records the sampling model's logits on a fixed input: which weights answers come from."""

    def __init__(self, tokenizer, texts, k, probe):
        super().__init__(tokenizer, texts, k)
        self.probe, self.logits = probe, []

    def __call__(self, model, prompt_ids, **kwargs):
        with torch.no_grad():
            self.logits.append(model(self.probe).logits)
        return super().__call__(model, prompt_ids, **kwargs)


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("sample_from", ["reference", "policy"])
def test_a_round_samples_from_the_policy_it_starts_from(tmp_path, tiny_model, tiny_tokenizer, sample_from, peft):
    probe = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        start = tiny_model(probe).logits
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = SPPOTrainer(
        tiny_model,
        judge=LengthScores(),
        args=make_args(tmp_path, max_steps=3, sample_from=sample_from),
        train_dataset=conv_dataset(),
        processing_class=tiny_tokenizer,
        peft_config=peft_config if peft else None,
    )
    sampler = ProbingAnswers(tiny_tokenizer, ["one", "two two two", "two two"], 3, probe)
    trainer.generate_ids = sampler
    trainer.train()
    with torch.no_grad():
        trained = trainer.model(probe).logits
    assert not torch.allclose(trained, start, atol=1e-5)  # the policy moved
    same = [torch.allclose(logits, start, atol=1e-6) for logits in sampler.logits]
    # pi_t for every window by default; the moving policy (pi_t only before the first step) with "policy".
    assert same == ([True, True, True] if sample_from == "reference" else [True, False, False])


def test_sample_from_is_checked(tmp_path):
    with pytest.raises(ValueError, match="`sample_from` must be one of"):
        make_args(tmp_path, sample_from="ref")
    with pytest.raises(ValueError, match="Set `vllm_enable_sleep_mode=False`, or `sample_from='policy'`"):
        make_args(tmp_path, use_vllm=True, vllm_enable_sleep_mode=True)
    make_args(tmp_path, use_vllm=True, vllm_enable_sleep_mode=True, sample_from="policy")


def test_needs_a_judge_and_names_its_paper(tmp_path, tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="judge"):
        SPPOTrainer(
            tiny_model, args=make_args(tmp_path), train_dataset=conv_dataset(), processing_class=tiny_tokenizer
        )
    trainer = trainer_with(tmp_path, tiny_model, tiny_tokenizer, ["one", "two two two", "two two"])
    trainer.train()
    trainer.create_model_card(model_name="tiny-sppo")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "SPPO" in card and "2405.00675" in card and "Self-Play Preference Optimization" in card
    assert "answers_kept" in card


def test_real_sampler_cut_answers_are_counted(tmp_path, tiny_model, tiny_tokenizer):
    # A random tiny model never writes EOS within 4 tokens: every answer is cut and nothing trains.
    args = make_args(tmp_path, max_new_tokens=4, max_initial_empty_steps=0)
    trainer = SPPOTrainer(
        tiny_model, judge=LengthScores(), args=args, train_dataset=conv_dataset(), processing_class=tiny_tokenizer
    )
    trainer.train()
    assert trainer.counts["made"] == 6 and trainer.counts["truncated"] == 6 and trainer.counts["kept"] == 0


class StandInLLM:
    """A colocated `vllm.LLM` stand-in: records its prompts; answers "two", then EOS, then more tokens (cut at EOS)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append((prompts, params.max_tokens))
        word = self.tokenizer("two", add_special_tokens=False)["input_ids"]
        ids = word + [self.tokenizer.eos_token_id] + word
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(ids))]) for _ in prompts]


class StandInClient:
    """A server-mode `VLLMClient` stand-in."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def generate(self, prompts, max_tokens, **kwargs):
        self.calls.append((prompts, max_tokens))
        ids = self.tokenizer("two", add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return {"completion_ids": [list(ids) for _ in prompts]}


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_vllm_gets_token_ids_and_answers_end_at_the_first_eos(tmp_path, tiny_model, tiny_tokenizer, mode):
    trainer = SPPOTrainer(
        tiny_model,
        judge=LengthScores(),
        args=make_args(tmp_path),
        train_dataset=conv_dataset(),
        processing_class=tiny_tokenizer,
    )
    trainer.use_vllm, trainer.vllm_mode = True, mode
    trainer._vllm_sampling_params = lambda: SimpleNamespace(
        max_tokens=6, repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0
    )
    engine = StandInLLM(tiny_tokenizer) if mode == "colocate" else StandInClient(tiny_tokenizer)
    setattr(trainer, "llm" if mode == "colocate" else "vllm_client", engine)
    prompts = conv_dataset(2)["prompt"]
    ids = trainer.generate_ids(None, trainer.tokenize_prompts([render_prompt(p, tiny_tokenizer) for p in prompts]))
    ((sent, max_tokens),) = engine.calls
    sent = [row["prompt_token_ids"] for row in sent] if mode == "colocate" else sent
    expected = tiny_tokenizer(render_prompt(prompts[0], tiny_tokenizer), add_special_tokens=False)["input_ids"]
    assert sent[0] == expected and max_tokens == 6
    # Answers end at the first EOS.
    assert ids[0] == tiny_tokenizer("two", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]


class RecordingJudge(LengthScores):
    def __init__(self):
        self.seen = []

    def scores(self, prompts, answers, references=None):
        self.seen += list(zip(prompts, references or [None] * len(prompts)))
        return super().scores(prompts, answers, references)


def test_judge_reads_the_reference_column(tmp_path, tiny_model, tiny_tokenizer):
    rows = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(4)],
            "reference": [f"{2 * i}" for i in range(4)],
        }
    )
    judge = RecordingJudge()
    trainer = SPPOTrainer(
        tiny_model, judge=judge, args=make_args(tmp_path), train_dataset=rows, processing_class=tiny_tokenizer
    )
    trainer.generate_ids = FixedAnswers(tiny_tokenizer, ["one", "two two two", "two two"], 3)
    trainer.train()
    assert judge.seen and all(ref == str(2 * int(q.split()[2])) for q, ref in judge.seen)


@pytest.mark.parametrize("sample_from", ["reference", "policy"])
def test_vllm_gets_the_round_start_weights_once_when_sampling_from_the_reference(
    tmp_path, tiny_model, tiny_tokenizer, sample_from
):
    args = make_args(tmp_path, max_steps=3, sample_from=sample_from, max_initial_empty_steps=0)
    trainer = SPPOTrainer(
        tiny_model, judge=LengthScores(), args=args, train_dataset=conv_dataset(), processing_class=tiny_tokenizer
    )
    trainer.use_vllm, trainer.vllm_mode, trainer.llm = True, "colocate", StandInLLM(tiny_tokenizer)
    trainer._last_loaded_step = -1
    trainer._vllm_sampling_params = lambda: SimpleNamespace(max_tokens=6)
    synced_at = []
    trainer._load_vllm_weights = lambda: synced_at.append(trainer.state.global_step)
    trainer.train()
    assert len(trainer.llm.calls) == 3
    assert synced_at == ([0] if sample_from == "reference" else [0, 1, 2])


def vllm_trainer(tmp_path, model, tokenizer, mode, peft=False, **kw):
    args = make_args(tmp_path, sample_from="reference", max_initial_empty_steps=0, **kw)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0) if peft else None
    trainer = SPPOTrainer(
        model,
        judge=LengthScores(),
        args=args,
        train_dataset=conv_dataset(),
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.use_vllm, trainer.vllm_mode, trainer._last_loaded_step = True, mode, -1
    trainer._vllm_sampling_params = lambda: SimpleNamespace(
        max_tokens=6, repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0
    )
    engine = StandInLLM(tokenizer) if mode == "colocate" else StandInClient(tokenizer)
    setattr(trainer, "llm" if mode == "colocate" else "vllm_client", engine)
    return trainer


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_a_resumed_round_pushes_the_reference_to_vllm_once(tmp_path, tiny_model, tiny_tokenizer, mode):
    first = vllm_trainer(tmp_path, tiny_model, tiny_tokenizer, mode, max_steps=1, save_strategy="steps", save_steps=1)
    first._load_vllm_weights = lambda: None
    first.train()
    resumed = vllm_trainer(tmp_path, tiny_model, tiny_tokenizer, mode, max_steps=3)
    synced_at = []
    resumed._load_vllm_weights = lambda: synced_at.append(resumed.state.global_step)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    # The engine (a server in particular) holds nothing of this round in this process: pi_t is pushed at step 1.
    assert synced_at == [1]


class WeightSink:
    """Records the weights pushed to a colocated engine or a server."""

    def __init__(self):
        self.weights, self.updates = {}, 0
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=self)))
        )

    def load_weights(self, pairs):
        self.weights.update({name: tensor.clone() for name, tensor in pairs})

    def update_named_param(self, name, tensor):
        self.weights[name] = tensor.clone()

    @contextmanager
    def weight_update(self):
        self.updates += 1
        yield

    def reset_prefix_cache(self):
        pass


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_the_reference_is_what_vllm_gets(tmp_path, tiny_model, tiny_tokenizer, mode, peft):
    start = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    trainer = vllm_trainer(tmp_path, tiny_model, tiny_tokenizer, mode, peft=peft, max_steps=2)
    trainer._load_vllm_weights = lambda: None
    trainer.generate_ids = FixedAnswers(tiny_tokenizer, ["one", "two two two", "two two"], 3)
    trainer.train()  # the policy moves away from pi_t
    sink = WeightSink()
    setattr(trainer, "llm" if mode == "colocate" else "vllm_client", sink)
    SPPOTrainer._load_vllm_weights(trainer)
    assert set(sink.weights) == set(start)  # the plain model's names: no adapter weights under PEFT
    for name, value in start.items():
        torch.testing.assert_close(sink.weights[name], value, rtol=0, atol=0)
    policy = trainer.model.merge_and_unload() if peft else trainer.model
    assert any(not torch.equal(p, start[n]) for n, p in policy.named_parameters())
