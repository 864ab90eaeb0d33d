#!/usr/bin/env bash
# Fresh-machine setup: Python packages, then the Fashion-MNIST files if they are not already here.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q -r requirements.txt
fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fmnist" ] && [ ! -f data/train-images-idx3-ubyte.gz ] && [ ! -f data/FashionMNIST/raw/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    # Debian packages the four IDX files under /usr/share/datasets/fashion-mnist/.
    apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }
  else
    echo "Fashion-MNIST not found: run as root for apt-get, or train with --download (needs internet)" >&2
  fi
fi
