#!/usr/bin/env bash
# The main job on a fresh clone, end to end: `make demo` runs this inside the venv.
#
# With the real dataset in data/ it packs that (512 px, the reference recipe's input);
# otherwise it makes a few hundred synthetic fundus photographs and trains on those
# at a small size, so the whole demo takes a few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO=${DEMO_DIR:-demo}
N=${DEMO_IMAGES:-320}
SIZE=${DEMO_SIZE:-128}
EPOCHS=${DEMO_EPOCHS:-4}
export MPLBACKEND=Agg

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

mkdir -p "$DEMO"
rm -rf "$DEMO/runs" "$DEMO/eval" "$DEMO/photos"  # an earlier demo's results; data and shards are reused
if [ -d data ] && [ -n "$(ls -A data 2>/dev/null)" ]; then
    step "packing the dataset in data/ into $DEMO/shards"
    python tools/make_shards.py data "$DEMO/shards" --size "$SIZE"
else
    step "no data/ here: $N synthetic fundus photographs into $DEMO/data"
    python tools/make_synthetic.py --out "$DEMO/data" --n "$N" --size 256 --width 384 --layout kaggle --seed 0
    step "packing them into WebDataset shards ($SIZE px) in $DEMO/shards"
    python tools/make_shards.py "$DEMO/data" "$DEMO/shards" --size "$SIZE" --shard-size 64
fi

for schedule in constant cosine; do
    step "training resnet18 ($schedule lr, $EPOCHS epochs, $SIZE px) into $DEMO/runs/resnet18-$schedule"
    accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
        trainer/train.py --arch resnet18 \
        --shards "$DEMO/shards" --out "$DEMO/runs/resnet18-$schedule" \
        --epochs "$EPOCHS" --image-size "$SIZE" --batch-size 16 --lr 0.01 \
        --schedule "$schedule" --class-weights sqrt --quiet
done

step "evaluating the best checkpoint on the test split"
python trainer/evaluate.py --checkpoint "$DEMO/runs/resnet18-cosine/best.pt" \
    --shards "$DEMO/shards" --out "$DEMO/eval"

step "comparing the two runs"
python tools/compare_runs.py "$DEMO/runs/resnet18-constant" "$DEMO/runs/resnet18-cosine" \
    --out "$DEMO"

step "grading a folder of photographs (six synthetic, one real: scikit-image's retina)"
mkdir -p "$DEMO/photos"
python - "$DEMO" <<'PY'
import shutil, sys
from pathlib import Path
from PIL import Image
demo = Path(sys.argv[1])
for path in sorted((demo / "data").rglob("*.jpeg"))[:6]:
    shutil.copy(path, demo / "photos" / path.name)
try:
    from skimage.data import retina
    Image.fromarray(retina()).save(demo / "photos" / "skimage_retina.jpeg", quality=95)
except ImportError:
    pass
PY
python tools/predict.py --checkpoint "$DEMO/runs/resnet18-cosine/best.pt" --tta \
    --out "$DEMO" "$DEMO/photos"
column -s, -t < "$DEMO/predictions.csv" 2>/dev/null || cat "$DEMO/predictions.csv"

step "done; look at:"
cat <<MSG
  $DEMO/compare.png                     accuracy, loss and kappa per epoch for both runs
  $DEMO/compare.md                      the results table
  $DEMO/runs/*/confusion/epoch_*.png    a confusion matrix per epoch
  $DEMO/runs/*/metrics.jsonl            one JSON line per epoch
  $DEMO/eval/                           evaluation of best.pt
  $DEMO/predictions.csv                 predicted grade and probabilities per image
MSG
