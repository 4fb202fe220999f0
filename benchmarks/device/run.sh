#!/usr/bin/env bash
# On the GPU machine (the device tool), from the repo root: install the carried wheels, then run one GPU check with
# its results (and log) under $OUT, each under a timeout that leaves the call time to return.
# Usage: bash benchmarks/device/run.sh all       (carry .whl and .whl-gpu; issue #39's checks, ~7.5 minutes)
#        bash benchmarks/device/run.sh batched   (carry .whl and .whl-minilm)
#        bash benchmarks/device/run.sh gpu       (carry .whl and .whl-gpu)
#        bash benchmarks/device/run.sh glue      (carry .whl, .whl-minilm and .whl-glue)
set -uo pipefail
check=${1:?all, batched, gpu or glue}
wheels=(.whl/*.whl)
[[ -d .whl-gpu ]] && wheels+=(.whl-gpu/*.whl)
[[ -d .whl-glue ]] && wheels+=(.whl-glue/*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
    || exit 1
export PYTHONPATH="/tmp/site:$PWD/.whl-minilm:$PWD/src" PYTHONUNBUFFERED=1
export FEDLORA_CACHE=/tmp/fedlora-cache
[[ -f .whl-glue/corpora.tar.xz ]] && mkdir -p "$FEDLORA_CACHE/debian" && tar -xJf .whl-glue/corpora.tar.xz -C "$FEDLORA_CACHE/debian"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/versions.txt"
case $check in
    all)  # in order of value, each under its own timeout; $OUT/all.tar is rewritten after each check, so a call cut
          # short keeps the checks done (and $OUT holds 3 files: a call returns at most 8)
        work=/tmp/device-all && mkdir -p "$work" && mv "$OUT"/nvidia-smi.csv "$OUT"/versions.txt "$work"/
        keep() { tar -cf "$OUT/all.tar" -C "$work" . ; }
        timeout 150 python3 benchmarks/speed_gpu.py --budget 100 --out "$work" > "$work/speed-gpu.log" 2>&1; keep
        timeout 170 python3 benchmarks/gpu.py --budget 130 --out "$work" > "$work/gpu.log" 2>&1; keep
        timeout 110 python3 benchmarks/batched.py --quick --minilm-shape --ks 1 16 --out "$work" \
            > "$work/batched.log" 2>&1; keep
        tail -n 30 "$work"/*.md ;;
    batched) timeout 330 python3 benchmarks/batched.py --quick --ks 1 4 16 64 --out "$OUT" 2>&1 | tee "$OUT/batched.log" ;;
    gpu) timeout 360 python3 benchmarks/gpu.py --budget 300 --out "$OUT" 2>&1 | tee "$OUT/gpu.log" ;;
    glue)  # the glue sweep's missing runs (the committed ones are skipped), 6 side by side on the GPU
        cp -r benchmarks/results/quality "$OUT/"
        timeout 480 python3 benchmarks/quality.py --suite glue glue-skew --seeds 0 1 2 --jobs 6 --client-batch auto \
            --scratch /tmp/quality-runs --out "$OUT" 2>&1 | tee "$OUT/glue.log" ;;
    *) echo "unknown check $check (all, batched, gpu or glue)"; exit 2 ;;
esac
