"""Knowledge distillation (Hinton et al. 2015) on train.py's loop: only the loss differs.

    python train_distill.py --teacher_ckpt runs/teacher/best.pt --model resnet8 --kd_temperature 4 --kd_alpha 0.5
    python train_distill.py --config configs/distill_seed.yaml --teacher_ckpt runs/T/best.pt   # the seed's KD

The teacher (architecture, normalisation, class names) comes from its checkpoint, runs in eval mode
under no_grad and sees exactly the student's batch, after augmentation and mixing. Every train.py flag works.
"""
import logging

import torch

import config
import train
from datasets import inverse_frequency_weights
from engine.checkpoint import load_model
from tricks.kd import DistillationLoss
from utils.errors import UserError, run_cli
from utils.flags import BoolFlag
from utils.misc import resize_square

log = logging.getLogger("train")


def get_parser():
    p = config.get_parser()
    p.description = "Train a student with knowledge distillation from a teacher checkpoint."
    g = p.add_argument_group("knowledge distillation")
    g.add_argument("--teacher_ckpt", default=None, help="checkpoint written by train.py (required)")
    g.add_argument("--teacher_use_ema", action=BoolFlag, help="use the teacher checkpoint's EMA weights")
    g.add_argument("--kd_temperature", type=float, default=4.0, help="softmax temperature T")
    g.add_argument("--kd_alpha", type=float, default=0.5,
                   help="weight of the hard-label cross-entropy; 1 - alpha weighs T^2 * KL")
    return p


class _ResizeFor(torch.nn.Module):
    """Feeds the teacher its own input size when it was trained at another resolution."""

    def __init__(self, model, size):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, x):
        return self.model(resize_square(x, self.size))


def build_teacher_loss(args, data, prec, _criterion):
    """train.main's `build_loss` hook: load the teacher, check it fits the data, return the KD loss."""
    if not args.teacher_ckpt:
        raise UserError("train_distill.py needs --teacher_ckpt PATH (a checkpoint written by train.py)")
    teacher, ckpt = load_model(args.teacher_ckpt, use_ema=args.teacher_use_ema)
    cfg = ckpt["model_config"]
    if cfg["num_classes"] != data.num_classes:
        raise UserError(f"teacher {args.teacher_ckpt} has {cfg['num_classes']} classes but the data has "
                        f"{data.num_classes}; use a teacher trained on this dataset")
    if cfg["in_chans"] != data.in_chans:
        raise UserError(f"teacher takes {cfg['in_chans']}-channel images but the data has {data.in_chans}; "
                        f"set --in_chans {cfg['in_chans']}")
    if ckpt.get("class_names") and list(ckpt["class_names"]) != list(data.class_names):
        log.warning("teacher class names differ from the data's; assuming the same order")
    teacher = _ResizeFor(teacher, cfg["img_size"]).to(prec.device).eval()
    if prec.channels_last:
        teacher.to(memory_format=torch.channels_last)
    for p in teacher.parameters():
        p.requires_grad_(False)
    acc = train.evaluate(teacher, data.val_loader, prec)["acc"]
    log.info(f"teacher {cfg['name']} from {args.teacher_ckpt}: {data.val_name} acc {acc:.4f}")
    class_weights = (inverse_frequency_weights(data.train_labels, data.num_classes).to(prec.device)
                     if args.class_weights == "auto" else None)
    loss = DistillationLoss(args.kd_temperature, args.kd_alpha, args.label_smoothing, class_weights)
    return loss, teacher, {"teacher_val_acc": acc, "teacher_model": cfg["name"]}


def main(args):
    return train.main(args, build_loss=build_teacher_loss)


if __name__ == "__main__":
    run_cli(lambda: train.run(config.parse_args(parser=get_parser()), build_teacher_loss, "train_distill.py"))
