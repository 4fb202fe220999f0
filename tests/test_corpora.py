"""Corpus parsers on hand-written snippets in each native format, and the errors when a corpus is missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fedlora.core.errors import DataError
from fedlora.data.chatterbot import parse_conversations, read_chatterbot
from fedlora.data.fortunes import parse_fortunes, read_fortunes
from fedlora.data.records import load_csv, load_hf, load_jsonl
from fedlora.data.wordnet import parse_data_line, read_synsets

DATA = Path(__file__).parent / "data"


def test_wordnet_data_line_with_pointers_and_examples():
    s = parse_data_line("00000002 05 n 02 feline 0 felid 0 001 @ 00000001 n 0000 | any of various mammals; \"a cat\"")
    assert (s.offset, s.pos, s.lexname, s.lemmas) == ("00000002", "n", "noun.animal", ["feline", "felid"])
    assert s.definition == "any of various mammals" and s.examples == ["a cat"]
    assert s.pointers == [("@", "00000001", "n", "0000")]
    assert parse_data_line("  1 This software and database is provided") is None
    with pytest.raises(DataError, match="malformed WordNet data line"):
        parse_data_line("00000002 05 n xx feline | broken")


def test_wordnet_reads_a_directory_and_skips_the_licence_header():
    nouns = list(read_synsets("noun", DATA / "wordnet"))
    assert [s.lemmas[0] for s in nouns][:3] == ["cat", "feline", "apple"]
    verbs = list(read_synsets("verb", DATA / "wordnet"))
    assert verbs[1].lemmas == ["eat", "consume"] and verbs[1].lexname == "verb.consumption"


def _fortune_tree(root: Path) -> Path:
    (root / "it").mkdir(parents=True)
    (root / "de").mkdir()
    (root / "off").mkdir()
    (root / "es" / "off").mkdir(parents=True)
    (root / "people").write_text("A wise man.\n\t\t-- Someone\n%\nTwo\nlines here.\n%\n")
    (root / "people.dat").write_bytes(b"\x00\x01")
    (root / "people.u8").write_text("duplicate\n%\n")
    (root / "it" / "italia").write_text("Chi va piano va sano.\n%\n")
    (root / "italia").symlink_to(root / "it" / "italia")
    (root / "de" / "sprueche").write_text("Ende gut, alles gut.\n%\nMorgenstund hat Gold im Mund.\n%\n")
    (root / "off" / "rude").write_text("never read\n%\n")
    (root / "es" / "off" / "x.fortunes").write_text("never read\n%\n")
    return root


def test_fortunes_parse_and_tree_layout(tmp_path):
    assert parse_fortunes("A wise man.\n\t\t-- Someone\n%\nTwo\nlines here.\n%\n") == ["A wise man.", "Two lines here."]
    quotes = read_fortunes(_fortune_tree(tmp_path / "fortunes"))
    got = sorted((q["language"], q["category"], q["text"]) for q in quotes)
    assert got == [("de", "sprueche", "Ende gut, alles gut."), ("de", "sprueche", "Morgenstund hat Gold im Mund."),
                   ("en", "people", "A wise man."), ("en", "people", "Two lines here."),
                   ("it", "italia", "Chi va piano va sano.")]


def test_chatterbot_pairs_each_statement_with_its_reply():
    pairs = read_chatterbot("english", DATA / "chatterbot")
    assert [(p["question"], p["answer"]) for p in pairs] == [
        ("Who was the 37th President of the United States?", "Richard Nixon"),
        ("What year was President John F. Kennedy assassinated?", "1963"),
        ("Hi", "Hello"), ("Hello", "How are you?")]
    assert pairs[0]["category"] == "trivia"
    assert parse_conversations("categories: [x]\nconversations: []\n") == []


def test_missing_corpora_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    monkeypatch.setattr("fedlora.data.fortunes.FORTUNES_DIR", "/nonexistent/fortunes")
    with pytest.raises(DataError, match=r"fedlora prepare-data.*apt-get install fortunes fortunes-min"):
        read_fortunes()
    monkeypatch.setattr("fedlora.data.wordnet.WORDNET_DIR", "/nonexistent/wordnet")
    with pytest.raises(DataError, match="apt-get install wordnet-base"):
        next(read_synsets("noun"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install chatterbot-corpus"):
        read_chatterbot()


def test_the_cache_tree_is_used_when_the_system_has_no_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    monkeypatch.setattr("fedlora.data.fortunes.FORTUNES_DIR", "/opt/nowhere/fortunes")
    _fortune_tree(tmp_path / "debian" / "opt" / "nowhere" / "fortunes")
    assert len(read_fortunes()) == 5


def test_jsonl_and_csv_with_field_mapping(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"sentence": "hi", "y": "pos"}\n\n{"sentence": "ho", "y": "neg"}\n')
    (tmp_path / "a.csv").write_text("sentence,y\nhi,pos\n")
    fields = {"text": "sentence", "label": "y"}
    assert [r["text"] for r in load_jsonl(tmp_path / "a.jsonl", fields)] == ["hi", "ho"]
    assert load_csv(tmp_path / "a.csv", fields)[0]["label"] == "pos"
    with pytest.raises(DataError, match="field 'txt'"):
        load_jsonl(tmp_path / "a.jsonl", {"text": "txt"})
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1 is not valid JSON"):
        load_jsonl(tmp_path / "bad.jsonl")


def test_hf_local_directory_and_offline_hub_error(tmp_path, monkeypatch):
    import datasets

    datasets.Dataset.from_dict({"sentence": ["a", "b"], "y": [0, 1]}).save_to_disk(str(tmp_path / "ds"))
    rows = load_hf(str(tmp_path / "ds"), "train", {"text": "sentence", "label": "y"})
    assert [(r["text"], r["label"]) for r in rows] == [("a", 0), ("b", 1)]
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="hub is not reachable"):
        load_hf("some-org/not-here", "train")
