"""Quality: every method on the NLU suite (16 clients) and the NLG suite (8 clients), over seeds, vs the papers.

One setup per suite and profile: the built-in config `<suite>-<profile>` unchanged except algorithm.name and
seed (plus engine settings that do not change results), so every method sees the same split, seed and local
budget. Each (suite, profile, method, seed) run leaves a small JSON in <out>/quality/runs/ and is skipped when
that exists, so a long sweep can be stopped at any time and continued in a later session; an interrupted run
resumes from its checkpoint (run directories live in --scratch, default runs/quality/, never in the results).
Tables, plots and the comparison with the papers' reported orderings are rebuilt from whatever runs exist.
Results: <out>/quality/quality.{md,json} and quality_{nlu,nlg}.png (quality-paper.* for --profile paper).
Usage: python benchmarks/quality.py [--suite nlu|nlg|all] [--profile quick|paper] [--seeds 0 1 2] [--jobs 2]
       [--methods ...] [--quick] [--report-only] [--estimate] [--out DIR] [--scratch DIR] [--threads N] [--jobs N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "FLWR_TELEMETRY_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)  # everything is local; never wait on a network

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCRATCH = ROOT / "runs" / "quality"

UNTRAINED = "untrained"  # a reference row, not a method: the base model with fresh heads before any training
MAJORITY = "majority"    # a reference row (classification): each client predicts its own training split's top label
REFERENCES = (UNTRAINED, MAJORITY)
METHODS = {"nlu": [UNTRAINED, MAJORITY, "local", "fedit", "ffa", "fedsa", "feddpa", "ifca", "flora", "fedalt", "fedlease",
                   "fdlora"],
           "nlg": [UNTRAINED, "local", "fedit", "feddpa", "fdlora", "fedalt", "fedlease"]}
NAMES = {UNTRAINED: "(untrained base)", MAJORITY: "(majority class)", "local": "Local", "fedit": "FedIT", "ffa": "FFA-LoRA", "fedsa": "FedSA-LoRA", "feddpa": "FedDPA",
         "ifca": "IFCA+LoRA", "flora": "FLoRA", "fedalt": "FedALT", "fedlease": "FedLEASE", "fdlora": "FDLoRA"}
METRIC = {"nlu": "accuracy", "nlg": "rouge1"}
# NLU: 3 seeds, the minimum. NLG: one seed by default, so that the quick profile fits the hour on
# 2 cores (FedALT's table is one run); `--seeds 0 1 2` adds the spread (about 2.7 h with --jobs 2).
SEEDS = {"nlu": [0, 1, 2], "nlg": [0]}
SUITE_TITLE = {"nlu": "NLU suite (FedLEASE-style: 4 classification tasks x 4 clients, Dirichlet(0.5) label skew, "
                      "all-MiniLM-L6-v2), accuracy x100",
               "nlg": "NLG suite (FedALT-style: 8 instruction tasks, one client each, SmolLM2-135M-Instruct), "
                      "ROUGE-1 x100 on greedy answers"}

# The papers' main-table orderings on the average (spec algorithms.md sections 2.9, 3.8 and 6; [NOTE], unverified).
# A chain of groups: every method of a group beats every method of the later groups; inside a group "~".
PAPER = {
    "nlu": {"source": "FedLEASE's main table (GLUE: SST-2, QNLI, MRPC, QQP; RoBERTa-large; 16 clients; accuracy)",
            "order": [["fedlease"], ["fedsa", "feddpa", "ifca"], ["fedit"]],
            "reported": {"fedlease": 87.76, "fedsa": 84.60, "feddpa": 84.49, "ifca": 84.48, "fedit": 82.23}},
    "nlg": {"source": "FedALT's main table (FLAN, 8 tasks, one per client; LLaMA-2-7B; most likely ROUGE-1)",
            "order": [["fedalt"], ["fdlora"], ["feddpa"], ["local"], ["fedit"]],
            "reported": {"fedalt": 67.55, "fdlora": 65.17, "feddpa": 64.64, "local": 62.86, "fedit": 62.19}},
}
TIE = 0.01  # "A ~ B" holds when the means differ by at most 1 point (x100) or by at most the seed noise

# --quick: a CI smoke test of the plumbing only (tiny random models, 4 clients, 2 rounds, 2 methods, 1 seed);
# its numbers mean nothing. Per suite: base config, overrides (the same for both methods), methods.
SMOKE = {
    "nlu": ("demo", ["model.name=tiny-bert", "data.train_per_client=48", "data.test_per_client=24",
                     "training.local_steps=3", "federation.rounds=2", "algorithm.per_method.fedlease.warmup_rounds=1"],
            [UNTRAINED, MAJORITY, "fedit", "fedlease"]),
    "nlg": ("nlg-quick", ["model.name=tiny-llama", "data.tasks=[antonym, hypernym, synonym, quote_language]",
                          "data.train_per_client=16", "data.test_per_client=8", "training.local_steps=2",
                          "training.max_new_tokens=8", "federation.rounds=2", "federation.eval_every=1"],
            [UNTRAINED, "fedit", "fedalt"]),
}

# Cost of a run relative to FedIT's, used only to estimate runs that have not been measured yet. From the
# methods' extra passes (docs/methods.md): FedDPA trains two passes; IFCA scores 4 cluster LoRAs on all of a
# client's training data each round; FDLoRA runs 40 fusion evaluations on 16 examples at every evaluation;
# FedALT and FedLEASE forward 2 and M experts. Replaced by measured times as soon as a method has run.
COST = {"nlu": {"feddpa": 2.0, "ifca": 2.3, "fdlora": 2.0, "fedalt": 1.2, "fedlease": 1.2},
        "nlg": {"feddpa": 2.0, "ifca": 2.3, "fdlora": 2.5, "fedalt": 1.2, "fedlease": 1.2}}
PROBE_STEPS = 2  # local steps of the timing probe; its per-step and per-evaluation costs are scaled up


# ---------------------------------------------------------------------------------------------------- runs

def config_name(suite: str, profile: str) -> tuple[str, list[str]]:
    """The base config of a suite and profile and its overrides (none outside the smoke setting)."""
    if profile == "smoke":
        return SMOKE[suite][0], list(SMOKE[suite][1])
    return f"{suite}-{profile}", []


def config_for(suite: str, profile: str, method: str, seed: int, run_dir: Path, threads: int | None = None):
    """The one setup of (suite, profile) with only algorithm.name, seed and result-neutral engine settings set."""
    from fedlora.core.config import load_config

    name, overrides = config_name(suite, profile)
    engine = ["engine.progress=false"] + ([f"engine.torch_threads={threads}"] if threads else [])
    cfg = load_config(name, overrides + engine + [f"seed={seed}", f"output_dir={run_dir}"])
    if profile != "smoke":  # evaluate the final round only: evaluation changes no state, and costs a third here
        cfg.federation.eval_at_start, cfg.federation.eval_every = False, cfg.federation.rounds
    algorithm = "fedit" if method in REFERENCES else method  # FedIT's initial LoRA has B = 0: the base model
    options = cfg.algorithm.options_for(algorithm)  # the spec's per-method options from the config, as `compare` does
    cfg.algorithm.name, cfg.algorithm.options = algorithm, options
    cfg.name = f"quality-{suite}-{profile}-{method}-seed{seed}"
    return cfg


def setup_id(cfg) -> str:
    """A hash of everything in a run's config that can change its results (not its name, paths or engine)."""
    import hashlib

    setup = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ("name", "output_dir", "engine")}
    setup["algorithm"].pop("per_method", None)  # its entry for this method is in algorithm.options; others don't matter
    return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:16]


