"""Dataset audit: know the data before training on it. Every image is decoded once and every problem is
reported (unlike build_data, which stops at the first bad file): unreadable files, exact duplicates (decoded
pixels, and file bytes), near-duplicates by a 64-bit DCT perceptual hash (pHash, Zauner 2010), train/val/test
leakage, conflicting labels, CSV rows without files and files without rows, class balance and image sizes.

    python -m tools.audit [train.py's data flags] --output_dir DIR [--phash_threshold 4] [--write_clean PATH]

writes DIR/audit.md, audit.json, class_balance.png, samples_per_class.png, near_duplicates.png and, for file
datasets, image_sizes.png. --write_clean PATH writes a filtered index; the user's files are never changed.
"""
import hashlib
import io
import logging
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps

import config
from datasets import DATASETS, DEFAULT_VAL_RATIO, FILE_DEFAULT_CHANS, IN_MEMORY
from datasets.files import IMG_EXTENSIONS, _existing, _image_path, _read_list, load_image, read_imagefolder
from datasets.split import carve_validation
from utils.errors import UserError, run_cli
from utils.misc import resize_square

log = logging.getLogger(__name__)

PHASH_SIZE = 32  # images are reduced to 32x32 grey, then the top-left 8x8 DCT block gives 64 bits
MAX_PAIRS_IN_MEMORY = 5_000_000
ROLE_ORDER = ("val", "test", "train", "unused")  # which copy of an exact duplicate --write_clean keeps
LISTED = 20  # examples per problem in audit.md (audit.json lists all, near-duplicates up to --max_pairs)


@dataclass
class Item:
    """One entry of a split: an image as the dataset lists it."""
    role: str  # what training uses it for: train | val | test | unused
    name: str  # path relative to --data_dir, the CSV image name, or "<file split>/<index>" in memory
    label: int  # class index
    path: str = None  # image file (file datasets)
    index: int = None  # position in the in-memory tensor of its file split
    source: str = None  # the split the dataset puts it in (folder, list or file); `role` may differ after a carve
    row: int = None  # CSV row (0-based data row)
    missing: bool = False
    error: str = None  # why the file could not be decoded


# ---------------------------------------------------------------- perceptual hash and pair search

@lru_cache(maxsize=None)
def dct_matrix(n):
    """Orthonormal DCT-II matrix (n, n): row k is the k-th cosine basis vector."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def phash(gray32):
    """64-bit pHashes (uint64, N) of (N, 32, 32) grey images: DCT-II, keep the top-left 8x8 block (the lowest
    frequencies), set bit 8*r+c (most significant first) where coefficient (r, c) exceeds the block's median.
    Without ties exactly 32 bits are set, so Hamming distances between hashes are even."""
    d8 = dct_matrix(PHASH_SIZE)[:8]
    out = np.zeros(len(gray32), dtype=np.uint64)
    for s in range(0, len(gray32), 8192):  # chunks bound the float64 copy
        block = (d8 @ np.asarray(gray32[s:s + 8192], dtype=np.float64) @ d8.T).reshape(-1, 64)
        bits = block > np.median(block, axis=1, keepdims=True)
        out[s:s + 8192] = np.packbits(bits, axis=1).view(">u8").ravel()
    return out


def hamming_pairs(hashes, threshold, block=(512, 4096), limit=MAX_PAIRS_IN_MEMORY):
    """Every pair i < j with popcount(h_i ^ h_j) <= threshold: exact, by tiled all-pairs XOR + popcount.

    Returns int64 arrays (i, j, distance) sorted by (distance, i, j). ~70k hashes take seconds on one core;
    the tiles keep the temporaries in cache.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    n, (rb, cb) = len(h), block
    xbuf, cbuf, mbuf = np.empty((rb, cb), np.uint64), np.empty((rb, cb), np.uint8), np.empty((rb, cb), bool)
    found, total = [], 0
    for a in range(0, n, rb):
        b = min(a + rb, n)
        for c0 in range(a, n, cb):  # only columns j >= a: the upper triangle
            c1 = min(c0 + cb, n)
            x, c, m = xbuf[:b - a, :c1 - c0], cbuf[:b - a, :c1 - c0], mbuf[:b - a, :c1 - c0]
            np.bitwise_xor(h[a:b, None], h[None, c0:c1], out=x)
            np.bitwise_count(x, out=c)
            np.less_equal(c, threshold, out=m)
            if not m.any():
                continue
            i, j = np.nonzero(m)
            dist = c[i, j].astype(np.int64)
            i, j = i + a, j + c0
            keep = j > i
            total += int(keep.sum())
            if total > limit:
                raise UserError(f"--phash_threshold {threshold} matches more than {limit:,} image pairs; "
                                f"lower it (4 is a common choice)")
            found.append((i[keep], j[keep], dist[keep]))
    if not found:
        return tuple(np.zeros(0, np.int64) for _ in range(3))
    i, j, d = (np.concatenate(p) for p in zip(*found))
    order = np.lexsort((j, i, d))
    return i[order], j[order], d[order]


