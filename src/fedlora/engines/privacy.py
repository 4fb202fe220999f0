"""Differential privacy in a run (`[privacy]`, docs/privacy.md): which methods it covers (their `dp_refusals`), the
client's clipping and local noise (run by the shared `ClientRuntime`, so every engine does the same), the server's
noise (`ServerAlgorithm.noise`) and the budget (`PrivacyLedger`, an observer of the round loop). The mechanisms
themselves (clipping, noise, the accountant) are in core/dp.py."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import replace

from collections.abc import Callable

from ..algorithms import ClientState, Payload, Reply, get_method
from ..core import dp
from ..core.config import Config
from ..core.errors import ConfigError
from ..core.tensors import StateDict, start_if_fresh
from .observers import Observer, StopRun

log = logging.getLogger("fedlora")
UPLOAD = "_upload."  # ClientState names of the previous uploads of states the server never sends back

class PrivacyBudgetSpent(StopRun):
    """The next round would spend more than `privacy.max_epsilon`."""


def check_privacy(cfg: Config, methods: list[str] | None = None) -> None:
    """Refuse a DP setting the methods cannot honour, before any work (a ConfigError that says why)."""
    p = cfg.privacy
    if p.dp == "none":
        return
    for name in methods or [cfg.algorithm.name]:
        reason = get_method(name).privacy_problem(p.dp)
        if reason:
            raise ConfigError(f"privacy.dp={p.dp!r} cannot protect {name!r}: {reason}")
        weighted = cfg.algorithm.options_for(name).get("weighting") == "examples"
        if p.dp == "client_clipping" and weighted:
            raise ConfigError(f"privacy.dp='client_clipping' needs uniform weights (an example-weighted mean lets "
                              f"one client move it by more than clip_norm / n); drop {name}'s weighting='examples'")
        if p.dp == "local" and cfg.federation.secure_aggregation and weighted:
            raise ConfigError(f"privacy.dp='local' under secure aggregation splits the noise evenly between clients, "
                              f"which holds only with uniform weights (scaled by their weights, the small clients' "
                              f"shares add up to less than one client's noise); drop {name}'s weighting='examples'")
    if p.dp == "client_clipping" and cfg.federation.aggregation != "mean":
        raise ConfigError(f"privacy.dp='client_clipping' noises means; federation.aggregation="
                          f"{cfg.federation.aggregation!r} has another sensitivity: set it to 'mean'")


def sampling_rate(cfg: Config, num_clients: int) -> float:
    """The fraction of clients sampled per round."""
    per_round = cfg.federation.clients_per_round or num_clients
    return min(1.0, per_round / max(num_clients, 1))


@functools.lru_cache(maxsize=32)
def _calibrated(target: float, rate: float, delta: float, rounds: int, amplified: bool) -> float:
    return dp.calibrate_noise(target, rate, delta, rounds, amplified)


def noise_multiplier(cfg: Config, rate: float = 1.0, amplified: bool = False) -> float:
    """The noise std / clip_norm: as configured, or calibrated so the configured rounds spend target_epsilon."""
    p = cfg.privacy
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    return _calibrated(p.target_epsilon, rate, p.delta, cfg.federation.rounds, amplified)


# federation.secure_aggregation with privacy.dp = local (distributed DP): 1/sqrt(t), t the fewest clients whose sum
# the server can unmask, so that any sum it learns holds at least the noise one local client would add
NOISE_SHARE = "fedlora.dp_noise_share"


def secure_noise(cfg: Config) -> bool:
    """Whether DP noise comes from the OS rather than the run's seed (`privacy.secure_noise`; an app built for other
    machines turns it on unless the config says otherwise, a simulation stays reproducible)."""
    return bool(cfg.privacy.secure_noise)


def privatize(reply: Reply, payload: Payload, state: ClientState, cfg: Config, seed: int, init: StateDict,
              started_from: Callable[[str, Payload, Reply], StateDict | None]) -> tuple[Reply, ClientState]:
    """A client's reply under DP: its whole update clipped to clip_norm (against where each state started: what
    the payload gave (the method's `started_from`), else the previous upload of it, else `init`, the shared seeded LoRA init, where shapes
    match), under `local` noised and without training metrics; uploads the server never sends back are kept in
    the client's state as their next start."""
    p = cfg.privacy
    given = {name: started_from(name, payload, reply) for name in reply.states}
    starts = {name: given[name] or state.states.get(UPLOAD + name) or start_if_fresh(init, s)
              for name, s in reply.states.items()}
    states, factor = dp.clip_uploads(reply.states, starts, p.clip_norm)
    metrics = dict(reply.metrics)
    if p.dp == "local":  # under secure aggregation, the client's share of the noise the server's sum holds
        std = noise_multiplier(cfg) * p.clip_norm * float(payload.config.get(NOISE_SHARE, 1.0))
        source = dp.NoiseSource(seed, secure_noise(cfg))
        states = {name: source.add_noise(s, std, "dp-local", name) for name, s in states.items()}
        metrics = {}  # data-dependent numbers no noise covers never leave the client
    else:
        metrics["dp_clip_factor"] = factor
    kept = {**state.states, **{UPLOAD + name: {k: v.clone() for k, v in s.items()}  # own storage: checkpoints
                                for name, s in states.items() if given[name] is None}}
    return replace(reply, states=states, metrics=metrics), ClientState(kept, state.meta)


