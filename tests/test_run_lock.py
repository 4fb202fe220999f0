"""#37: one run directory, one fedlora process at a time. Three `fedlora run` into one output_dir once all exited 0
and interleaved their records; now a second process is refused at once, naming the holder, and the lock of a killed
process is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fedlora.api import resume_experiment, run_experiment
from fedlora.core.errors import ConfigError
from fedlora.engines.rundir import lock_path

from .conftest import tiny_config

HOLD = "import sys, time; from fedlora.engines.rundir import hold_run_dir\nwith hold_run_dir(sys.argv[1]):\n" \
       "    print('held', flush=True); time.sleep(120)"


def _holder(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_with_the_holders_pid_and_a_killed_holders_lock_is_taken_over(tmp_path):
    from fedlora.cli import main

    cfg = tiny_config(tmp_path, federation={"rounds": 1})
    first = run_experiment(cfg)
    run_dir = first.run_dir
    records = (run_dir / "metrics.jsonl").read_text()
    holder = _holder(run_dir)
    try:
        refusal = f"in use by another fedlora process \\(pid {holder.pid}\\)"
        with pytest.raises(ConfigError, match=refusal):
            run_experiment(cfg, overwrite=True)
        with pytest.raises(ConfigError, match=refusal):
            resume_experiment(run_dir, rounds=2)
        with pytest.raises(ConfigError, match=refusal):
            from fedlora.serving import export_client
            export_client(run_dir, next(iter(first.final)), tmp_path / "export")
        assert main(["report", str(run_dir)]) != 0
        assert (run_dir / "metrics.jsonl").read_text() == records  # nothing was written or replaced
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    time.sleep(0.1)
    assert [r["round"] for r in resume_experiment(run_dir, rounds=2).rounds] == [0, 1, 2]
    assert lock_path(run_dir).parent == run_dir.parent  # beside the run: --overwrite cannot delete it while held
