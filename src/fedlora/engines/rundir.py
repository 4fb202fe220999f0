"""The run directory: creating it safely and logging into it."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from ..core.errors import ConfigError
from ..core.io import json_text

log = logging.getLogger("fedlora")


# every name fedlora writes at the top of a run (or compare) directory
RUN_ENTRIES = frozenset({"config.json", "clients.json", "metrics.jsonl", "run.log", "checkpoint", "report",
                         "exports", "federation", "compare.json",
                         "tensorboard", "wandb", "mlruns", "tracking.json",  # engines/tracking.py
                         "nodes", "nodes.json"})  # engines/nodestate.py: where the Flower nodes' states live
# core/io's atomic writes: `.<name>.<mkstemp's random part>.tmp`, left behind when a process is killed mid-write
_TEMP_FILE = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp")


def _temp_of_ours(name: str) -> bool:
    match = _TEMP_FILE.fullmatch(name)
    return match is not None and match["name"] in RUN_ENTRIES


def is_run_dir(run_dir: Path) -> bool:
    """Whether a directory holds a fedlora run: a config.json (its own or its methods'), or only fedlora's own
    files with at least one that nothing else writes (a temp file of ours, metrics.jsonl, a checkpoint): what a
    run killed while writing its config.json, or while being replaced, leaves behind."""
    if (run_dir / "config.json").is_file() or any(run_dir.glob("*/config.json")):
        return True
    names = [p.name for p in run_dir.iterdir()]
    own = all(n in RUN_ENTRIES or _temp_of_ours(n) for n in names)
    telling = any(_temp_of_ours(n) for n in names) or "metrics.jsonl" in names \
        or (run_dir / "checkpoint" / "latest.json").is_file()
    return own and telling


def holds_states(run_dir: Path) -> bool:
    """Whether trained state lies below the top of a run directory: a Flower node's (nodes/), or a flower-local
    ServerApp's checkpoint that a kill kept from moving up (federation/server*/checkpoint)."""
    nodes = run_dir / "nodes"
    return (nodes.is_dir() and any(nodes.iterdir())) or any(run_dir.glob("federation/server*/checkpoint"))


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create the run directory; an existing run is replaced only with `overwrite`, anything else never."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not is_run_dir(run_dir):
            raise ConfigError(f"output_dir {run_dir} is not empty and is not a fedlora run directory; "
                              "choose an empty or new directory")
        # a run that failed before its first round holds nothing to lose: start it again without asking
        has_results = any(run_dir.glob("metrics.jsonl")) or any(run_dir.glob("*/metrics.jsonl")) \
            or (run_dir / "checkpoint").exists() or holds_states(run_dir)
        if has_results and not overwrite:
            raise ConfigError(f"run directory {run_dir} already holds a run; continue it with --resume {run_dir} "
                              "(resume_experiment), replace it with --overwrite (overwrite=True), or choose "
                              "another output_dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def split_text(clients: list) -> str:
    """clients.json's text: the data split (each client's id, task, labels and example ids), as every engine and
    a checkpoint's manifest (its sha256) record it."""
    return json_text([c.to_json() for c in clients])


def lock_path(run_dir: Path) -> Path:
    """The lock file of a run directory: beside it (inside, `--overwrite` would delete it while held)."""
    run_dir = Path(run_dir).resolve()
    return run_dir.parent / f".{run_dir.name}.fedlora-lock"


@contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on a run directory while a command runs, resumes, exports or reports it: a second fedlora
    process is refused at once, naming the holder. The operating system releases the lock of a killed process
    (flock), so a stale lock is taken over by the next command."""
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=0, is_singleton=False)
    try:
        lock.acquire()
    except Timeout:
        holder = path.read_text().strip() if path.is_file() else ""
        raise ConfigError(f"run directory {run_dir} is in use by another fedlora process "
                          f"(pid {holder or 'unknown'}); wait for it to end (or stop it), or choose another "
                          "output_dir") from None
    try:
        path.write_text(f"{os.getpid()}\n")  # for the refusal above: the lock itself is the open file's flock
        yield
    finally:
        lock.release()


VERBOSE_ENV = "FEDLORA_VERBOSE"  # set by `--verbose`: other libraries' warnings on the console too


def verbose() -> bool:
    """Whether other libraries' warnings go to the console as well as to run.log (`--verbose`)."""
    return os.environ.get(VERBOSE_ENV) == "1"


@contextmanager
def run_log(run_dir: Path):
    """Everything to run.log; fedlora's warnings also to the console (not through the root logger, which libraries
    such as the GGUF loader configure and would otherwise echo every round). Other libraries' warnings (their
    loggers and `warnings.warn`: deprecations, optional kernels) go to run.log only, unless `--verbose`. Nested in a
    run_log of the same run (a simulation's ServerApp inside run_experiment's), it adds nothing: each line once."""
    path = (run_dir / "run.log").resolve()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in log.handlers):
        yield
        return
    file_handler = logging.FileHandler(run_dir / "run.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("fedlora: %(levelname)s: %(message)s"))
    libraries = logging.FileHandler(run_dir / "run.log")  # the root's: records of every other logger
    libraries.setLevel(logging.WARNING)
    libraries.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    library_console = logging.StreamHandler() if verbose() else logging.NullHandler()  # never Python's lastResort
    library_console.setLevel(logging.WARNING)
    handlers, propagate, level = [file_handler, console], log.propagate, log.level
    for h in handlers:
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    root = logging.getLogger()
    root.addHandler(libraries)
    root.addHandler(library_console)
    logging.captureWarnings(True)
    try:
        yield
    except Exception as exc:  # the reason goes into run.log too (the console shows it once, from the caller)
        file_handler.emit(logging.LogRecord("fedlora", logging.ERROR, __file__, 0, "run failed: %s: %s",
                                            (type(exc).__name__, exc), None))
        raise
    finally:
        logging.captureWarnings(False)
        for h in (libraries, library_console):
            root.removeHandler(h)
            h.close()
        for h in handlers:
            log.removeHandler(h)
            h.close()
        log.propagate = propagate
        log.setLevel(level)


@contextmanager
def progress_on_stdout():
    """The fedlora log's info lines (one per round, with its mean metrics) on stdout too, inside `run_log`.

    For a deployment's ServerApp: Flower 1.42's flwr-serverapp mirrors its process's stdout and stderr to the
    SuperLink, which streams them to `flwr run --stream` and `flwr log`; run_log's console shows warnings only."""
    handler = logging.StreamHandler(sys.stdout)  # Flower mirrors writes to this very object
    handler.setLevel(logging.INFO)
    handler.addFilter(lambda record: record.levelno < logging.WARNING)  # run_log's console shows those already
    handler.setFormatter(logging.Formatter("fedlora: %(message)s"))
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.flush()

