"""Benchmark registry and problem loading: real files in ../shared/data, lookup order, hub path, bad input."""

from __future__ import annotations

import json
import os
import socket
import sys
import types

import polars as pl
import pytest

from stages.engine import benchmarks
from stages.engine.benchmarks import (
    BENCHMARKS,
    expand_bench_names,
    get_benchmark,
    known_benchmarks,
    load,
    load_benchmark,
    load_problems,
    problems_hash,
)
from stages.engine.errors import InputError

EXPECTED_ROWS = {"aime24": 30, "aime25": 30, "hmmt25": 30, "math500": 500}


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv("SGSD_DATA_DIR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_registry_loads_real_files(shared_data, name):
    ps = load_benchmark(name, data_dir=shared_data)
    df = ps.df
    assert ps.path is not None and ps.path.parent == shared_data
    assert df.columns == ["id", "problem", "answer"]
    assert df.schema == pl.Schema({"id": pl.String, "problem": pl.String, "answer": pl.String})
    assert df.height == EXPECTED_ROWS[name]
    assert df["id"].n_unique() == df.height
    assert df["answer"].str.strip_chars().str.len_chars().min() > 0
    assert df["problem"].str.len_chars().min() >= 10
    # the same rows as the file itself, in file order
    raw = pl.read_ndjson(ps.path, infer_schema_length=None)
    assert df["id"].to_list() == raw["id"].to_list()
    assert df["answer"].to_list() == [a.strip() for a in raw["answer"].to_list()]


def test_known_answers_of_real_files(shared_data):
    # spot checks against the data README (recomputed answers)
    a25 = load_problems("aime25", data_dir=shared_data)
    assert dict(zip(a25["id"], a25["answer"]))["aime25-I-1"] == "70"
    h = load_problems("hmmt25", data_dir=shared_data)
    assert dict(zip(h["id"], h["answer"]))["hmmt_feb25-1"] == "103"
    m = load_problems("math500", data_dir=shared_data)
    assert dict(zip(m["id"], m["answer"]))["test/number_theory/1032.json"] == "2220"


def test_default_search_finds_shared_data_beside_repo(shared_data):
    # no --data-dir, no env: the registry's ../shared/data entry (relative to the repo root) is used
    from tests.conftest import REPO

    if shared_data.resolve() != (REPO.parent / "shared" / "data").resolve():
        pytest.skip("shared data is not beside the repository here")
    ps = load("aime24")
    assert ps.path.resolve() == (shared_data / "aime24.jsonl").resolve()


def test_train_pool_and_aliases_for_rollout(shared_data):
    train = load_problems("train", data_dir=shared_data)
    assert train.height == 6133 and train.columns == ["id", "problem", "answer"]
    assert load("hmmt_feb25", data_dir=shared_data).name == "hmmt25"
    assert expand_bench_names(["all"]) == ["aime24", "aime25", "hmmt25", "math500"]
    assert expand_bench_names(["aime25", "all", "AIME25"]) == ["aime25", "aime24", "hmmt25", "math500"]
    assert expand_bench_names(["aime24,math500"]) == ["aime24", "math500"]
    assert {"aime24", "aime25", "hmmt25", "math500", "amc23", "minerva", "train"} <= set(known_benchmarks())
    assert BENCHMARKS["amc23"].file is None and BENCHMARKS["minerva"].file is None  # hub-only entries


def _copy_with_first_answer(src, dst_dir, answer):
    dst_dir.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    rows[0]["answer"] = answer
    (dst_dir / src.name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_lookup_order_data_dir_then_env_then_registry(shared_data, tmp_path, monkeypatch):
    src = shared_data / "aime25.jsonl"
    _copy_with_first_answer(src, tmp_path / "cli", "1001")
    _copy_with_first_answer(src, tmp_path / "env", "2002")
    monkeypatch.setenv("SGSD_DATA_DIR", str(tmp_path / "env"))
    assert load_problems("aime25", data_dir=tmp_path / "cli")["answer"][0] == "1001"
    assert load_problems("aime25")["answer"][0] == "2002"
    # a --data-dir without the file falls through to the env folder, then to the registry folders
    assert load_problems("aime25", data_dir=tmp_path / "empty")["answer"][0] == "2002"
    dirs = benchmarks.search_dirs(tmp_path / "empty")
    assert dirs[:2] == [tmp_path / "empty", tmp_path / "env"]
    from stages.engine.paths import REPO_ROOT

    assert (REPO_ROOT.parent / "shared" / "data").resolve() in [d.resolve() for d in dirs[2:]]


def test_partial_local_copy_is_refused(shared_data, tmp_path):
    lines = (shared_data / "aime25.jsonl").read_text().splitlines()[:29]
    (tmp_path / "aime25.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="should have 30 rows, found 29"):
        load_benchmark("aime25", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------------
# hub path (mocked `datasets` module: the network and the package are not available here)


def _nothing_local(monkeypatch, tmp_path):
    monkeypatch.setattr(benchmarks, "search_dirs", lambda data_dir=None: [tmp_path / "nowhere"])


def _fake_datasets(monkeypatch, rows_by_id, calls):
    class FakeDataset:
        def __init__(self, rows):
            self.rows = rows

        def to_list(self):
            return [dict(r) for r in self.rows]

    def load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        if path not in rows_by_id:
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")
        return FakeDataset(rows_by_id[path])

    mod = types.ModuleType("datasets")
    mod.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", mod)


def test_hub_path_maps_columns_and_ids(monkeypatch, tmp_path):
    _nothing_local(monkeypatch, tmp_path)
    calls = []
    aime = [{"id": i, "problem": f"AIME problem {i}", "solution": "...", "answer": f"{i:03d}", "url": "u",
             "year": "2024"} for i in range(60, 90)]
    amc = [{"id": i, "question": f"AMC question {i}", "answer": float(i) + (0.5 if i == 3 else 0.0), "url": "u"}
           for i in range(40)]
    minerva = [{"question": f"Minerva {i}", "answer": f"{i} m"} for i in range(272)]
    _fake_datasets(monkeypatch, {"HuggingFaceH4/aime_2024": aime, "math-ai/amc23": amc,
                                 "math-ai/minervamath": minerva}, calls)

    ps = load("aime24")
    assert ps.source == "hub:HuggingFaceH4/aime_2024:train" and ps.path is None
    assert ps.df.height == 30 and ps.df["id"][0] == "60" and ps.df["answer"][0] == "060"
    assert calls[-1] == ("HuggingFaceH4/aime_2024", None, "train")

    amc_df = load_problems("amc23")
    assert calls[-1] == ("math-ai/amc23", None, "test")
    assert amc_df["problem"][5] == "AMC question 5"
    assert amc_df["answer"][:4].to_list() == ["0", "1", "2", "3.5"]  # integral floats print as integers

    mdf = load_problems("minerva")
    assert mdf["id"][:2].to_list() == ["minerva-0", "minerva-1"]  # no id column on the hub: generated
    assert mdf["answer"][7] == "7 m"


def test_hub_failure_is_one_line_naming_the_folders(monkeypatch, tmp_path):
    _nothing_local(monkeypatch, tmp_path)
    calls = []
    _fake_datasets(monkeypatch, {}, calls)
    with pytest.raises(InputError) as e:
        load_problems("aime25")
    msg = e.value.line()
    assert "\n" not in msg
    assert "aime25.jsonl not found in" in msg and str(tmp_path / "nowhere") in msg
    assert "yentinglin/aime_2025" in msg and "ConnectionError" in msg and "SGSD_DATA_DIR" in msg
    assert calls == [("yentinglin/aime_2025", None, "train")]


def test_hub_config_is_passed(monkeypatch, tmp_path):
    _nothing_local(monkeypatch, tmp_path)
    calls = []
    rows = [{"prompt": f"p{i}", "solution": str(i), "data_source": "x"} for i in range(5)]
    _fake_datasets(monkeypatch, {"open-r1/DAPO-Math-17k-Processed": rows}, calls)
    df = load_problems("hub:train")
    assert calls == [("open-r1/DAPO-Math-17k-Processed", "en", "train")]
    assert df["id"].to_list() == [f"train-{i}" for i in range(5)] and df["problem"][2] == "p2"


def test_missing_datasets_package_and_offline(monkeypatch, tmp_path):
    _nothing_local(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(InputError, match="'datasets' package is not installed"):
        load_problems("math500")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="offline mode is set") as e:
        load_problems("hmmt25")
    assert "hmmt_feb25.jsonl not found in" in e.value.line()


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(os.environ.get("SGSD_TEST_HUB") != "1", reason="set SGSD_TEST_HUB=1 to load from the real hub")
def test_real_hub_when_available(monkeypatch, tmp_path):
    pytest.importorskip("datasets")
    if not _hub_reachable():
        pytest.skip("hub not reachable")
    _nothing_local(monkeypatch, tmp_path)
    assert load_problems("aime25").height == 30
    assert load_problems("math500").height == 500


# --------------------------------------------------------------------------------------------------
# problems files and bad input


def test_problems_file_jsonl_and_parquet(tmp_path):
    rows = [{"id": 7, "problem": "1+1?", "answer": 2, "extra": "x"}, {"id": 8, "problem": "2+2?", "answer": 4}]
    p = tmp_path / "mine.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ps = load(str(p))
    assert ps.name == "mine" and ps.path == p
    assert ps.df.to_dicts() == [{"id": "7", "problem": "1+1?", "answer": "2"}, {"id": "8", "problem": "2+2?", "answer": "4"}]
    q = tmp_path / "mine2.parquet"
    pl.DataFrame({"id": ["a", "b"], "problem": ["x", "y"], "answer": ["\\frac12", " 3 "]}).write_parquet(q)
    df = load_problems(q)
    assert df["answer"].to_list() == ["\\frac12", "3"]
    assert problems_hash(df) == problems_hash(load_problems(str(q)))
    assert problems_hash(df) != problems_hash(ps.df)


def test_unknown_benchmark_lists_known_ones():
    with pytest.raises(InputError) as e:
        get_benchmark("aime26")
    msg = e.value.line()
    for name in ("aime24", "aime25", "hmmt25", "math500", "amc23", "minerva"):
        assert name in msg
    with pytest.raises(InputError, match="unknown benchmark 'nope'"):
        load_problems("nope")


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"id": "a", "problem": "p"}], "missing column 'answer'"),
        ([{"problem": "p", "answer": "1"}], "missing column 'id'"),
        ([{"id": "a", "problem": "p", "answer": ""}], "empty 'answer'"),
        ([{"id": "a", "problem": "p", "answer": None}, {"id": "b", "problem": "q", "answer": "1"}], "empty 'answer'"),
        ([{"id": "a", "problem": "p", "answer": "1"}, {"id": "a", "problem": "q", "answer": "2"}], "not unique"),
        ([{"id": "a", "problem": 5, "answer": "1"}], "column 'problem' has type"),
    ],
)
def test_bad_problem_files(tmp_path, rows, match):
    p = tmp_path / "bad.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=match) as e:
        load_problems(str(p))
    assert e.value.path == str(p)


def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_problems(str(tmp_path / "none.jsonl"))


def test_missing_training_pool_is_refused_not_replaced_by_the_hub_copy(monkeypatch, tmp_path):
    """The training pool's hub entry is other data (DAPO-Math-17k): without the local file the same config must
    not silently train on it; `hub:train` names it."""
    _nothing_local(monkeypatch, tmp_path)
    calls = []
    _fake_datasets(monkeypatch, {"open-r1/DAPO-Math-17k-Processed": [{"prompt": "p", "solution": "1"}]}, calls)
    with pytest.raises(InputError) as e:
        load_problems("train")
    msg = e.value.line()
    assert "train.jsonl not found in" in msg and "SGSD_DATA_DIR" in msg and "'hub:train'" in msg
    assert calls == []  # the hub was not asked
    assert load_problems("hub:train").height == 1 and len(calls) == 1
