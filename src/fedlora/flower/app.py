"""A fedlora experiment as a Flower app: the app directory (its pyproject.toml) that `flwr run` submits to a
SuperLink, carrying the experiment and the client ids the server admits (`fedlora deploy app`).

Imports neither Flower nor torch: a machine that only writes an app needs neither.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..core.config import Config, build_config
from ..core.errors import ConfigError
from ..core.names import safe_name

APP_HEADER = """\
# A fedlora experiment as a Flower app: `flwr run <this directory> <superlink connection> --stream`.
# The ServerApp and ClientApp come from the installed fedlora package; the experiment travels inside the
# app bundle (tool.flwr.app.config.experiment, TOML), so no machine needs a copy of the config file.
# [tool.flwr.app.config.set] holds the settings of a submission, which win over the experiment's:
# engine.num_clients (SuperNodes to wait for before round 1) and output_dir (the run directory on the
# SuperLink's machine, new or empty: every submission must give it, the ServerApp refuses to run without).
# `flwr run` overrides only keys listed there: flwr run ... -c 'set.engine.num_clients=3 set.output_dir="/srv/x"'

"""


def write_app(app_dir: str | Path, cfg: Config, clients: list[str] | None = None, local: bool = False,
              resume: Path | None = None) -> Path:
    """Write a Flower app directory (its pyproject.toml) that runs `cfg` on a SuperLink.

    `clients` (default: the config's `engine.clients`) are the client ids the server admits, recorded as
    `engine.clients`. It waits for `engine.num_clients` SuperNodes: by default one per admitted client,
    else one per client of the config's split. `local`: the federation of `engine.name = "flower-local"`
    (its nodes keep their states under the run directory); else a deployment's nodes are on other machines.
    `resume`: the (local) run directory whose latest checkpoint the ServerApp continues from."""
    import tomli_w

    from ..algorithms import check_algorithm
    from ..data.federated import build_clients

    check_algorithm(cfg.algorithm)  # here, not first on the SuperLink
    admitted = admitted_clients(cfg.engine.clients if clients is None else clients)
    num_clients = cfg.engine.num_clients or (len(admitted) if admitted else len(build_clients(cfg.data, cfg.seed)))
    if admitted and num_clients > len(admitted):
        raise ConfigError(f"engine.num_clients={num_clients} SuperNodes to wait for, but only {len(admitted)} "
                          f"client ids are admitted ({', '.join(admitted)}): the run could never start")
    # what the ServerApp records as the engine that ran (its nodes.json says "flower-deployment" for any other)
    engine = {**cfg.engine.model_dump(), "name": "flower-local" if local else "inprocess"}
    if admitted is not None:
        engine["clients"] = admitted
    privacy = cfg.privacy.model_dump()
    if privacy["secure_noise"] is None and not local:  # on machines of their own, DP noise is nobody's to recompute
        privacy["secure_noise"] = True
    cfg = build_config({**cfg.model_dump(), "engine": engine, "privacy": privacy})
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^a-z0-9-]+", "-", f"fedlora-{cfg.name}".lower()).strip("-")
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": name, "version": "1.0.0", "license": "Apache-2.0", "dependencies": ["fedlora"],
                    "description": f"fedlora experiment {cfg.name!r} ({cfg.algorithm.name}) as a Flower app"},
        "tool": {"flwr": {"app": {
            "publisher": "fedlora",
            "components": {"serverapp": "fedlora.flower.server_app:server_app",
                           "clientapp": "fedlora.flower.warm:client_app"},
            # output_dir is the submission's, never the config's: a path of the machine that wrote the app,
            # which may hold a run already; "" (no value) makes the ServerApp ask for one
            "config": {"experiment": tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True,
                                                                  exclude={"output_dir"})),
                       "set": {"engine.num_clients": num_clients, "output_dir": ""},
                       **({"resume": str(resume.resolve())} if resume is not None else {})},
        }}},
    }
    (app_dir / "pyproject.toml").write_text(APP_HEADER + tomli_w.dumps(project, multiline_strings=True))
    return app_dir


def admitted_clients(clients: list[str] | None) -> list[str] | None:
    """`clients` checked as the client ids a server admits: safe names, none twice (None stays None)."""
    if clients is None:
        return None
    if not clients:
        raise ConfigError("the list of admitted client ids is empty: no node could join")
    no_repeats([safe_name(c, "client id") for c in clients], "client id")
    return list(clients)


def no_repeats(names: list[str], what: str) -> None:
    """Refuse a list of names that holds one twice (a ConfigError naming it)."""
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"{what} {name!r} is given twice")
        seen.add(name)


__all__ = ["APP_HEADER", "admitted_clients", "write_app"]
