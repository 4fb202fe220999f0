"""Clients trained together (engine.client_batch): one forward/backward for several clients equals each alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedlora.adapters import AdaptedModel
from fedlora.adapters.base_models import load_base_model
from fedlora.adapters.joint import RowSlice
from fedlora.api import resume_experiment, run_experiment
from fedlora.core.config import build_config
from fedlora.core.seeding import RandomStream
from fedlora.engines.checkpoint import load_checkpoint
from fedlora.engines.runtime import CPU_CLIENT_BATCH, auto_client_batch
from fedlora.engines.session import build_session
from fedlora.training.batched import ClientBatch, concat_batches
from fedlora.training import Trainer

from .conftest import tiny_config
from .test_clients import generation_data

TOL = 1e-5  # fp32: padding a client's rows changes the matmuls' shapes, hence their rounding (typically 0 to 1e-7)


def run_dir(tmp_path, name: str, client_batch, **sections) -> dict:
    """A tiny run with dropout everywhere (the base's 0.1 and LoRA's 0.1), uneven budgets, 4 clients."""
    sections.setdefault("clients", {"local_steps": [3, 1, 4, 2], "batch_size": [8, 5, 8, 6]})
    cfg = tiny_config(tmp_path, lora={"dropout": 0.1}, engine={"progress": False, "client_batch": client_batch},
                      **sections)
    cfg["output_dir"] = str(tmp_path / name)
    return cfg


def final_states(cfg: dict):
    """The run's last checkpoint."""
    return load_checkpoint(Path(cfg["output_dir"]))


def assert_same_run(a, b) -> None:
    """Every client state and server tensor equal to TOL."""
    assert a.client_states.keys() == b.client_states.keys()
    for cid, state in a.client_states.items():
        other = b.client_states[cid]
        assert state.states.keys() == other.states.keys() and state.meta == other.meta, cid
        for name, tensors in state.states.items():
            assert tensors.keys() == other.states[name].keys(), (cid, name)
            for key, value in tensors.items():
                assert torch.allclose(value.float(), other.states[name][key].float(), atol=TOL, rtol=0), (cid, name, key)
    _same_tree(a.server_state, b.server_state)


def assert_same_metrics(a: dict, b: dict) -> None:
    """Every round's per-client fit and evaluation metrics equal to TOL (a batched step must log what the
    client's own step would: its loss, not the joint one)."""
    def records(cfg: dict) -> list[dict]:
        lines = (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()
        return [{part: json.loads(line).get(part) for part in ("round", "fit", "eval", "failures")} for line in lines]

    for x, y in zip(records(a), records(b), strict=True):
        _same_tree(x, y)


def _same_tree(x, y) -> None:
    if torch.is_tensor(x):
        assert torch.allclose(x.float(), y.float(), atol=TOL, rtol=0)
    elif isinstance(x, dict):
        assert x.keys() == y.keys()
        for k in x:
            _same_tree(x[k], y[k])
    elif isinstance(x, list):
        assert len(x) == len(y)
        for u, v in zip(x, y):
            _same_tree(u, v)
    elif isinstance(x, float):
        assert abs(x - y) <= TOL, (x, y)
    else:
        assert x == y


def joint_steps(monkeypatch) -> list[int]:
    """Record how many clients each joint step served."""
    sizes: list[int] = []
    original = ClientBatch._joint_backward

    def spy(self, requests):
        sizes.append(len(requests))
        return original(self, requests)

    monkeypatch.setattr(ClientBatch, "_joint_backward", spy)
    return sizes


# -- the joint pass ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grouped,layouts", [(False, ("plain", "dense")), (True, ("plain", "plain")),
                                              (True, ("dense", "adaptive_top_m"))])
