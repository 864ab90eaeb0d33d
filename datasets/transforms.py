"""Training augmentations built from the flags: a per-sample path and a batched fast path that agree.

`build_train_transform` gives a torchvision.transforms.v2 pipeline for one uint8 CHW image (file datasets);
`build_batch_augment` gives the same augmentations on whole uint8 NCHW batches (in-memory datasets), with
crop, flips, colour, Cutout (DeVries & Taylor 2017) and Random Erasing (Zhong et al. 2020) vectorised in
datasets/batch_aug.py and the rest run per sample. `--aug_backend imgaug` builds an imgaug Sequential instead;
`--imgaug_preset seed` puts the original project's imgaug Sequential first, value for value (RGB; see inline).
"""
import argparse
import dataclasses
import logging
import random
import sys

import numpy as np
import torch
from torchvision.transforms import v2

from datasets import batch_aug
from datasets.imgaug_compat import import_imgaug
from utils.errors import UserError

log = logging.getLogger(__name__)

BILINEAR = v2.InterpolationMode.BILINEAR
BLUR_SIGMA = (0.1, 2.0)              # SimCLR's range; kernel ~10% of the image side, odd, at least 3
PERSPECTIVE_DISTORTION = 0.5         # torchvision's default distortion_scale
RRC_RATIO = (3 / 4, 4 / 3)
AUTO_AUGMENTS = {"autoaugment": v2.AutoAugment, "randaugment": v2.RandAugment,
                 "trivialaugment": v2.TrivialAugmentWide, "augmix": v2.AugMix}
# --imgaug_preset seed: the original project's pipeline, value for value (build_imgaug_sequence, describe)
SEED_FLIPLR, SEED_FLIPUD = 0.5, 0.5
SEED_BLUR_SIGMA = (0.0, 0.1)
SEED_BRIGHTNESS_MUL = (0.65, 1.35)


# ---------------------------------------------------------------- flags

def validate(cfg):
    """Raise UserError for per-sample augmentation flags out of range (tricks/mix.py checks the mixing ones)."""
    for name in ("hflip", "vflip", "blur", "perspective", "random_erasing"):
        p = getattr(cfg, name)
        if not 0.0 <= p <= 1.0:
            raise UserError(f"--{name} {p} is not a probability; give a value in [0, 1]")
    if cfg.hflip_mode == "alternate" and cfg.hflip != 0.5:
        raise UserError(f"--hflip_mode alternate flips each image in every other epoch (half of them each "
                        f"epoch); use it with --hflip 0.5 (got {cfg.hflip})")
    if cfg.rotate < 0:
        raise UserError(f"--rotate {cfg.rotate} is negative; give the maximum angle in degrees (>= 0)")
    if cfg.crop_padding < 0:
        raise UserError(f"--crop_padding {cfg.crop_padding} is negative; give pixels >= 0")
    if not 0.0 <= cfg.random_resized_crop <= 1.0:
        raise UserError(f"--random_resized_crop {cfg.random_resized_crop} must be the smallest area "
                        f"fraction, in (0, 1] (0 = off)")
    if cfg.color_jitter is not None:
        b, c, s, h = cfg.color_jitter
        if min(b, c, s, h) < 0 or h > 0.5:
            raise UserError(f"--color_jitter {b} {c} {s} {h}: B, C, S must be >= 0 and H in [0, 0.5]")
    if cfg.affine is not None:
        t, s, sh = cfg.affine
        if not (0 <= t <= 1 and 0 <= s < 1 and sh >= 0):
            raise UserError(f"--affine {t} {s} {sh}: TRANSLATE in [0, 1], SCALE in [0, 1), SHEAR >= 0")
    if cfg.cutout is not None and (cfg.cutout[0] < 1 or cfg.cutout[1] < 1):
        raise UserError(f"--cutout {cfg.cutout[0]} {cfg.cutout[1]}: N and SIZE must be >= 1")


def _uses_imgaug(cfg):
    return cfg.aug_backend == "imgaug" or cfg.imgaug_preset != "none"


def _jitter(cfg, in_chans):
    """(B, C, S, H) for ColorJitter; saturation and hue have no meaning on one channel and are dropped."""
    if cfg.color_jitter is None:
        return None
    b, c, s, h = cfg.color_jitter
    if in_chans == 1:
        s = h = 0.0
    return (b, c, s, h) if max(b, c, s, h) > 0 else None


