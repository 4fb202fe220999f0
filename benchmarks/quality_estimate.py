"""The quality study's time estimate: a short FedIT timing probe, scaled to a full run of a profile, and the
report's "Time" section from it and from the runs that have finished."""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from quality_runs import load_runs
from quality_setup import MAJORITY, METHODS, METRIC, NAMES, UNTRAINED, config_for, config_name, suite_tasks

# Cost of a run relative to FedIT's, used only to estimate runs that have not been measured yet. From the
# methods' extra passes (docs/methods.md): FedDPA trains two passes; IFCA scores 4 cluster LoRAs on all of a
# client's training data each round; FDLoRA runs 40 fusion evaluations on 16 examples at every evaluation;
# FedALT and FedLEASE forward 2 and M experts. Replaced by measured times as soon as a method has run.
COST = {"nlu": {"feddpa": 2.0, "ifca": 2.3, "fdlora": 2.0, "fedalt": 1.2, "fedlease": 1.2},
        "nlg": {"feddpa": 2.0, "ifca": 2.3, "fdlora": 2.5, "fedalt": 1.2, "fedlease": 1.2}}
COST["glue"] = COST["glue-skew"] = COST["nlu"]  # classification suites, as NLU
PROBE_STEPS = 2  # local steps of the timing probe; its per-step and per-evaluation costs are scaled up


