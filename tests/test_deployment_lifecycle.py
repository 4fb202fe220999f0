"""Issue #23 item 5: a deployment never damages a run and never outlives its command. The ServerApp writes only
into a new or empty run directory that the submission names (never one baked into the app), and reports it at the
end; a SIGKILLed `fedlora run` under flower-local takes every Flower process with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib

import psutil
import pytest
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from fedlora.core.config import build_config
from fedlora.core.errors import ConfigError
from fedlora.flower.app import write_app
from fedlora.flower.client_app import make_client_app
from fedlora.flower.server_app import config_from_run_config, server_main

from .conftest import flower_program, sigkill_when, tiny_config


def _run_config(app_dir) -> dict:
    """The run config Flower builds from an app's pyproject (flattened [tool.flwr.app.config])."""
    project = tomllib.loads((app_dir / "pyproject.toml").read_text())
    return flatten_dict(project["tool"]["flwr"]["app"]["config"])


def _snapshot(root) -> dict[str, tuple[bytes, int]]:
    """Every file under `root` with its bytes and mtime, and every directory."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else (b"", 0)
            for p in sorted(root.rglob("*"))}


def _fake_run(run_dir) -> None:
    """A finished run as the CLI leaves it: config, metrics, a checkpoint."""
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"name": "earlier"}))
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n')
    (run_dir / "checkpoint" / "latest.json").write_text('{"round": 1, "dir": "round-00001"}')


def test_the_app_carries_no_output_dir_and_a_submission_gives_it(tmp_path):
    cfg = build_config(tiny_config(tmp_path, output_dir=str(tmp_path / "where-the-app-was-written")))
    app = write_app(tmp_path / "app", cfg)
    assert "where-the-app-was-written" not in (app / "pyproject.toml").read_text()
    run_config = _run_config(app)
    assert config_from_run_config(run_config).output_dir is None
    submitted = fuse_dicts(run_config, parse_config_args(["set.output_dir='/srv/fedlora/runs/a'"]))
    assert config_from_run_config(submitted).output_dir == "/srv/fedlora/runs/a"


def test_a_submission_without_output_dir_is_refused_with_the_command_to_give_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a default runs/<name> would land
    cfg = config_from_run_config(_run_config(write_app(tmp_path / "app", build_config(tiny_config(tmp_path)))))
    with pytest.raises(ConfigError, match=r"no output_dir: .*flwr run .* -c 'set\.output_dir="):
        server_main(cfg, grid=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app"]  # nothing written anywhere


@pytest.mark.parametrize("existing", ["a finished run", "a stranger's files"])
def test_a_server_app_refuses_an_existing_run_directory_and_leaves_it_untouched(tmp_path, existing):
    run_dir = tmp_path / "run"
    if existing == "a finished run":
        _fake_run(run_dir)
    else:
        run_dir.mkdir()
        (run_dir / "notes.txt").write_text("mine")
    before = _snapshot(run_dir)
    cfg = build_config(tiny_config(tmp_path, output_dir=str(run_dir)))
    what = "holds a fedlora run" if existing == "a finished run" else "is not empty"
    with pytest.raises(ConfigError, match=f"{what}; the ServerApp writes only into a new or empty directory"):
        server_main(cfg, grid=None)  # refused before the grid is used
    assert _snapshot(run_dir) == before


def test_a_deployment_server_app_writes_its_report_at_the_end(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import (
        TaskIdentity,  # what Flower's runtime sets for a ServerApp
    )

    from .test_flower import FakeGrid

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)
    cfg = build_config(tiny_config(tmp_path, federation={"rounds": 1, "eval_at_start": False},
                                   engine={"name": "flower-sim", "num_clients": 4, "progress": False}))
    server_main(cfg, FakeGrid(make_client_app(cfg), 4))
    assert (cfg.run_dir / "metrics.jsonl").is_file()
    assert "fedlora report" in (cfg.run_dir / "report" / "report.md").read_text()


# -- a SIGKILL of `fedlora run` under flower-local --------------------------------------------------------------
def _names(procs: dict[int, psutil.Process]) -> str:
    out = []
    for proc in procs.values():
        try:
            out.append(f"{proc.pid} (parent {proc.ppid()}): {' '.join(proc.cmdline())[:300]}")
        except psutil.Error:
            out.append(str(proc.pid))
    return "; ".join(out)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_local_deployment_takes_every_flower_process_with_it(tmp_path):
    config = tmp_path / "exp.json"
    config.write_text(json.dumps(tiny_config(tmp_path, federation={"rounds": 20}, data={"clients_per_task": 1},
                                             engine={"name": "flower-local", "progress": False})))
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    cli = subprocess.Popen([sys.executable, "-m", "fedlora.cli", "run", str(config)], env=env, cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # until the ServerApp and a ClientApp run: every kind of process the issue found left behind exists
    seen = sigkill_when(cli, lambda seen: {"flwr-serverapp", "flwr-clientapp"} <= {flower_program(p) for p in seen.values()},
                        "ServerApp and ClientApp")
    _, alive = psutil.wait_procs(list(seen.values()), timeout=30)
    try:
        assert not alive, f"left running after the SIGKILL: {_names({p.pid: p for p in alive})}"
    finally:
        for proc in alive:  # never leave them to the next test
            proc.kill()
    assert len(seen) >= 7  # SuperLink, gateway, 2 SuperNodes, their SuperExecs, the ServerApp, a ClientApp


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FEDLORA_DEPLOYMENT_TESTS"),
                    reason="set FEDLORA_DEPLOYMENT_TESTS=1 (3 minutes of real Flower processes)")
def test_a_sigkilled_local_deployment_resumes_from_its_last_round_and_equals_the_in_process_run(tmp_path):
    """#37: `--resume` of a SIGKILLed flower-local run was refused ("nothing is lost"), and `fedlora run` again
    wiped federation/server/ and nodes/. Now `run` refuses, and `--resume` continues from the ServerApp's last
    checkpoint to the in-process run's numbers."""
    from fedlora.api import resume_experiment, run_experiment

    rounds = 4
    sections = dict(federation={"rounds": rounds}, data={"clients_per_task": 1})
    config = tmp_path / "exp.json"
    config.write_text(json.dumps(tiny_config(tmp_path, **sections, engine={"name": "flower-local", "progress": False})))
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    cli = subprocess.Popen([sys.executable, "-m", "fedlora.cli", "run", str(config)], env=env, cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "run" / "federation" / "server" / "checkpoint" / "latest.json"
    deadline = time.monotonic() + 300
    try:
        while not (latest.is_file() and json.loads(latest.read_text())["round"] >= 1):
            assert cli.poll() is None and time.monotonic() < deadline, "no round-1 checkpoint before the run ended"
            time.sleep(0.1)
    finally:
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=30)
    killed_at = json.loads(latest.read_text())["round"]
    assert killed_at < rounds
    with pytest.raises(ConfigError, match="already holds a run"):  # never wiped by a plain `run`
        run_experiment(json.loads(config.read_text()))
    resumed = resume_experiment(tmp_path / "run")
    reference = run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "inproc"), **sections))
    assert [r["round"] for r in resumed.rounds] == list(range(rounds + 1))
    for a, b in zip(reference.rounds, resumed.rounds):
        for cid, metrics in a["eval"].items():
            assert b["eval"][cid] == pytest.approx(metrics, rel=1e-5, abs=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FEDLORA_DEPLOYMENT_TESTS"),
                    reason="set FEDLORA_DEPLOYMENT_TESTS=1 (minutes: the demo on real Flower processes)")
def test_the_documented_flower_local_command_runs_literally_from_any_directory(tmp_path):
    """#38: docs/deployment.md's own example (a relative output_dir) made the SuperLink exit at start-up."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    command = re.search(r"^fedlora run demo --set engine.name=flower-local .*$", doc, re.M).group(0)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-m", "fedlora.cli", *command.split()[1:], "--quiet"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "demo-deployed" / "metrics.jsonl").is_file()
