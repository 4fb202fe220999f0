"""Taking an experiment onto a Flower deployment: the app directory, TLS certificates and SuperNode keys,
the Fleet gateway that is a SuperLink's only public face, and a local federation (a SuperLink, its gateway
and SuperNodes as separate processes on this machine) for trying a deployment on one laptop and for the
tests. docs/deployment.md walks through the same steps by hand."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .core.config import Config, build_config
from .core.errors import ConfigError, FedloraError
from .core.names import safe_name
from .core.offline import OFFLINE_ENV

if TYPE_CHECKING:  # the engines import torch; a machine that only writes credentials or an app needs neither
    from .engines.checkpoint import Checkpoint
    from .engines.results import RunResult

log = logging.getLogger("fedlora")
APP_HEADER = """\
# A fedlora experiment as a Flower app: `flwr run <this directory> <superlink connection> --stream`.
# The ServerApp and ClientApp come from the installed fedlora package; the experiment travels inside the
# app bundle (tool.flwr.app.config.experiment, TOML), so no machine needs a copy of the config file.
# [tool.flwr.app.config.set] holds the settings of a submission, which win over the experiment's:
# engine.num_clients (SuperNodes to wait for before round 1) and output_dir (the run directory on the
# SuperLink's machine, new or empty: every submission must give it, the ServerApp refuses to run without).
# `flwr run` overrides only keys listed there: flwr run ... -c 'set.engine.num_clients=3 set.output_dir="/srv/x"'

