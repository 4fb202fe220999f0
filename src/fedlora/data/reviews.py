"""Reader for the Amazon fine-food reviews that Debian's r-cran-modeldata ships (`small_fine_foods`), without R.

An installed R package keeps its data sets in a lazy-load database, `data/Rdata.rdb` + `data/Rdata.rdx`: the
.rdx is an RDS file naming each object's (offset, length) in the .rdb, and each .rdb entry is one serialized R
object behind a 4-byte length and (for xz/bzip2 databases) a 1-byte compression type. The R serialization itself
is parsed by the `rdata` package (PyPI); this module only unframes the entries.
"""

from __future__ import annotations

import bz2
import lzma
import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

from ..core.errors import DataError
from .debian import find_installed
from .records import Record

MODELDATA_DIR = "/usr/lib/R/site-library/modeldata/data"
FINE_FOOD_TABLES = ("training_data", "testing_data")  # modeldata's `small_fine_foods`: 4000 + 1000 reviews
_LZMA2 = [{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 26}]  # R's xz entries are raw LZMA2 streams (preset 9: 64 MiB)


def _rdata():
    try:
        import rdata
    except ImportError:
        raise DataError("reading R data files needs the 'rdata' package: pip install rdata") from None
    return rdata


def parse_r_object(data: bytes) -> Any:
    """An R serialization stream (bytes, uncompressed) as Python objects (data frames as pandas)."""
    rdata = _rdata()
    with warnings.catch_warnings():  # rdata warns about file types it infers; the bytes are what matters
        warnings.simplefilter("ignore")
        return rdata.conversion.convert(rdata.parser.parse_data(data, expand_altrep=True))


def read_rds(path: str | Path) -> Any:
    """One .rds file (gzip, bzip2, xz or uncompressed) as Python objects."""
    raw = Path(path).read_bytes()
    for opener in (zlib.decompressobj(31).decompress, bz2.decompress, lzma.decompress):
        try:
            raw = opener(raw)
            break
        except (zlib.error, OSError, lzma.LZMAError, ValueError):
            continue
    return parse_r_object(raw)


def unframe_entry(blob: bytes, compressed: int) -> bytes:
    """The serialized object of one lazy-load entry: R's R_compress1 (zlib), 2 (bzip2) or 3 (xz) framing."""
    if compressed in (0, False):
        return blob
    (size,) = struct.unpack(">I", blob[:4])
    if compressed in (1, True):
        out = zlib.decompress(blob[4:])
    else:
        kind, body = blob[4:5], blob[5:]
        decoders = {b"Z": lambda b: lzma.decompress(b, format=lzma.FORMAT_RAW, filters=_LZMA2),
                    b"2": bz2.decompress, b"1": zlib.decompress, b"0": lambda b: b}
        if kind not in decoders:
            raise DataError(f"unknown R lazy-load compression type {kind!r}")
        out = decoders[kind](body)
    if len(out) != size:
        raise DataError(f"R lazy-load entry decompressed to {len(out)} bytes, expected {size}")
    return out


def read_lazyload(directory: str | Path, names: tuple[str, ...], stem: str = "Rdata") -> dict[str, Any]:
    """The named objects of an R lazy-load database (`<stem>.rdx` + `<stem>.rdb` in `directory`)."""
    directory = Path(directory)
    index_path, db_path = directory / f"{stem}.rdx", directory / f"{stem}.rdb"
    if not index_path.is_file() or not db_path.is_file():
        raise DataError(f"no R lazy-load database {stem}.rdx/.rdb in {directory}")
    index = read_rds(index_path)
    compressed = int(index.get("compressed", [1])[0])
    variables = index["variables"]
    missing = [n for n in names if n not in variables]
    if missing:
        raise DataError(f"{db_path} has no objects {missing}; it has {sorted(map(str, variables))[:20]}")
    raw = db_path.read_bytes()
    out = {}
    for name in names:
        offset, length = (int(x) for x in variables[name])
        out[name] = parse_r_object(unframe_entry(raw[offset: offset + length], compressed))
    return out


def clean_review(text: str) -> str:
    """A review's text with HTML line breaks and runs of white space folded to single spaces."""
    return " ".join(re.sub(r"<br\s*/?>", " ", str(text)).split())


def read_fine_foods(root: str | Path | None = None) -> list[Record]:
    """Every review of modeldata's small_fine_foods as {"text", "label" ("great" = 5 stars, else "other"),
    "product"}: its training and testing tables together (the suite draws its own splits)."""
    directory = Path(root) if root is not None else find_installed(MODELDATA_DIR, "reviews")
    tables = read_lazyload(directory, FINE_FOOD_TABLES)
    out: list[Record] = []
    for name in FINE_FOOD_TABLES:
        frame = tables[name]
        for product, review, score in zip(frame["product"], frame["review"], frame["score"]):
            out.append({"text": clean_review(review), "label": str(score), "product": str(product)})
    return out
