"""CIFAR-10 (Krizhevsky, 2009): 50k train / 10k test 32x32 RGB images, 10 classes.

Reads torchvision's on-disk format (--data_dir/cifar-10-batches-py, pickled batches); --download fetches it with
torchvision. The batches are unpickled by a restricted unpickler that admits only what the real files hold
(dicts, lists, bytes, strings, numbers and numpy arrays), so a crafted batch file cannot run code.
"""
import logging
import os
import pickle

import numpy as np
import torch

from utils.errors import UserError

log = logging.getLogger(__name__)

# the globals a genuine CIFAR batch (or numpy's array pickling) refers to; everything else is refused
_ALLOWED_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                    ("numpy._core.multiarray", "scalar"), ("builtins", "bytes"), ("_codecs", "encode")}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def read_batch(f):
    """One pickled CIFAR batch from an open binary file, without running anything it names."""
    return _BatchUnpickler(f, encoding="bytes").load()

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
                d = read_batch(f)
            images.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(d[b"labels"], dtype=np.int64))
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError, AttributeError) as e:
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
