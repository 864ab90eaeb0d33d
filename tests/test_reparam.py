"""Structural re-parameterisation: transforms against direct convolution, ACBlock / RepVGGBlock / whole models
before vs after `reparameterize()` in eval mode with random BN statistics (float64 where exactness matters)."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.acb import ACBlock, convert_to_acb
from models.reparam import (
    count_reparameterizable,
    fuse_conv_bn,
    identity_kernel,
    pad_kernel,
    reparameterize_model,
    sum_branches,
)
from models.repvgg import REPVGG_MODELS, RepVGGBlock, stage_strides
from utils.errors import UserError

F64 = torch.float64


def randomize_bn(model, seed=0):
    """Random running statistics and affine parameters in every BatchNorm, so fusion is not a no-op."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c, dt = m.num_features, m.running_mean.dtype
                m.running_mean.copy_(torch.randn(c, generator=gen, dtype=dt))
                m.running_var.copy_(torch.rand(c, generator=gen, dtype=dt) * 2 + 0.1)
                m.weight.copy_(torch.randn(c, generator=gen, dtype=dt))
                m.bias.copy_(torch.randn(c, generator=gen, dtype=dt))
    return model


def module_names(model):
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


# ---- pure transforms -------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv_bias", [False, True])
def test_fuse_conv_bn_equals_conv_then_bn(conv_bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=conv_bias).to(F64)
    bn = randomize_bn(nn.BatchNorm2d(5).to(F64)).eval()
    x = torch.randn(2, 3, 7, 7, dtype=F64)
    w, b = fuse_conv_bn(conv.weight, conv.bias, bn)
    torch.testing.assert_close(F.conv2d(x, w, b, padding=1), bn(conv(x)))


def test_fuse_conv_bn_computes_in_float64():
    # float32 inputs: the fused float32 weights equal the float64 fusion rounded once.
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, bias=False), randomize_bn(nn.BatchNorm2d(4))
    w, b = fuse_conv_bn(conv.weight, None, bn)
    w64, b64 = fuse_conv_bn(conv.weight.double(), None, bn.double())
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, w64.float(), rtol=0, atol=0)
    torch.testing.assert_close(b, b64.float(), rtol=0, atol=0)


def test_fuse_conv_bn_rejects_bn_without_running_stats():
    with pytest.raises(ValueError, match="running statistics"):
        fuse_conv_bn(torch.zeros(2, 2, 3, 3), None, nn.BatchNorm2d(2, track_running_stats=False))


@pytest.mark.parametrize("shape,pad", [((1, 1), (0, 0)), ((1, 3), (0, 1)), ((3, 1), (1, 0)), ((3, 3), (1, 1))])
def test_pad_kernel_centres_and_keeps_the_output(shape, pad):
    torch.manual_seed(0)
    w = torch.randn(4, 2, *shape, dtype=F64)
    big = pad_kernel(w, 5)
    assert big.shape == (4, 2, 5, 5)
    top, left = (5 - shape[0]) // 2, (5 - shape[1]) // 2
    torch.testing.assert_close(big[:, :, top:top + shape[0], left:left + shape[1]], w)
    rest = big.clone()
    rest[:, :, top:top + shape[0], left:left + shape[1]] = 0
    assert not rest.any()
    x = torch.randn(1, 2, 9, 9, dtype=F64)
    torch.testing.assert_close(F.conv2d(x, big, padding=2), F.conv2d(x, w, padding=pad))


def test_pad_kernel_rejects_off_centre_sizes():
    with pytest.raises(ValueError):
        pad_kernel(torch.zeros(1, 1, 2, 2), 3)
    with pytest.raises(ValueError):
        pad_kernel(torch.zeros(1, 1, 5, 5), 3)


