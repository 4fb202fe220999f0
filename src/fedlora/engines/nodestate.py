"""A node's own copy of its client state, and at the end of a run its personalized model (issue #23).

A Flower node (a SuperNode of a deployment, a virtual node of the simulation) writes into its node directory,
`<state-dir>/<client id>/`:

    node.json             {"format": 1, "client_id", "run": the server's run id, "round": last round trained}
    config.json           the experiment as this node runs it
    checkpoint/           the client's state after the last round it trained: engines/checkpoint.py's format, a
                          one-client checkpoint with an empty server state (safetensors + JSON, sha256-verified)
    previous/checkpoint/  the state it trained that round from: a server resumed from the round before (it was
                          stopped between the node's reply and its own checkpoint) continues from there
    model/                its personalized model after the run's last round, as `fedlora export` writes it

The server's run directory records in nodes.json which engine ran, the run's id (sent with every message, so
a node never continues another run's state) and where each node said its state lives.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from ..algorithms import ClientState
from ..core.errors import CheckpointError, ConfigError
from ..core.io import load_json, save_json
from ..core.names import safe_name
from .checkpoint import (
    CHECKPOINT_DIR,
    Checkpoint,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

log = logging.getLogger("fedlora")

STATE_DIR_KEY = "state-dir"  # node config key: where a SuperNode keeps its clients' states
DEFAULT_STATE_DIR = "fedlora-state"  # under the node's working directory when the node config names none
SIMULATION_NODES = "nodes"  # flower-sim / flower-local: <run dir>/nodes/<client id>, all on this machine
NODE_FILE, MODEL_DIR, PREVIOUS = "node.json", "model", "previous"
NODES_FILE = "nodes.json"  # in the server's run directory
LOCAL_ENGINES = ("flower-sim", "flower-local")  # every node on the server's machine, under its run directory
DEPLOYMENT = "flower-deployment"


# -- the node's side ---------------------------------------------------------------------------------------
def node_dir(state_dir: str | Path, client_id: str) -> Path:
    """The node directory of `client_id` under a state-dir (the id checked before it becomes a path)."""
    return Path(state_dir) / safe_name(client_id, "client id")


def claim_node_dir(directory: Path, client_id: str, run: str | None, config_json: dict[str, Any]) -> None:
    """Create (or reuse) the node directory of this run; refuse one holding another run's state, untouched."""
    info = _node_info(directory)
    if info is not None and run is not None and info.get("run") not in (None, run):
        raise ConfigError(f"node directory {directory} holds client {client_id}'s state of another run "
                          f"({info.get('run')}, not {run}); it is kept as it is: start the SuperNode with another "
                          f"{STATE_DIR_KEY!r} in its node config, or move that directory away")
    if info is not None and info.get("client_id") != client_id:
        raise ConfigError(f"node directory {directory} belongs to client {info.get('client_id')!r}, not {client_id!r}")
    directory.mkdir(parents=True, exist_ok=True)
    if info is None or info.get("run") != run:
        save_json(directory / NODE_FILE, {"format": 1, "client_id": client_id, "run": run,
                                          "round": (info or {}).get("round", 0)})
    if not (directory / "config.json").is_file():
        save_json(directory / "config.json", config_json)


def _node_info(directory: Path) -> dict[str, Any] | None:
    path = directory / NODE_FILE
    if not path.is_file():
        return None
    info = load_json(path)
    if not isinstance(info, dict):
        raise CheckpointError(f"{path} is not a JSON object: the node directory is damaged; move it away")
    return info


def is_node_dir(directory: Path) -> bool:
    """Whether a directory is a node directory (it holds node.json)."""
    return (Path(directory) / NODE_FILE).is_file()


def _saved(directory: Path) -> list[tuple[int, Path]]:
    """(round, directory) of the states kept in a node directory, newest first."""
    found = []
    for where in (directory, directory / PREVIOUS):
        if has_checkpoint(where):
            latest = load_json(where / CHECKPOINT_DIR / "latest.json")
            if isinstance(latest, dict) and isinstance(latest.get("round"), int):
                found.append((latest["round"], where))
    return sorted(found, key=lambda f: -f[0])


def load_node_state(directory: Path, client_id: str, before: int) -> tuple[int, ClientState]:
    """The newest state kept in a node directory trained in a round before `before`, with its round;
    (0, an empty state) when there is none (the client starts as a late joiner does)."""
    for rnd, where in _saved(directory):
        if rnd < before:
            ckpt = load_checkpoint(where)  # verified against its manifest: a damaged file is an error reply
            if client_id not in ckpt.client_states:
                raise CheckpointError(f"{where / CHECKPOINT_DIR} holds no state of client {client_id!r}")
            return rnd, ckpt.client_states[client_id]
    return 0, ClientState()


