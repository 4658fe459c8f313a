"""What SGPOTrainer hands to vLLM, checked on CPU against stand-in engine objects that record what they receive."""

import json
import sys
from types import SimpleNamespace

import pytest
from datasets import Dataset

from trl_sgpo import SGPOConfig, SGPOTrainer, load_model_and_tokenizer
from trl_sgpo.templates import improver_prompt, render_prompt


BOS_CHATML = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class StandInLLM:
    """A colocated `vllm.LLM` stand-in: records its prompts; the draft fills its budget, the improvement ends."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append((prompts, params.max_tokens))
        word = self.tokenizer("two", add_special_tokens=False)["input_ids"]
        ids = (word * params.max_tokens)[: params.max_tokens]
        if params.role == "improver":
            ids = word + [self.tokenizer.eos_token_id]
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(ids))]) for _ in prompts]


class StandInClient:
    """A server-mode `VLLMClient` stand-in."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls, self.generation_kwargs = tokenizer, [], []

    def generate(self, prompts, max_tokens, **kwargs):
        self.calls.append((prompts, max_tokens))
        self.generation_kwargs.append(kwargs.get("generation_kwargs"))
        ids = self.tokenizer("two", add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return {"completion_ids": [list(ids) for _ in prompts]}


def _trainer(tmp_path, tiny_model_dir, mode, **kw):
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = BOS_CHATML  # a template that writes the BOS itself, as Llama's and Gemma's do
    args = SGPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_new_tokens=8,
        max_length=96,
        report_to="none",
        save_strategy="no",
        **kw,
    )
    prompts = [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(4)]
    trainer = SGPOTrainer(
        model, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer
    )
    # Switch the built trainer to a stand-in engine (building a real one needs a GPU).
    trainer.use_vllm, trainer.vllm_mode = True, mode
    trainer._last_loaded_step = trainer.state.global_step  # weights already "synced"
    trainer._vllm_sampling_params = lambda role: SimpleNamespace(
        max_tokens=trainer._max_tokens(role),
        role=role,
        repetition_penalty=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=-1,
        min_p=0.0,
    )
    if mode == "colocate":
        trainer.llm = StandInLLM(tokenizer)
    else:
        trainer.vllm_client = StandInClient(tokenizer)
    return trainer, tokenizer, prompts


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_vllm_receives_token_ids_with_exactly_one_bos(tmp_path, tiny_model_dir, mode):
    trainer, tokenizer, prompts = _trainer(tmp_path, tiny_model_dir, mode)
    pairs = trainer.generate_pairs(trainer.model, prompts[:2])
    engine = trainer.llm if mode == "colocate" else trainer.vllm_client
    (policy, policy_budget), (improver, improver_budget) = engine.calls
    if mode == "colocate":
        policy = [p["prompt_token_ids"] for p in policy]
        improver = [p["prompt_token_ids"] for p in improver]
    assert (policy_budget, improver_budget) == (8, 16)
    bos = tokenizer.bos_token_id
    for ids, prompt in zip(policy, prompts, strict=False):
        assert all(isinstance(t, int) for t in ids)
        assert ids[0] == bos and ids.count(bos) == 1
        assert ids == tokenizer(render_prompt(prompt, tokenizer), add_special_tokens=False)["input_ids"]
    for ids in improver:
        assert ids[0] == bos and ids.count(bos) == 1
    # The pairs are scored under the same ids the engine was given.
    chosen = pairs.sequences["chosen"]
    assert chosen.prompt_ids[0][chosen.prompt_mask[0].bool()].tolist() == policy[0]


def test_max_model_len_covers_the_improver_prompt_and_both_answers(tmp_path, tiny_model_dir):
    trainer, tokenizer, _ = _trainer(tmp_path, tiny_model_dir, "colocate")
    limit = trainer.vllm_max_model_len()
    kwargs = trainer.vllm_engine_kwargs(trainer.model)
    assert kwargs["max_model_len"] == limit
    assert kwargs["model"] == str(tiny_model_dir)  # the local weights, not a card name
    # The longest prompt the dataset check lets through, and a draft that fills its budget.
    room = trainer.prompt_room(trainer.args)
    words = 1
    while (
        len(tokenizer(render_prompt(_question(words + 1), tokenizer), add_special_tokens=False)["input_ids"]) <= room
    ):
        words += 1
    question = _question(words)
    draft = " ".join(["two"] * trainer.args.max_new_tokens)
    request = render_prompt(improver_prompt(question, draft, trainer.improver_template), tokenizer)
    request_ids = tokenizer(request, add_special_tokens=False)["input_ids"]
    assert len(request_ids) + trainer.args.improver_max_new_tokens <= limit
    # OnlineDPO's sizing (max_length + max_new_tokens) would not hold it.
    assert (
        len(request_ids) + trainer.args.improver_max_new_tokens > trainer.args.max_length + trainer.args.max_new_tokens
    )
    trainer.generate_pairs(trainer.model, [question])  # fits: no error


def _question(words):
    return [{"role": "user", "content": " ".join(["plus"] * words)}]


