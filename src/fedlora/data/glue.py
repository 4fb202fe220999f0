"""The glue suite (FedLEASE's GLUE setup: SST-2, QNLI, MRPC, QQP/RTE), four binary tasks from offline text.

review_sentiment (SST-2-like): an Amazon fine-food review (Debian r-cran-modeldata), "great" (5 stars) or "other".
qa_match (QNLI-like): a chatterbot question and a candidate answer, its own ("answer") or another question's
    answer from the same category ("not_answer").
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


def sentiment_records(reviews: list[Record]) -> list[Record]:
    """Reviews as {"text", "label"}; identical texts (the corpus repeats a few) kept once."""
    seen: set[str] = set()
    out = []
    for r in reviews:
        if r["text"] not in seen:
            seen.add(r["text"])
            out.append({"text": r["text"], "label": r["label"]})
    return out


def qa_match_records(pairs: list[Record], rng: random.Random) -> list[Record]:
    """Every distinct question/answer pair as "answer", and the question with another answer of its category
    (never one the corpus gives to that question) as "not_answer": each question occurs in both classes."""
    unique = sorted({(p["question"], p["answer"], p["category"]) for p in pairs
                     if len(p["question"]) >= MIN_CHARS and len(p["answer"]) >= MIN_CHARS})
    answers_of: dict[str, set[str]] = defaultdict(set)
    by_category: dict[str, list[str]] = defaultdict(list)
    for q, a, c in unique:
        answers_of[q].add(a)
        by_category[c].append(a)
    out: list[Record] = [{"text": q, "text_pair": a, "label": "answer"} for q, a, _ in unique]
    for q in sorted(answers_of):
        category = next(c for qq, _, c in unique if qq == q)
        wrong = sorted({x for x in by_category[category] if x not in answers_of[q]})
        # as many distinct wrong answers as the question has right ones, so no pair occurs twice
        out += [{"text": q, "text_pair": a, "label": "not_answer"}
                for a in rng.sample(wrong, min(len(wrong), len(answers_of[q])))]
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
