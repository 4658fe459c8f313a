"""Shared fixtures: everything offline, on CPU, with a random tiny model and a locally built tokenizer."""

import os


# Set before transformers/trl are imported anywhere in the test session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from helpers.recipes import load_recipe
from helpers.tiny import build_tiny_model, build_tiny_tokenizer


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_tokenizer_session():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_tokenizer(tiny_tokenizer_session):
    # Tests may mutate the tokenizer (pad token, chat template): give each its own copy.
    import copy

    return copy.deepcopy(tiny_tokenizer_session)


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer)


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_model, tiny_tokenizer):
    """The tiny model and tokenizer saved as a local folder, for code paths that take a path."""
    path = tmp_path / "tiny-model"
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def recipe():
    """``recipes/sgpo.py`` as a module."""
    return load_recipe("sgpo")
