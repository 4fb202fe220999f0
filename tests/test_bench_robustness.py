"""benchmarks/robustness.py runs with --quick and writes results that parse (slow: 5 real in-process runs).

Not in the Flower group: it starts no Flower process, so it runs on the other worker beside the Flower tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_robustness_benchmark_quick(tmp_path):
    def bench(*args: str) -> dict:
        done = subprocess.run([sys.executable, "benchmarks/robustness.py", "--quick", "--methods", "fedit", *args,
                               "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        rows = json.loads((tmp_path / "robustness_quick.json").read_text())["rows"]
        return {(r["attack"], r["defence"]): r for r in rows}

    first = bench("--attacks", "none", "x1e6", "--defences", "none", "clip x10")
    rows = bench("--attacks", "x1e6", "--defences", "clip x3")  # another cell: the earlier ones are kept
    assert set(rows) == set(first) | {("x1e6", "clip x3")} and rows["x1e6", "none"] == first["x1e6", "none"]
    assert all(r["honest_clipped"] == 0 for r in rows.values())  # the clip spares honest updates
    assert rows["x1e6", "clip x10"]["attacker_clipped"] > 0 and rows["x1e6", "none"]["attacker_clipped"] == 0
    assert rows["x1e6", "clip x10"]["honest_accuracy"] >= rows["x1e6", "none"]["honest_accuracy"]
    assert "| x1e6 |" in (tmp_path / "robustness_quick.md").read_text()
