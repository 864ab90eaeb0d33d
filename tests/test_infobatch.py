"""--infobatch: the selection and its weights by hand, unbiasedness by simulation, the loaders (in-memory and
file) visiting exactly the selected samples, the schedule stepped to the same lr at every epoch boundary, a real
run and its exact resume, a run on an image folder, and the refusals."""
import csv
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import QUICK, cli_error, needs_fmnist

import config
import train
import train_distill
from datasets.loader import InMemoryLoader, make_file_loader
from engine.budget import plan_epochs
from engine.precision import make_precision
from tricks.infobatch import InfoBatch


def test_selection_and_weights_by_hand():
    ib = InfoBatch(10, 0.5, 0.75, seed=0)
    assert ib.select(0, 8) is None and torch.equal(ib.weights, torch.ones(10))  # all scores equal: none below
    # mean 0.55: samples 0-4 are well learned (m = 5), k = round(0.5 * 5) = 2 of them left out, the other 3
    # weighted 5 / 3; samples 5-9 always train, weight 1
    ib.scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    kept = ib.select(1, 8)
    left_out = sorted(set(range(10)) - set(kept.tolist()))
    assert len(left_out) == 2 and all(i < 5 for i in left_out)
    assert kept.tolist() == sorted(kept.tolist()) and ib.kept_frac == 0.8
    for i in range(10):
        expected = 1.0 if i >= 5 or i in left_out else 5 / 3
        assert ib.weights[i].item() == pytest.approx(expected)
    assert torch.equal(ib.select(1, 8), kept)  # seeded by (seed, epoch): a resume draws the same
    assert any(not torch.equal(ib.select(e, 8), kept) for e in range(2, 6))
    # annealing: epochs ceil(0.75 * 8) = 6 and 7 train on everything with weight 1
    assert [ib.pruning(e, 8) for e in range(8)] == [True] * 6 + [False] * 2
    assert ib.select(6, 8) is None and torch.equal(ib.weights, torch.ones(10))
    assert [ib.cost(k, 8) for k in (6, 7, 8)] == [0.8, 1.0, 1.0]


def test_weighted_epoch_loss_is_unbiased():
    # E[sum over kept samples of weight x loss] = sum of all losses: each well-learned sample stays with
    # probability (m - k) / m and then weighs m / (m - k)
    g = torch.Generator().manual_seed(1)
    losses = torch.rand(200, generator=g) ** 3  # skewed: most samples below the mean
    ib = InfoBatch(200, 0.5, 1.0, seed=3)
    totals = []
    for epoch in range(400):
        ib.scores = losses.clone()
        kept = ib.select(epoch, 1000)
        totals.append((ib.weights[kept] * losses[kept]).sum())
    totals = torch.stack(totals)
    assert len(kept) < 200
    assert totals.mean().item() == pytest.approx(losses.sum().item(), rel=0.01)
    assert totals.std().item() > 0.5  # the draws do differ from epoch to epoch


def test_batch_loss_records_scores_and_weights_the_mean():
    ib = InfoBatch(6, 0.5, 1.0, seed=0)
    ib.weights = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, 1.0])
    losses = torch.tensor([0.5, 0.25, 1.0, 0.75], requires_grad=True)
    idx = torch.tensor([0, 1, 3, 5])
    loss = ib.batch_loss(losses, idx)
    assert loss.item() == pytest.approx((0.5 + 2 * 0.25 + 2 * 1.0 + 0.75) / 4)
    assert ib.scores.tolist() == [0.5, 0.25, 1.0, 1.0, 1.0, 0.75]
    loss.backward()
    assert losses.grad.tolist() == [0.25, 0.5, 0.5, 0.25]


