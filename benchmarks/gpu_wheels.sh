#!/usr/bin/env bash
# What benchmarks/gpu_check.py needs on the GPU machine beyond its image (Python 3.12, torch,
# numpy, scipy, psutil, tqdm, Pillow): DeepSpeed, fvcore and pydantic with their pure-Python
# dependencies, downloaded here into .gpu-wheels/ (ignored by git; about 7 MB, well inside the
# 64 MiB a device run carries). DeepSpeed and fvcore are published as source only; they build
# on the device against its own torch (--no-build-isolation), with no CUDA ops compiled.
#
#   bash benchmarks/gpu_wheels.sh                                    # here, once
#   run: carry [".gpu-wheels"], command:
#     pip install -q --no-index --find-links .gpu-wheels --no-build-isolation deepspeed fvcore pydantic \
#       && DS_ACCELERATOR=cuda python benchmarks/gpu_check.py --out $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
OUT=.gpu-wheels
mkdir -p "$OUT"
PLATFORM=(--python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux_2_28_x86_64 --platform any)
"$PIP" download -q --no-deps -d "$OUT" deepspeed==0.19.8 fvcore==0.1.5.post20221221 iopath==0.1.10
"$PIP" download -q --only-binary=:all: "${PLATFORM[@]}" -d "$OUT" \
    pydantic hjson ninja py-cpuinfo msgpack nvidia-ml-py einops yacs tabulate termcolor portalocker
du -sh "$OUT"
