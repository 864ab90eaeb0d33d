"""Data for training: `build_data(cfg)` -> `Data` (loaders, class names, pixel mean/std).

Fashion-MNIST and CIFAR-10 are held in memory as one uint8 tensor (`InMemoryLoader`); `imagefolder`
and `csv` datasets decode image files per sample (`make_file_loader`), or with `--cache_images ram` keep the
images decoded once at load time in memory and take the in-memory path too. Every loader yields
(x uint8 NCHW, y int64) and has `set_epoch(epoch)`; normalisation happens inside the model.
"""
import collections
import logging
from dataclasses import dataclass

import numpy as np
import torch

from utils.errors import UserError
from utils.misc import resize_square

from .cifar import CLASS_NAMES as CIFAR10_CLASSES
from .cifar import load_cifar10
from .fashion_mnist import CLASS_NAMES as FASHION_MNIST_CLASSES
from .fashion_mnist import load_fashion_mnist
from .files import ImageFileDataset, load_file_dataset
from .loader import InMemoryLoader, epoch_indices, make_file_loader
from .split import (  # noqa: F401
    balanced_weights,
    carve_validation,
    class_counts,
    inverse_frequency_weights,
    select_classes,
    stratified_subset,
    take,
)

log = logging.getLogger(__name__)

# name -> (loader, class names, native channels, native size) for the in-memory datasets
IN_MEMORY = {"fashion_mnist": (load_fashion_mnist, FASHION_MNIST_CLASSES, 1, 28),
             "cifar10": (load_cifar10, CIFAR10_CLASSES, 3, 32)}
DATASETS = (*IN_MEMORY, "imagefolder", "csv")


@dataclass(frozen=True)
class DataOptions:
    """The data and augmentation flags build_data reads (train.py fills it from the command line:
    config.options); an argparse.Namespace with these attributes works too."""
    affine: list[float] | None
    aug_backend: str
    auto_augment: str
    balanced_sampler: bool
    batch_size: int
    blur: float
    color_jitter: list[float] | None
    crop_padding: int
    cutmix_alpha: float
    cutout: list[int] | None
    data_dir: str
    data_seed: int | None
    dataset: str
    download: bool
    eval_subset: int
    fold: int
    hflip: float
    hflip_mode: str
    image_column: str
    img_size: int | None
    imgaug_preset: str
    in_chans: int | None
    info_csv: str | None
    kfold: int
    label_column: str
    mix_off_epoch: int
    mix_prob: float
    mix_switch_prob: float
    mixup_alpha: float
    mosaic: float
    perspective: float
    random_erasing: float
    random_resized_crop: float
    rotate: float
    seed: int
    skip_bad_images: bool
    train_list: str | None
    train_subset: int
    val_list: str | None
    val_ratio: float
    vflip: float
    workers: int
    with_index: bool = False  # batches also carry sample indices (InfoBatch scores them)
    classes: list[str] | None = None  # only these classes (names or indices), relabelled 0..k-1
    crop_pct: float = 0.0  # file datasets: evaluate on centre crops, train on random-resized crops
    cache_images: str = "none"  # file datasets: "ram" keeps the decoded images in memory (the in-memory path)

FILE_DEFAULT_SIZE, FILE_DEFAULT_CHANS, DEFAULT_VAL_RATIO = 64, 3, 0.2
# Data flags over a run's own for one pass over its data (predict.py, BatchNorm re-estimation, export checks):
# nothing to cache for a single pass, and the loader-side flips of --hflip_mode alternate need the cache.
ONE_PASS = {"cache_images": "none", "hflip_mode": "random"}

__all__ = ["Data", "build_data", "class_counts", "balanced_weights", "DATASETS", "InMemoryLoader",
           "make_file_loader"]


@dataclass
class Data:
    train_loader: object
    val_loader: object
    test_loader: object  # None when the validation split is the test split
    num_classes: int
    class_names: list
    in_chans: int
    img_size: int
    mean: tuple  # per channel, pixels as fractions in [0, 1], from the training split
    std: tuple
    train_labels: torch.Tensor  # int64, the training split (class weights, balanced sampler)
    train_images: torch.Tensor  # uint8 NCHW for in-memory datasets (and --cache_images ram), else None
    val_name: str  # "val" or "test": what the validation loader evaluates
    # validation carved from train (--val_ratio, --kfold): each validation sample's index into the dataset's
    # training split, in the validation loader's order (out-of-fold predictions name samples by it); else None
    val_index: np.ndarray | None = None
    # file datasets: each validation (test) image's path, in its loader's order; in-memory datasets: None
    val_paths: list | None = None
    test_paths: list | None = None


