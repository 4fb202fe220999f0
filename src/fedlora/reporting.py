"""Reports: a Markdown summary and PNG plots of one run or of a comparison directory of runs.

A directory of unrelated runs (configs that differ in more than the method) is reported as one section per config,
never merged into one table; the figure builders return their Figure so that tests can inspect the axes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.errors import ConfigError
from .core.io import save_json, save_text
from .engines.results import comparison_problem, informative_tasks, majority_class, read_records

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MB = 1e6

MAX_CLIENT_BARS = 50  # above this, per-client plots show a histogram instead of a bar per client

# what differs between the runs of one comparison (`compare` sets each run's method, output dir and name)
PER_RUN_KEYS = ("algorithm", "output_dir", "name")

# lines of different methods often coincide (same start, same data): hollow markers of different shapes and sizes
# and different dash patterns keep every one visible on top of the others
MARKERS = "osD^vP*X"
LINESTYLES = ("-", "--", "-.", ":")

MAX_SHOWN_KEYS = 6  # a group's label names at most this many differing config keys


@dataclass
class Group:
    """Runs that share one config apart from the method: their dirs by label, the experiment's name, and the
    values of the config keys in which this group differs from the others of the directory (empty when alone)."""

    name: str
    runs: dict[str, Path]
    differs: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """`key=value, ...` of the differing config keys, shortened when there are many."""
        shown = [f"{k}={json.dumps(v)}" for k, v in list(self.differs.items())[:MAX_SHOWN_KEYS]]
        more = len(self.differs) - MAX_SHOWN_KEYS
        return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def find_runs(path: str | Path) -> list[Path]:
    """The run directories of `path`: itself when it is a run, else its subdirectories that are (`compare` writes)."""
    path = Path(path)
    if (path / "metrics.jsonl").is_file():
        return [path]
    runs = sorted(p for p in path.iterdir() if (p / "metrics.jsonl").is_file()) if path.is_dir() else []
    if not runs:
        raise ConfigError(f"{path} holds no run (no metrics.jsonl in it or in its subdirectories)")
    return runs


def group_runs(path: str | Path) -> list[Group]:
    """The runs of `path` grouped by config (all of config.json but the method, output dir and name), each group's
    methods in the order compare.json gives."""
    path = Path(path)
    configs = {d: json.loads((d / "config.json").read_text()) for d in find_runs(path)}
    by_config: dict[str, list[Path]] = {}
    for d, cfg in configs.items():
        by_config.setdefault(json.dumps(_shared(cfg), sort_keys=True), []).append(d)
    flats = {key: _flatten(json.loads(key)) for key in by_config}
    differing = sorted(k for k in {k for f in flats.values() for k in f}
                       if len({json.dumps(f.get(k), sort_keys=True) for f in flats.values()}) > 1)
    compare_file = path / "compare.json"
    compare_info = json.loads(compare_file.read_text()) if compare_file.is_file() else {}
    order = compare_info.get("methods", [])
    groups = []
    for key, dirs in by_config.items():
        runs = _label_runs({d: configs[d] for d in dirs})
        runs = dict(sorted(runs.items(), key=lambda kv: _order(configs[kv[1]], order)))
        name = compare_info.get("name") if len(by_config) == 1 and compare_info.get("name") else \
            _experiment_name({d: configs[d] for d in dirs}, path.resolve().name)
        groups.append(Group(name, runs, {k: flats[key].get(k) for k in differing}))
    return groups


def main_metric(records: list[dict[str, Any]]) -> str:
    """accuracy for classification runs, rouge1 for generation runs."""
    mean = next(r["summary"]["mean"] for r in reversed(records) if "summary" in r)
    return "accuracy" if "accuracy" in mean else "rouge1"


def summarize_run(records: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Final per-task and average metric, mean bytes per client per round, wall time, the method's diagnostics, and
    the privacy spent (None when the run was not differentially private)."""
    evals = [r for r in records if "eval" in r]
    fits = [f for r in records for f in r.get("fit", {}).values()]
    final = evals[-1]
    private = [r for r in records if r.get("privacy")]
    return {
        "round": final["round"],
        "by_task": {t: m[metric] for t, m in final["summary"]["by_task"].items()},
        "shown_tasks": informative_tasks(final["summary"], len(final["eval"])),
        "average": final["summary"]["mean"][metric],
        "per_client": {c: m[metric] for c, m in final["eval"].items()},
        "curve": [(r["round"], r["summary"]["mean"][metric]) for r in evals],
        "mb_up_per_client_round": sum(f["bytes_up"] for f in fits) / max(len(fits), 1) / MB,
        "mb_down_per_client_round": sum(f["bytes_down"] for f in fits) / max(len(fits), 1) / MB,
        "seconds": sum(r.get("seconds") or 0.0 for r in records),
        "cpu_seconds": sum(r.get("cpu_seconds") or 0.0 for r in records),
        "server": next((r["server"] for r in reversed(records) if r.get("server")), {}),
        "diagnostics": final.get("diagnostics", {}),
        "privacy": private[-1]["privacy"] if private else None,
        "epsilon_curve": [(r["round"], r["privacy"]["epsilon"]) for r in private],
    }


