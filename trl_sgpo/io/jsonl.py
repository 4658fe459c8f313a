"""Append-only JSONL files that survive interruption, and the stable row ids the pipeline resumes by.

Every stage of the improver-data pipeline (:mod:`~trl_sgpo.data.sampling`, :mod:`~trl_sgpo.data.target_writers`,
:mod:`~trl_sgpo.data.perplexity`) writes one JSON object per finished row and fsyncs it, so a crash, a Ctrl-C or a full
disk loses at most the rows in flight. A rerun reads the file back, skips the rows whose ``row_id`` is already there
and appends the rest. A process killed mid-write can leave a torn last line; :class:`JsonlWriter` cuts it off before
appending and :func:`read_jsonl` ignores it, so the file never holds a broken line in the middle.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk
from pyarrow.lib import ArrowException


logger = logging.getLogger(__name__)

ROW_ID = "row_id"
"""Column holding the id every stage resumes by (see :func:`ensure_row_ids`)."""

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def stable_hash(obj: Any) -> str:
    """sha256 (hex) of ``obj`` serialized as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def batch_seed(seed: int, rows: Iterable[Mapping[str, Any]]) -> int:
    """The sampling seed of one batch: a 32-bit number derived from the run's ``seed`` and its rows' ``row_id``.

    It depends on which rows the batch holds, not on where the batch falls in the run, so a rerun (or a resume that
    forms the same batch) samples it alike.
    """
    return int(stable_hash([seed, [row[ROW_ID] for row in rows]])[:8], 16)


