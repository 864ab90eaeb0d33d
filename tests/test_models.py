"""Model registry: every net runs for 1 and 3 channels and several sizes, closed-form sizes and FLOPs,
zero-init of residual branches, normalisation inside the model, config round trip, user errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from models import (
    MODELS,
    ImageClassifier,
    build_model,
    mobilenet,
    model_config,
    model_from_config,
    model_summary,
    resnet_cifar,
    resnet_tv,
    wide_resnet,
)
from utils.errors import UserError

# Cheap nets also run at 64 px (the largest size that keeps the small-image stem); the rest at 32 px.
LIGHT = {"resnet8", "resnet20", "resnet32", "vgg_plain", "mlp_teacher", "mlp_student",
         "repvgg_a0", "repvgg_a1", "repvgg_b0", "repvgg_a0_plain"}


def build(name, in_chans=1, img_size=28, **kwargs):
    return build_model(name, 10, in_chans, img_size, (0.5,) * in_chans, (0.25,) * in_chans, **kwargs)


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_every_model(name):
    torch.manual_seed(0)
    big = 64 if name in LIGHT else 32
    for in_chans, img_size in [(1, 28), (3, 28), (1, big), (3, big)]:
        model = build(name, in_chans, img_size).eval()
        with torch.no_grad():
            y = model(torch.rand(1, in_chans, img_size, img_size))
        assert y.shape == (1, 10)
        assert torch.isfinite(y).all()


def test_resnet18_at_224_uses_standard_stem():
    model = build("resnet18", 3, 224).eval()
    assert model.net.conv1.kernel_size == (7, 7) and model.net.conv1.stride == (2, 2)
    assert isinstance(model.net.maxpool, torch.nn.MaxPool2d)
    with torch.no_grad():
        y = model(torch.rand(1, 3, 224, 224))
    assert y.shape == (1, 10) and torch.isfinite(y).all()
    small = build("resnet18", 1, 28)
    assert small.net.conv1.kernel_size == (3, 3) and small.net.conv1.stride == (1, 1)
    assert isinstance(small.net.maxpool, torch.nn.Identity)


@pytest.mark.parametrize("attention", ["none", "se", "cbam", "eca", "ca"])
def test_one_sgd_step_with_attention_and_drop_path(attention):
    torch.manual_seed(0)
    model = build("resnet8", attention=attention, drop_path_rate=0.2).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    attn_grads = [p.grad for n, p in model.named_parameters() if ".attn." in n]
    assert (len(attn_grads) > 0) == (attention != "none")
    assert all(g is not None and g.abs().sum() > 0 for g in attn_grads)
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed == len(before)


def _shortcut_path(block, x):
    """What a residual block returns when its branch outputs zero."""
    if isinstance(block, resnet_cifar.BasicBlock):
        return F.relu(block.shortcut(x))
    if isinstance(block, (resnet_tv.BasicBlock, resnet_tv.Bottleneck)):
        return F.relu(x if block.downsample is None else block.downsample(x))
    if isinstance(block, wide_resnet.WideBasic):
        return x if block.shortcut is None else block.shortcut(F.relu(block.norm1(x)))
    if isinstance(block, mobilenet.InvertedResidual):
        return x if block.use_residual else None
    raise AssertionError(f"unexpected block {type(block)}")


BLOCKS = (resnet_cifar.BasicBlock, resnet_tv.BasicBlock, resnet_tv.Bottleneck, wide_resnet.WideBasic,
          mobilenet.InvertedResidual)


def _block_outputs(model, x):
    records = []
    hooks = [m.register_forward_hook(lambda m, i, o: records.append((m, i[0].clone(), o.clone())))
             for m in model.modules() if isinstance(m, BLOCKS)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return records


@pytest.mark.parametrize("name, attention, acb, num_blocks", [
    ("resnet20", "none", False, 9), ("resnet20", "se", False, 9), ("resnet20", "none", True, 9),
    ("resnet18", "cbam", False, 8), ("resnet50", "none", False, 16), ("wrn16_4", "ca", False, 6),
    ("mobilenetv2", "eca", False, 17)])
def test_zero_init_last_makes_blocks_shortcuts(name, attention, acb, num_blocks):
    torch.manual_seed(0)
    model = build(name, attention=attention, acb=acb).train()    # train-mode BN keeps activations O(1)
    x = torch.rand(2, 1, 16, 16)
    # Before: every residual branch contributes something.
    for block, inp, out in _block_outputs(model, x):
        expected = _shortcut_path(block, inp)
        if expected is not None:
            assert not torch.allclose(out, expected, rtol=1e-3, atol=1e-3)
    blocks = [m for m in model.modules() if isinstance(m, BLOCKS)]
    assert len(blocks) == num_blocks                    # mobilenetv2: 17 blocks, 10 of them residual
    for m in blocks:
        m.zero_init_last()
    checked = 0
    for block, inp, out in _block_outputs(model, x):
        expected = _shortcut_path(block, inp)
        if expected is not None:
            torch.testing.assert_close(out, expected)
            checked += 1
    assert checked == (10 if name == "mobilenetv2" else num_blocks)


def cifar_resnet_params(n, in_chans, num_classes):
    """Closed form: stem conv + BN, 3 stages of n BasicBlocks (option-B projection), FC."""
    total = in_chans * 16 * 9 + 2 * 16
    for c_in, c in [(16, 16), (16, 32), (32, 64)]:
        first = c_in * c * 9 + c * c * 9 + 4 * c + (c_in * c + 2 * c if c_in != c else 0)
        total += first + (n - 1) * (2 * c * c * 9 + 4 * c)
    return total + 64 * num_classes + num_classes


def cifar_resnet_flops(n, in_chans, size, num_classes):
    """2 FLOPs per multiply-add of every conv and the FC layer (FlopCounterMode's convention)."""
    s1, s2 = size, math.ceil(size / 2)
    s3 = math.ceil(s2 / 2)
    macs = s1 * s1 * 16 * in_chans * 9                                      # stem
    macs += 2 * n * s1 * s1 * 16 * 16 * 9                                   # stage 1
    macs += s2 * s2 * 32 * (16 * 9 + 16) + (2 * n - 1) * s2 * s2 * 32 * 32 * 9   # stage 2 (+ projection)
    macs += s3 * s3 * 64 * (32 * 9 + 32) + (2 * n - 1) * s3 * s3 * 64 * 64 * 9   # stage 3 (+ projection)
    macs += 64 * num_classes
    return 2 * macs


def test_model_summary_resnet20():
    model = build("resnet20").train()
    params, flops = model_summary(model, 1, 28)
    assert params == cifar_resnet_params(3, 1, 10) == 272186
    assert flops == cifar_resnet_flops(3, 1, 28, 10)
    assert model.training                       # mode restored


@pytest.mark.parametrize("name, n", [("resnet8", 1), ("resnet56", 9)])
def test_cifar_resnet_param_counts(name, n):
    for in_chans in (1, 3):
        model = build(name, in_chans)
        assert sum(p.numel() for p in model.parameters()) == cifar_resnet_params(n, in_chans, 10)


def _airnet_by_hand(net, x, ceil=False):
    """AirNet's eval forward written with torch.nn.functional ops from its parameters."""
    def bn(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
    x = F.gelu(F.conv2d(x, net.stem.weight, net.stem.bias, padding=1))
    for g in net.groups:
        x = F.gelu(bn(F.max_pool2d(F.conv2d(x, g.conv1.weight, padding=1), 2, ceil_mode=ceil), g.bn1))
        y = F.gelu(bn(F.conv2d(x, g.conv2.weight, padding=1), g.bn2))
        if hasattr(g, "conv3"):     # airnet_m3: a residual over conv2 and conv3
            y = x + F.gelu(bn(F.conv2d(y, g.conv3.weight, padding=1), g.bn3))
        x = y
    return F.linear(x.amax(dim=(2, 3)), net.fc.weight, net.fc.bias)


@pytest.mark.parametrize("name, widths, depth, ceil", [
    ("airnet_s", (32, 128, 128), 2, False), ("airnet_m", (64, 128, 256), 2, False),
    ("airnet", (64, 256, 256), 2, False), ("airnet_m3", (64, 128, 256), 3, False),
    ("airnet_mc", (64, 128, 256), 2, True)])
def test_airnet_forward_params_and_flops_match_closed_form(name, widths, depth, ceil):
    torch.manual_seed(0)
    model = build(name).eval()
    net = model.net
    for m in net.modules():             # non-trivial BN statistics and affines
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net(x), _airnet_by_hand(net, x, ceil))
        if ceil:    # the 7x7 map's last row and column reach the output (floor pooling drops them)
            assert net.groups[2].pool(torch.zeros(1, 1, 7, 7)).shape[-1] == 4
            assert not torch.allclose(net(x), _airnet_by_hand(net, x, ceil=False))

    w1, w2, w3 = widths
    extra = depth - 2       # airnet_m3's third conv + BN per group, at the pooled size
    params = (9 * 24 + 24) + (24 * w1 * 9 + w1 * w1 * 9 + 4 * w1) + (w1 * w2 * 9 + w2 * w2 * 9 + 4 * w2) \
        + (w2 * w3 * 9 + w3 * w3 * 9 + 4 * w3) + (w3 * 10 + 10) \
        + extra * sum(w * w * 9 + 2 * w for w in widths)
    assert sum(p.numel() for p in model.parameters()) == params
    # convs at 28 px (stem, group 1's first), then 14, 7, 3 after each 2x2 max-pool (4 in ceil mode)
    s3 = 4 if ceil else 3
    macs = 28 * 28 * (9 * 24 + 24 * w1 * 9) + 14 * 14 * (w1 * w1 * 9 + w1 * w2 * 9) \
        + 7 * 7 * (w2 * w2 * 9 + w2 * w3 * 9) + s3 * s3 * w3 * w3 * 9 + w3 * 10 \
        + extra * 9 * (14 * 14 * w1 * w1 + 7 * 7 * w2 * w2 + s3 * s3 * w3 * w3)
    assert model_summary(model, 1, 28) == (params, 2 * macs)
    if depth == 3:          # the residual branches start at zero (bn3's scale), then learn
        assert all(float(g.bn3.weight.abs().sum()) == 0 for g in build(name).net.groups)


def test_airnet_needs_8_px():
    with pytest.raises(UserError, match="at least 8 px"):
        build("airnet_s", img_size=7)


def test_image_classifier_normalisation():
    torch.manual_seed(0)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    model = build_model("resnet8", 10, 3, 32, mean, std).eval()
    assert isinstance(model, ImageClassifier)
    assert model.mean.shape == model.std.shape == (1, 3, 1, 1)
    assert {k for k in model.state_dict() if not k.startswith("net.")} == {"mean", "std"}
    x = torch.rand(2, 3, 32, 32)
    manual = torch.empty_like(x)
    for c in range(3):
        manual[:, c] = (x[:, c] - mean[c]) / std[c]
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(manual))


