"""Mixup, CutMix and Mosaic: soft labels equal the exact share of pixels taken from each source image."""
import math

import pytest
import torch
from scipy import stats

from config import parse_args
from tricks.mix import Mixer, build_mixer, cutmix, cutmix_box, mixup, mosaic
from utils.errors import UserError

N, H, W = 6, 10, 14


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny batches: intra-op threads only add synchronisation on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _constant_batch(n=N, h=H, w=W):
    """Image i is the constant i + 1 and has class i, so a pixel's value names its source image."""
    x = (torch.arange(n, dtype=torch.float64) + 1).view(n, 1, 1, 1).expand(n, 2, h, w).clone()
    y = torch.arange(n)
    return x, y, torch.nn.functional.one_hot(y, n).double()


def _pixel_shares(x_mixed):
    """(N, N) fraction of each output image's pixels that came from each source image."""
    n = x_mixed.shape[0]
    src = x_mixed[:, 0].round().long() - 1
    return torch.stack([torch.bincount(s.flatten(), minlength=n) for s in src]).double() / src[0].numel()


def test_mixup_blends_images_and_labels_with_lam():
    x, _, y1 = _constant_batch()
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    xm, ym = mixup(x, y1, 0.3, perm)
    expect = 0.3 * (torch.arange(N) + 1) + 0.7 * (perm + 1)
    torch.testing.assert_close(xm[:, :, 0, 0], expect.double()[:, None].expand(N, 2))
    assert (xm == xm[:, :, :1, :1]).all()
    torch.testing.assert_close(ym.sum(1), torch.ones(N, dtype=torch.float64))
    torch.testing.assert_close(ym[torch.arange(N), torch.arange(N)], torch.full((N,), 0.3, dtype=torch.float64))
    torch.testing.assert_close(ym[torch.arange(N), perm], torch.full((N,), 0.7, dtype=torch.float64))


@pytest.mark.parametrize("box", [(2, 7, 3, 11), (0, 10, 0, 4), (0, 0, 0, 0), (9, 10, 13, 14)])
def test_cutmix_weights_equal_pasted_area(box):
    x, _, y1 = _constant_batch()
    perm = torch.tensor([1, 2, 3, 4, 5, 0])
    xm, ym = cutmix(x, y1, box, perm)
    torch.testing.assert_close(ym, _pixel_shares(xm))
    area = (box[1] - box[0]) * (box[3] - box[2])
    torch.testing.assert_close(ym[0, 1].item(), area / (H * W))


@pytest.mark.parametrize("cx,cy", [(5, 3), (0, 0), (14, 10), (7, 10), (1, 9)])
def test_mosaic_weights_equal_tile_areas(cx, cy):
    x, _, y1 = _constant_batch()
    perms = [torch.tensor(p) for p in ([1, 2, 3, 4, 5, 0], [2, 3, 4, 5, 0, 1], [3, 4, 5, 0, 1, 2])]
    xm, ym = mosaic(x, y1, cx, cy, perms)
    torch.testing.assert_close(ym, _pixel_shares(xm))
    torch.testing.assert_close(ym.sum(1), torch.ones(N, dtype=torch.float64))
    assert (xm[0, :, :cy, :cx] == 1).all() and (xm[0, :, cy:, cx:] == 4).all()


def test_lambda_one_leaves_the_batch_unchanged():
    x, _, y1 = _constant_batch()
    x = x + torch.rand_like(x)
    perm = torch.randperm(N)
    for xm, ym in (mixup(x, y1, 1.0, perm), cutmix(x, y1, cutmix_box(H, W, 1.0), perm)):
        assert torch.equal(xm, x) and torch.equal(ym, y1)


@pytest.mark.parametrize("kw", [dict(mixup_alpha=0.4), dict(cutmix_alpha=1.0), dict(mosaic_prob=1.0),
                                dict(mixup_alpha=0.4, cutmix_alpha=1.0, mosaic_prob=0.3, mix_prob=0.8)])
