"""Image-file datasets: class sub-folders (`imagefolder`) or a CSV of file name -> label (`csv`).

Every image is converted to RGB (or L for --in_chans 1) and squashed to img_size x img_size
(aspect ratio not kept). Before training, every listed image of the chosen classes (--classes) is
opened and fully decoded once (`Image.verify()` misses truncated files), which also gives exact
per-channel pixel sums for mean/std.
"""
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps

from utils.errors import UserError

from .split import select_classes

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def load_image(path, in_chans, img_size, crop_pct=0.0, center_crop=True):
    """Decode `path` fully into a uint8 (in_chans, img_size, img_size) tensor: squashed to the square, or with
    crop_pct (the anchors' evaluation preset) resized with its aspect kept to a shorter side of
    img_size / crop_pct and centre-cropped to img_size (center_crop=False: to that shorter side, for a
    training-side random-resized crop)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)  # a loaded copy, upright as the camera meant it
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency must go through RGBA before RGB/L
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit integer) greyscale: PIL's convert("L") clips at 255, so mid-grey would read as
        # white; scale the full 16-bit range to 8 bits instead
        wide = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(wide), 0, 255).astype(np.uint8), mode="L")
    img = img.convert("L" if in_chans == 1 else "RGB")
    if crop_pct:
        side = round(img_size / crop_pct)
        scale = side / min(img.size)
        img = img.resize((max(side, round(img.width * scale)), max(side, round(img.height * scale))),
                         Image.BILINEAR)
        crop = img_size if center_crop else side
        left, top = (img.width - crop) // 2, (img.height - crop) // 2
        img = img.crop((left, top, left + crop, top + crop))
    elif img.size != (img_size, img_size):
        img = img.resize((img_size, img_size), Image.BILINEAR)  # PIL antialiases when shrinking
    return torch.from_numpy(np.array(img)).reshape(img.height, img.width, in_chans).permute(2, 0, 1)


class ImageFileDataset(torch.utils.data.Dataset):
    """(uint8 CHW tensor, int label) pairs decoded from image files; `transform` maps uint8 CHW to
    uint8 CHW (the per-sample training augmentation) and is None for evaluation."""

    def __init__(self, paths, labels, in_chans, img_size, transform=None, crop_pct=0.0, train=False):
        self.paths, self.labels = list(paths), [int(y) for y in labels]
        self.in_chans, self.img_size, self.transform = in_chans, img_size, transform
        self.crop_pct, self.train = crop_pct, train  # crop_pct: training images keep the larger square

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        x = load_image(self.paths[i], self.in_chans, self.img_size, self.crop_pct, center_crop=not self.train)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[i]


def _probe(path, in_chans, img_size, keep=False):
    """Per-channel (sum, sum of squares) of the decoded image as int64 (2, C), or the error text; with `keep`,
    (those sums, the decoded uint8 CHW image)."""
    try:
        img = load_image(path, in_chans, img_size)
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, ...)
        return f"{type(e).__name__}: {e}"
    x = img.long()
    sums = torch.stack([x.sum((1, 2)), (x * x).sum((1, 2))]).numpy()
    return (sums, img) if keep else sums


def check_images(paths, in_chans, img_size, skip_bad, threads=1, keep=False):
    """Decode every image once; returns ({path: int64 (2, C) pixel sums}, paths that failed), and with `keep`
    also {path: decoded uint8 CHW image} (--cache_images ram).

    Missing or undecodable files raise a UserError naming them, or with `skip_bad` are only
    logged and left out of the returned dicts.
    """
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing and not skip_bad:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{len(missing)} listed image(s) not found: {', '.join(missing[:3])}{more}; "
                        f"check --data_dir and the image names, or pass --skip_bad_images to drop them")
    present = [p for p in paths if os.path.isfile(p)]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(lambda p: _probe(p, in_chans, img_size, keep), present))
    good = {p: r for p, r in zip(present, results) if not isinstance(r, str)}
    sums = {p: r[0] for p, r in good.items()} if keep else good
    bad = [(p, r) for p, r in zip(present, results) if isinstance(r, str)]
    if bad and not skip_bad:
        total = f" ({len(bad)} unreadable images in total)" if len(bad) > 1 else ""
        raise UserError(f"cannot decode image {bad[0][0]} ({bad[0][1]}){total}; replace or delete it, "
                        f"or pass --skip_bad_images to drop unreadable images")
    if missing or bad:
        example = (missing or [bad[0][0]])[0]
        log.warning("--skip_bad_images: dropped %d missing and %d unreadable image(s), e.g. %s",
                    len(missing), len(bad), example)
    failed = missing + [p for p, _ in bad]
    return (sums, failed, {p: r[1] for p, r in good.items()}) if keep else (sums, failed)


def _read_number(path):
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _reclaimable(stat_path, key):
    """The `key` line of a cgroup memory.stat (page cache the kernel can drop), 0 where it is not there."""
    try:
        with open(stat_path) as f:
            return next((int(line.split()[1]) for line in f if line.split()[:1] == [key]), 0)
    except (OSError, ValueError, IndexError):
        return 0


def available_memory(root="/"):
    """Bytes this process may still allocate: the kernel's MemAvailable, capped by the container's memory limit
    less its working set (usage less inactive page cache, as docker and the kubelet count it; cgroup v2, else
    v1); None where neither can be read."""
    found = []
    try:
        with open(os.path.join(root, "proc/meminfo")) as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    cgroup = os.path.join(root, "sys/fs/cgroup")
    for limit, usage, stat, cache in (("memory.max", "memory.current", "memory.stat", "inactive_file"),
                                      ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                       "memory/memory.stat", "total_inactive_file")):
        cap, used = _read_number(os.path.join(cgroup, limit)), _read_number(os.path.join(cgroup, usage))
        if cap is not None and used is not None and cap < 2**60:  # v1 writes a huge number for no limit
            used -= min(_reclaimable(os.path.join(cgroup, stat), cache), used)
            found.append(max(cap - used, 0))
            break
    return min(found) if found else None


def check_cache_fits(count, in_chans, img_size, available, share=0.5, copies=1):
    """UserError unless `copies` caches of `count` decoded uint8 images (one per process on this machine, as
    torchrun's ranks each hold their own) fit in `share` of `available` bytes (None: not known)."""
    need = count * in_chans * img_size * img_size
    if available is not None and copies * need > share * available:
        each = f", {copies} processes each holding a copy" if copies > 1 else ""
        raise UserError(f"--cache_images ram needs {copies * need / 2**30:.1f} GiB for {count} images at {in_chans}"
                        f"x{img_size}x{img_size}{each} (every listed image of the chosen classes, before the subsets), "
                        f"more than half of the {available / 2**30:.1f} GiB available; lower --img_size, or drop "
                        f"--cache_images ram to decode from disk every epoch")
    return need


def _scan_classes(root):
    """(paths, class names) of the images in the class sub-folders of `root`, sorted."""
    paths, names, empty = [], [], []
    for cls in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                      and not d.startswith(".")):
        found = len(paths)
        for folder, dirs, files in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
            dirs.sort()
            for f in sorted(files):
                if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS):
                    paths.append(os.path.join(folder, f))
                    names.append(cls)
        if len(paths) == found:
            empty.append(cls)
    if empty and paths:
        log.warning("%s: class folder(s) without images, left out: %s", root, ", ".join(empty))
    return paths, names


SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}


def _split_folder(data_dir, name):
    """The one sub-folder of data_dir that holds split `name` under any of its usual names, else None."""
    found = [d for d in SPLIT_FOLDERS[name] if os.path.isdir(os.path.join(data_dir, d))]
    if len(found) > 1:
        raise UserError(f"{data_dir} has both {found[0]}/ and {found[1]}/ as the {name} split; keep one")
    return os.path.join(data_dir, found[0]) if found else None


def read_imagefolder(data_dir):
    """{"train", "val", "test"} -> (paths, class names) or None.

    With a train/ (or training/) folder, the splits are it, val/ (valid/, validation/) and test/ (testing/),
    each optional but train; otherwise the class sub-folders of data_dir form the training set.
    """
    roots = {name: _split_folder(data_dir, name) for name in SPLIT_FOLDERS}
    if roots["train"] is None:
        named = sorted(d for names in SPLIT_FOLDERS.values() for d in names
                       if os.path.isdir(os.path.join(data_dir, d)))
        if named:
            raise UserError(f"{data_dir} has {'/, '.join(named)}/ but no train/ folder, so these would be "
                            f"classes; put the training images in {os.path.join(data_dir, 'train')}/<class>/, "
                            f"or point --data_dir at the folder of class sub-folders")
        roots["train"] = data_dir
    splits = {}
    for name, root in roots.items():
        if root is None:
            splits[name] = None
            continue
        splits[name] = _scan_classes(root)
        if not splits[name][0]:
            raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) in class sub-folders of "
                            f"{root}; the layout is {root}/<class>/<image>")
    return splits


