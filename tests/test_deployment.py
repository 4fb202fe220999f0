"""The Flower Deployment Engine path: the app directory, credentials, data owners with their own files, and
(slow) a SuperLink and SuperNodes as separate processes on 127.0.0.1 with TLS and SuperNode authentication."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest
import tomli_w
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from cryptography.x509 import (
    IPAddress,
    SubjectAlternativeName,
    load_pem_x509_certificate,
)
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from fedlora.core.config import build_config
from fedlora.core.errors import ConfigError, FedloraError
from fedlora.core.offline import OFFLINE_ENV
from fedlora.data.federated import build_clients
from fedlora.engines.results import RunResult, read_records
from fedlora.flower.app import write_app
from fedlora.flower.client_app import _client_id, _session
from fedlora.flower.credentials import write_credentials
from fedlora.flower.local import LocalFederation, adopt_server_results
from fedlora.flower.processes import die_with_parent, free_port, stop_process_trees
from fedlora.flower.server_app import config_from_run_config
from fedlora.serving import predict

from .conftest import tiny_config


def _app_run_config(app_dir) -> dict:
    """The run config Flower builds from an app's pyproject (flattened [tool.flwr.app.config])."""
    project = tomllib.loads((app_dir / "pyproject.toml").read_text())
    return flatten_dict(project["tool"]["flwr"]["app"]["config"])


