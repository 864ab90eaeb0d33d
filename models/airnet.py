"""Wide, shallow conv nets in the style of airbench (K. Jordan, "94% on CIFAR-10 in 3.29 seconds on a single
GPU", 2024): a stem conv, then three groups of conv3x3 -> 2x2 max-pool -> BN -> GELU -> conv3x3 -> BN -> GELU,
a global max-pool and a linear head: few layers at high width. On Fashion-MNIST here airnet_m learns faster
per epoch than ResNet-20 (README "Best-accuracy recipe"). Deviations from airbench: a 3x3 padded stem conv
(learned unless --whiten_stem freezes it to patch-whitening filters: 2 x 9 of its 24 for 1-channel input),
trainable BN scales, no logit scaling. Under --acb each conv1/bn1 pair becomes
one ACBlock, so a group's first BN moves ahead of its max-pool (the re-parameterised model stays exact).

airnet_s: widths 32/128/128; airnet_m: 64/128/256; airnet: 64/256/256 (airbench94's widths).
airnet_m3: airnet_m's widths with three convs per group, as in airbench96: the group's pooled, normalised
output x0 goes through conv2 -> BN -> GELU -> conv3 -> BN -> GELU and x0 is added back (a residual over the
two extra-depth convs).
airnet_mc: airnet_m with ceil-mode pooling. On 28 px input the maps go 28 -> 14 -> 7 -> 3 with floor pooling,
which drops the 7x7 map's last row and column (a quarter of group 3's first conv output, the image's bottom
and right border); ceil mode pools them too (7 -> 4), for 7% more FLOPs (128 MFLOPs against 119).
"""
from torch import nn

from utils.errors import UserError


class ConvGroup(nn.Module):
    def __init__(self, in_channels, channels, depth=2, ceil_mode=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.pool = nn.MaxPool2d(2, ceil_mode=ceil_mode)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        if depth == 3:
            self.conv3 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(channels)
        self.depth = depth
        self.act = nn.GELU()

    def forward(self, x):
        x = self.act(self.bn1(self.pool(self.conv1(x))))
        y = self.act(self.bn2(self.conv2(x)))
        return y if self.depth == 2 else x + self.act(self.bn3(self.conv3(y)))


class AirNet(nn.Module):
    def __init__(self, widths, num_classes=10, in_chans=3, stem_width=24, depth=2, ceil_mode=False):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, stem_width, 3, 1, 1)
        self.act = nn.GELU()
        groups, in_channels = [], stem_width
        for width in widths:
            groups.append(ConvGroup(in_channels, width, depth, ceil_mode))
            in_channels = width
        self.groups = nn.Sequential(*groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if depth == 3:  # each residual branch starts at zero: the group starts as airnet's two convs
            for g in self.groups:
                nn.init.zeros_(g.bn3.weight)

    def forward(self, x):
        x = self.groups(self.act(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))


def _airnet(widths, name, depth=2, ceil_mode=False):
    def build(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
        if attn_layer is not None or drop_path_rate > 0:
            raise UserError(f"{name} takes no attention modules or stochastic depth; "
                            f"use --attention none --drop_path_rate 0")
        if img_size < 8:
            raise UserError(f"{name} pools by 2 three times and needs images of at least 8 px, got {img_size}")
        return AirNet(widths, num_classes, in_chans, depth=depth, ceil_mode=ceil_mode)
    build.__name__ = name
    return build


airnet_s = _airnet((32, 128, 128), "airnet_s")
airnet_m = _airnet((64, 128, 256), "airnet_m")
airnet = _airnet((64, 256, 256), "airnet")
airnet_m3 = _airnet((64, 128, 256), "airnet_m3", depth=3)
airnet_mc = _airnet((64, 128, 256), "airnet_mc", ceil_mode=True)