def describe(cfg):
    """One line per enabled augmentation and mixing option, for the run log."""
    on = []
    if _uses_imgaug(cfg):
        on.append(f"backend imgaug (preset {cfg.imgaug_preset})")
    if cfg.imgaug_preset == "seed":
        on.append(f"imgaug seed preset: Fliplr p={SEED_FLIPLR}, Flipud p={SEED_FLIPUD}, GaussianBlur "
                  f"sigma={SEED_BLUR_SIGMA}, MultiplyBrightness mul={SEED_BRIGHTNESS_MUL} (1-channel: Multiply)")
    if cfg.random_resized_crop > 0:
        on.append(f"random_resized_crop scale=({cfg.random_resized_crop}, 1)")
    if cfg.crop_padding > 0:
        on.append(f"random crop after {cfg.crop_padding}px zero padding")
    for name in ("hflip", "vflip", "blur", "perspective", "random_erasing"):
        if getattr(cfg, name) > 0:
            on.append(f"{name} p={getattr(cfg, name)}")
    if cfg.hflip > 0 and cfg.hflip_mode == "alternate":
        on.append("hflip alternating: each image mirrored in every other epoch")
    if cfg.rotate > 0:
        on.append(f"rotate +-{cfg.rotate} deg")
    if cfg.affine is not None:
        on.append("affine translate={} scale=+-{} shear={} deg".format(*cfg.affine))
    if cfg.auto_augment != "none":
        on.append(f"auto_augment {cfg.auto_augment}")
    if cfg.color_jitter is not None:
        on.append("color_jitter B={} C={} S={} H={}".format(*cfg.color_jitter))
    if cfg.cutout is not None:
        on.append("cutout {} holes of {}px".format(*cfg.cutout))
    if cfg.mixup_alpha > 0:
        on.append(f"mixup alpha={cfg.mixup_alpha}")
    if cfg.cutmix_alpha > 0:
        on.append(f"cutmix alpha={cfg.cutmix_alpha}")
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        on.append(f"mixup/cutmix switch p(cutmix)={cfg.mix_switch_prob}")
    if cfg.mosaic > 0:
        on.append(f"mosaic p={cfg.mosaic}")
    if (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0 or cfg.mosaic > 0):
        on.append(f"mix_prob={cfg.mix_prob}" + (f", off from epoch {cfg.mix_off_epoch}"
                                                  if cfg.mix_off_epoch > 0 else ""))
    return on


# ---------------------------------------------------------------- torchvision backend

class Cutout:
    """Per-sample Cutout on a uint8 CHW tensor (torchvision has none; shares batch_aug.cutout)."""

    def __init__(self, n_holes, size):
        self.n_holes, self.size = n_holes, size

    def __call__(self, img):
        return batch_aug.cutout(img[None], self.n_holes, self.size)[0]


def _blur_kernel(h, w):
    k = int(0.1 * min(h, w)) // 2 * 2 + 1
    return max(3, k)


def _v2_ops(cfg, in_chans, h, w):
    """The per-sample pipeline for (h, w) images as (name, transform) pairs, in the order they apply."""
    ops = []
    if cfg.random_resized_crop > 0:
        ops.append(("random_resized_crop", v2.RandomResizedCrop(
            (h, w), scale=(cfg.random_resized_crop, 1.0), ratio=RRC_RATIO, antialias=True)))
    if cfg.crop_padding > 0:
        ops.append(("crop_padding", v2.RandomCrop((h, w), padding=cfg.crop_padding)))
    if cfg.hflip > 0 and cfg.hflip_mode == "random":  # alternate: the loader flips
        ops.append(("hflip", v2.RandomHorizontalFlip(cfg.hflip)))
    if cfg.vflip > 0:
        ops.append(("vflip", v2.RandomVerticalFlip(cfg.vflip)))
    if cfg.rotate > 0:
        ops.append(("rotate", v2.RandomRotation(cfg.rotate, interpolation=BILINEAR)))
    if cfg.affine is not None:
        t, s, sh = cfg.affine
        ops.append(("affine", v2.RandomAffine(0, translate=(t, t), scale=(1 - s, 1 + s), shear=sh,
                                              interpolation=BILINEAR)))
    if cfg.perspective > 0:
        ops.append(("perspective", v2.RandomPerspective(PERSPECTIVE_DISTORTION, p=cfg.perspective)))
    if cfg.auto_augment != "none":
        ops.append(("auto_augment", AUTO_AUGMENTS[cfg.auto_augment]()))
    jitter = _jitter(cfg, in_chans)
    if jitter is not None:
        ops.append(("color_jitter", v2.ColorJitter(*jitter)))
    if cfg.blur > 0:
        blur = v2.GaussianBlur(_blur_kernel(h, w), sigma=BLUR_SIGMA)
        ops.append(("blur", v2.RandomApply([blur], p=cfg.blur)))
    if cfg.cutout is not None:
        ops.append(("cutout", Cutout(*cfg.cutout)))
    if cfg.random_erasing > 0:
        ops.append(("random_erasing", v2.RandomErasing(cfg.random_erasing, value=0)))
    return ops