def _mean_std(s1, s2, count):
    """Per-channel mean and std in [0, 1] from the sums of uint8 values and of their squares."""
    mean = np.asarray(s1, dtype=np.float64) / count
    var = np.maximum(np.asarray(s2, dtype=np.float64) / count - mean**2, 0.0)
    std = np.sqrt(var) / 255
    if (std == 0).any():
        log.warning("a channel of the training images is constant; using std 1 for it")
        std[std == 0] = 1.0
    return tuple(float(m) for m in mean / 255), tuple(float(s) for s in std)


def uint8_mean_std(images):
    """Exact per-channel mean/std of a uint8 NCHW tensor, via a 256-bin histogram per channel."""
    values = torch.arange(256, dtype=torch.float64)
    hist = torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256).double()
                        for c in range(images.shape[1])])
    count = images.numel() / images.shape[1]
    return _mean_std((hist * values).sum(1).numpy(), (hist * values**2).sum(1).numpy(), count)


def convert_uint8(images, in_chans, img_size, chunk=4096):
    """uint8 NCHW images with `in_chans` channels (grey <-> RGB) at img_size (antialiased bilinear)."""
    if images.shape[1] == in_chans and images.shape[-1] == img_size and images.shape[-2] == img_size:
        return images
    out = []
    for x in images.split(chunk):  # chunks keep the float copy small
        x = x.float()
        if x.shape[1] == 3 and in_chans == 1:  # ITU-R 601 luma, as PIL's convert("L")
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif x.shape[1] == 1 and in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        x = resize_square(x, img_size)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def resolve_splits(splits, class_names, cfg):
    """Final {"train", "val", "test"} splits, the validation split's name and, when validation is carved from
    train, each validation sample's index into the training split (else None).

    --val_ratio / --kfold carve validation from train; the dataset's own held-out split then
    becomes the test split. Otherwise a given val split is used, else the test split validates
    (val_name "test"), else a stratified 20% is held out.
    """
    train, val, test = (None if s is None else (s[0], np.asarray(s[1], dtype=np.int64))
                        for s in (splits["train"], splits["val"], splits["test"]))
    if len(train[1]) == 0:
        raise UserError("the training split has no images; check the dataset, --train_list and "
                        "--skip_bad_images")
    seed = cfg.seed if cfg.data_seed is None else cfg.data_seed  # splits and subsets
    carve = carve_validation(train[1], cfg.val_ratio, cfg.kfold, cfg.fold, seed, class_names)
    if carve is None and val is None and test is None:
        log.info("no validation split given: holding out a stratified %d%% of train "
                 "(set --val_ratio, --kfold or --val_list to change)", 100 * DEFAULT_VAL_RATIO)
        carve = carve_validation(train[1], DEFAULT_VAL_RATIO, 0, 0, seed)
    if carve is not None:
        if val is not None and test is not None:
            log.warning("validation is carved from train: the dataset's val split is not used")
        held_out = test if test is not None else val
        train, val, test = take(train, carve[0]), take(train, carve[1]), held_out
        val_name, val_index = "val", carve[1]
    elif val is not None:
        val_name, val_index = "val", None
    else:
        val, test, val_name, val_index = test, None, "test", None
    train = take(train, stratified_subset(train[1], cfg.train_subset, seed))
    val_keep = stratified_subset(val[1], cfg.eval_subset, seed)
    val = take(val, val_keep)
    val_index = None if val_index is None else val_index[val_keep]
    if test is not None:
        test = take(test, stratified_subset(test[1], cfg.eval_subset, seed))
    seen = set(np.unique(train[1]).tolist())
    for name, s in (("training", train), ("validation", val), ("test", test)):
        if s is not None and len(s[1]) == 0:
            raise UserError(f"the {name} split has no images; check the dataset, --classes, --train_list/"
                            f"--val_list and --skip_bad_images")
        if s is not None and name != "training":
            unseen = sorted(set(np.unique(s[1]).tolist()) - seen)
            if unseen:
                raise UserError(f"{name} class(es) {', '.join(class_names[c] for c in unseen[:5])} "
                                f"have no training images; add some, or check the train split "
                                f"(--train_list, --train_subset)")
    absent = [class_names[c] for c in range(len(class_names)) if c not in seen]
    if absent:  # only in a split left unused, or every image of it dropped by --skip_bad_images
        log.warning("class(es) %s have no training images; the model keeps an output for them that never trains "
                    "(leave them out with --classes)", ", ".join(map(str, absent[:5])))
    return {"train": train, "val": val, "test": test}, val_name, val_index


