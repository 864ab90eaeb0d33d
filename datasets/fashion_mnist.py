"""Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017): 60k train / 10k test 28x28 grey images, 10 classes.

Read straight from the four IDX files (gzip + numpy, no torchvision) found in --data_dir, its
torchvision layout (FashionMNIST/raw) or Debian's dataset-fashion-mnist; --download uses torchvision.
"""
import gzip
import logging
import os
import struct

import numpy as np
import torch

from utils.errors import UserError

log = logging.getLogger(__name__)

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot"]
SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")
# IDX type byte -> numpy dtype (multi-byte types are big-endian).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """The array stored in an IDX file (gzip-compressed if the name ends in .gz)."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path} ({e}); delete it and re-install or re-download") from None
    if len(data) < 4 or data[0] or data[1] or data[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number); re-install or re-download it")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    if len(data) - header != int(np.prod(dims)) * dtype.itemsize:
        raise UserError(f"{path} is truncated ({len(data) - header} data bytes for shape {dims}); "
                        f"re-install or re-download it")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _find_file(folder, stem):
    for name in (stem + ".gz", stem):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def candidate_dirs(data_dir):
    """Folders searched for the IDX files, in order."""
    return [data_dir, os.path.join(data_dir, "FashionMNIST", "raw"), SYSTEM_DIR]


def find_dir(data_dir):
    """The first candidate folder holding all four files, or None."""
    for folder in candidate_dirs(data_dir):
        if all(_find_file(folder, stem) for stem in FILES):
            return folder
    return None


def _download(data_dir):
    import torchvision  # only needed here; the reader itself does not depend on it

    try:
        for train in (True, False):
            torchvision.datasets.FashionMNIST(data_dir, train=train, download=True)
    except Exception as e:  # network errors come in many types (URLError, RuntimeError, ...)
        raise UserError(f"downloading Fashion-MNIST into {data_dir} failed ({e}); install the "
                        f"Debian package (apt-get install dataset-fashion-mnist) or copy the four "
                        f"IDX .gz files into --data_dir") from None
    return os.path.join(data_dir, "FashionMNIST", "raw")


def load_fashion_mnist(data_dir, download=False):
    """(train_x, train_y, test_x, test_y): uint8 (N, 1, 28, 28) images and int64 labels."""
    folder = find_dir(data_dir)
    if folder is None and download:
        folder = _download(data_dir)
    if folder is None:
        raise UserError(f"Fashion-MNIST not found in {', '.join(candidate_dirs(data_dir))}; "
                        f"run `apt-get install dataset-fashion-mnist`, or pass --download "
                        f"(or --data_dir with the four IDX .gz files)")
    log.info("reading Fashion-MNIST from %s", folder)
    arrays = [read_idx(_find_file(folder, stem)) for stem in FILES]
    out = []
    for images, labels, stem in ((arrays[0], arrays[1], FILES[0]), (arrays[2], arrays[3], FILES[2])):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"{folder}/{stem}: images {images.shape} do not match labels "
                            f"{labels.shape}; re-install or re-download Fashion-MNIST")
        if labels.size and labels.max() >= len(CLASS_NAMES):
            raise UserError(f"{folder}: label {labels.max()} is not a Fashion-MNIST class (0..9); "
                            f"re-install or re-download Fashion-MNIST")
        out += [torch.from_numpy(images.astype(np.uint8)).unsqueeze(1),
                torch.from_numpy(labels.astype(np.int64))]
    return tuple(out)
