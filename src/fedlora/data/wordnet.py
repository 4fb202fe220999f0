"""Parser for WordNet 3.0 database files (`data.noun`, `data.verb`, ...), as Debian's wordnet-base installs them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import DataError
from .debian import find_installed

WORDNET_DIR = "/usr/share/wordnet"
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}

# The lexicographer files, by number (WordNet's lexnames(5WN)); the number is field 2 of a data line.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()


@dataclass
class Synset:
    """One WordNet synset: its lemmas, lexicographer class, gloss and typed pointers."""

    offset: str
    pos: str
    lexname: str
    lemmas: list[str]
    definition: str
    examples: list[str]
    # (symbol, target offset, target pos, source/target word numbers as 4 hex digits; 0000 = whole synset)
    pointers: list[tuple[str, str, str, str]] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        """(offset, data file) identifies a synset; adjective satellites live in the adj file."""
        return self.offset, POS_FILES[self.pos]


def parse_data_line(line: str) -> Synset | None:
    """Parse one line of a WordNet data file; licence header lines (starting with spaces) give None."""
    if not line.strip() or line.startswith("  "):
        return None
    head, _, gloss = line.partition(" | ")
    parts = head.split()
    try:
        offset, lex_num, ss_type = parts[0], int(parts[1]), parts[2]
        n_words = int(parts[3], 16)
        lemmas = [parts[4 + 2 * i].replace("_", " ") for i in range(n_words)]
        pos = 4 + 2 * n_words
        n_ptrs = int(parts[pos])
        pointers = [tuple(parts[pos + 1 + 4 * i: pos + 5 + 4 * i]) for i in range(n_ptrs)]
    except (IndexError, ValueError) as exc:
        raise DataError(f"malformed WordNet data line: {line[:80]!r} ({exc})") from None
    pieces = [p.strip() for p in gloss.strip().split(";")]
    definition = pieces[0]
    examples = [p.strip('"') for p in pieces[1:] if p.startswith('"')]
    lemmas = [lemma.split("(")[0] for lemma in lemmas]  # adjective markers like "(a)"
    return Synset(offset, ss_type, LEXNAMES[lex_num], lemmas, definition, examples, pointers)


def read_synsets(pos: str, root: str | Path | None = None) -> Iterator[Synset]:
    """Yield every synset of a part of speech ('noun', 'verb', 'adj', 'adv') from a WordNet directory."""
    path = (Path(root) if root is not None else find_installed(WORDNET_DIR, "wordnet")) / f"data.{pos}"
    if not path.is_file():
        raise DataError(f"WordNet file {path} not found: run 'fedlora prepare-data' "
                        "(or 'sudo apt-get install wordnet-base')")
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            syn = parse_data_line(line)
            if syn is not None:
                yield syn
