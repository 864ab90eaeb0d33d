"""Wide ResNets (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016): pre-activation blocks,
3 stages of 16k/32k/64k channels, depth 6n + 4. Deviations: no dropout inside blocks (use DropPath);
`zero_init_last` zeros the branch's last conv, because a pre-activation branch ends in a conv, not a
norm (zeroing norm2's gamma would feed ReLU exact zeros and stop all gradient to the branch).
"""
from torch import nn

from models.drop_path import drop_path_or_identity, linear_drop_path_rates


class WideBasic(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 [-attention] [-DropPath], plus shortcut.

    Norms are called norm1/norm2 (not bn1/bn2) because each one comes *before* its conv: there is no
    conv -> BN pair here for conv+BN tools (ACB, fusion) to pick up.
    """

    def __init__(self, in_channels, channels, stride=1, attn_layer=None, drop_path_rate=0.0):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.attn = attn_layer(channels) if attn_layer is not None else nn.Identity()
        self.drop_path = drop_path_or_identity(drop_path_rate)
        # As in the official code, a projection shortcut reads the pre-activated input.
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride, bias=False)

    def forward(self, x):
        o = self.relu(self.norm1(x))
        shortcut = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(self.relu(self.norm2(out)))
        out = self.drop_path(self.attn(out))
        return out + shortcut

    def zero_init_last(self):
        nn.init.zeros_(self.conv2.weight)


class WideResNet(nn.Module):
    def __init__(self, depth, widen_factor, num_classes=10, in_chans=3, attn_layer=None, drop_path_rate=0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)

        rates = iter(linear_drop_path_rates(drop_path_rate, 3 * n))
        in_channels = 16
        stages = []
        for channels, stride in zip(widths, [1, 2, 2]):
            blocks = []
            for i in range(n):
                blocks.append(WideBasic(in_channels, channels, stride if i == 0 else 1, attn_layer, next(rates)))
                in_channels = channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.norm = nn.BatchNorm2d(in_channels)     # the last block's output is not yet normalised
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.norm(x))
        return self.fc(self.pool(x).flatten(1))


def wrn16_4(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
    return WideResNet(16, 4, num_classes, in_chans, attn_layer, drop_path_rate)


def wrn16_8(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
    return WideResNet(16, 8, num_classes, in_chans, attn_layer, drop_path_rate)


def wrn28_10(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
    return WideResNet(28, 10, num_classes, in_chans, attn_layer, drop_path_rate)
