"""fedlora: personalized federated LoRA fine-tuning (FedALT, FedLEASE, FDLoRA and baselines)."""

from .api import compare, resume_experiment, run_experiment
from .core.config import Config, load_config
from .engines.results import RunResult

__all__ = ["Config", "RunResult", "compare", "load_config", "resume_experiment", "run_experiment"]
__version__ = "0.1.0"
