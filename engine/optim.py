"""Optimiser by name (SGD with momentum/Nesterov, Adam, AdamW), no bias decay, and the linear scaling rule.
No bias decay: biases and norm parameters (ndim <= 1) get weight_decay 0 (Bag of Tricks, He et al. 2019).
Linear scaling rule: lr proportional to the global batch size (Goyal et al. 2017).
Norm-bias lr scale (airbench, Jordan 2024): normalisation-layer biases get lr x S and weight decay / S, so their
decay per step (lr x wd) is unchanged while they move S times faster.
For adam/adamw/lion, --momentum is beta1 (0.9, Adam's default); --nesterov applies to SGD only. Lion: engine/lion.py.
Muon (engine/muon.py) trains the hidden weight matrices at --muon_lr, an SGD or AdamW the rest at --lr. SAM is the
loop's weight perturbation (tricks/sam.py) around the optimiser built here for --sam_base.
Fine-tuning: layer-wise lr decay (lr x G^depth from the head, stages from the model's top-level children) and
the head's own lr scale.
"""
import logging
from dataclasses import dataclass

import torch
from torch import nn

from engine.lion import Lion
from engine.muon import MuonWithAux, muon_param_groups
from models.pretrained import classifier_head
from utils.errors import UserError

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw", "lion", "muon", "sam")
SAM_BASES = ("sgd", "adam", "adamw", "lion")  # the optimisers --opt sam steps with
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


@dataclass(frozen=True)
class OptimizerOptions:
    """The flags build_optimizer and scaled_lr read (train.py fills it from the command line: config.options)."""
    batch_size: int
    bias_decay: bool
    lr: float
    lr_base_batch: int
    momentum: float
    nesterov: bool
    norm_bias_lr_scale: float
    opt: str
    weight_decay: float
    layer_decay: float = 1.0
    head_lr_scale: float = 1.0
    lion_beta2: float = 0.99
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_aux: str = "sgd"
    sam_base: str = "sgd"


def param_groups_no_bias_decay(model, weight_decay):
    """Two param groups: weights (ndim > 1) with `weight_decay`, biases and norm parameters (ndim <= 1) with 0."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scale_norm_bias_lr(groups, model, lr, scale):
    """Move the normalisation-layer biases out of `groups` into their own group with lr * scale and each
    one's weight decay / scale."""
    if scale <= 0:
        raise UserError(f"--norm_bias_lr_scale must be > 0 (got {scale:g}); 1 turns it off")
    biases = {id(m.bias) for m in model.modules()
              if isinstance(m, NORM_LAYERS) and getattr(m, "bias", None) is not None}
    if not biases:
        raise UserError("--norm_bias_lr_scale: this model has no normalisation-layer biases; drop the flag")
    out, moved = [], {}
    for g in groups:
        keep = [p for p in g["params"] if id(p) not in biases]
        for p in g["params"]:
            if id(p) in biases:
                moved.setdefault(g["weight_decay"], []).append(p)
        if keep:
            out.append({**g, "params": keep})
    out += [{"params": ps, "lr": lr * scale, "weight_decay": wd / scale} for wd, ps in moved.items()]
    return out


