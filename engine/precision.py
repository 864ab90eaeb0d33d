"""Numeric precision: autocast + GradScaler chosen once (a no-op when off), channels_last inputs, and the fp32
math mode of convolutions and matmuls (--fp32_precision)."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.errors import UserError

FP32_PRECISIONS = ("default", "ieee", "bf16", "tf32")


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
