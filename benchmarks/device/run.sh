#!/usr/bin/env bash
# On the GPU machine (the device tool), from the repo root: install the carried wheels, then run one GPU check with
# its results (and log) under $OUT, each under a timeout that leaves the call time to return.
# Usage: bash benchmarks/device/run.sh batched   (carry .whl and .whl-minilm)
#        bash benchmarks/device/run.sh gpu       (carry .whl and .whl-gpu)
set -uo pipefail
check=${1:?batched or gpu}
wheels=(.whl/*.whl)
[[ -d .whl-gpu ]] && wheels+=(.whl-gpu/*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
    || exit 1
export PYTHONPATH="/tmp/site:$PWD/.whl-minilm:$PWD/src" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/versions.txt"
case $check in
    batched) timeout 300 python3 benchmarks/batched.py --quick --out "$OUT" 2>&1 | tee "$OUT/batched.log" ;;
    gpu) timeout 400 python3 benchmarks/gpu.py --budget 330 --out "$OUT" 2>&1 | tee "$OUT/gpu.log" ;;
    *) echo "unknown check $check (batched or gpu)"; exit 2 ;;
esac