def write_report(path: str | Path) -> Path:
    """Write report.md, comparison.json and PNG plots into `<path>/report/`; returns the Markdown file."""
    import matplotlib

    matplotlib.use("Agg")

    groups = group_runs(path)
    out = Path(path) / "report"
    out.mkdir(parents=True, exist_ok=True)
    several = len(groups) > 1
    title = f"{len(groups)} experiments in {Path(path).resolve().name}" if several else groups[0].name
    lines = [f"# fedlora report: {title}"]
    if several:
        lines += ["", f"These runs have {len(groups)} different configs (they differ in "
                  f"{', '.join(f'`{k}`' for k in groups[0].differs)}): each is reported on its own, never averaged "
                  "with another."]
    tables = []
    for i, group in enumerate(groups, 1):
        section, table = _group_report(group, out, f"g{i}_" if several else "", "###" if several else "##")
        if several:
            section = ["", f"## {i}. {group.name}: {group.label}", *section]
        lines += section
        tables.append(table)
    save_json(out / "comparison.json", {"groups": tables} if several else tables[0])
    report = out / "report.md"
    save_text(report, "\n".join(lines) + "\n")
    return report


def _group_report(group: Group, out: Path, prefix: str, h: str) -> tuple[list[str], dict[str, Any]]:
    """The Markdown lines and the comparison.json table of one group; its PNGs' names start with `prefix`."""
    records = {m: read_records(d) for m, d in group.runs.items()}
    metric = main_metric(next(iter(records.values())))
    summary = {m: summarize_run(r, metric) for m, r in records.items()}
    majority = majority_class(next(iter(group.runs.values()))) if metric == "accuracy" else None
    problem = comparison_problem({m: s["per_client"] for m, s in summary.items()}, majority and majority["per_client"])
    lines = ["", *_results_table(summary, metric, majority), *(["", f"**Caution:** {problem}."] if problem else []),
             *_figure_line(curves_figure(summary, metric, majority), out, f"{prefix}metric_by_round"),
             *_figure_line(per_client_figure(summary, metric, majority), out, f"{prefix}per_client"),
             *_figure_line(communication_figure(summary), out, f"{prefix}communication")]
    for m, s in summary.items():
        lines += _server_diagnostics(m, s["server"], out, prefix, h)
        lines += _client_diagnostics(m, s["diagnostics"], out, prefix, h)
    table = {"name": group.name, "metric": metric, "methods": summary}
    return lines, {**table, "config": group.differs} if group.differs else table


