"""The Flower engine: fedlora algorithms as a Flower ServerApp (its main owns the round loop and talks to the
SuperNodes with `grid.send_and_receive`) and a ClientApp that keeps each client's state on its node.

The same two apps run on Flower's simulation runtime (`engine.name = "flower-sim"`) and on a real
deployment (a SuperLink and one SuperNode per data owner; see docs/deployment.md). Algorithm code is
unchanged: the server side is the `RoundLoop` of every engine, the client side the shared `ClientRuntime`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..algorithms import ClientInfo, ClientState, Payload, Reply, ServerAlgorithm
from ..core.config import Config, build_config
from ..core.errors import ClientFailure, ConfigError
from ..core.names import MAX_NAME_LENGTH, name_problem, safe_name
from ..data.federated import local_client
from .checkpoint import Checkpoint
from .loop import RoundLoop
from .results import RunResult
from .rundir import is_run_dir, prepare_run_dir, run_log
from .runtime import Evaluation
from .session import aggregation_of, build_session
from .validation import count_problem, evaluation_problem, metrics_problem
from .wire import (
    INFO_BYTES,
    WireError,
    content_bytes,
    decode,
    encode,
    max_reply_bytes,
    store_state,
)

log = logging.getLogger("fedlora")
CLIENT_ID_KEY = "client-id"  # node config key of a SuperNode's data owner (deployment)
ROUND, EXPECTS = "round", "expects"  # keys a server message adds to the payload's config on the wire


class FlowerEngine(RoundLoop):
    """The round loop with clients reached as Flower nodes; client states stay on the nodes.

    Every reply is read as hostile: one that is too large, cannot be decoded or carries ill-typed fields is
    that client's failure (a reason in `failures`), never an exception of the server."""

    def __init__(self, config: Config, server: ServerAlgorithm, clients: list[ClientInfo], run_dir: Path,
                 grid: Grid, nodes: dict[str, int]) -> None:
        super().__init__(config, server, clients, run_dir)
        self.grid, self.nodes = grid, nodes
        self.timeout = config.federation.round_timeout
        spec = server.spec
        self.lora_numel = spec.lora_numel(max_rank(config))
        # the widest router a method sends: FedLEASE's 2M-1 slots, with M experts at most one per client
        self.router_numel = (2 * max(len(clients), 1) - 1) * sum(d_in for _, d_in, _ in spec.modules)

    def train_limit(self, payload: Payload) -> int:
        """The largest train reply to `payload` the server reads (bytes; see `wire.max_reply_bytes`):
        no method sends more than two states (FedLEASE's expert and router) or than its payload expects."""
        return max_reply_bytes(self.lora_numel, self.router_numel, max(2, len(payload.expects)))

    def _exchange(self, rnd: int, kind: str, payloads: dict[str, Payload]) -> tuple[dict[str, Message], dict[str, str]]:
        messages = [Message(encode(p.states, {**p.config, ROUND: rnd, EXPECTS: sorted(p.expects)}),
                            dst_node_id=self.nodes[cid], message_type=kind, group_id=str(rnd))
                    for cid, p in payloads.items()]
        sent = dict(zip(payloads, messages))
        by_node = {node: cid for cid, node in self.nodes.items()}
        replies, failures = {}, {}
        received = self.grid.send_and_receive(messages, timeout=self.timeout)
        # pushing gave each sent message its id; errors the SuperLink writes itself (an unavailable node) come
        # from the SuperLink's node id, so match on the message replied to first
        by_id = {m.metadata.message_id: cid for cid, m in sent.items() if m.metadata.message_id}
        for reply in received:
            cid = by_id.get(reply.metadata.reply_to_message_id) or by_node.get(reply.metadata.src_node_id)
            if cid is None:
                log.warning("round %d: ignoring a reply that answers none of this round's messages", rnd)
            elif reply.has_error():
                failures[cid] = f"error reply: {reply.error.reason}"
            else:
                replies[cid] = reply
        for cid in payloads:
            if cid not in replies and cid not in failures:
                failures[cid] = f"no reply within federation.round_timeout={self.timeout} s"
        return replies, failures

    def fit_clients(self, rnd: int, payloads: dict[str, Payload]) -> tuple[dict[str, Reply], dict[str, str]]:
        self.show(f"round {rnd}: training {len(payloads)} clients on Flower", 0, len(payloads))
        messages, failures = self._exchange(rnd, MessageType.TRAIN, payloads)
        replies = {}
        for cid, message in messages.items():
            (states, info), problem = _read(message, self.train_limit(payloads[cid]))
            if not problem:
                problem = count_problem(info.get("num_examples")) or metrics_problem(info.get("metrics"))
                problem = problem and f"malformed reply: {problem}"
            if problem:
                failures[cid] = problem
            else:
                replies[cid] = Reply(states, info["num_examples"], info["metrics"])
        return replies, failures

    def evaluate_clients(self, rnd: int, payloads: dict[str, Payload]) -> tuple[dict[str, Evaluation], dict[str, str]]:
        self.show(f"round {rnd}: evaluating {len(payloads)} clients on Flower", 0, len(payloads))
        messages, failures = self._exchange(rnd, MessageType.EVALUATE, payloads)
        evaluations = {}
        for cid, message in messages.items():
            (_, info), problem = _read(message, INFO_BYTES)  # an evaluation carries no tensors
            evaluation = Evaluation(info.get("metrics"), info.get("diagnostics", {}))
            if not problem:
                problem = evaluation_problem(evaluation)
                problem = problem and f"evaluation rejected: {problem}"
            if problem:
                failures[cid] = problem
            else:
                evaluations[cid] = evaluation
        return evaluations, failures


