"""The methods, one module each, registered by name as any outside package registers its own (`registry.py`)."""

from __future__ import annotations

from .base import (Aggregation, AveragingOptions, BroadcastAverageServer, ClientAlgorithm, ClientContext, ClientInfo,
                   ClientState, Diagnostic, Options, Payload, Personalized, Reply, SecureMean, ServerAlgorithm, lora_rank)
from .fdlora import FDLoRAClient, FDLoRAOptions, FDLoRAServer
from .fedalt import FedALTClient, FedALTOptions, FedALTServer
from .fedex import FedExClient, FedExOptions, FedExServer
from .flexlora import FlexLoRAClient, FlexLoRAServer
from .feddpa import FedDPAClient, FedDPAOptions, FedDPAServer
from .fedit import FedITClient, FedITServer
from .fedlease import FedLEASEClient, FedLEASEOptions, FedLEASEServer
from .fedsa import FedSAClient, FedSAServer
from .ffa import FFAClient, FFAServer
from .flora import FLoRAClient, FLoRAServer
from .hetlora import HetLoRAClient, HetLoRAServer
from .ifca import IFCAClient, IFCAOptions, IFCAServer
from .local import LocalClient, LocalOptions, LocalServer
from .rolora import RoLoRAClient, RoLoRAOptions, RoLoRAServer
from .registry import (METHODS, Method, available_methods, build, check_algorithm, get_method, parse_options,
                       register_method)

for _name, _server, _client, _options, _summary in [
    ("local", LocalServer, LocalClient, LocalOptions, "each client trains its own LoRA; no communication"),
    ("fedit", FedITServer, FedITClient, AveragingOptions, "FedAvg on LoRA A and B"),
    ("ffa", FFAServer, FFAClient, AveragingOptions, "FFA-LoRA: A frozen at a shared random init, only B trained and averaged"),
    ("fedsa", FedSAServer, FedSAClient, AveragingOptions, "FedSA-LoRA: A averaged, B kept local"),
    ("feddpa", FedDPAServer, FedDPAClient, FedDPAOptions,
     "FedDPA: global (FedAvg) + local LoRA, instance-wise weighting at inference (T and F variants)"),
    ("ifca", IFCAServer, IFCAClient, IFCAOptions, "IFCA: C cluster LoRAs, each client picks the lowest-loss one"),
    ("flora", FLoRAServer, FLoRAClient, AveragingOptions,
     "FLoRA: stacking aggregation (exact, heterogeneous ranks), clients merge into their base"),
    ("fedex", FedExServer, FedExClient, FedExOptions,
     "FedEx-LoRA: A and B averaged, the rest of the mean update merged into every client's base (exact)"),
    ("flexlora", FlexLoRAServer, FlexLoRAClient, AveragingOptions,
     "FlexLoRA: per-client ranks, the mean of the full updates truncated by SVD to each client's rank"),
    ("rolora", RoLoRAServer, RoLoRAClient, RoLoRAOptions,
     "RoLoRA: rounds alternate between training and averaging B (A frozen) and A (B frozen): exact"),
    ("hetlora", HetLoRAServer, HetLoRAClient, AveragingOptions,
     "HetLoRA-style heterogeneous ranks: client LoRAs zero-padded to lora.r and averaged"),
    ("fedalt", FedALTServer, FedALTClient, FedALTOptions,
     "own LoRA + frozen Rest-of-World LoRA, mixed per token by a personal gate"),
    ("fedlease", FedLEASEServer, FedLEASEClient, FedLEASEOptions,
     "B-similarity clustering into M experts, adaptive top-M routing"),
    ("fdlora", FDLoRAServer, FDLoRAClient, FDLoRAOptions,
     "personal + global LoRA (DiLoCo outer step), AdaFusion of the two"),
]:  # fedlora's own methods, registered as any outside package registers its own
    register_method(_name, _server, _client, _options, _summary)

__all__ = ["METHODS", "Aggregation", "AveragingOptions", "BroadcastAverageServer", "ClientAlgorithm", "ClientContext",
           "ClientInfo", "ClientState", "Diagnostic", "FedITClient", "Method", "Options", "Payload", "Personalized", "Reply",
           "SecureMean", "ServerAlgorithm", "available_methods", "build", "check_algorithm", "get_method", "lora_rank",
           "parse_options", "register_method"]