def _results_table(summary: dict[str, dict[str, Any]], metric: str, majority: dict[str, Any] | None = None) -> list[str]:
    tasks = list(dict.fromkeys(t for s in summary.values() for t in s["shown_tasks"]))
    private = any(s["privacy"] for s in summary.values())
    averaged = "averaged per task and then over tasks" if tasks else "averaged over clients"
    lines = [f"Personalized {metric} (x100) of each client on its own test split, {averaged}, at the last "
             "evaluation. Communication is the mean per client per round; CPU s is fedlora's process (under Flower "
             "without the clients' processes)."
             + (" ε (δ): the differential privacy spent by the whole run." if private else ""), "",
             "| method | " + "".join(f"{t} | " for t in tasks) + "**Avg** | MB up | MB down | wall s | CPU s |"
             + (" ε (δ) |" if private else ""),
             "|---|" + "---|" * (len(tasks) + 5 + private)]
    for m, s in summary.items():
        lines.append(f"| {m} | " + "".join(f"{_pct(s['by_task'].get(t, float('nan')))} | " for t in tasks)
                     + f"**{_pct(s['average'])}** | {s['mb_up_per_client_round']:.3f} | "
                       f"{s['mb_down_per_client_round']:.3f} | {s['seconds']:.0f} | {s['cpu_seconds']:.0f} |"
                     + (f" {_epsilon(s['privacy'])} |" if private else ""))
    if majority:  # always predicting each client's own training majority: a method at this level learned nothing
        lines.append("| *majority class* | " + "".join(f"{_pct(majority['by_task'].get(t, float('nan')))} | " for t in tasks)
                     + f"*{_pct(majority['average'])}* | | | | |" + (" |" if private else ""))
    return lines


def curves_figure(summary: dict[str, dict[str, Any]], metric: str, majority: dict[str, Any] | None = None) -> Figure:
    """The mean metric by round of every method (and the majority-class rate, dashed) and, when any run is
    differentially private, epsilon by round."""
    import matplotlib.pyplot as plt

    private = any(s["epsilon_curve"] for s in summary.values())
    fig, axes = plt.subplots(1, 2 if private else 1, figsize=(12 if private else 7, 4), squeeze=False)
    ax = axes[0][0]
    for i, (m, s) in enumerate(summary.items()):
        ax.plot(*zip(*s["curve"]), label=m, **_style(i, len(summary)))
    if majority:
        ax.axhline(majority["average"], color="grey", linestyle="--", linewidth=1, label="majority class")
    ax.set(xlabel="round", ylabel=f"mean {metric} over tasks", title=f"{metric} by round (0 = untrained start)")
    _round_axis(ax)
    _legend_outside(ax)
    if private:
        eps = axes[0][1]
        for i, (m, s) in enumerate(summary.items()):
            if s["epsilon_curve"]:
                rounds, spent = zip(*s["epsilon_curve"])  # None (no noise: no guarantee) is a gap in the line
                eps.plot(rounds, [float("nan") if e is None else e for e in spent], label=m, **_style(i, len(summary)))
        eps.set(xlabel="round", ylabel="ε spent so far", title="differential privacy: ε by round")
        eps.set_ylim(bottom=0)  # nothing spent before the first round
        _round_axis(eps)
        _legend_outside(eps)
    return fig


def per_client_figure(summary: dict[str, dict[str, Any]], metric: str, majority: dict[str, Any] | None = None) -> Figure:
    """The final metric of every client, a bar per client and method (a histogram when there are many clients), with
    each client's majority-class rate as the last series."""
    clients = list(next(iter(summary.values()))["per_client"])
    values = {m: s["per_client"] for m, s in summary.items()}
    if majority:
        values["majority class"] = majority["per_client"]
    return _per_client_bars(clients, values, f"final {metric}", f"final {metric} per client (own test split)")


def communication_figure(summary: dict[str, dict[str, Any]]) -> Figure:
    """MB up and down per client per round of every method."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(summary)
    ax.bar([i - 0.2 for i in range(len(names))], [summary[m]["mb_up_per_client_round"] for m in names], 0.4, label="up")
    ax.bar([i + 0.2 for i in range(len(names))], [summary[m]["mb_down_per_client_round"] for m in names], 0.4,
           label="down")
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="MB per client per round", title="communication")
    _legend_outside(ax)
    return fig


def silhouette_figure(method: str, server: dict[str, Any]) -> Figure:
    """The silhouette score of each number of clusters K tried (the choice of K), on the score's range [-1, 1]."""
    import matplotlib.pyplot as plt

    sil = server["silhouette"]
    ks = sorted(sil, key=int)
    x, y = [int(k) for k in ks], [sil[k] for k in ks]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if len(ks) == 1:  # a lone point would sit on a meaningless +-0.05 axis: a bar with its value instead
        ax.bar(x, y, 0.5)
        ax.set_xlim(x[0] - 1, x[0] + 1)
    else:
        ax.plot(x, y, marker="o")
    for k, v in zip(x, y):
        ax.annotate(f"{v:.3f}", (k, v), textcoords="offset points", xytext=(0, 5 if v >= 0 else -12), ha="center",
                    fontsize=8)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_ylim(-1, 1)  # the score's whole range, so runs and choices compare at a glance
    chosen = f": choice of M = {server['n_experts']}" if "n_experts" in server else ""
    ax.set(xlabel="number of clusters K", ylabel="silhouette score", title=f"{method}{chosen}")
    _integer_ticks(ax)
    ax.grid(alpha=0.3)
    return fig


