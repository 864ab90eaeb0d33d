"""Optimiser construction, no-bias-decay parameter groups and the linear scaling rule."""
import argparse

import pytest
import torch
from torch import nn

import config
from engine.optim import OPTIMIZERS, build_optimizer, param_groups_no_bias_decay, scaled_lr
from utils.errors import UserError


def _args(*flags):
    return config.parse_args(list(flags))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _ids(params):
    return {id(p) for p in params}


def test_names_match_config():
    assert OPTIMIZERS == config.OPTIMIZERS


def test_no_bias_decay_groups_hold_exactly_the_1d_parameters():
    net = _net()
    conv, bn, fc = net[0], net[1], net[5]
    groups = param_groups_no_bias_decay(net, 5e-4)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert _ids(groups[0]["params"]) == _ids([conv.weight, fc.weight])
    assert _ids(groups[1]["params"]) == _ids([conv.bias, bn.weight, bn.bias, fc.bias])


def test_frozen_parameters_are_left_out():
    net = _net()
    net[0].weight.requires_grad_(False)
    groups = param_groups_no_bias_decay(net, 1e-4)
    assert _ids(groups[0]["params"]) == _ids([net[5].weight])
    opt = build_optimizer(net, _args(), 0.1)
    assert id(net[0].weight) not in _ids(p for g in opt.param_groups for p in g["params"])


def test_no_bias_decay_step_decays_only_weights():
    # Zero gradients, plain SGD: a decayed parameter becomes p * (1 - lr * wd); a 1-D one stays put.
    net = _net()
    opt = build_optimizer(net, _args("--no_bias_decay", "--weight_decay", "0.1", "--momentum", "0",
                                     "--no_nesterov"), lr=0.5)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in net.named_parameters():
        want = before[n] * (1 - 0.5 * 0.1) if p.ndim > 1 else before[n]
        torch.testing.assert_close(p.detach(), want)


def test_without_no_bias_decay_everything_decays():
    net = _net()
    opt = build_optimizer(net, _args("--weight_decay", "0.01"), lr=0.1)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.01
    assert _ids(opt.param_groups[0]["params"]) == _ids(net.parameters())


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                      ("adamw", torch.optim.AdamW)])
def test_optimizer_by_name(name, cls):
    opt = build_optimizer(_net(), _args("--opt", name, "--momentum", "0.8", "--weight_decay", "0.02"), lr=0.3)
    assert type(opt) is cls
    g = opt.param_groups[0]
    assert g["lr"] == 0.3 and g["weight_decay"] == 0.02
    if name == "sgd":
        assert g["momentum"] == 0.8 and g["nesterov"] is True
    else:
        assert g["betas"] == (0.8, 0.999)  # --momentum is beta1


def test_adamw_decay_is_decoupled_adam_is_l2():
    # Zero gradient: AdamW shrinks p by lr*wd; Adam's L2 gradient wd*p is normalised, so p moves by ~lr.
    p1, p2 = nn.Parameter(torch.full((1,), 2.0)), nn.Parameter(torch.full((1,), 2.0))
    m1, m2 = nn.Module(), nn.Module()
    m1.p, m2.p = p1, p2
    a = build_optimizer(m1, _args("--opt", "adamw", "--weight_decay", "0.1"), lr=0.01)
    b = build_optimizer(m2, _args("--opt", "adam", "--weight_decay", "0.1"), lr=0.01)
    p1.grad, p2.grad = torch.zeros(1), torch.zeros(1)
    a.step(), b.step()
    assert p1.item() == pytest.approx(2.0 * (1 - 0.01 * 0.1))
    assert p2.item() == pytest.approx(2.0 - 0.01, rel=1e-5)


def test_bad_optimizer_flags():
    with pytest.raises(UserError, match="sgd, adam, adamw"):
        build_optimizer(_net(), _args("--opt", "lamb"), 0.1)
    with pytest.raises(UserError, match="--no_nesterov"):
        build_optimizer(_net(), _args("--momentum", "0"), 0.1)


def test_scaled_lr():
    assert scaled_lr(_args("--lr", "0.1", "--batch_size", "128", "--lr_base_batch", "256"), 4) == pytest.approx(0.2)
    assert scaled_lr(_args("--lr", "0.1", "--batch_size", "64", "--lr_base_batch", "256"), 1) == pytest.approx(0.025)
    assert scaled_lr(_args("--lr", "0.1", "--batch_size", "64"), 8) == 0.1  # 0 = off
    with pytest.raises(UserError, match="lr_base_batch"):
        scaled_lr(_args("--lr_base_batch", "-1"), 1)


