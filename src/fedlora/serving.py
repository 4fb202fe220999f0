"""Export a client's personalized model and serve it: `export_client`, `load_personalized`, `PersonalizedModel`.

An export directory holds:
    fedlora_personalized.json   base model, LoRA settings, layout, own expert, fixed weights, labels, template
    README.md                   how to load it, with plain PEFT where that gives the same model, else with fedlora
    expert_<e>/                 one standard PEFT LoRA adapter per expert, each with the private head as
                                `modules_to_save` (sliced to the client's labels); a fixed-weight mixture is written
                                as ONE equivalent LoRA (rank E*r), so a plain PEFT adapter whenever there is no router
    base/                       the base model (save_pretrained, with num_labels/id2label) when nothing else PEFT can
                                load is that base: tiny random models, a GGUF-built model, a base with FLoRA's update
    router.safetensors          the router / gate weights (input-dependent mixtures only)
    base_delta.safetensors      updates merged into the base weights (FLoRA only)
    hook.safetensors            reference states of instance-wise weighting (FedDPA only)
An export replaces an earlier one completely (written next to it, then swapped in).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import AdaptedModel, Layout
from .adapters.base_models import LoadOptions, load_base_model, peft_base_reference
from .adapters.peft_io import export_peft_adapter, fold_fixed_mixture, import_peft_adapter
from .algorithms import Personalized
from .core.config import Config, TrainingConfig, load_config
from .core.devices import resolve_device
from .core.errors import CheckpointError, ConfigError, DataError
from .core.names import safe_name
from .core.io import load_json, load_tensors, save_json, save_tensors, save_text
from .core.tensors import StateDict
from .data.suites import TEMPLATE
from .data.tokenize import Encoded, encode_prompt, encode_texts
from .engines.checkpoint import checkpoint_id, load_checkpoint, restore_server
from .engines.rundir import hold_run_dir
from .engines.session import Session, build_session
from .export_files import (
    MANIFEST,
    check_replaceable,
    client_head,
    export_readme,
    label_names,
    save_base_model,
    staged_directory,
)
from .training import ClientDataset, InstanceWeighting, Trainer

def _node_side(run_dir: Path, client_id: str) -> Path | None:
    """A Flower node's own personalized model when `run_dir` is its node directory (or the state-dir holding it);
    None for a server run directory, whose client states (if on nodes) `client_state_of` finds or refuses."""
    from .engines.nodestate import node_model

    return node_model(run_dir, client_id) if run_dir.is_dir() else None


def run_config(run_dir: Path) -> Path:
    """The config.json of a run directory; CheckpointError says what to give instead when there is none."""
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist; give the output_dir of a finished run "
                              "(where 'fedlora run' wrote config.json and checkpoint/)")
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} is not a fedlora run directory (no config.json); give the output_dir "
                              "of a finished run (for a comparison, one method's subdirectory)")
    return run_dir / "config.json"


def export_client(run_dir: str | Path, client_id: str, out_dir: str | Path, save_base: bool | None = None) -> Path:
    """Write client `client_id`'s personalized model after the run's last checkpoint into `out_dir`, replacing an
    earlier export there; `save_base` (default: when PEFT could not load the exact base otherwise) adds `base/`.
    The run directory is locked meanwhile: a run still writing it refuses the export (and the other way round)."""
    with hold_run_dir(Path(run_dir)):
        return _export_client(run_dir, client_id, out_dir, save_base)


def _export_client(run_dir: str | Path, client_id: str, out_dir: str | Path, save_base: bool | None) -> Path:
    from .engines.nodestate import client_state_of, copy_export

    run_dir, out = Path(run_dir), Path(out_dir)
    safe_name(client_id)
    node = _node_side(run_dir, client_id)
    if node is not None:  # a data owner's node directory: the model its node wrote at the end of the run
        return copy_export(node, out)
    cfg = load_config(run_config(run_dir), [f"output_dir={run_dir}"])
    exported_from = checkpoint_id(run_dir)  # read before the checkpoint: a newer one then triggers a re-export
    ckpt = load_checkpoint(run_dir)
    if client_id not in ckpt.client_states:
        raise ConfigError(f"no client {client_id!r} in run {run_dir}; its clients: {', '.join(sorted(ckpt.client_states))}")
    # a Flower run's checkpoint holds no client states: its nodes kept them (here in simulation, else refused)
    on_node = client_state_of(run_dir, client_id, ckpt.round)
    if on_node is not None:
        ckpt.client_states[client_id] = on_node
    check_replaceable(out)  # before the model is built: refusing after it would waste the whole export
    s = build_session(cfg)
    s.server.setup(s.infos, cfg.federation.rounds)
    restore_server(s.server, ckpt)
    payload = s.server.configure_evaluate(ckpt.round, [client_id])[client_id]
    with staged_directory(out) as tmp:
        # the final evaluation's turn: the same personalized model, random streams and base update
        with s.runtime.personalize(client_id, ckpt.round, payload, ckpt.client_states[client_id]) as turn:
            manifest = write_export(s, cfg, client_id, ckpt.round, exported_from, turn.personalized, tmp, out,
                                    save_base)
        save_text(tmp / "README.md", export_readme(manifest, out))
        save_json(tmp / MANIFEST, manifest)
    return out


def write_export(s: Session, cfg: Config, client_id: str, rnd: int, exported_from: str | None, p: Personalized,
                 out: Path, final: Path, save_base: bool | None) -> dict:
    """Write the personalized model now in the shared model (PEFT experts, base, router, base update, hook) into
    `out` (to become `final`); returns the manifest, to be saved last (its presence marks a complete export)."""
    adapted = s.adapted
    client = next(c for c in s.clients if c.client_id == client_id)
    first = adapted.layers[next(iter(adapted.layers))]
    head_outputs = max((len(c.labels) for c in s.clients), default=2)
    head, num_labels = client_head(adapted, adapted.head_state(), len(client.labels), head_outputs)
    experts, layout, lora = _adapter_experts(adapted, first.expert_weights, p.hook is not None)
    reference, exact = peft_base_reference(cfg.model.name)
    if save_base is None:
        save_base = not exact or bool(p.base_delta)
    if save_base:
        save_base_model(adapted, s.base.tokenizer, out / "base", head, label_names(client.labels, num_labels))
        reference = str(final.resolve() / "base")
    manifest = {
        "format": 1, "method": cfg.algorithm.name, "client_id": client_id, "round": rnd, "seed": cfg.seed,
        "checkpoint": exported_from,
        "model": {"name": cfg.model.name, "objective": s.base.objective, "dtype": cfg.model.dtype,
                  "revision": cfg.model.revision, "trust_remote_code": cfg.model.trust_remote_code},
        "head_outputs": head_outputs, "layout": layout,
        "lora": {**lora, **({"modules_to_save": cfg.lora.modules_to_save} if cfg.lora.modules_to_save else {})},
        "own_expert": first.own_expert if layout["n_experts"] > 1 else 0,
        "expert_weights": (first.expert_weights.tolist() if first.expert_weights.dim() == 1 and layout["n_experts"] > 1
                           else None),
        "labels": client.labels, "max_length": cfg.data.max_length,
        "eval_batch_size": cfg.training.eval_batch_size, "max_new_tokens": cfg.training.max_new_tokens,
        "prompt_template": TEMPLATE if cfg.data.suite == "nlg" else None,
        "hook": None, "base_delta": bool(p.base_delta),
        "peft": {"base_model_name_or_path": reference, "base_saved": save_base, "num_labels": num_labels,
                 "exact": (save_base or (exact and not p.base_delta)) and _is_plain(layout, p)},
    }
    for e, expert in enumerate(experts):
        # every expert carries the head: any one of them then loads on its own in PEFT
        export_peft_adapter(adapted, expert, out / f"expert_{e}", head=head, base_model=reference,
                            r=layout["r"], alpha=lora["alpha"])
    if adapted.layout.router != "none":
        save_tensors(out / "router.safetensors", adapted.router_state())
    if p.base_delta:
        save_tensors(out / "base_delta.safetensors", p.base_delta)
    if p.hook is not None:
        tensors, meta = p.hook.to_state()
        save_tensors(out / "hook.safetensors", tensors)
        manifest["hook"] = meta
    return manifest


def _is_plain(layout: Mapping, p: Personalized) -> bool:
    """Whether the exported adapters are one plain LoRA (no router, no instance-wise weights)."""
    return layout["n_experts"] == 1 and layout["router"] == "none" and p.hook is None


def _adapter_experts(adapted: AdaptedModel, weights: torch.Tensor, hooked: bool) -> tuple[list[StateDict], dict, dict]:
    """The experts to export with their layout and LoRA settings: a fixed-weight mixture folded into one LoRA."""
    n, r, alpha = adapted.layout.n_experts, adapted.rank, adapted.spec.alpha
    experts = [adapted.expert_state(e) for e in range(n)]
    fixed = adapted.layout.router == "none" and not hooked and weights.dim() == 1
    if not fixed or (n == 1 and float(weights[0]) == 1.0):
        layout = {"n_experts": n, "router": adapted.layout.router, "r": adapted.rank}
        return experts, layout, {"r": adapted.spec.r, "alpha": alpha, "targets": list(adapted.layers)}
    folded, rank, folded_alpha = fold_fixed_mixture(experts, weights.tolist(), r, alpha)
    layout = {"n_experts": 1, "router": "none", "r": rank}
    lora = {"r": rank, "alpha": folded_alpha, "targets": list(adapted.layers),
            "folded": {"experts": n, "r": r, "alpha": alpha, "weights": weights.tolist()}}
    return [folded], layout, lora


@dataclass
class PersonalizedModel:
    """A client's personalized model, ready for inference."""

    adapted: AdaptedModel
    tokenizer: object
    objective: str
    labels: list[str]
    manifest: dict
    hook: InstanceWeighting | None = None

    @property
    def model(self) -> torch.nn.Module:
        """The underlying Hugging Face model (adapters injected)."""
        return self.adapted.model

    def _trainer(self) -> Trainer:
        cfg = TrainingConfig(eval_batch_size=self.manifest["eval_batch_size"], max_new_tokens=self.manifest["max_new_tokens"])
        empty = Encoded([], [])
        return Trainer(self.adapted, self.tokenizer, ClientDataset(empty, empty, len(self.labels)), cfg, self.objective,
                       seed=0)

    def predict(self, texts: Sequence[str]) -> list[str]:
        """Label names (classification) or greedy answers (generation; the run's prompt template is applied)."""
        if not texts:
            return []
        trainer = self._trainer()
        if self.objective == "classification":
            preds, _ = trainer.predict_labels(encode_texts(texts, self.tokenizer, self.manifest["max_length"]), self.hook)
            return [self.labels[i] for i in preds]
        template = self.manifest.get("prompt_template")
        prompts = [encode_prompt(template.format(instruction=t) if template else t, self.tokenizer, self.manifest["max_length"])
                   for t in texts]
        return trainer.generate(prompts, self.hook)


