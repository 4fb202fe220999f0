"""How the server exchanges messages with nodes: `send_and_receive` (replies polled every REPLY_POLL_SECONDS) and
`read_reply` (a node's reply decoded within a size limit, or why it cannot be read: every node is read as hostile).
The round's transport (transport.py) and the handshake (handshake.py) both use them."""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from .wire import WireError, content_bytes, decode

log = logging.getLogger("fedlora")


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


def read_reply(message: Message, limit: int) -> tuple[tuple[dict[str, Any], dict[str, Any]], str | None]:
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
