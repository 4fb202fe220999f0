"""benchmarks/quality.py and its modules: the table and ordering logic on hand-made results, the run lock, the
--quick smoke run (nlu, nlg) and the glue suites (their configs, tables, time rows and a smoke run on the fixture
corpora)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def bench(name: str):
    """A module of benchmarks/ (not a package: the quality modules import each other by name, as the script does)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def fake_run(method: str, seed: int, average: float, suite: str = "nlg", **extra) -> dict:
    """A result JSON as run_one writes it, with two tasks whose mean is `average`."""
    return {"suite": suite, "profile": "quick", "method": method, "seed": seed, "metric": "rouge1",
            "by_task": {"t1": average - 0.01, "t2": average + 0.01}, "average": average, "wall_seconds": 10.0,
            "tasks": {"c0": "t1", "c1": "t2"}, **extra}


def table_of(means: dict[str, list[float]]) -> dict:
    """aggregate() of runs whose per-seed averages are `means[method]`."""
    return bench("quality_stats").aggregate({m: {s: fake_run(m, s, v) for s, v in enumerate(vs)} for m, vs in means.items()})


def test_ordering_says_yes_only_when_the_means_follow_the_paper():
    setup, stats = bench("quality_setup"), bench("quality_stats")
    order = setup.PAPER["nlg"]["order"]  # FedALT > FDLoRA > FedDPA > Local > FedIT
    follows = table_of({"fedalt": [0.50, 0.52], "fdlora": [0.48, 0.47], "feddpa": [0.45, 0.46],
                           "local": [0.44, 0.43], "fedit": [0.40, 0.41]})
    checks = [stats.check_relation(r, follows) for r in stats.relations(order)]
    assert len(checks) == 10 and all(c["holds"] == "yes" for c in checks)
    assert stats.verdict(checks).startswith("**Reproduced: yes.**")

    swapped = table_of({"fedalt": [0.50, 0.52], "fdlora": [0.48, 0.47], "feddpa": [0.45, 0.46],
                           "local": [0.40, 0.41], "fedit": [0.44, 0.43]})  # FedIT above Local
    checks = {c["relation"]: c for c in (stats.check_relation(r, swapped) for r in stats.relations(order))}
    assert checks["Local > FedIT"]["holds"] == "no" and checks["FedDPA > FedIT"]["holds"] == "yes"
    assert checks["Local > FedIT"]["delta"] == pytest.approx(-0.03)
    assert sum(c["holds"] == "yes" for c in checks.values()) == 9
    assert stats.verdict(list(checks.values())).startswith("**Reproduced: no.** 9 of 10")

    partial = table_of({"fedalt": [0.5], "fedit": [0.4]})
    checks = [stats.check_relation(r, partial) for r in stats.relations(order)]
    assert [c["holds"] for c in checks].count("yes") == 1 and [c["holds"] for c in checks].count("not run") == 9
    text = stats.verdict(checks)
    assert "not decidable" in text and "FDLoRA" in text and "FedALT" not in text.split("Missing runs of:")[1]


def test_ties_and_noise_within_a_group():
    setup, stats = bench("quality_setup"), bench("quality_stats")
    rels = stats.relations(setup.PAPER["nlu"]["order"])  # FedLEASE > FedSA ~ FedDPA ~ IFCA > FedIT
    assert ("fedsa", "~", "feddpa") in rels and ("fedlease", ">", "fedit") in rels and len(rels) == 10
    table = table_of({"fedsa": [0.800, 0.806], "feddpa": [0.798, 0.800], "ifca": [0.70, 0.71]})
    assert stats.check_relation(("fedsa", "~", "feddpa"), table)["holds"] == "yes"  # 0.4 points apart
    far = stats.check_relation(("fedsa", "~", "ifca"), table)
    assert far["holds"] == "no" and far["beyond_noise"] is True
    assert table["fedsa"]["average"]["n"] == 2
    assert table["fedsa"]["average"]["std"] == pytest.approx(0.006 / 2 ** 0.5)