def _read(message: Message, limit: int) -> tuple[tuple[dict[str, Any], dict[str, Any]], str | None]:
    """((states, info), None) of a node's reply, or (({}, {}), why it cannot be read): too large or malformed."""
    try:
        size = content_bytes(message.content)
        if size > limit:
            return ({}, {}), f"reply refused: it holds {size} bytes, more than the {limit} this reply may hold"
        return decode(message.content), None
    except WireError as exc:
        return ({}, {}), f"malformed reply: {exc}"
    except Exception as exc:  # the bytes come from a party we do not control: whatever they break is its failure
        log.debug("unreadable reply from node %s", message.metadata.src_node_id, exc_info=True)
        return ({}, {}), f"unreadable reply: {type(exc).__name__}: {str(exc)[:200]}"


def max_rank(config: Config) -> int:
    """The largest LoRA rank any client may train: lora.r, or the largest clients.lora_r can give (FLoRA)."""
    ranks = config.clients.lora_r
    if ranks is None or isinstance(ranks, int):
        values = [ranks or config.lora.r]
    elif isinstance(ranks, list):
        values = list(ranks)
    elif isinstance(ranks, dict):
        values = list(ranks.values())
    else:  # the proportional rule: round(base * n / n_max) clipped to [min, max], max defaulting to base
        values = [ranks.min, ranks.max or ranks.base or config.lora.r]
    return max(config.lora.r, *(math.ceil(v) for v in values))


