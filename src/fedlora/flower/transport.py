"""The Flower transport of the round loop: the server's side of every round, its clients reached as Flower nodes
(`grid.send_and_receive`), every reply read as hostile (too large, undecodable, ill-typed: that client's failure).

`FlowerTransport` carries the round loop's (engines/loop.py `federate`) payloads to clients on Flower nodes, which
keep their states; the ServerApp (`server_app.py`) builds it after the handshake (`handshake.py`), on Flower's
simulation runtime (`simulation.py`) and on a deployment alike.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..algorithms import ClientInfo, ClientState, Payload, Reply, ServerAlgorithm
from ..core.config import Config
from ..engines.observers import Observer
from ..engines.runtime import Evaluation
from ..engines.validation import count_problem, evaluation_problem, metrics_problem
from .exchange import read_reply, send_and_receive
from .handshake import ask_client_ids
from .wire import EXPECTS, FINAL, INFO_BYTES, ROUND, RUN, SIZE_FACTOR, content_bytes, encode, max_reply_bytes

log = logging.getLogger("fedlora")


class FlowerTransport:
    """The round loop's transport to clients on Flower nodes, which keep their states.

    Every reply is read as hostile: one that is too large, cannot be decoded or carries ill-typed fields is
    that client's failure (a reason in `failures`), never an exception of the server."""

    def __init__(self, config: Config, server: ServerAlgorithm, clients: list[ClientInfo], grid: Grid,
                 nodes: dict[str, int], run_id: str | None = None) -> None:
        self.config, self.server, self.grid, self.nodes, self.run_id = config, server, grid, nodes, run_id
        self.states: dict[str, ClientState] = {c.client_id: ClientState() for c in clients}  # kept on the nodes
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

    def _encode(self, rnd: int, payload: Payload) -> RecordDict:
        return encode(payload.states, {**payload.config, ROUND: rnd, EXPECTS: sorted(payload.expects), RUN: self.run_id})

    def _exchange(self, rnd: int, kind: str, payloads: dict[str, Payload]) -> tuple[dict[str, Message], dict[str, str]]:
        self.rejoin()
        return self._send(rnd, kind, {cid: self._encode(rnd, p) for cid, p in payloads.items()})

    def _send(self, rnd: int, kind: str, contents: dict[str, RecordDict]) -> tuple[dict[str, Message], dict[str, str]]:
        messages = [Message(content, dst_node_id=self.nodes[cid], message_type=kind, group_id=str(rnd))
                    for cid, content in contents.items()]
        sent = dict(zip(contents, messages))
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
        for cid in contents:
            if cid not in replies and cid not in failures:
                failures[cid] = f"no reply within federation.round_timeout={self.timeout} s"
        return replies, failures

    def fit(self, rnd: int, payloads: dict[str, Payload], show: Observer) -> tuple[dict[str, Reply], dict[str, str]]:
        """Train messages to the clients' nodes; their replies read as hostile."""
        show.clients(f"round {rnd}: training {len(payloads)} clients on Flower", 0, len(payloads))
        messages, failures = self._exchange(rnd, MessageType.TRAIN, payloads)
        replies = {}
        for cid, message in messages.items():
            (states, info), problem = read_reply(message, self.train_limit(payloads[cid]))
            if not problem:
                problem = count_problem(info.get("num_examples")) or metrics_problem(info.get("metrics"))
                problem = problem and f"malformed reply: {problem}"
            if problem:
                failures[cid] = problem
            else:
                replies[cid] = Reply(states, info["num_examples"], info["metrics"])
        return replies, failures

    def secure_nodes(self, rnd: int, payloads: dict[str, Payload], show: Observer):
        """The round's clients' nodes as SecAgg+ nodes: (their node ids, the exchange of one stage's records, the
        collect stage's carrying each client's payload). A reply too large for its stage is that node's failure."""
        from flwr.common.secure_aggregation.secaggplus_constants import Stage

        self.rejoin()
        nodes = {cid: self.nodes[cid] for cid in payloads}
        # the masked vector: int64 per scalar of every state a payload expects, and a handful of keys and shares
        limit = 2 * SIZE_FACTOR * max(self.train_limit(p) for p in payloads.values()) + INFO_BYTES

        def exchange(stage: str, records: dict[str, RecordDict]) -> dict[str, RecordDict | str]:
            show.clients(f"round {rnd}: secure aggregation, {stage}", 0, len(records))
            contents = {}
            for cid, record in records.items():
                content = self._encode(rnd, payloads[cid]) if stage == Stage.COLLECT_MASKED_VECTORS else RecordDict()
                for key, value in record.config_records.items():
                    content[key] = value
                contents[cid] = content
            messages, failures = self._send(rnd, MessageType.TRAIN, contents)
            answers: dict[str, RecordDict | str] = dict(failures)
            for cid, message in messages.items():
                size = content_bytes(message.content)
                answers[cid] = (message.content if size <= limit
                                else f"reply refused: it holds {size} bytes, more than the {limit} this stage may hold")
            return answers

        return nodes, exchange

    def evaluate(self, rnd: int, payloads: dict[str, Payload], show: Observer
                 ) -> tuple[dict[str, Evaluation], dict[str, str]]:
        """Evaluate messages to the clients' nodes; their metrics read as hostile."""
        show.clients(f"round {rnd}: evaluating {len(payloads)} clients on Flower", 0, len(payloads))
        messages, failures = self._exchange(rnd, MessageType.EVALUATE, payloads)
        evaluations = {}
        for cid, message in messages.items():
            (_, info), problem = read_reply(message, INFO_BYTES)  # an evaluation carries no tensors
            evaluation = Evaluation(info.get("metrics"), info.get("diagnostics", {}))
            if not problem:
                problem = evaluation_problem(evaluation)
                problem = problem and f"evaluation rejected: {problem}"
            if problem:
                failures[cid] = problem
            else:
                evaluations[cid] = evaluation
        return evaluations, failures


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


__all__ = ["FlowerTransport", "max_rank"]
