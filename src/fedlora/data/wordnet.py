"""Parser for WordNet 3.0 database files (`data.noun`, `data.verb`, ...), as Debian's wordnet-base installs them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import DataError

WORDNET_DIR = Path("/usr/share/wordnet")

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
    pointers: list[tuple[str, str, str]] = field(default_factory=list)  # (symbol, target offset, target pos)


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
        pointers = [(parts[pos + 1 + 4 * i], parts[pos + 2 + 4 * i], parts[pos + 3 + 4 * i]) for i in range(n_ptrs)]
    except (IndexError, ValueError) as exc:
        raise DataError(f"malformed WordNet data line: {line[:80]!r} ({exc})") from None
    pieces = [p.strip() for p in gloss.strip().split(";")]
    definition = pieces[0]
    examples = [p.strip('"') for p in pieces[1:] if p.startswith('"')]
    lemmas = [lemma.split("(")[0] for lemma in lemmas]  # adjective markers like "(a)"
    return Synset(offset, ss_type, LEXNAMES[lex_num], lemmas, definition, examples, pointers)


def read_synsets(pos: str, root: str | Path = WORDNET_DIR) -> Iterator[Synset]:
    """Yield every synset of a part of speech ('noun', 'verb', 'adj', 'adv') from a WordNet directory."""
    path = Path(root) / f"data.{pos}"
    if not path.is_file():
        raise DataError(
            f"WordNet file {path} not found. Install it with 'sudo apt-get install wordnet-base' "
            "(or run 'fedlora prepare-data'), or point the loader at a directory holding data.noun and data.verb."
        )
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            syn = parse_data_line(line)
            if syn is not None:
                yield syn
