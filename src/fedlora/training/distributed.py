"""Data-parallel local training inside one client: this process is rank 0, helper processes are ranks 1..n-1.

A client with `clients.workers = n` trains every global batch on n workers at once. Each worker takes a
contiguous shard of the batch; its loss is the sum over its items divided by the item count of the *whole*
batch (examples, or response tokens for a causal LM), so the summed (all-reduced) gradient is the one-worker
gradient of the batch. Every worker then takes the same clipped optimizer step, the replicas stay
identical, and rank 0, the process that talks to the server, holds the result in the shared model.

The helpers form a persistent pool: started once per process, each holding a copy of the model, reused
across rounds and clients. They are fresh interpreters (`python -c`: like multiprocessing's spawn, but
without re-running the caller's main module, so scripts need no main guard, and stdin or notebooks work).
Before each `Trainer.train` call rank 0 sends them the model state a round can change (adapters, head,
merged base weights, layout) and the call itself (a picklable job). Collectives run on gloo over
127.0.0.1; a model on CUDA gets one GPU per worker and NCCL (`worker_devices`: rank k on the k-th GPU
after rank 0's), and everything sent to a helper is written with torch.save and read with `map_location` =
its device, so no helper's tensors pass through rank 0's GPU. A helper that raises sends its error and exits
at once, so rank 0's next collective fails instead of hanging; the round then raises ClientFailure and the
pool is rebuilt on next use. (That holds for gloo; NCCL's collectives are asynchronous, so there a dead
helper surfaces at the latest after `clients.worker_timeout`, through NCCL's own watchdog.) Helpers exit when their pipe to the parent closes, so a dead parent leaves no orphans.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import pickle
import subprocess
import sys
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..adapters import AdaptedModel
from ..core.errors import ClientFailure, ConfigError

T = TypeVar("T")
Job = Callable[["DataParallel", AdaptedModel], None]  # what a helper runs: one train() call on its shards
_active: weakref.ref | None = None  # the pool of this process (torch.distributed has one default group)
_BOOT = "import sys; from fedlora.training.distributed import _serve; _serve(int(sys.argv[1]))"


@dataclass
class DataParallel:
    """One worker's place in a client's data-parallel group."""

    rank: int
    world: int
    group: Any = None

    def shard(self, idx: list[int]) -> list[int]:
        """This worker's contiguous part of a global batch (empty when the batch is smaller than the group)."""
        n = len(idx)
        return idx[self.rank * n // self.world: (self.rank + 1) * n // self.world]

    def all_reduce(self, params: list[torch.nn.Parameter], loss: torch.Tensor | None) -> float:
        """Sum the workers' gradients into every worker's `.grad` (one flat buffer, one collective) and
        return the summed loss, i.e. the global batch's loss."""
        parts = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        parts.append(loss.detach() if loss is not None else torch.zeros((), device=params[0].device))
        flat = torch.cat([t.reshape(-1).float() for t in parts])
        try:
            dist.all_reduce(flat, group=self.group)
        except RuntimeError as exc:  # a peer died or timed out: a worker failure, not this worker's bug
            raise WorkerError(f"the gradient all-reduce failed: {str(exc).splitlines()[0][:200]}") from exc
        offset = 0
        for p in params:
            p.grad = flat[offset: offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        return float(flat[-1])


def replica_state(adapted: AdaptedModel) -> dict[str, Any]:
    """What a local round may have changed in the shared model (a helper's copy is otherwise identical):
    the layout, own expert and fixed mixing weights, and every tensor of the adapted modules (adapters,
    routers, base weights with merged updates) and of the private head."""
    prefixes = tuple(f"{path}." for path in adapted.layers)
    heads = set(adapted.head_names)
    layer = next(iter(adapted.layers.values()))
    return {"layout": adapted.layout, "own_expert": layer.own_expert, "expert_weights": layer.expert_weights.clone(),
            "tensors": {name: t.clone() for name, t in adapted.model.state_dict().items()
                        if name.startswith(prefixes) or name in heads}}


def load_replica_state(adapted: AdaptedModel, state: dict[str, Any]) -> None:
    """Make a helper's copy of the model equal to rank 0's, from `replica_state`."""
    adapted.set_layout(state["layout"])
    adapted.set_own_expert(state["own_expert"])
    adapted.set_expert_weights(state["expert_weights"])
    unexpected = adapted.model.load_state_dict(state["tensors"], strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"replica state has tensors the model lacks: {unexpected[:3]}")


def worker_devices(device: torch.device, workers: int) -> list[torch.device]:
    """One device per worker, rank 0's first: the CPU for all on a CPU; on CUDA consecutive GPUs from rank 0's,
    since NCCL cannot put two ranks of a group on one GPU."""
    if device.type != "cuda":
        return [device] * workers
    first = device.index if device.index is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if first + workers > count:
        raise ConfigError(f"clients.workers = {workers} on CUDA needs one GPU per worker ({workers} GPUs from "
                          f"{device}), but only {count} {'is' if count == 1 else 'are'} visible from there; lower "
                          "clients.workers, or put the model on an earlier GPU (model.device, CUDA_VISIBLE_DEVICES)")
    return [torch.device("cuda", first + k) for k in range(workers)]


def worker_threads(workers: int, configured: int | None = None) -> int:
    """Torch threads per worker: the configured number, else this process's cores shared evenly."""
    return configured or max(1, len(os.sched_getaffinity(0)) // workers)


class WorkerError(Exception):
    """A helper process failed: it raised (its message says where) or it died."""


class WorkerPool:
    """Helper processes 1..size-1, each with a copy of `adapted`; this process is rank 0 of their group."""

    def __init__(self, adapted: AdaptedModel, size: int, timeout: float = 1800.0) -> None:
        global _active
        if size < 2:
            raise ValueError(f"a worker pool needs at least 2 workers, got {size}")
        old = _active() if _active else None
        if old is not None:
            old.close()
        if dist.is_initialized():
            raise ConfigError("torch.distributed is already initialized in this process, but data-parallel clients "
                              "(clients.workers > 1) start their own process group; run fedlora outside torchrun")
        self.size, self.timeout = size, timeout
        devices = worker_devices(next(adapted.model.parameters()).device, size)  # before any process starts
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.conns)
        limit = timedelta(seconds=timeout)
        # the parent's import path, so that helpers import what it imports (a source tree, a test module)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p or ".") for p in sys.path)}
        try:
            self.store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=limit, wait_for_workers=False)
            for rank in range(1, size):
                parent, child = multiprocessing.Pipe()
                self.procs.append(subprocess.Popen([sys.executable, "-c", _BOOT, str(child.fileno())],
                                                   pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, env=env))
                child.close()
                self.conns.append(parent)
            model = _dumps(adapted)
            for rank, conn in enumerate(self.conns, 1):
                _send(conn, {"rank": rank, "size": size, "port": self.store.port, "timeout": timeout,
                             "device": str(devices[rank])})
                conn.send_bytes(model)
            for rank in range(1, size):
                self._receive(rank)  # "ready": model loaded, about to join the group
            dist.init_process_group(_backend(adapted), store=self.store, rank=0, world_size=size, timeout=limit)
            self.groups = _subgroups(size)
        except (WorkerError, OSError) as exc:
            self.close(graceful=False)
            raise ClientFailure(f"data-parallel workers failed to start: {exc}") from exc
        except BaseException:
            self.close(graceful=False)
            raise
        _active = weakref.ref(self)

    @property
    def alive(self) -> bool:
        """True while the pool is open and every helper runs."""
        return self._finalizer.alive and all(p.poll() is None for p in self.procs)

    def run(self, world: int, threads: int, job: Job, own: Callable[[DataParallel], T]) -> T:
        """Run `job` on helpers 1..world-1 and `own` here as rank 0, each at `threads` torch threads; own's result.

        A helper's failure raises ClientFailure naming it; any failure closes the pool (helpers may be left
        inside a collective), and the next use starts a new one.
        """
        if not 2 <= world <= self.size:
            raise ValueError(f"this pool has {self.size} workers; cannot run on {world}")
        message = _dumps(("job", threads, world, job))
        saved = torch.get_num_threads()
        try:
            for conn in self.conns[: world - 1]:
                conn.send_bytes(message)
            torch.set_num_threads(threads)
            result = own(DataParallel(0, world, self.groups[world]))
            for rank in range(1, world):
                self._receive(rank)  # "done"
            return result
        except BaseException as exc:
            failure = self._helper_failure(world) or (exc if isinstance(exc, WorkerError) else None)
            self.close(graceful=False)
            if failure is not None:
                raise ClientFailure(f"data-parallel training failed: {failure}") from exc
            raise
        finally:
            torch.set_num_threads(saved)

    def close(self, graceful: bool = True) -> None:
        """Stop the helpers and leave the process group (idempotent); not graceful: terminate them at once."""
        if not graceful:
            for proc in self.procs:
                proc.kill()
        self._finalizer()

    def _receive(self, rank: int) -> tuple:
        conn, proc = self.conns[rank - 1], self.procs[rank - 1]
        if not wait([conn], self.timeout):  # a helper's death closes its pipe: readable, then EOF
            raise WorkerError(f"worker {rank} gave no answer within clients.worker_timeout={self.timeout} s")
        try:
            message = _recv(conn)
        except (EOFError, OSError):
            raise WorkerError(f"worker {rank} (pid {proc.pid}) died with exit code {_exit_code(proc)}") from None
        if message[0] == "error":
            raise WorkerError(f"worker {rank} (pid {proc.pid}) raised {message[1]}")
        return message

    def _helper_failure(self, world: int) -> WorkerError | None:
        """After rank 0 failed: the helper whose failure caused it, if any (a helper reports before it exits)."""
        for rank in range(1, world):
            if self.conns[rank - 1].poll(0.5):
                try:
                    self._receive(rank)
                except WorkerError as err:
                    return err
        return None


def _exit_code(proc: subprocess.Popen) -> int | None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        return proc.wait(2.0)
    return None


@dataclass
class Workers:
    """A client's n data-parallel workers for its local rounds: this process and the first n-1 helpers of a pool."""

    pool: WorkerPool
    n: int
    threads: int = 1

    def run(self, job: Job, own: Callable[[DataParallel], T]) -> T:
        """`WorkerPool.run` on these workers."""
        return self.pool.run(self.n, self.threads, job, own)


def _send(conn: Connection, obj: Any) -> None:
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())  # our own child or parent process: trusted


