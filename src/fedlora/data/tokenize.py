"""Tokenize records once per client, then batch them with padding (right for training, left for generation).

Classification records with a `text_pair` are sentence pairs: tokenized as the tokenizer's segment pair
(`[CLS] a [SEP] b [SEP]` for BERT), with token_type_ids marking the segments."""

from __future__ import annotations

import math

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..core.errors import DataError
from .records import Record

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # positions the loss skips (prompt and padding tokens)


@dataclass
class Encoded:
    """A tokenized split: token ids per example and targets (class ids, or per-token labels for causal LM)."""

    input_ids: list[list[int]]
    targets: list                                  # int per example, or list[int] per token
    prompts: list[list[int]] = field(default_factory=list)   # generation: prompt ids for decoding
    references: list[str] = field(default_factory=list)      # generation: reference answers
    n_truncated: int = 0
    token_type_ids: list[list[int]] = field(default_factory=list)  # sentence pairs: the segment of each token

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, idx: Sequence[int]) -> "Encoded":
        """The examples at `idx`, in that order."""
        pick = lambda xs: [xs[i] for i in idx] if xs else []  # noqa: E731
        return Encoded(pick(self.input_ids), pick(self.targets), pick(self.prompts), pick(self.references),
                       token_type_ids=pick(self.token_type_ids))


def encode_texts(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int,
                 targets: Sequence[int] | None = None) -> Encoded:
    """Token ids of texts, cut to max_length keeping the final special token; targets default to 0."""
    full = tokenizer([str(t) for t in texts], truncation=False)["input_ids"] if texts else []
    ids = [x[:max_length - 1] + x[-1:] if len(x) > max_length else x for x in full]  # keep the final [SEP]
    return Encoded(ids, list(targets) if targets is not None else [0] * len(ids),
                   n_truncated=sum(len(x) > max_length for x in full))


def encode_pairs(texts: Sequence[str], pairs: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int,
                 targets: Sequence[int] | None = None) -> Encoded:
    """Token ids and segment ids of sentence pairs, the longer sentence cut first to fit max_length."""
    if not texts:
        return Encoded([], [], token_type_ids=[])
    texts, pairs = [str(t) for t in texts], [str(p) for p in pairs]
    full = tokenizer(texts, pairs, truncation=False)["input_ids"]
    enc = tokenizer(texts, pairs, truncation="longest_first", max_length=max_length, return_token_type_ids=True)
    if "token_type_ids" not in enc:
        raise DataError("the tokenizer gives no token_type_ids for sentence pairs; pair tasks need a BERT-style model")
    return Encoded(enc["input_ids"], list(targets) if targets is not None else [0] * len(texts),
                   n_truncated=sum(len(x) > max_length for x in full), token_type_ids=enc["token_type_ids"])


def encode_classification(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, labels: Sequence[str],
                          max_length: int) -> Encoded:
    """Token ids of each record's text (a segment pair when records carry `text_pair`) and its label's index."""
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({str(r["label"]) for r in records} - set(index))
    if unknown:
        raise DataError(f"labels {unknown[:5]} were not seen among the task's labels {list(labels)[:10]}")
    targets = [index[str(r["label"])] for r in records]
    paired = sum("text_pair" in r for r in records)
    if not paired:
        return encode_texts([r["text"] for r in records], tokenizer, max_length, targets)
    if paired < len(records):  # one model input format per task: a mix would be a data bug
        raise DataError(f"{paired} of {len(records)} records have a text_pair: a task's records must all be "
                        "sentence pairs or all single texts")
    return encode_pairs([r["text"] for r in records], [r["text_pair"] for r in records], tokenizer, max_length,
                        targets)


def encode_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[int]:
    """A prompt's ids; a prompt of max_length tokens or more keeps its last max_length // 2 tokens."""
    ids = tokenizer(str(prompt), add_special_tokens=True)["input_ids"]
    return ids[-max(1, max_length // 2):] if len(ids) >= max_length else ids


def encode_generation(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    """Prompt+response+EOS ids with the prompt masked out of the loss (train_on_inputs=False)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; causal-LM training needs one")
    input_ids, targets, prompts, refs, truncated = [], [], [], [], 0
    for r in records:
        p = encode_prompt(r["prompt"], tokenizer, max_length)
        a = tokenizer(str(r["response"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(p) + len(a) > max_length:
            truncated += 1
            a = a[: max_length - len(p)]
        input_ids.append(p + a)
        targets.append([IGNORE_INDEX] * len(p) + a)
        prompts.append(p)
        refs.append(str(r["response"]))
    return Encoded(input_ids, targets, prompts, refs, truncated)


def pad(seqs: Sequence[Sequence[int]], value: int, left: bool = False,
        width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences padded with `value` on the right (or left) to `width` (default the longest): (ids, attention mask)."""
    width = width or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, cols] = torch.tensor(s, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def collate(examples: Encoded, idx: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded training/eval batch of the examples at `idx`."""
    ids, mask = pad([examples.input_ids[i] for i in idx], pad_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if examples.token_type_ids:  # sentence pairs: padding belongs to segment 0, as the tokenizer pads it
        batch["token_type_ids"] = pad([examples.token_type_ids[i] for i in idx], 0, width=ids.shape[1])[0]
    first = examples.targets[idx[0]]
    if isinstance(first, list):
        batch["labels"] = pad([examples.targets[i] for i in idx], IGNORE_INDEX, width=ids.shape[1])[0]
    else:
        batch["labels"] = torch.tensor([examples.targets[i] for i in idx], dtype=torch.long)
    return batch


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """A left-padded batch of prompts for generation."""
    ids, mask = pad(prompts, pad_id, left=True)
    return {"input_ids": ids, "attention_mask": mask}


def steps_for_epochs(epochs: float, n: int, batch_size: int) -> int:
    """Optimizer steps of `epochs` passes over n examples, as HF Trainer counts them: ceil(E * batches per epoch),
    the last batch of an epoch partial, so a whole number of epochs sees every example each epoch."""
    return max(1, math.ceil(epochs * math.ceil(n / batch_size)))


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[list[int]]:
    """Indices of one epoch in batches; shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]
