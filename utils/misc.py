"""Small run-level helpers: seeding, device and precision choice, batch conversion, accuracy."""
import logging
import os
import random
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import UserError

log = logging.getLogger(__name__)


def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def resolve_device(device, cuda_flag, gpus=None, local_rank=0):
    """--device auto|cpu|cuda|cuda:N, --cuda (prefer CUDA, fall back with one warning), --gpus 0,1."""
    if gpus:
        # Must happen before anything initialises CUDA, which is why it lives here and not later.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    available = torch.cuda.is_available()
    if cuda_flag and device in ("auto", "cpu"):
        if not available:
            warnings.warn("--cuda given but CUDA is not available; running on CPU")
            return torch.device("cpu")
        device = "cuda"
    if device == "auto":
        device = "cuda" if available else "cpu"
    if device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"--device {device} under torchrun would put every process on the same GPU; pass "
                        f"--device cuda (each process takes the GPU of its LOCAL_RANK; choose GPUs with --gpus)")
    if device.startswith("cuda"):
        if not available:
            raise UserError(f"--device {device} but CUDA is not available here; use --device cpu "
                            f"(or --cuda to fall back automatically)")
        if device == "cuda":
            device = f"cuda:{local_rank}"
        index = int(device.split(":")[1])
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device} but only {torch.cuda.device_count()} GPU(s) are visible")
    elif device != "cpu":
        raise UserError(f"--device {device} is not one of auto, cpu, cuda, cuda:N")
    return torch.device(device)


def tta_views(x, flip=False, shift=0):
    """Test-time views of a float NCHW batch in pixel space: the batch itself; with shift > 0 also the batch
    translated by (+shift, +shift) and (-shift, -shift) pixels with zero fill (as --crop_padding pads); with
    flip, each of those mirrored left-right too. Predictions average the logits over the views."""
    views = [x]
    if shift > 0:
        h, w = x.shape[-2:]
        padded = torch.nn.functional.pad(x, (shift, shift, shift, shift))
        views += [padded[..., :h, :w], padded[..., 2 * shift:2 * shift + h, 2 * shift:2 * shift + w]]
    if flip:
        views += [v.flip(3) for v in views]
    return views


def topk_hits(logits, target, topk=(1, 5)):
    """Number of samples whose target is among the top-k predictions, for each k, as 0-d tensors on the
    logits' device (no host sync). `target` may be class indices or soft targets (mixed batches): then the
    argmax counts."""
    if target.ndim == 2:
        target = target.argmax(dim=1)
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target[:, None])
    return [hit[:, :min(k, maxk)].any(dim=1).sum() for k in topk]


def resize_square(x, side):
    """Float NCHW batch -> side x side, antialiased bilinear (PIL's resize filter); keeps the memory format, and
    returns x itself when it is that size already. The one resize of the repository: data conversion, the KD
    teacher's input, --prog_resize, the audit's thumbnails."""
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
