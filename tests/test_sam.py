"""SAM and ASAM: the gradient left in .grad against a float64 hand computation (e from torch.autograd.grad of a
functional_call), bit-exact restore of weights and BatchNorm statistics (as after one forward at w), the summed
micro-batch gradient untouched, autocast + channels_last, misuse, and --opt sam through train.py."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import QUICK, cli_error, needs_fmnist
from torch import nn
from torch.func import functional_call

import config
import train
from engine.lion import Lion
from engine.loop import StepTricks
from engine.optim import build_optimizer
from tricks.sam import SAM
from utils.errors import UserError


def small_cnn(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 6 * 6, 3))
    with torch.no_grad():  # non-trivial BN affine parameters and statistics
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
        model[1].running_mean.uniform_(-0.2, 0.2)
    return model.to(dtype)


def batch(dtype=torch.float64, n=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 6, 6, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


def _loss_grad(model, params, x, y):
    """d CE / d params at `params`, by functional_call on copies of the buffers (the model's stay as they are)."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    loss = F.cross_entropy(functional_call(model, {**params, **buffers}, (x,)), y)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


@pytest.mark.parametrize("adaptive", [False, True])
def test_gradient_equals_hand_computation(adaptive):
    # SAM: e = rho g / ||g||; ASAM: e = rho T^2 g / ||T g||, T = |w| + eta on weights (ndim > 1), 1 elsewhere;
    # norms over all parameters together. The gradient left in .grad is grad L(w + e).
    model = small_cnn()
    x, y = batch()
    rho, eta = 0.3, 0.01
    w = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    g = _loss_grad(model, w, x, y)
    t = {n: (w[n].detach().abs() + eta) if adaptive and w[n].ndim > 1 else torch.ones_like(w[n]) for n in w}
    norm = torch.sqrt(sum(((t[n] * g[n]) ** 2).sum() for n in w))
    w_e = {n: (w[n].detach() + rho * t[n] ** 2 * g[n] / norm).requires_grad_() for n in w}
    want = _loss_grad(model, w_e, x, y)
    assert max((want[n] - g[n]).abs().max() for n in w) > 1e-3  # the test can tell w + e from w

    sam = SAM(model, rho, adaptive=adaptive, eta=eta)
    sam.perturb(x, y, F.cross_entropy)
    F.cross_entropy(model(x), y).backward()
    sam.restore()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-10, atol=1e-12, msg=n)
        assert torch.equal(p.detach(), w[n].detach()), n  # restored exactly


def test_restore_is_exact_and_batchnorm_moves_once_at_w():
    model = small_cnn()
    x, y = batch()
    one_forward = copy.deepcopy(model)
    with torch.no_grad():
        one_forward(x)  # train mode: running statistics updated once, at w
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():  # an earlier micro-batch's gradient: the ascent must leave it alone
        p.grad = torch.full_like(p, 0.25)
    sam = SAM(model, 0.5)
    sam.perturb(x, y, F.cross_entropy)
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    F.cross_entropy(model(x), y).backward()
    sam.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n]), n
    for (n, a), b in zip(model.named_buffers(), one_forward.buffers()):
        assert torch.equal(a, b), n  # running_mean, running_var, num_batches_tracked: one update, at w
    assert model[1].num_batches_tracked.item() == 1


def test_restore_is_bit_exact_under_autocast_and_channels_last():
    model = small_cnn(torch.float32).to(memory_format=torch.channels_last)
    x, y = batch(torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    sam = SAM(model, 0.05, adaptive=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sam.perturb(x, y, F.cross_entropy)
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    sam.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_frozen_parameters_are_not_perturbed_and_misuse_is_refused():
    model = small_cnn()
    x, y = batch()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    sam = SAM(model, 0.05)
    sam.perturb(x, y, F.cross_entropy)
    assert torch.equal(model[0].weight, frozen)
    with pytest.raises(RuntimeError, match="twice"):
        sam.perturb(x, y, F.cross_entropy)
    sam.restore()
    with pytest.raises(RuntimeError, match="without"):
        sam.restore()
    with pytest.raises(UserError, match="rho"):
        SAM(model, 0.0)


def test_the_loop_steps_the_base_optimizer_with_the_gradient_at_w_plus_e():
    """train_one_epoch with SAM in the weight-perturbation slot: one SGD step with grad L(w + e), taken at w."""
    from engine.precision import make_precision
    model = small_cnn()
    x, y = batch()
    lr, rho = 0.1, 0.2
    w = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    g = _loss_grad(model, w, x, y)
    norm = torch.sqrt(sum((g[n] ** 2).sum() for n in w))
    want = _loss_grad(model, {n: (w[n].detach() + rho * g[n] / norm).requires_grad_() for n in w}, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    prec = make_precision(torch.device("cpu"), False, "auto", False)
    prec.to_input = lambda t: t  # the batch is already float64 in [0, 1]
    train.train_one_epoch(model, [(x, y)], opt, None, F.cross_entropy, prec.scaler(), prec, 0,
                          StepTricks(perturb_weights=SAM(model, rho), attack_loss=F.cross_entropy))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[n].detach() - lr * want[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("base,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                      ("adamw", torch.optim.AdamW), ("lion", Lion)])
def test_sam_steps_with_its_base_optimizer(base, cls):
    opt = build_optimizer(small_cnn(), config.parse_args(["--opt", "sam", "--sam_base", base, "--momentum", "0.8"]),
                          0.3)
    assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.3


def test_bad_sam_flags_are_one_line_errors(capsys):
    assert "--sam_rho 0: must be in (0, inf)" in cli_error(train.main, ["--opt", "sam", "--sam_rho", "0"], capsys)
    assert "pick one" in cli_error(train.main, ["--opt", "sam", "--adv", "awp"], capsys)
    assert "pick one" in cli_error(train.main, ["--opt", "sam", "--awp_start_epoch", "1"], capsys)
    assert "--sam_base" in cli_error(train.main, ["--opt", "sam", "--sam_base", "muon"], capsys)


@needs_fmnist
def test_train_py_with_sam(tmp_path, monkeypatch):
    seen = []
    orig = train.train_one_epoch

    def spy(*a, **kw):
        seen.append((a[8].perturb_weights, type(a[2])))
        return orig(*a, **kw)
    monkeypatch.setattr(train, "train_one_epoch", spy)
    out = tmp_path / "run"
    summary = train.main(config.parse_args([*QUICK, "--output_dir", str(out), "--opt", "sam", "--sam_adaptive",
                                            "--sam_rho", "0.5"]))
    (sam, opt_cls), = seen
    assert isinstance(sam, SAM) and sam.adaptive and sam.rho == 0.5 and opt_cls is torch.optim.SGD  # --sam_base
    assert summary["final_val_acc"] > 0.2 and (out / "last.pt").is_file()  # 512 images, 1 epoch; chance 0.1
