"""Clients that differ: data-parallel local training inside a client (2 gloo workers = 1 worker), failures
and clean shutdown of the worker processes, and per-client steps, batch sizes and LoRA ranks (FLoRA stacking,
HetLoRA-style zero-padding, a clear refusal by every other method)."""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import psutil
import pytest
import torch

from fedlora import run_experiment
from fedlora.adapters import AdapterSpec
from fedlora.algorithms import METHODS, ClientInfo, ClientState, Payload, Reply, build
from fedlora.algorithms.hetlora import resize
from fedlora.core.config import build_config
from fedlora.core.errors import ClientFailure, ConfigError
from fedlora.engines.session import build_session
from fedlora.engines.validation import reply_problem
from fedlora.training import Trainer, WorkerPool, client_budgets
from fedlora.training.budgets import per_client
from fedlora.training.distributed import DataParallel, worker_devices

from .conftest import tiny_config

SPEC = AdapterSpec((("m", 5, 4),), r=4, alpha=8)
IDS = ["noun_topic-0", "noun_topic-1", "verb_class-0", "verb_class-1"]


def children() -> set[int]:
    """Live data-parallel worker processes of this process."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "fedlora.training.distributed" in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def config(**sections):
    """The tiny experiment config with these sections (no run directory is written)."""
    return build_config(tiny_config(Path("/nonexistent"), **sections))


def no_dropout(session) -> None:
    """Exact 1-vs-2-worker equality needs the same dropout masks; off here (the helpers copy the model)."""
    for module in session.adapted.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def generation_data(tmp_path) -> str:
    path = tmp_path / "gen.jsonl"
    words = ["cat", "dog", "sun", "sea", "tree", "stone", "river", "cloud"]
    rows = [{"task": "echo", "prompt": f"say {w} " * (1 + i % 3) + ":", "response": f"{w} " * (1 + i % 4)}
            for i, w in enumerate(words * 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# -- data-parallel clients ---------------------------------------------------------------------------------
def fit_once(tmp_path, workers: int, method: str, model: str):
    """One local round of the first client, from a fresh session, with `workers` data-parallel workers."""
    sections = dict(algorithm={"name": method}, clients={"workers": workers},
                    training={"lr": 1e-2, "local_steps": 5, "batch_size": 7})  # 7: uneven shards, a short last batch
    if model == "tiny-llama":
        sections.update(model={"name": "tiny-llama"}, data={"dataset": generation_data(tmp_path), "tasks": None,
                                                             "partition": "iid", "max_length": 32})
    session = build_session(build_config(tiny_config(tmp_path, **sections)))
    no_dropout(session)
    session.server.setup(session.infos)
    cid = session.infos[0].client_id
    try:
        return session.runtime.fit(cid, 1, session.server.configure(1, [cid])[cid], ClientState())
    finally:
        session.runtime.close()


def assert_same_tensors(got: dict, expected: dict) -> None:
    """Equal up to float32 rounding: per tensor, |got - expected| / |expected| below 1e-4 (typically ~1e-7).
    Sharded batches sum in another order; AdamW amplifies that noise for the few elements whose gradient is
    near its eps (1e-8), where the step g / (|g| + eps) is most sensitive, so a tensor can reach a few 1e-5."""
    assert set(got) == set(expected)
    for key, value in expected.items():
        error = float((got[key].double() - value.double()).norm() / value.double().norm().clamp_min(1e-12))
        assert error < 1e-4, (key, error)


@pytest.mark.parametrize("method,model", [("fedit", "tiny-llama")] + [  # each starts worker processes: a few s
    pytest.param(m, model, marks=pytest.mark.slow) for m, model in [("fedalt", "tiny-bert"), ("fedit", "tiny-bert"),
                                                                    ("fedalt", "tiny-llama")]])
def test_two_gloo_workers_give_the_adapters_of_one_worker(tmp_path, method, model):
    one, one_state = fit_once(tmp_path, 1, method, model)
    two, two_state = fit_once(tmp_path, 2, method, model)
    assert two.metrics["train_loss"] == pytest.approx(one.metrics["train_loss"], rel=1e-5)
    for name, state in one.states.items():
        assert_same_tensors(two.states[name], state)
    for name, state in one_state.states.items():  # the kept state too: private head, FedALT's gate
        assert_same_tensors(two_state.states[name], state)
    assert not children()


@pytest.mark.slow
def test_fp16_loss_scaling_over_workers_equals_one_worker_even_with_an_empty_shard(tmp_path, monkeypatch):
    """fp16's GradScaler with data-parallel workers (allowed on the CPU here: autocast has fp16 there, only the
    session refuses it): each worker scales its shard's loss, the summed gradients are unscaled once. Batch 1 on
    2 workers leaves rank 0 without items at every step, which must still give the scaler its scale."""
    import fedlora.engines.session as session_module

    monkeypatch.setattr(session_module, "check_precision", lambda precision, device: None)
    results = []
    for workers in (1, 2):
        cfg = tiny_config(tmp_path, clients={"workers": workers},
                          training={"lr": 1e-2, "local_steps": 3, "batch_size": 1, "precision": "fp16"})
        session = build_session(build_config(cfg))
        no_dropout(session)
        session.server.setup(session.infos)
        cid = session.infos[0].client_id
        try:
            results.append(session.runtime.fit(cid, 1, session.server.configure(1, [cid])[cid], ClientState()))
        finally:
            session.runtime.close()
    (one, _), (two, _) = results
    assert two.metrics["train_loss"] == pytest.approx(one.metrics["train_loss"], rel=1e-3)
    for name, state in one.states.items():
        for key, value in state.items():  # fp16 autocast on both sides: compare to fp16's precision
            assert torch.allclose(two.states[name][key], value, atol=1e-3, rtol=1e-2), (name, key)


def test_each_cuda_worker_gets_its_own_gpu_and_too_few_gpus_is_a_clear_error(monkeypatch):
    """NCCL cannot hold two ranks of a group on one GPU: rank k takes the k-th GPU after rank 0's."""
    assert worker_devices(torch.device("cpu"), 3) == [torch.device("cpu")] * 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert worker_devices(torch.device("cuda", 0), 4) == [torch.device("cuda", k) for k in range(4)]
    assert worker_devices(torch.device("cuda"), 3) == [torch.device("cuda", k) for k in (1, 2, 3)]  # "cuda": current
    with pytest.raises(ConfigError, match=r"clients.workers = 3 on CUDA needs one GPU per worker.*only 4 are"):
        worker_devices(torch.device("cuda", 2), 3)


