"""Safe, atomic file I/O: tensors with safetensors, everything else as JSON. Never pickle."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError


def cache_dir() -> Path:
    """fedlora's cache (converted models, unpacked corpora): $FEDLORA_CACHE, else ~/.cache/fedlora."""
    return Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora")).expanduser()


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: done once, at import, before any thread writes
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def umask() -> int:
    """The process's umask (read once at import)."""
    return _UMASK


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make results unreadable to the user's group
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors to a safetensors file atomically (write a temporary file, then rename)."""
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # metadata=None, not {}: safetensors writes an unreadable header for an empty dict with empty metadata
    _atomic_write(Path(path), lambda tmp: save_file(data, tmp, metadata=dict(metadata) if metadata else None))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or corrupt file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"tensor file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"tensor file {path} is corrupt or truncated ({exc}); "
                              "restore it from a backup or start the run again") from exc


def save_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def json_text(obj: Any) -> str:
    """The text `save_json` writes for `obj` (so a hash of the file can be recomputed from the object)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def save_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically."""
    save_text(path, json_text(obj))


def sha256_text(text: str) -> str:
    """The hex sha256 of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def load_json(path: str | Path) -> Any:
    """Read JSON; a missing or corrupt file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"file {path} is not valid JSON ({exc}); it may be truncated") from exc


def jsonl_line(obj: Any) -> str:
    """One JSON line as `append_jsonl` writes it."""
    return json.dumps(obj, sort_keys=True, default=str) + "\n"


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one JSON line (flushed, so a crash loses at most the line being written)."""
    with open(path, "a") as fh:
        fh.write(jsonl_line(obj))
        fh.flush()
