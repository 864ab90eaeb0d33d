"""Structural re-parameterisation: pure kernel transforms and `reparameterize_model(model)`.

A block trained as several linear branches (conv + BN each) is folded into one conv with bias, following
the transforms of DiverseBranchBlock (Ding et al., CVPR 2021): BN fusion, kernel padding, identity as a
kernel, branch addition. Fusion is computed in float64 and cast back, so float32 models lose nothing.
"""
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


def fuse_conv_bn(weight, bias, bn):
    """Fold an eval-mode BatchNorm into the conv before it: BN(conv(x; W, b)) == conv(x; W', b').

    W' = W * γ/σ per output channel, b' = β + (b - μ) * γ/σ with σ = sqrt(running_var + eps).
    `bias` may be None. Returns (W', b') in the dtype of `weight`.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fuse a BatchNorm without running statistics (track_running_stats=False)")
    dtype = weight.dtype
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    bias = bias.double() if bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    w = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = beta + (bias - mean) * scale
    return w.to(dtype), b.to(dtype)


def pad_kernel(weight, k):
    """Zero-pad a (O, I, kh, kw) kernel to (O, I, k, k), centred (1x1, 1xk, kx1 -> kxk)."""
    kh, kw = weight.shape[-2:]
    if kh > k or kw > k or (k - kh) % 2 or (k - kw) % 2:
        raise ValueError(f"cannot centre a {kh}x{kw} kernel in {k}x{k}: sizes must differ by an even number")
    ph, pw = (k - kh) // 2, (k - kw) // 2
    return F.pad(weight, [pw, pw, ph, ph])


def identity_kernel(channels, k, groups=1, dtype=torch.float32, device=None):
    """The kxk kernel of a grouped conv (channels -> channels) that returns its input unchanged."""
    if channels % groups:
        raise ValueError(f"channels ({channels}) must be divisible by groups ({groups})")
    per_group = channels // groups
    w = torch.zeros(channels, per_group, k, k, dtype=dtype, device=device)
    idx = torch.arange(channels, device=device)
    # Output channel i of group g reads input i; inside its group that input is at index i % per_group.
    w[idx, idx % per_group, k // 2, k // 2] = 1
    return w


def sum_branches(branches):
    """Add parallel linear branches [(W, b), ...] into one (W, b); smaller kernels are padded to the largest."""
    k = max(w.shape[-1] for w, _ in branches)
    weight = sum(pad_kernel(w, k) for w, _ in branches)
    bias = sum(b for _, b in branches)
    return weight, bias


def fused_conv(weight, bias, stride, padding, groups):
    """The single deploy-time nn.Conv2d (with bias) holding a fused (W, b)."""
    out_channels, in_per_group, kh, kw = weight.shape
    conv = nn.Conv2d(in_per_group * groups, out_channels, (kh, kw), stride, padding, groups=groups,
                     bias=True, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


def _pending(model):
    """Modules with a `reparameterize()` that have not been converted yet, children before parents."""
    return [m for m in reversed(list(model.modules()))
            if callable(getattr(m, "reparameterize", None)) and not getattr(m, "reparameterized", False)]


def count_reparameterizable(model):
    """Number of modules that `reparameterize_model` would convert (0 for a plain model)."""
    return len(_pending(model))


@torch.no_grad()
def reparameterize_model(model):
    """Call `reparameterize()` on every module that has it, in place; returns the model.

    Switch to eval() first if outputs are to be compared: fusion uses the BN running statistics.
    A model with nothing to fuse is returned unchanged (see `count_reparameterizable`).
    """
    pending = _pending(model)
    for m in pending:
        m.reparameterize()
    if pending:
        log.info("re-parameterised %d block(s) of %s", len(pending), type(model).__name__)
    else:
        log.info("nothing to re-parameterise in %s", type(model).__name__)
    return model
