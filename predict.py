"""Predict the classes of images with a trained checkpoint (train or deploy form) or its ONNX export.

    python predict.py --ckpt runs/x/best.pt --images DIR --out predictions.csv [--topk 5] [--tta] [--tta_shift 1]
    python predict.py --ckpt runs/x/best.pt --list files.txt --out predictions.csv
    python predict.py --ckpt runs/x/best.pt --out predictions.csv [data flags] [--split test]   # a dataset split
    python predict.py --ckpt deploy.onnx --meta deploy.pt --images DIR --out predictions.csv

Preprocessing is evaluation's: images are decoded with load_image at the checkpoint's img_size/in_chans and
fed as pixels in [0, 1] (normalisation is inside the model). Without --images/--list the data flags default
to the checkpoint's training flags. One CSV row per image (top-k class names and probabilities), written
atomically.
"""
import csv
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

import config
from datasets.files import IMG_EXTENSIONS, load_image
from utils.checkpoint import load_checkpoint, load_model
from utils.errors import UserError, run_cli
from utils.misc import make_precision, resolve_device, tta_views

log = logging.getLogger("predict")


def get_parser():
    p = config.get_parser()
    p.description = "Predict classes with a checkpoint; the data flags apply without --images/--list."
    ckpt = next(a for a in p._actions if a.dest == "ckpt")
    ckpt.nargs, ckpt.help = None, "checkpoint (.pt of train.py / reparam_export.py) or .onnx file"  # one model
    g = p.add_argument_group("predict")
    g.add_argument("--images", default=None, metavar="DIR", help="predict every image file under DIR")
    g.add_argument("--list", default=None, metavar="FILE",
                   help="text file of image paths, one a line (relative to the current or the list's folder)")
    g.add_argument("--split", default="val", choices=("val", "test"),
                   help="without --images/--list: which split of the dataset to predict")
    g.add_argument("--out", default="predictions.csv", help="CSV to write")
    g.add_argument("--topk", type=int, default=5, help="classes per image (at most the number of classes)")
    g.add_argument("--meta", default=None, metavar="PATH",
                   help="with an .onnx --ckpt: the checkpoint holding its class names and input size")
    return p


# ---------------------------------------------------------------- the model

class TorchPredictor:
    """A checkpoint's model; `__call__(x_uint8)` returns float logits on the CPU, as evaluate() computes them."""

    def __init__(self, ckpt, use_ema, device, args):
        self.model, _ = load_model(ckpt, use_ema=use_ema)
        self.prec = make_precision(device, args.amp, args.amp_dtype, args.channels_last)
        self.model.to(device).eval()
        if self.prec.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def __call__(self, x, tta=False, tta_shift=0):
        views = tta_views(self.prec.to_input(x), flip=tta, shift=tta_shift)
        with torch.no_grad(), self.prec.autocast():
            logits = sum(self.model(v) for v in views) / len(views)
        return logits.float().cpu()


class OnnxPredictor:
    """An ONNX export run by onnxruntime (CPU); the same interface as TorchPredictor."""

    def __init__(self, path):
        try:
            import onnxruntime
        except ImportError:
            raise UserError("an .onnx --ckpt needs onnxruntime: pip install onnxruntime") from None
        try:
            self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise UserError(f"{path} is not a readable ONNX model ({str(e).splitlines()[0][:120]}); "
                            f"export it with reparam_export.py --onnx") from None
        self.input = self.session.get_inputs()[0].name

    def _run(self, x):
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0]).float()

    def __call__(self, x, tta=False, tta_shift=0):
        views = tta_views(x.float().div(255), flip=tta, shift=tta_shift)
        return sum(self._run(v.contiguous()) for v in views) / len(views)


