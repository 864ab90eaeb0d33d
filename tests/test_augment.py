"""Per-sample (torchvision v2) and batched augmentations: exact ops, matching distributions, flags, preview."""
import math

import pytest
import torch
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from config import parse_args
from datasets import batch_aug as B
from datasets.transforms import build_batch_augment, build_train_transform, describe
from utils.errors import UserError

P_MIN = 1e-4      # p-value floor for "same distribution" tests: fails ~1 in 10^4 runs by chance


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny per-sample ops: intra-op threads only add synchronisation on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _binomial_ok(k, n, p, sigmas=4.5):
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def _per_sample(t, x):
    return torch.stack([t(img) for img in x])


# ------------------------------------------------------------ deterministic ops against torchvision

@pytest.mark.parametrize("c", [1, 3])
def test_crop_with_padding_equals_v2_pad_then_crop(c):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (12, c, 10, 13), dtype=torch.uint8)
    top, left = torch.randint(0, 7, (12,)), torch.randint(0, 7, (12,))
    ref = torch.stack([TF.crop(TF.pad(x[i], [3]), int(top[i]), int(left[i]), 10, 13) for i in range(12)])
    assert torch.equal(B.crop_with_padding(x, 3, top, left), ref)


@pytest.mark.parametrize("c", [1, 3])
def test_colour_ops_equal_torchvision_per_sample(c):
    torch.manual_seed(1)
    x = torch.randint(0, 256, (16, c, 9, 11), dtype=torch.uint8)
    factor = torch.rand(16) * 1.6 + 0.1
    for ours, ref in ((B.adjust_brightness, TF.adjust_brightness), (B.adjust_contrast, TF.adjust_contrast),
                      (B.adjust_saturation, TF.adjust_saturation)):
        expect = torch.stack([ref(x[i], float(factor[i])) for i in range(16)])
        assert torch.equal(ours(x, factor), expect), ours.__name__
    hue = torch.rand(16) - 0.5
    expect = torch.stack([TF.adjust_hue(x[i], float(hue[i])) for i in range(16)])
    assert (B.adjust_hue(x, hue).int() - expect.int()).abs().max() <= 1


@pytest.mark.parametrize("c", [1, 3])
def test_resized_crop_matches_v2_resized_crop(c):
    torch.manual_seed(2)
    x = torch.randint(0, 256, (16, c, 12, 14), dtype=torch.uint8)
    top, left, h, w = B.random_resized_crop_params(16, 12, 14, scale=(0.1, 1.0))
    expect = torch.stack([TF.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [12, 14],
                                          antialias=True) for i in range(16)])
    diff = (B.resized_crop(x, top, left, h, w).int() - expect.int()).abs()
    assert diff.max() <= 1                      # uint8 rounding of torch's fixed-point resize
    assert (diff > 0).float().mean() < 0.3


def test_cutout_zeroes_exactly_n_size_squared_pixels():
    x = torch.full((2, 3, 20, 20), 200, dtype=torch.uint8)
    cy = torch.tensor([[4, 4, 14], [10, 3, 16]])
    cx = torch.tensor([[4, 14, 9], [10, 16, 3]])
    out = B.cutout(x, 3, 5, centers=(cy, cx))               # non-overlapping, non-clipping holes
    assert ((out == 0).sum(dim=(2, 3)) == 3 * 5 * 5).all()
    assert ((out == 200) | (out == 0)).all()
    out = B.cutout(x[:1], 1, 5, centers=(torch.tensor([[0]]), torch.tensor([[19]])))
    assert (out[0, 0] == 0).sum() == 3 * 3                  # clipped at a corner: rows 0..2, cols 17..19
    assert (out[0, 0, :3, 17:] == 0).all()


def test_flip_where_flips_only_selected_samples():
    x = torch.arange(4 * 2 * 3 * 5, dtype=torch.uint8).view(4, 2, 3, 5)
    mask = torch.tensor([True, False, False, True])
    for dim in (2, 3):
        out = B.flip_where(x, mask, dim)
        for i in range(4):
            assert torch.equal(out[i], x[i].flip(dim - 1) if mask[i] else x[i])


# ------------------------------------------------------------ random ops: rates and distributions

