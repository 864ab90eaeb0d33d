"""Tests for reporting/report.py (evaluation report, loader image getter), reporting/tb.py (TensorBoard), and the
--class_weights auto / --balanced_sampler wiring against scikit-learn and binomial tolerances."""
import gzip
import json
import math
import struct
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from sklearn.utils.class_weight import compute_class_weight

import config
import datasets
from datasets.files import ImageFileDataset, load_image
from datasets.loader import InMemoryLoader, make_file_loader
from datasets.split import class_counts, inverse_frequency_weights
from reporting import tb
from reporting.report import eval_report, loader_image_getter, write_eval_report
from utils.errors import UserError

CLASSES = ["cat", "dog", "bird", "fish"]  # "fish" never occurs in the targets
# 10 samples: (target, predicted, confidence of the prediction)
TOY = [(0, 0, .9), (0, 0, .8), (0, 1, .7), (0, 2, .95),
       (1, 1, .6), (1, 1, .9), (1, 0, .55),
       (2, 2, .99), (2, 3, .85), (2, 1, .4)]


def toy_probs():
    """Probabilities whose argmax and max are the TOY predictions and confidences."""
    probs = torch.zeros(len(TOY), len(CLASSES), dtype=torch.float64)
    for n, (_, p, c) in enumerate(TOY):
        rest = (1 - c) / (len(CLASSES) - 1)
        probs[n] = rest
        probs[n, p] = c
    return probs, torch.tensor([t for t, _, _ in TOY])


def test_per_class_numbers_by_hand_and_sklearn(tmp_path):
    probs, targets = toy_probs()
    r = eval_report(probs, targets, CLASSES, n_errors=3)
    # by hand: predictions per class cat 3 (2 right), dog 4 (2 right), bird 2 (1 right), fish 1 (0 right)
    hand = {"cat": (2 / 3, 2 / 4, 4), "dog": (2 / 4, 2 / 3, 3), "bird": (1 / 2, 1 / 3, 3), "fish": (0.0, 0.0, 0)}
    for row in r["per_class"]:
        p, rec, sup = hand[row["class"]]
        assert row["precision"] == pytest.approx(p) and row["recall"] == pytest.approx(rec)
        assert row["support"] == sup
        assert row["f1"] == pytest.approx(2 * p * rec / (p + rec) if p + rec else 0.0)
    assert r["correct"] == 5 and r["accuracy"] == pytest.approx(0.5)
    assert r["macro"]["recall"] == pytest.approx((2 / 4 + 2 / 3 + 1 / 3) / 3)  # over the 3 classes present
    assert r["macro_over_classes"] == 3

    y_true, y_pred = targets.numpy(), probs.argmax(1).numpy()
    p, rec, f1, sup = precision_recall_fscore_support(y_true, y_pred, labels=range(4), zero_division=0)
    np.testing.assert_allclose([x["precision"] for x in r["per_class"]], p)
    np.testing.assert_allclose([x["recall"] for x in r["per_class"]], rec)
    np.testing.assert_allclose([x["f1"] for x in r["per_class"]], f1)
    assert [x["support"] for x in r["per_class"]] == sup.tolist()
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2], average="macro",
                                                    zero_division=0)
    assert (r["macro"]["precision"], r["macro"]["recall"], r["macro"]["f1"]) == pytest.approx((mp, mr, mf))
    cm = np.array(r["confusion_matrix"])
    np.testing.assert_array_equal(cm, confusion_matrix(y_true, y_pred, labels=range(4)))
    assert np.trace(cm) == (y_true == y_pred).sum() == r["correct"]
    # the most confidently wrong first: sample 3 (cat as bird, .95), 8 (bird as fish, .85), 2 (cat as dog, .7)
    assert [(e["index"], e["true"], e["pred"]) for e in r["errors"]] == [(3, "cat", "bird"), (8, "bird", "fish"),
                                                                         (2, "cat", "dog")]
    assert r["errors"][0]["confidence"] == pytest.approx(0.95)


