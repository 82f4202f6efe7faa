#!/usr/bin/env bash
# GPU acceptance run for any machine with an NVIDIA GPU: does the product's GPU path work
# here, and how fast is it? About 8 minutes on one H100/H200.
#
#     bash tools/gpu_check.sh [OUT_DIR]        # default: gpu_check/
#
# Needs torch with CUDA, accelerate, and DALI (nvidia-dali-cuda120) + webdataset importable:
# `pip install -e .` does it on a machine with internet; docs/gpu.md says how to carry the
# wheels to one without. It stops at once, with the reason, if there is no GPU or DALI does
# not import: it never falls back to the torch backend.
#
# Steps, each logged to OUT_DIR/<step>.log:
#   1. environment: GPU, driver, torch, DALI; dr-doctor's checks (mixed and hardware decoders)
#   2. the GPU tests (pytest -m gpu): DALI GPU batches, pixels against the CPU path
#   3. loader benchmark at 512 px: DALI GPU decode-only and full pipeline, images/s
#   4. the trainer: 1 epoch at 512 px (bf16, channels_last), then --resume to 2 epochs,
#      then evaluate.py reproducing the logged test numbers
#   5. training benchmark: resnet18/resnet50 img/s fed by the loader and by a GPU-resident
#      batch (the loader's cost), peak GPU memory
# and writes OUT_DIR/gpu_check.json with every figure.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-gpu_check}")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
STATUS=0

step() { printf '\n== %s\n' "$*"; }
fail() { echo "gpu_check: $*" | tee -a "$OUT/FAILED" >&2; STATUS=1; }

step "1. environment"
if ! $PY - <<'PY' 2>&1 | tee "$OUT/env.log"; then
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU here (torch " + torch.__version__ + "); nothing to check")
print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.get_device_name(),
      "bf16 native", torch.cuda.get_device_capability() >= (8, 0))
try:
    import nvidia.dali as dali
    import webdataset  # noqa: F401
except ImportError as err:
    sys.exit(f"gpu_check: {err}; install DALI with its dependencies (docs/gpu.md), the GPU path needs it")
print("DALI", dali.__version__)
PY
    echo "gpu_check: stopped at the environment check, see $OUT/env.log" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/env.log"
# the doctor's GPU checks: DALI's mixed decoder, the hardware JPEG decoder, bf16, NCCL
$PY tools/doctor.py --no-smoke > "$OUT/doctor.log" 2>&1 || fail "dr-doctor found a problem: $OUT/doctor.log"
tail -n 25 "$OUT/doctor.log"

step "2. GPU tests"
$PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 15
grep -qE "[0-9]+ passed" "$OUT/pytest_gpu.log" && ! grep -qE "failed|error|skipped" "$OUT/pytest_gpu.log" \
    || fail "GPU tests did not all pass (or some were skipped): $OUT/pytest_gpu.log"

step "3. loader benchmark, 512 px"
timeout 240 $PY tools/bench_loader.py --make-synthetic 4096 --shards "$WORK/bench_shards" --batch-size 128 \
    --batches 40 --paths baseline dali-gpu decode-gpu --out "$OUT" 2>&1 | tee "$OUT/bench_loader.log" | tail -n 12 \
    || fail "loader benchmark failed: $OUT/bench_loader.log"

step "4. trainer: 1 epoch at 512 px, --resume to 2, evaluate"
{
    $PY tools/make_synthetic.py --out "$WORK/data" --n 1024 --size 512 --layout kaggle --seed 0 &&
    $PY tools/make_shards.py "$WORK/data" "$WORK/shards" --size 512 --quiet &&
    $PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 \
        --dynamo_backend no trainer/train.py --arch resnet18 --shards "$WORK/shards" --out "$WORK/run" \
        --epochs 1 --batch-size 64 --backend dali --quiet &&
    $PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 \
        --dynamo_backend no trainer/train.py --out "$WORK/run" --resume --epochs 2 --quiet &&
    $PY trainer/evaluate.py --checkpoint "$WORK/run/best.pt" --shards "$WORK/shards" --out "$WORK/eval"
} > "$OUT/trainer.log" 2>&1 || fail "the trainer failed: $OUT/trainer.log"
tail -n 8 "$OUT/trainer.log"
mkdir -p "$OUT/run" && cp -r "$WORK/run/metrics.jsonl" "$WORK/run/config.json" "$WORK/run/confusion" \
    "$WORK/eval" "$OUT/run/" 2>/dev/null

step "5. training benchmark, 512 px bf16"
timeout 240 $PY tools/gpu_train_bench.py --device cuda --backend dali --work "$WORK/train_bench" \
    --out "$OUT" 2>&1 | tee "$OUT/gpu_train_bench.log" | tail -n 6 \
    || fail "training benchmark failed: $OUT/gpu_train_bench.log"

step "figures"
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None
report = {"loader": load("bench_loader.json"), "training": load("gpu_train_bench.json")}
run = out / "run"
if (run / "metrics.jsonl").is_file():
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evaluation = json.loads((run / "eval" / "metrics.json").read_text()) if (run / "eval" / "metrics.json").is_file() else None
    report["trainer"] = {"epochs": rows, "evaluate": evaluation,
                         "evaluate_matches": bool(evaluation) and any(
                             abs(r["test_acc"] - evaluation["accuracy"]) < 1e-9 and abs(r["test_qwk"] - evaluation["qwk"]) < 1e-9
                             for r in rows)}
report["failed"] = (out / "FAILED").read_text().splitlines() if (out / "FAILED").exists() else []
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps({k: v for k, v in report.items() if k != "trainer"}, indent=1)[:3000])
PY
rm -rf "$WORK"
exit $STATUS