def load_predictor(args, device):
    """(predictor, checkpoint dict holding class_names / model_config / args) for --ckpt (and --meta)."""
    if args.ckpt.lower().endswith(".onnx"):
        if args.use_ema:
            raise UserError("--use_ema applies to .pt checkpoints; export the EMA weights with "
                            "reparam_export.py --use_ema --onnx instead")
        if not os.path.isfile(args.ckpt):
            raise UserError(f"ONNX file {args.ckpt} does not exist; check --ckpt")
        if not args.meta:
            raise UserError("an ONNX file holds no class names or input size: pass --meta PATH, the checkpoint "
                            "it was exported from (e.g. the deploy.pt written with it by reparam_export.py)")
        meta = load_checkpoint(args.meta)
        return OnnxPredictor(args.ckpt), meta
    ckpt = load_checkpoint(args.ckpt)
    return TorchPredictor(ckpt, args.use_ema, device, args), ckpt


# ---------------------------------------------------------------- the inputs

def scan_images(folder):
    """(names relative to folder, paths) of every image file under folder, sorted, hidden entries skipped."""
    if not os.path.isdir(folder):
        raise UserError(f"--images {folder} is not a folder; give the folder holding the images")
    paths = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(root, f) for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS)]
    if not paths:
        raise UserError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under --images {folder}")
    return [os.path.relpath(p, folder) for p in paths], paths


def read_list(path):
    """(names as listed, paths): a relative name is looked up in the current folder, then next to the list."""
    if not os.path.isfile(path):
        raise UserError(f"--list {path} does not exist")
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise UserError(f"--list {path} names no images; put one image path per line")
    base = os.path.dirname(os.path.abspath(path))
    paths = [n if os.path.isabs(n) or os.path.exists(n) else os.path.join(base, n) for n in names]
    return names, paths


def _decode(path, in_chans, img_size):
    try:
        return load_image(path, in_chans, img_size)
    except Exception as e:  # missing file, or PIL's many error types for broken files
        return f"{type(e).__name__}: {e}"


