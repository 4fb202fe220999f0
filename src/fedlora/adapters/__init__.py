"""The adapter layer: MixtureLoRALinear, injection into HF models, adapter state, PEFT import/export."""

from .layer import MixtureLoRALinear, RouterKind
from .model import AdaptedModel, AdapterSpec, Layout, lora_part

__all__ = ["AdaptedModel", "AdapterSpec", "Layout", "lora_part", "MixtureLoRALinear", "RouterKind"]
