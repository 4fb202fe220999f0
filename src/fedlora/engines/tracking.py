"""Experiment tracking (`tracking = ["tensorboard", "wandb", "mlflow"]`): every round's record, sent to the
trackers a config names, through their own libraries (HF Trainer's `report_to`).

Each backend imports its library only when configured; a missing library or a tracker that cannot start is a
ConfigError before any round runs. Once the rounds run, a tracker that fails is disabled with one warning: the
run itself (metrics.jsonl, checkpoints) never depends on a tracker.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from abc import ABC, abstractmethod
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable

from ..core.config import Config
from ..core.errors import CheckpointError, ConfigError
from ..core.io import load_json, save_json
from .observers import Observer

log = logging.getLogger("fedlora")

INSTALL = 'pip install "fedlora[tracking]"'
IDS_FILE = "tracking.json"  # the W&B and MLflow run ids of this run directory, so a resumed run continues them
MLFLOW_PARAM_LIMIT = 500  # MLflow's longest param value (older servers; newer ones allow more)


def record_scalars(record: dict) -> dict[str, float]:
    """The numbers of one round record, by tracker tag (eval/mean/accuracy, comm/bytes_up, privacy/epsilon, ...)."""
    out: dict[str, float] = {}
    summary = record.get("summary", {})
    _put(out, "eval/mean", summary.get("mean", {}))
    for task, metrics in summary.get("by_task", {}).items():
        _put(out, f"eval/{task or '_'}", metrics)
    # client ids come from outside: as given, they only ever name a metric, never a file
    for cid, metrics in record.get("eval", {}).items():
        _put(out, f"eval/client/{cid}", metrics)
    for cid, metrics in record.get("fit", {}).items():
        _put(out, f"fit/client/{cid}", metrics)
    _put(out, "comm", record.get("comm", {}))
    _put(out, "privacy", record.get("privacy", {}))
    _put(out, "round", {"seconds": record.get("seconds")})
    if "failures" in record:  # round 0 (the untrained evaluation) fits nobody: no count to give
        out["round/failures"] = float(len(record["failures"]))
    if "eval_failures" in record:
        out["round/eval_failures"] = float(len(record["eval_failures"]))
    return out


def _put(out: dict[str, float], prefix: str, metrics: Any) -> None:
    if not isinstance(metrics, dict):
        return
    for key, value in metrics.items():
        # numbers only: bools, None (an unbounded epsilon, shown as inf) and strings are no scalar
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = float(value)


def flat_config(config: Config) -> dict[str, Any]:
    """The config as one level of dotted keys (lists as JSON), the hyperparameters trackers show."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else value

    walk("", config.model_dump(mode="json"))
    return out


class Backend(ABC):
    """One tracker: opened before the rounds, given each record's scalars, closed after the run."""

    name: str

    @abstractmethod
    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Log the scalars of round `step`."""

    @abstractmethod
    def close(self, failed: bool) -> None:
        """Flush and end the tracker's run (`failed`: the run stopped on an error)."""


