"""imgaug backend on numpy 2, and per-worker seeding: valid uint8, exact flips/crops, reproducible seeds; the seed
preset is the seed's Sequential, parameter for parameter and pixel for pixel."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from config import parse_args
from datasets import batch_aug as B
from datasets.imgaug_compat import import_imgaug
from datasets.transforms import build_batch_augment, build_imgaug_sequence, build_train_transform, describe, seed_worker
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMPAT_CHECK = r"""
import numpy as np
native_bool = np.lib.NumpyVersion(np.__version__) >= "2.0.0"    # numpy 2 re-added np.bool as np.bool_

def bool_untouched():
    return (np.bool is np.bool_) if native_bool else not hasattr(np, "bool")

assert np.__version__.startswith("2"), np.__version__
assert not hasattr(np, "sctypes") and not hasattr(np, "complex") and bool_untouched()
import datasets.imgaug_compat as compat
assert not hasattr(np, "sctypes") and not hasattr(np, "complex")  # importing the module patches nothing
iaa = compat.import_imgaug()
assert sorted(np.sctypes) == ["complex", "float", "int", "others", "uint"]
assert np.sctypes["float"] == [np.float16, np.float32, np.float64, np.longdouble]
assert np.complex is complex and bool_untouched()
import scipy.ndimage
assert scipy.ndimage.binary_dilation(np.eye(4, dtype=bool)).dtype == np.bool_
img = np.arange(12, dtype=np.uint8).reshape(1, 3, 4, 1)
out = iaa.Sequential([iaa.Fliplr(1.0), iaa.GaussianBlur(sigma=0.5)])(images=img)
assert out.dtype == np.uint8 and out.shape == img.shape
print("ok")
"""


def test_import_imgaug_restores_only_sctypes_and_complex_in_a_fresh_numpy_2():
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", COMPAT_CHECK], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


IMGAUG_FLAGS = ["--aug_backend", "imgaug", "--hflip", "0.5", "--vflip", "0.5", "--rotate", "15",
                "--crop_padding", "2", "--random_resized_crop", "0.5", "--blur", "0.5",
                "--color_jitter", "0.3", "0.3", "0.3", "0.05", "--affine", "0.1", "0.1", "5",
                "--perspective", "0.5", "--cutout", "1", "4", "--random_erasing", "0.5"]


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("argv", [IMGAUG_FLAGS, ["--imgaug_preset", "seed"]])
def test_imgaug_backend_gives_uint8_tensors(c, argv):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (5, c, 16, 16), dtype=torch.uint8)
    for out in (build_batch_augment(parse_args(argv), c)(x), build_train_transform(parse_args(argv), c)(x[0])[None]):
        assert out.dtype == torch.uint8 and out.shape[1:] == x.shape[1:] and out.is_contiguous()
    assert not torch.equal(build_batch_augment(parse_args(argv), c)(x), x)
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        assert np.bool is np.bool_
    else:
        assert not hasattr(np, "bool")


def _seed_sequential(iaa):
    """The seed's pipeline, as the seed wrote it."""
    return iaa.Sequential([iaa.Fliplr(0.5), iaa.Flipud(0.5), iaa.GaussianBlur(sigma=(0.0, 0.1)),
                           iaa.MultiplyBrightness(mul=(0.65, 1.35))])


def _uniform_bounds(param):
    return param.a.value, param.b.value


@pytest.mark.parametrize("c", [1, 3])
def test_seed_preset_has_the_seeds_parameters(c):
    iaa = import_imgaug()
    seq = build_imgaug_sequence(parse_args(["--imgaug_preset", "seed", "--hflip", "0"]), c, 16, 16)
    fliplr, flipud, blur, bright = seq
    assert isinstance(fliplr, iaa.Fliplr) and fliplr.p.p.value == 0.5
    assert isinstance(flipud, iaa.Flipud) and flipud.p.p.value == 0.5
    assert isinstance(blur, iaa.GaussianBlur) and _uniform_bounds(blur.sigma) == (0.0, 0.1)
    if c == 3:
        assert type(bright) is iaa.MultiplyBrightness
        multiply = bright.children[0]  # MultiplyBrightness multiplies the brightness channel with a Multiply
    else:
        multiply = bright  # one channel: Multiply itself (MultiplyBrightness needs RGB)
    assert type(multiply) is iaa.Multiply and _uniform_bounds(multiply.mul) == (0.65, 1.35)
    assert multiply.per_channel.value == 0


