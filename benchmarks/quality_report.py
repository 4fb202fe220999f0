"""The quality study's report: quality.md (tables in the shape of the papers' main tables, the orderings checked,
FedLEASE's allocation, wall times, the time estimate, the runs still missing), quality.json and one plot per suite,
rebuilt from whatever runs have finished."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from quality_estimate import estimate_lines
from quality_runs import load_runs
from quality_setup import (MAJORITY, MAJORITY_NOTE, METRIC, NAMES, PAPER, SUITE_CONFIG, SUITE_TITLE, SUITES, UNTRAINED,
                           config_for, config_name, suite_tasks)
from quality_stats import TIE, aggregate, check_relation, measured_order, relations, verdict


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
                     "ari": fl["ari"], "clusters": clusters, "n_tasks": len(set(r["tasks"].values())),
                     "n_clients": len(fl["assignment"])})
    return rows


def fedlease_warmup_only(suite: str, profile: str) -> int | None:
    """FedLEASE's warmup_rounds when the config's rounds never get past it (it would never cluster), else None."""
    from fedlora.algorithms import parse_options

    cfg = config_for(suite, profile, "fedlease", 0, Path("unused"))
    warmup = parse_options("fedlease", cfg.algorithm.options).warmup_rounds
    return warmup if warmup >= cfg.federation.rounds else None


def suite_report(suite: str, runs: dict[str, dict[int, dict]], methods: list[str], seeds: list[int],
                 png: str, smoke: bool = False, warmup_only: int | None = None) -> tuple[list[str], dict[str, Any]]:
    """Markdown lines and raw data of one suite: main table, orderings, FedLEASE's allocation, wall times.

    The same tables for every suite; a classification suite (accuracy) also gets the majority-class caption and the
    Δ vs FedIT column."""
    table = aggregate(runs)
    classification = METRIC[suite] == "accuracy"
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
                f"({MAJORITY_NOTE.get(suite, 'no model')})." if classification else ""), ""]
    head = ["Method"] + tasks + ["**Avg**"] + (["Δ Avg vs FedIT"] if classification else [])
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    base = table.get("fedit", {}).get("average", {}).get("mean")
    for m in rows:
        t = table.get(m)
        cells = [fmt(t["tasks"].get(k) if t else None, n) for k in tasks] + [f"**{fmt(t['average'] if t else None, n)}**"]
        if classification:
            cells.append(f"{100 * (t['average']['mean'] - base):+.2f}" if t and base is not None else "–")
        lines.append(f"| {NAMES.get(m, m)} | " + " | ".join(cells) + " |")
    lines += ["", f"![{suite}]({png})", ""]

    paper = PAPER[suite]
    checks = [check_relation(r, table) for r in relations(paper["order"])]
    chain = " > ".join(" ~ ".join(NAMES[m] for m in g) for g in paper["order"])
    said = paper.get("reported", {})

    def number(m: str) -> str:
        return f"{said[m]:.2f}" if m in said else "n/a"

    reported = " > ".join(" ~ ".join(f"{NAMES[m]} {number(m)}" for m in g) for g in paper["order"])
    lines += ["### The paper's ordering and ours", "",
              f"Paper: **{chain}** on the average ({paper['source']}: {reported}; [NOTE] numbers from the spec, "
              "not checked against the PDF).", "",
              f"Ours, all methods, by mean Avg: {measured_order(table)}.", "",
              "| relation | paper | ours: Δ Avg (x100) ± s.e. | holds? | beyond 2 s.e.? |", "|---|---|---|---|---|"]
    for c in checks:
        rep = f"{number(c['a'])} vs {number(c['b'])}"
        ours = "–" if c["delta"] is None else f"{100 * c['delta']:+.2f}" + ("" if c["se"] is None else f" ± {100 * c['se']:.2f}")
        if c["delta"] is not None and c["seeds"] != sorted(set(table[c["a"]]["seeds"]) | set(table[c["b"]]["seeds"])):
            ours += f" (seeds {', '.join(map(str, c['seeds']))})" if c["seeds"] else " (unpaired)"
        noise = {None: "–", True: "yes", False: "no"}[c["beyond_noise"]]
        lines.append(f"| {c['relation']} | {rep} | {ours} | {c['holds']} | {noise} |")
    lines += ["", verdict(checks),
              "(Δ is the mean per-seed difference over the seeds both methods ran, named where that is not all of "
              "them: each seed is one data split shared by every method, so comparing on the same splits keeps a "
              "hard split from counting against whichever method has run it. "
              f"'>' holds when Δ > 0; '~' when |Δ| is at most {100 * TIE:.0f} point or at most the seed noise "
              "(1 s.e.). The last column says whether |Δ| exceeds twice the standard error of the paired "
              "difference, i.e. whether it is more than seed noise.)", ""]

    fl_rows = fedlease_rows(runs)
    lines += ["### FedLEASE: chosen number of experts M and agreement with the true task grouping", ""]
    if warmup_only:
        lines += [f"**Note:** in this config FedLEASE's warm-up ({warmup_only} rounds, the spec default unless the "
                  "config's `[algorithm.per_method.fedlease]` sets it) is not shorter than `federation.rounds`, so "
                  "FedLEASE never clusters and its row is plain local training (no M, no ARI). The fix belongs in "
                  f"`src/fedlora/configs/{SUITE_CONFIG[suite][0]}-<profile>.toml` (a shorter `[algorithm.per_method.fedlease]` "
                  "warm-up, as `nlu-quick` has), not in a per-method override here.", ""]
    if fl_rows:
        grouped = fl_rows[0]["n_clients"] > fl_rows[0]["n_tasks"]  # several clients per task: a grouping to find
        ari_note = ("ARI = adjusted Rand index between the client -> expert assignment and the clients' tasks "
                    "(1 = the tasks exactly, 0 = chance).") if grouped else \
            "One client per task, so there is no task grouping to recover: ARI is not meaningful here."
        lines += [f"{fl_rows[0]['n_tasks']} true tasks. {ari_note}", "",
                  "| seed | M | silhouette at M | ARI | clusters (tasks of their clients) |", "|---|---|---|---|---|"]
        lines += [f"| {r['seed']} | {r['n_experts']} | {r['silhouette']:.3f} | "
                  f"{r['ari']:.3f}{'' if grouped else ' (n/a)'} | {r['clusters']} |" for r in fl_rows]
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


def write_report(out: Path, profile: str, methods: dict[str, list[str]], seeds: dict[str, list[int]],
                 command: str) -> Path:
    """quality.md / quality.json / quality_<suite>.png of one profile from every finished run of the suites in
    `methods` (in the study's suite order)."""
    from fedlora.core.io import save_text

    suites = [s for s in SUITES if s in methods] + [s for s in methods if s not in SUITES]

    def setup_of(suite: str) -> str:
        name, overrides = config_name(suite, profile)
        return f"`{name}`" + (f" with `{' '.join(overrides)}`" if overrides else "")

    qdir = out / "quality"
    qdir.mkdir(parents=True, exist_ok=True)
    stem = "quality" if profile in ("quick", "smoke") else f"quality-{profile}"
    estimates = json.loads((qdir / "estimate.json").read_text()) if (qdir / "estimate.json").is_file() else {}
    lines = [f"# Quality: every method on the {', '.join(suites)} suite{'s' if len(suites) > 1 else ''} "
             f"({profile} profile)", "",
             "One setup per suite: the built-in config "
             + ("(" + "; ".join(f"{s}: {setup_of(s)}" for s in suites) + ")" if profile != "smoke" else
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
    for suite in suites:
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
        f"python benchmarks/quality.py --suite glue --seeds 0 1 2{prof} --jobs 2   # the FedLEASE-like suite",
        f"python benchmarks/quality.py --suite glue-skew --seeds 0 1 2{prof} --jobs 2   # its label-skew study",
        f"python benchmarks/quality.py --report-only{prof}   # rebuild this file from the finished runs",
        f"python benchmarks/quality.py --estimate --suite all{prof}   # re-measure the time estimate"]
    lines += ["## Commands", "", "```", *commands, "```", "",
              f"This file was written by: `{command}`. Each run's own command is in its JSON "
              f"(`runs/<suite>-{profile}/<method>-seed<k>.json`).", ""]
    save_text(qdir / f"{stem}.json", json.dumps(raw, indent=1, sort_keys=True, default=str))
    md = qdir / f"{stem}.md"
    save_text(md, "\n".join(lines) + "\n")
    return md


def _missing_lines(missing: list[str]) -> list[str]:
    """'nlu local seed 0', ... grouped as '* nlu: Local (seeds 0, 1, 2), ...'."""
    by: dict[str, dict[str, list[str]]] = {}
    for item in missing:
        suite, method, _, seed = item.split()
        by.setdefault(suite, {}).setdefault(method, []).append(seed)
    return [f"* {suite}: " + ", ".join(f"{NAMES.get(m, m)} (seed{'s' if len(ss) > 1 else ''} {', '.join(ss)})"
                                       for m, ss in methods.items()) for suite, methods in by.items()]
