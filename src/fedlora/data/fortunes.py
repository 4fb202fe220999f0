"""Parser for fortune(6) files (entries separated by lines holding a single '%'), as Debian's fortunes
packages install them: English categories at the top level, other languages in de/ es/ it/ ru/ pl/ cs/.
Offensive collections (any `off/` directory) are never read."""

from __future__ import annotations

import re
from pathlib import Path

from .debian import find_installed
from .records import Record

FORTUNES_DIR = "/usr/share/games/fortunes"
LANGUAGES = {"en": "English", "de": "German", "es": "Spanish", "it": "Italian", "ru": "Russian", "pl": "Polish",
             "cs": "Czech"}
_ATTRIBUTION = re.compile(r"^\s*--")  # "-- Author": dropped, it would give the category away


def parse_fortunes(text: str) -> list[str]:
    """The entries of one fortune file, attribution lines removed and white space folded."""
    entries = []
    for chunk in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        lines = [line for line in chunk.splitlines() if not _ATTRIBUTION.match(line)]
        entry = " ".join(" ".join(lines).split())
        if entry:
            entries.append(entry)
    return entries


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix not in {".dat", ".u8"}
                  and "off" not in p.relative_to(directory).parts)


def read_fortunes(root: str | Path | None = None) -> list[Record]:
    """Every entry as {"text", "category", "language"}: English files at the top level (symlinks there point
    into language directories and are skipped), other languages from their directories."""
    root = Path(root) if root is not None else find_installed(FORTUNES_DIR, "fortunes")
    out: list[Record] = []
    for path in sorted(root.iterdir()):
        if path.is_file() and not path.is_symlink() and path.suffix not in {".dat", ".u8"}:
            out += [{"text": t, "category": path.name, "language": "en"} for t in parse_fortunes(_read(path))]
    for code in LANGUAGES:
        directory = root / code
        if code != "en" and directory.is_dir():
            for path in _data_files(directory):
                category = path.name.removesuffix(".fortunes")
                out += [{"text": t, "category": category, "language": code} for t in parse_fortunes(_read(path))]
    return out


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")
