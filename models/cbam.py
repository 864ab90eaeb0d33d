"""Convolutional Block Attention Module (Woo et al., "CBAM", ECCV 2018).

Channel attention (average- and max-pooled descriptors through one shared MLP, summed, sigmoid), then
spatial attention (channel-wise mean and max maps, a kxk conv, sigmoid). Deviations: hidden width
max(8, channels // reduction), and the spatial conv has no bias and no BN (the paper's equation; the
official code adds a BN). Parameters: 2 * C * hidden + hidden + C + 2 * k * k.
"""
import torch
from torch import nn


class CBAM(nn.Module):
    def __init__(self, channels, reduction=16, kernel_size=7):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x):
        avg = x.mean(dim=(2, 3), keepdim=True)
        mx = x.amax(dim=(2, 3), keepdim=True)
        x = x * (self.mlp(avg) + self.mlp(mx)).sigmoid()
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * self.spatial(maps).sigmoid()
