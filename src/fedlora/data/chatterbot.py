"""Reader for the chatterbot corpus (PyPI chatterbot-corpus): YAML files of conversations per category."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from ..core.errors import DataError
from .records import Record


def chatterbot_dir() -> Path:
    """The corpus's data directory inside the installed package."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the chatterbot corpus is not installed: pip install chatterbot-corpus")
    return Path(spec.submodule_search_locations[0]) / "data"


def parse_conversations(text: str, language: str = "english") -> list[Record]:
    """Question/answer pairs ({"question", "answer", "category", "language"}) from one corpus YAML file:
    each statement of a conversation paired with the reply that follows it."""
    data = yaml.safe_load(text) or {}
    category = str((data.get("categories") or ["misc"])[0])
    out = []
    for conversation in data.get("conversations") or []:
        turns = [str(t).strip() for t in conversation if t is not None]
        out += [{"question": q, "answer": a, "category": category, "language": language}
                for q, a in zip(turns, turns[1:]) if q and a]
    return out


def read_chatterbot(language: str = "english", root: str | Path | None = None) -> list[Record]:
    """Every question/answer pair of one language of the corpus."""
    directory = Path(root) if root is not None else chatterbot_dir()
    directory = directory / language
    if not directory.is_dir():
        raise DataError(f"the chatterbot corpus has no language {language!r} at {directory}")
    out: list[Record] = []
    for path in sorted(directory.glob("*.yml")):
        out += parse_conversations(path.read_text(encoding="utf-8"), language)
    return out
