"""Adversarial training inputs: L-inf FGSM with random start (Wong et al., "Fast is better than free", 2020)
and PGD (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", 2018).
Perturbations live in [0, 1] pixel space (models normalise inside), are projected onto the eps-ball and [0, 1],
and come from torch.autograd.grad wrt the perturbation only, so model parameter .grad is never touched.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.errors import UserError

KINDS = ("fgsm", "pgd")  # input attacks; --adv awp perturbs the weights (tricks/awp.py)
ADVS = ("none", *KINDS, "awp")  # --adv choices


@dataclass(frozen=True)
class AdvOptions:
    """The adversarial-training flags (train.py fills it from the command line: config.options)."""
    adv: str
    adv_alpha: float
    adv_eps: float
    adv_random_start: bool
    adv_steps: int
    awp_gamma: float
    awp_inputs: str
    awp_start_epoch: int
    eval_adv: str
    eval_adv_steps: int


def check_attack_args(eps, alpha, steps):
    """UserError unless eps is in [0, 1], alpha >= 0 (None = default) and steps >= 1."""
    if not 0.0 <= eps <= 1.0:
        raise UserError(f"adversarial eps {eps} is outside [0, 1]; it is in pixel units, "
                        f"e.g. --adv_eps 0.031 (8/255)")
    if alpha is not None and alpha < 0:
        raise UserError(f"adversarial step size {alpha} is negative; use --adv_alpha >= 0 (0 = default)")
    if steps < 1:
        raise UserError(f"adversarial steps {steps} must be >= 1; use --adv_steps 1 or more")


def pgd_eval_defaults(eps, steps):
    """Keyword arguments for `pgd` when measuring robust accuracy: alpha = 2.5*eps/steps (Madry et al.), no random
    start, so evaluation is deterministic and does not consume the training random stream."""
    return {"eps": eps, "alpha": 2.5 * eps / steps, "steps": steps, "random_start": False}


def _project(x, delta, eps):
    # Onto the eps-ball, then so that x + delta stays a valid image in [0, 1].
    delta = delta.clamp(-eps, eps)
    return torch.clamp(x + delta, 0.0, 1.0) - x


def _input_grad(model, x, delta, y, loss_fn):
    delta = delta.detach().requires_grad_(True)
    # Only the sign of the gradient is used, so the loss may be rescaled: times the batch size turns the batch mean
    # into a per-sample sum, which keeps fp16 input gradients from underflowing to zero.
    loss = loss_fn(model(x + delta), y) * x.shape[0]
    (grad,) = torch.autograd.grad(loss, delta)
    return torch.nan_to_num(grad, nan=0.0)


def pgd(model, x, y, eps, alpha=None, steps=7, random_start=True, loss_fn=F.cross_entropy):
    """Projected gradient ascent on loss_fn(model(x_adv), y) in the L-inf eps-ball around x; returns x_adv.

    x: float pixels in [0, 1] (any memory format); y: class indices or soft (N, K) targets, whatever loss_fn takes.
    alpha None = 2.5*eps/steps. The attack runs in the model's current mode (in train mode its forwards update BN
    running statistics, as in the papers' training code) and under the caller's autocast, if any; the perturbation
    itself is kept in float32 (float64 for float64 inputs). Works inside torch.no_grad() (it enables grad), not
    inside torch.inference_mode().
    """
    check_attack_args(eps, alpha, steps)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("adversarial attacks need autograd; call them outside torch.inference_mode()")
    alpha = 2.5 * eps / steps if alpha is None else alpha
    x = x.detach()
    with torch.enable_grad():
        delta = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, torch.float32))
        if random_start:
            delta = _project(x, delta.uniform_(-eps, eps), eps)
        for _ in range(steps):
            grad = _input_grad(model, x, delta, y, loss_fn)
            delta = _project(x, delta + alpha * grad.sign(), eps)
    return torch.clamp(x + delta, 0.0, 1.0).to(x.dtype).detach()


def fgsm(model, x, y, eps, alpha=None, random_start=True, loss_fn=F.cross_entropy):
    """FGSM; with random_start it is Wong et al.'s FGSM-RS: delta ~ U(-eps, eps), one signed step of alpha
    (None = 1.25*eps), projected onto the eps-ball and [0, 1]. That is one PGD step, and is computed as such."""
    alpha = 1.25 * eps if alpha is None else alpha
    return pgd(model, x, y, eps, alpha, 1, random_start, loss_fn)


class AdversarialAttack:
    """The training attack chosen by the flags: `x_adv = attack.perturb(model, x, y, loss_fn)`."""

    def __init__(self, kind, eps, alpha=None, steps=7, random_start=True):
        if kind not in KINDS:
            raise UserError(f"unknown attack {kind!r}; choose one of {', '.join(KINDS)}")
        check_attack_args(eps, alpha, steps)
        self.kind, self.eps, self.alpha, self.steps, self.random_start = kind, eps, alpha, steps, random_start

    def perturb(self, model, x, y, loss_fn=F.cross_entropy):
        if self.kind == "fgsm":
            return fgsm(model, x, y, self.eps, self.alpha, self.random_start, loss_fn)
        return pgd(model, x, y, self.eps, self.alpha, self.steps, self.random_start, loss_fn)

    def __repr__(self):
        return (f"AdversarialAttack(kind={self.kind!r}, eps={self.eps}, alpha={self.alpha}, steps={self.steps}, "
                f"random_start={self.random_start})")


def check_adv_args(cfg):
    """Validate the "adversarial training" flag group (UserError with the fix)."""
    if cfg.adv != "none" or cfg.eval_adv != "none":
        check_attack_args(cfg.adv_eps, cfg.adv_alpha, cfg.adv_steps)
    if cfg.eval_adv != "none" and cfg.eval_adv_steps < 1:
        raise UserError(f"--eval_adv_steps {cfg.eval_adv_steps} must be >= 1")
    if cfg.adv == "awp":
        if cfg.awp_gamma <= 0:
            raise UserError(f"--awp_gamma {cfg.awp_gamma} must be > 0 (the paper uses 0.005-0.01)")
        if cfg.awp_start_epoch < 0:
            raise UserError(f"--awp_start_epoch {cfg.awp_start_epoch} must be >= 0")


def build_attack(cfg):
    """AdversarialAttack for --adv fgsm|pgd, or for --adv awp the one named by --awp_inputs; None if clean."""
    check_adv_args(cfg)
    kind = cfg.awp_inputs if cfg.adv == "awp" else cfg.adv
    if kind in ("none", "clean"):
        return None
    return AdversarialAttack(kind, cfg.adv_eps, cfg.adv_alpha or None, cfg.adv_steps, cfg.adv_random_start)
