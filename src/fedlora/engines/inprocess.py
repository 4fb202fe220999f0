"""The in-process engine: every client runs on one shared base model in this process, deterministically."""

from __future__ import annotations

import logging
from pathlib import Path

from ..algorithms import ClientInfo, ClientState, Payload, Reply
from ..core.config import Config
from ..core.io import save_text
from .checkpoint import Checkpoint, check_split
from .loop import federate
from .observers import Observer
from .results import RunResult
from .rundir import split_text
from .runtime import ClientRuntime, Evaluation, auto_client_batch
from .session import build_session

log = logging.getLogger("fedlora")


class InProcessTransport:
    """Clients' states live in a dict; the runtime swaps the shared model from client to client (or trains
    `engine.client_batch` of them together)."""

    def __init__(self, runtime: ClientRuntime, clients: list[ClientInfo]) -> None:
        self.runtime = runtime
        self.states: dict[str, ClientState] = {c.client_id: ClientState() for c in clients}
        self._said_sequential = False

    def fit(self, rnd: int, payloads: dict[str, Payload], show: Observer) -> tuple[dict[str, Reply], dict[str, str]]:
        """The clients' local rounds, one after another or `engine.client_batch` at a time."""
        replies: dict[str, Reply] = {}
        failures: dict[str, str] = {}
        ids = list(payloads)
        size = self._client_batch(len(ids))
        for start in range(0, len(ids), size):
            group = ids[start : start + size]
            show.clients(f"round {rnd}: training {', '.join(group)}", start, len(ids))
            if size == 1:
                outcomes = [self._fit_alone(group[0], rnd, payloads[group[0]])]
            else:
                outcomes = self.runtime.fit_together([(cid, rnd, payloads[cid], self.states[cid]) for cid in group])
            for cid, outcome in zip(group, outcomes):
                if isinstance(outcome, Exception):  # a failing client is recorded and left out, never fatal on its own
                    failures[cid] = f"{type(outcome).__name__}: {outcome}"
                else:
                    replies[cid], self.states[cid] = outcome
        return replies, failures

    def secure_nodes(self, rnd: int, payloads: dict[str, Payload], show: Observer):
        """The round's clients as SecAgg+ nodes in this process (one after another): (node ids, their exchange)."""
        from .secagg import InProcessNodes  # Flower's SecAgg+ code, imported only when asked for
        ids = list(payloads)

        def fit(cid: str, payload: Payload) -> Reply:
            show.clients(f"round {rnd}: training {cid}", ids.index(cid), len(ids))
            reply, self.states[cid] = self.runtime.fit(cid, rnd, payload, self.states[cid])
            return reply

        nodes = InProcessNodes(rnd, payloads, fit, self.runtime.config.seed)
        return nodes.node_ids, nodes.exchange

    def _fit_alone(self, cid: str, rnd: int, payload: Payload) -> tuple[Reply, ClientState] | Exception:
        try:
            return self.runtime.fit(cid, rnd, payload, self.states[cid])
        except Exception as exc:
            return exc

    def _client_batch(self, n_clients: int) -> int:
        """How many of a round's clients train together (`engine.client_batch`; 1 when the run cannot, said once)."""
        wanted = self.runtime.config.engine.client_batch
        if wanted == 1 or n_clients == 1:
            return 1
        problem = self.runtime.batching_problem()
        if problem:
            if not self._said_sequential:
                log.info("engine.client_batch=%s: clients train one after another: %s", wanted, problem)
                self._said_sequential = True
            return 1
        return min(n_clients, auto_client_batch(self.runtime) if wanted == "auto" else wanted)

    def evaluate(self, rnd: int, payloads: dict[str, Payload], show: Observer
                 ) -> tuple[dict[str, Evaluation], dict[str, str]]:
        """Each client's personalized model on its own test split."""
        metrics, failures = {}, {}
        for i, (cid, payload) in enumerate(payloads.items()):
            show.clients(f"round {rnd}: evaluating {cid}", i, len(payloads))
            try:
                metrics[cid] = self.runtime.evaluate(cid, rnd, payload, self.states[cid])
            except Exception as exc:  # recorded in the round's eval_failures, like a failed fit
                failures[cid] = f"{type(exc).__name__}: {exc}"
        return metrics, failures


def run_inprocess(cfg: Config, run_dir: Path, resume: Checkpoint | None = None,
                  records: list[dict] | None = None) -> RunResult:
    """Run (or, from a checkpoint and the records before it, continue) a config in this process."""
    s = build_session(cfg)
    split = split_text(s.clients)
    if resume is not None:  # the data on disk may have changed under a stopped run, or the checkpoint's files
        check_split(run_dir, resume, split)
        s.runtime.check_states(resume.client_states, str(resume.directory))
    save_text(run_dir / "clients.json", split)
    with s.runtime:  # stops a client's data-parallel workers, also when the run fails
        return federate(cfg, s.server, InProcessTransport(s.runtime, s.infos), s.infos, run_dir, resume, records)
