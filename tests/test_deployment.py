"""The Flower Deployment Engine path: the app directory, credentials, data owners with their own files, and
(slow) a SuperLink and SuperNodes as separate processes on 127.0.0.1 with TLS and SuperNode authentication."""

from __future__ import annotations

import json
import socket
import ssl
import time
import tomllib

import psutil
import pytest
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from cryptography.x509 import IPAddress, SubjectAlternativeName, load_pem_x509_certificate
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from fedlora import run_experiment
from fedlora.core.config import build_config
from fedlora.core.errors import ConfigError
from fedlora.data.federated import build_clients
from fedlora.deployment import LocalFederation, write_app, write_credentials
from fedlora.engines.flower import _client_id, _session, config_from_run_config
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
    assert project["tool"]["flwr"]["app"]["components"] == {"serverapp": "fedlora.engines.flower:server_app",
                                                            "clientapp": "fedlora.engines.flower:client_app"}
    run_config = _app_run_config(app)
    # 2 clients in the split; the run directory is the submission's, never the config's (see test_deployment_lifecycle)
    expected = cfg.with_overrides(["engine.num_clients=2", "output_dir=null"])
    assert config_from_run_config(run_config) == expected  # lists (tasks, target modules) survive, unlike flat keys
    # what `flwr run -c` does with submission-time settings: only keys the app lists may be overridden
    submitted = fuse_dicts(run_config, parse_config_args(["set.engine.num_clients=5 set.output_dir='/srv/x'"]))
    assert config_from_run_config(submitted) == cfg.with_overrides(["engine.num_clients=5", "output_dir=/srv/x"])
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


@pytest.mark.slow
def test_deployment_with_tls_and_node_auth_equals_in_process(tmp_path):
    # 2 SuperNodes and no evaluation before training: every ClientApp message is a fresh process here
    base = dict(data={"tasks": ["noun_topic"], "clients_per_task": 2}, federation={"rounds": 2, "eval_at_start": False},
                algorithm={"name": "fedalt"})
    inproc = run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "inproc"), **base))
    deployed = run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "deployed"),
                                          engine={"name": "flower-local", "progress": False}, **base))
    assert [r["round"] for r in deployed.rounds] == [1, 2] and len(deployed.evaluations()) == 2
    for a, b in zip(inproc.evaluations(), deployed.evaluations()):
        assert set(b["eval"]) == {"noun_topic-0", "noun_topic-1"}
        for cid, metrics in a["eval"].items():
            for key, value in metrics.items():
                assert b["eval"][cid][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (a["round"], cid, key)
    run_dir = tmp_path / "deployed"
    # the ServerApp wrote into a fresh directory of its own, whose results are the run's; a report as for any run
    assert json.loads((run_dir / "config.json").read_text())["engine"]["name"] == "flower-local"
    assert (run_dir / "report" / "report.md").is_file() and (run_dir / "federation" / "server" / "run.log").is_file()
    assert not (run_dir / "federation" / "server" / "metrics.jsonl").exists()
    superlink_log = (tmp_path / "deployed" / "federation" / "logs" / "superlink.log").read_text()
    assert "https://127.0.0.1" in superlink_log and superlink_log.count("Activated node_id") == 2
    assert _no_process_mentions(tmp_path / "deployed")  # SuperLink, SuperNodes, SuperExecs and apps all stopped
    # issue #23: the ServerApp records the engine; every SuperNode kept its state and wrote its personalized model
    assert json.loads((run_dir / "federation" / "server" / "config.json").read_text())["engine"]["name"] == "flower-local"
    nodes = json.loads((run_dir / "nodes.json").read_text())
    assert nodes["engine"] == "flower-local" and set(nodes["nodes"]) == {"noun_topic-0", "noun_topic-1"}
    cfg = build_config(tiny_config(tmp_path, **base))
    final = deployed.evaluations()[-1]["eval"]
    for client in build_clients(cfg.data, cfg.seed):
        node = run_dir / "nodes" / client.client_id
        assert nodes["nodes"][client.client_id] == str(node.resolve())
        answers = predict(node, client.client_id, [r["text"] for r in client.test])  # the owner's machine alone
        accuracy = sum(a == r["label"] for a, r in zip(answers, client.test)) / len(client.test)
        assert accuracy == pytest.approx(final[client.client_id]["accuracy"])
        assert predict(run_dir, client.client_id, [r["text"] for r in client.test]) == answers


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
