"""Coordinate Attention (Hou et al., "Coordinate Attention for Efficient Mobile Network Design", CVPR 2021).

Pool along width and along height separately, encode both strips with a shared 1x1 conv-BN-h_swish of
width mip = max(8, C // reduction), then two 1x1 convs give a height and a width attention map.
Deviation from the official code: the first conv has no bias (the BN after it makes one redundant).
Parameters: C*mip + 2*mip + 2*(mip*C + C).
"""
import torch
from torch import nn


class CoordAtt(nn.Module):
    def __init__(self, channels, reduction=32):
        super().__init__()
        mip = max(8, channels // reduction)
        self.conv1 = nn.Conv2d(channels, mip, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = nn.Hardswish()
        self.conv_h = nn.Conv2d(mip, channels, 1)
        self.conv_w = nn.Conv2d(mip, channels, 1)

    def forward(self, x):
        h, w = x.shape[2:]
        x_h = x.mean(dim=3, keepdim=True)                       # (N, C, H, 1)
        x_w = x.mean(dim=2, keepdim=True).transpose(2, 3)       # (N, C, W, 1)
        y = self.act(self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2))))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = self.conv_h(y_h).sigmoid()                        # (N, C, H, 1)
        a_w = self.conv_w(y_w.transpose(2, 3)).sigmoid()        # (N, C, 1, W)
        return x * a_h * a_w
