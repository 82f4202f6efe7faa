#!/usr/bin/env bash
# Download the wheels an offline GPU machine needs to run this project, on a machine that
# reaches PyPI.
#
#     bash tools/fetch_wheels.sh --minimal wheels/                     # webdataset + braceexpand
#     bash tools/fetch_wheels.sh wheels/ [PYTHON_VERSION] [PLATFORM]   # defaults: 3.12 manylinux_2_28_x86_64
#
# --minimal: for a GPU machine that has torch, torchvision, accelerate, numpy, pandas,
# scikit-learn, matplotlib, rich and pytest already (a typical GPU image) and lacks only
# webdataset and its one pure-Python dependency braceexpand: two small py3-none-any wheels
# (no dependencies followed: webdataset's others, numpy and pyyaml, come with torch and
# accelerate). Copy wheels/ into the repository's folder on the GPU machine and run
# `bash tools/gpu_check.sh` there: it installs them into a temporary folder by itself. To
# install them for good: python3 -m pip install --no-index --no-deps wheels/*.whl
#
# Without --minimal: DALI with its whole dependency closure, webdataset and pytest, for a
# machine that has Python with torch and CUDA; then, on the GPU machine:
#
#     python3 -m pip install --no-index --find-links wheels/ nvidia-dali-cuda120 webdataset pytest
#     python3 -m pip install --no-index --no-deps --no-build-isolation -e .
#
# pip resolves the closure from the wheels' own Requires-Dist, so it follows new DALI
# releases by itself; the file list it downloaded is printed at the end.
set -euo pipefail
PY=${PYTHON:-python3}
if [ "${1:-}" = "--minimal" ]; then
    DEST=${2:?usage: bash tools/fetch_wheels.sh --minimal DEST_DIR}
    mkdir -p "$DEST"
    $PY -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
        "webdataset>=0.2.86" "braceexpand"
    echo "webdataset and braceexpand wheels in $DEST:"
    ls -1 "$DEST"
    exit 0
fi
DEST=${1:?usage: bash tools/fetch_wheels.sh [--minimal] DEST_DIR [PYTHON_VERSION] [PLATFORM]}
PYVER=${2:-3.12}
PLATFORM=${3:-manylinux_2_28_x86_64}
# the project's pins for the loaders (pyproject.toml): DALI for CUDA 12 drivers and newer;
# pytest for tools/gpu_check.sh's GPU tests
PACKAGES=(${FETCH_PACKAGES:-"nvidia-dali-cuda120>=2.0" "webdataset>=0.2.86" "pytest>=8"})
mkdir -p "$DEST"
PLAT=(--only-binary=:all: --python-version "$PYVER" --implementation cp
      --platform "$PLATFORM" --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)
case "$PLATFORM" in *aarch64*) PLAT=(--only-binary=:all: --python-version "$PYVER" --implementation cp
      --platform "$PLATFORM" --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 --platform any);; esac
$PY -m pip download --quiet "${PLAT[@]}" --dest "$DEST" "${PACKAGES[@]}"
echo "wheels for Python $PYVER on $PLATFORM in $DEST:"
ls -1 "$DEST"
du -sh "$DEST"
