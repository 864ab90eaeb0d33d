"""Weight initialisation: orthogonality, Xavier/Kaiming/normal/uniform std formulas, the seed's scheme with its quirk,
biases and norms, LSUV (Dropout/DropPath off while measuring), zero-γ residuals."""
import math

import pytest
import torch
from torch import nn

import config
from models.drop_path import DropPath
from tricks.init import INITS, init_weights, lsuv_init, zero_init_residual
from utils.errors import UserError

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


@pytest.mark.parametrize("init", [i for i in INITS if i not in ("default", "dirac", "seed")])  # own tests
def test_biases_zero_and_norms_identity(init):
    net = _mixed_net()
    assert init_weights(net, init, std=0.05) == 2
    for m in net:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert torch.all(m.bias == 0)
            assert not torch.all(m.weight == 3.0)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def _sample_std_tolerance(std, n):
    """5 standard errors of the sample std of n iid normal draws (sigma / sqrt(2n)): fails by chance ~1e-6."""
    return 5 * std / math.sqrt(2 * n)


@pytest.mark.parametrize("init", ["normal", "uniform"])
@pytest.mark.parametrize("S", [0.01, 0.2])
def test_normal_and_uniform_use_init_std(init, S):
    torch.manual_seed(0)
    conv, fc = nn.Conv2d(32, 64, 5), nn.Linear(800, 300)
    for layer in (conv, fc):
        init_weights(layer, init, std=S)
        w = layer.weight.detach().double()
        n = w.numel()
        # N(0, S) has std S; U(-S, S) has std S / sqrt(3) and never leaves [-S, S]
        want = S if init == "normal" else S / math.sqrt(3)
        assert abs(w.std().item() - want) < _sample_std_tolerance(want, n)
        assert abs(w.mean().item()) < 5 * want / math.sqrt(n)
        if init == "uniform":
            assert w.abs().max().item() <= S
        assert torch.all(layer.bias == 0)


def test_normal_and_uniform_need_a_positive_std():
    with pytest.raises(ValueError, match="std"):
        init_weights(nn.Linear(3, 3), "normal")
    with pytest.raises(UserError, match="init_std"):
        init_weights(nn.Linear(3, 3), "uniform", std=0.0)
    with pytest.raises(UserError, match="init_std"):
        config.parse_args(["--init", "normal", "--init_std", "0"])
    assert config.parse_args([]).init_std > 0