def test_a_prompt_that_cannot_fit_gets_a_clear_error(tmp_path, tiny_model_dir):
    trainer, _, _ = _trainer(tmp_path, tiny_model_dir, "colocate")
    limit = trainer.vllm_max_model_len()
    with pytest.raises(ValueError, match=r"improver prompt of \d+ tokens plus its 16-token budget does not fit"):
        trainer._sample_vllm([[5] * (limit - 10)], role="improver")
    assert trainer.llm.calls == []  # refused before reaching the engine


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tensor_parallel_colocate_answers_the_groups_prompts_once_and_each_process_gets_its_own(
    tmp_path, tiny_model_dir
):
    from test_distributed import launch

    proc = launch("dist_vllm_tp_script.py", tiny_model_dir, tmp_path, port=29533, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    group = ranks[0]["numbers"] + ranks[1]["numbers"]
    assert group == [0, 1, 10, 11, 12]  # uneven shares: 2 and 3 prompts
    for rank in ranks:
        # One engine call per role, each with the whole group's prompts in process order.
        assert rank["engine_calls"] == [group, group]
        assert rank["draft"] == [str(n) for n in rank["numbers"]]
        assert rank["improved"] == [f"{n} {n}" for n in rank["numbers"]]


def test_colocate_refuses_a_process_count_that_tensor_parallelism_does_not_divide(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match=r"`vllm_tensor_parallel_size=2` must divide the number of processes \(1\)"):
        _trainer(tmp_path, tiny_model_dir, "colocate", use_vllm=True, vllm_tensor_parallel_size=2)


class RecordingSamplingParams:
    """A `vllm.SamplingParams` stand-in: records its arguments and, like vLLM's, refuses ones it does not know."""

    known = {
        "n",
        "repetition_penalty",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "max_tokens",
        "detokenize",
        "presence_penalty",
    }
    made = []

    def __init__(self, **kwargs):
        unknown = set(kwargs) - self.known
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
        self.kwargs = kwargs
        self.made.append(kwargs)


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_generation_kwargs_never_reach_vllm_and_vllm_sampling_kwargs_do(tmp_path, tiny_model_dir, monkeypatch, mode):
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=RecordingSamplingParams))
    RecordingSamplingParams.made.clear()
    trainer, _, prompts = _trainer(
        tmp_path,
        tiny_model_dir,
        mode,
        generation_kwargs={"use_cache": False},
        vllm_sampling_kwargs={"presence_penalty": 0.5},
    )
    trainer._vllm_sampling_params = lambda role: _with_role(SGPOTrainer._vllm_sampling_params(trainer, role), role)
    trainer.generate_pairs(trainer.model, prompts[:2])
    assert len(RecordingSamplingParams.made) == 2  # policy and improver
    for kwargs in RecordingSamplingParams.made:
        assert "use_cache" not in kwargs and kwargs["presence_penalty"] == 0.5
    if mode == "server":
        assert trainer.vllm_client.generation_kwargs == [{"presence_penalty": 0.5}, {"presence_penalty": 0.5}]
    # The transformers path still gets them.
    assert trainer.generation_kwargs["use_cache"] is False


def _with_role(params, role):
    # The stand-in engines read the role and the sampling settings as attributes.
    for key, value in params.kwargs.items():
        setattr(params, key, value)
    params.role = role
    return params


def test_sppo_sampling_params_take_vllm_sampling_kwargs_only(tmp_path, tiny_model_dir, monkeypatch):
    from trl_sgpo import SPPOConfig, SPPOTrainer

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=RecordingSamplingParams))
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    args = SPPOConfig(
        output_dir=str(tmp_path / "sppo"),
        per_device_train_batch_size=2,
        num_samples=2,
        report_to="none",
        generation_kwargs={"use_cache": False},
        vllm_sampling_kwargs={"presence_penalty": 0.5},
    )
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i}?"}] for i in range(2)]})
    trainer = SPPOTrainer(model, judge=_PointwiseJudge(), args=args, train_dataset=prompts, processing_class=tokenizer)
    params = trainer._vllm_sampling_params()
    assert "use_cache" not in params.kwargs and params.kwargs["presence_penalty"] == 0.5


class _PointwiseJudge:
    def scores(self, prompts, answers, references=None):
        return [0.0] * len(answers)


def test_each_generation_field_warns_when_its_backend_is_not_used(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        SGPOConfig(output_dir=str(tmp_path), report_to="none", use_vllm=True, generation_kwargs={"use_cache": False})
        SGPOConfig(output_dir=str(tmp_path), report_to="none", vllm_sampling_kwargs={"presence_penalty": 0.5})
    assert "`generation_kwargs` ['use_cache'] are for transformers' `generate`" in caplog.text
    assert "put vLLM `SamplingParams` options in `vllm_sampling_kwargs`" in caplog.text
    assert "`vllm_sampling_kwargs` ['presence_penalty'] are used with `use_vllm=True` only" in caplog.text


def test_vllm_sampling_kwargs_parse_from_the_command_line(tmp_path):
    from trl import TrlParser

    (args,) = TrlParser(SGPOConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--report_to",
            "none",
            "--use_vllm",
            "--vllm_sampling_kwargs",
            '{"presence_penalty": 0.5}',
        ]
    )
    assert args.vllm_sampling_kwargs == {"presence_penalty": 0.5}


@pytest.mark.parametrize(
    ("key", "instead"),
    [
        ("max_tokens", "max_new_tokens"),
        ("temperature", "improver_temperature"),
        ("n", "num_samples"),
        ("detokenize", "token ids"),
        ("stop", "answers end at EOS"),
        ("ignore_eos", "answers end at EOS"),
    ],
)
def test_vllm_sampling_kwargs_that_the_trainers_set_are_refused_with_the_setting_to_use(tmp_path, key, instead):
    from trl_sgpo import SPPOConfig

    for config in (SGPOConfig, SPPOConfig):
        with pytest.raises(ValueError, match=f"`vllm_sampling_kwargs` may not set `{key}`") as error:
            config(output_dir=str(tmp_path), report_to="none", use_vllm=True, vllm_sampling_kwargs={key: 1})
        assert instead in str(error.value)
