#!/usr/bin/env bash
# GPU acceptance run: does the product's GPU path work on this machine, with whatever is
# installed here, and how fast is it? About 5 minutes on one H100/H200 (never more than 6).
#
#     bash tools/gpu_check.sh [OUT_DIR]        # default: gpu_check/
#
# Runs from a plain checkout (no `pip install -e .` needed): the repository goes on
# PYTHONPATH. Needs Python with torch, torchvision, accelerate, numpy, pandas, scikit-learn,
# matplotlib, rich and pytest; DALI is used when it imports (the torch backend is checked
# on the GPU otherwise). webdataset and braceexpand, when they do not import, are taken
# from the wheels in $WHEELS (default: wheels/ here; `bash tools/fetch_wheels.sh --minimal
# wheels/` fetches them on a machine with internet) and installed into a temporary folder.
#
# Each step has its own time limit and log (OUT_DIR/<step>.log); OUT_DIR/gpu_check.json is
# rewritten after every step. docs/gpu.md: what is checked, how to read the JSON. Without a
# GPU it stops after `dr-doctor --no-smoke`, printing torch's CUDA version, the driver's and
# the torch wheel that fits them. Exit 0: every step passed; 1: a step failed or no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-gpu_check}")
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

SITE=""
if ! $PY -c "import webdataset, braceexpand" 2>/dev/null; then
    wheels=("$WHEELS"/webdataset-*.whl "$WHEELS"/braceexpand-*.whl)
    if [ -f "${wheels[0]}" ] && [ -f "${wheels[1]}" ]; then
        SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
        # both are pure Python; their other needs (numpy, pyyaml) come with torch and accelerate
        if $PY -m pip install --quiet --no-index --no-deps --target "$SITE" "${wheels[@]}" \
                > "$OUT/wheels.log" 2>&1; then
            export PYTHONPATH="$SITE:$PYTHONPATH"
            echo "gpu_check: webdataset and braceexpand from $WHEELS (installed into $SITE)"
        else
            echo "gpu_check: could not install the wheels in $WHEELS, see $OUT/wheels.log" >&2
        fi
    else
        echo "gpu_check: webdataset does not import and $WHEELS/ has no webdataset and" \
             "braceexpand wheels (bash tools/fetch_wheels.sh --minimal $WHEELS/); the torch" \
             "backend's steps will fail" >&2
    fi
fi

$PY -m tools.gpu_check --out "$OUT"
STATUS=$?
[ -n "$SITE" ] && rm -rf "$SITE"
exit $STATUS