def file_batches(names, paths, in_chans, img_size, batch_size, skip_bad, workers, skipped):
    """Yield (names, uint8 NCHW batch, None) for the readable files; unreadable ones raise, or with skip_bad are
    counted in `skipped` (a list of names)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = list(zip(names[start:start + batch_size], paths[start:start + batch_size]))
            decoded = list(pool.map(lambda np_: _decode(np_[1], in_chans, img_size), chunk))
            good = []
            for (name, path), x in zip(chunk, decoded):
                if isinstance(x, str):
                    if not skip_bad:
                        raise UserError(f"cannot read image {path} ({x}); fix or remove it, or pass "
                                        f"--skip_bad_images to skip unreadable images")
                    skipped.append(name)
                else:
                    good.append((name, x))
            if good:
                yield [n for n, _ in good], torch.stack([x for _, x in good]), None, len(chunk)


def dataset_batches(args, ckpt):
    """(batch iterator, number of images) over --split of the dataset the data flags describe."""
    import datasets
    from datasets.loader import FileLoader
    cfg = ckpt["model_config"]
    args.in_chans, args.img_size = cfg["in_chans"], cfg["img_size"]  # the model's input, whatever the flags say
    data = datasets.build_data(args)
    if ckpt.get("class_names") and list(ckpt["class_names"]) != list(data.class_names):
        log.warning("the dataset's class names differ from the checkpoint's; predictions use the checkpoint's")
    if cfg["num_classes"] != data.num_classes:
        raise UserError(f"{args.ckpt} predicts {cfg['num_classes']} classes but the data has {data.num_classes}; "
                        f"predict on the dataset it was trained on")
    loader = data.test_loader if args.split == "test" else data.val_loader
    if loader is None:
        raise UserError(f"--split test: this dataset has no separate test split (the validation split is "
                        f"{data.val_name}); use --split val")
    if isinstance(loader, FileLoader):
        names = [loader.loader.dataset.paths[i] for i in iter(loader.sampler)]
    else:
        names = [str(i) for i in range(len(loader.labels))]

    def batches():
        pos = 0
        for x, y in loader:
            n = y.shape[0]
            yield names[pos:pos + n], x, y, n
            pos += n
    return batches(), len(names)


# ---------------------------------------------------------------- main

def _write_csv(path, header, rows):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", newline="") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    parser = get_parser()
    pre, _ = parser.parse_known_args(argv)
    if not pre.ckpt:
        raise UserError("--ckpt PATH is required: a checkpoint of train.py / reparam_export.py, or an .onnx file")
    if pre.images and pre.list:
        raise UserError("pass one of --images DIR and --list FILE (or neither, to predict a dataset split)")
    if pre.topk < 1:
        raise UserError(f"--topk {pre.topk} must be at least 1")
    if pre.tta_shift < 0:
        raise UserError(f"--tta_shift must be 0 (off) or a number of pixels (got {pre.tta_shift})")
    out_dir = os.path.dirname(os.path.abspath(pre.out))
    if not os.path.isdir(out_dir):
        raise UserError(f"folder {out_dir} of --out {pre.out} does not exist; create it first")
    if os.path.realpath(pre.out) in {os.path.realpath(p) for p in (pre.ckpt, pre.meta, pre.list) if p}:
        raise UserError(f"--out {pre.out} is an input file; write the predictions elsewhere")
    device = resolve_device(pre.device, pre.cuda, pre.gpus)
    predictor, ckpt = load_predictor(pre, device)
    cfg = ckpt["model_config"]
    class_names = list(ckpt.get("class_names") or [str(c) for c in range(cfg["num_classes"])])
    if not pre.images and not pre.list:
        # The data flags default to the run's own, so `--ckpt run/best.pt` predicts its validation split.
        data_flags = {a.dest for g in parser._action_groups if g.title == "data" for a in g._group_actions}
        parser.set_defaults(**{k: v for k, v in (ckpt.get("args") or {}).items() if k in data_flags})
    args = config.parse_args(argv, parser=parser)

    skipped, labelled = [], not (args.images or args.list)
    if labelled:
        batches, total = dataset_batches(args, ckpt)
    else:
        names, paths = scan_images(args.images) if args.images else read_list(args.list)
        batches = file_batches(names, paths, cfg["in_chans"], cfg["img_size"], args.batch_size,
                               args.skip_bad_images, args.workers, skipped)
        total = len(paths)
    k = min(args.topk, len(class_names))
    rows, correct = [], 0
    with tqdm(total=total, unit="img", disable=args.no_progress, dynamic_ncols=True) as bar:
        for names_, x, y, n in batches:
            probs = predictor(x, tta=args.tta, tta_shift=args.tta_shift).softmax(1)
            top_p, top_i = probs.topk(k, dim=1)
            for r, name in enumerate(names_):
                pairs = [v for c, p in zip(top_i[r].tolist(), top_p[r].tolist()) for v in (class_names[c], f"{p:.6f}")]
                rows.append([name, *([class_names[int(y[r])]] if y is not None else []), *pairs])
            if y is not None:
                correct += (top_i[:, 0] == y.to(top_i.device)).sum().item()
            bar.update(n)
    header = ["image", *(["label"] if labelled else []),
              *[f"{w}_{j}" for j in range(1, k + 1) for w in ("pred", "prob")]]
    _write_csv(args.out, header, rows)
    summary = {"images": len(rows), "skipped": len(skipped), "out": args.out}
    if skipped:
        log.warning("--skip_bad_images: skipped %d unreadable image(s), e.g. %s", len(skipped), skipped[0])
    if labelled and rows:
        summary["accuracy"] = correct / len(rows)
        log.info(f"top-1 accuracy on the {args.split} split: {summary['accuracy']:.4f}")
    log.info(f"wrote {len(rows)} predictions to {args.out}")
    return summary


if __name__ == "__main__":
    from utils.logger import setup_logging
    setup_logging()
    run_cli(main)