def _vectorised(cfg, in_chans):
    """Batched ops with the same parameter distributions as the v2 transforms of the same name."""
    jitter = _jitter(cfg, in_chans)
    return {
        "random_resized_crop": lambda x: batch_aug.random_resized_crop(
            x, scale=(cfg.random_resized_crop, 1.0), ratio=RRC_RATIO),
        "crop_padding": lambda x: batch_aug.random_crop_with_padding(x, cfg.crop_padding),
        "hflip": lambda x: batch_aug.flip(x, cfg.hflip, 3),
        "vflip": lambda x: batch_aug.flip(x, cfg.vflip, 2),
        "color_jitter": lambda x: batch_aug.color_jitter(x, *jitter),
        "cutout": lambda x: batch_aug.cutout(x, *cfg.cutout),
        "random_erasing": lambda x: batch_aug.random_erasing(x, cfg.random_erasing),
    }


class PerSampleTransform:
    """uint8 CHW -> uint8 CHW through the v2 pipeline, built on first use for each image size."""

    def __init__(self, cfg, in_chans):
        self.cfg, self.in_chans = cfg, in_chans
        self._pipelines = {}

    def __call__(self, img):
        h, w = img.shape[-2:]
        if (h, w) not in self._pipelines:
            self._pipelines[(h, w)] = v2.Compose([t for _, t in _v2_ops(self.cfg, self.in_chans, h, w)])
        return self._pipelines[(h, w)](img)


class BatchAugment:
    """uint8 NCHW -> uint8 NCHW with per-sample random parameters, on the batch's device.

    Vectorised where batch_aug has the op; otherwise the v2 transform runs once per sample, because a v2
    transform called on a whole batch draws ONE set of parameters for all of it.
    """

    def __init__(self, cfg, in_chans):
        self.cfg, self.in_chans = cfg, in_chans
        self._steps = {}

    def steps(self, h, w):
        if (h, w) not in self._steps:
            fast = _vectorised(self.cfg, self.in_chans)
            self._steps[(h, w)] = [(name, fast.get(name) or _per_sample(t))
                                   for name, t in _v2_ops(self.cfg, self.in_chans, h, w)]
        return self._steps[(h, w)]

    def __call__(self, x):
        for _, step in self.steps(*x.shape[-2:]):
            x = step(x)
        return x


def _per_sample(t):
    return lambda x: torch.stack([t(img) for img in x])


# ---------------------------------------------------------------- imgaug backend

def _check_imgaug(cfg, in_chans):
    if cfg.auto_augment not in ("none", "randaugment") or (cfg.auto_augment != "none" and in_chans != 3):
        raise UserError(f"--auto_augment {cfg.auto_augment} on {in_chans}-channel images has no imgaug version "
                        f"(imgaug has randaugment for RGB only); use --aug_backend torchvision")


