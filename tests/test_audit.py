"""Tests for tools/audit.py: pHash and the pair search against independent computations, and audits of
small csv, imagefolder and in-memory datasets with planted problems (each found, nothing else)."""
import gzip
import hashlib
import json
import os
import shutil
import struct

import numpy as np
import pytest
import scipy.fft
import torch
from conftest import run_script
from PIL import Image, ImageDraw

import config
import datasets
from tools import audit
from utils.errors import UserError

# ---------------------------------------------------------------- pHash and pair search

def reference_phash(grey32):
    """pHash via scipy's FFT-based DCT, bits packed by hand (most significant bit = coefficient (0, 0))."""
    block = scipy.fft.dctn(np.asarray(grey32, dtype=np.float64), type=2, norm="ortho")[:8, :8].ravel()
    bits = block > np.median(block)
    return sum(1 << (63 - k) for k in range(64) if bits[k])


def test_phash_matches_scipy_dct():
    rng = np.random.default_rng(0)
    grey = rng.uniform(0, 255, (20, 32, 32))
    assert audit.phash(grey).tolist() == [reference_phash(g) for g in grey]


def test_hamming_pairs_equals_brute_force():
    rng = np.random.default_rng(1)
    h = rng.integers(0, 2**63, 150, dtype=np.uint64) ^ (rng.integers(0, 2, 150, dtype=np.uint64) << np.uint64(63))
    h[10] = h[3] ^ np.uint64(0b1011)  # planted: distance 3
    h[77] = h[3]  # distance 0
    threshold = 22  # loose, so that random pairs match too
    expected = sorted((bin(int(h[a]) ^ int(h[b])).count("1"), a, b) for a in range(len(h))
                      for b in range(a + 1, len(h)) if bin(int(h[a]) ^ int(h[b])).count("1") <= threshold)
    i, j, d = audit.hamming_pairs(h, threshold, block=(7, 13))  # small tiles: every edge case of the tiling
    assert list(zip(d.tolist(), i.tolist(), j.tolist())) == expected
    assert (0, 3, 77) in expected and (3, 3, 10) in expected and len(expected) > 5
    with pytest.raises(UserError, match="phash_threshold"):
        audit.hamming_pairs(h, 64, limit=100)


# ---------------------------------------------------------------- planted datasets