# ---------------------------------------------------------------- reading the dataset

def _digest(*parts):
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p)
    return h.hexdigest()


def inspect_file(path, in_chans):
    """Decode `path` as load_image does (upright, L or RGB) at its own size. Returns a dict with the file-byte
    hash, the decoded-pixel hash, the 32x32 grey thumbnail for pHash and size/mode/format, or the error text."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode, size = img.format, img.mode, img.size
            img.load()  # decode every byte: a truncated file fails here (Image.verify() would miss it)
            img = ImageOps.exif_transpose(img)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        img = img.convert("L" if in_chans == 1 else "RGB")
        pixels = np.asarray(img)
        grey = img if img.mode == "L" else img.convert("L")  # ITU-R 601 luma
        thumb = np.asarray(grey.resize((PHASH_SIZE, PHASH_SIZE), Image.BILINEAR), dtype=np.uint8)
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError, ...)
        return f"{type(e).__name__}: {e}".strip()
    return {"bytes": _digest(data), "pixels": _digest(str(pixels.shape).encode(), pixels.tobytes()),
            "thumb": thumb, "size": size, "mode": mode, "format": fmt}


def _in_memory_items(args):
    load, class_names, _, _ = IN_MEMORY[args.dataset]
    train_x, train_y, test_x, test_y = load(args.data_dir, args.download)
    items, images = [], {"train": train_x, "test": test_x}
    for source, labels in (("train", train_y), ("test", test_y)):
        items += [Item(role=source, name=f"{source}/{i}", label=int(y), index=i, source=source)
                  for i, y in enumerate(labels.tolist())]
    return items, list(class_names), images


def _imagefolder_items(args):
    splits = read_imagefolder(args.data_dir)
    class_names = sorted({c for s in splits.values() if s is not None for c in s[1]})
    index = {c: i for i, c in enumerate(class_names)}
    items = [Item(role=name, name=os.path.relpath(p, args.data_dir), label=index[c], path=p, source=name)
             for name, s in splits.items() if s is not None for p, c in zip(*s)]
    return items, class_names


def _csv_labels(texts):
    """Labels typed as pandas types a clean column for read_info_csv (so classes sort as in training): all
    integers -> int (also "3.0"), else all numbers -> float, else str; None where empty."""
    present = [t for t in texts if t]

    def convert(kind):
        try:
            return [None if not t else kind(t) for t in texts]
        except ValueError:
            return None
    floats = convert(float)
    if floats is not None and present:
        if all(v is None or v == int(v) for v in floats):
            return [None if v is None else int(v) for v in floats]
        return floats
    return [t or None for t in texts]


def _csv_items(args):
    """Items of a csv dataset, its class names, the problems found in the index itself (rows, lists), the CSV
    path and the image path of every row."""
    if not args.info_csv:
        raise UserError("--dataset csv needs --info_csv FILE (a CSV of image name and label)")
    info_csv = _existing(args.info_csv, args.data_dir, "--info_csv")
    try:
        df = pd.read_csv(info_csv, dtype=str, keep_default_na=False)  # the text as written: "007" stays "007"
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--info_csv {info_csv} is not a readable CSV ({first}); fix the file") from None
    df.columns = [str(c).strip() for c in df.columns]
    for col, flag in ((args.image_column, "--image_column"), (args.label_column, "--label_column")):
        if col not in df.columns:
            raise UserError(f"--info_csv {info_csv} has no column {col!r} (it has: "
                            f"{', '.join(map(repr, df.columns))}); pass {flag}")
    names = [v.strip() for v in df[args.image_column]]
    labels = _csv_labels([v.strip() for v in df[args.label_column]])
    issues, rows_of = [], defaultdict(list)
    for r, (name, label) in enumerate(zip(names, labels)):
        if not name or label is None:
            issues.append({"line": r + 2, "image": name, "problem": "no image name or no label"})
        else:
            rows_of[name].append(r)
    good = {}  # name -> its first row, for names whose rows all agree
    for name, rows in rows_of.items():
        if len({labels[r] for r in rows}) > 1:
            issues += [{"line": r + 2, "image": name, "problem": "the image has rows with different labels "
                        f"({', '.join(sorted({str(labels[r]) for r in rows}))})"} for r in rows]
            continue
        good[name] = rows[0]
        issues += [{"line": r + 2, "image": name, "problem": f"repeats the row at line {rows[0] + 2}"}
                   for r in rows[1:]]
    lists = {}
    for split, path, flag in (("train", args.train_list, "--train_list"), ("val", args.val_list, "--val_list")):
        if path:
            lists[split] = _read_list(path, flag, args.data_dir)
            issues += [{"line": None, "image": n, "problem": f"in {flag} but not in --info_csv"}
                       for n in lists[split] if n not in good]
            lists[split] = [n for n in lists[split] if n in good]
    if "train" not in lists:
        held_out = set(lists.get("val", ()))
        lists["train"] = [n for n in good if n not in held_out]
    used = {n for names_ in lists.values() for n in names_}
    lists["unused"] = [n for n in good if n not in used]  # rows in neither --train_list nor --val_list
    class_names = sorted({labels[r] for r in good.values()})
    index = {c: i for i, c in enumerate(class_names)}
    items = [Item(role=split, name=n, label=index[labels[good[n]]], path=_image_path(args.data_dir, n),
                  row=good[n], source=split) for split in ("train", "val", "unused") for n in lists.get(split, ())]
    row_paths = [_image_path(args.data_dir, n) for n in names if n]  # every row, flagged or not
    return items, [str(c) for c in class_names], issues, info_csv, row_paths


def files_without_rows(data_dir, listed_paths, exclude=()):
    """Image files under data_dir that no row refers to (relative paths, sorted); `exclude`: folders to skip."""
    listed = {os.path.realpath(p) for p in listed_paths}
    skip = {os.path.realpath(p) for p in exclude if p}
    extra = []
    for folder, dirs, files in os.walk(data_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(folder, d)) not in skip)
        for f in sorted(files):
            p = os.path.join(folder, f)
            if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS) and os.path.realpath(p) not in listed:
                extra.append(os.path.relpath(p, data_dir))
    return extra


def _assign_roles(items, args):
    """Mirror build_data's split choice: --val_ratio/--kfold (or, with no val/test split, a default 20%) carve
    validation from the readable training images; the dataset's own held-out split then becomes the test split."""
    roles = {it.role for it in items}
    carve = bool(args.val_ratio or args.kfold) or not roles & {"val", "test"}
    if not carve:
        return None
    train = [it for it in items if it.role == "train" and not it.missing and it.error is None]
    ratio = args.val_ratio if (args.val_ratio or args.kfold) else DEFAULT_VAL_RATIO
    try:
        _, val_idx = carve_validation(np.array([it.label for it in train]), ratio, args.kfold, args.fold, args.seed)
    except UserError as e:  # e.g. too few readable images: report the rest anyway
        log.warning("no validation split carved: %s", e)
        return f"no validation split could be carved ({e})"
    if "test" in roles and "val" in roles:
        for it in items:
            it.role = "unused" if it.role == "val" else it.role  # build_data ignores the dataset's val split
    else:
        for it in items:
            it.role = "test" if it.role == "val" else it.role
    for k in val_idx:
        train[k].role = "val"
    how = f"--kfold {args.kfold} --fold {args.fold}" if args.kfold else f"--val_ratio {ratio}"
    return f"validation carved from train as train.py does ({how}, --seed {args.seed})"


