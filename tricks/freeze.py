"""Linear probing, then fine-tuning (LP-FT, Kumar et al. 2022): for the first N epochs only the classifier head
trains; the backbone's weights are frozen (requires_grad off, so the optimizer skips them) and its BatchNorm
layers keep their running statistics (eval mode). From epoch N on everything trains, under the same optimizer
and schedule. Parameters frozen for other reasons (--whiten_stem) stay frozen.
"""
from torch import nn

from models.pretrained import classifier_head


class FreezeBackbone:
    def __init__(self, model, epochs):
        self.epochs = epochs
        net = getattr(model, "net", model)
        self.head = classifier_head(net)
        head_params = {id(p) for p in self.head.parameters()}
        self.backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_params]
        self.frozen = False

    def begin_epoch(self, epoch):
        """Freeze the backbone for epochs before `epochs`, unfreeze it after; whether it is frozen now."""
        self.frozen = epoch < self.epochs
        for p in self.backbone:
            p.requires_grad_(not self.frozen)
        return self.frozen

    def set_modes(self, model):
        """After model.train(): the frozen backbone's norm layers evaluate with their running statistics."""
        if not self.frozen:
            return
        head_modules = set(map(id, self.head.modules()))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in head_modules:
                m.eval()