def shard_order(lengths: list[int], batch_size: int, shard: tuple[int, int] | None = None) -> list[int]:
    """Indices of the rows one process handles, longest first, when ``shard = (index, count)`` splits the work.

    The rows are sorted by length (longest first: similar lengths share a batch and an out-of-memory error shows at
    once) and cut into batches of ``batch_size``; batch ``k`` goes to process ``k % count``. Each process thus forms
    exactly the batches one process would have formed, so its output (a batch's seed and padding included) does not
    depend on how many processes share the work. ``None``: every row.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if shard is None:
        return order
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"`shard` must be (index, count) with 0 <= index < count, got {shard}.")
    return [i for k in range(index * batch_size, len(order), count * batch_size) for i in order[k : k + batch_size]]


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yield the objects of a JSONL file, skipping blank lines and a torn (unterminated, unparsable) last line.

    A broken line anywhere else is corruption, not an interruption, and raises a ``ValueError`` with its number.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not line.endswith("\n"):
                logger.warning("Ignoring the torn last line of %s (an interrupted write).", path)
                return
            raise ValueError(f"{path}, line {number}, is not valid JSON ({e}). Fix or remove that line.") from e


def read_jsonl(path: str | os.PathLike, missing_ok: bool = False) -> list[dict[str, Any]]:
    """All objects of a JSONL file; ``[]`` for a missing file when ``missing_ok``."""
    if missing_ok and not os.path.exists(path):
        return []
    return list(iter_jsonl(path))


class JsonlWriter:
    """Append JSON objects to a file, one per line, each flushed and fsynced before :meth:`write` returns.

    Use as a context manager. Opening cuts off a torn last line left by an interrupted write. A full disk raises an
    ``OSError`` (same errno) that says which file, that what is already written is kept, and how to resume.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = None

    def __enter__(self) -> JsonlWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._file = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # the data that failed to flush was already reported by write()
                pass
            self._file = None

    def _repair_tail(self) -> None:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(end - 1)
            if f.read(1) == b"\n":
                return
            # Scan back in chunks for the last newline: the file may be large, the torn line is short.
            pos, cut = end, 0
            while pos > 0:
                start = max(0, pos - 65536)
                f.seek(start)
                chunk = f.read(pos - start)
                index = chunk.rfind(b"\n")
                if index >= 0:
                    cut = start + index + 1
                    break
                pos = start
            f.seek(cut)
            try:  # a complete row whose newline was not written: readers already count it, so keep it
                json.loads(f.read())
            except ValueError:
                logger.warning("Removing the torn last line of %s (an interrupted write).", self.path)
                f.truncate(cut)
            else:
                f.write(b"\n")

    def write(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` and make it durable."""
        self.write_many([row])

    def write_many(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append ``rows`` with one flush and fsync."""
        if self._file is None:
            raise RuntimeError("JsonlWriter is not open; use it as a context manager.")
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if not text:
            return
        try:
            self._file.write(text)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise OSError(
                    e.errno,
                    f"Disk full while writing {self.path}. Everything written before this row is kept; free some "
                    f"space and rerun the same command to resume from where it stopped",
                ) from e
            raise


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write ``rows`` as the JSONL file ``path`` in one step (a temporary file, then a rename): readers see the old
    file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with JsonlWriter(tmp) as writer:
        writer.write_many(rows)
    os.replace(tmp, path)


def load_rows(source: str | os.PathLike | Dataset) -> Dataset:
    """Load a prompt/reference set: a ``datasets.Dataset``, a ``.jsonl``/``.json`` file, or a ``save_to_disk`` folder.

    JSONL is read with :func:`read_jsonl` (not ``load_dataset``), so it needs no cache folder and reports bad lines by
    number.
    """
    if isinstance(source, Dataset):
        return source
    path = Path(source)
    if path.is_dir():
        return load_from_disk(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"No such file or folder: {path}")
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        rows = data if isinstance(data, list) else [data]
    else:
        rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} holds no rows.")
    try:
        return Dataset.from_list(rows)
    except (TypeError, ValueError, ArrowException) as e:
        raise ValueError(
            f"{path}: the rows do not share one schema ({e}). A column must have one type in every row; in particular "
            f"`prompt` must be a string in all rows or a list of chat messages in all rows."
        ) from e


def ensure_row_ids(dataset: Dataset, id_column: str = "id") -> Dataset:
    """Add the ``row_id`` column that every stage resumes by, unless the dataset already has one.

    ``row_id`` is ``str(row[id_column])`` when that column exists (it must then be unique), otherwise a hash of the
    row's ``prompt`` and ``reference``, with ``#2``, ``#3``... appended to repeats. Either way it depends only on the
    row's content, not its position, so reordering or filtering the input keeps the ids of the remaining rows.
    """
    if ROW_ID in dataset.column_names:
        ids = dataset[ROW_ID]
    elif id_column and id_column in dataset.column_names:
        ids = [str(v) for v in dataset[id_column]]
    else:
        prompts = dataset["prompt"] if "prompt" in dataset.column_names else [None] * len(dataset)
        refs = dataset["reference"] if "reference" in dataset.column_names else [None] * len(dataset)
        seen: dict[str, int] = {}
        ids = []
        for prompt, ref in zip(prompts, refs, strict=True):
            base = stable_hash([prompt, ref])[:16]
            seen[base] = seen.get(base, 0) + 1
            ids.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
        return dataset.add_column(ROW_ID, ids)
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        column = ROW_ID if ROW_ID in dataset.column_names else id_column
        raise ValueError(
            f"Column `{column}` must be unique to resume by it, but it repeats {duplicates[:10]}. Fix the ids, or "
            f"drop the column so that ids are derived from the prompt and reference."
        )
    if ROW_ID in dataset.column_names:
        return dataset
    return dataset.add_column(ROW_ID, ids)


def load_done(
    path: str | os.PathLike, dataset: Dataset, check_columns: tuple[str, ...] = ("prompt",)
) -> dict[str, dict[str, Any]]:
    """Rows of an existing stage output, by ``row_id``, that belong to ``dataset``.

    Raises a ``ValueError`` when a done row disagrees with the input row of the same id on ``check_columns``: the
    output file was made from other inputs, and resuming into it would mix the two.
    """
    done = {row[ROW_ID]: row for row in read_jsonl(path, missing_ok=True) if ROW_ID in row}
    if not done:
        return done
    columns = [c for c in check_columns if c in dataset.column_names]
    for row_id, *values in zip(dataset[ROW_ID], *(dataset[c] for c in columns), strict=True):
        old = done.get(row_id)
        if old is None:
            continue
        for column, value in zip(columns, values, strict=True):
            if column in old and old[column] != value:
                raise ValueError(
                    f"{path} already holds row {row_id!r} with a different `{column}` than the input: it was made "
                    f"from other inputs. Write to a new output path, or delete {path} to start over."
                )
    return done


def split_stale(
    done: Mapping[str, Mapping[str, Any]], keys: Mapping[str, Mapping[str, str]], column: str
) -> tuple[dict[str, Mapping[str, Any]], Counter]:
    """The rows of ``done`` still valid for ``keys``, and what changed in the others.

    ``keys[row_id]`` is the key this run would write in ``column``: a dict of named parts (e.g. ``{"model": ...,
    "generation": ..., "request": ...}``). A done row is kept when its ``column`` equals it; otherwise it is stale and
    counts, in the returned ``Counter``, under each part that differs (``None`` for a row written without a key).
    Rows of ids not in ``keys`` are kept as they are.
    """
    kept: dict[str, Mapping[str, Any]] = {}
    changed: Counter = Counter()
    for row_id, row in done.items():
        if row_id not in keys or row.get(column) == keys[row_id]:
            kept[row_id] = row
            continue
        old = row.get(column)
        if not isinstance(old, Mapping):
            changed[None] += 1
        else:
            changed.update(part for part, value in keys[row_id].items() if old.get(part) != value)
    return kept, changed


def rows_in_order(dataset: Dataset, done: Mapping[str, Mapping[str, Any]]) -> Dataset:
    """The done rows that belong to ``dataset``, in the dataset's order, as a ``Dataset`` (empty if none)."""
    rows = [done[i] for i in dataset[ROW_ID] if i in done]
    return Dataset.from_list(rows) if rows else Dataset.from_dict({ROW_ID: []})
