"""fedlora's ServerApp: its main builds the method's server side, runs the handshake and the round loop
(`engines/loop.py federate` over a `transport.FlowerTransport`) into the run directory; a deployment's also claims that directory (new or empty) and
writes the report. The experiment comes from the run config (`config_from_run_config`) unless the app was built
with a config (simulation, `simulation.py`).
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..algorithms import ClientInfo
from ..core.config import Config, build_config
from ..core.errors import ConfigError
from ..engines.checkpoint import Checkpoint
from ..engines.nodestate import DEPLOYMENT, LOCAL_ENGINES, new_run_id, read_nodes, write_nodes
from ..engines.results import RunResult, headline_metric, read_records, results_table
from ..engines.rundir import is_run_dir, prepare_run_dir, progress_on_stdout, run_log
from ..engines.loop import federate
from ..engines.session import aggregation_of, check_run
from .handshake import handshake
from .patches import short_object_backoff
from .transport import FlowerTransport

log = logging.getLogger("fedlora")


def server_main(cfg: Config, grid: Grid, run_dir_ready: bool = False, resume: Checkpoint | None = None,
                records: list[dict] | None = None) -> None:
    """Build the method's server side, map nodes to clients, and run the round loop over Flower.

    A deployment's ServerApp (`run_dir_ready` False) creates its run directory with the CLI's guard, so it
    never writes into an existing run, and writes the report at the end; the simulation engine's caller
    (run_experiment) has done both already."""
    from ..core.io import save_json

    run_dir = cfg.run_dir
    if not run_dir_ready:  # a submission: nothing has checked its config yet
        check_run(cfg)
        _claim_run_dir(cfg)
    if cfg.engine.name not in LOCAL_ENGINES:  # the run directory records the engine that ran
        cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"name": DEPLOYMENT})})
    save_json(run_dir / "config.json", cfg.model_dump(mode="json"))
    # a deployment's ServerApp: its stdout is what `flwr run --stream` and `flwr log` show
    with run_log(run_dir), (nullcontext() if run_dir_ready else progress_on_stdout()):
        _serve(cfg, grid, run_dir, resume, records)
    if not run_dir_ready:
        _finish_submission(run_dir, cfg.algorithm.name)


def _finish_submission(run_dir: Path, method: str) -> None:
    """The end of a deployment's ServerApp: the run's report/, then the results table `fedlora run` prints, on
    stdout (so in `flwr run --stream` and `flwr log`)."""
    from rich.console import Console

    from ..reporting import write_report

    report = write_report(run_dir)
    result = RunResult(run_dir, method, read_records(run_dir))  # the records suffice: no checkpoint to load
    console = Console(file=sys.stdout, width=120)  # no terminal to measure: the stream is a pipe
    if result.evaluations():
        console.print(results_table({method: result}, headline_metric(result)))
    console.print(f"run directory: {run_dir}\nreport: {report}", highlight=False, soft_wrap=True)
    sys.stdout.flush()


def _claim_run_dir(cfg: Config) -> None:
    """Create a deployment's run directory; refuse one that is not empty, changing nothing in it."""
    if cfg.output_dir is None:  # a default under whatever directory the SuperExec runs in is no place to look
        raise ConfigError(f"the submission gives no output_dir: {NO_OUTPUT_DIR}")
    run_dir = cfg.run_dir
    # stricter than the CLI, which replaces a run that never finished a round: nobody at the SuperLink's
    # machine confirmed that, and a submission cannot pass --overwrite
    if run_dir.exists() and any(run_dir.iterdir()):
        what = "holds a fedlora run" if is_run_dir(run_dir) else "is not empty"
        raise ConfigError(f"output_dir {run_dir} {what}; the ServerApp writes only into a new or empty directory and "
                          f"left it untouched: {NO_OUTPUT_DIR}")
    prepare_run_dir(run_dir, overwrite=False)


NO_OUTPUT_DIR = ("give the run directory (on the SuperLink's machine; a new or empty one) when submitting the app: "
                 "flwr run APP_DIR CONNECTION --stream -c 'set.output_dir=\"/srv/fedlora/runs/NAME\"'")


