"""Devices, precision, gradient checkpointing, Hub models and quantized bases (the CPU side of GPU support)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from fedlora.adapters import AdaptedModel, Layout
from fedlora.adapters.base_models import load_base_model
from fedlora.api import run_experiment
from fedlora.core.config import build_config
from fedlora.core.errors import ConfigError
from fedlora.engines.session import build_session

from .conftest import tiny_config

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _train_loss(result) -> float:
    return sum(f["train_loss"] for f in result.rounds[-1]["fit"].values()) / len(result.rounds[-1]["fit"])


def test_explicit_cpu_device_runs_and_states_stay_on_the_cpu(tmp_path):
    result = run_experiment(tiny_config(tmp_path, model={"name": "tiny-bert", "device": "cpu"},
                                        algorithm={"name": "fedalt"}))
    states = [t for s in result.client_states.values() for d in s.states.values() for t in d.values()]
    assert states and all(t.device.type == "cpu" for t in states)


def test_bf16_autocast_on_cpu_trains_close_to_fp32(tmp_path):
    fp32 = run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "fp32")))
    bf16 = run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "bf16"), training={
        **tiny_config(tmp_path)["training"], "precision": "bf16"}))
    a, b = _train_loss(fp32), _train_loss(bf16)
    assert math.isfinite(b) and abs(a - b) / a < 0.05  # bf16 keeps ~3 significant digits per matmul
    lora = next(iter(bf16.client_states.values())).states  # trainable state stays fp32 (master copies)
    assert all(t.dtype == torch.float32 for d in lora.values() for t in d.values())


@pytest.mark.parametrize("method", ["fedalt", "fedlease"])
def test_routed_methods_run_on_a_bf16_base(tmp_path, method):
    cfg = tiny_config(tmp_path, model={"name": "tiny-bert", "dtype": "bfloat16"},
                      algorithm={"name": method, "options": {"warmup_rounds": 1} if method == "fedlease" else {}})
    result = run_experiment(cfg)  # the gate reads bf16 activations with an fp32 router (no autocast)
    assert all(math.isfinite(m["loss"]) for m in result.final.values()) and not result.rounds[-1].get("eval_failures")


def test_the_head_is_an_fp32_master_copy_on_a_bf16_base(tmp_path):
    """As the LoRA experts: a bf16 head would round every AdamW update of a small weight away."""
    base = load_base_model("tiny-bert", None, 3, seed=0, dtype="bfloat16")
    assert base.model.classifier.weight.dtype == torch.bfloat16
    adapted = AdaptedModel(base.model, r=4, alpha=8)
    assert {t.dtype for t in adapted.head_state().values()} == {torch.float32}
    assert next(iter(adapted.layers.values())).base.weight.dtype == torch.bfloat16  # the frozen base stays bf16
    batch = base.tokenizer(["a short one", "and a longer second text"], padding=True, return_tensors="pt")
    logits = adapted.model(**batch).logits  # no autocast: the bf16 pooled output is fed to the fp32 head
    assert logits.dtype == torch.float32
    twin = adapted.replica()  # each client's own head is fp32 too
    assert twin.model.classifier.weight.dtype == torch.float32 and twin.model(**batch).logits.dtype == torch.float32
    result = run_experiment(tiny_config(tmp_path, model={"name": "tiny-bert", "dtype": "bfloat16"}))
    heads = [s.states["_head"] for s in result.client_states.values()]
    assert heads and all(t.dtype == torch.float32 for h in heads for t in h.values())


def _grads(adapted: AdaptedModel, batch: dict, checkpointing: bool) -> dict[str, torch.Tensor]:
    model = adapted.model
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks: checkpointing's recompute restores the RNG state
    model(**batch).logits.float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("layout,train", [(Layout(1, "none"), dict(experts=[0])),
                                          (Layout(2, "dense"), dict(experts=[1], router=True)),
                                          (Layout(3, "adaptive_top_m"), dict(experts=[2], router=True))])
def test_gradient_checkpointing_gives_the_same_gradients(layout, train):
    base = load_base_model("tiny-bert", None, 3, seed=0)
    adapted = AdaptedModel(base.model, r=4, alpha=8, dropout=0.1)  # dropout on: the masks must be recomputed alike
    adapted.set_layout(layout)
    with torch.no_grad():
        for layer in adapted.layers.values():
            for b in layer.lora_B:
                b.normal_(0, 0.1)
    adapted.set_trainable(**train, head=True)
    batch = base.tokenizer(["a short one", "and a somewhat longer second text"], padding=True, return_tensors="pt")
    plain, checkpointed = _grads(adapted, dict(batch), False), _grads(adapted, dict(batch), True)
    assert set(plain) == set(checkpointed) and plain
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-5, rtol=1e-4), name


def test_a_run_with_gradient_checkpointing_equals_one_without(tmp_path):
    runs = [run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / str(gc)), algorithm={"name": "fedlease",
                           "options": {"warmup_rounds": 1}}, training={**tiny_config(tmp_path)["training"],
                           "gradient_checkpointing": gc})) for gc in (False, True)]
    for cid, metrics in runs[0].final.items():
        assert runs[1].final[cid]["loss"] == pytest.approx(metrics["loss"], rel=1e-4)


def _hub_cache(tmp_path, repo: str) -> str:
    """A Hugging Face cache holding `repo` (a tiny BERT), laid out as hf download leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    base = load_base_model("tiny-bert", None, 2, seed=0)
    base.model.save_pretrained(snapshot)
    base.tokenizer.save_pretrained(snapshot)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return str(tmp_path / "hub")


