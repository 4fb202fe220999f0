"""Wall time of the same run on the in-process engine, Flower's simulation runtime and a local Flower
deployment (SuperLink + one SuperNode process per client, TLS and node authentication), side by side.

Each engine runs the same config; per-round cost = the median of the rounds' own timings (metrics.jsonl,
rounds without evaluation), fixed start-up = wall time - the sum of the round timings.
Results: benchmarks/results/engines.{md,json,png}.
Usage: python benchmarks/engines.py [--quick] [--model tiny-bert|minilm] [--method fedalt] [--engines ...] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ENGINES = ("inprocess", "flower-sim", "flower-local", "flower-local-cold")
# flower-local-cold: the same deployment without warm workers (a fresh ClientApp process per message, as
# Flower runs a plain ClientApp), the "before" of docs/deployment.md's warm clients
VARIANTS = {"flower-local-cold": ("flower-local", {"warm_clients": False})}


def timed_run(model: str, method: str, engine: str, rounds: int, steps: int,
              per_task: int = 2) -> tuple[float, list[float], float, float | None]:
    """(wall seconds, seconds of each round without evaluation, seconds spent inside rounds, seconds of the
    Flower handshake)."""
    from fedlora import run_experiment

    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"name": "bench", "output_dir": tmp, "seed": 0, "model": {"name": model},
               "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
               "data": {"dataset": "wordnet-demo", "clients_per_task": per_task, "train_per_client": 96, "test_per_client": 32,
                        "max_length": 32},
               "training": {"lr": 1e-3, "local_steps": steps, "batch_size": 16},
               "federation": {"rounds": rounds, "eval_every": rounds, "eval_at_start": False},
               "algorithm": {"name": method},
               # same hardware for both: in process all cores in one torch pool, on Flower one core per Ray actor
               "engine": {"name": VARIANTS.get(engine, (engine,))[0], "progress": False, "checkpoint_every": 0,
                          "torch_threads": 1 if engine.startswith("flower") else None,
                          **(VARIANTS[engine][1] if engine in VARIANTS else {})}}
        start = time.perf_counter()
        result = run_experiment(cfg)
        wall = time.perf_counter() - start
        return (wall, [r["seconds"] for r in result.rounds if "eval" not in r],
                sum(r["seconds"] for r in result.rounds if r.get("seconds")), handshake_seconds(Path(tmp)))


def handshake_seconds(run_dir: Path) -> float | None:
    """How long the Flower server's handshake took (its run.log says): the nodes' start-up, model and data."""
    for log in run_dir.rglob("run.log"):
        found = re.search(r"handshake: \d+ nodes answered in ([\d.]+) s", log.read_text())
        if found:
            return float(found.group(1))
    return None


# #23's starting point and the steps since, from this script's earlier committed runs (git log -p
# benchmarks/results/engines.md): (commit, what it measured, flower-sim start-up s, flower-sim / in-process,
# flower-local / in-process, flower-local-cold / in-process)
EARLIER = [("ea7bfc9", "before #23: a fresh ClientApp per message, run beside the quality sweeps", 318.9, 1.03, 1.51,
            None),
           ("e5ebac7", "warm workers, Flower's own waits (3 s polls)", 23.3, 1.14, 4.84, 9.08),
           ("11e1660", "shorter waits, packed wire format, 8 object transfers at a time", 15.0, 0.96, 1.59, 5.74)]


def settle(timeout: float = 90.0, idle_percent: float = 10.0) -> None:
    """Wait until the previous engine's processes are gone and the machine is idle: a 2-thread torch pool (the
    in-process engine) slows by a third when anything else takes a core now and then (Ray or a SuperNode still
    shutting down), which made a later engine look cheaper than it is."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = psutil.cpu_percent(interval=1.0)
        if not psutil.Process().children(recursive=True) and busy < idle_percent:
            return
    print(f"warning: the machine did not settle within {timeout:.0f} s (the timings may be noisy)", file=sys.stderr)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few rounds (a CI smoke run)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--method", default="fedalt")
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES),
                    help="which engines (in-process is always run: it is the reference)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    ap.add_argument("--repeats", type=int, default=1, help="run every engine this many times (medians reported)")
    ap.add_argument("--report-only", action="store_true", help="rebuild engines.md/.png from OUT/engines.json")
    args = ap.parse_args()
    if args.report_only:
        write_report(args.out, json.loads((args.out / "engines.json").read_text()))
        return
    model = args.model or ("tiny-bert" if args.quick else "minilm")
    # quick: one plain round per engine and 2 clients (2 SuperNodes) are enough for CI
    rounds, steps, per_task = (2, 2, 1) if args.quick else (5, 8, 2)
    timed_run(model, args.method, "inprocess", 1, 1)  # warm-up: imports and file caches are not engine costs
    engines = ["inprocess"] + [e for e in args.engines if e != "inprocess"]
    # this machine's speed drifts by 20-40% over minutes: each repeat runs every engine, a ratio is taken within
    # its repeat (minutes apart at most), and the table gives the medians over repeats
    repeats = []
    for _ in range(args.repeats):
        runs = {}
        for engine in engines:
            settle(timeout=5.0 if args.quick else 90.0)  # a CI smoke run measures nothing worth waiting for
            wall, plain_rounds, in_rounds, handshake = timed_run(model, args.method, engine, rounds, steps, per_task)
            runs[engine] = {"wall": wall, "round_seconds": plain_rounds, "per_round": statistics.median(plain_rounds),
                            "startup": wall - in_rounds, "handshake": handshake}
        repeats.append(runs)
    rows = {e: {key: _median([r[e][key] for r in repeats]) for key in ("wall", "per_round", "startup", "handshake")}
            for e in engines}
    for e in engines:
        rows[e]["round_seconds"] = [r[e]["round_seconds"] for r in repeats]
    repeat_ratios = {e: [r[e]["per_round"] / r["inprocess"]["per_round"] for r in repeats] for e in engines[1:]}
    ratios = {e: statistics.median(values) for e, values in repeat_ratios.items()}
    data = {"command": "python benchmarks/engines.py " + " ".join(sys.argv[1:]), "model": model,
            "method": args.method, "rounds": rounds, "local_steps": steps, "clients": 2 * per_task,
            "repeats": args.repeats, "engines": rows, "per_round_ratio_flower_over_inprocess": ratios.get("flower-sim"),
            "per_round_ratio_over_inprocess": ratios, "per_round_ratio_each_repeat": repeat_ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engines.json").write_text(json.dumps(data, indent=2))
    write_report(args.out, data)


def write_report(out: Path, data: dict) -> None:
    """engines.md (the table, medians over repeats, and earlier runs) and engines.png from the results."""
    rows, ratios = data["engines"], data["per_round_ratio_over_inprocess"]
    ratio = ratios.get("flower-sim")
    repeat_ratios = data.get("per_round_ratio_each_repeat", {e: [r] for e, r in ratios.items()})
    model, method, repeats = data["model"], data["method"], data.get("repeats", 1)

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    def each(engine: str) -> str:
        return ", ".join(f"{x:.2f}" for x in repeat_ratios[engine]) if engine in repeat_ratios else "-"

    lines = [f"# Engines: in-process vs Flower ({model}, {method}, {data['clients']} clients, "
             f"{data['local_steps']} local steps)", "", f"Command: `{data['command']}`", "",
             "| engine | start-up s | of which handshake s | per round s | per round / in-process | each repeat |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {e} | {r['startup']:.1f} | {seconds(r['handshake'])} | {r['per_round']:.2f} | "
              f"{ratios.get(e, 1.0):.2f}x | {each(e)} |" for e, r in rows.items()]
    if repeats > 1:
        lines += ["", f"Medians over {repeats} repeats; each repeat runs every engine in turn, and its ratios are "
                  "taken within it. Each engine starts once the previous one's processes are gone and the machine "
                  "is idle."]
    headline = f"**{ratio:.2f}x** (aim: at most 1.3x)" if ratio is not None else "not measured (no flower-sim)"
    lines += ["", f"Per-round cost on the Flower simulation / in-process: {headline}. All use",
              "every core: in process one torch thread pool over all cores, clients one after another; on Flower",
              "one torch thread per client process, clients in parallel (simulation: one Ray actor per core).",
              "flower-local is a real deployment on this machine (SuperLink, one SuperNode per client, TLS and node",
              "authentication). Flower 1.42 starts a fresh ClientApp process for every message; fedlora's ClientApp",
              "hands it to the node's warm worker, which built the model and data once (flower-local-cold: without",
              "it, every message imports torch and rebuilds them). Start-up = wall time - the rounds' own time:",
              "Ray or the SuperLink and SuperNodes, the handshake (where each node builds its model and data), and",
              "the nodes' final personalized-model export.",
              "", "Earlier runs of this script (same config, one repeat each; docs/deployment.md says what changed):",
              "", "| commit | code | flower-sim start-up s | flower-sim | flower-local | flower-local-cold |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {commit} | {what} | {start:.1f} | {sim:.2f}x | {local:.2f}x | "
              f"{'-' if cold is None else f'{cold:.2f}x'} |" for commit, what, start, sim, local, cold in EARLIER]
    lines += ["", "![engines](engines.png)"]
    (out / "engines.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(rows)
    ax.bar([i - 0.2 for i in range(len(names))], [rows[n]["startup"] for n in names], 0.4, label="start-up (s)")
    ax.bar([i + 0.2 for i in range(len(names))], [rows[n]["per_round"] for n in names], 0.4, label="per round (s)")
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="seconds", title=f"engine cost, {model}, {method}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "engines.png", dpi=110)
    print("\n".join(lines[4:6 + len(rows)]))


if __name__ == "__main__":
    main()
