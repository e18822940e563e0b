"""The CSV files of a run directory (``metrics.csv``, ``alignment.csv``, ``diverged.csv``):
appended one row at a time, read back strictly.

A process killed while appending can leave a *torn* last line (no newline at the end). Readers
drop it, with a warning once per file; :func:`drop_rows` (run before a resumed pair appends again)
also removes it from the file, so a torn line never glues onto the next row. Any other damage (a
binary file, a row with missing fields, a number that does not parse) is a ``DataError`` naming
the file and line.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import DataError

_warned: set[Path] = set()


def _warn_once(path: Path, message: str) -> None:
    key = path.resolve()
    if key not in _warned:
        _warned.add(key)
        print(f"biograd: warning: {message}", file=sys.stderr)


def _read(path: Path, numeric: Iterable[str] = ()) -> tuple[list[str], list[dict[str, str]], bool]:
    """(columns, rows, torn) of a CSV file written by :func:`append_row`."""
    try:
        text = path.read_bytes().decode()
    except UnicodeDecodeError:
        raise DataError(f"{path} is damaged: not a text CSV file") from None
    torn = bool(text) and not text.endswith("\n")
    if torn:
        text = text[: text.rfind("\n") + 1]
        _warn_once(path, f"{path}: dropped a torn last line (a run stopped while writing it)")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = list(reader.fieldnames or [])
    numeric = [c for c in numeric if c in columns]
    rows = []
    try:
        for row in reader:
            if None in row or None in row.values():
                raise ValueError(f"{len(row)} fields where the header has {len(columns)}")
            for key in numeric:
                if row[key] != "":
                    float(row[key])
            rows.append(row)
    except (ValueError, csv.Error) as e:
        raise DataError(f"{path} line {reader.line_num} is damaged ({e})") from None
    return columns, rows, torn


def read_rows(
    path: str | Path, numeric: Iterable[str] = (), required: Iterable[str] = ()
) -> list[dict[str, str]]:
    """The rows of a CSV file (empty when it does not exist), the torn last line dropped;
    ``numeric`` columns must parse as numbers and ``required`` columns must exist."""
    path = Path(path)
    if not path.exists():
        return []
    columns, rows, _ = _read(path, numeric)
    missing = [c for c in required if c not in columns]
    if missing and (rows or columns):
        raise DataError(f"{path} is damaged: no column {missing[0]!r} in its header")
    return rows


def append_row(path: Path, row: dict[str, Any], columns: Iterable[str]) -> None:
    """Append ``row`` to a CSV file, with a header when the file is new."""
    columns = list(columns)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerow({k: row[k] for k in columns})


def drop_rows(
    path: Path, drop: Callable[[dict[str, str]], bool], numeric: Iterable[str] = ()
) -> None:
    """Remove the rows for which ``drop`` is true, and a torn last line, atomically."""
    if not path.exists():
        return
    columns, rows, torn = _read(path, numeric)
    keep = [r for r in rows if not drop(r)]
    if len(keep) == len(rows) and not torn:
        return
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(keep)
    os.replace(tmp, path)
