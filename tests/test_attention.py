"""Attention modules: shapes, closed-form parameter counts, and outputs against hand-written maths."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import make_attention
from models.cbam import CBAM
from models.coord_att import CoordAtt
from models.eca import ECA, eca_kernel_size
from models.se import SqueezeExcite
from utils.errors import UserError

LAYERS = [SqueezeExcite, CBAM, ECA, CoordAtt]


def num_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("channels", [8, 16, 64])
def test_shape_finite_and_gated(layer, channels):
    torch.manual_seed(0)
    m = layer(channels)
    x = torch.randn(2, channels, 7, 5)       # non-square: catches mixed-up H and W
    y = m(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    # Every module multiplies x by sigmoid gates in (0, 1): same sign, smaller magnitude, never equal.
    assert (y.abs() <= x.abs()).all()
    assert not torch.allclose(y, x)


@pytest.mark.parametrize("channels", [16, 64, 256])
def test_param_counts(channels):
    c = channels
    h = max(8, c // 16)
    assert num_params(SqueezeExcite(c)) == 2 * c * h + h + c
    assert num_params(CBAM(c)) == 2 * c * h + h + c + 2 * 7 * 7
    assert num_params(CBAM(c, kernel_size=3)) == 2 * c * h + h + c + 2 * 3 * 3
    assert num_params(ECA(c)) == {16: 3, 64: 3, 256: 5}[c]
    mip = max(8, c // 32)
    assert num_params(CoordAtt(c)) == c * mip + 2 * mip + 2 * (mip * c + c)


def test_eca_kernel_size():
    # Worked by hand from t = int(|(log2 C + 1) / 2|), k = t or t + 1 to make it odd.
    expected = {1: 1, 2: 1, 8: 3, 16: 3, 64: 3, 128: 5, 256: 5, 512: 5, 1024: 5, 2048: 7}
    assert {c: eca_kernel_size(c) for c in expected} == expected
    assert eca_kernel_size(64, gamma=1, b=0) == 7     # int(6) = 6 -> 7
    assert ECA(2048).conv.kernel_size == (7,)


def _rand_params(m):
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    return m


def test_se_matches_formula():
    torch.manual_seed(1)
    m = _rand_params(SqueezeExcite(16)).double()
    x = torch.randn(3, 16, 5, 4, dtype=torch.float64)
    w1, b1 = m.fc1.weight[:, :, 0, 0], m.fc1.bias
    w2, b2 = m.fc2.weight[:, :, 0, 0], m.fc2.bias
    z = x.mean(dim=(2, 3))
    gate = torch.sigmoid(torch.relu(z @ w1.T + b1) @ w2.T + b2)
    torch.testing.assert_close(m(x), x * gate[:, :, None, None])


def test_eca_matches_formula():
    torch.manual_seed(2)
    m = _rand_params(ECA(256)).double()        # k = 5
    x = torch.randn(2, 256, 3, 3, dtype=torch.float64)
    w = m.conv.weight.view(-1)
    k = w.numel()
    z = F.pad(x.mean(dim=(2, 3)), (k // 2, k // 2))   # zero padding at both ends of the channel axis
    s = torch.stack([(z[:, c:c + k] * w).sum(1) for c in range(256)], dim=1)
    torch.testing.assert_close(m(x), x * torch.sigmoid(s)[:, :, None, None])


def test_cbam_matches_formula():
    torch.manual_seed(3)
    m = _rand_params(CBAM(16, kernel_size=3)).double()
    x = torch.randn(2, 16, 4, 5, dtype=torch.float64)
    w1, b1 = m.mlp[0].weight[:, :, 0, 0], m.mlp[0].bias
    w2, b2 = m.mlp[2].weight[:, :, 0, 0], m.mlp[2].bias

    def mlp(z):
        return torch.relu(z @ w1.T + b1) @ w2.T + b2

    xc = x * torch.sigmoid(mlp(x.mean(dim=(2, 3))) + mlp(x.amax(dim=(2, 3))))[:, :, None, None]
    maps = torch.stack([xc.mean(1), xc.amax(1)], dim=1)           # (N, 2, H, W)
    padded = F.pad(maps, (1, 1, 1, 1))
    w = m.spatial.weight[0]                                        # (2, 3, 3)
    s = torch.zeros(2, 4, 5, dtype=torch.float64)
    for i in range(4):
        for j in range(5):
            s[:, i, j] = (padded[:, :, i:i + 3, j:j + 3] * w).sum(dim=(1, 2, 3))
    torch.testing.assert_close(m(x), xc * torch.sigmoid(s)[:, None])


def test_coord_att_matches_formula():
    torch.manual_seed(4)
    m = _rand_params(CoordAtt(16, reduction=2)).double().eval()   # mip = 8
    with torch.no_grad():
        m.bn1.running_mean.normal_()
        m.bn1.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 16, 4, 6, dtype=torch.float64)
    bn = m.bn1

    def encode(z):      # z: (N, C, L) -> (N, mip, L): 1x1 conv, eval BN, h_swish
        y = torch.einsum("mc,ncl->nml", m.conv1.weight[:, :, 0, 0], z)
        y = (y - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps)
        y = y * bn.weight[:, None] + bn.bias[:, None]
        return y * torch.clamp(y + 3, 0, 6) / 6

    def gate(conv, y):
        return torch.sigmoid(torch.einsum("cm,nml->ncl", conv.weight[:, :, 0, 0], y) + conv.bias[:, None])

    a_h = gate(m.conv_h, encode(x.mean(dim=3)))       # (N, C, H): pooled along the width
    a_w = gate(m.conv_w, encode(x.mean(dim=2)))       # (N, C, W): pooled along the height
    torch.testing.assert_close(m(x), x * a_h[:, :, :, None] * a_w[:, :, None, :])


def test_make_attention():
    assert isinstance(make_attention("none", 16), nn.Identity)
    for kind, cls in [("se", SqueezeExcite), ("cbam", CBAM), ("eca", ECA), ("ca", CoordAtt)]:
        assert isinstance(make_attention(kind, 32), cls)
    with pytest.raises(UserError, match="se, cbam, eca, ca"):
        make_attention("bam", 16)
