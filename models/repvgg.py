"""RepVGG (Ding et al., CVPR 2021): VGG-style nets trained with kxk-BN + 1x1-BN + identity-BN branches.

`RepVGGBlock.reparameterize()` folds the branches into one kxk conv with bias (then ReLU).
Deviation, for small images: base widths are 1/4 of ImageNet's ([16, 32, 64, 128] x a, last x b), and a
stage downsamples only while its output stays >= 4 px (stem stride 1 below 64 px): 28 px -> 28-14-7-4-4.
"""
import torch
import torch.nn as nn

from models.reparam import fuse_conv_bn, fused_conv, identity_kernel, sum_branches
from utils.errors import UserError


class RepVGGBlock(nn.Module):
    """kxk conv-BN + 1x1 conv-BN (+ BN of the input when in == out and stride 1), summed, then ReLU."""

    def __init__(self, in_channels, out_channels, stride=1, groups=1, kernel_size=3, identity=True):
        super().__init__()
        k = kernel_size
        if k < 3 or k % 2 == 0:
            raise ValueError(f"RepVGGBlock needs an odd kernel size >= 3, got {k}")
        self.stride, self.padding, self.groups = stride, k // 2, groups
        self.conv_kxk = nn.Conv2d(in_channels, out_channels, k, stride, k // 2, groups=groups, bias=False)
        self.bn_kxk = nn.BatchNorm2d(out_channels)
        # A 1x1 conv with padding 0 is centred on the same input pixel as the kxk conv with padding k//2.
        self.conv_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, 0, groups=groups, bias=False)
        self.bn_1x1 = nn.BatchNorm2d(out_channels)
        use_identity = identity and in_channels == out_channels and stride == 1
        self.bn_identity = nn.BatchNorm2d(out_channels) if use_identity else None
        self.act = nn.ReLU(inplace=True)
        self.conv = None  # the fused deploy conv, set by reparameterize()
        self.reparameterized = False

    def forward(self, x):
        if self.conv is not None:
            return self.act(self.conv(x))
        out = self.bn_kxk(self.conv_kxk(x)) + self.bn_1x1(self.conv_1x1(x))
        if self.bn_identity is not None:
            out = out + self.bn_identity(x)
        return self.act(out)

    @torch.no_grad()
    def reparameterize(self):
        """Fold the branches into `self.conv` (kxk, bias) and delete them; in place."""
        if self.reparameterized:
            return
        w = self.conv_kxk.weight
        branches = [fuse_conv_bn(w, None, self.bn_kxk), fuse_conv_bn(self.conv_1x1.weight, None, self.bn_1x1)]
        if self.bn_identity is not None:
            eye = identity_kernel(w.shape[0], w.shape[-1], self.groups, dtype=w.dtype, device=w.device)
            branches.append(fuse_conv_bn(eye, None, self.bn_identity))
        weight, bias = sum_branches(branches)
        self.conv = fused_conv(weight, bias, self.stride, self.padding, self.groups)
        for name in ("conv_kxk", "bn_kxk", "conv_1x1", "bn_1x1", "bn_identity"):
            delattr(self, name)
        self.bn_identity = None
        self.reparameterized = True


def plain_block(in_channels, out_channels, stride=1):
    """The plain VGG twin of a RepVGGBlock: 3x3 conv-BN-ReLU (the same deploy shape after BN fusion)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def stage_strides(img_size, num_stages=5):
    """Stem stride 2 only from 64 px; each later stage halves the size while the result stays >= 4 px."""
    strides = [2 if img_size >= 64 else 1]
    size = (img_size + strides[0] - 1) // strides[0]
    for _ in range(num_stages - 1):
        halved = (size + 1) // 2  # 3x3 conv, padding 1, stride 2
        strides.append(2 if halved >= 4 else 1)
        size = halved if halved >= 4 else size
    return strides


class RepVGG(nn.Module):
    """Stem block, four stages of blocks (the first of each may downsample), global pool, linear head."""

    def __init__(self, num_blocks, width_multipliers, num_classes=10, in_chans=3, img_size=224,
                 base_widths=(16, 32, 64, 128), block=RepVGGBlock):
        super().__init__()
        a, b = width_multipliers
        widths = [int(w * a) for w in base_widths[:3]] + [int(base_widths[3] * b)]
        strides = stage_strides(img_size)
        in_ch = min(base_widths[0], int(base_widths[0] * a))
        self.stage0 = block(in_chans, in_ch, stride=strides[0])
        stages = []
        for n, width, stride in zip(num_blocks, widths, strides[1:]):
            layers = []
            for i in range(n):
                layers.append(block(in_ch, width, stride=stride if i == 0 else 1))
                in_ch = width
            stages.append(nn.Sequential(*layers))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        x = self.stage0(x)
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


# (blocks per stage after the stem, (a, b)) as in the paper's Table 2; widths are 1/4 of ImageNet's.
_CONFIGS = {"repvgg_a0": ((2, 4, 14, 1), (0.75, 2.5)),
            "repvgg_a1": ((2, 4, 14, 1), (1.0, 2.5)),
            "repvgg_b0": ((4, 6, 16, 1), (1.0, 2.5))}


def _constructor(name, config, block=RepVGGBlock):
    num_blocks, multipliers = _CONFIGS[config]

    def build(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0, **kw):
        # RepVGG has no residual branch for attention or stochastic depth to act on.
        if attn_layer is not None or drop_path_rate:
            raise UserError(f"{name} has no residual blocks; use --attention none --drop_path_rate 0")
        return RepVGG(num_blocks, multipliers, num_classes, in_chans, img_size, block=block, **kw)
    build.__name__ = name
    build.__doc__ = f"{name}: {num_blocks} blocks per stage after the stem, width multipliers {multipliers}."
    return build


REPVGG_MODELS = {name: _constructor(name, name) for name in _CONFIGS}
# Same stages and deploy shape as repvgg_a0, trained as plain conv-BN-ReLU: the baseline RepVGG must beat.
REPVGG_MODELS["repvgg_a0_plain"] = _constructor("repvgg_a0_plain", "repvgg_a0", plain_block)
