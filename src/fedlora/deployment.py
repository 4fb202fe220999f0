"""Taking an experiment onto a Flower deployment: the app directory, TLS certificates and SuperNode keys,
and a local federation (a SuperLink and SuperNodes as separate processes on this machine) for trying a
deployment on one laptop and for the tests. docs/deployment.md walks through the same steps by hand."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
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

from .core.config import Config
from .core.errors import ConfigError, FedloraError
from .core.offline import OFFLINE_ENV

if TYPE_CHECKING:  # the engines import torch; a machine that only writes credentials or an app needs neither
    from .engines.checkpoint import Checkpoint
    from .engines.results import RunResult

APP_PYPROJECT = """\
# A fedlora experiment as a Flower app: `flwr run {app_dir} <superlink connection> --stream`.
# The ServerApp and ClientApp come from the installed fedlora package; the experiment travels inside the
# app bundle (the `experiment` TOML below), so no machine needs a copy of the config file.
# Submit with other settings: flwr run ... -c 'set.engine.num_clients=3 set.output_dir="/srv/runs/x"'

[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "fedlora experiment {experiment_name!r} ({method}) as a Flower app"
license = "Apache-2.0"
dependencies = ["fedlora"]

[tool.flwr.app]
publisher = "fedlora"

[tool.flwr.app.components]
serverapp = "fedlora.engines.flower:server_app"
clientapp = "fedlora.engines.flower:client_app"

[tool.flwr.app.config]
experiment = '''
{experiment}'''

# Settings of this submission; they win over the experiment's (`flwr run` only overrides keys listed here).
[tool.flwr.app.config.set]
"engine.num_clients" = {num_clients}  # SuperNodes to wait for before round 1
output_dir = "{output_dir}"  # on the SuperLink's machine
"""


def write_app(app_dir: str | Path, cfg: Config) -> Path:
    """Write a Flower app directory (its pyproject.toml) that runs `cfg` on a SuperLink.

    It waits for `engine.num_clients` SuperNodes, by default one per client of the config's split."""
    import tomli_w

    from .algorithms import check_algorithm
    from .data.federated import build_clients

    check_algorithm(cfg.algorithm)  # here, not first on the SuperLink
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    experiment = tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True))
    if "'''" in experiment:
        raise FedloraError("the config holds a triple single quote, which a TOML literal block cannot carry")
    name = re.sub(r"[^a-z0-9-]+", "-", f"fedlora-{cfg.name}".lower()).strip("-")
    num_clients = cfg.engine.num_clients or len(build_clients(cfg.data, cfg.seed))
    text = APP_PYPROJECT.format(app_dir=app_dir, name=name, experiment_name=cfg.name, method=cfg.algorithm.name,
                                experiment=experiment, num_clients=num_clients,
                                output_dir=json.dumps(str(cfg.run_dir))[1:-1])
    (app_dir / "pyproject.toml").write_text(text)
    return app_dir


# -- credentials ------------------------------------------------------------------------------------------
@dataclass
class Credentials:
    """Paths of a deployment's TLS certificates and SuperNode authentication keys."""

    root: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    supernode_keys: dict[str, Path]  # name -> private key (OpenSSH); the public key is the same path + ".pub"

    def public_key(self, name: str) -> Path:
        """The OpenSSH public key file to register for SuperNode `name`."""
        return self.supernode_keys[name].with_name(self.supernode_keys[name].name + ".pub")


