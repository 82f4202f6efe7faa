#!/usr/bin/env bash
# The main job on a fresh clone, end to end: `make demo` runs this inside the venv.
#
# With a dataset in data/ it packs that, in any layout make_shards recognises by its files
# (docs/datasets.md: lab, eyepacs, aptos, messidor2, idrid, ddr); otherwise it makes a few hundred synthetic
# fundus photographs at the realistic difficulty (small faint lesions, camera variation,
# label noise, correlated eyes) and trains on those at a small size, so the whole demo
# takes several minutes on 2 CPU cores. It compares what matters beyond the reference
# recipe: the 5-way classify head against the regress head with cut-points tuned on val,
# and both eyes blended and fused (dr-fuse), all reported on test at the best-val epoch.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO=${DEMO_DIR:-demo}
N=${DEMO_IMAGES:-600}
SIZE=${DEMO_SIZE:-128}
EPOCHS=${DEMO_EPOCHS:-6}
DIFFICULTY=${DEMO_DIFFICULTY:-realistic}
LESION_SCALE=${DEMO_LESION_SCALE:-3}  # lesions 3x life size: the demo trains at 128 px, not 512
export MPLBACKEND=Agg

# bold step headers on a terminal; plain text in a log file (no escape codes)
if [ -t 1 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD='' PLAIN=''; fi
step() { printf '\n%s== %s%s\n' "$BOLD" "$*" "$PLAIN"; }

mkdir -p "$DEMO"
rm -rf "$DEMO/runs" "$DEMO/eval" "$DEMO/photos" "$DEMO/cam" "$DEMO/heat"  # an earlier demo's results; data and shards are reused
if [ -d data ] && [ -n "$(ls -A data 2>/dev/null)" ]; then
    step "packing the dataset in data/ into $DEMO/shards"
    python tools/make_shards.py data "$DEMO/shards" --image-size "$SIZE"
else
    step "no data/ here: $N synthetic fundus photographs ($DIFFICULTY) into $DEMO/data"
    python tools/make_synthetic.py --out "$DEMO/data" --n "$N" --image-size 256 --layout kaggle --seed 0 \
        --difficulty "$DIFFICULTY" --lesion-scale "$LESION_SCALE" --masks
    step "packing them into WebDataset shards ($SIZE px; train, val and test) in $DEMO/shards"
    python tools/make_shards.py "$DEMO/data" "$DEMO/shards" --image-size "$SIZE" --shard-size 64
fi

for head in classify regress; do
    # class weights shift a regression target (the grade it learns): classify only
    weights=$([ "$head" = classify ] && echo sqrt || echo none)
    step "training resnet18, $head head ($EPOCHS epochs, $SIZE px) into $DEMO/runs/resnet18-$head"
    accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
        trainer/train.py --arch resnet18 --head "$head" \
        --shards "$DEMO/shards" --out "$DEMO/runs/resnet18-$head" \
        --epochs "$EPOCHS" --image-size "$SIZE" --batch-size 16 --lr 0.01 \
        --schedule cosine --class-weights "$weights" --augment strong --quiet
done

step "both eyes by feature fusion: a second-stage head on the regress head's features (dr-fuse)"
python tools/fuse.py --checkpoint "$DEMO/runs/resnet18-regress/best.pt" --shards "$DEMO/shards" \
    --out "$DEMO/runs/resnet18-regress"

step "evaluating the regress head's best checkpoint on test: each eye alone, both eyes blended and fused"
python trainer/evaluate.py --checkpoint "$DEMO/runs/resnet18-regress/best.pt" \
    --shards "$DEMO/shards" --out "$DEMO/eval" --pair-eyes --explain 8

step "comparing the two heads (test at the best-val epoch)"
python tools/compare_runs.py "$DEMO/runs/resnet18-classify" "$DEMO/runs/resnet18-regress" \
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
python tools/predict.py --checkpoint "$DEMO/runs/resnet18-regress/best.pt" --tta --pair-eyes \
    --explain --out "$DEMO" "$DEMO/photos"
column -s, -t < "$DEMO/predictions.csv" 2>/dev/null || cat "$DEMO/predictions.csv"

step "how sure the classify head is: calibration error on test before and after its temperature"
ECE=$(python - "$DEMO/runs/resnet18-classify/summary.json" <<'PY'
import json, sys
best = json.load(open(sys.argv[1]))["best"]
print(f"temperature {best['temperature']:.3f} (fitted on val at epoch {best['epoch']}); test ECE "
      f"{best['test_ece_raw']:.3f} before, {best['test_ece']:.3f} after; val ECE "
      f"{best['val_ece_raw']:.3f} before, {best['val_ece']:.3f} after")
PY
)
echo "$ECE"
HEAT="(no lesion masks: the photographs are not synthetic)"
if [ -d "$DEMO/data/masks" ]; then
    step "where the classify head looks: Grad-CAM heat inside the lesions of referable test photographs"
    HEAT=$(python tools/lesion_heat.py --checkpoint "$DEMO/runs/resnet18-classify/best.pt" \
        --data "$DEMO/data" --shards "$DEMO/shards" --split test --out "$DEMO/heat" | tail -1)
    echo "$HEAT"
fi

step "done; look at:"
cat <<MSG
  $DEMO/runs/resnet18-classify/report.html   each run on one page (open in a browser): curves, confusion,
  $DEMO/runs/resnet18-regress/report.html    ROC, reliability, recall, the most confidently wrong photographs
  $DEMO/cam/                                 where the model looked in each photograph it graded (Grad-CAM)
  $DEMO/eval/cam/                            the same for the 8 test photographs it got most confidently wrong
  $DEMO/compare.png                          accuracy, loss and kappa per epoch (train, val, test) for both heads
  $DEMO/compare.md                           the results table: test at the best-val epoch, with both eyes too
  $DEMO/runs/*/confusion/*_epoch_*.png       a confusion matrix per epoch, val and test
  $DEMO/runs/*/metrics.jsonl                 one JSON line per epoch
  $DEMO/eval/                                the regress head's best.pt on test: metrics.json, roc.png, predictions.csv
  $DEMO/runs/resnet18-regress/fusion.json    kappa each eye alone, both eyes blended and fused (val and test)
  $DEMO/predictions.csv                      predicted grade and probabilities per photograph
  $DEMO/heat/                                the classify head's maps on referable test photographs

classify head, calibration: $ECE
classify head, lesion heat: $HEAT
MSG