def current(result: dict, suite: str, profile: str) -> bool:
    """Whether a finished run's result was made with today's config of its (suite, profile, method, seed)."""
    cfg = config_for(suite, profile, result["method"], result["seed"], Path("unused"))
    return result.get("setup") == setup_id(cfg)


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary name and rename: a stopped process or a second sweep never leaves a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def result_path(out: Path, suite: str, profile: str, method: str, seed: int) -> Path:
    """Where the small result JSON of one run lives."""
    return out / "quality" / "runs" / f"{suite}-{profile}" / f"{method}-seed{seed}.json"


def task_ari(assignment: dict[str, int], tasks: dict[str, str]) -> float:
    """Adjusted Rand index between FedLEASE's client -> expert assignment and the clients' true tasks."""
    from sklearn.metrics import adjusted_rand_score

    ids = sorted(assignment)
    return float(adjusted_rand_score([tasks[c] for c in ids], [assignment[c] for c in ids]))


def execute(cfg) -> tuple[Any, float, bool]:
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


def evaluate_untrained(cfg) -> list[dict]:
    """The round-0 record alone: every client evaluated before any training (what the methods start from)."""
    from fedlora.core.io import save_json
    from fedlora.engines.inprocess import InProcessEngine
    from fedlora.engines.session import build_session

    s = build_session(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_json(cfg.run_dir / "clients.json", [c.to_json() for c in s.clients])
    with s.runtime:
        loop = InProcessEngine(cfg, s.server, s.runtime, s.infos, cfg.run_dir)
        s.server.setup(s.infos, cfg.federation.rounds)
        return [{"round": 0, **loop.evaluate(0, [c.client_id for c in s.infos])}]


def summarize_run(records: list[dict], tasks: dict[str, str], metric: str) -> dict[str, Any]:
    """Final per-client metrics, per-task and average main metric, and FedLEASE's allocation if any."""
    final = [r for r in records if "eval" in r][-1]
    out: dict[str, Any] = {
        "round": final["round"], "metric": metric, "tasks": tasks,
        "per_client": final["eval"],
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


def claim(path: Path) -> bool:
    """Lock one run for this process, so sweeps started side by side share the work; a dead owner's lock is taken."""
    lock = path.with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        owner = lock.read_text().strip()
        if not owner:  # being written right now, or its writer died at that instant
            return time.time() - lock.stat().st_mtime > 60 and _take_over(lock, path)
        cmdline = Path(f"/proc/{owner}/cmdline")
        if cmdline.is_file() and b"quality" in cmdline.read_bytes():
            return False  # another sweep is running it
        return _take_over(lock, path)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def _take_over(lock: Path, path: Path) -> bool:
    lock.unlink(missing_ok=True)
    return claim(path)


def run_one(out: Path, scratch: Path, suite: str, profile: str, method: str, seed: int, threads: int | None,
            command: str) -> dict[str, Any]:
    """Run (or skip, if its result JSON exists) one (suite, profile, method, seed) and save its result JSON."""
    path = result_path(out, suite, profile, method, seed)
    cfg = config_for(suite, profile, method, seed, scratch / f"{suite}-{profile}" / f"seed{seed}" / method, threads)
    if path.is_file():
        done = json.loads(path.read_text())
        if done.get("setup") == setup_id(cfg):
            return done
        print(f"  {path.name} was made with another config of {suite}-{profile}: running it again", flush=True)
    print(f"  {suite} {profile} {method} seed {seed}: running in {cfg.run_dir}", flush=True)
    start = time.perf_counter()
    if method == UNTRAINED:
        records, before, resumed = evaluate_untrained(cfg), 0.0, False
    else:
        result, before, resumed = execute(cfg)
        records = result.rounds
    wall = time.perf_counter() - start + before
    clients = json.loads((cfg.run_dir / "clients.json").read_text())
    data = {"suite": suite, "profile": profile, "method": method, "seed": seed, "config": config_name(suite, profile),
            "setup": setup_id(cfg),
            "command": command, "wall_seconds": wall, "resumed": resumed, "torch_threads": threads,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **summarize_run(records, {c["client_id"]: c["task"] for c in clients}, METRIC[suite])}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True))  # never a half-written result that is skipped
    if method == UNTRAINED and METRIC[suite] == "accuracy":
        write_atomic(result_path(out, suite, profile, MAJORITY, seed),
                     json.dumps({**data, "method": MAJORITY, "wall_seconds": 0.0, **majority_class(clients)}, indent=1))
    print(f"    done in {wall:.0f} s: average {METRIC[suite]} {100 * data['average']:.2f}", flush=True)
    return data


