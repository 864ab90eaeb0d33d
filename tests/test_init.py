"""Weight initialisation: orthogonality, Xavier/Kaiming std formulas, biases and norms, LSUV, zero-γ residuals."""
import math

import pytest
import torch
from torch import nn

import config
from utils.errors import UserError
from utils.init import INITS, init_weights, lsuv_init, zero_init_residual

# Gains written out (not taken from nn.init.calculate_gain).
GAINS = {"linear": 1.0, "relu": math.sqrt(2.0), "tanh": 5.0 / 3.0, "leaky_relu": math.sqrt(2.0 / (1 + 0.01 ** 2))}


def test_names_match_config():
    assert INITS == config.INITS


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (32, 2, 3, 3), (20, 50), (50, 20)])
@pytest.mark.parametrize("nonlinearity", ["linear", "tanh"])
def test_orthogonal_rows_or_columns_are_orthonormal(shape, nonlinearity):
    torch.manual_seed(0)
    layer = nn.Conv2d(shape[1], shape[0], shape[2]) if len(shape) == 4 else nn.Linear(shape[1], shape[0])
    init_weights(layer, "orthogonal", nonlinearity=nonlinearity)
    w = layer.weight.detach().double().flatten(1)
    g2 = GAINS[nonlinearity] ** 2
    # rows <= cols: the rows are orthonormal (W W^T = g^2 I); otherwise the columns are (W^T W = g^2 I).
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    torch.testing.assert_close(gram, g2 * torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize("nonlinearity", ["relu", "tanh", "leaky_relu"])
def test_std_matches_formula(init, mode, nonlinearity):
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 5)  # 204800 weights; fan_in = 64*25 = 1600, fan_out = 128*25 = 3200
    init_weights(conv, init, mode=mode, nonlinearity=nonlinearity)
    w = conv.weight.detach().double()
    fan_in, fan_out, gain = 64 * 25, 128 * 25, GAINS[nonlinearity]
    if init.startswith("xavier"):
        std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    else:
        std = gain / math.sqrt(fan_in if mode == "fan_in" else fan_out)
    # The sample std of n = 204800 draws has relative standard error about 1/sqrt(2n) = 0.16%.
    assert w.std().item() == pytest.approx(std, rel=0.01)
    assert abs(w.mean().item()) < 5 * std / math.sqrt(w.numel())
    if init.endswith("uniform"):
        assert w.abs().max().item() <= math.sqrt(3.0) * std * (1 + 1e-6)  # uniform on [-sqrt(3) std, sqrt(3) std]


def _mixed_net():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 5))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(3.0)
    return net


@pytest.mark.parametrize("init", [i for i in INITS if i != "default"])
def test_biases_zero_and_norms_identity(init):
    net = _mixed_net()
    assert init_weights(net, init) == 2
    for m in net:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert torch.all(m.bias == 0)
            assert not torch.all(m.weight == 3.0)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_default_keeps_the_model_as_built():
    net = _mixed_net()
    assert init_weights(net, "default") == 0
    assert all(torch.all(p == 3.0) for p in net.parameters())


def test_bad_init_flags():
    with pytest.raises(UserError, match="default, xavier_uniform.*lsuv"):
        init_weights(_mixed_net(), "he")
    with pytest.raises(UserError, match="init_nonlinearity.*relu"):
        init_weights(_mixed_net(), "kaiming_normal", nonlinearity="swish")
    with pytest.raises(UserError, match="fan_in or fan_out"):
        init_weights(_mixed_net(), "kaiming_normal", mode="fan_avg")


class _Classifier(nn.Module):
    """Like models' ImageClassifier: normalisation buffers, then `net`. The head is defined before the body
    so that definition order differs from forward order."""

    def __init__(self, bn):
        super().__init__()
        self.register_buffer("mean", torch.full((1, 1, 1, 1), 0.3))
        self.register_buffer("std", torch.full((1, 1, 1, 1), 0.35))
        self.head = nn.Linear(16, 10)
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), norm(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), norm(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.head(self.body((x - self.mean) / self.std))


def _output_vars(model, batch):
    """Variance of every conv/linear output over one train-mode forward pass, in forward order."""
    out = {}

    def record(name, o):
        out.setdefault(name, o.var().item())

    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: record(n, o))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.train()
    with torch.no_grad():
        model(batch)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("bn", [False, True])
def test_lsuv_brings_every_output_variance_to_one(bn):
    torch.manual_seed(0)
    model = _Classifier(bn)
    batch = torch.rand(32, 1, 12, 12)
    init_weights(model, "orthogonal")
    assert any(abs(v - 1) > 0.1 for v in _output_vars(model, batch).values())  # not already there
    stats = {k: v.clone() for k, v in model.named_buffers()}
    model.eval()
    final = lsuv_init(model, batch, tol=0.1, max_iter=10)
    assert not model.training  # mode restored
    for k, v in model.named_buffers():
        torch.testing.assert_close(v, stats[k], rtol=0, atol=0)  # BN running stats untouched
    measured = _output_vars(model, batch)
    names = ["body.0", "body.3", "body.6", "head"]
    assert list(final) == names == list(measured)  # forward order, not definition order
    for n in names:
        assert abs(measured[n] - 1) < 0.1, (n, measured[n])
        assert final[n] == pytest.approx(measured[n], rel=1e-4)


def test_lsuv_skips_zero_variance_without_dividing_by_zero(caplog):
    torch.manual_seed(0)
    model = _Classifier(bn=False)
    model.mean.zero_()  # a black batch then gives exactly zero activations everywhere
    with caplog.at_level("INFO", logger="utils.init"):
        final = lsuv_init(model, torch.zeros(4, 1, 12, 12), tol=0.1, max_iter=5)
    assert final == {n: 0.0 for n in ("body.0", "body.3", "body.6", "head")}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 4


class _TinyBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def branch(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))

    def forward(self, x):
        return torch.relu(x + self.branch(x))

    def zero_init_last(self):
        nn.init.zeros_(self.bn2.weight)


def test_zero_init_residual_makes_every_branch_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _TinyBlock(4), _TinyBlock(4))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    x = torch.randn(2, 4, 6, 6)
    assert model[1].branch(x).abs().max() > 0
    assert zero_init_residual(model) == 2
    for mode in (True, False):
        model.train(mode)
        for block in model[1:]:
            assert torch.equal(block.branch(x), torch.zeros_like(x))
            torch.testing.assert_close(block(x), torch.relu(x))


def test_zero_init_residual_without_blocks_is_an_error():
    with pytest.raises(UserError, match="no residual blocks"):
        zero_init_residual(nn.Sequential(nn.Conv2d(1, 4, 3)))
