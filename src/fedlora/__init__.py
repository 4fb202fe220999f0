"""fedlora: personalized federated LoRA fine-tuning (FedALT, FedLEASE, FDLoRA and baselines)."""

from __future__ import annotations

import importlib
from typing import Any

# Lazy (PEP 562): `import fedlora.core.offline` must not import transformers before the offline variables are set.
_EXPORTS = {
    # running experiments
    "run_experiment": "api", "resume_experiment": "api", "compare": "api", "Config": "core.config",
    "load_config": "core.config", "RunResult": "engines.results", "export_client": "serving",
    "load_personalized": "serving",
    # writing a method (docs/new-method.md)
    "register_method": "algorithms", "available_methods": "algorithms", "Method": "algorithms",
    "ServerAlgorithm": "algorithms", "SecureMean": "algorithms", "BroadcastAverageServer": "algorithms", "ClientAlgorithm": "algorithms",
    "Options": "algorithms", "AveragingOptions": "algorithms", "Payload": "algorithms", "Reply": "algorithms",
    "ClientState": "algorithms", "ClientContext": "algorithms", "ClientInfo": "algorithms",
    "Personalized": "algorithms",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The public API, imported on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedlora' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
