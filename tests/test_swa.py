"""SWA: equal average of end-of-epoch snapshots, the SWALR lr, update_bn on uint8 batches (Dropout/DropPath off),
resume."""
import io
import math

import pytest
import torch
from torch import nn

from models.drop_path import DropPath
from tricks.swa import SWA, update_bn_uint8


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(3, 4)).double()


def fake_epoch(model, optimizer, gen):
    """Stands in for an epoch of training: one optimizer step, then new random weights."""
    optimizer.step()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_average_of_snapshots_from_swa_start():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    swa = SWA(model, opt, swa_start=2, swa_lr=0.05, anneal_epochs=1)
    gen = torch.Generator().manual_seed(0)
    snapshots = []
    for epoch in range(5):
        snap = fake_epoch(model, opt, gen)
        assert swa.active(epoch) == (epoch >= 2)
        swa.step_epoch(model, epoch)  # a no-op before swa_start
        if epoch >= 2:
            snapshots.append(snap)
    assert swa.n_averaged == 3
    assert isinstance(swa.module, nn.Sequential)  # the averaged model itself, not a wrapper
    for k, v in swa.module.named_parameters():
        want = sum(s[k] for s in snapshots) / len(snapshots)
        torch.testing.assert_close(v, want, rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("anneal_epochs", [0, 1, 3])
def test_swalr_anneals_from_the_current_lr(anneal_epochs):
    model = tiny_model()
    lr0, swa_lr = 0.4, 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr0)
    swa = SWA(model, opt, swa_start=1, swa_lr=swa_lr, anneal_epochs=anneal_epochs)
    assert opt.param_groups[0]["lr"] == lr0  # building SWA does not touch the lr
    gen = torch.Generator().manual_seed(0)
    fake_epoch(model, opt, gen)
    swa.step_epoch(model, 0)
    assert opt.param_groups[0]["lr"] == lr0  # not active yet
    for i in range(1, 6):
        fake_epoch(model, opt, gen)
        swa.step_epoch(model, i)
        t = min(1.0, i / anneal_epochs) if anneal_epochs else 1.0
        alpha = (1 - math.cos(math.pi * t)) / 2
        assert opt.param_groups[0]["lr"] == pytest.approx(swa_lr * alpha + lr0 * (1 - alpha)), i


def uint8_loader(n_batches=3, batch=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (batch, 2, 5, 5), generator=gen, dtype=torch.uint8),
             torch.zeros(batch, dtype=torch.long)) for _ in range(n_batches)]


