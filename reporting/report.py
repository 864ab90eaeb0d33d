"""Evaluation report: where the model is wrong, per class, with the images it is most sure about and wrong on.

`write_eval_report(output_dir, probs, targets, class_names, get_images)` writes eval_report.json/.md
(per-class precision, recall, F1, support; overall accuracy; macro averages), confusion_matrix.png
(row-normalised) and errors.png (the most confidently wrong images). `loader_image_getter(loader)` gives
`get_images` for this repository's loaders. Drawn with matplotlib's Agg canvas (no pyplot state).
"""
import logging
import os

import numpy as np
import torch

from utils.outputs import atomic_write

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- numbers

def confusion_matrix(targets, preds, num_classes):
    """C[t, p] = number of samples of class t predicted as p (int64, K x K)."""
    t, p = np.asarray(targets, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(a, b):
    return np.divide(a, b, out=np.zeros(len(a), dtype=np.float64), where=b > 0)


def per_class_metrics(cm):
    """Precision, recall (= per-class accuracy), F1, support and predicted counts from a confusion matrix.
    0/0 is reported as 0 (as scikit-learn's zero_division=0)."""
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support, "predicted": predicted}


def eval_report(probs, targets, class_names, n_errors=32):
    """The report as a dict: overall accuracy, macro averages over the classes present in `targets`,
    per-class rows, the confusion matrix and the `n_errors` most confidently wrong samples (loader order)."""
    probs = torch.as_tensor(probs).detach().float().cpu()
    targets = torch.as_tensor(targets).detach().long().cpu()
    if probs.ndim != 2 or probs.shape[0] != targets.shape[0]:
        raise ValueError(f"probs must be (N, K) and targets (N,), got {tuple(probs.shape)} and {tuple(targets.shape)}")
    k = len(class_names)
    conf, preds = probs.max(1)
    cm = confusion_matrix(targets.numpy(), preds.numpy(), k)
    m = per_class_metrics(cm)
    present = m["support"] > 0
    wrong = torch.nonzero(preds != targets).flatten()
    order = wrong[torch.argsort(conf[wrong], descending=True, stable=True)][:n_errors]
    n = int(targets.numel())
    return {
        "n": n, "accuracy": float(np.trace(cm) / n) if n else 0.0, "correct": int(np.trace(cm)),
        "macro": {key: float(m[key][present].mean()) if present.any() else 0.0
                  for key in ("precision", "recall", "f1")},
        "macro_over_classes": int(present.sum()),
        "per_class": [{"class": name, "precision": float(m["precision"][c]), "recall": float(m["recall"][c]),
                       "f1": float(m["f1"][c]), "support": int(m["support"][c]),
                       "predicted": int(m["predicted"][c])} for c, name in enumerate(class_names)],
        "confusion_matrix": cm.tolist(),
        "errors": [{"index": int(i), "true": class_names[int(targets[i])], "pred": class_names[int(preds[i])],
                    "confidence": float(conf[i])} for i in order],
    }


# ---------------------------------------------------------------- pictures

