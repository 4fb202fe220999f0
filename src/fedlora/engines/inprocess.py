"""The in-process engine: every client runs sequentially on one shared base model, deterministically."""

from __future__ import annotations

from pathlib import Path

from ..algorithms import ClientInfo, Payload, Reply, ServerAlgorithm
from ..core.config import Config
from ..core.io import json_text, save_text
from .checkpoint import Checkpoint, check_split
from .loop import RoundLoop
from .results import RunResult
from .runtime import ClientRuntime, Evaluation
from .session import build_session


class InProcessEngine(RoundLoop):
    """Client states live in a dict; the shared model is swapped from client to client by the runtime."""

    def __init__(self, config: Config, server: ServerAlgorithm, runtime: ClientRuntime, clients: list[ClientInfo],
                 run_dir: Path, resume: Checkpoint | None = None, records: list[dict] | None = None) -> None:
        super().__init__(config, server, clients, run_dir, resume, records)
        self.runtime = runtime

    def fit_clients(self, rnd: int, payloads: dict[str, Payload]) -> tuple[dict[str, Reply], dict[str, str]]:
        replies: dict[str, Reply] = {}
        failures: dict[str, str] = {}
        for i, (cid, payload) in enumerate(payloads.items()):
            self.show(f"round {rnd}: training {cid}", i, len(payloads))
            try:
                replies[cid], self.states[cid] = self.runtime.fit(cid, rnd, payload, self.states[cid])
            except Exception as exc:  # a failing client is recorded and left out, never fatal on its own
                failures[cid] = f"{type(exc).__name__}: {exc}"
        return replies, failures

    def evaluate_clients(self, rnd: int, payloads: dict[str, Payload]) -> tuple[dict[str, Evaluation], dict[str, str]]:
        metrics, failures = {}, {}
        for i, (cid, payload) in enumerate(payloads.items()):
            self.show(f"round {rnd}: evaluating {cid}", i, len(payloads))
            try:
                metrics[cid] = self.runtime.evaluate(cid, rnd, payload, self.states[cid])
            except Exception as exc:  # recorded in the round's eval_failures, like a failed fit
                failures[cid] = f"{type(exc).__name__}: {exc}"
        return metrics, failures


def run_inprocess(cfg: Config, run_dir: Path, resume: Checkpoint | None = None,
                  records: list[dict] | None = None) -> RunResult:
    """Run (or, from a checkpoint and the records before it, continue) a config in this process."""
    s = build_session(cfg)
    split = json_text([c.to_json() for c in s.clients])
    if resume is not None:  # the data on disk may have changed under a stopped run
        check_split(run_dir, resume, split)
    save_text(run_dir / "clients.json", split)
    with s.runtime:  # stops a client's data-parallel workers, also when the run fails
        return InProcessEngine(cfg, s.server, s.runtime, s.infos, run_dir, resume, records).run()