def _dumps(obj: Any) -> bytes:
    """A model or job for a helper: torch.save's pickle, so the helper can place every tensor on its own device."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    return buffer.getvalue()


def _loads(data: bytes, device: torch.device) -> Any:
    # weights_only=False: the model and jobs are objects, and they come from our own parent process (trusted)
    return torch.load(io.BytesIO(data), map_location=device, weights_only=False)


def _backend(adapted: AdaptedModel) -> str:
    return "nccl" if next(adapted.model.parameters()).is_cuda else "gloo"


def _subgroups(size: int) -> dict[int, Any]:
    """A group of ranks 0..w-1 for every w, so a client with fewer workers than the pool uses the first w;
    every rank must create them, in the same order."""
    return {**{w: dist.new_group(list(range(w))) for w in range(2, size)}, size: dist.group.WORLD}


def _shutdown(procs: list[subprocess.Popen], conns: list[Connection]) -> None:
    for conn in conns:
        with contextlib.suppress(OSError, ValueError):
            conn.send_bytes(_dumps(("stop",)))
    for proc in procs:
        try:
            proc.wait(10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for conn in conns:
        conn.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def _describe(exc: BaseException) -> str:
    """`Type: message (at file:line in function)`: what a helper reports about its failure."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return "".join(traceback.format_exception_only(type(exc), exc)).strip() + where


