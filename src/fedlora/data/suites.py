"""The built-in benchmark suites, built from real text that package registries provide.

nlu (FedLEASE-style): 4 classification tasks, each split over `clients_per_task` clients with Dirichlet
    label skew: WordNet noun topic, WordNet verb class, fortunes category (English, the 10 largest
    categories), fortunes language (7 languages).
nlg (FedALT-style): 8 instruction tasks, one client each, in the alpaca_short template FedALT uses:
    define a word, word from its definition, hypernym, antonym, synonym, topic of a definition,
    chatterbot Q/A, language of a quote.
glue (FedLEASE's GLUE setup): 4 binary tasks x 4 clients, three of them sentence pairs (glue.py).
Each task's pool is sampled with the run's seed; `build_clients` then partitions it.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from ..core.seeding import derive_seed
from .chatterbot import read_chatterbot
from .fortunes import LANGUAGES, read_fortunes
from .glue import glue_records
from .records import Record
from .wordnet import POS_FILES, Synset, read_synsets

TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"  # FedDPA's alpaca_short, used by FedALT
NLU_TASKS = ("wordnet_noun_topic", "wordnet_verb_class", "fortunes_category", "fortunes_language")
NLG_TASKS = ("define_word", "word_from_definition", "hypernym", "antonym", "synonym", "definition_topic",
             "chatterbot_qa", "quote_language")
MAX_QUOTE_CHARS = 300  # longer fortunes are poems and dialogues, not quotes


def balanced_sample(records: list[Record], n: int, key: str, rng: random.Random) -> list[Record]:
    """Up to n records with classes as equal as the data allows (small classes are taken whole)."""
    by_class: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_class[str(r[key])].append(r)
    for members in by_class.values():
        rng.shuffle(members)
    picked: list[Record] = []
    classes = sorted(by_class, key=lambda c: len(by_class[c]))
    for i, c in enumerate(classes):
        share = (n - len(picked)) // (len(classes) - i)
        picked += by_class[c][:share]
    rng.shuffle(picked)
    return picked


# -- NLU ------------------------------------------------------------------------------------------------
def nlu_records(pool_per_task: int, seed: int, wordnet_root: str | Path | None = None,
                fortunes_root: str | Path | None = None) -> list[Record]:
    """{"task", "text", "label"} records of the four NLU tasks, a class-balanced pool of each."""
    rng = lambda task: random.Random(derive_seed(seed, "suite", task))  # noqa: E731
    nouns = [{"text": s.definition, "label": s.lexname.split(".")[1]}
             for s in read_synsets("noun", wordnet_root) if s.lexname != "noun.Tops"]
    verbs = [{"text": s.definition, "label": s.lexname.split(".")[1]} for s in read_synsets("verb", wordnet_root)]
    quotes = [q for q in read_fortunes(fortunes_root) if len(q["text"]) <= MAX_QUOTE_CHARS]
    english = [q for q in quotes if q["language"] == "en"]
    top10 = {c for c, _ in Counter(q["category"] for q in english).most_common(10)}
    categories = [{"text": q["text"], "label": q["category"]} for q in english if q["category"] in top10]
    languages = [{"text": q["text"], "label": LANGUAGES[q["language"]]} for q in quotes]
    out: list[Record] = []
    for task, records in zip(NLU_TASKS, (nouns, verbs, categories, languages)):
        out += [{**r, "task": task} for r in balanced_sample(records, pool_per_task, "label", rng(task))]
    return out


# -- NLG ------------------------------------------------------------------------------------------------
def _prompt(instruction: str, response: str) -> Record:
    return {"prompt": TEMPLATE.format(instruction=instruction), "response": response}


def _single_sense(synsets: Iterable[Synset]) -> set[str]:
    """Lemmas with exactly one sense across the given synsets: their definition is unambiguous."""
    counts = Counter(lemma for s in synsets for lemma in set(s.lemmas))
    return {lemma for lemma, n in counts.items() if n == 1}


def wordnet_generation_tasks(root: str | Path | None = None) -> dict[str, list[Record]]:
    """The six WordNet instruction tasks, every usable example of each."""
    by_pos = {pos: list(read_synsets(pos, root)) for pos in ("noun", "verb", "adj")}
    index = {s.key: s for synsets in by_pos.values() for s in synsets}
    all_synsets = [s for synsets in by_pos.values() for s in synsets]
    unique = _single_sense(all_synsets)
    tasks: dict[str, list[Record]] = defaultdict(list)
    for s in by_pos["noun"] + by_pos["verb"]:
        word = s.lemmas[0]
        if word in unique and " " not in word:
            tasks["define_word"].append(_prompt(f"Define the word '{word}'.", s.definition))
            tasks["word_from_definition"].append(_prompt(f"Which word means: {s.definition}?", word))
        if len(s.lemmas) >= 2 and s.lemmas[0] in unique:
            tasks["synonym"].append(_prompt(f"Give a synonym of '{s.lemmas[0]}'.", s.lemmas[1]))
    for s in by_pos["noun"]:
        hypernyms = [index[(off, POS_FILES[pos])] for sym, off, pos, _ in s.pointers if sym == "@"]
        if hypernyms and s.lemmas[0] in unique:
            tasks["hypernym"].append(_prompt(f"Name a more general term for '{s.lemmas[0]}'.", hypernyms[0].lemmas[0]))
        if s.lemmas[0] in unique:
            tasks["definition_topic"].append(
                _prompt(f"What is the topic of this definition: {s.definition}?", s.lexname.split(".")[1]))
    seen: set[tuple[str, str]] = set()
    for s in all_synsets:
        for sym, off, pos, words in s.pointers:
            if sym != "!" or words == "0000":
                continue
            source, target = s.lemmas[int(words[:2], 16) - 1], index[(off, POS_FILES[pos])].lemmas[int(words[2:], 16) - 1]
            if (source, target) not in seen and (target, source) not in seen:
                seen.add((source, target))
                tasks["antonym"].append(_prompt(f"Give the opposite of '{source}'.", target))
    return dict(tasks)


def nlg_records(pool_per_task: int, seed: int, wordnet_root: str | Path | None = None,
                fortunes_root: str | Path | None = None, chatterbot_root: str | Path | None = None) -> list[Record]:
    """{"task", "prompt", "response"} records of the eight NLG tasks, `pool_per_task` sampled from each."""
    tasks = wordnet_generation_tasks(wordnet_root)
    tasks["chatterbot_qa"] = [_prompt(q["question"], q["answer"]) for q in read_chatterbot("english", chatterbot_root)]
    tasks["quote_language"] = [_prompt(f"Which language is this quote in: {q['text']}", LANGUAGES[q["language"]])
                               for q in read_fortunes(fortunes_root) if len(q["text"]) <= MAX_QUOTE_CHARS // 2]
    out: list[Record] = []
    for task in NLG_TASKS:
        rng = random.Random(derive_seed(seed, "suite", task))
        pool = tasks.get(task, [])
        if task == "quote_language":
            pool = balanced_sample(pool, pool_per_task, "response", rng)
        out += [{**r, "task": task} for r in rng.sample(pool, min(pool_per_task, len(pool)))]
    return out


SUITES: dict[str, Callable[..., list[Record]]] = {"nlu": nlu_records, "nlg": nlg_records, "glue": glue_records}