def test_loader_visits_exactly_the_subset():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 2, 2).contiguous()
    loader = InMemoryLoader(images, torch.arange(20), 4, shuffle=True, seed=0, drop_last=True, with_index=True)
    subset = torch.tensor([1, 3, 4, 8, 9, 10, 15, 19])
    loader.set_subset(subset)
    assert len(loader) == 2
    seen = []
    for x, y, j in loader:
        assert torch.equal(x[:, 0, 0, 0].long(), j) and torch.equal(y, j)
        seen += j.tolist()
    assert sorted(seen) == subset.tolist()
    loader.set_subset(None)
    assert len(loader) == 5 and sorted(i for *_, j in loader for i in j.tolist()) == list(range(20))


class _Numbered(torch.utils.data.Dataset):
    """Item i: a uint8 image filled with i, label i % 3."""

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return torch.full((1, 2, 2), i, dtype=torch.uint8), i % 3


@pytest.mark.parametrize("workers", [0, 1])
def test_file_loader_visits_exactly_the_subset(workers):
    loader = make_file_loader(_Numbered(), 4, shuffle=True, seed=0, drop_last=True, workers=workers,
                              with_index=True)
    subset = torch.tensor([1, 3, 4, 8, 9, 10, 15, 19])
    for epoch, sub in enumerate([subset, None, subset[:3]]):  # persistent workers see every change
        loader.set_epoch(epoch)
        loader.set_subset(sub)
        want = list(range(20)) if sub is None else sub.tolist()
        assert len(loader) == max(1, len(want) // 4)  # 3 samples: one short batch rather than none
        seen = []
        for x, y, j in loader:
            assert torch.equal(x[:, 0, 0, 0].long(), j) and torch.equal(y, j % 3)
            seen += j.tolist()
        assert sorted(seen) == want


def test_short_epochs_step_the_schedule_to_the_full_epochs_lr():
    # 10 batches of data, a schedule of 16 steps per epoch: after each epoch the lr is where 16 steps put it
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (4, 1, 8, 8), generator=g, dtype=torch.uint8),
                torch.randint(0, 3, (4,), generator=g)) for _ in range(10)]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 32)
    prec = make_precision(torch.device("cpu"), amp=False)
    lrs = []
    for epoch in range(2):
        train.train_one_epoch(model, batches, opt, sched, F.cross_entropy, prec.scaler(), prec, epoch,
                              train.StepTricks(sched_steps=16))
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1 - 16 / 32, 1 - 32 / 32])


def test_budget_plans_with_the_pruned_share():
    # epochs 1..6 of 8 prune to kept_frac 0.6, 7-8 are full; 10 s per full epoch, 30 s used after epoch 2,
    # 100 s budget: need(E) = 30 + 10 * sum(cost(k, E), k = 3..E); E = 10 prunes epochs 1..8 (ceil(7.5)):
    # 30 + 10 * (6 * 0.6 + 2 * 1) = 86 <= 100; E = 11 prunes 1..9 (ceil(8.25)): 30 + 10 * (7 * 0.6 + 2) = 92;
    # E = 12 prunes 1..9 (ceil(9.0)): 30 + 10 * (7 * 0.6 + 3) = 102 > 100
    ib = InfoBatch(10, 0.5, 0.75, seed=0)
    ib.kept_frac = 0.6
    assert plan_epochs(100, 30, 2, 50, 10, 0, 1000, cost=ib.cost) == 11
    assert plan_epochs(100, 30, 2, 50, 10, 0, 1000) == 9


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@needs_fmnist
def test_run_prunes_then_anneals_and_resumes_exactly(tmp_path, monkeypatch):
    flags = [*QUICK, "--epochs", "4", "--infobatch", "0.5", "--infobatch_anneal", "0.75", "--eval_interval", "4"]
    kept, orig_save = {}, train.save_checkpoint

    def save(ckpt, path):  # keep epoch 2's checkpoint aside to resume from
        orig_save(ckpt, path)
        if ckpt["epoch"] == 2 and path.endswith("last.pt"):
            shutil.copy(path, tmp_path / "epoch2.pt")
            kept["epoch2"] = True
    monkeypatch.setattr(train, "save_checkpoint", save)
    train.main(config.parse_args([*flags, "--output_dir", str(tmp_path / "a")]))
    monkeypatch.setattr(train, "save_checkpoint", orig_save)
    plain = train.main(config.parse_args([*QUICK, "--epochs", "4", "--eval_interval", "4",
                                          "--output_dir", str(tmp_path / "p")]))
    a, p = _rows(tmp_path / "a" / "metrics.csv"), _rows(tmp_path / "p" / "metrics.csv")
    samples = [int(r["train_samples"]) for r in a]
    assert samples[0] == samples[3] == 512 and all(256 <= s < 512 for s in samples[1:3])  # epochs 2-3 pruned
    for ra, rp in zip(a, p):  # same lr at every epoch boundary as the run without pruning
        assert float(ra["lr"]) == pytest.approx(float(rp["lr"]), abs=1e-12)
    assert float(a[1]["train_loss"]) != float(p[1]["train_loss"])

    assert kept
    train.main(config.parse_args([*flags, "--resume", str(tmp_path / "epoch2.pt"), "--output_dir",
                                  str(tmp_path / "b")]))
    b = _rows(tmp_path / "b" / "metrics.csv")
    for ra, rb in zip(a[2:], b[2:]):
        for k in ("train_loss", "train_samples", "lr", "val_acc"):
            assert ra[k] == rb[k], k
    assert plain["test_acc"] > 0.3


