"""Reading event logs and catalogs: JSONL or CSV, optionally gzip-compressed.

JSONL lines are passed on as raw bytes, unparsed: judging them is the worker's job
(malformed lines must reach the dead-letter topic, not die in the producer). CSV rows
become JSON objects; empty cells are left out (= missing field).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

from streams.errors import InputFileError

__all__ = ["read_records", "count_records", "file_format"]


def file_format(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    raise InputFileError(f"{path}: unknown format; use .jsonl / .ndjson or .csv (optionally .gz)")


def _open(path: Path) -> io.BufferedReader:
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
        if magic == b"\x1f\x8b":
            return io.BufferedReader(gzip.open(path, "rb"))  # type: ignore[arg-type]
        return open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise InputFileError(f"{path}: {exc}") from None


def read_records(path: Path) -> Iterator[bytes]:
    """Yield each record as the bytes a producer would send."""
    fmt = file_format(path)
    fh = _open(path)
    try:
        if fmt == "jsonl":
            for line in fh:
                line = line.rstrip(b"\r\n")
                if line.strip():
                    yield line
        else:
            text = io.TextIOWrapper(fh, encoding="utf-8", errors="surrogateescape", newline="")
            for row in csv.DictReader(text):
                obj = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
                yield json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogateescape")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InputFileError(f"{path}: {exc}") from None
    finally:
        fh.close()


def count_records(path: Path) -> int:
    return sum(1 for _ in read_records(path))
