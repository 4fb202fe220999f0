"""Two sentence-pair tasks built from WordNet 3.0, for the glue suite.

wordnet_paraphrase (MRPC-like): a WordNet example sentence and the same sentence with its word replaced by a
    synonym (same synset: "paraphrase") or by a sibling's word (a co-hyponym under the same hypernym, or for
    adjectives a word of the antonym cluster: "not_paraphrase"). Both classes are one-word substitutions of the
    same kind of sentence by a WordNet lemma, so only the meaning of the swapped words tells them apart.
wordnet_hypernymy (RTE-like): a noun's gloss "w: definition" and "w is a kind of h.", h a lemma of w's
    hypernym ("entailment") or of the hypernym of another noun of the same lexicographer class that is not
    among w's ancestors ("not_entailment"), so h is drawn from the same words in both classes.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from .records import Record
from .wordnet import POS_FILES, Synset, read_synsets

HYPERNYM = {"@", "@i"}  # hypernym and instance hypernym
HYPONYM = {"~", "~i"}
NEGATIVE_TRIES = 20  # draws of a non-ancestor term before a noun is left out (its class is nearly all ancestors)


def load_wordnet(root: str | Path | None = None) -> dict[tuple[str, str], Synset]:
    """Every noun, verb and adjective synset by key."""
    return {s.key: s for pos in ("noun", "verb", "adj") for s in read_synsets(pos, root)}


def _targets(s: Synset, symbols: set[str], index: dict[tuple[str, str], Synset]) -> list[Synset]:
    return [index[key] for sym, off, pos, _ in s.pointers
            if sym in symbols and (key := (off, POS_FILES[pos])) in index]


def _find_word(sentence: str, lemmas: Iterable[str]) -> str | None:
    """The first lemma that occurs in the sentence as a whole word."""
    for lemma in lemmas:
        if re.search(rf"(?<![\w-]){re.escape(lemma)}(?![\w-])", sentence):
            return lemma
    return None


def _substitute(sentence: str, word: str, replacement: str) -> str:
    """The sentence with the word's first occurrence replaced, and an article right before it made to agree
    ("an interconnection" -> "a cohesion"): a mismatched article would mark substitutions by a surface cue."""
    def swap(m: re.Match) -> str:
        article = m.group(1) or ""
        if article:
            fitting = "an" if replacement[:1].lower() in "aeiou" else "a"
            article = (fitting.capitalize() if article[0].isupper() else fitting) + article[len(article.rstrip()):]
        return article + replacement
    return re.sub(rf"(\b(?:[Aa]n?)\s+)?(?<![\w-]){re.escape(word)}(?![\w-])", swap, sentence, count=1)


def _siblings(s: Synset, index: dict[tuple[str, str], Synset]) -> list[Synset]:
    """Synsets that differ in meaning but are close: co-hyponyms (nouns, verbs) or the antonym cluster (adjectives)."""
    if s.pos in ("n", "v"):
        return [t for h in _targets(s, HYPERNYM, index) for t in _targets(h, HYPONYM, index) if t.key != s.key]
    heads = [s] if s.pos == "a" else _targets(s, {"&"}, index)  # a satellite's head adjective
    opposite = [a for h in heads for a in _targets(h, {"!"}, index)]
    return opposite + [t for a in opposite for t in _targets(a, {"&"}, index)]


def paraphrase_records(index: dict[tuple[str, str], Synset], rng: random.Random) -> list[Record]:
    """One pair per usable synset, its class drawn at random: {"text", "text_pair", "label"}."""
    out: list[Record] = []
    for s in sorted(index.values(), key=lambda s: s.key):
        if len(s.lemmas) < 2 or not s.examples:
            continue
        found = [(ex, w) for ex in s.examples if (w := _find_word(ex, s.lemmas))]
        if not found:
            continue
        example, word = found[0]
        synonyms = [lemma for lemma in s.lemmas if lemma.lower() != word.lower()]
        others = [lemma for t in _siblings(s, index) for lemma in t.lemmas if lemma not in s.lemmas]
        if not synonyms or not others:
            continue
        positive = rng.random() < 0.5
        replacement = rng.choice(synonyms if positive else others)
        out.append({"text": example, "text_pair": _substitute(example, word, replacement),
                    "label": "paraphrase" if positive else "not_paraphrase"})
    return out


def _ancestors(s: Synset, index: dict[tuple[str, str], Synset]) -> set[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()
    stack = [s]
    while stack:
        for h in _targets(stack.pop(), HYPERNYM, index):
            if h.key not in seen:
                seen.add(h.key)
                stack.append(h)
    return seen


def hypernymy_records(index: dict[tuple[str, str], Synset], rng: random.Random) -> list[Record]:
    """One premise/hypothesis pair per noun synset with a hypernym, its class drawn at random."""
    nouns = [s for s in sorted(index.values(), key=lambda s: s.key) if s.pos == "n" and _targets(s, HYPERNYM, index)]
    # every noun's hypernyms, per lexicographer class: a negative's term is drawn as a positive's would be
    hypernyms_in: dict[str, list[Synset]] = defaultdict(list)
    for s in nouns:
        hypernyms_in[s.lexname] += _targets(s, HYPERNYM, index)
    out: list[Record] = []
    for s in nouns:
        word = s.lemmas[0]
        if rng.random() < 0.5:
            label, h = "entailment", rng.choice(_targets(s, HYPERNYM, index))
        else:
            ancestors = _ancestors(s, index) | {s.key}
            tries = (rng.choice(hypernyms_in[s.lexname]) for _ in range(NEGATIVE_TRIES))
            h = next((t for t in tries if t.key not in ancestors), None)
            if h is None:
                continue
            label = "not_entailment"
        term = rng.choice([lemma for lemma in h.lemmas if lemma != word] or h.lemmas)
        out.append({"text": f"{word}: {s.definition}", "text_pair": f"{word} is a kind of {term}.", "label": label})
    return out
