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
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..algorithms import ClientInfo, ClientState, Payload, Reply, ServerAlgorithm
from ..core.config import Config, build_config
from ..core.errors import ClientFailure, ConfigError
from ..core.names import MAX_NAME_LENGTH, name_problem, safe_name
from ..data.federated import local_client
from .checkpoint import Checkpoint
from .flower_waits import short_object_backoff
from .loop import RoundLoop
from .nodestate import (
    DEFAULT_STATE_DIR,
    DEPLOYMENT,
    LOCAL_ENGINES,
    MODEL_DIR,
    SIMULATION_NODES,
    STATE_DIR_KEY,
    claim_node_dir,
    export_live,
    load_node_state,
    new_run_id,
    node_dir,
    read_nodes,
    save_node_state,
    write_nodes,
)
from .results import RunResult, headline_metric, read_records, results_table
from .rundir import is_run_dir, prepare_run_dir, progress_on_stdout, run_log
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
RUN, FINAL = "run", "final"  # the run's id (nodes keep it with their states); the last message: write the model
NODE_ROUND = "fedlora.round"  # Context.state record: the round the kept state was trained in
MAX_PATH_LENGTH = 4096  # a state-dir a node reports is only recorded, never opened: a bound on what is kept


class FlowerEngine(RoundLoop):
    """The round loop with clients reached as Flower nodes; client states stay on the nodes.

    Every reply is read as hostile: one that is too large, cannot be decoded or carries ill-typed fields is
    that client's failure (a reason in `failures`), never an exception of the server."""

    def __init__(self, config: Config, server: ServerAlgorithm, clients: list[ClientInfo], run_dir: Path,
                 grid: Grid, nodes: dict[str, int], run_id: str | None = None, resume: Checkpoint | None = None,
                 records: list[dict] | None = None) -> None:
        # the server state is checkpointed every round: a resumed run must find the round its nodes last trained
        config = config.with_overrides(["engine.checkpoint_every=1"])
        super().__init__(config, server, clients, run_dir, resume, records)
        self.grid, self.nodes, self.run_id = grid, nodes, run_id
        # nodes that are no client of this run (left out at the handshake, or asked since): never asked again
        self.strangers: set[int] = set(grid.get_node_ids()) - set(nodes.values())
        self.timeout = config.federation.round_timeout
        spec = server.spec
        self.lora_numel = spec.lora_numel(max_rank(config))
        # the widest router a method sends: FedLEASE's 2M-1 slots, with M experts at most one per client
        self.router_numel = (2 * max(len(clients), 1) - 1) * sum(d_in for _, d_in, _ in spec.modules)

    def train_limit(self, payload: Payload) -> int:
        """The largest train reply to `payload` the server reads (bytes; see `wire.max_reply_bytes`):
        no method sends more than two states (FedLEASE's expert and router) or than its payload expects."""
        return max_reply_bytes(self.lora_numel, self.router_numel, max(2, len(payload.expects)))

    def run(self) -> RunResult:
        """The rounds, then each node writes its personalized model after the last one into its state-dir."""
        result = super().run()
        if self.records:
            self.write_node_models(self.records[-1]["round"])
        return result

    def write_node_models(self, rnd: int) -> None:
        """Ask every node to write its personalized model after round `rnd` (the final evaluation's payload)."""
        ids = list(self.nodes)
        payloads = self.server.configure_evaluate(rnd, ids)
        final = {cid: replace(p, config={**p.config, FINAL: True})
                 for cid, p in ((cid, payloads.get(cid, Payload())) for cid in ids)}
        _, failures = self._exchange(rnd, MessageType.EVALUATE, final)
        for cid, reason in sorted(failures.items()):
            log.warning("client %s did not write its personalized model: %s", cid, reason)

    def rejoin(self) -> None:
        """Map a client's SuperNode anew when it came back under another node id (restarted mid-run): a node the
        server has not seen is asked for its client id, and only a client of this run, claimed once, moves."""
        new = [n for n in self.grid.get_node_ids() if n not in set(self.nodes.values()) | self.strangers]
        if not new:
            return
        wait = min(self.timeout, self.config.engine.handshake_timeout)  # a stranger that never answers
        found, _, left_out = ask_client_ids(self.grid, new, wait, self.config.engine.clients, self.run_id)
        for cid, (node, _) in found.items():
            if cid in self.nodes:
                log.warning("client %s rejoined as node %s (was %s)", cid, node, self.nodes[cid])
                self.nodes[cid] = node
            else:  # the run's clients were fixed at the handshake
                left_out[node] = f"it claims client {cid!r}, which is not a client of this run"
        for node in set(new) - {node for node, _ in found.values()} | set(left_out):
            self.strangers.add(node)  # one query per unknown node, not one per round
            log.warning("node %s left out: %s", node, left_out.get(node, "no answer"))

    def _exchange(self, rnd: int, kind: str, payloads: dict[str, Payload]) -> tuple[dict[str, Message], dict[str, str]]:
        self.rejoin()
        messages = [Message(encode(p.states, {**p.config, ROUND: rnd, EXPECTS: sorted(p.expects), RUN: self.run_id}),
                            dst_node_id=self.nodes[cid], message_type=kind, group_id=str(rnd))
                    for cid, p in payloads.items()]
        sent = dict(zip(payloads, messages))
        by_node = {node: cid for cid, node in self.nodes.items()}
        replies, failures = {}, {}
        received = send_and_receive(self.grid, messages, self.timeout)
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


