"""The documented command, end to end on the tiny model: prompt/reference JSONL -> filtered improver-SFT set."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from datasets import load_from_disk

from helpers.openai_stub import OpenAIStub
from trl_sgpo.cli import main
from trl_sgpo.io.jsonl import read_jsonl


def write_prompts(path, n=4, reference=True):
    rows = []
    for i in range(n):
        row = {"id": f"q{i}", "prompt": [{"role": "user", "content": f"Question {i}: why is the sky blue?"}]}
        if reference:
            row["reference"] = f"Sunlight scatters off air molecules. Blue light scatters the most. Answer {i}."
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def command(input_path, out, model_dir, *extra):
    return [
        "-q",
        "improver-data",
        "--input",
        str(input_path),
        "--output-dir",
        str(out),
        "--model",
        str(model_dir),
        "--max-new-tokens",
        "8",
        "--sample-batch-size",
        "2",
        *extra,
    ]


def test_offline_improver_data_then_resume(tmp_path, tiny_model_dir, tiny_tokenizer):
    out = tmp_path / "out"
    assert main(command(write_prompts(tmp_path / "p.jsonl"), out, tiny_model_dir, "--ppl-max-ratio", "100")) == 0
    for name in ("responses.jsonl", "targets.jsonl", "scores.jsonl", "improver_sft.jsonl", "filter_report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "filter_report.json").read_text())
    kept = load_from_disk(str(out / "improver_sft"))
    assert report["rows"] == 4 and report["kept"] == len(kept) > 0
    assert {"prompt", "response", "target", "response_ppl", "target_ppl"} <= set(kept.column_names)
    assert all(t and t != r for t, r in zip(kept["target"], kept["response"], strict=True))

    # Rerun: every stage resumes from its file; nothing is sampled, written or scored again.
    before = {p.name: p.read_text() for p in out.glob("*.jsonl")}
    assert main(command(tmp_path / "p.jsonl", out, tiny_model_dir, "--ppl-max-ratio", "100")) == 0
    assert {p.name: p.read_text() for p in out.glob("*.jsonl")} == before

    # The kept set trains the improver as is.
    from trl_sgpo import ImproverSFTConfig, ImproverSFTTrainer
    from trl_sgpo.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    args = ImproverSFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to="none",
        save_strategy="no",
        max_length=256,
    )
    trainer = ImproverSFTTrainer(model, args=args, train_dataset=kept, processing_class=tokenizer)
    trainer.train()
    assert "train_loss" in trainer.state.log_history[-1]


def test_base_url_uses_an_openai_compatible_server(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-cli-test")
    out = tmp_path / "out"
    # Enough rows and latency that --max-concurrency 2 is reached (the first request goes alone).
    with OpenAIStub(api_key="sk-cli-test", latency=0.1) as stub:
        rc = main(
            command(
                write_prompts(tmp_path / "p.jsonl", n=8),
                out,
                tiny_model_dir,
                "--base-url",
                stub.base_url,
                "--writer-model",
                "stub-model",
                "--max-concurrency",
                "2",
                "--ppl-max-ratio",
                "0",
            )
        )
        assert rc == 0 and len(stub.requests) == 8 and stub.peak_in_flight == 2
    targets = read_jsonl(out / "targets.jsonl")
    assert {t["target_writer"] for t in targets} == {"openai:stub-model"}
    assert len(read_jsonl(out / "targets.cache.jsonl")) == 8
    assert json.loads((out / "filter_report.json").read_text())["rows"] == 8


def test_bad_input_fails_before_any_work(tmp_path, tiny_model_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(command(write_prompts(tmp_path / "p.jsonl", reference=False), out, tiny_model_dir)) == 1
    assert "missing the column(s) ['reference']" in capsys.readouterr().err
    assert not (out / "responses.jsonl").exists()

    monkeypatch.delenv("MISSING_KEY_VAR", raising=False)
    rc = main(
        command(
            write_prompts(tmp_path / "p.jsonl"),
            out,
            tiny_model_dir,
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--writer-model",
            "m",
            "--api-key-env",
            "MISSING_KEY_VAR",
        )
    )
    assert rc == 1 and "MISSING_KEY_VAR" in capsys.readouterr().err
    assert not (out / "responses.jsonl").exists()


@pytest.mark.slow
def test_console_script(tmp_path, tiny_model_dir):
    script = shutil.which("trl-sgpo")
    cmd = [script] if script else [sys.executable, "-m", "trl_sgpo.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    result = subprocess.run(
        cmd + command(write_prompts(tmp_path / "p.jsonl", n=2), out, tiny_model_dir, "--ppl-max-ratio", "0"),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "improver-data: done" in result.stderr
    assert len(load_from_disk(str(out / "improver_sft"))) >= 1
