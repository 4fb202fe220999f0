"""Flower 1.42's hard-coded waits, shortened in the Flower processes fedlora runs itself.

On one machine most of a flower-local round was Flower waiting (docs/deployment.md), in three places that have
no setting:
* a SuperNode sleeps 3 s whenever a pull from the SuperLink finds no message, and 0.5 s between looks at its
  ClientApp's reply (`flwr.supernode.start_client_internal` calls `time.sleep`): `ShortSleeps` caps them
  (0.2 s and 0.02 s);
* a message's objects are fetched with retries that start 1 s apart (doubling up to 10 s), and a SuperNode hands
  a message to its ClientApp before the message's objects have arrived from the SuperLink, so every ClientApp
  waited at least a second, and so did a server whose replies were still arriving: `short_object_backoff`
  starts those retries at 0.05 s (capped at 0.2 s; a ClientApp's, from its own SuperNode, at 0.01 s, capped at
  0.03 s).
"""

from __future__ import annotations

import os
import select
import time
from typing import Any, Callable

POLL = 0.2  # seconds; each look is one pull from the SuperLink, so not much less on a small shared machine
LOCAL_POLL = 0.02  # seconds; a look at the SuperNode's own memory (has the ClientApp replied?) costs nothing
OBJECT_BACKOFF, OBJECT_BACKOFF_CAP = 0.05, 0.2  # seconds, for objects from the SuperLink: Flower's are 1 and 10
# a ClientApp pulls its message's objects from its own SuperNode, which is still fetching them from the SuperLink:
# a doubling wait let it sleep up to twice as long as the objects took to arrive (0.3-0.8 s a message, traced)
LOCAL_OBJECT_BACKOFF, LOCAL_OBJECT_BACKOFF_CAP = 0.01, 0.03


class _Time:
    """The `time` module, to stand in for it in one Flower module: subclasses change its sleep."""

    def __getattr__(self, name: str):
        return getattr(time, name)


class ShortSleeps(_Time):
    """The `time` module, except that sleep waits at most POLL seconds, and waits of under a second (the
    SuperNode's looks at its ClientApp's reply, which is in its own memory) at most LOCAL_POLL seconds."""

    @staticmethod
    def sleep(seconds: float) -> None:
        """time.sleep, shortened."""
        time.sleep(min(seconds, POLL if seconds >= 1 else LOCAL_POLL))


def short_object_backoff(initial: float = OBJECT_BACKOFF, cap: float = OBJECT_BACKOFF_CAP) -> None:
    """Start Flower's retries for a message object that has not arrived yet at `initial` seconds, not 1 s, and
    never wait longer than `cap` between them (Flower: 10 s).

    Flower's object pulls take their waits as keyword defaults and their callers import them by name, so the
    defaults themselves are changed (for this process)."""
    from flwr.supercore.inflatable import inflatable_utils

    for function in vars(inflatable_utils).values():
        defaults = getattr(function, "__kwdefaults__", None)
        if isinstance(defaults, dict) and "initial_backoff" in defaults:
            defaults.update(initial_backoff=initial, backoff_cap=cap)


# -- flower-local only: a SuperNode wakes its SuperExec when a message arrives ------------------------------
# Flower's SuperExec asks its SuperNode for a task to launch every FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds (1 s
# by default). Each ask is an HTTP request both processes serve in Python; at 0.1 s, four nodes' SuperExecs made a
# tenth of a 2-core machine's work on a flower-local round. The SuperNode and the SuperExec fedlora starts on one
# machine share a pipe instead: the SuperNode writes a byte once a message and its objects are in, and the
# SuperExec's sleep between asks ends at that byte (or after Flower's interval, as before).
WAKE_FD_ENV = "FEDLORA_SUPEREXEC_WAKE_FD"


def waking(pull_and_store: Callable[..., Any], wake_fd: int) -> Callable[..., Any]:
    """`pull_and_store` (the SuperNode's `_pull_and_store_message`), writing a byte to `wake_fd` whenever it stored
    a message."""

    def pull_store_and_wake(*args: Any, **kwargs: Any) -> Any:
        run_id = pull_and_store(*args, **kwargs)
        if run_id is not None:
            try:
                os.write(wake_fd, b"!")
            except OSError:  # the pipe is full (the SuperExec has wake-ups to read) or it is gone (it polls anyway)
                pass
        return run_id

    return pull_store_and_wake


class WakeableSleeps(_Time):
    """The `time` module, except that sleep also ends when a byte arrives on `wake_fd` (which it reads)."""

    def __init__(self, wake_fd: int) -> None:
        self.wake_fd: int | None = wake_fd
        os.set_blocking(wake_fd, False)

    def sleep(self, seconds: float) -> None:
        """time.sleep(seconds), cut short by a wake-up."""
        if self.wake_fd is None:
            time.sleep(seconds)
            return
        ready, _, _ = select.select([self.wake_fd], [], [], seconds)
        if ready:
            try:
                if not os.read(self.wake_fd, 4096):  # every wake-up so far: one look serves them all
                    os.close(self.wake_fd)  # the SuperNode is gone: plain sleeps from now on
                    self.wake_fd = None
            except BlockingIOError:
                pass