def full_head(adapted: AdaptedModel, head: Mapping[str, torch.Tensor]) -> StateDict:
    """A head cut to the client's labels (`client_head`) padded back to the model's head size; the padding rows
    are outputs fedlora never reads."""
    params = dict(adapted.model.named_parameters())
    out: StateDict = {}
    for name, value in head.items():
        target = params[name].detach()
        short = value.dim() and value.shape[1:] == target.shape[1:] and value.shape[0] < target.shape[0]
        out[name] = torch.cat([value.to(target.device, target.dtype), target[value.shape[0]:]]) if short else value
    return out


def load_personalized(export_dir: str | Path, device: str = "auto") -> PersonalizedModel:
    """Rebuild a personalized model from an export directory (see the module docstring) on `device` (auto: CUDA
    when present)."""
    export_dir = Path(export_dir)
    if not (export_dir / MANIFEST).is_file():
        raise CheckpointError(f"{export_dir} is not a fedlora export (no {MANIFEST}); create one with 'fedlora export'")
    m = load_json(export_dir / MANIFEST)
    objective = m["model"].get("objective") or m["model"]["task"]  # "task" in exports written before 0.2
    options = LoadOptions(resolve_device(device), m["model"].get("revision"), m["model"].get("trust_remote_code", False))
    base = load_base_model(m["model"]["name"], objective, m["head_outputs"], m["model"]["dtype"], m["seed"], options)
    adapted = AdaptedModel(base.model, m["lora"]["r"], m["lora"]["alpha"], 0.0, m["lora"]["targets"],
                           m["lora"].get("modules_to_save"))
    adapted.set_layout(Layout(**m["layout"]))
    for e in range(m["layout"]["n_experts"]):
        expert, head = import_peft_adapter(adapted, export_dir / f"expert_{e}")
        adapted.load_expert(e, expert)
        if head:
            adapted.load_head(full_head(adapted, head))
    if m["layout"]["router"] != "none":
        adapted.load_router(load_tensors(export_dir / "router.safetensors"))
    adapted.set_own_expert(m["own_expert"])
    if m["expert_weights"] is not None:
        adapted.set_expert_weights(m["expert_weights"])
    if m["base_delta"]:
        adapted.merge_base_delta(load_tensors(export_dir / "base_delta.safetensors"))
    hook = None
    if m["hook"] is not None:
        hook = InstanceWeighting.from_state(adapted, load_tensors(export_dir / "hook.safetensors"), m["hook"])
    adapted.model.eval()
    return PersonalizedModel(adapted, base.tokenizer, objective, m["labels"], m, hook)


