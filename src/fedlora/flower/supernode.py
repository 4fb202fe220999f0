"""flower-local's SuperNode: Flower's own `flower-supernode` with shorter waits and a forking SuperExec.

The SuperNodes `LocalFederation` (`local.py`) starts on this machine run through this module, which shortens
Flower's hard-coded waits (`patches.py`: its `time.sleep`s capped at 0.2 s, its retries for objects that have not
arrived yet started at 0.05 s) and starts `python -m fedlora.flower.superexec` as the node's SuperExec, which
starts each ClientApp from a fork server and which the SuperNode wakes through a pipe when a message has arrived
(instead of the SuperExec asking for one ten times a second). Under a Flower the patches were not tested with,
it is Flower's SuperNode unchanged. A real deployment's SuperNodes are Flower's own, unchanged (this module takes
the same arguments as `flower-supernode` and works there too).
Usage: python -m fedlora.flower.supernode <flower-supernode arguments>
"""

from __future__ import annotations

import sys

from .patches import patch_supernode

SUPEREXEC = [sys.executable, "-m", "fedlora.flower.superexec"]  # what the SuperNode starts as its SuperExec


def main() -> None:
    """Run Flower's SuperNode with the short waits and the forking SuperExec, which it wakes for each message."""
    from flwr.supernode.cli import flower_supernode

    patch_supernode(SUPEREXEC)
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
