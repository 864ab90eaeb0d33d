"""--opt muon: which parameters Muon trains, one step against torch.optim.Muon on explicit 2-D copies and against a
float64 Newton-Schulz by hand, the aux SGD step, channels_last, the schedule reaching the inner optimiser, and an
exact resume through the checkpoint code and through train.py."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import QUICK, cli_error, needs_fmnist
from torch import nn

import config
import train
from engine.checkpoint import load_checkpoint, load_states, save_checkpoint, save_states
from engine.muon import MuonWithAux, hidden_weights
from engine.optim import build_optimizer, param_depths
from engine.scheduler import build_scheduler
from utils.errors import UserError

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (Keller Jordan's), 5 steps


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),   # 0: the input layer
                         nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),   # 3: hidden
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(24, 8), nn.ReLU(),                                   # 8: hidden
                         nn.Linear(8, 3))                                               # 10: the head


def _args(*flags):
    return config.parse_args(["--opt", "muon", *flags])


def _grads(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) for n, p in net.named_parameters()}


def _set_grads(net, grads, memory_format=torch.contiguous_format):
    for n, p in net.named_parameters():
        p.grad = grads[n].clone().contiguous(memory_format=memory_format) if p.ndim == 4 else grads[n].clone()


def _ids(params):
    return {id(p) for p in params}


def test_muon_trains_the_hidden_matrices_only():
    net = _net()
    hidden = [net[3].weight, net[8].weight]
    assert _ids(hidden_weights(net)) == _ids(hidden)  # not the input layer's, the head's, biases or norms
    opt = build_optimizer(net, _args("--no_bias_decay", "--weight_decay", "0.01", "--layer_decay", "0.5"), 0.1)
    assert type(opt) is MuonWithAux
    muon = [g for g in opt.param_groups if g["muon"]]
    aux = [g for g in opt.param_groups if not g["muon"]]
    assert _ids(p for g in muon for p in g["params"]) == _ids(hidden)
    assert _ids(p for g in aux for p in g["params"]) == _ids(net.parameters()) - _ids(hidden)
    assert all(g["weight_decay"] == 0.01 for g in muon)
    # layer-wise decay: Muon's lr is --muon_lr x the factor --lr gets at the same depth
    depths, _ = param_depths(net)
    lr_of = {id(p): g["lr"] for g in muon for p in g["params"]}
    assert [lr_of[id(p)] for p in hidden] == pytest.approx([0.02 * 0.5 ** depths[id(p)] for p in hidden])
    assert min(depths[id(p)] for p in hidden) > 0
    assert not opt.param_groups[0]["muon"]  # param_groups[0] (the logged lr) follows --lr
    # a frozen input layer (--whiten_stem) is still the input layer
    net[0].weight.requires_grad_(False)
    assert _ids(hidden_weights(net)) == _ids(hidden)
    with pytest.raises(UserError, match="hidden conv/linear"):
        build_optimizer(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), _args(), 0.1)


def test_two_steps_equal_torch_muon_on_2d_copies_and_sgd_on_the_rest():
    net = _net()
    ref = copy.deepcopy(net)
    flags = ("--lr", "0.1", "--muon_lr", "0.05", "--momentum", "0.8", "--muon_momentum", "0.9",
             "--weight_decay", "0.01")
    opt = build_optimizer(net, _args(*flags), 0.1)
    hidden = {"3.weight", "8.weight"}
    params = dict(ref.named_parameters())
    mats = {n: nn.Parameter(params[n].detach().reshape(params[n].shape[0], -1).clone()) for n in hidden}
    muon = torch.optim.Muon(list(mats.values()), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    sgd = torch.optim.SGD([p for n, p in params.items() if n not in hidden], lr=0.1, momentum=0.8, nesterov=True,
                          weight_decay=0.01)
    for seed in (1, 2):
        grads = _grads(net, seed)
        _set_grads(net, grads)
        opt.step()
        for n, p in params.items():
            p.grad = grads[n].clone()
        for n, m in mats.items():
            m.grad = grads[n].reshape(m.shape)
        muon.step()
        sgd.step()
    got = dict(net.named_parameters())
    for n, p in params.items():
        want = mats[n].detach().reshape(p.shape) if n in hidden else p.detach()
        assert torch.equal(got[n].detach(), want), n


def _newton_schulz(g, steps=5):
    """Muon's quintic Newton-Schulz orthogonalisation, in float64 (torch's runs in bfloat16)."""
    a, b, c = NS_COEFFICIENTS
    x = g.double() / g.double().norm()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


def test_first_step_equals_newton_schulz_by_hand():
    # Step 1: momentum buffer (1 - mu) g; Nesterov (1 - mu^2) g: a multiple of g, which NS normalises away. So
    # w <- w (1 - lr wd) - lr sqrt(max(1, out / in)) NS(g), NS on g as an (out, in x kh x kw) matrix.
    net = _net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = build_optimizer(net, _args("--muon_lr", "0.05", "--weight_decay", "0.01"), 0.1)
    grads = _grads(net)
    _set_grads(net, grads)
    opt.step()
    for n in ("3.weight", "8.weight"):
        w, g = before[n], grads[n].reshape(before[n].shape[0], -1)
        scale = math.sqrt(max(1.0, g.shape[0] / g.shape[1]))
        want = w.double() * (1 - 0.05 * 0.01) - 0.05 * scale * _newton_schulz(g).reshape(w.shape)
        # bfloat16 iterations: entries of NS(g) (up to ~0.5 here) agree to a few bfloat16 ulps (0.03 x lr in w, where
        # the step moves w by about 0.5 x lr)
        torch.testing.assert_close(dict(net.named_parameters())[n].detach().double(), want, rtol=0, atol=0.05 * 0.03)


@pytest.mark.parametrize("grad_format", [torch.contiguous_format, torch.channels_last])
def test_channels_last_weights_get_the_same_update(grad_format):
    plain, cl = _net(), _net().to(memory_format=torch.channels_last)
    assert cl[3].weight.is_contiguous(memory_format=torch.channels_last) and not cl[3].weight.is_contiguous()
    opts = [build_optimizer(m, _args("--muon_lr", "0.05"), 0.1) for m in (plain, cl)]
    before = cl[3].weight.detach().clone()
    for seed in (1, 2):
        grads = _grads(plain, seed)
        _set_grads(plain, grads)
        _set_grads(cl, grads, grad_format)
        for opt in opts:
            opt.step()
    assert cl[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(cl[3].weight, before)  # the 2-D view shares the weight's storage
    for (n, a), b in zip(plain.named_parameters(), cl.parameters()):
        # the same matrix with its columns permuted: equal up to bfloat16 rounding of the Newton-Schulz sums
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=0.05 * 0.01, msg=n)


def test_the_schedule_sets_the_inner_lr():
    net = _net()
    opt = build_optimizer(net, _args("--no_bias_decay"), 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t if t <= 3 else 0.0)
    for _ in range(3):
        _set_grads(net, _grads(net))
        opt.step()
        sched.step()
    _set_grads(net, _grads(net))
    opt.step()  # hands the scheduled lr (x 0.125) to the inner optimisers
    inner = [*opt.aux.param_groups, *opt.muon.param_groups]
    outer = [g for g in opt.param_groups if not g["muon"]] + [g for g in opt.param_groups if g["muon"]]
    assert [g["lr"] for g in inner] == [g["lr"] for g in outer]
    assert sorted(g["lr"] for g in inner) == pytest.approx(sorted([0.1 / 8] * 2 + [0.02 / 8]))
    sched.step()  # lr 0: Muon and the aux step leave the weights where they are (no decay at lr 0 either)
    before = [p.detach().clone() for p in net.parameters()]
    _set_grads(net, _grads(net, 7))
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


@pytest.mark.parametrize("aux", ["sgd", "adamw"])
def test_resume_through_a_checkpoint_continues_bit_identically(aux, tmp_path):
    torch.manual_seed(3)
    x, y = torch.rand(16, 1, 6, 6), torch.randint(0, 3, (16,))
    args = _args("--muon_aux", aux, "--lr", "0.05", "--warmup_epochs", "1", "--epochs", "3")

    def build():
        net = _net().to(memory_format=torch.channels_last)
        opt = build_optimizer(net, args, args.lr)
        return net, opt, build_scheduler(opt, args, steps_per_epoch=3)

    def train_steps(net, opt, sched, n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
            sched.step()

    net, opt, sched = build()
    train_steps(net, opt, sched, 4)
    path = str(tmp_path / "last.pt")
    save_checkpoint({"model": net.state_dict(), "model_config": {}, **save_states({"optimizer": opt,
                                                                                  "scheduler": sched})}, path)
    train_steps(net, opt, sched, 4)
    resumed, opt2, sched2 = build()
    ckpt = load_checkpoint(path)  # weights_only=True
    resumed.load_state_dict(ckpt["model"])
    load_states({"optimizer": opt2, "scheduler": sched2}, ckpt, path)
    assert opt2.muon.state and all("momentum_buffer" in s for s in opt2.muon.state.values())
    train_steps(resumed, opt2, sched2, 4)
    for a, b in zip(net.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match="--opt"):
        opt2.load_state_dict(torch.optim.SGD(resumed.parameters(), lr=0.1).state_dict())


def test_bad_muon_flags_are_one_line_errors(capsys):
    assert "--muon_lr 0: must be in (0, inf)" in cli_error(train.main, ["--opt", "muon", "--muon_lr", "0"], capsys)
    assert "--muon_momentum 1: must be in [0, 1)" in cli_error(train.main, ["--muon_momentum", "1"], capsys)
    assert "--muon_aux" in cli_error(train.main, ["--opt", "muon", "--muon_aux", "lion"], capsys)


@needs_fmnist
def test_train_py_with_muon_resumes_exactly(tmp_path, monkeypatch):
    """--opt muon end to end; a run stopped after epoch 1 and resumed ends bit-identical to an unbroken one."""
    flags = [*QUICK, "--train_subset", "256", "--eval_subset", "64", "--epochs", "2", "--deterministic",
             "--opt", "muon", "--muon_aux", "adamw", "--lr", "0.002", "--no_bias_decay"]
    train.main(config.parse_args([*flags, "--output_dir", str(tmp_path / "full")]))

    class Stop(Exception):
        pass
    save_run = train.save_run

    def stop_after_first_epoch(*a):
        save_run(*a)
        raise Stop
    monkeypatch.setattr(train, "save_run", stop_after_first_epoch)
    with pytest.raises(Stop):
        train.main(config.parse_args([*flags, "--output_dir", str(tmp_path / "cut")]))
    monkeypatch.setattr(train, "save_run", save_run)
    train.main(config.parse_args(["--resume", str(tmp_path / "cut" / "last.pt"), "--no_progress"]))

    a = torch.load(tmp_path / "full" / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["args"]["opt"] == "muon"
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    bufs = [s["momentum_buffer"] for s in b["optimizer"]["muon"]["state"].values()]
    assert bufs and all(s.ndim == 2 for s in bufs)
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["final_val_acc"] > 0.2  # 256 images, 2 epochs: learning (chance is 0.1)