class TensorBoardBackend(Backend):
    """torch's SummaryWriter under <run_dir>/tensorboard (HF Trainer's logging dir under output_dir)."""

    name = "tensorboard"

    def __init__(self, config: Config, run_dir: Path, ids: dict[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer_class, self.log_dir, self.config = SummaryWriter, run_dir / "tensorboard", config
        self.resumed = self.log_dir.is_dir() and any(self.log_dir.glob("events.out.tfevents.*"))
        self.writer: Any = None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:
            # opened at the first record: a resumed run's purge_step hides what the stopped run logged after
            # its checkpoint (those rounds are run again)
            self.writer = self.writer_class(str(self.log_dir), purge_step=step if self.resumed else None)
            if not self.resumed:
                text = json.dumps(self.config.model_dump(mode="json"), indent=2)
                self.writer.add_text("config", "```json\n" + text + "\n```", 0)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # each round readable at once, as metrics.jsonl is

    def close(self, failed: bool) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbBackend(Backend):
    """A W&B run in <run_dir>/wandb; WANDB_MODE=offline works without network (`wandb sync` uploads later)."""

    name = "wandb"

    def __init__(self, config: Config, run_dir: Path, ids: dict[str, str]) -> None:
        import wandb

        # a resumed run continues the W&B run its start created; a new one gets its id from W&B
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fedlora"), name=config.name,
                              id=ids.get("wandb"), resume="allow" if ids.get("wandb") else None,
                              dir=str(run_dir), mode=os.environ.get("WANDB_MODE"))
        ids["wandb"] = self.run.id
        # allow_val_change: a resume may extend federation.rounds
        self.run.config.update(flat_config(config), allow_val_change=True)
        # rounds as their own x axis: W&B's own step must only grow, and a resume runs a round again
        self.run.define_metric("round")
        self.run.define_metric("*", step_metric="round")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({**scalars, "round": step})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowBackend(Backend):
    """An MLflow run (experiment = config.name) at MLFLOW_TRACKING_URI, else a store of the run's own in
    <run_dir>/mlruns: SQLite (mlflow.db), as MLflow 3 refuses its file store by default (maintenance mode)."""

    name = "mlflow"

    def __init__(self, config: Config, run_dir: Path, ids: dict[str, str]) -> None:
        from mlflow.entities import Metric, Param, RunStatus
        from mlflow.tracking import MlflowClient

        self.Metric, self.RunStatus = Metric, RunStatus
        remote, store = os.environ.get("MLFLOW_TRACKING_URI"), (run_dir / "mlruns").resolve()
        if not remote:
            store.mkdir(parents=True, exist_ok=True)
        # a client of its own, not mlflow's global active run: nothing else in the process is touched
        self.client = MlflowClient(tracking_uri=remote or f"sqlite:///{store / 'mlflow.db'}")
        if ids.get("mlflow"):
            self.run_id = ids["mlflow"]
            self.client.update_run(self.run_id, status="RUNNING")
            return  # its params were logged when it started (MLflow refuses a changed param value)
        experiment = self.client.get_experiment_by_name(config.name)
        # artifacts (none logged by fedlora; a user's own) stay in the run directory, not the working directory
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            config.name, artifact_location=None if remote else (store / "artifacts").as_uri())
        self.run_id = ids["mlflow"] = self.client.create_run(experiment_id, run_name=config.name).info.run_id
        params = [Param(k, str(v)[:MLFLOW_PARAM_LIMIT]) for k, v in flat_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit on params
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [self.Metric(k, v, now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit on metrics
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self, failed: bool) -> None:
        status = self.RunStatus.FAILED if failed else self.RunStatus.FINISHED
        self.client.set_terminated(self.run_id, self.RunStatus.to_string(status))


BACKENDS = {"tensorboard": ("tensorboard", TensorBoardBackend), "wandb": ("wandb", WandbBackend),
            "mlflow": ("mlflow", MlflowBackend)}  # config name -> (the package to install, backend)


class Tracker(Observer):
    """Sends each round's record to the configured trackers; with none configured it does nothing."""

    def __init__(self, config: Config, run_dir: Path, backends: list[Backend] | None = None) -> None:
        self.config, self.run_dir = config, run_dir
        self.backends: list[Backend] = list(backends or [])

    def log_record(self, record: dict) -> None:
        """Log one round's record (metrics.jsonl's line)."""
        if not self.backends:
            return
        scalars = record_scalars(record)
        for backend in list(self.backends):
            self._guard(backend, f"logging round {record['round']}", lambda: backend.log(record["round"], scalars))

    def after_round(self, record: dict) -> None:
        """Log the round's record."""
        self.log_record(record)

    def close(self) -> None:
        """Flush and close every tracker."""
        # called in the loop's finally: an exception on its way out means the run failed
        failed = sys.exc_info()[0] is not None
        for backend in list(self.backends):
            self._guard(backend, "closing", lambda: backend.close(failed), closing=True)
        self.backends = []

    def _guard(self, backend: Backend, what: str, call: Callable[[], None], closing: bool = False) -> None:
        try:
            call()
        except Exception as exc:  # a tracker's failure must never lose the run: warn once, then leave it out
            log.warning("tracking: %s failed while %s (%s: %s); it is disabled for the rest of this run",
                        backend.name, what, type(exc).__name__, exc)
            self.backends.remove(backend)
            if not closing:
                with suppress(Exception):  # best effort: release its files and W&B's service process
                    backend.close(True)


def open_tracker(config: Config, run_dir: Path) -> Tracker:
    """The tracker of a run (its backends are imported only when configured)."""
    names = list(dict.fromkeys(config.tracking))  # each once, in the config's order
    if not names:
        return Tracker(config, run_dir)
    ids_path = run_dir / IDS_FILE
    ids = load_json(ids_path) if ids_path.is_file() else {}
    if not isinstance(ids, dict):
        raise CheckpointError(f"{ids_path} is not a JSON object of tracker run ids; delete it to start new ones")
    backends: list[Backend] = []
    try:
        for name in names:
            package, backend_class = BACKENDS[name]
            try:
                backend = backend_class(config, run_dir, ids)
            except ImportError as exc:
                raise ConfigError(f"tracking = {name!r} needs the {package} package, which is not installed "
                                  f"({exc}); install it with `{INSTALL}` or `pip install {package}`, or "
                                  f"remove {name!r} from tracking") from exc
            except Exception as exc:  # before any round: better stop now than run without the tracker asked for
                raise ConfigError(f"tracking = {name!r} could not start ({type(exc).__name__}: {exc}); fix it "
                                  f"or remove {name!r} from tracking") from exc
            backends.append(backend)
    except BaseException:
        Tracker(config, run_dir, backends).close()
        raise
    if ids:
        save_json(ids_path, ids)
    return Tracker(config, run_dir, backends)