def test_a_joint_pass_equals_each_client_alone_dropout_and_padding_included(grouped, layouts, monkeypatch):
    """Outputs and gradients of two clients' replicas in one pass (one batch padded, one not, the base's and the
    LoRA's dropout on, different layouts; LoRA in a loop over clients or in grouped products) equal each replica's
    own forward with its own random stream."""
    from fedlora.adapters import Layout
    from fedlora.adapters import joint

    base = load_base_model("tiny-bert", None, 3, seed=0)
    adapted = AdaptedModel(base.model, r=4, alpha=8, dropout=0.1)
    batch = ClientBatch(adapted, 2, grouped=grouped)
    one, two = (s.model for s in batch.slots)
    for model, kind in zip((one, two), layouts):
        if kind != "plain":
            model.set_layout(Layout(2, kind))
    calls = []
    grouped_lora = joint.grouped_lora
    monkeypatch.setattr(joint, "grouped_lora", lambda *a: calls.append(1) or grouped_lora(*a))
    torch.manual_seed(3)
    for model in (one, two):
        for layer in model.layers.values():
            for b in layer.lora_B:
                torch.nn.init.normal_(b)
        model.set_trainable([0], router=True, head=True)
    b1 = {"input_ids": torch.randint(5, 50, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long),
          "token_type_ids": torch.zeros(3, 7, dtype=torch.long)}
    b2 = {"input_ids": torch.randint(5, 50, (2, 5)), "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    streams = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        streams.append(RandomStream())
    alone = []
    for model, b, stream in ((one, b1, streams[0]), (two, b2, streams[1])):
        model.model.train()
        with stream.copy().active():
            logits = model.model(**b).logits
        logits.sum().backward()
        alone.append((logits.detach(), {n: p.grad.clone() for n, p in model.model.named_parameters() if p.requires_grad}))
        model.model.zero_grad(set_to_none=True)
    slices = [RowSlice(0, 0, 3, 7, streams[0].copy(), False), RowSlice(1, 3, 5, 5, streams[1].copy(), True)]
    batch.model.train()
    with batch.joint.over(slices, 7):
        logits = batch.model(**concat_batches([b1, b2], 7, 0)).logits
    assert bool(calls) == grouped  # (the layouts' experts stack)
    logits.sum().backward()
    for (expected, grads), model, rows in zip(alone, (one, two), (slice(0, 3), slice(3, 5))):
        assert torch.allclose(logits[rows], expected, atol=1e-6)
        for n, p in model.model.named_parameters():
            if p.requires_grad:
                assert torch.allclose(p.grad, grads[n], atol=1e-6), n
    assert all(p.grad is None for p in adapted.model.parameters())  # the shared model's own are not touched


def test_waiting_steps_are_grouped_by_length_to_bound_padding():
    from fedlora.training.batched import StepRequest, length_groups

    def request(rows, length):
        return StepRequest(None, {"input_ids": torch.zeros(rows, length, dtype=torch.long)}, padded=False)

    requests = [(0, request(8, 10)), (1, request(8, 60)), (2, request(8, 58)), (3, request(8, 12)), (4, request(2, 50))]
    groups = length_groups(requests, max_waste=0.25)
    assert [[k for k, _ in g] for g in groups] == [[1, 2, 4], [0, 3]]  # 60/58/50 padded to 60; 12/10 to 12
    assert [[k for k, _ in g] for g in length_groups(requests, max_waste=10.0)] == [[0, 1, 2, 3, 4]]


def test_a_replica_shares_the_frozen_base_and_owns_its_adapters_and_head():
    base = load_base_model("tiny-bert", None, 3, seed=0)
    adapted = AdaptedModel(base.model, r=4, alpha=8)
    twin = adapted.replica()
    ours = dict(adapted.model.named_parameters())
    theirs = dict(twin.model.named_parameters())
    assert ours.keys() == theirs.keys()  # the same names: states, heads and optimizer moments move unchanged
    for name, p in theirs.items():
        own = ".lora_" in name or name.startswith("classifier")
        assert (p is ours[name]) != own, name
    with torch.no_grad():
        twin.model.classifier.weight.add_(1.0)
    assert not torch.equal(twin.model.classifier.weight, adapted.model.classifier.weight)


# -- whole rounds --------------------------------------------------------------------------------------------
METHODS = {
    "fedit": {}, "ffa": {}, "fedsa": {}, "fedalt": {}, "ifca": {}, "local": {},
    "fedlease": {"federation": {"rounds": 3}, "algorithm": {"name": "fedlease", "options": {"warmup_rounds": 1}}},
    "fdlora": {"federation": {"rounds": 3}, "algorithm": {"name": "fdlora", "options": {"stage1_rounds": 1}}},
    "feddpa": {},
    "fedit-local-dp": {"algorithm": {"name": "fedit"}, "privacy": {"dp": "local", "noise_multiplier": 0.5}},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_batched_run_equals_the_sequential_run(tmp_path, method, monkeypatch):
    """Uneven local steps and batch sizes (a client that is done drops out of later steps); FedLEASE through both
    phases, FDLoRA through both stages."""
    sections = {"algorithm": {"name": method}, **METHODS[method]}
    sequential = run_dir(tmp_path, "sequential", 1, **sections)
    batched = run_dir(tmp_path, "batched", 4, **sections)
    run_experiment(sequential)
    sizes = joint_steps(monkeypatch)
    run_experiment(batched)
    assert max(sizes) >= 2 and min(sizes) < max(sizes)  # together, then fewer as budgets run out
    assert_same_run(final_states(sequential), final_states(batched))
    assert_same_metrics(sequential, batched)


@pytest.mark.parametrize("method", ["fedit", "fedalt", "fedlease"])
def test_a_batched_run_with_grouped_lora_equals_the_sequential_run(tmp_path, method, monkeypatch):
    """The clients' LoRA in grouped matrix products (forced on the CPU): plain LoRA, FedALT's gated pair, and
    FedLEASE's adaptive top-M mixture (both phases)."""
    from fedlora.adapters import joint

    calls = []
    grouped_lora = joint.grouped_lora
    monkeypatch.setattr(joint, "grouped_lora", lambda *a: calls.append(1) or grouped_lora(*a))
    sections = {"algorithm": {"name": method}, **METHODS[method]}
    sequential = run_dir(tmp_path, "sequential", 1, **sections)
    batched = run_dir(tmp_path, "batched", 4, **sections)
    batched["engine"]["grouped_lora"] = True
    run_experiment(sequential)
    assert not calls
    run_experiment(batched)
    assert calls
    assert_same_run(final_states(sequential), final_states(batched))


@pytest.mark.parametrize("method", ["fedit", "fedalt", "fedlease"])
def test_a_batched_run_under_gradient_checkpointing_equals_the_sequential_run(tmp_path, method, monkeypatch):
    """Checkpointed layers recompute their forward, dropout draws included, in the backward: each client's draws
    are its own again, so the batched run equals the sequential one, with or without checkpointing."""
    from torch.utils import checkpoint

    recomputed = []
    original = checkpoint.checkpoint
    monkeypatch.setattr(checkpoint, "checkpoint", lambda *a, **k: recomputed.append(1) or original(*a, **k))
    sections = {"algorithm": {"name": method}, **METHODS[method]}
    plain = run_dir(tmp_path, "plain", 1, **sections)
    sections["training"] = {"gradient_checkpointing": True}
    sequential = run_dir(tmp_path, "sequential", 1, **sections)
    batched = run_dir(tmp_path, "batched", 4, **sections)
    for cfg in (plain, sequential):
        run_experiment(cfg)
    sizes = joint_steps(monkeypatch)
    calls = len(recomputed)
    run_experiment(batched)
    assert max(sizes) >= 2 and len(recomputed) > calls  # batched, and checkpointed
    assert_same_run(final_states(sequential), final_states(batched))
    assert_same_run(final_states(plain), final_states(batched))


def test_a_causal_lm_batched_equals_sequential(tmp_path):
    sections = dict(model={"name": "tiny-llama"}, algorithm={"name": "fedalt"},
                    data={"dataset": generation_data(tmp_path), "tasks": None, "partition": "iid", "max_length": 32},
                    clients={"local_steps": [3, 2], "batch_size": [4, 3]})
    sequential, batched = run_dir(tmp_path, "sequential", 1, **sections), run_dir(tmp_path, "batched", 2, **sections)
    run_experiment(sequential)
    run_experiment(batched)
    assert_same_run(final_states(sequential), final_states(batched))


@pytest.mark.parametrize("method", ["fedit", "fedalt"])
def test_checkpoints_resume_across_the_two_modes(tmp_path, method):
    """A batched run resumed sequentially, and a sequential one resumed batched, equal the uninterrupted run
    (FedALT: the clients' private LoRAs and optimizer moments cross the checkpoint too)."""
    algorithm = {"name": method}
    whole = run_dir(tmp_path, "whole", 1, federation={"rounds": 3}, algorithm=algorithm)
    run_experiment(whole)
    for first, then in ((4, 1), (1, 2)):
        cfg = run_dir(tmp_path, f"from{first}", first, federation={"rounds": 2}, algorithm=algorithm)
        run_experiment(cfg)
        config_path = tmp_path / f"from{first}" / "config.json"
        config = json.loads(config_path.read_text())
        config["engine"]["client_batch"] = then  # engine settings may change on resume
        config_path.write_text(json.dumps(config))
        resume_experiment(tmp_path / f"from{first}", rounds=3)
        assert_same_run(final_states(whole), final_states(cfg))


def test_a_client_failing_inside_a_batch_is_left_out_and_the_others_are_unchanged(tmp_path, monkeypatch):
    """One client's error in its own code, and another's inside the joint step, fail only those two."""
    original_fit, original_loss = Trainer.train, Trainer.logits_loss

    def failing_train(self, *args, **kwargs):
        if self.client_id.endswith("-1") and self.client_id.startswith("noun"):
            raise RuntimeError("disk full")
        return original_fit(self, *args, **kwargs)

    def failing_loss(self, logits, batch, n_items=None):
        if self.client_id.startswith("verb") and self.client_id.endswith("-0"):
            raise ValueError("bad labels")
        return original_loss(self, logits, batch, n_items)

    monkeypatch.setattr(Trainer, "train", failing_train)
    monkeypatch.setattr(Trainer, "logits_loss", failing_loss)
    monkeypatch.setattr(Trainer, "batch_loss", lambda self, batch, n_items=None: failing_loss(
        self, self.forward(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch, n_items))
    results = {}
    for k in (1, 4):
        cfg = run_dir(tmp_path, f"k{k}", k)
        run_experiment(cfg)
        records = [json.loads(line) for line in (tmp_path / f"k{k}" / "metrics.jsonl").read_text().splitlines()]
        results[k] = (records, final_states(cfg))
    failed = [sorted(r.get("failures", {})) for r in results[4][0] if r.get("round", 0) > 0]
    assert failed and all(f == sorted(["noun_topic-1", "verb_class-0"]) for f in failed), failed
    assert [sorted(r.get("failures", {})) for r in results[1][0] if r.get("round", 0) > 0] == failed
    assert_same_run(results[1][1], results[4][1])


def test_methods_that_cannot_batch_fall_back_and_say_so_once(tmp_path, monkeypatch):
    sizes = joint_steps(monkeypatch)
    run_experiment(run_dir(tmp_path, "flora", 4, algorithm={"name": "flora"}))
    said = [line for line in (tmp_path / "flora" / "run.log").read_text().splitlines() if "client_batch" in line]
    assert sizes == [] and len(said) == 1 and "merges" in said[0]


def test_client_batch_is_checked_and_auto_is_the_cpu_default(tmp_path):
    with pytest.raises(Exception, match="client_batch"):
        build_config(tiny_config(tmp_path, engine={"client_batch": 0}))
    with pytest.raises(Exception, match="client_batch"):
        build_config(tiny_config(tmp_path, engine={"client_batch": "many"}))
    session = build_session(build_config(tiny_config(tmp_path, engine={"client_batch": "auto"})))
    assert auto_client_batch(session.runtime) == CPU_CLIENT_BATCH


def test_auto_client_batch_on_cuda_divides_free_memory_by_one_clients_estimate(tmp_path, monkeypatch):
    """The CUDA branch, with the device and its free memory faked: K grows with free memory, halves when
    activations are fp32 rather than bf16, and stays within 1..64."""
    from fedlora.engines import runtime

    monkeypatch.setattr(runtime, "model_device", lambda model: torch.device("cuda", 0))
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 << 30))

    def k(free_bytes: int, precision: str = "fp32") -> int:
        free["bytes"] = free_bytes
        cfg = build_config(tiny_config(tmp_path, training={"precision": "bf16" if precision == "bf16" else "fp32"}))
        return auto_client_batch(build_session(cfg).runtime)

    assert k(1 << 40) == 64  # a huge card: capped
    assert k(0) == 1  # nothing free: still one client, as without batching
    mid = k(40 << 20)
    assert 1 < mid < 64
    assert k(80 << 20) in (2 * mid - 1, 2 * mid, 2 * mid + 1)  # about linear in free memory
    assert k(40 << 20, "bf16") > mid  # 16-bit activations: more clients fit


def test_token_groups_lay_each_clients_tokens_into_aligned_groups():
    """grouped_mm's groups: client 0 has 2 rows x 3 tokens (6, padded to 8), client 1 one row of 5 (padded to 8)."""
    from fedlora.adapters.joint import JointPass

    joint = JointPass(grouped=True)
    x = torch.zeros(3, 5, 2)  # 3 rows padded to width 5
    slices = [RowSlice(0, 0, 2, 3, RandomStream(), True), RowSlice(1, 2, 3, 5, RandomStream(), False)]
    with joint.over(slices, 5):
        groups = joint.token_groups(x, align=4)
        assert joint.token_groups(x, align=4) is groups  # once a pass
        assert groups.sizes == [6, 5] and groups.total == 16
        assert groups.offsets.tolist() == [8, 16] and groups.offsets.dtype == torch.int32
        assert groups.real.tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12]
        rows = torch.arange(1.0, 12.0)[:, None]
        padded = groups.pad(rows)
        assert padded[:, 0].tolist() == [1, 2, 3, 4, 5, 6, 0, 0, 7, 8, 9, 10, 11, 0, 0, 0]
        assert groups.per_row(torch.tensor([2.0, 3.0])).tolist() == [2.0] * 8 + [3.0] * 8
        assert joint.token_index(x).tolist() == [0, 1, 2, 5, 6, 7, 10, 11, 12, 13, 14]
    assert joint._tokens == {}  # the caches end with the pass
