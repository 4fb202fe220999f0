"""An export is what a plain transformers + PEFT user can load: resolvable base, labels, head, folded fixed
mixtures; a router mixture says to use fedlora; exports replace earlier ones completely, with one file mode."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from fedlora import export_client, load_personalized, run_experiment
from fedlora.adapters import AdaptedModel, Layout
from fedlora.adapters.base_models import (canonical_name, default_objective, load_base_model, model_names,
                                          peft_base_reference)
from fedlora.adapters.peft_io import export_peft_adapter, fold_fixed_mixture
from fedlora.cli import main
from fedlora.core.errors import ConfigError
from fedlora.export_files import save_base_model

from .conftest import tiny_config

TEXTS = ["a small furry animal", "to run quickly", "a tool for cutting wood"]


def _clients(run_dir) -> list[dict]:
    return json.loads((run_dir / "clients.json").read_text())


def _fewest_labels(run_dir) -> dict:
    """The client with the fewest labels: its head is cut from the shared (largest) head."""
    return min(_clients(run_dir), key=lambda c: len(c["labels"]))


def _logits(model, tokenizer, texts=TEXTS) -> torch.Tensor:
    ids = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits


def _random_experts(adapted: AdaptedModel, n: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(shape, generator=gen) * 0.3 for k, shape in adapted.spec.lora_shapes().items()}
            for _ in range(n)]


def test_fedit_export_loads_with_auto_peft_and_gives_fedlora_logits(tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    run_experiment(tiny_config(tmp_path, federation={"rounds": 1}))
    client = _fewest_labels(tmp_path / "run")
    out = export_client(tmp_path / "run", client["client_id"], tmp_path / "export")
    cfg = json.loads((out / "expert_0" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((out / "base").resolve())  # tiny: the base travels with it
    base_cfg = json.loads((out / "base" / "config.json").read_text())
    n = len(client["labels"])
    assert n < json.loads((out / "fedlora_personalized.json").read_text())["head_outputs"]  # the head was cut
    assert base_cfg["id2label"] == {str(i): name for i, name in enumerate(client["labels"])}
    assert base_cfg["label2id"] == {name: i for i, name in enumerate(client["labels"])}
    # nothing but the adapter directory: the base, num_labels, id2label and the head all come from the export
    peft_model = AutoPeftModelForSequenceClassification.from_pretrained(str(out / "expert_0")).eval()
    ours = load_personalized(out)
    theirs = _logits(peft_model, ours.tokenizer)
    assert theirs.shape[-1] == n
    torch.testing.assert_close(theirs, _logits(ours.model, ours.tokenizer)[:, :n], atol=1e-5, rtol=1e-5)
    assert [peft_model.config.id2label[i] for i in theirs.argmax(-1).tolist()] == ours.predict(TEXTS)
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text()


def test_the_export_readme_code_runs_as_written_after_the_export_moved_and_truncates_as_fedlora_does(tmp_path):
    """#38 item 5: the README's plain-PEFT lines left out truncation (a long text got another label) and named
    the saved base by the absolute path it was exported to."""
    import re
    import shutil

    run_experiment(tiny_config(tmp_path, federation={"rounds": 1}))
    client = _fewest_labels(tmp_path / "run")
    moved = tmp_path / "elsewhere"
    shutil.move(export_client(tmp_path / "run", client["client_id"], tmp_path / "export"), moved)
    readme = (moved / "README.md").read_text()
    code = readme.split("## With plain transformers + PEFT")[1].split("```python")[1].split("```")[0]
    code = re.sub(r"export = Path\(.*?\)", f"export = Path({str(moved)!r})", code)
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 60)
    assert "truncation=True" in code and "some text" in code
    namespace: dict = {}
    exec(code.replace("some text", long_text).replace("print(", "result = ("), namespace)  # noqa: S102
    ours = load_personalized(moved)
    label = ours.predict([long_text])[0]
    assert [namespace["model"].config.id2label[i] for i in namespace["result"].tolist()] == [label]


def test_fixed_weight_mixture_folds_into_one_lora_with_equal_logits(tmp_path):
    from peft import PeftModel

    base = load_base_model("tiny-bert", None, 3, seed=1)
    adapted = AdaptedModel(base.model, r=4, alpha=8)
    adapted.set_layout(Layout(3, "none"))
    experts = _random_experts(adapted, 3)
    for e, state in enumerate(experts):
        adapted.load_expert(e, state)
    weights = [0.3, 0.0, -0.7]  # a zero weight drops its expert: rank 8, not 12
    adapted.set_expert_weights(weights)
    adapted.model.eval()
    mixture = _logits(adapted.model, base.tokenizer)
    folded, rank, alpha = fold_fixed_mixture(experts, weights, 4, 8)
    assert (rank, alpha) == (8, 16)
    out = export_peft_adapter(adapted, folded, tmp_path / "adapter", head=adapted.head_state(), r=rank, alpha=alpha)
    peft_model = PeftModel.from_pretrained(load_base_model("tiny-bert", None, 3, seed=1).model, str(out)).eval()
    torch.testing.assert_close(_logits(peft_model, base.tokenizer), mixture, atol=1e-5, rtol=1e-5)


def test_fedalt_fixed_mixer_exports_one_plain_peft_lora(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    result = run_experiment(tiny_config(tmp_path, algorithm={"name": "fedalt", "options": {"mixer": "fixed"}}))
    client = _clients(tmp_path / "run")[0]
    out = export_client(tmp_path / "run", client["client_id"], tmp_path / "export")
    manifest = json.loads((out / "fedlora_personalized.json").read_text())
    assert manifest["layout"] == {"n_experts": 1, "router": "none", "r": 8}
    assert manifest["lora"]["folded"]["weights"] == [0.5, 0.5]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "base", "expert_0", "fedlora_personalized.json"]
    base = AutoModelForSequenceClassification.from_pretrained(str(out / "base"))
    peft_model = PeftModel.from_pretrained(base, str(out / "expert_0")).eval()
    ours = load_personalized(out)
    n = len(client["labels"])
    torch.testing.assert_close(_logits(peft_model, ours.tokenizer), _logits(ours.model, ours.tokenizer)[:, :n],
                               atol=1e-5, rtol=1e-5)
    # and the folded export is still the model the run evaluated
    from fedlora.training.metrics import classification_metrics

    labels = client["labels"]
    predicted = ours.predict([r["text"] for r in client["test"]])
    got = classification_metrics([labels.index(p) for p in predicted], [labels.index(r["label"]) for r in client["test"]],
                                 len(labels))
    assert got == {k: result.final[client["client_id"]][k] for k in ("accuracy", "macro_f1")}


@pytest.mark.parametrize("method", ["flora", "fedex"])
def test_a_merged_base_update_is_exported_in_the_saved_base(tmp_path, method):
    """FLoRA's merged stacks and FedEx-LoRA's merged residuals: plain PEFT on the export gives fedlora's logits."""
    from peft import AutoPeftModelForSequenceClassification

    ranks = {"clients": {"lora_r": [2, 4, 2, 4]}} if method == "flora" else {}
    run_experiment(tiny_config(tmp_path, algorithm={"name": method}, **ranks))
    out = export_client(tmp_path / "run", "noun_topic-1", tmp_path / "export")  # rank 4
    assert (out / "base_delta.safetensors").is_file()
    peft_model = AutoPeftModelForSequenceClassification.from_pretrained(str(out / "expert_0")).eval()
    assert peft_model.peft_config["default"].r == 4
    ours = load_personalized(out)
    n = peft_model.config.num_labels
    torch.testing.assert_close(_logits(peft_model, ours.tokenizer), _logits(ours.model, ours.tokenizer)[:, :n],
                               atol=1e-5, rtol=1e-5)


