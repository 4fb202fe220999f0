"""Shared fixtures: offline environment, tiny random models and tiny experiment configs."""

from __future__ import annotations

from fedlora.core.offline import use_offline

use_offline()  # before transformers is imported

import copy  # noqa: E402

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

TINY_CONFIG = {
    "name": "tiny",
    "seed": 0,
    "model": {"name": "tiny-bert"},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "data": {"dataset": "wordnet-demo", "tasks": ["noun_topic", "verb_class"], "clients_per_task": 2,
             "train_per_client": 48, "test_per_client": 24, "max_length": 48},
    "training": {"lr": 5e-3, "local_steps": 3, "batch_size": 8, "eval_batch_size": 32},
    "federation": {"rounds": 2},
    "algorithm": {"name": "fedit"},
    # one torch thread, as this process has: a run in a subprocess (the CLI, a Flower app) must round exactly as an
    # in-process run does, and 1 and 2 threads differ by ~1e-8 after a few rounds
    "engine": {"progress": False, "torch_threads": 1},
}


def flower_program(proc) -> str:
    """The Flower program a psutil process runs: flwr-serverapp, flwr-clientapp (also a fork of flower-local's
    fork server, `flower/superexec.py`, whose command line is the server's), fork-server, flower-supernode, ..."""
    import os

    import psutil

    try:
        cmdline = proc.cmdline()
        parent = proc.parent() if "--fork-server" in cmdline else None
        if "--fork-server" in cmdline:
            return "flwr-clientapp" if parent is not None and "--fork-server" in parent.cmdline() else "fork-server"
    except psutil.Error:
        return ""
    names = [os.path.basename(c) for c in cmdline[:2]]
    return next((n for n in names if n.startswith(("flwr-", "flower-"))), " ".join(cmdline[:2]))


def tiny_config(tmp_path, **sections) -> dict:
    """The tiny experiment config with sections updated (one level deep) and output under tmp_path."""
    cfg = copy.deepcopy(TINY_CONFIG)
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    cfg.setdefault("output_dir", str(tmp_path / "run"))
    return cfg


@pytest.fixture
def tiny_adapted():
    """A tiny random BERT classifier with LoRA (r=4) injected into query and value."""
    from fedlora.adapters import AdaptedModel
    from fedlora.adapters.base_models import load_base_model

    base = load_base_model("tiny-bert", None, 3, seed=0)
    return AdaptedModel(base.model, r=4, alpha=8, dropout=0.0), base.tokenizer


@pytest.fixture
def spy_trainable(monkeypatch):
    """Record the trainable parameter names of every local round."""
    from fedlora.training import Trainer

    seen: list[set[str]] = []
    original = Trainer.train

    def train(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append(set(self.last_trainable))
        return out

    monkeypatch.setattr(Trainer, "train", train)
    return seen


# `make test` runs the suite on two pytest-xdist workers (--dist loadgroup). Tests that start Flower (Ray, a
# SuperLink, SuperNodes, ClientApp processes) go to one worker, one after another: each of them already keeps
# the second core busy, and two at once would make their round timeouts race each other.
FLOWER_FILES = {"test_deployment.py", "test_deployment_security.py", "test_deployment_lifecycle.py", "test_flower.py",
                "test_flower_hostile.py", "test_benchmarks.py", "test_node_state.py"}


# tryfirst: xdist's worker reads the xdist_group marks in its own modifyitems hook, which pluggy would otherwise
# call before this conftest's (the later-registered plugin runs first).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put every test that starts Flower into one xdist group (one worker, one at a time)."""
    for item in items:
        if is_flower_test(item):
            item.add_marker(pytest.mark.xdist_group("flower"))


def is_flower_test(item: pytest.Item) -> bool:
    """Whether a test starts Flower processes (by its file or its name)."""
    return item.path.name in FLOWER_FILES or "flower" in item.name or "deployment" in item.name


@pytest.fixture(autouse=True)
def one_flower_test_at_a_time(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Hold a lock shared by every worker while a Flower test runs.

    The xdist group is the fast path (no worker waits); this lock is the guarantee, should the grouping be
    lost again (a pytest or xdist upgrade, or a plain `-n 2 --dist load`).
    """
    if not is_flower_test(request.node):
        yield
        return
    # Every worker's basetemp is popen-gwK under the run's own directory: its parent is shared by the workers.
    with FileLock(tmp_path_factory.getbasetemp().parent / "flower.lock"):
        yield


def sigkill_when(cli, ready, what: str, timeout: float = 300) -> dict:
    """Record the process tree of `cli` (a Popen) until `ready(seen)` holds, then SIGKILL it: {pid: process} seen."""
    import signal
    import time

    import psutil

    def tree() -> list:
        try:
            return psutil.Process(cli.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    seen: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while not ready(seen):
            assert cli.poll() is None, f"the run ended before {what}"
            assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
            seen.update({p.pid: p for p in tree()})
            time.sleep(0.2)
        seen.update({p.pid: p for p in tree()})
    finally:
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=30)
    return seen


def run_killed_in_round(monkeypatch, config: dict, rnd: int) -> None:
    """Run `config` in process until its clients start round `rnd`, then kill it (KeyboardInterrupt, as a SIGINT)."""
    from fedlora import run_experiment
    from fedlora.engines.runtime import ClientRuntime

    original = ClientRuntime.fit

    def killed(self, cid, at, payload, state):
        if at == rnd:
            raise KeyboardInterrupt
        return original(self, cid, at, payload, state)

    monkeypatch.setattr(ClientRuntime, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config)
    monkeypatch.setattr(ClientRuntime, "fit", original)

