"""Config sections: the base of every section, and the per-client settings of `[clients]` (one value, a list in
client order, a mapping client id -> value, or a rule proportional to data size)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ProportionalRule(Section):
    """A per-client value proportional to the client's training-set size: round(base * n_k / n_max), clipped."""

    rule: Literal["proportional"]
    base: float | None = Field(None, gt=0, description="the largest client's value (default: the global setting)")
    min: float = Field(1, gt=0, description="no client gets less")
    max: float | None = Field(None, gt=0, description="no client gets more (default: base)")


def _per_client_kind(value: Any) -> str:
    """Which form a per-client setting takes, so that a bad value gets that form's error only."""
    if isinstance(value, ProportionalRule) or value == "proportional" or isinstance(value, dict) and "rule" in value:
        return "proportional"
    return {list: "list", dict: "mapping"}.get(type(value), "value")


def _rule_shorthand(value: Any) -> Any:
    return {"rule": value} if value == "proportional" else value  # `--set clients.lora_r=proportional`


def _per_client(value_type: Any) -> Any:
    """A per-client setting: one value, a list in client order, a mapping client id -> value, or a rule."""
    return Annotated[Annotated[value_type, Tag("value")] | Annotated[list[value_type], Tag("list")]
                     | Annotated[dict[str, value_type], Tag("mapping")]
                     | Annotated[ProportionalRule, BeforeValidator(_rule_shorthand), Tag("proportional")],
                     Discriminator(_per_client_kind)]


PerClientInt = _per_client(Annotated[int, Field(gt=0)])
PerClientFloat = _per_client(Annotated[float, Field(gt=0)])
PER_CLIENT_HELP = ("one value for every client, a list in client order, a mapping client id -> value (others keep "
                   "the global setting), or {rule = 'proportional', min, max, base} (proportional to data size)")


class ClientsConfig(Section):
    """Per-client compute: data-parallel workers and heterogeneous budgets (unset: every client alike)."""

    workers: PerClientInt = Field(1, description="data-parallel worker processes of a client's local training; "
                                  + PER_CLIENT_HELP)
    worker_threads: int | None = Field(None, gt=0, description="torch threads per worker (default: cores // workers)")
    worker_timeout: float = Field(1800.0, gt=0, description="seconds a worker may wait for the others in one step")
    local_steps: PerClientInt | None = Field(None, description="overrides training.local_steps; " + PER_CLIENT_HELP)
    local_epochs: PerClientFloat | None = Field(None, description="overrides training.local_epochs; " + PER_CLIENT_HELP)
    batch_size: PerClientInt | None = Field(None, description="overrides training.batch_size (the global batch "
                                            "of all a client's workers); " + PER_CLIENT_HELP)
    lora_r: PerClientInt | None = Field(None, description="each client's LoRA rank (methods that take per-client "
                                        "ranks: flora, hetlora, local); " + PER_CLIENT_HELP)

    @model_validator(mode="after")
    def _one_budget(self) -> "ClientsConfig":
        if self.local_steps is not None and self.local_epochs is not None:
            raise ValueError("set either clients.local_steps or clients.local_epochs, not both")
        return self