def test_write_eval_report_files_and_gallery(tmp_path):
    probs, targets = toy_probs()
    images = torch.arange(len(TOY), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous() * 20
    asked = []

    def get_images(idx):
        asked.append(idx.tolist())
        return images[idx]
    r = write_eval_report(tmp_path / "a", probs.float(), targets, CLASSES, get_images=get_images, n_errors=32)
    assert asked == [[3, 8, 2, 6, 9]]  # all 5 errors, most confident first (.95 .85 .7 .55 .4)
    for f in ("eval_report.json", "eval_report.md", "confusion_matrix.png", "errors.png"):
        assert (tmp_path / "a" / f).is_file(), f
    assert json.loads((tmp_path / "a" / "eval_report.json").read_text())["correct"] == r["correct"] == 5
    md = (tmp_path / "a" / "eval_report.md").read_text()
    assert "| dog | 0.5000 | 0.6667 |" in md and "recall (= accuracy)" in md
    with Image.open(tmp_path / "a" / "confusion_matrix.png") as im:
        assert im.size[0] > 300
    write_eval_report(tmp_path / "b", probs, targets, CLASSES, get_images=None)
    assert (tmp_path / "b" / "eval_report.md").is_file() and not (tmp_path / "b" / "errors.png").exists()


def collect(loader):
    """What evaluate(collect=True) sees: the images and labels in loader order."""
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_loader_image_getter_follows_loader_order(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 1, 4, 4), dtype=torch.uint8, generator=g)
    for loader in (InMemoryLoader(images, torch.arange(37) % 3, 8, shuffle=False, seed=0),
                   InMemoryLoader(images, torch.arange(37) % 3, 8, shuffle=True, seed=5)):
        loader.set_epoch(2)
        x, _ = collect(loader)
        idx = torch.tensor([30, 0, 7, 7, 12])
        torch.testing.assert_close(loader_image_getter(loader)(idx), x[idx], rtol=0, atol=0)

    paths = []
    for k in range(11):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.fromarray(np.full((6, 5, 3), 20 * k, dtype=np.uint8)).save(paths[-1])
    plain = ImageFileDataset(paths, [k % 2 for k in range(11)], 3, 4)
    x, _ = collect(make_file_loader(plain, 4, shuffle=False, seed=0))
    get = loader_image_getter(make_file_loader(plain, 4, shuffle=False, seed=0))
    torch.testing.assert_close(get(torch.tensor([10, 3])), x[[10, 3]], rtol=0, atol=0)
    # a training transform is not applied: the getter shows the image as stored, in the sampler's order
    augmented = ImageFileDataset(paths, [0] * 11, 3, 4, transform=lambda t: 255 - t)
    loader = make_file_loader(augmented, 4, shuffle=True, seed=1)
    order = list(iter(loader.sampler))
    got = loader_image_getter(loader)(torch.tensor([0, 5]))
    torch.testing.assert_close(got, torch.stack([load_image(paths[order[0]], 3, 4), load_image(paths[order[5]], 3, 4)]))
    assert loader_image_getter(object()) is None


# ---------------------------------------------------------------- --class_weights auto, --balanced_sampler

