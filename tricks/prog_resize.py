"""--prog_resize MIN: progressive resizing (fast.ai's DAWNBench ImageNet runs; the image-size half of
EfficientNetV2's progressive learning). The first epochs train on downscaled images, whose steps cost about
(side / full side)^2 of a full-size step, and the side grows in 4-px steps to the full size by the fraction
--prog_resize_until of the run; the remaining epochs, and every evaluation, use the full size. On a time budget
the cheaper early epochs buy more epochs in all; the last full-size epochs adapt the network (and its BatchNorm
statistics) to the size it is tested at.

Models must accept any image size (global pooling before the head): the MLP does not.
"""
import torch

from utils.errors import UserError

STEP_PX = 4  # sides move in 4-px steps: few distinct shapes (cheap for torch.compile and cuDNN autotuning)


def train_size(epoch, epochs, full, min_size, until):
    """Side (px) of the training images in epoch `epoch` (0-based) of `epochs`; `full` when min_size is 0.

    The ramp is the first round(until * epochs) epochs; within it the side is min_size + (full - min_size) * t,
    t = epoch / ramp, rounded down to min_size plus a multiple of STEP_PX."""
    if not min_size or min_size >= full:
        return full
    ramp = round(until * epochs)
    if epoch >= ramp:
        return full
    grow = (full - min_size) * epoch / ramp
    return min(full, min_size + STEP_PX * int(grow // STEP_PX))


def epoch_cost(full, min_size, until):
    """cost(k, E): the estimated time of epoch k (1-based) of E relative to a full-size epoch, the pixel ratio
    (for --time_budget's plan)."""
    return lambda k, epochs: (train_size(k - 1, epochs, full, min_size, until) / full) ** 2


def check_any_size(model, side, full, in_chans, device, name):
    """UserError unless --prog_resize's start side is below the full size and `model` runs on it."""
    if side >= full:
        raise UserError(f"--prog_resize {side}: the images are {full} px already; pass a smaller start side, "
                        f"e.g. {max(8, full // 2)}, or 0 for off")
    was_training = model.training
    model.eval()  # a forward in eval mode leaves BatchNorm statistics alone
    try:
        with torch.no_grad():
            model(torch.zeros(2, in_chans, side, side, device=device))
    except RuntimeError as e:
        raise UserError(f"--prog_resize {side}: --model {name} cannot take {side}-px images "
                        f"({str(e).splitlines()[0]}); use a model with global pooling, or drop --prog_resize") from None
    finally:
        model.train(was_training)
