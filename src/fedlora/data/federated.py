"""Turn a dataset into per-client train/test splits: the federated view every method shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..core.config import DataConfig
from ..core.errors import DataError
from ..core.seeding import numpy_rng
from .partition import dirichlet, iid, train_test_split
from .records import Record, load_csv, load_jsonl

BUILTIN = {"wordnet-demo": "wordnet_demo.jsonl.gz"}


@dataclass
class ClientData:
    """One client's private data: its task, label names (classification) and disjoint splits."""

    client_id: str
    task: str
    train: list[Record]
    test: list[Record]
    labels: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """A JSON-able description (records included) for the run directory."""
        return {"client_id": self.client_id, "task": self.task, "labels": self.labels,
                "train": self.train, "test": self.test}


def load_records(dataset: str) -> list[Record]:
    """Records of a built-in dataset or a JSONL/CSV file."""
    if dataset in BUILTIN:
        with resources.as_file(resources.files("fedlora.data") / "assets" / BUILTIN[dataset]) as path:
            return load_jsonl(path)
    path = Path(dataset)
    if path.suffix in {".csv"}:
        return load_csv(path)
    if path.suffix in {".jsonl", ".gz", ".json"}:
        return load_jsonl(path)
    raise DataError(f"unknown dataset {dataset!r}: use one of {sorted(BUILTIN)} or a .jsonl/.csv file path")


def build_clients(cfg: DataConfig, seed: int) -> list[ClientData]:
    """Split a dataset into `clients_per_task` clients per task, each with disjoint train/test splits."""
    records = load_records(cfg.dataset)
    if not records:
        raise DataError(f"dataset {cfg.dataset!r} has no records")
    by_task: dict[str, list[Record]] = {}
    for r in records:
        by_task.setdefault(str(r.get("task", "task")), []).append(r)
    tasks = cfg.tasks or sorted(by_task)
    missing = [t for t in tasks if t not in by_task]
    if missing:
        raise DataError(f"tasks {missing} are not in dataset {cfg.dataset!r}; it has {sorted(by_task)}")
    clients: list[ClientData] = []
    for task in tasks:
        recs = by_task[task]
        is_classification = "label" in recs[0]
        labels = sorted({str(r["label"]) for r in recs}) if is_classification else []
        rng = numpy_rng(seed, "partition", task)
        if cfg.partition == "dirichlet" and is_classification:
            parts = dirichlet([r["label"] for r in recs], cfg.clients_per_task, cfg.dirichlet_alpha, rng, min_per_client=10)
        else:
            parts = iid(len(recs), cfg.clients_per_task, rng)
        for c, part in enumerate(parts):
            cid = f"{task}-{c}"
            train_idx, test_idx = train_test_split(part, cfg.train_per_client, cfg.test_per_client,
                                                   numpy_rng(seed, "split", cid))
            clients.append(ClientData(cid, task, [recs[i] for i in train_idx], [recs[i] for i in test_idx], labels))
    return clients
