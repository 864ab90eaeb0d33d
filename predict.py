"""Predict the classes of images with a trained checkpoint (train or deploy form) or its ONNX export.

    python predict.py --ckpt runs/x/best.pt --images DIR --out predictions.csv [--topk 5] [--tta] [--tta_shift 1]
    python predict.py --ckpt runs/x/best.pt --list files.txt --out predictions.csv
    python predict.py --ckpt runs/x/best.pt --out predictions.csv [data flags] [--split test]   # a dataset split
    python predict.py --ckpt deploy.onnx --meta deploy.pt --images DIR --out predictions.csv
    python predict.py --ckpt runs/cv/fold*/last.pt --split test --out predictions.csv   # an ensemble: mean softmax

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
from datasets import ONE_PASS
from datasets.files import IMG_EXTENSIONS, load_image
from engine.checkpoint import load_checkpoint, load_model
from engine.ensemble import load_ensemble
from engine.precision import make_precision
from utils.errors import UserError, run_cli
from utils.misc import resolve_device, tta_views

log = logging.getLogger("predict")


def get_parser():
    p = config.tool_parser("Top-k predictions of a checkpoint for image files or a dataset split, as CSV.",
                           usage="%(prog)s --ckpt PATH [PATH ...] [--images DIR | --list FILE | data flags] [options]")
    g = p.add_argument_group("predict")
    g.add_argument("--ckpt", metavar="PATH", nargs="*",  # "*", not "+": keeps the help line short; 0 = error
                   help="a .pt or an .onnx file; several .pt: their ensemble")
    g.add_argument("--meta", metavar="PATH", help="for an .onnx --ckpt: the .pt it was exported from")
    g.add_argument("--use_ema", action=config.BoolFlag, help="predict with the checkpoint's EMA weights")
    g.add_argument("--images", metavar="DIR", help="predict every image file under DIR")
    g.add_argument("--list", metavar="FILE",
                   help="text file of image paths, one a line (relative to the current or the list's folder)")
    g.add_argument("--split", default="val", choices=("val", "test"), help="the dataset split to predict")
    g.add_argument("--out", default="predictions.csv", help="CSV to write")
    g.add_argument("--topk", type=int, default=5, metavar="K", help="classes per image")
    g.add_argument("--batch_size", type=int, default=256, metavar="N", help="images per batch")
    g.add_argument("--tta", action=config.BoolFlag, help="flip test-time augmentation")
    g.add_argument("--tta_shift", type=int, default=0, metavar="PX", help="also average views shifted by +-PX pixels")
    g.add_argument("--progress", action=config.BoolFlag, default=True, help="tqdm progress bar")
    g = p.add_argument_group("device")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--cuda", action=config.BoolFlag, help="CUDA if available, else CPU")
    g.add_argument("--amp", action=config.BoolFlag, help="autocast to --amp_dtype")
    g.add_argument("--amp_dtype", default="auto", choices=("auto", "bf16", "fp16"))
    g.add_argument("--channels_last", action=config.BoolFlag, default=True, help="channels-last memory format")
    config.add_data_args(p, unset="the checkpoint's training flags (with --images/--list: train.py's defaults)")
    return p


# ---------------------------------------------------------------- the model

class TorchPredictor:
    """A checkpoint's model (or an Ensemble of several); `__call__(x_uint8)` returns float logits on the CPU, as
    evaluate() computes them."""

    def __init__(self, model, device, args):
        self.model = model
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
    """(predictor, checkpoint dict holding class_names / model_config / args) for --ckpt (and --meta). Several
    .pt checkpoints predict as their ensemble (engine/ensemble.py: log of the mean softmax), described by the
    first."""
    if len(args.ckpt) > 1:
        if any(p.lower().endswith(".onnx") for p in args.ckpt):
            raise UserError("several --ckpt files predict as an ensemble of .pt checkpoints; pass the .pt files "
                            "instead of their ONNX exports")
        model, ckpt = load_ensemble(args.ckpt, use_ema=args.use_ema)
        return TorchPredictor(model, device, args), ckpt
    path = args.ckpt[0]
    if path.lower().endswith(".onnx"):
        if args.use_ema:
            raise UserError("--use_ema applies to .pt checkpoints; export the EMA weights with "
                            "reparam_export.py --use_ema --onnx instead")
        if not os.path.isfile(path):
            raise UserError(f"ONNX file {path} does not exist; check --ckpt")
        if not args.meta:
            raise UserError("an ONNX file holds no class names or input size: pass --meta PATH, the checkpoint "
                            "it was exported from (e.g. the deploy.pt written with it by reparam_export.py)")
        meta = load_checkpoint(args.meta)
        return OnnxPredictor(path), meta
    ckpt = load_checkpoint(path)
    return TorchPredictor(load_model(ckpt, use_ema=args.use_ema)[0], device, args), ckpt


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


def _decode(path, in_chans, img_size, crop_pct=0.0):
    try:
        return load_image(path, in_chans, img_size, crop_pct)  # evaluation's preprocessing
    except Exception as e:  # missing file, or PIL's many error types for broken files
        return f"{type(e).__name__}: {e}"


def file_batches(names, paths, in_chans, img_size, batch_size, skip_bad, workers, skipped, crop_pct=0.0):
    """Yield (names, uint8 NCHW batch, None) for the readable files; unreadable ones raise, or with skip_bad are
    counted in `skipped` (a list of names)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = list(zip(names[start:start + batch_size], paths[start:start + batch_size]))
            decoded = list(pool.map(lambda np_: _decode(np_[1], in_chans, img_size, crop_pct), chunk))
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


