"""Two sentence-pair tasks built from WordNet 3.0, for the glue suite.

wordnet_paraphrase (MRPC-like): a WordNet example sentence and the same sentence with its word replaced by a
    synonym (same synset: "paraphrase") or by the synonym another synset of the same part of speech would use
    ("not_paraphrase"). Both classes are one-word substitutions of the same kind of sentence by a WordNet lemma
    drawn the same way, so only the meaning of the swapped words tells them apart.
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


def paraphrase_records(index: dict[tuple[str, str], Synset], rng: random.Random) -> list[Record]:
    """One pair per usable synset, its class drawn at random: {"text", "text_pair", "label"}.

    A synset is usable when one of its examples contains one of its lemmas and it has another lemma. The
    "paraphrase" replacement is another lemma of the synset; the "not_paraphrase" one is drawn exactly as a
    paraphrase's would be, but for another usable synset of the same part of speech (a random synset, then one
    of its synonyms): both classes replace the word by a WordNet synonym drawn the same way, so neither the
    sentence nor the inserted word says which class a pair is in, only whether the two words mean the same."""
    usable: list[tuple[Synset, str, str, list[str]]] = []
    for s in sorted(index.values(), key=lambda s: s.key):
        if len(s.lemmas) < 2 or not s.examples:
            continue
        found = [(ex, w) for ex in s.examples if (w := _find_word(ex, s.lemmas))]
        if not found:
            continue
        example, word = found[0]
        synonyms = [lemma for lemma in s.lemmas if lemma.lower() != word.lower()]
        if synonyms:
            usable.append((s, example, word, synonyms))
    by_pos: dict[str, list[int]] = defaultdict(list)
    for i, (s, *_) in enumerate(usable):
        by_pos[_pos_group(s)].append(i)
    out: list[Record] = []
    for i, (s, example, word, synonyms) in enumerate(usable):
        if rng.random() < 0.5:
            label, replacement = "paraphrase", rng.choice(synonyms)
        else:
            own = {lemma.lower() for lemma in s.lemmas}
            tries = (usable[rng.choice(by_pos[_pos_group(s)])] for _ in range(NEGATIVE_TRIES))
            replacement = next((c for t in tries if t[0].key != s.key
                                and (c := rng.choice(t[3])).lower() not in own), None)
            if replacement is None:
                continue
            label = "not_paraphrase"
        out.append({"text": example, "text_pair": _substitute(example, word, replacement), "label": label})
    return out


def _pos_group(s: Synset) -> str:
    """Adjectives and their satellites are one group: either fits where the other does."""
    return "a" if s.pos in ("a", "s") else s.pos


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