def test_app_carries_the_experiment_and_takes_overrides(tmp_path):
    cfg = build_config(tiny_config(tmp_path, algorithm={"name": "fedlease", "options": {"warmup_rounds": 1}},
                                   data={"tasks": ["noun_topic"]}))
    app = write_app(tmp_path / "app", cfg)
    project = tomllib.loads((app / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["components"] == {"serverapp": "fedlora.flower.server_app:server_app",
                                                            "clientapp": "fedlora.flower.warm:client_app"}
    run_config = _app_run_config(app)
    # 2 clients in the split; the run directory is the submission's, never the config's (see test_deployment_lifecycle)
    # an app for other machines draws DP noise from the OS unless the config chose (privacy.secure_noise)
    expected = cfg.with_overrides(["engine.num_clients=2", "output_dir=null", "privacy.secure_noise=true"])
    assert config_from_run_config(run_config) == expected  # lists (tasks, target modules) survive, unlike flat keys
    # what `flwr run -c` does with submission-time settings: only keys the app lists may be overridden
    submitted = fuse_dicts(run_config, parse_config_args(["set.engine.num_clients=5 set.output_dir='/srv/x'"]))
    assert config_from_run_config(submitted) == cfg.with_overrides(["engine.num_clients=5", "output_dir=/srv/x",
                                                                    "privacy.secure_noise=true"])
    with pytest.raises(ValueError, match="not present"):
        fuse_dicts(run_config, parse_config_args(["set.training.lr=0.1"]))


def test_run_config_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="fedlora deploy app"):
        config_from_run_config({"set.federation.rounds": 2})
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_from_run_config({"experiment": "[model\nname="})


def test_credentials_chain_and_node_keys(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    creds = write_credentials(tmp_path, ["owner-a", "owner-b"], hosts=["127.0.0.1", "superlink.example.org"])
    ca = load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    sans = server.extensions.get_extension_for_class(SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(type(sans[1])) == ["superlink.example.org"]
    for name in ("owner-a", "owner-b"):
        load_ssh_private_key(creds.supernode_keys[name].read_bytes(), password=None)  # what flower-supernode reads
        assert try_load_public_key(creds.public_key(name))  # what `flwr supernode register` accepts
        assert creds.supernode_keys[name].stat().st_mode & 0o077 == 0  # private keys readable by the owner only
    assert creds.public_key("owner-a").read_bytes() != creds.public_key("owner-b").read_bytes()


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_data_owner_trains_on_its_own_files(tmp_path):
    cfg = build_config(tiny_config(tmp_path))
    split = build_clients(cfg.data, cfg.seed)[0]
    node_config = {"client-id": "hospital-7", "task": split.task,
                   "train-file": str(_write_jsonl(tmp_path / "train.jsonl", split.train[:20])),
                   "test-file": str(_write_jsonl(tmp_path / "test.jsonl", split.test[:10]))}
    session = _session(cfg, node_config)
    assert [(i.client_id, i.num_examples, i.task) for i in session.infos] == [("hospital-7", 20, split.task)]
    assert session.clients[0].labels == sorted({r["label"] for r in split.train[:20] + split.test[:10]})
    with pytest.raises(ConfigError, match="client-id"):
        _session(cfg, {k: v for k, v in node_config.items() if k != "client-id"})


def test_an_unknown_client_id_is_refused(tmp_path):
    cfg = build_config(tiny_config(tmp_path))

    class Ctx:
        node_config = {"client-id": "nobody"}

    with pytest.raises(ConfigError, match="not a client of this experiment"):
        _client_id(Ctx(), _session(cfg, {}))


def _no_process_mentions(path) -> bool:
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(path) in part for part in proc.info["cmdline"] or []):
            return False
    return True


# -- docs/deployment.md's "Many machines" steps, command by command ---------------------------------------------
def _owner_files(tmp_path, cfg) -> dict[str, tuple]:
    """Two data owners' own JSONL files: the records of the split's two clients, kept to the labels both hold (so
    each owner's own head has the classes the in-process run gives it)."""
    split = build_clients(cfg.data, cfg.seed)
    common = set.intersection(*({r["label"] for r in c.train + c.test} for c in split))
    owners = {}
    for name, client in zip(("hospital-a", "hospital-b"), split):
        home = tmp_path / name  # the data owner's machine
        home.mkdir()
        keep = lambda records: [{"text": r["text"], "label": r["label"]} for r in records if r["label"] in common]
        owners[name] = (_write_jsonl(home / "train.jsonl", keep(client.train)),
                        _write_jsonl(home / "test.jsonl", keep(client.test)))
    return owners


def _in_process(cfg, owners: dict[str, tuple], run_dir):
    """The same owners' files run by the in-process engine (the reference of the deployment)."""
    from fedlora.data.federated import local_client
    from fedlora.engines.inprocess import InProcessTransport
    from fedlora.engines.loop import federate
    from fedlora.engines.session import build_session

    s = build_session(cfg, [local_client(name, "triage", *files) for name, files in owners.items()])
    run_dir.mkdir()
    with s.runtime:
        return federate(cfg, s.server, InProcessTransport(s.runtime, s.infos), s.infos, run_dir)


class _Machines:
    """The processes of the documented commands, each started on its "machine" (working directory) as a data owner
    or the operator would start it; `stop` ends them and their children (SuperExec, ServerApp, ClientApps)."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.processes: dict[str, subprocess.Popen] = {}
        bin_dir = str(Path(sys.executable).parent)  # fedlora, flwr, flower-superlink, flower-supernode
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **OFFLINE_ENV,
                    "FLWR_HOME": str(tmp_path / "server" / "flwr-home"), "COLUMNS": "200"}

    def run(self, cwd, *command: str, timeout: float = 120, retries: int = 1) -> str:
        for _ in range(retries):
            done = subprocess.run(command, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout,
                                  check=False, preexec_fn=die_with_parent())
            if done.returncode == 0:
                return done.stdout
            time.sleep(1.0)
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")

    def start(self, name: str, cwd, *command: str) -> None:
        with open(self.logs / f"{name}.log", "w") as out:
            self.processes[name] = subprocess.Popen(command, cwd=cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                    start_new_session=True,
                                                    preexec_fn=die_with_parent())  # noqa: PLW1509

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_for_port(self, name: str, port: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.processes[name].poll() is None, self.log(name)[-3000:]
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise AssertionError(f"{name} did not open port {port}")

    def stop(self) -> None:
        stop_process_trees(list(self.processes.values()))


@pytest.mark.slow
def test_the_documented_deployment_path_equals_in_process(tmp_path):
    """docs/deployment.md's "Many machines" steps as written, each command a process of its own, on this host: TLS
    and SuperNode authentication on, the SuperLink on 127.0.0.1 behind the Fleet gateway, the certificate's
    --host name (localhost) as the SuperNodes' address, two data owners with their own files. The run completes,
    gets its report/, `flwr run --stream` shows the rounds and the results table, and every owner's metrics are
    the in-process engine's on the same files."""
    # 2 SuperNodes and no evaluation before training: every ClientApp message is a fresh process here
    cfg = build_config(tiny_config(tmp_path, data={"tasks": ["noun_topic"], "clients_per_task": 2},
                                   federation={"rounds": 2, "eval_at_start": False}))
    owners = _owner_files(tmp_path, cfg)
    fedalt = cfg.with_overrides(["algorithm.name=fedalt"])
    inproc = _in_process(fedalt, owners, tmp_path / "inproc")
    server = tmp_path / "server"  # the SuperLink's machine
    server.mkdir()
    (server / "experiment.toml").write_text(tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    run_dir = tmp_path / "runs" / "nlu-fedalt"
    m = _Machines(tmp_path)
    link, gateway = free_port(), free_port()
    try:
        # 1. credentials
        m.run(server, "fedlora", "deploy", "credentials", "creds", "--host", "localhost",
              *(arg for name in owners for arg in ("--supernode", name)))
        # 2. the SuperLink on 127.0.0.1 only, its Fleet gateway where the other machines reach it
        m.start("superlink", server, "flower-superlink", "--ssl-ca-certfile", "creds/ca.crt", "--ssl-certfile",
                "creds/superlink.crt", "--ssl-keyfile", "creds/superlink.key", "--enable-supernode-auth",
                "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(link),
                "--database", "superlink.db")
        m.start("fleet-gateway", server, "fedlora", "deploy", "fleet-gateway", "creds", "--listen",
                f"127.0.0.1:{gateway}", "--superlink", f"127.0.0.1:{link}")
        m.wait_for_port("superlink", link)
        m.wait_for_port("fleet-gateway", gateway)
        # 3. the operator's Flower CLI connection
        (server / "flwr-home").mkdir(exist_ok=True)
        (server / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "fedlora"\n\n[superlink.fedlora]\naddress = "127.0.0.1:{link}"\n'
            f'root-certificates = "{server / "creds" / "ca.crt"}"\n')
        # 4. register each SuperNode's public key
        for name in owners:
            m.run(server, "flwr", "supernode", "register", f"creds/supernodes/{name}.pub", "fedlora", retries=10)
        listed = json.loads(m.run(server, "flwr", "supernode", "ls", "fedlora", "--format", "json"))["nodes"]
        assert len(listed) == 2
        # 5. each data owner: ca.crt and its private key handed over, its own files, its own --port on one host
        for name, (train, test) in owners.items():
            home = tmp_path / name
            shutil.copy(server / "creds" / "ca.crt", home / "ca.crt")
            shutil.copy(server / "creds" / "supernodes" / name, home / name)
            m.start(f"supernode-{name}", home, "flower-supernode", "--superlink", f"localhost:{gateway}",
                    "--root-certificates", "ca.crt", "--auth-supernode-private-key", name, "--node-config",
                    f'client-id="{name}" task="triage" train-file="{train}" test-file="{test}" '
                    f'state-dir="{home / "fedlora-state"}"', "--port", str(free_port()))
        # 6. write and submit the app
        m.run(server, "fedlora", "deploy", "app", "app/", "experiment.toml", "--set", "algorithm.name=fedalt",
              "--credentials", "creds")
        streamed = m.run(server, "flwr", "run", "app/", "fedlora", "--stream", "-c", f'set.output_dir="{run_dir}"',
                         timeout=900)
        (m.logs / "flwr-run.log").write_text(streamed)
        assert "finished:completed" in m.run(server, "flwr", "ls", "fedlora")
        run_id = re.search(r"Successfully started run (\d+)", streamed).group(1)
        shown = m.run(server, "flwr", "log", run_id, "fedlora", "--show")  # the same, afterwards
    finally:
        m.stop()
    superlink_log = m.log("superlink")
    assert "https://127.0.0.1" in superlink_log and superlink_log.count("Activated node_id") == 2
    assert _no_process_mentions(tmp_path)  # SuperLink, gateway, SuperNodes, SuperExecs and apps all stopped
    # the run directory, with its report, on the SuperLink's machine
    deployed = RunResult(run_dir, "fedalt", read_records(run_dir))
    assert [r["round"] for r in deployed.rounds] == [1, 2] and len(deployed.evaluations()) == 2
    assert "fedlora report" in (run_dir / "report" / "report.md").read_text()
    nodes = json.loads((run_dir / "nodes.json").read_text())
    assert nodes["engine"] == "flower-deployment" and set(nodes["nodes"]) == set(owners)
    # what the operator watched: every round, then the results table of `fedlora run`
    final = deployed.final
    assert "fedlora: round 1: accuracy=" in streamed and "fedlora: round 2: accuracy=" in streamed, streamed[-3000:]
    for output in (streamed, shown):
        assert "final accuracy, own test split" in output and f"report: {run_dir / 'report' / 'report.md'}" in output
    for name in owners:
        assert re.search(rf"{name}\s*│\s*{final[name]['accuracy']:.3f}", streamed), streamed[-3000:]
    # the in-process engine on the same files gives the same numbers
    for a, b in zip(inproc.evaluations(), deployed.evaluations()):
        assert set(b["eval"]) == set(owners)
        for cid, metrics in a["eval"].items():
            for key, value in metrics.items():
                assert b["eval"][cid][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (a["round"], cid, key)
    # every owner's personalized model is on its own machine and predicts what the server measured
    for name, (_, test) in owners.items():
        state_dir = tmp_path / name / "fedlora-state"
        assert Path(nodes["nodes"][name]).resolve() == (state_dir / name).resolve()
        records = [json.loads(line) for line in test.read_text().splitlines()]
        answers = predict(state_dir, name, [r["text"] for r in records])
        accuracy = sum(a == r["label"] for a, r in zip(answers, records)) / len(records)
        assert accuracy == pytest.approx(final[name]["accuracy"])
        with pytest.raises(FedloraError, match="on its SuperNode"):
            predict(run_dir, name, [records[0]["text"]])


def test_a_deployment_server_app_prints_its_rounds_once_and_only_inside(tmp_path, capsys):
    import logging

    from fedlora.engines.rundir import progress_on_stdout, run_log

    log = logging.getLogger("fedlora")
    with run_log(tmp_path), progress_on_stdout():
        log.info("round 1: accuracy=0.500")
        log.warning("round 1: client x failed")
    log.info("round 2: after the run")
    out, err = capsys.readouterr()
    assert out == "fedlora: round 1: accuracy=0.500\n"  # what Flower streams; the warning once, from run_log
    assert err == "fedlora: WARNING: round 1: client x failed\n"
    assert "round 1: accuracy=0.500" in (tmp_path / "run.log").read_text()


def test_a_local_servers_results_move_to_the_top_of_the_run(tmp_path):
    run_dir, server_dir = tmp_path / "run", tmp_path / "run" / "federation" / "server"
    (server_dir / "checkpoint").mkdir(parents=True)
    (server_dir / "checkpoint" / "latest.json").write_text("{}")
    for name in ("metrics.jsonl", "nodes.json", "run.log", "config.json"):
        (server_dir / name).write_text(name)
    (run_dir / "checkpoint").mkdir()  # a resumed run's replace the stopped run's
    (run_dir / "checkpoint" / "old.json").write_text("{}")
    adopt_server_results(server_dir, run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == ["latest.json"]
    assert (run_dir / "metrics.jsonl").read_text() == "metrics.jsonl" and (run_dir / "nodes.json").is_file()
    # its own config.json and run.log stay with the ServerApp: run_experiment's say what ran
    assert sorted(p.name for p in server_dir.iterdir()) == ["config.json", "run.log"]
    assert not list(run_dir.glob(".*.replaced"))


@pytest.mark.slow
def test_superlink_speaks_tls_only_and_refuses_an_unregistered_supernode(tmp_path):
    with LocalFederation(tmp_path / "fed", {"owner-a": {"client-id": "noun_topic-0"}}) as fed:
        context = ssl.create_default_context(cafile=str(fed.credentials.ca_cert))
        with socket.create_connection(("127.0.0.1", fed.port)) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in {"TLSv1.2", "TLSv1.3"}  # the certificate chain verifies against our CA
        intruder = fed.start_supernode("intruder", {"client-id": "noun_topic-1"}, key_name="unregistered")
        assert intruder.wait(timeout=120) != 0  # it gives up: the SuperLink will not activate it
        deadline = time.monotonic() + 30
        while "No SuperNode found with the given public key" not in fed.log("superlink"):
            assert time.monotonic() < deadline, fed.log("superlink")[-2000:]
            time.sleep(0.5)
        assert "Activated node_id" in fed.log("superlink")  # the registered one got in
        nodes = json.loads(fed.flwr("supernode", "ls", fed.connection, "--format", "json"))["nodes"]
        assert len(nodes) == 1 and nodes[0]["status"] == "online"
    assert _no_process_mentions(tmp_path / "fed")


def test_a_run_log_inside_the_same_runs_log_writes_each_line_once(tmp_path):
    import logging

    from fedlora.engines.rundir import run_log

    log = logging.getLogger("fedlora")
    with run_log(tmp_path):
        with run_log(tmp_path):  # a simulation's ServerApp inside run_experiment
            log.info("round 1")
        log.info("round 2")
    assert (tmp_path / "run.log").read_text().count("round 1") == 1
    assert (tmp_path / "run.log").read_text().count("round 2") == 1


def test_flower_locals_supernodes_are_flowers_own_with_short_polling_sleeps(monkeypatch):
    """flower-local's SuperNode is Flower's, its sleeps capped at POLL (Flower's idle wait is a hard-coded 3 s)."""
    import flwr.supernode.cli as cli
    from flwr.supernode import start_client_internal

    from fedlora.flower import patches, supernode

    ran, shortened = [], []
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)  # restored afterwards
    monkeypatch.setattr(start_client_internal, "subprocess", start_client_internal.subprocess)
    monkeypatch.setattr(start_client_internal, "_pull_and_store_message", lambda **kw: kw.get("run_id"))
    monkeypatch.setattr(patches, "short_object_backoff", lambda: shortened.append(1))
    monkeypatch.setattr(cli, "flower_supernode", lambda: ran.append(start_client_internal.time))
    monkeypatch.setattr(sys, "argv", ["x", "--superlink", "h:1"])
    supernode.main()
    patched = ran[0]
    start = time.perf_counter()
    patched.sleep(3)
    assert time.perf_counter() - start < 1 and patched.monotonic() > 0 and sys.argv[0] == "flower-supernode"
    assert shortened
    start = time.perf_counter()
    patched.sleep(0.5)  # a look at the ClientApp's reply, in the SuperNode's own memory: at most 0.02 s
    assert time.perf_counter() - start < 0.3
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **kwargs: started.append((args, kwargs)))
    start_client_internal.subprocess.Popen(["flower-superexec", "--parent-pid", "7"])
    start_client_internal.subprocess.Popen(["flwr-clientapp", "--token", "t"])
    (superexec, kwargs), (clientapp, plain) = started
    assert superexec == [sys.executable, "-m", "fedlora.flower.superexec", "--parent-pid", "7"]
    assert clientapp == ["flwr-clientapp", "--token", "t"] and plain == {}
    # the SuperExec gets the pipe's read end; each stored message writes a byte to its write end
    wake_read = int(kwargs["env"][patches.WAKE_FD_ENV])
    assert kwargs["pass_fds"] == (wake_read,)
    os.set_blocking(wake_read, False)
    assert start_client_internal._pull_and_store_message(run_id=None) is None
    with pytest.raises(BlockingIOError):
        os.read(wake_read, 10)  # no message, no wake-up
    assert start_client_internal._pull_and_store_message(run_id=5) == 5
    assert os.read(wake_read, 10) == b"!"


def test_flower_locals_superexec_sleeps_until_its_supernode_wakes_it_or_the_interval_ends(monkeypatch):
    """flower-local's SuperExec asks its SuperNode for a task when a byte arrives on the wake pipe, not only every
    FLWR_SUPEREXEC_TASK_POLL_INTERVAL; once the SuperNode is gone (end of the pipe) it sleeps as Flower does."""
    import flwr.supercore.cli as cli
    import flwr.supercore.superexec.run_superexec as superexec_loop
    from flwr.supercore.superexec.executor import subprocess_executor

    from fedlora.flower import superexec
    from fedlora.flower.patches import WAKE_FD_ENV

    wake_read, wake_write = os.pipe()
    monkeypatch.setattr(superexec_loop, "time", superexec_loop.time)  # restored afterwards
    monkeypatch.setattr(subprocess_executor, "subprocess", subprocess_executor.subprocess)
    monkeypatch.setattr(superexec, "_ForkingSubprocess", lambda: None)
    monkeypatch.setattr(cli, "flower_superexec", lambda: None)
    monkeypatch.setattr(sys, "argv", ["x", "--plugin-type", "clientapp"])
    monkeypatch.setenv(WAKE_FD_ENV, str(wake_read))
    superexec.main()
    sleeps = superexec_loop.time
    assert WAKE_FD_ENV not in os.environ  # not handed on to the fork server or the ClientApps
    os.write(wake_write, b"!!!")  # three messages came while it was busy: one look serves them all
    start = time.perf_counter()
    sleeps.sleep(30)
    assert time.perf_counter() - start < 5
    start = time.perf_counter()
    sleeps.sleep(0.3)  # nothing new: the whole interval
    assert time.perf_counter() - start >= 0.29
    os.close(wake_write)
    sleeps.sleep(0.3)  # reads the end of the pipe
    start = time.perf_counter()
    sleeps.sleep(0.3)
    assert time.perf_counter() - start >= 0.29 and sleeps.wake_fd is None and sleeps.monotonic() > 0


def test_object_retries_start_sooner_in_every_flower_function_that_waits_for_objects(monkeypatch):
    """Flower retries a message object that has not arrived yet 1 s later (doubling to 10 s); fedlora's own
    Flower processes start at 0.05 s, in each function that takes the waits as defaults."""
    from flwr.supercore.inflatable import inflatable_utils

    from fedlora.flower.patches import OBJECT_BACKOFF, OBJECT_BACKOFF_CAP, short_object_backoff

    waiting = [f for f in vars(inflatable_utils).values()
               if "initial_backoff" in (getattr(f, "__kwdefaults__", None) or {})]
    assert {f.__name__ for f in waiting} >= {"pull_objects", "pull_and_inflate_object_from_tree"}
    for function in waiting:
        monkeypatch.setattr(function, "__kwdefaults__", {**function.__kwdefaults__, "initial_backoff": 1})
    short_object_backoff()
    assert all(f.__kwdefaults__["initial_backoff"] == OBJECT_BACKOFF
               and f.__kwdefaults__["backoff_cap"] == OBJECT_BACKOFF_CAP for f in waiting)
    short_object_backoff(0.01, 0.03)  # a ClientApp's, from its own SuperNode
    assert all(f.__kwdefaults__["initial_backoff"] == 0.01 and f.__kwdefaults__["backoff_cap"] == 0.03
               for f in waiting)


def test_the_local_fork_server_runs_flowers_clientapp_entry_point_per_request():
    """flower-local's SuperExec starts ClientApps as forks of one process that imported Flower once: each request
    runs `flwr-clientapp` with its arguments in a child of that server; the server ends with its pipe."""
    server = subprocess.Popen([sys.executable, "-m", "fedlora.flower.superexec", "--fork-server"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        server.stdin.write(b'{"args": ["--help"], "quiet": false}\n{"args": ["--help"], "quiet": true}\n')
        server.stdin.close()
        assert server.wait(timeout=120) == 0
        output = server.stdout.read().decode()
    finally:
        server.kill()
    assert output.count("usage: flwr-clientapp") == 1, output  # the quiet one printed nothing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_clientapp_of_the_fork_server_dies_with_it_even_when_it_would_retry_on():
    """A ClientApp that cannot reach its SuperNode retries for minutes and has no --parent-pid to watch here: only
    the kernel's parent-death signal, set in the fork, takes it down when the fork server is SIGKILLed."""
    server = subprocess.Popen([sys.executable, "-m", "fedlora.flower.superexec", "--fork-server"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clientapp = None
    try:
        port = socket.socket()
        port.bind(("127.0.0.1", 0))  # bound, never listening: every connection is refused
        args = ["--runtime-api-address", f"127.0.0.1:{port.getsockname()[1]}", "--token", "t", "--insecure"]
        server.stdin.write((json.dumps({"args": args, "quiet": True}) + "\n").encode())
        server.stdin.flush()
        deadline = time.monotonic() + 120
        while clientapp is None:
            assert time.monotonic() < deadline, "the fork server started no ClientApp within 120 s"
            clientapp = next(iter(psutil.Process(server.pid).children()), None)
            time.sleep(0.1)
        time.sleep(3)  # past its imports, into the retries
        assert clientapp.is_running()
        server.kill()
        server.wait(timeout=30)
        _, alive = psutil.wait_procs([clientapp], timeout=20)
        assert not alive, "the ClientApp outlived its fork server"
    finally:
        server.kill()
        if clientapp is not None and clientapp.is_running():
            clientapp.kill()
        port.close()
