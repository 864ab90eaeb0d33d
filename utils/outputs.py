"""The run directory and what goes in it: metrics.csv, curves.png, summary.json, config.yaml.

Files are replaced atomically (write a temporary file, then rename) so a killed run never leaves a
half-written output behind.
"""
import csv
import glob
import json
import os
import time

from utils.errors import UserError


def prepare_output_dir(output_dir, model, dataset, resume=None, overwrite=False):
    """Pick (or check) the run directory; never silently overwrite a directory holding checkpoints."""
    if output_dir is None:
        if resume:
            output_dir = os.path.dirname(os.path.abspath(resume))
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            output_dir = base = os.path.join("runs", f"{model}-{dataset}-{stamp}")
            n = 1
            while os.path.exists(output_dir):
                n += 1
                output_dir = f"{base}-{n}"
    if os.path.isdir(output_dir) and glob.glob(os.path.join(output_dir, "*.pt")) and not (resume or overwrite):
        raise UserError(f"{output_dir} already holds checkpoints; pass --resume {output_dir}/last.pt to "
                        f"continue, --overwrite to replace them, or another --output_dir")
    return open_dir(output_dir)


def open_dir(path):
    """Create (if needed) and check a folder a run writes into; remove the temporary files an interrupted
    atomic write left there (`NAME.tmp<pid>`)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
        for stale in glob.glob(os.path.join(path, "*.tmp[0-9]*")) + glob.glob(os.path.join(path, ".write_test*")):
            os.remove(stale)
    except OSError as e:
        raise UserError(f"cannot write to {path} ({e.strerror}); pass a writable --output_dir")
    return path


def eval_dir(ckpt_path, output_dir=None, overwrite=False):
    """Where --eval_only writes: --output_dir, or a fresh eval/, eval2/, ... beside the checkpoint. Files of a
    finished run or evaluation are never replaced without --overwrite."""
    if output_dir is None:
        base = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "eval")
        output_dir, n = base, 1
        while not overwrite and os.path.exists(output_dir):
            n += 1
            output_dir = f"{base}{n}"
    else:
        done = [f for f in ("summary.json", "eval_summary.json", "eval_report.md") if
                os.path.exists(os.path.join(output_dir, f))]
        if done and not overwrite:
            raise UserError(f"{output_dir} already holds {done[0]} of a finished run; pass another --output_dir, "
                            f"or --overwrite to replace its files")
    return open_dir(output_dir)


def atomic_write(path, write):
    """Write through a temporary file renamed over `path`: the old file stays whole if anything fails."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); free some space or pass another --output_dir "
                        f"(the previous {os.path.basename(path)}, if any, is intact)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2))


def write_metrics_csv(path, history):
    """Rewrite metrics.csv from the in-memory history (so a resumed run never duplicates rows)."""
    fields = []
    for row in history:
        fields += [k for k in row if k not in fields]

    def write(f):
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(history)
    atomic_write(path, write)


def plot_curves(path, history):
    """curves.png: loss, accuracy and learning rate by epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, keys in ((axes[0], ("train_loss", "val_loss", "val_loss_ema")),
                     (axes[1], ("train_acc", "val_acc", "val_acc_ema", "robust_val_acc"))):
        for key in keys:
            points = [(r["epoch"], r[key]) for r in history if key in r]  # evaluated epochs only (--eval_interval)
            if points:
                ax.plot(*zip(*points), label=key)
    axes[2].plot([r["epoch"] for r in history], [r["lr"] for r in history], label="lr (end of epoch)")
    for ax, title in zip(axes, ("loss", "accuracy", "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    try:  # an interrupt or a full disk mid-write leaves the previous picture and no temporary file
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); free some space or pass another "
                        f"--output_dir") from None
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
