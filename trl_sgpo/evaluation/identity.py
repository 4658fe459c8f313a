"""What a saved answer or verdict was made by, so that a rerun reuses it only when nothing that can change it changed.

- :func:`folder_sha256`: a content hash of the files a model loads from a local folder (weights, configs, tokenizer;
  not the run's bookkeeping beside them), cached per process by file size and modification time, so a file rewritten
  in place is hashed again.
- :func:`weights_identity`: a model's identity: that hash for a local folder (with the base model's, for a PEFT
  adapter), the Hub id and commit for a Hub id, a hash of the parameters for a model object in memory.
- :func:`identity_hash`: the stable hash of an identity dict, the part of a cache key that names who made a row.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..io.jsonl import stable_hash


# The files `from_pretrained` (and sentence-transformers) read from a model folder: weights, configs, tokenizer and
# chat-template files, remote code. Bookkeeping beside them (trainer state, run summaries, logs) is not the model.
MODEL_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.json",
        "preprocessor_config.json",
        "adapter_config.json",
        "improver_template.json",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
    }
)
MODEL_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".gguf",
    ".h5",
    ".msgpack",
    ".index.json",
    ".model",
    ".jinja",
    ".tiktoken",
    ".py",
)
# Written by the Trainer beside the weights; they do not change what the model computes.
TRAINING_FILES = frozenset({"training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt"})
# The only sub-folder transformers reads (extra chat templates); sentence-transformers' modules come from modules.json.
MODEL_SUBFOLDERS = ("additional_chat_templates",)

_FILE_HASHES: dict[tuple[str, int, int, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, cached for the process by (real path, size, mtime, ctime, inode)."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(real, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def is_model_file(name: str) -> bool:
    """Whether a file of this name in a model folder is read when the model loads (see :data:`MODEL_FILES`)."""
    if name in TRAINING_FILES or name.startswith("rng_state"):
        return False
    return name in MODEL_FILES or name.endswith(MODEL_SUFFIXES)


def _model_folders(folder: Path) -> list[Path]:
    """The folder itself, the sub-folders transformers reads, and a sentence-transformers model's module folders."""
    folders = [folder, *(folder / name for name in MODEL_SUBFOLDERS)]
    modules = folder / "modules.json"
    if modules.is_file():
        paths = [m.get("path") for m in json.loads(modules.read_text(encoding="utf-8")) if isinstance(m, dict)]
        folders += [folder / p for p in paths if p]
    return sorted({f for f in folders if f.is_dir()})


def folder_sha256(folder: str | os.PathLike) -> str:
    """sha256 over the relative paths and contents of the files a model loads from ``folder`` (:func:`is_model_file`,
    at its top level and in the sub-folders it loads from, not training checkpoints, stage outputs or run summaries).
    Two folders with the same model files give the same hash wherever they are."""
    folder = Path(folder)
    entries = []
    for sub in _model_folders(folder):
        for path in sorted(sub.iterdir()):
            if path.is_file() and is_model_file(path.name):
                entries.append([path.relative_to(folder).as_posix(), file_sha256(path)])
    if not entries:
        raise FileNotFoundError(f"{folder} holds no model files (weights, config.json, tokenizer) to identify it by.")
    return stable_hash(entries)


def weights_identity(source: Any, model: Any = None) -> dict[str, Any]:
    """The identity of a model's weights.

    Args:
        source: A local folder (content hash; a PEFT adapter folder also names its base model's identity) or file, a Hub id
            (with the commit the loaded ``model`` came from, ``config._commit_hash``), or ``None``.
        model: The loaded model, for the Hub commit; with ``source=None``, the model whose parameters are hashed as
            they are in memory (a model being trained has no folder that holds its weights).
    """
    if source is not None and Path(source).is_dir():
        identity: dict[str, Any] = {"path": str(Path(source).resolve()), "sha256": folder_sha256(source)}
        adapter = Path(source) / "adapter_config.json"
        if adapter.is_file():
            base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
            identity["base_model"] = weights_identity(base) if base else None
        return identity
    if source is not None and Path(source).is_file():
        return {"path": str(Path(source).resolve()), "sha256": file_sha256(source)}
    if source is not None:
        commit = getattr(getattr(model, "config", None), "_commit_hash", None)
        return {"hub_id": str(source), "revision": commit}
    if model is None:
        raise ValueError("weights_identity needs a folder, a Hub id or a model.")
    return {"class": type(model).__name__, "parameters_sha256": parameters_sha256(model)}


def parameters_sha256(model: Any) -> str:
    """sha256 of a ``torch.nn.Module``'s state dict (names, dtypes, shapes and bytes), as it is in memory."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
            flat = tensor.detach().reshape(-1).contiguous().cpu()
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def identity_hash(identity: dict[str, Any]) -> str:
    """A short stable hash of an identity dict (sorted-key JSON)."""
    return stable_hash(identity)[:32]


def rerun_line(what: str, reused: int, stale: int, new: int, changed: dict, labels: dict) -> str:
    """The one log line of a rerun: ``"<what>: 12 reused, 52 recomputed (model changed), 3 new"``.

    ``changed`` counts the differing key parts of the stale rows (``None``: written without a key); ``labels`` names
    each part's change, in the order to list them.
    """
    reasons = [labels.get(part, f"{part} changed") for part in [*labels, *changed] if changed.get(part)]
    line = f"{what}: {reused} reused, {stale} recomputed"
    if stale:
        line += f" ({', '.join(dict.fromkeys(reasons))})"
    return line + (f", {new} new" if new else "")
