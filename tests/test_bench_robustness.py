"""benchmarks/robustness.py runs with --quick and writes results that parse (slow: 12 real in-process runs).

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
    done = subprocess.run([sys.executable, "benchmarks/robustness.py", "--quick", "--methods", "fedit",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {(r["attack"], r["defence"]): r for r in json.loads((tmp_path / "robustness_quick.json").read_text())["rows"]}
    assert len(rows) == 12 and all(r["honest_clipped"] == 0 for r in rows.values())  # the clip spares honest updates
    assert rows["x1e6", "clip"]["attacker_clipped"] > 0 and rows["x1e6", "none"]["attacker_clipped"] == 0
    assert rows["x1e6", "clip"]["honest_accuracy"] >= rows["x1e6", "none"]["honest_accuracy"]
    assert "| x1e6 |" in (tmp_path / "robustness_quick.md").read_text()
