"""flower-local's SuperExec: Flower's own `flower-superexec`, which starts each ClientApp from a fork server.

Flower 1.42's SuperExec starts a fresh `flwr-clientapp` process for every message (twice a round per node), and
that process's imports alone take about 1.5 CPU-seconds on a small machine: most of what a flower-local round
costs beyond the work (docs/deployment.md). The SuperNodes `LocalFederation` starts run their SuperExec through
this module (`supernode.py` points them at it). It starts a fork server, one process per SuperExec that has
imported Flower's ClientApp code once; every ClientApp launch is then a fork of that server running Flower's own
`flwr-clientapp` entry point with the arguments the SuperExec gave. Flower has no setting for how a SuperExec
starts a task (`SubprocessExecutor.launch` calls `subprocess.Popen`), so that module's `subprocess` is replaced by
one whose `Popen` of `flwr-clientapp` asks the fork server instead (`patches.patch_superexec`, which leaves Flower
untouched under a version it was not tested with); every other launch is unchanged. A real deployment's
SuperExecs are Flower's own.

On Linux each process here dies with its parent by the kernel's parent-death signal: the SuperExec with its
SuperNode, the fork server with the SuperExec, each ClientApp with the fork server (a SIGKILLed `fedlora run` leaves
nothing behind). Each ClientApp also watches its `--parent-pid` as Flower's do, and the fork server, at the end of
its request pipe, waits for the ClientApps still running. ClientApps retry a missing object sooner
(`patches.py`).
Usage: python -m fedlora.flower.superexec <flower-superexec arguments>
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import traceback
from typing import Any

from .patches import (
    LOCAL_OBJECT_BACKOFF,
    LOCAL_OBJECT_BACKOFF_CAP,
    WAKE_FD_ENV,
    patch_superexec,
    short_object_backoff,
)
from .processes import die_with_parent

CLIENTAPP = "flwr-clientapp"
FORK_SERVER = "--fork-server"


class _ForkingSubprocess:
    """The `subprocess` module, except that Popen of `flwr-clientapp` is a fork of the fork server."""

    def __init__(self) -> None:
        self.server = subprocess.Popen([sys.executable, "-m", "fedlora.flower.superexec", FORK_SERVER],
                                       stdin=subprocess.PIPE, preexec_fn=die_with_parent())

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    def Popen(self, args: list[str], **kwargs: Any) -> Any:  # noqa: N802  (subprocess's name)
        """A ClientApp from the fork server (Flower keeps no handle to it); anything else as subprocess.Popen."""
        if not args or os.path.basename(args[0]) != CLIENTAPP or self.server.poll() is not None:
            return subprocess.Popen(args, **kwargs)
        quiet = kwargs.get("stdout") == subprocess.DEVNULL
        try:
            self.server.stdin.write((json.dumps({"args": list(args[1:]), "quiet": quiet}) + "\n").encode())
            self.server.stdin.flush()
        except OSError:  # the fork server died just now: Flower's own way
            return subprocess.Popen(args, **kwargs)
        return None


def serve() -> None:
    """The fork server: import the ClientApp code once, then fork one ClientApp per request line (JSON)."""
    from flwr.supernode.cli import flwr_clientapp

    short_object_backoff(LOCAL_OBJECT_BACKOFF, LOCAL_OBJECT_BACKOFF_CAP)  # inherited by every fork
    _preimport_clientapp()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the ClientApps
    die_with_server = die_with_parent()
    requests = sys.stdin.buffer
    for line in requests:
        request = json.loads(line)
        if os.fork() == 0:
            if die_with_server is not None:
                die_with_server()
            _run_clientapp(flwr_clientapp, request["args"], request["quiet"])
    # end of the pipe: the SuperExec is gone, and the ClientApps still running end with it (their --parent-pid);
    # this server waits for them, since they die with it (with SIGCHLD ignored, wait() returns when all have ended)
    try:
        while True:
            os.wait()
    except ChildProcessError:
        pass


def _preimport_clientapp() -> None:
    """Import once, here, what every ClientApp would import after the fork (0.2 of the 0.25 CPU-s each one took):
    the HTTP client it talks to its SuperNode with and the app's module, then freeze the heap, so the ClientApps'
    garbage collections do not touch (and so copy) the pages they share with this server."""
    import gc

    import httpx  # imported with Flower's ClientApp code already

    httpx.Client().close()  # but its transport's modules (httpcore, h11) load on first use
    from . import warm  # the ClientApp `deploy app` names (Flower reuses a loaded module)

    warm._fingerprint()  # which fedlora code this is: read once here, not by every ClientApp
    gc.freeze()


def _run_clientapp(entry: Any, args: list[str], quiet: bool) -> None:
    """In the forked child: Flower's `flwr-clientapp` with `args`, then exit with its status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)  # not the request pipe
    if quiet:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    sys.argv = [CLIENTAPP, *args]
    code = 0
    try:
        entry()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001  (the child must never return into the server's loop)
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    """Run Flower's SuperExec, its ClientApps started from a fork server."""
    if sys.argv[1:] == [FORK_SERVER]:
        serve()
        return
    from flwr.supercore.cli import flower_superexec

    if "--parent-pid" in sys.argv[:-1]:  # the SuperNode's death takes this SuperExec, the fork server, its ClientApps
        die_with_node = die_with_parent(int(sys.argv[sys.argv.index("--parent-pid") + 1]))
        if die_with_node is not None:
            die_with_node()
    wake_fd = os.environ.pop(WAKE_FD_ENV, None)  # not handed on to the fork server or the ClientApps
    patch_superexec(_ForkingSubprocess, wake_fd)
    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    main()
