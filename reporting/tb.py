"""TensorBoard logging for --tensorboard: the metrics row of every epoch as scalars, and a few training images.

`make_tb_writer(output_dir, enabled)` returns a torch.utils.tensorboard SummaryWriter on <output_dir>/tb, or
None when off; `log_epoch` and `log_images` accept None and then do nothing, so call sites need no `if`.
"""
import numbers
import os

from utils.errors import UserError

# metrics-row keys without a split prefix -> their TensorBoard tag
_TAGS = {"lr": "lr", "images_per_second": "throughput/images_per_second",
         "epoch_seconds": "throughput/epoch_seconds", "robust_val_acc": "val/robust_acc"}
_GROUPS = ("train", "val", "test")


def make_tb_writer(output_dir, enabled):
    """SummaryWriter writing event files into <output_dir>/tb, or None when not enabled."""
    if not enabled:
        return None
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it; checked first for a clear message)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=os.path.join(output_dir, "tb"))


def scalar_tag(key):
    """'train_loss' -> 'train/loss', 'val_acc_ema' -> 'val/acc_ema', 'lr' -> 'lr', others -> 'other/<key>'."""
    if key in _TAGS:
        return _TAGS[key]
    group, _, rest = key.partition("_")
    return f"{group}/{rest}" if group in _GROUPS and rest else f"other/{key}"


def log_epoch(writer, row, epoch):
    """Every numeric value of the metrics row (except 'epoch') as a scalar at step `epoch`."""
    if writer is None:
        return
    for key, value in row.items():
        if key != "epoch" and isinstance(value, numbers.Real) and not isinstance(value, bool):
            writer.add_scalar(scalar_tag(key), float(value), epoch)
    writer.flush()


def log_images(writer, tag, images_uint8, step):
    """A few uint8 NCHW images as one image grid entry."""
    if writer is None:
        return
    writer.add_images(tag, images_uint8.detach().cpu(), step, dataformats="NCHW")
