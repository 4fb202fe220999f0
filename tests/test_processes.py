"""#37 item 8, #38 item 3: nothing fedlora starts outlives it. A SIGKILLed flower-sim run left Ray's
DashboardAgent and RuntimeEnvAgent running for up to a minute (they wait on a dead GCS), an actor was once seen
minutes after a normal end, and Ctrl-C did not stop a flower-sim run at all (its server thread ran on)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import psutil
import pytest

from .conftest import sigkill_when, tiny_config

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process census by psutil on Linux")

# a block that starts a child which starts a grandchild and exits, so the grandchild is reparented (to init) as
# Ray's agents are when their raylet dies; then the block ends as argv[1] says
BLOCK = textwrap.dedent("""
    import os, subprocess, sys, time
    from fedlora.flower.processes import outlived_by_nothing
    with outlived_by_nothing():
        sleeper = [sys.executable, "-c", "import time; time.sleep(300)", sys.argv[2]]  # argv[2]: this test's mark
        subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                          f"subprocess.Popen({sleeper!r}); time.sleep(1)"]).wait()
        subprocess.Popen(sleeper)
        time.sleep(1.0)  # the watchdog has seen both
        print("started", flush=True)
        sys.stdin.readline()  # the test has counted the processes
        if sys.argv[1] == "error":
            raise RuntimeError("boom")
""")


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


@linux
@pytest.mark.parametrize("ending", ["normal", "error", "killed"])
def test_every_process_started_in_the_block_ends_with_it_also_when_the_parent_is_sigkilled(ending):
    mark = f"fedlora-test-{uuid.uuid4().hex}"  # tests run in parallel: count only this one's processes
    block = subprocess.Popen([sys.executable, "-c", BLOCK, ending, mark], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    assert block.stdout.readline().strip() == "started"
    sleepers = [p for p in psutil.process_iter() if p.pid != block.pid and _cmdline(p).endswith(mark)]
    assert len(sleepers) == 2
    if ending == "killed":
        block.send_signal(signal.SIGKILL)
    else:
        block.stdin.write("go\n")
        block.stdin.flush()
    block.wait(timeout=30)
    assert block.returncode == {"normal": 0, "error": 1, "killed": -signal.SIGKILL}[ending]
    deadline = time.monotonic() + 15
    while _alive(sleepers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _alive(sleepers)
    for proc in left:
        proc.kill()
    assert not left, f"{ending}: {len(left)} process(es) outlived the block"


def test_ctrl_c_ends_the_command_even_while_a_non_daemon_thread_runs():
    code = textwrap.dedent("""
        import sys, threading, time
        from fedlora import cli
        threading.Thread(target=time.sleep, args=(300,)).start()  # as a Flower simulation's server thread
        def interrupted(args):
            raise KeyboardInterrupt
        parser = cli.build_parser()
        cli.build_parser = lambda: parser
        for action in parser._subparsers._group_actions[0].choices.values():
            action.set_defaults(func=interrupted)
        cli.main(["methods"])
    """)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and time.monotonic() - start < 60
    assert done.stderr.strip().splitlines()[-1].startswith("fedlora: interrupted")
    assert "Traceback" not in done.stderr


@pytest.mark.slow
@linux
def test_a_sigkilled_flower_simulation_leaves_no_ray_process(tmp_path):
    config = tmp_path / "exp.json"
    config.write_text(json.dumps(tiny_config(tmp_path, federation={"rounds": 30}, data={"clients_per_task": 1},
                                             engine={"name": "flower-sim", "progress": False})))
    cli = subprocess.Popen([sys.executable, "-m", "fedlora.cli", "run", str(config)], cwd=tmp_path,
                           env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
                           stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr.txt", "w"))
    seen = sigkill_when(cli, lambda seen: (tmp_path / "run" / "metrics.jsonl").is_file() and any(
        "ClientAppActor" in _cmdline(p) for p in seen.values()), "trained round")
    assert any("DashboardAgent" in _cmdline(p) for p in seen.values())  # the ones that lingered before
    _, alive = psutil.wait_procs(list(seen.values()), timeout=20)
    left = _alive(alive)
    for proc in left:
        proc.kill()
    assert not left, f"left running after the SIGKILL: {[_cmdline(p) for p in left]}"


def _environ(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except psutil.Error:
        return {}


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


@pytest.mark.slow
@linux
def test_a_quiet_flower_simulation_prints_only_fedlora_lines_and_leaves_no_process(tmp_path):
    """#38 item 2: ~29 lines of Flower and Ray deprecation and shutdown notices; now they are in run.log."""
    config = tmp_path / "exp.json"
    config.write_text(json.dumps(tiny_config(tmp_path, federation={"rounds": 1}, data={"clients_per_task": 1},
                                             engine={"name": "flower-sim"})))
    mark = uuid.uuid4().hex  # tests run in parallel: count only the processes that inherit this run's environment
    env = {k: v for k, v in os.environ.items() if k != "FEDLORA_VERBOSE"}
    done = subprocess.run([sys.executable, "-m", "fedlora.cli", "run", str(config), "--quiet"], cwd=tmp_path,
                          env={**env, "FEDLORA_TEST_MARK": mark},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line for line in done.stderr.splitlines() if not line.startswith("fedlora: ")] == []
    out = done.stdout.splitlines()
    assert len(out) <= 12 and out[-1].startswith("run directory:"), out  # the results table and where it is
    log = (tmp_path / "run" / "run.log").read_text()
    assert "[flwr]" in log and "DEPRECATED" in log  # what the console no longer shows is kept
    time.sleep(2)
    left = [p for p in psutil.process_iter() if _environ(p).get("FEDLORA_TEST_MARK") == mark]
    assert not _alive(left), [_cmdline(p) for p in left]
