"""The code map of docs/architecture.md holds: each layer imports only the layers below it, no module imports
itself back through others, no module outgrows one job, and nothing below `algorithms/` looks a method up by name."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# top to bottom: a module may import its own layer and those below it (docs/architecture.md)
LAYERS = ["cli", "api", "flower", "reporting", "serving", "engines", "algorithms", "training", "export_files",
          "adapters", "data", "core", "configs"]  # configs: the built-in TOML files (a package for importlib.resources)
MAX_LINES = 440  # "about 400": config.py (every section's model and loading) and reporting.py are the largest


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "fedlora").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The fedlora modules `name` imports (anywhere in it, lazy imports included), as module names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_layer_imports_only_the_layers_below_it():
    unknown = sorted({_layer(m) for m in MODULES} - set(LAYERS) - {None})
    assert not unknown, f"new top-level modules {unknown}: give them a place in LAYERS and docs/architecture.md"
    upward = sorted((m, t) for m, targets in GRAPH.items() for t in targets
                    if _layer(m) and _layer(t) and LAYERS.index(_layer(t)) < LAYERS.index(_layer(m)))
    assert not upward, f"imports from a lower layer to a higher one: {upward}"


def test_no_import_circle():
    """No module reaches itself through other modules (a package's own __init__ re-exporting it aside)."""
    def ancestors(m: str) -> set[str]:
        parts = m.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    edges = {m: {t for t in ts if t not in ancestors(m)} for m, ts in GRAPH.items()}
    circles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                circles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, [*path, t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not circles, f"import circles: {circles}"


def test_no_module_outgrows_one_job():
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert not {m: n for m, n in sizes.items() if n > MAX_LINES}, f"modules over {MAX_LINES} lines"


def test_nothing_outside_algorithms_looks_a_method_up_in_the_registry():
    """Engines and the layers above read a method's traits from its objects; only building a run (session.py),
    the comparison's checks and the method listing name methods."""
    allowed = {"fedlora.engines.session", "fedlora.engines.privacy", "fedlora.engines.runtime", "fedlora.cli"}
    lookups = sorted(m for m, p in MODULES.items() if not m.startswith("fedlora.algorithms") and m not in allowed
                     and ("METHODS[" in p.read_text() or "get_method(" in p.read_text()))
    assert not lookups, f"modules looking methods up by name: {lookups}"
