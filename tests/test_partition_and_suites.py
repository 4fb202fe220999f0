"""Partitioner properties and suite construction (snippets here, the installed corpora in the slow tests)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedlora.core.config import DataConfig
from fedlora.core.errors import DataError
from fedlora.data.federated import build_clients
from fedlora.data.partition import by_key, dirichlet, iid, train_test_split
from fedlora.data.suites import NLG_TASKS, NLU_TASKS, balanced_sample, nlg_records, wordnet_generation_tasks

from .test_corpora import DATA, _fortune_tree

LABELS = [i % 5 for i in range(1000)]


def test_dirichlet_parts_are_disjoint_and_of_equal_size():
    parts = dirichlet(LABELS, 4, 0.5, 250, np.random.default_rng(0))
    assert sorted(i for p in parts for i in p) == list(range(1000))  # 4 x 250 = everything, each once
    assert [len(p) for p in parts] == [250] * 4
    assert parts == dirichlet(LABELS, 4, 0.5, 250, np.random.default_rng(0))  # same seed, same split
    assert parts != dirichlet(LABELS, 4, 0.5, 250, np.random.default_rng(1))
    with pytest.raises(DataError, match="cannot give 4 clients 300 each"):
        dirichlet(LABELS, 4, 0.5, 300, np.random.default_rng(0))


def skew(alpha: float) -> float:
    """Mean share of each client's largest class, over many draws."""
    shares = []
    for seed in range(20):
        for part in dirichlet(LABELS, 4, alpha, 100, np.random.default_rng(seed)):
            counts = Counter(LABELS[i] for i in part)
            shares.append(max(counts.values()) / len(part))
    return float(np.mean(shares))


def test_label_skew_grows_as_alpha_falls():
    assert skew(100.0) < skew(1.0) < skew(0.1)
    assert skew(100.0) < 0.3 and skew(0.1) > 0.6


def test_iid_sizes_and_by_key():
    parts = iid(10, 3, np.random.default_rng(0))
    assert sorted(len(p) for p in parts) == [3, 3, 4] and sorted(sum(parts, [])) == list(range(10))
    keys = ["en", "de", "en", "it", "de", "it"]
    assert by_key(keys, 3) == [[1, 4], [0, 2], [3, 5]]          # de, en, it: one language per client
    with pytest.raises(DataError, match="cannot fill 4 clients"):
        by_key(keys, 4)


def test_train_test_split_is_disjoint_and_shrinks_in_proportion():
    train, test = train_test_split(list(range(100)), 50, 30, np.random.default_rng(0))
    assert len(train) == 50 and len(test) == 30 and not set(train) & set(test)
    train, test = train_test_split(list(range(40)), 60, 20, np.random.default_rng(0))
    assert (len(train), len(test)) == (30, 10) and sorted(train + test) == list(range(40))


def test_clients_never_share_examples_and_splits_are_saved_disjoint():
    clients = build_clients(DataConfig(dataset="wordnet-demo", clients_per_task=3, train_per_client=100,
                                       test_per_client=30), seed=0)
    seen: set[tuple[str, str]] = set()
    for c in clients:
        mine = {(r["text"], r["label"]) for r in c.train + c.test}
        assert not {(r["text"], r["label"]) for r in c.train} & {(r["text"], r["label"]) for r in c.test}
        assert not mine & seen
        seen |= mine


def test_balanced_sample_takes_small_classes_whole():
    import random

    recs = [{"label": "a"}] * 3 + [{"label": "b"}] * 50 + [{"label": "c"}] * 50
    counts = Counter(r["label"] for r in balanced_sample(recs, 30, "label", random.Random(0)))
    assert counts == {"a": 3, "b": 13, "c": 14}


def test_nlg_tasks_from_snippets(tmp_path):
    tasks = wordnet_generation_tasks(DATA / "wordnet")
    responses = {t: {r["response"] for r in recs} for t, recs in tasks.items()}
    assert responses["antonym"] == {"cold"}                      # one pair, not both directions
    assert responses["hypernym"] == {"feline", "foodstuff"}
    assert "consume" in responses["synonym"] and "animal" in responses["definition_topic"]
    assert all(r["prompt"].startswith("### Instruction:\n") and r["prompt"].endswith("### Response:\n")
               for recs in tasks.values() for r in recs)
    records = nlg_records(50, 0, DATA / "wordnet", _fortune_tree(tmp_path / "f"), DATA / "chatterbot")
    assert set(r["task"] for r in records) == set(NLG_TASKS)
    assert {r["response"] for r in records if r["task"] == "quote_language"} == {"English", "German", "Italian"}


@pytest.mark.slow
def test_suites_from_the_installed_corpora():
    nlu = build_clients(DataConfig(suite="nlu", clients_per_task=4, train_per_client=1000, test_per_client=200), 0)
    assert len(nlu) == 16 and {c.task for c in nlu} == set(NLU_TASKS)
    labels = {c.task: c.labels for c in nlu}
    assert len(labels["wordnet_noun_topic"]) == 25 and len(labels["wordnet_verb_class"]) == 15
    assert len(labels["fortunes_category"]) == 10
    assert labels["fortunes_language"] == sorted(["English", "German", "Spanish", "Italian", "Russian", "Polish", "Czech"])
    assert all(len(c.train) == 1000 and len(c.test) == 200 for c in nlu)
    nlg = build_clients(DataConfig(suite="nlg", clients_per_task=1, partition="iid", train_per_client=300,
                                   test_per_client=200), 0)
    assert [c.task for c in nlg] == sorted(NLG_TASKS)
    assert all(len(c.train) == 300 and len(c.test) == 200 for c in nlg)
