"""MixtureLoRALinear against the equations of spec sections 2.2 and 3.2, on hand-set tensors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from fedlora.adapters import MixtureLoRALinear

D_IN, D_OUT, R = 6, 5, 2


def make_layer(n_experts: int, router: str, seed: int = 0) -> MixtureLoRALinear:
    torch.manual_seed(seed)
    layer = MixtureLoRALinear(nn.Linear(D_IN, D_OUT), r=R, alpha=6.0, dropout=0.0, n_experts=n_experts, router=router)
    with torch.no_grad():
        for e in range(n_experts):
            layer.lora_A[e].copy_(torch.randn(R, D_IN))
            layer.lora_B[e].copy_(torch.randn(D_OUT, R))
    return layer


def delta(layer: MixtureLoRALinear, e: int, x: torch.Tensor) -> torch.Tensor:
    return layer.scaling * x @ layer.lora_A[e].T @ layer.lora_B[e].T


def test_plain_lora_matches_formula():
    layer = make_layer(1, "none")
    x = torch.randn(3, 4, D_IN)
    expected = layer.base(x) + 3.0 * x @ layer.lora_A[0].T @ layer.lora_B[0].T  # s = 6 / 2
    torch.testing.assert_close(layer(x), expected)


def test_fixed_weights_global_and_instance_wise():
    layer = make_layer(2, "none")
    x = torch.randn(3, 4, D_IN)
    layer.expert_weights = torch.tensor([0.25, 0.75])
    expected = layer.base(x) + 0.25 * delta(layer, 0, x) + 0.75 * delta(layer, 1, x)
    torch.testing.assert_close(layer(x), expected)
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 2.0]])  # one weight pair per example
    layer.expert_weights = w
    expected = layer.base(x) + w[:, 0, None, None] * delta(layer, 0, x) + w[:, 1, None, None] * delta(layer, 1, x)
    torch.testing.assert_close(layer(x), expected)


def test_dense_gate_is_per_token_softmax_of_undropped_input():
    layer = make_layer(2, "dense")
    layer.dropout = nn.Dropout(0.5)  # the gate must read x, not drop(x)
    layer.eval()
    x = torch.randn(2, 5, D_IN)
    g = torch.softmax(x @ layer.router.weight.T, dim=-1)
    expected = layer.base(x) + g[..., 0:1] * delta(layer, 0, x) + g[..., 1:2] * delta(layer, 1, x)
    torch.testing.assert_close(layer(x), expected)


def reference_top_m(layer: MixtureLoRALinear, x: torch.Tensor, own: int) -> torch.Tensor:
    """Spec 3.2 written token by token: top-M of 2M-1 slots, renormalised, extra slots -> own expert."""
    m = layer.n_experts
    slot_map = list(range(m)) + [own] * (m - 1)
    out = layer.base(x).clone()
    for idx in itertools.product(*(range(s) for s in x.shape[:-1])):
        xt = x[idx]
        probs = torch.softmax(layer.router.weight @ xt, dim=-1)
        top = torch.topk(probs, m).indices.tolist()
        total = sum(probs[p] for p in top)
        for p in top:
            e = slot_map[p]
            out[idx] += probs[p] / total * layer.scaling * (layer.lora_B[e] @ (layer.lora_A[e] @ xt))
    return out


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("own", [0, 1])
def test_adaptive_top_m_matches_reference_and_always_uses_own_expert(m, own):
    layer = make_layer(m, "adaptive_top_m", seed=m)
    with torch.no_grad():
        layer.router.weight.copy_(3 * torch.randn(2 * m - 1, D_IN))  # sharp, varied routing
    layer.set_own_expert(own)
    x = torch.randn(4, 7, D_IN)
    torch.testing.assert_close(layer(x), reference_top_m(layer, x, own), atol=1e-5, rtol=1e-5)
    w = layer.mixing_weights(x)
    assert w.shape == (4, 7, m)
    assert bool((w[..., own] > 0).all()), "the own expert must be selected for every token"
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 7))
    used = (w > 0).sum(-1)
    assert int(used.min()) >= 1 and int(used.max()) <= m


def test_gradients_reach_exactly_the_trainable_tensors():
    layer = make_layer(3, "adaptive_top_m")
    for e in range(3):
        layer.lora_A[e].requires_grad_(e == 1)
        layer.lora_B[e].requires_grad_(e == 1)
    layer.router.weight.requires_grad_(True)
    layer.set_own_expert(1)
    layer(torch.randn(2, 3, D_IN)).pow(2).sum().backward()
    got = {n for n, p in layer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {"lora_A.1", "lora_B.1", "router.weight"}


def test_set_layout_resets_experts_and_router_shapes():
    layer = make_layer(1, "none")
    layer.set_layout(4, "adaptive_top_m")
    assert layer.n_experts == 4 and layer.router.weight.shape == (7, D_IN)
    assert all(float(b.detach().abs().sum()) == 0 for b in layer.lora_B)  # B starts at zero: no change to the output
    x = torch.randn(2, D_IN)
    torch.testing.assert_close(layer(x), layer.base(x))
