"""engine.name = "flower-local": a local federation (a SuperLink, its Fleet gateway and SuperNodes as separate
processes on this machine, TLS and SuperNode authentication on) for trying a deployment on one laptop and for
the tests. docs/deployment.md walks through the same steps by hand, on many machines.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.config import Config
from ..core.errors import FedloraError
from ..core.offline import OFFLINE_ENV
from .app import write_app
from .credentials import Credentials, write_credentials
from .processes import die_with_parent, free_port, stop_process_trees

if TYPE_CHECKING:  # the engines import torch: imported when a run starts, not with this module
    from ..engines.checkpoint import Checkpoint
    from ..engines.results import RunResult

log = logging.getLogger("fedlora")


@dataclass
class LocalFederation:
    """A SuperLink (TLS, SuperNode authentication), its Fleet gateway and SuperNodes as processes on this machine.

    `with LocalFederation(workdir, {"noun_topic-0": {"client-id": "noun_topic-0"}, ...}) as fed: fed.run(app)`
    starts everything, registers each SuperNode's public key, submits the app with `flwr run`, and on exit
    stops every process it started (their children included). The SuperLink listens on 127.0.0.1:superlink_port
    (the operator's Control API); SuperNodes reach it through the FleetGateway on public_host:port."""

    workdir: Path
    supernodes: dict[str, dict[str, str]]  # SuperNode name -> its node config (client-id, data files)
    connection: str = "fedlora-local"
    startup_timeout: float = 120.0
    port: int = field(default_factory=free_port)  # the Fleet gateway's, what SuperNodes connect to
    superlink_port: int = field(default_factory=free_port)
    public_host: str = "127.0.0.1"  # where the gateway listens (another loopback address stands in for a LAN one)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.credentials: Credentials | None = None

    def client_ids(self) -> list[str]:
        """The client ids the SuperNodes claim (their `client-id` node config), which the server should admit."""
        return [node["client-id"] for node in self.supernodes.values()]

    # `fedlora run ... --set engine.name=flower-local` runs these on this machine; docs/deployment.md's
    # many-machine steps give the same SuperLink, gateway and SuperNode flags by hand, so a change here belongs
    # there too
    def superlink_command(self) -> list[str]:
        """The `flower-superlink` command line: TLS on, only registered SuperNodes admitted, on 127.0.0.1 only."""
        c = self.credentials
        return ["flower-superlink", "--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile", str(c.server_cert),
                "--ssl-keyfile", str(c.server_key), "--enable-supernode-auth",
                "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(self.superlink_port)]

    def gateway_command(self) -> list[str]:
        """The `fedlora deploy fleet-gateway` command line: the SuperLink's Fleet API on public_host:port."""
        return [sys.executable, "-m", "fedlora.cli", "deploy", "fleet-gateway", str(self.credentials.root),
                "--listen", f"{self.public_host}:{self.port}", "--superlink", f"127.0.0.1:{self.superlink_port}"]

    def supernode_command(self, name: str, key: Path, node_config: dict[str, str], port: int) -> list[str]:
        """The `flower-supernode` command line of one data owner (Flower's SuperNode with shorter polling sleeps,
        `supernode.py`)."""
        config = " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())
        return [sys.executable, "-m", "fedlora.flower.supernode", "--superlink", f"{self.public_host}:{self.port}",
                "--root-certificates", str(self.credentials.ca_cert), "--auth-supernode-private-key", str(key),
                "--node-config", config, "--port", str(port), "--max-retries", "3", "--max-wait-time", "30"]

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Write credentials and the Flower CLI's connection, start the SuperLink and its gateway, register and
        start SuperNodes."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.credentials = write_credentials(self.workdir / "credentials", [*self.supernodes, "unregistered"],
                                             hosts=["127.0.0.1", "localhost", self.public_host], overwrite=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.connection}"\n\n[superlink.{self.connection}]\n'
            f'address = "127.0.0.1:{self.superlink_port}"\nroot-certificates = "{self.credentials.ca_cert}"\n')
        self._spawn("superlink", self.superlink_command())
        self._spawn("fleet-gateway", self.gateway_command())
        self._wait_for_port("127.0.0.1", self.superlink_port, "superlink")
        self._wait_for_port(self.public_host, self.port, "fleet-gateway")
        for name in self.supernodes:
            self.flwr("supernode", "register", str(self.credentials.public_key(name)), self.connection,
                      retries=10)
        for name, node_config in self.supernodes.items():
            self.start_supernode(name, node_config)

    def start_supernode(self, name: str, node_config: dict[str, str], key_name: str | None = None) -> subprocess.Popen:
        """Start one SuperNode with the private key of `key_name` (default: its own)."""
        key = self.credentials.supernode_keys[key_name or name]
        return self._spawn(f"supernode-{name}", self.supernode_command(name, key, node_config, free_port()))

    def run(self, app_dir: str | Path, overrides: dict[str, object] | None = None, timeout: float | None = None) -> str:
        """Submit the app with `flwr run`, wait until the run finishes, and return its run id."""
        args = ["run", str(app_dir), self.connection, "--stream"]
        for key, value in (overrides or {}).items():
            args += ["-c", f"{key}={json.dumps(value)}"]
        try:
            out = self.flwr(*args, timeout=timeout)
        except FedloraError as exc:  # what it streamed is kept either way
            (self.logs / "flwr-run.log").write_text(str(exc))
            raise
        (self.logs / "flwr-run.log").write_text(out)  # the ServerApp's progress and results table, as streamed
        match = re.search(r"Successfully started run (\d+)", out)
        if not match:
            raise FedloraError(f"`flwr run` did not start a run:\n{out[-3000:]}")
        run_id = match.group(1)
        status = json.loads(self.flwr("ls", self.connection, "--run-id", run_id, "--format", "json"))
        state = status["runs"][0]["status"]
        if state != "finished:completed":
            raise FedloraError(f"run {run_id} ended as {state!r}; its log ends with:\n{out[-3000:]}\n"
                               f"(all logs: {self.logs}, `flwr log {run_id}`)")
        return run_id

    def flwr(self, *args: str, timeout: float | None = 120.0, retries: int = 1) -> str:
        """Run the Flower CLI against this federation and return its output (raises with the output on failure)."""
        for attempt in range(retries):
            # `flwr run --stream` must not outlive us either
            done = subprocess.run(["flwr", *args], check=False, env=self.env(), capture_output=True, text=True,
                                  timeout=timeout, cwd=self.workdir, preexec_fn=die_with_parent())
            if done.returncode == 0:
                return done.stdout
            time.sleep(1.0)
        raise FedloraError(f"`flwr {' '.join(args)}` failed (exit {done.returncode}):\n{done.stdout[-2000:]}"
                           f"{done.stderr[-2000:]}")

    def env(self) -> dict[str, str]:
        """The environment of every process: this Python's bin first, Flower home here, offline, no telemetry."""
        bin_dir = str(Path(sys.executable).parent)
        # a message's objects (one request each) go 2 at a time by default: 8, on one machine (1.5x against 1.8x a
        # round, benchmarks/engines.py). SuperExecs look for tasks every second, as Flower's do: a SuperNode here
        # wakes its SuperExec when a message arrives (patches.py)
        return {"FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES": "8",
                "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS": "8", **os.environ,
                "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                "FLWR_HOME": str(self.flwr_home), **OFFLINE_ENV, "COLUMNS": "200"}

    def log(self, name: str) -> str:
        """The output so far of process `name` (superlink, supernode-<name>)."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        if shutil.which(command[0], path=self.env()["PATH"]) is None:
            raise FedloraError(f"{command[0]} not found: install Flower (pip install 'flwr[simulation]')")
        # a session of its own: a Ctrl-C at the terminal reaches only us, and stop() takes the processes down
        # in order; dying with us (even by SIGKILL, which runs no clean-up here) is the kernel's job
        with open(self.logs / f"{name}.log", "w") as out:
            self.processes[name] = subprocess.Popen(command, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                                    cwd=self.workdir, start_new_session=True,
                                                    # it only calls prctl and getppid between fork and exec
                                                    preexec_fn=die_with_parent())  # noqa: PLW1509
        return self.processes[name]

    def _wait_for_port(self, host: str, port: int, name: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise FedloraError(f"{name} exited at start-up:\n{self.log(name)[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex((host, port)) == 0:
                    return
            time.sleep(0.2)
        raise FedloraError(f"{name} did not open {host}:{port} within {self.startup_timeout:.0f} s")

    def stop(self) -> None:
        """Stop every process started here and their children (Flower's SuperExec and app processes)."""
        stop_process_trees(list(self.processes.values()))
        self.processes.clear()


def run_local_deployment(cfg: Config, run_dir: Path, resume: Checkpoint | None = None,
                         records: list[dict] | None = None, timeout: float | None = None) -> RunResult:
    """Run `cfg` on a local federation: one SuperNode process per client of its split, TLS and authentication on."""
    from ..core.io import save_text
    from ..data.federated import build_clients
    from ..engines.results import RunResult
    from ..engines.rundir import split_text

    del records  # resumed, the ServerApp reads them from the run directory itself (it is another process)
    # every Flower process runs in a directory of its own: paths relative to this command's would break there
    run_dir = Path(run_dir).resolve()
    cfg = cfg.with_absolute_paths().model_copy(update={"output_dir": str(run_dir)})
    split = build_clients(cfg.data, cfg.seed)
    save_text(run_dir / "clients.json", split_text(split))  # the split, as every engine writes it
    clients = [c.client_id for c in split]
    # engine.name stays flower-local: the ServerApp records the engine that ran it
    cfg = cfg.with_overrides([f"engine.num_clients={len(clients)}"])
    workdir = run_dir / "federation"
    # the ServerApp refuses a directory that holds anything (run_experiment's config.json, this federation), so
    # it writes a fresh one of its own, whose results become the run's once every process has stopped
    server_dir = (workdir / "server").resolve()  # the ServerApp runs in the SuperLink's working directory
    # every SuperNode keeps its state under the run directory, where export/predict of the run find it
    nodes = (run_dir / "nodes").resolve()
    set_aside_federation(workdir)  # resumed, or started over after a kill: the ServerApp needs a directory of its own
    from .warm import WARM_KEY

    warm = {} if cfg.engine.warm_clients else {WARM_KEY: "false"}
    federation = LocalFederation(workdir, {cid: {"client-id": cid, "state-dir": str(nodes), **warm}
                                           for cid in clients})
    app = write_app(workdir / "app", cfg, clients=federation.client_ids(), local=True,
                    resume=run_dir if resume is not None else None)
    try:
        with federation:
            federation.run(app, {"set.output_dir": str(server_dir)}, timeout=timeout)
    finally:  # what a failed run got to write is the run's too
        adopt_server_results(server_dir, run_dir)
    return RunResult.from_run_dir(run_dir, cfg.algorithm.name)


# what the round loop and its trackers write (nodes.json: the engine and where the nodes keep their states); the
# ServerApp's config.json (its own output_dir), run.log and report stay in federation/server: run_experiment's
# config.json says what ran
SERVER_RESULTS = ("metrics.jsonl", "clients.json", "checkpoint", "nodes.json", "tensorboard", "wandb", "mlruns",
                  "tracking.json")


def set_aside_federation(workdir: Path) -> None:
    """Before a resumed local run: keep the stopped ServerApp's directory as server-<n>/ (the new one must be
    new) and drop the SuperLink's database (a fresh SuperLink registers the SuperNodes' new keys)."""
    server = workdir / "server"
    if server.exists():
        n = 1
        while (workdir / f"server-{n}").exists():
            n += 1
        os.replace(server, workdir / f"server-{n}")
    for path in workdir.glob("superlink.db*"):
        path.unlink()


def adopt_stopped_server(run_dir: Path) -> None:
    """Before `--resume` of a flower-local run: a ServerApp killed with its run (SIGKILL: no `finally` moved its
    results up) left them in federation/server/; they replace the run directory's when their checkpoint is newer."""
    import json

    server_dir = run_dir / "federation" / "server"
    latest = server_dir / "checkpoint" / "latest.json"
    if not latest.is_file():
        return
    def round_of(path: Path) -> int:
        try:
            return int(json.loads(path.read_text()).get("round", -1))
        except (OSError, ValueError, AttributeError, TypeError):
            return -1
    if round_of(latest) > round_of(run_dir / "checkpoint" / "latest.json"):
        log.warning("%s holds the stopped ServerApp's checkpoint of round %d: it becomes the run's", server_dir,
                    round_of(latest))
        adopt_server_results(server_dir, run_dir)


def adopt_server_results(server_dir: Path, run_dir: Path) -> None:
    """Move a local ServerApp's results from its own run directory to the top of `run_dir` (a resumed run's
    replace the stopped run's: they hold its records and a newer checkpoint)."""
    for name in SERVER_RESULTS:
        if (server_dir / name).exists():
            old = run_dir / f".{name}.replaced"
            if (run_dir / name).is_dir():  # os.replace cannot replace a directory that holds anything
                shutil.rmtree(old, ignore_errors=True)
                os.replace(run_dir / name, old)
            os.replace(server_dir / name, run_dir / name)
            shutil.rmtree(old, ignore_errors=True)
    if (server_dir / "run.log").is_file():
        log.info("the ServerApp's log: %s", server_dir / "run.log")


__all__ = ["SERVER_RESULTS", "LocalFederation", "adopt_server_results", "run_local_deployment", "set_aside_federation"]
