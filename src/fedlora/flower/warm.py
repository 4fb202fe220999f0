"""Warm clients for a deployment: one long-lived fedlora worker per SuperNode keeps the base model, tokenizer
and data built between messages.

Flower 1.42 starts a fresh `flwr-clientapp` process for every message (the SuperNode's SuperExec launches one
per task; neither isolation mode keeps a ClientApp process across messages), so a plain ClientApp imports
torch and rebuilds its model and data every round: seconds on MiniLM, minutes on a 7B base. The ClientApp
here is a thin proxy that imports neither torch nor the model code. It hands each message to its node's worker
and returns the worker's reply, so Flower still delivers every message, runs every timeout and keeps
Context.state; only the work moves into a process that stays warm.

The worker is started by the first message of a node and belongs to that node's SuperExec (the ClientApp's
parent; under flower-local the SuperExec's fork server, which lives exactly as long): it exits within a second
once that process is gone, after `IDLE_SECONDS` without a message, or when
fedlora's code changed under it (the next message starts a new one). It listens on a Unix socket in a
directory only this user can open, and talks only to peers that prove they know its key (the HMAC handshake
of `multiprocessing.connection`, made for exactly this: a local, authenticated channel for Python objects).

Node config `warm = false` runs each message in the ClientApp's own process instead (cold, as Flower does).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

log = logging.getLogger("fedlora")
WARM_KEY = "warm"  # node config: "false" runs every message cold, in its own ClientApp process
IDLE_SECONDS = 1800.0  # a worker no message reached for this long frees its memory (the next one starts anew)
START_SECONDS = 120.0  # a worker that has not opened its socket by then failed to start (its log says why)
POLL_SECONDS = 1.0


@functools.cache  # the code this process imported: read once (flower-local's fork server reads it for its forks)
def _fingerprint() -> str:
    """The running fedlora code: a worker started from other code (an upgrade, an edit) is not reused."""
    import fedlora

    root = Path(fedlora.__file__).parent
    newest = max((p.stat().st_mtime_ns for p in root.rglob("*.py")), default=0)
    return f"{fedlora.__version__}:{sys.executable}:{newest}"


def worker_home(owner: int) -> Path:
    """The directory of the worker owned by process `owner`: per user, readable by nobody else."""
    home = Path(tempfile.gettempdir()) / f"fedlora-warm-{os.getuid()}"
    home.mkdir(mode=0o700, exist_ok=True)
    if home.stat().st_uid != os.getuid() or home.stat().st_mode & 0o077:
        raise PermissionError(f"{home} must belong to this user and be closed to others (chmod 700 {home})")
    return home / str(owner)


def _is_warm(node_config: dict[str, Any]) -> bool:
    value = str(node_config.get(WARM_KEY, "true")).strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"node config {WARM_KEY}={value!r}: use true or false")
    return value in ("true", "1", "yes")


# -- the ClientApp side -------------------------------------------------------------------------------------
def _connect(home: Path, fingerprint: str) -> Connection | None:
    """A connection to the live worker in `home` started from this code, or None."""
    address = home / "address.json"
    try:
        info = json.loads(address.read_text())
        if info["fingerprint"] != fingerprint:
            _stop(info)
            return None
        return Client(info["socket"], family="AF_UNIX", authkey=bytes.fromhex(info["key"]))
    except (OSError, ValueError, KeyError, EOFError):  # none yet, or it died: its files are stale
        return None


def _stop(info: dict[str, Any]) -> None:
    """Ask an outdated worker to exit (it would anyway, once idle)."""
    try:
        with Client(info["socket"], family="AF_UNIX", authkey=bytes.fromhex(info["key"])) as conn:
            conn.send(("stop",))
    except (OSError, ValueError, KeyError, EOFError):
        pass


def worker_connection(owner: int) -> Connection:
    """A connection to the worker of `owner` (this ClientApp's SuperExec), starting one if there is none."""
    home = worker_home(owner)
    home.mkdir(mode=0o700, exist_ok=True)
    fingerprint = _fingerprint()
    with FileLock(str(home) + ".lock"):  # two messages at once start one worker, not two
        conn = _connect(home, fingerprint)
        if conn is not None:
            return conn
        (home / "address.json").unlink(missing_ok=True)
        _forget_dead_owners(home.parent)
        with open(home / "worker.log", "ab") as out:
            # its own session: signals to the SuperNode's process group go to Flower, which then exits; the
            # worker follows its owner by polling. Flower's ClientApp exits after this message, the worker not.
            process = subprocess.Popen([sys.executable, "-m", __name__, "--owner", str(owner), "--home", str(home)],
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + START_SECONDS
        while (conn := _connect(home, fingerprint)) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fedlora's warm worker did not start (exit code {process.poll()}); see "
                                   f"{home / 'worker.log'}, or set node config {WARM_KEY}=false to run cold")
            time.sleep(0.05)
        return conn


def _owner() -> int:
    """The process a node's worker belongs to: the one that started this ClientApp (SuperExec or fork server)."""
    return os.getppid()


def _forget_dead_owners(base: Path) -> None:
    """Remove the directories of workers whose owners are gone (their logs served their purpose)."""
    for home in base.iterdir():
        if home.is_dir() and home.name.isdigit() and not psutil.pid_exists(int(home.name)):
            shutil.rmtree(home, ignore_errors=True)
            Path(str(home) + ".lock").unlink(missing_ok=True)


def _ask_worker(kind: str, content: RecordDict, context: Context) -> RecordDict:
    with worker_connection(_owner()) as conn:
        conn.send(("call", kind, content, context))
        try:
            answer = conn.recv()
        except EOFError as exc:
            raise RuntimeError("fedlora's warm worker died while answering (its worker.log in "
                               f"{worker_home(_owner())} says why); the next message starts a new one") from exc
    if answer[0] == "error":
        raise RuntimeError(f"{answer[1]} (in fedlora's warm worker; its traceback is in {answer[2]})")
    reply, state = answer[1], answer[2]
    for key in list(context.state.keys()):  # the caller's Context object is the one Flower keeps: update it
        del context.state[key]
    for key, record in state.items():
        context.state[key] = record
    return reply


def _answer(kind: str, content: RecordDict, context: Context) -> RecordDict:
    # Windows has neither the Unix socket nor the per-user temp directory modes the worker relies on: cold there
    if _is_warm(context.node_config) and sys.platform != "win32":
        return _ask_worker(kind, content, context)
    from .client_app import client_reply

    return client_reply(None, kind, content, context)


def make_warm_client_app() -> ClientApp:
    """The deployment's ClientApp: every message answered by the node's warm worker (docs/deployment.md)."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return Message(_answer(MessageType.QUERY, message.content, context), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return Message(_answer(MessageType.TRAIN, message.content, context), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return Message(_answer(MessageType.EVALUATE, message.content, context), reply_to=message)

    return app


# -- the worker side ----------------------------------------------------------------------------------------
class Worker:
    """Answers its node's messages with `client_app.client_reply` in one process, one message at a time."""

    def __init__(self, owner: int, home: Path) -> None:
        from .client_app import client_reply  # torch, the model code: imported once, here

        self.owner, self.home, self.client_reply = psutil.Process(owner), home, client_reply
        self.busy = threading.Lock()  # one model: messages take turns, as they do on a cold node
        self.last_message = time.monotonic()
        self.stopping = threading.Event()

    def serve(self) -> None:
        """Listen until the owner is gone, no message came for IDLE_SECONDS, or a newer worker asks us to stop."""
        key = secrets.token_bytes(32)
        socket = self.home / "worker.sock"
        socket.unlink(missing_ok=True)
        with Listener(str(socket), family="AF_UNIX", authkey=key) as listener:
            os.chmod(socket, 0o600)
            address = self.home / "address.json"
            tmp = address.with_suffix(".tmp")
            tmp.write_text(json.dumps({"socket": str(socket), "key": key.hex(), "pid": os.getpid(),
                                       "fingerprint": _fingerprint()}))
            os.chmod(tmp, 0o600)
            tmp.replace(address)
            log.info("worker %d serving the node of SuperExec %d", os.getpid(), self.owner.pid)
            threading.Thread(target=self._watch, args=(listener,), daemon=True).start()
            while not self.stopping.is_set():
                try:
                    conn = listener.accept()
                except Exception:  # a peer without the key, or the listener closed by _watch
                    if self.stopping.is_set():
                        break
                    continue
                threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        self._release()

    def _watch(self, listener: Listener) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            idle = not self.busy.locked() and time.monotonic() - self.last_message > IDLE_SECONDS
            if idle or not _alive(self.owner):
                self.stopping.set()
        self._release()
        listener.close()
        os._exit(0)  # a message still training belongs to a node that is gone

    def _release(self) -> None:
        """Remove the address file if it is still ours (a newer worker may have replaced it)."""
        address = self.home / "address.json"
        try:
            if json.loads(address.read_text())["pid"] == os.getpid():
                address.unlink()
        except (OSError, ValueError, KeyError):
            pass

    def _handle(self, conn: Connection) -> None:
        with conn:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                return
            if request[0] == "stop":
                self.stopping.set()
                return
            _, kind, content, context = request
            with self.busy:
                self.last_message = time.monotonic()
                try:
                    answer = ("ok", self.client_reply(None, kind, content, context), context.state)
                except Exception as exc:  # the ClientApp raises it, so Flower sends the server an error reply
                    log.exception("%s message failed", kind)
                    answer = ("error", f"{type(exc).__name__}: {exc}", str(self.home / "worker.log"))
                self.last_message = time.monotonic()
            try:  # outside the lock: a frozen or killed ClientApp must not hold up the node's next message
                conn.send(answer)
            except OSError:  # the ClientApp is gone (Flower gave up on it)
                pass
            except Exception:  # a reply that cannot be sent: the ClientApp gets EOF and reports the log
                log.exception("the reply to a %s message could not be sent", kind)


def _alive(process: psutil.Process) -> bool:
    """Whether `process` still runs (is_running also catches its pid taken by a newer process)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def main(argv: list[str] | None = None) -> None:
    """Run a node's warm worker (started by the warm ClientApp; not meant to be run by hand)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--owner", type=int, required=True, help="the SuperExec process the worker belongs to")
    parser.add_argument("--home", type=Path, required=True, help="its directory (socket, address, log)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fedlora worker: %(message)s")
    Worker(args.owner, args.home).serve()


client_app = make_warm_client_app()

if __name__ == "__main__":
    main()
