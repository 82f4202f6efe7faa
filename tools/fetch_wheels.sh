#!/usr/bin/env bash
# Download the wheels an offline GPU machine needs to run this project, on a machine that
# reaches PyPI. The target machine is assumed to have Python with torch, torchvision and
# CUDA already (a typical GPU image); what it lacks is DALI with its whole dependency
# closure, webdataset, and this project's own pure-Python needs.
#
#     bash tools/fetch_wheels.sh wheels/ [PYTHON_VERSION] [PLATFORM]     # defaults: 3.12 manylinux_2_28_x86_64
#
# Copy wheels/ and the repository to the GPU machine, then:
#
#     python3 -m pip install --no-index --find-links wheels/ nvidia-dali-cuda120 webdataset pytest
#     python3 -m pip install --no-index --find-links wheels/ --no-deps -e .
#
# pip resolves the closure from the wheels' own Requires-Dist, so it follows new DALI
# releases by itself; the file list it downloaded is printed at the end.
set -euo pipefail
DEST=${1:?usage: bash tools/fetch_wheels.sh DEST_DIR [PYTHON_VERSION] [PLATFORM]}
PYVER=${2:-3.12}
PLATFORM=${3:-manylinux_2_28_x86_64}
# the project's pins for the loaders (pyproject.toml): DALI for CUDA 12 drivers and newer;
# pytest for tools/gpu_check.sh's GPU tests
PACKAGES=(${FETCH_PACKAGES:-"nvidia-dali-cuda120>=1.40" "webdataset>=0.2.86" "pytest>=8"})
mkdir -p "$DEST"
PLAT=(--only-binary=:all: --python-version "$PYVER" --implementation cp
      --platform "$PLATFORM" --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)
case "$PLATFORM" in *aarch64*) PLAT=(--only-binary=:all: --python-version "$PYVER" --implementation cp
      --platform "$PLATFORM" --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 --platform any);; esac
python3 -m pip download --quiet "${PLAT[@]}" --dest "$DEST" "${PACKAGES[@]}"
echo "wheels for Python $PYVER on $PLATFORM in $DEST:"
ls -1 "$DEST"
du -sh "$DEST"
