"""Client-level differential privacy (`[privacy]`, docs/privacy.md): the pieces every engine and method share.

A client bounds the L2 norm of its whole upload's update (every state it sends, minus where each started)
by `clip_norm`; Gaussian noise of std `noise_multiplier * clip_norm` then enters each sum the server forms
(`client_clipping`, a trusted server) or each upload before it leaves the client (`local`). The RDP
accountant of Google's dp-accounting (what Flower's DP strategies use) turns the rounds into (epsilon, delta).
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass

import torch

from .seeding import generator
from .tensors import StateDict

Uploads = dict[str, StateDict]  # state name -> the state a reply carries


def update_norm(states: Uploads, starts: dict[str, StateDict | None]) -> float:
    """The L2 norm of the joint update: every tensor of every state minus its start (zero where none)."""
    total = 0.0
    for name, state in states.items():
        start = starts.get(name)
        for key, value in state.items():
            delta = value.double() - start[key].double() if start is not None else value.double()
            total += float(delta.pow(2).sum())
    return math.sqrt(total)


def clip_uploads(states: Uploads, starts: dict[str, StateDict | None], bound: float) -> tuple[Uploads, float]:
    """The states with their joint update scaled to L2 norm at most `bound`, and the factor applied (<= 1)."""
    size = update_norm(states, starts)
    factor = min(1.0, bound / size) if size > 0 else 1.0
    if factor == 1.0:
        return states, factor
    out: Uploads = {}
    for name, state in states.items():
        start = starts.get(name)
        out[name] = {k: (v * factor if start is None else start[k] + (v - start[k]) * factor) for k, v in state.items()}
    return out, factor


def gaussian_like(state: StateDict, std: float, gen: torch.Generator, secure: bool = False) -> StateDict:
    """Independent N(0, std^2) noise shaped like every tensor of `state` (float32, drawn on the CPU in key order);
    `secure` draws it as Opacus's secure_mode does, (four normals) / 2, against floating-point attacks on it."""
    if not secure:
        return {k: torch.randn(v.shape, generator=gen, dtype=torch.float32) * std for k, v in sorted(state.items())}
    return {k: sum(torch.randn(v.shape, generator=gen, dtype=torch.float64) for _ in range(4)).div(2).float() * std
            for k, v in sorted(state.items())}


@dataclass(frozen=True)
class NoiseSource:
    """Where DP noise comes from: the run's seed (`privacy.secure_noise` off: reproducible, so every engine and a
    resumed run draw the same noise, but whoever knows the seed can take it off again) or, secure, a generator
    seeded with 64 bits from the OS that nobody else knows, drawn anew for every draw."""

    seed: int
    secure: bool = False

    def gaussian_like(self, state: StateDict, std: float, *names: object) -> StateDict:
        """N(0, std^2) noise shaped like `state`, from the stream `names` picks (seeded) or from the OS (secure)."""
        gen = torch.Generator().manual_seed(secrets.randbits(64)) if self.secure else generator(self.seed, *names)
        return gaussian_like(state, std, gen, self.secure)

    def add_noise(self, state: StateDict, std: float, *names: object) -> StateDict:
        """`state` plus N(0, std^2) noise on every coordinate."""
        noise = self.gaussian_like(state, std, *names)
        return {k: v + noise[k].to(v.dtype) for k, v in state.items()}


@dataclass
class SumNoise:
    """The server's noise for what it releases: std `noise_multiplier * clip_norm` per sum of clipped client
    states, drawn from a stream fixed by (seed, round, what is summed), so that a resumed run and every engine
    draw the same noise (or, `secure`, from the OS: `NoiseSource`)."""

    std: float
    seed: int
    round: int = 0
    released_individually: bool = False  # this round released one client's noised state, not a sum
    secure: bool = False

    def start_round(self, rnd: int) -> None:
        """Draw round `rnd`'s noise from now on."""
        self.round, self.released_individually = rnd, False

    def noised_sum(self, total: StateDict, *what: object) -> StateDict:
        """A sum of clipped client states plus the mechanism's noise; `what` names the sum (members, kind)."""
        return NoiseSource(self.seed, self.secure).add_noise(total, self.std, "dp-sum", self.round, *what)

    def noised_mean(self, mean: StateDict, n: int, *what: object) -> StateDict:
        """The uniform mean of n clipped client states, noised as their sum is: mean + N(0, std^2) / n."""
        return NoiseSource(self.seed, self.secure).add_noise(mean, self.std / n, "dp-sum", self.round, *what)

    def noised_state(self, state: StateDict, *what: object) -> StateDict:
        """One client's clipped state released on its own (FedLEASE's clustering upload), noised as a sum of one."""
        self.released_individually = True
        return self.noised_sum(state, "individual", *what)


def _quiet_absl() -> None:
    # dp-accounting logs every RDP order it cannot evaluate at WARNING: correct, excluded, and noise to a user
    logging.getLogger("absl").setLevel(logging.ERROR)


def round_event(noise_multiplier: float, sampling_rate: float, amplified: bool = True):
    """The dp-accounting event of one round: the Gaussian mechanism, Poisson-subsampled at the client sampling
    rate when sampling hides who took part (central DP), plain otherwise (local DP, individual releases)."""
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if amplified and sampling_rate < 1:
        return dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
    return gaussian


def epsilon(noise_multiplier: float, sampling_rate: float, delta: float, rounds: int, plain_rounds: int = 0,
            amplified: bool = True) -> float:
    """Epsilon after `rounds` rounds (of which `plain_rounds` released individual noised states, unamplified) at
    `delta`, by the RDP accountant."""
    import dp_accounting

    if rounds <= 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    _quiet_absl()
    accountant = dp_accounting.rdp.RdpAccountant()
    if rounds > plain_rounds:
        accountant.compose(round_event(noise_multiplier, sampling_rate, amplified), rounds - plain_rounds)
    if plain_rounds:
        accountant.compose(round_event(noise_multiplier, sampling_rate, amplified=False), plain_rounds)
    return float(accountant.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, sampling_rate: float, delta: float, rounds: int,
                    amplified: bool = True) -> float:
    """The smallest noise multiplier whose `rounds` rounds spend at most `target_epsilon` at `delta`."""
    import dp_accounting

    _quiet_absl()
    return float(dp_accounting.calibrate_dp_mechanism(
        dp_accounting.rdp.RdpAccountant,
        lambda z: dp_accounting.SelfComposedDpEvent(round_event(z, sampling_rate, amplified), rounds),
        target_epsilon, delta, dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4))
