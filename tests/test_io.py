"""Stage contract: atomic writes, manifests, resume, refusal of changed inputs, bad-input errors."""

import json
import os

import polars as pl
import pytest

from stages.engine.atomic import atomic_write_text, file_hash, write_parquet
from stages.engine.errors import InputError
from stages.engine.manifest import StageRun
from stages.engine.tableio import read_table, stage_table_path


def test_atomic_write_leaves_no_temp_and_replaces(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_write_failure_keeps_old(tmp_path, monkeypatch):
    p = tmp_path / "t.parquet"
    write_parquet(pl.DataFrame({"a": [1]}), p)
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_parquet(pl.DataFrame({"a": [2]}), p)
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["t.parquet"]


def test_manifest_resume_skip_and_refuse(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "problem": "p", "answer": "1"}\n')
    run = StageRun(tmp_path / "run", "demo", {"x": 1}, inputs={"problems": inp}, seed=3)
    assert not run.done
    run.finish(pl.DataFrame({"v": [1, 2]}))
    m = json.loads(run.manifest_path.read_text())
    assert m["rows"] == 2 and m["seed"] == 3 and m["stage"] == "demo" and m["complete"]
    assert m["input_hashes"]["problems"] == file_hash(inp)
    assert {"sgsd", "torch", "transformers"} <= set(m["versions"])
    assert "wall_time_s" in m
    # same config + inputs: skipped
    assert StageRun(tmp_path / "run", "demo", {"x": 1}, inputs={"problems": inp}).done
    # changed config: refused unless force
    with pytest.raises(InputError, match="config changed"):
        StageRun(tmp_path / "run", "demo", {"x": 2}, inputs={"problems": inp})
    assert not StageRun(tmp_path / "run", "demo", {"x": 2}, inputs={"problems": inp}, force=True).done
    # changed input: refused
    inp.write_text('{"id": "b", "problem": "p", "answer": "1"}\n')
    with pytest.raises(InputError, match="inputs changed"):
        StageRun(tmp_path / "run", "demo", {"x": 1}, inputs={"problems": inp})
    # output tampered with: refused
    inp.write_text('{"id": "a", "problem": "p", "answer": "1"}\n')
    write_parquet(pl.DataFrame({"v": [9]}), run.output)
    with pytest.raises(InputError, match="modified"):
        StageRun(tmp_path / "run", "demo", {"x": 1}, inputs={"problems": inp})


def test_read_table_errors(tmp_path):
    good = tmp_path / "g.parquet"
    write_parquet(pl.DataFrame({"id": ["a"], "n": [1]}), good)
    assert read_table(good, {"id": str, "n": int}).height == 1
    with pytest.raises(InputError, match="missing column 'answer'"):
        read_table(good, {"answer": str})
    with pytest.raises(InputError, match="column 'n' has type"):
        read_table(good, {"n": str})
    empty = tmp_path / "e.parquet"
    write_parquet(pl.DataFrame({"id": []}, schema={"id": pl.String}), empty)
    with pytest.raises(InputError, match="empty"):
        read_table(empty, {"id": str})
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match="not a readable table"):
        read_table(bad)
    js = tmp_path / "x.jsonl"
    js.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        read_table(js)
    with pytest.raises(InputError, match="file not found"):
        read_table(tmp_path / "nope.parquet")


def test_part_directory_and_stage_table_path(tmp_path):
    d = tmp_path / "rollout"
    write_parquet(pl.DataFrame({"a": [1]}), d / "part-00000-of-00002.parquet")
    write_parquet(pl.DataFrame({"a": [2]}), d / "part-00001-of-00002.parquet")
    assert stage_table_path(tmp_path, "rollout") == d
    assert read_table(d)["a"].to_list() == [1, 2]
    with pytest.raises(InputError, match="run the 'score-teachers' stage first"):
        stage_table_path(tmp_path, "score_teachers")


def test_shard_bounds_are_contiguous_blocks_covering_every_row():
    from stages.engine.tableio import shard_bounds

    assert [shard_bounds(5, (i, 2)) for i in range(2)] == [(0, 2), (2, 5)]
    assert [shard_bounds(3, (i, 2)) for i in range(2)] == [(0, 1), (1, 3)]
    assert [shard_bounds(10, (i, 4)) for i in range(4)] == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert [shard_bounds(1, (i, 3)) for i in range(3)] == [(0, 0), (0, 0), (0, 1)]
    assert shard_bounds(7, (0, 1)) == (0, 7)
