"""A plain VGG-style net (Simonyan & Zisserman, ICLR 2015: only 3x3 conv-BN-ReLU, no shortcuts) with the
stage depths of RepVGG-A0 (Ding et al., CVPR 2021: 1, 2, 4, 14, 1 blocks) and widths 32-256: 22 convs deep,
showing what training without shortcuts gives. The exact plain twin of repvgg_a0 (same widths
and strides) is `repvgg_a0_plain` in models/repvgg.py.
"""
from torch import nn

from utils.errors import UserError

# (blocks, width, stride of the first block) per stage, for small images; stage 0 is the stem.
VGG_STAGES = [(1, 32, 1), (2, 32, 2), (4, 64, 2), (14, 128, 2), (1, 256, 2)]


def vgg_stages(img_size):
    """VGG_STAGES, with a stride-2 stem for inputs above 64 px (total stride 32 as in RepVGG)."""
    if img_size <= 64:
        return list(VGG_STAGES)
    (blocks, width, _), *rest = VGG_STAGES
    return [(blocks, width, 2)] + rest


class PlainVGG(nn.Module):
    def __init__(self, num_classes=10, in_chans=3, img_size=32):
        super().__init__()
        stages = []
        in_channels = in_chans
        for blocks, width, stride in vgg_stages(img_size):
            layers = []
            for i in range(blocks):
                layers.append(nn.Sequential(
                    nn.Conv2d(in_channels, width, 3, stride if i == 0 else 1, 1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ))
                in_channels = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.fc(self.pool(self.stages(x)).flatten(1))


def vgg_plain(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
    if attn_layer is not None or drop_path_rate > 0:
        raise UserError("vgg_plain has no residual blocks; use --attention none --drop_path_rate 0")
    return PlainVGG(num_classes, in_chans, img_size)
