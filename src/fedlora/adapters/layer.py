"""`MixtureLoRALinear`: a frozen linear-like layer plus E LoRA experts mixed by a router.

    y = W0 x + s * sum_e w_e(x) * B_e A_e drop(x),   s = alpha / r

Router kinds decide w(x):
  none            fixed weights per expert ([E], or [batch, E] for instance-wise weights); plain LoRA is E=1, w=1
  dense           softmax(G x), G: [E, d_in], per token (FedALT's mixer)
  adaptive_top_m  softmax over 2M-1 slots, top-M kept and renormalised; slots 0..M-1 are experts 0..M-1,
                  slots M..2M-2 all map to the client's own expert (FedLEASE), so the own expert is always used
Routers read the un-dropped input, as both official codes do. Experts are separate parameters
(`lora_A.0`, `lora_B.0`, ...) so trainability can be set per expert; the forward concatenates them
so that all experts run in two matmuls.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

RouterKind = Literal["none", "dense", "adaptive_top_m"]


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module (nn.Linear, bitsandbytes Linear8bitLt/4bit, ...)."""
    try:
        return int(base.in_features), int(base.out_features)
    except AttributeError:
        raise TypeError(f"{type(base).__name__} is not a linear-like layer (no in_features/out_features)") from None


def router_outputs(kind: RouterKind, n_experts: int) -> int:
    """Number of router logits for a kind: 0, E or 2E-1."""
    return {"none": 0, "dense": n_experts, "adaptive_top_m": 2 * n_experts - 1}[kind]


class MixtureLoRALinear(nn.Module):
    """A frozen base layer with a mixture of LoRA experts (see the module docstring for the equation)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 n_experts: int = 1, router: RouterKind = "none") -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = linear_dims(base)
        self.alpha = float(alpha)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.set_layout(n_experts, router, r)

    @property
    def dropout_p(self) -> float:
        """The LoRA dropout probability."""
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    @property
    def n_experts(self) -> int:
        """Number of LoRA experts E."""
        return len(self.lora_A)

    def set_layout(self, n_experts: int, router: RouterKind, r: int | None = None) -> None:
        """(Re)create E experts of rank r (A kaiming-uniform, B zero) and the router; weights reset to 1 per expert."""
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        if r is not None:
            self.r = int(r)
            self.scaling = self.alpha / self.r
        ref = next(iter(self.base.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        # fp32 master copies under a half-precision or quantized base, as PEFT's autocast_adapter_dtype
        dtype = ref.dtype if ref is not None and ref.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.ParameterList(
            nn.Parameter(nn.init.kaiming_uniform_(torch.empty(self.r, self.in_features, device=device, dtype=dtype), a=math.sqrt(5)))
            for _ in range(n_experts))
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(self.out_features, self.r, device=device, dtype=dtype)) for _ in range(n_experts))
        self.router_kind: RouterKind = router
        n_out = router_outputs(router, n_experts)
        self.router = nn.Linear(self.in_features, n_out, bias=False, device=device, dtype=dtype) if n_out else None
        self.register_buffer("expert_weights", torch.ones(n_experts, device=device, dtype=dtype), persistent=False)
        self.set_own_expert(0)

    def set_own_expert(self, j: int) -> None:
        """Point the adaptive top-M router's extra slots at expert j (the client's own expert)."""
        if not 0 <= j < self.n_experts:
            raise ValueError(f"own expert {j} out of range for {self.n_experts} experts")
        self.own_expert = j
        m = self.n_experts
        self.register_buffer("slot_to_expert", torch.tensor(list(range(m)) + [j] * (m - 1), device=self.lora_A[0].device),
                             persistent=False)

    def mixing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """w(x) broadcastable to [..., E]: fixed weights, a dense softmax, or the adaptive top-M weights."""
        if self.router is None:
            w = self.expert_weights
            if w.dim() == 2 and x.dim() == 3:  # instance-wise weights [batch, E] over [batch, seq, d]
                w = w[:, None, :]
            return w
        # the router is an fp32 master copy; under a bf16 base without autocast x is bf16
        probs = torch.softmax(self.router(x.to(self.router.weight.dtype)).float(), dim=-1)
        if self.router_kind == "dense":
            return probs.to(x.dtype)
        top_p, top_slot = probs.topk(self.n_experts, dim=-1)
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        weights = torch.zeros(*probs.shape[:-1], self.n_experts, device=x.device, dtype=probs.dtype)
        return weights.scatter_add(-1, self.slot_to_expert[top_slot], top_p).to(x.dtype)

    @property
    def is_plain(self) -> bool:
        """One expert at a fixed weight and no router: PEFT's plain LoRA (its weight only scales it)."""
        return self.n_experts == 1 and self.router is None and self.expert_weights.dim() == 1

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s * sum_e w_e(x) B_e A_e drop(x), without the base output."""
        h = self.dropout(x).to(self.lora_A[0].dtype)
        if self.is_plain:
            # plain LoRA, the same two matmuls as PEFT's layer
            return F.linear(F.linear(h, self.lora_A[0]), self.lora_B[0]) * (self.scaling * self.expert_weights[0])
        e, r = self.n_experts, self.r
        z = F.linear(h, torch.cat(tuple(self.lora_A), dim=0))                 # [..., E*r]
        z = (z.unflatten(-1, (e, r)) * self.mixing_weights(x).unsqueeze(-1)).flatten(-2)
        return F.linear(z, torch.cat(tuple(self.lora_B), dim=1)) * self.scaling

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus the LoRA mixture."""
        out = self.base(x, *args, **kwargs)
        return out + self.lora_delta(x).to(out.dtype)

    def extra_repr(self) -> str:
        """Sizes, rank, alpha, experts and router kind, shown in the module's repr."""
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"experts={self.n_experts}, router={self.router_kind}")
