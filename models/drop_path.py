"""Stochastic depth: drop a residual branch for whole samples (Huang et al., "Deep Networks with
Stochastic Depth", ECCV 2016). As in timm, the mask is drawn per sample rather than per batch, and kept
branches are scaled by 1/(1-p) at train time so that eval needs no rescaling.
"""
from torch import nn


def drop_path(x, p, training):
    """Zero the whole of each sample of `x` with probability p; scale the kept samples by 1/(1-p).

    Identity when p == 0 or not training. Expects 0 <= p < 1.
    """
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    # One Bernoulli draw per sample, broadcast over channels and pixels.
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Module form of `drop_path`, placed on a residual branch just before the add."""

    def __init__(self, p=0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        return drop_path(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


def linear_drop_path_rates(drop_path_rate, num_blocks):
    """Linear decay rule of the paper: block l of L (1-indexed, input to output) gets R * l / L."""
    return [drop_path_rate * k / num_blocks for k in range(1, num_blocks + 1)]


def drop_path_or_identity(p):
    """DropPath(p), or nn.Identity() when p == 0 so that plain models print and run as before."""
    return DropPath(p) if p > 0 else nn.Identity()
