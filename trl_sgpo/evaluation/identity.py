"""What a saved answer or verdict was made by, so that a rerun reuses it only when nothing that can change it changed.

- :func:`folder_sha256`: a content hash of the weight, config and tokenizer files of a local model folder (cached per
  process by file size and modification time, so a file rewritten in place is hashed again).
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


# Files that can change what a model computes: weights, configs, tokenizer and chat-template files, remote code.
HASHED_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".gguf",
    ".h5",
    ".msgpack",
    ".json",
    ".txt",
    ".model",
    ".jinja",
    ".tiktoken",
    ".py",
)
# Sub-folders that hold no weights of the model itself: training checkpoints and logs.
SKIPPED_FOLDERS = ("checkpoint-", "runs", ".")

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


def folder_sha256(folder: str | os.PathLike) -> str:
    """sha256 over the relative paths and contents of a model folder's files (:data:`HASHED_SUFFIXES`; training
    checkpoints and hidden folders skipped). Two folders with the same files give the same hash wherever they are."""
    folder = Path(folder)
    entries = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(SKIPPED_FOLDERS))
        for name in sorted(files):
            if name.endswith(HASHED_SUFFIXES):
                path = Path(root) / name
                entries.append([path.relative_to(folder).as_posix(), file_sha256(path)])
    if not entries:
        raise FileNotFoundError(f"{folder} holds no model files ({', '.join(HASHED_SUFFIXES)}) to identify it by.")
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
