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
from fedlora.engines.session import build_session, check_run

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
        check_run(cfg)


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


# -- config paths that only a GPU machine takes, with the GPU faked ------------------------------------------
def test_bf16_on_a_gpu_without_it_is_a_clear_error(monkeypatch):
    from fedlora.core.devices import check_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(ConfigError, match=r"Tesla T4 has no bfloat16 support; use 'fp16'"):
        check_precision("bf16", torch.device("cuda"))
    check_precision("bf16", torch.device("cpu"))  # the CPU's autocast has bf16


def test_peak_device_memory_goes_into_every_rounds_record(tmp_path, monkeypatch):
    from fedlora.engines import loop

    monkeypatch.setattr(loop, "peak_cuda_memory", lambda: 123_456_789)
    result = run_experiment(tiny_config(tmp_path))
    assert [r["peak_device_memory"] for r in result.rounds if r.get("round", 0) > 0] == [123_456_789] * 2


def test_client_gpus_is_each_simulated_clientapps_gpu_share(tmp_path, monkeypatch):
    import flwr.simulation

    from fedlora.flower.simulation import run_flower_simulation

    seen = {}

    def fake_simulation(**kwargs):
        seen.update(kwargs["backend_config"])
        raise KeyboardInterrupt  # stop before anything runs

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_simulation)
    cfg = build_config(tiny_config(tmp_path, engine={"name": "flower-sim", "client_gpus": 0.25}))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="client_gpus=0.25, but torch sees no CUDA device"):
        run_flower_simulation(cfg, tmp_path / "run")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(KeyboardInterrupt):
        run_flower_simulation(cfg, tmp_path / "run")
    assert seen["client_resources"]["num_gpus"] == 0.25 and seen["init_args"]["num_gpus"] == 2


def test_a_hub_revision_picks_its_own_snapshot(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = _hub_cache(tmp_path, "acme/tiny-bert")
    root = tmp_path / "hub" / "models--acme--tiny-bert"
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    base = load_base_model("tiny-bert", None, 2, seed=0)
    base.model.config.fedlora_marker = "v1"
    base.model.save_pretrained(root / "snapshots" / commit)
    base.tokenizer.save_pretrained(root / "snapshots" / commit)
    (root / "refs" / "v1").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
    from fedlora.adapters.base_models import LoadOptions

    assert getattr(load_base_model("acme/tiny-bert", "classification", 2).model.config, "fedlora_marker", None) is None
    tagged = load_base_model("acme/tiny-bert", "classification", 2, options=LoadOptions(revision="v1"))
    assert tagged.model.config.fedlora_marker == "v1"
    with pytest.raises(ConfigError, match=r"hf download acme/tiny-bert --revision v2"):
        load_base_model("acme/tiny-bert", "classification", 2, options=LoadOptions(revision="v2"))


# -- MixtureLoRALinear on a quantized base: the quantized output plus exactly the mixture -------------------
def _reference_delta(layer, x: torch.Tensor) -> torch.Tensor:
    """The module docstring's equation, written out independently of the layer's batched implementation."""
    experts = [(a.float(), b.float()) for a, b in zip(layer.lora_A, layer.lora_B)]
    per_expert = torch.stack([x @ a.T @ b.T for a, b in experts], dim=-2)  # [..., E, d_out]
    if layer.router is None:
        w = layer.expert_weights.float().expand(*x.shape[:-1], -1)
    else:
        probs = torch.softmax(x @ layer.router.weight.float().T, dim=-1)
        if layer.router_kind == "dense":
            w = probs
        else:  # top-M of 2M-1 slots, renormalised; slots >= M are the own expert's
            m = layer.n_experts
            slot_expert = list(range(m)) + [layer.own_expert] * (m - 1)
            top_p, top_i = probs.topk(m, dim=-1)
            top_p = top_p / top_p.sum(-1, keepdim=True)
            w = torch.zeros(*x.shape[:-1], m)
            flat_i, flat_p, flat_w = top_i.reshape(-1, m), top_p.reshape(-1, m), w.view(-1, m)
            for row in range(flat_i.shape[0]):
                for k in range(m):
                    flat_w[row, slot_expert[int(flat_i[row, k])]] += flat_p[row, k]
    return layer.scaling * (w.unsqueeze(-1) * per_expert).sum(-2)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install 'fedlora[quantization]')")
@pytest.mark.parametrize("bits,quant_type,double_quant", [("4bit", "nf4", True), ("4bit", "fp4", False),
                                                          ("8bit", None, None)])
def test_mixture_lora_on_a_quantized_base_adds_exactly_the_mixture(tmp_path, bits, quant_type, double_quant):
    from fedlora.adapters.base_models import LoadOptions

    options = LoadOptions(quantization=bits, **({"quant_type": quant_type, "double_quant": double_quant}
                                                if bits == "4bit" else {}))
    base = load_base_model(_saved_tiny(tmp_path), "classification", 2, options=options)
    adapted = AdaptedModel(base.model, r=4, alpha=8)
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64)
    for layout in (Layout(1, "none"), Layout(2, "dense"), Layout(3, "adaptive_top_m")):
        adapted.set_layout(layout)
        layer = next(iter(adapted.layers.values()))
        if layout.router == "adaptive_top_m":
            adapted.set_own_expert(2)
        with torch.no_grad():
            for b in layer.lora_B:
                b.normal_(0, 0.5)
        if bits == "4bit":  # the quantized weights are what runs, not a float copy
            import bitsandbytes.functional as bnbf

            weight = bnbf.dequantize_4bit(layer.base.weight.data, layer.base.weight.quant_state).float()
            plain = torch.nn.functional.linear(x, weight, layer.base.bias)
            assert torch.allclose(layer.base(x).float(), plain, atol=1e-4), layout
        out = layer(x)
        assert torch.allclose(out - layer.base(x), _reference_delta(layer, x), atol=1e-5), layout
        out.float().pow(2).sum().backward()
        assert all(p.grad is not None for p in layer.lora_B) and layer.base.weight.grad is None, layout


def test_a_head_of_another_label_count_is_replaced_whatever_the_loader_did():
    """transformers 5.17 kept a 2-label checkpoint head when loading 4-bit (a device-side assert on the H100)."""
    from fedlora.adapters.base_models import fit_head, tiny_model

    model = tiny_model("tiny-bert", num_labels=2, vocab_size=64, seed=0).to(torch.bfloat16)
    encoder = model.bert.encoder.layer[0].attention.self.query
    fit_head(model, "classification", 7)
    assert model.classifier.out_features == 7 and model.config.num_labels == 7
    assert model.classifier.weight.dtype == torch.bfloat16 and model.bert.encoder.layer[0].attention.self.query is encoder
    head = model.classifier
    fit_head(model, "classification", 7)  # the right size already: left as it is
    assert model.classifier is head
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 7)
