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
if [ -d data ] && [ -n "$(ls -A data 2>/dev/null)" ]; then
    step "packing the dataset in data/ into $DEMO/shards"
    python tools/make_shards.py data "$DEMO/shards" --size "$SIZE"
else
    step "no data/ here: $N synthetic fundus photographs into $DEMO/data"
    python tools/make_synthetic.py "$DEMO/data" --n "$N" --size 256 --width 384 --layout kaggle --seed 0
    step "packing them into WebDataset shards ($SIZE px) in $DEMO/shards"
    python tools/make_shards.py "$DEMO/data" "$DEMO/shards" --size "$SIZE" --shard-size 64
fi

for schedule in constant cosine; do
    step "training resnet18 ($schedule lr, $EPOCHS epochs, $SIZE px) into $DEMO/runs/resnet18-$schedule"
    accelerate launch --num_processes 1 trainer/train.py --arch resnet18 \
        --shards "$DEMO/shards" --out "$DEMO/runs/resnet18-$schedule" \
        --epochs "$EPOCHS" --image-size "$SIZE" --batch-size 16 --lr 0.01 \
        --schedule "$schedule" --class-weights sqrt --quiet
done

step "evaluating the best checkpoint on the test split"
python trainer/evaluate.py --checkpoint "$DEMO/runs/resnet18-cosine/best.pt" \
    --shards "$DEMO/shards" --out "$DEMO/eval"

step "comparing the two runs"
python tools/compare_runs.py "$DEMO/runs/resnet18-constant" "$DEMO/runs/resnet18-cosine" \
    --out "$DEMO/compare.png"

step "predicting grades for a few photographs"
python tools/predict.py --checkpoint "$DEMO/runs/resnet18-cosine/best.pt" --tta \
    --out "$DEMO/predictions.csv" "$DEMO/data/train" 2>/dev/null | tail -n 3 || true

step "done; look at:"
cat <<MSG
  $DEMO/compare.png                     accuracy, loss and kappa per epoch for both runs
  $DEMO/compare.md                      the results table
  $DEMO/runs/*/confusion/epoch_*.png    a confusion matrix per epoch
  $DEMO/runs/*/metrics.jsonl            one JSON line per epoch
  $DEMO/eval/                           evaluation of best.pt
  $DEMO/predictions.csv                 predicted grade and probabilities per image
MSG
