"""Learning-rate schedules by name over torch.optim.lr_scheduler, stepped per iteration, after a linear warmup
(Goyal et al. 2017): cosine and cosine_restarts (SGDR, Loshchilov & Hutter 2017), step, multistep, exponential,
multiplicative, plateau, cyclic (Smith 2017), onecycle (Smith & Topin 2019), poly, constant. Deviations: no momentum
cycling; step/multistep decays count epochs from the start of training, other schedules start after warmup.
multiplicative (the seed's MultiplicativeLR, x gamma per epoch) multiplies once per epoch, at the epoch boundaries
after warmup, not by gamma^(1/steps_per_epoch) per iteration: each epoch's lr is MultiplicativeLR's to the bit.
"""
import logging
import os
from dataclasses import dataclass

import torch
from torch.optim import lr_scheduler as lrs

from utils.errors import UserError

log = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "step", "multistep", "exponential", "multiplicative", "plateau", "cyclic", "onecycle",
              "cosine_restarts", "poly", "constant")


@dataclass(frozen=True)
class ScheduleOptions:
    """The flags the schedule reads (train.py fills it from the command line: config.options)."""
    cyclic_base_lr: float
    cyclic_mode: str
    cyclic_step_epochs: float
    epochs: int
    gamma: float
    lr: float
    milestones: list[float]
    min_lr: float
    onecycle_div_factor: float
    onecycle_final_div_factor: float
    onecycle_pct_start: float
    plateau_factor: float
    plateau_patience: int
    poly_power: float
    restart_epochs: float
    restart_mult: int
    scheduler: str
    step_size: float
    warmup_epochs: float
    warmup_lr_init: float


OWN_WARMUP = ("onecycle", "cyclic")  # they ramp up by themselves; --warmup_epochs must be 0


class LRSchedule:
    """One object for the loop: `step()` every iteration, `step_epoch(metric)` at the end of every epoch.

    `scheduler` is the per-iteration torch scheduler (warmup + main as a SequentialLR, or the warmup alone
    for plateau); `plateau` is a ReduceLROnPlateau or None. The learning rate itself lives in the optimizer.
    """

    def __init__(self, optimizer, scheduler, plateau=None, warmup_iters=0, peaks=None):
        self.optimizer = optimizer
        self.peaks = peaks  # each param group's peak lr (engine.budget rebuilds the schedule from them)
        self.scheduler = scheduler
        self.plateau = plateau
        self.warmup_iters = warmup_iters
        self.iteration = 0  # optimizer steps taken so far

    def step(self):
        # With plateau the per-iteration scheduler is only the warmup; stepping it afterwards would reset the lr
        # that ReduceLROnPlateau lowered (LambdaLR is not chainable), so it stops at the end of warmup.
        if self.scheduler is not None and (self.plateau is None or self.iteration < self.warmup_iters):
            self.scheduler.step()
        self.iteration += 1

    def step_epoch(self, metric=None):
        """End of an epoch: plateau watches `metric` (higher is better); other schedules do nothing."""
        if self.plateau is None:
            return
        if metric is None:
            raise ValueError("the plateau schedule needs the validation metric in step_epoch(metric)")
        if self.iteration < self.warmup_iters:
            log.debug("plateau: epoch ended inside warmup, metric not counted")
            return
        self.plateau.step(float(metric))

    def get_last_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self):
        return {"iteration": self.iteration,
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "plateau": None if self.plateau is None else self.plateau.state_dict()}

    def load_state_dict(self, state_dict):
        """Restore after `optimizer.load_state_dict` (the optimizer holds the current lr)."""
        self.iteration = state_dict["iteration"]
        for part in ("scheduler", "plateau"):
            obj = getattr(self, part)
            if (obj is None) != (state_dict[part] is None):
                raise UserError("the checkpoint's lr schedule does not match --scheduler; resume with the "
                                "run's own --scheduler")
            if obj is not None:
                obj.load_state_dict(state_dict[part])


def _iters(epochs, steps_per_epoch, flag):
    """Epoch-valued flag -> whole number of iterations (at least 1)."""
    n = round(epochs * steps_per_epoch)
    if n < 1:
        raise UserError(f"--{flag} {epochs} is less than one iteration ({steps_per_epoch} per epoch); "
                        f"pass a larger value")
    return n