def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def save_image_grid(path, images, titles, ncols=8):
    """PNG grid of uint8 CHW images (None leaves a cell empty), each with its title."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig = _figure((1.5 * ncols, 1.7 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, img, title in zip(axes, images, titles):
        if img is not None:
            img = torch.as_tensor(img).detach().cpu()
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_confusion_matrix(path, cm, class_names):
    """Row-normalised confusion matrix: row t shows where the samples of class t went (rows sum to 1)."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(class_names)
    fig = _figure((max(5, 0.55 * k + 2.5), max(4, 0.5 * k + 2)))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (each row sums to 1)")
    if k <= 20:
        for t in range(k):
            for p in range(k):
                if cm[t, p]:
                    ax.text(p, t, f"{norm[t, p]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[t, p] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# ---------------------------------------------------------------- files

def _markdown(report):
    lines = ["# Evaluation report", "",
             f"{report['n']} images, accuracy {report['accuracy']:.4f} ({report['correct']} correct); macro "
             f"precision {report['macro']['precision']:.4f}, recall {report['macro']['recall']:.4f}, "
             f"F1 {report['macro']['f1']:.4f} (unweighted means over the {report['macro_over_classes']} classes "
             "present; macro recall is the balanced accuracy).", "",
             "Per-class accuracy is the recall: the fraction of that class's images predicted correctly.", "",
             "| class | precision | recall (= accuracy) | F1 | support | predicted |", "|---|---|---|---|---|---|"]
    for r in report["per_class"]:
        lines.append(f"| {r['class']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | "
                     f"{r['support']} | {r['predicted']} |")
    lines += ["", "confusion_matrix.png: rows are the true class, normalised to sum to 1.", "",
              f"## Most confidently wrong ({len(report['errors'])} shown in errors.png)", "",
              "| index | true | predicted | confidence |", "|---|---|---|---|"]
    lines += [f"| {e['index']} | {e['true']} | {e['pred']} | {e['confidence']:.3f} |" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def _atomic(path, text):
    atomic_write(path, lambda f: f.write(text))


def write_eval_report(output_dir, probs, targets, class_names, get_images=None, n_errors=32):
    """Write eval_report.json, eval_report.md, confusion_matrix.png and (with get_images) errors.png.

    probs: (N, K) softmax probabilities, targets: (N,) class indices, both in loader order.
    get_images(indices int64 tensor) -> uint8 NCHW tensor of those samples. Returns the report dict.
    """
    import json
    report = eval_report(probs, targets, class_names, n_errors)
    os.makedirs(output_dir, exist_ok=True)
    _atomic(os.path.join(output_dir, "eval_report.json"), json.dumps(report, indent=2))
    _atomic(os.path.join(output_dir, "eval_report.md"), _markdown(report))
    plot_confusion_matrix(os.path.join(output_dir, "confusion_matrix.png"), report["confusion_matrix"], class_names)
    if get_images is None:
        log.info("no image source for this loader: errors.png skipped")
    elif report["errors"]:
        idx = torch.tensor([e["index"] for e in report["errors"]], dtype=torch.int64)
        images = get_images(idx)
        titles = [f"true {e['true']}\npred {e['pred']} {e['confidence']:.2f}" for e in report["errors"]]
        save_image_grid(os.path.join(output_dir, "errors.png"), list(images), titles, ncols=min(8, len(titles)))
    log.info(f"eval report: accuracy {report['accuracy']:.4f}, macro recall {report['macro']['recall']:.4f} -> "
             f"{output_dir}/eval_report.md")
    return report


def loader_image_getter(loader):
    """get_images(positions) -> uint8 NCHW images for positions in `loader`'s iteration order, un-augmented;
    None for a loader this does not know. Positions follow the loader's current epoch (eval loaders: fixed)."""
    from datasets.files import ImageFileDataset, load_image
    from datasets.loader import FileLoader, IndexedDataset, InMemoryLoader, epoch_indices

    if isinstance(loader, InMemoryLoader):
        def get_images(positions):
            order = epoch_indices(len(loader.labels), loader.shuffle, loader.seed, loader.epoch, loader.rank,
                                  loader.world_size, loader.weights)
            return loader.images[order[positions].to(loader.images.device)].cpu()
        return get_images
    if isinstance(loader, FileLoader):
        dataset = loader.loader.dataset
        if isinstance(dataset, IndexedDataset):  # --infobatch's wrapper
            dataset = dataset.dataset

        def get_images(positions):
            order = list(iter(loader.sampler))
            idx = [order[int(p)] for p in positions]
            if isinstance(dataset, ImageFileDataset):  # decode without the training transform
                return torch.stack([load_image(dataset.paths[i], dataset.in_chans, dataset.img_size) for i in idx])
            return torch.stack([torch.as_tensor(dataset[i][0]) for i in idx])
        return get_images
    log.info("loader_image_getter: unknown loader type %s", type(loader).__name__)
    return None
