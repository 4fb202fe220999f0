"""The processes of a local federation: free ports, children that die with their parent (the kernel's
parent-death signal, Linux), stopping whole process trees, and a watchdog that ends whatever a block started
(Ray's) even when this process is SIGKILLed.

Run as a script (`python processes.py PID`), this file is that watchdog: it imports nothing of fedlora.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int | None = None) -> Callable[[], None] | None:
    """A function that has the kernel SIGKILL the process calling it when `parent` dies (Linux); None elsewhere.

    By default `parent` is this process and the function is a preexec_fn for the children started here; a
    process started by someone else (flower-local's SuperExec) calls it with the pid it was given. Flower's own
    children exit when their `--parent-pid` does, but only through a SIGINT their main thread must get to
    handle; the kernel's signal cannot be missed. It follows the thread that started the child, so start them
    from a thread that lives as long as the federation (the main one)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child
    parent = os.getpid() if parent is None else parent

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(70)  # no parent-death signal, or the parent died before it was set: never run unwatched

    return preexec


def stop_process_trees(popens: list[subprocess.Popen]) -> None:
    """Terminate processes and all their children (killed if they are still up after 10 s), then reap them."""
    import psutil

    procs = []
    for popen in popens:
        try:
            parent = psutil.Process(popen.pid)
            procs += [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    _end(procs, grace=10)
    for popen in popens:
        popen.wait(timeout=5)  # reap, so no zombie stays behind


@contextmanager
def outlived_by_nothing() -> Iterator[None]:
    """Every process this one starts inside the block (children and theirs, also once reparented) is ended when
    the block ends, normally or by an error, or when this process dies (SIGKILL included).

    Ray's processes do not all share their driver's fate: after a SIGKILL its agents wait up to a minute on a
    dead GCS, and an actor was once seen running minutes after a normal end. A watchdog process, outside the
    tree it watches, records the new descendants every WATCH_INTERVAL s and ends them when its stdin closes:
    closed by the block's end, or by the kernel when this process dies. (A process whose parent exits within
    WATCH_INTERVAL of starting it escapes the record; Ray's processes all live under the raylet for the run.)"""
    watchdog = subprocess.Popen([sys.executable, "-I", str(Path(__file__).resolve()), str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    watchdog.stdout.readline()  # it has recorded what ran before the block
    try:
        yield
    finally:
        watchdog.stdin.close()  # the same EOF the kernel gives it when this process dies
        try:
            watchdog.wait(timeout=30)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait(timeout=5)


WATCH_INTERVAL = 0.25


def _watch(parent: int) -> None:
    """The watchdog: record `parent`'s descendants started after this one until stdin closes, then end them."""
    import threading

    import psutil

    me = psutil.Process()
    try:
        before = {p.pid for p in psutil.Process(parent).children(recursive=True)}
    except psutil.NoSuchProcess:
        return
    print("watching", flush=True)
    tracked: dict[int, psutil.Process] = {}
    closed = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.buffer.read(), closed.set()), daemon=True).start()
    while not closed.is_set():
        try:
            watched = psutil.Process(parent)
            if watched.status() == psutil.STATUS_ZOMBIE:
                break  # killed (not yet reaped): a forked child still holding the pipe would delay the EOF
            tracked.update({p.pid: p for p in watched.children(recursive=True)
                            if p.pid not in before and p.pid != me.pid})
        except psutil.NoSuchProcess:
            break
        closed.wait(WATCH_INTERVAL)
    _end(list(tracked.values()))


def _end(procs: list, grace: float = 5) -> None:
    """Terminate the processes still running (psutil checks each is the one recorded, not a reused pid), kill
    those up `grace` s later."""
    import psutil

    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


__all__ = ["PR_SET_PDEATHSIG", "die_with_parent", "free_port", "outlived_by_nothing", "stop_process_trees"]


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