@pytest.mark.slow
def test_a_run_with_two_workers_matches_one_worker_and_leaves_no_process(tmp_path):
    base = dict(model={"name": "tiny-llama"}, federation={"rounds": 2},  # AdamW moments carried to round 2 too
                data={"dataset": generation_data(tmp_path), "tasks": None, "partition": "iid", "max_length": 32},
                training={"max_new_tokens": 4, "batch_size": 5, "reset_optimizer": False})
    one = run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "one"), **base))
    two = run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "two"), clients={"workers": 2}, **base))
    for a, b in zip(one.evaluations(), two.evaluations()):
        for cid, metrics in a["eval"].items():
            assert b["eval"][cid]["loss"] == pytest.approx(metrics["loss"], rel=1e-4)
    gc.collect()  # the run's session (and with it the worker pool) is gone
    assert not children()


class FailingJob:
    """A helper job that fails (defined here: helpers import this module like any other)."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __call__(self, dp, adapted) -> None:
        if self.how == "raise":
            raise RuntimeError("worker out of memory")
        os._exit(9)  # killed: no report, just a closed pipe


@pytest.mark.parametrize("how,message", [("raise", r"worker 1 \(pid \d+\) raised RuntimeError: worker out of memory "
                                                   r"\(at test_clients.py:\d+ in __call__\)"),
                                         pytest.param("die", r"worker 1 \(pid \d+\) died with exit code 9",
                                                      marks=pytest.mark.slow)])
def test_a_failing_worker_raises_client_failure_not_a_hang(tiny_adapted, how, message):
    adapted, _ = tiny_adapted
    pool = WorkerPool(adapted, 2, timeout=60)
    assert len(children()) == 1
    params = [torch.nn.Parameter(torch.ones(3))]
    start = time.perf_counter()
    with pytest.raises(ClientFailure, match=message):
        pool.run(2, 1, FailingJob(how), lambda dp: dp.all_reduce(params, None))
    assert time.perf_counter() - start < 30
    assert not pool.alive and not children()


@pytest.mark.slow
def test_workers_are_reused_across_rounds_and_replaced_when_one_died(tmp_path):
    session = build_session(config(clients={"workers": 2}))
    session.server.setup(session.infos)
    cid = session.infos[0].client_id
    payload = session.server.configure(1, [cid])[cid]
    try:
        session.runtime.fit(cid, 1, payload, ClientState())
        (helper,) = children()
        session.runtime.fit(cid, 2, payload, ClientState())
        assert children() == {helper}
        psutil.Process(helper).kill()
        psutil.Process(helper).wait(10)
        reply, _ = session.runtime.fit(cid, 3, payload, ClientState())  # a fresh pool
        assert reply.metrics["steps"] == 3 and len(children()) == 1 and helper not in children()
    finally:
        session.runtime.close()
    assert not children()


@pytest.mark.slow
def test_clients_with_different_worker_counts_share_one_pool_that_grows(tmp_path):
    session = build_session(config(clients={"workers": {"noun_topic-0": 2, "noun_topic-1": 3}}))
    session.server.setup(session.infos)
    payloads = session.server.configure(1, IDS)
    try:
        session.runtime.fit("noun_topic-0", 1, payloads["noun_topic-0"], ClientState())
        assert len(children()) == 1
        session.runtime.fit("noun_topic-1", 1, payloads["noun_topic-1"], ClientState())
        helpers = children()
        assert len(helpers) == 2
        reply, _ = session.runtime.fit("noun_topic-0", 1, payloads["noun_topic-0"], ClientState())  # ranks 0-1 of 3
        assert children() == helpers and reply.metrics["steps"] == 3
        session.runtime.fit("verb_class-0", 1, payloads["verb_class-0"], ClientState())  # 1 worker: no pool use
    finally:
        session.runtime.close()
    assert not children()


@pytest.mark.slow
def test_flower_client_app_trains_with_its_workers(tmp_path):
    from flwr.app import Context, MessageType, RecordDict

    from fedlora.flower import client_app
    from fedlora.flower.wire import decode

    from .test_flower import _message

    cfg = build_config(tiny_config(tmp_path, algorithm={"name": "fedalt"}, clients={"workers": 2}))
    app, before = client_app.make_client_app(cfg), set(client_app._SESSIONS)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    try:
        states, info = decode(app(_message(MessageType.TRAIN, {}, {"round": 1}), context).content)
        assert set(states) == {"individual"} and info["metrics"]["steps"] == 3
        pool_pids = children()
        app(_message(MessageType.TRAIN, {}, {"round": 2}), context)
        assert children() == pool_pids and len(pool_pids) == 1  # the node's workers are reused across rounds
    finally:
        for key in set(client_app._SESSIONS) - before:  # the node's session would live as long as the process
            client_app._SESSIONS.pop(key).runtime.close()
    assert not children()


def test_a_batch_is_split_into_contiguous_shards_some_possibly_empty():
    assert [DataParallel(k, 2).shard([4, 5, 6, 7, 8]) for k in range(2)] == [[4, 5], [6, 7, 8]]
    assert [DataParallel(k, 2).shard([9]) for k in range(2)] == [[], [9]]  # the empty one still all-reduces zeros


# -- heterogeneous budgets ---------------------------------------------------------------------------------
def test_per_client_values_from_a_number_a_list_a_mapping_and_the_proportional_rule():
    cfg = config()
    sizes = dict(zip(IDS, [40, 20, 10, 40]))
    assert per_client(None, "lora_r", sizes, 8) == dict.fromkeys(IDS, 8)
    assert per_client(2, "workers", sizes, None) == dict.fromkeys(IDS, 2)
    assert list(per_client([1, 2, 3, 4], "lora_r", sizes, 8).values()) == [1, 2, 3, 4]
    assert per_client({"verb_class-0": 2}, "lora_r", sizes, 8)["verb_class-0"] == 2
    rule = config(clients={"lora_r": {"rule": "proportional", "min": 3}}).clients.lora_r
    assert per_client(rule, "lora_r", sizes, 8) == dict(zip(IDS, [8, 4, 3, 8]))  # 8 * n / 40, at least 3
    budgets = client_budgets(config(clients={
        "local_steps": "proportional", "batch_size": [4, 8, 8, 16], "lora_r": {"verb_class-1": 2}}), sizes)
    assert [b.training.local_steps for b in budgets.values()] == [3, 2, 1, 3]  # training.local_steps = 3
    assert [b.training.batch_size for b in budgets.values()] == [4, 8, 8, 16]
    assert [b.lora_r for b in budgets.values()] == [4, 4, 4, 2] and cfg.clients.workers == 1
    assert [b.workers for b in client_budgets(config(clients={"workers": {"verb_class-0": 2}}), sizes).values()] == [
        1, 1, 2, 1]
    epochs = client_budgets(config(clients={"local_epochs": [0.5, 1, 1, 2]}), sizes)
    assert [(b.training.local_steps, b.training.local_epochs) for b in epochs.values()] == [
        (None, 0.5), (None, 1.0), (None, 1.0), (None, 2.0)]


def test_a_data_owner_with_only_its_own_data_takes_a_mapping_naming_others():
    own = {"hospital-a": 120}
    assert client_budgets(config(clients={"lora_r": {"hospital-a": 2, "hospital-b": 8}}), own, whole_split=False)[
        "hospital-a"].lora_r == 2
    for value in ([2, 8], "proportional"):
        with pytest.raises(ConfigError, match="sees only its own data; give a mapping client id -> value"):
            client_budgets(config(clients={"lora_r": value}), own, whole_split=False)


@pytest.mark.parametrize("clients,message", [
    ({"lora_r": [2, 4]}, r"clients.lora_r has 2 entries for 4 clients; give one per client, in client order"),
    ({"batch_size": {"nobody": 3}}, r"clients.batch_size names unknown clients \['nobody'\]"),
    ({"workers": "proportional"}, r"clients.workers = proportional needs a base value"),
])
def test_bad_per_client_settings_are_refused_clearly(clients, message):
    with pytest.raises(ConfigError, match=message):
        client_budgets(config(clients=clients), dict.fromkeys(IDS, 10))


def test_config_errors_name_the_form_and_the_valid_keys():
    with pytest.raises(ConfigError, match=r"clients.lora_r.list.0': Input should be greater than 0"):
        config(clients={"lora_r": [0, 2, 2, 2]})
    with pytest.raises(ConfigError, match=r"Did you mean 'min'\? Valid keys in \[clients.lora_r.proportional\]: base"):
        config(clients={"lora_r": {"rule": "proportional", "mn": 2}})
    with pytest.raises(ConfigError, match="either clients.local_steps or clients.local_epochs"):
        config(clients={"local_steps": 2, "local_epochs": 1})


def test_each_client_trains_with_its_own_steps_batch_size_and_rank(tmp_path, monkeypatch):
    seen: dict[str, tuple] = {}
    original = Trainer.train

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen[self.client_id] = (out["steps"], self.cfg.batch_size, self.adapted.rank)
        return out

    monkeypatch.setattr(Trainer, "train", spy)
    run_experiment(tiny_config(tmp_path, algorithm={"name": "flora"}, federation={"rounds": 1}, clients={
        "local_steps": [1, 2, 3, 4], "batch_size": {"verb_class-1": 4}, "lora_r": [2, 4, 8, 4]}))
    assert seen == {"noun_topic-0": (1, 8, 2), "noun_topic-1": (2, 8, 4), "verb_class-0": (3, 8, 8),
                    "verb_class-1": (4, 4, 4)}


@pytest.mark.parametrize("method", ["fedit", "fedalt", "ffa", "fedsa", "feddpa", "fedlease", "fdlora", "ifca", "fedex"])
def test_methods_without_heterogeneous_ranks_refuse_them(tmp_path, method):
    message = (rf"algorithm '{method}' cannot train the ranks in clients.lora_r: it needs every client at rank "
               r"lora.r=4, but 2 differ \(noun_topic-0: 2, verb_class-1: 8\); per-client ranks work with local, flora, "
               r"flexlora, hetlora; otherwise set lora.r and drop clients.lora_r")
    with pytest.raises(ConfigError, match=message):
        build_session(build_config(tiny_config(tmp_path, algorithm={"name": method},
                                               clients={"lora_r": {"noun_topic-0": 2, "verb_class-1": 8}})))


def test_rank_settings_that_flora_and_hetlora_refuse(tmp_path):
    with pytest.raises(ConfigError, match=r"client ranks exceed it \(verb_class-1: 8\); raise lora.r"):
        build_session(build_config(tiny_config(tmp_path, algorithm={"name": "hetlora"},
                                               clients={"lora_r": {"verb_class-1": 8}})))


def random_lora(r: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A": torch.randn(r, 5, generator=g), "m.lora_B": torch.randn(4, r, generator=g)}


def update(lora: dict[str, torch.Tensor], alpha: float = 8) -> torch.Tensor:
    r = lora["m.lora_A"].shape[0]
    return alpha / r * lora["m.lora_B"] @ lora["m.lora_A"]


def test_hetlora_resize_pads_with_zeros_and_truncation_keeps_the_leading_components():
    small = random_lora(2, 0)
    padded = resize(small, 4)
    assert padded["m.lora_A"].shape == (4, 5) and padded["m.lora_B"].shape == (4, 4)
    assert not padded["m.lora_A"][2:].any() and not padded["m.lora_B"][:, 2:].any()
    torch.testing.assert_close(update(padded), update(small))          # zero-padding keeps the update exactly
    torch.testing.assert_close(resize(padded, 2), small)               # and truncation undoes it
    big = random_lora(4, 1)
    head = {"m.lora_A": big["m.lora_A"][:2], "m.lora_B": big["m.lora_B"][:, :2]}
    torch.testing.assert_close(update(resize(big, 2)), update(head, alpha=8 * 2 / 4))  # the first 2 components, at s_4


def test_hetlora_server_zero_pads_averages_and_sends_each_client_its_rank():
    server, _ = build("hetlora", {"weighting": "uniform"}, SPEC, seed=0)
    server.setup([ClientInfo(c, 1) for c in "ab"])
    first = server.configure(1, ["a", "b"])
    assert all(p.states["global"]["m.lora_A"].shape == (4, 5) for p in first.values())  # ranks not yet known
    a, b = random_lora(2, 0), random_lora(4, 1)
    server.aggregate(1, {"a": Reply({"global": a}, 1), "b": Reply({"global": b}, 1)})
    pad_a = {"m.lora_A": torch.cat([a["m.lora_A"], torch.zeros(2, 5)]),
             "m.lora_B": torch.cat([a["m.lora_B"] * 2, torch.zeros(4, 2)], dim=1)}  # B * 4/2: the same update at s_4
    for key in a:
        torch.testing.assert_close(server.global_state[key], (pad_a[key] + b[key]) / 2)
    second = server.configure(2, ["a", "b"])
    assert second["a"].states["global"]["m.lora_A"].shape == (2, 5)
    assert second["b"].states["global"]["m.lora_A"].shape == (4, 5)
    restored, _ = build("hetlora", {}, SPEC, seed=0)
    restored.setup([ClientInfo(c, 1) for c in "ab"])
    saved = server.state_dict()
    restored.load_state_dict({"tensors": saved["tensors"], "meta": json.loads(json.dumps(saved["meta"]))})
    assert restored.ranks == {"a": 2, "b": 4}


def test_servers_reject_replies_of_a_rank_they_cannot_aggregate():
    def problem(method: str, reply: Reply) -> str | None:  # the loop's checks, then the server's own
        server, _ = build(method, {}, SPEC, seed=0)
        return (reply_problem(reply, Payload(), SPEC, any_rank=METHODS[method].heterogeneous_ranks)
                or server.reply_problem(1, "a", reply))

    assert "rank 2, but this method aggregates rank lora.r=4 only" in problem("fedit", Reply({"global": random_lora(2, 0)}))
    assert problem("fedit", Reply({"global": random_lora(4, 0)})) is None
    assert problem("flora", Reply({"lora": random_lora(8, 0)})) is None
    assert problem("hetlora", Reply({"global": random_lora(2, 0)})) is None
    assert "above the global rank lora.r=4" in problem("hetlora", Reply({"global": random_lora(8, 0)}))


def test_hetlora_with_one_rank_is_fedit(tmp_path):
    runs = {m: run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / m), algorithm={"name": m}))
            for m in ("fedit", "hetlora")}
    assert runs["hetlora"].final == runs["fedit"].final


def test_hetlora_end_to_end_with_heterogeneous_ranks(tmp_path):
    ranks = [2, 4, 3, 4]
    result = run_experiment(tiny_config(tmp_path, algorithm={"name": "hetlora"}, federation={"rounds": 2},
                                        clients={"lora_r": ranks}))
    per_rank = 4 * (32 + 32) * 4  # bytes per unit of rank: 4 adapted modules, d_in = d_out = 32, fp32
    first, second = result.rounds[1], result.rounds[2]
    assert [first["fit"][c]["bytes_up"] for c in IDS] == [r * per_rank for r in ranks]
    assert [first["fit"][c]["bytes_down"] for c in IDS] == [4 * per_rank] * 4   # before any reply: lora.r
    assert [second["fit"][c]["bytes_down"] for c in IDS] == [r * per_rank for r in ranks]
    assert result.final_mean["accuracy"] >= 0
