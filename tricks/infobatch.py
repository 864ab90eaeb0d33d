"""--infobatch R: unbiased dynamic data pruning (InfoBatch, Qin et al., ICLR 2024).

Each training sample keeps a score, its loss the last time it was trained on (all equal before the first epoch,
so epoch 1 uses every sample). At the start of each epoch, a random fraction R of the samples whose score is
below the mean score ("well learned") is left out of that epoch; the other well-learned samples get their loss
weighted by m / (m - k) (m well learned, k left out; 1 / (1 - R) up to rounding), so the expected gradient of
the epoch equals that of the full epoch. The last E - ceil(--infobatch_anneal x E) of E epochs train on every
sample with weight 1. The paper reports lossless training at R = 0.5, anneal 0.875 with ~40% less compute
(CIFAR-10/100, ImageNet).

Deviations and choices here: the random pruning is drawn from a generator seeded by (--seed, epoch), so a
resumed run selects exactly what the uninterrupted one did (the scores travel in the checkpoint); the
per-iteration learning-rate schedule is stepped in proportion to the epoch's length (train.py), so the lr at
every epoch boundary is that of the same run without pruning. Under torchrun every rank scores its shard of the
epoch's samples and `end_epoch` shares the new scores, so all ranks select the same samples next epoch.
"""
import math

import torch

from datasets.loader import epoch_seed
from engine import distributed as dist_utils
from utils.errors import UserError

_SALT = 0x1FB0  # keeps the pruning draws apart from the loader's order, which is seeded by (seed, epoch) too


class InfoBatch:
    """Per-sample scores and the per-epoch selection for `n` training samples (tensors on `device`)."""

    def __init__(self, n, ratio, anneal, seed, device="cpu"):
        """ratio in (0, 1), anneal in [0, 1] (check_infobatch below checks the flags)."""
        self.ratio, self.anneal, self.seed = ratio, anneal, seed
        self.scores = torch.ones(n, device=device)
        self.weights = torch.ones(n, device=device)
        self.fresh = torch.zeros(n, dtype=torch.bool, device=device)  # scored this epoch (by this process)
        self.kept_frac = 1.0  # share of the samples the last pruned epoch trained on (the budget's forecast)

    def pruning(self, epoch, epochs):
        """Whether epoch `epoch` (0-based) of `epochs` prunes: before the annealing tail."""
        return epoch < math.ceil(self.anneal * epochs)

    def select(self, epoch, epochs):
        """The sorted indices epoch `epoch` (0-based) of `epochs` trains on, or None for all of them; sets
        `weights` (1, or m / (m - k) for the well-learned samples kept)."""
        self.weights.fill_(1.0)
        if not self.pruning(epoch, epochs):
            return None
        well = torch.nonzero(self.scores < self.scores.mean()).flatten()
        m = len(well)
        k = round(self.ratio * m)
        if k == 0:
            return None
        g = torch.Generator().manual_seed(epoch_seed(self.seed ^ _SALT, epoch))
        order = torch.randperm(m, generator=g).to(well.device)
        left_out, kept_well = well[order[:k]], well[order[k:]]
        self.weights[kept_well] = m / (m - k)
        keep = torch.ones_like(self.scores, dtype=torch.bool)
        keep[left_out] = False
        kept = torch.nonzero(keep).flatten()
        self.kept_frac = len(kept) / len(self.scores)
        return kept

    def batch_loss(self, losses, idx):
        """The loss to minimise from the batch's per-sample losses (samples `idx`); records them as scores."""
        idx = idx.to(self.scores.device, non_blocking=True)  # a file DataLoader's indices arrive on the CPU
        self.scores[idx] = losses.detach().float()
        self.fresh[idx] = True
        return (losses * self.weights[idx]).mean()

    def end_epoch(self):
        """After an epoch: under torchrun, every rank takes the scores the other ranks recorded (a sample two
        ranks saw, through the padding of uneven shards, gets their mean); in one process the scores stay as
        recorded."""
        total = dist_utils.all_reduce_tensor_sum(torch.where(self.fresh, self.scores, 0.0))
        count = dist_utils.all_reduce_tensor_sum(self.fresh.float())
        self.scores = torch.where(count > 0, total / count.clamp(min=1.0), self.scores)
        self.fresh.zero_()

    def cost(self, k, epochs):
        """Epoch k's (1-based) forecast share of a full epoch's time, for --time_budget."""
        return self.kept_frac if self.pruning(k - 1, epochs) else 1.0

    def state_dict(self):
        return {"scores": self.scores.cpu(), "kept_frac": self.kept_frac}

    def load_state_dict(self, state):
        if state["scores"].shape != self.scores.shape:
            raise UserError(f"the checkpoint's --infobatch scores cover {len(state['scores'])} samples, this "
                            f"training set has {len(self.scores)}; resume with the run's own data flags")
        self.scores.copy_(state["scores"])
        self.kept_frac = state["kept_frac"]


def check_infobatch(rate, anneal):
    """--infobatch R / --infobatch_anneal FRAC ranges (the flag combinations are train.py's check_args)."""
    if not 0.0 < rate < 1.0 or not 0.0 <= anneal <= 1.0:
        raise UserError(f"--infobatch {rate:g} / --infobatch_anneal {anneal:g}: the pruned "
                        "fraction must be in (0, 1) (0 = off) and the anneal fraction in [0, 1], e.g. "
                        "--infobatch 0.5 --infobatch_anneal 0.875")