def _existing(path, data_dir, flag):
    """`path` as given, else relative to data_dir; UserError if neither exists."""
    for p in (path, os.path.join(data_dir, path)):
        if os.path.isfile(p):
            return p
    raise UserError(f"{flag} file {path} does not exist (also looked in {data_dir}); check {flag}")


def _labels_as_written(column):
    """Integer labels as ints ("3" and "3.0" are class 3); any other column, e.g. with leading zeros as in "01",
    as the stripped strings, so that "01" and "1" stay two classes named as written."""
    text = column.astype(str).str.strip()
    if text.str.fullmatch(r"[+-]?(0|[1-9][0-9]*)(\.0*)?").all():
        return text.str.replace(r"\.0*$", "", regex=True).astype(np.int64)
    return text


def read_info_csv(path, image_column, label_column):
    """{image name: label} from the CSV; integer labels are ints, others str as written."""
    if image_column == label_column:
        raise UserError(f"--image_column and --label_column are both {image_column!r}; the labels need a column "
                        f"of their own")
    try:
        # ids and labels as written ("007"); only an empty cell is missing, not a class named "NA" or "None"
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise UserError(f"--info_csv {path} is empty; it needs a header and one row per image") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"--info_csv {path} is not a well-formed CSV ({first}); fix the file") from None
    df.columns = [str(c).strip() for c in df.columns]
    for col, flag in ((image_column, "--image_column"), (label_column, "--label_column")):
        if col not in df.columns:
            raise UserError(f"--info_csv {path} has no column {col!r} (it has: "
                            f"{', '.join(map(repr, df.columns))}); pass {flag}")
    df = df[[image_column, label_column]].apply(lambda column: column.str.strip())
    empty = (df.isna() | (df == "")).any(axis=1).to_numpy()  # a blank cell, or one of spaces
    if empty.any():
        raise UserError(f"--info_csv {path}: {empty.sum()} row(s) lack an image name or label (first "
                        f"at line {np.flatnonzero(empty)[0] + 2}); fill in or delete those rows")
    labels = _labels_as_written(df[label_column])
    mapping = {}
    for name, label in zip(df[image_column], labels.tolist()):
        if mapping.setdefault(name, label) != label:
            raise UserError(f"--info_csv {path} gives image {name} two labels ({mapping[name]!r} and "
                            f"{label!r}); keep one row per image")
    return mapping


def _read_list(path, flag, data_dir):
    path = _existing(path, data_dir, flag)
    try:
        with open(path, encoding="utf-8") as f:
            names = list(dict.fromkeys(line.strip() for line in f if line.strip()))
    except UnicodeDecodeError as e:
        raise UserError(f"{flag} file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as "
                        f"UTF-8 with one image name per line") from None
    if not names:
        raise UserError(f"{flag} file {path} lists no images; put one image name per line")
    return names


