"""Stratified validation splits, K-fold, subsets and class counts, all seeded.

The validation split is carved with scikit-learn (`StratifiedShuffleSplit`, `StratifiedKFold`);
quick-run subsets use a largest-remainder per-class allocation so tiny classes never make them fail.
"""
import logging

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from utils.errors import UserError

log = logging.getLogger(__name__)


def class_counts(labels, num_classes):
    """Number of samples of each class, an int64 tensor of length `num_classes`."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
    return torch.bincount(labels, minlength=num_classes)


def balanced_weights(labels, num_classes):
    """Per-sample weights 1 / count(class): every class is drawn equally often by a weighted sampler."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
    counts = class_counts(labels, num_classes).double()
    return 1.0 / counts[labels]


def inverse_frequency_weights(labels, num_classes):
    """--class_weights auto: w_c = N / (K * n_c) over the K classes present, inverse class frequency
    normalised so that the weighted mean over the training samples is 1 (scikit-learn's "balanced").
    Absent classes get 0."""
    counts = class_counts(labels, num_classes).double()
    present = int((counts > 0).sum())
    w = torch.where(counts > 0, counts.sum() / (present * counts.clamp(min=1)), torch.zeros_like(counts))
    return w.float()


def check_split_flags(val_ratio, kfold, fold):
    """UserError for out-of-range --val_ratio / --kfold / --fold."""
    if not 0.0 <= val_ratio < 1.0:
        raise UserError(f"--val_ratio {val_ratio} must be in (0, 1), e.g. 0.1 (0 = no split)")
    if kfold < 0 or kfold == 1:
        raise UserError(f"--kfold {kfold} must be at least 2 (0 = off)")
    if kfold and val_ratio:
        raise UserError("--val_ratio and --kfold both carve a validation split; pass only one")
    if fold == "all":
        raise UserError("--fold all trains every fold: run it through train.py (crossval.py), or pick one "
                        "fold with --fold I")
    if kfold and not 0 <= fold < kfold:
        raise UserError(f"--fold {fold} is out of range for --kfold {kfold}; use 0..{kfold - 1}")
    if not kfold and fold:
        raise UserError(f"--fold {fold} needs --kfold K (the number of folds)")


def stratified_split(labels, val_ratio, seed):
    """(train_idx, val_idx): a seeded stratified hold-out of `val_ratio` of the samples."""
    labels = np.asarray(labels)
    sss = StratifiedShuffleSplit(n_splits=1, test_size=val_ratio, random_state=seed)
    try:
        train_idx, val_idx = next(sss.split(np.zeros(len(labels)), labels))
    except ValueError as e:
        raise UserError(f"cannot carve a stratified --val_ratio {val_ratio} split from "
                        f"{len(labels)} images ({e}); add images or change --val_ratio") from None
    return np.sort(train_idx), np.sort(val_idx)


def kfold_split(labels, kfold, fold, seed, class_names=None):
    """(train_idx, val_idx) of fold `fold` of a shuffled, seeded StratifiedKFold; `class_names` name the labels
    in errors."""
    labels = np.asarray(labels)
    values, counts = np.unique(labels, return_counts=True)
    if (counts < 2).any():  # its one image would validate one fold with no training image of its class
        single = values[counts < 2][0]
        name = single if class_names is None else class_names[single]
        raise UserError(f"--kfold {kfold}: class {name} has a single image, which one fold would validate on "
                        f"with none to train on; add images of it, or leave it out with --classes")
    skf = StratifiedKFold(n_splits=kfold, shuffle=True, random_state=seed)
    try:
        folds = list(skf.split(np.zeros(len(labels)), labels))
    except ValueError as e:
        raise UserError(f"cannot make {kfold} stratified folds of {len(labels)} images ({e}); "
                        f"lower --kfold") from None
    train_idx, val_idx = folds[fold]
    return np.sort(train_idx), np.sort(val_idx)


def carve_validation(labels, val_ratio, kfold, fold, seed, class_names=None):
    """(train_idx, val_idx) from --val_ratio or --kfold/--fold, or None when neither is set."""
    check_split_flags(val_ratio, kfold, fold)
    if kfold:
        return kfold_split(labels, kfold, fold, seed, class_names)
    if val_ratio:
        return stratified_split(labels, val_ratio, seed)
    return None


def stratified_subset(labels, n, seed):
    """Sorted indices of a seeded subset of `n` samples with the class proportions of `labels`.

    Class c gets floor(n * count_c / N) samples plus one for the classes with the largest
    remainders, so every class is within one sample of its exact share. n <= 0 or n >= N: all.
    """
    labels = np.asarray(labels)
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = n * counts / len(labels)
    take = np.floor(quota).astype(np.int64)
    extra = n - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:extra]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(inverse == c), size=int(k), replace=False)
              for c, k in enumerate(take) if k]
    return np.sort(np.concatenate(chosen))


def select_classes(splits, class_names, wanted):
    """Only the classes `wanted` (names, or indices into class_names), relabelled 0..k-1 in class_names order."""
    index = {str(c): i for i, c in enumerate(class_names)}
    keep = set()
    for w in wanted:
        if str(w) in index:
            keep.add(index[str(w)])
        elif str(w).isdigit() and any(str(c).isdigit() for c in class_names):
            raise UserError(f"--classes {w}: no class is named {w}, and as the class names are numbers an index "
                            f"would be ambiguous; name the classes: {', '.join(map(str, class_names))}")
        elif str(w).isdigit() and int(w) < len(class_names):
            keep.add(int(w))
        else:
            raise UserError(f"--classes {w}: no such class; the classes are {', '.join(map(str, class_names))} "
                            f"(or their indices 0-{len(class_names) - 1})")
    keep = sorted(keep)
    if len(keep) < 2:
        raise UserError("--classes needs at least two classes")
    remap = np.full(len(class_names), -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    out = {}
    for name, split in splits.items():
        if split is None:
            out[name] = None
            continue
        labels = np.asarray(split[1], dtype=np.int64)
        idx = np.flatnonzero(remap[labels] >= 0)
        items, _ = take((split[0], labels), idx)
        out[name] = (items, remap[labels[idx]])
    return out, [class_names[i] for i in keep]


def take(split, idx):
    items, labels = split
    if isinstance(items, torch.Tensor):
        return items[torch.as_tensor(idx, dtype=torch.int64)], labels[idx]
    return [items[i] for i in idx], labels[idx]
