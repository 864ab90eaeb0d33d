"""torchvision ResNet-18/34/50 (He et al., CVPR 2016) adapted to small images, with attention and DropPath.

Blocks subclass torchvision's BasicBlock/Bottleneck, so state-dict keys match torchvision's. Deviations:
for img_size <= 64 the stem is a 3x3 stride-1 conv without max-pool (the 7x7/2 conv + max-pool would
shrink 28 px to 7 px before layer1); larger inputs, and stem="standard" (torchvision's pretrained weights, at
any size), keep the standard stem. `in_chans` sets the stem input.
"""
from torch import nn
from torchvision.models import resnet as tv

from models.drop_path import drop_path_or_identity, linear_drop_path_rates


class BasicBlock(tv.BasicBlock):
    """torchvision BasicBlock; attention and DropPath sit after bn2, before the residual add."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.attn = nn.Identity()        # set by `resnet_tv` after construction
        self.drop_path = nn.Identity()

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.drop_path(self.attn(out))
        return self.relu(out + shortcut)

    def zero_init_last(self):
        if isinstance(self.bn2, nn.BatchNorm2d):
            nn.init.zeros_(self.bn2.weight)
        else:  # --acb made conv2 an ACBlock that holds the BNs (bn2 is an Identity)
            self.conv2.zero_init_gamma()


class Bottleneck(tv.Bottleneck):
    """torchvision Bottleneck; attention and DropPath sit after bn3, before the residual add."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.attn = nn.Identity()
        self.drop_path = nn.Identity()

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.drop_path(self.attn(out))
        return self.relu(out + shortcut)

    def zero_init_last(self):
        nn.init.zeros_(self.bn3.weight)


def resnet_tv(block, layers, num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0, stem=None):
    model = tv.ResNet(block, layers, num_classes=num_classes)
    if stem != "standard" and img_size <= 64:
        model.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)

    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    for b, rate in zip(blocks, linear_drop_path_rates(drop_path_rate, len(blocks))):
        out_channels = b.bn3.num_features if isinstance(b, Bottleneck) else b.bn2.num_features
        if attn_layer is not None:
            b.attn = attn_layer(out_channels)
        b.drop_path = drop_path_or_identity(rate)

    # torchvision's init, applied again so the new stem and attention modules get it too.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def resnet18(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0, stem=None):
    return resnet_tv(BasicBlock, [2, 2, 2, 2], num_classes, in_chans, img_size, attn_layer, drop_path_rate, stem)


def resnet34(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0, stem=None):
    return resnet_tv(BasicBlock, [3, 4, 6, 3], num_classes, in_chans, img_size, attn_layer, drop_path_rate, stem)


def resnet50(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0, stem=None):
    return resnet_tv(Bottleneck, [3, 4, 6, 3], num_classes, in_chans, img_size, attn_layer, drop_path_rate, stem)