# what a per-client diagnostic's number means, by its name's first word: the y-axis of its plot
DIAGNOSTIC_AXES = {"gate": "gate weight to the own LoRA (1 = own, 0 = Rest-of-World)",
                   "fusion": "fusion weight (global, personal LoRA)", "mean": "mean weight of expert 0"}


def client_diagnostics_figures(method: str, diagnostics: dict[str, dict[str, Any]]) -> dict[str, Figure]:
    """{name: figure} of a method's per-client diagnostics: its real-valued numbers (FedALT's gate, FDLoRA's fusion
    weights) per client, and each per-module dict as the bars of its mean over clients. Integers (a cluster id)
    are categories, shown in the table only."""
    import matplotlib.pyplot as plt

    figures = {}
    reals = sorted({k for d in diagnostics.values() for k, v in d.items() if isinstance(v, float)})
    if reals:
        values = {k: {cid: d[k] for cid, d in diagnostics.items() if isinstance(d.get(k), float)} for k in reals}
        axes = {DIAGNOSTIC_AXES.get(k.split("_")[0], "value") for k in reals}  # the file's and the axis's names
        figures[f"{'_'.join(reals) if len(reals) <= 2 else 'diagnostics'}_per_client"] = _per_client_bars(
            list(diagnostics), values, axes.pop() if len(axes) == 1 else "value", f"{method}: {', '.join(reals)}")
    for key in sorted({k for d in diagnostics.values() for k, v in d.items() if isinstance(v, dict)}):
        per_client = [d[key] for d in diagnostics.values() if isinstance(d.get(key), dict)]
        parts = list(per_client[0])
        means = [sum(v[p] for v in per_client) / len(per_client) for p in parts]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(range(len(parts)), means)
        ax.set_xticks(range(len(parts)), [_short(p) for p in parts], rotation=60, ha="right", fontsize=7)
        ax.set(ylabel=key, title=f"{method}: {key}, mean over {len(per_client)} clients")
        figures[key] = fig
    return figures


def _server_diagnostics(method: str, server: dict[str, Any], out: Path, prefix: str, h: str) -> list[str]:
    """A method's server diagnostics: a silhouette plot (the choice of K) and a table of client groups."""
    lines = []
    if server.get("silhouette"):
        lines += _figure_line(silhouette_figure(method, server), out, f"{prefix}{method}_silhouette")
    if server.get("assignment"):
        groups: dict[int, list[str]] = {}
        for cid, g in server["assignment"].items():
            groups.setdefault(g, []).append(cid)
        lines += ["", "| group | clients |", "|---|---|"] + [f"| {g} | {', '.join(c)} |" for g, c in sorted(groups.items())]
    return ["", f"{h} {method}: client groups", *lines] if lines else []


def _client_diagnostics(method: str, diagnostics: dict[str, dict[str, Any]], out: Path, prefix: str,
                        h: str) -> list[str]:
    """A method's per-client diagnostics at the last evaluation: numbers in a table of clients (never averaged:
    a cluster id has no mean), plus the plots of `client_diagnostics_figures`."""
    if not diagnostics:
        return []
    lines = ["", f"{h} {method}: diagnostics at the last evaluation"]
    scalars = sorted({k for d in diagnostics.values() for k, v in d.items() if not isinstance(v, dict)})
    if scalars and len(diagnostics) <= MAX_CLIENT_BARS:
        lines += ["", "| client | " + " | ".join(scalars) + " |", "|---|" + "---|" * len(scalars)]
        lines += [f"| {cid} | " + " | ".join(_number(d.get(k)) for k in scalars) + " |" for cid, d in diagnostics.items()]
    for key, fig in client_diagnostics_figures(method, diagnostics).items():
        lines += _figure_line(fig, out, f"{prefix}{method}_{key}")
    return lines


