"""One forward pass for several clients over the shared frozen base (`engine.client_batch`).

The clients' batches are concatenated along the batch dimension, padded to the longest, and each client owns a
contiguous `RowSlice`. In the joint model (`joint_model`) every frozen layer runs once over all rows, and what is
a client's own runs on its rows only, exactly as if that client were alone:

  adapted layers   the base over all rows, then each client's own `MixtureLoRALinear` (experts, router, weights,
                   LoRA dropout) on its rows cut to its own length: one client after another, or (`grouped_lora`,
                   on CUDA in bf16) every client's experts in two grouped matrix products over all their tokens
  head modules     each client's own copy on its rows
  dropout          each client's rows cut to its own length and dropped with that client's random stream
  attention        with dropout, once per client on its rows (cut to its own length and with the mask it would
                   have alone); without dropout, once over all rows

Random draws are made with each client's own stream in place of torch's global one (`RandomStream.active`), in
the order a client alone makes them, so a joint pass draws every client's dropout masks as its sequential turn
would. Cutting a client's rows to its own length matters for that too: a mask's random numbers depend on its shape.
Under gradient checkpointing (`JointPass.set_checkpointing`) a checkpointed layer's recomputation in the backward
sees the rows' layout and every client's stream as its forward did, so it draws the same masks again.
Shapes follow HF's conventions: hidden states are [batch, seq, ...], attention inputs [batch, heads, seq, dim],
attention masks [batch or 1, 1, seq or 1, seq] (or 2-D [batch, seq]).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
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
    """The row layout of the joint forward in progress (empty outside one), shared by the joint model's modules.

    `grouped`: the adapted layers' LoRA in grouped matrix products (True), a loop over clients (False), or the
    former wherever `grouped_mm` has a fast kernel (None: CUDA, bf16 autocast).
    """

    def __init__(self, grouped: bool | None = None) -> None:
        self.slices: list[RowSlice] = []
        self.width = 0
        self.grouped = grouped
        self.checkpointable: list[nn.Module] = []  # the joint model's modules with HF's gradient_checkpointing flag
        self._checkpointing: bool | None = None
        self._tokens: dict[tuple, Any] = {}  # per-pass index caches

    @contextmanager
    def over(self, slices: list[RowSlice], width: int) -> Iterator[None]:
        """Within the block the joint model's rows are laid out as `slices`, padded to `width` positions."""
        outside = self.slices, self.width, self._tokens
        self.slices, self.width, self._tokens = slices, width, {}
        try:
            yield
        finally:
            self.slices, self.width, self._tokens = outside

    def set_checkpointing(self, enabled: bool) -> None:
        """HF gradient checkpointing of the joint model's layers on or off (non-reentrant, as `Trainer` sets it),
        with each checkpointed layer recomputed under the joint pass it ran in (`checkpoint_contexts`)."""
        from torch.utils.checkpoint import checkpoint

        if enabled == self._checkpointing:
            return
        self._checkpointing = enabled
        for module in self.checkpointable:
            module.gradient_checkpointing = enabled
            module._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False,
                                                          context_fn=self.checkpoint_contexts)

    def checkpoint_contexts(self) -> tuple[Any, Any]:
        """torch.utils.checkpoint's `context_fn`: the forward notes the rows' layout and every client's stream; the
        recomputation in the backward (after the joint pass has ended) runs over that layout, each stream back at
        its noted state, and leaves the streams where they were."""
        noted: dict[str, Any] = {}

        @contextmanager
        def forward() -> Iterator[None]:
            noted.update(slices=self.slices, width=self.width, streams=[s.stream.copy() for s in self.slices])
            yield

        @contextmanager
        def recompute() -> Iterator[None]:
            slices = noted["slices"]
            now = [s.stream.copy() for s in slices]
            for s, state in zip(slices, noted["streams"]):
                s.stream.load(state)
            try:
                with self.over(slices, noted["width"]):
                    yield
            finally:
                for s, state in zip(slices, now):
                    s.stream.load(state)

        return forward(), recompute()

    def token_index(self, x: torch.Tensor) -> torch.Tensor:
        """Positions in x flattened to [rows x width, d] (or [rows, d]) of each client's own tokens, client after
        client, each row by row: the order of `cut(x, s).flatten(0, -2)`."""
        sequence = x.dim() == 3
        key = (sequence, x.device)
        if key not in self._tokens:
            index = []
            for s in self.slices:
                rows = torch.arange(s.start, s.stop)
                index.append((rows[:, None] * self.width + torch.arange(s.length)).flatten() if sequence else rows)
            self._tokens[key] = torch.cat(index).to(x.device)
        return self._tokens[key]

    def token_groups(self, x: torch.Tensor, align: int) -> TokenGroups:
        """`token_index`'s tokens as grouped_mm's groups, one per client padded to `align` rows (computed once a
        pass: every adapted layer of the pass has the same)."""
        key = ("groups", x.dim() == 3, align, x.device)
        if key not in self._tokens:
            sizes = [(s.stop - s.start) * (s.length if x.dim() == 3 else 1) for s in self.slices]
            padded = [n + (-n % align) for n in sizes]
            ends = torch.tensor(padded).cumsum(0)
            real = torch.cat([torch.arange(end - p, end - p + n) for n, p, end in zip(sizes, padded, ends.tolist())])
            self._tokens[key] = TokenGroups(sizes, torch.tensor(padded, device=x.device),
                                            ends.to(device=x.device, dtype=torch.int32), real.to(x.device),
                                            sum(padded))
        return self._tokens[key]

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
        if self._groups(x):
            delta = grouped_lora([self.slots[s.slot] for s in self.joint.slices], x, self.joint)
        else:
            delta = self.joint.per_client(lambda s, rows: self.slots[s.slot].lora_delta(rows), x, seq_dims_of(x))
        return out + delta.to(out.dtype)

    def _groups(self, x: torch.Tensor) -> bool:
        """Whether this pass runs the clients' LoRA as grouped matrix products (`JointPass.grouped`)."""
        if not (x.dim() == 2 or x.dim() == 3 and x.shape[1] == self.joint.width):  # [rows, d] or [rows, width, d]
            return False
        dtype = _lora_dtype(x, self.slots[0])
        wanted = self.joint.grouped
        if wanted is None:
            wanted = x.is_cuda and dtype == torch.bfloat16 and torch.is_autocast_enabled("cuda")
        return wanted and groupable([self.slots[s.slot] for s in self.joint.slices], dtype)


