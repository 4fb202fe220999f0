"""The local trainer: loss masking, schedule, optimizer reset, and the causal-LM path end to end."""

from __future__ import annotations

import json

import pytest

from fedlora import run_experiment
from fedlora.adapters.base_models import byte_tokenizer
from fedlora.core.config import TrainingConfig
from fedlora.data.tokenize import IGNORE_INDEX, batch_indices, collate, encode_generation, steps_for_epochs
from fedlora.training import ClientDataset, Trainer

from .conftest import tiny_config


def test_prompt_tokens_are_masked_from_the_loss():
    tok = byte_tokenizer()
    enc = encode_generation([{"prompt": "Q: hi", "response": "ok"}], tok, max_length=64)
    n_prompt = len(tok("Q: hi")["input_ids"])
    assert enc.targets[0][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc.targets[0][n_prompt:] == tok("ok", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = collate(enc, [0], tok.pad_token_id)
    assert batch["labels"].shape == batch["input_ids"].shape


def test_linear_schedule_decays_to_zero_and_optimizer_resets(tiny_adapted):
    adapted, tok = tiny_adapted
    from fedlora.data.tokenize import encode_classification

    recs = [{"text": f"example {i}", "label": str(i % 3)} for i in range(16)]
    enc = encode_classification(recs, tok, ["0", "1", "2"], 32)
    lrs = []
    cfg = TrainingConfig(lr=0.1, local_steps=4, batch_size=4)
    trainer = Trainer(adapted, tok, ClientDataset(enc, enc, 3), cfg, "classification", seed=0)
    original = trainer._schedule

    def spy(optimizer, n):
        sched = original(optimizer, n)
        step = sched.step

        def logged_step():
            step()
            lrs.append(optimizer.param_groups[0]["lr"])
        sched.step = logged_step
        return sched

    trainer._schedule = spy
    trainer.train(experts=[0])
    assert lrs == pytest.approx([0.075, 0.05, 0.025, 0.0])
    assert trainer.optimizer_state is None  # reset each round: nothing is carried over
    keep = Trainer(adapted, tok, ClientDataset(enc, enc, 3), TrainingConfig(local_steps=2, reset_optimizer=False),
                   "classification", seed=0)
    keep.train(experts=[0])
    assert keep.optimizer_state and all("exp_avg" in v for v in keep.optimizer_state.values())


def test_causal_lm_generation_run(tmp_path):
    data = tmp_path / "gen.jsonl"
    rows = [{"task": "echo", "prompt": f"say {w}:", "response": w} for w in ["cat", "dog", "sun", "sea"] * 8]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tmp_path, model={"name": "tiny-llama"}, data={"dataset": str(data), "tasks": None,
                      "partition": "iid", "max_length": 32}, training={"max_new_tokens": 4})
    result = run_experiment(cfg)
    final = result.final_mean
    assert {"rouge1", "rougeL", "exact_match", "loss"} <= set(final)
    assert final["loss"] < result.evaluations()[0]["summary"]["mean"]["loss"]


def test_an_epoch_budget_counts_steps_as_hf_trainer_and_sees_every_example():
    # FedALT's 300 examples, batch 8, 5 epochs: 38 batches per epoch (the last one of 4), 190 steps, not 188
    assert steps_for_epochs(5, 300, 8) == 190 and steps_for_epochs(2, 16, 128) == 2
    assert steps_for_epochs(0.5, 300, 8) == 19 and steps_for_epochs(0.01, 10, 8) == 1
    epoch = list(batch_indices(300, 8, None))
    assert len(epoch) == 38 and sorted(i for b in epoch for i in b) == list(range(300))


@pytest.mark.timeout(60)
def test_training_on_no_examples_is_refused_not_an_endless_loop(tiny_adapted):
    from fedlora.data.tokenize import Encoded, encode_classification

    adapted, tok = tiny_adapted
    enc = encode_classification([{"text": "one", "label": "0"}], tok, ["0", "1"], 16)
    trainer = Trainer(adapted, tok, ClientDataset(enc, enc, 2), TrainingConfig(local_steps=2), "classification", seed=0)
    with pytest.raises(ValueError, match="no training examples"):
        trainer.train(experts=[0], data=Encoded([], []))
