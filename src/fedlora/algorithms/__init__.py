"""The methods, one module each, and the registry that builds them from a config."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from ..adapters import AdapterSpec
from ..core.config import AlgorithmConfig
from ..core.errors import ConfigError
from .base import (Aggregation, AveragingOptions, ClientAlgorithm, ClientContext, ClientInfo, ClientState, Diagnostic, Options,
                   Payload, Personalized, Reply, ServerAlgorithm, lora_rank)
from .fdlora import FDLoRAClient, FDLoRAOptions, FDLoRAServer
from .fedalt import FedALTClient, FedALTOptions, FedALTServer
from .feddpa import FedDPAClient, FedDPAOptions, FedDPAServer
from .fedit import FedITClient, FedITServer
from .fedlease import FedLEASEClient, FedLEASEOptions, FedLEASEServer
from .fedsa import FedSAClient, FedSAServer
from .ffa import FFAClient, FFAServer
from .flora import FLoRAClient, FLoRAServer
from .hetlora import HetLoRAClient, HetLoRAServer
from .ifca import IFCAClient, IFCAOptions, IFCAServer
from .local import LocalClient, LocalOptions, LocalServer

@dataclass(frozen=True)
class Method:
    """A method's name, options model, server/client classes, and whether its clients may train LoRAs of
    different ranks (`clients.lora_r`; otherwise every client and every reply is at lora.r)."""

    name: str
    options: type[Options]
    server: type[ServerAlgorithm]
    client: type[ClientAlgorithm]
    summary: str
    heterogeneous_ranks: bool = False
    merges_into_base: bool = False  # its personalized model adds an update to the frozen base weights


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("local", LocalOptions, LocalServer, LocalClient, "each client trains its own LoRA; no communication",
               heterogeneous_ranks=True),
        Method("fedit", AveragingOptions, FedITServer, FedITClient, "FedAvg on LoRA A and B"),
        Method("ffa", AveragingOptions, FFAServer, FFAClient, "FFA-LoRA: A frozen at a shared random init, only B trained and averaged"),
        Method("fedsa", AveragingOptions, FedSAServer, FedSAClient, "FedSA-LoRA: A averaged, B kept local"),
        Method("feddpa", FedDPAOptions, FedDPAServer, FedDPAClient,
               "FedDPA: global (FedAvg) + local LoRA, instance-wise weighting at inference (T and F variants)"),
        Method("ifca", IFCAOptions, IFCAServer, IFCAClient, "IFCA: C cluster LoRAs, each client picks the lowest-loss one"),
        Method("flora", AveragingOptions, FLoRAServer, FLoRAClient,
               "FLoRA: stacking aggregation (exact, heterogeneous ranks), clients merge into their base",
               heterogeneous_ranks=True, merges_into_base=True),
        Method("hetlora", AveragingOptions, HetLoRAServer, HetLoRAClient,
               "HetLoRA-style heterogeneous ranks: client LoRAs zero-padded to lora.r and averaged",
               heterogeneous_ranks=True),
        Method("fedalt", FedALTOptions, FedALTServer, FedALTClient,
               "own LoRA + frozen Rest-of-World LoRA, mixed per token by a personal gate"),
        Method("fedlease", FedLEASEOptions, FedLEASEServer, FedLEASEClient,
               "B-similarity clustering into M experts, adaptive top-M routing"),
        Method("fdlora", FDLoRAOptions, FDLoRAServer, FDLoRAClient,
               "personal + global LoRA (DiLoCo outer step), AdaFusion of the two"),
    ]
}


def get_method(name: str) -> Method:
    """The registered method called `name`."""
    if name not in METHODS:
        raise ConfigError(f"unknown algorithm.name {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def parse_options(name: str, options: dict) -> Options:
    """Validate a method's options; unknown keys name the valid ones."""
    method = get_method(name)
    try:
        return method.options.model_validate(options or {})
    except ValidationError as exc:
        valid = ", ".join(method.options.model_fields) or "(none)"
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid algorithm.options for {name!r}: {problems}. Valid options: {valid}") from None


def check_algorithm(algorithm: AlgorithmConfig, methods: list[str] | None = None) -> None:
    """Fail before any work on an unknown method or option: the configured method (or `methods`, for a
    comparison) with the options it would run with, and every `per_method` entry."""
    unknown = sorted(set(algorithm.per_method) - set(METHODS))
    if unknown:
        raise ConfigError(f"algorithm.per_method names unknown methods {unknown}; available: {', '.join(METHODS)}")
    for name in dict.fromkeys([*(methods or [algorithm.name]), *algorithm.per_method]):
        parse_options(name, algorithm.options_for(name))


def build(name: str, options: dict, spec: AdapterSpec, seed: int,
          aggregation: Aggregation = Aggregation()) -> tuple[ServerAlgorithm, ClientAlgorithm]:
    """The server and client objects of a method, options validated."""
    method, opts = get_method(name), parse_options(name, options)
    return method.server(opts, spec, seed, aggregation), method.client(opts, spec, seed)


__all__ = ["METHODS", "Aggregation", "ClientAlgorithm", "ClientContext", "ClientInfo", "ClientState", "Diagnostic", "Method", "Payload",
           "Personalized", "Reply", "ServerAlgorithm", "build", "check_algorithm", "get_method", "lora_rank",
           "parse_options"]