def read_texts(source: str | None) -> list[str]:
    """Lines of a file, or of standard input when source is None or '-'."""
    import sys

    if source in (None, "-"):
        text = sys.stdin.read()
    elif not Path(source).exists():
        raise DataError(f"text file {source} does not exist; give a file with one text per line, or '-' "
                        "(or no --file) to read standard input")
    else:
        text = Path(source).read_text(encoding="utf-8", errors="replace")
    return [line for line in text.splitlines() if line.strip()]


def predict(run_dir: str | Path, client_id: str, texts: Sequence[str]) -> list[str]:
    """Predictions of a run's client, from its latest checkpoint (exported into `<run_dir>/exports/<client>`)."""
    node = _node_side(Path(run_dir), safe_name(client_id))
    if node is not None:  # a data owner's node directory
        return load_personalized(node).predict(texts)
    out = Path(run_dir) / "exports" / safe_name(client_id)
    # export again when the run has moved on since (resumed or re-run): never serve an older checkpoint
    if not (out / MANIFEST).is_file() or load_json(out / MANIFEST).get("checkpoint") != checkpoint_id(Path(run_dir)):
        export_client(run_dir, client_id, out, save_base=False)  # fedlora's own cache: it never reads base/
    return load_personalized(out).predict(texts)


__all__ = ["PersonalizedModel", "export_client", "load_personalized", "predict", "read_texts"]
