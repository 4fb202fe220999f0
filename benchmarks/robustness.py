"""Poisoning attacks against the averaging methods, with and without fedlora's defences, side by side.

One client (the attacker) multiplies its update, the state it sends minus what it started from (what the server
sent, else the run's shared seeded LoRA init: FedLEASE's warm-up LoRA), by a factor (x100, x1e6, or -1: a sign
flip); every other client is honest. Each attack runs with no defence (`update_clip = None`, mean), with the
adaptive update clip at 10x the round's median norm (the default until #37) and at 3x (the default since), and
with the 10x clip plus the coordinate-wise median. Reported: the honest
clients' final accuracy (mean over tasks), and how often an honest update was clipped (the clip's cost in an
honest run). Results: benchmarks/results/robustness.{md,json,png}; rows of cells not run this time (`--methods`,
`--attacks`, `--defences`) are kept from the existing json.
Usage: python benchmarks/robustness.py [--quick] [--methods fedit ...] [--attacks x100 ...] [--defences clip ...]
"""

from __future__ import annotations

from fedlora.core.offline import use_offline

use_offline()  # before transformers is imported

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest.mock import patch  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ATTACKS = {"none": 1.0, "x100": 100.0, "x1e6": 1e6, "sign flip": -1.0}
# the adaptive clip at 10x the round's median norm (the default until #37) and at 3x (the default since)
DEFENCES = {"none": {"update_clip": None}, "clip x10": {"update_clip_factor": 10.0}, "clip x3": {"update_clip_factor": 3.0},
            "clip x10 + median": {"update_clip_factor": 10.0, "aggregation": "median"}}
RENAMED = {"clip": "clip x10", "clip + median": "clip x10 + median"}  # rows stored before #37 changed the default
ATTACKER = "noun_topic-0"


def amplified(state: dict, start: dict, factor: float) -> dict:
    """start + factor x (state - start), key by key; a key without a start counts from zero."""
    return {k: start[k] + factor * (v - start[k]) if k in start else factor * v for k, v in state.items()}


def poisoned_fit(factor: float):
    """ClientRuntime.fit with the attacker's update multiplied by `factor` (its start: `update_reference`)."""
    from fedlora.core.tensors import start_if_fresh
    from fedlora.engines.runtime import ClientRuntime

    original = ClientRuntime.fit

    def fit(self, cid, rnd, payload, state):
        reply, new_state = original(self, cid, rnd, payload, state)
        if cid == ATTACKER and factor != 1.0:
            reply.states = {n: amplified(s, payload.states.get(n) or start_if_fresh(self.lora_init(), s) or {}, factor)
                            for n, s in reply.states.items()}
        return reply, new_state

    return fit


def run(method: str, attack: str, defence: str, quick: bool) -> dict:
    """One run: the honest clients' final accuracy and the clipping it saw."""
    from fedlora import run_experiment
    from fedlora.core.errors import ClientFailure
    from fedlora.engines.runtime import ClientRuntime

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"output_dir={tmp}", f"algorithm.name={method}", "engine.progress=false",
                     "engine.checkpoint_every=0", "federation.eval_at_start=false"]
        overrides += [f"federation.{k}={json.dumps(v) if v is not None else 'null'}" for k, v in DEFENCES[defence].items()]
        if quick:
            overrides += ["model.name=tiny-bert", "federation.rounds=3", "training.local_steps=3",
                          "data.train_per_client=48", "data.test_per_client=24"]
        else:
            overrides += ["federation.rounds=5"]
        if method == "fedlease":
            overrides.append("algorithm.options={\"warmup_rounds\": 2}")
        start = time.perf_counter()
        row = {"method": method, "attack": attack, "defence": defence}
        try:
            with patch.object(ClientRuntime, "fit", poisoned_fit(ATTACKS[attack])):
                result = run_experiment("demo", overrides)
        except ClientFailure as exc:  # every client diverged: the loop stops the run (min_clients)
            return {**row, "honest_accuracy": 0.0, "stopped": str(exc)[:200], "honest_clipped": 0,
                    "attacker_clipped": 0, "seconds": time.perf_counter() - start}
        honest = {c: m for c, m in result.final.items() if c != ATTACKER}
        by_task: dict[str, list[float]] = {}
        for cid, m in honest.items():
            by_task.setdefault(cid.rsplit("-", 1)[0], []).append(m["accuracy"] if math.isfinite(m["loss"]) else 0.0)
        clipped = [c for r in result.rounds for c in r.get("clipped", {})]
        return {**row, "honest_accuracy": statistics.fmean(statistics.fmean(v) for v in by_task.values()),
                "honest_nonfinite": sum(not math.isfinite(m["loss"]) for m in honest.values()),
                "honest_clipped": sum(c != ATTACKER for c in clipped), "attacker_clipped": clipped.count(ATTACKER),
                "seconds": time.perf_counter() - start}


