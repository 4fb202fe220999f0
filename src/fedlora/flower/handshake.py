"""The handshake of a Flower run: every connected node is asked which client it is, and only a proper, admitted
answer (a safe client id no other node claims, a task, a count of examples) makes it a client of the run."""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from ..core.errors import ClientFailure
from ..core.names import MAX_NAME_LENGTH, name_problem
from ..engines.validation import count_problem
from .exchange import read_reply, send_and_receive
from .wire import INFO_BYTES, RUN, encode

log = logging.getLogger("fedlora")
MAX_PATH_LENGTH = 4096  # a state-dir a node reports is only recorded, never opened: a bound on what is kept


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
    (_, info), problem = read_reply(reply, INFO_BYTES)  # a handshake answer carries no tensors
    if problem:
        return info, problem
    cid, task = info.get("client_id"), info.get("task")
    problem = name_problem(cid)
    if problem:
        return info, f"its client id {cid!r:.120} is not a safe name: {problem}"
    if admitted is not None and cid not in admitted:
        return info, f"it claims client {cid!r}, which this run does not admit (engine.clients, else the experiment's split)"
    if not isinstance(task, str) or not 0 < len(task) <= MAX_NAME_LENGTH:
        return info, f"its task {task!r:.120} is not a string of 1 to {MAX_NAME_LENGTH} characters"
    order = info.get("order")
    if isinstance(order, bool) or not isinstance(order, int):
        return info, f"its order {order!r:.120} is not an integer"
    state_dir = info.get("state_dir")
    if state_dir is not None and not (isinstance(state_dir, str) and len(state_dir) <= MAX_PATH_LENGTH):
        return info, f"its state_dir {state_dir!r:.120} is not a path of at most {MAX_PATH_LENGTH} characters"
    problem = count_problem(info.get("num_examples"), minimum=1)  # a client without training data takes no part
    return info, problem and f"malformed reply: {problem}"


__all__ = ["ask_client_ids", "handshake"]
