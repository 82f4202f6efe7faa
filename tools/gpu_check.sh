#!/usr/bin/env bash
# Every GPU check in one call on a lent GPU machine (H100/H200); results under $OUT.
#
# The GPU machine has torch, accelerate, rich, sklearn, matplotlib and scikit-image but
# neither DALI nor webdataset, and reaches no package index. Stage them here first:
#     bash tools/stage_gpu_wheels.sh          # -> .whl/ (small wheels) and .whl-dali/ (DALI, in parts)
# DALI's wheel (~190 MB) is larger than one call may carry (64 MiB), so its parts travel
# over consecutive calls on the same warm machine, each appending to /tmp/dali.part:
#     run(carry=[".whl-dali/part-aa"], command="cat .whl-dali/part-aa >> /tmp/dali.part")   # ... ab, ac, ad
# then this script, carrying .whl:
#     run(carry=[".whl"], command="bash tools/gpu_check.sh", timeout_s=540)
# Without the DALI parts the checks still run, on the torch backend only.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=python3

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ -s /tmp/dali.part ]; then
    cp /tmp/dali.part /tmp/nvidia_dali_cuda120-2.4.0-py3-none-manylinux_2_28_x86_64.whl
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        /tmp/nvidia_dali_cuda120-2.4.0-py3-none-manylinux_2_28_x86_64.whl
fi
BACKEND=torch
$PY -c "import nvidia.dali" 2>/dev/null && BACKEND=dali

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), sys.version)"
    echo "loader backend: $BACKEND"
} 2>&1 | tee "$OUT/env.txt"

echo "== GPU tests"
$PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 20

echo "== loader benchmark, 512 px"
timeout 200 $PY tools/bench_loader.py --make-synthetic 2048 --shards /tmp/bench_shards --batch-size 64 \
    --batches 40 --json "$OUT/bench_loader.json" 2>&1 | tee "$OUT/bench_loader.log" | tail -n 25

echo "== training benchmark, 512 px bf16"
timeout 240 $PY tools/gpu_train_bench.py --device cuda --backend "$BACKEND" --work /tmp/gpu_train \
    --out "$OUT/gpu_train_bench.json" 2>&1 | tee "$OUT/gpu_train_bench.log" | tail -n 25
