"""The glue suite (FedLEASE's GLUE setup: SST-2, QNLI, MRPC, QQP/RTE), four binary tasks from offline text.

review_sentiment (SST-2-like): the first 32 words of an Amazon fine-food review (Debian r-cran-modeldata), "great"
    (5 stars) or "other".
qa_match (QNLI-like): a chatterbot question and a candidate answer, its own ("answer") or another question's
    ("not_answer"); every question once.
wordnet_paraphrase (MRPC-like) and wordnet_hypernymy (RTE-like): see wordnet_pairs.py.
Pair tasks carry the second sentence in `text_pair` (tokenized as a BERT segment pair). Each task's pool is
class-balanced exactly and dealt into `shards` class-balanced shards (the record field `shard`): with
data.partition = "by_key", partition_key = "shard" every client holds balanced classes, as FedLEASE's official
partitioner gives them; with data.partition = "dirichlet" the same pool gets label skew.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from ..core.seeding import derive_seed
from .chatterbot import read_chatterbot
from .records import Record
from .reviews import read_fine_foods
from .wordnet_pairs import hypernymy_records, load_wordnet, paraphrase_records

GLUE_TASKS = ("review_sentiment", "qa_match", "wordnet_paraphrase", "wordnet_hypernymy")
MIN_CHARS = 2  # the corpus has a few one-letter "conversations" (trivia: "r" -> "a")
REVIEW_WORDS = 32  # about 40 word pieces: the whole excerpt fits in glue-quick's max_length
NEGATIVE_TRIES = 20  # draws of another question's answer before a question is left out


def strictly_balanced(records: list[Record], n: int, rng: random.Random) -> list[Record]:
    """Up to n records with exactly equal class counts (as many per class as the smallest class allows)."""
    by_class: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_class[str(r["label"])].append(r)
    per_class = min([n // max(1, len(by_class))] + [len(v) for v in by_class.values()])
    picked: list[Record] = []
    for label in sorted(by_class):
        members = list(by_class[label])
        rng.shuffle(members)
        picked += members[:per_class]
    rng.shuffle(picked)
    return picked


def deal_shards(records: list[Record], shards: int) -> list[Record]:
    """The records with a `shard` field, each class dealt round-robin so every shard is balanced (within 1)."""
    seen: dict[str, int] = defaultdict(int)
    out = []
    for r in records:
        label = str(r["label"])
        out.append({**r, "shard": seen[label] % shards})
        seen[label] += 1
    return out


def review_excerpt(text: str, words: int = REVIEW_WORDS) -> str:
    """The review's first `words` words: a sentence-length input like SST-2's, which the model sees whole."""
    return " ".join(text.split()[:words])


def sentiment_records(reviews: list[Record]) -> list[Record]:
    """Reviews' excerpts (review_excerpt) as {"text", "label"}; identical excerpts (the corpus repeats a few
    reviews) kept once."""
    seen: set[str] = set()
    out = []
    for r in reviews:
        text = review_excerpt(r["text"])
        if text not in seen:
            seen.add(text)
            out.append({"text": text, "label": r["label"]})
    return out


def qa_match_records(pairs: list[Record], rng: random.Random) -> list[Record]:
    """One record per distinct question, its class drawn at random: the question with one of its own answers
    ("answer") or with an answer the corpus gives another question and never this one ("not_answer").

    A question occurs once in the whole task, so it can never sit in train with one candidate and in test with
    another. The wrong answer is drawn as a right one is (a random other question, then one of its answers), so
    both classes draw their candidates from the same answers and only how question and candidate relate tells
    them apart."""
    unique = sorted({(p["question"], p["answer"]) for p in pairs
                     if len(p["question"]) >= MIN_CHARS and len(p["answer"]) >= MIN_CHARS})
    answers_of: dict[str, list[str]] = defaultdict(list)
    for q, a in unique:
        answers_of[q].append(a)
    questions = sorted(answers_of)
    out: list[Record] = []
    for q in questions:
        if rng.random() < 0.5:
            out.append({"text": q, "text_pair": rng.choice(answers_of[q]), "label": "answer"})
            continue
        for _ in range(NEGATIVE_TRIES):
            other = rng.choice(questions)
            a = rng.choice(answers_of[other])
            if other != q and a not in answers_of[q]:
                out.append({"text": q, "text_pair": a, "label": "not_answer"})
                break
    return out


def glue_records(pool_per_task: int, seed: int, wordnet_root: str | Path | None = None,
                 reviews_root: str | Path | None = None, chatterbot_root: str | Path | None = None,
                 shards: int = 4) -> list[Record]:
    """{"task", "text", ["text_pair",] "label", "shard"} records of the four tasks, a balanced pool of each."""
    rng = lambda task: random.Random(derive_seed(seed, "suite", task))  # noqa: E731
    index = load_wordnet(wordnet_root)
    builders = {
        "review_sentiment": lambda r: sentiment_records(read_fine_foods(reviews_root)),
        "qa_match": lambda r: qa_match_records(read_chatterbot("english", chatterbot_root), r),
        "wordnet_paraphrase": lambda r: paraphrase_records(index, r),
        "wordnet_hypernymy": lambda r: hypernymy_records(index, r),
    }
    out: list[Record] = []
    for task in GLUE_TASKS:
        task_rng = rng(task)
        pool = strictly_balanced(builders[task](task_rng), pool_per_task, task_rng)
        out += [{**r, "task": task} for r in deal_shards(pool, shards)]
    return out