# ------------------------------------------------------------------------------------------------- tables

def load_runs(out: Path, suite: str, profile: str) -> dict[str, dict[int, dict]]:
    """{method: {seed: result}} of every finished run of (suite, profile)."""
    runs: dict[str, dict[int, dict]] = {}
    for p in sorted((out / "quality" / "runs" / f"{suite}-{profile}").glob("*.json")):
        r = json.loads(p.read_text())
        if current(r, suite, profile):  # a run of an older config is not mixed into today's table
            runs.setdefault(r["method"], {})[r["seed"]] = r
    return runs


def cell(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None below 2 values) and count."""
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def aggregate(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, Any]]:
    """Per method: per-task and average cells over seeds."""
    table = {}
    for method, by_seed in runs.items():
        tasks = sorted({t for r in by_seed.values() for t in r["by_task"]})
        table[method] = {"tasks": {t: cell([r["by_task"][t] for r in by_seed.values() if t in r["by_task"]])
                                   for t in tasks},
                         "average": cell([r["average"] for r in by_seed.values()]), "seeds": sorted(by_seed),
                         "average_by_seed": {s: r["average"] for s, r in sorted(by_seed.items())}}
    return table


def relations(order: list[list[str]]) -> list[tuple[str, str, str]]:
    """The pairwise relations of a reported chain: (a, '>', b) across groups and (a, '~', b) within one."""
    rels = []
    for i, group in enumerate(order):
        rels += [(a, "~", b) for k, a in enumerate(group) for b in group[k + 1:]]
        rels += [(a, ">", b) for a in group for later in order[i + 1:] for b in later]
    return rels


def check_relation(rel: tuple[str, str, str], table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whether our mean averages follow one reported relation: holds yes/no/not run, and whether beyond seed noise."""
    a, op, b = rel
    row = {"relation": f"{NAMES.get(a, a)} {op} {NAMES.get(b, b)}", "a": a, "op": op, "b": b}
    if a not in table or b not in table:
        return {**row, "holds": "not run", "delta": None, "se": None, "beyond_noise": None,
                "unrun": [m for m in (a, b) if m not in table]}
    ca, cb = table[a]["average"], table[b]["average"]
    delta = ca["mean"] - cb["mean"]
    se = difference_se(table[a]["average_by_seed"], table[b]["average_by_seed"])
    holds = delta > 0 if op == ">" else abs(delta) <= max(TIE, se or 0.0)
    return {**row, "holds": "yes" if holds else "no", "delta": delta, "se": se,
            "beyond_noise": None if se is None else abs(delta) > 2 * se, "unrun": []}


