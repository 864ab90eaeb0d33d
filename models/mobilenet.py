"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018),
width 1.0, torchvision's layer table and init. Deviations: for img_size <= 64 the stem and the 24-channel
stage use stride 1 (total stride 8, as in common CIFAR ports); attention and DropPath are added to the
blocks that have a residual connection, after the projection conv-BN, before the add.
"""
from torch import nn

from models.drop_path import drop_path_or_identity, linear_drop_path_rates

# (expansion t, output channels c, blocks n, first stride s) from the paper's Table 2.
INVERTED_RESIDUAL_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def conv_bn_relu6(in_channels, out_channels, kernel_size=3, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection; residual when stride 1 and shapes match."""

    def __init__(self, in_channels, out_channels, stride, expand_ratio, attn_layer=None, drop_path_rate=0.0):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expand = conv_bn_relu6(in_channels, hidden, 1) if expand_ratio != 1 else nn.Identity()
        self.depthwise = conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.attn = nn.Identity()
        self.drop_path = nn.Identity()
        if self.use_residual:
            if attn_layer is not None:
                self.attn = attn_layer(out_channels)
            self.drop_path = drop_path_or_identity(drop_path_rate)

    def forward(self, x):
        out = self.project(self.depthwise(self.expand(x)))
        if not self.use_residual:
            return out
        return x + self.drop_path(self.attn(out))

    def zero_init_last(self):
        # Only a residual branch may start at zero; a plain block must pass its signal on.
        if self.use_residual:
            nn.init.zeros_(self.project[1].weight)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=10, in_chans=3, img_size=32, attn_layer=None, drop_path_rate=0.0):
        super().__init__()
        small = img_size <= 64
        setting = [(t, c, n, 1 if (small and c == 24) else s) for t, c, n, s in INVERTED_RESIDUAL_SETTING]

        specs = []      # (in_channels, out_channels, stride, expand_ratio) per block
        in_channels = 32
        for t, c, n, s in setting:
            for i in range(n):
                specs.append((in_channels, c, s if i == 0 else 1, t))
                in_channels = c
        # The linear drop-path rule runs over the residual blocks only.
        residual = [stride == 1 and cin == cout for cin, cout, stride, _ in specs]
        rates = iter(linear_drop_path_rates(drop_path_rate, sum(residual)))

        layers = [conv_bn_relu6(in_chans, 32, 3, 1 if small else 2)]
        for (cin, cout, stride, t), res in zip(specs, residual):
            layers.append(InvertedResidual(cin, cout, stride, t, attn_layer, next(rates) if res else 0.0))
        layers.append(conv_bn_relu6(in_channels, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(self.pool(x).flatten(1))


def mobilenetv2(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
    return MobileNetV2(num_classes, in_chans, img_size, attn_layer, drop_path_rate)
