"""Plain-dict records and the loaders for files: classification {"text", "label"}, generation {"prompt", "response"}."""

from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path
from typing import Any

from ..core.errors import DataError

Record = dict[str, Any]


def _lines(path: Path) -> list[str]:
    """The file's lines as text, decoded line by line so that a byte that is not UTF-8 is reported by line."""
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    lines = []
    for i, line in enumerate(raw.splitlines(keepends=True), 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{i} is not UTF-8 text (byte {line[exc.start:exc.start + 1]!r} at column "
                            f"{exc.start + 1}); save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name}`"
                            ) from None
    return lines


def load_jsonl(path: str | Path, fields: dict[str, str] | None = None) -> list[Record]:
    """Read JSON-lines records, renaming fields by `fields` ({"text": "sentence"} reads 'sentence' as 'text')."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    out = []
    for i, line in enumerate(_lines(path), 1):
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
    return [_rename(row, fields, f"{path}:{i}") for i, row in enumerate(csv.DictReader(_lines(path)), 2)]


def _rename(rec: Record, fields: dict[str, str] | None, where: str) -> Record:
    if not fields:
        return rec
    out = dict(rec)
    for ours, theirs in fields.items():
        if theirs not in rec:
            raise DataError(f"{where}: field {theirs!r} (mapped to {ours!r}) is missing; record has {sorted(rec)}")
        out[ours] = rec[theirs]
    return out


def load_hf(name: str, split: str, fields: dict[str, str] | None = None) -> list[Record]:
    """Records of a Hugging Face dataset: a local directory or file always, a hub name where the network allows."""
    try:
        import datasets
    except ImportError:
        raise DataError("hf: datasets need the 'datasets' package: pip install datasets") from None
    try:
        if Path(name).is_dir():
            try:
                data = datasets.load_from_disk(name)
                data = data[split] if isinstance(data, datasets.DatasetDict) else data
            except FileNotFoundError:  # a directory of data files rather than a saved dataset
                data = datasets.load_dataset(name, split=split)
        else:
            data = datasets.load_dataset(name, split=split)
    except (ConnectionError, OSError, ValueError) as exc:
        offline = "offline" in str(exc).lower() or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = (" The hub is not reachable here (HF_DATASETS_OFFLINE=1 or no network): use a local copy "
                "(hf:<directory>) or a JSONL/CSV file.") if offline else ""
        raise DataError(f"could not load the Hugging Face dataset {name!r} (split {split!r}): {exc}.{hint}") from None
    return [_rename(dict(row), fields, f"{name}[{i}]") for i, row in enumerate(data)]