def _serve(fd: int) -> None:
    """A helper's life: receive the model, join the group, run jobs until told to stop or the parent is gone."""
    conn = Connection(fd)
    try:
        setup = _recv(conn)
        rank, size, device = setup["rank"], setup["size"], torch.device(setup["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's communicator and every allocation of this rank on its own GPU
        adapted: AdaptedModel = _loads(conn.recv_bytes(), device)
        _send(conn, ("ready",))
        limit = timedelta(seconds=setup["timeout"])
        store = dist.TCPStore("127.0.0.1", setup["port"], size, is_master=False, timeout=limit)
        dist.init_process_group(_backend(adapted), store=store, rank=rank, world_size=size, timeout=limit)
        groups = _subgroups(size)
        while True:
            try:
                message = _loads(conn.recv_bytes(), device)
            except EOFError:  # the parent has gone: never outlive it
                break
            if message[0] == "stop":
                break
            _, threads, world, job = message
            torch.set_num_threads(threads)
            job(DataParallel(rank, world, groups[world]), adapted)
            _send(conn, ("done",))
    except BaseException as exc:  # report, then exit at once: the closed sockets fail rank 0's collective now
        traceback.print_exc()
        with contextlib.suppress(Exception):
            _send(conn, ("error", _describe(exc)))
        os._exit(1)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
