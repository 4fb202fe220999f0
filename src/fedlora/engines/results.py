"""What a run produces: per-round records (fit, evaluation, communication) and the final states."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..algorithms import ClientState


def summarize(per_client: dict[str, dict[str, float]], tasks: dict[str, str]) -> dict[str, Any]:
    """Per-task means and their mean over tasks (the papers' "Avg" column), plus the plain client mean."""
    by_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cid, metrics in per_client.items():
        for k, v in metrics.items():
            by_task[tasks.get(cid, "")][k].append(v)
    task_means = {t: {k: sum(v) / len(v) for k, v in ms.items()} for t, ms in sorted(by_task.items())}
    keys = sorted({k for ms in task_means.values() for k in ms})
    mean = {k: sum(tm[k] for tm in task_means.values() if k in tm) / sum(k in tm for tm in task_means.values())
            for k in keys}
    return {"mean": mean, "by_task": task_means}


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The round records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@dataclass
class RunResult:
    """The outcome of one run: round records as written to metrics.jsonl, and the final per-client states."""

    run_dir: Path
    method: str
    rounds: list[dict[str, Any]]
    client_states: dict[str, ClientState] = field(default_factory=dict)
    server_state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_run_dir(cls, run_dir: Path, method: str) -> "RunResult":
        """A finished run's result from what its directory holds: the records and the server's final state (an
        engine whose client states stay on the nodes has none here)."""
        from .checkpoint import load_checkpoint

        ckpt = load_checkpoint(run_dir)
        return cls(run_dir, method, read_records(run_dir), ckpt.client_states, ckpt.server_state)

    def evaluations(self) -> list[dict[str, Any]]:
        """The records that carry an evaluation, in round order."""
        return [r for r in self.rounds if "eval" in r]

    @property
    def final(self) -> dict[str, dict[str, float]]:
        """Per-client metrics at the last evaluation."""
        return self.evaluations()[-1]["eval"]

    @property
    def final_diagnostics(self) -> dict[str, dict[str, Any]]:
        """Per-client diagnostics of the method at the last evaluation (empty when it reports none)."""
        return self.evaluations()[-1].get("diagnostics", {})

    @property
    def final_mean(self) -> dict[str, float]:
        """Mean over tasks of the per-task means at the last evaluation."""
        return self.evaluations()[-1]["summary"]["mean"]