def _image_path(data_dir, name):
    path = os.path.join(data_dir, name)
    if not os.path.splitext(name)[1] and not os.path.isfile(path):
        for ext in IMG_EXTENSIONS:  # CSVs often list ids without the extension
            if os.path.isfile(path + ext):
                return path + ext
    return path


def read_csv_dataset(cfg):
    """{"train", "val", "test"} -> (paths, labels) or None, from --info_csv and the lists."""
    if not cfg.info_csv:
        raise UserError("--dataset csv needs --info_csv FILE (a CSV of image name and label)")
    info_csv = _existing(cfg.info_csv, cfg.data_dir, "--info_csv")
    mapping = read_info_csv(info_csv, cfg.image_column, cfg.label_column)
    lists = {}
    for name, path, flag in (("train", cfg.train_list, "--train_list"),
                             ("val", cfg.val_list, "--val_list")):
        if path:
            lists[name] = _read_list(path, flag, cfg.data_dir)
            unknown = [n for n in lists[name] if n not in mapping]
            if unknown:
                more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
                raise UserError(f"{len(unknown)} image(s) in {flag} {path} are not in --info_csv "
                                f"{info_csv}: {', '.join(unknown[:3])}{more}; add them to the CSV")
    if "train" not in lists:
        held_out = set(lists.get("val", ()))
        lists["train"] = [n for n in mapping if n not in held_out]
    if "val" in lists:
        overlap = len(set(lists["train"]) & set(lists["val"]))
        if overlap:
            log.warning("%d image(s) are in both --train_list and --val_list; validation is optimistic",
                        overlap)
    return {name: ([_image_path(cfg.data_dir, n) for n in lists[name]],
                   [mapping[n] for n in lists[name]]) if name in lists else None
            for name in ("train", "val", "test")}


def load_file_dataset(cfg, in_chans, img_size):
    """Read, check and index a file dataset.

    Returns ({"train"|"val"|"test": (paths, int labels) or None}, class names (sorted labels as
    str; with --classes only those, relabelled 0..k-1), {path: int64 (2, C) pixel sums of the
    decoded image}, {path: decoded uint8 CHW image} with --cache_images ram, else None).
    """
    if not os.path.isdir(cfg.data_dir):
        raise UserError(f"--data_dir {cfg.data_dir} does not exist; point it at the image folder")
    splits = read_imagefolder(cfg.data_dir) if cfg.dataset == "imagefolder" else read_csv_dataset(cfg)
    classes = sorted({y for s in splits.values() if s is not None for y in s[1]})
    index = {c: i for i, c in enumerate(classes)}
    splits = {name: None if s is None else (s[0], [index[y] for y in s[1]]) for name, s in splits.items()}
    classes = [str(c) for c in classes]
    if getattr(cfg, "classes", None):  # before the check, so only the chosen classes are decoded and cached
        splits, classes = select_classes(splits, classes, cfg.classes)
    paths = list(dict.fromkeys(p for s in splits.values() if s is not None for p in s[0]))
    cache = getattr(cfg, "cache_images", "none") == "ram"
    if cache:
        need = check_cache_fits(len(paths), in_chans, img_size, available_memory(),
                                copies=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        log.info("--cache_images ram: holding %d decoded images in memory (%.2f GiB)", len(paths), need / 2**30)
    sums, dropped, *decoded = check_images(paths, in_chans, img_size, cfg.skip_bad_images, threads=cfg.workers,
                                           keep=cache)
    dropped = set(dropped)
    out = {}
    for name, s in splits.items():
        keep = [(p, int(y)) for p, y in zip(*s) if p not in dropped] if s is not None else None
        out[name] = (None if keep is None else ([p for p, _ in keep], [y for _, y in keep]))
    return out, classes, sums, (decoded[0] if cache else None)
