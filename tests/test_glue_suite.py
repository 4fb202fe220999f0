"""The glue suite: its four task builders, the review reader, pair tokenization and the 16-client layout.

Everything runs on the small fixtures in tests/data/glue (no training, no real corpus)."""

from __future__ import annotations

import bz2
import random
import struct
import typing
import zlib
from collections import Counter
from functools import partial
from pathlib import Path

import pytest

from fedlora.core.config import DataConfig
from fedlora.core.errors import DataError
from fedlora.data import federated, glue
from fedlora.data.chatterbot import read_chatterbot
from fedlora.data.reviews import read_fine_foods, unframe_entry
from fedlora.data.tokenize import collate, encode_classification
from fedlora.data.wordnet_pairs import _substitute, hypernymy_records, load_wordnet, paraphrase_records

DATA = Path(__file__).parent / "data" / "glue"
FIXTURES = {"wordnet_root": DATA / "wordnet", "reviews_root": DATA / "modeldata", "chatterbot_root": DATA / "chatterbot"}
TASKS = set(glue.GLUE_TASKS)


def fixture_records(pool: int = 1000, seed: int = 0, shards: int = 4) -> list[dict]:
    return glue.glue_records(pool, seed, shards=shards, **FIXTURES)


def by_task(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["task"], []).append(r)
    return out


# -- the review file format ---------------------------------------------------------------------------------------
def test_reader_reads_the_lazy_load_database_written_with_rdata():
    reviews = read_fine_foods(DATA / "modeldata")
    assert len(reviews) == 10  # training_data (8) + testing_data (2)
    assert Counter(r["label"] for r in reviews) == {"great": 5, "other": 5}
    assert reviews[3]["text"] == "Great value and fast shipping, will buy again."  # <br /> and spaces folded
    assert all(r["product"].startswith("B") for r in reviews)


@pytest.mark.parametrize("compressed,frame", [
    (1, lambda b: struct.pack(">I", len(b)) + zlib.compress(b)),
    (2, lambda b: struct.pack(">I", len(b)) + b"2" + bz2.compress(b)),
    (3, lambda b: struct.pack(">I", len(b)) + b"0" + b),
])
def test_lazy_load_framings(compressed, frame):
    payload = b"X\n" + bytes(range(200))
    assert unframe_entry(frame(payload), compressed) == payload


def test_a_corrupt_entry_is_a_data_error():
    with pytest.raises(DataError, match="expected 9"):
        unframe_entry(struct.pack(">I", 9) + b"0" + b"short", 3)


def test_missing_review_corpus_says_how_to_install(tmp_path, monkeypatch):
    from fedlora.data.reviews import MODELDATA_DIR

    if Path(MODELDATA_DIR).exists():
        pytest.skip("r-cran-modeldata is installed system-wide here")
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    with pytest.raises(DataError, match=r"prepare-data.*r-cran-modeldata"):
        read_fine_foods()


# -- the task builders ---------------------------------------------------------------------------------------------
def test_paraphrase_pairs_are_one_word_substitutions():
    index = load_wordnet(DATA / "wordnet")
    records = paraphrase_records(index, random.Random(0))
    assert len(records) == 17 and {r["label"] for r in records} == {"paraphrase", "not_paraphrase"}
    synset_of = {ex: s for s in index.values() for ex in s.examples}
    for r in records:
        s = synset_of[r["text"]]
        assert r["text_pair"] != r["text"]
        with_synonym = {_substitute(r["text"], w, other) for w in s.lemmas for other in s.lemmas if other != w}
        assert (r["text_pair"] in with_synonym) == (r["label"] == "paraphrase"), r
        if r["label"] == "not_paraphrase":  # another synset's synonym, of the same part of speech
            group = {"s": "a"}.get(s.pos, s.pos)
            others = {_substitute(r["text"], w, other) for t in index.values() if t.key != s.key
                      and {"s": "a"}.get(t.pos, t.pos) == group for w in s.lemmas for other in t.lemmas}
            assert r["text_pair"] in others, r


def test_substitution_makes_the_article_agree():
    assert _substitute("an interconnection between", "interconnection", "cohesion") == "a cohesion between"
    assert _substitute("A dog ran", "dog", "owl") == "An owl ran"
    assert _substitute("the dog-eared dog", "dog", "cat") == "the dog-eared cat"


def test_hypernymy_negatives_are_never_true_ancestors():
    index = load_wordnet(DATA / "wordnet")
    records = hypernymy_records(index, random.Random(1))
    assert {r["label"] for r in records} == {"entailment", "not_entailment"}
    truth = {("dog", "mammal"), ("cat", "mammal"), ("horse", "mammal"), ("robin", "bird"), ("eagle", "bird"),
             ("owl", "bird"), ("pie", "baked goods"), ("pie", "bakery products"), ("salad", "dish"), ("mammal", "animal"),
             ("bird", "animal"), ("bread", "baked goods"), ("bread", "bakery products"), ("cake", "baked goods"),
             ("cake", "bakery products"), ("soup", "dish"), ("stew", "dish"), ("dish", "food"),
             ("baked goods", "food")}
    for r in records:
        word = r["text"].split(":")[0]
        term = r["text_pair"].removeprefix(f"{word} is a kind of ").removesuffix(".")
        assert ((word, term) in truth) == (r["label"] == "entailment"), r


