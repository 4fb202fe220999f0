"""The processes of a local federation: free ports, children that die with their parent (the kernel's
parent-death signal, Linux), and stopping whole process trees."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable


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
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        proc.kill()
    psutil.wait_procs(alive, timeout=5)
    for popen in popens:
        popen.wait(timeout=5)  # reap, so no zombie stays behind


__all__ = ["PR_SET_PDEATHSIG", "die_with_parent", "free_port", "stop_process_trees"]
