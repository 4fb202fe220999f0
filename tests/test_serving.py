"""Export and load_personalized reproduce a client's final predictions exactly; reports; predict."""

from __future__ import annotations

import json

import pytest

from fedlora import compare, export_client, load_personalized, run_experiment
from fedlora.cli import main
from fedlora.core.errors import CheckpointError
from fedlora.training.metrics import classification_metrics

from .conftest import tiny_config

CASES = [("fedit", {}), ("fedalt", {}), ("fedlease", {"warmup_rounds": 1}), ("fdlora", {"fusion_budget": 4, "fusion_examples": 8}),
         ("feddpa", {}), ("flora", {}), ("fedex", {}), ("flexlora", {}), ("rolora", {}),
         ("ifca", {"clusters": 2}), ("local", {})]
CLIENTS = {m: {"clients": {"lora_r": [2, 4, 2, 4]}} for m in ("flora", "flexlora")}  # heterogeneous ranks


@pytest.mark.parametrize("method,options", CASES)
def test_export_reproduces_the_final_predictions(tmp_path, method, options):
    result = run_experiment(tiny_config(tmp_path, federation={"rounds": 2}, algorithm={"name": method, "options": options},
                                        **CLIENTS.get(method, {})))
    client = json.loads((tmp_path / "run" / "clients.json").read_text())[1]
    out = export_client(tmp_path / "run", client["client_id"], tmp_path / "export")
    assert (out / "expert_0" / "adapter_config.json").is_file()
    model = load_personalized(out)
    predicted = model.predict([r["text"] for r in client["test"]])
    labels = client["labels"]
    got = classification_metrics([labels.index(p) for p in predicted], [labels.index(r["label"]) for r in client["test"]],
                                 len(labels))
    final = result.final[client["client_id"]]
    assert got == {"accuracy": final["accuracy"], "macro_f1": final["macro_f1"]}


def test_single_adapter_export_is_a_plain_peft_adapter(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run_experiment(tiny_config(tmp_path, federation={"rounds": 1}))
    out = export_client(tmp_path / "run", "noun_topic-0", tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "base", "expert_0", "fedlora_personalized.json"]
    base = AutoModelForSequenceClassification.from_pretrained(str(out / "base"))  # a tiny model's base travels along
    peft_model = PeftModel.from_pretrained(base, str(out / "expert_0")).eval()
    ours = load_personalized(out)
    ids = ours.tokenizer(["a small furry animal"], return_tensors="pt")
    n = base.config.num_labels
    torch.testing.assert_close(peft_model(**ids).logits, ours.model(**ids).logits[:, :n], atol=1e-5, rtol=1e-5)


def test_predict_cli_and_bad_export_dir(tmp_path, capsys):
    run_experiment(tiny_config(tmp_path, federation={"rounds": 1}))
    texts = tmp_path / "texts.txt"
    texts.write_text("a small furry animal\nto run quickly\n")
    assert main(["predict", str(tmp_path / "run"), "--client", "noun_topic-0", "--file", str(texts)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    labels = json.loads((tmp_path / "run" / "clients.json").read_text())[0]["labels"]
    assert len(lines) == 2 and all(line in labels for line in lines)
    with pytest.raises(CheckpointError, match="not a fedlora export"):
        load_personalized(tmp_path)


def test_predict_serves_the_latest_checkpoint_after_the_run_moved_on(tmp_path):
    from fedlora.serving import predict

    cfg = tiny_config(tmp_path, federation={"rounds": 1})
    run_experiment(cfg)
    manifest = tmp_path / "run" / "exports" / "noun_topic-0" / "fedlora_personalized.json"
    predict(tmp_path / "run", "noun_topic-0", ["a small furry animal"])
    first = json.loads(manifest.read_text())
    predict(tmp_path / "run", "noun_topic-0", ["a small furry animal"])
    assert json.loads(manifest.read_text()) == first  # unchanged run: the export is reused
    run_experiment(tiny_config(tmp_path, federation={"rounds": 2}), overwrite=True)  # the run moved on
    predict(tmp_path / "run", "noun_topic-0", ["a small furry animal"])
    again = json.loads(manifest.read_text())
    assert (first["round"], again["round"]) == (1, 2) and again["checkpoint"] != first["checkpoint"]


def test_compare_writes_one_table_with_every_method_and_valid_pngs(tmp_path):
    cfg = tiny_config(tmp_path, federation={"rounds": 2},
                      algorithm={"name": "fedit", "per_method": {"fedlease": {"warmup_rounds": 1}}})
    compare(cfg, ["local", "fedit", "fedalt", "fedlease"])
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    rows = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ") and "Avg" not in line]
    assert rows[:4] == ["local", "fedit", "fedalt", "fedlease"]  # every method, in the order asked
    pngs = list((tmp_path / "run" / "report").glob("*.png"))
    assert {p.name for p in pngs} >= {"metric_by_round.png", "per_client.png", "communication.png",
                                      "fedlease_silhouette.png", "fedalt_gate_individual_by_module.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in pngs)
    # diagnostics come from the methods' hooks, rendered generically: FedLEASE's groups, FedALT's gate per client
    assert "## fedlease: client groups" in report and "| group | clients |" in report
    assert "## fedalt: diagnostics at the last evaluation" in report and "| client | gate_individual |" in report
    table = json.loads((tmp_path / "run" / "report" / "comparison.json").read_text())
    assert set(table["methods"]) == {"local", "fedit", "fedalt", "fedlease"}
    assert table["methods"]["local"]["mb_up_per_client_round"] == 0


def test_report_of_many_clients_plots_their_distribution_not_one_bar_each(tmp_path):
    import random

    from PIL import Image

    from fedlora.reporting import write_report

    rng = random.Random(0)
    accuracy = {f"task-{i}": {"accuracy": rng.random()} for i in range(200)}
    fit = {c: {"bytes_up": 10, "bytes_down": 10} for c in accuracy}
    summary = {"mean": {"accuracy": 0.5}, "by_task": {"task": {"accuracy": 0.5}}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1, "fit": fit, "eval": accuracy, "summary": summary}))
    (tmp_path / "config.json").write_text(json.dumps({"algorithm": {"name": "fedit"}}))
    write_report(tmp_path)
    width, height = Image.open(tmp_path / "report" / "per_client.png").size
    assert width < 2000 and height < 1000  # one bar per client would be ~100 inches wide
