"""The price of client-level differential privacy: accuracy against epsilon, per method, side by side.

Each method runs the `demo` setup with more clients (client-level DP needs several per round) without DP
(epsilon = inf) and under `privacy.dp = client_clipping` with the noise calibrated to each target epsilon for
the whole run (delta 1e-5, every client every round). Reported: the final accuracy (mean over tasks), the
noise multiplier the target needed, and for FedLEASE the clusters it found on noised B (adjusted Rand index
against the tasks). Results: benchmarks/results/privacy.{md,json,png}.
Usage: python benchmarks/privacy.py [--quick] [--methods fedit ffa fedalt fedlease] [--epsilons 1 4 16]
"""

from __future__ import annotations

from fedlora.core.offline import use_offline

use_offline()  # before transformers is imported

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CLIP_NORM = 1.0  # below the honest updates' median L2 norm in this setup (1.2-1.7 after round 1), as DP-FedAvg advises
SETUP = ["data.clients_per_task=4", "data.train_per_client=80", "data.test_per_client=40", "training.local_steps=8",
         "federation.rounds=4"]
QUICK = ["model.name=tiny-bert", "data.clients_per_task=4", "data.train_per_client=32", "data.test_per_client=16",
         "training.local_steps=3", "federation.rounds=2"]


def run(method: str, epsilon: float, quick: bool) -> dict:
    """One run: the final accuracy and what the privacy cost."""
    from sklearn.metrics import adjusted_rand_score

    from fedlora import run_experiment

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"output_dir={tmp}", f"algorithm.name={method}", "engine.progress=false",
                     "engine.checkpoint_every=0", "federation.eval_at_start=false", *(QUICK if quick else SETUP)]
        if method == "fedlease":
            overrides.append('algorithm.options={"warmup_rounds": 1}')
        if math.isfinite(epsilon):
            overrides += ["privacy.dp=client_clipping", f"privacy.clip_norm={CLIP_NORM}",
                          f"privacy.target_epsilon={epsilon}"]
        start = time.perf_counter()
        result = run_experiment("demo", overrides)
        last = result.rounds[-1]
        row = {"method": method, "epsilon_target": epsilon if math.isfinite(epsilon) else None,
               "accuracy": last["summary"]["mean"]["accuracy"], "seconds": time.perf_counter() - start}
        if "privacy" in last:
            row.update(epsilon=last["privacy"]["epsilon"], noise_multiplier=last["privacy"]["noise_multiplier"])
        assignment = next((r["server"]["assignment"] for r in reversed(result.rounds)
                           if r.get("server", {}).get("assignment")), None)
        if assignment:
            tasks = {c["client_id"]: c["task"] for c in json.loads((Path(tmp) / "clients.json").read_text())}
            ids = sorted(assignment)
            row["cluster_ari"] = adjusted_rand_score([tasks[c] for c in ids], [assignment[c] for c in ids])
        return row


def write(rows: list[dict], out: Path, command: str, quick: bool) -> None:
    """privacy.md / .json / .png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    stem = "privacy_quick" if quick else "privacy"
    (out / f"{stem}.json").write_text(json.dumps({"command": command, "clip_norm": CLIP_NORM, "rows": rows}, indent=1))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    levels = list(dict.fromkeys(r["epsilon_target"] for r in rows))
    cell = {(r["method"], r["epsilon_target"]): r for r in rows}
    label = lambda e: "inf (no DP)" if e is None else f"{e:g}"  # noqa: E731
    lines = [f"# Accuracy against epsilon{' (quick: tiny-bert)' if quick else ''}", "",
             "The `demo` setup (MiniLM, WordNet noun topic + verb class) with 8 clients (4 per task), 4 rounds of "
             f"8 local steps, every client every round; `client_clipping` with clip_norm {CLIP_NORM} and the noise "
             "calibrated so the 4 rounds spend the target epsilon at delta 1e-5. Final accuracy x100 (mean over "
             "tasks); in brackets the noise multiplier; FedLEASE: the ARI of its clusters (found on noised B) "
             "against the tasks.", "",
             "| method | " + " | ".join(f"eps {label(e)}" for e in levels) + " |", "|---|" + "---|" * len(levels)]
    for m in methods:
        parts = []
        for e in levels:
            r = cell.get((m, e))
            if r is None:
                parts.append("")
                continue
            text = f"{100 * r['accuracy']:.1f}"
            extra = [f"z={r['noise_multiplier']:.2f}"] if "noise_multiplier" in r else []
            extra += [f"ARI {r['cluster_ari']:.2f}"] if "cluster_ari" in r else []
            parts.append(text + (f" ({', '.join(extra)})" if extra else ""))
        lines.append(f"| {m} | " + " | ".join(parts) + " |")
    lines += ["", f"![privacy]({stem}.png)", "", f"Command: `{command}`", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = list(range(len(levels)))
    for i, m in enumerate(methods):
        ax.plot(xs, [100 * cell[(m, e)]["accuracy"] if (m, e) in cell else math.nan for e in levels],
                marker="os^Dv"[i % 5], label=m, alpha=0.85)
    ax.set_xticks(xs, [label(e) for e in levels])
    ax.set(xlabel="epsilon (delta 1e-5)", ylabel="final accuracy x100", title="accuracy against privacy")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 short rounds (a smoke run)")
    ap.add_argument("--methods", nargs="+", default=["fedit", "ffa", "fedalt", "fedlease"])
    ap.add_argument("--epsilons", nargs="+", type=float, default=[16.0, 4.0, 1.0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep the rows of an earlier run in --out, run the rest")
    args = ap.parse_args()
    stored = args.out / ("privacy_quick.json" if args.quick else "privacy.json")
    rows = json.loads(stored.read_text())["rows"] if args.keep and stored.is_file() else []
    done = {(r["method"], r["epsilon_target"]) for r in rows}
    for method in args.methods:
        for epsilon in [math.inf, *args.epsilons]:
            if (method, epsilon if math.isfinite(epsilon) else None) in done:
                continue
            rows.append(run(method, epsilon, args.quick))
            r = rows[-1]
            print(f"{method:9s} eps {epsilon:>5g}: accuracy {100 * r['accuracy']:5.1f} ({r['seconds']:.0f} s)", flush=True)
            write(rows, args.out, "python benchmarks/privacy.py " + " ".join(sys.argv[1:]), args.quick)


if __name__ == "__main__":
    main()
