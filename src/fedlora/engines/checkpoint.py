"""Checkpoints: everything a run needs to continue exactly where it stopped (safetensors + JSON, no pickle).

Layout under `<run_dir>/checkpoint/`:
    round-00007/server.safetensors, server.json, clients/<id>.safetensors, clients.json, round.json
    latest.json   -> {"round": 7, "dir": "round-00007"}   (rewritten atomically after the directory is complete)
A round directory is written under a temporary name and renamed when complete, so a crash mid-write
leaves the previous checkpoint as the latest one.

round.json, written last, is the manifest: the sha256 of every other file of the directory, the sha256 of the
run's split (`<run_dir>/clients.json`) and of the config sections the state depends on (VERIFIED_SECTIONS of
`<run_dir>/config.json`), and the method. Loading verifies them, so a file or config changed after the
checkpoint was written is refused instead of resumed from. A checkpoint of an older fedlora has no hashes and
loads unverified, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..algorithms import ClientState, ServerAlgorithm
from ..core.errors import CheckpointError
from ..core.io import file_sha256, load_json, load_tensors, save_json, save_tensors, sha256_text
from ..core.names import name_problem, safe_name
from ..core.tensors import flatten, unflatten

log = logging.getLogger("fedlora")

CHECKPOINT_DIR = "checkpoint"
MANIFEST = "round.json"
# what the saved state was trained with: resuming under other values would silently continue another experiment
VERIFIED_SECTIONS = ("data", "seed", "model", "lora", "training", "clients", "algorithm", "privacy")
START_OVER = "start the run over with --overwrite (fedlora run CONFIG --overwrite)"
_ROUND_DIR = re.compile(r"round-\d{5,}")


@dataclass
class Checkpoint:
    """The state after `round`: the server's state_dict and every client's state (and, once loaded, the
    manifest it was verified against and its directory)."""

    round: int
    server_state: dict[str, Any]
    client_states: dict[str, ClientState]
    manifest: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = None


# the server's defences against bad updates: switched off (or changed) between a stop and its resume, the resumed
# rounds would silently run another experiment than the ones before (federation's other keys may change: rounds)
DEFENCES = ("update_clip", "update_clip_factor", "max_state_norm", "aggregation", "trim_fraction")
RENAMED = {"max_state_norm": "max_update_norm"}  # hashed under the old name: checkpoints from before still verify


def config_hashes(config: dict[str, Any]) -> dict[str, str]:
    """The sha256 of each of a config's VERIFIED_SECTIONS, as config.json holds them, and of its defences."""
    hashes = {s: sha256_text(json.dumps(config.get(s), sort_keys=True, default=str)) for s in VERIFIED_SECTIONS}
    federation = config.get("federation") if isinstance(config.get("federation"), dict) else {}
    defences = {RENAMED.get(k, k): federation.get(k, federation.get(RENAMED.get(k, k))) for k in DEFENCES}
    return {**hashes, "federation (defences)": sha256_text(json.dumps(defences, sort_keys=True, default=str))}