def test_a_hub_id_resolves_from_the_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", _hub_cache(tmp_path, "acme/tiny-bert"))
    base = load_base_model("acme/tiny-bert", "classification", 3)
    assert base.model.config.num_labels == 3 and base.model.config.model_type == "bert"
    adapted = AdaptedModel(base.model, r=4, alpha=8)
    assert sorted({p.rsplit(".", 1)[-1] for p in adapted.layers}) == ["query", "value"]  # PEFT's mapping for bert
    with pytest.raises(ConfigError, match=r"acme/not-cached.*hf download acme/not-cached"):
        load_base_model("acme/not-cached", "classification", 3)


def test_bad_devices_and_precisions_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="model.device"):
        build_config(tiny_config(tmp_path, model={"name": "tiny-bert", "device": "gpu"}))
    cfg = tiny_config(tmp_path)
    cfg["training"] = {**cfg["training"], "precision": "fp16"}
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        build_session(build_config({**cfg, "model": {"name": "tiny-bert", "device": "cpu"}}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        build_session(build_config(tiny_config(tmp_path, model={"name": "tiny-bert", "device": "cuda"})))


def test_flora_refuses_a_quantized_base_before_anything_loads(tmp_path):
    cfg = build_config(tiny_config(tmp_path, model={"name": "tiny-bert", "quantization": "4bit"},
                                   algorithm={"name": "flora"}))
    with pytest.raises(ConfigError, match="merges each client's update"):
        build_session(cfg)


def test_quantization_without_bitsandbytes_names_the_extra(tmp_path, monkeypatch):
    import importlib.util as iu

    saved = tmp_path / "bert"
    load_base_model("tiny-bert", None, 2).model.save_pretrained(saved)
    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    cfg = build_config(tiny_config(tmp_path, model={"name": str(saved), "quantization": "4bit"}))
    with pytest.raises(ConfigError, match=r"fedlora\[quantization\]"):
        build_session(cfg)


def _saved_tiny(tmp_path):
    """A tiny BERT whose linears bitsandbytes can pack on the CPU (in_features a multiple of its 64-block)."""
    from transformers import BertConfig, BertForSequenceClassification

    from fedlora.adapters.base_models import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=128, max_position_embeddings=64,
                                             num_labels=2, pad_token_id=0)).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    return str(tmp_path / "bert")


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install 'fedlora[quantization]')")
@pytest.mark.parametrize("bits,method", [("4bit", "fedit"), ("4bit", "fedlease"), ("8bit", "fedalt")])
def test_a_quantized_base_trains_every_router_kind_on_the_cpu(tmp_path, bits, method):
    import bitsandbytes as bnb

    cfg = tiny_config(tmp_path, model={"name": _saved_tiny(tmp_path), "quantization": bits, "device": "cpu"},
                      algorithm={"name": method, "options": {"warmup_rounds": 1} if method == "fedlease" else {}})
    session = build_session(build_config(cfg))
    layer = next(iter(session.adapted.layers.values()))
    assert isinstance(layer.base, bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt)
    assert layer.lora_A[0].dtype == torch.float32
    result = run_experiment(cfg)
    assert all(math.isfinite(f["train_loss"]) for f in result.rounds[-1]["fit"].values())
    first, last = result.rounds[1]["fit"], result.rounds[-1]["fit"]
    assert sum(f["train_loss"] for f in last.values()) < sum(f["train_loss"] for f in first.values()) * 1.5