def difference_se(a: dict[int, float], b: dict[int, float]) -> float | None:
    """Standard error of the difference of two methods' seed means; None with a single seed.

    Paired over seeds when both ran the same seeds: a seed fixes the data split for every method, so the split's
    own difficulty cancels in the per-seed difference. Unpaired (Welch) otherwise, e.g. while a sweep is partial.
    """
    if a.keys() == b.keys() and len(a) > 1:
        return statistics.stdev(a[s] - b[s] for s in a) / math.sqrt(len(a))
    if len(a) > 1 and len(b) > 1:
        return math.sqrt(statistics.variance(a.values()) / len(a) + statistics.variance(b.values()) / len(b))
    return None


def verdict(checks: list[dict[str, Any]]) -> str:
    """One plain sentence: reproduced yes / no / not yet decidable."""
    done = [c for c in checks if c["holds"] != "not run"]
    failed = [c["relation"] for c in done if c["holds"] == "no"]
    missing = sorted({NAMES.get(m, m) for c in checks if c["holds"] == "not run" for m in c["unrun"]})
    if failed:
        text = f"**Reproduced: no.** {len(done) - len(failed)} of {len(done)} measured relations hold; not: {', '.join(failed)}."
    elif done and not missing:
        text = f"**Reproduced: yes.** All {len(done)} relations hold."
    elif done:
        text = f"**So far yes** ({len(done)} measured relations hold), but not decidable yet."
    else:
        text = "**Not decidable yet:** no run of the methods in the ordering."
    return text + (f" Missing runs of: {', '.join(missing)}." if missing else "")


def measured_order(table: dict[str, dict[str, Any]]) -> str:
    """Our methods sorted by mean average, e.g. 'FedALT 45.10 > FedIT 44.00'."""
    ranked = sorted((m for m in table if m not in REFERENCES), key=lambda m: -table[m]["average"]["mean"])
    return " > ".join(f"{NAMES.get(m, m)} {100 * table[m]['average']['mean']:.2f}" for m in ranked) or "(no runs yet)"


def fmt(c: dict[str, Any] | None, seeds: int) -> str:
    """'71.20 ± 1.30' (x100) with the number of seeds when fewer than requested; 'not run' when missing."""
    if not c or c["n"] == 0:
        return "not run"
    text = f"{100 * c['mean']:.2f} ± {100 * c['std']:.2f}" if c["std"] is not None else f"{100 * c['mean']:.2f} ± –"
    return text + (f" ({c['n']}/{seeds})" if c["n"] < seeds else "")


def fedlease_rows(runs: dict[str, dict[int, dict]]) -> list[dict[str, Any]]:
    """Per FedLEASE seed: chosen M, silhouette at M, ARI with the tasks and the tasks in each cluster."""
    rows = []
    for seed, r in sorted(runs.get("fedlease", {}).items()):
        fl = r.get("fedlease")
        if not fl:
            continue
        groups: dict[int, list[str]] = {}
        for cid, e in fl["assignment"].items():
            groups.setdefault(e, []).append(r["tasks"][cid])
        clusters = " / ".join(f"{e}: " + ", ".join(f"{t} x{ts.count(t)}" for t in sorted(set(ts)))
                              for e, ts in sorted(groups.items()))
        rows.append({"seed": seed, "n_experts": fl["n_experts"], "silhouette": fl["silhouette"].get(str(fl["n_experts"])),
                     "ari": fl["ari"], "clusters": clusters, "n_tasks": len(set(r["tasks"].values()))})
    return rows


def suite_tasks(suite: str) -> list[str]:
    """The task names of a built-in suite, so the table has its columns before any run."""
    from fedlora.data.suites import NLG_TASKS, NLU_TASKS

    return sorted(NLU_TASKS if suite == "nlu" else NLG_TASKS)


def fedlease_warmup_only(suite: str, profile: str) -> int | None:
    """FedLEASE's warmup_rounds when the config's rounds never get past it (it would never cluster), else None."""
    from fedlora.algorithms import parse_options

    cfg = config_for(suite, profile, "fedlease", 0, Path("unused"))
    warmup = parse_options("fedlease", cfg.algorithm.options).warmup_rounds
    return warmup if warmup >= cfg.federation.rounds else None


