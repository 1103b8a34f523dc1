#!/usr/bin/env bash
# Download, here where pip reaches PyPI, the wheels that benchmarks/gpu.sh installs on the H200
# machine, which has no registry. That machine's image (see the device notes: Python 3.12, x86-64)
# already holds jax 0.11.2 + CUDA 13 plugin, flax, optax, orbax-checkpoint, numpy, pillow, scipy,
# tqdm, matplotlib, torch and torchvision, plus absl-py, etils, protobuf, pyarrow, psutil,
# requests, wrapt, attrs and six; what kdjax's data path (tensorflow-datasets, used without
# TensorFlow) and its TensorBoard writer still need is listed below, pinned to the versions the
# project's tests ran with. Each is fetched without its dependencies: the list IS the closure,
# checked by installing it with --no-deps over a venv that mirrors the image (see README.md).
# Left out on purpose: tfds' declared simple-parsing (+ docstring-parser) and tensorflow-metadata's
# googleapis-common-protos, which the decode cache's path never imports (each removal tested).
#
#   bash benchmarks/fetch_wheels.sh [DEST]      # DEST defaults to .gpu/wheels (git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu/wheels}
PY=${PYTHON:-python3}
mkdir -p "$DEST"

# name==version  (a comment says which import needs it)
WHEELS=(
  tensorflow-datasets==4.9.10     # kdjax.data.decode_cache
  array-record==0.8.6             # tfds' array_record data source (binary, cp312)
  dm-tree==0.1.10                 # tfds (imports `tree`; binary, cp312)
  immutabledict==4.3.1            # tfds
  tensorflow-metadata==1.21.0     # tfds features
  termcolor==3.3.0                # tfds
  toml==0.10.2                    # tfds
  importlib-resources==7.1.0      # tfds.core.dataset_builder
  tensorboardX==2.6.5             # kdjax.events (experiments.paper)
)
# promise 2.3 exists only as a source archive; it is pure Python, so a wheel is built here.
SOURCE_ONLY=(promise==2.3)        # tfds' lazy imports

names=()
for w in "${WHEELS[@]}"; do names+=("${w%%#*}"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${names[@]}"
"$PY" -m pip wheel -q --no-deps -w "$DEST" "${SOURCE_ONLY[@]}"
ls -l "$DEST"
du -sh "$DEST"