def build_imgaug_sequence(cfg, in_chans, h, w):
    """An iaa.Sequential for (h, w) images from the same flags (imgaug's operators; see the notes inline)."""
    iaa = import_imgaug()
    augs = []
    if cfg.imgaug_preset == "seed":
        # The original project's Sequential, exactly, on RGB. MultiplyBrightness needs RGB: on one channel it is
        # a plain Multiply, pixel for pixel what its YCrCb/HSV/HLS/YUV draws do to a grey image (its Lab/Luv
        # draws differ by up to ~10 levels).
        bright = (iaa.MultiplyBrightness(mul=SEED_BRIGHTNESS_MUL) if in_chans == 3
                  else iaa.Multiply(mul=SEED_BRIGHTNESS_MUL))
        augs += [iaa.Fliplr(SEED_FLIPLR), iaa.Flipud(SEED_FLIPUD), iaa.GaussianBlur(sigma=SEED_BLUR_SIGMA), bright]
    if cfg.random_resized_crop > 0:
        # approximation: crop each side by up to q of the size and resize back, so area >= SCALE_MIN
        q = (1 - cfg.random_resized_crop ** 0.5) / 2
        augs.append(iaa.Crop(percent=(0.0, q), keep_size=True))
    if cfg.crop_padding > 0:
        # an integer shift in [-PX, PX] per axis with zero fill is exactly a random crop after padding
        p = cfg.crop_padding
        augs.append(iaa.Affine(translate_px={"x": (-p, p), "y": (-p, p)}, order=0, cval=0))
    if cfg.hflip > 0 and cfg.hflip_mode == "random":  # alternate: the loader flips
        augs.append(iaa.Fliplr(cfg.hflip))
    if cfg.vflip > 0:
        augs.append(iaa.Flipud(cfg.vflip))
    if cfg.rotate > 0:
        augs.append(iaa.Affine(rotate=(-cfg.rotate, cfg.rotate), order=1, cval=0))
    if cfg.affine is not None:
        t, s, sh = cfg.affine
        augs.append(iaa.Affine(translate_percent={"x": (-t, t), "y": (-t, t)}, scale=(1 - s, 1 + s),
                               shear=(-sh, sh), order=1, cval=0))
    if cfg.perspective > 0:
        augs.append(iaa.Sometimes(cfg.perspective, iaa.PerspectiveTransform(scale=(0.0, 0.1))))
    if cfg.auto_augment != "none":
        _check_imgaug(cfg, in_chans)
        augs.append(iaa.RandAugment(n=2, m=9))
    jitter = _jitter(cfg, in_chans)
    if jitter is not None:
        b, c, s, hue = jitter
        colour = []
        if b > 0:
            rng = (max(0.0, 1 - b), 1 + b)
            colour.append(iaa.MultiplyBrightness(rng) if in_chans == 3 else iaa.Multiply(rng))
        if c > 0:
            colour.append(iaa.LinearContrast((max(0.0, 1 - c), 1 + c)))
        if s > 0:
            colour.append(iaa.MultiplySaturation((max(0.0, 1 - s), 1 + s)))
        if hue > 0:
            # imgaug's hue unit: 255 = a full turn of the colour circle
            colour.append(iaa.AddToHue((-round(255 * hue), round(255 * hue))))
        augs.append(iaa.Sequential(colour, random_order=True))
    if cfg.blur > 0:
        augs.append(iaa.Sometimes(cfg.blur, iaa.GaussianBlur(sigma=BLUR_SIGMA)))
    if cfg.cutout is not None:
        n, size = cfg.cutout
        augs.append(iaa.Cutout(nb_iterations=n, size=size / h, squared=True, fill_mode="constant", cval=0))
    if cfg.random_erasing > 0:
        # approximation of Random Erasing: one rectangle with sides 14%..57% of the image (area ~2%..33%)
        augs.append(iaa.Sometimes(cfg.random_erasing, iaa.Cutout(
            nb_iterations=1, size=(0.14, 0.57), squared=False, fill_mode="constant", cval=0)))
    return iaa.Sequential(augs)


