"""The quality study's statistics: means and spreads over seeds, and whether our means follow the papers' orderings
(paired over seeds where they can be)."""

from __future__ import annotations

import math
import statistics
from typing import Any

from quality_setup import NAMES, REFERENCES

TIE = 0.01  # "A ~ B" holds when the means differ by at most 1 point (x100) or by at most the seed noise


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
    delta, se, seeds = difference(table[a]["average_by_seed"], table[b]["average_by_seed"])
    holds = delta > 0 if op == ">" else abs(delta) <= max(TIE, se or 0.0)
    return {**row, "holds": "yes" if holds else "no", "delta": delta, "se": se, "seeds": seeds,
            "beyond_noise": None if se is None else abs(delta) > 2 * se, "unrun": []}


def difference(a: dict[int, float], b: dict[int, float]) -> tuple[float, float | None, list[int]]:
    """Mean difference of two methods' averages, its standard error (None on one seed) and the seeds it used.

    Paired over the seeds both ran: a seed fixes the data split for every method, so the split's own difficulty
    cancels in the per-seed difference (while a sweep is partial, a method that has run a hard split more would
    otherwise look worse). Unpaired (Welch) only when they share no seed.
    """
    shared = sorted(a.keys() & b.keys())
    if shared:
        per_seed = [a[s] - b[s] for s in shared]
        se = statistics.stdev(per_seed) / math.sqrt(len(shared)) if len(shared) > 1 else None
        return statistics.fmean(per_seed), se, shared
    delta = statistics.fmean(a.values()) - statistics.fmean(b.values())
    if len(a) > 1 and len(b) > 1:
        return delta, math.sqrt(statistics.variance(a.values()) / len(a) + statistics.variance(b.values()) / len(b)), []
    return delta, None, []


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
