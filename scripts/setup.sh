#!/usr/bin/env bash
# README command 1: everything from a fresh clone (venv, pinned deps, data, extension build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0 -r scripts/requirements.txt
bash scripts/setup_data.sh
# BISE_KERNELS_BUILD_CPP=1: a failed C++ build fails the set-up (not built, the cpp tests would skip).
BISE_KERNELS_BUILD_CPP=1 pip install -q --no-build-isolation -e ".[bise,triton,data,test]"  # every extra: the kernels and the workflow
python -c "import torch, triton, numpy, bise_kernels; print('torch', torch.__version__, 'triton', triton.__version__, \
'numpy', numpy.__version__, 'backends', bise_kernels.available_backends('cpu'))"
