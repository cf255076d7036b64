#!/usr/bin/env bash
# Wheels for the lent GPU machine (Python 3.12, x86-64, no network): the packages its image lacks, at the
# versions installed here (what CI tests), into ./.whl (ignored by git; name it in the device call's carry).
#
#   bash bench/gpu_kit.sh                 # here, once: downloads / builds the wheels (about 15 MB)
#   # there, at the start of each command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#
# Left out on purpose: wandb (logging only, imported when logging.wandb=true) and decord (video decoding in
# helios.prepare); the GPU benchmarks build their models on the meta device and need neither.
# flash-attn has no wheel for that machine: attention there is torch SDPA.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-.whl}
mkdir -p "$KIT"

version() { python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
pinned() { for name in "$@"; do echo "$name==$(version "$name")"; done; }

# the image has torch, triton, transformers, peft, accelerate, safetensors, huggingface-hub, numpy, einops,
# msgpack, ninja, psutil, py-cpuinfo, pyyaml, tqdm, zipp, typing-extensions (../.library/device/KINDS.md)
BINARY=(diffusers importlib_metadata lazy-importer hydra-core omegaconf webdataset braceexpand
        hjson pydantic pydantic_core annotated-types typing-inspection)
SOURCE_ONLY=(deepspeed antlr4-python3-runtime)  # sdists on PyPI: built here as pure-Python wheels

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$KIT" $(pinned "${BINARY[@]}")
# DS_BUILD_OPS=0: DeepSpeed compiles its CUDA ops just in time, on the machine that runs them
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$KIT" $(pinned "${SOURCE_ONLY[@]}")

# one version of each package, or the install stops
dupes=$(ls "$KIT"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "several versions in $KIT of: $dupes (delete the older ones)" >&2
  exit 1
fi
du -sh "$KIT"
ls "$KIT"
