"""benchmarks/secagg.py: a protocol row measures what it says, and the table renders every row."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_secagg", ROOT / "benchmarks" / "secagg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_protocol_row_counts_bytes_and_stays_within_the_quantization_bound():
    bench = _bench()
    rows = [bench.protocol_row(4, length=500), bench.protocol_row(6, length=500, num_shares=3)]
    for row in rows:
        assert 0 < row["max_error"] < row["error_bound"]
        assert row["bytes_up_per_client"] > 8 * 500  # the int64 masked vector, plus keys and shares
        assert row["bytes_down_per_client"] > 4 * 500  # the payload, plus the neighbours' keys and shares
    assert (rows[0]["shares"], rows[0]["threshold"]) == (4, 2) and rows[1]["shares"] == 3
    demo = {"method": "fedit", "secure": True, "rounds": 2, "accuracy": 0.5, "fit_seconds": 1.0, "cpu_seconds": 1.0,
            "bytes_up_per_client": 1024.0, "bytes_down_per_client": 1024.0}
    text = bench.render({"command": "x", "measured": "now", "protocol": rows, "demo": [demo]})
    assert "| 4 | 4 (2) |" in text and "| 6 | 3 (2) |" in text and "| fedit | yes | 2 | 50.0 |" in text