GROUPED_ALIGNMENT = 16  # bytes: grouped_mm wants every row of its operands to start on a 16-byte boundary
# public from torch 2.10 (F.grouped_mm); before, the same operator as torch._grouped_mm (2.8-2.9, CUDA only)
GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _lora_dtype(x: torch.Tensor, layer: MixtureLoRALinear) -> torch.dtype:
    """The dtype the LoRA matmuls compute in: autocast's where it is on, else the experts' own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return layer.lora_A[0].dtype


def groupable(layers: list[MixtureLoRALinear], dtype: torch.dtype) -> bool:
    """Whether the layers' experts stack into grouped products: one expert count and rank, and aligned sizes."""
    first = layers[0]
    if GROUPED_MM is None or any(layer.n_experts != first.n_experts or layer.r != first.r for layer in layers):
        return False
    per = GROUPED_ALIGNMENT // torch.empty((), dtype=dtype).element_size()
    return all(n % per == 0 for n in (first.in_features, first.out_features, first.n_experts * first.r))


def grouped_lora(layers: list[MixtureLoRALinear], x: torch.Tensor, joint: JointPass) -> torch.Tensor:
    """Every client's `lora_delta` on its own tokens of x, its experts stacked into two grouped matrix products:
    what the loop over clients computes, with 2 matmuls in place of 2 per client.

    Dropout and the router still run per client, on the client's rows shaped as they would be alone, so that each
    draws from its own stream exactly as its sequential turn does; everything else is one operation over all
    clients (on a GPU a round of many small clients is bound by kernel launches, not by arithmetic). Each client's
    group of tokens is padded with zero rows to a multiple of 16 bytes' worth: the backward's weight gradient sums
    over the tokens, and CUDA's grouped kernel needs each group of its summed dimension aligned (silently wrong
    results otherwise)."""
    index = joint.token_index(x)
    tokens = x.flatten(0, -2).index_select(0, index)  # every client's own tokens, client after client
    dtype = _lora_dtype(x, layers[0])
    groups = joint.token_groups(x, GROUPED_ALIGNMENT // torch.empty((), dtype=dtype).element_size())
    plain = all(layer.is_plain for layer in layers)
    dropped, weights = [], []
    for s, layer, rows in zip(joint.slices, layers, tokens.split(groups.sizes)):
        rows = rows.unflatten(0, (s.stop - s.start, s.length) if x.dim() == 3 else (s.stop - s.start,))
        with s.stream.active():  # as the client's layer alone sees its rows
            dropped.append(layer.dropout(rows).flatten(0, -2))
        if not plain:
            weights.append(layer.mixing_weights(rows).expand(*rows.shape[:-1], layer.n_experts).flatten(0, -2))
    e, r, k = layers[0].n_experts, layers[0].r, len(layers)
    # [K, d, E*r] and [K, E*r, out]: each client's experts concatenated as lora_delta does, one stack for all
    a = torch.stack([w for layer in layers for w in layer.lora_A]).to(dtype).unflatten(0, (k, e)).flatten(1, 2)
    b = torch.stack([w for layer in layers for w in layer.lora_B]).to(dtype).unflatten(0, (k, e))
    b = b.permute(0, 2, 1, 3).reshape(k, b.shape[2], e * r)
    z = _grouped_mm(groups.pad(torch.cat(dropped).to(dtype)), a.transpose(1, 2), groups.offsets)  # [padded, E*r]
    scaling = torch.tensor([layer.scaling for layer in layers], device=x.device, dtype=torch.float32)
    if plain:  # one expert at a fixed weight: the weight joins the scaling
        scaling = scaling * torch.cat([layer.expert_weights for layer in layers]).float()
    else:
        z = (z.unflatten(-1, (e, r)) * groups.pad(torch.cat(weights)).to(z.dtype).unsqueeze(-1)).flatten(-2)
    delta = _grouped_mm(z, b.transpose(1, 2), groups.offsets) * groups.per_row(scaling).to(z.dtype)[:, None]
    delta = delta.index_select(0, groups.real)
    flat = delta.new_zeros(x.shape[:-1].numel(), delta.shape[-1]).index_copy(0, index, delta)
    return flat.unflatten(0, x.shape[:-1])


@dataclass
class TokenGroups:
    """The clients' tokens as grouped_mm's groups: each client's own count, padded up to `align` rows."""

    sizes: list[int]            # each client's own tokens
    padded: torch.Tensor        # each group's rows, padding included (on x's device)
    offsets: torch.Tensor       # the groups' ends, int32 (grouped_mm's `offs`)
    real: torch.Tensor          # the rows of the padded groups that hold a token, in order
    total: int                  # all rows, padding included

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows (client after client, `sizes` each) spread into the padded groups, zeros between."""
        return rows.new_zeros(self.total, *rows.shape[1:]).index_copy(0, self.real, rows)

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """One value per client repeated over its group's rows."""
        return values.repeat_interleave(self.padded, output_size=self.total)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """grouped_mm, whose backward wants a contiguous incoming gradient (a sum's expanded one is not)."""
    out = GROUPED_MM(a, b, offs=offsets)
    if out.requires_grad:
        out.register_hook(lambda grad: grad.contiguous())
    return out


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
    # the tree's own copies, so that checkpointing the joint model leaves the shared model's setting alone
    joint.checkpointable = [tree.node(path) for path, module in model.named_modules()
                            if hasattr(module, "gradient_checkpointing") and not path.startswith(owned)]
    joint.set_checkpointing(False)
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
