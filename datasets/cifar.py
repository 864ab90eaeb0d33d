"""CIFAR-10 (Krizhevsky, 2009): 50k train / 10k test 32x32 RGB images, 10 classes.

Reads torchvision's on-disk format (--data_dir/cifar-10-batches-py, pickled batches, the same
trust as torchvision places in them); --download fetches it with torchvision.
"""
import logging
import os
import pickle

import numpy as np
import torch

from utils.errors import UserError

log = logging.getLogger(__name__)

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)


def _find_dir(data_dir):
    for folder in (os.path.join(data_dir, "cifar-10-batches-py"), data_dir):
        if all(os.path.isfile(os.path.join(folder, b)) for b in TRAIN_BATCHES + TEST_BATCHES):
            return folder
    return None


def _read_batches(folder, names):
    images, labels = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            images.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(d[b"labels"], dtype=np.int64))
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as e:
            raise UserError(f"cannot read CIFAR-10 batch {path} ({type(e).__name__}: {e}); delete "
                            f"{folder} and pass --download") from None
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_cifar10(data_dir, download=False):
    """(train_x, train_y, test_x, test_y): uint8 (N, 3, 32, 32) images and int64 labels."""
    folder = _find_dir(data_dir)
    if folder is None and download:
        import torchvision

        try:
            for train in (True, False):
                torchvision.datasets.CIFAR10(data_dir, train=train, download=True)
        except Exception as e:  # network errors come in many types
            raise UserError(f"downloading CIFAR-10 into {data_dir} failed ({e}); copy "
                            f"cifar-10-batches-py into --data_dir") from None
        folder = _find_dir(data_dir)
    if folder is None:
        raise UserError(f"CIFAR-10 not found in {os.path.join(data_dir, 'cifar-10-batches-py')}; "
                        f"pass --download, or --data_dir with the extracted cifar-10-batches-py")
    log.info("reading CIFAR-10 from %s", folder)
    return (*_read_batches(folder, TRAIN_BATCHES), *_read_batches(folder, TEST_BATCHES))
