"""Interop with the standard PEFT LoRA adapter format (`adapter_config.json` + `adapter_model.safetensors`)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..core.errors import CheckpointError
from ..core.io import load_tensors, save_tensors
from ..core.tensors import StateDict
from .model import AdaptedModel, require_shapes

PREFIX = "base_model.model."


def _base_module_names(adapted: AdaptedModel) -> list[str]:
    """Module names of the base model as PEFT sees them: ours, less the insides of each injected layer."""
    inside = tuple(f"{path}." for path in adapted.layers)
    return [n for n, _ in adapted.model.named_modules() if n and not n.startswith(inside)]


def _target_modules(adapted: AdaptedModel, paths: list[str]) -> list[str] | str:
    """PEFT `target_modules` selecting exactly `paths`: suffixes where they cover nothing else, else a regex."""
    suffixes = sorted({p.rsplit(".", 1)[-1] for p in paths})
    # PEFT takes a list entry t to mean every module named t or ending in ".t", of whatever type
    covered = {n for n in _base_module_names(adapted) if n.rsplit(".", 1)[-1] in suffixes}
    if covered == set(paths):
        return suffixes
    # a string is matched with re.fullmatch; the anchors keep it exact for tools that use re.match or re.search
    return "^(?:" + "|".join(map(re.escape, paths)) + ")$"


def fold_fixed_mixture(experts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], r: int,
                       alpha: float) -> tuple[StateDict, int, float]:
    """One LoRA equal to a fixed weighted sum of rank-r LoRAs: (state, rank, alpha) for PEFT.

    s * sum_e w_e B_e A_e = s * [B_1 .. B_E] [w_1 A_1; ..; w_E A_E], so A's rows (scaled by w_e) and B's columns
    are concatenated to rank E*r; alpha grows with the rank so that PEFT's scaling alpha/rank stays s = alpha/r.
    Experts of weight 0 add nothing and are left out (at least one is kept, so the state is never empty).
    """
    kept = [(e, float(w)) for e, w in enumerate(weights) if float(w) != 0.0] or [(0, 0.0)]
    out: StateDict = {}
    for key in experts[0]:
        if key.endswith(".lora_A"):
            out[key] = torch.cat([experts[e][key].float() * w for e, w in kept], dim=0)
        else:
            out[key] = torch.cat([experts[e][key].float() for e, _ in kept], dim=1)
    rank = r * len(kept)
    return out, rank, alpha * rank / r


def export_peft_adapter(adapted: AdaptedModel, expert: Mapping[str, torch.Tensor], out_dir: str | Path,
                        head: Mapping[str, torch.Tensor] | None = None, base_model: str | None = None,
                        task_type: str | None = None, dropout: float = 0.0, r: int | None = None,
                        alpha: float | None = None) -> Path:
    """Write one expert (and optionally the private head, as `modules_to_save`) as a PEFT LoRA adapter directory;
    `r` and `alpha` default to the model's (a folded mixture has its own)."""
    from peft import LoraConfig

    paths = [p for p, _, _ in adapted.spec.modules]
    if task_type is None:
        task_type = "SEQ_CLS" if adapted.head_names else "CAUSAL_LM"
    head_modules = sorted({n.rsplit(".", 1)[0] for n in (head or {})})
    config = LoraConfig(r=r or adapted.rank, lora_alpha=adapted.spec.alpha if alpha is None else alpha,
                        lora_dropout=dropout,
                        target_modules=_target_modules(adapted, paths), task_type=task_type,
                        modules_to_save=head_modules or None, base_model_name_or_path=base_model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    tensors: StateDict = {}
    for path in paths:
        tensors[f"{PREFIX}{path}.lora_A.weight"] = expert[f"{path}.lora_A"].contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = expert[f"{path}.lora_B"].contiguous()
    # PEFT saves a modules_to_save copy under the wrapped module's own name (no `modules_to_save.default.`)
    for name, value in (head or {}).items():
        tensors[f"{PREFIX}{name}"] = value.contiguous()
    save_tensors(out / "adapter_model.safetensors", tensors, metadata={"format": "pt"})  # atomic, 0644 like the rest
    return out


def import_peft_adapter(adapted: AdaptedModel, adapter_dir: str | Path) -> tuple[StateDict, StateDict]:
    """Read a PEFT LoRA adapter directory into (expert state, head state) that fit `adapted`."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{adapter_dir} holds a {cfg.get('peft_type')} adapter; only LoRA can seed an expert")
    if int(cfg["r"]) != adapted.rank or float(cfg["lora_alpha"]) != adapted.spec.alpha or cfg.get("use_rslora"):
        raise CheckpointError(f"adapter r={cfg['r']}, alpha={cfg['lora_alpha']} differs from the model's "
                              f"r={adapted.rank}, alpha={adapted.spec.alpha}; set lora.r and lora.alpha to match")
    raw = load_tensors(adapter_dir / "adapter_model.safetensors")
    expert: StateDict = {}
    head: StateDict = {}
    for key, value in raw.items():
        name = key.removeprefix(PREFIX)
        match = re.fullmatch(r"(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", name)
        if match:
            expert[f"{match.group(1)}.{match.group(2)}"] = value.float()
        elif name in adapted.head_names:
            head[name] = value
    require_shapes(expert, adapted.spec.lora_shapes(adapted.rank), f"PEFT adapter {adapter_dir}")
    return expert, head