class PrivacyLedger(Observer):
    """The run's privacy budget, an observer of its rounds: `before_round` refuses a round that could spend more
    than max_epsilon, `after_round` adds epsilon at privacy.delta to the round's record."""

    def __init__(self, cfg: Config, num_clients: int, amplified_by_sampling: bool = True) -> None:
        self.cfg, self.p = cfg, cfg.privacy
        self.active = self.p.dp != "none"
        self.rate = sampling_rate(cfg, num_clients)
        # a local client's noise hides nothing by sampling (the server sees who took part); a server whose sums
        # hold clients that did not take part (FedALT's stale Individual LoRAs) releases them every round
        self.amplified = self.p.dp == "client_clipping" and amplified_by_sampling
        self.rounds = self.plain_rounds = 0
        self.noise: dp.SumNoise | None = None
        if not self.active:
            return
        self.z = noise_multiplier(cfg, self.rate, self.amplified)
        if self.p.dp == "client_clipping":  # a trusted server noises every sum it forms (ServerAlgorithm.noise)
            self.noise = dp.SumNoise(self.z * self.p.clip_norm, cfg.seed, secure=secure_noise(cfg))
        log.info("privacy: %s, clip_norm %.3g, noise multiplier %.4g, sampling rate %.3g%s", self.p.dp,
                 self.p.clip_norm, self.z, self.rate,
                 "; distributed under secure aggregation: each client adds 1/sqrt(t) of the noise, t the fewest "
                 "clients whose sum the server can unmask" if self.p.dp == "local" and cfg.federation.secure_aggregation
                 else "")
        log.info("privacy: noise from the OS (privacy.secure_noise)" if secure_noise(cfg) else
                 "privacy: the noise is drawn from the run's seed, so the run is reproducible and whoever knows the "
                 "seed can remove the noise; set privacy.secure_noise = true where the privacy is real")

    def restore(self, records: list[dict]) -> None:
        """Continue the count of the records a resumed run keeps."""
        last = next((r["privacy"] for r in reversed(records) if "privacy" in r), None)
        if last:
            self.rounds, self.plain_rounds = int(last["rounds"]), int(last["plain_rounds"])
        if self.p.dp == "local" and secure_noise(self.cfg):
            # the interrupted round's uploads may have left already, with noise its re-run cannot draw again: two
            # noisings of one update are two releases, so that round counts once more
            self.rounds += 1
            log.info("privacy: the interrupted round counts once more (its uploads may have left with other noise)")

    def epsilon(self, rounds: int, plain_rounds: int) -> float:
        """Epsilon after that many private rounds (of which plain_rounds released individual noised states)."""
        if rounds == 0:
            return 0.0
        if self.z == 0:
            return math.inf
        return dp.epsilon(self.z, self.rate, self.p.delta, rounds, plain_rounds, self.amplified)

    def before_round(self, rnd: int) -> None:
        """Raise PrivacyBudgetSpent when round `rnd` could take epsilon past max_epsilon (counted as the costlier,
        unamplified kind of round, since which kind it is shows only after it)."""
        if not self.active or self.p.max_epsilon is None:
            return
        worst = self.epsilon(self.rounds + 1, self.plain_rounds + 1)
        if worst > self.p.max_epsilon:
            spent = self.epsilon(self.rounds, self.plain_rounds)
            raise PrivacyBudgetSpent(
                f"round {rnd} would spend epsilon up to {worst:.3f} > privacy.max_epsilon={self.p.max_epsilon} "
                f"(spent so far: {spent:.3f} at delta={self.p.delta}); the run stops with what it has. To train on, "
                "start a run with a larger budget or noise_multiplier")

    def after_round(self, record: dict) -> None:
        """Add the round's record["privacy"] (nothing without DP): epsilon so far (null: no guarantee, noise 0) and
        what it was computed from. A round in which no client uploaded a state released nothing and costs nothing."""
        if not self.active or "comm" not in record:  # round 0 only evaluates
            return
        released = record["comm"]["bytes_up"] > 0
        self.rounds += int(released)
        self.plain_rounds += int(released and self.noise is not None and self.noise.released_individually)
        eps = self.epsilon(self.rounds, self.plain_rounds)
        record["privacy"] = {"epsilon": eps if math.isfinite(eps) else None, "delta": self.p.delta,
                             "noise_multiplier": self.z, "clip_norm": self.p.clip_norm, "sampling_rate": self.rate,
                             "rounds": self.rounds, "plain_rounds": self.plain_rounds}
