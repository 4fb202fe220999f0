"""The files of a run directory as untrusted input: client ids that would leave the directory, checkpoints
changed after they were written, damaged metrics.jsonl lines, fedlora's own leftover temp files and a run
killed before its first checkpoint (issue #22, findings 3, 7 and 8)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from fedlora import resume_experiment, run_experiment
from fedlora.algorithms import ClientState
from fedlora.core.errors import CheckpointError, ConfigError
from fedlora.core.io import load_tensors, save_json, save_tensors
from fedlora.engines.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedlora.engines.results import read_records
from fedlora.engines.rundir import prepare_run_dir

from .conftest import run_killed_in_round, tiny_config
from .test_checkpoint import _assert_same_states, _without_times


def _ckpt(*cids: str) -> Checkpoint:
    server = {"tensors": {"global": {"w": torch.ones(2, 2)}}, "meta": {"step": 1}}
    return Checkpoint(1, server, {cid: ClientState({"lora": {"w": torch.zeros(2)}}, {"n": 1}) for cid in cids})


def _round_dir(run_dir: Path) -> Path:
    return next((run_dir / "checkpoint").glob("round-*"))


def _strip_hashes(run_dir: Path) -> None:
    """Make the latest checkpoint look like one an older fedlora wrote (round.json = {"round": k})."""
    manifest = _round_dir(run_dir) / "round.json"
    save_json(manifest, {"round": json.loads(manifest.read_text())["round"]})


def _snapshot(run_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "run.log"}


# -- finding 3: client ids are file names -------------------------------------------------------------------

@pytest.mark.parametrize("cid", ["../other-run/checkpoint/x", "c" * 300, "", "a/b"])
def test_an_unsafe_client_id_is_refused_before_a_checkpoint_is_written(tmp_path, cid):
    with pytest.raises(ConfigError, match="not a safe name"):
        save_checkpoint(tmp_path / "run", _ckpt("ok-0", cid))
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing written anywhere, inside the run or beside it


def test_an_unsafe_client_id_in_clients_json_is_a_checkpoint_error(tmp_path):
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, _ckpt("c-0"))
    _strip_hashes(run_dir)  # an older checkpoint: no hash stops the edit, the name check must
    victim = tmp_path / "other" / "checkpoint" / "round-00001" / "clients" / "x.safetensors"
    save_tensors(victim, {"w": torch.ones(1)})
    clients = _round_dir(run_dir) / "clients.json"
    clients.write_text(json.dumps({"../../../../other/checkpoint/round-00001/clients/x": {}}))
    with pytest.raises(CheckpointError, match=r"clients\.json.*'\.\./\.\./\.\./\.\./other.*not a safe name"):
        load_checkpoint(run_dir)
    latest = run_dir / "checkpoint" / "latest.json"
    latest.write_text(json.dumps({"round": 1, "dir": "../../other/checkpoint/round-00001"}))
    with pytest.raises(CheckpointError, match="latest.json"):
        load_checkpoint(run_dir)


def test_a_checkpoint_round_trips_and_records_a_hash_per_file(tmp_path):
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, _ckpt("c-0", "c-1"))
    manifest = json.loads((_round_dir(run_dir) / "round.json").read_text())
    assert set(manifest["files"]) == {"server.safetensors", "server.json", "clients.json",
                                      "clients/c-0.safetensors", "clients/c-1.safetensors"}
    loaded = load_checkpoint(run_dir)
    assert loaded.round == 1 and set(loaded.client_states) == {"c-0", "c-1"}
    assert torch.equal(loaded.server_state["tensors"]["global"]["w"], torch.ones(2, 2))


# -- finding 7: checkpoints are verified on resume ----------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished two-round FedALT run, copied by each test that changes it."""
    tmp = tmp_path_factory.mktemp("finished")
    run_experiment(tiny_config(tmp, federation={"rounds": 2}, algorithm={"name": "fedalt"}))
    return tmp / "run"


