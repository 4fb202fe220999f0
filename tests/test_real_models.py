"""The real models on the real suites, with tiny budgets (slow: they load MiniLM or SmolLM2)."""

from __future__ import annotations

import pytest

from fedlora import run_experiment
from fedlora.adapters.base_models import load_base_model

pytestmark = pytest.mark.slow


def test_smollm2_loads_from_its_cached_conversion_and_follows_the_template():
    base = load_base_model("smollm2", None, 2)
    assert base.objective == "causal_lm" and base.tokenizer.eos_token == "<|im_end|>"
    assert any(n.endswith("q_proj") for n, _ in base.model.named_modules())


def test_nlg_suite_runs_fedalt_on_smollm2(tmp_path):
    cfg = {"name": "nlg-smoke", "output_dir": str(tmp_path / "run"), "model": {"name": "smollm2"},
           "lora": {"r": 8, "alpha": 32, "dropout": 0.05},
           "data": {"suite": "nlg", "tasks": ["antonym", "quote_language"], "clients_per_task": 1, "partition": "iid",
                    "train_per_client": 16, "test_per_client": 6, "max_length": 96},
           "training": {"lr": 1e-3, "local_steps": 3, "batch_size": 4, "eval_batch_size": 6, "max_new_tokens": 8},
           "federation": {"rounds": 2}, "algorithm": {"name": "fedalt"}, "engine": {"progress": False}}
    result = run_experiment(cfg)
    final = result.final["quote_language-0"]
    assert {"rouge1", "rougeL", "exact_match", "loss"} <= set(final)
    assert "gate_individual" in result.final_diagnostics["quote_language-0"]
    assert 0.0 <= final["rouge1"] <= 1.0
    assert result.final_mean["loss"] < result.evaluations()[0]["summary"]["mean"]["loss"]


def test_nlu_suite_quick_profile_builds_16_clients(tmp_path):
    result = run_experiment("nlu-quick", overrides=[f"output_dir={tmp_path / 'run'}", "federation.rounds=1",
                                                    "training.local_steps=2", "data.train_per_client=32",
                                                    "data.test_per_client=16", "engine.progress=false"])
    assert len(result.final) == 16
    assert set(result.evaluations()[-1]["summary"]["by_task"]) == {
        "fortunes_category", "fortunes_language", "wordnet_noun_topic", "wordnet_verb_class"}