def suite_report(suite: str, runs: dict[str, dict[int, dict]], methods: list[str], seeds: list[int],
                 png: str, smoke: bool = False, warmup_only: int | None = None) -> tuple[list[str], dict[str, Any]]:
    """Markdown lines and raw data of one suite: main table, orderings, FedLEASE's allocation, wall times."""
    table = aggregate(runs)
    rows = list(methods) + [m for m in table if m not in methods]  # expected rows first, extra runs after
    tasks = sorted({t for m in table.values() for t in m["tasks"]}) or ([] if smoke else suite_tasks(suite))
    n = len(seeds)
    title = f"{suite.upper()} smoke setting ({config_name(suite, 'smoke')[0]} data, tiny random model)" if smoke \
        else SUITE_TITLE[suite]
    lines = [f"## {title}", "",
             f"Mean ± sample std over seeds of each client's final {METRIC[suite]} on its own test split, averaged "
             f"per task, then over tasks (Avg). '(k/{n})': only k of the {n} seeds have run. "
             f"{NAMES[UNTRAINED]}: every client evaluated before any training (the base model, its LoRA at B = 0, "
             "a fresh classification head): what training has to improve on."
             + (f" {NAMES[MAJORITY]}: each client always answers the most frequent label of its own training split "
                "(the label prior under this label skew; no model)." if suite == "nlu" else ""), ""]
    head = ["Method"] + tasks + ["**Avg**"] + (["Δ Avg vs FedIT"] if suite == "nlu" else [])
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    base = table.get("fedit", {}).get("average", {}).get("mean")
    for m in rows:
        t = table.get(m)
        cells = [fmt(t["tasks"].get(k) if t else None, n) for k in tasks] + [f"**{fmt(t['average'] if t else None, n)}**"]
        if suite == "nlu":
            cells.append(f"{100 * (t['average']['mean'] - base):+.2f}" if t and base is not None else "–")
        lines.append(f"| {NAMES.get(m, m)} | " + " | ".join(cells) + " |")
    lines += ["", f"![{suite}]({png})", ""]

    paper = PAPER[suite]
    checks = [check_relation(r, table) for r in relations(paper["order"])]
    chain = " > ".join(" ~ ".join(NAMES[m] for m in g) for g in paper["order"])
    reported = " > ".join(" ~ ".join(f"{NAMES[m]} {paper['reported'][m]:.2f}" for m in g) for g in paper["order"])
    lines += ["### The paper's ordering and ours", "",
              f"Paper: **{chain}** on the average ({paper['source']}: {reported}; [NOTE] numbers from the spec, "
              "not checked against the PDF).", "",
              f"Ours, all methods, by mean Avg: {measured_order(table)}.", "",
              "| relation | paper | ours: Δ Avg (x100) ± s.e. | holds? | beyond 2 s.e.? |", "|---|---|---|---|---|"]
    for c in checks:
        rep = f"{paper['reported'][c['a']]:.2f} vs {paper['reported'][c['b']]:.2f}"
        ours = "–" if c["delta"] is None else f"{100 * c['delta']:+.2f}" + ("" if c["se"] is None else f" ± {100 * c['se']:.2f}")
        noise = {None: "–", True: "yes", False: "no"}[c["beyond_noise"]]
        lines.append(f"| {c['relation']} | {rep} | {ours} | {c['holds']} | {noise} |")
    lines += ["", verdict(checks),
              f"('>' holds when our mean Avg is higher; '~' when the means differ by at most {100 * TIE:.0f} point "
              "or by at most the seed noise (1 s.e.). The last column says whether the gap exceeds twice the standard "
              "error of the difference, paired over seeds (each seed is one data split shared by every method), "
              "i.e. whether it is more than seed noise.)", ""]

    fl_rows = fedlease_rows(runs)
    lines += ["### FedLEASE: chosen number of experts M and agreement with the true task grouping", ""]
    if warmup_only:
        lines += [f"**Note:** in this config FedLEASE's warm-up ({warmup_only} rounds, the spec default unless the "
                  "config's `[algorithm.per_method.fedlease]` sets it) is not shorter than `federation.rounds`, so "
                  "FedLEASE never clusters and its row is plain local training (no M, no ARI). The fix belongs in "
                  f"`src/fedlora/configs/{suite}-<profile>.toml` (a shorter `[algorithm.per_method.fedlease]` "
                  "warm-up, as `nlu-quick` has), not in a per-method override here.", ""]
    if fl_rows:
        ari_note = ("ARI = adjusted Rand index between the client -> expert assignment and the clients' tasks "
                    "(1 = the tasks exactly, 0 = chance).") if suite == "nlu" else \
            "One client per task, so there is no task grouping to recover: ARI is not meaningful here."
        lines += [f"{fl_rows[0]['n_tasks']} true tasks. {ari_note}", "",
                  "| seed | M | silhouette at M | ARI | clusters (tasks of their clients) |", "|---|---|---|---|---|"]
        lines += [f"| {r['seed']} | {r['n_experts']} | {r['silhouette']:.3f} | "
                  f"{r['ari']:.3f}{'' if suite == 'nlu' else ' (n/a)'} | {r['clusters']} |" for r in fl_rows]
    else:
        lines.append("not run")
    lines.append("")

    lines += ["### Wall time per run (s)", "", "| Method | " + " | ".join(f"seed {s}" for s in seeds) + " | total |",
              "|---" * (n + 2) + "|"]
    for m in rows:
        secs = [runs.get(m, {}).get(s, {}).get("wall_seconds") for s in seeds]
        lines.append(f"| {NAMES.get(m, m)} | " + " | ".join("–" if v is None else f"{v:.0f}" for v in secs)
                     + (f" | {sum(v for v in secs if v):.0f} |" if any(secs) else " | – |"))
    total = sum(r["wall_seconds"] for by in runs.values() for r in by.values())
    lines += ["", f"Total wall time of the {sum(len(v) for v in runs.values())} finished runs: {total:.0f} s "
                  f"({total / 3600:.2f} h).", ""]
    raw = {"metric": METRIC[suite], "table": table, "orderings": checks, "verdict": verdict(checks),
           "fedlease": fl_rows, "wall_seconds_total": total, "runs": runs}
    return lines, raw