def shapes(rng, size=32, mode="RGB"):
    """A random picture: a background and four filled rectangles or ellipses (distinct pHashes, >= 16 bits apart)."""
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        (x, y), (w, h) = rng.integers(0, size - 8, 2), rng.integers(6, size // 2, 2)
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape([int(x), int(y), int(x + w), int(y + h)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img.convert(mode)


def brighten(img, delta=6):
    return Image.fromarray(np.clip(np.asarray(img).astype(np.int16) + delta, 0, 255).astype(np.uint8))


def truncated_png(img, path):
    img.save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def digest_tree(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_audit(tmp_path, *argv):
    args = audit.get_parser().parse_args([str(a) for a in argv] + ["--output_dir", str(tmp_path / "audit")])
    return audit.audit(args)


def names(groups):
    return {frozenset(d["image"] for d in g) for g in groups}


def test_csv_audit_finds_each_planted_problem(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    root.mkdir()
    labels = {}
    for k in range(12):
        shapes(rng).save(root / f"img{k:02d}.png")
        labels[f"img{k:02d}.png"] = "abc"[k % 3]
    truncated_png(shapes(rng), root / "bad.png")
    labels["bad.png"] = "a"
    Image.open(root / "img01.png").save(root / "dup.bmp")  # same pixels, other bytes: an exact duplicate
    labels["dup.bmp"] = labels["img01.png"]
    brighten(Image.open(root / "img02.png")).save(root / "near.png")  # a near-duplicate
    labels["near.png"] = labels["img02.png"]
    shutil.copy(root / "img03.png", root / "conf.png")  # same bytes, another label
    labels["conf.png"] = "b" if labels["img03.png"] != "b" else "c"
    shutil.copy(root / "img04.png", root / "leak.png")  # a training image copied into validation
    labels["leak.png"] = labels["img04.png"]
    labels["ghost.png"] = "b"  # a row without a file
    shapes(rng).save(root / "orphan.png")  # a file without a row
    (root / "info.csv").write_text("image,label,note\n" + "".join(f"{n},{y},x{n}\n" for n, y in labels.items()))
    (root / "val.txt").write_text("img09.png\nimg10.png\nimg11.png\nleak.png\n")
    before = digest_tree(root)

    clean = tmp_path / "clean.csv"
    r = run_audit(tmp_path, "--dataset", "csv", "--data_dir", root, "--info_csv", root / "info.csv",
                  "--val_list", root / "val.txt", "--write_clean", clean)
    assert {d["image"] for d in r["corrupt"]} == {"bad.png"}
    assert {d["image"] for d in r["missing_files"]} == {"ghost.png"}
    assert r["files_without_rows"] == ["orphan.png"]
    assert r["csv_row_issues"] == []
    assert names(r["exact_duplicates"]) == {frozenset({"img01.png", "dup.bmp"}), frozenset({"img03.png", "conf.png"}),
                                            frozenset({"img04.png", "leak.png"})}
    assert names(r["byte_duplicates"]) == {frozenset({"img03.png", "conf.png"}), frozenset({"img04.png", "leak.png"})}
    assert names(r["leaks"]) == {frozenset({"img04.png", "leak.png"})}
    assert names(r["conflicting_labels"]) == {frozenset({"img03.png", "conf.png"})}
    assert {frozenset({p["a"]["image"], p["b"]["image"]}) for p in r["near_duplicates"]} == \
        {frozenset({"img02.png", "near.png"})}
    assert r["counts"]["near_duplicate_pairs_cross_split"] == 0
    assert r["class_counts"]["val"] == [1, 2, 1] and sum(r["class_counts"]["train"]) == 12  # bad/ghost excluded
    for f in ("audit.md", "audit.json", "class_balance.png", "samples_per_class.png", "image_sizes.png",
              "near_duplicates.png"):
        assert (tmp_path / "audit" / f).is_file(), f
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["counts"] == r["counts"]
    assert "Hamming distance <= 4" in (tmp_path / "audit" / "audit.md").read_text()

    # --write_clean: exactly the flagged rows go; the other columns keep their text; inputs untouched
    dropped = {"bad.png", "ghost.png", "img03.png", "conf.png", "dup.bmp", "img04.png"}
    kept = clean.read_text().splitlines()
    assert kept == ["image,label,note"] + [f"{n},{y},x{n}" for n, y in labels.items() if n not in dropped]
    assert (tmp_path / "clean.val_list.txt").read_text().split() == ["img09.png", "img10.png", "img11.png", "leak.png"]
    assert r["clean"]["dropped"] == len(dropped)
    assert digest_tree(root) == before
    # the cleaned index trains: build_data accepts it without --skip_bad_images
    data = datasets.build_data(config.get_parser().parse_args(
        ["--dataset", "csv", "--data_dir", str(root), "--info_csv", str(clean), "--val_list",
         str(tmp_path / "clean.val_list.txt"), "--img_size", "8"]))
    assert len(data.train_labels) == 18 - len(dropped) - 4  # rows - dropped - validation

    # refusing to overwrite the CSV, through the CLI: exit code 2 and the file unchanged
    res = run_script(["-m", "tools.audit", "--dataset", "csv", "--data_dir", str(root), "--info_csv",
                      str(root / "info.csv"), "--output_dir", str(tmp_path / "a2"), "--write_clean",
                      str(root / "info.csv")])
    assert res.returncode == 2 and "never modifies" in res.stderr, res.stderr
    assert digest_tree(root) == before


def test_csv_row_problems_are_reported_not_fatal(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "imgs"
    root.mkdir()
    for k in range(6):
        shapes(rng).save(root / f"{k}.png")
    # line 2..7: ids without extension; line 8 repeats line 3; lines 9-10 give image 4 two labels; line 11 is empty
    (root / "info.csv").write_text("image,label\n0,0\n1,1\n2,0\n3,1\n5,1\n007,0\n1,1\n4,0\n4,1\n,1\n")
    shapes(rng).save(root / "007.png")
    (root / "train.txt").write_text("0\n1\n2\n3\n9\n")
    r = run_audit(tmp_path, "--dataset", "csv", "--data_dir", root, "--info_csv", "info.csv", "--train_list",
                  "train.txt", "--write_clean", tmp_path / "clean.csv")
    assert {(e["line"], e["image"], e["problem"].split(" (")[0]) for e in r["csv_row_issues"]} == {
        (8, "1", "repeats the row at line 3"), (9, "4", "the image has rows with different labels"),
        (10, "4", "the image has rows with different labels"), (11, "", "no image name or no label"),
        (None, "9", "in --train_list but not in --info_csv")}
    assert r["files_without_rows"] == [] and r["missing_files"] == []  # 4.png has rows, 007 keeps its zeros
    assert r["split_sizes"] == {"train": 4, "unused": 2}  # 5 and 007 are in no list
    assert (tmp_path / "clean.csv").read_text().split() == ["image,label", "0,0", "1,1", "2,0", "3,1", "5,1", "007,0"]
    assert (tmp_path / "clean.train_list.txt").read_text().split() == ["0", "1", "2", "3"]


def write_folder(root, rng, classes="abc", per_class=4):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            shapes(rng, size=28).save(root / c / f"{c}{k}.png")


def test_imagefolder_audit_and_clean_list(tmp_path):
    rng = np.random.default_rng(2)
    data = tmp_path / "data"
    write_folder(data / "train", rng)
    write_folder(data / "val", rng, per_class=2)
    truncated_png(shapes(rng), data / "train" / "a" / "bad.png")
    shutil.copy(data / "train" / "b" / "b0.png", data / "train" / "b" / "b0_copy.png")
    shutil.copy(data / "train" / "a" / "a1.png", data / "val" / "a" / "leak.png")
    shutil.copy(data / "train" / "a" / "a2.png", data / "train" / "c" / "conf.png")
    Image.open(data / "train" / "b" / "b1.png").save(data / "train" / "b" / "near.jpg", quality=95)
    before = digest_tree(data)
    clean = tmp_path / "keep.txt"
    r = run_audit(tmp_path, "--dataset", "imagefolder", "--data_dir", data, "--write_clean", clean)
    p = os.path.join
    assert r["split_note"] is None and r["split_sizes"] == {"train": 16, "val": 7}
    assert {d["image"] for d in r["corrupt"]} == {p("train", "a", "bad.png")}
    assert r["missing_files"] == [] and "files_without_rows" not in r["counts"]
    assert names(r["exact_duplicates"]) == {
        frozenset({p("train", "b", "b0.png"), p("train", "b", "b0_copy.png")}),
        frozenset({p("train", "a", "a1.png"), p("val", "a", "leak.png")}),
        frozenset({p("train", "a", "a2.png"), p("train", "c", "conf.png")})}
    assert names(r["leaks"]) == {frozenset({p("train", "a", "a1.png"), p("val", "a", "leak.png")})}
    assert names(r["conflicting_labels"]) == {frozenset({p("train", "a", "a2.png"), p("train", "c", "conf.png")})}
    assert {frozenset({q["a"]["image"], q["b"]["image"]}) for q in r["near_duplicates"]} == \
        {frozenset({p("train", "b", "b1.png"), p("train", "b", "near.jpg")})}
    dropped = {p("train", "a", "bad.png"), p("train", "b", "b0_copy.png"), p("train", "a", "a1.png"),
               p("train", "a", "a2.png"), p("train", "c", "conf.png")}
    listed = sorted(str(f.relative_to(data)) for f in data.rglob("*.*"))
    assert sorted(clean.read_text().split()) == sorted(set(listed) - dropped)
    assert digest_tree(data) == before
    with pytest.raises(UserError, match="never modifies"):
        run_audit(tmp_path, "--dataset", "imagefolder", "--data_dir", data, "--write_clean",
                  data / "train" / "a" / "a0.png")


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_in_memory_audit_and_carved_split(tmp_path):
    rng = np.random.default_rng(3)
    train = np.stack([np.asarray(shapes(rng, 28, "L")) for _ in range(40)])
    test = np.stack([np.asarray(shapes(rng, 28, "L")) for _ in range(10)])
    train_y, test_y = np.arange(40) % 10, np.arange(10) % 10
    train[5] = train[1]
    train_y[5] = train_y[1]  # exact duplicate
    test[2] = train[3]
    test_y[2] = train_y[3]  # leak
    train[7] = train[6]  # conflict (labels 6 and 7 differ)
    train[9] = np.asarray(brighten(Image.fromarray(train[8])))  # near-duplicate
    for stem, a in (("train-images-idx3-ubyte", train), ("train-labels-idx1-ubyte", train_y),
                    ("t10k-images-idx3-ubyte", test), ("t10k-labels-idx1-ubyte", test_y)):
        write_idx(tmp_path / f"{stem}.gz", a)
    clean = tmp_path / "keep.csv"
    r = run_audit(tmp_path, "--data_dir", tmp_path, "--write_clean", clean)
    assert r["dataset"] == "fashion_mnist" and r["image_stats"]["shape"] == [1, 28, 28]
    assert names(r["exact_duplicates"]) == {frozenset({"train/1", "train/5"}), frozenset({"train/3", "test/2"}),
                                            frozenset({"train/6", "train/7"})}
    assert names(r["leaks"]) == {frozenset({"train/3", "test/2"})}
    assert names(r["conflicting_labels"]) == {frozenset({"train/6", "train/7"})}
    assert {frozenset({q["a"]["image"], q["b"]["image"]}) for q in r["near_duplicates"]} == \
        {frozenset({"train/8", "train/9"})}
    assert r["counts"]["leaked_train_images"] == 1 and "unreadable_images" not in r["counts"]
    assert r["counts"]["near_duplicate_pairs_labels_differ"] == 1  # train/8 and train/9 carry labels 8 and 9
    rows = clean.read_text().splitlines()
    assert rows[0] == "split,index,label"
    kept = {tuple(x.split(",")[:2]) for x in rows[1:]}
    dropped = {("train", "3"), ("train", "5"), ("train", "6"), ("train", "7")}  # leaked, 2nd copy, conflict
    assert kept == {("train", str(i)) for i in range(40)} - dropped | {("test", str(i)) for i in range(10)}

    # --val_ratio: the audit's validation split is exactly the one build_data carves
    argv = ["--data_dir", str(tmp_path), "--val_ratio", "0.25", "--seed", "4"]
    args = config.get_parser().parse_args(argv)
    items, _, images = audit._in_memory_items(args)
    assert audit._assign_roles(items, args) is not None
    val = torch.tensor([it.index for it in items if it.role == "val"])
    data = datasets.build_data(args)
    torch.testing.assert_close(images["train"][val], data.val_loader.images, rtol=0, atol=0)
    assert sum(it.role == "test" for it in items) == 10


def test_help_lists_only_the_audits_flags():
    res = run_script(["-m", "tools.audit", "--help"])
    assert res.returncode == 0 and len(res.stdout.splitlines()) <= 80, res.stdout
    assert "--phash_threshold" in res.stdout and "--data_dir" in res.stdout and "--mixup_alpha" not in res.stdout
    res = run_script(["-m", "tools.audit", "--phash_threshold", "x"])
    assert res.returncode == 2 and res.stderr.startswith("error: argument --phash_threshold") \
        and len(res.stderr.splitlines()) == 1, res.stderr
