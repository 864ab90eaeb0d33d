"""Numeric precision: autocast + GradScaler chosen once (a no-op when off), channels_last inputs, `--amp auto`
(bf16 where this CPU or GPU trains faster in it: choose_amp), and the fp32 math mode of convolutions and matmuls
(--fp32_precision)."""
import copy
import functools
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from engine.distributed import all_gather_object
from utils.errors import UserError
from utils.machine import cpu_model_and_isa

FP32_PRECISIONS = ("default", "ieee", "bf16", "tf32")


@dataclass
class Precision:
    """Autocast and GradScaler chosen once; both are no-ops when AMP is off (one code path)."""
    device: torch.device
    dtype: torch.dtype
    enabled: bool
    channels_last: bool
    auto: bool = False  # --amp auto, not decided yet: off until choose_amp decides with the model
    probe: dict | None = None  # choose_amp's measured speeds, for the run's summary

    @property
    def mode(self):
        """What autocast does, in words: bf16, fp16, off, or auto (not decided yet)."""
        if self.auto:
            return "auto"
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype] if self.enabled else "off"

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
    """amp: True (autocast on), False (off) or "auto": bf16 or off, decided by choose_amp once the model exists;
    a tool that never calls it (evaluation, prediction) runs fp32."""
    if amp == "auto":
        if amp_dtype == "fp16":
            raise UserError("--amp auto chooses between bf16 and fp32; for fp16 pass --amp --amp_dtype fp16")
        return Precision(device, torch.bfloat16, False, bool(channels_last), auto=True)
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


@functools.lru_cache(maxsize=None)
def hardware_name(device):
    """The processor a precision decision was timed on: the GPU's name, or the CPU's model and ISA features
    (read once per process: every checkpoint records it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, isa = cpu_model_and_isa()
    return f"{model or 'unknown CPU'} ({isa or 'no AVX2'})"


def decision_record(prec):
    """What a checkpoint keeps of the precision: the mode autocast ran in and the processor that chose it."""
    return {"mode": prec.mode, "hardware": hardware_name(prec.device)}


def recorded_mode(record, device):
    """A checkpoint's --amp auto decision ("bf16"/"off") when it was taken on this kind of processor, else None
    (an older checkpoint, or a run moved to other hardware, where the probe decides afresh)."""
    if not isinstance(record, dict) or record.get("mode") not in ("bf16", "off"):
        return None
    return record["mode"] if record.get("hardware") == hardware_name(device) else None


PROBE_BATCH = 128  # at most; at 32 the probe's bf16 speed-up swung from 1.2x to 1.6x on a Zen 4, at 128 1.7-1.8x


def choose_amp(prec, model, in_chans, side, batch_size=PROBE_BATCH, steps=3, min_speedup=1.1, min_seconds=0.3,
               recorded=None):
    """--amp auto: (`prec` with bf16 autocast on or off, the log line saying why); `prec` as it is when not auto.

    `recorded` ("bf16" or "off", from recorded_mode): the decision of the run being resumed on the same kind of
    processor, kept without probing, so that a run does not change precision half-way (a probe on a machine
    busy with other work can decide otherwise).

    CUDA: bf16 from compute capability 8 (bf16 tensor cores), else off; a function of the device, so every
    torchrun rank agrees. CPU: bf16 autocast runs from 10x slower than fp32 (an AVX2 AMD EPYC) to 1.4x faster
    (AMD Zen 4, AVX512-BF16) and 2x+ (AMX Xeons), and loses on AVX-512 Xeons without AMX, so a short probe
    (probe_speeds) times `model` in both and bf16 stays on only when `min_speedup` times faster; rank 0's
    measurement decides for every rank. A CPU for which oneDNN has no bf16 kernels is not probed.
    """
    if not prec.auto:
        return prec, None
    if recorded in ("bf16", "off"):
        return (replace(prec, enabled=recorded == "bf16", auto=False),
                f"amp auto: {recorded}, as decided when the run began (a resumed run keeps its precision)")
    if prec.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(prec.device)
        on = major >= 8
        why = ("has bf16 tensor cores -> bf16 on" if on else
               "has no bf16 tensor cores -> amp off (pass --amp for fp16 with loss scaling)")
        return replace(prec, enabled=on, auto=False), f"amp auto: GPU compute capability {major}.{minor} {why}"
    speeds = (probe_speeds(model, in_chans, side, min(batch_size, PROBE_BATCH), steps, prec.channels_last, min_seconds)
              if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None)
    speeds = all_gather_object(speeds)[0]  # every rank joins, probed or not
    if speeds is None:
        return replace(prec, auto=False), "amp auto: oneDNN has no bf16 kernels for this CPU -> bf16 off (fp32)"
    fp32, bf16 = speeds
    on = bf16 >= min_speedup * fp32
    probe = {"fp32_images_per_second": fp32, "bf16_images_per_second": bf16}
    return (replace(prec, enabled=on, auto=False, probe=probe),
            f"amp auto: bf16 {bf16:.0f} img/s vs fp32 {fp32:.0f} img/s -> bf16 {'on' if on else 'off'}")


def probe_speeds(model, in_chans, side, batch_size=32, steps=3, channels_last=False, min_seconds=0.0, most=200):
    """(fp32, bf16 autocast) training images per second of `model`: the median forward + backward pass of a deep
    copy on random batch_size x in_chans x side x side inputs. After a warm-up pass in each, the timed passes
    alternate fp32, bf16, fp32, ... so that both see the same load on a busy machine. fp32 makes `steps` of them,
    more (up to `most`) while they add up to under `min_seconds` (a small model's passes are too short to time one
    at a time). bf16 stops once it has taken longer than fp32's whole probe (as far as known: its warm-up plus
    `steps` passes of its median), so a CPU where bf16 is 10x slower pays one slow pass; its speed then comes from
    the passes it made. The run's weights, BatchNorm statistics and random state are untouched.
    """
    device = next(model.parameters()).device
    x = torch.rand(batch_size, in_chans, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout, drop path
        probe = copy.deepcopy(model).train()
        fp32 = [_step_seconds(probe, x, None)]
        bf16 = [_step_seconds(probe, x, torch.bfloat16)]
        racing = True
        while len(fp32) <= max(steps, 1) or (sum(fp32[1:]) < min_seconds and len(fp32) <= most):
            fp32.append(_step_seconds(probe, x, None))
            fp32_need = fp32[0] + max(steps * statistics.median(fp32[1:]), min_seconds)
            racing = racing and sum(bf16) <= fp32_need
            if racing:
                bf16.append(_step_seconds(probe, x, torch.bfloat16))
    return batch_size / statistics.median(fp32[1:]), batch_size / statistics.median(bf16[1:] or bf16)


def _step_seconds(model, x, dtype):
    """Seconds of one forward + backward pass, under autocast to `dtype` (None: fp32)."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(x)
    out.float().mean().backward()
    return time.perf_counter() - start


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
