"""Experiment tracking (issue #21 item 13): TensorBoard event files, W&B offline runs and MLflow runs that read
back what metrics.jsonl holds; a missing library stops the run before its first round; a failing tracker is
disabled and the run goes on."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fedlora import resume_experiment, run_experiment
from fedlora.core.config import build_config
from fedlora.core.errors import ConfigError
from fedlora.engines import tracking
from fedlora.engines.results import read_records
from fedlora.engines.runtime import ClientRuntime
from fedlora.engines.tracking import MLFLOW_PARAM_LIMIT, flat_config, record_scalars

from .conftest import tiny_config

HAS = {name: importlib.util.find_spec(name) is not None for name in ("tensorboard", "wandb", "mlflow")}
needs = {name: pytest.mark.skipif(not found, reason=f"{name} is not installed (the tracking extra)")
         for name, found in HAS.items()}


@pytest.fixture(autouse=True)
def tracker_env(tmp_path, monkeypatch):
    """W&B offline with its config and cache under tmp_path; MLflow's store the run's own."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _means(run_dir: Path, metric: str = "accuracy") -> list[tuple[int, float]]:
    return [(r["round"], r["summary"]["mean"][metric]) for r in read_records(run_dir)]


def _tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return events


# -- the record as scalars -------------------------------------------------------------------------------------

RECORD = {
    "round": 3, "sampled": ["a", "b"],
    "fit": {"a": {"train_loss": 0.5, "steps": 3, "bytes_up": 100, "bytes_down": 200}},
    "failures": {"b": "timed out"},
    "comm": {"bytes_up": 100, "bytes_down": 200},
    "server": {"assignment": {"a": 0}},
    "eval": {"a": {"accuracy": 0.5}, "client with spaces": {"accuracy": 1.0}},
    "summary": {"mean": {"accuracy": 0.75}, "by_task": {"t1": {"accuracy": 0.5}, "t2": {"accuracy": 1.0}}},
    "diagnostics": {"a": {"cluster": 1}},
    "privacy": {"epsilon": 2.5, "delta": 1e-5, "noise_multiplier": 1.1},
    "seconds": 1.25,
}


def test_a_record_becomes_scalars_by_round_metric_task_client_communication_and_privacy():
    assert record_scalars(RECORD) == {
        "eval/mean/accuracy": 0.75, "eval/t1/accuracy": 0.5, "eval/t2/accuracy": 1.0,
        "eval/client/a/accuracy": 0.5, "eval/client/client with spaces/accuracy": 1.0,
        "fit/client/a/train_loss": 0.5, "fit/client/a/steps": 3.0, "fit/client/a/bytes_up": 100.0,
        "fit/client/a/bytes_down": 200.0, "comm/bytes_up": 100.0, "comm/bytes_down": 200.0,
        "privacy/epsilon": 2.5, "privacy/delta": 1e-5, "privacy/noise_multiplier": 1.1,
        "round/seconds": 1.25, "round/failures": 1.0}


def test_round_zero_and_an_unknown_epsilon_give_only_what_is_there():
    record = {"round": 0, "eval": {"a": {"accuracy": 0.1}}, "summary": {"mean": {"accuracy": 0.1}, "by_task": {}},
              "privacy": {"epsilon": None, "delta": 1e-5}, "eval_failures": {"b": "diverged"}}
    assert record_scalars(record) == {"eval/mean/accuracy": 0.1, "eval/client/a/accuracy": 0.1,
                                      "privacy/delta": 1e-5, "round/eval_failures": 1.0}


def test_the_config_is_flattened_for_hyperparameters(tmp_path):
    flat = flat_config(build_config(tiny_config(tmp_path, tracking=["tensorboard"])))
    assert flat["federation.rounds"] == 2 and flat["model.name"] == "tiny-bert"
    assert flat["tracking"] == '["tensorboard"]' and flat["data.tasks"] == '["noun_topic", "verb_class"]'
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in flat.values())


def test_no_tracking_imports_no_tracker_library(tmp_path, monkeypatch):
    for name in ("torch.utils.tensorboard", "wandb", "mlflow"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of them would now fail
    tracker = tracking.open_tracker(build_config(tiny_config(tmp_path)), tmp_path)
    tracker.log_record(RECORD)
    tracker.close()
    assert not tracker.backends and not list(tmp_path.iterdir())


# -- real runs ----------------------------------------------------------------------------------------------------

@needs["tensorboard"]
def test_tensorboard_event_files_read_back_the_rounds_of_metrics_jsonl(tmp_path):
    result = run_experiment(tiny_config(tmp_path, tracking=["tensorboard"]))
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    events = _tensorboard(result.run_dir)
    scalars = set(events.Tags()["scalars"])
    records = read_records(result.run_dir)
    cids, tasks = sorted(records[-1]["eval"]), sorted(records[-1]["summary"]["by_task"])
    assert {"eval/mean/accuracy", "eval/mean/loss", "comm/bytes_up", "comm/bytes_down", "round/seconds",
            "round/failures"} <= scalars
    assert {f"eval/{t}/accuracy" for t in tasks} | {f"eval/client/{c}/accuracy" for c in cids} <= scalars
    assert {f"fit/client/{c}/bytes_up" for c in cids} | {f"fit/client/{c}/train_loss" for c in cids} <= scalars
    for tag, key in (("eval/mean/accuracy", "accuracy"), ("eval/mean/loss", "loss")):
        logged = [(s.step, s.value) for s in events.Scalars(tag)]
        assert [s for s, _ in logged] == [0, 1, 2]
        assert [v for _, v in logged] == pytest.approx([v for _, v in _means(result.run_dir, key)], rel=1e-6)
    comm = [(s.step, s.value) for s in events.Scalars("comm/bytes_up")]
    assert comm == [(r["round"], r["comm"]["bytes_up"]) for r in records[1:]]
    assert "config/text_summary" in events.Tags()["tensors"]  # the config, once


@pytest.mark.parametrize("name,module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb"),
                                         ("mlflow", "mlflow")])
