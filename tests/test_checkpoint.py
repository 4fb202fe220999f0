"""Checkpoint and resume: a run killed after round k and resumed ends exactly like an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from fedlora import resume_experiment, run_experiment
from fedlora.core.errors import CheckpointError

from .conftest import run_killed_in_round, tiny_config

CASES = [("fedit", {}), ("fedalt", {}), ("fedlease", {"warmup_rounds": 2}),
         ("fdlora", {"fusion_budget": 4, "fusion_examples": 8, "sync_every": 2}), ("flora", {}), ("fedex", {}),
         ("flexlora", {}), ("rolora", {})]
CLIENTS = {m: {"clients": {"lora_r": [2, 4, 2, 4]}} for m in ("flora", "flexlora")}  # heterogeneous ranks


def _without_times(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "fit_seconds", "cpu_seconds")} for r in records]


def _assert_same_states(a, b):
    assert set(a) == set(b)
    for cid in a:
        assert set(a[cid].states) == set(b[cid].states)
        for name, state in a[cid].states.items():
            assert all(torch.equal(state[k], b[cid].states[name][k]) for k in state), (cid, name)


@pytest.mark.parametrize("method,options", CASES)
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, method, options):
    make = lambda out: tiny_config(tmp_path, output_dir=str(tmp_path / out), federation={"rounds": 4},  # noqa: E731
                                   training={"reset_optimizer": method != "fedit"},
                                   algorithm={"name": method, "options": options}, **CLIENTS.get(method, {}))
    full = run_experiment(make("full"))
    run_killed_in_round(monkeypatch, make("killed"), 3)  # the process is killed mid-round
    resumed = resume_experiment(tmp_path / "killed")
    assert [r["round"] for r in resumed.rounds] == [0, 1, 2, 3, 4]
    assert _without_times(resumed.rounds) == _without_times(full.rounds)
    _assert_same_states(resumed.client_states, full.client_states)
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5


def test_corrupt_checkpoint_is_refused_and_nothing_is_lost(tmp_path):
    cfg = tiny_config(tmp_path, federation={"rounds": 2})
    run_experiment(cfg)
    run_dir = tmp_path / "run"
    victim = next((run_dir / "checkpoint").glob("round-*/clients/*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:100])
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "run.log"}
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        resume_experiment(run_dir)
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "run.log"}
    assert before == after
    (run_dir / "checkpoint" / "latest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        resume_experiment(run_dir)
    with pytest.raises(CheckpointError, match="not a fedlora run directory"):
        resume_experiment(tmp_path)


def test_a_lost_latest_json_resumes_from_the_newest_verified_round_and_deletes_nothing(tmp_path):
    """#37: without checkpoint/latest.json a resume once deleted an intact round-00003 and started over."""
    run_experiment(tiny_config(tmp_path, federation={"rounds": 3}))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint" / "latest.json").unlink()
    trained = (run_dir / "metrics.jsonl").read_text()
    result = resume_experiment(run_dir, rounds=4)
    assert [r["round"] for r in result.rounds] == [0, 1, 2, 3, 4]
    assert (run_dir / "metrics.jsonl").read_text().startswith(trained)  # rounds 1-3 were not trained again
    assert "resuming from" in (run_dir / "run.log").read_text() and "round-00003" in (run_dir / "run.log").read_text()
    reference = run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "four"), federation={"rounds": 4}))
    assert _without_times(result.rounds) == _without_times(reference.rounds)
    # a lost latest.json over a damaged round: refused, the round kept as it is
    (run_dir / "checkpoint" / "latest.json").unlink()
    victim = next((run_dir / "checkpoint").glob("round-*/server.safetensors"))
    victim.write_bytes(victim.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        resume_experiment(run_dir)
    assert victim.is_file()


@pytest.mark.parametrize("method", ["fedit", "fedlease"])
def test_a_run_extended_on_resume_equals_a_run_started_with_the_rounds(tmp_path, method):
    from fedlora.cli import main

    options = {"warmup_rounds": 2} if method == "fedlease" else {}
    make = lambda out, rounds: tiny_config(tmp_path, output_dir=str(tmp_path / out), federation={"rounds": rounds},  # noqa: E731
                                           algorithm={"name": method, "options": options})
    six = run_experiment(make("six", 6))
    run_experiment(make("four", 4))
    assert main(["run", "--resume", str(tmp_path / "four"), "--set", "federation.rounds=6", "--quiet"]) == 0
    extended = resume_experiment(tmp_path / "four")  # a finished run resumes to itself
    assert _without_times(extended.rounds) == _without_times(six.rounds)
    _assert_same_states(extended.client_states, six.client_states)
    with pytest.raises(Exception, match="cannot undo them"):
        resume_experiment(tmp_path / "four", rounds=3)


def test_the_fused_adamw_of_cuda_trains_as_the_plain_one_with_moments_kept(tmp_path, monkeypatch):
    """CUDA's fused AdamW (forced here on the CPU, where torch has it too) keeps `step` beside the parameters:
    moments carried over rounds must load into it, and it must train as the per-tensor AdamW does."""
    from fedlora.training import trainer

    make = lambda out: tiny_config(tmp_path, output_dir=str(tmp_path / out), federation={"rounds": 3},  # noqa: E731
                                   training={"reset_optimizer": False}, algorithm={"name": "fedalt"})
    plain = run_experiment(make("plain"))
    built = []
    original = torch.optim.AdamW

    def recording(*args, **kwargs):
        built.append(kwargs.get("fused"))
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "fused_adamw", lambda device: True)
    monkeypatch.setattr(torch.optim, "AdamW", recording)
    fused = run_experiment(make("fused"))
    assert built and all(built)
    for cid, state in plain.client_states.items():
        for name, tensors in state.states.items():
            for key, value in tensors.items():
                torch.testing.assert_close(fused.client_states[cid].states[name][key], value, atol=1e-5, rtol=1e-4)


def test_a_rehashed_client_file_without_its_head_is_refused_at_resume_not_failed_every_round(tmp_path):
    """#37: a client file lacking classifier.bias whose manifest was re-hashed once failed that client every round."""
    import json

    from fedlora.core.io import file_sha256, load_tensors, save_tensors

    run_experiment(tiny_config(tmp_path, federation={"rounds": 1}))
    directory = next((tmp_path / "run" / "checkpoint").glob("round-*"))
    victim = next((directory / "clients").glob("*.safetensors"))
    tensors = load_tensors(victim)
    save_tensors(victim, {k: v for k, v in tensors.items() if not k.endswith("classifier.bias")})
    manifest = json.loads((directory / "round.json").read_text())
    manifest["files"][f"clients/{victim.name}"] = file_sha256(victim)
    (directory / "round.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"client {victim.stem}'s head in .*missing keys"):
        resume_experiment(tmp_path / "run", rounds=2)


def test_defences_switched_off_between_a_stop_and_its_resume_are_refused(tmp_path):
    """#37: federation.update_clip switched off in config.json before a resume was accepted silently."""
    import json

    run_experiment(tiny_config(tmp_path, federation={"rounds": 1, "update_clip": "adaptive"}))
    path = tmp_path / "run" / "config.json"
    config = json.loads(path.read_text())
    config["federation"]["update_clip"] = None
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"differs from the config .* in federation \(defences\)"):
        resume_experiment(tmp_path / "run", rounds=2)
    config["federation"]["update_clip"] = "adaptive"
    path.write_text(json.dumps(config))
    assert [r["round"] for r in resume_experiment(tmp_path / "run", rounds=2).rounds] == [0, 1, 2]