def _after_warmup(milestones, cfg, warmup, spe):
    """Decay iterations counted from the start of training -> iterations of the main schedule."""
    if milestones and milestones[0] <= warmup:
        raise UserError(f"--scheduler {cfg.scheduler}: a decay at epoch {milestones[0] / spe:g} is not after the "
                        f"warmup (--warmup_epochs {cfg.warmup_epochs:g}); decays count epochs from the start "
                        f"of training, so shorten the warmup or decay later")
    return [m - warmup for m in milestones]


def _build_main(name, optimizer, cfg, spe, n_iters, warmup, peaks):
    """The schedule after warmup, over `n_iters` iterations, stepped once per iteration."""
    if name == "cosine":
        return lrs.CosineAnnealingLR(optimizer, T_max=n_iters, eta_min=cfg.min_lr)
    if name == "step":
        # StepLR's rule (x gamma every step_size epochs) counted from the start of training, as MultiStepLR.
        period = _iters(cfg.step_size, spe, "step_size")
        every = list(range(period, warmup + n_iters, period))
        return lrs.MultiStepLR(optimizer, _after_warmup(every, cfg, warmup, spe), gamma=cfg.gamma)
    if name == "multistep":
        milestones = sorted(round(e * spe) for e in cfg.milestones)
        return lrs.MultiStepLR(optimizer, _after_warmup(milestones, cfg, warmup, spe), gamma=cfg.gamma)
    if name == "exponential":
        return lrs.ExponentialLR(optimizer, gamma=cfg.gamma ** (1.0 / spe))  # --gamma is per epoch
    if name == "multiplicative":
        return EpochMultiplicativeLR(optimizer, cfg.gamma, spe)
    if name == "cyclic":
        if cfg.cyclic_base_lr > min(peaks):
            raise UserError(f"--cyclic_base_lr {cfg.cyclic_base_lr:g} is above the peak lr {min(peaks):g}; "
                            f"lower it or raise --lr")
        # exp_range: the cycle amplitude shrinks by --gamma per epoch.
        return lrs.CyclicLR(optimizer, base_lr=cfg.cyclic_base_lr, max_lr=peaks,
                            step_size_up=_iters(cfg.cyclic_step_epochs, spe, "cyclic_step_epochs"),
                            mode=cfg.cyclic_mode, gamma=cfg.gamma ** (1.0 / spe), cycle_momentum=False)
    if name == "onecycle":
        rise = cfg.onecycle_pct_start * n_iters  # OneCycleLR divides by rise - 1 and by n_iters - rise
        if rise <= 1 or n_iters - rise < 1:
            raise UserError(f"--scheduler onecycle over {n_iters} steps leaves no room for its rise and fall "
                            f"(--onecycle_pct_start {cfg.onecycle_pct_start:g}); train more steps or pick cosine")
        return lrs.OneCycleLR(optimizer, max_lr=peaks, total_steps=n_iters, pct_start=cfg.onecycle_pct_start,
                              div_factor=cfg.onecycle_div_factor,
                              final_div_factor=cfg.onecycle_final_div_factor, cycle_momentum=False)
    if name == "cosine_restarts":
        if cfg.restart_mult < 1:
            raise UserError(f"--restart_mult {cfg.restart_mult} must be an integer >= 1")
        return lrs.CosineAnnealingWarmRestarts(optimizer, T_0=_iters(cfg.restart_epochs, spe, "restart_epochs"),
                                               T_mult=cfg.restart_mult, eta_min=cfg.min_lr)
    if name == "poly":
        return lrs.LambdaLR(optimizer, [_poly_factor(p, cfg.min_lr, n_iters, cfg.poly_power) for p in peaks])
    if name == "constant":
        return lrs.LambdaLR(optimizer, lambda t: 1.0)
    raise AssertionError(name)