def write_fashion_mnist(folder, train_labels, n_test=20):
    rng = np.random.default_rng(0)
    for stem, a in (("train-images-idx3-ubyte", rng.integers(0, 256, (len(train_labels), 28, 28))),
                    ("train-labels-idx1-ubyte", np.asarray(train_labels)),
                    ("t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28))),
                    ("t10k-labels-idx1-ubyte", np.arange(n_test) % 10)):
        header = struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
        with gzip.open(folder / f"{stem}.gz", "wb") as f:
            f.write(header + a.astype(np.uint8).tobytes())


IMBALANCED = np.repeat(np.arange(10), [400, 200, 100, 60, 40, 30, 20, 20, 20, 10])  # 900 images, ratio 40


def test_class_weights_auto_equal_sklearn_balanced():
    labels = np.repeat([0, 1, 2, 3, 4], [50, 7, 3, 12, 40])
    w = inverse_frequency_weights(torch.from_numpy(labels), 5)
    np.testing.assert_allclose(w.numpy(), compute_class_weight("balanced", classes=np.arange(5), y=labels),
                               rtol=1e-6)
    # in the loss: the weighted mean sum_i w_{y_i} nll_i / sum_i w_{y_i} (PyTorch's weighted 'mean')
    from train import make_criterion
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(len(labels), 5, generator=g, dtype=torch.float64), torch.from_numpy(labels)
    nll = -logits.log_softmax(1)[torch.arange(len(labels)), y]
    wd = w.double()
    torch.testing.assert_close(make_criterion(0.0, wd)(logits, y), (wd[y] * nll).sum() / wd[y].sum())
    assert not torch.isclose(make_criterion(0.0, wd)(logits, y), nll.mean())  # the weights do change the loss


def test_class_weights_auto_with_an_absent_class():
    labels = np.repeat([0, 1, 2, 4], [50, 7, 3, 40])  # class 3 has no training image
    w = inverse_frequency_weights(torch.from_numpy(labels), 5)
    present = np.array([0, 1, 2, 4])
    assert w[3] == 0
    np.testing.assert_allclose(w[present].numpy(), compute_class_weight("balanced", classes=present, y=labels),
                               rtol=1e-6)


def test_balanced_sampler_flag_draws_classes_uniformly(tmp_path):
    write_fashion_mnist(tmp_path, IMBALANCED)
    argv = ["--data_dir", str(tmp_path), "--batch_size", "100"]
    data = datasets.build_data(config.get_parser().parse_args(argv + ["--balanced_sampler"]))
    draws = []
    for epoch in range(4):
        data.train_loader.set_epoch(epoch)
        draws += [y for _, y in data.train_loader]
    counts = class_counts(torch.cat(draws), 10).double()
    n, p = counts.sum().item(), 0.1
    assert n == 3600
    tol = 4 * math.sqrt(n * p * (1 - p))  # 4 binomial standard deviations per class
    assert ((counts - n * p).abs() <= tol).all(), counts
    plain = datasets.build_data(config.get_parser().parse_args(argv))
    got = class_counts(torch.cat([y for _, y in plain.train_loader]), 10)
    assert got.tolist() == np.bincount(IMBALANCED).tolist()  # without the flag: each image once


# ---------------------------------------------------------------- TensorBoard

def test_tensorboard_writes_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert tb.make_tb_writer(tmp_path, False) is None
    tb.log_epoch(None, {"train_loss": 1.0}, 1)  # off: a no-op
    writer = tb.make_tb_writer(str(tmp_path), True)
    rows = [{"epoch": 1, "train_loss": 2.5, "train_acc": 0.25, "val_acc": 0.5, "val_acc_ema": 0.55, "lr": 0.1,
             "images_per_second": 1000.0, "robust_val_acc": 0.2, "note": "text"},
            {"epoch": 2, "train_loss": 1.5, "train_acc": 0.5, "val_acc": 0.75, "val_acc_ema": 0.7, "lr": 0.05,
             "images_per_second": 1100.0, "robust_val_acc": 0.3, "note": "text"}]
    for row in rows:
        tb.log_epoch(writer, row, row["epoch"])
    tb.log_images(writer, "train/images", torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), 0)
    writer.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = {"train/loss": "train_loss", "train/acc": "train_acc", "val/acc": "val_acc", "val/acc_ema": "val_acc_ema",
            "lr": "lr", "throughput/images_per_second": "images_per_second", "val/robust_acc": "robust_val_acc"}
    assert set(acc.Tags()["scalars"]) == set(tags)
    for tag, key in tags.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows])
    assert acc.Tags()["images"] == ["train/images"]


def test_tensorboard_missing_package_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    with pytest.raises(UserError, match="pip install tensorboard"):
        tb.make_tb_writer(tmp_path, True)

