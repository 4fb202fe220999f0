"""Reports: a Markdown summary and PNG plots of one run or of a comparison directory of runs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .core.errors import ConfigError
from .core.io import save_json, save_text
from .engines.results import read_records

MB = 1e6

MAX_CLIENT_BARS = 50  # above this, per_client.png shows a histogram instead of a bar per client


def find_runs(path: str | Path) -> dict[str, Path]:
    """{method: run dir} for a run directory, or for a directory of runs (as `compare` writes)."""
    path = Path(path)
    candidates = [path] if (path / "metrics.jsonl").is_file() else sorted(p for p in path.iterdir() if (p / "metrics.jsonl").is_file()) \
        if path.is_dir() else []
    if not candidates:
        raise ConfigError(f"{path} holds no run (no metrics.jsonl in it or in its subdirectories)")
    runs = {json.loads((p / "config.json").read_text())["algorithm"]["name"]: p for p in candidates}
    order = json.loads((path / "compare.json").read_text())["methods"] if (path / "compare.json").is_file() else []
    return dict(sorted(runs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def main_metric(records: list[dict[str, Any]]) -> str:
    """accuracy for classification runs, rouge1 for generation runs."""
    mean = next(r["summary"]["mean"] for r in reversed(records) if "summary" in r)
    return "accuracy" if "accuracy" in mean else "rouge1"


def summarize_run(records: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Final per-task and average metric, mean bytes per client per round, wall time, and the method's diagnostics."""
    evals = [r for r in records if "eval" in r]
    fits = [f for r in records for f in r.get("fit", {}).values()]
    final = evals[-1]
    return {
        "round": final["round"],
        "by_task": {t: m[metric] for t, m in final["summary"]["by_task"].items()},
        "average": final["summary"]["mean"][metric],
        "per_client": {c: m[metric] for c, m in final["eval"].items()},
        "curve": [(r["round"], r["summary"]["mean"][metric]) for r in evals],
        "mb_up_per_client_round": sum(f["bytes_up"] for f in fits) / max(len(fits), 1) / MB,
        "mb_down_per_client_round": sum(f["bytes_down"] for f in fits) / max(len(fits), 1) / MB,
        "seconds": sum(r.get("seconds") or 0.0 for r in records),
        "server": next((r["server"] for r in reversed(records) if r.get("server")), {}),
        "diagnostics": final.get("diagnostics", {}),
    }


def write_report(path: str | Path) -> Path:
    """Write report.md, comparison.json and PNG plots into `<path>/report/`; returns the Markdown file."""
    import matplotlib

    matplotlib.use("Agg")

    runs = find_runs(path)
    out = Path(path) / "report"
    out.mkdir(parents=True, exist_ok=True)
    records = {m: read_records(d) for m, d in runs.items()}
    metric = main_metric(next(iter(records.values())))
    summary = {m: summarize_run(r, metric) for m, r in records.items()}
    save_json(out / "comparison.json", {"metric": metric, "methods": summary})
    lines = [f"# fedlora report: {Path(path).resolve().name}", "", *_results_table(summary, metric),
             *_plot_curves(summary, metric, out), *_plot_per_client(summary, metric, out),
             *_plot_communication(summary, out)]
    for m, s in summary.items():
        lines += _server_diagnostics(m, s["server"], out) + _client_diagnostics(m, s["diagnostics"], out)
    report = out / "report.md"
    save_text(report, "\n".join(lines) + "\n")
    return report


def _results_table(summary: dict[str, dict[str, Any]], metric: str) -> list[str]:
    tasks = sorted({t for s in summary.values() for t in s["by_task"]})
    lines = [f"Personalized {metric} (x100) of each client on its own test split, averaged per task and then over "
             "tasks, at the last evaluation. Communication is the mean per client per round.", "",
             "| method | " + " | ".join(tasks) + " | **Avg** | MB up | MB down | wall s |",
             "|---|" + "---|" * (len(tasks) + 4)]
    for m, s in summary.items():
        lines.append(f"| {m} | " + " | ".join(_pct(s["by_task"].get(t, float("nan"))) for t in tasks)
                     + f" | **{_pct(s['average'])}** | {s['mb_up_per_client_round']:.3f} | "
                       f"{s['mb_down_per_client_round']:.3f} | {s['seconds']:.0f} |")
    return lines


