"""Batch loaders with one index order for every dataset kind: seeded per epoch, sharded for DDP.

`InMemoryLoader` gathers batches from one uint8 tensor (optionally on the GPU); `make_file_loader`
wraps a torch DataLoader around a file Dataset. Both draw indices from `epoch_indices`, so
`loader.set_epoch(e)` fixes the order exactly (resume replays it) and balanced sampling composes
with DDP sharding (torch's WeightedRandomSampler and DistributedSampler do not).
"""
import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def epoch_seed(seed, epoch):
    """A well-mixed 64-bit generator seed for (seed, epoch)."""
    ss = np.random.SeedSequence([seed % 2**64, epoch % 2**64])
    return int(ss.generate_state(1, np.uint64)[0])


def epoch_indices(n, shuffle, seed, epoch, rank=0, world_size=1, weights=None):
    """Indices rank `rank` visits in epoch `epoch`, an int64 tensor.

    Training (shuffle or weights): a permutation (or `n` weighted draws with replacement) from a
    generator seeded by (seed, epoch), identical on every rank, padded by wrapping around to a
    multiple of world_size, then every rank takes perm[rank::world_size] (equal step counts).
    Evaluation: rank r gets r, r + world_size, ... with no padding, so summed metrics count every
    sample exactly once.
    """
    if not shuffle and weights is None:
        return torch.arange(rank, n, world_size)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    if weights is not None:
        perm = torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), n, replacement=True,
                                 generator=g)
    else:
        perm = torch.randperm(n, generator=g)
    if world_size > 1:
        total = math.ceil(n / world_size) * world_size
        perm = perm.repeat(math.ceil(total / n))[:total][rank::world_size]
    return perm


def shard_size(n, train, rank=0, world_size=1):
    """len(epoch_indices(...)) without drawing them; `train` = shuffle or weighted."""
    return math.ceil(n / world_size) if train else len(range(rank, n, world_size))


def _num_batches(count, batch_size, drop_last):
    # drop_last only when it leaves at least one batch: a tiny training set still trains.
    if drop_last and count >= batch_size:
        return count // batch_size
    return math.ceil(count / batch_size)


class InMemoryLoader:
    """Yields (x uint8 NCHW, y int64) batches from tensors held in memory, on `device`.

    The images live on `storage` (default: `device`): on the device, each batch is a gather there with no host
    copy; on the CPU while `device` is a GPU (a set too large for it), each batch is gathered on the CPU, copied
    over from pinned memory, then flipped and augmented on the GPU.
    """

    def __init__(self, images_uint8, labels, batch_size, shuffle, seed, drop_last=False,
                 batch_aug=None, rank=0, world_size=1, device="cpu", sampler_weights=None,
                 alternate_flip=False, with_index=False, storage=None):
        if images_uint8.dtype != torch.uint8:
            raise TypeError(f"images must be uint8, got {images_uint8.dtype}")
        self.device = torch.device(device)
        device = self.device if storage is None else torch.device(storage)
        # Move the whole set once to where it is stored.
        self.images = images_uint8.to(device)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(device)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.batch_aug, self.rank, self.world_size = batch_aug, rank, world_size
        self.weights = sampler_weights
        self.epoch = 0
        self.drop_last = drop_last
        self.with_index = with_index  # also yield each batch's sample indices (--infobatch scores them)
        self.subset = None  # set_subset: this epoch visits only these samples
        # Alternating flips (airbench): image i is mirrored in epoch e iff flip_bits[i] xor (e odd), so every
        # image is seen both ways in any two consecutive epochs; the bits are a seeded random half.
        self.flip_bits = None
        if alternate_flip:
            g = torch.Generator().manual_seed(seed + 0x5EED)
            self.flip_bits = torch.randint(0, 2, (len(self.labels),), generator=g, dtype=torch.bool).to(self.device)
        self.num_batches = self._count_batches(len(self.labels))

    def _count_batches(self, n):
        train = self.shuffle or self.weights is not None
        return _num_batches(shard_size(n, train, self.rank, self.world_size), self.batch_size, self.drop_last)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def set_subset(self, indices):
        """Visit only `indices` (an int64 tensor of sample indices, in the epoch's seeded order) until the
        next call; None visits every sample again. Sampler weights do not combine with a subset."""
        if indices is not None and self.weights is not None:
            raise ValueError("a subset and sampler weights do not combine")
        self.subset = None if indices is None else indices.to(self.images.device)
        self.num_batches = self._count_batches(len(self.labels) if indices is None else len(indices))

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        n = len(self.labels) if self.subset is None else len(self.subset)
        idx = epoch_indices(n, self.shuffle, self.seed, self.epoch, self.rank, self.world_size,
                            self.weights).to(self.images.device)
        if self.subset is not None:
            idx = self.subset[idx]
        for b in range(self.num_batches):
            j = idx[b * self.batch_size:(b + 1) * self.batch_size]
            x, y = self.images[j], self.labels[j]
            if x.device != self.device:  # stored on the CPU for a GPU run: copy the gathered batch over
                x = x.pin_memory().to(self.device, non_blocking=True)
                y, j = y.to(self.device, non_blocking=True), j.to(self.device, non_blocking=True)
            if self.flip_bits is not None:
                flip = self.flip_bits[j] ^ bool(self.epoch % 2)
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            if self.batch_aug is not None:
                x = self.batch_aug(x)
            yield (x, y, j) if self.with_index else (x, y)