def dataset_batches(args, ckpt, split, ckpt_path):
    """(batch iterator, number of images) over `split` of the dataset that `args` (train.py's flags) describe."""
    import datasets
    cfg = ckpt["model_config"]
    args.in_chans, args.img_size = cfg["in_chans"], cfg["img_size"]  # the model's input, whatever the flags say
    data = datasets.build_data(args)
    if ckpt.get("class_names") and list(ckpt["class_names"]) != list(data.class_names):
        log.warning("the dataset's class names differ from the checkpoint's; predictions use the checkpoint's")
    if cfg["num_classes"] != data.num_classes:
        raise UserError(f"{ckpt_path} predicts {cfg['num_classes']} classes but the data has {data.num_classes}; "
                        f"predict on the dataset it was trained on")
    loader = data.test_loader if split == "test" else data.val_loader
    if loader is None:
        raise UserError(f"--split test: this dataset has no separate test split (the validation split is "
                        f"{data.val_name}); use --split val")
    names = data.test_paths if split == "test" else data.val_paths  # file datasets, in the loader's order
    if names is None:  # in-memory datasets: the image's index in the split
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
    args = get_parser().parse_args(argv)
    if not args.ckpt:
        raise UserError("--ckpt PATH is required: a checkpoint of train.py / reparam_export.py, or an .onnx file")
    if args.images and args.list:
        raise UserError("pass one of --images DIR and --list FILE (or neither, to predict a dataset split)")
    if args.topk < 1:
        raise UserError(f"--topk {args.topk} must be at least 1")
    if args.tta_shift < 0:
        raise UserError(f"--tta_shift must be 0 (off) or a number of pixels (got {args.tta_shift})")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder; name the CSV file to write, e.g. {args.out}/predictions.csv")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UserError(f"folder {out_dir} of --out {args.out} does not exist; create it first")
    if os.path.realpath(args.out) in {os.path.realpath(p) for p in (*args.ckpt, args.meta, args.list) if p}:
        raise UserError(f"--out {args.out} is an input file; write the predictions elsewhere")
    device = resolve_device(args.device, args.cuda)
    predictor, ckpt = load_predictor(args, device)
    cfg = ckpt["model_config"]
    class_names = list(ckpt.get("class_names") or [str(c) for c in range(cfg["num_classes"])])
    labelled = not (args.images or args.list)
    # train.py's defaults < (for a dataset split) the run's own flags, so that `--ckpt run/best.pt` predicts its
    # validation split < one pass's (no image cache) < the data flags given here
    saved = (ckpt.get("args") or {}) if labelled else {}
    data_args = config.training_defaults(saved, ONE_PASS, config.given_data_flags(args),
                                         {"batch_size": args.batch_size})
    if labelled and data_args.fold == "all":
        raise UserError("--fold all names no one split; predict one fold's validation split (--fold I) or, with "
                        "the fold models, the test split (--split test)")
    if labelled and len(args.ckpt) > 1 and args.split == "val" and data_args.kfold and \
            len({(load_checkpoint(p).get("args") or {}).get("fold") for p in args.ckpt}) > 1:
        log.warning(f"--split val is fold {data_args.fold}'s validation split, on which the other fold models "
                    "trained; use --split test, or --fold all's oof_predictions.csv, for held-out predictions")

    skipped = []
    if labelled:
        batches, total = dataset_batches(data_args, ckpt, args.split, args.ckpt[0])
    else:
        names, paths = scan_images(args.images) if args.images else read_list(args.list)
        batches = file_batches(names, paths, cfg["in_chans"], cfg["img_size"], args.batch_size,
                               data_args.skip_bad_images, data_args.workers, skipped,
                               crop_pct=(ckpt.get("args") or {}).get("crop_pct", 0.0))
        total = len(paths)
    k = min(args.topk, len(class_names))
    rows, correct = [], 0
    with tqdm(total=total, unit="img", disable=not args.progress, dynamic_ncols=True) as bar:
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