def build_optimizer(model, cfg, lr):
    """--opt over the model's trainable parameters with peak learning rate `lr` (see `scaled_lr`)."""
    if not cfg.bias_decay:
        params = param_groups_no_bias_decay(model, cfg.weight_decay)
    else:
        params = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    if cfg.norm_bias_lr_scale != 1:
        params = scale_norm_bias_lr(params, model, lr, cfg.norm_bias_lr_scale)
    if cfg.layer_decay != 1 or cfg.head_lr_scale != 1:
        params = scale_lr_by_depth(params, getattr(model, "net", model), lr, cfg.layer_decay, cfg.head_lr_scale)
    opt = cfg.opt
    if opt == "sam":  # the loop perturbs the weights (tricks/sam.py); this optimiser steps
        if cfg.sam_base not in SAM_BASES:
            raise UserError(f"unknown --sam_base {cfg.sam_base!r}; choose one of {', '.join(SAM_BASES)}")
        opt = cfg.sam_base
    if cfg.nesterov and cfg.momentum <= 0 and (opt == "sgd" or opt == "muon" and cfg.muon_aux == "sgd"):
        raise UserError("Nesterov SGD needs --momentum > 0; pass a momentum or --no_nesterov")
    if opt == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if opt in ("adam", "adamw"):
        cls = torch.optim.Adam if opt == "adam" else torch.optim.AdamW  # Adam: L2; AdamW: decoupled
        return cls(params, lr=lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
    if opt == "lion":  # --momentum is beta1, --lion_beta2 beta2; decoupled weight decay
        return Lion(params, lr=lr, betas=(cfg.momentum, cfg.lion_beta2), weight_decay=cfg.weight_decay)
    if opt == "muon":  # hidden weight matrices at --muon_lr (x each group's lr factor), the rest at lr
        return MuonWithAux(muon_param_groups(params, model, lr, cfg.muon_lr), lr, cfg.weight_decay, cfg.muon_aux,
                           cfg.momentum, cfg.nesterov, cfg.muon_momentum)
    raise UserError(f"unknown --opt {cfg.opt!r}; choose one of {', '.join(OPTIMIZERS)}")


def param_depths(net):
    """{parameter id: depth from the classifier head}: the head's stage 0, and the top-level stages of `net`
    counted back from it; leading single layers (the stem's conv and norm) form one stage, and parameters owned
    by `net` itself (a ViT's position embedding) count as the deepest. Returns (depths, stage names)."""
    head = classifier_head(net)
    stages = []  # [name, [modules]]
    for name, child in net.named_children():
        if not any(True for _ in child.parameters()):
            continue
        leaf = not any(True for _ in child.children())
        if leaf and stages and stages[-1][2] and not any(m is head for m in stages[-1][1]) and child is not head:
            stages[-1][0] += f"+{name}"  # stem layers together
            stages[-1][1].append(child)
        else:
            stages.append([name, [child], leaf and child is not head])
    top = next((i for i, (_, mods, _) in enumerate(stages) if any(h is head for m in mods for h in m.modules())),
               len(stages) - 1)
    depths = {id(p): len(stages) for p in net.parameters()}
    for i, (_, mods, _) in enumerate(stages):
        for m in mods:
            for p in m.parameters():
                depths[id(p)] = max(top - i, 0)
    return depths, [(name, max(top - i, 0)) for i, (name, _, _) in enumerate(stages)]


def scale_lr_by_depth(groups, net, lr, layer_decay, head_lr_scale):
    """Layer-wise lr decay (BEiT, Bao et al. 2022; ELECTRA, Clark et al. 2020): each parameter's lr x
    layer_decay ^ (its depth from the head); the head's lr x head_lr_scale. Splits `groups` by factor."""
    if not 0 < layer_decay <= 1 or head_lr_scale <= 0:
        raise UserError(f"--layer_decay {layer_decay:g} must be in (0, 1] and --head_lr_scale {head_lr_scale:g} > 0")
    depths, stages = param_depths(net)
    head = {id(p) for p in classifier_head(net).parameters()}
    log.info("lr by stage: " + ", ".join(f"{name} x{layer_decay ** d * (head_lr_scale if d == 0 else 1):.3g}"
                                         for name, d in stages))
    out = []
    for group in groups:
        by_factor = {}
        for p in group["params"]:
            factor = layer_decay ** depths[id(p)] * (head_lr_scale if id(p) in head else 1.0)
            by_factor.setdefault(factor, []).append(p)
        out += [{**group, "params": ps, "lr": group.get("lr", lr) * f} for f, ps in by_factor.items()]
    return out


def scaled_lr(cfg, world_size):
    """Linear scaling rule: lr * (batch_size * world_size) / lr_base_batch; cfg.lr when --lr_base_batch is 0."""
    if cfg.lr_base_batch < 0:
        raise UserError(f"--lr_base_batch {cfg.lr_base_batch} must be >= 0 (0 = no scaling)")
    if cfg.lr_base_batch == 0:
        return cfg.lr
    return cfg.lr * cfg.batch_size * world_size / cfg.lr_base_batch
