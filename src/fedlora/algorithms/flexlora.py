"""FlexLoRA (Bai, Chen, Qian, Yao, Li, NeurIPS 2024): heterogeneous ranks through the mean of the full updates,
truncated by SVD to each client's rank.

Client k trains a LoRA of rank r_k (`clients.lora_r`, at most lora.r). The server forms the weighted mean of the
clients' full-size updates and keeps its best rank-R approximation (R = lora.r), all singular values in B:
    W = sum_k p_k (alpha / r_k) B_k A_k = U diag(S) V^T,     B = U_R diag(S_R) / (alpha / R),   A = V_R^T,
and a client of rank r_k takes its first r_k components (B scaled by r_k / R, HetLoRA's `resize`), which is the
rank-r_k truncation U_{r_k} S_{r_k} V_{r_k}^T of W itself. Checked against the official code (alibaba/
FederatedScope, branch FlexLoRA @1cb1ab7: `FlexLoRA` and `distribute_weight_fast`): p_k by example counts, the
same split of S; the code fixes alpha at 16 (here lora.alpha) and forms W densely, where here W stays factored
(FLoRA's stack: rank sum_k r_k) and its SVD comes from two thin QRs and the SVD of their small core: the same
U, S, V without a d_out x d_in matrix.
"""

from __future__ import annotations

import torch

from ..core.errors import ConfigError
from ..core.tensors import StateDict
from .base import Aggregation, Reply, lora_rank
from .flora import stack
from .hetlora import HetLoRAClient, HetLoRAServer


def truncated_svd(b: torch.Tensor, a: torch.Tensor, rank: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of rank `rank` with (alpha / rank) B A the best rank-`rank` approximation of b @ a, all singular
    values in B and A with orthonormal rows (zero components where b @ a has fewer)."""
    q1, r1 = torch.linalg.qr(b.double())    # b = q1 r1
    q2, r2 = torch.linalg.qr(a.double().T)  # a = r2^T q2^T
    u, s, vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    keep = min(rank, s.numel())
    new_b = torch.zeros(b.shape[0], rank, dtype=torch.float64)
    new_a = torch.zeros(rank, a.shape[1], dtype=torch.float64)
    new_b[:, :keep] = (q1 @ u[:, :keep]) * s[:keep] / (alpha / rank)
    new_a[:keep] = vh[:keep] @ q2.T
    return new_b.to(b.dtype), new_a.to(a.dtype)


class FlexLoRAServer(HetLoRAServer):
    """The global LoRA at rank lora.r: the SVD truncation of the weighted mean of the clients' full updates."""

    secure_refusal = "its server truncates the stacked clients' LoRAs by SVD, so it needs every single one"
    dp_refusals = {"client_clipping": "the server's SVD of the mean of the clients' products has no sensitivity "
                                      "the clip norm bounds; use privacy.dp='local'"}

    def __init__(self, options, spec, seed: int, aggregation: Aggregation = Aggregation()) -> None:
        if aggregation.rule != "mean":  # the SVD truncates the mean of the products, kept factored
            raise ConfigError(f"flexlora truncates the mean of the clients' updates and cannot take "
                              f"federation.aggregation={aggregation.rule!r}; use 'mean' (and federation.update_clip "
                              "against outliers)")
        super().__init__(options, spec, seed, aggregation)

    def aggregate(self, rnd: int, replies: dict[str, Reply]) -> None:
        """Record the replies' ranks; the global LoRA becomes the rank-lora.r SVD truncation of their mean update."""
        if not replies:
            return
        loras = {cid: r.states["global"] for cid, r in replies.items()}
        self.ranks.update({cid: lora_rank(lora) for cid, lora in loras.items()})
        stacked = stack(list(loras.values()), [self.weight(cid) for cid in loras], self.spec.alpha)
        out: StateDict = {}
        for key in [k for k in stacked if k.endswith(".lora_A")]:
            path = key.removesuffix(".lora_A")
            out[f"{path}.lora_B"], out[key] = truncated_svd(stacked[f"{path}.lora_B"], stacked[key], self.spec.r,
                                                            self.spec.alpha)
        self.global_state = out


class FlexLoRAClient(HetLoRAClient):
    """Train the first r_k components of the global LoRA (its rank-r_k truncation) and send them."""
