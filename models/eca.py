"""Efficient Channel Attention (Wang et al., "ECA-Net", CVPR 2020).

Global average pool, a 1-D conv of size k across channels (no dimensionality reduction), sigmoid,
rescale. k follows the official code: t = int(|(log2(C) + b) / gamma|), k = t if t is odd else t + 1.
Parameters: k.
"""
import math

from torch import nn


def eca_kernel_size(channels, gamma=2, b=1):
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECA(nn.Module):
    def __init__(self, channels, gamma=2, b=1):
        super().__init__()
        k = eca_kernel_size(channels, gamma, b)
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x):
        n, c = x.shape[:2]
        s = x.mean(dim=(2, 3)).reshape(n, 1, c)        # channels become the 1-D sequence
        s = self.conv(s).reshape(n, c, 1, 1)
        return x * s.sigmoid()
