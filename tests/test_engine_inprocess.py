"""End-to-end runs of local and fedit on a tiny random model: files, trainable sets, communication, determinism."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora import run_experiment
from fedlora.core.errors import ConfigError, DataError
from fedlora.engines.sampling import sample_clients

from .conftest import TINY_CONFIG, tiny_config


def _metrics(result):
    return [r["eval"] for r in result.evaluations()]


LORA_0 = {f"bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.0" for i in range(2) for m in ("query", "value") for ab in "AB"}
HEAD = {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("method", ["local", "fedit"])
def test_three_clients_three_rounds(tmp_path, method, spy_trainable):
    cfg = tiny_config(tmp_path, data={"tasks": ["noun_topic"], "clients_per_task": 3},
                      federation={"rounds": 3}, algorithm={"name": method})
    result = run_experiment(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2, 3]
    assert set(lines[-1]["eval"]) == {"noun_topic-0", "noun_topic-1", "noun_topic-2"}
    assert all(0 <= m["accuracy"] <= 1 for m in lines[-1]["eval"].values())
    assert len(spy_trainable) == 9 and all(s == LORA_0 | HEAD for s in spy_trainable)
    lora_bytes = 2 * 2 * (4 * 32 + 32 * 4) * 4  # 2 layers x (q, v) x r(d_in + d_out) fp32
    fit = lines[1]["fit"]["noun_topic-0"]
    if method == "local":
        assert fit["bytes_up"] == 0 and fit["bytes_down"] == 0
    else:
        assert fit["bytes_up"] == lora_bytes and fit["bytes_down"] == lora_bytes
        assert lines[1]["comm"]["bytes_up"] == 3 * lora_bytes
    for name in ("config.json", "clients.json", "run.log", "report/report.md", "checkpoint/latest.json",
                 "checkpoint/round-00003/server.safetensors", "checkpoint/round-00003/clients/noun_topic-0.safetensors"):
        assert (tmp_path / "run" / name).is_file(), name
    # the trained head is private: different per client after training
    heads = [result.client_states[c].states["_head"]["classifier.weight"] for c in result.client_states]
    assert not torch.equal(heads[0], heads[1])


def test_training_improves_on_the_untrained_start(tmp_path):
    cfg = tiny_config(tmp_path, federation={"rounds": 4}, training={"local_steps": 8}, algorithm={"name": "local"})
    result = run_experiment(cfg)
    first, last = result.evaluations()[0]["summary"]["mean"], result.final_mean
    assert last["loss"] < first["loss"]


def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    a = run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "a")))
    b = run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "b")))
    c = run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "c"), seed=1))
    assert _metrics(a) == _metrics(b)
    assert _metrics(a) != _metrics(c)
    assert (tmp_path / "a" / "clients.json").read_text() == (tmp_path / "b" / "clients.json").read_text()


def test_existing_run_dir_is_not_overwritten_by_accident(tmp_path):
    cfg = tiny_config(tmp_path, federation={"rounds": 1})
    run_experiment(cfg)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_experiment(cfg)
    run_experiment(cfg, overwrite=True)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a fedlora run directory"):
        run_experiment({**cfg, "output_dir": str(precious)}, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_a_run_that_failed_before_round_one_can_simply_be_started_again(tmp_path):
    cfg = tiny_config(tmp_path, federation={"rounds": 1}, data={"dataset": str(tmp_path / "missing.jsonl")})
    with pytest.raises(DataError, match="does not exist"):
        run_experiment(cfg)
    assert "run failed: DataError" in (tmp_path / "run" / "run.log").read_text()  # the reason is kept
    assert run_experiment({**cfg, "data": TINY_CONFIG["data"]}).rounds  # no --overwrite needed: nothing to lose


def test_sampling_is_seeded_and_partial():
    ids = [f"c{i}" for i in range(10)]
    a = sample_clients(ids, 4, seed=0, rnd=1)
    assert a == sample_clients(ids, 4, seed=0, rnd=1) and len(a) == 4
    assert a != sample_clients(ids, 4, seed=0, rnd=2)
    assert sample_clients(ids, None, 0, 1) == ids


def test_partial_participation_only_trains_sampled(tmp_path):
    cfg = tiny_config(tmp_path, federation={"rounds": 2, "clients_per_round": 2})
    result = run_experiment(cfg)
    for record in result.rounds[1:]:
        assert len(record["sampled"]) == 2 and set(record["fit"]) == set(record["sampled"])
