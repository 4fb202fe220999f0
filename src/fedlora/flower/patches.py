"""Every patch of Flower's internals fedlora makes, in one place, and the version fence around them.

On one machine most of a flower-local round was Flower waiting (docs/deployment.md), in places that have no
setting; the Flower processes fedlora runs itself change them here:
* a SuperNode sleeps 3 s whenever a pull from the SuperLink finds no message, and 0.5 s between looks at its
  ClientApp's reply (`flwr.supernode.start_client_internal` calls `time.sleep`): `ShortSleeps` caps them
  (0.2 s and 0.02 s);
* a message's objects are fetched with retries that start 1 s apart (doubling up to 10 s), and a SuperNode hands
  a message to its ClientApp before the message's objects have arrived from the SuperLink, so every ClientApp
  waited at least a second, and so did a server whose replies were still arriving: `short_object_backoff`
  starts those retries at 0.05 s (capped at 0.2 s; a ClientApp's, from its own SuperNode, at 0.01 s, capped at
  0.03 s);
* flower-local's SuperNode starts fedlora's SuperExec (`superexec.py`) instead of `flower-superexec`, and wakes
  it through a pipe when a message has arrived (`patch_supernode`); that SuperExec starts each ClientApp from a
  fork server and sleeps until it is woken (`patch_superexec`).

Each patch reaches into a module Flower may change in any release, so each applies only to the Flower versions
it was tested with (`TESTED_FLWR`). Under any other Flower the patch functions do nothing and fedlora logs one
warning per process: Flower then runs as its authors ship it, a slower local federation with the same results.
A real deployment's SuperLink and SuperNodes are Flower's own; only its ServerApp shortens its object retries.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import subprocess
import time
from importlib import metadata
from typing import Any, Callable, TypeVar

log = logging.getLogger("fedlora")
TESTED_FLWR = ">=1.41,<1.43"  # the Flower versions these patches were written and tested for (pyproject's pin)
_warned = False  # the warning that Flower runs unpatched: once per process

POLL = 0.2  # seconds; each look is one pull from the SuperLink, so not much less on a small shared machine
LOCAL_POLL = 0.02  # seconds; a look at the SuperNode's own memory (has the ClientApp replied?) costs nothing
OBJECT_BACKOFF, OBJECT_BACKOFF_CAP = 0.05, 0.2  # seconds, for objects from the SuperLink: Flower's are 1 and 10
# a ClientApp pulls its message's objects from its own SuperNode, which is still fetching them from the SuperLink:
# a doubling wait let it sleep up to twice as long as the objects took to arrive (0.3-0.8 s a message, traced)
LOCAL_OBJECT_BACKOFF, LOCAL_OBJECT_BACKOFF_CAP = 0.01, 0.03
SUPEREXEC = "flower-superexec"  # the command a SuperNode starts its SuperExec with
# Flower's SuperExec asks its SuperNode for a task to launch every FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds (1 s
# by default). Each ask is an HTTP request both processes serve in Python; at 0.1 s, four nodes' SuperExecs made a
# tenth of a 2-core machine's work on a flower-local round. The SuperNode and the SuperExec fedlora starts on one
# machine share a pipe instead: the SuperNode writes a byte once a message and its objects are in, and the
# SuperExec's sleep between asks ends at that byte (or after Flower's interval, as before).
WAKE_FD_ENV = "FEDLORA_SUPEREXEC_WAKE_FD"


# -- the version fence -------------------------------------------------------------------------------------
def flower_version() -> str | None:
    """The installed Flower's version (None when there is none)."""
    try:
        return metadata.version("flwr")
    except metadata.PackageNotFoundError:
        return None


def flower_is_tested() -> bool:
    """Whether the installed Flower is one the patches were tested with; if not, warn (once per process)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion

    global _warned
    version = flower_version()
    try:
        if version is not None and SpecifierSet(TESTED_FLWR).contains(version, prereleases=True):
            return True
    except InvalidVersion:
        pass
    if not _warned:
        _warned = True
        log.warning("Flower %s is not a version fedlora's patches of Flower internals were tested with (flwr%s): "
                    "fedlora runs Flower unpatched (a slower local federation, the same results)", version, TESTED_FLWR)
    return False


Patch = TypeVar("Patch", bound=Callable[..., None])


def _fenced(patch: Patch) -> Patch:
    """`patch`, applied only under a tested Flower; elsewhere a call does nothing (but warn once)."""

    @functools.wraps(patch)
    def fenced(*args: Any, **kwargs: Any) -> None:
        if flower_is_tested():
            patch(*args, **kwargs)

    return fenced  # type: ignore[return-value]


# -- stand-ins for the `time` and `subprocess` modules of one Flower module ---------------------------------
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


class _SuperExecOf:
    """The `subprocess` module, except that Popen of `flower-superexec` runs `command` (fedlora's SuperExec),
    given the read end of the pipe the SuperNode wakes it with."""

    def __init__(self, command: list[str], wake_fd: int) -> None:
        self.command, self.wake_fd = command, wake_fd

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    def Popen(self, args: list[str], **kwargs):  # noqa: N802  (subprocess's name)
        """subprocess.Popen, with Flower's SuperExec command replaced by fedlora's."""
        if args and args[0] == SUPEREXEC:
            args = [*self.command, *args[1:]]
            kwargs["env"] = {**(kwargs.get("env") or os.environ), WAKE_FD_ENV: str(self.wake_fd)}
            kwargs["pass_fds"] = (*kwargs.get("pass_fds", ()), self.wake_fd)
        return subprocess.Popen(args, **kwargs)


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


# -- the patches ---------------------------------------------------------------------------------------------
@_fenced
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


@_fenced
def patch_supernode(superexec: list[str]) -> None:
    """This process's Flower SuperNode (flower-local's): its sleeps capped (`ShortSleeps`), its object retries
    shortened, its SuperExec started as `superexec` (a command line) and woken through a pipe for each message."""
    from flwr.supernode import start_client_internal

    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)  # a full pipe holds wake-ups enough: never block the SuperNode on it
    start_client_internal.time = ShortSleeps()
    start_client_internal.subprocess = _SuperExecOf(superexec, wake_read)
    start_client_internal._pull_and_store_message = waking(start_client_internal._pull_and_store_message, wake_write)
    short_object_backoff()


@_fenced
def patch_superexec(launcher: Callable[[], Any], wake_fd: str | None) -> None:
    """This process's Flower SuperExec (flower-local's): its tasks launched through `launcher()` (a stand-in for
    `subprocess`, made here), its sleeps between asks for a task ended by a byte on `wake_fd` (when given)."""
    from flwr.supercore.superexec.executor import subprocess_executor

    subprocess_executor.subprocess = launcher()
    if wake_fd is not None:  # our SuperNode wakes us when it has a message: ask for a task then (and every second)
        import flwr.supercore.superexec.run_superexec as superexec_loop

        superexec_loop.time = WakeableSleeps(int(wake_fd))


__all__ = ["TESTED_FLWR", "WAKE_FD_ENV", "flower_is_tested", "flower_version", "patch_superexec", "patch_supernode",
           "short_object_backoff"]
