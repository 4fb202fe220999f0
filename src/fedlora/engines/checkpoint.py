"""Checkpoints: everything a run needs to continue exactly where it stopped (safetensors + JSON, no pickle).

Layout under `<run_dir>/checkpoint/`:
    round-00007/server.safetensors, server.json, clients/<id>.safetensors, clients.json, round.json
    latest.json   -> {"round": 7, "dir": "round-00007"}   (rewritten atomically after the directory is complete)
A round directory is written under a temporary name and renamed when complete, so a crash mid-write
leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..algorithms import ClientState
from ..core.errors import CheckpointError
from ..core.io import load_json, load_tensors, save_json, save_tensors
from ..core.tensors import flatten, unflatten

CHECKPOINT_DIR = "checkpoint"


@dataclass
class Checkpoint:
    """The state after `round`: the server's state_dict and every client's state."""

    round: int
    server_state: dict[str, Any]
    client_states: dict[str, ClientState]


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write a checkpoint atomically and make it the latest; older round directories are removed."""
    root = run_dir / CHECKPOINT_DIR
    name = f"round-{ckpt.round:05d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "clients").mkdir(parents=True)
    save_tensors(tmp / "server.safetensors", flatten(ckpt.server_state.get("tensors", {})))
    save_json(tmp / "server.json", ckpt.server_state.get("meta", {}))
    for cid, state in ckpt.client_states.items():
        save_tensors(tmp / "clients" / f"{cid}.safetensors", flatten(state.states))
    save_json(tmp / "clients.json", {cid: state.meta for cid, state in ckpt.client_states.items()})
    save_json(tmp / "round.json", {"round": ckpt.round})
    shutil.rmtree(root / name, ignore_errors=True)
    os.replace(tmp, root / name)
    save_json(root / "latest.json", {"round": ckpt.round, "dir": name})
    for old in root.glob("round-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def checkpoint_id(run_dir: Path) -> str | None:
    """Which checkpoint is the latest, as a string that changes whenever a new one is written; None if none."""
    latest = Path(run_dir) / "checkpoint" / "latest.json"
    return f"{load_json(latest).get('dir')}@{latest.stat().st_mtime_ns}" if latest.is_file() else None


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read the latest checkpoint of a run; anything missing or corrupt raises CheckpointError (nothing is changed)."""
    root = run_dir / CHECKPOINT_DIR
    if not (root / "latest.json").is_file():
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from ({root / 'latest.json'} is missing)")
    latest = load_json(root / "latest.json")
    directory = root / str(latest.get("dir", ""))
    if load_json(directory / "round.json").get("round") != latest.get("round"):
        raise CheckpointError(f"checkpoint {directory} does not match {root / 'latest.json'}; it is incomplete")
    metas = load_json(directory / "clients.json")
    clients = {}
    for cid, meta in metas.items():
        clients[cid] = ClientState(unflatten(load_tensors(directory / "clients" / f"{cid}.safetensors")), meta)
    server = {"tensors": unflatten(load_tensors(directory / "server.safetensors")),
              "meta": load_json(directory / "server.json")}
    return Checkpoint(int(latest["round"]), server, clients)
