"""Turn a dataset or suite into per-client train/test splits: the federated view every method shares."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..core.config import DataConfig
from ..core.errors import DataError
from ..core.names import safe_name, sanitize_name
from ..core.seeding import numpy_rng
from .partition import by_key, dirichlet, iid, train_test_split
from .records import Record, load_csv, load_hf, load_jsonl
from .suites import SUITES

BUILTIN = {"wordnet-demo": "wordnet_demo.jsonl.gz"}
log = logging.getLogger("fedlora")


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


DEFAULT_CLIENTS_PER_TASK = 2

def load_records(cfg: DataConfig, seed: int) -> list[Record]:
    """Records of the configured suite, built-in dataset, file or HF dataset."""
    if cfg.suite:
        per_task = cfg.clients_per_task or DEFAULT_CLIENTS_PER_TASK
        pool = cfg.pool_per_task or 2 * per_task * (cfg.train_per_client + cfg.test_per_client)
        return SUITES[cfg.suite](pool, seed)
    name = cfg.dataset
    if name in BUILTIN:
        with resources.as_file(resources.files("fedlora.data") / "assets" / BUILTIN[name]) as path:
            return load_jsonl(path, cfg.fields)
    if name.startswith("hf:"):
        return load_hf(name.removeprefix("hf:"), cfg.hf_split, cfg.fields)
    if Path(name).suffix in {".csv", ".jsonl", ".gz", ".json"}:
        return load_file(name, cfg.fields)
    raise DataError(f"unknown dataset {name!r}: use a suite (data.suite = 'nlu' or 'nlg'), one of {sorted(BUILTIN)}, "
                    "a .jsonl/.csv file path, or hf:<dataset name or local directory>")


def load_file(path: str | Path, fields: dict[str, str] | None = None) -> list[Record]:
    """Records of a .jsonl(.gz)/.json or .csv file."""
    path = Path(path)
    if path.suffix == ".csv":
        return load_csv(path, fields)
    if path.suffix in {".jsonl", ".gz", ".json"}:
        return load_jsonl(path, fields)
    raise DataError(f"data file {path} is neither .jsonl(.gz) nor .csv")


def local_client(client_id: str, task: str, train_file: str | Path, test_file: str | Path | None = None,
                 fields: dict[str, str] | None = None) -> ClientData:
    """A data owner's own client from its files (a deployment's SuperNode): labels are those its files hold."""
    safe_name(client_id)
    train = load_file(train_file, fields)
    test = load_file(test_file, fields) if test_file else []
    if not train:
        raise DataError(f"client {client_id}: {train_file} holds no records")
    check_fields(train + test, f"client {client_id}'s files")
    labels = sorted({str(r["label"]) for r in train + test}) if "label" in train[0] else []
    client = ClientData(client_id, task, train, test, labels)
    warn_unseen_test_labels([client])
    return client


def check_fields(records: list[Record], where: str) -> None:
    """Every record must be classification ({"text", "label"}) or generation ({"prompt", "response"}), all alike;
    DataError names the first record that is not and the fields it has."""
    need = {"text", "label"} if "label" in records[0] else {"prompt", "response"}
    for i, r in enumerate(records):
        if not need <= r.keys():
            raise DataError(f"{where}: its record #{i} has fields {sorted(r)[:8]} but needs {sorted(need)} (classification: "
                            "text + label; generation: prompt + response); map your field names with data.fields, "
                            "e.g. data.fields = {text = 'sentence'}")


def unseen_test_labels(client: ClientData) -> int:
    """How many of a client's test examples carry a label that never occurs in its training split."""
    if not client.labels:
        return 0
    trained = {str(r["label"]) for r in client.train}
    return sum(str(r["label"]) not in trained for r in client.test)


def warn_unseen_test_labels(clients: list[ClientData]) -> dict[str, int]:
    """Log one warning counting, per client, the test examples whose label the client never trained on
    (the head knows every label of the task, so nothing fails, but such examples are hard); returns the counts."""
    counts = {c.client_id: n for c in clients if (n := unseen_test_labels(c))}
    if counts:
        log.warning("%d client(s) have test examples whose label never occurs in their own training split (the "
                    "task's head knows the label, but the client never trained on it; expected under strong label "
                    "skew, see data.dirichlet_alpha): %s", len(counts), counts)
    return counts


def label_names(records: list[Record], task: str) -> list[str]:
    """A task's label set as strings; labels that differ only in type (0 and "0") are refused, not merged."""
    by_name: dict[str, set[str]] = {}
    for r in records:
        by_name.setdefault(str(r["label"]), set()).add(type(r["label"]).__name__)
    mixed = {name: sorted(types) for name, types in by_name.items() if len(types) > 1}
    if mixed:
        shown = ", ".join(f"{name!r} as {' and '.join(types)}" for name, types in list(mixed.items())[:3])
        raise DataError(f"task {task!r} has labels that differ only in type ({shown}); fedlora compares labels as "
                        "text, so they would merge into one class: write every label the same way")
    return sorted(by_name)


