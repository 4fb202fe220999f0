"""Packaging metadata and the `fedlora` commands the docs cite."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

from fedlora.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
_TOML = tomllib.loads((ROOT / "pyproject.toml").read_text())
PYPROJECT = _TOML["project"]
BUILD_REQUIRES = _TOML["build-system"]["requires"]

# `fedlora` in command position (line start, after a pipe, `&&`, `;` or a `$ ` prompt), then one or two words
COMMAND = re.compile(r"(?:^|[|;&$])[ \t]*fedlora[ \t]+([a-z][\w-]*)(?:[ \t]+([a-z][\w-]*))?", re.MULTILINE)


def _code(text: str) -> list[str]:
    """The fenced blocks and inline code spans of Markdown (or of comments and docstrings, which use backticks)."""
    fenced = re.findall(r"```[^\n]*\n(.*?)```", text, re.DOTALL)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
    return fenced + inline


def _cited_commands() -> set[tuple[str, str | None, str]]:
    """(subcommand, next word, file) for every `fedlora ...` command line in the docs and the Flower package."""
    files = [*sorted((ROOT / "src/fedlora/flower").glob("*.py")), ROOT / "README.md",
             *sorted((ROOT / "docs").glob("*.md"))]
    found = set()
    for path in files:
        for code in _code(path.read_text()):
            found |= {(m.group(1), m.group(2), path.name) for m in COMMAND.finditer(code)}
    return found


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommands by name ({} when it takes none)."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def test_every_cited_fedlora_command_exists():
    cited = _cited_commands()
    assert {("deploy", "app"), ("deploy", "credentials")} <= {(s, n) for s, n, _ in cited}  # the scan sees them
    top = _subcommands(build_parser())
    wrong = []
    for sub, nxt, where in sorted(cited, key=str):
        if sub not in top:
            wrong.append(f"{where}: fedlora {sub}")
            continue
        nested = _subcommands(top[sub])
        if nested and nxt not in nested:
            wrong.append(f"{where}: fedlora {sub} {nxt} (has {sorted(nested)})")
    assert not wrong, f"cited commands that `fedlora` does not have: {wrong}"


def test_requires_python_matches_what_the_code_needs():
    # tomllib is 3.11+, and so is flwr >= 1.41
    spec = SpecifierSet(PYPROJECT["requires-python"])
    assert "3.11" in spec and "3.12" in spec
    assert "3.10" not in spec
    classified = {c.rsplit(" :: ", 1)[-1] for c in PYPROJECT.get("classifiers", []) if "Python :: 3." in c}
    assert all(v in spec for v in classified), classified


def test_license_is_an_spdx_expression():
    # PEP 639: a string, which setuptools reads from 77 on; the table form and License classifiers are deprecated
    assert isinstance(PYPROJECT["license"], str)
    assert not any(c.startswith("License ::") for c in PYPROJECT.get("classifiers", []))
    setuptools = next(r for r in BUILD_REQUIRES if r.startswith("setuptools"))
    allowed = SpecifierSet(setuptools.removeprefix("setuptools"))
    assert "77" in allowed and "76" not in allowed, setuptools
