"""Plain-dict records and the loaders for files: classification {"text", "label"}, generation {"prompt", "response"}."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any

from ..core.errors import DataError

Record = dict[str, Any]


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def load_jsonl(path: str | Path, fields: dict[str, str] | None = None) -> list[Record]:
    """Read JSON-lines records, renaming fields by `fields` ({"text": "sentence"} reads 'sentence' as 'text')."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    out = []
    with _open(path) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{i} is not valid JSON: {exc}") from None
            out.append(_rename(rec, fields, f"{path}:{i}"))
    return out


def load_csv(path: str | Path, fields: dict[str, str] | None = None) -> list[Record]:
    """Read CSV records with a header row, renaming fields like `load_jsonl`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    with _open(path) as fh:
        return [_rename(row, fields, f"{path}:{i}") for i, row in enumerate(csv.DictReader(fh), 2)]


def _rename(rec: Record, fields: dict[str, str] | None, where: str) -> Record:
    if not fields:
        return rec
    out = dict(rec)
    for ours, theirs in fields.items():
        if theirs not in rec:
            raise DataError(f"{where}: field {theirs!r} (mapped to {ours!r}) is missing; record has {sorted(rec)}")
        out[ours] = rec[theirs]
    return out
