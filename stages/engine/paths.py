"""Where the toolkit is: the repository root, the bundled data folder, the version.  docs/DESIGN.md 2."""

from __future__ import annotations

from pathlib import Path


SGSD_VERSION = "0.1.0"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _data_dir() -> Path:
    """The bundled ``data/`` folder: the checkout's, or the ``sgsd_data`` package of an installed wheel."""
    if (REPO_ROOT / "data" / "benchmarks.toml").is_file():
        return REPO_ROOT / "data"
    import importlib.util

    spec = importlib.util.find_spec("sgsd_data")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return REPO_ROOT / "data"


DATA_DIR = _data_dir()
