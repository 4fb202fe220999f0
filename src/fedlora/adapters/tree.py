"""Module trees that share a model's modules: a copy in which only some modules are replaced.

Several clients train over one frozen base at once (`joint.py`): each needs a model of its own (its LoRA
layers and head) and a joint pass needs a model whose layers serve every client, all without copying the base.
torch has no view of a module tree with some nodes swapped, so `SharedTree` builds one by hand: the ancestors of
a replaced module are shallow copies (their own child table, the same parameters and buffers), every other module
is the original object.
"""

from __future__ import annotations

import copy

from torch import nn


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object with its own child, parameter, buffer and hook tables holding the same entries."""
    twin = copy.copy(module)
    for name, value in vars(module).items():
        if name.startswith("_") and isinstance(value, (dict, set)):  # _modules, _parameters, _buffers, hook tables
            setattr(twin, name, type(value)(value))
    return twin


class SharedTree:
    """A copy of `model` that shares every module except those replaced (and the copied ancestors of those)."""

    def __init__(self, model: nn.Module) -> None:
        self.root = shallow_copy(model)
        self._copies: dict[str, nn.Module] = {"": self.root}

    def node(self, path: str) -> nn.Module:
        """The tree's own (shallow-copied) module at `path`, which may then be changed without touching the model."""
        if path not in self._copies:
            parent_path, _, child = path.rpartition(".")
            parent = self.node(parent_path)
            parent._modules[child] = self._copies[path] = shallow_copy(parent._modules[child])
        return self._copies[path]

    def replace(self, path: str, module: nn.Module) -> None:
        """Put `module` at `path` in this tree (the model keeps its own)."""
        parent_path, _, child = path.rpartition(".")
        self.node(parent_path)._modules[child] = self._copies[path] = module


def outermost(paths: set[str]) -> list[str]:
    """The paths not inside another of them, sorted (a head module and its own submodule count once)."""
    return sorted(p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p))
