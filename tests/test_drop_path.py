"""Stochastic depth: identity when off, whole samples dropped, unbiased, linear rule inside the models."""
import math

import pytest
import torch

from models import build_model
from models.drop_path import DropPath, drop_path, linear_drop_path_rates


def test_identity_in_eval_and_at_zero():
    x = torch.randn(8, 3, 4, 4)
    assert drop_path(x, 0.5, training=False) is x
    assert drop_path(x, 0.0, training=True) is x
    m = DropPath(0.5).eval()
    torch.testing.assert_close(m(x), x, rtol=0, atol=0)
    m = DropPath(0.0).train()
    torch.testing.assert_close(m(x), x, rtol=0, atol=0)


def test_whole_samples_dropped_and_rescaled():
    torch.manual_seed(0)
    p = 0.3
    x = torch.rand(64, 3, 4, 4) + 0.5          # no zeros in x, so a zero means "dropped"
    y = drop_path(x, p, training=True)
    dropped = (y == 0).flatten(1)
    assert (dropped.all(1) | ~dropped.any(1)).all(), "a sample was partly dropped"
    kept = ~dropped.all(1)
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    assert 0 < kept.sum() < 64


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_unbiased_mean(p):
    torch.manual_seed(1)
    m = 20000
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    y = DropPath(p).train()(x.expand(m, -1, -1, -1))
    # Each draw is x/(1-p) with probability 1-p, else 0: mean x, variance x^2 p/(1-p).
    std_of_mean = x.abs() * math.sqrt(p / (1 - p) / m)
    assert ((y.mean(0, keepdim=True) - x).abs() <= 5 * std_of_mean).all()
    kept = (y.flatten(1) != 0).any(1).double().mean().item()
    assert abs(kept - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / m)


def test_gradient_flows_only_through_kept_samples():
    torch.manual_seed(2)
    x = torch.randn(32, 4, requires_grad=True)
    y = drop_path(x, 0.5, training=True)
    y.sum().backward()
    kept = (y != 0).all(1)
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 2.0))
    assert (x.grad[~kept] == 0).all()


def test_bad_rate():
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError):
            DropPath(p)


def test_linear_rule():
    assert linear_drop_path_rates(0.2, 4) == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert linear_drop_path_rates(0.0, 3) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("name, num_blocks", [("resnet20", 9), ("resnet18", 8), ("wrn16_4", 6),
                                              ("mobilenetv2", 10)])
def test_models_use_linear_rule(name, num_blocks):
    model = build_model(name, 10, 1, 28, (0.5,), (0.5,), drop_path_rate=0.3)
    rates = [m.p for m in model.modules() if isinstance(m, DropPath)]    # modules() walks input to output
    assert rates == pytest.approx([0.3 * k / num_blocks for k in range(1, num_blocks + 1)])
    plain = build_model(name, 10, 1, 28, (0.5,), (0.5,))
    assert not any(isinstance(m, DropPath) for m in plain.modules())