def write_credentials(out_dir: str | Path, supernodes: list[str], hosts: list[str] = ("127.0.0.1", "localhost"),
                      days: int = 365) -> Credentials:
    """A private CA, a SuperLink certificate for `hosts`, and one EC P-384 key pair per SuperNode.

    Written with `cryptography` (Flower's own dependency) rather than by calling openssl and ssh-keygen,
    so it works wherever fedlora is installed; docs/deployment.md gives the equivalent openssl commands."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    root = Path(out_dir)
    (root / "supernodes").mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def certificate(subject: str, key, issuer: x509.Name, signer, ca: bool, sans=()) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return builder.sign(signer, hashes.SHA384())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora deployment CA")])
    ca_cert = certificate("fedlora deployment CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = certificate(hosts[0], server_key, ca_name, ca_key, ca=False, sans=[_san(h) for h in hosts])

    _write(root / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(root / "ca.key", pem_key(ca_key), private=True)
    _write(root / "superlink.crt", server_cert.public_bytes(serialization.Encoding.PEM))
    _write(root / "superlink.key", pem_key(server_key), private=True)
    keys = {}
    for name in supernodes:
        key = ec.generate_private_key(ec.SECP384R1())  # Flower accepts NIST curves; P-384 as in its guide
        keys[name] = root / "supernodes" / name
        _write(keys[name], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()), private=True)
        _write(keys[name].with_name(f"{name}.pub"),
               key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return Credentials(root, root / "ca.crt", root / "superlink.crt", root / "superlink.key", keys)


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    if private:  # created 0600, never readable by others, not even for a moment
        path.unlink(missing_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


# -- a federation of local processes ----------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalFederation:
    """A SuperLink (TLS, SuperNode authentication) and SuperNodes as separate processes on 127.0.0.1.

    `with LocalFederation(workdir, {"noun_topic-0": {"client-id": "noun_topic-0"}, ...}) as fed: fed.run(app)`
    starts everything, registers each SuperNode's public key, submits the app with `flwr run`, and on exit
    stops every process it started (their children included)."""

    workdir: Path
    supernodes: dict[str, dict[str, str]]  # SuperNode name -> its node config (client-id, data files)
    connection: str = "fedlora-local"
    startup_timeout: float = 120.0
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.credentials: Credentials | None = None

    # `fedlora run ... --set engine.name=flower-local` runs these on 127.0.0.1; docs/deployment.md's many-machine
    # steps give the same SuperLink and SuperNode flags by hand, so a change here belongs there too
    def superlink_command(self) -> list[str]:
        """The `flower-superlink` command line: TLS on, only registered SuperNodes admitted."""
        c = self.credentials
        return ["flower-superlink", "--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile", str(c.server_cert),
                "--ssl-keyfile", str(c.server_key), "--enable-supernode-auth",
                "--disable-runtime-dependency-installation", "--port", str(self.port),
                "--database", str(self.workdir / "superlink.db")]

    def supernode_command(self, name: str, key: Path, node_config: dict[str, str], port: int) -> list[str]:
        """The `flower-supernode` command line of one data owner."""
        config = " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())
        return ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}", "--root-certificates",
                str(self.credentials.ca_cert), "--auth-supernode-private-key", str(key), "--node-config", config,
                "--port", str(port), "--max-retries", "3", "--max-wait-time", "30"]

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
        """Write credentials and the Flower CLI's connection, start the SuperLink, register and start SuperNodes."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.credentials = write_credentials(self.workdir / "credentials", [*self.supernodes, "unregistered"])
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.connection}"\n\n[superlink.{self.connection}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.credentials.ca_cert}"\n')
        self._spawn("superlink", self.superlink_command())
        self._wait_for_port(self.port, "superlink")
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
        out = self.flwr(*args, timeout=timeout)
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
            done = subprocess.run(["flwr", *args], env=self.env(), capture_output=True, text=True, timeout=timeout,
                                  cwd=self.workdir)
            if done.returncode == 0:
                return done.stdout
            time.sleep(1.0)
        raise FedloraError(f"`flwr {' '.join(args)}` failed (exit {done.returncode}):\n{done.stdout[-2000:]}"
                           f"{done.stderr[-2000:]}")

    def env(self) -> dict[str, str]:
        """The environment of every process: this Python's bin first, Flower home here, offline, no telemetry."""
        bin_dir = str(Path(sys.executable).parent)
        return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                "FLWR_HOME": str(self.flwr_home), **OFFLINE_ENV, "COLUMNS": "200"}

    def log(self, name: str) -> str:
        """The output so far of process `name` (superlink, supernode-<name>)."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        if shutil.which(command[0], path=self.env()["PATH"]) is None:
            raise FedloraError(f"{command[0]} not found: install Flower (pip install 'flwr[simulation]')")
        with open(self.logs / f"{name}.log", "w") as log:
            self.processes[name] = subprocess.Popen(command, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                                    cwd=self.workdir, start_new_session=True)
        return self.processes[name]

    def _wait_for_port(self, port: int, name: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise FedloraError(f"{name} exited at start-up:\n{self.log(name)[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise FedloraError(f"{name} did not open port {port} within {self.startup_timeout:.0f} s")

    def stop(self) -> None:
        """Stop every process started here and their children (Flower's SuperExec and app processes)."""
        import psutil

        procs = []
        for popen in self.processes.values():
            try:
                parent = psutil.Process(popen.pid)
                procs += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=5)
        for popen in self.processes.values():
            popen.wait(timeout=5)  # reap, so no zombie stays behind
        self.processes.clear()


def run_local_deployment(cfg: Config, run_dir: Path, resume: Checkpoint | None = None,
                         records: list[dict] | None = None, timeout: float | None = None) -> RunResult:
    """Run `cfg` on a local federation: one SuperNode process per client of its split, TLS and authentication on."""
    from .data.federated import build_clients
    from .engines.results import RunResult

    del records  # the engine signature's; there is no resumed history to carry on
    if resume is not None:
        raise ConfigError("resume needs the in-process engine: on Flower the client states live on the nodes")
    clients = [c.client_id for c in build_clients(cfg.data, cfg.seed)]
    cfg = cfg.with_overrides([f"engine.num_clients={len(clients)}", f"output_dir={Path(run_dir).resolve()}",
                              "engine.name=inprocess"])  # what the ServerApp runs is the plain round loop
    workdir = Path(run_dir) / "federation"
    app = write_app(workdir / "app", cfg)
    with LocalFederation(workdir, {cid: {"client-id": cid} for cid in clients}) as federation:
        federation.run(app, timeout=timeout)
    return RunResult.from_run_dir(Path(run_dir), cfg.algorithm.name)


__all__ = ["Credentials", "LocalFederation", "free_port", "run_local_deployment", "write_app", "write_credentials"]
