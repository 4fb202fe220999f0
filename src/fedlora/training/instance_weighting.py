"""Instance-wise mixing of two experts by the input's similarity to reference examples (FedDPA's inference).

For each example x: w(x) = max_weight * mean_i cos(h(x), h(x_i)), h = last-layer state of the last prompt
token computed with only the probe expert active; then expert `gets_w` receives w and the other 1 - w.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..adapters import AdaptedModel
from .trainer import last_prompt_hidden


@dataclass
class InstanceWeighting:
    """A batch hook (see Trainer.evaluate) that sets per-example expert weights before every forward pass."""

    adapted: AdaptedModel
    reference: torch.Tensor   # [k, hidden]: h of the reference examples
    max_weight: float
    gets_w: int = 0           # the expert that receives w (the other gets 1 - w)
    probe: int = 1            # the expert active while h(x) is computed
    seen: list[float] = field(default_factory=list)

    def _only(self, expert: int) -> None:
        self.adapted.set_expert_weights([float(e == expert) for e in range(2)])

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> None:
        self._only(self.probe)
        h = last_prompt_hidden(self.adapted.model, batch)
        reference = self.reference.to(h.device, h.dtype)
        w = self.max_weight * F.cosine_similarity(h[:, None, :], reference[None, :, :], dim=-1).mean(1)
        self.seen.extend(w.tolist())
        pair = (w, 1 - w) if self.gets_w == 0 else (1 - w, w)
        self.adapted.set_expert_weights(torch.stack(pair, dim=1))

    @classmethod
    def from_examples(cls, adapted: AdaptedModel, batch: Mapping[str, torch.Tensor], max_weight: float,
                      gets_w: int = 0, probe: int = 1) -> "InstanceWeighting":
        """Compute the reference states of a batch of examples with the probe expert active."""
        hook = cls(adapted, torch.empty(0), max_weight, gets_w, probe)
        hook._only(probe)
        hook.reference = last_prompt_hidden(adapted.model, batch)
        return hook

    def diagnostics(self) -> dict[str, float]:
        """The mean weight expert 0 received over the examples seen."""
        if not self.seen:
            return {}
        mean_w = sum(self.seen) / len(self.seen)
        return {"mean_expert0_weight": mean_w if self.gets_w == 0 else 1 - mean_w}

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able settings) for an export."""
        return {"reference": self.reference.cpu()}, {"max_weight": self.max_weight, "gets_w": self.gets_w, "probe": self.probe}

    @classmethod
    def from_state(cls, adapted: AdaptedModel, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> "InstanceWeighting":
        """Rebuild an exported hook on a model."""
        return cls(adapted, tensors["reference"], float(meta["max_weight"]), int(meta["gets_w"]), int(meta["probe"]))
