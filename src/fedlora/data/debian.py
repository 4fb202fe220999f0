"""Finding and preparing the offline corpora that Debian packages ship (WordNet, fortunes, fine-food reviews).

A corpus is read from its system location, or from fedlora's cache, where `fedlora prepare-data`
unpacks the packages with `apt-get download` + `dpkg -x` when it cannot install them (no root), and
always for the packages of `UNPACK_ONLY` (their dependencies are not needed to read the data).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..core.errors import DataError
from ..core.io import cache_dir

CORPUS_PACKAGES = {
    "wordnet": ["wordnet-base"],
    "fortunes": ["fortunes", "fortunes-min", "fortunes-de", "fortunes-es", "fortunes-it", "fortunes-ru",
                 "fortunes-pl", "fortunes-cs"],
}
# Corpora always unpacked into the cache, even as root: installing r-cran-modeldata (the glue suite's Amazon
# fine-food reviews) would pull in R itself (r-base-core and five R libraries), and its data files are read
# without R (data/reviews.py). Kept apart from CORPUS_PACKAGES, whose every corpus api.prepare_data checks.
UNPACKED_CORPORA = {"reviews": ["r-cran-modeldata"]}
UNPACK_ONLY = {p for packages in UNPACKED_CORPORA.values() for p in packages}


def corpus_packages(corpus: str) -> list[str]:
    """The Debian packages that provide a corpus."""
    return {**CORPUS_PACKAGES, **UNPACKED_CORPORA}[corpus]


def find_installed(system_path: str, corpus: str) -> Path:
    """The system path if it exists, else its copy under the cache's unpacked tree; DataError says how to get it."""
    for root in (Path("/"), cache_dir() / "debian"):
        candidate = root / system_path.lstrip("/")
        if candidate.exists():
            return candidate
    packages = corpus_packages(corpus)
    if set(packages) <= UNPACK_ONLY:
        manual = (f"apt-get download {' '.join(packages)} && dpkg -x <the .deb> {cache_dir() / 'debian'}")
    else:
        manual = f"sudo apt-get install {' '.join(packages)}"
    raise DataError(f"the {corpus} corpus is not installed ({system_path} not found). Run 'fedlora prepare-data' "
                    f"(or '{manual}')")


def prepare_packages(packages: list[str], log: Callable[[str], None] = print) -> None:
    """Install Debian packages with apt-get when root, else (and always for UNPACK_ONLY) download and unpack
    them into the cache."""
    if not shutil.which("apt-get"):
        raise DataError("apt-get is not available: install the packages "
                        f"{' '.join(packages)} by other means, or unpack them under {cache_dir() / 'debian'}")
    if os.geteuid() == 0 and not set(packages) & UNPACK_ONLY:
        log(f"apt-get install {' '.join(packages)}")
        _run(["apt-get", "install", "-y", "-q", *packages], retry_after_update=True)
        return
    target = cache_dir() / "debian"
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log(f"apt-get download {' '.join(packages)} -> dpkg -x into {target}")
        _run(["apt-get", "download", *packages], cwd=tmp, retry_after_update=True)
        for deb in sorted(Path(tmp).glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(target)])


def _run(cmd: list[str], cwd: str | None = None, retry_after_update: bool = False) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0 and retry_after_update:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True)
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise DataError(f"'{' '.join(cmd)}' failed: {result.stderr.strip()[-500:]}")
