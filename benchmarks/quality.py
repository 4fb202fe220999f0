"""Quality: every method on the NLU, NLG and glue suites (16, 8 and 16 clients), over seeds, vs the papers.

One setup per suite and profile: the built-in config `<suite>-<profile>` unchanged except algorithm.name and
seed (plus engine settings that do not change results), so every method sees the same split, seed and local
budget; a suite may add overrides of its own, the same for every method (glue-skew = glue-<profile> with
Dirichlet(0.5) label skew inside each task; SUITE_CONFIG in quality_setup.py). Each (suite, profile, method, seed)
run leaves a small JSON in <out>/quality/runs/ and is skipped when that exists, so a long sweep can be stopped at
any time and continued in a later session; an interrupted run resumes from its checkpoint (run directories live in --scratch, default runs/quality/, never in the results).
Tables, plots and the comparison with the papers' reported orderings are rebuilt from whatever runs exist.
Results: <out>/quality/quality.{md,json} and quality_<suite>.png (quality-paper.* for --profile paper), covering the
suites run now and every suite with finished runs of the profile.
Usage: python benchmarks/quality.py [--suite nlu|nlg|glue|glue-skew|all ...] [--profile quick|paper] [--seeds 0 1 2]
       [--methods ...] [--quick] [--report-only] [--estimate] [--out DIR] [--scratch DIR] [--threads N] [--jobs N]
       [--client-batch N|auto]
This file is the command line and the sweep; beside it: quality_setup.py (suites, methods, papers, each run's
config), quality_runs.py (one run: result JSON, resume, lock), quality_stats.py (seed statistics, orderings),
quality_report.py (quality.md/.json, plots) and quality_estimate.py (the timing probe and the time table).
"""

from __future__ import annotations

from fedlora.core.offline import use_offline

use_offline()  # before anything imports transformers: a hub look-up blocks ~23 s

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from quality_estimate import probe  # noqa: E402
from quality_report import write_report  # noqa: E402
from quality_runs import claim, current, result_path, run_one  # noqa: E402
from quality_setup import MAJORITY, METHODS, NAMES, PAPER, SEEDS, SMOKE, SUITES  # noqa: E402
from quality_stats import measured_order  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCRATCH = ROOT / "runs" / "quality"


def start_helpers(n: int) -> list:
    """n more copies of this sweep (same flags, one torch thread each): the run locks make them share the work."""
    import subprocess

    if n <= 0:
        return []
    argv, skip = [], False
    for a in sys.argv[1:]:  # drop --jobs/--threads, whatever their spelling
        if skip or a.startswith(("--jobs=", "--threads=")):
            skip = False
            continue
        if a in ("--jobs", "--threads"):
            skip = True
            continue
        argv.append(a)
    return [subprocess.Popen([sys.executable, __file__, *argv, "--threads", "1"]) for _ in range(n)]


def main() -> None:
    """Parse the flags, run what is missing (or probe the time), then rebuild the report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=[*SUITES, "all"], nargs="+", default=["all"],
                    help="one or more suites (default all: " + ", ".join(SUITES) + ")")
    ap.add_argument("--profile", choices=["quick", "paper"], default="quick")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="default: " + ", ".join(f"{s} {' '.join(map(str, v))}" for s, v in SEEDS.items()))
    ap.add_argument("--methods", nargs="+", default=None, help="default: the issue's list for each suite")
    ap.add_argument("--quick", action="store_true", help="CI smoke run: tiny models, few examples, 2 rounds, 1-2 methods")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    ap.add_argument("--estimate", action="store_true", help="time a short FedIT probe and estimate the full sweep")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    ap.add_argument("--scratch", type=Path, default=None, help="run directories (default runs/quality)")
    ap.add_argument("--threads", type=int, default=None, help="engine.torch_threads (default: torch's own)")
    ap.add_argument("--jobs", type=int, default=1, help="sweeps side by side (one per core, each --threads 1)")
    ap.add_argument("--client-batch", default=None,
                    help="engine.client_batch: clients trained together in one pass (a GPU's speed-up; docs/batched.md)")
    args = ap.parse_args()
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    if args.jobs > 1 and args.threads is None:
        args.threads = 1  # one core per sweep
    suites = list(SUITES) if "all" in args.suite else [s for s in SUITES if s in args.suite]
    profile = "smoke" if args.quick else args.profile
    out = args.out
    # the report covers the suites run now and every other suite that has finished runs of this profile
    reported = [s for s in SUITES if s in suites or any((out / "quality" / "runs" / f"{s}-{profile}").glob("*.json"))]
    seeds = {s: [0] if args.quick else list(args.seeds if args.seeds and s in suites else SEEDS[s]) for s in reported}
    defaults = {s: SMOKE[s][2] if args.quick else METHODS[s] for s in reported}
    methods = {s: list(args.methods) if args.methods and s in suites else defaults[s] for s in defaults}
    tmp = tempfile.TemporaryDirectory(prefix="quality-") if args.quick and args.scratch is None else None
    scratch = Path(tmp.name) if tmp else (args.scratch or SCRATCH)
    start = time.perf_counter()
    try:
        if args.estimate:
            from fedlora.core.io import save_text

            path = out / "quality" / "estimate.json"
            estimates = json.loads(path.read_text()) if path.is_file() else {}
            for suite in suites:
                print(f"probing {suite}-{args.profile} ...", flush=True)
                estimates[f"{suite}-{args.profile}"] = e = probe(suite, args.profile, scratch)
                print(f"  FedIT run ~ {e['fedit_run_cpu_s'] / 3600:.2f} CPU h (probe {e['probe_wall_s']:.0f} s)")
            save_text(path, json.dumps(estimates, indent=1, sort_keys=True))
        elif not args.report_only:
            helpers = start_helpers(args.jobs - 1)
            for suite in suites:
                for seed in seeds[suite]:  # seed-major: a stopped sweep leaves complete tables for the first seeds
                    for method in methods[suite]:
                        if method == MAJORITY:
                            continue  # written by the untrained run, from its split
                        path = result_path(out, suite, profile, method, seed)
                        if path.is_file() and current(json.loads(path.read_text()), suite, profile):
                            continue  # finished
                        with claim(path) as mine:
                            if not mine:
                                continue  # another sweep is running it
                            run_one(out, scratch, suite, profile, method, seed, args.threads, command,
                                    args.client_batch)
                        write_report(out, profile, methods, seeds, command)  # up to date whenever stopped
            for helper in helpers:  # they finish the runs they hold; a failed one leaves its runs to the next sweep
                if helper.wait() != 0:
                    print(f"a helper sweep exited with {helper.returncode}; run the command again", flush=True)
    finally:
        if tmp:
            tmp.cleanup()
    md = write_report(out, profile, methods, seeds, command)
    data = json.loads(md.with_suffix(".json").read_text())
    for suite, s in data["suites"].items():
        table = s["table"]
        print(f"{suite}: {sum(len(v['seeds']) for v in table.values())} runs; ours: {measured_order(table)}")
        print(f"  paper: {' > '.join(' ~ '.join(NAMES[m] for m in g) for g in PAPER[suite]['order'])}. {s['verdict']}")
        for r in s["fedlease"]:
            print(f"  FedLEASE seed {r['seed']}: M={r['n_experts']}, ARI={r['ari']:.3f}")
    print(f"{len(data['missing'])} runs not yet done; {time.perf_counter() - start:.0f} s; report: {md}")


if __name__ == "__main__":
    main()
