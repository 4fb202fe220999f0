"""Export a client's personalized model and serve it: `export_client`, `load_personalized`, `PersonalizedModel`.

An export directory holds:
    fedlora_personalized.json   base model, LoRA settings, layout, own expert, fixed weights, labels, template
    expert_<e>/                 one standard PEFT LoRA adapter per expert (expert_0 also carries the private
                                head as `modules_to_save`): a single-adapter result is a plain PEFT adapter
    router.safetensors          the router / gate weights (mixtures only)
    base_delta.safetensors      updates merged into the base weights (FLoRA only)
    hook.safetensors            reference states of instance-wise weighting (FedDPA only)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import AdaptedModel, Layout
from .adapters.base_models import load_base_model
from .adapters.peft_io import export_peft_adapter, import_peft_adapter
from .algorithms import Personalized
from .core.config import Config, TrainingConfig, load_config
from .core.errors import CheckpointError, ConfigError, DataError
from .core.names import safe_name
from .core.io import load_json, load_tensors, save_json, save_tensors
from .data.suites import TEMPLATE
from .data.tokenize import Encoded, encode_prompt, encode_texts
from .engines.checkpoint import checkpoint_id, load_checkpoint, restore_server
from .engines.session import Session, build_session
from .training import ClientDataset, InstanceWeighting, Trainer

MANIFEST = "fedlora_personalized.json"


def run_config(run_dir: Path) -> Path:
    """The config.json of a run directory; CheckpointError says what to give instead when there is none."""
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist; give the output_dir of a finished run "
                              "(where 'fedlora run' wrote config.json and checkpoint/)")
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} is not a fedlora run directory (no config.json); give the output_dir "
                              "of a finished run (for a comparison, one method's subdirectory)")
    return run_dir / "config.json"


def export_client(run_dir: str | Path, client_id: str, out_dir: str | Path) -> Path:
    """Write client `client_id`'s personalized model after the run's last checkpoint into `out_dir`."""
    run_dir, out = Path(run_dir), Path(out_dir)
    safe_name(client_id)
    cfg = load_config(run_config(run_dir), [f"output_dir={run_dir}"])
    exported_from = checkpoint_id(run_dir)  # read before the checkpoint: a newer one then triggers a re-export
    ckpt = load_checkpoint(run_dir)
    if client_id not in ckpt.client_states:
        raise ConfigError(f"no client {client_id!r} in {run_dir}; clients: {', '.join(sorted(ckpt.client_states))}")
    s = build_session(cfg)
    s.server.setup(s.infos, cfg.federation.rounds)
    restore_server(s.server, ckpt)
    payload = s.server.configure_evaluate(ckpt.round, [client_id])[client_id]
    # the final evaluation's turn: the same personalized model, random streams and base update
    with s.runtime.personalize(client_id, ckpt.round, payload, ckpt.client_states[client_id]) as turn:
        manifest = _write_export(s, cfg, client_id, ckpt.round, exported_from, turn.personalized, out)
    save_json(out / MANIFEST, manifest)
    return out


def _write_export(s: Session, cfg: Config, client_id: str, rnd: int, exported_from: str | None, p: Personalized,
                  out: Path) -> dict:
    """Write the personalized model now in the shared model (PEFT experts, router, base update, hook) into `out`;
    returns the manifest, to be saved last (its presence marks a complete export)."""
    adapted = s.adapted
    client = next(c for c in s.clients if c.client_id == client_id)
    first = adapted.layers[next(iter(adapted.layers))]
    manifest = {
        "format": 1, "method": cfg.algorithm.name, "client_id": client_id, "round": rnd, "seed": cfg.seed,
        "checkpoint": exported_from,
        "model": {"name": cfg.model.name, "objective": s.base.objective, "dtype": cfg.model.dtype},
        "head_outputs": max((len(c.labels) for c in s.clients), default=2),
        "lora": {"r": adapted.spec.r, "alpha": adapted.spec.alpha, "targets": list(adapted.layers)},
        "layout": {"n_experts": adapted.layout.n_experts, "router": adapted.layout.router, "r": adapted.rank},
        "own_expert": first.own_expert,
        "expert_weights": first.expert_weights.tolist() if first.expert_weights.dim() == 1 else None,
        "labels": client.labels, "max_length": cfg.data.max_length,
        "eval_batch_size": cfg.training.eval_batch_size, "max_new_tokens": cfg.training.max_new_tokens,
        "prompt_template": TEMPLATE if cfg.data.suite == "nlg" else None,
        "hook": None, "base_delta": bool(p.base_delta),
    }
    out.mkdir(parents=True, exist_ok=True)
    head = adapted.head_state()
    for e in range(adapted.layout.n_experts):
        export_peft_adapter(adapted, adapted.expert_state(e), out / f"expert_{e}", head=head if e == 0 else None,
                            base_model=cfg.model.name)
    if adapted.layout.router != "none":
        save_tensors(out / "router.safetensors", adapted.router_state())
    if p.base_delta:
        save_tensors(out / "base_delta.safetensors", p.base_delta)
    if p.hook is not None:
        tensors, meta = p.hook.to_state()
        save_tensors(out / "hook.safetensors", tensors)
        manifest["hook"] = meta
    return manifest


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


def load_personalized(export_dir: str | Path) -> PersonalizedModel:
    """Rebuild a personalized model from an export directory (see the module docstring)."""
    export_dir = Path(export_dir)
    if not (export_dir / MANIFEST).is_file():
        raise CheckpointError(f"{export_dir} is not a fedlora export (no {MANIFEST}); create one with 'fedlora export'")
    m = load_json(export_dir / MANIFEST)
    objective = m["model"].get("objective") or m["model"]["task"]  # "task" in exports written before 0.2
    base = load_base_model(m["model"]["name"], objective, m["head_outputs"], m["model"]["dtype"], m["seed"])
    adapted = AdaptedModel(base.model, m["lora"]["r"], m["lora"]["alpha"], 0.0, m["lora"]["targets"])
    adapted.set_layout(Layout(**m["layout"]))
    for e in range(m["layout"]["n_experts"]):
        expert, head = import_peft_adapter(adapted, export_dir / f"expert_{e}")
        adapted.load_expert(e, expert)
        if head:
            adapted.load_head(head)
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
    out = Path(run_dir) / "exports" / safe_name(client_id)
    # export again when the run has moved on since (resumed or re-run): never serve an older checkpoint
    if not (out / MANIFEST).is_file() or load_json(out / MANIFEST).get("checkpoint") != checkpoint_id(Path(run_dir)):
        export_client(run_dir, client_id, out)
    return load_personalized(out).predict(texts)


__all__ = ["PersonalizedModel", "export_client", "load_personalized", "predict", "read_texts"]