def test_seed_preset_output_equals_the_seeds_sequential_for_the_same_imgaug_seed():
    iaa = import_imgaug()
    images = np.random.default_rng(0).integers(0, 256, (16, 20, 20, 3), dtype=np.uint8)
    ours = build_imgaug_sequence(parse_args(["--imgaug_preset", "seed", "--hflip", "0"]), 3, 20, 20)
    seen = set()
    for seed in range(3):
        theirs = _seed_sequential(iaa)
        ours.seed_(seed)
        theirs.seed_(seed)
        out = ours(images=images)
        np.testing.assert_array_equal(out, theirs(images=images))
        seen.add(out.tobytes())
    assert len(seen) == 3 and not np.array_equal(out, images)


def test_seed_preset_is_in_the_run_log():
    lines = describe(parse_args(["--imgaug_preset", "seed"]))
    line = next(line for line in lines if "seed preset" in line)
    for value in ("Fliplr p=0.5", "Flipud p=0.5", "sigma=(0.0, 0.1)", "MultiplyBrightness mul=(0.65, 1.35)"):
        assert value in line, line


@pytest.mark.parametrize("auto,c", [("augmix", 3), ("autoaugment", 3), ("randaugment", 1)])
def test_imgaug_backend_refuses_auto_augment_it_lacks_at_build_time(auto, c):
    with pytest.raises(UserError):
        build_train_transform(parse_args(["--aug_backend", "imgaug", "--auto_augment", auto]), c)


def test_imgaug_flip_and_crop_padding_are_exact():
    torch.manual_seed(1)
    x = torch.randint(1, 256, (3, 3, 10, 12), dtype=torch.uint8)
    flip = build_batch_augment(parse_args(["--aug_backend", "imgaug", "--hflip", "1.0"]), 3)
    assert torch.equal(flip(x), x.flip(3))
    crop = build_batch_augment(parse_args(["--aug_backend", "imgaug", "--crop_padding", "2", "--hflip", "0"]), 3)
    offsets = set()
    for _ in range(10):
        out = crop(x)
        for i in range(3):   # imgaug's integer shift must equal some v2-style crop after zero padding
            hits = [(t, left) for t in range(5) for left in range(5)
                    if torch.equal(B.crop_with_padding(x[i:i + 1], 2, torch.tensor([t]), torch.tensor([left]))[0],
                                   out[i])]
            assert len(hits) == 1
            offsets.add(hits[0])
    assert len(offsets) > 5


def test_imgaug_draws_per_image_and_reproduces_from_torch_seed():
    aug = build_batch_augment(parse_args(IMGAUG_FLAGS), 3)
    x = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8).repeat(6, 1, 1, 1)
    torch.manual_seed(2)
    a = aug(x)
    torch.manual_seed(2)
    b = aug(x)
    torch.manual_seed(3)
    c = aug(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(o.flatten().tolist()) for o in a}) == 6


def test_seed_worker_seeds_random_numpy_and_imgaug_from_torch_seed():
    import_imgaug()
    import imgaug.random as iarandom
    saved = random.getstate(), np.random.get_state(), iarandom.get_global_rng().state, torch.get_rng_state()

    def draws(seed):
        torch.manual_seed(seed)
        seed_worker(0)
        return random.random(), np.random.rand(), int(iarandom.get_global_rng().integers(0, 2 ** 30))

    try:
        a, b, c = draws(11), draws(11), draws(12)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        iarandom.get_global_rng().state = saved[2]
        torch.set_rng_state(saved[3])
    assert a == b
    assert all(u != v for u, v in zip(a, c))


class _SameImage(Dataset):
    """Eight copies of one image, augmented, plus a numpy draw (which workers share unless seeded)."""

    def __init__(self, transform):
        self.transform = transform
        self.img = torch.arange(3 * 12 * 12, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 12, 12)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.transform(self.img), np.random.randint(2 ** 30)


def _load(transform, seed):
    loader = DataLoader(_SameImage(transform), batch_size=4, num_workers=2, worker_init_fn=seed_worker,
                        generator=torch.Generator().manual_seed(seed))
    return list(loader)          # batch 0 comes from worker 0, batch 1 from worker 1


@pytest.mark.parametrize("backend", ["torchvision", "imgaug"])
def test_dataloader_workers_differ_and_the_seed_reproduces_them(backend):
    args = parse_args(["--aug_backend", backend, "--hflip", "0.5", "--crop_padding", "3", "--rotate", "20"])
    transform = build_train_transform(args, 3)
    (x0, r0), (x1, r1) = _load(transform, seed=5)
    assert not torch.equal(x0, x1)                     # worker 1 does not repeat worker 0's augmentations
    assert set(r0.tolist()).isdisjoint(r1.tolist())    # nor its numpy stream
    (y0, q0), (y1, q1) = _load(transform, seed=5)
    assert torch.equal(x0, y0) and torch.equal(x1, y1) and torch.equal(r0, q0) and torch.equal(r1, q1)
    (z0, _), _ = _load(transform, seed=6)
    assert not torch.equal(x0, z0)
