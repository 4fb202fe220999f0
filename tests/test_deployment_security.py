"""Issue #22 on the deployment path: who may admit a SuperNode, which client ids the server admits, names that
become paths in `deploy credentials`, and an app pyproject that any experiment name survives."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request

import pytest
from flwr.common.config import flatten_dict

from fedlora.cli import main
from fedlora.core.config import build_config
from fedlora.core.errors import ConfigError, FedloraError
from fedlora.flower.app import write_app
from fedlora.flower.credentials import write_credentials
from fedlora.flower.local import LocalFederation, run_local_deployment
from fedlora.flower.server_app import config_from_run_config

from .conftest import tiny_config


def _experiment(app_dir):
    """The config the ServerApp will run, read the way Flower and the ServerApp read the app."""
    project = tomllib.loads((app_dir / "pyproject.toml").read_text())
    return config_from_run_config(flatten_dict(project["tool"]["flwr"]["app"]["config"]))


# -- #10: the pyproject is written by a TOML writer --------------------------------------------------------
@pytest.mark.parametrize("name", ["it's", "a '''quoted''' \"\"\"name\"\"\"", "back\\slash\nnew line"])
def test_app_pyproject_parses_and_round_trips_any_experiment_name(tmp_path, name):
    cfg = build_config(tiny_config(tmp_path, name=name, output_dir=str(tmp_path / "it's '''here'''")))
    app = write_app(tmp_path / "app", cfg)
    assert _experiment(app) == cfg.with_overrides(["engine.num_clients=4", "output_dir=null", "privacy.secure_noise=true"])
    project = tomllib.loads((app / "pyproject.toml").read_text())
    assert repr(name) in project["project"]["description"]


# -- #4: the operator's list of client ids travels in engine.clients ---------------------------------------
def test_write_app_records_the_admitted_client_ids(tmp_path):
    cfg = build_config(tiny_config(tmp_path))
    app = write_app(tmp_path / "app", cfg, clients=["hospital-a", "clinic-c"])
    assert _experiment(app).engine.clients == ["hospital-a", "clinic-c"]
    assert _experiment(app).engine.num_clients == 2  # wait for the listed nodes, not the split's four
    with pytest.raises(ConfigError, match="client id"):
        write_app(tmp_path / "bad", cfg, clients=["../a"])
    with pytest.raises(ConfigError, match="twice"):
        write_app(tmp_path / "bad", cfg, clients=["a", "a"])


def test_deploy_app_takes_the_clients_from_the_credentials_or_a_list(tmp_path, capsys):
    config = tmp_path / "exp.json"
    config.write_text(json.dumps(tiny_config(tmp_path)))
    write_credentials(tmp_path / "creds", ["hospital-a", "hospital-b"])
    assert main(["deploy", "app", str(tmp_path / "app1"), str(config), "--credentials", str(tmp_path / "creds")]) == 0
    assert _experiment(tmp_path / "app1").engine.clients == ["hospital-a", "hospital-b"]
    assert main(["deploy", "app", str(tmp_path / "app2"), str(config), "--clients", "x-1,x-2",
                 "--clients", "x-3"]) == 0
    assert _experiment(tmp_path / "app2").engine.clients == ["x-1", "x-2", "x-3"]
    assert main(["deploy", "app", str(tmp_path / "app3"), str(config), "--credentials", str(tmp_path / "nowhere")]) == 2
    assert "no SuperNode keys" in capsys.readouterr().err


def test_a_local_deployment_admits_exactly_its_supernodes(tmp_path, monkeypatch):
    seen = {}

    class Recorder(LocalFederation):
        def start(self):  # no processes: only what would be submitted matters here
            seen["supernodes"] = self.supernodes

        def run(self, app_dir, overrides=None, timeout=None):
            seen["experiment"] = _experiment(app_dir)
            raise FedloraError("stop here")

    monkeypatch.setattr("fedlora.flower.local.LocalFederation", Recorder)
    cfg = build_config(tiny_config(tmp_path))
    with pytest.raises(FedloraError, match="stop here"):
        run_local_deployment(cfg, tmp_path / "run")
    ids = [node["client-id"] for node in seen["supernodes"].values()]
    assert seen["experiment"].engine.clients == ids and len(ids) == 4


# -- #8, #9: SuperNode names become paths only once checked; credentials are not silently regenerated ------
@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "-rf", "x" * 101])
def test_a_supernode_name_that_is_no_plain_file_name_is_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="SuperNode name"):
        write_credentials(tmp_path / "creds", [name])
    assert not (tmp_path / "creds").exists()  # refused before anything is written


def test_a_supernode_name_cannot_reach_outside_the_credentials(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil").write_text("keep me")
    (tmp_path / "a" / "b").mkdir(parents=True)
    with pytest.raises(ConfigError, match="SuperNode name"):
        write_credentials(tmp_path / "a" / "b" / "creds", ["../../outside/evil"])
    assert (outside / "evil").read_text() == "keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["evil"]  # no private key left there


def test_supernode_names_whose_key_files_collide_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="twice"):
        write_credentials(tmp_path / "creds", ["owner", "owner"])
    with pytest.raises(ConfigError, match="owner.pub"):
        write_credentials(tmp_path / "creds", ["owner", "owner.pub"])  # owner's public key is owner.pub


def test_existing_credentials_are_replaced_only_when_asked(tmp_path):
    creds = write_credentials(tmp_path / "creds", ["owner"])
    ca_key, node_key = creds.root.joinpath("ca.key").read_bytes(), creds.supernode_keys["owner"].read_bytes()
    with pytest.raises(FedloraError, match="overwrite=True"):
        write_credentials(tmp_path / "creds", ["owner"])
    with pytest.raises(FedloraError, match="overwrite=True"):
        write_credentials(tmp_path / "creds", ["someone-else"])  # a new CA would orphan every certificate given out
    assert creds.root.joinpath("ca.key").read_bytes() == ca_key
    assert creds.supernode_keys["owner"].read_bytes() == node_key
    again = write_credentials(tmp_path / "creds", ["owner"], overwrite=True)
    assert again.root.joinpath("ca.key").read_bytes() != ca_key


def test_deploy_credentials_cli_checks_names_and_refuses_to_regenerate(tmp_path, capsys):
    out = str(tmp_path / "creds")
    assert main(["deploy", "credentials", out, "--supernode", ""]) == 2
    assert "SuperNode name '' is not a safe name" in capsys.readouterr().err
    assert main(["deploy", "credentials", out, "--supernode", "owner"]) == 0
    ca_key = (tmp_path / "creds" / "ca.key").read_bytes()
    capsys.readouterr()
    assert main(["deploy", "credentials", out, "--supernode", "owner"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "creds" / "ca.key").read_bytes() == ca_key
    assert main(["deploy", "credentials", out, "--supernode", "owner", "--force"]) == 0
    assert (tmp_path / "creds" / "ca.key").read_bytes() != ca_key


def test_the_superlink_certificate_always_covers_the_loopback_address(tmp_path):
    from cryptography.x509 import (
        IPAddress,
        SubjectAlternativeName,
        load_pem_x509_certificate,
    )

    creds = write_credentials(tmp_path, ["owner"], hosts=["superlink.example.org"])
    sans = load_pem_x509_certificate(creds.server_cert.read_bytes()).extensions.get_extension_for_class(
        SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(IPAddress)] == ["127.0.0.1"]  # the gateway's and operator's


# -- #4: only the operator may register node keys (real Flower processes) ---------------------------------
def _supernode_address(fed: LocalFederation) -> str:
    """The address a data owner is told to connect its SuperNode to."""
    command = fed.supernode_command("x", fed.credentials.supernode_keys["unregistered"], {}, 1)
    return command[command.index("--superlink") + 1]


def _outsider_flwr(fed: LocalFederation, home, address: str, *args: str) -> subprocess.CompletedProcess:
    """The Flower CLI of a party holding ca.crt and nothing else, pointed at `address`."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(fed.credentials.ca_cert, home / "ca.crt")
    (home / "config.toml").write_text(f'[superlink]\ndefault = "there"\n\n[superlink.there]\naddress = "{address}"\n'
                                      f'root-certificates = "{home / "ca.crt"}"\n')
    return subprocess.run(["flwr", *args, "there"], check=False, env={**fed.env(), "FLWR_HOME": str(home)},
                          capture_output=True, text=True, timeout=120, cwd=home)