def test_seed_noise_is_paired_over_the_shared_splits():
    stats = bench("quality_stats")
    # Seed 1's split is much harder for both methods, but FedLEASE is 2 points above FedIT on every split.
    table = table_of({"fedlease": [0.40, 0.30, 0.46], "fedit": [0.38, 0.28, 0.44]})
    paired = stats.check_relation(("fedlease", ">", "fedit"), table)
    assert paired["delta"] == pytest.approx(0.02) and paired["se"] == pytest.approx(0.0, abs=1e-12)
    assert paired["beyond_noise"] is True  # unpaired, the splits' spread (s.e. ~0.06) would hide it

    # A sweep still running: FedLEASE has also run the hardest split (seed 2 at 0.20), FedIT not yet. Compared on
    # the shared seeds the 2 points stand; all-seed means would put FedLEASE 2.7 points *below* FedIT.
    uneven = table_of({"fedlease": [0.40, 0.30, 0.20], "fedit": [0.38, 0.28]})
    shared = stats.check_relation(("fedlease", ">", "fedit"), uneven)
    assert shared["seeds"] == [0, 1] and shared["delta"] == pytest.approx(0.02) and shared["holds"] == "yes"
    assert shared["se"] == pytest.approx(0.0, abs=1e-12)
    one_shared = stats.check_relation(("fedlease", ">", "fedit"), table_of({"fedlease": [0.4, 0.3], "fedit": [0.3]}))
    assert one_shared["seeds"] == [0] and one_shared["delta"] == pytest.approx(0.1) and one_shared["se"] is None
    table_b = table_of({"fedlease": [0.40, 0.30], "fedit": [0.38, 0.28]})
    table_b["fedit"]["average_by_seed"] = {2: 0.38, 3: 0.28}  # no split in common: unpaired (Welch)
    welch = stats.check_relation(("fedlease", ">", "fedit"), table_b)
    assert welch["seeds"] == [] and welch["delta"] == pytest.approx(0.02)
    assert welch["se"] == pytest.approx((0.005 / 2 + 0.005 / 2) ** 0.5) and welch["beyond_noise"] is False
    assert stats.check_relation(("fedlease", ">", "fedit"), table_of({"fedlease": [0.4], "fedit": [0.3]}))["se"] is None


def test_ari_on_a_planted_assignment():
    runs = bench("quality_runs")
    tasks = {f"{t}-{i}": t for t in ("a", "b", "c", "d") for i in range(4)}
    exact = {c: "abcd".index(t) for c, t in tasks.items()}
    assert runs.task_ari(exact, tasks) == pytest.approx(1.0)
    relabelled = {c: 3 - e for c, e in exact.items()}  # cluster ids are arbitrary
    assert runs.task_ari(relabelled, tasks) == pytest.approx(1.0)
    merged = {c: min(e, 2) for c, e in exact.items()}  # tasks c and d share an expert
    assert 0.5 < runs.task_ari(merged, tasks) < 1.0
    assert runs.task_ari({c: 0 for c in tasks}, tasks) == pytest.approx(0.0)


