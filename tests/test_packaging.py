"""Every data file the packages read at run time is declared as package data, so a plain
`pip install .` (the Dockerfile's) works, not only the editable install the tests use."""

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_package_data_covers_every_data_file():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = cfg["package-data"]
    for pkg in ("streams", "models", "producers", "consumers", "xrec"):
        base = ROOT / pkg
        for f in base.rglob("*"):
            if f.is_dir() or f.suffix in (".py", ".pyc") or "__pycache__" in f.parts:
                continue
            rel = f.relative_to(base).as_posix()
            assert any(fnmatch.fnmatch(rel, pat) for pat in data.get(pkg, [])), \
                f"{pkg}/{rel} is not in [tool.setuptools.package-data]"
