"""The algorithm contract: a server object and a client object that know nothing about engines.

An engine calls, each round:
    payloads = server.configure(rnd, sampled)                       # what each client receives and must send
    reply, state = client.fit(payloads[cid], state, ctx)            # on the data owner
    server.aggregate(rnd, replies)                                  # replies may miss clients
and at evaluation points `server.configure_evaluate` + `client.personalize`.
Everything that crosses the boundary is a `Payload`/`Reply` of named adapter states (flat tensor dicts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from ..adapters import AdaptedModel, AdapterSpec, Layout
from ..core.dp import SumNoise
from ..core.seeding import generator
from ..core.tensors import StateDict, clone, coordinate_median, num_bytes, trimmed_mean, weighted_mean
from ..training import ClientDataset, InstanceWeighting, Trainer


@dataclass
class ClientInfo:
    """What the server knows about a client before any round."""

    client_id: str
    num_examples: int
    task: str = ""


@dataclass
class Payload:
    """Server -> client: named adapter states, a small JSON-able config, and the names of the states the reply
    must carry (what `aggregate` will read: the client uploads exactly these, the loop refuses a reply without)."""

    states: dict[str, StateDict] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    expects: frozenset[str] = frozenset()

    @property
    def num_bytes(self) -> int:
        """Bytes of tensors carried."""
        return num_bytes(self.states.values())


@dataclass
class Reply:
    """Client -> server: named adapter states, the example count and training metrics."""

    states: dict[str, StateDict] = field(default_factory=dict)
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    protocol_bytes: tuple[int, int] = (0, 0)  # (up, down) that secure aggregation's messages added

    @property
    def num_bytes(self) -> int:
        """Bytes of tensors carried."""
        return num_bytes(self.states.values())


@dataclass
class ClientState:
    """What a client keeps between rounds (never sent): named adapter states and small metadata."""

    states: dict[str, StateDict] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientContext:
    """What a method's client side works with in one turn: who the client is, its data, the shared model
    (already given this client's layout, head and optimizer moments) and the trainer for it."""

    client_id: str
    seed: int              # this turn's seed: derived from (run seed, phase, client, round) only
    data: ClientDataset
    trainer: Trainer

    @property
    def model(self) -> AdaptedModel:
        """The shared adapted model, for this client's turn."""
        return self.trainer.adapted


Diagnostic = float | dict[str, float]  # a number, or one number per adapted module / cluster / ...


@dataclass
class Personalized:
    """What a client's personalized model needs beyond the adapter slots `personalize` filled in."""

    hook: InstanceWeighting | None = None      # input-dependent expert weights (FedDPA)
    base_delta: StateDict | None = None        # updates merged into the frozen base weights (FLoRA)
    diagnostics: dict[str, Diagnostic] = field(default_factory=dict)  # kept apart from metrics, never averaged in


class Options(BaseModel):
    """Base of every method's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class AveragingOptions(Options):
    """Options of a method that averages client states: by example count (FedAvg) or uniformly."""

    weighting: Literal["examples", "uniform"] = "examples"


@dataclass(frozen=True)
class Aggregation:
    """How a server combines client states key by key (`federation.aggregation`): the weighted mean, or an
    unweighted robust statistic that a minority of poisoned updates cannot move far."""

    rule: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim_fraction: float = 0.1


def lora_rank(state: StateDict) -> int | None:
    """The LoRA rank of an expert state (or of its A or B half), None for a state without LoRA tensors."""
    for key, value in state.items():
        if key.endswith(".lora_A"):
            return int(value.shape[0])
        if key.endswith(".lora_B"):
            return int(value.shape[1])
    return None


@dataclass
class SecureMean:
    """Under secure aggregation, all the server learns of a round's replies: the weighted mean of each state it
    expects (over the clients whose masked update arrived), the sum of their weights, and who they are."""

    states: dict[str, StateDict]
    weight: float
    clients: list[str]


class ServerAlgorithm:
    """The server side of a method."""

    # privacy.dp = client_clipping: the noise every sum the server forms gets (set by the round loop), and whether
    # a round's sums hold only that round's replies, so that client sampling hides who took part
    noise: SumNoise | None = None
    # set by the round loop where the DP noise is calibrated to a uniform mean (central DP, and local DP shared out
    # under secure aggregation): every client weighs 1, whatever `weighting` says
    uniform_weights: bool = False
    dp_amplified: ClassVar[bool] = True
    # replies may carry LoRAs of any rank (clients train at `clients.lora_r`); otherwise every reply is at lora.r
    heterogeneous_ranks: ClassVar[bool] = False
    # privacy.dp modes the method cannot honour, each with the reason (a release no noise covers, a sum whose
    # sensitivity is not the clip norm); checked before any run
    dp_refusals: ClassVar[dict[str, str]] = {}
    # federation.secure_aggregation: None where the server reads only the weighted mean of each round's replies (it
    # implements aggregate_secure; `secure` is then set by the round loop), otherwise why it needs single updates
    secure_refusal: ClassVar[str | None] = "its server reads each client's update, not only the round's mean"
    secure: bool = False

    def __init__(self, options: Options, spec: AdapterSpec, seed: int, aggregation: Aggregation = Aggregation()) -> None:
        self.options, self.spec, self.seed, self.aggregation = options, spec, seed, aggregation
        self.clients: dict[str, ClientInfo] = {}

    def lora_init(self) -> StateDict:
        """The run's shared seeded LoRA init (every client's fresh LoRA starts from it), built once."""
        if getattr(self, "_lora_init", None) is None:  # getattr: a subclass's __init__ need not call ours
            self._lora_init = self.spec.init_lora(generator(self.seed, "lora-init"))
        return self._lora_init

    def setup(self, clients: list[ClientInfo], rounds: int | None = None) -> None:
        """Called once before round 1 with every client and the run's number of rounds."""
        self.clients = {c.client_id: c for c in clients}
        self.rounds = rounds

    def weight(self, client_id: str) -> float:
        """A client's aggregation weight: its example count if `options.weighting == "examples"`, else 1 (always 1
        under DP noise calibrated to a uniform mean: `uniform_weights`)."""
        uniform = self.noise is not None or self.uniform_weights
        if not uniform and getattr(self.options, "weighting", "uniform") == "examples":
            return float(self.clients[client_id].num_examples)
        return 1.0

    def client_mean(self, states: dict[str, StateDict]) -> StateDict:
        """The states keyed by client id combined key by key (A and B separately) by the aggregation rule: the
        weighted mean (noised under central DP), or the coordinate-wise median / trimmed mean."""
        if self.noise is not None:  # the uniform mean, noised as the sum of the clipped states is
            mean = weighted_mean(list(states.values()), [1.0] * len(states))
            return self.noise.noised_mean(mean, len(states), *sorted(states), min(mean, default=""))
        return self.combine(states)

    def combine(self, states: dict[str, StateDict]) -> StateDict:
        """The states keyed by client id combined by the aggregation rule, without DP noise (for states already
        noised one by one): the weighted mean, or the coordinate-wise median / trimmed mean."""
        if self.aggregation.rule == "median":
            return coordinate_median(list(states.values()))
        if self.aggregation.rule == "trimmed_mean":
            return trimmed_mean(list(states.values()), self.aggregation.trim_fraction)
        return weighted_mean(list(states.values()), [self.weight(cid) for cid in states])

    def update_reference(self, client_id: str, name: str, payload: Payload, reply: Reply) -> StateDict | None:
        """What reply state `name` is an update of, for update clipping: by default the payload's state of that name
        (the client's `started_from`); None when the client had nothing to start from that the server knows."""
        return payload.states.get(name)

    def configure(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        """Payloads for the clients sampled in round `rnd` (1-based), each naming the states its reply must carry."""
        return {cid: Payload() for cid in clients}

    def configure_evaluate(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        """Payloads for evaluation after round `rnd` (0 = before training); by default the next round's."""
        return self.configure(rnd + 1, clients)

    def aggregate(self, rnd: int, replies: dict[str, Reply]) -> None:
        """Fold the replies of round `rnd` into the server state; missing clients simply have no reply."""

    def aggregate_secure(self, rnd: int, mean: SecureMean) -> None:
        """Under secure aggregation: fold the round's weighted means (never one client's update) into the server
        state. Replies that carried no states (the method expected none) still come through `aggregate`."""
        raise NotImplementedError(f"{type(self).__name__} does not aggregate securely: {self.secure_refusal}")

    def secure_mean(self, mean: SecureMean, name: str) -> StateDict:
        """State `name`'s mean over the round (noised under central DP, as `client_mean` noises it)."""
        if self.noise is not None:
            state = mean.states[name]
            return self.noise.noised_mean(state, len(mean.clients), *sorted(mean.clients), min(state, default=""))
        return mean.states[name]

    def reply_problem(self, rnd: int, client_id: str, reply: Reply) -> str | None:
        """Why this method cannot aggregate a reply beyond the loop's checks (shapes, finiteness, the states the
        payload expects, the rank), or None."""
        return None

    def schedule_problems(self, rounds: int) -> list[str]:
        """What of the method's schedule cannot happen within `rounds` rounds (warned before round 1)."""
        return []

    def diagnostics(self) -> dict[str, Any]:
        """Small JSON-able facts about the server's state, recorded each round and rendered by reports.

        Keys reports know: `assignment` ({client: group}: a table of groups), `silhouette` ({K: score}: a plot
        of the choice of K), `n_experts`; anything else is listed as it is."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: {"tensors": {name: StateDict}, "meta": JSON-able}."""
        return {"tensors": {}, "meta": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


class ClientAlgorithm(ABC):
    """The client side of a method."""

    layout: Layout = Layout()  # the adapter layout of every round, unless layout_for says otherwise
    few_shot_examples: int = 0  # training examples each client holds out (`ctx.data.few_shot`) for a gradient-free search
    # the personalized model adds an update to the frozen base weights (`Personalized.base_delta`): no quantized
    # base, and no clients trained together over one shared base
    merges_into_base: ClassVar[bool] = False

    def __init__(self, options: Options, spec: AdapterSpec, seed: int) -> None:
        self.options, self.spec, self.seed = options, spec, seed

    def rank_problem(self, ranks: dict[str, int]) -> str | None:
        """Why these per-client LoRA ranks (`clients.lora_r`: client id -> rank) cannot be trained, or None. By
        default every client must train at lora.r; a method whose server has `heterogeneous_ranks` overrides it."""
        other = {cid: rank for cid, rank in ranks.items() if rank != self.spec.r}
        if not other:
            return None
        shown = ", ".join(f"{cid}: {rank}" for cid, rank in list(other.items())[:4]) + (", ..." if len(other) > 4 else "")
        return f"it needs every client at rank lora.r={self.spec.r}, but {len(other)} differ ({shown})"

    @staticmethod
    def started_from(name: str, payload: Payload, reply: Reply) -> StateDict | None:
        """Which of the payload's states reply state `name` was trained from (under DP the client clips its update
        against it): by default the payload's state of that name; None when the payload sent none."""
        return payload.states.get(name)

    def uploaded(self, reply: Reply, state: ClientState) -> ClientState:
        """Called with the reply as it leaves the client (clipped and noised under DP); the state to keep. A method
        that must know what the server received (not what it trained) records it here; by default nothing."""
        return state

    def layout_for(self, payload: Payload) -> Layout:
        """The adapter layout this payload needs (methods whose layout changes by phase override it)."""
        return self.layout

    @abstractmethod
    def fit(self, payload: Payload, state: ClientState, ctx: ClientContext) -> tuple[Reply, ClientState]:
        """One local round; returns what to send (the states `payload.expects`) and the state to keep."""

    @abstractmethod
    def personalize(self, payload: Payload, state: ClientState, ctx: ClientContext) -> Personalized:
        """Put the client's personalized model into `ctx.model` (what evaluation, export and predict use)."""


class BroadcastAverageServer(ServerAlgorithm):
    """Broadcasts one global state under `state_name` and replaces it by the weighted mean of the replies
    (FedAvg). FedIT, FFA-LoRA, FedSA-LoRA and FedDPA differ only in which state that is."""

    state_name = "global"
    secure_refusal = None

    def initial_state(self) -> StateDict:
        """The global state before round 1: by default the shared seeded LoRA init."""
        return clone(self.lora_init())  # a copy: aggregation may update the global state in place

    def payload_config(self, rnd: int) -> dict[str, Any]:
        """Extra config sent with the global state in round `rnd`."""
        return {}

    def setup(self, clients: list[ClientInfo], rounds: int | None = None) -> None:
        """Record the clients and start the global state from `initial_state`."""
        super().setup(clients, rounds)
        self.global_state = self.initial_state()

    def configure(self, rnd: int, clients: list[str]) -> dict[str, Payload]:
        """Send every sampled client the global state and this round's `payload_config`; the reply carries it back."""
        return {cid: Payload({self.state_name: self.global_state}, self.payload_config(rnd), frozenset({self.state_name}))
                for cid in clients}

    def aggregate(self, rnd: int, replies: dict[str, Reply]) -> None:
        """Replace the global state by the weighted mean of the replies' states (kept if none replied)."""
        if replies:
            self.global_state = self.client_mean({cid: r.states[self.state_name] for cid, r in replies.items()})

    def aggregate_secure(self, rnd: int, mean: SecureMean) -> None:
        """Replace the global state by the round's securely aggregated mean."""
        self.global_state = self.secure_mean(mean, self.state_name)

    def state_dict(self) -> dict[str, Any]:
        """The global state, to resume from."""
        return {"tensors": {self.state_name: self.global_state}, "meta": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the global state saved by `state_dict`."""
        self.global_state = state["tensors"][self.state_name]
