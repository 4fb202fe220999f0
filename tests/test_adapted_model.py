"""AdaptedModel: injection, state keys, trainability, and PEFT import/export."""

from __future__ import annotations

import pytest
import torch

from fedlora.adapters import AdaptedModel, Layout
from fedlora.adapters.base_models import load_base_model
from fedlora.adapters.peft_io import export_peft_adapter, import_peft_adapter
from fedlora.core.errors import CheckpointError, ConfigError
from fedlora.core.seeding import generator

PATHS = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]


def test_injection_finds_query_and_value_by_default(tiny_adapted):
    adapted, _ = tiny_adapted
    assert list(adapted.layers) == PATHS
    assert adapted.head_names == ["classifier.weight", "classifier.bias"]
    assert set(adapted.spec.lora_shapes()) == {f"{p}.lora_{m}" for p in PATHS for m in "AB"}


def test_injection_by_regex_and_clear_error_when_nothing_matches():
    base = load_base_model("tiny-bert", None, 2)
    adapted = AdaptedModel(base.model, 2, 4, targets=r".*layer\.1\.attention\.self\.(query|key)")
    assert list(adapted.layers) == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key"]
    with pytest.raises(ConfigError, match="no module of the model matches"):
        AdaptedModel(load_base_model("tiny-bert", None, 2).model, 2, 4, targets=["q_proj"])


def test_expert_states_move_between_slots_and_shapes_are_checked(tiny_adapted):
    adapted, _ = tiny_adapted
    adapted.set_layout(Layout(2, "dense"))
    lora = adapted.spec.init_lora(generator(0, "x"))
    lora = {k: v + 1 for k, v in lora.items()}
    adapted.load_expert(1, lora)
    assert all(torch.equal(adapted.expert_state(1)[k], lora[k]) for k in lora)
    assert not torch.equal(adapted.expert_state(0)[f"{PATHS[0]}.lora_B"], lora[f"{PATHS[0]}.lora_B"])
    bad = dict(lora)
    bad[f"{PATHS[0]}.lora_A"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="shape"):
        adapted.load_expert(0, bad)
    with pytest.raises(CheckpointError, match="missing keys"):
        adapted.load_expert(0, {k: v for k, v in lora.items() if "layer.0" not in k})
    keys = {n for n, _ in adapted.model.named_parameters()}
    assert f"{PATHS[0]}.lora_A.1" in keys and f"{PATHS[0]}.router.weight" in keys


def test_set_trainable_is_exact(tiny_adapted):
    adapted, _ = tiny_adapted
    adapted.set_layout(Layout(3, "adaptive_top_m"))
    adapted.set_trainable(experts=[2], router=True, head=True)
    expected = ({f"{p}.lora_{m}.2" for p in PATHS for m in "AB"} | {f"{p}.router.weight" for p in PATHS}
                | {"classifier.weight", "classifier.bias"})
    assert adapted.trainable_names() == expected
    adapted.set_trainable()
    assert adapted.trainable_names() == set()


def test_init_head_is_seeded_and_leaves_the_model_unchanged(tiny_adapted):
    adapted, _ = tiny_adapted
    before = adapted.head_state()
    a, b, other = adapted.init_head(1), adapted.init_head(1), adapted.init_head(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], other["classifier.weight"])
    assert all(torch.equal(before[k], v) for k, v in adapted.head_state().items())


def _random_expert(adapted: AdaptedModel, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.3 for k, shape in adapted.spec.lora_shapes().items()}


def test_exported_expert_loads_in_peft_with_identical_logits(tmp_path):
    from peft import PeftModel

    base = load_base_model("tiny-bert", None, 3, seed=7)
    adapted = AdaptedModel(base.model, r=4, alpha=8)
    expert = _random_expert(adapted, 1)
    head = {k: v + 0.5 for k, v in adapted.head_state().items()}
    adapted.load_expert(0, expert)
    adapted.load_head(head)
    export_peft_adapter(adapted, expert, tmp_path / "adapter", head=head)
    ids = base.tokenizer(["a tiny test sentence", "another one"], padding=True, return_tensors="pt")
    adapted.model.eval()
    ours = adapted.model(**ids).logits
    fresh = load_base_model("tiny-bert", None, 3, seed=7).model  # same random base weights
    peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(peft_model(**ids).logits, ours, atol=1e-5, rtol=1e-5)


def test_peft_adapter_seeds_an_expert(tmp_path):
    base = load_base_model("tiny-bert", None, 3, seed=7)
    adapted = AdaptedModel(base.model, r=4, alpha=8)
    expert = _random_expert(adapted, 2)
    export_peft_adapter(adapted, expert, tmp_path / "a")
    loaded, head = import_peft_adapter(adapted, tmp_path / "a")
    assert head == {}
    assert all(torch.equal(loaded[k], expert[k]) for k in expert)
    other = AdaptedModel(load_base_model("tiny-bert", None, 3).model, r=2, alpha=8)
    with pytest.raises(CheckpointError, match="r=4"):
        import_peft_adapter(other, tmp_path / "a")
