"""ACBlock, the Asymmetric Convolution Block of ACNet (Ding et al., ICCV 2019), and `convert_to_acb(net)`.

Training: kxk-BN + 1xk-BN + kx1-BN, summed, no activation (it replaces one conv+BN pair).
`reparameterize()` folds the three branches into one kxk conv with bias. Deviation: padding < k//2 (which
the paper handles by cropping) is not supported; such convs are left alone by `convert_to_acb`.
"""
import logging

import torch
import torch.nn as nn

from models.reparam import fuse_conv_bn, fused_conv, sum_branches
from utils.errors import UserError

log = logging.getLogger(__name__)


class ACBlock(nn.Module):
    """kxk conv + BN trained as three branches (kxk, 1xk, kx1), each with its own BN."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, groups=1,
                 bn_eps=1e-5, bn_momentum=0.1, device=None, dtype=None):
        super().__init__()
        k = kernel_size
        p = k // 2 if padding is None else padding
        if k < 3 or k % 2 == 0:
            raise ValueError(f"ACBlock needs an odd kernel size >= 3, got {k}")
        if p < k // 2:
            raise ValueError(f"ACBlock needs padding >= kernel_size // 2 = {k // 2}, got {p}")
        self.stride, self.padding, self.groups = stride, p, groups
        kw = dict(stride=stride, groups=groups, bias=False, device=device, dtype=dtype)
        bn = dict(eps=bn_eps, momentum=bn_momentum, device=device, dtype=dtype)
        # Output pixel i of the kxk conv is centred on input row/col i*s - p + k//2. A 1xk conv with
        # vertical padding p - k//2 is centred on the same row (its height is 1), so all outputs align.
        self.conv_kxk = nn.Conv2d(in_channels, out_channels, k, padding=p, **kw)
        self.bn_kxk = nn.BatchNorm2d(out_channels, **bn)
        self.conv_1xk = nn.Conv2d(in_channels, out_channels, (1, k), padding=(p - k // 2, p), **kw)
        self.bn_1xk = nn.BatchNorm2d(out_channels, **bn)
        self.conv_kx1 = nn.Conv2d(in_channels, out_channels, (k, 1), padding=(p, p - k // 2), **kw)
        self.bn_kx1 = nn.BatchNorm2d(out_channels, **bn)
        self.conv = None  # the fused deploy conv, set by reparameterize()
        self.reparameterized = False

    def forward(self, x):
        if self.conv is not None:
            return self.conv(x)
        return (self.bn_kxk(self.conv_kxk(x)) + self.bn_1xk(self.conv_1xk(x))
                + self.bn_kx1(self.conv_kx1(x)))

    def zero_init_gamma(self):
        """Zero the γ of all three BNs, as zero-γ init of the BN this block replaced (--zero_init_residual).

        Not named zero_init_last: that marks residual blocks, and every ACBlock would be zeroed.
        """
        for bn in (self.bn_kxk, self.bn_1xk, self.bn_kx1):
            nn.init.zeros_(bn.weight)

    @torch.no_grad()
    def reparameterize(self):
        """Fold the branches into `self.conv` (kxk, bias) and delete them; in place."""
        if self.reparameterized:
            return
        w, b = sum_branches([fuse_conv_bn(self.conv_kxk.weight, None, self.bn_kxk),
                             fuse_conv_bn(self.conv_1xk.weight, None, self.bn_1xk),
                             fuse_conv_bn(self.conv_kx1.weight, None, self.bn_kx1)])
        self.conv = fused_conv(w, b, self.stride, self.padding, self.groups)
        for name in ("conv_kxk", "bn_kxk", "conv_1xk", "bn_1xk", "conv_kx1", "bn_kx1"):
            delattr(self, name)
        self.reparameterized = True


def _acb_for(conv, bn):
    """An ACBlock to replace `conv` followed by `bn`, or None if ACNet does not apply to the pair."""
    if type(conv) is not nn.Conv2d or not isinstance(bn, nn.BatchNorm2d):
        return None
    if not (bn.affine and bn.track_running_stats):  # an ACBlock's BNs are affine and fusable
        return None
    kh, kw = conv.kernel_size
    if kh != kw or kh < 3 or kh % 2 == 0 or conv.bias is not None or conv.out_channels != bn.num_features:
        return None
    if conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        return None
    if isinstance(conv.padding, str):  # "same" (stride 1) is k//2 for odd k; "valid" is 0
        padding = kh // 2 if conv.padding == "same" else 0
    elif conv.padding[0] == conv.padding[1]:
        padding = conv.padding[0]
    else:
        return None
    if padding < kh // 2:
        log.debug("--acb: skipping a %dx%d conv with padding %d < k//2", kh, kw, padding)
        return None
    return ACBlock(conv.in_channels, conv.out_channels, kh, conv.stride, padding, conv.groups,
                   bn_eps=bn.eps, bn_momentum=bn.momentum, device=conv.weight.device, dtype=conv.weight.dtype)


def _convert(module):
    # Blocks that already re-parameterise (RepVGGBlock, ACBlock, ...) are left as they are.
    if callable(getattr(module, "reparameterize", None)):
        return 0
    n = 0
    if isinstance(module, nn.Sequential):  # consecutive Conv2d, BatchNorm2d (also downsample paths)
        for i in range(len(module) - 1):
            acb = _acb_for(module[i], module[i + 1])
            if acb is not None:
                module[i], module[i + 1] = acb, nn.Identity()
                n += 1
    for name, child in list(module.named_children()):  # sibling convN / bnN
        if name.startswith("conv"):
            bn_name = "bn" + name[len("conv"):]
            acb = _acb_for(child, getattr(module, bn_name, None))
            if acb is not None:
                setattr(module, name, acb)
                setattr(module, bn_name, nn.Identity())
                n += 1
    for child in module.children():
        n += _convert(child)
    return n


def convert_to_acb(net, name=None):
    """Swap every kxk (k > 1) conv + BN pair of a freshly built `net` for an ACBlock, in place.

    Pairs are sibling attributes convN / bnN (same suffix) or consecutive Conv2d, BatchNorm2d in an
    nn.Sequential; the conv becomes the ACBlock and the BN nn.Identity (nothing is copied: call it at
    build time). Returns the number of pairs converted.
    """
    n = _convert(net)
    if n == 0:
        raise UserError(f"--acb found no kxk conv+BN pairs in {name or type(net).__name__}; "
                        f"drop --acb for this model")
    log.info("--acb: %d conv+BN pair(s) of %s trained as ACBlocks", n, name or type(net).__name__)
    return n