def _per_client_bars(clients: list[str], values: dict[str, dict[str, float]], ylabel: str, title: str) -> Figure:
    """Grouped bars, one group per client and one bar per series of `values`; a histogram per series when there
    are more than MAX_CLIENT_BARS clients (one bar each would be unreadable, and a huge image)."""
    import matplotlib.pyplot as plt

    if len(clients) <= MAX_CLIENT_BARS:
        fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(clients) * len(values) ** 0.5), 4))
        width = 0.8 / len(values)
        for i, (name, v) in enumerate(values.items()):
            xs, ys = [c + i * width for c in range(len(clients))], [v.get(c, float("nan")) for c in clients]
            bars = ax.bar(xs, ys, width, label=name)  # and a tick on its top: a zero is seen, not a missing bar
            ax.plot(xs, ys, "_", markersize=8, markeredgewidth=2, color=bars.patches[0].get_facecolor())
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(clients))], clients, rotation=60, ha="right", fontsize=7)
        ax.axhline(0, color="grey", linewidth=0.8)  # a zero or negative value (a fusion weight) is still seen
        ax.set(ylabel=ylabel, title=title)
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, v in values.items():
            ax.hist([x for x in v.values() if x == x], bins=30, histtype="step", label=name)
        ax.set(xlabel=ylabel, ylabel="clients", title=f"{title}: {len(clients)} clients")
    _legend_outside(ax)
    return fig


def _figure_line(fig: Figure, out: Path, name: str) -> list[str]:
    """Save `fig` as `<out>/<name>.png`; the Markdown lines that show it."""
    _save(fig, out / f"{name}.png")
    return ["", f"![{name}]({name}.png)"]


def _style(i: int, n: int) -> dict[str, Any]:
    """The i-th of n lines: its own marker (hollow, shrinking with i so that coinciding ones nest) and dash."""
    return {"marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)],
            "markersize": 9 - 4 * i / max(n - 1, 1), "fillstyle": "none", "alpha": 0.85}


def _round_axis(ax: Axes) -> None:
    _integer_ticks(ax)
    ax.grid(alpha=0.3)


def _integer_ticks(ax: Axes) -> None:
    """Whole numbers only on the x axis: there is no round 1.5 (nor K = 2.5)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_outside(ax: Axes) -> None:
    """The legend right of the axes, where it hides no bar nor line."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)


def _shared(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in PER_RUN_KEYS}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"data": {"seed": 1}} -> {"data.seed": 1}"""
    flat = {}
    for k, v in d.items():
        flat.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return flat


def _method(config: dict[str, Any]) -> str:
    return config.get("algorithm", {}).get("name", "?")


def _label_runs(configs: dict[Path, dict[str, Any]]) -> dict[str, Path]:
    """{label: dir}: the method, with the directory's name where two runs of a group share a method."""
    methods = [_method(c) for c in configs.values()]
    return {m if methods.count(m) == 1 else f"{m} ({d.name})": d for d, m in zip(configs, methods)}


def _order(config: dict[str, Any], order: list[str]) -> int:
    m = _method(config)
    return order.index(m) if m in order else len(order)


def _experiment_name(configs: dict[Path, dict[str, Any]], fallback: str) -> str:
    """A run's config name; for a comparison, its runs' common name without the `-<method>` `compare` appends."""
    if len(configs) == 1:
        return next(iter(configs.values())).get("name") or fallback
    names = {c["name"].removesuffix(f"-{_method(c)}") for c in configs.values() if c.get("name")}
    return ", ".join(sorted(names)) if names else fallback


def _epsilon(privacy: dict[str, Any] | None) -> str:
    if not privacy:
        return ""
    eps = privacy["epsilon"]  # None: noise 0, no guarantee
    return f"{'inf' if eps is None else f'{eps:.3g}'} ({privacy['delta']:.3g})"


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _number(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _short(path: str) -> str:
    """bert.encoder.layer.3.attention.self.query -> L3.query"""
    match = re.search(r"\.(\d+)\..*?([^.]+)$", path)
    return f"L{match.group(1)}.{match.group(2)}" if match else path


def _save(fig: Figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # tight: the legends outside the axes stay in the image
    plt.close(fig)