def probe(suite: str, profile: str, scratch: Path) -> dict[str, Any]:
    """Time FedIT on a few clients for one round of PROBE_STEPS steps and scale it to a full run of the profile."""
    from fedlora.api import run_experiment
    from fedlora.core.config import load_config
    from fedlora.data.suites import NLG_TASKS
    from fedlora.data.tokenize import steps_for_epochs
    from fedlora.engines.inprocess import InProcessTransport

    full = config_for(suite, profile, "fedit", 0, scratch)  # the sweep's own schedule (final evaluation only)
    # a subset of clients (per-client cost does not depend on how many there are): 1 per classification task
    # (NLU, glue), 4 NLG tasks
    classification = METRIC[suite] == "accuracy"
    subset = ["data.clients_per_task=1"] if classification else [f"data.tasks=[{', '.join(NLG_TASKS[::2])}]"]
    if full.data.partition == "by_key":  # glue: one client would hold all 4 shards of its task (and say so)
        subset.append("data.partition=iid")
    name, overrides = config_name(suite, profile)
    cfg = load_config(name, overrides + subset + [
        "federation.rounds=1", "federation.eval_at_start=false", f"training.local_steps={PROBE_STEPS}",
        "training.local_epochs=null", "engine.torch_threads=1", "engine.checkpoint_every=0", "engine.progress=false",
        f"output_dir={scratch / f'probe-{suite}-{profile}'}"])
    cfg.algorithm.name, cfg.algorithm.options = "fedit", cfg.algorithm.options_for("fedit")
    spent = {"fit": 0.0, "eval": 0.0}
    originals = {"fit": InProcessTransport.fit, "eval": InProcessTransport.evaluate}

    def timed(kind):
        def wrapper(self, *args, **kwargs):
            start = time.process_time()
            try:
                return originals[kind](self, *args, **kwargs)
            finally:
                spent[kind] += time.process_time() - start
        return wrapper

    # CPU seconds with one torch thread: the compute itself, not inflated by other jobs on a shared machine
    InProcessTransport.fit, InProcessTransport.evaluate = timed("fit"), timed("eval")
    try:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = run_experiment(cfg, overwrite=True)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        InProcessTransport.fit, InProcessTransport.evaluate = originals["fit"], originals["eval"]
    n_probe = len(result.final)
    tr, fed = full.training, full.federation
    steps = tr.local_steps or steps_for_epochs(tr.local_epochs, full.data.train_per_client, tr.batch_size)
    n_clients = len(full.data.tasks or suite_tasks(suite)) * (full.data.clients_per_task or 2)
    evals = int(fed.eval_at_start) + sum(1 for r in range(1, fed.rounds + 1) if r % fed.eval_every == 0 or r == fed.rounds)
    per_step, per_eval = spent["fit"] / (n_probe * PROBE_STEPS), spent["eval"] / n_probe
    startup = cpu - spent["fit"] - spent["eval"]
    fedit = startup + n_clients * (fed.rounds * steps * per_step + evals * per_eval)
    return {"suite": suite, "profile": profile, "probe_clients": n_probe, "probe_cpu_s": cpu, "probe_wall_s": wall,
            "cpu_per_client_step_s": per_step, "cpu_per_client_eval_s": per_eval, "startup_cpu_s": startup,
            "clients": n_clients, "rounds": fed.rounds, "local_steps": steps, "evaluations": evals,
            "fedit_run_cpu_s": fedit, "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def estimate_lines(estimates: dict[str, Any], out: Path, seeds: dict[str, list[int]]) -> list[str]:
    """The time estimate per (suite, profile): FedIT from the probe, other methods by COST or by measured runs."""
    lines = ["## Time", "",
             "Estimated from a timing probe (`--estimate`): FedIT on a few clients for one round of "
             f"{PROBE_STEPS} local steps with one torch thread; its CPU seconds per client step and per client "
             "evaluation are scaled to the profile's clients, rounds, local steps and evaluations. CPU seconds with "
             "one thread are about the wall time on one free core; two sweeps side by side (`--jobs 2`) "
             "use both cores of a free 2-core machine, about halving the wall time. "
             "Other methods: the mean wall time of their finished runs where there is one, else FedIT x an assumed "
             f"cost factor ({', '.join(f'{NAMES[m]} {f}' for m, f in COST['nlu'].items())}; FDLoRA "
             f"{COST['nlg']['fdlora']} on NLG; 1.0 for the rest; see COST in quality_estimate.py). Suites not "
             "probed yet have no row.", "",
             "| profile | suite | probed | FedIT run (CPU h) | seeds | every method x seeds (CPU h) | "
             "finished runs (wall h) | remaining (h) |", "|---|---|---|---|---|---|---|---|"]
    if not estimates:
        return lines + ["| – | – | not measured: run `python benchmarks/quality.py --estimate --suite all` | | | | | |", ""]
    totals: dict[str, dict[str, float]] = {}
    order = list(METHODS)  # the suites in report order
    ordered = sorted((e for e in estimates.values() if e["suite"] in seeds),
                     key=lambda e: (e["profile"] != "quick", order.index(e["suite"]) if e["suite"] in order else 99))
    for e in ordered:
        suite, profile = e["suite"], e["profile"]
        runs = load_runs(out, suite, profile)
        fedit = e["fedit_run_cpu_s"]
        per_method = {}
        # the reference rows: the untrained one is start-up plus one evaluation per client, the majority row is free
        # (written by the untrained run)
        reference = {UNTRAINED: e["startup_cpu_s"] + e["clients"] * e["cpu_per_client_eval_s"], MAJORITY: 0.0}
        for m in METHODS[suite]:
            done = [r["wall_seconds"] for r in runs.get(m, {}).values()]
            per_method[m] = statistics.fmean(done) if done else reference.get(m, fedit * COST[suite].get(m, 1.0))
        total = len(seeds[suite]) * sum(per_method.values())
        totals.setdefault(profile, {})[suite] = total
        finished = sum(r["wall_seconds"] for by in runs.values() for r in by.values())
        remaining = sum(per_method[m] for m in METHODS[suite] for s in seeds[suite] if s not in runs.get(m, {}))
        lines.append(f"| {profile} | {suite} | {e['measured'][:10]} | {fedit / 3600:.2f} | {len(seeds[suite])} | "
                     f"{total / 3600:.1f} | {finished / 3600:.2f} | {remaining / 3600:.1f} |")
    lines.append("")
    for profile, by_suite in totals.items():
        total = sum(by_suite.values())
        parts = "; ".join(f"{s.upper()} ({len(seeds[s])} seed{'s' if len(seeds[s]) > 1 else ''}) {t / 7200:.1f} h"
                          for s, t in by_suite.items())
        line = (f"* **{profile} profile, every method: about {total / 3600:.1f} CPU hours, i.e. about "
                f"{total / 7200:.1f} h on a free 2-core machine** ({parts} with `--jobs 2`)"
                + (f", {total / 86400 / 2:.0f} days." if total > 2 * 86400 else "."))
        if profile == "quick":
            first = {s: t for s, t in by_suite.items() if s in ("nlu", "nlg")}
            fits = [s.upper() for s, t in first.items() if t / 2 <= 3600 * 1.2]
            if first:
                line += (" The issue's target for NLU and NLG is about 60 minutes on 2 cores: met by "
                         + (" and ".join(fits) if fits else "neither suite") + " on its own, not by both together."
                         if len(fits) < len(first) or sum(first.values()) / 2 > 3600 * 1.2 else
                         " The issue's target for NLU and NLG (about 60 minutes on 2 cores) is met.")
            if "glue" in by_suite:  # issue #18: glue-quick's sweep in about 3 hours on 2 cores
                line += (f" The glue sweep's target (about 3 h on 2 cores) is "
                         f"{'met' if by_suite['glue'] / 2 <= 3 * 3600 * 1.1 else 'not met'}.")
        lines.append(line)
    probes = "; ".join(f"{e['suite']}-{e['profile']}: {e['cpu_per_client_step_s']:.2f} s per client step, "
                       f"{e['cpu_per_client_eval_s']:.1f} s per client evaluation, {e['clients']} clients x "
                       f"{e['rounds']} rounds x {e['local_steps']} steps, {e['evaluations']} evaluations"
                       for e in ordered)
    return lines + ["", f"Probe (CPU seconds, one thread): {probes}.", ""]
