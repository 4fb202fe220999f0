"""Local training and evaluation shared by every method."""

from .instance_weighting import InstanceWeighting
from .trainer import BatchHook, ClientDataset, Trainer, last_prompt_hidden

__all__ = ["BatchHook", "ClientDataset", "InstanceWeighting", "Trainer", "last_prompt_hidden"]