def _provenance(run_dir: Path) -> dict[str, Any]:
    """What the state was trained with, from the files at the top of the run directory (absent: unrecorded)."""
    config = load_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else None
    split = run_dir / "clients.json"
    return {"config": config_hashes(config) if isinstance(config, dict) else None,
            "method": (config.get("algorithm") or {}).get("name") if isinstance(config, dict) else None,
            "split": file_sha256(split) if split.is_file() else None}


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write a checkpoint atomically and make it the latest; older round directories are removed."""
    cids = [safe_name(cid) for cid in ckpt.client_states]  # every id checked before anything is written
    root = run_dir / CHECKPOINT_DIR
    name = f"round-{ckpt.round:05d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "clients").mkdir(parents=True)
    save_tensors(tmp / "server.safetensors", flatten(ckpt.server_state.get("tensors", {})))
    save_json(tmp / "server.json", ckpt.server_state.get("meta", {}))
    for cid in cids:
        save_tensors(tmp / "clients" / f"{cid}.safetensors", flatten(ckpt.client_states[cid].states))
    save_json(tmp / "clients.json", {cid: state.meta for cid, state in ckpt.client_states.items()})
    files = ["server.safetensors", "server.json", "clients.json", *(f"clients/{cid}.safetensors" for cid in cids)]
    save_json(tmp / MANIFEST, {"round": ckpt.round, **_provenance(run_dir),
                               "files": {f: file_sha256(tmp / f) for f in files}})
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


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run directory has a checkpoint: a latest one, or a round directory whose latest.json was lost
    (complete or not: loading tells)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    return (root / "latest.json").is_file() or bool(_round_dirs(root))


def _round_dirs(root: Path) -> list[Path]:
    """The round directories of a checkpoint that hold a manifest, newest first."""
    found = [d for d in root.glob("round-*") if _ROUND_DIR.fullmatch(d.name) and (d / MANIFEST).is_file()] \
        if root.is_dir() else []
    return sorted(found, key=lambda d: int(d.name.removeprefix("round-")), reverse=True)


def _latest(root: Path) -> dict[str, Any]:
    """latest.json; without it (deleted, or lost by a crash), the newest round directory, which is then verified
    like any checkpoint and never deleted."""
    if (root / "latest.json").is_file():
        return load_json(root / "latest.json")
    newest = _round_dirs(root)[0]
    manifest = load_json(newest / MANIFEST)
    log.warning("%s is missing: resuming from %s, the newest round directory (its files are verified against its "
                "manifest before use)", root / "latest.json", newest)
    return {"round": manifest.get("round") if isinstance(manifest, dict) else None, "dir": newest.name}


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read and verify the latest checkpoint of a run; anything missing, corrupt or changed since it was written
    raises CheckpointError (nothing is changed)."""
    root = run_dir / CHECKPOINT_DIR
    if not has_checkpoint(run_dir):
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from ({root / 'latest.json'} is missing)")
    latest = _latest(root)
    name = latest.get("dir") if isinstance(latest, dict) else None
    if not isinstance(name, str) or not _ROUND_DIR.fullmatch(name):  # it is joined to a path: never `..`
        raise CheckpointError(f"{root / 'latest.json'} names {name!r}, not a round directory of this checkpoint; "
                              f"the file was edited or damaged: {START_OVER}")
    directory = root / name
    manifest = load_json(directory / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("round") != latest.get("round"):
        raise CheckpointError(f"checkpoint {directory} does not match {root / 'latest.json'}; it is incomplete")
    hashes = manifest.get("files")
    if hashes is None:
        log.warning("checkpoint %s was written by an older fedlora and records no hashes: it is loaded "
                    "unverified", directory)
    else:
        _verify_files(directory, hashes)
        _verify_config(run_dir, directory, manifest)
    metas = load_json(directory / "clients.json")
    if not isinstance(metas, dict):
        raise CheckpointError(f"{directory / 'clients.json'} is not a mapping of client ids; {START_OVER}")
    for cid in metas:
        problem = name_problem(cid)
        if problem:
            raise CheckpointError(f"{directory / 'clients.json'} holds client id {cid!r}, which is not a safe name "
                                  f"({problem}): the file was edited or damaged; {START_OVER}")
    unhashed = [cid for cid in metas if f"clients/{cid}.safetensors" not in hashes] if hashes is not None else []
    if unhashed:
        raise CheckpointError(f"{directory / 'clients.json'} lists clients {unhashed} that "
                              f"{directory / MANIFEST} records no file of; {START_OVER}")
    clients = {cid: ClientState(unflatten(load_tensors(directory / "clients" / f"{cid}.safetensors")), meta)
               for cid, meta in metas.items()}
    meta = load_json(directory / "server.json")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{directory / 'server.json'} is not a JSON object; {START_OVER}")
    server = {"tensors": unflatten(load_tensors(directory / "server.safetensors")), "meta": meta}
    return Checkpoint(int(latest["round"]), server, clients, manifest, directory)


def check_split(run_dir: Path, ckpt: Checkpoint, split_text: str) -> None:
    """Refuse to continue `ckpt` on a split (clients.json's text, rebuilt from the config and the data) other
    than the one it was trained on; a checkpoint that recorded none passes."""
    recorded = ckpt.manifest.get("split")
    if recorded is not None and sha256_text(split_text) != recorded:
        raise CheckpointError(
            f"the data split rebuilt from {run_dir / 'config.json'} is not the one checkpoint {ckpt.directory} was "
            f"trained on (its {MANIFEST} records the sha256 of {run_dir / 'clients.json'}): the data on disk changed "
            f"since the run started; restore the data the run was started with, or {START_OVER}")


def _verify_files(directory: Path, hashes: Any) -> None:
    manifest = directory / MANIFEST
    if not isinstance(hashes, dict):
        raise CheckpointError(f"{manifest} has no valid list of file hashes; {START_OVER}")
    for rel, digest in sorted(hashes.items()):
        if not isinstance(rel, str) or any(name_problem(part) for part in rel.split("/")):
            raise CheckpointError(f"{manifest} lists {rel!r}, which is not a file of the checkpoint; {START_OVER}")
        path = directory / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing ({manifest} records it); restore it, "
                                  f"or {START_OVER}")
        if file_sha256(path) != digest:
            raise CheckpointError(f"checkpoint file {path} is corrupt or truncated, or was changed after the "
                                  f"checkpoint was written: it does not match the sha256 recorded in {manifest}, and a "
                                  "resumed run would continue from another state than the saved one; restore the "
                                  f"original file, or {START_OVER}")


def _verify_config(run_dir: Path, directory: Path, manifest: dict[str, Any]) -> None:
    path = run_dir / "config.json"
    recorded = manifest.get("config")
    if not isinstance(recorded, dict) or not path.is_file():
        return  # nothing recorded to compare, or no config to compare it with (the caller needs one and says so)
    config = load_json(path)
    config = config if isinstance(config, dict) else {}
    # a section the manifest does not record was added to fedlora after the checkpoint was written
    changed = [s for s, digest in config_hashes(config).items() if s in recorded and recorded[s] != digest]
    if not changed:
        return
    then, now = manifest.get("method"), (config.get("algorithm") or {}).get("name")
    method = f" (the checkpoint was written by method {then!r}, {path} now says {now!r})" if then != now else ""
    raise CheckpointError(f"{path} differs from the config checkpoint {directory} was written with, in "
                          f"{', '.join(changed)}{method}: a resumed run would silently continue another experiment; "
                          f"put the original values back, or {START_OVER}")


def restore_server(server: ServerAlgorithm, ckpt: Checkpoint) -> None:
    """Load a checkpoint's server state into `server`. A key it lacks means another method or config wrote it
    (a checkpoint of an older fedlora records no config to compare): a CheckpointError, not a bare KeyError."""
    try:
        server.load_state_dict(ckpt.server_state)
    except KeyError as exc:
        raise CheckpointError(
            f"the server state in checkpoint {ckpt.directory} has no {exc.args[0]!r}: the checkpoint was written by "
            f"another method or config than config.json now holds; resume with the config it was written with, "
            f"or {START_OVER}") from None
