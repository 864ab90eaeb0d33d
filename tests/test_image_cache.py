"""--cache_images ram: file datasets decoded once into memory give the same images, labels, splits, statistics
and order as decoding from disk, train end to end, and refuse what they cannot do."""
import os

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
    # the statistics from the decode check's pixel sums equal a histogram count over the cached images
    assert np.allclose(ram.mean, datasets.uint8_mean_std(ram.train_images)[0], rtol=0, atol=1e-12)
    assert np.allclose(ram.std, datasets.uint8_mean_std(ram.train_images)[1], rtol=0, atol=1e-12)
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


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_paths_name_each_loaders_images_in_order(tmp_path, rank, world_size):
    write_folder(tmp_path / "train")
    write_folder(tmp_path / "val", per_class=3)
    write_folder(tmp_path / "test", per_class=4)
    argv = ["--dataset", "imagefolder", "--data_dir", tmp_path, "--img_size", 12, "--batch_size", 4, "--in_chans", 1]
    disk = datasets.build_data(parse(*argv), rank=rank, world_size=world_size)
    for loader, paths in ((disk.val_loader, disk.val_paths), (disk.test_loader, disk.test_paths)):
        assert paths == [loader.loader.dataset.paths[i] for i in loader.sampler]  # the file loader's own order
    ram = datasets.build_data(parse(*argv, "--cache_images", "ram"), rank=rank, world_size=world_size)
    assert (ram.val_paths, ram.test_paths) == (disk.val_paths, disk.test_paths)
    for loader, paths in ((ram.val_loader, ram.val_paths), (ram.test_loader, ram.test_paths)):
        x = torch.cat([x for x, _ in batches(loader)])
        assert torch.equal(x, torch.stack([load_image(p, 1, 12) for p in paths]))


def test_stacking_frees_each_image_after_its_last_use():
    images = {p: torch.full((1, 2, 2), i, dtype=torch.uint8) for i, p in enumerate("abcde")}
    decoded = dict(images)
    splits = {"train": (["a", "b", "c"], np.array([0, 1, 0])), "val": (["c", "d"], np.array([0, 1])), "test": None}
    out = datasets.stack_decoded(decoded, splits)
    assert decoded == {}  # "e" (in no split) and every used image are gone
    assert torch.equal(out["train"][0], torch.stack([images[p] for p in "abc"])) and out["test"] is None
    assert torch.equal(out["val"][0], torch.stack([images[p] for p in "cd"]))
    assert out["val"][1].tolist() == [0, 1]


def test_a_cache_stored_on_the_cpu_is_copied_to_the_device_before_flips(monkeypatch):
    """--cache_images ram on a GPU too small for it: the batch is gathered on the CPU, then everything the loop
    sees (images, labels, indices) is on the run's device ("meta" stands in for the GPU here)."""
    from datasets.loader import InMemoryLoader
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)  # needs CUDA; the copy is what counts
    loader = InMemoryLoader(torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.arange(10), 4, shuffle=True,
                            seed=0, device="meta", storage="cpu", alternate_flip=True, with_index=True)
    assert loader.images.device.type == "cpu"
    for x, y, j in loader:
        assert (x.device.type, y.device.type, j.device.type) == ("meta", "meta", "meta")


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
    with pytest.raises(UserError, match="2 processes each holding a copy"):  # torchrun: a cache per rank
        files.check_cache_fits(10, 3, 8, available=10 * 3 * 8 * 8 * 2, copies=2)
    monkeypatch.setattr(files, "available_memory", lambda: 1000)
    with pytest.raises(UserError, match=r"21 images.*drop --cache_images ram"):
        build(folder, "--cache_images", "ram")
    build(folder)  # without the cache, the same machine trains from disk



def test_classes_are_chosen_before_the_decode_check_and_the_cache(folder, monkeypatch):
    disk, chosen = (build(folder, *cache, "--classes", "eel", "0") for cache in ([], ["--cache_images", "ram"]))
    assert chosen.class_names == disk.class_names == ["cat", "eel"]
    assert torch.equal(chosen.train_labels, disk.train_labels) and set(chosen.train_labels.tolist()) == {0, 1}
    assert chosen.val_paths == disk.val_paths and not [p for p in chosen.val_paths if "/dog/" in p]
    (folder / "dog" / "3.png").write_bytes(b"not a png")  # an unreadable image in a class left out
    assert build(folder, "--classes", "cat", "eel").class_names == ["cat", "eel"]
    with pytest.raises(UserError, match="unreadable"):
        build(folder)
    sizes = []
    monkeypatch.setattr(files, "check_cache_fits", lambda count, *a, **k: sizes.append(count) or 0)
    build(folder, "--cache_images", "ram", "--classes", "cat", "eel")
    assert sizes == [14]  # 2 classes x 7 images, not the 21 listed

def fake_root(tmp_path, meminfo_kib, cgroup=None):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {meminfo_kib} kB\n")
    for name, text in (cgroup or {}).items():
        (tmp_path / "sys" / "fs" / "cgroup" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sys" / "fs" / "cgroup" / name).write_text(text + "\n")
    return str(tmp_path)


@pytest.mark.parametrize("cgroup, expected", [
    (None, 4096 * 1024),                                                    # no container: MemAvailable
    ({"memory.max": "max", "memory.current": "100"}, 4096 * 1024),          # v2 without a limit
    ({"memory.max": "3000000", "memory.current": "1000000"}, 2000000),      # v2 limit less usage
    ({"memory.max": "9000000000", "memory.current": "1"}, 4096 * 1024),     # a limit above what is free
    ({"memory/memory.limit_in_bytes": "2500000", "memory/memory.usage_in_bytes": "500000"}, 2000000),  # v1
    ({"memory/memory.limit_in_bytes": str(2**63 - 4096), "memory/memory.usage_in_bytes": "5"}, 4096 * 1024),
    # page cache the kernel can drop is not in use: usage less inactive_file (v2) / total_inactive_file (v1)
    ({"memory.max": "3000000", "memory.current": "2500000", "memory.stat": "anon 1\ninactive_file 1500000"},
     2000000),
    ({"memory/memory.limit_in_bytes": "3000000", "memory/memory.usage_in_bytes": "2500000",
      "memory/memory.stat": "cache 9\ninactive_file 7\ntotal_inactive_file 1500000"}, 2000000),
])
def test_available_memory_is_capped_by_the_container(tmp_path, cgroup, expected):
    assert files.available_memory(fake_root(tmp_path, 4096, cgroup)) == expected


def test_available_memory_reads_this_machine():
    assert files.available_memory("/nonexistent") is None
    if os.path.isfile("/proc/meminfo"):
        assert files.available_memory() > 0


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
