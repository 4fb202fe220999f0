"""Building a run: the data split, the adapted base model, the method's objects and the client runtime.
Every engine (and an export) builds the same session from the same config, deterministically."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..adapters import AdaptedModel
from ..adapters.base_models import LoadedModel, LoadOptions, load_base_model
from ..algorithms import Aggregation, ClientInfo, ServerAlgorithm, build, check_algorithm, get_method
from ..core.config import Config
from ..core.devices import AUTOCAST_DTYPES, check_precision, resolve_device
from ..core.errors import ConfigError, DataError
from ..core.seeding import generator
from ..data.federated import ClientData, build_clients
from ..data.tokenize import encode_classification, encode_generation
from ..training import ClientDataset
from .privacy import check_privacy
from .runtime import ClientRuntime

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("fedlora")


@dataclass
class Session:
    """Everything a run builds before its first round: data, model, method objects and the client runtime."""

    config: Config
    clients: list[ClientData]
    base: LoadedModel
    adapted: AdaptedModel
    server: ServerAlgorithm
    runtime: ClientRuntime
    infos: list[ClientInfo]


def build_session(cfg: Config, clients: list[ClientData] | None = None) -> Session:
    """Build the data split (or take given clients, e.g. a data owner's own), the adapted base model and the
    method for a config (deterministic in the seed)."""
    if cfg.engine.torch_threads:
        torch.set_num_threads(cfg.engine.torch_threads)
    whole_split = clients is None  # a data owner's own clients: per-client lists/rules cannot be placed
    clients = build_clients(cfg.data, cfg.seed) if whole_split else clients
    num_labels = max((len(c.labels) for c in clients), default=0)
    base = load_base_model(cfg.model.name, cfg.model.objective, max(num_labels, 2), cfg.model.dtype, cfg.seed,
                           load_options(cfg))
    limit = getattr(base.model.config, "max_position_embeddings", None)
    if limit and cfg.data.max_length > limit:  # else every batch with a longer text fails inside the model
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds what model {cfg.model.name!r} can read "
                          f"({limit} positions); set data.max_length to at most {limit}")
    if base.objective == "classification" and num_labels == 0:
        raise DataError(f"model {cfg.model.name!r} classifies, but dataset {cfg.data.dataset!r} has no labels")
    adapted = AdaptedModel(base.model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules,
                           cfg.lora.modules_to_save)
    server, client = build(cfg.algorithm.name, cfg.algorithm.active_options, adapted.spec, cfg.seed,
                           aggregation_of(cfg))
    datasets = {c.client_id: encode_client(c, base.tokenizer, base.objective, cfg.data.max_length) for c in clients}
    truncated = sum(d.train.n_truncated + d.test.n_truncated for d in datasets.values())
    if truncated:
        log.warning("%d texts were longer than data.max_length=%d and were truncated", truncated, cfg.data.max_length)
    if client.few_shot_examples:
        datasets = {cid: d.hold_out(client.few_shot_examples, generator(cfg.seed, "few-shot", cid))
                    for cid, d in datasets.items()}
    runtime = ClientRuntime(client, adapted, base.tokenizer, cfg, base.objective, datasets, whole_split=whole_split)
    infos = [ClientInfo(c.client_id, len(datasets[c.client_id].train), c.task) for c in clients]
    return Session(cfg, clients, base, adapted, server, runtime, infos)


def check_run(cfg: Config, methods: list[str] | None = None) -> None:
    """Everything about a config (or a comparison of `methods` on it) that can be refused before any work: the
    method names and options, the DP mode against the methods, a merging method on a quantized base."""
    check_algorithm(cfg.algorithm, methods)
    check_privacy(cfg, methods)
    check_secure(cfg, methods)
    for name in methods or [cfg.algorithm.name]:
        if cfg.model.quantization != "none" and get_method(name).merges_into_base:
            raise ConfigError(f"{name!r} merges each client's update into the base weights, which a "
                              f"{cfg.model.quantization} base cannot hold; set model.quantization='none'")


def check_secure(cfg: Config, methods: list[str] | None = None) -> None:
    """Refuse `federation.secure_aggregation` where the server would need single updates, before any work."""
    fed = cfg.federation
    if not fed.secure_aggregation:
        return
    for name in methods or [cfg.algorithm.name]:
        reason = get_method(name).secure_problem
        if reason:
            raise ConfigError(f"federation.secure_aggregation cannot run {name!r}: {reason}")
    if fed.aggregation != "mean":
        raise ConfigError(f"federation.secure_aggregation gives the server only means, so federation.aggregation="
                          f"{fed.aggregation!r} (which reads every update) cannot run; set it to 'mean'")
    if fed.clients_per_round is not None and fed.clients_per_round < 3:
        raise ConfigError(f"federation.secure_aggregation needs 3 or more clients a round (SecAgg+ hides each one "
                          f"among the others), federation.clients_per_round is {fed.clients_per_round}")
    wraps = fed.clients_per_round and fed.secagg.wrap_problem(fed.clients_per_round)
    if wraps:
        raise ConfigError(wraps)


def load_options(cfg: Config, device: str | None = None) -> LoadOptions:
    """How `[model]` says to load the base: on its device (checked to exist, with the training precision), from
    the Hub revision, quantized; `device` overrides it (a server needs only the shapes, on the CPU)."""
    where = resolve_device(device or cfg.model.device)
    check_precision(cfg.training.precision, where)
    m = cfg.model
    return LoadOptions(where, m.revision, m.trust_remote_code, m.quantization, m.quant_type, m.double_quant,
                       AUTOCAST_DTYPES.get(cfg.training.precision, torch.float32),
                       tuple(cfg.lora.modules_to_save or ()))


def aggregation_of(cfg: Config) -> Aggregation:
    """The server's aggregation rule from `[federation]`."""
    return Aggregation(cfg.federation.aggregation, cfg.federation.trim_fraction)


def encode_client(client: ClientData, tokenizer: PreTrainedTokenizerBase, objective: str,
                  max_length: int) -> ClientDataset:
    """Tokenize one client's splits for the model's objective."""
    if not client.train:
        raise DataError(f"client {client.client_id} has no training examples; lower data.clients_per_task")
    if objective == "classification":
        encode = lambda recs: encode_classification(recs, tokenizer, client.labels, max_length)  # noqa: E731
    else:
        encode = lambda recs: encode_generation(recs, tokenizer, max_length)  # noqa: E731
    return ClientDataset(encode(client.train), encode(client.test), len(client.labels), client.task)
