"""FedDPA: variants' schedule, trainable sequence, what is sent, and the instance-wise weighting inputs."""

from __future__ import annotations

import torch

from fedlora import run_experiment
from fedlora.adapters import AdaptedModel, AdapterSpec
from fedlora.adapters.base_models import load_base_model
from fedlora.algorithms import ClientInfo, build
from fedlora.data.tokenize import collate, collate_prompts, encode_generation
from fedlora.training import last_prompt_hidden

from .conftest import tiny_config
from .test_methods_e2e import HEAD, LORA_BYTES, expert, spy  # noqa: F401  (fixture)

SPEC = AdapterSpec((("m", 3, 2),), r=2, alpha=4)


def test_variant_f_fine_tunes_local_only_in_the_last_round():
    server_f, _ = build("feddpa", {"variant": "F"}, SPEC, seed=0)
    server_f.setup([ClientInfo("a", 1)], rounds=3)
    assert [server_f.configure(r, ["a"])["a"].config["finetune_local"] for r in (1, 2, 3)] == [False, False, True]
    server_t, _ = build("feddpa", {}, SPEC, seed=0)
    server_t.setup([ClientInfo("a", 1)], rounds=3)
    assert all(server_t.configure(r, ["a"])["a"].config["finetune_local"] for r in (1, 2, 3))


def test_feddpa_t_end_to_end(tmp_path, spy, spy_trainable):  # noqa: F811
    result = run_experiment(tiny_config(tmp_path, algorithm={"name": "feddpa"}))
    trainable = spy_trainable
    assert trainable[:2] == [expert(1) | HEAD, expert(0) | HEAD]  # local first, then global, each round
    assert all(r["sent"] == {"global"} and r["received"] == {"global"} and r["up"] == r["down"] == LORA_BYTES for r in spy)
    assert set(result.client_states["noun_topic-0"].states) == {"local", "_head"}
    assert all(-0.5 <= d["mean_expert0_weight"] <= 0.5 for d in result.final_diagnostics.values())
    assert set(result.final_diagnostics) == set(result.final)  # every client reports it, apart from its metrics
    assert all("mean_expert0_weight" not in m for m in result.final.values())


def test_last_prompt_hidden_is_the_prompt_state_in_every_batch_layout():
    base = load_base_model("tiny-llama", None, 2, seed=0)
    adapted = AdaptedModel(base.model, r=2, alpha=4)
    tok = base.tokenizer
    enc = encode_generation([{"prompt": "short", "response": "answer one"},
                             {"prompt": "a longer prompt", "response": "x"}], tok, 64)
    alone = [last_prompt_hidden(adapted.model, collate_prompts([p], tok.pad_token_id))[0] for p in enc.prompts]
    right = last_prompt_hidden(adapted.model, collate(enc, [0, 1], tok.pad_token_id))      # prompt + response, right pad
    left = last_prompt_hidden(adapted.model, collate_prompts(enc.prompts, tok.pad_token_id))  # prompts, left pad
    for i in range(2):
        torch.testing.assert_close(right[i], alone[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(left[i], alone[i], atol=1e-5, rtol=1e-5)


def test_split_budget_gives_the_two_passes_the_round_budget_together(tmp_path, monkeypatch):
    from fedlora.training.trainer import Trainer

    passes: list[int] = []
    original = Trainer._train

    def counting(self, data, experts, router, n_steps, parts, dp=None):
        passes.append(n_steps)
        return original(self, data, experts, router, n_steps, parts, dp)

    monkeypatch.setattr(Trainer, "_train", counting)
    cfg = dict(training={"local_steps": 5}, federation={"rounds": 1}, data={"tasks": ["noun_topic"], "clients_per_task": 1})
    run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "code"), algorithm={"name": "feddpa"}, **cfg))
    assert passes == [5, 5]  # as the official code: each LoRA gets the whole budget
    passes.clear()
    run_experiment(tiny_config(tmp_path, output_dir=str(tmp_path / "split"), **cfg,
                               algorithm={"name": "feddpa", "options": {"split_budget": True}}))
    assert passes == [3, 2]  # local ceil(5/2), then global floor(5/2): 5 steps per round, like every method
