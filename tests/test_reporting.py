"""Reports from hand-written run directories (config.json + metrics.jsonl as the engines write them): plots' axes,
titles, grouping of unrelated runs, task columns, privacy. No training: every test takes well under a second."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest

from fedlora.cli import main
from fedlora.engines.results import informative_tasks, summarize
from fedlora.reporting import (client_diagnostics_figures, curves_figure, group_runs, per_client_figure,
                               silhouette_figure, summarize_run, write_report)

matplotlib.use("Agg")

TWO_TASKS = {"a-0": "a", "a-1": "a", "b-0": "b", "b-1": "b"}
CONFIG = {"name": "exp", "seed": 0, "model": {"name": "tiny-bert"}, "data": {"dataset": "wordnet-demo"},
          "federation": {"rounds": 2}, "algorithm": {"name": "fedit", "options": {}}}


def records(tasks: dict[str, str] = TWO_TASKS, rounds: int = 2, accuracy: float = 0.5, privacy: bool = False,
            server: dict | None = None, diagnostics: dict | None = None) -> list[dict]:
    """Round records as the loop writes them: round 0 (untrained start), then fit + evaluation per round."""
    out = []
    for rnd in range(rounds + 1):
        per_client = {cid: {"accuracy": accuracy + 0.1 * rnd, "loss": 1.0} for cid in tasks}
        record = {"round": rnd, "eval": per_client, "summary": summarize(per_client, tasks)}
        if rnd:
            fit = {cid: {"loss": 1.0, "bytes_up": 2000, "bytes_down": 4000} for cid in tasks}
            record |= {"sampled": list(tasks), "fit": fit, "failures": {}, "server": server or {}, "seconds": 1.0,
                       "comm": {"bytes_up": 2000 * len(tasks), "bytes_down": 4000 * len(tasks)}}
            if privacy:
                record["privacy"] = {"epsilon": 1.25 * rnd, "delta": 1e-5, "noise_multiplier": 1.1}
        if diagnostics and rnd:
            record["diagnostics"] = diagnostics
        out.append(record)
    return out


def write_run(run_dir: Path, method: str = "fedit", config: dict | None = None, **kwargs) -> Path:
    """A run directory holding config.json and metrics.jsonl."""
    cfg = json.loads(json.dumps(config or CONFIG))
    cfg["algorithm"]["name"] = method
    cfg["output_dir"] = str(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(cfg))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(**kwargs)))
    return run_dir


def write_comparison(path: Path, methods: list[str], **kwargs) -> Path:
    """A comparison directory as `compare` writes it: one run per method named `<name>-<method>`, compare.json."""
    for m in methods:
        write_run(path / m, m, {**CONFIG, "name": f"{CONFIG['name']}-{m}"}, **kwargs)
    (path / "compare.json").write_text(json.dumps({"methods": methods}))
    return path


def summary_of(**kwargs) -> dict:
    return summarize_run(records(**kwargs), "accuracy")


def shown_ticks(ax) -> list[float]:
    """The x ticks matplotlib draws (those inside the axis limits)."""
    ax.figure.canvas.draw()
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticks() if low <= t <= high]


def test_per_round_plots_tick_whole_rounds_only():
    fig = curves_figure({"fedit": summary_of(rounds=2, privacy=True)}, "accuracy")
    assert len(fig.axes) == 2  # the metric and epsilon
    for ax in fig.axes:
        ticks = shown_ticks(ax)
        assert ticks and all(float(t).is_integer() for t in ticks), ticks  # no round 0.25


def test_coinciding_curves_stay_distinguishable():
    same = summary_of()
    fig = curves_figure({"fedit": same, "ffa": same, "fedsa": same}, "accuracy")
    lines = fig.axes[0].get_lines()
    assert len({(line.get_marker(), line.get_linestyle(), line.get_markersize()) for line in lines}) == 3
    assert all(line.get_fillstyle() == "none" for line in lines)  # hollow: a marker below shows through


def test_a_single_silhouette_is_a_bar_on_the_score_range():
    fig = silhouette_figure("fedlease", {"silhouette": {"2": 0.31}, "n_experts": 2})
    ax = fig.axes[0]
    assert ax.get_ylim() == (-1, 1)  # not a +-0.05 band around the point
    assert shown_ticks(ax) and all(float(t).is_integer() for t in shown_ticks(ax))
    assert [p.get_height() for p in ax.patches] == [pytest.approx(0.31)]
    several = silhouette_figure("fedlease", {"silhouette": {"2": 0.3, "3": 0.5, "4": -0.2}}).axes[0]
    assert several.get_ylim() == (-1, 1) and all(float(t).is_integer() for t in shown_ticks(several))


def test_legends_sit_outside_the_bars():
    fig = per_client_figure({"fedit": summary_of(), "local": summary_of(accuracy=0.3)}, "accuracy")
    ax = fig.axes[0]
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1


def test_fdlora_fusion_weights_are_plotted_per_client_like_fedalt_gates_named_by_what_they_show():
    fdlora = {c: {"fusion_w_global": 0.8, "fusion_w_personal": 0.0 if c == "a-0" else 0.4} for c in TWO_TASKS}
    fedalt = {c: {"gate_individual": 0.6, "gate_individual_by_module": {"l.0.q": 0.5, "l.0.v": 0.7}} for c in TWO_TASKS}
    fd, alt = client_diagnostics_figures("fdlora", fdlora), client_diagnostics_figures("fedalt", fedalt)
    # #38 item 8: the file name and the y-axis say what the numbers are
    assert set(fd) == {"fusion_w_global_fusion_w_personal_per_client"}
    assert set(alt) == {"gate_individual_per_client", "gate_individual_by_module"}
    assert alt["gate_individual_per_client"].axes[0].get_ylabel() == "gate weight to the own LoRA (1 = own, 0 = Rest-of-World)"
    assert fd["fusion_w_global_fusion_w_personal_per_client"].axes[0].get_ylabel().startswith("fusion weight")
    ax = fd["fusion_w_global_fusion_w_personal_per_client"].axes[0]
    assert sorted(p.get_height() for p in ax.patches) == [0.0] + [0.4] * 3 + [0.8] * 4  # one bar per client and weight
    ticks = [y for line in ax.get_lines() if line.get_marker() == "_" for y in line.get_ydata()]
    assert sorted(ticks) == [0.0] + [0.4] * 3 + [0.8] * 4  # the zero is drawn, as a tick on the axis
    assert len(alt["gate_individual_per_client"].axes[0].patches) == 4
    assert client_diagnostics_figures("ifca", {c: {"cluster": 1} for c in TWO_TASKS}) == {}  # a category: table only


def test_majority_class_rate_is_a_row_a_line_and_a_series_and_a_meaningless_comparison_is_named(tmp_path):
    from fedlora.engines.results import comparison_problem, majority_class

    clients = [{"client_id": "a0", "task": "a", "labels": ["x", "y"],
                "train": [{"label": "x"}, {"label": "x"}, {"label": "y"}], "test": [{"label": "x"}, {"label": "y"}]},
               {"client_id": "b0", "task": "b", "labels": ["x", "y"],
                "train": [{"label": "y"}], "test": [{"label": "y"}, {"label": "y"}, {"label": "x"}, {"label": "y"}]}]
    (tmp_path / "clients.json").write_text(json.dumps(clients))
    majority = majority_class(tmp_path)
    assert majority == {"per_client": {"a0": 0.5, "b0": 0.75}, "by_task": {"a": 0.5, "b": 0.75}, "average": 0.625}
    assert "left the prior" in comparison_problem({"fedit": {"a0": 0.5, "b0": 0.75}, "local": {"a0": 0.5, "b0": 0.75}},
                                                  majority["per_client"])
    assert "identical" in comparison_problem({"fedit": {"a0": 0.9, "b0": 0.7}, "local": {"a0": 0.9, "b0": 0.7}}, None)
    assert comparison_problem({"fedit": {"a0": 0.9, "b0": 0.7}, "local": {"a0": 0.8, "b0": 0.7}}, None) is None
    summary = {"fedit": summary_of()}
    curves = curves_figure(summary, "accuracy", majority)
    assert [line.get_label() for line in curves.axes[0].get_lines()][-1] == "majority class"
    bars = per_client_figure(summary, "accuracy", majority)
    assert "majority class" in [t.get_text() for t in bars.axes[0].get_legend().get_texts()]


def test_the_report_is_titled_by_the_experiment_not_the_directory(tmp_path):
    run = write_run(tmp_path / "some-dir", config={**CONFIG, "name": "my-experiment"})
    assert write_report(run).read_text().startswith("# fedlora report: my-experiment\n")
    comparison = write_comparison(tmp_path / "cmp-dir", ["local", "fedit"])
    assert write_report(comparison).read_text().startswith("# fedlora report: exp\n")  # not exp-local, nor cmp-dir


def test_a_comparison_stays_one_table_in_the_asked_order(tmp_path):
    report = write_report(write_comparison(tmp_path, ["local", "fedit", "fdlora"])).read_text()
    rows = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ") and "Avg" not in line]
    assert rows == ["local", "fedit", "fdlora"] and "## 1." not in report
    assert json.loads((tmp_path / "report" / "comparison.json").read_text())["name"] == "exp"


def test_unrelated_runs_are_reported_per_config_never_merged(tmp_path, capsys):
    write_run(tmp_path / "a", "fedit")
    write_run(tmp_path / "b", "local")  # a comparison with a: same config, another method
    write_run(tmp_path / "c", "fedit", {**CONFIG, "seed": 1, "name": "other"})
    write_run(tmp_path / "d", "fedit", {**CONFIG, "data": {"dataset": "x.jsonl"}}, accuracy=0.2)
    groups = group_runs(tmp_path)
    assert [list(g.runs) for g in groups] == [["fedit", "local"], ["fedit"], ["fedit"]]
    assert set(groups[0].differs) == {"seed", "data.dataset"}
    assert main(["report", str(tmp_path)]) == 0
    assert "3 different configs (differing in data.dataset, seed)" in capsys.readouterr().out
    report = (tmp_path / "report" / "report.md").read_text()
    assert report.startswith(f"# fedlora report: 3 experiments in {tmp_path.name}\n")
    assert '## 2. other: data.dataset="wordnet-demo", seed=1' in report
    assert '## 3. exp: data.dataset="x.jsonl", seed=0' in report
    assert report.count("| **Avg** |") == 3  # three tables of their own
    assert (tmp_path / "report" / "g3_metric_by_round.png").is_file()
    tables = json.loads((tmp_path / "report" / "comparison.json").read_text())["groups"]
    assert [sorted(t["methods"]) for t in tables] == [["fedit", "local"], ["fedit"], ["fedit"]]
    assert tables[2]["methods"]["fedit"]["average"] == pytest.approx(0.4)  # d's own numbers, not a mean with a's


def test_two_runs_of_one_method_and_config_keep_both_rows(tmp_path):
    write_run(tmp_path / "first", "fedit")
    write_run(tmp_path / "second", "fedit")
    assert list(group_runs(tmp_path)[0].runs) == ["fedit (first)", "fedit (second)"]


@pytest.mark.parametrize("tasks, shown", [
    ({"alice": "task", "bob": "task", "carol": "task"}, []),  # by_key, one task: its mean is the average
    ({"alice": "a", "bob": "b", "carol": "c"}, []),  # every client its own task: its mean is the client's value
    (TWO_TASKS, ["a", "b"]),
])
def test_task_columns_only_where_they_add_information(tmp_path, tasks, shown):
    per_client = {cid: {"accuracy": 0.5} for cid in tasks}
    assert informative_tasks(summarize(per_client, tasks), len(tasks)) == shown
    header = next(line for line in write_report(write_run(tmp_path / "run", tasks=tasks)).read_text().splitlines()
                  if "**Avg**" in line)
    assert header == "| method | " + "".join(f"{t} | " for t in shown) + "**Avg** | MB up | MB down | wall s | CPU s |"


def test_privacy_spent_is_shown_when_recorded_and_nothing_changes_otherwise(tmp_path):
    report = write_report(write_comparison(tmp_path / "dp", ["fedit", "local"], privacy=True)).read_text()
    assert "| ε (δ) |" in report.splitlines()[4] and "| 2.5 (1e-05) |" in report  # the final epsilon, round 2
    eps = curves_figure({"fedit": summary_of(privacy=True)}, "accuracy").axes[1].get_lines()[0]
    assert list(eps.get_xdata()) == [1, 2] and list(eps.get_ydata()) == [1.25, 2.5]
    plain = write_report(write_run(tmp_path / "plain")).read_text()
    assert "ε" not in plain and len(curves_figure({"fedit": summary_of()}, "accuracy").axes) == 1


def test_a_round_without_noise_reads_as_no_guarantee(tmp_path):
    run = write_run(tmp_path / "run", privacy=True)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    last["privacy"]["epsilon"] = None  # noise 0: the ledger records no finite epsilon
    (run / "metrics.jsonl").write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    assert "| inf (1e-05) |" in write_report(run).read_text()
    eps = curves_figure({"fedit": summarize_run(records(privacy=True)[:-1] + [last], "accuracy")},
                        "accuracy").axes[1].get_lines()[0]
    assert eps.get_ydata()[0] == 1.25 and eps.get_ydata()[1] != eps.get_ydata()[1]  # a gap, not a crash