def _decode_all(items, in_chans, workers):
    """Decode every distinct file once (threads); fills item.missing / item.error; returns {path: info}."""
    paths = list(dict.fromkeys(it.path for it in items))
    present = [p for p in paths if os.path.isfile(p)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = dict(zip(present, pool.map(lambda p: inspect_file(p, in_chans), present)))
    for it in items:
        r = results.get(it.path)
        it.missing = r is None
        it.error = r if isinstance(r, str) else None
    return {p: r for p, r in results.items() if not isinstance(r, str)}


def _memory_thumbs(images, chunk=8192):
    """(N, 32, 32) uint8 grey thumbnails of uint8 NCHW images (luma, bilinear antialiased as PIL)."""
    out = []
    for x in images.split(chunk):
        x = x.float()
        if x.shape[1] == 3:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = resize_square(x, PHASH_SIZE)
        out.append(x[:, 0].round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------- the analysis

def _as_dict(it, class_names):
    return {"split": it.role, "image": it.name, "label": class_names[it.label]}


def _keep_rank(it):
    return ROLE_ORDER.index(it.role)


def pair_mae(thumbs, i, j, chunk=16384):
    """Mean absolute difference (0-255) of the 32x32 grey thumbnails of each pair (i, j): a pixel-level check of
    what the pHash matched."""
    out = np.empty(len(i), dtype=np.float64)
    for s in range(0, len(i), chunk):
        a, b = thumbs[i[s:s + chunk]].astype(np.int16), thumbs[j[s:s + chunk]].astype(np.int16)
        out[s:s + chunk] = np.abs(a - b).reshape(len(a), -1).mean(1)
    return out


def analyse(items, content, thumbs_of, class_names, threshold, max_pairs):
    """Duplicate groups, leaks, conflicts and near-duplicate pairs over the readable items.

    content[k]: decoded-pixel hash of items[k] (None if unreadable); thumbs_of: {pixel hash: uint8 (32, 32) grey
    thumbnail}. Returns (findings dict, set of item positions --write_clean drops, the 12 closest near-duplicate
    pairs as (item, item, distance)).
    """
    groups = defaultdict(list)
    for k, c in enumerate(content):
        if c is not None:
            groups[c].append(k)
    exact = [g for g in groups.values() if len(g) > 1]
    leaks = [g for g in exact if any(items[k].role == "train" for k in g)
             and any(items[k].role in ("val", "test") for k in g)]
    conflicts = [g for g in exact if len({items[k].label for k in g}) > 1]
    drop = {k for k, c in enumerate(content) if c is None}  # missing or unreadable
    for g in exact:
        if len({items[k].label for k in g}) > 1:
            drop.update(g)  # which label is right is unknown: drop every copy
        else:
            keep = min(g, key=lambda k: (_keep_rank(items[k]), k))  # the val/test copy wins over train
            drop.update(k for k in g if k != keep)

    # Near-duplicates: one entry per distinct content (exact copies are already reported above).
    keys = list(groups)
    thumbs = np.stack([thumbs_of[c] for c in keys]) if keys else np.zeros((0, PHASH_SIZE, PHASH_SIZE), np.uint8)
    i, j, d = hamming_pairs(phash(thumbs), threshold)
    mae = pair_mae(thumbs, i, j)
    order = np.lexsort((j, i, d, mae))  # the most alike in pixels first
    i, j, d, mae = i[order], j[order], d[order], mae[order]
    has_train = np.array([any(items[k].role == "train" for k in groups[c]) for c in keys], dtype=bool)
    has_eval = np.array([any(items[k].role in ("val", "test") for k in groups[c]) for c in keys], dtype=bool)
    label = np.array([items[groups[c][0]].label for c in keys], dtype=np.int64)
    cross = (has_train[i] & has_eval[j]) | (has_train[j] & has_eval[i])
    differs = label[i] != label[j]
    first = [items[groups[c][0]] for c in keys]
    near = [{"a": _as_dict(first[a], class_names), "b": _as_dict(first[b], class_names), "distance": int(dist),
             "thumb_mae": round(float(m), 3), "cross_split": bool(x), "labels_differ": bool(y)}
            for a, b, dist, m, x, y in zip(i[:max_pairs].tolist(), j[:max_pairs].tolist(), d[:max_pairs].tolist(),
                                           mae[:max_pairs].tolist(), cross[:max_pairs].tolist(),
                                           differs[:max_pairs].tolist())]

    def listing(gs):
        return [[_as_dict(items[k], class_names) for k in g] for g in gs]

    findings = {
        "exact_duplicates": listing(exact), "leaks": listing(leaks), "conflicting_labels": listing(conflicts),
        "near_duplicates": near,
        "counts": {"exact_duplicate_groups": len(exact),
                   "exact_duplicate_extra_copies": sum(len(g) - 1 for g in exact),
                   "leak_groups": len(leaks),
                   "leaked_train_images": sum(items[k].role == "train" for g in leaks for k in g),
                   "conflicting_label_groups": len(conflicts),
                   "near_duplicate_pairs": int(len(d)),
                   "near_duplicate_pairs_cross_split": int(cross.sum()),
                   "near_duplicate_pairs_labels_differ": int(differs.sum())},
        "near_duplicate_distance_histogram": {int(k): int(v) for k, v in zip(*np.unique(d, return_counts=True))},
        "near_duplicate_thumb_mae_quantiles": {q: round(float(np.quantile(mae, q)), 3) for q in (0.01, 0.1, 0.5)}
        if len(mae) else {},
    }
    closest = [(first[a], first[b], dist) for a, b, dist in zip(i[:12].tolist(), j[:12].tolist(), d[:12].tolist())]
    return findings, drop, closest


def byte_duplicates(items, infos, class_names):
    """Groups of items whose files are byte-identical (file datasets)."""
    groups = defaultdict(list)
    for it in items:
        if it.path in infos:
            groups[infos[it.path]["bytes"]].append(it)
    return [[_as_dict(it, class_names) for it in g] for g in groups.values() if len(g) > 1]


def class_count_table(items, num_classes):
    """{role: [count per class]} over the readable items."""
    out = {}
    for role in ("train", "val", "test", "unused"):
        labels = [it.label for it in items if it.role == role and not it.missing and it.error is None]
        if labels or any(it.role == role for it in items):
            out[role] = np.bincount(np.array(labels, dtype=np.int64), minlength=num_classes).tolist()
    return out


def imbalance_ratio(counts):
    """Largest over smallest class count (None when a class has no image)."""
    return None if not counts or min(counts) == 0 else max(counts) / min(counts)


def image_stats(infos):
    """Size, aspect ratio, mode and format distribution of the decoded files."""
    if not infos:
        return {}
    w = np.array([r["size"][0] for r in infos.values()])
    h = np.array([r["size"][1] for r in infos.values()])
    aspect = w / h
    q = lambda a: {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max())}  # noqa: E731
    return {"files": len(infos), "width": q(w), "height": q(h), "aspect_ratio": q(aspect),
            "sizes": {f"{a}x{b}": n for (a, b), n in Counter(zip(w.tolist(), h.tolist())).most_common(10)},
            "modes": dict(Counter(r["mode"] for r in infos.values()).most_common()),
            "formats": dict(Counter(str(r["format"]) for r in infos.values()).most_common())}


# ---------------------------------------------------------------- plots

def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def plot_class_balance(path, counts, class_names):
    fig = _figure((max(6, 0.6 * len(class_names) + 2), 4))
    ax = fig.subplots()
    roles = [r for r in counts if sum(counts[r])]
    width = 0.8 / max(1, len(roles))
    x = np.arange(len(class_names))
    for n, role in enumerate(roles):
        ax.bar(x + n * width, counts[role], width, label=role)
    ax.set_xticks(x + width * (len(roles) - 1) / 2, class_names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("images")
    ax.set_title("class counts")
    if roles:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_image_sizes(path, infos):
    w = np.array([r["size"][0] for r in infos.values()])
    h = np.array([r["size"][1] for r in infos.values()])
    modes = Counter(r["mode"] for r in infos.values())
    fig = _figure((13, 3.8))
    ax = fig.subplots(1, 3)
    ax[0].scatter(w, h, s=6, alpha=0.5)
    ax[0].set_xlabel("width")
    ax[0].set_ylabel("height")
    ax[0].set_title("image size (px)")
    ax[1].hist(w / h, bins=30)
    ax[1].set_title("aspect ratio (width / height)")
    ax[2].bar(list(modes), list(modes.values()))
    ax[2].set_title("PIL mode")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------- report and clean index

def _fmt_item(d):
    return f"`{d['image']}` ({d['split']}, {d['label']})"


def _section(lines, title, entries, fmt, total=None):
    total = len(entries) if total is None else total
    lines += ["", f"## {title}: {total}"] + ([""] if entries else [])
    for e in entries[:LISTED]:
        lines.append(f"- {fmt(e)}")
    if total > LISTED:
        lines.append(f"- ... and {total - LISTED} more (all in audit.json)")


def write_markdown(path, report):
    c, r = report["counts"], report
    lines = [f"# Dataset audit: {r['dataset']}", "",
             f"{r['images']} images ({', '.join(f'{n} {k}' for k, n in r['split_sizes'].items())}), "
             f"{len(r['class_names'])} classes; scanned in {r['seconds']:.1f} s.", ""]
    if r.get("split_note"):
        lines += [f"Splits: {r['split_note']}.", ""]
    lines += ["| check | found |", "|---|---|"]
    for key, n in c.items():
        lines.append(f"| {key.replace('_', ' ')} | {n} |")
    if r["file_dataset"]:
        _section(lines, "Unreadable or truncated images", r["corrupt"], lambda e: f"{_fmt_item(e)}: {e['error']}")
    else:
        lines += ["", "## Unreadable images: n/a", "",
                  "In-memory dataset: the IDX/pickle files were read and size-checked as a whole."]
    if r["dataset"] == "csv":
        _section(lines, "CSV rows without a file", r["missing_files"], _fmt_item)
        _section(lines, "Files without a CSV row", r["files_without_rows"], lambda e: f"`{e}`")
        _section(lines, "Problems in the CSV and the lists", r["csv_row_issues"],
                 lambda e: f"line {e['line']}: `{e['image']}` {e['problem']}" if e["line"] else
                 f"`{e['image']}` {e['problem']}")
    elif r["file_dataset"]:
        _section(lines, "Listed files that do not exist", r["missing_files"], _fmt_item)
    _section(lines, "Exact duplicates (same decoded pixels), groups", r["exact_duplicates"],
             lambda g: ", ".join(map(_fmt_item, g)))
    if r["file_dataset"]:
        _section(lines, "Byte-identical files, groups", r["byte_duplicates"], lambda g: ", ".join(map(_fmt_item, g)))
    _section(lines, "Leakage: the same image in train and val/test, groups", r["leaks"],
             lambda g: ", ".join(map(_fmt_item, g)))
    _section(lines, "Conflicting labels: the same image with different labels, groups", r["conflicting_labels"],
             lambda g: ", ".join(map(_fmt_item, g)))
    t = r["phash_threshold"]
    _section(lines, f"Near-duplicates (pHash Hamming distance <= {t} of 64 bits, exact duplicates excluded), pairs",
             r["near_duplicates"], lambda e: f"d={e['distance']}, thumbnail MAE {e['thumb_mae']:.1f}: "
             f"{_fmt_item(e['a'])} ~ {_fmt_item(e['b'])}" + (" **cross-split**" if e["cross_split"] else ""),
             total=c["near_duplicate_pairs"])
    q = r["near_duplicate_thumb_mae_quantiles"]
    lines += ["", "pHash: the image in grey, resized to 32x32 (bilinear, antialiased), DCT-II; bit (r, c) of the "
              f"top-left 8x8 block is set where the coefficient exceeds the block's median. Pairs at distance <= {t} "
              "are near-duplicates (distances are even: every hash has 32 bits set). Histogram of distances: "
              + ", ".join(f"{k}: {v}" for k, v in r["near_duplicate_distance_histogram"].items()) + ". "
              "Pairs are listed most alike first by the mean absolute difference of their 32x32 grey thumbnails "
              "(0-255; a pixel-level check of the hash match)"
              + (f"; its 1%/10%/50% quantiles: {q[0.01]:.1f}/{q[0.1]:.1f}/{q[0.5]:.1f}." if q else ".")
              + " pHash keeps only the coarse shape: on small, centred images (Fashion-MNIST) different items with "
              "the same silhouette match too; look at near_duplicates.png and lower --phash_threshold.",
              "", "## Class balance", "", "| class | " + " | ".join(r["class_counts"]) + " |",
              "|---|" + "---|" * len(r["class_counts"])]
    for k, name in enumerate(r["class_names"]):
        lines.append(f"| {name} | " + " | ".join(str(v[k]) for v in r["class_counts"].values()) + " |")
    ratio = r["imbalance_ratio"]
    lines += ["", f"Imbalance ratio (largest / smallest training class): "
              f"{'n/a (a class has no training image)' if ratio is None else f'{ratio:.2f}'}. "
              "See class_balance.png; --class_weights auto or --balanced_sampler counter imbalance.", "",
              "## Image sizes and modes", ""]
    s = r["image_stats"]
    if r["file_dataset"] and s:
        mmm = lambda q, f="{:g}": "/".join(f.format(q[k]) for k in ("min", "median", "max"))  # noqa: E731
        lines += [f"- min/median/max width {mmm(s['width'])}, height {mmm(s['height'])}, aspect ratio (w/h) "
                  f"{mmm(s['aspect_ratio'], '{:.2f}')}",
                  f"- most common sizes: {s['sizes']}", f"- modes: {s['modes']}", f"- formats: {s['formats']}",
                  "- see image_sizes.png; training squashes every image to --img_size (aspect ratio not kept)"]
    elif r["file_dataset"]:
        lines.append("No readable image.")
    else:
        lines.append(f"Uniform: in-memory dataset, every image is {s['shape']} uint8.")
    lines += ["", "samples_per_class.png shows training images of each class; near_duplicates.png the closest pairs."]
    if r.get("clean"):
        cl = r["clean"]
        lines += ["", "## Clean index", "", f"{cl['path']}: kept {cl['kept']}, dropped {cl['dropped']} "
                  "(unreadable, missing, conflicting labels, extra copies of exact duplicates, leaked train copies)."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _atomic_write_text(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def _check_clean_path(path, inputs):
    real = os.path.realpath(path)
    for p in inputs:
        if p and os.path.realpath(p) == real:
            raise UserError(f"--write_clean {path} is an input file of the dataset; the audit never modifies "
                            f"user files: give a new path")
    if os.path.isdir(path):
        raise UserError(f"--write_clean {path} is a folder; give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"folder {folder} of --write_clean {path} does not exist; create it first")


def _list_path(clean_path, flag):
    return f"{os.path.splitext(clean_path)[0]}.{flag.strip('-')}.txt"


def write_clean(path, args, items, drop, row_issues, info_csv):
    """Write the index without the dropped items. Returns (kept, dropped, extra files written)."""
    kept_items = [it for k, it in enumerate(items) if k not in drop]
    extra = []
    if args.dataset == "csv":
        df = pd.read_csv(info_csv, dtype=str, keep_default_na=False)  # the file's own text, re-quoted at most
        bad_rows = {e["line"] - 2 for e in row_issues if e["line"]}
        keep_rows = sorted({it.row for it in kept_items} - bad_rows)
        buf = io.StringIO()
        df.iloc[keep_rows].to_csv(buf, index=False)
        _atomic_write_text(path, buf.getvalue())
        for split, given, flag in (("train", args.train_list, "--train_list"), ("val", args.val_list, "--val_list")):
            if given:  # lists name images; keep them consistent with the cleaned CSV
                out = _list_path(path, flag)
                _atomic_write_text(out, "".join(f"{it.name}\n" for it in kept_items if it.source == split))
                extra.append(out)
        return len(keep_rows), len(df) - len(keep_rows), extra
    if args.dataset in IN_MEMORY:
        text = "split,index,label\n" + "".join(f"{it.source},{it.index},{it.label}\n" for it in kept_items)
    else:
        text = "".join(f"{it.name}\n" for it in kept_items)
    _atomic_write_text(path, text)
    return len(kept_items), len(items) - len(kept_items), extra


def _samples(items, class_names, get_image, per_class, seed):
    rng = np.random.default_rng(seed)
    images, titles = [], []
    for c, name in enumerate(class_names):
        ks = [k for k, it in enumerate(items) if it.label == c and it.role == "train" and not it.missing
              and it.error is None] or [k for k, it in enumerate(items) if it.label == c and not it.missing
                                        and it.error is None]
        chosen = sorted(rng.choice(len(ks), size=min(per_class, len(ks)), replace=False).tolist()) if ks else []
        for n in range(per_class):
            images.append(get_image(items[ks[chosen[n]]]) if n < len(chosen) else None)
            titles.append(name if n == 0 else "")
    return images, titles


def audit(args):
    """Run every check for the data flags in `args`; writes the report into args.output_dir. Returns the
    report dict (also in audit.json)."""
    from reporting.report import save_image_grid
    from utils.outputs import write_json

    t0 = time.perf_counter()
    if args.dataset not in DATASETS:
        raise UserError(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    if not 0 <= args.phash_threshold <= 64:
        raise UserError(f"--phash_threshold {args.phash_threshold} must be in 0..64 bits (4 is common)")
    file_dataset = args.dataset not in IN_MEMORY
    if file_dataset and not os.path.isdir(args.data_dir):
        raise UserError(f"--data_dir {args.data_dir} does not exist; point it at the image folder")
    data_dir, out_dir = os.path.realpath(args.data_dir), os.path.realpath(args.output_dir)
    if args.dataset == "imagefolder" and os.path.commonpath([data_dir, out_dir]) == data_dir:
        raise UserError(f"--output_dir {args.output_dir} is inside --data_dir, where its plots would be read as "
                        f"images of a class; write the audit elsewhere")
    if args.train_subset or args.eval_subset:
        log.info("the audit scans the full splits: --train_subset/--eval_subset are ignored")
    row_issues, info_csv, extra_files, infos, memory = [], None, [], {}, None
    if args.dataset == "csv":
        items, class_names, row_issues, info_csv, row_paths = _csv_items(args)
    elif args.dataset == "imagefolder":
        items, class_names = _imagefolder_items(args)
    else:
        items, class_names, memory = _in_memory_items(args)
    if args.write_clean:
        _check_clean_path(args.write_clean, [info_csv, args.train_list, args.val_list]
                          + [it.path for it in items if it.path])
        if args.dataset == "csv":
            for given, flag in ((args.train_list, "--train_list"), (args.val_list, "--val_list")):
                if given:
                    _check_clean_path(_list_path(args.write_clean, flag), [info_csv, args.train_list, args.val_list])
    os.makedirs(args.output_dir, exist_ok=True)

    # -- decode once: content hashes and pHashes
    if file_dataset:
        in_chans = args.in_chans or FILE_DEFAULT_CHANS
        log.info("decoding %d images", len({it.path for it in items}))
        infos = _decode_all(items, in_chans, args.workers)
        content = [infos[it.path]["pixels"] if it.path in infos else None for it in items]
        thumbs_of = {r["pixels"]: r["thumb"] for r in infos.values()}
        if args.dataset == "csv":
            extra_files = files_without_rows(args.data_dir, row_paths, exclude=[args.output_dir])
    else:
        content, thumbs_of = [None] * len(items), {}
        for source, x in memory.items():
            ks = [k for k, it in enumerate(items) if it.source == source]
            digests = [_digest(a.tobytes()) for a in x.numpy()]
            for k, dg in zip(ks, digests):
                content[k] = dg
            thumbs_of.update(zip(digests, _memory_thumbs(x)))
    split_note = _assign_roles(items, args)

    # -- the checks
    log.info("searching near-duplicates among %d distinct images (pHash distance <= %d)",
             len(thumbs_of), args.phash_threshold)
    findings, drop, closest = analyse(items, content, thumbs_of, class_names, args.phash_threshold, args.max_pairs)
    corrupt = [{**_as_dict(it, class_names), "error": it.error} for it in items if it.error]
    missing = [_as_dict(it, class_names) for it in items if it.missing]
    byte_dups = byte_duplicates(items, infos, class_names) if file_dataset else []
    counts = class_count_table(items, len(class_names))
    found = {}
    if file_dataset:
        found.update(unreadable_images=len(corrupt), missing_files=len(missing))
    if args.dataset == "csv":
        found.update(files_without_rows=len(extra_files), csv_row_issues=len(row_issues))
    if file_dataset:
        found.update(byte_duplicate_groups=len(byte_dups))
    found.update(findings.pop("counts"))
    report = {
        "dataset": args.dataset, "data_dir": os.path.abspath(args.data_dir) if file_dataset else None,
        "file_dataset": file_dataset, "images": len(items), "class_names": class_names,
        "split_sizes": dict(Counter(it.role for it in items)), "split_note": split_note,
        "phash_threshold": args.phash_threshold, "counts": found,
        "corrupt": corrupt, "missing_files": missing, "files_without_rows": extra_files,
        "csv_row_issues": row_issues, "byte_duplicates": byte_dups, **findings,
        "class_counts": counts, "imbalance_ratio": imbalance_ratio(counts.get("train", [])),
        "image_stats": image_stats(infos) if file_dataset else
        {"shape": list(next(iter(memory.values())).shape[1:]), "uniform": True},
    }

    # -- plots
    plot_class_balance(os.path.join(args.output_dir, "class_balance.png"), counts, class_names)
    if file_dataset and infos:
        plot_image_sizes(os.path.join(args.output_dir, "image_sizes.png"), infos)
    if file_dataset:
        def get_image(it):
            return load_image(it.path, args.in_chans or FILE_DEFAULT_CHANS, args.img_size or 64)
    else:
        def get_image(it):
            return memory[it.source][it.index]
    images, titles = _samples(items, class_names, get_image, 8, args.seed)
    save_image_grid(os.path.join(args.output_dir, "samples_per_class.png"), images, titles, ncols=8)
    if closest:
        pair_images, pair_titles = [], []
        for a, b, dist in closest:
            pair_images += [get_image(a), get_image(b)]
            pair_titles += [f"{a.name}\n{class_names[a.label]}", f"d={dist}: {b.name}\n{class_names[b.label]}"]
        save_image_grid(os.path.join(args.output_dir, "near_duplicates.png"), pair_images, pair_titles, ncols=6)

    if args.write_clean:
        kept, dropped, lists = write_clean(args.write_clean, args, items, drop, row_issues, info_csv)
        report["clean"] = {"path": args.write_clean, "kept": kept, "dropped": dropped, "lists": lists}
        log.info("wrote %s: kept %d, dropped %d%s", args.write_clean, kept, dropped,
                 f" (and {', '.join(lists)})" if lists else "")
    report["seconds"] = time.perf_counter() - t0
    write_json(os.path.join(args.output_dir, "audit.json"), report)
    write_markdown(os.path.join(args.output_dir, "audit.md"), report)
    log.info("audit of %d images in %.1f s: %s -> %s", len(items), report["seconds"],
             ", ".join(f"{k} {v}" for k, v in report["counts"].items()), args.output_dir)
    return report


def get_parser():
    p = config.tool_parser("Audit a dataset (train.py's data flags) and write audit.md, audit.json and plots.",
                           usage="%(prog)s [data flags] --output_dir DIR [options]")
    g = p.add_argument_group("audit")
    g.add_argument("--output_dir", metavar="DIR", help="where audit.md, audit.json and the plots go (required)")
    g.add_argument("--seed", type=int, default=0, metavar="N",
                   help="the run's --seed (or --data_seed): seeds the validation carve and the sample images")
    g.add_argument("--phash_threshold", type=int, default=4, metavar="BITS",
                   help="near-duplicates: largest Hamming distance between 64-bit pHashes")
    g.add_argument("--write_clean", default=None, metavar="PATH",
                   help="write the index without flagged images: a CSV (csv), a list of image paths "
                        "(imagefolder) or split,index rows (in-memory); never overwrites the inputs")
    g.add_argument("--max_pairs", type=int, default=10000, metavar="N",
                   help="near-duplicate pairs listed in audit.json")
    config.add_data_args(p)
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if not args.output_dir:
        raise UserError("--output_dir DIR is required: the audit writes audit.md, audit.json and plots there")
    return audit(args)


if __name__ == "__main__":
    from utils.logger import setup_logging
    setup_logging()
    run_cli(main)
