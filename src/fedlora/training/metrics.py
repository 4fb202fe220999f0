"""Evaluation metrics: accuracy and macro-F1 for classification; exact match and ROUGE for generation."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from sklearn.metrics import f1_score


def classification_metrics(preds: Sequence[int], targets: Sequence[int], n_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over the task's label set."""
    n = len(targets)
    acc = sum(int(p == t) for p, t in zip(preds, targets)) / max(n, 1)
    f1 = f1_score(list(targets), list(preds), labels=list(range(n_labels)), average="macro", zero_division=0)
    return {"accuracy": float(acc), "macro_f1": float(f1)}


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and collapse white space (SQuAD-style) for exact match."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def generation_metrics(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Exact match and ROUGE-1 / ROUGE-L F-measures (rouge-score, stemming on) averaged over examples."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    n = max(len(refs), 1)
    r1 = rl = em = 0.0
    for p, r in zip(preds, refs):
        s = scorer.score(r, p)
        r1 += s["rouge1"].fmeasure
        rl += s["rougeL"].fmeasure
        em += float(normalize_answer(p) == normalize_answer(r))
    return {"exact_match": em / n, "rouge1": r1 / n, "rougeL": rl / n}