def test_a_missing_tracker_library_is_a_config_error_before_any_round(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError, as if not installed
    evaluated = []
    monkeypatch.setattr(ClientRuntime, "evaluate", lambda *a, **k: evaluated.append(a))
    with pytest.raises(ConfigError, match=rf"tracking = '{name}' needs the {name} package.*"
                                          r'pip install "fedlora\[tracking\]"'):
        run_experiment(tiny_config(tmp_path, tracking=[name]))
    assert not evaluated and not (tmp_path / "run" / "metrics.jsonl").exists()


@needs["tensorboard"]
def test_a_tracker_that_fails_while_logging_is_disabled_and_the_run_completes(tmp_path, monkeypatch):
    calls = []

    def broken(self, step, scalars):
        calls.append(step)
        raise OSError("disk full")

    monkeypatch.setattr(tracking.TensorBoardBackend, "log", broken)
    result = run_experiment(tiny_config(tmp_path, tracking=["tensorboard"]))
    assert [r["round"] for r in result.rounds] == [0, 1, 2] and len(read_records(result.run_dir)) == 3
    assert calls == [0]  # disabled after its first failure
    warnings = [line for line in (result.run_dir / "run.log").read_text().splitlines()
                if "tracking: tensorboard failed" in line]
    assert len(warnings) == 1 and "OSError: disk full" in warnings[0] and "disabled" in warnings[0]


def _wandb_history(run_dir: Path) -> tuple[str, list[dict]]:
    """The run id and logged rows of an offline W&B run, read from its .wandb file (LevelDB's log format: 7-byte
    file header, 32 KiB blocks of records with a crc32/length/type header; W&B no longer ships a Python reader)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block, chunk, rows = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little left in the block for a header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a FULL record or the LAST piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return path.stem.removeprefix("run-"), rows


@needs["wandb"]
def test_wandb_offline_logs_the_mean_metric_of_every_round(tmp_path):
    result = run_experiment(tiny_config(tmp_path, tracking=["wandb"]))
    run_id, rows = _wandb_history(result.run_dir)
    assert json.loads((result.run_dir / "tracking.json").read_text())["wandb"] == run_id
    logged = [(row["round"], row["eval/mean/accuracy"]) for row in rows if "eval/mean/accuracy" in row]
    assert logged == _means(result.run_dir)
    assert rows[-1]["comm/bytes_up"] == read_records(result.run_dir)[-1]["comm"]["bytes_up"]


@needs["mlflow"]
def test_mlflow_logs_every_round_and_the_config_to_the_runs_own_store(tmp_path):
    from mlflow.tracking import MlflowClient

    result = run_experiment(tiny_config(tmp_path, name="tracked", tracking=["mlflow"]))
    client = MlflowClient(tracking_uri=f"sqlite:///{(result.run_dir / 'mlruns' / 'mlflow.db').resolve()}")
    run_id = json.loads((result.run_dir / "tracking.json").read_text())["mlflow"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert client.get_experiment(run.info.experiment_id).name == "tracked"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/mean/accuracy"))
    assert history == pytest.approx(_means(result.run_dir))
    assert run.data.params["federation.rounds"] == "2" and run.data.params["model.name"] == "tiny-bert"
    assert max(len(v) for v in run.data.params.values()) <= MLFLOW_PARAM_LIMIT


@needs["tensorboard"]
def test_a_resumed_run_continues_its_trackers_runs(tmp_path, monkeypatch):
    extra = [name for name in ("mlflow", "wandb") if HAS[name]]
    cfg = tiny_config(tmp_path, federation={"rounds": 4}, engine={"progress": False, "checkpoint_every": 2},
                      tracking=["tensorboard", *extra])
    original = ClientRuntime.fit

    def crash_in_round_4(self, cid, rnd, payload, state):
        if rnd == 4:
            raise KeyboardInterrupt  # killed mid-round: round 3 was logged, the checkpoint is round 2's
        return original(self, cid, rnd, payload, state)

    monkeypatch.setattr(ClientRuntime, "fit", crash_in_round_4)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    run_dir = tmp_path / "run"
    ids_file = run_dir / "tracking.json"  # written only by backends with run ids (W&B, MLflow)
    assert ids_file.exists() == bool(extra)
    ids = json.loads(ids_file.read_text()) if extra else {}
    client = None
    if "mlflow" in extra:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlruns' / 'mlflow.db').resolve()}")
        assert client.get_run(ids["mlflow"]).info.status == "FAILED"
    monkeypatch.setattr(ClientRuntime, "fit", original)
    resume_experiment(run_dir)
    assert (json.loads(ids_file.read_text()) if extra else {}) == ids
    means = _means(run_dir)
    logged = [(s.step, s.value) for s in _tensorboard(run_dir).Scalars("eval/mean/accuracy")]
    assert [s for s, _ in logged] == [0, 1, 2, 3, 4]  # the stopped run's round 3 purged, the resumed one's kept
    assert [v for _, v in logged] == pytest.approx([v for _, v in means], rel=1e-6)
    if client is not None:
        (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
        assert run.info.run_id == ids["mlflow"] and run.info.status == "FINISHED"
        history = sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "eval/mean/accuracy"))
        # MLflow keeps both loggings of the round run again; a resume repeats it exactly, so they are equal
        assert [s for s, _ in history] == [0, 1, 2, 3, 3, 4]
        assert dict(history) == pytest.approx(dict(means))
