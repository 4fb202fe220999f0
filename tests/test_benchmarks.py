"""benchmarks/engines.py runs with --quick and writes results that parse (slow: it starts Flower).

In conftest's Flower group (this file): the benchmarks that run in-process have files of their own, so they
run beside the Flower tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_engines_benchmark_quick(tmp_path):
    # flower-local through run_experiment is covered by test_deployment; here the script's own plumbing
    done = subprocess.run([sys.executable, "benchmarks/engines.py", "--quick", "--engines", "flower-sim",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((tmp_path / "engines.json").read_text())
    assert set(data["engines"]) == {"inprocess", "flower-sim"} and data["per_round_ratio_flower_over_inprocess"] > 0
    assert all(r > 0 for r in data["per_round_ratio_over_inprocess"].values())
    assert (tmp_path / "engines.png").read_bytes()[:4] == b"\x89PNG"
