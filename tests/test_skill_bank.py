"""Skill bank format: JSON <-> Parquet round trips of the shared banks, extra keys, diff, bad input."""

from __future__ import annotations

import json

import polars as pl
import pyarrow.parquet as pq
import pytest

from stages.engine.errors import InputError
from stages.engine.skills.bank import SkillBank, bank_json_text, bank_to_table, load_bank, write_bank
from stages.engine.skills.diff import diff_banks

from conftest import DEMO_BANK
from test_mine_skills import cli, error_lines

BANKS = ["sgsd_qwen3_1.7b.json", "sgsd_qwen3_4b.json", "sgsd_qwen3_8b.json"]
COUNTS = {"sgsd_qwen3_1.7b.json": (28, 98), "sgsd_qwen3_4b.json": (24, 15), "sgsd_qwen3_8b.json": (46, 8)}


def ids(bank: SkillBank) -> tuple[list[str], list[str]]:
    return [s["skill_id"] for s in bank.skills], [m["mistake_id"] for m in bank.mistakes]


@pytest.mark.parametrize("name", BANKS)
def test_shared_bank_round_trip(shared_data, tmp_path, name):
    src = shared_data / "skill_banks" / name
    bank = load_bank(src)
    assert (len(bank.skills), len(bank.mistakes)) == COUNTS[name]
    # JSON: the same text as the shared file (we add a final newline)
    write_bank(bank, tmp_path / "b.json")
    assert (tmp_path / "b.json").read_text(encoding="utf-8").rstrip("\n") == src.read_text(encoding="utf-8")
    # JSON -> Parquet -> JSON
    write_bank(bank, tmp_path / "b.parquet")
    pq_bank = load_bank(tmp_path / "b.parquet")
    assert pq.read_table(tmp_path / "b.parquet").num_rows == sum(COUNTS[name])
    write_bank(pq_bank, tmp_path / "c.json")
    back = load_bank(tmp_path / "c.json")
    for b in (load_bank(tmp_path / "b.json"), pq_bank, back):
        assert b.skills == bank.skills and b.mistakes == bank.mistakes
        assert ids(b) == ids(bank)
        assert b.metadata == bank.metadata and b.task_specific == bank.task_specific == {}
        assert b.version == bank.version
    assert bank_json_text(back) == bank_json_text(bank)


def test_extra_keys_survive(tmp_path):
    bank = load_bank(DEMO_BANK)
    bank.skills.append({"skill_id": "dyn_gen_v0001_01", "title": "T", "principle": "P", "when_to_apply": "W",
                        "origin": "dynamic", "added_in": "v0001", "score": [1, 2.5]})
    bank.extra["notes"] = {"k": 1}
    for suffix in (".json", ".parquet"):
        write_bank(bank, tmp_path / f"x{suffix}")
        b = load_bank(tmp_path / f"x{suffix}")
        assert b.skills[-1] == bank.skills[-1] and b.extra == {"notes": {"k": 1}}
        assert b.version == bank.version
    # the dynamic flag changes the content hash
    plain = load_bank(DEMO_BANK)
    assert plain.version != bank.version


def test_version_is_content_hash():
    a, b = load_bank(DEMO_BANK), load_bank(DEMO_BANK)
    assert a.version == b.version and len(a.version) == 16
    b.metadata["note"] = "metadata does not change the version"
    assert a.version == b.version
    b.skills[0] = {**b.skills[0], "title": b.skills[0]["title"] + "!"}
    assert a.version != b.version


def test_diff_banks():
    old = load_bank(DEMO_BANK)
    new = load_bank(DEMO_BANK)
    new.skills[0] = {**new.skills[0], "principle": "changed"}  # changed
    new.skills[1] = {**new.skills[1], "skill_id": "gen_100"}  # renamed
    removed = new.mistakes.pop(2)
    new.mistakes.append({"mistake_id": "err_new", "description": "d", "why_it_happens": "w", "how_to_avoid": "h"})
    rows = {(r["kind"], r["status"]): r for r in diff_banks(old, new)}
    assert set(rows) == {("skill", "changed"), ("skill", "renamed"), ("mistake", "removed"), ("mistake", "added")}
    assert rows[("skill", "changed")]["fields"] == ["principle"]
    assert rows[("skill", "renamed")]["old_id"] == old.skills[1]["skill_id"] and rows[("skill", "renamed")]["new_id"] == "gen_100"
    assert rows[("mistake", "removed")]["old_id"] == removed["mistake_id"]
    assert diff_banks(old, old) == []


def _bad(tmp_path, data, name="bad.json") -> str:
    p = tmp_path / name
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(p)


def test_bad_banks_one_line_exit_2(tmp_path):
    good = json.loads(DEMO_BANK.read_text())
    no_skills = {k: v for k, v in good.items() if k != "general_skills"}
    missing_field = json.loads(DEMO_BANK.read_text())
    del missing_field["common_mistakes"][1]["how_to_avoid"]
    cases = [
        (no_skills, "skill bank has no 'general_skills'"),
        (missing_field, "common_mistakes[1] has no string field 'how_to_avoid'"),
        ("{not json", "skill bank is not valid JSON"),
        ([1, 2], "skill bank must be a JSON object"),
    ]
    for i, (data, msg) in enumerate(cases):
        p = _bad(tmp_path, data, f"bad{i}.json")
        res = cli(["skills", "show", p])
        lines = error_lines(res)
        assert res.exit_code == 2 and len(lines) == 1 and msg in lines[0] and p in lines[0], res.output
        with pytest.raises(InputError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            load_bank(p)
    res = cli(["skills", "show", str(tmp_path / "nope.json")])
    assert res.exit_code == 2 and "skill bank not found" in res.output


def test_bad_parquet_bank(tmp_path):
    bank = load_bank(DEMO_BANK)
    t = bank_to_table(bank).drop_columns(["how_to_avoid"])
    pq.write_table(t, tmp_path / "b.parquet")
    with pytest.raises(InputError, match="no column 'how_to_avoid'"):
        load_bank(tmp_path / "b.parquet")
    (tmp_path / "c.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="not a readable Parquet"):
        load_bank(tmp_path / "c.parquet")
    # a Parquet bank whose item lacks a field value fails like the JSON form
    t = bank_to_table(bank).to_pylist()
    t[0]["principle"] = None
    pl.DataFrame(t).write_parquet(tmp_path / "d.parquet")
    with pytest.raises(InputError, match=r"general_skills\[0\] has no string field 'principle'"):
        load_bank(tmp_path / "d.parquet")


def test_skills_show_prints_items(shared_data):
    res = cli(["skills", "show", str(shared_data / "skill_banks" / "sgsd_qwen3_8b.json"), "--kind", "mistakes"])
    assert res.exit_code == 0, res.output
    assert "46 skills, 8 mistakes" in res.output and "err_008" in res.output and "gen_001" not in res.output
