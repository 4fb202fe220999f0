"""Flower 1.42's hard-coded waits, shortened in the Flower processes fedlora runs itself.

On one machine most of a flower-local round was Flower waiting (docs/deployment.md), in three places that have
no setting:
* a SuperNode sleeps 3 s whenever a pull from the SuperLink finds no message, and 0.5 s between looks at its
  ClientApp's reply (`flwr.supernode.start_client_internal` calls `time.sleep`): `ShortSleeps` caps them;
* a message's objects are fetched with retries that start 1 s apart (doubling up to 10 s), and a SuperNode hands
  a message to its ClientApp before the message's objects have arrived from the SuperLink, so every ClientApp
  waited at least a second, and so did a server whose replies were still arriving: `short_object_backoff`
  starts those retries at 0.05 s (capped at 1 s).
"""

from __future__ import annotations

import time

POLL = 0.2  # seconds; each look is one pull from the SuperLink, so not much less on a small shared machine
OBJECT_BACKOFF, OBJECT_BACKOFF_CAP = 0.05, 1.0  # seconds: Flower's are 1 and 10


class ShortSleeps:
    """The `time` module, except that sleep waits at most POLL seconds."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        """time.sleep(min(seconds, POLL))."""
        time.sleep(min(seconds, POLL))


def short_object_backoff() -> None:
    """Start Flower's retries for a message object that has not arrived yet at OBJECT_BACKOFF, not 1 s.

    Flower's object pulls take their waits as keyword defaults and their callers import them by name, so the
    defaults themselves are changed (for this process)."""
    from flwr.supercore.inflatable import inflatable_utils

    for function in vars(inflatable_utils).values():
        defaults = getattr(function, "__kwdefaults__", None)
        if isinstance(defaults, dict) and "initial_backoff" in defaults:
            defaults.update(initial_backoff=OBJECT_BACKOFF, backoff_cap=OBJECT_BACKOFF_CAP)