def test_run_on_an_image_folder_prunes_the_middle_epochs(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in "abc":
        (tmp_path / "data" / c).mkdir(parents=True)
        base = {"a": 40, "b": 120, "c": 200}[c]  # classes told apart by brightness: losses spread out
        for i in range(40):
            px = (base + torch.randint(-30, 30, (8, 8), generator=g)).clamp(0, 255).to(torch.uint8)
            Image.fromarray(px.numpy(), "L").save(tmp_path / "data" / c / f"{i}.png")
    out = tmp_path / "run"
    train.main(config.parse_args(["--dataset", "imagefolder", "--data_dir", str(tmp_path / "data"), "--in_chans",
                                  "1", "--img_size", "8", "--model", "resnet8", "--epochs", "4", "--batch_size",
                                  "8", "--warmup_epochs", "0", "--no_progress", "--device", "cpu", "--infobatch",
                                  "0.5", "--infobatch_anneal", "0.75", "--output_dir", str(out)]))
    samples = [int(r["train_samples"]) for r in _rows(out / "metrics.csv")]
    n = samples[0]  # the training split (the folder minus its validation hold-out)
    assert n > 64 and samples[3] == n and all(n // 2 <= s < n for s in samples[1:3]), samples
    scores = torch.load(out / "last.pt", weights_only=True)["infobatch"]["scores"]
    assert len(scores) == n and not torch.any(scores == 1.0)  # every sample scored by its own loss


def test_refusals(tmp_path, capsys):
    assert "--infobatch 1: must be in [0, 1)" in cli_error(train.main, [*QUICK, "--infobatch", "1"], capsys)
    assert "--infobatch_anneal 1.5: must be in [0, 1]" in cli_error(
        train.main, [*QUICK, "--infobatch", "0.5", "--infobatch_anneal", "1.5"], capsys)
    assert "--mixup_alpha" in cli_error(train.main, [*QUICK, "--infobatch", "0.5", "--mixup_alpha", "0.2"], capsys)
    assert "--adv fgsm" in cli_error(train.main, [*QUICK, "--infobatch", "0.5", "--adv", "fgsm"], capsys)
    assert "--balanced_sampler" in cli_error(
        train.main, [*QUICK, "--infobatch", "0.5", "--balanced_sampler"], capsys)
    assert "train_distill.py" in cli_error(
        train_distill.main, [*QUICK, "--infobatch", "0.5", "--teacher_ckpt", str(tmp_path / "t.pt")], capsys,
        parser=train_distill.get_parser())
    assert not any(tmp_path.iterdir())
