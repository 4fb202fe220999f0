"""fedlora's ClientApp: a node's answers to the server's messages (query, train, evaluate), the client's state
kept in the node's Context.state and, on disk, in its node directory (`engines/nodestate.py`); after the last
round the node writes its personalized model (`export_live`). A deployment's ClientApp is the warm proxy of
`warm.py`, whose worker calls `client_reply` here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from ..algorithms import ClientState, Payload, Reply
from ..core.config import Config
from ..core.errors import ConfigError
from ..core.names import safe_name
from ..core.seeding import derive_seed
from ..data.federated import local_client
from ..engines.nodestate import (
    DEFAULT_STATE_DIR,
    MODEL_DIR,
    SIMULATION_NODES,
    STATE_DIR_KEY,
    claim_node_dir,
    load_node_state,
    node_dir,
    save_node_state,
)
from ..engines import secagg
from ..engines.session import build_session
from .server_app import config_from_run_config
from .wire import EXPECTS, FINAL, ROUND, RUN, decode, encode, store_state

CLIENT_ID_KEY = "client-id"  # node config key of a SuperNode's data owner (deployment)
NODE_ROUND = "fedlora.round"  # Context.state record: the round the kept state was trained in
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
    """The round, run id, final flag and payload of a decoded server message written by `FlowerTransport._exchange`."""
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
    if kind == MessageType.TRAIN and secagg.is_secure(content):  # a SecAgg+ stage: its collect stage trains
        def produce():
            rnd, _, _, secure_payload = _payload(states, info)
            payload, layout, weight = secagg.unpack_payload(secure_payload)
            return secagg.pack(_train(session, cid, directory, rnd, payload, context), layout, weight)

        seed = derive_seed(config.seed, "secagg-rounding", cid, info.get(ROUND, 0))
        return secagg.node_reply(content, context, produce, seed)
    rnd, _, final, payload = _payload(states, info)
    if kind == MessageType.TRAIN:
        reply = _train(session, cid, directory, rnd, payload, context)
        return encode(reply.states, {"num_examples": reply.num_examples, "metrics": reply.metrics})
    if kind != MessageType.EVALUATE:
        raise ValueError(f"a fedlora node answers query, train and evaluate messages, not {kind!r}")
    _, state = _client_state(context, directory, cid, rnd + 1)
    if final:  # the run is over: the data owner's personalized model, next to its state
        export_live(session, cid, rnd, payload, state, directory / MODEL_DIR)
        return encode({}, {"model": str(directory / MODEL_DIR)})
    evaluation = session.runtime.evaluate(cid, rnd, payload, state)
    return encode({}, {"metrics": evaluation.metrics, "diagnostics": evaluation.diagnostics})


def _train(session, cid: str, directory: Path, rnd: int, payload: Payload, context: Context) -> Reply:
    """Client `cid`'s local round `rnd`, its new state kept on disk and in the node's Context.state."""
    base_round, before = _client_state(context, directory, cid, rnd)
    reply, state = session.runtime.fit(cid, rnd, payload, before)
    # on disk first: a failed write is an error reply and leaves the node's state as it was
    save_node_state(directory, cid, rnd, base_round, state)
    store_state(context.state, state.states, state.meta)
    context.state[NODE_ROUND] = ConfigRecord({"round": rnd})
    return reply


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


def export_live(session, client_id: str, rnd: int, payload: Payload, state: ClientState, out: Path) -> Path:
    """Write the personalized model of a live node session after round `rnd` into `out`, exactly as
    `fedlora export` writes it from a run directory (the same personalize turn as the final evaluation)."""
    from ..core.io import save_json, save_text
    from ..engines.checkpoint import checkpoint_id
    from ..export_files import MANIFEST, export_readme, staged_directory
    from ..serving import write_export

    exported_from = checkpoint_id(out.parent)
    with staged_directory(out) as tmp:
        with session.runtime.personalize(client_id, rnd, payload, state) as turn:
            manifest = write_export(session, session.config, client_id, rnd, exported_from, turn.personalized,
                                    tmp, out, None)
        save_text(tmp / "README.md", export_readme(manifest, out))
        save_json(tmp / MANIFEST, manifest)
    return out


__all__ = ["client_app", "client_reply", "export_live", "make_client_app"]


# The plain ClientApp (each message answered in the ClientApp's own process); a deployment's pyproject names the
# warm one (`warm.py`), which hands each message to a long-lived worker calling `client_reply`.
client_app = make_client_app()
