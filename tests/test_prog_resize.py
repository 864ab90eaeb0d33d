"""--prog_resize: the side schedule by hand, the resize against torchvision's, training on resized batches equal
to training on batches resized beforehand, the time-budget plan with cheaper early epochs by hand, and a real
run whose metrics show the sides it trained at."""
import csv

import torch
import torch.nn.functional as F
from conftest import QUICK, cli_error, drop, needs_fmnist
from torchvision.transforms.v2 import functional as TF

import config
import train
from engine import budget as budget_mod
from engine.budget import TimeBudget, plan_epochs
from engine.precision import make_precision
from tricks.prog_resize import epoch_cost, train_size
from utils.misc import resize_square


def test_side_schedule_by_hand():
    # 20 epochs, ramp round(0.75 * 20) = 15: t = e / 15, side 16 + 12 t rounded down to 16 + 4k
    assert [train_size(e, 20, 28, 16, 0.75) for e in range(20)] == [16] * 5 + [20] * 5 + [24] * 5 + [28] * 5
    # ramp round(0.75 * 7) = 5: 16 + 12 * (0, .2, .4, .6, .8) = 16, 18.4, 20.8, 23.2, 25.6 -> 16 16 20 20 24
    assert [train_size(e, 7, 28, 16, 0.75) for e in range(7)] == [16, 16, 20, 20, 24, 28, 28]
    # until 1: the whole run ramps; start 18: 18 + 10 * e / 10 -> 18, 22, 26 in 4-px steps, never 28
    assert [train_size(e, 10, 28, 18, 1.0) for e in range(10)] == [18] * 4 + [22] * 4 + [26] * 2
    assert train_size(0, 10, 28, 0, 0.75) == 28  # off
    cost = epoch_cost(28, 14, 0.5)  # 4 epochs: ramp 2, sides 14, 14 + 14 * 0.5 = 21 -> 14 + 4 = 18, 28, 28
    assert [cost(k, 4) for k in (1, 2, 3, 4)] == [0.25, (18 / 28) ** 2, 1.0, 1.0]


def test_resize_matches_torchvision_and_keeps_memory_format():
    x = torch.rand(3, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    got = resize_square(x, 20)
    ref = TF.resize(x.contiguous(), [20, 20], antialias=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert got.is_contiguous(memory_format=torch.channels_last) and resize_square(x, 28) is x


def test_training_on_resized_batches_equals_training_on_batches_resized_beforehand():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (32,), generator=g)
    prec = make_precision(torch.device("cpu"), amp=False)

    def run(loader, side):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                    torch.nn.Linear(4, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        train.train_one_epoch(model, loader, opt, sched, F.cross_entropy, prec.scaler(), prec, 0,
                              train.StepTricks(side=side))
        return model.state_dict()

    batches = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 32, 8)]
    # the same batches, resized by hand and handed over as float pixels (to_input's / 255 undone)
    small = [(TF.resize(x.float() / 255, [20, 20], antialias=True) * 255, y) for x, y in batches]
    a, b, full = run(batches, 20), run(small, None), run(batches, None)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a["0.weight"], full["0.weight"])  # the side did change the training


def test_budget_plan_with_cheaper_early_epochs_by_hand(monkeypatch):
    # costs 0.25 for epochs 1-4, then 1 (independent of E here); epoch_s 10, elapsed 10 after epoch 1, no evals:
    # need(E) = 10 + 10 * (0.25 * (min(E, 4) - 1) + max(E - 4, 0)); E=10: 10 + 7.5 + 60 = 77.5 <= 80, E=11: 87.5
    def cost(k, e):
        return 0.25 if k <= 4 else 1.0
    assert plan_epochs(80, 10, 1, 50, 10, 0, 1000, cost=cost) == 10
    assert plan_epochs(80, 10, 1, 50, 10, 0, 1000) == 8  # every epoch at full cost: 10 + 10 (E - 1) <= 80

    # TimeBudget scales the measured epoch to a full-size one: 2 s at cost 0.25 -> 8 s per full epoch
    clock = [0.0]
    monkeypatch.setattr(budget_mod.time, "perf_counter", lambda: clock[0])
    b = TimeBudget(1.0, 100, 1000, eval_share=0.0, start=0.0)
    b.begin()
    clock[0] = 2.0
    # need(E) = 2 + 8 * (0.25 * (min(E, 4) - 1) + max(E - 4, 0)) <= 60: E=10 -> 2 + 6 + 48 = 56, E=11 -> 64
    assert b.plan(1, 0.25, cost) == 10


@needs_fmnist
def test_run_trains_at_the_planned_sides_and_evaluates_at_full_size(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    sides, orig = [], train.train_one_epoch

    def spy(*a, **kw):  # the side main hands to the training step, epoch by epoch
        sides.append(a[8].side)
        return orig(*a, **kw)
    monkeypatch.setattr(train, "train_one_epoch", spy)
    flags = drop(QUICK, "--epochs", "--model")
    summary = train.main(config.parse_args([*flags, "--model", "airnet_s", "--epochs", "4", "--prog_resize", "16",
                                            "--prog_resize_until", "0.5",
                                            "--output_dir", str(out)]))
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # ramp round(0.5 * 4) = 2 epochs: 16, 16 + 12 * 0.5 = 22 -> 20, then full size (0.75 would give 16 20 24 28)
    assert [int(r["train_size"]) for r in rows] == [train_size(e, 4, 28, 16, 0.5) for e in range(4)] \
        == sides == [16, 20, 28, 28]
    assert summary["test_acc"] > 0.3  # evaluated on full-size images, well above chance

    assert "cannot take 16-px images" in cli_error(
        train.main, [*QUICK, "--model", "mlp_student", "--prog_resize", "16", "--output_dir", str(tmp_path / "m")],
        capsys)
    assert "28 px already" in cli_error(train.main, [*QUICK, "--prog_resize", "28", "--output_dir",
                                                     str(tmp_path / "f")], capsys)
    assert "at least 8 px" in cli_error(train.main, [*QUICK, "--prog_resize", "4"], capsys)