# -- the ServerApp ----------------------------------------------------------------------------------------
def handshake(grid: Grid, expected: int, wait: float = 600.0, needed: int = 1,
              admitted: list[str] | None = None) -> dict[str, tuple[int, dict[str, Any]]]:
    """Ask every connected node for its client id: {client_id: (node_id, {"num_examples", "task", "order"})}.

    A node whose answer is an error or malformed, claims an unsafe id or one outside `admitted`, or shares its
    id with another node, is left out with a warning; fewer than `needed` proper answers is a ClientFailure."""
    deadline = time.monotonic() + wait
    while len(list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise ClientFailure(f"only {len(list(grid.get_node_ids()))} of {expected} SuperNodes connected in {wait:.0f} s")
        time.sleep(0.5)
    asked = {node: Message(encode({}, {}), dst_node_id=node, message_type=MessageType.QUERY, group_id="handshake")
             for node in grid.get_node_ids()}
    received = grid.send_and_receive(list(asked.values()), timeout=max(deadline - time.monotonic(), 1.0))
    by_id = {m.metadata.message_id: node for node, m in asked.items() if m.metadata.message_id}
    answered: set[int] = set()
    left_out: dict[int, str] = {}
    claims: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for reply in received:
        node = by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if node not in asked or node in answered:
            log.warning("handshake: ignoring a reply from node %s, which was not asked or already answered", node)
            continue
        answered.add(node)
        info, problem = _hello(reply, admitted)
        if problem:
            left_out[node] = problem
        else:
            claims.setdefault(info["client_id"], []).append((node, info))
    found = {}
    for cid, claimants in claims.items():
        if len(claimants) == 1:
            found[cid] = claimants[0]
        else:  # neither can be told from an impostor
            for node, _ in claimants:
                left_out[node] = (f"{len(claimants)} nodes claim client {cid!r}; give each SuperNode its own "
                                  "client-id")
    for node, reason in sorted(left_out.items()):
        log.warning("handshake: node %s left out: %s", node, reason)
    if len(answered) < len(asked):
        raise ClientFailure(f"only {len(answered)} of {len(asked)} SuperNodes answered the handshake within {wait:.0f} s "
                            "(each loads the model and its data first); raise engine.handshake_timeout")
    if len(found) < needed:
        raise ClientFailure(f"only {len(found)} of {len(asked)} SuperNodes answered the handshake properly, fewer than "
                            f"federation.min_clients={needed}; left out: {dict(sorted(left_out.items()))}")
    return found


def _hello(reply: Message, admitted: list[str] | None) -> tuple[dict[str, Any], str | None]:
    """A node's handshake answer and why it cannot be used (None when it can)."""
    if reply.has_error():
        return {}, f"it failed the handshake: {reply.error.reason}"
    (_, info), problem = _read(reply, INFO_BYTES)  # a handshake answer carries no tensors
    if problem:
        return info, problem
    cid, task = info.get("client_id"), info.get("task")
    problem = name_problem(cid)
    if problem:
        return info, f"its client id {cid!r:.120} is not a safe name: {problem}"
    if admitted is not None and cid not in admitted:
        return info, f"it claims client {cid!r}, which engine.clients does not admit"
    if not isinstance(task, str) or not 0 < len(task) <= MAX_NAME_LENGTH:
        return info, f"its task {task!r:.120} is not a string of 1 to {MAX_NAME_LENGTH} characters"
    order = info.get("order")
    if isinstance(order, bool) or not isinstance(order, int):
        return info, f"its order {order!r:.120} is not an integer"
    problem = count_problem(info.get("num_examples"))
    return info, problem and f"malformed reply: {problem}"


def server_main(cfg: Config, grid: Grid, run_dir_ready: bool = False) -> None:
    """Build the method's server side, map nodes to clients, and run the round loop over Flower.

    A deployment's ServerApp (`run_dir_ready` False) creates its run directory with the CLI's guard, so it
    never writes into an existing run, and writes the report at the end; the simulation engine's caller
    (run_experiment) has done both already."""
    from ..core.io import save_json

    run_dir = cfg.run_dir
    if not run_dir_ready:
        _claim_run_dir(cfg)
    save_json(run_dir / "config.json", cfg.model_dump(mode="json"))
    with run_log(run_dir):
        _serve(cfg, grid, run_dir)
    if not run_dir_ready:
        from ..reporting import write_report

        write_report(run_dir)


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


def _serve(cfg: Config, grid: Grid, run_dir: Path) -> None:
    """The server side of the method, the handshake and the round loop, into `run_dir`."""
    from ..adapters import AdaptedModel
    from ..adapters.base_models import LoadOptions, load_base_model
    from ..algorithms import build

    # the server needs the adapted modules' shapes only: the base model without any client data, on the CPU
    base = load_base_model(cfg.model.name, cfg.model.objective, 2, cfg.model.dtype, cfg.seed,
                           LoadOptions("cpu", cfg.model.revision, cfg.model.trust_remote_code))
    spec = AdaptedModel(base.model, cfg.lora.r, cfg.lora.alpha, 0.0, cfg.lora.target_modules).spec
    server, _ = build(cfg.algorithm.name, cfg.algorithm.active_options, spec, cfg.seed, aggregation_of(cfg))
    # engine.clients: only the operator's data owners take part
    found = handshake(grid, cfg.engine.num_clients or 1, cfg.engine.handshake_timeout,
                      cfg.federation.min_clients, cfg.engine.clients)
    # the split's order where nodes use it, then client id (nodes with their own data all report 0)
    order = sorted(found, key=lambda cid: (found[cid][1]["order"], cid))
    clients = [ClientInfo(cid, found[cid][1]["num_examples"], found[cid][1]["task"]) for cid in order]
    FlowerEngine(cfg, server, clients, run_dir, grid, {cid: found[cid][0] for cid in order}).run()


def make_server_app(cfg: Config | None = None) -> ServerApp:
    """A ServerApp running `cfg` (simulation: its run directory is prepared already), or (deployment) the
    experiment of the run config, into the run directory the submission names."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is not None:
            server_main(cfg, grid, run_dir_ready=True)
        else:
            server_main(config_from_run_config(context.run_config), grid)

    return app


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


# -- the ClientApp ----------------------------------------------------------------------------------------
_SESSIONS: dict[str, Any] = {}  # one built session (model + this process's data) per config and node, per process
LOCAL_DATA_KEYS = ("train-file", "test-file", "task")  # node config of a data owner with its own files


def _session(cfg: Config, node_config: dict[str, Any]):
    """The session of this node: the config's split, or (deployment) only the data owner's own files."""
    own = {k: str(node_config[k]) for k in LOCAL_DATA_KEYS if k in node_config}
    owner = (_node_client_id(node_config) or "") if own else ""
    key = cfg.model_dump_json() + json.dumps([owner, own], sort_keys=True)
    if key not in _SESSIONS:
        clients = None
        if own:
            if not owner or "train-file" not in own:
                raise ConfigError(f"a SuperNode with its own data needs node config {CLIENT_ID_KEY!r} and 'train-file' "
                                  f"(and usually 'test-file', 'task'); it has {sorted(node_config)}")
            clients = [local_client(owner, own.get("task", "task"), own["train-file"],
                                    own.get("test-file"), cfg.data.fields)]
        _SESSIONS[key] = build_session(cfg, clients)
    return _SESSIONS[key]


def _node_client_id(node_config: dict[str, Any]) -> str | None:
    """The node config's client id, if it sets one: it names files on the server, so only a safe name."""
    if CLIENT_ID_KEY not in node_config:
        return None
    return safe_name(str(node_config[CLIENT_ID_KEY]), "SuperNode client-id")


def _client_id(context: Context, session) -> str:
    cid = _node_client_id(context.node_config)
    if cid is not None:
        if cid not in {i.client_id for i in session.infos}:
            raise ConfigError(f"SuperNode client-id {cid!r} is not a client of this experiment's split "
                              f"({', '.join(i.client_id for i in session.infos)}); give it 'train-file' for own data")
        return cid
    return session.infos[int(context.node_config["partition-id"])].client_id


def _payload(message: Message) -> tuple[int, Payload]:
    """The round and the payload of a server message written by `FlowerEngine._exchange`."""
    states, info = decode(message.content)
    rnd, expects = int(info.pop(ROUND)), frozenset(info.pop(EXPECTS, ()))
    return rnd, Payload(states, info, expects)


def _load_state(context: Context) -> ClientState:
    states, meta = decode(context.state) if "fedlora" in context.state else ({}, {})
    return ClientState(states, meta)


def make_client_app(cfg: Config | None = None) -> ClientApp:
    """A ClientApp for `cfg` (or the run config's), keeping the client's state in the node's Context.state."""
    app = ClientApp()

    def setup(context: Context):
        config = cfg or config_from_run_config(context.run_config)
        session = _session(config, context.node_config)
        return session, _client_id(context, session)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        session, cid = setup(context)
        info = next(i for i in session.infos if i.client_id == cid)
        order = [i.client_id for i in session.infos].index(cid)
        return Message(encode({}, {"client_id": cid, "num_examples": info.num_examples, "task": info.task,
                                   "order": order}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        session, cid = setup(context)
        rnd, payload = _payload(message)
        reply, state = session.runtime.fit(cid, rnd, payload, _load_state(context))
        store_state(context.state, state.states, state.meta)
        return Message(encode(reply.states, {"num_examples": reply.num_examples, "metrics": reply.metrics}),
                       reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        session, cid = setup(context)
        rnd, payload = _payload(message)
        evaluation = session.runtime.evaluate(cid, rnd, payload, _load_state(context))
        return Message(encode({}, {"metrics": evaluation.metrics, "diagnostics": evaluation.diagnostics}),
                       reply_to=message)

    return app


def run_flower_simulation(cfg: Config, run_dir: Path, resume: Checkpoint | None = None,
                          records: list[dict] | None = None) -> RunResult:
    """Run a config on Flower's simulation runtime (Ray), one virtual SuperNode per client."""
    import os

    from flwr.simulation import run_simulation

    from ..data.federated import build_clients

    n_clients = len(build_clients(cfg.data, cfg.seed))
    cfg = build_config({**cfg.model_dump(), "engine": {**cfg.engine.model_dump(), "num_clients": n_clients}})
    cpus = cfg.engine.cpus or os.cpu_count() or 1
    gpus = torch.cuda.device_count() if cfg.engine.client_gpus else 0
    if cfg.engine.client_gpus and not gpus:
        raise ConfigError(f"engine.client_gpus={cfg.engine.client_gpus}, but torch sees no CUDA device here")
    # client_gpus < 1: that many ClientApps share one GPU (Ray schedules them by this fraction)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": float(cfg.engine.client_gpus)},
               "init_args": {"num_cpus": cpus, "num_gpus": gpus, "include_dashboard": False}}
    if resume is not None:
        raise ConfigError("resume needs the in-process engine: on Flower the client states live on the nodes")
    run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg), num_supernodes=n_clients,
                   backend_config=backend)
    return RunResult.from_run_dir(run_dir, cfg.algorithm.name)


__all__ = ["FlowerEngine", "make_client_app", "make_server_app", "run_flower_simulation"]


# The apps a deployment names in its pyproject (`[tool.flwr.app.components]`): both read the experiment from
# the run config (`config` + `set.*`), so one installed fedlora serves every experiment.
server_app = make_server_app()
client_app = make_client_app()
