"""The quality study's runs: one small result JSON per (suite, profile, method, seed), reused while its setup hash
is current, resumed from its checkpoint when interrupted, and locked while a sweep runs it so that sweeps side by
side share the work."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from quality_setup import MAJORITY, METRIC, UNTRAINED, config_for, config_name, setup_id

if TYPE_CHECKING:
    from fedlora.api import RunResult
    from fedlora.core.config import Config


def result_path(out: Path, suite: str, profile: str, method: str, seed: int) -> Path:
    """Where the small result JSON of one run lives."""
    return out / "quality" / "runs" / f"{suite}-{profile}" / f"{method}-seed{seed}.json"


def current(result: dict, suite: str, profile: str) -> bool:
    """Whether a finished run's result was made with today's config of its (suite, profile, method, seed)."""
    cfg = config_for(suite, profile, result["method"], result["seed"], Path("unused"))
    return result.get("setup") == setup_id(cfg)


def load_runs(out: Path, suite: str, profile: str) -> dict[str, dict[int, dict]]:
    """{method: {seed: result}} of every finished run of (suite, profile)."""
    runs: dict[str, dict[int, dict]] = {}
    for p in sorted((out / "quality" / "runs" / f"{suite}-{profile}").glob("*.json")):
        r = json.loads(p.read_text())
        if current(r, suite, profile):  # a run of an older config is not mixed into today's table
            runs.setdefault(r["method"], {})[r["seed"]] = r
    return runs


@contextmanager
def claim(path: Path) -> Iterator[bool]:
    """Hold the lock of one run while the body runs: True for this process, False while another sweep holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # flock, not a soft lock: the OS drops it when its holder dies, so a killed sweep's run is free again at once
    lock = FileLock(path.with_suffix(".lock"), timeout=0)
    try:
        held = lock.acquire()
    except Timeout:
        held = None
    if held is None:  # yielded outside the except clause, so an error in the body is not chained to the Timeout
        yield False
        return
    with held:
        yield True


def execute(cfg: Config) -> tuple[RunResult, float, bool]:
    """Run `cfg`, resuming its run directory when it holds a checkpoint of the same config; (result, s before, resumed)."""
    from fedlora.api import resume_experiment, run_experiment
    from fedlora.core.errors import CheckpointError

    run_dir = cfg.run_dir
    saved, latest = run_dir / "config.json", run_dir / "checkpoint" / "latest.json"
    wanted = json.loads(json.dumps(cfg.model_dump(mode="json")))
    # engine settings (threads, progress bar) do not change results, so a run resumes whatever --threads says
    same = saved.is_file() and {**json.loads(saved.read_text()), "engine": None} == {**wanted, "engine": None}
    if same and latest.is_file() and (run_dir / "metrics.jsonl").is_file():
        done = json.loads(latest.read_text())["round"]
        before = sum(r.get("seconds") or 0.0 for r in map(json.loads, filter(None, (run_dir / "metrics.jsonl")
                                                                                 .read_text().splitlines()))
                     if r["round"] <= done)
        try:
            print(f"    resuming {run_dir} after round {done}", flush=True)
            return resume_experiment(run_dir), before, True
        except CheckpointError as exc:  # a damaged checkpoint: start that run again
            print(f"    cannot resume ({exc}); restarting", flush=True)
    return run_experiment(cfg, overwrite=True), 0.0, False


def majority_class(clients: list[dict]) -> dict[str, Any]:
    """Accuracy of predicting each client's most frequent training label on its test split (the label prior)."""
    from collections import Counter

    per_client, by_task = {}, {}
    for c in clients:
        top = Counter(str(r["label"]) for r in c["train"]).most_common(1)[0][0]
        per_client[c["client_id"]] = {"accuracy": statistics.fmean(str(r["label"]) == top for r in c["test"])}
        by_task.setdefault(c["task"], []).append(per_client[c["client_id"]]["accuracy"])
    by_task = {t: statistics.fmean(v) for t, v in sorted(by_task.items())}
    return {"per_client": per_client, "by_task": by_task, "average": statistics.fmean(by_task.values()),
            "curve": [], "round_seconds": 0.0}


