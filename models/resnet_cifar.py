"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2).

Three stages of n BasicBlocks with 16/32/64 channels, depth 6n + 2. Deviation: shortcuts that change
shape use option B (1x1 conv + BN projection) instead of the paper's zero-padding option A. Any input
channels and size (global average pool). Convs use kaiming_normal(fan_out) as in torchvision.

`fastresnet8/14/20` (this repository's, for CPU time budgets): widths 32/64/128 and a 2x2 max-pool after the
stem conv, so the residual stages run at 1/2, 1/4, 1/8 of the input size: ~5x the parameters of resnet8 at
about its cost per image.
"""
from torch import nn

from models.drop_path import drop_path_or_identity, linear_drop_path_rates


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN [-attention] [-DropPath], plus shortcut, then ReLU."""

    def __init__(self, in_channels, channels, stride=1, attn_layer=None, drop_path_rate=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.attn = attn_layer(channels) if attn_layer is not None else nn.Identity()
        self.drop_path = drop_path_or_identity(drop_path_rate)
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                nn.BatchNorm2d(channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.drop_path(self.attn(out))
        return self.relu(out + self.shortcut(x))

    def zero_init_last(self):
        if isinstance(self.bn2, nn.BatchNorm2d):
            nn.init.zeros_(self.bn2.weight)
        else:  # --acb made conv2 an ACBlock that holds the BNs (bn2 is an Identity)
            self.conv2.zero_init_gamma()


class CifarResNet(nn.Module):
    def __init__(self, depth, num_classes=10, in_chans=3, attn_layer=None, drop_path_rate=0.0,
                 widths=(16, 32, 64), stem_pool=False):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.stem_pool = nn.MaxPool2d(2) if stem_pool else nn.Identity()

        rates = iter(linear_drop_path_rates(drop_path_rate, 3 * n))
        in_channels = widths[0]
        stages = []
        for channels, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_channels, channels, stride if i == 0 else 1,
                                         attn_layer, next(rates)))
                in_channels = channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.stem_pool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


# Registry constructors share one signature: (num_classes, in_chans, img_size, attn_layer, drop_path_rate).
# img_size is unused here: the net pools globally.
def resnet8(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
    return CifarResNet(8, num_classes, in_chans, attn_layer, drop_path_rate)


def resnet20(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
    return CifarResNet(20, num_classes, in_chans, attn_layer, drop_path_rate)


def resnet32(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
    return CifarResNet(32, num_classes, in_chans, attn_layer, drop_path_rate)


def resnet44(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
    return CifarResNet(44, num_classes, in_chans, attn_layer, drop_path_rate)


def resnet56(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
    return CifarResNet(56, num_classes, in_chans, attn_layer, drop_path_rate)


def resnet110(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
    return CifarResNet(110, num_classes, in_chans, attn_layer, drop_path_rate)


def fastresnet8(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
    return CifarResNet(8, num_classes, in_chans, attn_layer, drop_path_rate, widths=(32, 64, 128), stem_pool=True)


def fastresnet14(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
    return CifarResNet(14, num_classes, in_chans, attn_layer, drop_path_rate, widths=(32, 64, 128), stem_pool=True)


def fastresnet20(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
    return CifarResNet(20, num_classes, in_chans, attn_layer, drop_path_rate, widths=(32, 64, 128), stem_pool=True)