def _https_post(address: str, path: str, ca_cert) -> int:
    context = ssl.create_default_context(cafile=str(ca_cert))
    request = urllib.request.Request(f"https://{address}{path}", data=b"", method="POST",
                                     headers={"content-type": "application/protobuf"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_deployment_refuses_a_key_registration_by_a_party_with_only_the_ca_certificate(tmp_path):
    with LocalFederation(tmp_path / "fed", {}) as fed:
        foreign = write_credentials(tmp_path / "outsider", ["foreign"])
        address = _supernode_address(fed)
        done = _outsider_flwr(fed, tmp_path / "outsider-home", address, "supernode", "register",
                              str(foreign.public_key("foreign")))
        assert done.returncode != 0, done.stdout + done.stderr
        nodes = json.loads(fed.flwr("supernode", "ls", fed.connection, "--format", "json"))["nodes"]
        assert nodes == []  # the operator's view: nothing was registered
        # nor can that party reach any other Control or Runtime route through the public address, even by a
        # path that would resolve there
        for path in ("/v1/control/register-node", "/v1/control/list-runs", "/v1/runtime/acquire-task",
                     "/v1/fleet/../control/register-node", "/v1/fleet/%2e%2e/control/list-runs", "/docs"):
            assert _https_post(address, path, fed.credentials.ca_cert) == 403, path
        assert _https_post(address, "/v1/fleet/register-node", fed.credentials.ca_cert) != 403  # Fleet is served


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="needs 127.0.0.2, a second loopback address (Linux)")
def test_deployment_serves_the_control_api_only_on_the_operators_address(tmp_path):
    with LocalFederation(tmp_path / "fed", {}, public_host="127.0.0.2") as fed:
        assert _supernode_address(fed) == f"127.0.0.2:{fed.port}"
        with socket.socket() as s:  # the SuperLink's own port is not served on the public address at all
            assert s.connect_ex(("127.0.0.2", fed.superlink_port)) != 0
        done = _outsider_flwr(fed, tmp_path / "outsider-home", f"127.0.0.2:{fed.superlink_port}", "supernode", "ls")
        assert done.returncode != 0
        assert json.loads(fed.flwr("supernode", "ls", fed.connection, "--format", "json"))["nodes"] == []
