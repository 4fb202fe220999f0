"""Regenerate src/fedlora/data/assets/wordnet_demo.jsonl.gz from an installed WordNet 3.0 (Debian wordnet-base).

The demo sample holds two classification tasks built from WordNet glosses:
  noun_topic  - the lexicographer class of a noun definition (8 classes)
  verb_class  - the lexicographer class of a verb definition (6 classes)
Usage: python scripts/make_demo_sample.py [--per-class 220] [--seed 0]
"""

import argparse
import gzip
import json
import random
from pathlib import Path

from fedlora.data.wordnet import read_synsets

NOUNS = ["noun.animal", "noun.artifact", "noun.food", "noun.person", "noun.plant", "noun.location",
         "noun.body", "noun.feeling"]
VERBS = ["verb.motion", "verb.communication", "verb.change", "verb.contact", "verb.cognition", "verb.consumption"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=220)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = []
    for task, pos, classes in (("noun_topic", "noun", NOUNS), ("verb_class", "verb", VERBS)):
        by_class: dict[str, list[str]] = {c: [] for c in classes}
        for syn in read_synsets(pos):
            if syn.lexname in by_class and 15 <= len(syn.definition) <= 160:
                by_class[syn.lexname].append(syn.definition)
        for label, texts in by_class.items():
            for text in rng.sample(texts, min(args.per_class, len(texts))):
                out.append({"task": task, "text": text, "label": label.split(".")[1]})
    dest = Path(__file__).resolve().parents[1] / "src/fedlora/data/assets/wordnet_demo.jsonl.gz"
    with gzip.GzipFile(dest, "wb", mtime=0) as fh:
        fh.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in out).encode())
    print(f"wrote {len(out)} records to {dest} ({dest.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
