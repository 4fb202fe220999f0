"""Does FedLEASE's B-distance clustering see the tasks? A diagnostic for the quality sweep's findings.

For each given run directory it takes the LoRAs FedLEASE clusters (a FedLEASE run's warm-up LoRAs from its
server checkpoint) or, for any other run, every client's final `lora` state (e.g. Local after all its steps),
and reports: the mean B distance between clients of the same task and of different tasks, the silhouette curve
and the M it picks, and the adjusted Rand index with the true tasks at the chosen M and at K = number of tasks.
The clustering is FedLEASE's own (fedlora.algorithms.clustering), unchanged.
Usage: python benchmarks/clustering_probe.py LABEL=RUN_DIR [LABEL=RUN_DIR ...] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score

from fedlora.algorithms import parse_options
from fedlora.algorithms.clustering import b_distance_matrix, choose_clusters
from fedlora.core.config import AlgorithmConfig
from fedlora.engines.checkpoint import load_checkpoint


def client_loras(run_dir: Path) -> tuple[str, dict[str, dict], dict[str, int] | None]:
    """The LoRAs to cluster and, for FedLEASE, the run's own assignment: its cached warm-up LoRAs, else every
    client's final `lora` state."""
    ckpt = load_checkpoint(run_dir)
    warm = {k.removeprefix("warm."): v for k, v in ckpt.server_state["tensors"].items() if k.startswith("warm.")}
    if warm:
        return "warm-up LoRAs (server cache)", warm, ckpt.server_state["meta"].get("assignment")
    finals = {cid: s.states["lora"] for cid, s in ckpt.client_states.items() if "lora" in s.states}
    if not finals:
        sys.exit(f"{run_dir}: no FedLEASE warm-up LoRAs and no client 'lora' state in its last checkpoint; "
                 "give a FedLEASE run or a run whose clients keep one LoRA (local, fedit, ...)")
    return f"final client LoRAs (round {ckpt.round})", finals, None


def max_clusters(config: dict) -> int:
    """FedLEASE's cap on M with this run's config (its FedLEASE options, as a FedLEASE run would take them)."""
    options = AlgorithmConfig.model_validate(config["algorithm"]).options_for("fedlease")
    return parse_options("fedlease", options).expert_limit


def probe(run_dir: Path) -> dict:
    """B distances within and across tasks, silhouette curve, chosen M, ARI at M and at the number of tasks."""
    source, loras, run_assignment = client_loras(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    # the run's registration order (FedLEASE clusters in it) and each client's true task
    clients = [c for c in json.loads((run_dir / "clients.json").read_text()) if c["client_id"] in loras]
    ids, tasks = [c["client_id"] for c in clients], np.array([c["task"] for c in clients])
    dist = b_distance_matrix([loras[c] for c in ids])
    off_diagonal = ~np.eye(len(ids), dtype=bool)
    same = (tasks[:, None] == tasks[None, :]) & off_diagonal
    chosen = choose_clusters(dist, max_clusters(config))
    n_tasks = len(set(tasks))
    at_tasks = AgglomerativeClustering(n_clusters=n_tasks, metric="precomputed", linkage="average").fit_predict(dist)
    return {"run": str(run_dir), "source": source, "method": config["algorithm"]["name"],
            "dirichlet_alpha": config["data"].get("dirichlet_alpha"), "clients": len(ids),
            "within_task": float(dist[same].mean()) if same.any() else None,  # None: one client per task
            "across_tasks": float(dist[~same & off_diagonal].mean()),
            "silhouette": chosen.silhouette, "M": chosen.n_clusters,
            "ari_at_M": float(adjusted_rand_score(tasks, chosen.labels)),
            "ari_at_tasks": float(adjusted_rand_score(tasks, at_tasks)),
            # FedLEASE runs: the clustering recomputed here is the one the run made (a check on the probe itself)
            "same_as_run": None if run_assignment is None else
            adjusted_rand_score([run_assignment[c] for c in ids], chosen.labels) == 1.0}


def fmt(distance: float | None) -> str:
    """A distance to 3 decimals, '–' when there is none."""
    return "–" if distance is None else f"{distance:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("--out", type=Path, help="write the Markdown table (and a .json beside it) here")
    args = parser.parse_args()
    rows = []
    for item in args.runs:
        label, _, path = item.partition("=")
        rows.append({"label": label, **probe(Path(path))})
    lines = ["| run | LoRAs clustered | B distance within task | across tasks | silhouette at M | M | ARI at M | "
             "ARI at K = tasks |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['source']} | {fmt(r['within_task'])} | {r['across_tasks']:.3f} | "
              f"{r['silhouette'].get(r['M'], float('nan')):.3f} | {r['M']} | {r['ari_at_M']:.2f} | "
              f"{r['ari_at_tasks']:.2f} |" for r in rows]
    print("\n".join(lines))
    if args.out:
        command = shlex.join(["python", "benchmarks/clustering_probe.py", *sys.argv[1:]])
        args.out.write_text("\n".join([f"Made by `{command}`", "", *lines, ""]))
        args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
