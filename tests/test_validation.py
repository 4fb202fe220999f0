"""Update validation: malformed, non-finite or outsized client states are rejected before aggregation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora import run_experiment
from fedlora.adapters import AdapterSpec
from fedlora.algorithms import Payload, Reply
from fedlora.engines.runtime import ClientRuntime
from fedlora.engines.validation import reply_problem

from .conftest import tiny_config

SPEC = AdapterSpec((("m0", 6, 5), ("m1", 6, 5)), r=2, alpha=4)


def check_reply(reply: Reply, spec: AdapterSpec, max_norm: float | None = None) -> str | None:
    """The shape checks alone: a payload that expects nothing, any rank (as FLoRA's)."""
    return reply_problem(reply, Payload(), spec, max_norm, any_rank=True)


def expert(r: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*shape, generator=g) for k, shape in SPEC.lora_shapes(r).items()}


def test_acceptable_states():
    router = {"m0.router": torch.zeros(3, 6), "m1.router": torch.zeros(3, 6)}
    a_half = {k: v for k, v in expert().items() if k.endswith("lora_A")}
    assert check_reply(Reply({"global": expert(), "router": router, "a": a_half}, 10, {"loss": 1.0}), SPEC) is None
    assert check_reply(Reply({"lora": expert(r=4)}, 3), SPEC) is None  # another rank, consistent (FLoRA)


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s["m0.lora_A"].__setitem__((0, 0), math.nan), "NaN or infinite"),
    (lambda s: s["m1.lora_B"].__setitem__((1, 1), math.inf), "NaN or infinite"),
    (lambda s: s.pop("m1.lora_B"), "wrong keys"),
    (lambda s: s.__setitem__("m2.lora_A", torch.zeros(2, 6)), "wrong keys"),
    (lambda s: s.__setitem__("m0.lora_A", torch.zeros(2, 7)), "input size is 6"),
    (lambda s: s.__setitem__("m0.lora_B", torch.zeros(4, 2)), "output size is 5"),
    (lambda s: s.__setitem__("m0.lora_A", torch.zeros(3, 6)), "mixes ranks"),
    (lambda s: s.__setitem__("m0.lora_A", torch.zeros(2, 6, dtype=torch.int64)), "floating-point"),
    (lambda s: s.__setitem__("m0.weight", torch.zeros(5, 6)), "neither LoRA nor router"),
])
def test_malformed_states_are_rejected_with_a_reason(mutate, message):
    state = expert()
    mutate(state)
    assert message in check_reply(Reply({"global": state}, 1), SPEC)


def test_bad_counts_metrics_and_norm():
    assert "between 0 and 1e+12" in check_reply(Reply({"global": expert()}, -1), SPEC)
    assert "finite number" in check_reply(Reply({"global": expert()}, 1, {"loss": math.nan}), SPEC)
    big = {k: v * 1e6 for k, v in expert().items()}
    assert "max_state_norm" in check_reply(Reply({"global": big}, 1), SPEC, max_norm=100.0)
    assert check_reply(Reply({"global": expert()}, 1), SPEC, max_norm=100.0) is None


MUTATIONS = st.sampled_from(["nan", "inf", "drop", "extra", "transpose", "rank", "int", "empty"])


@settings(max_examples=60, deadline=None)
@given(mutation=MUTATIONS, key=st.sampled_from(sorted(SPEC.lora_shapes())), seed=st.integers(0, 10**6))
def test_any_malformed_update_is_rejected(mutation, key, seed):
    state = expert(seed=seed % 1000)
    if mutation == "nan":
        state[key].view(-1)[seed % state[key].numel()] = math.nan
    elif mutation == "inf":
        state[key].view(-1)[seed % state[key].numel()] = -math.inf
    elif mutation == "drop":
        del state[key]
    elif mutation == "extra":
        state[key.replace("m", "x")] = state[key].clone()
    elif mutation == "transpose":
        state[key] = state[key].T.contiguous() if state[key].shape[0] != state[key].shape[1] else state[key][:, :1]
    elif mutation == "rank":
        state[key] = torch.cat([state[key], state[key]], dim=0 if key.endswith("lora_A") else 1)
    elif mutation == "int":
        state[key] = state[key].long()
    else:
        state = {}
    assert check_reply(Reply({"s": state}, 1), SPEC) is not None


def test_a_nan_update_is_left_out_and_reaches_no_other_client(tmp_path, monkeypatch):
    original = ClientRuntime.fit

    def poisoned(self, cid, rnd, payload, state):
        reply, new_state = original(self, cid, rnd, payload, state)
        if cid == "noun_topic-1" and rnd == 2:
            reply.states["global"] = {k: v * math.nan for k, v in reply.states["global"].items()}
        return reply, new_state

    monkeypatch.setattr(ClientRuntime, "fit", poisoned)
    result = run_experiment(tiny_config(tmp_path, federation={"rounds": 3}))
    assert "update rejected" in result.rounds[2]["failures"]["noun_topic-1"]
    assert set(result.rounds[2]["fit"]) == {"noun_topic-0", "verb_class-0", "verb_class-1"}
    glob = result.server_state["tensors"]["global"]
    assert all(bool(torch.isfinite(v).all()) for v in glob.values())
    assert all(math.isfinite(m["loss"]) for m in result.final.values())


def test_a_reply_must_carry_what_its_payload_expects_at_the_method_rank():
    wants_global = Payload(expects=frozenset({"global"}))
    assert "lacks the state(s) ['global']" in reply_problem(Reply({"other": expert()}, 1), wants_global, SPEC)
    assert reply_problem(Reply({"global": expert()}, 1), wants_global, SPEC) is None
    low = Reply({"global": expert(r=1)}, 1)
    assert "rank 1, but this method aggregates rank lora.r=2 only" in reply_problem(low, wants_global, SPEC)
    assert reply_problem(low, wants_global, SPEC, any_rank=True) is None