def test_random_erasing_fires_with_frequency_p():
    torch.manual_seed(3)
    n, p = 4000, 0.3
    x = torch.full((n, 1, 16, 16), 255, dtype=torch.uint8)
    fired = (B.random_erasing(x, p) == 0).flatten(1).any(1)
    assert _binomial_ok(int(fired.sum()), n, p)


def test_random_erasing_area_distribution_matches_torchvision():
    torch.manual_seed(4)
    n = 1500
    x = torch.full((n, 1, 12, 12), 255, dtype=torch.uint8)
    ours = (B.random_erasing(x, 1.0) == 0).sum(dim=(1, 2, 3))
    ref = (_per_sample(v2.RandomErasing(1.0, value=0), x) == 0).sum(dim=(1, 2, 3))
    bins = [0, 4, 8, 12, 16, 20, 25, 30, 36, 45, 145]
    table = [torch.histogram(a.double(), torch.tensor(bins, dtype=torch.float64)).hist for a in (ours, ref)]
    assert stats.chi2_contingency(torch.stack(table).numpy()).pvalue > P_MIN


def test_random_resized_crop_box_distribution_matches_torchvision():
    torch.manual_seed(5)
    n, h, w = 3000, 20, 24
    top, left, ch, cw = B.random_resized_crop_params(n, h, w, scale=(0.2, 1.0))
    t = v2.RandomResizedCrop((h, w), scale=(0.2, 1.0))
    ref = [t.make_params([torch.empty(1, h, w)]) for _ in range(n)]
    for ours, key, hi in ((ch * cw, None, h * w), (top, "top", h), (left, "left", w)):
        theirs = torch.tensor([r["height"] * r["width"] if key is None else r[key] for r in ref])
        edges = torch.linspace(0, hi + 1, 9, dtype=torch.float64)
        table = torch.stack([torch.histogram(a.double(), edges).hist for a in (ours, theirs)])
        table = table[:, table.sum(0) > 0]
        assert stats.chi2_contingency(table.numpy()).pvalue > P_MIN, key


def _marker_batch(n, h=12, w=12, c=1):
    """One bright pixel at a known, asymmetric place, so crops and flips are recoverable from the output."""
    x = torch.zeros(n, c, h, w, dtype=torch.uint8)
    x[:, :, 5, 3] = 255
    return x


def _fast_and_per_sample(argv, x):
    args = parse_args(argv)
    fast = build_batch_augment(args, x.shape[1])(x)
    slow = _per_sample(build_train_transform(args, x.shape[1]), x)
    return fast, slow


def test_flip_rate_agrees_between_fast_and_per_sample_paths():
    torch.manual_seed(6)
    n, p = 10000, 0.3
    fast, slow = _fast_and_per_sample(["--hflip", str(p)], _marker_batch(n))
    rates = []
    for out in (fast, slow):
        flipped = out[:, 0, 5, 12 - 1 - 3] == 255
        assert (flipped | (out[:, 0, 5, 3] == 255)).all()
        assert _binomial_ok(int(flipped.sum()), n, p)
        rates.append(int(flipped.sum()))
    table = [[rates[0], n - rates[0]], [rates[1], n - rates[1]]]
    assert stats.chi2_contingency(table).pvalue > P_MIN


def test_crop_offset_histogram_agrees_between_fast_and_per_sample_paths():
    torch.manual_seed(7)
    n, pad = 3000, 2
    fast, slow = _fast_and_per_sample(["--crop_padding", str(pad), "--hflip", "0"], _marker_batch(n))
    hists = []
    for out in (fast, slow):
        pos = (out[:, 0] == 255).flatten(1).float().argmax(1)
        dy, dx = pos // 12 - 5, pos % 12 - 3                  # marker shift = pad - offset, in [-pad, pad]
        assert (out == 255).flatten(1).sum(1).eq(1).all()
        assert dy.abs().max() <= pad and dx.abs().max() <= pad
        hists.append(torch.bincount((dy + pad) * (2 * pad + 1) + dx + pad, minlength=(2 * pad + 1) ** 2))
    for h in hists:                                         # each uniform over the 25 offsets
        assert stats.chisquare(h.numpy()).pvalue > P_MIN
    assert stats.chi2_contingency(torch.stack(hists).numpy()).pvalue > P_MIN


