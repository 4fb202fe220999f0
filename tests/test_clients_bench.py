"""The data-parallel benchmark runs with --quick and writes results that parse (slow: it starts worker processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_workers_benchmark_quick(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/workers.py", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((tmp_path / "workers.json").read_text())
    assert set(data["median"]) == {"1 worker x 1 thread", "1 worker x 2 threads", "2 workers x 1 thread",
                                   "shard 1/2", "shard 1/4"}
    assert all(m["round"] > 0 for m in data["median"].values()) and data["worker_startup_seconds"] > 0
    assert set(data["predicted_speedup_over_1x1"]) == {"1", "2", "4"}
    assert "Predicted for N workers" in (tmp_path / "workers.md").read_text()
    assert (tmp_path / "workers.png").read_bytes()[:4] == b"\x89PNG"