class EpochMultiplicativeLR(lrs.LRScheduler):
    """torch's MultiplicativeLR with a constant factor `gamma` per epoch, stepped per iteration: x gamma once every
    `steps_per_epoch` steps. The lr is recomputed from the peak by the same repeated multiplication MultiplicativeLR
    does, so epoch e gets its lr * gamma * ... * gamma to the bit; unlike MultiplicativeLR it does not read the
    current lr, so it starts from the peak after SequentialLR's warmup (which leaves the lr one step short of it).
    """

    def __init__(self, optimizer, gamma, steps_per_epoch):
        self.gamma, self.steps_per_epoch = gamma, steps_per_epoch
        super().__init__(optimizer)

    def get_lr(self):
        out = []
        for lr in self.base_lrs:
            for _ in range(self.last_epoch // self.steps_per_epoch):
                lr = lr * self.gamma
            out.append(lr)
        return out


def _poly_factor(peak, min_lr, n_iters, power):
    """lr(t) = min_lr + (peak - min_lr) * (1 - t/T)^power, as a factor of peak."""
    def factor(t):
        if peak == 0:
            return 1.0
        return (min_lr + (peak - min_lr) * (1.0 - min(t, n_iters) / n_iters) ** power) / peak
    return factor


def _warmup_factor(peak, lr_init, warmup):
    """lr(t) = lr_init + (peak - lr_init) * t / warmup for t in [0, warmup], as a factor of peak."""
    def factor(t):
        if peak == 0:
            return 1.0
        return (lr_init + (peak - lr_init) * min(t, warmup) / warmup) / peak
    return factor


def build_scheduler(optimizer, cfg, steps_per_epoch):
    """The --scheduler schedule over cfg.epochs * steps_per_epoch iterations, after --warmup_epochs of warmup.

    The peak lr is the optimizer's lr when this is called (so a scaled lr is respected).
    """
    name = cfg.scheduler
    if name not in SCHEDULERS:
        raise UserError(f"unknown --scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if steps_per_epoch < 1 or cfg.epochs < 1:
        raise UserError(f"the schedule needs at least one epoch of at least one step (got --epochs {cfg.epochs}, "
                        f"{steps_per_epoch} steps per epoch)")
    if cfg.warmup_epochs < 0:
        raise UserError(f"--warmup_epochs {cfg.warmup_epochs:g} must be >= 0")
    if cfg.warmup_epochs > 0 and name in OWN_WARMUP:
        own = "--onecycle_pct_start" if name == "onecycle" else "--cyclic_base_lr and --cyclic_step_epochs"
        raise UserError(f"--warmup_epochs does not apply to {name} (it has its own warmup, {own}); "
                        f"pass --warmup_epochs 0")
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs > 0 else 0
    if warmup >= total:
        raise UserError(f"--warmup_epochs {cfg.warmup_epochs:g} leaves no iterations for the schedule "
                        f"(--epochs {cfg.epochs}); shorten the warmup")
    peaks = [group["lr"] for group in optimizer.param_groups]
    warm = None
    if warmup:
        warm = lrs.LambdaLR(optimizer, [_warmup_factor(p, cfg.warmup_lr_init, warmup) for p in peaks])
    if name == "plateau":
        plateau = lrs.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.plateau_factor,
                                        patience=cfg.plateau_patience, min_lr=cfg.min_lr)
        return LRSchedule(optimizer, warm, plateau, warmup, peaks)
    main = _build_main(name, optimizer, cfg, steps_per_epoch, total - warmup, warmup, peaks)
    if warm is not None:
        main = lrs.SequentialLR(optimizer, [warm, main], milestones=[warmup])
    return LRSchedule(optimizer, main, None, warmup, peaks)


def lr_at_steps(cfg, steps_per_epoch, total_steps, lr=None):
    """The lr of iterations 0..total_steps-1 for these flags, simulated on a dummy optimizer (peak `lr`,
    default cfg.lr). Plateau is simulated with a metric that never improves."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr if lr is None else lr)
    sched = build_scheduler(opt, cfg, steps_per_epoch)
    out = []
    for i in range(total_steps):
        out.append(sched.get_last_lr()[0])
        opt.step()  # keeps torch from warning about scheduler.step() before optimizer.step()
        sched.step()
        if (i + 1) % steps_per_epoch == 0:
            sched.step_epoch(0.0)
    return out


def plot_lr(cfg, steps_per_epoch, path, lr=None):
    """Write the schedule of a whole run to `path` (a .png file, or a folder that gets lr_schedule.png)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: only --plot_lr needs matplotlib
    from matplotlib.figure import Figure

    if os.path.isdir(path):
        path = os.path.join(path, "lr_schedule.png")
    total = cfg.epochs * steps_per_epoch
    values = lr_at_steps(cfg, steps_per_epoch, total, lr)
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([i / steps_per_epoch for i in range(total)], values)
    if cfg.warmup_epochs > 0:
        ax.axvline(cfg.warmup_epochs, color="gray", linestyle=":", label="end of warmup")
        ax.legend()
    note = " (metric never improving)" if cfg.scheduler == "plateau" else ""
    ax.set(xlabel="epoch", ylabel="learning rate", title=f"--scheduler {cfg.scheduler}{note}, "
           f"{steps_per_epoch} steps/epoch, peak {max(values):.4g}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    log.info("wrote %s", path)
    return path
