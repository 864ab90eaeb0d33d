"""Knowledge distillation loss (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015):
alpha * CE(student, target) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T)).
T^2 keeps the soft term's gradients on the scale of the hard term's; the teacher logits are detached. The CE takes
class indices or soft (mixed) targets and label smoothing, like the plain training loss.
"""
import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import UserError


def check_kd_args(temperature, alpha, label_smoothing=0.0):
    """UserError unless T > 0, 0 <= alpha <= 1 and 0 <= label_smoothing < 1."""
    if not temperature > 0:
        raise UserError(f"distillation temperature {temperature} must be > 0 (Hinton et al. use 1-20)")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"distillation alpha {alpha} must be in [0, 1] (weight of the hard-target loss)")
    if not 0.0 <= label_smoothing < 1.0:
        raise UserError(f"label smoothing {label_smoothing} must be in [0, 1)")


def kd_loss(student_logits, target, teacher_logits, temperature, alpha, label_smoothing=0.0, class_weights=None):
    """alpha * CE(student, target) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T), >= float32."""
    check_kd_args(temperature, alpha, label_smoothing)
    if student_logits.shape != teacher_logits.shape:
        raise UserError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                        f"{tuple(teacher_logits.shape)} differ; the teacher must be trained on the same classes")
    # Under autocast the logits may be fp16/bf16; softmax, log and the sums are done in at least float32.
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype)
    t = teacher_logits.detach().to(dtype)
    loss = s.new_zeros(())
    if alpha > 0:
        weight = None if class_weights is None else class_weights.to(dtype)
        loss = loss + alpha * F.cross_entropy(s, target, weight=weight, label_smoothing=label_smoothing)
    if alpha < 1:
        T = temperature
        # F.kl_div(input, target) = sum target * (log target - input): input is the student's log-probabilities.
        kl = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1), log_target=True,
                      reduction="batchmean")
        loss = loss + (1.0 - alpha) * T * T * kl
    return loss


class DistillationLoss(nn.Module):
    """`criterion(logits, target, teacher_logits)` for train_distill.py; see kd_loss."""

    def __init__(self, temperature, alpha, label_smoothing=0.0, class_weights=None):
        super().__init__()
        check_kd_args(temperature, alpha, label_smoothing)
        self.temperature, self.alpha, self.label_smoothing = temperature, alpha, label_smoothing
        self.register_buffer("class_weights", class_weights, persistent=False)  # follows .to(device)

    def forward(self, logits, target, teacher_logits):
        return kd_loss(logits, target, teacher_logits, self.temperature, self.alpha, self.label_smoothing,
                       self.class_weights)

    def extra_repr(self):
        return f"temperature={self.temperature}, alpha={self.alpha}, label_smoothing={self.label_smoothing}"
