"""engine.name = "flower-sim": fedlora's ServerApp and ClientApp on Flower's simulation runtime (Ray), one
virtual SuperNode per client, all on this machine."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..core.config import Config, build_config
from ..core.errors import ConfigError
from ..core.io import save_text
from ..engines.checkpoint import Checkpoint
from ..engines.results import RunResult
from ..engines.rundir import split_text, verbose
from .client_app import make_client_app
from .processes import outlived_by_nothing
from .server_app import make_server_app


def run_flower_simulation(cfg: Config, run_dir: Path, resume: Checkpoint | None = None,
                          records: list[dict] | None = None) -> RunResult:
    """Run a config on Flower's simulation runtime (Ray), one virtual SuperNode per client."""
    import os

    from flwr.simulation import run_simulation

    from ..data.federated import build_clients

    clients = build_clients(cfg.data, cfg.seed)
    save_text(run_dir / "clients.json", split_text(clients))  # the split, as every engine writes it
    n_clients = len(clients)
    cfg = build_config({**cfg.model_dump(), "engine": {**cfg.engine.model_dump(), "num_clients": n_clients}})
    cpus = cfg.engine.cpus or os.cpu_count() or 1
    gpus = torch.cuda.device_count() if cfg.engine.client_gpus else 0
    if cfg.engine.client_gpus and not gpus:
        raise ConfigError(f"engine.client_gpus={cfg.engine.client_gpus}, but torch sees no CUDA device here")
    # client_gpus < 1: that many ClientApps share one GPU (Ray schedules them by this fraction)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": float(cfg.engine.client_gpus)},
               "init_args": {"num_cpus": cpus, "num_gpus": gpus, "include_dashboard": False,
                             "log_to_driver": verbose()}}  # the actors' library noise (their run.log has fedlora's)
    # resumed: the server from its checkpoint, each virtual node from its node directory under the run directory
    with outlived_by_nothing(), flower_console(verbose()):  # Ray's processes end with the run, even if SIGKILLed
        run_simulation(server_app=make_server_app(cfg, resume, records), client_app=make_client_app(cfg),
                       num_supernodes=n_clients, backend_config=backend)
    return RunResult.from_run_dir(run_dir, cfg.algorithm.name)


@contextmanager
def flower_console(show: bool) -> Iterator[None]:
    """Flower's console lines (deprecation notices, Ray's start and stop) only with `--verbose`; its warnings still
    reach run.log, through the root logger that `run_log` writes there."""
    from flwr.common.logger import console_handler

    level = console_handler.level
    console_handler.setLevel(level if show else logging.ERROR)
    try:
        yield
    finally:
        console_handler.setLevel(level)


__all__ = ["run_flower_simulation"]