def _check_flags(cfg):
    if cfg.dataset not in DATASETS:
        raise UserError(f"unknown --dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size {cfg.batch_size} must be at least 1")
    if cfg.workers < 0:
        raise UserError(f"--workers {cfg.workers} must be 0 (load in the main process) or more")
    if cfg.img_size is not None and cfg.img_size < 1:
        raise UserError(f"--img_size {cfg.img_size} must be a positive number of pixels")
    cache = getattr(cfg, "cache_images", "none")
    if cache not in ("none", "ram"):
        raise UserError(f"--cache_images {cache!r}: choose none (decode from disk every epoch) or ram")
    if cache == "ram" and cfg.dataset in IN_MEMORY:
        raise UserError(f"--cache_images ram is for file datasets (imagefolder, csv); --dataset {cfg.dataset} "
                        f"is always held in memory, so drop the flag")
    if cfg.hflip_mode == "alternate" and cfg.dataset not in IN_MEMORY and cache != "ram":
        raise UserError(f"--hflip_mode alternate needs the images in memory: add --cache_images ram, or use "
                        f"--hflip_mode random with --dataset {cfg.dataset}")
    if getattr(cfg, "crop_pct", 0.0) and (cfg.dataset in IN_MEMORY or (cfg.img_size or FILE_DEFAULT_SIZE) < 64):
        raise UserError("--crop_pct is the evaluation preset for file datasets (imagefolder, csv) at --img_size "
                        ">= 64; drop it here")
    if getattr(cfg, "crop_pct", 0.0) and cache == "ram":
        raise UserError("--cache_images ram holds every image squashed to --img_size, but --crop_pct trains on "
                        "random-resized crops of larger images; drop one of the two")