def plot_suite(path: Path, suite: str, table: dict[str, dict[str, Any]], methods: list[str]) -> None:
    """Grouped bars (tasks + Avg) per method with the std over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in methods if m in table] + [m for m in table if m not in methods]
    tasks = sorted({t for m in table.values() for t in m["tasks"]})
    fig, ax = plt.subplots(figsize=(max(7.0, 1.0 + 0.18 * len(shown) * (len(tasks) + 1)), 4.2))
    if not shown:
        ax.text(0.5, 0.5, f"{suite}: no runs yet", ha="center", va="center")
        ax.set_axis_off()
    width = 0.8 / max(len(shown), 1)
    for i, m in enumerate(shown):
        cells = [table[m]["tasks"].get(t) for t in tasks] + [table[m]["average"]]
        ax.bar([g + i * width for g in range(len(cells))], [100 * c["mean"] if c else 0 for c in cells], width,
               yerr=[100 * (c["std"] or 0) if c else 0 for c in cells], capsize=2, label=NAMES.get(m, m))
    if shown:
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(tasks) + 1)], tasks + ["Avg"], rotation=20, ha="right",
                      fontsize=8)
        ax.set(ylabel=f"{METRIC[suite]} x100", title=f"{suite}: mean ± std over seeds")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------- time estimate

def probe(suite: str, profile: str, scratch: Path) -> dict[str, Any]:
    """Time FedIT on a few clients for one round of PROBE_STEPS steps and scale it to a full run of the profile."""
    from fedlora.api import run_experiment
    from fedlora.core.config import load_config
    from fedlora.data.suites import NLG_TASKS
    from fedlora.data.tokenize import steps_for_epochs
    from fedlora.engines.inprocess import InProcessEngine

    full = config_for(suite, profile, "fedit", 0, scratch)  # the sweep's own schedule (final evaluation only)
    # a subset of clients (per-client cost does not depend on how many there are): 1 per NLU task, 4 NLG tasks
    subset = ["data.clients_per_task=1"] if suite == "nlu" else [f"data.tasks=[{', '.join(NLG_TASKS[::2])}]"]
    cfg = load_config(f"{suite}-{profile}", subset + [
        "federation.rounds=1", "federation.eval_at_start=false", f"training.local_steps={PROBE_STEPS}",
        "training.local_epochs=null", "engine.torch_threads=1", "engine.checkpoint_every=0", "engine.progress=false",
        f"output_dir={scratch / f'probe-{suite}-{profile}'}"])
    cfg.algorithm.name, cfg.algorithm.options = "fedit", cfg.algorithm.options_for("fedit")
    spent = {"fit": 0.0, "eval": 0.0}
    originals = {"fit": InProcessEngine.fit_clients, "eval": InProcessEngine.evaluate_clients}

    def timed(kind):
        def wrapper(self, *args, **kwargs):
            start = time.process_time()
            try:
                return originals[kind](self, *args, **kwargs)
            finally:
                spent[kind] += time.process_time() - start
        return wrapper

    # CPU seconds with one torch thread: the compute itself, not inflated by other jobs on a shared machine
    InProcessEngine.fit_clients, InProcessEngine.evaluate_clients = timed("fit"), timed("eval")
    try:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = run_experiment(cfg, overwrite=True)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        InProcessEngine.fit_clients, InProcessEngine.evaluate_clients = originals["fit"], originals["eval"]
    n_probe = len(result.final)
    tr, fed = full.training, full.federation
    steps = tr.local_steps or steps_for_epochs(tr.local_epochs, full.data.train_per_client, tr.batch_size)
    n_clients = (4 if suite == "nlu" else len(NLG_TASKS)) * full.data.clients_per_task
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
             f"{COST['nlg']['fdlora']} on NLG; 1.0 for the rest; see COST in quality.py).", "",
             "| profile | suite | probed | FedIT run (CPU h) | seeds | every method x seeds (CPU h) | "
             "finished runs (wall h) | remaining (h) |", "|---|---|---|---|---|---|---|---|"]
    if not estimates:
        return lines + ["| – | – | not measured: run `python benchmarks/quality.py --estimate --suite all` | | | | | |", ""]
    totals: dict[str, dict[str, float]] = {}
    ordered = sorted(estimates.values(), key=lambda e: (e["profile"] != "quick", e["suite"] != "nlu"))
    for e in ordered:
        suite, profile = e["suite"], e["profile"]
        runs = load_runs(out, suite, profile)
        fedit = e["fedit_run_cpu_s"]
        per_method = {}
        for m in METHODS[suite]:
            done = [r["wall_seconds"] for r in runs.get(m, {}).values()]
            per_method[m] = statistics.fmean(done) if done else fedit * COST[suite].get(m, 1.0)
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
            fits = [s.upper() for s, t in by_suite.items() if t / 2 <= 3600 * 1.2]
            line += (" The issue's target for the quick profile is about 60 minutes on 2 cores: met by "
                     + (" and ".join(fits) if fits else "neither suite") + " on its own, not by both suites together."
                     if len(fits) < len(by_suite) or total / 2 > 3600 * 1.2 else " The issue's target (about 60 minutes "
                     "on 2 cores) is met.")
        lines.append(line)
    probes = "; ".join(f"{e['suite']}-{e['profile']}: {e['cpu_per_client_step_s']:.2f} s per client step, "
                       f"{e['cpu_per_client_eval_s']:.1f} s per client evaluation, {e['clients']} clients x "
                       f"{e['rounds']} rounds x {e['local_steps']} steps, {e['evaluations']} evaluations"
                       for e in ordered)
    return lines + ["", f"Probe (CPU seconds, one thread): {probes}.", ""]


# ------------------------------------------------------------------------------------------------- report

def write_report(out: Path, profile: str, methods: dict[str, list[str]], seeds: dict[str, list[int]],
                 command: str) -> Path:
    """quality.md / quality.json / quality_{nlu,nlg}.png of one profile from every finished run."""
    qdir = out / "quality"
    qdir.mkdir(parents=True, exist_ok=True)
    stem = "quality" if profile in ("quick", "smoke") else f"quality-{profile}"
    estimates = json.loads((qdir / "estimate.json").read_text()) if (qdir / "estimate.json").is_file() else {}
    lines = [f"# Quality: every method on the NLU and NLG suites ({profile} profile)", "",
             "One setup per suite: the built-in config "
             + (", ".join(f"`{s}-{profile}`" for s in METHODS) if profile != "smoke" else
                "(smoke: tiny random models, numbers meaningless)")
             + " unchanged except `algorithm.name` and `seed`; method options are the spec defaults, plus the "
               "config's own `[algorithm.per_method]` entries (the spec's schedules scaled to the profile's rounds). Same "
               "data split, seed, local-step budget, rounds and evaluation for every method; the split differs between "
               "seeds. Nothing is tuned per method. FedDPA (variant T) splits each round's local steps between its local "
               "and global LoRA (the configs' `split_budget`; its official code gives each the full budget). Passes "
               "that are not training steps are the methods' own: IFCA scores every cluster LoRA, FDLoRA runs its "
               "fusion search at evaluation. Evaluated (and reported) at the final round only.", ""]
    if (qdir / "findings.md").is_file():
        lines += ["What these numbers say, and the investigation of every ordering that does not reproduce: "
                  "[findings.md](findings.md).", ""]
    raw: dict[str, Any] = {"profile": profile, "seeds": seeds, "command": command,
                           "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "suites": {}}
    missing = []
    for suite in ("nlu", "nlg"):
        runs = load_runs(out, suite, profile)
        png = f"{stem}_{suite}.png"
        warmup_only = fedlease_warmup_only(suite, profile) if "fedlease" in methods[suite] else None
        shown = sorted(set(seeds[suite]) | {s for by_seed in runs.values() for s in by_seed})  # all that exist
        body, raw["suites"][suite] = suite_report(suite, runs, methods[suite], shown, png, profile == "smoke",
                                                  warmup_only)
        plot_suite(qdir / png, suite, raw["suites"][suite]["table"], methods[suite])
        lines += body
        missing += [f"{suite} {m} seed {s}" for m in methods[suite] for s in seeds[suite] if s not in runs.get(m, {})]
    if profile != "smoke":
        lines += estimate_lines(estimates, out, seeds)  # every profile probed, so the paper cost shows too
        raw["estimate"] = estimates
    lines += ["## Not yet run", ""] + (_missing_lines(missing) if missing else ["none"]) + [""]
    raw["missing"] = missing
    prof = "" if profile == "quick" else f" --profile {profile}"
    commands = ["python benchmarks/quality.py --quick   # this smoke run (its numbers mean nothing)"] \
        if profile == "smoke" else [
        f"python benchmarks/quality.py --suite all{prof}   "
        "# runs what is missing, skips finished runs, resumes an interrupted one",
        f"python benchmarks/quality.py{prof} --jobs 2   # both cores: two sweeps sharing the runs (a lock per run)",
        f"python benchmarks/quality.py --suite nlg --seeds 0 1 2{prof} --jobs 2   # NLG's spread over 3 seeds",
        f"python benchmarks/quality.py --report-only{prof}   # rebuild this file from the finished runs",
        f"python benchmarks/quality.py --estimate --suite all{prof}   # re-measure the time estimate"]
    lines += ["## Commands", "", "```", *commands, "```", "",
              f"This file was written by: `{command}`. Each run's own command is in its JSON "
              f"(`runs/<suite>-{profile}/<method>-seed<k>.json`).", ""]
    write_atomic(qdir / f"{stem}.json", json.dumps(raw, indent=1, sort_keys=True, default=str))
    md = qdir / f"{stem}.md"
    write_atomic(md, "\n".join(lines) + "\n")
    return md


def _missing_lines(missing: list[str]) -> list[str]:
    """'nlu local seed 0', ... grouped as '* nlu: Local (seeds 0, 1, 2), ...'."""
    by: dict[str, dict[str, list[str]]] = {}
    for item in missing:
        suite, method, _, seed = item.split()
        by.setdefault(suite, {}).setdefault(method, []).append(seed)
    return [f"* {suite}: " + ", ".join(f"{NAMES.get(m, m)} (seed{'s' if len(ss) > 1 else ''} {', '.join(ss)})"
                                       for m, ss in methods.items()) for suite, methods in by.items()]


# --------------------------------------------------------------------------------------------------- main

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
    ap.add_argument("--suite", choices=["nlu", "nlg", "all"], default="all")
    ap.add_argument("--profile", choices=["quick", "paper"], default="quick")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: NLU 0 1 2, NLG 0")
    ap.add_argument("--methods", nargs="+", default=None, help="default: the issue's list for each suite")
    ap.add_argument("--quick", action="store_true", help="CI smoke run: tiny models, 4 clients, 2 rounds, 2 methods")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    ap.add_argument("--estimate", action="store_true", help="time a short FedIT probe and estimate the full sweep")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    ap.add_argument("--scratch", type=Path, default=None, help="run directories (default runs/quality)")
    ap.add_argument("--threads", type=int, default=None, help="engine.torch_threads (default: torch's own)")
    ap.add_argument("--jobs", type=int, default=1, help="sweeps side by side (one per core, each --threads 1)")
    args = ap.parse_args()
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    if args.jobs > 1 and args.threads is None:
        args.threads = 1  # one core per sweep
    suites = ["nlu", "nlg"] if args.suite == "all" else [args.suite]
    profile = "smoke" if args.quick else args.profile
    seeds = {s: [0] if args.quick else list(args.seeds or SEEDS[s]) for s in SEEDS}
    defaults = {s: SMOKE[s][2] if args.quick else METHODS[s] for s in ("nlu", "nlg")}
    methods = {s: list(args.methods) if args.methods and s in suites else defaults[s] for s in defaults}
    out = args.out
    tmp = tempfile.TemporaryDirectory(prefix="quality-") if args.quick and args.scratch is None else None
    scratch = Path(tmp.name) if tmp else (args.scratch or SCRATCH)
    start = time.perf_counter()
    try:
        if args.estimate:
            path = out / "quality" / "estimate.json"
            estimates = json.loads(path.read_text()) if path.is_file() else {}
            for suite in suites:
                print(f"probing {suite}-{args.profile} ...", flush=True)
                estimates[f"{suite}-{args.profile}"] = e = probe(suite, args.profile, scratch)
                print(f"  FedIT run ~ {e['fedit_run_cpu_s'] / 3600:.2f} CPU h (probe {e['probe_wall_s']:.0f} s)")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(estimates, indent=1, sort_keys=True))
        elif not args.report_only:
            helpers = start_helpers(args.jobs - 1)
            for suite in suites:
                for seed in seeds[suite]:  # seed-major: a stopped sweep leaves complete tables for the first seeds
                    for method in methods[suite]:
                        if method == MAJORITY:
                            continue  # written by the untrained run, from its split
                        path = result_path(out, suite, profile, method, seed)
                        if path.is_file() and current(json.loads(path.read_text()), suite, profile) or not claim(path):
                            continue  # finished, or another sweep is running it
                        try:
                            run_one(out, scratch, suite, profile, method, seed, args.threads, command)
                        finally:
                            path.with_suffix(".lock").unlink(missing_ok=True)
                        write_report(out, profile, methods, seeds, command)  # up to date whenever stopped
            for helper in helpers:  # they finish the runs they hold; a failed one leaves its runs to the next sweep
                if helper.wait() != 0:
                    print(f"a helper sweep exited with {helper.returncode}; run the command again", flush=True)
    finally:
        if tmp:
            tmp.cleanup()
    md = write_report(out, profile, methods, seeds, command)
    data = json.loads(md.with_suffix(".json").read_text())
    for suite in ("nlu", "nlg"):
        s = data["suites"][suite]
        table = s["table"]
        print(f"{suite}: {sum(len(v['seeds']) for v in table.values())} runs; ours: {measured_order(table)}")
        print(f"  paper: {' > '.join(' ~ '.join(NAMES[m] for m in g) for g in PAPER[suite]['order'])}. {s['verdict']}")
        for r in s["fedlease"]:
            print(f"  FedLEASE seed {r['seed']}: M={r['n_experts']}, ARI={r['ari']:.3f}")
    print(f"{len(data['missing'])} runs not yet done; {time.perf_counter() - start:.0f} s; report: {md}")


if __name__ == "__main__":
    main()
