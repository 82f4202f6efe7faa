#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels tools/gpu_check.sh needs on the GPU
# machine (Python 3.12, x86_64): webdataset and its pure-Python needs into .whl/, DALI in
# 60 MB parts into .whl-dali/. Both folders are git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .whl-dali
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.whl-dali/' .git/info/exclude 2>/dev/null || echo '/.whl-dali/' >> .git/info/exclude
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q --no-deps "${PLAT[@]}" -d .whl webdataset braceexpand
python3 -m pip download -q --no-deps "${PLAT[@]}" -d /tmp/dali-wheel nvidia-dali-cuda120==2.4.0
split -b 60M /tmp/dali-wheel/nvidia_dali_cuda120-2.4.0-*.whl .whl-dali/part-
ls -la .whl .whl-dali