def cache_device(nbytes, device, free_bytes=None, share=0.5):
    """Where an image cache of `nbytes` lives: on a CUDA `device` when it takes at most `share` of the GPU's free
    memory (`free_bytes`, else asked of torch), otherwise on the CPU, whence each batch is copied to the GPU and
    augmented there (InMemoryLoader's `storage`)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    if nbytes <= share * free_bytes:
        return device
    log.warning("--cache_images ram: %.1f GiB of images stay in host memory (more than half of the GPU's free "
                "%.1f GiB); each batch is copied over before it is augmented", nbytes / 2**30, free_bytes / 2**30)
    return torch.device("cpu")


def stack_decoded(decoded, splits):
    """Each split's paths as one uint8 NCHW tensor of the `decoded` images, filled in place; every image leaves
    `decoded` as soon as no split needs it any more, so memory peaks near one copy of the images kept."""
    uses = collections.Counter(p for s in splits.values() if s is not None for p in s[0])
    for p in [p for p in decoded if p not in uses]:  # left out by --classes or the subsets
        del decoded[p]
    out = {}
    for name, s in splits.items():
        if s is None:
            out[name] = None
            continue
        images = torch.empty((len(s[0]), *decoded[s[0][0]].shape), dtype=torch.uint8)
        for i, p in enumerate(s[0]):
            images[i] = decoded[p]
            uses[p] -= 1
            if not uses[p]:
                del decoded[p]
        out[name] = (images, s[1])
    return out


def build_data(cfg, rank=0, world_size=1, device="cpu"):
    """Datasets, splits and loaders for the data flags; `rank`/`world_size` shard them for DDP."""
    from .transforms import build_batch_augment, build_train_transform, seed_worker

    _check_flags(cfg)
    if cfg.dataset in IN_MEMORY:
        load, class_names, in_chans, img_size = IN_MEMORY[cfg.dataset]
        in_chans, img_size = cfg.in_chans or in_chans, cfg.img_size or img_size
        train_x, train_y, test_x, test_y = load(cfg.data_dir, cfg.download)
        splits = {"train": (train_x, train_y.numpy()), "val": None, "test": (test_x, test_y.numpy())}
        if getattr(cfg, "classes", None):  # before the conversion, so that it converts only the chosen images
            splits, class_names = select_classes(splits, class_names, cfg.classes)
        splits = {name: None if s is None else (convert_uint8(s[0], in_chans, img_size), s[1])
                  for name, s in splits.items()}
        decoded = None
    else:  # --classes is applied as the files are listed, before they are decoded
        in_chans, img_size = cfg.in_chans or FILE_DEFAULT_CHANS, cfg.img_size or FILE_DEFAULT_SIZE
        splits, class_names, pixel_sums, decoded = load_file_dataset(cfg, in_chans, img_size)
    splits, val_name, val_index = resolve_splits(splits, class_names, cfg)
    num_classes = len(class_names)
    train_items, train_labels = splits["train"]
    train_labels = torch.from_numpy(np.asarray(train_labels, dtype=np.int64))
    weights = balanced_weights(train_labels, num_classes) if cfg.balanced_sampler else None

    val_paths = test_paths = None
    if cfg.dataset not in IN_MEMORY:
        sums = np.stack([pixel_sums[p] for p in train_items]).sum(0)
        mean, std = _mean_std(sums[0], sums[1], len(train_items) * img_size * img_size)

        def in_loader_order(split):  # evaluation order: the loaders' epoch_indices without shuffling
            return None if split is None else [split[0][i] for i in epoch_indices(
                len(split[0]), False, cfg.seed, 0, rank, world_size).tolist()]
        val_paths, test_paths = in_loader_order(splits["val"]), in_loader_order(splits["test"])
    else:
        mean, std = uint8_mean_std(train_items)
    if decoded is not None:  # --cache_images ram: stack the decoded images
        splits = stack_decoded(decoded, splits)
        train_items = splits["train"][0]
        storage = cache_device(sum(s[0].numel() for s in splits.values() if s is not None), device)
    else:
        storage = device

    if isinstance(train_items, torch.Tensor):
        train_images = train_items
        train_loader = InMemoryLoader(train_items, train_labels, cfg.batch_size, shuffle=True,
                                      seed=cfg.seed, drop_last=True,
                                      batch_aug=build_batch_augment(cfg, in_chans), rank=rank,
                                      world_size=world_size, device=device, sampler_weights=weights,
                                      alternate_flip=cfg.hflip_mode == "alternate",
                                      with_index=getattr(cfg, "with_index", False), storage=storage)

        def eval_loader(split):
            return InMemoryLoader(split[0], split[1], cfg.batch_size, shuffle=False, seed=cfg.seed,
                                  rank=rank, world_size=world_size, device=device, storage=storage)
    else:
        train_images = None
        crop_pct = getattr(cfg, "crop_pct", 0.0)
        train_set = ImageFileDataset(train_items, train_labels.tolist(), in_chans, img_size,
                                     build_train_transform(cfg, in_chans, img_size), crop_pct, train=True)
        train_loader = make_file_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                        drop_last=True, rank=rank, world_size=world_size,
                                        device=device, sampler_weights=weights,
                                        workers=cfg.workers, worker_init_fn=seed_worker,
                                        with_index=getattr(cfg, "with_index", False))

        def eval_loader(split):
            return make_file_loader(ImageFileDataset(split[0], split[1], in_chans, img_size, crop_pct=crop_pct),
                                    cfg.batch_size, shuffle=False, seed=cfg.seed, rank=rank,
                                    world_size=world_size, device=device, workers=cfg.workers,
                                    worker_init_fn=seed_worker)

    test = splits["test"]
    log.info("%s: %d train / %d %s%s images, %d classes, %d x %dx%d", cfg.dataset, len(train_labels),
             len(splits["val"][1]), val_name, f" / {len(test[1])} test" if test else "",
             num_classes, in_chans, img_size, img_size)
    return Data(train_loader=train_loader, val_loader=eval_loader(splits["val"]),
                test_loader=eval_loader(test) if test is not None else None,
                num_classes=num_classes, class_names=list(class_names), in_chans=in_chans,
                img_size=img_size, mean=mean, std=std, train_labels=train_labels,
                train_images=train_images, val_name=val_name, val_index=val_index, val_paths=val_paths,
                test_paths=test_paths)