@pytest.fixture
def run_dir(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def _overwrite_floats(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-64:] = b"\x00\x00\x80\x3f" * 16  # 16 float32 ones over the last tensor's data: still a valid file
    path.write_bytes(bytes(data))


def _wrong_shape(path: Path) -> None:
    tensors = load_tensors(path)
    key = min(tensors)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    save_tensors(path, tensors)


def _drop_client(path: Path) -> None:
    clients = json.loads(path.read_text())
    del clients[min(clients)]
    path.write_text(json.dumps(clients))


def _edit_config(run_dir: Path, section: str, key: str | None, value) -> None:
    config = json.loads((run_dir / "config.json").read_text())
    if key is None:
        config[section] = value
    else:
        config[section][key] = value
    (run_dir / "config.json").write_text(json.dumps(config))


def _client_file(run_dir: Path) -> Path:
    return min(_round_dir(run_dir).glob("clients/*.safetensors"))


def _named(edit, path: Path) -> str:
    """Apply `edit` to `path`; the pattern the refusal must match: the file, by its path in the run."""
    edit(path)
    return re.escape(str(path))


CHANGES = {  # each edits a copy of the finished run and returns what the refusal must name
    "overwritten floats": lambda d: _named(_overwrite_floats, _client_file(d)),
    "wrong shape": lambda d: _named(_wrong_shape, _client_file(d)),
    "client removed": lambda d: _named(_drop_client, _round_dir(d) / "clients.json"),
    "server state": lambda d: _named(_overwrite_floats, _round_dir(d) / "server.safetensors"),
    "clients_per_task": lambda d: _edit_config(d, "data", "clients_per_task", 1) or r"config\.json.*\bdata\b",
    "seed": lambda d: _edit_config(d, "seed", None, 7) or r"config\.json.*\bseed\b",
    "lora": lambda d: _edit_config(d, "lora", "alpha", 16) or r"config\.json.*\blora\b",
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_checkpoint_changed_after_it_was_written_is_refused_and_nothing_changes(run_dir, change):
    names = CHANGES[change](run_dir)
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match=names) as err:
        resume_experiment(run_dir)
    assert "--overwrite" in str(err.value)
    assert _snapshot(run_dir) == before


def test_another_method_in_config_json_is_refused_with_or_without_hashes(run_dir):
    _edit_config(run_dir, "algorithm", "name", "fedit")  # FedIT would look for 'global' in FedALT's state
    with pytest.raises(CheckpointError, match="written by method 'fedalt'.*config.json.*'fedit'"):
        resume_experiment(run_dir)
    _strip_hashes(run_dir)
    with pytest.raises(CheckpointError, match="another method or config"):
        resume_experiment(run_dir)


def test_a_split_that_no_longer_rebuilds_the_same_is_refused(run_dir, monkeypatch):
    from fedlora.engines import session

    original = session.build_clients

    def one_record_less(cfg, seed):  # the corpus on disk changed under the run
        clients = original(cfg, seed)
        clients[0].test.pop()
        return clients

    monkeypatch.setattr(session, "build_clients", one_record_less)
    with pytest.raises(CheckpointError, match=r"split.*clients\.json.*--overwrite"):
        resume_experiment(run_dir)


def test_a_checkpoint_of_an_older_fedlora_still_resumes_unverified(run_dir, finished):
    _strip_hashes(run_dir)
    _overwrite_floats(_client_file(run_dir))  # nothing can tell
    resumed = resume_experiment(run_dir)
    assert [r["round"] for r in resumed.rounds] == [0, 1, 2]
    assert "unverified" in (run_dir / "run.log").read_text()


# -- finding 8: messages where tracebacks were ----------------------------------------------------------------

def test_a_damaged_metrics_line_names_the_file_and_line(run_dir):
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl line 2 is not a JSON record"):
        read_records(run_dir)
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl line 2 is not a JSON record"):
        resume_experiment(run_dir)
    assert _snapshot(run_dir) == before


def test_resume_drops_a_last_line_cut_off_mid_write(run_dir):
    metrics = run_dir / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"round": 3, "fit": {"noun_')  # a kill mid-append leaves no newline
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl line 4 .*cut off"):
        read_records(run_dir)  # a report does not guess
    resumed = resume_experiment(run_dir)
    assert [r["round"] for r in resumed.rounds] == [0, 1, 2]
    assert metrics.read_text() == whole
    assert "line 4" in (run_dir / "run.log").read_text()


def test_leftover_temp_files_of_fedlora_do_not_make_a_directory_foreign(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".config.json.k2j_3h4x.tmp").write_text('{"na')  # killed while writing config.json
    prepare_run_dir(run_dir, overwrite=True)
    assert run_dir.is_dir() and not any(run_dir.iterdir())
    (run_dir / ".config.json.abcd1234.tmp").write_text("")
    prepare_run_dir(run_dir, overwrite=False)  # temp files only: nothing to lose
    assert not any(run_dir.iterdir())
    (run_dir / "run.log").write_text("someone else's log")  # a name alone does not make a run directory
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="not a fedlora run directory"):
            prepare_run_dir(run_dir, overwrite=overwrite)
    assert (run_dir / "run.log").read_text() == "someone else's log"


def test_a_run_killed_before_its_first_checkpoint_resumes_from_round_1(tmp_path, monkeypatch):
    make = lambda out: tiny_config(tmp_path, output_dir=str(tmp_path / out), federation={"rounds": 2})  # noqa: E731
    run_killed_in_round(monkeypatch, make("killed"), 1)
    killed = tmp_path / "killed"
    assert (killed / "metrics.jsonl").is_file() and not (killed / "checkpoint" / "latest.json").exists()
    with pytest.raises(ConfigError, match="already holds a run"):
        run_experiment(make("killed"))
    resumed = resume_experiment(killed)
    full = run_experiment(make("full"))
    assert _without_times(resumed.rounds) == _without_times(full.rounds)
    _assert_same_states(resumed.client_states, full.client_states)
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 3
    assert "starting it over from round 1" in (killed / "run.log").read_text()
