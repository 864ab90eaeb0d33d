"""AWP: per-layer perturbation norm gamma*||w||, the whole step against a hand computation (gradient at w + v
applied to w, weight decay on w), bit-exact restore under autocast + channels_last, the autocast cache, misuse."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config import parse_args
from tricks.awp import AWP, build_awp
from utils.errors import UserError


def small_cnn(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 6 * 6, 3))
    with torch.no_grad():  # non-trivial BN affine parameters
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model.to(dtype)


def batch(dtype=torch.float64, n=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 6, 6, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


def test_perturbation_norm_per_layer():
    model = small_cnn()
    x, y = batch()
    before = copy.deepcopy(model.state_dict())
    gamma = 0.05
    awp = AWP(model, gamma)
    assert awp.names == ["0.weight", "4.weight"]
    awp.perturb(x, y, F.cross_entropy)
    for name, p in model.named_parameters():
        w = before[name]
        if p.ndim > 1:
            torch.testing.assert_close((p - w).norm(), gamma * w.norm(), rtol=1e-12, atol=0)
        else:
            assert torch.equal(p, w)  # biases and BN affine parameters are not perturbed
        assert p.grad is None  # the ascent ran on the proxy
    # the proxy's forward did not update the model's BN running statistics
    assert torch.equal(model[1].running_mean, before["1.running_mean"])
    assert model[1].num_batches_tracked == before["1.num_batches_tracked"]
    awp.restore()
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name])


def test_step_equals_hand_computation():
    # Paper: w <- w - lr * (grad L(w + v) + wd * w), with v_l = gamma * ||w_l|| * g_l / ||g_l||, g = grad L(w).
    model = small_cnn()
    x, y = batch()
    gamma, lr, wd = 0.05, 0.1, 0.01
    ref, perturbed = copy.deepcopy(model), copy.deepcopy(model)

    names = [n for n, p in ref.named_parameters() if p.ndim > 1]
    weights = dict(ref.named_parameters())
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), [weights[n] for n in names])
    pw = dict(perturbed.named_parameters())
    with torch.no_grad():
        for n, gn in zip(names, g):
            pw[n].add_(gamma * weights[n].norm() * gn / gn.norm())
    grads_at_perturbed = torch.autograd.grad(F.cross_entropy(perturbed(x), y), list(perturbed.parameters()))
    expected = [w.detach() - lr * (gp + wd * w.detach()) for w, gp in zip(ref.parameters(), grads_at_perturbed)]

    awp = AWP(model, gamma)
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    awp.perturb(x, y, F.cross_entropy)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    awp.restore()
    opt.step()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)
    # exactly one training forward reached the model's BN statistics, at the perturbed weights
    torch.testing.assert_close(model[1].running_mean, perturbed[1].running_mean, rtol=1e-12, atol=0)


def test_bit_exact_restore_autocast_channels_last():
    model = small_cnn(torch.float32).to(memory_format=torch.channels_last)
    x, y = batch(torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    awp = AWP(model, 0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            awp.perturb(x, y, F.cross_entropy)
            assert not torch.equal(model[0].weight, before[0])
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        awp.restore()
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p, b)
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(model[0].weight.grad).all()
        opt.step()


def test_forward_after_perturb_sees_perturbed_weights_in_same_autocast_region():
    # autocast caches bf16 copies of the weights for the whole region; perturb() must invalidate them
    model = small_cnn(torch.float32).eval()
    x, y = batch(torch.float32)
    awp = AWP(model, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        clean = model(x)
        awp.perturb(x, y, F.cross_entropy)
        same_region = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh_region = model(x)
    assert torch.equal(same_region, fresh_region)
    assert not torch.equal(same_region, clean)
    awp.restore()


def test_misuse_and_flags():
    model = small_cnn()
    x, y = batch()
    awp = AWP(model, 0.01)
    with pytest.raises(RuntimeError):
        awp.restore()
    awp.perturb(x, y)
    with pytest.raises(RuntimeError):
        awp.perturb(x, y)
    awp.restore()
    with pytest.raises(UserError):
        AWP(model, 0.0)
    assert AWP(torch.compile(model), 0.01).model is model  # wrappers are unwrapped; nothing is compiled here
    assert build_awp(parse_args(["--adv", "pgd"]), model) is None
    awp = build_awp(parse_args(["--adv", "awp", "--awp_gamma", "0.01"]), model)
    assert awp.gamma == 0.01 and awp.model is model
    with pytest.raises(UserError):
        build_awp(parse_args(["--adv", "awp", "--awp_start_epoch", "-1"]), model)
