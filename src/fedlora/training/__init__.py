"""Local training and evaluation shared by every method."""

from .trainer import ClientDataset, Trainer

__all__ = ["ClientDataset", "Trainer"]
