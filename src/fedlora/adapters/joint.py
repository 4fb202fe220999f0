"""One forward pass for several clients over the shared frozen base (`engine.client_batch`).

The clients' batches are concatenated along the batch dimension, padded to the longest, and each client owns a
contiguous `RowSlice`. In the joint model (`joint_model`) every frozen layer runs once over all rows, and what is
a client's own runs on its rows only, exactly as if that client were alone:

  adapted layers   the base over all rows, then each client's own `MixtureLoRALinear` (experts, router, weights,
                   LoRA dropout) on its rows cut to its own length
  head modules     each client's own copy on its rows
  dropout          each client's rows cut to its own length and dropped with that client's random stream
  attention        with dropout, once per client on its rows (cut to its own length and with the mask it would
                   have alone); without dropout, once over all rows

Random draws are made with each client's own stream in place of torch's global one (`RandomStream.active`), in
the order a client alone makes them, so a joint pass draws every client's dropout masks as its sequential turn
would. Cutting a client's rows to its own length matters for that too: a mask's random numbers depend on its shape.
Shapes follow HF's conventions: hidden states are [batch, seq, ...], attention inputs [batch, heads, seq, dim],
attention masks [batch or 1, 1, seq or 1, seq] (or 2-D [batch, seq]).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.seeding import RandomStream
from .layer import MixtureLoRALinear
from .tree import SharedTree

JOINT_ATTENTION = "fedlora_joint"  # registered with transformers' AttentionInterface on first use


@dataclass
class RowSlice:
    """One client's rows of a joint batch: rows [start, stop) of its slot, its own sequence length, its stream."""

    slot: int
    start: int
    stop: int
    length: int
    stream: RandomStream
    padded: bool  # whether its own batch has padding (else attention alone would have had no mask)


class JointPass:
    """The row layout of the joint forward in progress (empty outside one), shared by the joint model's modules."""

    def __init__(self) -> None:
        self.slices: list[RowSlice] = []
        self.width = 0

    @contextmanager
    def over(self, slices: list[RowSlice], width: int) -> Iterator[None]:
        """Within the block the joint model's rows are laid out as `slices`, padded to `width` positions."""
        self.slices, self.width = slices, width
        try:
            yield
        finally:
            self.slices, self.width = [], 0

    def cut(self, x: torch.Tensor, s: RowSlice, seq_dims: Sequence[int]) -> torch.Tensor:
        """A client's rows of x, each dimension in `seq_dims` cut to its own length."""
        x = x[s.start:s.stop] if x.shape[0] > 1 or s.start == 0 else x  # a batch dimension of 1 broadcasts
        for d in seq_dims:
            if x.dim() > d and x.shape[d] == self.width:
                x = x.narrow(d, 0, s.length)
        return x

    def join(self, parts: list[torch.Tensor], seq_dims: Sequence[int]) -> torch.Tensor:
        """The clients' outputs padded back to the joint width (zeros) along `seq_dims` and concatenated by row."""
        padded = []
        for part, s in zip(parts, self.slices):
            for d in seq_dims:
                if part.dim() > d and part.shape[d] == s.length and s.length < self.width:
                    shape = list(part.shape)
                    shape[d] = self.width - s.length
                    part = torch.cat((part, part.new_zeros(shape)), dim=d)
            padded.append(part)
        return torch.cat(padded)

    def per_client(self, fn: Callable[[RowSlice, torch.Tensor], torch.Tensor], x: torch.Tensor,
                   seq_dims: Sequence[int]) -> torch.Tensor:
        """fn applied to each client's rows of x (cut to its length, with its stream active), joined back."""
        outs = []
        for s in self.slices:
            with s.stream.active():
                outs.append(fn(s, self.cut(x, s, seq_dims)))
        return self.join(outs, seq_dims)


def seq_dims_of(x: torch.Tensor) -> tuple[int, ...]:
    """The sequence dimensions of a hidden-state-like tensor: none for [batch, d], 1 for [batch, seq, d], 2 and 3
    for attention probabilities [batch, heads, seq, seq]."""
    return {2: (), 3: (1,), 4: (2, 3)}.get(x.dim(), (1,))


