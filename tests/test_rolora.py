"""RoLoRA: rounds alternate between B and A; the trained factor's mean over a shared frozen one is exact."""

from __future__ import annotations

import pytest
import torch

from fedlora import run_experiment
from fedlora.adapters import AdapterSpec
from fedlora.algorithms import ClientInfo, Reply, build

from .conftest import tiny_config
from .test_methods_e2e import HEAD, LORA_BYTES, PATHS, spy  # noqa: F401  (fixture)

SPEC = AdapterSpec((("m", 5, 4),), r=2, alpha=4)


def rolora_server(options: dict | None = None):
    server, _ = build("rolora", options or {}, SPEC, seed=0)
    server.setup([ClientInfo(c, n) for c, n in zip("abc", (1, 3, 4))])
    return server


def test_each_round_averages_the_factor_it_trained_over_the_shared_frozen_one_exactly():
    server = rolora_server()
    start = dict(server.global_state)
    g = torch.Generator().manual_seed(0)
    b = {c: torch.randn(4, 2, generator=g) for c in "abc"}
    server.aggregate(1, {c: Reply({"b": {"m.lora_B": b[c]}}, n) for c, n in zip("abc", (1, 3, 4))})
    a0 = start["m.lora_A"]
    torch.testing.assert_close(server.global_state["m.lora_A"], a0)  # A untouched in a B-round
    mean_product = sum(w * b[c] @ a0 for c, w in zip("abc", (1 / 8, 3 / 8, 4 / 8)))
    torch.testing.assert_close(server.global_state["m.lora_B"] @ a0, mean_product)  # exact: A is shared
    a = {c: torch.randn(2, 5, generator=g) for c in "ab"}  # round 2 trains A; c is silent
    b1 = server.global_state["m.lora_B"]
    server.aggregate(2, {c: Reply({"a": {"m.lora_A": a[c]}}, n) for c, n in zip("ab", (1, 3))})
    torch.testing.assert_close(server.global_state["m.lora_B"], b1)
    torch.testing.assert_close(b1 @ server.global_state["m.lora_A"], sum(w * b1 @ a[c] for c, w in zip("ab", (1 / 4, 3 / 4))))


@pytest.mark.parametrize("first,order", [("B", "baba"), ("A", "abab")])
def test_the_rounds_alternate_from_the_configured_factor(first, order):
    server = rolora_server({"first": first})
    for rnd, name in enumerate(order, start=1):
        payload = server.configure(rnd, ["a"])["a"]
        assert payload.expects == {name} and payload.config == {"train": name} and set(payload.states) == {"a", "b"}


def test_rolora_end_to_end_trains_and_sends_one_factor_per_round(tmp_path, spy):  # noqa: F811
    run_experiment(tiny_config(tmp_path, federation={"rounds": 3}, algorithm={"name": "rolora"}))
    assert {r["round"] for r in spy} == {1, 2, 3}
    for r in spy:
        part = "B" if r["round"] % 2 else "A"
        assert r["trainable"] == {f"{p}.lora_{part}.0" for p in PATHS} | HEAD
        assert r["sent"] == {part.lower()} and r["received"] == {"a", "b"}
        assert r["up"] == LORA_BYTES // 2 and r["down"] == LORA_BYTES  # the tiny model's query/value are square
