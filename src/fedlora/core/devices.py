"""Devices and precisions (`model.device`, `training.precision`): what the machine offers, checked before a run."""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch

from .errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The torch device for `model.device`: auto is CUDA when present (else the CPU); an absent device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device={name!r}, but this machine has no CUDA device torch can use "
                              f"(torch {torch.__version__}); set model.device='cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"model.device={name!r}, but only {torch.cuda.device_count()} CUDA device(s) exist "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"model.device={name!r}, but the MPS backend is not available here; set model.device='cpu'")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a training precision the device cannot run: fp16 off CUDA, bf16 on a GPU without it."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"training.precision='fp16' needs a CUDA device (its gradient scaler and kernels); on "
                          f"{device.type} use 'bf16' or 'fp32'")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"training.precision='bf16', but {torch.cuda.get_device_name(device)} has no bfloat16 "
                          "support; use 'fp16' (with a gradient scaler) or 'fp32'")


def autocast(device: torch.device, precision: str) -> ContextManager:
    """Autocast of the forward pass in the training precision (nothing for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters are (the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def peak_cuda_memory() -> int | None:
    """Peak bytes this process allocated on its CUDA device since the last call (None without CUDA in use);
    resets the peak."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    peak = int(torch.cuda.max_memory_allocated())
    torch.cuda.reset_peak_memory_stats()
    return peak
