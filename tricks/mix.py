"""Batch mixing: Mixup (Zhang et al. 2018), CutMix (Yun et al. 2019) and a 2x2 Mosaic (after YOLOv4).

A `Mixer` is called at the loop's mixing point, `x, y = mix(x, y)`, and returns soft targets whose rows sum
to 1; it never smooths labels (the criterion does, once). Deviation: Mosaic here does not resize whole
images into the tiles as YOLOv4 does; each tile keeps the same region of its source image, like CutMix with
four sources, so every label weight is exactly the tile's area / (H*W).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.errors import UserError


@dataclass(frozen=True)
class MixOptions:
    """The batch-mixing flags (train.py fills it from the command line: config.options)."""
    cutmix_alpha: float
    mix_off_epoch: int
    mix_prob: float
    mix_switch_prob: float
    mixup_alpha: float
    mosaic: float


def mixup(x, y1hot, lam, perm):
    """lam * x + (1 - lam) * x[perm], and the same blend of the one-hot targets."""
    return x * lam + x[perm] * (1 - lam), y1hot * lam + y1hot[perm] * (1 - lam)


def cutmix(x, y1hot, box, perm):
    """Paste box = (y0, y1, x0, x1) (half-open, pixels) of x[perm] into x; weights are the exact areas."""
    h, w = x.shape[-2:]
    y0, y1, x0, x1 = box
    x = x.clone()
    x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, y1hot * lam + y1hot[perm] * (1 - lam)


def mosaic(x, y1hot, cx, cy, perms):
    """2x2 tiles split at column cx and row cy: top-left from x, then x[perms[0]] top-right,
    x[perms[1]] bottom-left, x[perms[2]] bottom-right; label weights are the tile areas / (H*W)."""
    h, w = x.shape[-2:]
    p1, p2, p3 = perms
    out = x.clone()
    out[..., :cy, cx:] = x[p1][..., :cy, cx:]
    out[..., cy:, :cx] = x[p2][..., cy:, :cx]
    out[..., cy:, cx:] = x[p3][..., cy:, cx:]
    area = h * w
    weights = (cy * cx / area, cy * (w - cx) / area, (h - cy) * cx / area, (h - cy) * (w - cx) / area)
    y = y1hot * weights[0] + y1hot[p1] * weights[1] + y1hot[p2] * weights[2] + y1hot[p3] * weights[3]
    return out, y


def cutmix_box(h, w, lam):
    """Yun et al.'s rand_bbox: a box of area (1 - lam)*H*W at a uniform centre, clipped to the image."""
    cut = (1.0 - lam) ** 0.5
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return y0, y1, x0, x1


class Mixer:
    """(x float NCHW, y int64 (N,)) -> (x mixed, y soft (N, num_classes)), one decision per batch.

    With probability mix_prob the batch is mixed: Mosaic with probability mosaic_prob, otherwise CutMix
    (probability switch_prob when both alphas are set) or Mixup; an unmixed batch gets one-hot targets.
    Randomness comes from torch's global CPU generator. `off_epoch` (0 = never) is for the loop, which
    passes mix=None from that epoch on.
    """

    def __init__(self, num_classes, mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5, mosaic_prob=0.0,
                 mix_prob=1.0, off_epoch=0):
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.switch_prob, self.mosaic_prob, self.mix_prob = switch_prob, mosaic_prob, mix_prob
        self.off_epoch = off_epoch

    def _beta(self, alpha):
        a = torch.tensor(float(alpha))
        return float(torch.distributions.Beta(a, a).sample())

    def _perm(self, n, device):
        return torch.randperm(n).to(device)

    def __call__(self, x, y):
        y1hot = F.one_hot(y, self.num_classes).to(x.dtype)
        n, (h, w) = x.shape[0], x.shape[-2:]
        if float(torch.rand(())) >= self.mix_prob:
            return x, y1hot
        if self.mosaic_prob > 0 and float(torch.rand(())) < self.mosaic_prob:
            # centre in the middle half of the image, as YOLOv5's mosaic_border = -size/2
            cx = int(torch.randint(w // 4, w - w // 4 + 1, ()))
            cy = int(torch.randint(h // 4, h - h // 4 + 1, ()))
            return mosaic(x, y1hot, cx, cy, [self._perm(n, x.device) for _ in range(3)])
        use_cutmix = self.cutmix_alpha > 0
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = float(torch.rand(())) < self.switch_prob
        if use_cutmix:
            box = cutmix_box(h, w, self._beta(self.cutmix_alpha))
            return cutmix(x, y1hot, box, self._perm(n, x.device))
        if self.mixup_alpha > 0:
            return mixup(x, y1hot, self._beta(self.mixup_alpha), self._perm(n, x.device))
        return x, y1hot


def build_mixer(cfg, num_classes):
    """Mixer from --mixup_alpha/--cutmix_alpha/--mosaic/--mix_prob/--mix_switch_prob, or None if all off."""
    for name in ("mosaic", "mix_prob", "mix_switch_prob"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise UserError(f"--{name} {getattr(cfg, name)} is not a probability; give a value in [0, 1]")
    if cfg.mixup_alpha < 0 or cfg.cutmix_alpha < 0:
        raise UserError("--mixup_alpha and --cutmix_alpha must be >= 0 (0 = off)")
    if cfg.mix_off_epoch < 0:
        raise UserError(f"--mix_off_epoch {cfg.mix_off_epoch} is negative; give an epoch >= 0 (0 = never)")
    if cfg.mixup_alpha == 0 and cfg.cutmix_alpha == 0 and cfg.mosaic == 0:
        return None
    return Mixer(num_classes, mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                 switch_prob=cfg.mix_switch_prob, mosaic_prob=cfg.mosaic, mix_prob=cfg.mix_prob,
                 off_epoch=cfg.mix_off_epoch)
