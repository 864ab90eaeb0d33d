"""Squeeze-and-Excitation (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018).

Global average pool, FC-ReLU-FC-sigmoid, channel-wise rescale. Deviation: the hidden width is
max(8, channels // reduction) instead of channels / r, so the 16-channel stages of CIFAR ResNets keep a
usable bottleneck. Parameters: 2 * C * hidden + hidden + C.
"""
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = max(8, channels // reduction)
        # 1x1 convs on the pooled (N, C, 1, 1) tensor are the paper's fully connected layers.
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        s = x.mean(dim=(2, 3), keepdim=True)
        s = self.fc2(self.relu(self.fc1(s)))
        return x * s.sigmoid()