def test_router_mixture_readme_says_plain_peft_differs_and_how_to_load_it(tmp_path):
    run_experiment(tiny_config(tmp_path, federation={"rounds": 1}, algorithm={"name": "fedalt"}))
    out = export_client(tmp_path / "run", "noun_topic-0", tmp_path / "export")
    readme = (out / "README.md").read_text()
    assert "different predictions" in readme and "softmax gate" in readme
    assert f"fedlora.load_personalized({str(out.resolve())!r})" in readme
    assert (out / "router.safetensors").is_file()
    # every expert carries the head, so each loads on its own in PEFT (no size mismatch, the trained head)
    from peft import AutoPeftModelForSequenceClassification

    ours = load_personalized(out)
    for e in (0, 1):
        peft_model = AutoPeftModelForSequenceClassification.from_pretrained(str(out / f"expert_{e}"))
        torch.testing.assert_close(peft_model.base_model.model.classifier.modules_to_save["default"].weight,
                                   ours.model.classifier.weight[: peft_model.config.num_labels])


def test_export_replaces_an_earlier_export_completely_with_one_file_mode(tmp_path):
    run_experiment(tiny_config(tmp_path / "a", federation={"rounds": 1}, algorithm={"name": "fedalt"}))
    run_experiment(tiny_config(tmp_path / "b", federation={"rounds": 1}))
    out = tmp_path / "export"
    export_client(tmp_path / "a" / "run", "noun_topic-0", out)
    assert (out / "expert_1").is_dir() and (out / "router.safetensors").is_file()
    export_client(tmp_path / "b" / "run", "noun_topic-0", out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "base", "expert_0", "fedlora_personalized.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.relative_to(out): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes[out.relative_to(out)] == 0o777 & ~umask
    for path, mode in modes.items():
        assert mode == ((0o777 if (out / path).is_dir() else 0o666) & ~umask), path


def test_export_refuses_a_directory_that_is_not_an_export(tmp_path):
    run_experiment(tiny_config(tmp_path, federation={"rounds": 1}))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a fedlora export.*notes.txt"):
        export_client(tmp_path / "run", "noun_topic-0", out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_unknown_client_is_a_clear_message_listing_the_clients(tmp_path, capsys):
    run_experiment(tiny_config(tmp_path, federation={"rounds": 1}))
    with pytest.raises(ConfigError, match=r"no client 'alice'.*noun_topic-0, noun_topic-1, verb_class-0"):
        export_client(tmp_path / "run", "alice", tmp_path / "export")
    assert main(["export", str(tmp_path / "run"), "--client", "alice", "--out", str(tmp_path / "export")]) != 0
    assert main(["predict", str(tmp_path / "run"), "--client", "alice", "--file", os.devnull]) != 0
    err = capsys.readouterr().err
    assert "KeyError" not in err and err.count("noun_topic-0, noun_topic-1") == 2


def test_causal_lm_base_and_adapter_load_with_auto_peft(tmp_path):
    from peft import AutoPeftModelForCausalLM

    base = load_base_model("tiny-llama", None, 2, seed=2)
    adapted = AdaptedModel(base.model, r=2, alpha=4)
    adapted.load_expert(0, _random_experts(adapted, 1)[0])
    adapted.model.eval()
    save_base_model(adapted, base.tokenizer, tmp_path / "base", {}, [])
    export_peft_adapter(adapted, adapted.expert_state(0), tmp_path / "adapter", base_model=str(tmp_path / "base"))
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(_logits(peft_model, base.tokenizer), _logits(adapted.model, base.tokenizer),
                               atol=1e-5, rtol=1e-5)


def test_hub_ids_name_the_packaged_copies():
    assert canonical_name("sentence-transformers/all-MiniLM-L6-v2") == "minilm"
    assert canonical_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2"
    assert default_objective("HuggingFaceTB/SmolLM2-135M-Instruct") == "causal_lm"
    assert peft_base_reference("minilm") == ("sentence-transformers/all-MiniLM-L6-v2", True)
    assert peft_base_reference("smollm2") == ("HuggingFaceTB/SmolLM2-135M-Instruct", False)  # de-quantized GGUF
    assert peft_base_reference("tiny-bert") == (None, False)
    assert set(model_names()) >= {"minilm", "smollm2", "tiny-bert", "tiny-llama", "sentence-transformers/all-MiniLM-L6-v2"}
    with pytest.raises(ConfigError) as err:
        load_base_model("no-such-model", None, 2)
    assert all(name in str(err.value) for name in model_names())


@pytest.mark.slow
def test_real_minilm_export_loads_in_plain_peft_by_its_hub_name(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedlora.adapters.base_models import minilm_path

    cfg = tiny_config(tmp_path, model={"name": "sentence-transformers/all-MiniLM-L6-v2"}, federation={"rounds": 1},
                      training={"local_steps": 1})
    run_experiment(cfg)
    client = _fewest_labels(tmp_path / "run")
    out = export_client(tmp_path / "run", client["client_id"], tmp_path / "export")
    adapter = json.loads((out / "expert_0" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert not (out / "base").exists()  # the Hub has it (offline here: the packaged copy stands in for it)
    labels = dict(enumerate(client["labels"]))
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=len(labels), id2label=labels,
                                                              label2id={v: k for k, v in labels.items()})
    peft_model = PeftModel.from_pretrained(base, str(out / "expert_0")).eval()
    ours = load_personalized(out)
    torch.testing.assert_close(_logits(peft_model, ours.tokenizer), _logits(ours.model, ours.tokenizer)[:, :len(labels)],
                               atol=1e-5, rtol=1e-5)


def test_modules_to_save_trains_a_private_pooler_that_exports_and_loads(tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    from fedlora.adapters.model import head_parameters
    from fedlora.engines.checkpoint import load_checkpoint

    base = load_base_model("tiny-bert", None, 3, seed=0).model
    assert head_parameters(base, ["classifier", "pooler"]) == [
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]
    assert head_parameters(base, ["classifier", "score"]) == ["classifier.weight", "classifier.bias"]  # the default
    pooler, classifier = base.bert.pooler.dense.weight.clone(), base.classifier.weight.clone()
    start = AdaptedModel(base, r=4, alpha=8, head_modules=["classifier", "pooler"]).init_head(seed=7)
    # a client's starting head: a fresh classifier, the pooler as the base has it (PEFT's modules_to_save copy)
    assert torch.equal(start["bert.pooler.dense.weight"], pooler)
    assert not torch.equal(start["classifier.weight"], classifier)
    run_experiment(tiny_config(tmp_path, federation={"rounds": 1}, lora={"modules_to_save": ["classifier", "pooler"]}))
    states = load_checkpoint(tmp_path / "run").client_states
    poolers = [s.states["_head"]["bert.pooler.dense.weight"] for s in states.values()]
    pretrained = base.bert.pooler.dense.weight
    assert all(not torch.equal(p, pretrained) for p in poolers)  # trained by every client, from the base's weights
    assert not torch.equal(poolers[0], poolers[1])  # and kept private
    client = _fewest_labels(tmp_path / "run")
    out = export_client(tmp_path / "run", client["client_id"], tmp_path / "export")
    cfg = json.loads((out / "expert_0" / "adapter_config.json").read_text())
    assert set(cfg["modules_to_save"]) == {"bert.pooler.dense", "classifier"}
    peft_model = AutoPeftModelForSequenceClassification.from_pretrained(str(out / "expert_0")).eval()
    ours = load_personalized(out)
    n = len(client["labels"])
    torch.testing.assert_close(_logits(peft_model, ours.tokenizer), _logits(ours.model, ours.tokenizer)[:, :n],
                               atol=1e-5, rtol=1e-5)
