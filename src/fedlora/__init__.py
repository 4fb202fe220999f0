"""fedlora: personalized federated LoRA fine-tuning (FedALT, FedLEASE, FDLoRA and baselines)."""

from .api import compare, resume_experiment, run_experiment
from .core.config import Config, load_config
from .engines.results import RunResult
from .serving import export_client, load_personalized

__all__ = ["Config", "RunResult", "compare", "export_client", "load_config", "load_personalized", "resume_experiment",
           "run_experiment"]
__version__ = "0.1.0"
