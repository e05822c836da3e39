#!/usr/bin/env bash
# The Python packages bench/gpu_rows.sh needs that the GPU machines' image lacks, as wheels for
# its Python (CPython 3.12, x86-64 Linux) in .whl/, at the versions installed here, so the GPU
# runs the library code the tests ran. Run it once here, in the checkout the device tool sends
# (it needs PyPI; .whl/ is git-ignored and travels only when a call carries it):
#
#   bash bench/gpu_wheels.sh      # fills .whl/ (about 9 MB)
#   device run: carry [".whl"], command "bash bench/gpu_rows.sh" (installs .whl/*.whl first)
#
# The image (the device tool's KINDS.md, read 2026-11) holds torch 2.11, transformers 5.17,
# huggingface_hub 1.33, accelerate, safetensors, tokenizers and pytest-xdist, but no diffusers,
# lmdb or ftfy (nor ftfy's wcwidth); peft travels too, so its version is the tested one.
# transformers stays the image's: 5.25 needs huggingface_hub 2.x, which needs httpx2 (not on
# the image); the CPU rehearsal of gpu_rows.sh passes with transformers 5.17 and hub 1.33.
# GPU_WHEELS="a b" names other packages; WHEELS another folder.
set -eu
DEST=${WHEELS:-.whl}
PY=${PYTHON:-python3}
read -r -a PACKAGES <<<"${GPU_WHEELS:-diffusers peft lmdb ftfy wcwidth}"
mkdir -p "$DEST"
for name in "${PACKAGES[@]}"; do  # one version of each (two stop the whole install there)
    rm -f "$DEST/${name//-/_}"-*.whl
done
read -r -a PINS <<<"$($PY -c '
import sys
from importlib.metadata import version

print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))
' "${PACKAGES[@]}")"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$DEST" "${PINS[@]}"
ls -l "$DEST"
