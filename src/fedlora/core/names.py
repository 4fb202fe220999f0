"""Names that come from outside (client ids, task names, node names) and may become file names.

A name is used as a path component only after `safe_name` has accepted it: a short, plain token of
letters, digits and `._-` that is not `.`/`..`, so it can never leave the directory it is joined to.
"""

from __future__ import annotations

import re

from .errors import ConfigError

MAX_NAME_LENGTH = 100  # well inside every file system's 255-byte limit, suffixes and temp prefixes included
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def name_problem(value: object) -> str | None:
    """Why `value` cannot serve as a name that becomes a file name, or None."""
    if not isinstance(value, str):
        return f"it is a {type(value).__name__}, not a string"
    if not value:
        return "it is empty"
    if len(value) > MAX_NAME_LENGTH:
        return f"it has {len(value)} characters, more than {MAX_NAME_LENGTH}"
    if not _SAFE.fullmatch(value) or ".." in value:
        return "only letters, digits and . _ - are allowed (starting with a letter or digit, no '..')"
    return None


def safe_name(value: object, what: str = "client id") -> str:
    """`value` if it is a safe name (see `name_problem`); else a ConfigError that names it and the rule."""
    problem = name_problem(value)
    if problem:
        raise ConfigError(f"{what} {value!r} is not a safe name: {problem}; rename it")
    return value  # type: ignore[return-value]


def sanitize_name(value: str) -> str:
    """A safe name made from any text (for names fedlora derives itself, e.g. a data owner's key value):
    every run of other characters becomes one '-', cut to the length limit."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", value).strip(".-_").replace("..", ".")
    return (cleaned or "x")[:MAX_NAME_LENGTH]
