"""Tests for datasets/: IDX and CIFAR readers, file datasets, splits, loaders and sampling."""
import gzip
import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import config
import datasets
from datasets import fashion_mnist
from datasets.files import load_image
from datasets.loader import InMemoryLoader, epoch_indices, make_file_loader
from datasets.split import balanced_weights, class_counts, kfold_split, stratified_split, stratified_subset
from utils.errors import UserError


def parse(*argv):
    return config.get_parser().parse_args([str(a) for a in argv])


# ---------------------------------------------------------------- Fashion-MNIST / CIFAR readers

def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(folder, n_train=20, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10}
    for stem, a in arrays.items():
        write_idx(os.path.join(folder, stem + ".gz"), a)
    return arrays


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_idx_round_trip(tmp_path, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    arrays = write_fashion_mnist(folder)
    train_x, train_y, test_x, test_y = fashion_mnist.load_fashion_mnist(str(tmp_path))
    assert train_x.dtype == torch.uint8 and train_x.shape == (20, 1, 28, 28)
    assert train_y.dtype == torch.int64
    np.testing.assert_array_equal(train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(train_y.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(test_x[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(test_y.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_idx_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(UserError, match="magic"):
        fashion_mnist.read_idx(str(bad))
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\x01" * 7)
    with pytest.raises(UserError, match="truncated"):
        fashion_mnist.read_idx(str(short))


def test_fashion_mnist_missing_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist.*--download"):
        datasets.build_data(parse("--data_dir", tmp_path))


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.SYSTEM_DIR), reason="dataset-fashion-mnist absent")
def test_real_fashion_mnist_default_split(tmp_path):
    data = datasets.build_data(parse("--data_dir", tmp_path, "--batch_size", 1000))
    assert len(data.train_labels) == 60000 and data.train_images.shape == (60000, 1, 28, 28)
    assert data.val_name == "test" and data.test_loader is None
    assert sum(len(y) for _, y in data.val_loader) == 10000
    assert class_counts(data.train_labels, 10).tolist() == [6000] * 10
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    # the widely published Fashion-MNIST training-set statistics
    assert data.mean[0] == pytest.approx(0.2860, abs=5e-5)
    assert data.std[0] == pytest.approx(0.3530, abs=5e-5)


def test_in_memory_carved_split_subsets_and_resize(tmp_path):
    write_fashion_mnist(tmp_path, n_train=100, n_test=30)
    data = datasets.build_data(parse("--data_dir", tmp_path, "--val_ratio", 0.2, "--eval_subset", 20,
                                     "--img_size", 14, "--in_chans", 3, "--batch_size", 7))
    assert data.val_name == "val" and data.in_chans == 3 and data.img_size == 14
    assert len(data.train_labels) == 80
    assert sum(len(y) for _, y in data.val_loader) == 20
    assert sum(len(y) for _, y in data.test_loader) == 20
    x, y = next(iter(data.train_loader))
    assert x.dtype == torch.uint8 and x.shape == (7, 3, 14, 14) and y.dtype == torch.int64
    assert len(data.train_loader) == 80 // 7  # drop_last for training


def test_resize_matches_pil_bilinear():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (28, 28)).astype(np.uint8)
    ours = datasets.convert_uint8(torch.from_numpy(img)[None, None], 1, 14)[0, 0].numpy()
    ref = np.array(Image.fromarray(img).resize((14, 14), Image.BILINEAR))
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_uint8_mean_std_exact():
    x = torch.randint(0, 256, (13, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = datasets.uint8_mean_std(x)
    ref = x.double().div(255)
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), ref.mean((0, 2, 3)))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), ref.std((0, 2, 3), unbiased=False))


def test_cifar10_reader(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    expected = {}
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (2, 3072)).astype(np.uint8)
        labels = [(2 * i) % 10, (2 * i + 1) % 10]
        expected[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    data = datasets.build_data(parse("--dataset", "cifar10", "--data_dir", tmp_path))
    assert data.train_images.shape == (10, 3, 32, 32) and data.in_chans == 3 and data.img_size == 32
    first = expected["data_batch_1"][0][0]
    # CIFAR rows are channel-major: R plane (1024 values), then G, then B; each plane row-major.
    assert data.train_images[0, 1, 2, 5].item() == first[1024 + 2 * 32 + 5]
    ys = sum((expected[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert data.train_labels.tolist() == ys
    assert data.val_name == "test" and data.class_names[0] == "airplane"


# ---------------------------------------------------------------- file datasets

def solid(mode, size, value):
    return Image.new(mode, size, value)


# (file name, label, image, the RGB the model must see after conversion)
SEED_IMAGES = [
    ("a.png", "cat", solid("RGB", (20, 13), (10, 20, 30)), (10, 20, 30)),
    ("b.png", "cat", solid("L", (9, 9), 77), (77, 77, 77)),
    ("c.png", "dog", solid("RGBA", (16, 40), (200, 100, 50, 128)), (200, 100, 50)),
    ("d.jpg", "dog", solid("RGB", (30, 30), (0, 255, 0)), None),  # JPEG: approximately green
    ("e.png", "bird", solid("RGB", (5, 8), (1, 2, 3)), (1, 2, 3)),
    ("f.png", "bird", solid("L", (64, 17), 250), (250, 250, 250)),
    ("g.png", "cat", solid("RGB", (16, 16), (90, 80, 70)), (90, 80, 70)),
    ("h.png", "dog", solid("RGB", (16, 16), (5, 6, 7)), (5, 6, 7)),
    ("i.png", "bird", solid("RGB", (16, 16), (33, 44, 55)), (33, 44, 55)),
    ("j.png", "cat", solid("RGB", (16, 16), (60, 61, 62)), (60, 61, 62)),
]


def write_seed_layout(root, images=SEED_IMAGES):
    root.mkdir(exist_ok=True)
    for name, _, img, _ in images:
        img.save(root / name)
    (root / "info.csv").write_text("image,label\n" + "".join(f"{n},{y}\n" for n, y, _, _ in images))
    return root


def items(loader):
    """(file name, label) pairs a file loader's dataset holds."""
    ds = loader.loader.dataset
    return sorted(zip((os.path.basename(p) for p in ds.paths), ds.labels))


def test_csv_mixed_sizes_and_modes(tmp_path):
    root = write_seed_layout(tmp_path / "imgs")
    train = "a.png b.png c.png d.jpg e.png f.png".split()
    (tmp_path / "train.txt").write_text("\n".join(train) + "\n")
    (tmp_path / "val.txt").write_text("g.png\nh.png\ni.png\n\n")
    data = datasets.build_data(parse("--dataset", "csv", "--data_dir", root, "--info_csv", root / "info.csv",
                                     "--train_list", tmp_path / "train.txt", "--val_list",
                                     tmp_path / "val.txt", "--img_size", 12, "--batch_size", 4))
    assert data.class_names == ["bird", "cat", "dog"] and data.num_classes == 3
    assert data.in_chans == 3 and data.img_size == 12 and data.val_name == "val"
    assert data.test_loader is None and data.train_images is None
    index = {c: i for i, c in enumerate(data.class_names)}
    expected_train = sorted((n, index[y]) for n, y, _, _ in SEED_IMAGES if n in train)
    assert items(data.train_loader) == expected_train
    assert items(data.val_loader) == [("g.png", 1), ("h.png", 2), ("i.png", 0)]
    assert sorted(data.train_labels.tolist()) == sorted(y for _, y in expected_train)
    ds = data.train_loader.loader.dataset
    for path, _ in zip(ds.paths, ds.labels):
        x = load_image(path, 3, 12)
        assert x.dtype == torch.uint8 and x.shape == (3, 12, 12)
        rgb = dict((n, c) for n, _, _, c in SEED_IMAGES)[os.path.basename(path)]
        if rgb is not None:
            assert (x == torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1)).all()
    batches = list(data.train_loader)
    assert all(x.dtype == torch.uint8 and x.shape[1:] == (3, 12, 12) for x, _ in batches)
    assert len(batches) == 1 and len(batches[0][1]) == 4  # 6 images, batch 4, drop_last
    # mean/std over the training images: solid colours, so the per-pixel statistics are those
    # of the per-image colours (the JPEG is read back from disk to get its exact pixels).
    colours = torch.stack([load_image(root / n, 3, 12).double().mean((1, 2)) for n in train]) / 255
    torch.testing.assert_close(torch.tensor(data.mean, dtype=torch.float64), colours.mean(0))
    pixels = torch.stack([load_image(root / n, 3, 12).double() for n in train]) / 255
    torch.testing.assert_close(torch.tensor(data.std, dtype=torch.float64),
                               pixels.std((0, 2, 3), unbiased=False))


def test_csv_grey_conversion_and_int_labels(tmp_path):
    root = write_seed_layout(tmp_path)
    (root / "info.csv").write_text("file,cls\n" + "".join(f"{n},{i % 2 * 7}\n"
                                                         for i, (n, *_) in enumerate(SEED_IMAGES)))
    data = datasets.build_data(parse("--dataset", "csv", "--data_dir", root, "--info_csv", "info.csv",
                                     "--image_column", "file", "--label_column", "cls",
                                     "--in_chans", 1, "--img_size", 8, "--val_ratio", 0.4))
    assert data.class_names == ["0", "7"] and data.in_chans == 1
    x, _ = next(iter(data.val_loader))
    assert x.shape[1:] == (1, 8, 8)
    # PIL's L = (299 R + 587 G + 114 B) / 1000: (10, 20, 30) -> 18
    assert (load_image(root / "a.png", 1, 8) == 18).all()


def test_csv_val_list_only_trains_on_the_rest(tmp_path):
    root = write_seed_layout(tmp_path)
    (root / "val.txt").write_text("a.png\ne.png\nh.png\n")
    data = datasets.build_data(parse("--dataset", "csv", "--data_dir", root, "--info_csv", "info.csv",
                                     "--val_list", "val.txt"))
    assert [n for n, _ in items(data.val_loader)] == ["a.png", "e.png", "h.png"]
    assert len(items(data.train_loader)) == len(SEED_IMAGES) - 3
    assert not {"a.png", "e.png", "h.png"} & {n for n, _ in items(data.train_loader)}


def write_folder(root, classes, per_class, size=(6, 6)):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            solid("RGB", size, (i, 0, 0)).save(root / c / f"{i}.png")
    (root / classes[0] / "notes.txt").write_text("not an image")


def test_imagefolder_flat_holds_out_20_percent(tmp_path):
    write_folder(tmp_path, ["b", "a"], 10)
    data = datasets.build_data(parse("--dataset", "imagefolder", "--data_dir", tmp_path,
                                     "--img_size", 8))
    assert data.class_names == ["a", "b"] and data.val_name == "val" and data.test_loader is None
    assert class_counts(data.train_labels, 2).tolist() == [8, 8]
    assert len(items(data.val_loader)) == 4


def test_imagefolder_train_val_test(tmp_path):
    write_folder(tmp_path / "train", ["x", "y"], 5)
    write_folder(tmp_path / "val", ["x", "y"], 2)
    data = datasets.build_data(parse("--dataset", "imagefolder", "--data_dir", tmp_path, "--img_size", 8))
    assert data.val_name == "val" and len(data.train_labels) == 10 and len(items(data.val_loader)) == 4
    assert data.test_loader is None
    write_folder(tmp_path / "test", ["x", "y"], 3)
    data = datasets.build_data(parse("--dataset", "imagefolder", "--data_dir", tmp_path, "--img_size", 8))
    assert len(items(data.test_loader)) == 6
    # carving validation from train: test/ stays the test split (val/ is then unused)
    data = datasets.build_data(parse("--dataset", "imagefolder", "--data_dir", tmp_path,
                                     "--img_size", 8, "--kfold", 5, "--fold", 4))
    assert len(data.train_labels) == 8 and len(items(data.val_loader)) == 2
    assert len(items(data.test_loader)) == 6


def test_imagefolder_train_test_validates_on_test(tmp_path):
    write_folder(tmp_path / "train", ["x", "y"], 3)
    write_folder(tmp_path / "test", ["x", "y"], 2)
    data = datasets.build_data(parse("--dataset", "imagefolder", "--data_dir", tmp_path, "--img_size", 8))
    assert data.val_name == "test" and data.test_loader is None and len(items(data.val_loader)) == 4



def test_imagefolder_split_folders_under_their_usual_names(tmp_path):
    write_folder(tmp_path / "training", ["x", "y"], 5)
    write_folder(tmp_path / "valid", ["x", "y"], 2)
    write_folder(tmp_path / "testing", ["x", "y"], 3)
    argv = ["--dataset", "imagefolder", "--data_dir", tmp_path, "--img_size", 8]
    data = datasets.build_data(parse(*argv))  # not the classes "testing", "training" and "valid"
    assert data.class_names == ["x", "y"] and data.val_name == "val" and len(data.train_labels) == 10
    assert len(items(data.val_loader)) == 4 and len(items(data.test_loader)) == 6
    write_folder(tmp_path / "val", ["x", "y"], 1)
    with pytest.raises(UserError, match="both val/ and valid/ as the val split; keep one"):
        datasets.build_data(parse(*argv))
    flat = tmp_path / "flat"
    write_folder(flat / "test", ["x", "y"], 2)
    write_folder(flat, ["cat", "dog"], 2)
    with pytest.raises(UserError, match="has test/ but no train/ folder"):
        datasets.build_data(parse("--dataset", "imagefolder", "--data_dir", flat, "--img_size", 8))

def truncate(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_image_named_or_skipped(tmp_path):
    write_folder(tmp_path, ["a", "b"], 5)
    truncate(tmp_path / "a" / "3.png")
    (tmp_path / "b" / "junk.png").write_text("this is not a png")
    argv = ["--dataset", "imagefolder", "--data_dir", tmp_path, "--img_size", 8, "--val_ratio", 0.25]
    with pytest.raises(UserError, match=r"3\.png.*2 unreadable.*--skip_bad_images"):
        datasets.build_data(parse(*argv))
    data = datasets.build_data(parse(*argv, "--skip_bad_images"))
    kept = items(data.train_loader) + items(data.val_loader)
    assert len(kept) == 9 and "junk.png" not in {n for n, _ in kept}
    assert sum(n == "3.png" for n, _ in kept) == 1  # only b/3.png remains


def test_file_loader_order_same_with_workers_and_follows_epoch(tmp_path):
    write_folder(tmp_path, ["a", "b"], 6)
    args = ["--dataset", "imagefolder", "--data_dir", tmp_path, "--img_size", 4, "--batch_size", 3,
            "--val_ratio", 0.5]
    orders = []
    for workers in (0, 1):
        data = datasets.build_data(parse(*args, "--workers", workers))
        loader = data.train_loader
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            orders.append(torch.cat([x[:, 0, 0, 0] for x, _ in loader]).tolist())
    assert orders[0] == orders[2] and orders[1] == orders[3] and orders[0] != orders[1]


# ---------------------------------------------------------------- bad input

def test_bad_input_messages(tmp_path):
    root = write_seed_layout(tmp_path / "imgs")
    csv = ["--dataset", "csv", "--data_dir", root, "--info_csv", root / "info.csv"]
    with pytest.raises(UserError, match=r"no column 'filename' \(it has: 'image', 'label'\)"):
        datasets.build_data(parse(*csv, "--image_column", "filename"))
    (root / "info.csv").write_text("image,label\na.png,cat\nghost.png,dog\n" +
                                   "".join(f"{n},{y}\n" for n, y, _, _ in SEED_IMAGES[1:]))
    with pytest.raises(UserError, match="1 listed image.*ghost.png.*--skip_bad_images"):
        datasets.build_data(parse(*csv))
    assert len(datasets.build_data(parse(*csv, "--skip_bad_images", "--val_ratio", 0.3))
               .train_labels) == 7
    with pytest.raises(UserError, match="--data_dir .*nope does not exist"):
        datasets.build_data(parse("--dataset", "csv", "--data_dir", tmp_path / "nope",
                                  "--info_csv", root / "info.csv"))
    (root / "bad.csv").write_text("image,label\na.png,cat\nb.png,dog,extra,fields\n")
    with pytest.raises(UserError, match="not a well-formed CSV"):
        datasets.build_data(parse("--dataset", "csv", "--data_dir", root, "--info_csv", "bad.csv"))
    with pytest.raises(UserError, match="unknown --dataset 'mnist'; choose one of fashion_mnist"):
        datasets.build_data(parse("--dataset", "mnist"))
    with pytest.raises(UserError, match="needs --info_csv"):
        datasets.build_data(parse("--dataset", "csv", "--data_dir", root))




def test_csv_classes_named_like_missing_values_blank_labels_and_non_utf8_lists(tmp_path):
    root = write_seed_layout(tmp_path)
    names = ["None", "NA", "null"]  # classes, not missing labels
    (root / "info.csv").write_text("image,label\n" + "".join(f"{n},{names[i % 3]}\n"
                                                            for i, (n, *_) in enumerate(SEED_IMAGES)))
    argv = ["--dataset", "csv", "--data_dir", root, "--info_csv", "info.csv", "--img_size", 4]
    assert datasets.build_data(parse(*argv, "--val_ratio", 0.3)).class_names == ["NA", "None", "null"]
    (root / "info.csv").write_text("image,label\na.png,cat\nb.png,   \n")
    with pytest.raises(UserError, match="1 row.*lack an image name or label.*line 3"):
        datasets.build_data(parse(*argv))
    write_seed_layout(root)
    (root / "list.txt").write_bytes("a.png\nb\xe9b\xe9.png\n".encode("latin-1"))
    with pytest.raises(UserError, match="--train_list file .*list.txt is not UTF-8 text.*save it as UTF-8"):
        datasets.build_data(parse(*argv, "--train_list", "list.txt"))

def test_a_class_only_in_an_unused_split_is_named(tmp_path, caplog):
    write_folder(tmp_path / "train", ["x", "y"], 5)
    write_folder(tmp_path / "val", ["x", "y", "z"], 1)  # not used: --val_ratio carves validation from train
    write_folder(tmp_path / "test", ["x", "y"], 1)
    data = datasets.build_data(parse("--dataset", "imagefolder", "--data_dir", tmp_path, "--img_size", 4,
                                     "--val_ratio", 0.4))
    assert data.num_classes == 3 and "class(es) z have no training images" in caplog.text

def test_csv_labels_keep_leading_zeros_and_numeric_names_are_not_indices(tmp_path):
    root = write_seed_layout(tmp_path)
    labels = ["01", "02", "10", "1"]  # "01" and "1" are two classes; "1.0" below is the integer class 1
    (root / "info.csv").write_text("image,label\n" + "".join(f"{n}, {labels[i % 4]}\n"
                                                            for i, (n, *_) in enumerate(SEED_IMAGES)))
    argv = ["--dataset", "csv", "--data_dir", root, "--info_csv", "info.csv", "--img_size", 8]
    assert datasets.build_data(parse(*argv, "--val_ratio", 0.4)).class_names == ["01", "02", "1", "10"]
    data = datasets.build_data(parse(*argv, "--classes", "10", "01", "--val_ratio", 0.25))
    assert data.class_names == ["01", "10"]
    by_name = {n: labels[i % 4] for i, (n, *_) in enumerate(SEED_IMAGES)}
    assert {by_name[n] for n, _ in items(data.train_loader) + items(data.val_loader)} == {"01", "10"}
    with pytest.raises(UserError, match="no class is named 3.*name the classes: 01, 02, 1, 10"):
        datasets.build_data(parse(*argv, "--classes", "01", "3"))
    (root / "info.csv").write_text("image,label\n" + "".join(f"{n},{['1.0', '2', '10'][i % 3]}\n"
                                                            for i, (n, *_) in enumerate(SEED_IMAGES)))
    assert datasets.build_data(parse(*argv, "--val_ratio", 0.3)).class_names == ["1", "2", "10"]


def test_kfold_refuses_a_class_of_one_image_before_any_fold(tmp_path):
    write_folder(tmp_path, ["a", "b"], 6)
    (tmp_path / "c").mkdir()  # a third class with a single image
    solid("RGB", (6, 6), (1, 2, 3)).save(tmp_path / "c" / "only.png")
    for fold in range(3):  # every fold, not only the one that would validate on it
        with pytest.raises(UserError, match="--kfold 3: class c has a single image.*--classes"):
            datasets.build_data(parse("--dataset", "imagefolder", "--data_dir", tmp_path, "--img_size", 4,
                                      "--kfold", 3, "--fold", fold))

def test_empty_split_and_unseen_class(tmp_path):
    write_folder(tmp_path / "train", ["x", "y"], 3)
    (tmp_path / "val" / "x").mkdir(parents=True)
    truncate(tmp_path / "val" / "x" / "0.png")
    argv = ["--dataset", "imagefolder", "--data_dir", tmp_path, "--img_size", 4]
    with pytest.raises(UserError, match="validation split has no images"):
        datasets.build_data(parse(*argv, "--skip_bad_images"))
    solid("RGB", (4, 4), 0).save(tmp_path / "val" / "x" / "0.png")
    (tmp_path / "val" / "z").mkdir()
    solid("RGB", (4, 4), 0).save(tmp_path / "val" / "z" / "0.png")
    with pytest.raises(UserError, match="validation class.*z have no training images"):
        datasets.build_data(parse(*argv))
    (tmp_path / "list.txt").write_text("\n")
    root = write_seed_layout(tmp_path / "imgs")
    with pytest.raises(UserError, match="lists no images"):
        datasets.build_data(parse("--dataset", "csv", "--data_dir", root, "--info_csv", "info.csv",
                                  "--val_list", tmp_path / "list.txt"))


@pytest.mark.parametrize("flags, message", [
    (["--kfold", 1], "--kfold 1 must be at least 2"),
    (["--kfold", 3, "--fold", 3], r"--fold 3 is out of range for --kfold 3; use 0..2"),
    (["--fold", 1], "--fold 1 needs --kfold"),
    (["--val_ratio", 1.5], r"--val_ratio 1.5 must be in \(0, 1\)"),
    (["--val_ratio", 0.2, "--kfold", 3], "pass only one"),
])
def test_split_flag_errors(tmp_path, flags, message):
    write_fashion_mnist(tmp_path)
    with pytest.raises(UserError, match=message):
        datasets.build_data(parse("--data_dir", tmp_path, *flags))


# ---------------------------------------------------------------- splits

LABELS = np.repeat([0, 1, 2, 3], [50, 23, 9, 4])


def test_val_ratio_split_is_stratified():
    train, val = stratified_split(LABELS, 0.3, seed=1)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(LABELS)))
    for c, n in enumerate(np.bincount(LABELS)):
        assert abs((LABELS[val] == c).sum() - 0.3 * n) <= 1
    assert np.array_equal(stratified_split(LABELS, 0.3, seed=1)[1], val)
    assert not np.array_equal(stratified_split(LABELS, 0.3, seed=2)[1], val)


def test_kfold_disjoint_covering_stratified():
    k = 4
    vals = [kfold_split(LABELS, k, fold, seed=0) for fold in range(k)]
    all_val = np.concatenate([v for _, v in vals])
    assert sorted(all_val.tolist()) == list(range(len(LABELS)))  # disjoint and covering
    for train, val in vals:
        assert not set(train) & set(val) and len(train) + len(val) == len(LABELS)
        for c, n in enumerate(np.bincount(LABELS)):
            assert abs((LABELS[val] == c).sum() - n / k) < 1


def test_stratified_subset():
    idx = stratified_subset(LABELS, 30, seed=0)
    assert len(idx) == 30 and len(set(idx.tolist())) == 30
    for c, n in enumerate(np.bincount(LABELS)):
        assert abs((LABELS[idx] == c).sum() - 30 * n / len(LABELS)) < 1
    assert len(stratified_subset(LABELS, 0, seed=0)) == len(LABELS)


def test_class_counts_and_weights():
    labels = torch.tensor([2, 0, 2, 2, 4])
    assert class_counts(labels, 6).tolist() == [1, 0, 3, 0, 1, 0]
    torch.testing.assert_close(balanced_weights(labels, 6),
                               torch.tensor([1 / 3, 1, 1 / 3, 1 / 3, 1], dtype=torch.float64))


# ---------------------------------------------------------------- in-memory loader

def index_images(n):
    """Images whose pixels hold their own index, so a batch tells which samples it holds."""
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()


def seen(loader):
    return torch.cat([x[:, 0, 0, 0] for x, _ in loader]).tolist()


def test_in_memory_loader_order_per_epoch():
    n = 50
    loader = InMemoryLoader(index_images(n), torch.arange(n) % 5, 8, shuffle=True, seed=3)
    assert len(loader) == 7
    loader.set_epoch(4)
    a = seen(loader)
    assert sorted(a) == list(range(n))  # a permutation: every sample once
    other = InMemoryLoader(index_images(n), torch.arange(n) % 5, 8, shuffle=True, seed=3)
    other.set_epoch(4)
    assert seen(other) == a
    other.set_epoch(5)
    assert seen(other) != a
    dropped = InMemoryLoader(index_images(n), torch.arange(n) % 5, 8, shuffle=True, seed=3,
                             drop_last=True)
    assert len(dropped) == 6 and len(seen(dropped)) == 48
    tiny = InMemoryLoader(index_images(3), torch.arange(3), 8, shuffle=True, seed=0, drop_last=True)
    assert len(tiny) == 1 and sorted(seen(tiny)) == [0, 1, 2]  # drop_last never empties an epoch
    aug = InMemoryLoader(index_images(n), torch.arange(n), 8, shuffle=False, seed=0,
                         batch_aug=lambda x: 255 - x)
    assert seen(aug) == [255 - i for i in range(n)]


def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
    # Image i holds its index in pixel (0, 0) and 255 in pixel (0, 1): a flip swaps them.
    n = 40
    images = torch.zeros(n, 1, 1, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    images[:, 0, 0, 1] = 255
    loader = InMemoryLoader(images, torch.arange(n), 8, shuffle=True, seed=3, alternate_flip=True)

    def flipped_by_image(epoch):
        loader.set_epoch(epoch)
        out = {}
        for x, y in loader:
            for img, label in zip(x, y):
                was_flipped = img[0, 0, 0].item() == 255
                assert img[0, 0, int(was_flipped)].item() == label.item()  # the pixels moved, intact
                out[label.item()] = was_flipped
        return out

    e0, e1, e2 = flipped_by_image(0), flipped_by_image(1), flipped_by_image(2)
    assert set(e0) == set(e1) == set(e2) == set(range(n))
    assert all(e0[i] != e1[i] and e0[i] == e2[i] for i in e0)
    assert 0 < sum(e0.values()) < len(e0)  # a random half, not all or none
    # The bits are a seeded draw over global image indices: a DDP shard's loader flips the same images.
    shard = InMemoryLoader(images, torch.arange(n), 8, shuffle=True, seed=3, alternate_flip=True, rank=1,
                           world_size=2)
    assert torch.equal(shard.flip_bits, loader.flip_bits)


def test_alternating_flip_flags():
    args = config.parse_args(["--hflip", "0.5", "--hflip_mode", "alternate"])
    from datasets.transforms import _v2_ops, build_batch_augment, describe
    assert "hflip" not in [name for name, _ in _v2_ops(args, 1, 8, 8)]  # the loader flips, not the pipeline
    assert any("alternating" in line for line in describe(args))
    with pytest.raises(UserError, match="--hflip 0.5"):
        build_batch_augment(config.parse_args(["--hflip", "0.3", "--hflip_mode", "alternate"]), 1)
    with pytest.raises(UserError, match="--cache_images ram"):
        datasets.build_data(config.parse_args(["--dataset", "imagefolder", "--data_dir", "/nonexistent",
                                                 "--hflip", "0.5",
                                      "--hflip_mode", "alternate"]))


def test_ddp_sharding():
    n, ws = 10, 3
    ranks = [InMemoryLoader(index_images(n), torch.arange(n), 2, shuffle=False, seed=0, rank=r,
                            world_size=ws) for r in range(ws)]
    got = sorted(sum((seen(r) for r in ranks), []))
    assert got == list(range(n))  # evaluation: every sample exactly once, no padding
    train = [epoch_indices(n, True, seed=0, epoch=2, rank=r, world_size=ws) for r in range(ws)]
    assert all(len(t) == math.ceil(n / ws) for t in train)
    flat = torch.cat(train).tolist()
    assert set(flat) == set(range(n)) and len(flat) == 12  # padded by 2 repeats


def test_file_loader_ddp_sharding():
    dataset = [(torch.full((1, 1, 1), i, dtype=torch.uint8), i) for i in range(10)]
    ranks = [make_file_loader(dataset, 2, shuffle=False, seed=0, rank=r, world_size=3) for r in range(3)]
    assert sorted(sum((seen(r) for r in ranks), [])) == list(range(10))
    train = [make_file_loader(dataset, 2, shuffle=True, seed=0, drop_last=True, rank=r, world_size=3)
             for r in range(3)]
    assert [len(t) for t in train] == [2, 2, 2]  # 4 samples per rank after padding, 2 full batches
    assert set(sum((seen(t) for t in train), [])) == set(range(10))


def test_balanced_sampler_draws_classes_uniformly():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    weights = balanced_weights(labels, 3)
    loader = InMemoryLoader(torch.zeros(1000, 1, 2, 2, dtype=torch.uint8), labels, 250, shuffle=True, seed=0,
                            sampler_weights=weights)
    draws = []
    for epoch in range(6):
        loader.set_epoch(epoch)
        draws += [y for _, y in loader]
    counts = class_counts(torch.cat(draws), 3).double()
    n, p = counts.sum().item(), 1 / 3
    tol = 4 * math.sqrt(n * p * (1 - p))  # 4 binomial standard deviations
    assert ((counts - n * p).abs() <= tol).all(), counts
    plain = InMemoryLoader(torch.zeros(1000, 1, 2, 2, dtype=torch.uint8), labels, 250, shuffle=True, seed=0)
    assert class_counts(torch.cat([y for _, y in plain]), 3).tolist() == [900, 90, 10]


def test_dataset_names_match_config():
    assert datasets.DATASETS == config.DATASETS
