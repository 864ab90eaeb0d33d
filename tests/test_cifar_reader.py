"""The CIFAR-10 reader unpickles real batches and refuses crafted ones that would run code."""
import os
import pickle

import numpy as np
import pytest
import torch

from datasets.cifar import TEST_BATCHES, TRAIN_BATCHES, load_cifar10
from utils.errors import UserError


def _write_batches(folder, make):
    os.makedirs(folder)
    for i, name in enumerate(TRAIN_BATCHES + TEST_BATCHES):
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(make(i), f)


def test_genuine_batches_load(tmp_path):
    rng = np.random.default_rng(0)
    batches = [{b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [i % 10] * 4,
                b"batch_label": b"batch", b"filenames": [b"a.png"] * 4} for i in range(6)]
    _write_batches(tmp_path / "cifar-10-batches-py", lambda i: batches[i])
    train_x, train_y, test_x, test_y = load_cifar10(str(tmp_path))
    assert train_x.shape == (20, 3, 32, 32) and test_x.shape == (4, 3, 32, 32)
    assert torch.equal(train_x[0].reshape(-1), torch.from_numpy(batches[0][b"data"][0]))
    assert test_y.tolist() == [5] * 4


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_crafted_batch_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_batches(tmp_path / "cifar-10-batches-py", lambda i: {b"data": _RunsCode(), b"labels": [0]})
    with pytest.raises(UserError, match="refusing to load (posix|os|nt).system"):
        load_cifar10(str(tmp_path))
    assert not (tmp_path / "PWNED").exists()
