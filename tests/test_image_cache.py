"""--cache_images ram: file datasets decoded once into memory give the same images, labels, splits, statistics
and order as decoding from disk, train end to end, and refuse what they cannot do."""
import numpy as np
import pytest
import torch
from PIL import Image

import config
import datasets
from datasets import files
from datasets.files import load_image
from utils.errors import UserError


def parse(*argv):
    return config.parse_args([str(a) for a in argv])


def write_folder(root, classes=("cat", "dog", "eel"), per_class=7):
    """Class folders of random RGB images of mixed sizes and formats (PNG, JPEG, a greyscale PNG)."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            h, w = int(rng.integers(9, 30)), int(rng.integers(9, 30))
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            if i % 3 == 0:
                img.save(root / c / f"{i}.jpg", quality=90)
            elif i % 3 == 1:
                img.convert("L").save(root / c / f"{i}.png")
            else:
                img.save(root / c / f"{i}.png")
    return root


def batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y, *_ in loader]


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "imgs")


def build(folder, *flags):
    return datasets.build_data(parse("--dataset", "imagefolder", "--data_dir", folder, "--img_size", 12,
                                     "--batch_size", 4, "--val_ratio", 0.3, "--hflip", 0, *flags))


def test_cache_holds_what_the_disk_path_decodes(folder):
    disk, ram = build(folder), build(folder, "--cache_images", "ram")
    assert disk.train_images is None and ram.train_images.dtype == torch.uint8
    assert ram.train_images.shape == (len(ram.train_labels), 3, 12, 12)
    assert torch.equal(disk.train_labels, ram.train_labels) and disk.class_names == ram.class_names
    assert disk.val_paths == ram.val_paths and len(ram.val_paths) == 21 - len(ram.train_labels)
    assert disk.mean == ram.mean and disk.std == ram.std
    # the training split's images, in split order, are PIL's decode of each file
    train_paths = disk.train_loader.loader.dataset.paths
    assert torch.equal(ram.train_images, torch.stack([load_image(p, 3, 12) for p in train_paths]))
    # with no augmentation, every batch of every epoch is the same on both paths (one index order)
    for epoch in (0, 1):
        for (xd, yd), (xr, yr) in zip(batches(disk.train_loader, epoch), batches(ram.train_loader, epoch),
                                      strict=True):
            assert torch.equal(xd, xr) and torch.equal(yd, yr)
    for (xd, yd), (xr, yr) in zip(batches(disk.val_loader), batches(ram.val_loader), strict=True):
        assert torch.equal(xd, xr) and torch.equal(yd, yr)


def test_cached_validation_paths_name_the_loaders_images(folder):
    data = build(folder, "--cache_images", "ram", "--in_chans", 1)
    x = torch.cat([x for x, _ in batches(data.val_loader)])
    assert torch.equal(x, torch.stack([load_image(p, 1, 12) for p in data.val_paths]))


def test_cache_takes_the_batched_augmentation_and_alternating_flips(folder):
    data = build(folder, "--cache_images", "ram", "--hflip", 0.5, "--hflip_mode", "alternate")
    loader, images = data.train_loader, data.train_images
    assert loader.flip_bits is not None
    seen = {}
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        for x, _ in loader:
            for img in x:  # each batch image is its source image or its mirror, and they alternate per epoch
                i = next(k for k in range(len(images))
                         if torch.equal(img, images[k]) or torch.equal(img, images[k].flip(2)))
                seen.setdefault(i, []).append(torch.equal(img, images[i].flip(2)) and
                                              not torch.equal(images[i], images[i].flip(2)))
    assert all(len(v) < 2 or v[0] != v[1] for v in seen.values())
    assert any(len(v) == 2 for v in seen.values())


def test_memory_check_refuses_a_cache_that_does_not_fit(folder, monkeypatch):
    assert files.check_cache_fits(10, 3, 8, available=10 * 3 * 8 * 8 * 2) == 1920  # exactly half: fits
    with pytest.raises(UserError, match="needs 0.0 GiB for 11 images at 3x8x8"):
        files.check_cache_fits(11, 3, 8, available=10 * 3 * 8 * 8 * 2)
    assert files.check_cache_fits(10**9, 3, 224, available=None)  # unknown memory: no refusal
    monkeypatch.setattr(files, "available_memory", lambda: 1000)
    with pytest.raises(UserError, match=r"21 images.*drop --cache_images ram"):
        build(folder, "--cache_images", "ram")
    build(folder)  # without the cache, the same machine trains from disk


def test_available_memory_reads_meminfo():
    text = open("/proc/meminfo").read()
    kib = int(next(line for line in text.splitlines() if line.startswith("MemAvailable:")).split()[1])
    assert abs(files.available_memory() - kib * 1024) < 2**30  # it moves between the two reads


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "fashion_mnist", "--cache_images", "ram"], "always held in memory"),
    (["--dataset", "imagefolder", "--img_size", 64, "--crop_pct", 0.875, "--cache_images", "ram"], "drop one"),
    (["--dataset", "imagefolder", "--hflip_mode", "alternate"], "--cache_images ram"),
])
def test_impossible_combinations(flags, message, tmp_path):
    with pytest.raises(UserError, match=message):
        datasets.build_data(parse("--data_dir", tmp_path, *flags))



def test_crossval_names_cached_validation_images_by_file(folder):
    import crossval
    argv = ["--dataset", "imagefolder", "--data_dir", folder, "--img_size", 8, "--kfold", 3, "--fold", 1]
    disk = crossval.sample_ids(datasets.build_data(parse(*argv)), str(folder))
    ram = crossval.sample_ids(datasets.build_data(parse(*argv, "--cache_images", "ram")), str(folder))
    assert disk == ram and len(ram) == 7 and all(s.split("/")[0] in ("cat", "dog", "eel") for s in ram)
