"""PEFT export names exactly the adapted modules: a suffix list only when it covers no other module."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora.adapters import AdaptedModel
from fedlora.adapters.base_models import load_base_model
from fedlora.adapters.peft_io import export_peft_adapter

LAYERS = 2  # tiny-bert's encoder depth


def _export_and_load(tmp_path, targets):
    """Export a random expert over `targets` and load it with real PEFT; (target_modules, LoRA-wrapped paths)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    adapted = AdaptedModel(load_base_model("tiny-bert", None, 2, seed=3).model, r=4, alpha=8, targets=targets)
    gen = torch.Generator().manual_seed(0)
    expert = {k: torch.randn(shape, generator=gen) for k, shape in adapted.spec.lora_shapes().items()}
    out = export_peft_adapter(adapted, expert, tmp_path / "adapter", head=adapted.head_state())
    written = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    peft_model = PeftModel.from_pretrained(load_base_model("tiny-bert", None, 2, seed=3).model, str(out))
    inner = peft_model.base_model.model  # the HF model: PEFT's module names are its names
    wrapped = sorted(n for n, m in inner.named_modules() if isinstance(m, LoraLayer))
    return adapted, written, wrapped


def test_regex_selected_module_exports_only_that_module(tmp_path):
    adapted, written, wrapped = _export_and_load(tmp_path, r".*layer\.0\..*query")
    assert list(adapted.layers) == ["bert.encoder.layer.0.attention.self.query"]
    assert isinstance(written, str), f"a suffix list {written!r} would cover every layer's query"
    assert wrapped == ["bert.encoder.layer.0.attention.self.query"]


def test_default_targets_still_export_a_suffix_list(tmp_path):
    adapted, written, wrapped = _export_and_load(tmp_path, None)
    assert sorted(written) == ["query", "value"]
    assert wrapped == sorted(adapted.layers)
    assert len(wrapped) == 2 * LAYERS


@pytest.mark.parametrize("targets", [["bert.encoder.layer.1.attention.self.value"], r".*\.output\.dense"])
def test_subset_of_a_suffix_exports_exact_paths(tmp_path, targets):
    # a full path in a list, or a regex picking some `dense` linears (not intermediate.dense, pooler.dense)
    adapted, written, wrapped = _export_and_load(tmp_path, targets)
    assert isinstance(written, str)
    assert wrapped == sorted(adapted.layers)