def test_config_round_trip():
    torch.manual_seed(0)
    cfg = model_config("resnet8", 10, 1, 28, (0.3,), (0.3,), attention="eca", drop_path_rate=0.1)
    assert set(cfg) == {"name", "num_classes", "in_chans", "img_size", "mean", "std", "attention",
                        "drop_path_rate", "acb", "reparameterized"}
    assert cfg["reparameterized"] is False
    model = build_model(**{k: v for k, v in cfg.items() if k != "reparameterized"}).eval()
    copy = model_from_config(cfg).eval()
    copy.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), model(x))


def test_reparameterized_config_builds():
    cfg = dict(model_config("resnet8", 10, 1, 28, (0.3,), (0.3,)), reparameterized=True)
    model = model_from_config(cfg)
    assert isinstance(model, ImageClassifier)


def test_acb_flag():
    pytest.importorskip("models.acb")
    plain = build("resnet8")
    acb = build("resnet8", acb=True)
    assert sum(p.numel() for p in acb.parameters()) > sum(p.numel() for p in plain.parameters())
    with torch.no_grad():
        assert acb.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_user_errors():
    with pytest.raises(UserError, match="resnet20.*mlp_student"):
        build("resnet21")
    for name in ("vgg_plain", "mlp_teacher", "mlp_student", "repvgg_a0", "airnet_m"):
        with pytest.raises(UserError, match=name):
            build(name, attention="se")
        with pytest.raises(UserError, match=name):
            build(name, drop_path_rate=0.1)
    with pytest.raises(UserError, match="attention"):
        build("resnet20", attention="bam")
    with pytest.raises(UserError, match="drop_path_rate"):
        build("resnet20", drop_path_rate=1.0)
    with pytest.raises(UserError, match="mean and std"):
        build_model("resnet20", 10, 3, 28, (0.5,), (0.5,))
    with pytest.raises(UserError, match="lacks name"):
        model_from_config({"num_classes": 10})
