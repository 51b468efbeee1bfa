"""JSON Lines files of records (anchor sets, calibration sets, inputs, test and OOD sets).

One reader for every such file the CLI, the engine's start-up and ``tfb eval`` take: a bad line is
a :class:`~tfb_core.data.loading.LoadError` naming the file and the line.
"""

from __future__ import annotations

import json
from pathlib import Path

from tfb_core.data.loading import LoadError
from tfb_core.data.tasks import Record


def read_jsonl(path: str | Path, what: str = "anchor file") -> list[Record]:
    """Records of a JSON Lines file; a bad line is an error naming the file and line."""
    p = Path(path)
    if p.is_dir():
        raise LoadError(f"{what} {str(p)!r} is a directory: give a JSON Lines file")
    if not p.is_file():
        raise LoadError(f"{what} {str(p)!r}: no such file")
    records: list[Record] = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise LoadError(f"{p}:{i}: not valid JSON: {exc}") from exc
        if not isinstance(rec, dict):
            raise LoadError(f"{p}:{i}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    if not records:
        raise LoadError(f"{what} {str(p)!r} holds no records")
    return records