class JointLoRALinear(nn.Module):
    """An adapted layer of the joint model: the frozen base once over every row, each client's own LoRA mixture
    on its rows."""

    def __init__(self, base: nn.Module, slots: list[MixtureLoRALinear], joint: JointPass) -> None:
        super().__init__()
        self.base, self.slots, self.joint = base, nn.ModuleList(slots), joint

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus, on each client's rows, that client's LoRA mixture."""
        out = self.base(x, *args, **kwargs)
        delta = self.joint.per_client(lambda s, rows: self.slots[s.slot].lora_delta(rows), x, seq_dims_of(x))
        return out + delta.to(out.dtype)


class JointModule(nn.Module):
    """A private module (a client's head) of the joint model: each client's own copy on its rows."""

    def __init__(self, slots: list[nn.Module], joint: JointPass) -> None:
        super().__init__()
        self.slots, self.joint = nn.ModuleList(slots), joint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each client's own module on its rows."""
        return self.joint.per_client(lambda s, rows: self.slots[s.slot](rows), x, seq_dims_of(x))


class JointDropout(nn.Dropout):
    """A frozen model's dropout in the joint model: each client's rows dropped with that client's stream."""

    def __init__(self, p: float, joint: JointPass) -> None:
        super().__init__(p)
        self.joint = joint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout per client (plain dropout outside a joint pass)."""
        if not self.training or self.p == 0 or not self.joint.slices:
            return super().forward(x)
        return self.joint.per_client(lambda s, rows: F.dropout(rows, self.p, True), x, seq_dims_of(x))


def joint_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any):
    """The model's own attention function, called once per client when it drops attention probabilities (so that
    each client's draws are its own), else once over all rows."""
    inner, joint, skips_mask = module._fedlora_attention
    if not joint.slices or not kwargs.get("dropout"):
        return inner(module, query, key, value, attention_mask, *args, **kwargs)
    outs = []
    for s in joint.slices:
        with s.stream.active():
            mask = None if attention_mask is None or (skips_mask and not s.padded) else \
                joint.cut(attention_mask, s, tuple(d for d in (attention_mask.dim() - 2, attention_mask.dim() - 1) if d))
            q, k, v = (joint.cut(t, s, (2,)) for t in (query, key, value))
            outs.append(inner(module, q, k, v, mask, *args, **kwargs)[0])  # [rows, seq, heads, dim]
    return joint.join(outs, (1,)), None


def joint_model(model: nn.Module, layers: dict[str, list[MixtureLoRALinear]], heads: dict[str, list[nn.Module]],
                joint: JointPass) -> nn.Module:
    """A tree over `model`'s frozen modules that runs every client of `joint` in one pass: `layers` and `heads` map
    each adapted layer and head module path to the clients' own modules, in slot order."""
    tree = SharedTree(model)
    owned = (*layers, *heads)
    for path, module in model.named_modules():
        inside = any(path == p or path.startswith(p + ".") for p in owned)
        if isinstance(module, nn.Dropout) and not inside:
            tree.replace(path, JointDropout(module.p, joint))
        elif _calls_attention_interface(module):
            _route_attention(tree.node(path), joint)
    for path, slots in layers.items():
        tree.replace(path, JointLoRALinear(slots[0].base, slots, joint))
    for path, slots in heads.items():
        tree.replace(path, JointModule(slots, joint))
    return tree.root


def _calls_attention_interface(module: nn.Module) -> bool:
    """Whether a module is a transformers attention layer that dispatches through `config._attn_implementation`."""
    forward = inspect.unwrap(type(module).forward)  # past transformers' kwarg-deprecation wrappers
    return hasattr(module, "config") and "attention_interface" in forward.__code__.co_varnames


def _route_attention(node: nn.Module, joint: JointPass) -> None:
    """Point a (copied) attention layer at `joint_attention`, which calls the function the model uses."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if JOINT_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(JOINT_ATTENTION, joint_attention)
    name = node.config._attn_implementation
    eager = inspect.unwrap(type(node).forward).__globals__.get("eager_attention_forward")
    inner = eager if name in (None, "eager") else ALL_ATTENTION_FUNCTIONS[name]
    # sdpa and flash attention skip the mask of a batch without padding: so does a client's turn alone
    node._fedlora_attention = (inner, joint, name not in (None, "eager"))
    node.config = copy.copy(node.config)
    node.config._attn_implementation_internal = JOINT_ATTENTION
