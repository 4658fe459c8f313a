"""The improver travels with the model (saved template, fresh process) and `trl-sgpo improve` uses it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trl_sgpo.cli import main
from trl_sgpo.improve import improve
from trl_sgpo.io.jsonl import read_jsonl
from trl_sgpo.templates import (
    DEFAULT_TEMPLATE,
    TEMPLATE_FILE,
    ImproverTemplate,
    improver_prompt,
    improver_template_for,
    render_prompt,
    save_improver_template,
)


CUSTOM = ImproverTemplate(instruction="Rewrite the draft so it is correct.", draft_header="### Draft")
CONV = [{"role": "user", "content": "What is 2 plus 2?"}]
ROOT = Path(__file__).parent.parent

FRESH_PROCESS = """
import json, sys
from transformers import AutoTokenizer
from trl_sgpo.templates import improver_prompt, improver_template_for, render_prompt
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
template = improver_template_for(sys.argv[1])
text = render_prompt(improver_prompt(json.loads(sys.argv[2]), sys.argv[3], template), tokenizer)
print(json.dumps(tokenizer(text, add_special_tokens=False)["input_ids"]))
"""


def ids(tokenizer, template, draft="It is 5."):
    return tokenizer(render_prompt(improver_prompt(CONV, draft, template), tokenizer), add_special_tokens=False)[
        "input_ids"
    ]


def test_saved_template_gives_identical_prompt_tokens_in_a_fresh_process(tiny_model_dir, tiny_tokenizer):
    save_improver_template(CUSTOM, tiny_model_dir)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tiny_model_dir), json.dumps(CONV), "It is 5."],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    assert fresh == ids(tiny_tokenizer, CUSTOM)
    assert fresh != ids(tiny_tokenizer, DEFAULT_TEMPLATE)  # the saved template, not the default, was used


def test_template_resolution_and_errors(tmp_path, tiny_model_dir):
    assert improver_template_for(tiny_model_dir) == DEFAULT_TEMPLATE  # nothing saved
    with pytest.raises(FileNotFoundError, match="saved without an improver template"):
        ImproverTemplate.from_pretrained(tiny_model_dir)
    save_improver_template(CUSTOM, tiny_model_dir)
    assert ImproverTemplate.from_pretrained(tiny_model_dir) == CUSTOM
    assert improver_template_for(str(tiny_model_dir)) == CUSTOM
    explicit = improver_template_for(tiny_model_dir, "Shorter.")
    assert explicit.instruction == "Shorter." and explicit.draft_header == "### Draft"
    # A newer layout is refused rather than misread.
    data = json.loads((tiny_model_dir / TEMPLATE_FILE).read_text())
    (tiny_model_dir / TEMPLATE_FILE).write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        ImproverTemplate.from_pretrained(tiny_model_dir)
    # The model card gets one section, replaced on each save, other sections kept.
    card = tmp_path / "card"
    card.mkdir()
    (card / "README.md").write_text("# m\n\n## Training\nfigures\n")
    save_improver_template(CUSTOM, card)
    save_improver_template(ImproverTemplate(instruction="Second."), card)
    text = (card / "README.md").read_text()
    assert text.count("## Improver template") == 1 and "Second." in text and "## Training\nfigures" in text


def test_improve_refines_and_never_carries_a_cut_answer(monkeypatch, tiny_tokenizer):
    calls = []

    def fake_generate(model, tokenizer, texts, *, max_new_tokens, **kwargs):
        calls.append((texts, max_new_tokens))
        step = len(calls)
        # Call 1: drafts; call 2: round 1 (row 1 is cut); call 3: round 2.
        return [
            (tokenizer(f"answer {step}.{row}", add_special_tokens=False)["input_ids"], not (step == 2 and row == 1))
            for row in range(len(texts))
        ]

    monkeypatch.setattr("trl_sgpo.data.sampling.generate_completions", fake_generate)

    class Model:
        training = False

        def eval(self):
            pass

        def train(self, mode):
            pass

    prompts = [CONV, [{"role": "user", "content": "Name a color."}]]
    rows = improve(Model(), tiny_tokenizer, prompts, rounds=2, template=CUSTOM, max_new_tokens=9)
    assert [c[1] for c in calls] == [9, 9, 9]
    assert calls[0][0] == [render_prompt(p, tiny_tokenizer) for p in prompts]
    # Each round improves the previous answer with the given template.
    assert calls[1][0][0] == render_prompt(improver_prompt(CONV, "answer 1.0", CUSTOM), tiny_tokenizer)
    assert calls[2][0][0] == render_prompt(improver_prompt(CONV, "answer 2.0", CUSTOM), tiny_tokenizer)
    # Row 1's round-1 answer was cut: round 2 improves the draft again.
    assert calls[2][0][1] == render_prompt(improver_prompt(prompts[1], "answer 1.1", CUSTOM), tiny_tokenizer)
    assert rows[0]["improvements"] == ["answer 2.0", "answer 3.0"] and rows[0]["improved_round"] == 2
    assert rows[1]["improvements_finished"] == [False, True] and rows[1]["improved"] == "answer 3.1"
    only_cut = improve(Model(), tiny_tokenizer, prompts[1:], ["My draft."], rounds=1, template=CUSTOM)
    assert calls[3][0] == [render_prompt(improver_prompt(prompts[1], "My draft.", CUSTOM), tiny_tokenizer)]
    assert only_cut[0]["improved"] == "answer 4.0" and only_cut[0]["response_finished"] is None


def test_cli_improve_end_to_end_and_resume(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    save_improver_template(CUSTOM, tiny_model_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"What is {i} plus {i}?"}) + "\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    seen = []
    from trl_sgpo.data import sampling

    real = sampling.generate_completions
    monkeypatch.setattr(sampling, "generate_completions", lambda *a, **k: seen.extend(a[2]) or real(*a, **k))
    argv = ["-q", "improve", "--model", str(tiny_model_dir), "--input", str(prompts), "--output", str(out)]
    argv += ["--rounds", "2", "--max-new-tokens", "6", "--batch-size", "2"]
    assert main(argv) == 0
    rows = read_jsonl(out)
    assert [r["row_id"] for r in rows] == ["0", "1", "2"]
    for row in rows:
        assert len(row["improvements"]) == len(row["improvements_finished"]) == 2
        assert row["improved"] in [row["response"], *row["improvements"]]
    # String prompts became a user turn (the tiny model has a chat template); the saved template built the requests.
    assert render_prompt([{"role": "user", "content": "What is 0 plus 0?"}], tiny_tokenizer) in seen
    requests = [t for t in seen if CUSTOM.instruction in t]
    assert len(requests) == 6 and not any(DEFAULT_TEMPLATE.instruction in t for t in seen)

    # Rerun: nothing generated again. A lost last row is redone alone.
    before, seen[:] = out.read_text(), []
    assert main(argv) == 0
    assert out.read_text() == before and seen == []
    out.write_text("".join(before.splitlines(keepends=True)[:2]))
    assert main(argv) == 0
    assert [r["row_id"] for r in read_jsonl(out)] == ["0", "1", "2"] and len(seen) == 3  # draft + 2 rounds


def test_cli_improve_bad_input(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "hi"}) + "\n")
    argv = ["improve", "--model", str(tiny_model_dir), "--input", str(bad), "--output", str(tmp_path / "o.jsonl")]
    assert main(argv) == 1
    assert "prompt" in capsys.readouterr().err


def test_cli_improve_warns_only_when_no_template_was_saved(tmp_path, tiny_model, tiny_tokenizer, caplog):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 1 plus 1?"}) + "\n")
    for saved in (True, False):
        folder = tmp_path / f"model-{saved}"
        tiny_model.save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        if saved:  # a saved template that happens to equal the default one
            save_improver_template(DEFAULT_TEMPLATE, folder)
        caplog.clear()
        argv = ["improve", "--model", str(folder), "--input", str(prompts), "--output", str(folder / "out.jsonl")]
        assert main([*argv, "--max-new-tokens", "4"]) == 0
        warned = any("none was saved" in r.getMessage() for r in caplog.records)
        assert warned is not saved
