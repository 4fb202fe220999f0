"""benchmarks/speed.py and benchmarks/scale.py run with --quick and write results that parse (slow: real runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, out: Path) -> dict:
    """Run a benchmark script with --quick into `out`; its JSON results."""
    done = subprocess.run([sys.executable, f"benchmarks/{script}.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for suffix in ("md", "json", "png"):
        assert (out / f"{script}.{suffix}").is_file(), suffix
    assert (out / f"{script}.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out / f"{script}.json").read_text())
    assert data["command"].startswith(f"python benchmarks/{script}.py --quick")
    return data


@pytest.mark.slow
def test_speed_benchmark_quick(tmp_path):
    data = run_quick("speed", tmp_path)
    fw = data["framework"]
    assert {"machine", "goals", "goals_met", "layers"} <= set(data)
    assert all(fw["ratio"][clock] > 0 for clock in ("wall", "cpu"))
    assert fw["max_abs_train_loss_difference"] < 1e-4  # both sides really did the same training
    assert [lb["d"] for lb in data["layers"]] == [384, 768]
    for lb in data["layers"]:
        assert set(lb["cpu"]["ratio"]) == {"fedlora", "fedalt", "fedlease"}
        assert all(r > 0 for clock in ("wall", "cpu") for r in lb[clock]["ratio"].values())


@pytest.mark.slow
def test_scale_benchmark_quick(tmp_path):
    data = run_quick("scale", tmp_path)
    assert data["sizes"] == [10, 100]
    for method, e in data["engine"].items():
        assert [f["clients"] for f in e["full"]] == [10, 100]
        assert all(f["clients_with_state"] == f["clients"] for f in e["full"])
        assert e["adapter_state_bytes_per_client"] > 0 and e["bytes_per_client"]["live"] != 0
        assert all(s["fit_round_s"] and min(s["fit_round_s"]) > 0 for s in e["sampled"])
    assert set(data["server"]) == {"fedit", "fedalt", "fedlease", "fedlease:clustered", "flora"}
    for s in data["server"].values():
        assert all(row["total_s"] > 0 for row in s["by_clients"].values())
        assert s["growth_order"] == s["growth_order"]  # a number, not NaN


@pytest.mark.slow
def test_gpu_speed_benchmark_dry_run_compares_the_same_training_and_counts_each_side(tmp_path):
    """speed_gpu.py on the CPU with tiny shapes: both sides train the same steps (bf16 autocast on a decoder, fp32 on
    an encoder), each row has both sides' per-turn time and per-step counts; without CUDA it measures nothing."""
    done = subprocess.run([sys.executable, "benchmarks/speed_gpu.py", "--dry-run", "--budget", "1e9",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "speed-gpu-dry-run.json").read_text())["rows"]
    assert [(r["shape"], r["precision"], r["clients"]) for r in rows] == [("tiny-qwen", "bf16", 2), ("tiny-bert", "fp32", 1)]
    bf16, fp32 = rows
    assert bf16["max_abs_train_loss_difference"] < 1e-2 and fp32["max_abs_train_loss_difference"] < 1e-5
    for r in rows:
        assert r["median_s_per_turn"]["fedlora"] > 0 and r["median_s_per_turn"]["bare"] > 0
        counts = r["per_step_counts"]
        assert counts["fedlora"]["aten_ops"] <= 1.1 * counts["bare"]["aten_ops"], counts
    assert "| tiny-qwen | bf16 | 2 |" in (tmp_path / "speed-gpu-dry-run.md").read_text()
    if not __import__("torch").cuda.is_available():
        done = subprocess.run([sys.executable, "benchmarks/speed_gpu.py", "--out", str(tmp_path / "none")], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "no CUDA device" in done.stdout and not (tmp_path / "none").exists()


@pytest.mark.slow
def test_gpu_benchmark_dry_run_and_its_no_cuda_exit(tmp_path):
    """The GPU script on the CPU with tiny shapes (one method, no time limit): every row runs, the 4-bit ones where
    bitsandbytes is installed; without --dry-run and without CUDA it measures nothing and says so."""
    import importlib.util

    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--dry-run", "--methods", "fedit", "--budget", "1e9",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_dry_run.json").read_text())
    # every bf16 row before any 4-bit one: a CUDA error in a 4-bit row (one broke the H100 run) ends the rest
    assert [(r["model"], r["quantization"]) for r in data["turns"]] == [
        ("tiny-bert", "none"), ("tiny-qwen", "none"), ("tiny-llama", "none"),
        ("tiny-bert", "4bit"), ("tiny-qwen", "4bit"), ("tiny-llama", "4bit")]
    assert [r["quantization"] for r in data["largest"]] == ["none", "4bit"]
    rows = data["turns"] + data["largest"]
    if importlib.util.find_spec("bitsandbytes") is None:
        rows = [r for r in rows if r["quantization"] == "none"]
    assert all("error" not in r and r["seconds_per_turn"] > 0 for r in rows), data
    assert "| tiny-bert | 4-bit nf4 | fedit |" in (tmp_path / "gpu_dry_run.md").read_text()
    if not __import__("torch").cuda.is_available():
        done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--out", str(tmp_path / "none")], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "no CUDA device" in done.stdout and not (tmp_path / "none").exists()


def test_the_sgd_step_check_compares_a_real_step_of_every_trained_part(monkeypatch):
    """gpu.py's CPU-vs-CUDA kernel check, run CPU against CPU: equal results, from a step with real gradients."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu import sgd_step_difference

    same = sgd_step_difference(("cpu", "cpu"))
    assert same["max_grad"] > 1e-3 and same["max_grad_diff"] == 0 and same["max_param_diff_after_step"] == 0