@pytest.mark.parametrize("k,groups", [(1, 1), (3, 1), (3, 2), (5, 4)])
def test_identity_kernel_returns_the_input(k, groups):
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    w = identity_kernel(4, k, groups, dtype=F64)
    assert w.shape == (4, 4 // groups, k, k)
    torch.testing.assert_close(F.conv2d(x, w, padding=k // 2, groups=groups), x, rtol=0, atol=0)


def test_sum_branches_is_the_sum_of_the_convolutions():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    (w3, b3), (w1, b1) = [(torch.randn(4, 3, k, k, dtype=F64), torch.randn(4, dtype=F64)) for k in (3, 1)]
    w, b = sum_branches([(w3, b3), (w1, b1)])
    want = F.conv2d(x, w3, b3, padding=1) + F.conv2d(x, w1, b1)
    torch.testing.assert_close(F.conv2d(x, w, b, padding=1), want)


# ---- blocks ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("extra_padding", [0, 1])
def test_acblock_reparameterize_is_exact(k, stride, groups, extra_padding):
    torch.manual_seed(0)
    padding = k // 2 + extra_padding
    block = randomize_bn(ACBlock(4, 6, k, stride, padding, groups).to(F64)).eval()
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    before = block(x)
    # Output grid of the conv+BN pair it replaces: the three branches must align on it.
    assert before.shape == nn.Conv2d(4, 6, k, stride, padding)(x.float()).shape
    block.reparameterize()
    assert module_names(block) == {"conv"}
    assert block.conv.kernel_size == (k, k) and block.conv.bias is not None
    torch.testing.assert_close(block(x), before)


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("identity", [True, False])
def test_repvggblock_reparameterize_is_exact(k, stride, groups, identity):
    torch.manual_seed(0)
    block = randomize_bn(RepVGGBlock(4, 4, stride, groups, k, identity=identity).to(F64)).eval()
    assert (block.bn_identity is not None) == (identity and stride == 1)
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    before = block(x)
    block.reparameterize()
    assert module_names(block) == {"conv", "act"}
    torch.testing.assert_close(block(x), before)


def test_repvggblock_identity_branch_matters():
    # Guards the test above: dropping the identity branch's contribution must change the output.
    torch.manual_seed(0)
    block = randomize_bn(RepVGGBlock(4, 4).to(F64)).eval()
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    without = F.relu(block.bn_kxk(block.conv_kxk(x)) + block.bn_1x1(block.conv_1x1(x)))
    assert not torch.allclose(block(x), without)


def test_reparameterize_model_counts_and_is_idempotent(caplog):
    net = nn.Sequential(RepVGGBlock(2, 4), ACBlock(4, 4, 3), nn.Conv2d(4, 4, 1))
    assert count_reparameterizable(net) == 2
    assert reparameterize_model(net) is net
    assert count_reparameterizable(net) == 0
    with caplog.at_level(logging.INFO, logger="models.reparam"):
        assert reparameterize_model(net) is net
    assert "nothing to re-parameterise" in caplog.text


def test_reparameterize_model_on_a_plain_model_is_a_no_op():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 2))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert count_reparameterizable(net) == 0
    reparameterize_model(net)
    assert net.state_dict().keys() == state.keys()


# ---- convert_to_acb --------------------------------------------------------------------------------------

def test_convert_to_acb_finds_sequential_and_sibling_pairs():
    class Sibling(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=0, bias=False), nn.BatchNorm2d(4)  # pad < k//2
            self.conv3, self.bn3 = nn.Conv2d(4, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4)  # has a bias
            self.conv4, self.bn4 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, affine=False)
            self.downsample = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))  # 1x1

    net = nn.Sequential(nn.Conv2d(3, 3, 5, padding="same", bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                        Sibling(), RepVGGBlock(4, 4))
    assert convert_to_acb(net) == 2
    assert isinstance(net[0], ACBlock) and net[0].conv_kxk.kernel_size == (5, 5) and isinstance(net[1], nn.Identity)
    assert isinstance(net[3].conv1, ACBlock) and isinstance(net[3].bn1, nn.Identity)
    for name in ("conv2", "conv3", "conv4"):
        assert type(getattr(net[3], name)) is nn.Conv2d
    assert type(net[3].downsample[0]) is nn.Conv2d
    assert type(net[4].conv_kxk) is nn.Conv2d  # inside a block that already re-parameterises


def test_acblock_zero_init_gamma_leaves_only_the_bn_biases():
    block = randomize_bn(ACBlock(2, 3, 3).to(F64)).eval()
    block.zero_init_gamma()
    out = block(torch.randn(2, 2, 5, 5, dtype=F64))
    beta = block.bn_kxk.bias + block.bn_1xk.bias + block.bn_kx1.bias
    torch.testing.assert_close(out, beta.view(1, 3, 1, 1).expand_as(out))


def test_convert_to_acb_without_pairs_is_a_user_error():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(UserError, match="--acb found no kxk conv\\+BN pairs in mlp_student"):
        convert_to_acb(mlp, name="mlp_student")


def train_steps(model, x, y, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def outputs_before_after_reparam(net, img_size):
    """Train `net` two steps on random 1-channel images, then its eval outputs before and after fusing."""
    x, y = torch.rand(4, 1, img_size, img_size), torch.randint(0, 10, (4,))
    train_steps(net, x, y, steps=2)
    with torch.no_grad():
        before = net(x)
        reparameterize_model(net)
        return before, net(x)


def test_acb_resnet20_trained_then_reparameterized_matches():
    resnet_cifar = pytest.importorskip("models.resnet_cifar", reason="models helper's resnet_cifar.py not present")
    torch.manual_seed(0)
    net = resnet_cifar.resnet20(10, 1, 8)
    assert convert_to_acb(net) == 19  # stem + 2 per block x 9 blocks; the two 1x1 projections are skipped
    before, after = outputs_before_after_reparam(net, 8)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 2  # only the 1x1 projections' BNs
    names = module_names(net)
    assert not names & {"conv_kxk", "conv_1xk", "conv_kx1", "bn_kxk", "bn_1xk", "bn_kx1"}
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, pairs", [("airnet_m3", 9), ("airnet_mc", 6)])
def test_acb_airnet_trained_then_reparameterized_matches(name, pairs):
    from models import MODELS
    torch.manual_seed(0)
    net = MODELS[name](10, 1, 28)
    assert convert_to_acb(net) == pairs  # 2 or 3 conv+BN pairs per group (airnet_m3's conv3/bn3); stem has no BN
    before, after = outputs_before_after_reparam(net, 28)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


# ---- RepVGG models ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("img_size", [28, 32, 64, 224])
def test_repvgg_strides_keep_at_least_4px(img_size):
    strides = stage_strides(img_size)
    assert strides[0] == (1 if img_size < 64 else 2)
    size = img_size
    for s in strides:
        size = (size - 1) // s + 1
    assert size >= 4
    if img_size == 224:
        assert strides == [2, 2, 2, 2, 2]  # the paper's layout


def test_repvgg_a0_trained_then_reparameterized_matches():
    torch.manual_seed(0)
    net = REPVGG_MODELS["repvgg_a0"](10, 1, 16)
    x, y = torch.rand(4, 1, 16, 16), torch.randint(0, 10, (4,))
    train_steps(net, x, y, steps=2)
    train_params = sum(p.numel() for p in net.parameters())
    with torch.no_grad():
        before = net(x)
        assert count_reparameterizable(net) == 22  # 1 + 2 + 4 + 14 + 1 blocks
        reparameterize_model(net)
        after = net(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert sum(p.numel() for p in net.parameters()) < train_params
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_repvgg_plain_twin_has_the_deploy_shape():
    torch.manual_seed(0)
    rep = reparameterize_model(REPVGG_MODELS["repvgg_a0"](10, 1, 28))
    plain = REPVGG_MODELS["repvgg_a0_plain"](10, 1, 28)
    assert count_reparameterizable(plain) == 0
    rep_convs = [m.weight.shape for m in rep.modules() if isinstance(m, nn.Conv2d)]
    plain_convs = [m.weight.shape for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert rep_convs == plain_convs
    assert convert_to_acb(plain) == 22  # ACNet applies to the plain twin's conv-BN pairs


def test_repvgg_rejects_attention_and_drop_path():
    with pytest.raises(UserError, match="no residual blocks"):
        REPVGG_MODELS["repvgg_a0"](10, 1, 28, drop_path_rate=0.1)