def test_update_bn_uint8_sets_data_statistics():
    model = tiny_model().float()
    bn = model[1]
    bn.running_mean.fill_(7.0)
    bn.momentum = 0.3
    model.eval()
    loader = uint8_loader()
    update_bn_uint8(loader, model, torch.device("cpu"))
    # BN input by hand: the conv in float64; momentum=None averages the per-batch statistics.
    w, b = model[0].weight.double(), model[0].bias.double()
    feats = [torch.nn.functional.conv2d(x.double() / 255, w, b) for x, _ in loader]
    means = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats])
    vars_ = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats])
    torch.testing.assert_close(bn.running_mean.double(), means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), vars_.mean(0), rtol=1e-5, atol=1e-6)
    # equal batch sizes: the average of batch means is the mean over all the data
    all_feats = torch.cat(feats)
    torch.testing.assert_close(bn.running_mean.double(), all_feats.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.3 and not model.training


def test_finalize_recomputes_bn_of_the_averaged_model():
    model = tiny_model().float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    swa = SWA(model, opt, swa_start=0, swa_lr=0.05, anneal_epochs=1)
    opt.step()
    swa.step_epoch(model, 0)
    loader = uint8_loader(n_batches=2)
    swa.finalize(loader, torch.device("cpu"))
    ref = tiny_model().float()
    ref.load_state_dict(swa.module.state_dict())
    ref.train()
    ref[1].reset_running_stats()
    ref[1].momentum = None
    with torch.no_grad():
        for x, _ in loader:
            ref(x.float() / 255)
    torch.testing.assert_close(swa.module[1].running_mean, ref[1].running_mean)
    assert not torch.equal(swa.module[1].running_mean, torch.zeros(3))


def noisy_model():
    """Dropout before the first BatchNorm, DropPath before the second: both change BN's input statistics if on."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Dropout(0.5), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 1),
                         DropPath(0.5), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def bn_stats_by_hand(model, loader):
    """The running statistics update_bn must give, by a hand loop with Dropout and DropPath as the identity:
    BN in train mode normalises each batch by its own statistics; momentum=None averages the batch statistics."""
    F = torch.nn.functional
    conv1, bn1, conv2 = model[0], model[2], model[4]
    per_batch = {2: [], 6: []}
    with torch.no_grad():
        for x, _ in loader:
            f1 = F.conv2d(x.double() / 255, conv1.weight.double(), conv1.bias.double())  # Dropout: identity
            h = F.batch_norm(f1, None, None, bn1.weight.double(), bn1.bias.double(), training=True, eps=bn1.eps)
            f2 = F.conv2d(torch.relu(h), conv2.weight.double(), conv2.bias.double())      # DropPath: identity
            for i, f in ((2, f1), (6, f2)):
                per_batch[i].append((f.mean(dim=(0, 2, 3)), f.var(dim=(0, 2, 3), unbiased=True)))
    return {i: (torch.stack([m for m, _ in s]).mean(0), torch.stack([v for _, v in s]).mean(0))
            for i, s in per_batch.items()}


@pytest.mark.parametrize("via", ["update_bn_uint8", "finalize"])
def test_bn_is_re_estimated_with_dropout_and_drop_path_off(via):
    model = noisy_model()
    loader = uint8_loader(n_batches=4, batch=8)
    model.eval()
    model[1].train()  # a mixed state: each module's own mode must come back
    modes = [m.training for m in model.modules()]
    momenta = [model[2].momentum, model[6].momentum]
    if via == "finalize":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        swa = SWA(model, opt, swa_start=0, swa_lr=0.05, anneal_epochs=1)
        opt.step()
        swa.step_epoch(model, 0)
        model = swa.module
        modes = [m.training for m in model.modules()]
        swa.finalize(loader, torch.device("cpu"))
    else:
        update_bn_uint8(loader, model, torch.device("cpu"))
    want = bn_stats_by_hand(model, loader)
    for i in (2, 6):
        torch.testing.assert_close(model[i].running_mean.double(), want[i][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model[i].running_var.double(), want[i][1], rtol=1e-5, atol=1e-6)
        assert int(model[i].num_batches_tracked) == 4
    assert [m.training for m in model.modules()] == modes
    assert [model[2].momentum, model[6].momentum] == momenta


def test_state_dict_resume_matches_uninterrupted_run():
    def run(epochs, swa=None, model=None, opt=None, start=0, gen=None):
        for epoch in range(start, epochs):
            fake_epoch(model, opt, gen)
            swa.step_epoch(model, epoch)

    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.4)
    swa = SWA(model, opt, swa_start=1, swa_lr=0.05, anneal_epochs=3)
    run(5, swa, model, opt, gen=torch.Generator().manual_seed(1))

    model2 = tiny_model()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.4)
    swa2 = SWA(model2, opt2, swa_start=1, swa_lr=0.05, anneal_epochs=3)
    gen = torch.Generator().manual_seed(1)
    run(3, swa2, model2, opt2, gen=gen)
    buf = io.BytesIO()
    torch.save({"swa": swa2.state_dict(), "optimizer": opt2.state_dict(), "model": model2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    # train.py's order: build optimizer and SWA from the fresh model, then load each state
    model3 = tiny_model()
    opt3 = torch.optim.SGD(model3.parameters(), lr=0.4)
    swa3 = SWA(model3, opt3, swa_start=1, swa_lr=0.05, anneal_epochs=3)
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["optimizer"])
    swa3.load_state_dict(ckpt["swa"])
    assert swa3.n_averaged == 2
    run(5, swa3, model3, opt3, start=3, gen=gen)
    assert swa3.n_averaged == 4
    assert opt3.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for k, v in swa.module.state_dict().items():
        assert torch.equal(v, swa3.module.state_dict()[k]), k