def test_color_jitter_distribution_agrees_between_fast_and_per_sample_paths():
    torch.manual_seed(8)
    n = 1500
    x = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    x[:, 0], x[:, 1], x[:, 2] = 180, 90, 40
    x[:, :, :2] //= 2
    fast, slow = _fast_and_per_sample(["--color_jitter", "0.4", "0.4", "0.4", "0.1"], x)
    for ch in range(3):
        edges = torch.linspace(0, 256, 9, dtype=torch.float64)
        table = torch.stack([torch.histogram(o[:, ch, 0, 0].double(), edges).hist for o in (fast, slow)])
        table = table[:, table.sum(0) > 0]
        assert stats.chi2_contingency(table.numpy()).pvalue > P_MIN, ch


# ------------------------------------------------------------ builders

ALL_FLAGS = ["--hflip", "0.5", "--vflip", "0.5", "--rotate", "15", "--crop_padding", "2",
             "--random_resized_crop", "0.5", "--blur", "0.5", "--color_jitter", "0.3", "0.3", "0.3", "0.05",
             "--affine", "0.1", "0.1", "5", "--perspective", "0.5", "--cutout", "1", "4",
             "--random_erasing", "0.5"]


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("auto", ["autoaugment", "randaugment", "trivialaugment", "augmix"])
def test_every_flag_gives_uint8_of_the_same_shape(c, auto):
    args = parse_args(ALL_FLAGS + ["--auto_augment", auto])
    x = torch.randint(0, 256, (4, c, 16, 16), dtype=torch.uint8)
    for out in (build_batch_augment(args, c)(x), build_train_transform(args, c)(x[0])[None]):
        assert out.dtype == torch.uint8 and out.shape[1:] == x.shape[1:]


def test_nothing_enabled_gives_none_and_describe_lists_flags():
    args = parse_args(["--hflip", "0"])  # the default recipe's only augmentation, off
    assert build_train_transform(args, 1) is None and build_batch_augment(args, 1) is None
    assert describe(args) == []
    lines = describe(parse_args(["--hflip", "0.5", "--cutout", "2", "8", "--mixup_alpha", "0.2"]))
    assert lines == ["hflip p=0.5", "cutout 2 holes of 8px", "mixup alpha=0.2", "mix_prob=1.0"]


@pytest.mark.parametrize("argv", [["--hflip", "1.5"], ["--random_erasing", "-0.1"], ["--rotate", "-3"],
                                  ["--color_jitter", "0.1", "0.1", "0.1", "0.7"], ["--cutout", "0", "4"],
                                  ["--affine", "0.1", "1.0", "0"], ["--random_resized_crop", "1.5"]])
def test_bad_flags_raise_user_error(argv):
    with pytest.raises(UserError):
        build_batch_augment(parse_args(argv), 1)


@pytest.mark.parametrize("flag", [["--rotate", "30"], ["--affine", "0.2", "0.2", "10"], ["--blur", "1.0"],
                                  ["--perspective", "1.0"], ["--auto_augment", "trivialaugment"]])
def test_looped_ops_draw_parameters_per_sample(flag):
    """v2 on a whole batch would transform every sample identically; the batch path must not."""
    torch.manual_seed(9)
    img = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    out = build_batch_augment(parse_args(flag), 3)(img.repeat(8, 1, 1, 1))
    assert len({tuple(o.flatten().tolist()) for o in out}) > 4


def test_batch_augment_resumes_exactly_from_torch_rng_state():
    args = parse_args(ALL_FLAGS)
    aug = build_batch_augment(args, 3)
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(10)
    aug(x)
    state = torch.get_rng_state()
    first = aug(x)
    torch.set_rng_state(state)
    assert torch.equal(aug(x), first)
    assert not torch.equal(aug(x), first)


def test_preview_writes_png(tmp_path):
    from reporting.preview import save_aug_preview
    from tricks.mix import build_mixer
    args = parse_args(["--hflip", "0.5", "--crop_padding", "2", "--mixup_alpha", "0.4", "--cutmix_alpha", "1"])
    x = torch.randint(0, 256, (6, 1, 12, 12), dtype=torch.uint8)
    path = save_aug_preview(x, torch.arange(6) % 3, ["a", "b", "c"], build_batch_augment(args, 1),
                            build_mixer(args, 3), tmp_path / "aug.png", n=4)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