def test_qa_match_has_one_record_per_question_with_a_right_or_a_wrong_answer():
    pairs = read_chatterbot("english", DATA / "chatterbot")
    records = glue.qa_match_records(pairs, random.Random(0))
    right = {(p["question"], p["answer"]) for p in pairs}
    answers = {a for _, a in right}
    assert all(len(r["text"]) >= 2 for r in records)  # the one-letter "r" -> "a" conversation is dropped
    questions = [r["text"] for r in records]
    assert len(questions) == len(set(questions))  # a question never comes back with another candidate
    assert {r["label"] for r in records} == {"answer", "not_answer"}
    for r in records:
        assert ((r["text"], r["text_pair"]) in right) == (r["label"] == "answer"), r
        assert r["text_pair"] in answers  # a wrong answer is another question's right one


# -- the suite ----------------------------------------------------------------------------------------------------
def test_suite_pools_are_balanced_binary_pairs_and_deterministic():
    records = fixture_records()
    tasks = by_task(records)
    assert set(tasks) == TASKS
    for task, recs in tasks.items():
        counts = Counter(r["label"] for r in recs)
        assert len(counts) == 2 and len(set(counts.values())) == 1, (task, counts)
        assert all(("text_pair" in r) == (task != "review_sentiment") for r in recs)
        shards = Counter((r["shard"], r["label"]) for r in recs)
        assert max(shards.values()) - min(shards.values()) <= 1  # every shard balanced
    assert fixture_records(seed=0) == records
    assert fixture_records(seed=1) != records


def test_suite_pool_size_is_capped():
    tasks = by_task(fixture_records(pool=4))
    assert all(len(recs) == 4 for recs in tasks.values())


def _glue_data_config(**kw) -> DataConfig:
    values = dict(suite="glue", clients_per_task=4, partition="by_key", partition_key="shard", train_per_client=1,
                  test_per_client=1, pool_per_task=8, max_length=32) | kw
    suites = typing.get_args(typing.get_args(DataConfig.model_fields["suite"].annotation)[0])
    return DataConfig(**values) if "glue" in suites else DataConfig.model_construct(**values)


def test_client_layout_is_four_tasks_by_four_balanced_clients(monkeypatch):
    monkeypatch.setitem(federated.SUITES, "glue", partial(glue.glue_records, **FIXTURES))
    clients = federated.build_clients(_glue_data_config(), seed=0)
    assert len(clients) == 16
    assert Counter(c.task for c in clients) == {t: 4 for t in TASKS}
    assert sorted(c.client_id for c in clients) == sorted(f"{t}-{i}" for t in TASKS for i in range(4))
    for c in clients:
        assert len(c.labels) == 2
        held = c.train + c.test
        assert sorted(Counter(r["label"] for r in held).values()) == [1, 1]  # exactly balanced
        assert not any(t in c.train for t in c.test)  # no test example in train
    texts = [(r["text"], r.get("text_pair")) for c in clients for r in c.train + c.test]
    assert len(texts) == len(set(texts))  # clients never share an example


def test_label_skew_setting_uses_the_same_pool(monkeypatch):
    monkeypatch.setitem(federated.SUITES, "glue", partial(glue.glue_records, **FIXTURES))
    clients = federated.build_clients(_glue_data_config(partition="dirichlet", dirichlet_alpha=0.5,
                                                        partition_key=None), seed=0)
    assert len(clients) == 16 and Counter(c.task for c in clients) == {t: 4 for t in TASKS}


@pytest.mark.parametrize("name", ["glue-quick", "glue-paper"])
def test_configs_load(name):
    from fedlora.core.config import load_config

    suites = typing.get_args(typing.get_args(DataConfig.model_fields["suite"].annotation)[0])
    if "glue" not in suites:
        pytest.skip("core/config.py's DataConfig.suite does not list 'glue' yet")
    cfg = load_config(name)
    assert cfg.data.suite == "glue" and cfg.data.clients_per_task == 4
    assert cfg.data.pool_per_task == 4 * (cfg.data.train_per_client + cfg.data.test_per_client)


# -- sentence-pair tokenization -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import AutoTokenizer

    from fedlora.adapters.base_models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def test_pairs_are_tokenized_as_segments(bert_tokenizer):
    records = [{"text": "is coffee a fruit?", "text_pair": "coffee comes from a berry.", "label": "answer"},
               {"text": "what is a cpu?", "text_pair": "the processor. " * 40, "label": "not_answer"}]
    enc = encode_classification(records, bert_tokenizer, ["answer", "not_answer"], max_length=24)
    assert enc.targets == [0, 1] and enc.n_truncated == 1
    ids, types = enc.input_ids[0], enc.token_type_ids[0]
    sep = bert_tokenizer.sep_token_id
    assert ids[0] == bert_tokenizer.cls_token_id and ids.count(sep) == 2 and ids[-1] == sep
    first_sep = ids.index(sep)
    assert set(types[: first_sep + 1]) == {0} and set(types[first_sep + 1:]) == {1}
    assert len(enc.input_ids[1]) == 24 and enc.input_ids[1].count(sep) == 2  # the long answer is cut, not the question
    batch = collate(enc, [0, 1], bert_tokenizer.pad_token_id)
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert batch["token_type_ids"][0, len(ids):].eq(0).all()  # padding is segment 0
    assert enc.subset([1]).token_type_ids == [enc.token_type_ids[1]]


def test_single_texts_carry_no_segments_and_mixed_tasks_are_refused(bert_tokenizer):
    single = encode_classification([{"text": "great tea", "label": "great"}], bert_tokenizer, ["great", "other"], 16)
    assert not single.token_type_ids and "token_type_ids" not in collate(single, [0], 0)
    with pytest.raises(DataError, match="text_pair"):
        encode_classification([{"text": "a", "label": "x"}, {"text": "b", "text_pair": "c", "label": "x"}],
                              bert_tokenizer, ["x"], 16)