def _serve(cfg: Config, grid: Grid, run_dir: Path, resume: Checkpoint | None = None,
           records: list[dict] | None = None) -> None:
    """The server side of the method, the handshake and the round loop, into `run_dir`."""
    from ..adapters import AdaptedModel
    from ..adapters.base_models import LoadOptions, load_base_model
    from ..algorithms import build

    # the server needs the adapted modules' shapes only: the base model without any client data, on the CPU
    base = load_base_model(cfg.model.name, cfg.model.objective, 2, cfg.model.dtype, cfg.seed,
                           LoadOptions("cpu", cfg.model.revision, cfg.model.trust_remote_code))
    spec = AdaptedModel(base.model, cfg.lora.r, cfg.lora.alpha, 0.0, cfg.lora.target_modules).spec
    server, _ = build(cfg.algorithm.name, cfg.algorithm.active_options, spec, cfg.seed, aggregation_of(cfg))
    admitted = admitted_ids(cfg)
    log.info("handshake: admitting client ids %s%s", ", ".join(admitted),
             f" (at most engine.num_clients={cfg.engine.num_clients})" if cfg.engine.num_clients else "")
    # the run directory the checkpoint belongs to (<run>/checkpoint/round-k): flower-local's ServerApp runs in
    # a directory of its own, next to the nodes' run
    recorded = read_nodes(resume.directory.parent.parent) if resume is not None and resume.directory else None
    # a resumed run keeps its id: its nodes then reload the states they kept for it
    run_id = str((recorded or {}).get("run") or new_run_id())
    started = time.monotonic()
    found = handshake(grid, cfg.engine.num_clients or 1, cfg.engine.handshake_timeout,
                      cfg.federation.min_clients, admitted, run_id)
    # the nodes' start-up (a node builds its model and data on its first message): benchmarks/engines.py reads it
    log.info("handshake: %d nodes answered in %.1f s", len(found), time.monotonic() - started)
    # the split's order where nodes use it, then client id (nodes with their own data all report 0)
    order = sorted(found, key=lambda cid: (found[cid][1]["order"], cid))
    cap = cfg.engine.num_clients
    for cid in order[cap:] if cap else []:  # never more clients than the operator asked for
        log.warning("handshake: node %s left out: it claims client %r, but engine.num_clients=%d are admitted "
                    "already", found[cid][0], cid, cap)
    order = order[:cap] if cap else order
    clients = [ClientInfo(cid, found[cid][1]["num_examples"], found[cid][1]["task"]) for cid in order]
    where = {**(recorded or {}).get("nodes", {}), **{cid: found[cid][1].get("state_dir") or "" for cid in order}}
    engine = cfg.engine.name if cfg.engine.name in LOCAL_ENGINES else DEPLOYMENT
    write_nodes(run_dir, engine, run_id, where)  # before round 1: a stopped run says where its states are
    transport = FlowerTransport(cfg, server, clients, grid, {cid: found[cid][0] for cid in order}, run_id)
    # the server state is checkpointed every round: a resumed run must find the round its nodes last trained
    result = federate(cfg.with_overrides(["engine.checkpoint_every=1"]), server, transport, clients, run_dir,
                      resume, records)
    if result.rounds:  # each node writes its personalized model after the last round into its state-dir
        transport.write_node_models(result.rounds[-1]["round"])


def admitted_ids(cfg: Config) -> list[str]:
    """The client ids a run admits: engine.clients, else the ids of the experiment's split (a node claiming any other
    is left out); a server that can build neither refuses to start."""
    if cfg.engine.clients:
        return list(cfg.engine.clients)
    from ..core.errors import DataError
    from ..data.federated import build_clients

    try:
        return [c.client_id for c in build_clients(cfg.data, cfg.seed)]
    except DataError as exc:
        raise ConfigError(f"engine.clients is not set, and the server cannot build the experiment's split to know "
                          f"its client ids ({exc}); list the data owners the run admits in engine.clients "
                          "(`fedlora deploy app ... --clients ID,ID` or `--credentials DIR`)") from None


def make_server_app(cfg: Config | None = None, resume: Checkpoint | None = None,
                    records: list[dict] | None = None) -> ServerApp:
    """A ServerApp running `cfg` (simulation: its run directory is prepared already; continued from `resume`),
    or (deployment) the experiment of the run config, into the run directory the submission names."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # replies whose objects are still arriving are asked for again after 0.05 s, not 1 s (patches.py):
        # this process's own requests to its SuperLink, in every deployment
        short_object_backoff(cap=1.0)
        if cfg is not None:
            server_main(cfg, grid, run_dir_ready=True, resume=resume, records=records)
        else:
            server_main(config_from_run_config(context.run_config), grid, False, *_resumed(context.run_config))

    return app


RESUME_KEY = "resume"  # run config of flower-local's resumed app: the run directory to continue (this machine's)


def _resumed(run_config: dict[str, Any]) -> tuple[Checkpoint | None, list[dict] | None]:
    """The checkpoint and records a local deployment's ServerApp continues from (none for a fresh run)."""
    from ..engines.checkpoint import load_checkpoint

    where = str(run_config.get(RESUME_KEY) or "")
    if not where:
        return None, None
    ckpt = load_checkpoint(Path(where))
    records = [r for r in read_records(Path(where), drop_cut_off_tail=True) if r["round"] <= ckpt.round] \
        if (Path(where) / "metrics.jsonl").is_file() else []
    return ckpt, records


def config_from_run_config(run_config: dict[str, Any]) -> Config:
    """The fedlora Config of a deployment: `experiment` (TOML text, as `fedlora deploy app` writes it) or
    `config` (a file or built-in name on every machine), plus `set.<section.key>` overrides."""
    import tomllib

    from ..core.config import apply_overrides, load_config

    overrides = [f"{k.removeprefix('set.')}={v}" for k, v in run_config.items() if k.startswith("set.")]
    if "experiment" in run_config:
        try:
            data = tomllib.loads(str(run_config["experiment"]))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"the app's `experiment` run config is not valid TOML: {exc}") from None
        return build_config(apply_overrides(data, overrides))
    if "config" not in run_config:
        raise ConfigError("the Flower app's run config has neither `experiment` nor `config`: write the app with "
                          "`fedlora deploy app DIR CONFIG`")
    return load_config(str(run_config["config"]), overrides)


__all__ = ["RESUME_KEY", "config_from_run_config", "make_server_app", "server_app", "server_main"]


# The ServerApp a deployment names in its pyproject (`[tool.flwr.app.components]`): it reads the experiment from
# the run config (`experiment` or `config`, + `set.*`), so one installed fedlora serves every experiment.
server_app = make_server_app()