class _SeedNet(nn.Module):
    """What the seed's weights_init meets: a conv with a bias, a large Linear, a BatchNorm whose γ/β the model set
    itself (as airnet's zero γ), a fresh BatchNorm, and a conv without bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 5)                      # fan_in 400, fan_out 800
        self.bn = nn.BatchNorm2d(32)
        self.fresh_bn = nn.BatchNorm2d(8)
        self.conv_nobias = nn.Conv2d(32, 8, 3, bias=False)    # fan_in 288, fan_out 72
        self.fc = nn.Linear(1000, 500)
        with torch.no_grad():
            self.bn.weight.fill_(0.5)
            self.bn.bias.fill_(-0.25)
            self.fc.bias.fill_(3.0)


def test_seed_init_is_the_seeds_weights_init_as_it_ran():
    torch.manual_seed(0)
    net = _SeedNet()
    assert init_weights(net, "seed", nonlinearity="relu") == 3  # the seed's xavier_normal_ has gain 1 regardless
    # convs: Xavier-normal, std = sqrt(2 / (fan_in + fan_out)), and the bias exactly 0.3
    for conv, fan_in, fan_out in ((net.conv, 16 * 25, 32 * 25), (net.conv_nobias, 32 * 9, 8 * 9)):
        w = conv.weight.detach().double()
        want = math.sqrt(2.0 / (fan_in + fan_out))
        assert abs(w.std().item() - want) < _sample_std_tolerance(want, w.numel())
    assert torch.all(net.conv.bias == 0.3)
    assert net.conv_nobias.bias is None
    # Linear: normal_(w, 0, 0.1), bias 0
    w = net.fc.weight.detach().double()
    assert abs(w.std().item() - 0.1) < _sample_std_tolerance(0.1, w.numel())
    assert abs(w.mean().item()) < 5 * 0.1 / math.sqrt(w.numel())
    assert torch.all(net.fc.bias == 0)
    # the quirk: the seed's BatchNorm branch never ran, so norm layers keep what the model set (here 0.5 / -0.25),
    # and a fresh BatchNorm keeps torch's 1 / 0, which is the scheme's intended value
    assert torch.all(net.bn.weight == 0.5) and torch.all(net.bn.bias == -0.25)
    assert torch.all(net.fresh_bn.weight == 1) and torch.all(net.fresh_bn.bias == 0)
    # every other scheme resets norm layers, so the quirk is specific to "seed"
    init_weights(net, "xavier_normal")
    assert torch.all(net.bn.weight == 1)


def test_seed_init_matches_a_hand_written_copy_of_the_seeds_function():
    def seed_weights_init(m):  # the seed's code, with the branch that could not run left out
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight.data)
            nn.init.constant_(m.bias.data, 0.3)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight.data, 0, 0.1)
            m.bias.data.zero_()

    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                             nn.Linear(8 * 4 * 4, 20), nn.ReLU(), nn.Linear(20, 10))

    torch.manual_seed(3)
    ours = net()
    theirs = net()
    theirs.load_state_dict(ours.state_dict())
    torch.manual_seed(4)
    init_weights(ours, "seed")
    torch.manual_seed(4)
    theirs.apply(seed_weights_init)  # apply() visits children first, model.modules() parents first: same order here
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


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


class _NoisyNet(nn.Module):
    """A residual block with DropPath on its branch and Dropout(0.5) before the head, BatchNorm throughout."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1))
        self.drop_path = DropPath(0.5)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.drop_path(self.branch(x)))
        return self.head(self.dropout(nn.functional.max_pool2d(x, 2).flatten(1)))


def _deterministic_output_vars(model, batch):
    """The test's own deterministic forward: every module in train mode, then Dropout and DropPath in eval."""
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.Dropout, DropPath)):
            m.eval()
    return _output_vars_as_set(model, batch)


def _output_vars_as_set(model, batch):
    """Variance of every conv/linear output over one forward pass in the model's current modes, in forward order."""
    out = {}

    def record(name, o):
        out.setdefault(name, o.var().item())

    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: record(n, o))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(batch)
    for h in hooks:
        h.remove()
    return out


def test_lsuv_measures_with_dropout_and_drop_path_off_and_restores_every_mode():
    torch.manual_seed(0)
    model = _NoisyNet()
    batch = torch.rand(64, 1, 12, 12)
    model.eval()
    model.dropout.train()  # a mixed state: each module's own mode must come back, not one model-wide mode
    modes = {n: m.training for n, m in model.named_modules()}
    stats = {k: v.clone() for k, v in model.named_buffers()}
    final = lsuv_init(model, batch, tol=0.1, max_iter=10)
    assert {n: m.training for n, m in model.named_modules()} == modes
    for k, v in model.named_buffers():
        torch.testing.assert_close(v, stats[k], rtol=0, atol=0)
    torch.manual_seed(1)  # the deterministic forward does not depend on the RNG
    measured = _deterministic_output_vars(model, batch)
    assert list(final) == ["stem", "branch.0", "branch.3", "head"] == list(measured)
    for n, v in measured.items():
        assert abs(v - 1) < 0.1, (n, v)
        assert final[n] == pytest.approx(v, rel=1e-5)
    # with the noise on, the head's output variance is far from 1: measuring it that way would set another scale
    model.train()
    noisy = _output_vars_as_set(model, batch)
    assert abs(noisy["head"] - 1) > 0.3, noisy


