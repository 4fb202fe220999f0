"""The environment that keeps Hugging Face and Flower off the network: one definition for the CLI, the Flower
processes, the tests and the benchmarks.

Import it before transformers or huggingface_hub: they read these variables once, at import time. This module
imports nothing heavy, and `import fedlora` is lazy, so `from fedlora.core.offline import use_offline` is safe first.
"""

from __future__ import annotations

import logging
import os

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "FLWR_TELEMETRY_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


# bitsandbytes' CPU backend tries to fetch a 4-bit kernel from the Hub when it is imported (PEFT 0.21 imports it
# unconditionally, on every run, quantized or not) and warns, suggesting `pip install kernels`, when it cannot;
# `kernels` warns that offline it skips its publisher trust check. Offline, bitsandbytes' own fallback kernel runs
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels")


def use_offline() -> None:
    """Set each offline variable in this process unless the user has set it already."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