class EpochSampler(Sampler):
    """A torch Sampler over `epoch_indices`; `set_epoch` picks the epoch's order."""

    def __init__(self, n, shuffle, seed, rank=0, world_size=1, weights=None):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.weights = rank, world_size, weights
        self.epoch = 0
        self.subset = None  # set_subset, as InMemoryLoader's

    def set_epoch(self, epoch):
        self.epoch = epoch

    def set_subset(self, indices):
        if indices is not None and self.weights is not None:
            raise ValueError("a subset and sampler weights do not combine")
        self.subset = None if indices is None else indices.cpu()

    def __iter__(self):
        n = self.n if self.subset is None else len(self.subset)
        idx = epoch_indices(n, self.shuffle, self.seed, self.epoch, self.rank, self.world_size, self.weights)
        return iter((idx if self.subset is None else self.subset[idx]).tolist())

    def __len__(self):
        return shard_size(self.n if self.subset is None else len(self.subset),
                          self.shuffle or self.weights is not None, self.rank, self.world_size)


class IndexedDataset(Dataset):
    """Items of `dataset` with their index appended: (x, y, i), so batches carry their sample indices."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], i)


class FileLoader:
    """A DataLoader plus `set_epoch`, `set_subset` and an optional batch augmentation of the uint8 batch."""

    def __init__(self, loader, sampler, batch_aug=None, drop_last=False):
        self.loader, self.sampler, self.batch_aug = loader, sampler, batch_aug
        self.drop_last = drop_last  # asked for; applied only when it leaves a batch (as _num_batches)

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)

    def set_subset(self, indices):
        """As InMemoryLoader.set_subset; the DataLoader's length follows its sampler's."""
        self.sampler.set_subset(indices)
        self.loader.batch_sampler.drop_last = self.drop_last and len(self.sampler) >= self.loader.batch_size

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y, *idx in self.loader:  # idx: the batch's sample indices (with_index)
            if self.batch_aug is not None:
                x = self.batch_aug(x)
            yield x, y, *idx


def make_file_loader(dataset, batch_size, shuffle, seed, drop_last=False, rank=0, world_size=1,
                     device="cpu", sampler_weights=None, workers=0, worker_init_fn=None,
                     batch_aug=None, with_index=False):
    """A FileLoader over `dataset` (items (uint8 CHW tensor, int label)) with the index order of
    `epoch_indices`; workers persist across epochs and are seeded from a generator seeded by `seed`.
    with_index: batches are (x, y, sample indices) (--infobatch scores them)."""
    sampler = EpochSampler(len(dataset), shuffle, seed, rank, world_size, sampler_weights)
    if with_index:
        dataset = IndexedDataset(dataset)
    wanted, drop_last = drop_last, drop_last and len(sampler) >= batch_size
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                        num_workers=workers, pin_memory=torch.device(device).type == "cuda",
                        persistent_workers=workers > 0, worker_init_fn=worker_init_fn, generator=g)
    return FileLoader(loader, sampler, batch_aug, wanted)
