"""`AdaptedModel`: an HF model whose target linears are `MixtureLoRALinear`s, plus its adapter state API.

State keys are the target module's path inside the HF model:
  one LoRA (an "expert state")   {path}.lora_A  [r, d_in]     {path}.lora_B  [d_out, r]
  the router state               {path}.router  [n_slots, d_in]
  the whole model's adapters     {path}.lora_A.{e}, {path}.lora_B.{e}, {path}.router.weight  (named_parameters)
Algorithms move expert states between slots (`load_expert(e, state)`), so a client's LoRA can sit in any slot.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import CheckpointError, ConfigError
from ..core.tensors import StateDict
from .layer import MixtureLoRALinear, RouterKind, router_outputs
from .tree import SharedTree, outermost

DEFAULT_TARGETS = (("q_proj", "v_proj"), ("query", "value"))  # when PEFT has no mapping for the architecture


@dataclass(frozen=True)
class Layout:
    """How many experts each adapted module holds and how they are mixed."""

    n_experts: int = 1
    router: RouterKind = "none"
    r: int | None = None  # a client-specific rank (heterogeneous-rank methods); None = lora.r


@dataclass(frozen=True)
class AdapterSpec:
    """Shapes of the adapted modules: enough for a server to create and check adapter states without the model."""

    modules: tuple[tuple[str, int, int], ...]  # (path, d_in, d_out), in model order
    r: int
    alpha: float

    def init_lora(self, generator: torch.Generator, r: int | None = None) -> StateDict:
        """A fresh LoRA expert of rank r (default the spec's): A kaiming-uniform(a=sqrt 5) as PEFT, B zero."""
        r = r or self.r
        out: StateDict = {}
        for path, d_in, d_out in self.modules:
            out[f"{path}.lora_A"] = nn.init.kaiming_uniform_(torch.empty(r, d_in), a=math.sqrt(5), generator=generator)
            out[f"{path}.lora_B"] = torch.zeros(d_out, r)
        return out

    def init_router(self, n_outputs: int, generator: torch.Generator, zero: bool = False) -> StateDict:
        """A fresh router per module: kaiming-uniform like nn.Linear's default, or zero (uniform mixing)."""
        out: StateDict = {}
        for path, d_in, _ in self.modules:
            w = torch.zeros(n_outputs, d_in)
            out[f"{path}.router"] = w if zero else nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
        return out

    def lora_shapes(self, r: int | None = None) -> dict[str, tuple[int, ...]]:
        """Expected shape of every key of an expert state of rank r (default the spec's)."""
        r = r or self.r
        shapes: dict[str, tuple[int, ...]] = {}
        for path, d_in, d_out in self.modules:
            shapes[f"{path}.lora_A"] = (r, d_in)
            shapes[f"{path}.lora_B"] = (d_out, r)
        return shapes

    def router_shapes(self, n_outputs: int) -> dict[str, tuple[int, ...]]:
        """Expected shape of every key of a router state."""
        return {f"{path}.router": (n_outputs, d_in) for path, d_in, _ in self.modules}

    def lora_numel(self, r: int | None = None) -> int:
        """Scalars in one expert: r * (d_in + d_out) summed over modules."""
        return sum((r or self.r) * (d_in + d_out) for _, d_in, d_out in self.modules)


def find_targets(model: nn.Module, targets: list[str] | str | None) -> list[str]:
    """Paths of the linear-like modules to adapt: by name suffix (a list) or by a regex over full paths (a string)."""
    linears = [n for n, m in model.named_modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]
    if targets is None:
        for names in (*architecture_targets(model), *DEFAULT_TARGETS):
            found = [n for n in linears if n.rsplit(".", 1)[-1] in names]
            if found:
                return found
    if isinstance(targets, str):
        try:
            found = [n for n in linears if re.fullmatch(targets, n)]
        except re.error as exc:
            raise ConfigError(f"lora.target_modules={targets!r} is not a valid regular expression ({exc}); give a "
                              "list of module-name suffixes such as ['query', 'value'], or a regex over full names") from None
    else:
        found = [n for n in linears if targets is not None and (n.rsplit(".", 1)[-1] in targets or n in targets)]
    if not found:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
        given = (f"lora.target_modules={targets!r}" if targets is not None else
                 f"lora.target_modules (not set: the defaults {[list(t) for t in DEFAULT_TARGETS]})")
        hint = f" (e.g. {linears[0]!r})" if linears else ""
        if isinstance(targets, str) and targets in suffixes:
            hint += f"; a string is one regex over full names: for the suffix give a list, [{targets!r}]"
        raise ConfigError(f"no module of the model matches {given}. Its linear modules end in "
                          f"{suffixes[:30]}{' ...' if len(suffixes) > 30 else ''}; set lora.target_modules to some of "
                          f"these suffixes, or to a regex over full module names{hint}")
    return found


def architecture_targets(model: nn.Module) -> list[tuple[str, ...]]:
    """PEFT's default LoRA target modules for the model's architecture (config.model_type), if it knows it."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING

    names = MAPPING.get(getattr(getattr(model, "config", None), "model_type", None))
    return [tuple(names)] if names else []


DEFAULT_HEAD_MODULES = ("classifier", "score")  # the task heads of *ForSequenceClassification


def head_parameters(model: nn.Module, modules: Iterable[str]) -> list[str]:
    """Names of the parameters under a module whose name is, or ends with ".", one of `modules` (PEFT's
    modules_to_save matching): the private head every client trains in full."""
    suffixes = tuple(modules)
    names = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        paths = (".".join(parts[:i]) for i in range(1, len(parts)))
        if any(path == s or path.endswith("." + s) for path in paths for s in suffixes):
            names.append(name)
    return names


class AdaptedModel:
    """An HF model with MixtureLoRALinear layers injected, and the methods algorithms use to move adapter state."""

    def __init__(self, model: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 targets: list[str] | str | None = None, head_modules: Iterable[str] | None = None) -> None:
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.layers: dict[str, MixtureLoRALinear] = {}
        for path in find_targets(model, targets):
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            layer = MixtureLoRALinear(getattr(parent, child), r, alpha, dropout)
            setattr(parent, child, layer)
            self.layers[path] = layer
        self.head_names = head_parameters(model, head_modules or DEFAULT_HEAD_MODULES)
        for path in self.head_modules():
            fp32_master_head(model.get_submodule(path))
        self.spec = AdapterSpec(tuple((p, l.in_features, l.out_features) for p, l in self.layers.items()), r, alpha)
        self.layout = Layout()

    def replica(self) -> "AdaptedModel":
        """Another client's model on the same frozen base: its own LoRA layers (one expert at lora.r until a layout
        is set) and its own head modules; every other module is shared, so nothing of the base is copied."""
        tree = SharedTree(self.model)
        layers: dict[str, MixtureLoRALinear] = {}
        ref = next(iter(self.layers.values())).lora_A[0]
        with torch.random.fork_rng(devices=[ref.device] if ref.device.type == "cuda" else []):
            for path, layer in self.layers.items():  # the experts' throwaway init leaves the global stream as it was
                layers[path] = MixtureLoRALinear(layer.base, self.spec.r, self.spec.alpha, layer.dropout_p)
                tree.replace(path, layers[path])
        for path in self.head_modules():
            tree.replace(path, copy.deepcopy(self.model.get_submodule(path)))
        twin = copy.copy(self)
        twin.model, twin.layers, twin.layout = tree.root, layers, Layout()
        return twin

    def head_modules(self) -> list[str]:
        """Paths of the modules that hold the private head's parameters (outermost first)."""
        return outermost({n.rsplit(".", 1)[0] for n in self.head_names})

    @property
    def rank(self) -> int:
        """The LoRA rank of the current layout."""
        return self.layout.r or self.spec.r

    # -- layout -------------------------------------------------------------------------------------
    def set_layout(self, layout: Layout) -> None:
        """Give every adapted module `layout.n_experts` experts and that router (no-op when unchanged)."""
        if layout != self.layout:
            for layer in self.layers.values():
                layer.set_layout(layout.n_experts, layout.router, layout.r or self.spec.r)
            self.layout = layout

    def set_own_expert(self, j: int) -> None:
        """The adaptive top-M router's own expert, in every module."""
        for layer in self.layers.values():
            layer.set_own_expert(j)

    def set_expert_weights(self, weights: torch.Tensor | list[float]) -> None:
        """Fixed mixing weights for router 'none': [E], or [batch, E] for instance-wise weighting."""
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.shape[-1] != self.layout.n_experts:
            raise ValueError(f"need {self.layout.n_experts} expert weights, got shape {tuple(w.shape)}")
        for layer in self.layers.values():
            layer.expert_weights = w.to(layer.lora_A[0].device, layer.lora_A[0].dtype)

    # -- state --------------------------------------------------------------------------------------
    def expert_state(self, e: int) -> StateDict:
        """A detached CPU copy of expert e as an expert state (keys {path}.lora_A / .lora_B)."""
        out: StateDict = {}
        for path, layer in self.layers.items():
            out[f"{path}.lora_A"] = _cpu_copy(layer.lora_A[e]).float()
            out[f"{path}.lora_B"] = _cpu_copy(layer.lora_B[e]).float()
        return out

    def load_expert(self, e: int, state: Mapping[str, torch.Tensor]) -> None:
        """Copy an expert state into slot e; keys and shapes must match exactly."""
        require_shapes(state, self.spec.lora_shapes(self.rank), f"expert state for slot {e}")
        with torch.no_grad():
            for path, layer in self.layers.items():
                layer.lora_A[e].copy_(state[f"{path}.lora_A"])
                layer.lora_B[e].copy_(state[f"{path}.lora_B"])

    def router_state(self) -> StateDict:
        """A detached CPU copy of every module's router weight."""
        return {f"{p}.router": _cpu_copy(l.router.weight).float() for p, l in self.layers.items() if l.router is not None}

    def load_router(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy a router state into every module's router."""
        n_out = router_outputs(self.layout.router, self.layout.n_experts)
        if n_out == 0:
            raise ValueError(f"layout {self.layout} has no router to load")
        require_shapes(state, self.spec.router_shapes(n_out), "router state")
        with torch.no_grad():
            for path, layer in self.layers.items():
                layer.router.weight.copy_(state[f"{path}.router"])

    def head_state(self) -> StateDict:
        """A CPU copy of the task head (classification layer), which stays private to each client."""
        params = dict(self.model.named_parameters())
        return {n: _cpu_copy(params[n]) for n in self.head_names}

    def load_head(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a task head saved by `head_state`."""
        params = dict(self.model.named_parameters())
        require_shapes(state, {n: tuple(params[n].shape) for n in self.head_names}, "head state")
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(v)

    def init_head(self, seed: int) -> StateDict:
        """A freshly initialised task head (the HF model's own init rule), seeded; the model is left unchanged.
        Other modules_to_save (a pooler) start from their pretrained weights, as PEFT's copies do."""
        saved = self.head_state()
        task_head = set(head_parameters(self.model, DEFAULT_HEAD_MODULES))
        modules = {n.rsplit(".", 1)[0] for n in self.head_names if n in task_head}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name in sorted(modules):
                module = self.model.get_submodule(name)
                if hasattr(self.model, "_init_weights"):
                    self.model._init_weights(module)
                else:
                    module.reset_parameters()
        fresh = self.head_state()
        self.load_head(saved)
        return fresh

    def merge_base_delta(self, delta: Mapping[str, torch.Tensor]) -> None:
        """Add delta[path] to the frozen base weight of each adapted module `path`, for good (a served model)."""
        with torch.no_grad():
            for path, weight in self._base_weights(delta).items():
                weight.add_(delta[path].to(weight.device, weight.dtype))

    @contextmanager
    def base_delta(self, delta: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
        """Within the block, the base weight of each adapted module `path` is W0 + delta[path].

        The original weights are copied back afterwards (exactly, even on an error), so clients that
        share this model never see each other's merged updates.
        """
        if not delta:
            yield
            return
        saved = {p: w.detach().clone() for p, w in self._base_weights(delta).items()}
        try:
            self.merge_base_delta(delta)
            yield
        finally:
            with torch.no_grad():
                for p, w in self._base_weights(delta).items():
                    w.copy_(saved[p])

    def _base_weights(self, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The base weights a delta updates; refuses modules not adapted and quantized (non-float) weights."""
        unknown = sorted(set(delta) - set(self.layers))
        if unknown:
            raise CheckpointError(f"base update for modules the model does not adapt: {unknown[:3]}")
        weights = {p: self.layers[p].base.weight for p in delta}
        if any(not w.is_floating_point() for w in weights.values()):
            raise ValueError("cannot merge an update into a quantized base layer; use a float base model")
        return weights

    # -- trainability -------------------------------------------------------------------------------
    def set_trainable(self, experts: Iterable[int] = (), router: bool = False, head: bool = False,
                      parts: str = "AB") -> None:
        """Exactly these adapter parts train (`parts`: which of each expert's A and B); the rest is frozen."""
        experts = set(experts)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for layer in self.layers.values():
            for e in range(layer.n_experts):
                layer.lora_A[e].requires_grad_(e in experts and "A" in parts)
                layer.lora_B[e].requires_grad_(e in experts and "B" in parts)
            if layer.router is not None:
                layer.router.weight.requires_grad_(router)
        params = dict(self.model.named_parameters())
        for n in self.head_names:
            params[n].requires_grad_(head)

    def trainable_names(self) -> set[str]:
        """Names of the parameters that currently require grad."""
        return {n for n, p in self.model.named_parameters() if p.requires_grad}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that currently require grad, in model order."""
        return [p for p in self.model.parameters() if p.requires_grad]


def fp32_master_head(head: nn.Module) -> None:
    """Keep a trainable head stored in half precision as an fp32 master copy, as the LoRA experts are (PEFT's
    autocast_adapter_dtype), and feed it its inputs in fp32, since without autocast a bf16 base hands it bf16."""
    params = list(head.parameters())
    if not any(p.dtype in (torch.float16, torch.bfloat16) for p in params) or not all(
            p.is_floating_point() for p in params):
        return  # fp32 already, or a quantized module that cannot be cast
    head.float()
    head.register_forward_pre_hook(_inputs_to_fp32, with_kwargs=True)


def _inputs_to_fp32(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def cast(a):
        return a.float() if torch.is_tensor(a) and a.is_floating_point() else a

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached copy on the CPU: adapter states cross boundaries (payloads, checkpoints, the wire) there."""
    t = t.detach()
    return t.clone() if t.device.type == "cpu" else t.cpu()


def lora_part(state: Mapping[str, torch.Tensor], part: str) -> StateDict:
    """The A or B half of an expert state ({path}.lora_A or {path}.lora_B keys)."""
    return {k: v for k, v in state.items() if k.endswith(f".lora_{part}")}


def require_shapes(state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise CheckpointError unless `state` has exactly the keys and shapes in `shapes`."""
    missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or extra:
        raise CheckpointError(f"{what} does not fit the model: missing keys {missing[:3]}, unexpected keys {extra[:3]}"
                              f" ({len(missing)} missing, {len(extra)} unexpected)")
    for k, shape in shapes.items():
        if tuple(state[k].shape) != tuple(shape):
            raise CheckpointError(f"{what}: {k} has shape {tuple(state[k].shape)}, the model needs {tuple(shape)}")

