"""Stochastic Weight Averaging (Izmailov et al., 2018, "Averaging Weights Leads to Wider Optima and Better
Generalization") with torch.optim.swa_utils: from epoch swa_start the weights at the end of every epoch enter
an equal average and SWALR anneals the lr to swa_lr; BatchNorm statistics are re-estimated at the end, with
Dropout/DropPath off (torch's update_bn leaves them on). Deviation: SWALR anneals to swa_lr over a few epochs
where the paper jumps to a constant (or cyclic) lr.
"""
import contextlib
import logging

import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel

from models.drop_path import DropPath

log = logging.getLogger(__name__)

STOCHASTIC_LAYERS = (nn.modules.dropout._DropoutNd, DropPath)


@contextlib.contextmanager
def deterministic_train_mode(model):
    """Train mode (BatchNorm on batch statistics) with Dropout and DropPath in eval mode (identity), for measuring
    the network as it is evaluated; every module's own mode is put back on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    for m in model.modules():
        if isinstance(m, STOCHASTIC_LAYERS):
            m.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def update_bn_uint8(loader, model, device):
    """torch's update_bn over a loader of (uint8 images, labels), with Dropout and DropPath off: images become
    float pixels in [0, 1]; every BatchNorm's running statistics are reset, then set to the cumulative average
    over the batches (momentum=None). Every module's mode and the momenta are restored afterwards.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = {bn: bn.momentum for bn in bns}
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    try:
        with deterministic_train_mode(model):
            for x, *_ in loader:  # (x, y) or, under --infobatch, (x, y, sample indices)
                model(x.to(device, non_blocking=True).float().div_(255))
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum


class SWA:
    """Equal average of the end-of-epoch weights from epoch `swa_start` on, plus the SWALR schedule.

    Loop contract: while `active(epoch)` the per-iteration lr schedule is not stepped; `step_epoch(model,
    epoch)` at the end of each active epoch averages the weights and steps SWALR, which sets the lr of the
    next epoch (cosine annealing to swa_lr over `anneal_epochs` epochs, then constant).
    `finalize(loader, device)` re-estimates BatchNorm statistics; `self.module` is the averaged model.
    """

    def __init__(self, model, optimizer, swa_start, swa_lr, anneal_epochs):
        self.swa_start = swa_start
        self.averaged = AveragedModel(model)  # deep copy; buffers are copied, then recomputed by finalize
        self.averaged.module.requires_grad_(False)
        # SWALR's constructor already takes one step, which with anneal_epochs=0 would jump to swa_lr
        # now; the lr must stay the main schedule's until the first SWA epoch ends.
        lrs = [g["lr"] for g in optimizer.param_groups]
        self.scheduler = SWALR(optimizer, swa_lr=swa_lr, anneal_epochs=anneal_epochs, anneal_strategy="cos")
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr

    @property
    def module(self):
        """The averaged model (same class as the trained one, e.g. ImageClassifier)."""
        return self.averaged.module

    @property
    def n_averaged(self):
        return int(self.averaged.n_averaged)

    def active(self, epoch):
        return epoch >= self.swa_start

    def step_epoch(self, model, epoch):
        """Call at the end of every epoch; averages and anneals only when the epoch is active."""
        if not self.active(epoch):
            return
        self.averaged.update_parameters(model)
        self.scheduler.step()

    def finalize(self, loader, device):
        """Re-estimate BatchNorm statistics of the averaged weights over `loader` (uint8 batches)."""
        if self.n_averaged == 0:
            log.warning("SWA averaged no epoch; its weights are the initial model's")
        update_bn_uint8(loader, self.module, device)

    def state_dict(self):
        return {"averaged": self.averaged.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state_dict):
        self.averaged.load_state_dict(state_dict["averaged"])
        self.scheduler.load_state_dict(state_dict["scheduler"])