def save_node_state(directory: Path, client_id: str, rnd: int, base_round: int, state: ClientState) -> None:
    """Keep the state trained in round `rnd` (from the state of `base_round`) atomically in a node directory.

    The state it was trained from stays as previous/: the server may be stopped after this reply and before its
    own checkpoint of round `rnd`, and resume from the round before."""
    saved = {r: w for r, w in _saved(directory)}
    if saved.get(base_round) == directory and base_round < rnd:  # the current one becomes the previous one
        previous = directory / PREVIOUS
        shutil.rmtree(previous, ignore_errors=True)
        previous.mkdir()
        shutil.copy2(directory / "config.json", previous / "config.json")  # what its manifest is checked against
        os.replace(directory / CHECKPOINT_DIR, previous / CHECKPOINT_DIR)
    save_checkpoint(directory, Checkpoint(rnd, {"tensors": {}, "meta": {}}, {client_id: state}))
    info = _node_info(directory) or {"format": 1, "client_id": client_id}
    save_json(directory / NODE_FILE, {**info, "round": rnd})


# -- the server's side -------------------------------------------------------------------------------------
def new_run_id() -> str:
    """A fresh id for a run, which its nodes keep with their states."""
    return uuid.uuid4().hex


def read_nodes(run_dir: Path) -> dict[str, Any] | None:
    """The run directory's nodes.json (engine, run id, node state-dirs), None for a run without one."""
    path = Path(run_dir) / NODES_FILE
    if not path.is_file():
        return None
    nodes = load_json(path)
    if not isinstance(nodes, dict) or not isinstance(nodes.get("nodes", {}), dict):
        raise CheckpointError(f"{path} is not a JSON object with a 'nodes' mapping: the file was edited or damaged")
    return nodes


def write_nodes(run_dir: Path, engine: str, run: str, nodes: dict[str, str]) -> None:
    """Record where a Flower run's client states live: each node's state-dir as the node reported it."""
    save_json(Path(run_dir) / NODES_FILE, {"engine": engine, "run": run, "local": engine in LOCAL_ENGINES,
                                           "nodes": dict(sorted(nodes.items()))})


def client_state_of(run_dir: Path, client_id: str, rnd: int) -> ClientState | None:
    """Client `client_id`'s state after round `rnd` for export/predict of a server run directory: from its node
    directory when the nodes ran on this machine (simulation); None for a run that keeps states in its own
    checkpoint (in-process). A deployment's states live on the nodes: a ConfigError naming the node's state-dir."""
    nodes = read_nodes(run_dir)
    if nodes is None:
        return None
    where = (nodes.get("nodes") or {}).get(client_id)
    if not nodes.get("local"):
        place = f"in {where!r} on its SuperNode" if where else "on its SuperNode"
        raise ConfigError(f"run {run_dir} ran on a Flower deployment: client {client_id!r}'s state lives {place}, "
                          "not in this run directory. Its data owner exports or queries it there: "
                          f"fedlora export STATE_DIR --client {client_id} --out DIR (docs/deployment.md)")
    # the nodes were on this machine, under the run directory: never a path a node reported
    directory = node_dir(Path(run_dir) / SIMULATION_NODES, client_id)
    if not is_node_dir(directory):
        raise CheckpointError(f"client {client_id!r}'s node directory {directory} is missing: its state (adapters, "
                              "head) is lost, and a fresh one would not be the model the run evaluated")
    return load_node_state(directory, client_id, rnd + 1)[1]


def node_model(path: Path, client_id: str) -> Path | None:
    """The personalized model a node wrote, when `path` is its node directory or the state-dir holding it; None
    when `path` is neither (a server run directory)."""
    path = Path(path)
    if is_node_dir(path):
        directory = path
    elif is_node_dir(path / safe_name(client_id)):
        directory = path / client_id
    else:
        return None
    owner = (_node_info(directory) or {}).get("client_id")
    if owner != client_id:
        raise ConfigError(f"{directory} is the node directory of client {owner!r}, not {client_id!r}")
    model = directory / MODEL_DIR
    if not (model / "fedlora_personalized.json").is_file():
        info = _node_info(directory) or {}
        raise CheckpointError(f"node directory {directory} holds no personalized model yet: the node writes "
                              f"{model} when the run's last round ends (it has trained up to round "
                              f"{info.get('round', 0)}); resume the run, or wait for it to finish")
    return model


def copy_export(model: Path, out: Path) -> Path:
    """Copy a node's personalized model to `out` (replacing an earlier export there, as `export` does)."""
    from ..export_files import check_replaceable, staged_directory

    check_replaceable(out)
    with staged_directory(out) as tmp:
        shutil.copytree(model, tmp, dirs_exist_ok=True)
    return out


__all__ = ["NODES_FILE", "STATE_DIR_KEY", "claim_node_dir", "client_state_of", "copy_export", "load_node_state",
           "node_dir", "node_model", "read_nodes", "save_node_state", "write_nodes"]