def _plot_curves(summary: dict[str, dict[str, Any]], metric: str, out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, s in summary.items():
        ax.plot(*zip(*s["curve"]), marker="o", label=m)
    ax.set(xlabel="round", ylabel=f"mean {metric} over tasks", title=f"{metric} by round (0 = untrained start)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, out / "metric_by_round.png")
    return ["", "![metric by round](metric_by_round.png)"]


def _plot_per_client(summary: dict[str, dict[str, Any]], metric: str, out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    clients = list(next(iter(summary.values()))["per_client"])
    if len(clients) <= MAX_CLIENT_BARS:
        fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(clients) * len(summary) ** 0.5), 4))
        width = 0.8 / len(summary)
        for i, (m, s) in enumerate(summary.items()):
            ax.bar([c + i * width for c in range(len(clients))], [s["per_client"].get(c, float("nan")) for c in clients],
                   width, label=m)
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(clients))], clients, rotation=60, ha="right", fontsize=7)
        ax.set(ylabel=f"final {metric}", title=f"final {metric} per client (own test split)")
    else:  # one bar per client is unreadable (and a huge image) for hundreds of clients: their distribution
        fig, ax = plt.subplots(figsize=(7, 4))
        for m, s in summary.items():
            ax.hist([v for v in s["per_client"].values() if v == v], bins=30, histtype="step", label=m)
        ax.set(xlabel=f"final {metric} (own test split)", ylabel="clients",
               title=f"final {metric} over {len(clients)} clients")
    ax.legend(fontsize=7)
    _save(fig, out / "per_client.png")
    return ["", "![per client](per_client.png)"]


def _plot_communication(summary: dict[str, dict[str, Any]], out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(summary)
    ax.bar([i - 0.2 for i in range(len(names))], [summary[m]["mb_up_per_client_round"] for m in names], 0.4, label="up")
    ax.bar([i + 0.2 for i in range(len(names))], [summary[m]["mb_down_per_client_round"] for m in names], 0.4, label="down")
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="MB per client per round", title="communication")
    ax.legend()
    _save(fig, out / "communication.png")
    return ["", "![communication](communication.png)"]


def _server_diagnostics(method: str, server: dict[str, Any], out: Path) -> list[str]:
    """A method's server diagnostics: a silhouette curve (the choice of K) and a table of client groups."""
    import matplotlib.pyplot as plt

    lines = []
    sil = server.get("silhouette")
    if sil:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ks = sorted(sil, key=int)
        ax.plot([int(k) for k in ks], [sil[k] for k in ks], marker="o")
        chosen = f": choice of M = {server['n_experts']}" if "n_experts" in server else ""
        ax.set(xlabel="number of clusters K", ylabel="silhouette score", title=f"{method}{chosen}")
        ax.grid(alpha=0.3)
        _save(fig, out / f"{method}_silhouette.png")
        lines += ["", f"![silhouette]({method}_silhouette.png)"]
    if server.get("assignment"):
        groups: dict[int, list[str]] = {}
        for cid, g in server["assignment"].items():
            groups.setdefault(g, []).append(cid)
        lines += ["", "| group | clients |", "|---|---|"] + [f"| {g} | {', '.join(c)} |" for g, c in sorted(groups.items())]
    return ["", f"## {method}: client groups", *lines] if lines else []


def _client_diagnostics(method: str, diagnostics: dict[str, dict[str, Any]], out: Path) -> list[str]:
    """A method's per-client diagnostics at the last evaluation: numbers in a table of clients (never averaged:
    a cluster id has no mean), per-module values as a bar plot of their mean over clients."""
    import matplotlib.pyplot as plt

    if not diagnostics:
        return []
    lines = ["", f"## {method}: diagnostics at the last evaluation"]
    scalars = sorted({k for d in diagnostics.values() for k, v in d.items() if not isinstance(v, dict)})
    if scalars and len(diagnostics) <= MAX_CLIENT_BARS:
        lines += ["", "| client | " + " | ".join(scalars) + " |", "|---|" + "---|" * len(scalars)]
        lines += [f"| {cid} | " + " | ".join(_number(d.get(k)) for k in scalars) + " |" for cid, d in diagnostics.items()]
    for key in sorted({k for d in diagnostics.values() for k, v in d.items() if isinstance(v, dict)}):
        per_client = [d[key] for d in diagnostics.values() if isinstance(d.get(key), dict)]
        parts = list(per_client[0])
        means = [sum(v[p] for v in per_client) / len(per_client) for p in parts]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(range(len(parts)), means)
        ax.set_xticks(range(len(parts)), [_short(p) for p in parts], rotation=60, ha="right", fontsize=7)
        ax.set(ylabel=key, title=f"{method}: {key}, mean over {len(per_client)} clients")
        _save(fig, out / f"{method}_{key}.png")
        lines += ["", f"![{key}]({method}_{key}.png)"]
    return lines


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _number(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _short(path: str) -> str:
    """bert.encoder.layer.3.attention.self.query -> L3.query"""
    match = re.search(r"\.(\d+)\..*?([^.]+)$", path)
    return f"L{match.group(1)}.{match.group(2)}" if match else path


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
