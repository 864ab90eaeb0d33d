"""Small run-level helpers: seeding, device and precision choice, batch conversion, accuracy."""
import logging
import os
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from config import FP32_PRECISIONS
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


@dataclass
class Precision:
    """Autocast and GradScaler chosen once; both are no-ops when AMP is off (one code path)."""
    device: torch.device
    dtype: torch.dtype
    enabled: bool
    channels_last: bool

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.enabled)

    def scaler(self):
        # Only fp16 needs loss scaling; bf16 has fp32's exponent range.
        return torch.amp.GradScaler(self.device.type, enabled=self.enabled and self.dtype == torch.float16)

    def to_input(self, x):
        """uint8 NCHW batch -> float pixels in [0, 1] on the device (channels_last when asked)."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.float().div_(255)


def make_precision(device, amp, amp_dtype="auto", channels_last=False):
    if amp_dtype == "auto":
        if device.type == "cuda":
            # bf16 tensor cores from Ampere (compute capability 8) on; is_bf16_supported() also says yes for
            # emulated bf16 on V100/T4, where fp16 + GradScaler is the fast choice.
            dtype = torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
        else:
            dtype = torch.bfloat16
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp_dtype]
    if amp and device.type == "cpu" and dtype == torch.float16:
        raise UserError("--amp_dtype fp16 is not supported on CPU; use --amp_dtype bf16 (or auto)")
    return Precision(device, dtype, bool(amp), bool(channels_last))


def bf16_conv_math_active():
    """Whether oneDNN really computes fp32 convolutions on bf16-rounded inputs when asked (--fp32_precision
    bf16). Having the instructions is not enough: on an AMD Zen 4 (AVX512-BF16, no AMX; torch 2.14, oneDNN 3.12)
    the convolutions stayed IEEE fp32, bit for bit. A small probe convolution computed both ways answers it; the
    setting is restored afterwards."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    conv = torch.backends.mkldnn.conv
    saved = conv.fp32_precision
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 14, 14, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 16, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    out = []
    try:
        for mode in ("ieee", "bf16"):
            conv.fp32_precision = mode
            out.append(F.conv2d(x, w, padding=1))
    finally:
        conv.fp32_precision = saved
    return not torch.equal(*out)


def set_fp32_precision(device, mode):
    """--fp32_precision: how fp32 convolutions and matmuls compute (a process-wide torch setting).

    default leaves torch's own choice (CPU: IEEE fp32; CUDA: cuDNN convolutions in TF32, matmuls in fp32).
    ieee: full fp32 everywhere. bf16 (CPU): oneDNN rounds the inputs of each conv/matmul to bf16 and accumulates
    in fp32 (AVX512-BF16 or AMX); weights, activations and the optimizer stay fp32, unlike --amp, which also runs
    the elementwise layers in bf16. tf32 (CUDA): cuDNN convolutions and cuBLAS matmuls in TF32.
    """
    if mode not in FP32_PRECISIONS:
        raise UserError(f"--fp32_precision {mode} is not one of {', '.join(FP32_PRECISIONS)}")
    if mode == "default":
        return
    if device.type == "cuda":
        if mode == "bf16":
            raise UserError("--fp32_precision bf16 is a CPU (oneDNN) setting; on CUDA pass --fp32_precision tf32 "
                            "(or default) instead, or use --amp")
        torch.backends.cudnn.conv.fp32_precision = mode
        torch.backends.cuda.matmul.fp32_precision = mode
        return
    if mode == "tf32":
        raise UserError("--fp32_precision tf32 is a CUDA setting; on CPU use bf16 (CPUs with AVX512-BF16 or AMX) "
                        "or ieee")
    if mode == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise UserError("--fp32_precision bf16 needs a CPU with bf16 instructions (AVX512-BF16 or AMX), which this "
                        "one lacks; pass --fp32_precision default instead")
    if mode == "bf16" and not bf16_conv_math_active():
        raise UserError("--fp32_precision bf16 would change nothing on this CPU: oneDNN keeps its fp32 convolutions "
                        "in IEEE fp32 here (seen on AMD Zen 4); pass --fp32_precision default, and --amp for bf16 "
                        "speed")
    torch.backends.mkldnn.conv.fp32_precision = mode
    torch.backends.mkldnn.matmul.fp32_precision = mode


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