def task_ari(assignment: dict[str, int], tasks: dict[str, str]) -> float:
    """Adjusted Rand index between FedLEASE's client -> expert assignment and the clients' true tasks."""
    from sklearn.metrics import adjusted_rand_score

    ids = sorted(assignment)
    return float(adjusted_rand_score([tasks[c] for c in ids], [assignment[c] for c in ids]))


def summarize_run(records: list[dict], tasks: dict[str, str], metric: str) -> dict[str, Any]:
    """Final per-client metrics, per-task and average main metric, and FedLEASE's allocation if any."""
    final = [r for r in records if "eval" in r][-1]
    # per-client diagnostics (gates, fusion weights, clusters) have their own key in newer records and sit among the
    # metrics in older ones; a result keeps both together per client either way
    diagnostics = final.get("diagnostics") or {}
    out: dict[str, Any] = {
        "round": final["round"], "metric": metric, "tasks": tasks,
        "per_client": {cid: {**m, **diagnostics.get(cid, {})} for cid, m in final["eval"].items()},
        "by_task": {t: m[metric] for t, m in final["summary"]["by_task"].items()},
        "average": final["summary"]["mean"][metric],
        "curve": [[r["round"], r["summary"]["mean"][metric]] for r in records if "eval" in r],
        "round_seconds": sum(r.get("seconds") or 0.0 for r in records),
    }
    # FedLEASE's allocation (IFCA's server summary has an assignment too, but no experts or silhouette)
    server = next((r["server"] for r in reversed(records) if "n_experts" in (r.get("server") or {})), None)
    if server:
        out["fedlease"] = {"n_experts": server["n_experts"], "silhouette": server["silhouette"],
                           "assignment": server["assignment"], "ari": task_ari(server["assignment"], tasks)}
    clustered = next((r["server"]["assignment"] for r in reversed(records) if (r.get("server") or {}).get("assignment")), None)
    if clustered:  # any method that groups clients (FedLEASE, IFCA): how well the groups match the tasks
        out["clustering"] = {"assignment": clustered, "ari": task_ari(clustered, tasks)}
    return out


def run_one(out: Path, scratch: Path, suite: str, profile: str, method: str, seed: int, threads: int | None,
            command: str, client_batch: str | None = None) -> dict[str, Any]:
    """Run (or skip, if its result JSON exists) one (suite, profile, method, seed) and save its result JSON."""
    from fedlora.api import evaluate_untrained
    from fedlora.core.devices import resolve_device
    from fedlora.core.io import save_text

    path = result_path(out, suite, profile, method, seed)
    cfg = config_for(suite, profile, method, seed, scratch / f"{suite}-{profile}" / f"seed{seed}" / method, threads,
                     client_batch)
    if path.is_file():
        done = json.loads(path.read_text())
        if done.get("setup") == setup_id(cfg):
            return done
        print(f"  {path.name} was made with another config of {suite}-{profile}: running it again", flush=True)
    print(f"  {suite} {profile} {method} seed {seed}: running in {cfg.run_dir}", flush=True)
    start = time.perf_counter()
    if method == UNTRAINED:
        records, before, resumed = [evaluate_untrained(cfg)], 0.0, False
    else:
        result, before, resumed = execute(cfg)
        records = result.rounds
    wall = time.perf_counter() - start + before
    clients = json.loads((cfg.run_dir / "clients.json").read_text())
    data = {"suite": suite, "profile": profile, "method": method, "seed": seed, "config": config_name(suite, profile),
            "setup": setup_id(cfg),
            "command": command, "wall_seconds": wall, "resumed": resumed, "torch_threads": threads,
            "device": str(resolve_device(cfg.model.device)), "client_batch": cfg.engine.client_batch,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **summarize_run(records, {c["client_id"]: c["task"] for c in clients}, METRIC[suite])}
    save_text(path, json.dumps(data, indent=1, sort_keys=True))  # never a half-written result that is skipped
    if method == UNTRAINED and METRIC[suite] == "accuracy":
        save_text(result_path(out, suite, profile, MAJORITY, seed),
                  json.dumps({**data, "method": MAJORITY, "wall_seconds": 0.0, **majority_class(clients)}, indent=1))
    print(f"    done in {wall:.0f} s: average {METRIC[suite]} {100 * data['average']:.2f}", flush=True)
    return data
