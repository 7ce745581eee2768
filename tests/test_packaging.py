"""The wheel holds every sub-package and the data files; installed in a fresh venv, `sgsd --help` and one stage run."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _packages_in_tree() -> set[str]:
    pkgs = set()
    for root in ("stages", "sgsd_cli"):
        for init in (REPO / root).rglob("__init__.py"):
            pkgs.add(".".join(init.parent.relative_to(REPO).parts))
    return pkgs


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                        str(REPO)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("sgsd-*.whl")
    return whl


def test_wheel_contains_every_subpackage_and_the_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in _packages_in_tree():
        assert pkg.replace(".", "/") + "/__init__.py" in names, f"{pkg} is missing from the wheel"
    for p in (REPO / "stages").rglob("*.py"):
        assert str(p.relative_to(REPO)) in names
    data = {str(p.relative_to(REPO / "data")) for p in (REPO / "data").rglob("*") if p.is_file() and p.suffix != ".pyc"}
    assert {f"sgsd_data/{d}" for d in data} <= names


def test_installed_wheel_runs_help_and_a_stage(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import stages, stages.engine.paths as paths; print(stages.__file__); print(paths.DATA_DIR)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr
    mod_file, data_dir = where.stdout.split()
    assert mod_file.startswith(str(venv)) and data_dir.startswith(str(venv)), where.stdout  # not the checkout
    sgsd = venv / "bin" / "sgsd"
    h = subprocess.run([str(sgsd), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert h.returncode == 0 and "rollout" in h.stdout
    model = tmp_path / "model"
    subprocess.run([str(sgsd), "make-tiny-model", str(model)], check=True, capture_output=True, cwd=tmp_path, env=env)
    demo = Path(data_dir) / "demo" / "problems.jsonl"  # the installed sgsd_data's demo set
    r = subprocess.run([str(sgsd), "rollout", "--run-dir", str(tmp_path / "run"), "--model", str(model), "--limit", "2",
                        "--problems", str(demo),
                        "--max-new-tokens", "4", "--backend", "hf", "--device", "cpu", "--dtype", "fp32"],
                       capture_output=True, text=True, cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "rollout.parquet").exists()  # the demo problems came from the installed sgsd_data
