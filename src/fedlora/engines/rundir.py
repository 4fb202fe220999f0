"""The run directory: creating it safely and logging into it."""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..core.errors import ConfigError

log = logging.getLogger("fedlora")


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create the run directory; an existing run is replaced only with `overwrite`, anything else never."""
    if run_dir.exists() and any(run_dir.iterdir()):
        is_run = (run_dir / "config.json").is_file() or any(run_dir.glob("*/config.json"))
        if not is_run:
            raise ConfigError(f"output_dir {run_dir} is not empty and is not a fedlora run directory; "
                              "choose an empty or new directory")
        # a run that failed before its first round holds nothing to lose: start it again without asking
        has_results = any(run_dir.glob("metrics.jsonl")) or any(run_dir.glob("*/metrics.jsonl")) \
            or (run_dir / "checkpoint").exists()
        if has_results and not overwrite:
            raise ConfigError(f"run directory {run_dir} already holds a run; continue it with --resume {run_dir} "
                              "(resume_experiment), replace it with --overwrite (overwrite=True), or choose "
                              "another output_dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


@contextmanager
def run_log(run_dir: Path):
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
    except Exception as exc:  # the reason goes into run.log too (the console shows it once, from the caller)
        file_handler.emit(logging.LogRecord("fedlora", logging.ERROR, __file__, 0, "run failed: %s: %s",
                                            (type(exc).__name__, exc), None))
        raise
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        log.propagate = propagate
        log.setLevel(level)