class ImgaugTransform:
    """uint8 CHW or NCHW tensor -> same, through an imgaug Sequential built on first use per image size.

    Every augmenter of the sequence shares one local numpy generator that is re-seeded from torch's RNG on
    each call, so a torch seed reproduces the result (DataLoader already gives each worker and epoch its own
    torch seed) and imgaug still draws different parameters for each image of a batch.
    """

    def __init__(self, cfg, in_chans):
        self.cfg, self.in_chans = cfg, in_chans
        self._seqs = {}

    def __getstate__(self):
        # imgaug objects are rebuilt in each worker: unpickling them would import imgaug before the patch
        return {"cfg": self.cfg, "in_chans": self.in_chans, "_seqs": {}}

    def _sequence(self, h, w):
        if (h, w) not in self._seqs:
            seq = build_imgaug_sequence(self.cfg, self.in_chans, h, w)
            import imgaug.random as iarandom  # safe now: build_imgaug_sequence ran import_imgaug()
            rng = iarandom.RNG(np.random.Generator(np.random.PCG64(0)))
            for aug in [seq, *seq.get_all_children(flat=True)]:
                aug.random_state = rng
            self._seqs[(h, w)] = (seq, rng)
        return self._seqs[(h, w)]

    def __call__(self, x):
        seq, rng = self._sequence(*x.shape[-2:])
        rng.state = np.random.PCG64(int(torch.randint(0, 2 ** 62, ()))).state
        arr = x.detach().cpu().numpy()
        if x.ndim == 3:
            out = seq(image=np.ascontiguousarray(arr.transpose(1, 2, 0)))
            out = out.reshape(out.shape[:2] + (-1,)).transpose(2, 0, 1)
        else:
            out = np.stack(seq(images=np.ascontiguousarray(arr.transpose(0, 2, 3, 1))))
            out = out.reshape(out.shape[:3] + (-1,)).transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(out)).to(x.device)


# ---------------------------------------------------------------- public API

def _any_enabled(cfg):
    return bool(cfg.random_resized_crop > 0 or cfg.crop_padding > 0 or cfg.hflip > 0 or cfg.vflip > 0
                or cfg.rotate > 0 or cfg.affine is not None or cfg.perspective > 0
                or cfg.auto_augment != "none" or cfg.color_jitter is not None or cfg.blur > 0
                or cfg.cutout is not None or cfg.random_erasing > 0 or cfg.imgaug_preset != "none")


def _check_channels(cfg, in_chans):
    if in_chans == 1 and cfg.color_jitter is not None and max(cfg.color_jitter[2:]) > 0:
        log.warning("--color_jitter: saturation and hue do not apply to 1-channel images; using B and C only")


def build_train_transform(cfg, in_chans, img_size=None):
    """Per-sample train transform uint8 CHW -> uint8 CHW (file datasets), or None if nothing is enabled. With
    --crop_pct the images arrive as larger squares and a random-resized crop to img_size comes first."""
    validate(cfg)
    _check_channels(cfg, in_chans)
    if getattr(cfg, "crop_pct", 0.0):
        rrc = v2.RandomResizedCrop((img_size, img_size), scale=(cfg.random_resized_crop or 0.08, 1.0),
                                   ratio=RRC_RATIO, antialias=True)
        rest = argparse.Namespace(**{**_fields(cfg), "random_resized_crop": 0.0, "crop_pct": 0.0})
        then = build_train_transform(rest, in_chans, img_size)
        return rrc if then is None else v2.Compose([rrc, then])
    if not _any_enabled(cfg):
        return None
    if _uses_imgaug(cfg):
        _check_imgaug(cfg, in_chans)
        return ImgaugTransform(cfg, in_chans)
    return PerSampleTransform(cfg, in_chans)


def _fields(cfg):
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))


def build_batch_augment(cfg, in_chans):
    """Batch augment uint8 NCHW -> uint8 NCHW (in-memory datasets), or None if nothing is enabled.

    Draws from torch's global CPU generator only, so restoring that state resumes exactly.
    """
    validate(cfg)
    _check_channels(cfg, in_chans)
    if not _any_enabled(cfg):
        return None
    if _uses_imgaug(cfg):
        _check_imgaug(cfg, in_chans)
        return ImgaugTransform(cfg, in_chans)
    return BatchAugment(cfg, in_chans)


def seed_worker(worker_id):
    """DataLoader worker_init_fn: seed `random`, numpy and imgaug (if loaded) from this worker's torch seed.

    torch.initial_seed() in a worker is base_seed + worker_id with a base seed drawn per epoch from the
    loader's generator, so workers never repeat each other and a run's seed reproduces all of them.
    """
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    imgaug = sys.modules.get("imgaug")
    if imgaug is not None:
        imgaug.seed(seed)