def write(rows: list[dict], out: Path, command: str, quick: bool) -> None:
    """robustness.md / .json / .png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    stem = "robustness_quick" if quick else "robustness"
    (out / f"{stem}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["attack"], r["defence"]): r for r in rows}
    lines = [f"# Robustness to a poisoned client{' (quick: tiny-bert)' if quick else ''}", "",
             "The `demo` setup (MiniLM, 4 clients over 2 tasks, 5 rounds; FedLEASE warm-up 2) with client "
             f"`{ATTACKER}` multiplying its update by the attack's factor. Honest clients' final accuracy (x100, "
             "mean over tasks; a client whose loss is not finite counts 0). In brackets: honest updates the clip "
             "scaled down over the run / the attacker's. Defences: `clip x10`, the adaptive update clip at 10x the "
             "round's median update norm (the default until #37); `clip x3`, at 3x (the default since); `clip x10 + "
             "median`, the 10x clip with the coordinate-wise median.", ""]
    for m in methods:
        lines += [f"## {m}", "", "| attack | " + " | ".join(DEFENCES) + " |", "|---|" + "---|" * len(DEFENCES)]
        for a in ATTACKS:
            parts = []
            for d in DEFENCES:
                r = cell.get((m, a, d))
                parts.append("" if r is None else "stopped: every client diverged" if "stopped" in r else
                             f"{100 * r['honest_accuracy']:.1f} ({r['honest_clipped']} / {r['attacker_clipped']})")
            lines.append(f"| {a} | " + " | ".join(parts) + " |")
        lines.append("")
    commands = list(dict.fromkeys(r.get("command") or command for r in rows))
    lines += [f"![robustness]({stem}.png)", "", "Command" + "s" * (len(commands) > 1) + ": "
              + ", ".join(f"`{c.strip()}`" for c in commands), ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 3.8), squeeze=False)
    width = 0.8 / len(DEFENCES)
    for ax, m in zip(axes[0], methods):
        for i, d in enumerate(DEFENCES):
            ax.bar([j + i * width for j in range(len(ATTACKS))],
                   [100 * cell[(m, a, d)]["honest_accuracy"] if (m, a, d) in cell else 0 for a in ATTACKS], width, label=d)
        ax.set_xticks([j + width for j in range(len(ATTACKS))], list(ATTACKS))
        ax.set(title=m, ylabel="honest clients' accuracy x100", ylim=(0, 100))
    axes[0][0].legend(title="defence", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 3 short rounds (a CI smoke run)")
    ap.add_argument("--methods", nargs="+", default=["fedit", "fedalt", "fedlease", "fdlora"])
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    ap.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=list(DEFENCES))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    previous = args.out / ("robustness_quick.json" if args.quick else "robustness.json")
    old = json.loads(previous.read_text()) if previous.is_file() else {"rows": []}
    rerun = lambda r: (r["method"] in args.methods and r["attack"] in args.attacks  # noqa: E731
                       and r["defence"] in args.defences)
    old_rows = [{**r, "defence": RENAMED.get(r["defence"], r["defence"])} for r in old["rows"]]
    kept = [{"command": old.get("command"), **r} for r in old_rows if not rerun(r)]  # the cells not rerun
    command = "python benchmarks/robustness.py " + shlex.join(sys.argv[1:])
    rows = []
    for method in args.methods:
        for attack in args.attacks:
            for defence in args.defences:
                rows.append({**run(method, attack, defence, args.quick), "command": command})
                r = rows[-1]
                print(f"{method:9s} {attack:9s} {defence:14s} honest acc {100 * r['honest_accuracy']:5.1f} "
                      f"clipped {r['honest_clipped']}/{r['attacker_clipped']} ({r['seconds']:.0f} s)", flush=True)
                write(kept + rows, args.out, command, args.quick)


if __name__ == "__main__":
    main()