REPLY_POLL_SECONDS = 0.1  # how often the server asks the SuperLink for replies (Flower's own loop: every 3 s)


def send_and_receive(grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
    """`grid.send_and_receive`, polling a SuperLink for the replies every REPLY_POLL_SECONDS instead of every 3 s
    (Flower 1.42's HttpGrid), so a round ends when its last reply arrives; other grids as Flower runs them."""
    from flwr.superlink.grid.http_grid import HttpGrid

    if not isinstance(grid, HttpGrid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    received: list[Message] = []
    while pending and (deadline is None or time.monotonic() < deadline):
        replies = list(grid.pull_messages(pending))
        received += replies
        pending -= {reply.metadata.reply_to_message_id for reply in replies}
        if pending:
            time.sleep(REPLY_POLL_SECONDS)
    return received


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
              admitted: list[str] | None = None, run_id: str | None = None) -> dict[str, tuple[int, dict[str, Any]]]:
    """Ask every connected node for its client id: {client_id: (node_id, {"num_examples", "task", "order"})}.

    A node whose answer is an error or malformed, claims an unsafe id or one outside `admitted`, or shares its
    id with another node, is left out with a warning; fewer than `needed` proper answers is a ClientFailure."""
    deadline = time.monotonic() + wait
    while len(list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise ClientFailure(f"only {len(list(grid.get_node_ids()))} of {expected} SuperNodes connected in {wait:.0f} s")
        time.sleep(0.5)
    nodes = list(grid.get_node_ids())
    found, answered, left_out = ask_client_ids(grid, nodes, max(deadline - time.monotonic(), 1.0), admitted, run_id)
    for node, reason in sorted(left_out.items()):
        log.warning("handshake: node %s left out: %s", node, reason)
    if answered < len(nodes):
        raise ClientFailure(f"only {answered} of {len(nodes)} SuperNodes answered the handshake within {wait:.0f} s "
                            "(each loads the model and its data first); raise engine.handshake_timeout")
    if len(found) < needed:
        raise ClientFailure(f"only {len(found)} of {len(nodes)} SuperNodes answered the handshake properly, fewer than "
                            f"federation.min_clients={needed}; left out: {dict(sorted(left_out.items()))}")
    return found


def ask_client_ids(grid: Grid, nodes: list[int], timeout: float, admitted: list[str] | None, run_id: str | None
                   ) -> tuple[dict[str, tuple[int, dict[str, Any]]], int, dict[int, str]]:
    """Ask `nodes` for their client ids: (found as `handshake` returns it, how many answered, node -> why left out)."""
    asked = {node: Message(encode({}, {RUN: run_id}), dst_node_id=node, message_type=MessageType.QUERY, group_id="handshake")
             for node in nodes}
    received = send_and_receive(grid, list(asked.values()), timeout)
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
    return found, len(answered), left_out


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
    state_dir = info.get("state_dir")
    if state_dir is not None and not (isinstance(state_dir, str) and len(state_dir) <= MAX_PATH_LENGTH):
        return info, f"its state_dir {state_dir!r:.120} is not a path of at most {MAX_PATH_LENGTH} characters"
    problem = count_problem(info.get("num_examples"))
    return info, problem and f"malformed reply: {problem}"


def server_main(cfg: Config, grid: Grid, run_dir_ready: bool = False, resume: Checkpoint | None = None,
                records: list[dict] | None = None) -> None:
    """Build the method's server side, map nodes to clients, and run the round loop over Flower.

    A deployment's ServerApp (`run_dir_ready` False) creates its run directory with the CLI's guard, so it
    never writes into an existing run, and writes the report at the end; the simulation engine's caller
    (run_experiment) has done both already."""
    from ..core.io import save_json

    run_dir = cfg.run_dir
    if not run_dir_ready:
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
    # engine.clients: only the operator's data owners take part
    # the run directory the checkpoint belongs to (<run>/checkpoint/round-k): flower-local's ServerApp runs in
    # a directory of its own, next to the nodes' run
    recorded = read_nodes(resume.directory.parent.parent) if resume is not None and resume.directory else None
    # a resumed run keeps its id: its nodes then reload the states they kept for it
    run_id = str((recorded or {}).get("run") or new_run_id())
    started = time.monotonic()
    found = handshake(grid, cfg.engine.num_clients or 1, cfg.engine.handshake_timeout,
                      cfg.federation.min_clients, cfg.engine.clients, run_id)
    # the nodes' start-up (a node builds its model and data on its first message): benchmarks/engines.py reads it
    log.info("handshake: %d nodes answered in %.1f s", len(found), time.monotonic() - started)
    # the split's order where nodes use it, then client id (nodes with their own data all report 0)
    order = sorted(found, key=lambda cid: (found[cid][1]["order"], cid))
    clients = [ClientInfo(cid, found[cid][1]["num_examples"], found[cid][1]["task"]) for cid in order]
    where = {**(recorded or {}).get("nodes", {}), **{cid: found[cid][1].get("state_dir") or "" for cid in order}}
    engine = cfg.engine.name if cfg.engine.name in LOCAL_ENGINES else DEPLOYMENT
    write_nodes(run_dir, engine, run_id, where)  # before round 1: a stopped run says where its states are
    FlowerEngine(cfg, server, clients, run_dir, grid, {cid: found[cid][0] for cid in order}, run_id, resume,
                 records).run()


def make_server_app(cfg: Config | None = None, resume: Checkpoint | None = None,
                    records: list[dict] | None = None) -> ServerApp:
    """A ServerApp running `cfg` (simulation: its run directory is prepared already; continued from `resume`),
    or (deployment) the experiment of the run config, into the run directory the submission names."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # replies whose objects are still arriving are asked for again after 0.05 s, not 1 s (flower_waits.py):
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
    from .checkpoint import load_checkpoint
    from .results import read_records

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


def _payload(states: dict, info: dict[str, Any]) -> tuple[int, str | None, bool, Payload]:
    """The round, run id, final flag and payload of a decoded server message written by `FlowerEngine._exchange`."""
    info = dict(info)
    rnd, expects = int(info.pop(ROUND)), frozenset(info.pop(EXPECTS, ()))
    run, final = info.pop(RUN, None), bool(info.pop(FINAL, False))
    return rnd, run, final, Payload(states, info, expects)


def _load_state(context: Context) -> ClientState:
    states, meta = decode(context.state) if "fedlora" in context.state else ({}, {})
    return ClientState(states, meta)


def _client_state(context: Context, directory: Path, cid: str, before: int) -> tuple[int, ClientState]:
    """(round trained, state) to start a turn before round `before` from: the node's Context.state within a
    run, else (a restarted SuperNode, a resumed run, a fresh simulation process) what its node directory kept."""
    if "fedlora" in context.state:
        kept = context.state[NODE_ROUND]["round"] if NODE_ROUND in context.state else 0
        if int(kept) < before:
            return int(kept), _load_state(context)
    return load_node_state(directory, cid, before)


def _state_root(cfg: Config | None, config: Config, node_config: dict[str, Any]) -> Path:
    """Where this node keeps its clients' states: its `state-dir` node config; in simulation (the apps built
    with a config, on the server's machine) under the run directory; else under the working directory."""
    if STATE_DIR_KEY in node_config:
        return Path(str(node_config[STATE_DIR_KEY])).expanduser().resolve()
    if cfg is not None:
        return config.run_dir.resolve() / SIMULATION_NODES
    return Path.cwd() / DEFAULT_STATE_DIR


def client_reply(cfg: Config | None, kind: str, content: RecordDict, context: Context) -> RecordDict:
    """A node's reply content to a server message of `kind` (query, train, evaluate), its state in `context`.

    The ClientApp below calls it in its own process; a deployment's warm ClientApp (`warm.py`) in the node's
    long-lived worker, which keeps the model built between messages."""
    config = cfg or config_from_run_config(context.run_config)
    session = _session(config, context.node_config)
    states, info = decode(content)
    cid = _client_id(context, session)
    directory = node_dir(_state_root(cfg, config, context.node_config), cid)
    claim_node_dir(directory, cid, info.get(RUN), config.model_dump(mode="json"))
    if kind == MessageType.QUERY:
        client = next(i for i in session.infos if i.client_id == cid)
        order = [i.client_id for i in session.infos].index(cid)
        return encode({}, {"client_id": cid, "num_examples": client.num_examples, "task": client.task,
                           "order": order, "state_dir": str(directory)})
    rnd, _, final, payload = _payload(states, info)
    if kind == MessageType.TRAIN:
        base_round, before = _client_state(context, directory, cid, rnd)
        reply, state = session.runtime.fit(cid, rnd, payload, before)
        # on disk first: a failed write is an error reply and leaves the node's state as it was
        save_node_state(directory, cid, rnd, base_round, state)
        store_state(context.state, state.states, state.meta)
        context.state[NODE_ROUND] = ConfigRecord({"round": rnd})
        return encode(reply.states, {"num_examples": reply.num_examples, "metrics": reply.metrics})
    if kind != MessageType.EVALUATE:
        raise ValueError(f"a fedlora node answers query, train and evaluate messages, not {kind!r}")
    _, state = _client_state(context, directory, cid, rnd + 1)
    if final:  # the run is over: the data owner's personalized model, next to its state
        export_live(session, cid, rnd, payload, state, directory / MODEL_DIR)
        return encode({}, {"model": str(directory / MODEL_DIR)})
    evaluation = session.runtime.evaluate(cid, rnd, payload, state)
    return encode({}, {"metrics": evaluation.metrics, "diagnostics": evaluation.diagnostics})


def make_client_app(cfg: Config | None = None) -> ClientApp:
    """A ClientApp for `cfg` (or the run config's), keeping the client's state in the node's Context.state."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return Message(client_reply(cfg, MessageType.QUERY, message.content, context), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return Message(client_reply(cfg, MessageType.TRAIN, message.content, context), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return Message(client_reply(cfg, MessageType.EVALUATE, message.content, context), reply_to=message)

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
    # resumed: the server from its checkpoint, each virtual node from its node directory under the run directory
    run_simulation(server_app=make_server_app(cfg, resume, records), client_app=make_client_app(cfg),
                   num_supernodes=n_clients,
                   backend_config=backend)
    return RunResult.from_run_dir(run_dir, cfg.algorithm.name)


__all__ = ["FlowerEngine", "make_client_app", "make_server_app", "run_flower_simulation"]


# The apps a deployment names in its pyproject (`[tool.flwr.app.components]`): both read the experiment from
# the run config (`config` + `set.*`), so one installed fedlora serves every experiment.
server_app = make_server_app()
client_app = make_client_app()
