"""flower-local's SuperNode: Flower's own `flower-supernode` with shorter waits and a forking SuperExec.

The SuperNodes `LocalFederation` starts on this machine run through this module, which shortens Flower's
hard-coded waits (`engines/flower_waits.py`: its `time.sleep`s capped at 0.2 s, its retries for objects that
have not arrived yet started at 0.05 s) and starts `python -m fedlora.local_superexec` as the node's SuperExec,
which starts each ClientApp from a fork server. A real deployment's SuperNodes are Flower's own, unchanged (this
module takes the same arguments as `flower-supernode` and works there too).
Usage: python -m fedlora.local_supernode <flower-supernode arguments>
"""

from __future__ import annotations

import subprocess
import sys

from .engines.flower_waits import ShortSleeps, short_object_backoff


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
    """Run Flower's SuperNode with the short waits and the forking SuperExec."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    start_client_internal.time = ShortSleeps()
    start_client_internal.subprocess = _LocalSuperExec()
    short_object_backoff()
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
