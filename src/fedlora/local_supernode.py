"""flower-local's SuperNode: Flower's own `flower-supernode`, looking for messages every POLL seconds.

Flower 1.42's SuperNode sleeps a hard-coded 3 s whenever a pull finds no message, and 0.5 s between looks at its
ClientApp's reply (`flwr.supernode.start_client_internal`): on one machine most of a flower-local round is that
waiting (docs/deployment.md). The SuperNodes `LocalFederation` starts on this machine run through this module,
which caps those sleeps at POLL; Flower exposes no setting for them, so its module's `time` is replaced by one
whose sleep is shorter. Its SuperExec is `python -m fedlora.local_superexec`, which starts each ClientApp from a
fork server (`local_superexec.py`). A real deployment's SuperNodes are Flower's own, unchanged.
Usage: python -m fedlora.local_supernode <flower-supernode arguments>
"""

from __future__ import annotations

import subprocess
import sys
import time

POLL = 0.2  # seconds; each look is one pull from the SuperLink, so not much less on a small shared machine


class _ShortSleeps:
    """The `time` module, except that sleep waits at most POLL seconds."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        """time.sleep(min(seconds, POLL))."""
        time.sleep(min(seconds, POLL))


class _LocalSuperExec:
    """The `subprocess` module, except that Popen of `flower-superexec` runs `fedlora.local_superexec`."""

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(args: list[str], **kwargs):  # noqa: N802  (subprocess's name)
        """subprocess.Popen, with Flower's SuperExec command replaced by fedlora's."""
        if args and args[0] == "flower-superexec":
            args = [sys.executable, "-m", "fedlora.local_superexec", *args[1:]]
        return subprocess.Popen(args, **kwargs)


def main() -> None:
    """Run Flower's SuperNode with the short sleeps and the forking SuperExec."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    start_client_internal.time = _ShortSleeps()
    start_client_internal.subprocess = _LocalSuperExec()
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
