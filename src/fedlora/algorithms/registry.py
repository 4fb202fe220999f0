"""The method registry: a name -> the method's options model, server class and client class.

fedlora's own methods register here as any outside package does: `register_method(...)` from Python, or an entry
point in the `fedlora.methods` group (`pip install my-method` then makes `algorithm.name = "my-method"` work).
A method's traits (per-client ranks, merging into the base, DP modes it refuses, few-shot data) are declared on its
own classes; nothing outside `algorithms/` looks a method up by name except to build it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import entry_points

from pydantic import ValidationError

from ..core.config import AlgorithmConfig
from ..core.errors import ConfigError
from .base import ClientAlgorithm, Options, ServerAlgorithm

log = logging.getLogger("fedlora")
ENTRY_POINT_GROUP = "fedlora.methods"


@dataclass(frozen=True)
class Method:
    """A registered method: its name, options model, server and client classes and a one-line summary."""

    name: str
    server: type[ServerAlgorithm]
    client: type[ClientAlgorithm]
    options: type[Options] = Options
    summary: str = ""

    @property
    def heterogeneous_ranks(self) -> bool:
        """Whether its clients may train LoRAs of different ranks (`clients.lora_r`)."""
        return self.server.heterogeneous_ranks

    @property
    def merges_into_base(self) -> bool:
        """Whether its personalized model adds an update to the frozen base weights."""
        return self.client.merges_into_base

    @property
    def secure_problem(self) -> str | None:
        """Why the method cannot run under `federation.secure_aggregation`, or None: its server's `secure_refusal`,
        or an `aggregate` overridden below the class its `aggregate_secure` comes from (which would skip what the
        override adds, silently)."""
        if self.server.secure_refusal is not None:
            return self.server.secure_refusal
        mro = self.server.__mro__
        plain, secure = (next(c for c in mro if name in c.__dict__) for name in ("aggregate", "aggregate_secure"))
        if mro.index(plain) < mro.index(secure):
            return (f"{self.server.__name__} overrides aggregate but takes aggregate_secure from {secure.__name__}; "
                    "implement aggregate_secure as well (docs/new-method.md)")
        return None

    def privacy_problem(self, mode: str) -> str | None:
        """Why the method cannot run under `privacy.dp = mode`, or None."""
        return self.server.dp_refusals.get(mode)


METHODS: dict[str, Method] = {}
_broken: set[str] = set()  # entry points that failed to load: warned about once


def register_method(name: str, server: type[ServerAlgorithm], client: type[ClientAlgorithm],
                    options: type[Options] = Options, summary: str = "", replace: bool = False) -> Method:
    """Make `algorithm.name = name` build this server and client (options validated by `options`)."""
    if not name or name != name.strip() or any(c.isspace() or c in "/\\,=" for c in name):
        raise ConfigError(f"method name {name!r}: use a plain name such as 'my-method' (no spaces, slashes, commas)")
    for what, cls, base in (("server", server, ServerAlgorithm), ("client", client, ClientAlgorithm),
                            ("options", options, Options)):
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ConfigError(f"method {name!r}: its {what} must be a subclass of fedlora's {base.__name__}, "
                              f"got {cls!r}")
    method = Method(name, server, client, options, summary or (server.__doc__ or "").strip().split("\n")[0])
    if name in METHODS and not replace and METHODS[name] != method:  # the same registration twice is harmless
        raise ConfigError(f"a method {name!r} is registered already ({METHODS[name].server.__module__}); pick "
                          "another name, or pass replace=True to override it")
    METHODS[name] = method
    return method


def load_entry_points() -> None:
    """Register the methods installed packages declare in the `fedlora.methods` entry-point group that are not
    registered yet. An entry point names a `Method`, or a module (or function) that registers its methods when
    loaded (called). Scanned on every call: a package installed while this process runs is found too."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in METHODS or ep.value in _broken:
            continue
        try:
            found = ep.load()
            if callable(found) and not isinstance(found, (Method, type)):
                found = found()
            if isinstance(found, Method):
                register_method(found.name, found.server, found.client, found.options, found.summary)
        except Exception as exc:  # one broken plug-in must not take the others (or fedlora's own) down
            _broken.add(ep.value)
            log.warning("method entry point %r (%s) could not be loaded: %s: %s", ep.name, ep.value,
                        type(exc).__name__, exc)


def available_methods() -> dict[str, Method]:
    """Every registered method, installed plug-ins included, by name."""
    load_entry_points()
    return dict(METHODS)


def get_method(name: str) -> Method:
    """The registered method called `name`."""
    if name not in METHODS:
        load_entry_points()
    if name not in METHODS:
        raise ConfigError(f"unknown algorithm.name {name!r}; available: {', '.join(available_methods())} (a method "
                          f"of another package registers itself with fedlora.register_method or the "
                          f"{ENTRY_POINT_GROUP!r} entry-point group)")
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
    unknown = sorted(name for name in algorithm.per_method if name not in available_methods())
    if unknown:
        raise ConfigError(f"algorithm.per_method names unknown methods {unknown}; available: "
                          f"{', '.join(available_methods())}")
    for name in dict.fromkeys([*(methods or [algorithm.name]), *algorithm.per_method]):
        parse_options(name, algorithm.options_for(name))


def build(name: str, options: dict, spec, seed: int, aggregation=None) -> tuple[ServerAlgorithm, ClientAlgorithm]:
    """The server and client objects of a method, options validated."""
    from .base import Aggregation

    method, opts = get_method(name), parse_options(name, options)
    return method.server(opts, spec, seed, aggregation or Aggregation()), method.client(opts, spec, seed)
