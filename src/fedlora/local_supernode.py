"""flower-local's SuperNode: Flower's own `flower-supernode` with shorter waits and a forking SuperExec.

The SuperNodes `LocalFederation` starts on this machine run through this module, which shortens Flower's
hard-coded waits (`engines/flower_waits.py`: its `time.sleep`s capped at 0.2 s, its retries for objects that
have not arrived yet started at 0.05 s) and starts `python -m fedlora.local_superexec` as the node's SuperExec,
which starts each ClientApp from a fork server and which the SuperNode wakes through a pipe when a message has
arrived (instead of the SuperExec asking for one ten times a second). A real deployment's SuperNodes are
Flower's own, unchanged (this module takes the same arguments as `flower-supernode` and works there too).
Usage: python -m fedlora.local_supernode <flower-supernode arguments>
"""

from __future__ import annotations

import os
import subprocess
import sys

from .engines.flower_waits import WAKE_FD_ENV, ShortSleeps, short_object_backoff, waking


class _LocalSuperExec:
    """The `subprocess` module, except that Popen of `flower-superexec` runs `fedlora.local_superexec`, given the
    read end of the pipe this SuperNode wakes it with."""

    def __init__(self, wake_fd: int) -> None:
        self.wake_fd = wake_fd

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    def Popen(self, args: list[str], **kwargs):  # noqa: N802  (subprocess's name)
        """subprocess.Popen, with Flower's SuperExec command replaced by fedlora's."""
        if args and args[0] == "flower-superexec":
            args = [sys.executable, "-m", "fedlora.local_superexec", *args[1:]]
            kwargs["env"] = {**(kwargs.get("env") or os.environ), WAKE_FD_ENV: str(self.wake_fd)}
            kwargs["pass_fds"] = (*kwargs.get("pass_fds", ()), self.wake_fd)
        return subprocess.Popen(args, **kwargs)


def main() -> None:
    """Run Flower's SuperNode with the short waits and the forking SuperExec, which it wakes for each message."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)  # a full pipe holds wake-ups enough: never block the SuperNode on it
    start_client_internal.time = ShortSleeps()
    start_client_internal.subprocess = _LocalSuperExec(wake_read)
    start_client_internal._pull_and_store_message = waking(start_client_internal._pull_and_store_message, wake_write)
    short_object_backoff()
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
