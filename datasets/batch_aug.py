"""Vectorised augmentations on whole uint8 (N, C, H, W) batches, one random draw per sample.

Each `random_*` op draws its parameters from torch's global CPU generator with the same distribution as
the matching torchvision.transforms.v2 transform (RandomCrop, RandomResizedCrop, flips, ColorJitter,
RandomErasing; Cutout after DeVries & Taylor 2017) and hands them to a deterministic op that the tests can
check exactly. Parameters are drawn on the CPU, so a seed gives the same result on any device.
"""
import torch
import torch.nn.functional as F


def _randint_below(high):
    """One uniform integer in [0, high_i) per entry of the integer tensor `high` (per-sample upper bounds)."""
    return (torch.rand(high.shape, dtype=torch.float64) * high).floor().long().clamp_(max=high - 1)


# ---------------------------------------------------------------- crop and flips

def crop_with_padding(x, pad, top, left):
    """Zero-pad by `pad` and crop back to (H, W) at per-sample offsets `top`, `left` in [0, 2*pad]."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    hp, wp = h + 2 * pad, w + 2 * pad
    dev = x.device
    # one flat index_select (int32 where it fits): much faster than two gathers on uint8
    dt = torch.int32 if xp.numel() < 2 ** 31 else torch.int64
    rows = top.to(dev, dt)[:, None] + torch.arange(h, device=dev, dtype=dt)       # (N, H)
    cols = left.to(dev, dt)[:, None] + torch.arange(w, device=dev, dtype=dt)      # (N, W)
    base = (torch.arange(n * c, device=dev, dtype=dt) * (hp * wp)).view(n, c, 1, 1)
    idx = base + (rows * wp)[:, None, :, None] + cols[:, None, None, :]
    return xp.reshape(-1).index_select(0, idx.reshape(-1)).view(n, c, h, w)


def random_crop_with_padding(x, pad):
    """v2.RandomCrop(size=(H, W), padding=pad): offsets uniform in {0, ..., 2*pad} per axis and sample."""
    if pad <= 0:
        return x
    n = x.shape[0]
    top = torch.randint(0, 2 * pad + 1, (n,))
    left = torch.randint(0, 2 * pad + 1, (n,))
    return crop_with_padding(x, pad, top, left)


def flip_where(x, mask, dim):
    """Flip the samples where `mask` (N,) is True along `dim` (3: horizontal, 2: vertical)."""
    idx = mask.nonzero()[:, 0].to(x.device)
    return x.clone().index_copy_(0, idx, x.index_select(0, idx).flip(dim))


def flip(x, p, dim):
    """v2.RandomHorizontalFlip(p) (dim=3) or v2.RandomVerticalFlip(p) (dim=2), per sample."""
    if p <= 0:
        return x
    return flip_where(x, torch.rand(x.shape[0]) < p, dim)


# ---------------------------------------------------------------- random resized crop

def resized_crop(x, top, left, height, width):
    """Crop box (top, left, height, width) of each sample, resized bilinearly back to (H, W).

    Same sampling grid as torch's bilinear resize with align_corners=False, including clamping at the
    crop's own border, so it matches v2.functional.resized_crop up to uint8 rounding.
    """
    n, c, h, w = x.shape
    dev = x.device
    xf = x.float()

    def axis(start, length, out):
        # source coordinate of each output pixel centre, relative to the crop, clamped at 0 like torch
        r = ((torch.arange(out, device=dev) + 0.5) * (length.to(dev, torch.float32)[:, None] / out) - 0.5)
        r = r.clamp_(min=0)
        i0 = r.floor()
        frac = r - i0
        i0 = i0.long()
        i1 = torch.minimum(i0 + 1, length.to(dev)[:, None] - 1)
        s = start.to(dev)[:, None]
        return i0 + s, i1 + s, frac

    y0, y1, fy = axis(top, height, h)
    a = xf.gather(2, y0[:, None, :, None].expand(n, c, h, w))
    b = xf.gather(2, y1[:, None, :, None].expand(n, c, h, w))
    xf = a + (b - a) * fy[:, None, :, None]
    x0, x1, fx = axis(left, width, w)
    a = xf.gather(3, x0[:, None, None, :].expand(n, c, h, w))
    b = xf.gather(3, x1[:, None, None, :].expand(n, c, h, w))
    xf = a + (b - a) * fx[:, None, None, :]
    return xf.round_().clamp_(0, 255).to(torch.uint8)


def random_resized_crop_params(n, h, w, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """v2.RandomResizedCrop's box sampler, vectorised: 10 tries per sample, first valid one, else centre crop."""
    area = h * w
    log_ratio = torch.log(torch.tensor(ratio, dtype=torch.float64))
    target_area = area * torch.empty(n, 10).uniform_(scale[0], scale[1]).double()
    aspect = torch.exp(torch.empty(n, 10).uniform_(float(log_ratio[0]), float(log_ratio[1])).double())
    cw = torch.round(torch.sqrt(target_area * aspect)).long()
    ch = torch.round(torch.sqrt(target_area / aspect)).long()
    valid = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = valid.to(torch.uint8).argmax(1)                        # index of the first valid try
    ok = valid.any(1)
    cw = cw.gather(1, first[:, None])[:, 0]
    ch = ch.gather(1, first[:, None])[:, 0]
    # fallback (all 10 tries invalid): the largest centred box with an aspect ratio inside `ratio`
    in_ratio = w / h
    if in_ratio < min(ratio):
        fw, fh = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(h * max(ratio))), h
    else:
        fw, fh = w, h
    cw = torch.where(ok, cw, torch.full_like(cw, fw))
    ch = torch.where(ok, ch, torch.full_like(ch, fh))
    top = torch.where(ok, _randint_below(h - ch + 1), (h - ch) // 2)
    left = torch.where(ok, _randint_below(w - cw + 1), (w - cw) // 2)
    return top, left, ch, cw


def random_resized_crop(x, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """v2.RandomResizedCrop(size=(H, W), scale, ratio), output size = input size, per sample."""
    n, _, h, w = x.shape
    return resized_crop(x, *random_resized_crop_params(n, h, w, scale, ratio))


# ---------------------------------------------------------------- cutout and random erasing

def box_mask(h, w, top, left, height, width, device=None):
    """(N, K, H, W) boolean masks of K boxes per sample; boxes are clipped to the image."""
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    top, left = top.to(device), left.to(device)
    bottom, right = top + height.to(device), left + width.to(device)
    in_r = (rows >= top[..., None]) & (rows < bottom[..., None])                # (N, K, H)
    in_c = (cols >= left[..., None]) & (cols < right[..., None])                # (N, K, W)
    return in_r[..., :, None] & in_c[..., None, :]


def cutout(x, n_holes, size, centers=None):
    """Zero `n_holes` squares of side `size` per sample (DeVries & Taylor 2017).

    Centres are uniform over the image and holes are clipped at the border, as in the paper; unlike the
    paper's code, a hole that does not clip is exactly size x size also for odd sizes. `centers` =
    (cy, cx), each (N, n_holes) integers, fixes the positions (tests).
    """
    n, _, h, w = x.shape
    if centers is None:
        centers = (torch.randint(0, h, (n, n_holes)), torch.randint(0, w, (n, n_holes)))
    cy, cx = centers
    side = torch.full_like(cy, size)
    mask = box_mask(h, w, cy - size // 2, cx - size // 2, side, side, x.device).any(1)   # (N, H, W)
    return x.masked_fill(mask[:, None], 0)


def erase(x, apply, top, left, height, width, value=0):
    """Fill box (top, left, height, width) with `value` in the samples where `apply` (N,) is True."""
    n, _, h, w = x.shape
    mask = box_mask(h, w, top[:, None], left[:, None], height[:, None], width[:, None], x.device)[:, 0]
    mask &= apply.to(x.device)[:, None, None]
    return x.masked_fill(mask[:, None], value)


def random_erasing(x, p, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0):
    """v2.RandomErasing(p, scale, ratio, value) per sample (Zhong et al. 2020).

    Same sampler as torchvision: up to 10 tries of (area, log-uniform aspect) and the first box that fits
    strictly inside the image is erased at a uniform position; no box fits in 10 tries -> no erasing.
    """
    if p <= 0:
        return x
    n, _, h, w = x.shape
    apply = torch.rand(n) < p
    log_ratio = torch.log(torch.tensor(ratio, dtype=torch.float64))
    erase_area = (h * w) * torch.empty(n, 10).uniform_(scale[0], scale[1]).double()
    aspect = torch.exp(torch.empty(n, 10).uniform_(float(log_ratio[0]), float(log_ratio[1])).double())
    eh = torch.round(torch.sqrt(erase_area * aspect)).long()
    ew = torch.round(torch.sqrt(erase_area / aspect)).long()
    valid = (eh < h) & (ew < w)
    first = valid.to(torch.uint8).argmax(1)
    apply &= valid.any(1)
    eh = eh.gather(1, first[:, None])[:, 0]
    ew = ew.gather(1, first[:, None])[:, 0]
    top = _randint_below(h - eh + 1)
    left = _randint_below(w - ew + 1)
    return erase(x, apply, top, left, eh, ew, value)


# ---------------------------------------------------------------- colour (ColorJitter)

def _blend(img, other, ratio):
    """torchvision's _blend for uint8 with a per-sample ratio: clamp, then truncate to uint8."""
    r = ratio.to(img.device, torch.float32)[:, None, None, None]
    # addcmul rounds like torchvision's mul(ratio).add_(other, alpha=1-ratio), so results agree bit for bit
    out = torch.addcmul(img.float() * r, other.expand_as(img), 1.0 - r)
    return out.clamp_(0, 255).to(torch.uint8)


def _gray(img):
    """Luma of an RGB batch as float, floored like torchvision does for uint8 input; (N, 1, H, W)."""
    f = img.float()
    return (f[:, 0:1] * 0.2989 + f[:, 1:2] * 0.587 + f[:, 2:3] * 0.114).floor_()


def adjust_brightness(x, factor):
    """Multiply by a per-sample factor (N,)."""
    return _blend(x, torch.zeros((), device=x.device), factor)


def adjust_contrast(x, factor):
    """Blend each sample with the mean of its grey image (the grey image itself for one channel)."""
    gray = _gray(x) if x.shape[1] == 3 else x.float()
    return _blend(x, gray.mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):
    """Blend with the grey image; a no-op on one-channel images (as in torchvision and PIL)."""
    if x.shape[1] != 3:
        return x
    return _blend(x, _gray(x), factor)


def adjust_hue(x, factor):
    """Rotate the hue by a per-sample fraction of the colour circle in [-0.5, 0.5]; no-op on one channel.

    HSV round trip written after torchvision's _rgb_to_hsv/_hsv_to_rgb, batched with per-sample shifts.
    """
    if x.shape[1] != 3:
        return x
    img = x.float() / 255
    r, g, b = img.unbind(1)
    maxc, _ = img.max(1)
    minc, _ = img.min(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + factor.to(x.device, torch.float32)[:, None, None], 1.0)
    # HSV -> RGB
    h6 = h * 6
    i = torch.floor(h6)
    f = h6 - i
    i = i.long().remainder(6)
    v = maxc
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    vpqt = torch.stack((v, p, q, t), 1)                                               # (N, 4, H, W)
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=x.device)
    rgb = vpqt.gather(1, select[:, i].permute(1, 0, 2, 3))
    return rgb.mul_(255.999).to(torch.uint8)


def _jitter_range(value, center=1.0):
    return (max(0.0, center - value), center + value)


def color_jitter(x, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
    """v2.ColorJitter(brightness, contrast, saturation, hue) per sample, each sample in its own random order.

    Factors are uniform in [max(0, 1-v), 1+v] (hue: [-hue, hue]); 0 switches an op off. Saturation and hue
    leave one-channel images unchanged, as in torchvision.
    """
    n = x.shape[0]
    ops = []
    for fn, v in ((adjust_brightness, brightness), (adjust_contrast, contrast),
                  (adjust_saturation, saturation), (adjust_hue, hue)):
        if v > 0:
            lo, hi = (-v, v) if fn is adjust_hue else _jitter_range(v)
            ops.append((fn, torch.empty(n).uniform_(lo, hi)))
        else:
            ops.append(None)
    if all(o is None for o in ops):
        return x
    order = torch.rand(n, 4).argsort(1)             # a uniform random permutation of the 4 ops per sample
    x = x.clone()
    for slot in range(4):
        for k, op in enumerate(ops):
            sel = order[:, slot] == k
            if op is None or not sel.any():
                continue
            fn, factor = op
            idx = sel.nonzero()[:, 0].to(x.device)
            x[idx] = fn(x[idx], factor[sel])
    return x
