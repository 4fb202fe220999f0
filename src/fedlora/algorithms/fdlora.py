"""FDLoRA (Qi et al., 2024): a personal and a global LoRA per client, only the global one is aggregated,
the two fused by AdaFusion, a gradient-free search of two weights (spec section 4, the [REC] reading).

  stage 1 (rounds 1..stage1_rounds): each client trains its personal LoRA theta_p locally;
      [REC] the server starts the global LoRA from their mean, theta_g^0 = mean_k theta_p^k.
  stage 2 (DiLoCo-style): clients run the inner AdamW steps from theta_g and return theta_k;
      the server takes one outer Nesterov-SGD step on the mean pseudo-gradient mean_k(theta_g - theta_k).
      Every sync_every rounds theta_p <- theta_k (3P default), or theta_p keeps training locally.
  AdaFusion (every evaluation): w* = argmin CE(w1 theta_g + w2 theta_p; few-shot) + l1 * mean|w|,
      by nevergrad NGOpt in [-bound, bound]^2 from w = 0; the evaluated model is the fused LoRA.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from enum import StrEnum
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ..core.seeding import derive_seed, generator
from ..core.tensors import StateDict, clone
from .base import (ClientAlgorithm, ClientContext, ClientInfo, ClientState, Options, Payload, Personalized, Reply,
                   SecureMean, ServerAlgorithm)


class FDLoRAOptions(Options):
    """Options of FDLoRA: the stages, the outer optimizer, personal-LoRA syncing and the AdaFusion search."""

    stage1_rounds: int = Field(1, ge=0)
    global_init: Literal["stage1_mean", "fresh"] = "stage1_mean"  # [REC] mean of stage-1 LoRAs, or the shared init
    outer_lr: float = Field(1.0, gt=0)
    outer_momentum: float = Field(0.5, ge=0, lt=1)
    nesterov: bool = True
    personal: Literal["sync", "local"] = "sync"  # theta_p <- theta_k every sync_every rounds (3P), or trained locally
    sync_every: int = Field(5, ge=1)
    fusion_budget: int = Field(40, ge=1)          # NGOpt evaluations (LoraHub default 40; FedAMoLE 5)
    fusion_examples: int = Field(16, ge=1)        # held out of each client's train split
    fusion_l1: float = Field(0.05, ge=0)
    fusion_bound: float = Field(1.5, gt=0)
    weighting: Literal["uniform", "examples"] = "uniform"


class Stage(StrEnum):
    """What a payload asks for, as `Payload.config["stage"]` names it."""

    LOCAL = "local"        # stage 1: train the personal LoRA
    GLOBAL = "global"      # stage 2: inner steps on the global LoRA
    EVALUATE = "evaluate"  # AdaFusion of the global and personal LoRAs


def fuse(w: tuple[float, float] | np.ndarray, global_lora: StateDict, personal: StateDict) -> StateDict:
    """Parameter-level fusion, elementwise on every tensor: A_f = w1 A_g + w2 A_p, B_f = w1 B_g + w2 B_p."""
    return {k: float(w[0]) * global_lora[k] + float(w[1]) * personal[k] for k in global_lora}


def fusion_objective(loss: float, w: Sequence[float] | np.ndarray, l1: float) -> float:
    """LoraHub's objective: few-shot loss + l1 * mean |w|."""
    return float(loss) + l1 * float(np.abs(np.asarray(w, dtype=float)).mean())


class OuterOptimizer:
    """The server's outer step: SGD with (Nesterov) momentum on the pseudo-gradient, as DiLoCo."""

    def __init__(self, params: StateDict, lr: float, momentum: float, nesterov: bool) -> None:
        self.names = list(params)
        self.params = [torch.nn.Parameter(params[k].clone()) for k in self.names]
        self.opt = torch.optim.SGD(self.params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)

    def step(self, pseudo_gradient: StateDict) -> StateDict:
        """theta <- theta - lr * (momentum-corrected pseudo-gradient); returns the new parameters."""
        for name, p in zip(self.names, self.params):
            p.grad = pseudo_gradient[name].clone()
        self.opt.step()
        return self.value()

    def value(self) -> StateDict:
        """The current parameters."""
        return {n: p.detach().clone() for n, p in zip(self.names, self.params)}

    def momentum(self) -> StateDict:
        """Momentum buffers (empty before the first step) for checkpoints."""
        return {n: self.opt.state[p]["momentum_buffer"].clone() for n, p in zip(self.names, self.params)
                if self.opt.state.get(p, {}).get("momentum_buffer") is not None}

    def load_momentum(self, buffers: StateDict) -> None:
        """Restore momentum buffers saved by `momentum`."""
        for n, p in zip(self.names, self.params):
            if n in buffers:
                self.opt.state[p]["momentum_buffer"] = buffers[n].clone()