def test_report_from_existing_runs_marks_missing_ones(tmp_path):
    setup, runs, report = bench("quality_setup"), bench("quality_runs"), bench("quality_report")
    fl = {"n_experts": 2, "silhouette": {"2": 0.4, "3": 0.1}, "assignment": {"c0": 0, "c1": 0, "c2": 1, "c3": 1},
          "ari": 1.0}
    two_a_task = {"c0": "t1", "c1": "t1", "c2": "t2", "c3": "t2"}  # a task grouping to recover: ARI is shown
    results = [fake_run("fedit", 0, 0.40, "nlu"), fake_run("fedit", 1, 0.42, "nlu"),
               fake_run("fedlease", 0, 0.50, "nlu", fedlease=fl, tasks=two_a_task), fake_run("ifca", 0, 0.99, "nlu", setup="an older config")]
    for r in results:
        r.setdefault("setup", setup.setup_id(setup.config_for("nlu", "quick", r["method"], r["seed"], tmp_path)))
        path = runs.result_path(tmp_path, "nlu", "quick", r["method"], r["seed"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    md = report.write_report(tmp_path, "quick", {"nlu": ["fedit", "fedlease", "ifca"], "nlg": ["fedalt"]},
                             {"nlu": [0, 1], "nlg": [0, 1]}, "cmd")
    text = md.read_text()
    assert "| FedIT | 40.00 ± 1.41 | 42.00 ± 1.41 | **41.00 ± 1.41** | +0.00 |" in text
    assert "**50.00 ± – (1/2)**" in text and "| IFCA+LoRA | not run |" in text
    assert "| 0 | 2 | 0.400 | 1.000 |" in text
    data = json.loads((tmp_path / "quality" / "quality.json").read_text())
    assert "nlu fedlease seed 1" in data["missing"] and "nlg fedalt seed 0" in data["missing"]
    assert "nlu fedit seed 0" not in data["missing"]
    assert "nlu ifca seed 0" in data["missing"]  # made with another config: not mixed into the table
    for suite in ("nlu", "nlg"):
        assert (tmp_path / "quality" / f"quality_{suite}.png").read_bytes()[:4] == b"\x89PNG"
    # runs of seeds beyond the requested ones (e.g. made with --seeds 0 1 2) are shown, not hidden or flagged
    md = report.write_report(tmp_path, "quick", {"nlu": ["fedit", "fedlease", "ifca"], "nlg": ["fedalt"]},
                             {"nlu": [0], "nlg": [0]}, "cmd")
    assert "| FedIT | 40.00 ± 1.41 | 42.00 ± 1.41 | **41.00 ± 1.41** | +0.00 |" in md.read_text()
    assert "**50.00 ± – (1/2)**" in md.read_text()  # seed 1 exists for FedIT, so FedLEASE lacks it
    assert json.loads((tmp_path / "quality" / "quality.json").read_text())["missing"] == [
        "nlu ifca seed 0", "nlg fedalt seed 0"]  # only requested seeds count as missing


@pytest.mark.slow
def test_quality_benchmark_quick(tmp_path):
    # nlu and nlg only: the glue smoke settings build the real glue corpora (~20 s a run); they are covered on the
    # fixture corpora by test_glue_smoke_runs_on_the_fixture_corpora
    done = subprocess.run([sys.executable, "benchmarks/quality.py", "--quick", "--suite", "nlu", "nlg", "--jobs", "2",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    q = tmp_path / "quality"
    data = json.loads((q / "quality.json").read_text())
    assert data["missing"] == [] and set(data["suites"]) == {"nlu", "nlg"}
    for suite, methods in (("nlu", {"untrained", "majority", "fedit", "fedlease"}), ("nlg", {"untrained", "fedit", "fedalt"})):
        assert set(data["suites"][suite]["table"]) == methods
        assert (q / f"quality_{suite}.png").read_bytes()[:4] == b"\x89PNG"
        for m in methods:
            run = json.loads((q / "runs" / f"{suite}-smoke" / f"{m}-seed0.json").read_text())
            assert 0.0 <= run["average"] <= 1.0 and run["per_client"] and (run["wall_seconds"] > 0 or m == "majority")
            assert run["torch_threads"] == 1  # --jobs 2: two sweeps, one core each
    fl = data["suites"]["nlu"]["fedlease"][0]
    assert fl["n_experts"] >= 1 and -1.0 <= fl["ari"] <= 1.0
    text = (q / "quality.md").read_text()
    assert "Reproduced" in text and "FedLEASE > FedIT" in text


def test_setup_id_ignores_engine_and_paths_but_not_the_setup(tmp_path):
    setup = bench("quality_setup")
    base = setup.config_for("nlu", "quick", "fedit", 0, tmp_path / "a")
    same = setup.config_for("nlu", "quick", "fedit", 0, tmp_path / "b", threads=1, client_batch="auto")
    assert same.engine.client_batch == "auto" and same.engine.torch_threads == 1
    assert setup.setup_id(base) == setup.setup_id(same)
    other_seed = setup.config_for("nlu", "quick", "fedit", 1, tmp_path / "a")
    other_budget = setup.config_for("nlu", "quick", "fedit", 0, tmp_path / "a")
    other_budget.training.local_steps += 1
    assert len({setup.setup_id(base), setup.setup_id(other_seed), setup.setup_id(other_budget)}) == 3


def test_summarize_run_reads_fedlease_allocation_and_any_clustering():
    runs = bench("quality_runs")
    tasks = {"a0": "t1", "a1": "t1", "b0": "t2", "b1": "t2"}
    final = {"eval": {c: {"accuracy": 0.5} for c in tasks}, "summary": {"mean": {"accuracy": 0.5},
                                                                         "by_task": {"t1": {"accuracy": 0.5}}}}
    ifca = runs.summarize_run([{"round": 1, "server": {"assignment": {"a0": 0, "a1": 0, "b0": 1, "b1": 1}}, **final}],
                              tasks, "accuracy")
    assert "fedlease" not in ifca and ifca["clustering"]["ari"] == 1.0  # IFCA: no experts, still a grouping
    lease = {"n_experts": 2, "assignment": {"a0": 1, "a1": 0, "b0": 0, "b1": 1}, "silhouette": {"2": 0.3}}
    fl = runs.summarize_run([{"round": 1, "server": lease, **final}], tasks, "accuracy")
    assert fl["fedlease"]["n_experts"] == 2 and fl["fedlease"]["ari"] < 0.5


def test_summarize_run_keeps_per_client_diagnostics_of_either_record_layout():
    runs = bench("quality_runs")
    tasks = {"a0": "t1", "b0": "t2"}
    summary = {"mean": {"accuracy": 0.5}, "by_task": {"t1": {"accuracy": 0.4}, "t2": {"accuracy": 0.6}}}
    old = {"round": 1, "summary": summary,
           "eval": {"a0": {"accuracy": 0.4, "cluster": 1}, "b0": {"accuracy": 0.6, "cluster": 0}}}
    new = {"round": 1, "summary": summary, "eval": {"a0": {"accuracy": 0.4}, "b0": {"accuracy": 0.6}},
           "diagnostics": {"a0": {"cluster": 1}, "b0": {"cluster": 0}}}
    assert runs.summarize_run([new], tasks, "accuracy")["per_client"] == old["eval"]
    assert runs.summarize_run([old], tasks, "accuracy")["per_client"] == old["eval"]


def test_a_run_is_held_by_one_sweep_and_free_again_once_its_holder_ends(tmp_path):
    runs = bench("quality_runs")
    path = runs.result_path(tmp_path, "nlu", "quick", "fedit", 0)
    with runs.claim(path) as first, runs.claim(path) as second:
        assert first and not second
    with runs.claim(path) as again:
        assert again  # released by the first holder
    hold = ("import pathlib, sys, time; sys.path.insert(0, sys.argv[1]); import quality_runs; "
            "held = quality_runs.claim(pathlib.Path(sys.argv[2])); held.__enter__(); "  # kept referenced: held till killed
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(BENCH), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with runs.claim(path) as taken:
            assert not taken  # another process runs it
        holder.kill()  # dies holding the lock, leaving its lock file behind
        holder.wait(timeout=30)
        with runs.claim(path) as taken:
            assert taken  # the OS dropped the dead holder's lock
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()


def test_majority_class_is_each_clients_own_training_prior():
    runs = bench("quality_runs")
    row = lambda label: {"label": label}  # noqa: E731
    clients = [{"client_id": "a0", "task": "t1", "train": [row("x"), row("x"), row("y")], "test": [row("x"), row("y")]},
               {"client_id": "a1", "task": "t1", "train": [row("y")], "test": [row("y"), row("y"), row("x"), row("y")]},
               {"client_id": "b0", "task": "t2", "train": [row(1), row(2), row(2)], "test": [row(1)]}]
    out = runs.majority_class(clients)
    assert out["per_client"] == {"a0": {"accuracy": 0.5}, "a1": {"accuracy": 0.75}, "b0": {"accuracy": 0.0}}
    assert out["by_task"] == {"t1": 0.625, "t2": 0.0} and out["average"] == 0.3125


def test_clustering_probe_reads_fedlease_warmup_loras_and_local_finals(tmp_path):
    from fedlora import run_experiment

    from .conftest import tiny_config

    spec = importlib.util.spec_from_file_location("clustering_probe", ROOT / "benchmarks" / "clustering_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    runs = {}
    for method, options in (("fedlease", {"warmup_rounds": 1}), ("local", {})):
        cfg = tiny_config(tmp_path, algorithm={"name": method, "options": options}, federation={"rounds": 1},
                          output_dir=str(tmp_path / method))
        runs[method] = run_experiment(cfg).run_dir
    fl, local = probe.probe(runs["fedlease"]), probe.probe(runs["local"])
    assert fl["source"].startswith("warm-up") and local["source"].startswith("final")
    # one round of FedLEASE's warm-up trains exactly what Local trains: the same LoRAs, the same clustering
    for key in ("within_task", "across_tasks", "M", "ari_at_M", "ari_at_tasks"):
        assert fl[key] == pytest.approx(local[key])
    assert fl["clients"] == 4 and 0.0 <= fl["within_task"] <= 2.0 and -1.0 <= fl["ari_at_M"] <= 1.0
    assert fl["same_as_run"] is True and local["same_as_run"] is None  # the probe reclusters as the run did
    fedit = run_experiment(tiny_config(tmp_path, federation={"rounds": 1}, output_dir=str(tmp_path / "fedit"))).run_dir
    with pytest.raises(SystemExit, match="no FedLEASE warm-up LoRAs"):
        probe.probe(fedit)


# -- the glue suites (FedLEASE-like: 4 binary tasks x 4 clients) and their label-skew study -------------------------
def test_every_suite_is_fully_described_and_glue_builds_valid_configs(tmp_path):
    setup = bench("quality_setup")
    assert setup.SUITES == ["nlu", "nlg", "glue", "glue-skew"]
    for table in (setup.METHODS, setup.METRIC, setup.SEEDS, setup.SUITE_TITLE, setup.PAPER, setup.SMOKE):
        assert set(table) == set(setup.SUITES)
    assert setup.METHODS["glue"] == setup.METHODS["nlu"] and setup.SEEDS["glue"] == [0, 1, 2]
    assert set(setup.METHODS["glue-skew"]) == {"untrained", "majority", "fedlease", "fedsa", "fedalt", "fedit"}
    assert setup.PAPER["glue"]["order"] == setup.PAPER["nlu"]["order"]
    assert "stress test" in setup.SUITE_TITLE["nlu"] and "FedLEASE" in setup.SUITE_TITLE["glue"]
    assert setup.config_name("nlu", "quick") == ("nlu-quick", [])  # unchanged: the stored runs keep their hashes
    ids = {}
    for suite in ("glue", "glue-skew"):
        for profile in ("quick", "paper", "smoke"):
            for method in setup.METHODS[suite]:
                cfg = setup.config_for(suite, profile, method, 1, tmp_path / suite)
                assert cfg.data.suite == "glue" and cfg.data.clients_per_task == 4 and cfg.seed == 1
                assert cfg.data.pool_per_task == 4 * (cfg.data.train_per_client + cfg.data.test_per_client)
                assert cfg.algorithm.name == ("fedit" if method in setup.REFERENCES else method)
                if suite == "glue":
                    assert (cfg.data.partition, cfg.data.partition_key) == ("by_key", "shard")
                else:
                    assert (cfg.data.partition, cfg.data.dirichlet_alpha) == ("dirichlet", 0.5)
            ids[suite, profile] = setup.setup_id(cfg)
            assert cfg.model.name == ("tiny-bert" if profile == "smoke" else "minilm")
    assert len(set(ids.values())) == len(ids)  # the skew study never reuses a balanced run, nor the reverse
    assert setup.suite_tasks("glue-skew") == sorted(["review_sentiment", "qa_match", "wordnet_paraphrase",
                                                     "wordnet_hypernymy"])


def test_glue_suites_get_nlus_tables(tmp_path):
    setup, runs, report = bench("quality_setup"), bench("quality_runs"), bench("quality_report")
    tasks = {f"{t}-{i}": t for t in ("t1", "t2") for i in range(2)}
    fl = {"n_experts": 2, "silhouette": {"2": 0.5}, "assignment": {c: int(t == "t2") for c, t in tasks.items()},
          "ari": 1.0}
    results = [fake_run(m, s, v + 0.01 * s, suite, tasks=tasks, **({"fedlease": fl} if m == "fedlease" else {}))
               for suite in ("glue", "glue-skew") for s in range(3)
               for m, v in (("fedlease", 0.70), ("fedsa", 0.65), ("fedit", 0.60), ("majority", 0.80))]
    for r in results:
        r["setup"] = setup.setup_id(setup.config_for(r["suite"], "quick", r["method"], r["seed"], tmp_path))
        path = runs.result_path(tmp_path, r["suite"], "quick", r["method"], r["seed"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    methods = {s: setup.METHODS[s] for s in ("glue-skew", "glue")}
    md = report.write_report(tmp_path, "quick", methods, {s: [0, 1, 2] for s in methods}, "cmd")
    text = md.read_text()
    assert text.index(setup.SUITE_TITLE["glue"]) < text.index(setup.SUITE_TITLE["glue-skew"])  # the study's order
    assert "`glue-quick` with `data.partition=dirichlet data.dirichlet_alpha=0.5`" in text
    assert text.count("| FedLEASE | 70.00 ± 1.00 | 72.00 ± 1.00 | **71.00 ± 1.00** | +10.00 |") == 2  # Δ vs FedIT
    assert text.count("| 1 | 2 | 0.500 | 1.000 | 0: t1 x2 / 1: t2 x2 |") == 2  # ARI meaningful: 2 clients a task
    assert "far above 50" in text and "| FedLEASE > FedSA-LoRA | 87.76 vs 84.60 | +5.00 ± 0.00 | yes | yes |" in text
    data = json.loads((tmp_path / "quality" / "quality.json").read_text())
    assert list(data["suites"]) == ["glue", "glue-skew"]
    assert data["suites"]["glue-skew"]["verdict"].startswith("**Reproduced: yes.**")
    assert "glue local seed 0" in data["missing"] and "glue fedlease seed 0" not in data["missing"]
    assert {m for m in data["missing"] if m.startswith("glue-skew ")} == {
        f"glue-skew {m} seed {s}" for m in ("untrained", "fedalt") for s in range(3)}
    assert (tmp_path / "quality" / "quality_glue-skew.png").read_bytes()[:4] == b"\x89PNG"


def test_glue_smoke_runs_on_the_fixture_corpora(tmp_path, monkeypatch):
    """run_one on the glue smoke settings with the small corpora of tests/data/glue (the real ones take ~20 s)."""
    from functools import partial

    from fedlora.data import federated, glue

    fixtures = ROOT / "tests" / "data" / "glue"
    monkeypatch.setitem(federated.SUITES, "glue", partial(glue.glue_records, wordnet_root=fixtures / "wordnet",
                                                          reviews_root=fixtures / "modeldata",
                                                          chatterbot_root=fixtures / "chatterbot"))
    runs = bench("quality_runs")
    for suite, method in (("glue", "fedlease"), ("glue-skew", "untrained")):
        data = runs.run_one(tmp_path, tmp_path / "scratch", suite, "smoke", method, 0, 1, "cmd")
        assert len(data["per_client"]) == 16 and set(data["by_task"]) == set(glue.GLUE_TASKS)
        assert 0.0 <= data["average"] <= 1.0
    fl = json.loads(runs.result_path(tmp_path, "glue", "smoke", "fedlease", 0).read_text())["fedlease"]
    assert fl["n_experts"] >= 1 and -1.0 <= fl["ari"] <= 1.0
    majority = json.loads(runs.result_path(tmp_path, "glue-skew", "smoke", "majority", 0).read_text())
    assert majority["method"] == "majority" and len(majority["per_client"]) == 16


def test_time_table_covers_the_glue_suites(tmp_path):
    estimate = bench("quality_estimate")
    probe = {"fedit_run_cpu_s": 600.0, "measured": "2026-12-02T00:00:00+00:00", "cpu_per_client_step_s": 0.5,
             "cpu_per_client_eval_s": 2.0, "clients": 16, "rounds": 2, "local_steps": 30, "evaluations": 1,
             "startup_cpu_s": 600.0 - 16 * 30 * 2 * 0.5 - 16 * 2.0}
    estimates = {f"{s}-quick": {**probe, "suite": s, "profile": "quick"} for s in ("glue-skew", "glue", "nlu")}
    lines = estimate.estimate_lines(estimates, tmp_path, {"glue": [0, 1, 2], "glue-skew": [0, 1, 2]})
    rows = [line for line in lines if line.startswith("| quick |")]
    assert [r.split(" | ")[1] for r in rows] == ["glue", "glue-skew"]  # suite order; nlu not in this report
    # glue: FedIT 600 s x (fedit 1 + local 1 + ffa 1 + fedsa 1 + feddpa 2 + ifca 2.3 + flora 1 + fedalt 1.2
    # + fedlease 1.2 + fdlora 2 + fedex 1 + flexlora 1 + rolora 1), the untrained row (start-up + 16 evaluations)
    # and the free majority row, x 3 seeds
    untrained = 600.0 - 16 * 30 * 2 * 0.5 - 16 * 2.0 + 16 * 2.0  # start-up = FedIT's run less its steps and evaluation
    assert f"| {(600 * 16.7 + untrained) * 3 / 3600:.1f} |" in rows[0]
    assert any("glue sweep's target (about 3 h on 2 cores) is not met" in line for line in lines)  # 3.5 h


@pytest.mark.parametrize("suite, method, seed", [("nlu", "fedit", 0), ("nlu", "fedlease", 2), ("nlg", "fedalt", 0)])
def test_the_stored_results_stay_current_when_settings_are_added(tmp_path, suite, method, seed):
    """A config setting added at its default must not make the committed sweep stale (setup_id leaves it out)."""
    setup = bench("quality_setup")
    stored = Path(__file__).parents[1] / "benchmarks" / "results" / "quality" / "runs" / f"{suite}-quick" / f"{method}-seed{seed}.json"
    cfg = setup.config_for(suite, "quick", method, seed, tmp_path)
    assert setup.setup_id(cfg) == json.loads(stored.read_text())["setup"]
