"""Lookahead: the slow/fast update against a hand-written loop, state round trip, bad flags."""
import numpy as np
import pytest
import torch
from torch import nn

from tricks.lookahead import Lookahead
from utils.errors import UserError


def test_constant_gradient_closed_form():
    # Plain SGD, constant gradient g: k fast steps reach w0 - k lr g; the slow weights move alpha of the way,
    # so after each sync w = w0 - m alpha k lr g (m syncs so far).
    layer = nn.Linear(3, 2)
    w0 = [p.detach().clone() for p in layer.parameters()]
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    la = Lookahead(layer, k=4, alpha=0.25)
    for step in range(1, 13):
        for p in layer.parameters():
            p.grad = torch.full_like(p, 2.0)
        opt.step()
        assert la.step() == (step % 4 == 0)
        if step % 4 == 0:
            for p, p0 in zip(layer.parameters(), w0):
                torch.testing.assert_close(p.detach(), p0 - (step // 4) * 0.25 * 4 * 0.1 * 2.0)


def test_matches_a_hand_written_loop_with_momentum():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    la = Lookahead(layer, k=5, alpha=0.5)
    # Reference in numpy: the same inner optimiser on a copy, slow weights kept by hand.
    ref = nn.Linear(5, 3)
    ref.load_state_dict(layer.state_dict())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    slow = [p.detach().numpy().astype(np.float64).copy() for p in ref.parameters()]
    for step in range(1, 23):
        for model, o in ((layer, opt), (ref, ref_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
        la.step()
        if step % 5 == 0:
            with torch.no_grad():
                for i, p in enumerate(ref.parameters()):
                    slow[i] = slow[i] + 0.5 * (p.numpy().astype(np.float64) - slow[i])
                    p.copy_(torch.from_numpy(slow[i]).float())
    for p, q in zip(layer.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5)


def test_frozen_parameters_have_no_slow_copy_and_state_round_trips():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    net[0].weight.requires_grad_(False)
    la = Lookahead(net, k=2, alpha=0.5)
    assert len(la.slow) == 3
    la.step()
    state = la.state_dict()
    other = Lookahead(net, k=2, alpha=0.5)
    other.load_state_dict(state)
    assert other.steps == 1 and all(torch.equal(a, b) for a, b in zip(other.slow, la.slow))
    with pytest.raises(UserError, match="do not match"):
        Lookahead(nn.Linear(3, 2)).load_state_dict(state)


@pytest.mark.parametrize("k,alpha,fragment", [(0, 0.5, "lookahead_k"), (2.5, 0.5, "lookahead_k"),
                                              (5, 0.0, "lookahead_alpha"), (5, 1.5, "lookahead_alpha")])
def test_bad_settings(k, alpha, fragment):
    with pytest.raises(UserError, match=fragment):
        Lookahead(nn.Linear(2, 2), k, alpha)