def test_norm_bias_lr_scale_moves_bn_biases_to_a_faster_group():
    net = _net()
    conv, bn, fc = net[0], net[1], net[5]
    opt = build_optimizer(net, _args("--weight_decay", "0.01", "--norm_bias_lr_scale", "64"), lr=0.1)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.1, 0.01), (0.1 * 64, 0.01 / 64)]
    assert _ids(opt.param_groups[1]["params"]) == _ids([bn.bias])
    assert _ids(opt.param_groups[0]["params"]) == _ids([conv.weight, conv.bias, bn.weight, fc.weight, fc.bias])
    # With --no_bias_decay the moved bias keeps weight decay 0.
    opt = build_optimizer(net, _args("--weight_decay", "0.01", "--no_bias_decay", "--norm_bias_lr_scale", "8"),
                          lr=0.1)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.1, 0.01), (0.1, 0.0), (0.8, 0.0)]


def test_norm_bias_lr_scale_step_matches_plain_sgd_by_hand():
    # Plain SGD with L2: p <- p - lr * (g + wd * p). The BN bias uses lr * S and wd / S, so its decay term
    # lr * wd is unchanged and its gradient step is S times larger.
    net = _net()
    opt = build_optimizer(net, _args("--weight_decay", "0.1", "--momentum", "0", "--no_nesterov",
                                     "--norm_bias_lr_scale", "4"), lr=0.05)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.3)
    opt.step()
    for n, p in net.named_parameters():
        lr, wd = (0.05 * 4, 0.1 / 4) if n == "1.bias" else (0.05, 0.1)
        torch.testing.assert_close(p.detach(), before[n] - lr * (0.3 + wd * before[n]))


def test_bad_norm_bias_lr_scale_is_a_user_error():
    with pytest.raises(UserError, match=r"--norm_bias_lr_scale 0: must be in \(0, inf\)"):
        _args("--norm_bias_lr_scale", "0")  # refused with the flags
    with pytest.raises(UserError, match="> 0"):  # and by the library, called directly
        build_optimizer(_net(), argparse.Namespace(**{**vars(_args()), "norm_bias_lr_scale": 0.0}), 0.1)
    with pytest.raises(UserError, match="no normalisation-layer biases"):
        build_optimizer(nn.Linear(3, 2), _args("--norm_bias_lr_scale", "2"), 0.1)


def test_linear_scaling_rule_scales_every_absolute_lr():
    """--lr_base_batch scales --min_lr, --warmup_lr_init, --cyclic_base_lr (and --swa_lr) as it scales --lr."""
    import train
    args = config.parse_args(["--batch_size", "64", "--lr_base_batch", "32", "--lr", "0.1", "--min_lr", "0.01",
                              "--warmup_lr_init", "0.001", "--cyclic_base_lr", "0.002"])
    s = train.schedule_options(args, world_size=3)  # k = 64 * 3 / 32 = 6
    assert (s.lr, s.min_lr, s.warmup_lr_init, s.cyclic_base_lr) == pytest.approx((0.6, 0.06, 0.006, 0.012))
    plain = train.schedule_options(config.parse_args(["--min_lr", "0.01"]), world_size=3)
    assert plain.min_lr == 0.01 and plain.lr == 0.2


def test_lion_follows_the_papers_update_rule():
    """Chen et al. 2023, Algorithm 2, by hand in float64: c = b1 m + (1 - b1) g; p -= lr (sign(c) + wd p);
    m = b2 m + (1 - b2) g; through build_optimizer's --opt lion (beta1 = --momentum, beta2 = --lion_beta2)."""
    import numpy as np
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    args = _args("--opt", "lion", "--momentum", "0.8", "--lion_beta2", "0.95", "--weight_decay", "0.1")
    opt = build_optimizer(net, args, 0.01)
    p0 = {n: p.detach().double().numpy().copy() for n, p in net.named_parameters()}
    m = {n: np.zeros_like(v) for n, v in p0.items()}
    x = torch.randn(16, 4)
    for _ in range(5):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        grads = {n: p.grad.double().numpy() for n, p in net.named_parameters()}
        opt.step()
        for n in p0:
            c = 0.8 * m[n] + 0.2 * grads[n]
            p0[n] = p0[n] - 0.01 * (np.sign(c) + 0.1 * p0[n])
            m[n] = 0.95 * m[n] + 0.05 * grads[n]
        for n, p in net.named_parameters():
            np.testing.assert_allclose(p.detach().double().numpy(), p0[n], rtol=0, atol=1e-6)