def owner_names(task: str, owners: list[list[str]], prefix: bool) -> list[str]:
    """Client ids of a by_key split: a client holding one owner is named by it (sanitised; prefixed by the task
    when there are several tasks), a client holding several is `<task>-<i>`; every merge is reported."""
    names = []
    for i, held in enumerate(owners):
        if len(held) == 1:
            name = sanitize_name(held[0])
            names.append(sanitize_name(f"{task}-{name}") if prefix or name in names else name)
        else:
            names.append(safe_name(f"{task}-{i}", f"client id (task {task!r} + index)"))
            log.warning("task %r: client %s holds the %d owners %s (more owners than data.clients_per_task)",
                        task, names[-1], len(held), held)
    renamed = {o[0]: n for o, n in zip(owners, names) if len(o) == 1 and n != o[0]}
    if renamed:
        log.info("task %r: owners named as client ids %s", task, renamed)
    return names


def clients_per_task(cfg: DataConfig, task: str, recs: list[Record]) -> int:
    """How many clients split `task`: data.clients_per_task, else 2, or under by_key one per distinct key value
    (tasks may have different owner counts); more clients than a by_key task has key values is an error."""
    if cfg.partition != "by_key":
        return cfg.clients_per_task or DEFAULT_CLIENTS_PER_TASK
    if cfg.partition_key not in recs[0]:
        raise DataError(f"partition_key {cfg.partition_key!r} is not a field of task {task!r}: {sorted(recs[0])}")
    owners = len({str(r[cfg.partition_key]) for r in recs})
    if cfg.clients_per_task and cfg.clients_per_task > owners:
        raise DataError(f"task {task!r} has {owners} distinct {cfg.partition_key!r} value(s), too few for "
                        f"data.clients_per_task={cfg.clients_per_task} clients; lower it, or leave it unset for one "
                        "client per value")
    return cfg.clients_per_task or owners


def build_clients(cfg: DataConfig, seed: int) -> list[ClientData]:
    """Split the data into `clients_per_task` clients per task, each with disjoint train/test splits."""
    records = load_records(cfg, seed)
    if not records:
        raise DataError(f"dataset {cfg.suite or cfg.dataset!r} has no records")
    by_task: dict[str, list[Record]] = {}
    for r in records:
        by_task.setdefault(str(r.get("task", "task")), []).append(r)
    tasks = cfg.tasks or sorted(by_task)
    missing = [t for t in tasks if t not in by_task]
    if missing:
        raise DataError(f"tasks {missing} are not in dataset {cfg.suite or cfg.dataset!r}; it has {sorted(by_task)}")
    clients: list[ClientData] = []
    for task in tasks:
        recs = by_task[task]
        per_task = clients_per_task(cfg, task, recs)
        if len(recs) < 2 * per_task:
            fix = (f"lower data.clients_per_task to at most {len(recs) // 2} or add records" if len(recs) >= 2
                   else "add records")
            many = f"data.clients_per_task={per_task}" if cfg.clients_per_task else f"its {per_task}"
            raise DataError(f"task {task!r} has {len(recs)} record(s), too few for {many} clients with a train and a "
                            f"test example each; {fix}")
        check_fields(recs, f"task {task!r} of dataset {cfg.suite or cfg.dataset!r}")
        is_classification = "label" in recs[0]
        labels = label_names(recs, task) if is_classification else []
        rng = numpy_rng(seed, "partition", task)
        names = None
        if cfg.partition == "by_key":
            keys = [r[cfg.partition_key] for r in recs]
            parts = by_key(keys, per_task)
            names = owner_names(task, [sorted({str(keys[i]) for i in part}) for part in parts], len(tasks) > 1)
        elif cfg.partition == "dirichlet" and is_classification:
            size = min(cfg.train_per_client + cfg.test_per_client, len(recs) // per_task)
            parts = dirichlet([r["label"] for r in recs], per_task, cfg.dirichlet_alpha, size, rng)
        else:
            parts = iid(len(recs), per_task, rng)
        for c, part in enumerate(parts):
            cid = names[c] if names else safe_name(f"{task}-{c}", f"client id (task {task!r} + index)")
            if len(part) < 2:
                raise DataError(f"client {cid} gets {len(part)} of task {task!r}'s {len(recs)} records "
                                f"(data.partition={cfg.partition!r}) but needs a train and a test example; lower "
                                "data.clients_per_task or add records")
            train_idx, test_idx = train_test_split(part, cfg.train_per_client, cfg.test_per_client,
                                                   numpy_rng(seed, "split", cid))
            clients.append(ClientData(cid, task, [recs[i] for i in train_idx], [recs[i] for i in test_idx], labels))
    short = {c.client_id: (len(c.train), len(c.test)) for c in clients
             if len(c.train) < cfg.train_per_client or len(c.test) < cfg.test_per_client}
    if short:
        log.warning("%d clients have fewer than the requested %d train / %d test examples (their task cannot "
                    "supply more): %s", len(short), cfg.train_per_client,
                    cfg.test_per_client, short)
    warn_unseen_test_labels(clients)
    return clients