"""


def write_app(app_dir: str | Path, cfg: Config, clients: list[str] | None = None, local: bool = False,
              resume: Path | None = None) -> Path:
    """Write a Flower app directory (its pyproject.toml) that runs `cfg` on a SuperLink.

    `clients` (default: the config's `engine.clients`) are the client ids the server admits, recorded as
    `engine.clients`. It waits for `engine.num_clients` SuperNodes: by default one per admitted client,
    else one per client of the config's split. `local`: the federation of `engine.name = "flower-local"`
    (its nodes keep their states under the run directory); else a deployment's nodes are on other machines.
    `resume`: the (local) run directory whose latest checkpoint the ServerApp continues from."""
    import tomli_w

    from .algorithms import check_algorithm
    from .data.federated import build_clients

    check_algorithm(cfg.algorithm)  # here, not first on the SuperLink
    admitted = admitted_clients(cfg.engine.clients if clients is None else clients)
    num_clients = cfg.engine.num_clients or (len(admitted) if admitted else len(build_clients(cfg.data, cfg.seed)))
    if admitted and num_clients > len(admitted):
        raise ConfigError(f"engine.num_clients={num_clients} SuperNodes to wait for, but only {len(admitted)} "
                          f"client ids are admitted ({', '.join(admitted)}): the run could never start")
    # what the ServerApp records as the engine that ran (its nodes.json says "flower-deployment" for any other)
    engine = {**cfg.engine.model_dump(), "name": "flower-local" if local else "inprocess"}
    if admitted is not None:
        engine["clients"] = admitted
    cfg = build_config({**cfg.model_dump(), "engine": engine})
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^a-z0-9-]+", "-", f"fedlora-{cfg.name}".lower()).strip("-")
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": name, "version": "1.0.0", "license": "Apache-2.0", "dependencies": ["fedlora"],
                    "description": f"fedlora experiment {cfg.name!r} ({cfg.algorithm.name}) as a Flower app"},
        "tool": {"flwr": {"app": {
            "publisher": "fedlora",
            "components": {"serverapp": "fedlora.engines.flower:server_app",
                           "clientapp": "fedlora.engines.warm:client_app"},
            # output_dir is the submission's, never the config's: a path of the machine that wrote the app,
            # which may hold a run already; "" (no value) makes the ServerApp ask for one
            "config": {"experiment": tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True,
                                                                  exclude={"output_dir"})),
                       "set": {"engine.num_clients": num_clients, "output_dir": ""},
                       **({"resume": str(resume.resolve())} if resume is not None else {})},
        }}},
    }
    (app_dir / "pyproject.toml").write_text(APP_HEADER + tomli_w.dumps(project, multiline_strings=True))
    return app_dir


def admitted_clients(clients: list[str] | None) -> list[str] | None:
    """`clients` checked as the client ids a server admits: safe names, none twice (None stays None)."""
    if clients is None:
        return None
    if not clients:
        raise ConfigError("the list of admitted client ids is empty: no node could join")
    _no_repeats([safe_name(c, "client id") for c in clients], "client id")
    return list(clients)


def _no_repeats(names: list[str], what: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"{what} {name!r} is given twice")
        seen.add(name)


# -- credentials ------------------------------------------------------------------------------------------
@dataclass
class Credentials:
    """Paths of a deployment's TLS certificates and SuperNode authentication keys."""

    root: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    supernode_keys: dict[str, Path]  # name -> private key (OpenSSH); the public key is the same path + ".pub"
    hosts: list[str] = field(default_factory=list)  # the names and addresses the SuperLink certificate is valid for

    def public_key(self, name: str) -> Path:
        """The OpenSSH public key file to register for SuperNode `name`."""
        return self.supernode_keys[name].with_name(self.supernode_keys[name].name + ".pub")


CA_FILES = ("ca.crt", "ca.key", "superlink.crt", "superlink.key")


def write_credentials(out_dir: str | Path, supernodes: list[str], hosts: list[str] = ("127.0.0.1", "localhost"),
                      days: int = 365, overwrite: bool = False) -> Credentials:
    """A private CA, a SuperLink certificate for `hosts` (and 127.0.0.1), and one EC P-384 key pair per SuperNode.

    Refuses to replace existing credentials unless `overwrite`. Written with `cryptography` (Flower's own
    dependency) rather than by calling openssl and ssh-keygen, so it works wherever fedlora is installed;
    docs/deployment.md gives the equivalent openssl commands."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    names = _supernode_names(supernodes)  # before anything is written: a name becomes a path below
    root = Path(out_dir)
    # the Fleet gateway reaches the SuperLink, and the operator its Control API, on 127.0.0.1
    hosts = list(dict.fromkeys([*hosts, "127.0.0.1"]))
    _clear_old_credentials(root, overwrite)
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
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())  # Flower accepts NIST curves; P-384 as in its guide
        keys[name] = root / "supernodes" / name
        _write(keys[name], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()), private=True)
        _write(keys[name].with_name(f"{name}.pub"),
               key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return Credentials(root, root / "ca.crt", root / "superlink.crt", root / "superlink.key", keys, hosts)


def _supernode_names(supernodes: list[str]) -> list[str]:
    names = [safe_name(name, "SuperNode name") for name in supernodes]
    _no_repeats(names, "SuperNode name")
    for name in names:
        if f"{name}.pub" in names:
            raise ConfigError(f"SuperNode names {name!r} and '{name}.pub' collide: {name}'s public key is "
                              f"{name}.pub; rename one")
    return names


def _clear_old_credentials(root: Path, overwrite: bool) -> None:
    """Refuse to write over a deployment's credentials unless asked; then remove its old SuperNode keys too."""
    old_keys = sorted((root / "supernodes").glob("*.pub"))
    found = [root / f for f in CA_FILES if (root / f).exists()] + old_keys
    if not found:
        return
    if not overwrite:
        raise FedloraError(f"{root} already holds credentials ({', '.join(p.name for p in found[:6])}"
                           f"{', ...' if len(found) > 6 else ''}); a new CA invalidates every certificate handed out "
                           "and new keys must be registered again. To replace them pass overwrite=True "
                           "(`fedlora deploy credentials --force`), or write to another directory")
    for public in old_keys:  # so that `deploy app --credentials` lists only the SuperNodes of this generation
        public.unlink()
        public.with_name(public.name[:-len(".pub")]).unlink(missing_ok=True)


def supernode_names(credentials_dir: str | Path) -> list[str]:
    """The SuperNode names of a credentials directory (its supernodes/<name>.pub keys), sorted."""
    keys = sorted(Path(credentials_dir, "supernodes").glob("*.pub"))
    if not keys:
        raise FedloraError(f"no SuperNode keys in {Path(credentials_dir) / 'supernodes'}: write them with "
                           "`fedlora deploy credentials`")
    return [safe_name(key.name[:-len(".pub")], "SuperNode name") for key in keys]


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


# -- the public face of a SuperLink -------------------------------------------------------------------------
# Flower 1.42's SuperLink serves its Fleet API (SuperNodes), Control API (`flwr` CLI: register node keys, start
# runs, read logs) and Runtime API (its SuperExec) on one host:port, and without account authentication
# (OpenID Connect, a Flower Enterprise feature) the Control API trusts whoever reaches it. So the SuperLink
# listens on 127.0.0.1 only and this gateway is what other machines reach: it forwards Fleet calls and refuses
# every other path, so holding ca.crt lets a party connect a SuperNode (admitted only if its key was
# registered) but not register a key, submit a run or pull a task.
FLEET_PATH = re.compile(r"/v1/fleet/[a-z]+(?:-[a-z]+)*")  # no dots, slashes or escapes: nothing resolves elsewhere
_NOT_FORWARDED = {b"host", b"connection", b"keep-alive", b"proxy-authorization", b"proxy-connection", b"te",
                  b"trailer", b"transfer-encoding", b"upgrade", b"content-length", b"content-encoding"}


class FleetGateway:
    """An ASGI app forwarding Flower's Fleet API, and nothing else, to a SuperLink (HTTPS, checked with ca.crt)."""

    def __init__(self, superlink: str, ca_cert: str | Path, timeout: float = 300.0) -> None:
        self.superlink = superlink
        self.ca_cert = Path(ca_cert)
        self.timeout = timeout
        self.client = None  # made in the server's event loop, at start-up

    async def __call__(self, scope: dict, receive, send) -> None:
        """Serve one ASGI connection: lifespan events, or one HTTP request."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._forward(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        import httpx

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                context = ssl.create_default_context(cafile=str(self.ca_cert))
                self.client = httpx.AsyncClient(verify=context, timeout=self.timeout)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: dict, receive, send) -> None:
        import httpx

        path = scope["path"]
        if (scope["method"] != "POST" or not FLEET_PATH.fullmatch(path) or scope.get("raw_path", b"") != path.encode()
                or scope.get("query_string")):
            await _reply(send, 403, b"only the Flower Fleet API is served here\n")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _NOT_FORWARDED]
        try:
            response = await self.client.post(f"https://{self.superlink}{path}", content=bytes(body), headers=headers)
        except httpx.HTTPError as exc:
            await _reply(send, 502, f"the SuperLink did not answer: {type(exc).__name__}\n".encode())
            return
        await _reply(send, response.status_code, response.content,
                     [(k, v) for k, v in response.headers.raw if k.lower() not in _NOT_FORWARDED])


async def _reply(send, status: int, body: bytes, headers: list | None = None) -> None:
    headers = headers if headers is not None else [(b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) as (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def serve_fleet_gateway(credentials: str | Path, listen: str, superlink: str) -> None:
    """Serve a FleetGateway on `listen` (HTTPS with the credentials' SuperLink certificate) until stopped."""
    import uvicorn

    root = Path(credentials)
    host, port = split_address(listen)
    split_address(superlink)  # fail here, not on the first SuperNode's call
    for name in ("ca.crt", "superlink.crt", "superlink.key"):
        if not (root / name).is_file():
            raise FedloraError(f"{root / name} not found: pass the directory `fedlora deploy credentials` wrote")
    uvicorn.run(FleetGateway(superlink, root / "ca.crt"), host=host, port=port, lifespan="on", log_level="info",
                ssl_certfile=str(root / "superlink.crt"), ssl_keyfile=str(root / "superlink.key"))


# -- a federation of local processes ----------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int | None = None) -> Callable[[], None] | None:
    """A function that has the kernel SIGKILL the process calling it when `parent` dies (Linux); None elsewhere.

    By default `parent` is this process and the function is a preexec_fn for the children started here; a
    process started by someone else (flower-local's SuperExec) calls it with the pid it was given. Flower's own
    children exit when their `--parent-pid` does, but only through a SIGINT their main thread must get to
    handle; the kernel's signal cannot be missed. It follows the thread that started the child, so start them
    from a thread that lives as long as the federation (the main one)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child
    parent = os.getpid() if parent is None else parent

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(70)  # no parent-death signal, or the parent died before it was set: never run unwatched

    return preexec


def stop_process_trees(popens: list[subprocess.Popen]) -> None:
    """Terminate processes and all their children (killed if they are still up after 10 s), then reap them."""
    import psutil

    procs = []
    for popen in popens:
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
    for popen in popens:
        popen.wait(timeout=5)  # reap, so no zombie stays behind


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
        `local_supernode.py`)."""
        config = " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())
        return [sys.executable, "-m", "fedlora.local_supernode", "--superlink", f"{self.public_host}:{self.port}",
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
        # wakes its SuperExec when a message arrives (flower_waits.py)
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
    from .data.federated import build_clients
    from .engines.results import RunResult

    del records  # resumed, the ServerApp reads them from the run directory itself (it is another process)
    run_dir = Path(run_dir)
    clients = [c.client_id for c in build_clients(cfg.data, cfg.seed)]
    # engine.name stays flower-local: the ServerApp records the engine that ran it
    cfg = cfg.with_overrides([f"engine.num_clients={len(clients)}"])
    workdir = run_dir / "federation"
    # the ServerApp refuses a directory that holds anything (run_experiment's config.json, this federation), so
    # it writes a fresh one of its own, whose results become the run's once every process has stopped
    server_dir = (workdir / "server").resolve()  # the ServerApp runs in the SuperLink's working directory
    # every SuperNode keeps its state under the run directory, where export/predict of the run find it
    nodes = (run_dir / "nodes").resolve()
    if resume is not None:
        set_aside_federation(workdir)
    from .engines.warm import WARM_KEY

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


__all__ = [
    "Credentials",
    "FleetGateway",
    "LocalFederation",
    "admitted_clients",
    "free_port",
    "run_local_deployment",
    "serve_fleet_gateway",
    "stop_process_trees",
    "split_address",
    "supernode_names",
    "write_app",
    "write_credentials",
]
