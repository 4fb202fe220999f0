"""Everything in fedlora that speaks Flower: its engines flower-sim and flower-local, and a real deployment.

Importing this package imports neither Flower nor torch (Flower takes seconds to import): `run_simulation` and
`run_local` import their modules when called. The modules, by job:

    transport.py    FlowerTransport: the round loop's clients reached as Flower nodes (send_and_receive,
                    every reply read as hostile)
    handshake.py    which client each connected node is (handshake, ask_client_ids)
    server_app.py   the ServerApp (server_main; a deployment's run directory and report; config_from_run_config)
    client_app.py   the ClientApp (client_reply: a node's answers, its state in Context.state and its node
                    directory; export_live: its personalized model after the last round)
    warm.py         a deployment's ClientApp: a thin proxy to one long-lived worker per node, which keeps the
                    model built between messages (the worker calls client_app.client_reply)
    wire.py         payloads, replies and states as Flower records (one packed array per state)
    simulation.py   engine flower-sim: both apps on Flower's simulation runtime (Ray)
    app.py          a Flower app directory (pyproject.toml carrying the experiment): `fedlora deploy app`
    credentials.py  CA, SuperLink certificate, SuperNode keys: `fedlora deploy credentials`
    gateway.py      the Fleet gateway, a SuperLink's only public face: `fedlora deploy fleet-gateway`
    processes.py    free ports, children that die with their parent, stopping process trees
    local.py        engine flower-local: a SuperLink, its gateway and SuperNodes as processes on this machine
    supernode.py    flower-local's SuperNode (`python -m fedlora.flower.supernode`): Flower's, patched
    superexec.py    flower-local's SuperExec: Flower's, each ClientApp forked from a fork server
    patches.py      every patch of Flower's internals, applied only under the Flower versions they were tested
                    with (TESTED_FLWR); elsewhere Flower runs unpatched, with one warning

Layering: this package may import reporting, serving, engines and everything below them; nothing there imports
it. The node-state format on disk is engines/nodestate.py's (it imports no Flower).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.config import Config
    from ..engines.checkpoint import Checkpoint
    from ..engines.results import RunResult


def run_simulation(cfg: Config, run_dir: Path, resume: Checkpoint | None = None,
                   records: list[dict] | None = None) -> RunResult:
    """Run `cfg` on Flower's simulation runtime (engine flower-sim) into `run_dir`."""
    from .simulation import run_flower_simulation

    return run_flower_simulation(cfg, run_dir, resume, records)


def run_local(cfg: Config, run_dir: Path, resume: Checkpoint | None = None,
              records: list[dict] | None = None) -> RunResult:
    """Run `cfg` on a local federation of Flower processes (engine flower-local) into `run_dir`."""
    from .local import run_local_deployment

    return run_local_deployment(cfg, run_dir, resume, records)


def adopt_stopped_server(run_dir: Path) -> None:
    """A flower-local run killed mid-run: its ServerApp's checkpoint and records, still in federation/server/,
    become the run's (when newer than what the run directory holds), so `--resume` continues from them."""
    from .local import adopt_stopped_server as adopt

    adopt(Path(run_dir))


__all__ = ["adopt_stopped_server", "run_local", "run_simulation"]