def test_lsuv_skips_zero_variance_without_dividing_by_zero(caplog):
    torch.manual_seed(0)
    model = _Classifier(bn=False)
    model.mean.zero_()  # a black batch then gives exactly zero activations everywhere
    with caplog.at_level("INFO", logger="tricks.init"):
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


def test_dirac_init_makes_the_first_filters_an_identity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.Conv2d(6, 3, 5, padding=2, bias=False))
    rest = model[0].weight[4:].detach().clone()
    assert init_weights(model, "dirac") == 2
    x = torch.randn(2, 4, 7, 7)
    y = model[0](x)
    torch.testing.assert_close(y[:, :4], x)  # in <= out: filters 0..3 pass their input channel through
    torch.testing.assert_close(model[0].weight[4:], rest)  # the others keep their init
    z = torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(model[1](z), z[:, :3])  # in > out: output i = input channel i


def test_dirac_without_convs_is_an_error():
    with pytest.raises(UserError, match="dirac"):
        init_weights(nn.Linear(3, 2), "dirac")


def _whiten_net(out_channels):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, out_channels, 3, padding=1), nn.ReLU(), nn.Conv2d(out_channels, 4, 3))


def _correlated_images(n=400):
    # Smooth images (box-blurred noise) so neighbouring pixels correlate and the patch covariance is far from I.
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 14, 14, generator=g)
    return torch.nn.functional.avg_pool2d(x, 3, 1, 1) * 0.7 + 0.1


def test_whiten_stem_filters_whiten_the_patches():
    from tricks.init import whiten_stem
    model, x, eps = _whiten_net(24), _correlated_images(), 5e-4
    rest = model[0].weight[18:].detach().clone()
    name, eigvals = whiten_stem(model, x, eps)
    assert name == "0" and eigvals.shape == (9,) and not model[0].weight.requires_grad
    assert model[0].bias.requires_grad and model[2].weight.requires_grad
    # Independent computation in numpy: covariance of all 3x3 patches (no padding).
    import numpy as np
    xs = x.numpy().astype(np.float64)[:, 0]
    patches = np.stack([xs[:, i:i + 12, j:j + 12] for i in range(3) for j in range(3)], -1).reshape(-1, 9)
    cov = np.cov(patches, rowvar=False)
    lam = np.sort(np.linalg.eigvalsh(cov))[::-1]
    np.testing.assert_allclose(eigvals.numpy(), lam, rtol=1e-6, atol=1e-10)
    w = model[0].weight.detach().double().flatten(1).numpy()  # (24, 9), flattened like the patches
    white = w[:9] @ cov @ w[:9].T
    np.testing.assert_allclose(white, np.diag(lam / (lam + eps)), atol=1e-6)  # ~ identity, decorrelated
    np.testing.assert_allclose(w[9:18], -w[:9])  # the negated copies
    torch.testing.assert_close(model[0].weight[18:], rest)  # filters beyond 2 * 9 keep their init
    # The bias centres the outputs: mean over all patches of w . p + b is 0.
    b = model[0].bias.detach().double().numpy()
    np.testing.assert_allclose((patches @ w.T + b)[:, :18].mean(0), 0, atol=1e-6)


def test_whiten_stem_with_fewer_filters_keeps_the_top_eigenvectors():
    from tricks.init import whiten_stem
    model, x = _whiten_net(6), _correlated_images()
    _, eigvals = whiten_stem(model, x, 0.0)
    w = model[0].weight.detach().double().flatten(1)
    # Three pairs: filter norms are 1 / sqrt(l_i) for the three largest eigenvalues.
    torch.testing.assert_close(w[:3].norm(dim=1), 1 / eigvals[:3].sqrt(), rtol=1e-6, atol=0)
    with pytest.raises(UserError, match="at least 2"):
        whiten_stem(_whiten_net(1), x)


def test_whiten_stem_without_a_conv_is_an_error():
    from tricks.init import whiten_stem
    with pytest.raises(UserError, match="no Conv2d"):
        whiten_stem(nn.Sequential(nn.Flatten(), nn.Linear(196, 2)), torch.rand(4, 1, 14, 14))
