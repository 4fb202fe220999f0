"""What a run produces: per-round records (fit, evaluation, communication) and the final states."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from ..algorithms import ClientState
from ..core.errors import CheckpointError
from .checkpoint import START_OVER, load_checkpoint

log = logging.getLogger("fedlora")


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


def informative_tasks(summary: dict[str, Any], n_clients: int) -> list[str]:
    """The tasks of a `summarize` result worth a row (or column) of their own, in its order: none when one task
    holds every client or every client is its own task (as by_key partitions give), whose mean is then only a
    repeat of the mean over tasks or of a client's own value."""
    tasks = list(summary.get("by_task", {}))
    return tasks if 1 < len(tasks) < n_clients else []


def read_records(run_dir: Path, drop_cut_off_tail: bool = False) -> list[dict[str, Any]]:
    """The round records of a run's metrics.jsonl; a line that is not one is a CheckpointError naming the line.
    With `drop_cut_off_tail` (resume), a last line cut off mid-write, as a kill can leave it, is dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; the run recorded no round")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not text ({exc}); the file was damaged: {START_OVER}") from exc
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            # append_jsonl writes the newline last: only a line without one can be a write the kill interrupted
            cut_off = number == len(lines) and not text.endswith("\n")
            if cut_off and drop_cut_off_tail:
                log.warning("%s line %d was cut off mid-write (the run was killed while recording it); dropped",
                            path, number)
                break
            fix = ("it was cut off mid-write (the run was killed); `fedlora run --resume` drops it" if cut_off else
                   f"the file was damaged: repair or remove that line, or {START_OVER}")
            raise CheckpointError(f"{path} line {number} is not a JSON record ({exc.msg}); {fix}") from exc
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            raise CheckpointError(f"{path} line {number} is not a round record (a JSON object with an integer "
                                  f"'round'): the file was damaged: repair or remove that line, or {START_OVER}")
        records.append(record)
    return records


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


def majority_class(run_dir: Path) -> dict[str, Any] | None:
    """The accuracy of always predicting each client's own training majority label on its test split, from the run's
    clients.json: {"per_client", "by_task", "average"}; None for generated text or without clients.json. A model
    at this level has not left the prior."""
    path = Path(run_dir) / "clients.json"
    if not path.is_file():
        return None
    per_client, tasks = {}, {}
    for c in json.loads(path.read_text()):
        train, test = [str(r.get("label")) for r in c.get("train", [])], [str(r.get("label")) for r in c.get("test", [])]
        if not train or not test or "label" not in c["train"][0]:
            return None
        top = max(sorted(set(train)), key=train.count)
        per_client[c["client_id"]], tasks[c["client_id"]] = {"accuracy": sum(y == top for y in test) / len(test)}, c["task"]
    summary = summarize(per_client, tasks)
    return {"per_client": {c: m["accuracy"] for c, m in per_client.items()},
            "by_task": {t: m["accuracy"] for t, m in summary["by_task"].items()}, "average": summary["mean"]["accuracy"]}


def comparison_problem(finals: dict[str, dict[str, float]], majority: dict[str, float] | None) -> str | None:
    """Why a comparison of methods means nothing, or None: {method: {client: final accuracy}} all equal to each
    other (with two or more methods), or every method at each client's majority-class rate."""
    if not finals:
        return None
    same = lambda a, b: set(a) == set(b) and all(abs(a[c] - b[c]) < 1e-9 for c in a)  # noqa: E731
    runs = list(finals.values())
    if majority and all(same(f, {c: majority[c] for c in f if c in majority}) for f in runs):
        return ("every method's final accuracy equals each client's majority-class rate: no method left the prior "
                "(too few steps, too small a learning rate or model, or labels the text does not predict)")
    if len(runs) > 1 and all(same(f, runs[0]) for f in runs[1:]):
        return (f"all {len(runs)} methods ended with identical per-client accuracy: the comparison cannot tell them "
                "apart (did training change the model? see run.log and the round-0 row)")
    return None


def headline_metric(result: RunResult) -> str:
    """The metric a run's results table shows: accuracy for classification, ROUGE-1 for generation."""
    return "accuracy" if "accuracy" in result.final_mean else "rouge1"


def results_table(results: dict[str, RunResult], metric: str) -> Table:
    """The final per-client results of one or more runs (one column each), with task means and the untrained start."""
    first = next(iter(results.values()))
    clients = list(first.final)
    table = Table(title=f"final {metric}, own test split", min_width=40)
    table.add_column("client")
    for method in results:
        table.add_column(method, justify="right")
    for cid in clients:
        table.add_row(cid, *(f"{r.final[cid].get(metric, float('nan')):.3f}" for r in results.values()))
    tasks = informative_tasks(first.evaluations()[-1]["summary"], len(clients))  # none for a by_key split
    for task in tasks:
        table.add_row(f"[bold]mean {task}", *(f"{r.evaluations()[-1]['summary']['by_task'][task][metric]:.3f}"
                                              for r in results.values()))
    table.add_row("[bold]average over tasks" if tasks else "[bold]average",
                  *(f"{r.final_mean[metric]:.3f}" for r in results.values()))
    start = [r.evaluations()[0] for r in results.values()]
    if start and start[0]["round"] == 0:
        table.add_row("[dim]untrained start", *(f"{s['summary']['mean'][metric]:.3f}" for s in start))
    majority = majority_class(first.run_dir) if metric == "accuracy" else None
    if majority:
        table.add_row("[dim]majority class", *(f"{majority['average']:.3f}" for _ in results))
    return table

