"""Local training and evaluation shared by every method."""

from .budgets import ClientBudget, client_budgets
from .distributed import WorkerPool, Workers
from .instance_weighting import InstanceWeighting
from .trainer import BatchHook, ClientDataset, Trainer, last_prompt_hidden

__all__ = ["BatchHook", "ClientBudget", "ClientDataset", "InstanceWeighting", "Trainer", "WorkerPool", "Workers",
           "client_budgets", "last_prompt_hidden"]