def test_mixer_soft_labels_equal_pixel_shares(kw):
    """CutMix and Mosaic labels equal the counted pixel shares; Mixup's equal its blend weight."""
    torch.manual_seed(0)
    mixer = Mixer(N, **kw)
    x, y, _ = _constant_batch()
    for _ in range(40):
        xm, ym = mixer(x, y)
        assert ym.dtype == x.dtype and ym.shape == (N, N)
        torch.testing.assert_close(ym.sum(1), torch.ones(N, dtype=torch.float64))
        if (xm == xm.round()).all():                      # pasted (or unmixed): count pixels
            torch.testing.assert_close(ym, _pixel_shares(xm))
        else:                                             # mixup: pixel value = sum_j w_j * (j + 1)
            torch.testing.assert_close(xm[:, 0, 0, 0], ym @ (torch.arange(N) + 1).double())


def test_cutmix_box_area_follows_lambda_when_not_clipped():
    torch.manual_seed(1)
    checked = 0
    for lam in (0.1, 0.5, 0.9):
        cut = int(100 * math.sqrt(1 - lam)) // 2 * 2          # Yun et al.: cut // 2 on each side of the centre
        for _ in range(20):
            y0, y1, x0, x1 = cutmix_box(100, 100, lam)
            assert 0 <= y0 <= y1 <= 100 and 0 <= x0 <= x1 <= 100
            if 0 < y0 and y1 < 100 and 0 < x0 and x1 < 100:
                assert (y1 - y0, x1 - x0) == (cut, cut)
                checked += 1
    assert checked > 10


def _mix_kinds(mixer, trials, n=8):
    """Count batches left unmixed, pasted by CutMix, pasted by Mosaic (> 2 sources) and blended (Mixup).

    A mixed batch can look unmixed (identity permutation: 1/8!; CutMix box empty: lam > 0.984), rarely.
    """
    x, y, _ = _constant_batch(n, 16, 16)
    kinds = {"none": 0, "paste": 0, "blend": 0, "mosaic": 0}
    for _ in range(trials):
        xm, ym = mixer(x, y)
        if torch.equal(xm, x):
            kinds["none"] += 1
        elif not (xm == xm.round()).all():
            kinds["blend"] += 1
        elif (ym > 0).sum(1).max() > 2:
            kinds["mosaic"] += 1
        else:
            kinds["paste"] += 1
    return kinds


def test_mix_prob_and_switch_prob_frequencies():
    torch.manual_seed(2)
    trials = 600
    kinds = _mix_kinds(Mixer(8, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.7, mix_prob=0.6), trials)
    mixed = trials - kinds["none"]
    assert stats.binomtest(mixed, trials, 0.6).pvalue > 1e-4
    assert stats.binomtest(kinds["paste"], kinds["paste"] + kinds["blend"], 0.7).pvalue > 1e-4


def test_mosaic_prob_frequency():
    torch.manual_seed(3)
    kinds = _mix_kinds(Mixer(8, mixup_alpha=1.0, mosaic_prob=0.25), 600)
    assert stats.binomtest(kinds["mosaic"], 600, 0.25).pvalue > 1e-4
    assert kinds["paste"] == 0


def test_mixup_lambda_is_beta_distributed():
    torch.manual_seed(4)
    alpha = 0.4
    mixer = Mixer(2, mixup_alpha=alpha)
    x, y, _ = _constant_batch(2, 2, 2)
    lams = [mixer(x, y)[1][0, 0].item() for _ in range(400)]          # perm [1, 0]: y[0, 0] = lam
    lams = [v for v in lams if v < 1.0]                                  # drop identity permutations
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 1e-4


def test_unmixed_batch_gets_exact_one_hot_targets_without_smoothing():
    x, y, y1 = _constant_batch()
    xm, ym = Mixer(N, mixup_alpha=1.0, mix_prob=0.0)(x, y)
    assert torch.equal(xm, x) and torch.equal(ym, y1)


def test_build_mixer():
    assert build_mixer(parse_args([]), 10) is None
    m = build_mixer(parse_args(["--cutmix_alpha", "1.0", "--mosaic", "0.2", "--mix_prob", "0.5",
                                "--mix_switch_prob", "0.3", "--mix_off_epoch", "7"]), 10)
    assert (m.num_classes, m.cutmix_alpha, m.mosaic_prob, m.mix_prob, m.switch_prob, m.off_epoch) == \
        (10, 1.0, 0.2, 0.5, 0.3, 7)
    for argv in (["--mixup_alpha", "-1"], ["--mosaic", "2"], ["--mix_prob", "1.1"]):
        with pytest.raises(UserError):
            build_mixer(parse_args(argv), 10)