class FDLoRAServer(ServerAlgorithm):
    """Holds the global LoRA and the outer optimizer; never sees a personal LoRA after stage 1."""

    def setup(self, clients: list[ClientInfo], rounds: int | None = None) -> None:
        """Also start the outer optimizer from the shared seeded LoRA init."""
        super().setup(clients, rounds)
        self._start_outer(clone(self.lora_init()))

    def schedule_problems(self, rounds: int) -> list[str]:
        """Stage 2 and the personal LoRA's syncs must fall within the rounds."""
        opts, problems = self.options, []
        if opts.stage1_rounds >= rounds:
            problems.append(f"stage1_rounds={opts.stage1_rounds} leaves no stage-2 round in federation.rounds={rounds}: "
                            "the global LoRA is never trained; lower stage1_rounds")
        elif opts.personal == "sync" and rounds - opts.stage1_rounds < opts.sync_every:
            problems.append(f"sync_every={opts.sync_every} > the {rounds - opts.stage1_rounds} stage-2 rounds: the "
                            "personal LoRA is never synced and stays the stage-1 LoRA; lower sync_every")
        return problems

    def _start_outer(self, global_lora: StateDict) -> None:
        self.outer = OuterOptimizer(global_lora, self.options.outer_lr, self.options.outer_momentum,
                                    self.options.nesterov)

    def _stage(self, rnd: int) -> Stage:
        return Stage.LOCAL if rnd <= self.options.stage1_rounds else Stage.GLOBAL

    def configure(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        """Stage 1 asks for local training (and, in its last round, the stage-1 upload); stage 2 sends the global LoRA."""
        if self._stage(rnd) is Stage.LOCAL:
            upload = self.options.global_init == "stage1_mean" and rnd == self.options.stage1_rounds
            expects = frozenset({"stage1"}) if upload else frozenset()
            return {cid: Payload(config={"stage": Stage.LOCAL}, expects=expects) for cid in clients}
        t = rnd - self.options.stage1_rounds  # 1-based stage-2 round
        sync = self.options.personal == "sync" and t % self.options.sync_every == 0
        glob = self.outer.value()
        return {cid: Payload({"global": glob}, {"stage": Stage.GLOBAL, "sync": sync}, frozenset({"global"}))
                for cid in clients}

    def configure_evaluate(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        """The global LoRA, for AdaFusion with each client's personal one."""
        glob = self.outer.value()
        return {cid: Payload({"global": glob}, {"stage": Stage.EVALUATE}) for cid in clients}

    def aggregate(self, rnd: int, replies: dict[str, Reply]) -> None:
        """Stage 1 starts the global LoRA from the uploaded mean; stage 2 takes one outer step."""
        if not replies:
            return
        if self._stage(rnd) is Stage.LOCAL:
            if any("stage1" in r.states for r in replies.values()):
                self._start_outer(self.client_mean({cid: r.states["stage1"] for cid, r in replies.items()}))
            return
        self._outer_step(self.client_mean({cid: r.states["global"] for cid, r in replies.items()}))

    secure_refusal = None

    def aggregate_secure(self, rnd: int, mean: SecureMean) -> None:
        """As `aggregate`, from the securely aggregated means."""
        if self._stage(rnd) is Stage.LOCAL:
            self._start_outer(self.secure_mean(mean, "stage1"))
        else:
            self._outer_step(self.secure_mean(mean, "global"))

    def _outer_step(self, mean_local: StateDict) -> None:
        glob = self.outer.value()
        self.outer.step({k: glob[k] - mean_local[k] for k in glob})  # mean of (theta_g - theta_k)

    def state_dict(self) -> dict:
        """The global LoRA and the outer momentum buffers."""
        return {"tensors": {"global": self.outer.value(), "momentum": self.outer.momentum()}, "meta": {}}

    def load_state_dict(self, state: dict) -> None:
        """Rebuild the outer optimizer from the saved global LoRA and momentum."""
        self._start_outer(state["tensors"]["global"])
        self.outer.load_momentum(state["tensors"].get("momentum", {}))


class FDLoRAClient(ClientAlgorithm):
    """Trains the personal LoRA (stage 1 / syncs) and the global LoRA (stage 2); evaluates the AdaFusion of both."""

    def __init__(self, options: FDLoRAOptions, spec, seed: int) -> None:
        super().__init__(options, spec, seed)
        self.few_shot_examples = options.fusion_examples

    def fit(self, payload: Payload, state: ClientState, ctx: ClientContext) -> tuple[Reply, ClientState]:
        """Train the personal LoRA (stage 1) or the global one (stage 2, then sync or train the personal)."""
        model, n = ctx.model, len(ctx.data.train)
        if Stage(payload.config["stage"]) is Stage.LOCAL:
            metrics = self._train_personal(state, ctx)
            sent = {"stage1": state.states["personal"]} if "stage1" in payload.expects else {}
            return Reply(sent, n, metrics), state
        model.load_expert(0, payload.states["global"])
        metrics = ctx.trainer.train(experts=[0])
        theta_k = model.expert_state(0)
        if payload.config.get("sync"):
            state.states["personal"] = theta_k
        elif self.options.personal == "local":  # from the shared init if stage 1 never ran (stage1_rounds = 0)
            metrics["personal_train_loss"] = self._train_personal(state, ctx)["train_loss"]
        return Reply({"global": theta_k}, n, metrics), state

    def _train_personal(self, state: ClientState, ctx: ClientContext) -> dict[str, float]:
        """One local round of the personal LoRA theta_p (started from the shared init the first time)."""
        personal = state.states.get("personal") or self.spec.init_lora(generator(self.seed, "lora-init"))
        ctx.model.load_expert(0, personal)
        metrics = ctx.trainer.train(experts=[0])
        state.states["personal"] = ctx.model.expert_state(0)
        return metrics

    def personalize(self, payload: Payload, state: ClientState, ctx: ClientContext) -> Personalized:
        """The AdaFusion of the global and personal LoRAs (the global alone before a personal one)."""
        glob, personal = payload.states["global"], state.states.get("personal")
        if personal is None:  # before any local training there is nothing to fuse
            ctx.model.load_expert(0, glob)
            return Personalized()
        w = self.search_fusion(glob, personal, ctx)
        ctx.model.load_expert(0, fuse(w, glob, personal))
        return Personalized(diagnostics={"fusion_w_global": float(w[0]), "fusion_w_personal": float(w[1])})

    def search_fusion(self, glob: StateDict, personal: StateDict, ctx: ClientContext) -> np.ndarray:
        """AdaFusion: NGOpt over w in [-bound, bound]^2 from 0, minimising few-shot loss + l1 * mean|w|."""
        import nevergrad as ng

        opts = self.options
        few_shot = ctx.data.few_shot
        if few_shot is None or len(few_shot) == 0:
            raise ValueError("FDLoRA needs held-out few-shot examples (algorithm.options.fusion_examples)")
        space = ng.p.Array(init=np.zeros(2), lower=-opts.fusion_bound, upper=opts.fusion_bound)
        space.random_state = np.random.RandomState(derive_seed(ctx.seed, "adafusion") % (2**32))
        optimizer = ng.optimizers.NGOpt(parametrization=space, budget=opts.fusion_budget, num_workers=1)

        def objective(w: np.ndarray) -> float:
            ctx.model.load_expert(0, fuse(w, glob, personal))
            return fusion_objective(ctx.trainer.loss(few_shot), w, opts.fusion_l1)

        with warnings.catch_warnings():  # NGOpt's internal COBYLA warns about its own tiny budgets
            warnings.filterwarnings("ignore", message="COBYLA", category=UserWarning)
            return np.asarray(optimizer.minimize(objective).value, dtype=float)
