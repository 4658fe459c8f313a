import errno
import json

import pytest
from datasets import Dataset

from trl_sgpo.io import jsonl
from trl_sgpo.io.jsonl import (
    ROW_ID,
    JsonlWriter,
    batch_seed,
    ensure_row_ids,
    load_done,
    load_rows,
    read_jsonl,
    stable_hash,
)


def test_writer_appends_and_repairs_a_torn_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlWriter(path) as w:
        w.write({"a": 1})
        w.write_many([{"a": 2}, {"a": 3}])
    with open(path, "a") as f:
        f.write('{"a": 4, "b": "cut of')  # a process killed mid-write
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 3}]
    with JsonlWriter(path) as w:
        w.write({"a": 5})
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 3}, {"a": 5}]
    assert path.read_text().endswith('{"a": 5}\n')


def test_corruption_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


def test_disk_full_names_the_file_and_how_to_resume(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jsonl.os, "fsync", full)
    with (
        JsonlWriter(tmp_path / "x.jsonl") as w,
        pytest.raises(OSError, match="Disk full while writing .*x.jsonl.*rerun") as e,
    ):
        w.write({"a": 1})
    assert e.value.errno == errno.ENOSPC


def test_row_ids_come_from_the_id_column_or_the_content():
    ds = Dataset.from_dict({"prompt": ["a", "b", "a"], "reference": ["x", "y", "x"]})
    ids = ensure_row_ids(ds)[ROW_ID]
    assert ids[0] != ids[1] and ids[2] == ids[0] + "#2"
    # Content-derived: the same row keeps its id when the others change order.
    assert ensure_row_ids(ds.select([1, 0]))[ROW_ID] == [ids[1], ids[0]]
    assert ensure_row_ids(ds.add_column("id", [7, 8, 9]))[ROW_ID] == ["7", "8", "9"]
    with pytest.raises(ValueError, match="must be unique.*7"):
        ensure_row_ids(ds.add_column("id", [7, 7, 9]))


def test_load_done_refuses_an_output_made_from_other_inputs(tmp_path):
    path = tmp_path / "o.jsonl"
    ds = ensure_row_ids(Dataset.from_dict({"prompt": ["a"], "id": ["r1"]}))
    path.write_text(json.dumps({ROW_ID: "r1", "prompt": "something else"}) + "\n")
    with pytest.raises(ValueError, match="different `prompt`.*new output path"):
        load_done(path, ds, ("prompt",))


def test_load_rows_reads_jsonl_and_explains_mixed_prompt_formats(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "q", "reference": "r"}\n')
    assert load_rows(good)[0] == {"prompt": "q", "reference": "r"}
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        '{"prompt": "q", "reference": "r"}\n{"prompt": [{"role": "user", "content": "q"}], "reference": "r"}\n'
    )
    with pytest.raises(ValueError, match="`prompt` must be a string in all rows"):
        load_rows(mixed)
    with pytest.raises(FileNotFoundError):
        load_rows(tmp_path / "missing.jsonl")


def test_batch_seed_depends_on_the_seed_and_the_batch_rows_only():
    rows = [{ROW_ID: "a", "x": 1}, {ROW_ID: "b", "x": 2}]
    seed = batch_seed(7, rows)
    assert seed == int(stable_hash([7, ["a", "b"]])[:8], 16) and 0 <= seed < 2**32  # the seeds of earlier runs
    assert batch_seed(7, [{ROW_ID: "a"}, {ROW_ID: "b"}]) == seed  # other columns do not matter
    assert len({seed, batch_seed(8, rows), batch_seed(7, rows[::-1]), batch_seed(7, rows[:1])}) == 4
