"""FGSM / PGD: eps-ball and pixel range, a closed form for a linear model, loss ordering and robust accuracy on a
small model trained here, untouched parameter gradients, autocast + channels_last, and flag validation."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config import parse_args
from tricks.adversarial import AdversarialAttack, build_attack, fgsm, pgd, pgd_eval_defaults
from utils.errors import UserError


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def small_cnn(bn=False):
    layers = [Normalize([0.5], [0.25]), nn.Conv2d(1, 4, 3, padding=1)]
    layers += [nn.BatchNorm2d(4)] if bn else []
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)]
    return nn.Sequential(*layers)


def toy_data(n, generator):
    """Class 0: left half brighter than the right half by 2m, class 1 the reverse; m ~ U(0.03, 0.3)."""
    y = torch.randint(0, 2, (n,), generator=generator)
    m = 0.03 + 0.27 * torch.rand(n, generator=generator)
    sign = (1 - 2 * y).float().view(n, 1, 1, 1)
    x = torch.full((n, 1, 6, 6), 0.5)
    x[..., :3] += sign * m.view(n, 1, 1, 1)
    x[..., 3:] -= sign * m.view(n, 1, 1, 1)
    x += 0.03 * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(60):
        x, y = toy_data(64, g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    x, y = toy_data(256, g)
    return model, x, y


def test_perturbation_stays_in_ball_and_pixel_range():
    torch.manual_seed(1)
    model = small_cnn(bn=True)
    x = torch.rand(8, 1, 6, 6)
    x[:, :, 0] = 0.0  # rows exactly at and near the ends of the pixel range
    x[:, :, 1] = 1.0
    x[:, :, 2] = 0.01
    x[:, :, 3] = 0.99
    y = torch.randint(0, 2, (8,))
    eps = 0.3
    for x_adv in (pgd(model, x, y, eps, steps=5), pgd(model, x, y, eps, steps=5, random_start=False),
                  fgsm(model, x, y, eps), fgsm(model, x, y, eps, random_start=False)):
        assert x_adv.dtype == x.dtype and x_adv.shape == x.shape and not x_adv.requires_grad
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert (x_adv - x).abs().max() >= eps - 1e-6  # it does move to the edge of the ball somewhere


def test_fgsm_matches_closed_form_for_a_linear_model():
    # logits = W x + b: dCE/dx = W^T (softmax - onehot), so FGSM is x + eps * sign(W^T (p - onehot)), clipped.
    torch.manual_seed(2)
    lin = nn.Linear(12, 3).double()
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.rand(16, 1, 3, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    eps = 0.05
    with torch.no_grad():
        p = torch.softmax(lin(x.flatten(1)), dim=1)
        grad = (p - F.one_hot(y, 3).double()) @ lin.weight
    expected = (x + eps * grad.sign().view_as(x)).clamp(0, 1)
    torch.testing.assert_close(fgsm(model, x, y, eps, random_start=False), expected, rtol=0, atol=1e-15)
    # alpha = 1.25 eps from the clean point is projected back onto the same corner of the ball
    torch.testing.assert_close(fgsm(model, x, y, eps, alpha=eps, random_start=False), expected, rtol=0, atol=1e-15)


def test_loss_ordering_and_robust_accuracy_on_trained_model(trained):
    model, x, y = trained
    torch.manual_seed(3)
    eps = 0.08
    with torch.no_grad():
        logits = model(x)
        clean_loss = F.cross_entropy(logits, y).item()
        clean_acc = (logits.argmax(1) == y).float().mean().item()
        fgsm_loss = F.cross_entropy(model(fgsm(model, x, y, eps)), y).item()
        x_pgd = pgd(model, x, y, **pgd_eval_defaults(eps, 10))
        pgd_logits = model(x_pgd)
        pgd_loss = F.cross_entropy(pgd_logits, y).item()
        robust_acc = (pgd_logits.argmax(1) == y).float().mean().item()
    assert clean_acc > 0.95, "the toy model did not train"
    assert pgd_loss > fgsm_loss > clean_loss
    assert robust_acc < clean_acc - 0.05


def test_parameter_grads_untouched(trained):
    model, x, y = trained
    params = list(model.parameters())
    for p in params:
        p.grad = None
    params[0].grad = torch.randn_like(params[0])
    before = params[0].grad.clone()
    pgd(model, x[:16], y[:16], 0.1, steps=3)
    fgsm(model, x[:16], y[:16], 0.1)
    assert torch.equal(params[0].grad, before)
    assert all(p.grad is None for p in params[1:])
    params[0].grad = None


def test_soft_targets_and_no_grad_context(trained):
    model, x, y = trained
    x, y = x[:32], y[:32]
    soft = 0.7 * F.one_hot(y, 2).float() + 0.3 * F.one_hot(y.roll(1), 2).float()
    x_adv = pgd(model, x, soft, 0.08, steps=5, random_start=False)
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), soft) > F.cross_entropy(model(x), soft)
        # evaluate() runs under no_grad: the attack enables grad itself and gives the same result
        torch.testing.assert_close(pgd(model, x, soft, 0.08, steps=5, random_start=False), x_adv, rtol=0, atol=0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        pgd(model, x, y, 0.08)


def test_autocast_bf16_and_channels_last(trained):
    model, x, y = trained
    torch.manual_seed(4)
    model = small_cnn(bn=True).to(memory_format=torch.channels_last)
    model.load_state_dict(trained[0].state_dict(), strict=False)
    model.train()  # training attacks run in train mode; BN updates its running statistics
    x = x[:32].contiguous(memory_format=torch.channels_last)
    y = y[:32]
    eps = 0.08
    running_mean = model[2].running_mean.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = pgd(model, x, y, eps, steps=5)
        assert x_adv.dtype == torch.float32
        assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        with torch.no_grad():
            assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    assert not torch.equal(model[2].running_mean, running_mean)


def test_validation():
    model, x, y = small_cnn(), torch.rand(2, 1, 6, 6), torch.tensor([0, 1])
    for kwargs in ({"eps": 1.5}, {"eps": -0.1}, {"eps": 0.1, "steps": 0}, {"eps": 0.1, "alpha": -1.0}):
        with pytest.raises(UserError):
            pgd(model, x, y, **kwargs)
    with pytest.raises(UserError):
        AdversarialAttack("cw", 0.1)
    for argv in (["--adv", "pgd", "--adv_eps", "2"], ["--adv", "fgsm", "--adv_steps", "0"],
                 ["--adv", "awp", "--awp_gamma", "0"], ["--eval_adv", "pgd", "--eval_adv_steps", "0"]):
        with pytest.raises(UserError):
            build_attack(parse_args(argv))


def test_build_attack_from_flags():
    assert build_attack(parse_args([])) is None
    assert build_attack(parse_args(["--adv", "awp", "--awp_inputs", "clean"])) is None
    a = build_attack(parse_args(["--adv", "pgd", "--adv_eps", "0.03", "--adv_steps", "5"]))
    assert (a.kind, a.eps, a.alpha, a.steps, a.random_start) == ("pgd", 0.03, None, 5, True)
    a = build_attack(parse_args(["--adv", "awp", "--awp_inputs", "fgsm", "--adv_alpha", "0.02",
                                 "--no_adv_random_start"]))
    assert (a.kind, a.alpha, a.random_start) == ("fgsm", 0.02, False)
    expected = {"eps": 0.04, "alpha": 2.5 * 0.04 / 10, "steps": 10, "random_start": False}
    assert pgd_eval_defaults(0.04, 10) == expected
