"""Model registry. `build_model(...)` returns an `ImageClassifier`: input normalisation lives inside the
model, so every model takes pixels in [0, 1]. `MODELS` maps a name to a constructor
`(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0) -> nn.Module`; `attn_layer` is an
attention class called with a channel count. Nets without residual blocks raise UserError for either.
"""
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.airnet import airnet, airnet_m, airnet_m3, airnet_mc, airnet_s
from models.cbam import CBAM
from models.coord_att import CoordAtt
from models.eca import ECA
from models.mlp import mlp_student, mlp_student_seed, mlp_teacher
from models.mobilenet import mobilenetv2
from models.repvgg import REPVGG_MODELS
from models.resnet_cifar import (
    fastresnet8,
    fastresnet14,
    fastresnet20,
    resnet8,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)
from models.resnet_tv import resnet18, resnet34, resnet50
from models.se import SqueezeExcite
from models.vgg import vgg_plain
from models.wide_resnet import wrn16_4, wrn16_8, wrn28_10
from utils.errors import UserError

MODELS = {
    "resnet8": resnet8,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "fastresnet8": fastresnet8,     # widths 32/64/128 after a max-pooled stem: for CPU time budgets
    "fastresnet14": fastresnet14,
    "fastresnet20": fastresnet20,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "wrn16_4": wrn16_4,
    "wrn16_8": wrn16_8,
    "wrn28_10": wrn28_10,
    "airnet_s": airnet_s,           # airbench-style wide shallow nets: conv-pool-BN-GELU groups
    "airnet_m": airnet_m,
    "airnet": airnet,
    "airnet_m3": airnet_m3,         # airnet_m with a third conv and a residual per group (airbench96-style)
    "airnet_mc": airnet_mc,         # airnet_m with ceil-mode pooling (7 -> 4 px, no border row dropped)
    "mobilenetv2": mobilenetv2,
    "vgg_plain": vgg_plain,
    "mlp_teacher": mlp_teacher,
    "mlp_student": mlp_student,
    "mlp_student_seed": mlp_student_seed,  # the seed's 2 x 20 distillation student
    **REPVGG_MODELS,        # repvgg_a0, repvgg_a1, repvgg_b0 and the plain twin repvgg_a0_plain
}

# Attention modules, each placed on a residual branch after its last conv-BN, before the add.
ATTENTIONS = {"none": None, "se": SqueezeExcite, "cbam": CBAM, "eca": ECA, "ca": CoordAtt}


def make_attention(kind, channels):
    """The attention module `kind` for `channels` channels; nn.Identity() for "none"."""
    if kind not in ATTENTIONS:
        raise UserError(f"unknown attention '{kind}'; choose one of: {', '.join(ATTENTIONS)}")
    layer = ATTENTIONS[kind]
    return nn.Identity() if layer is None else layer(channels)


class ImageClassifier(nn.Module):
    """Normalises [0, 1] pixels with the dataset mean/std, then runs `net`."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def build_model(name, num_classes, in_chans, img_size, mean, std, attention="none", drop_path_rate=0.0,
                acb=False, stem=None):
    """Registry net `name` (or `timm/NAME`: any timm architecture) inside an ImageClassifier; attention and drop
    path go into its residual blocks. stem="standard" keeps torchvision's 7x7/2 stem + max-pool at any size (for
    its pretrained weights); None picks it by img_size."""
    if name.startswith("timm/"):
        if attention != "none" or acb:
            raise UserError(f"--attention and --acb rebuild this repository's blocks; {name} takes neither "
                            f"(drop them, or pick a timm architecture that has them built in)")
        return ImageClassifier(_timm_net(name[len("timm/"):], num_classes, in_chans, drop_path_rate), mean, std)
    if stem is not None and name not in ("resnet18", "resnet34", "resnet50"):
        raise UserError(f"a standard stem applies to torchvision's resnet18/34/50, not {name}")
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    if attention not in ATTENTIONS:
        raise UserError(f"unknown attention '{attention}'; choose one of: {', '.join(ATTENTIONS)}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise UserError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    if num_classes < 1 or in_chans < 1 or img_size < 1:
        raise UserError(f"num_classes, in_chans and img_size must be positive, got "
                        f"{num_classes}, {in_chans}, {img_size}")
    if len(mean) != in_chans or len(std) != in_chans or min(std) <= 0:
        raise UserError(f"mean and std need one value per input channel ({in_chans}) and std > 0; "
                        f"got mean={tuple(mean)}, std={tuple(std)}")

    net = MODELS[name](num_classes, in_chans, img_size, attn_layer=ATTENTIONS[attention],
                       drop_path_rate=drop_path_rate, **({"stem": stem} if stem is not None else {}))
    if acb:
        from models.acb import convert_to_acb  # imported here: only --acb runs need it
        convert_to_acb(net, name)
    return ImageClassifier(net, mean, std)


def _timm_net(name, num_classes, in_chans, drop_path_rate):
    """A timm architecture, randomly initialised (pretrained weights are loaded by models/pretrained.py)."""
    try:
        import timm
    except ImportError:
        raise UserError("--model timm/NAME needs timm: pip install timm") from None
    if not timm.is_model(name):
        raise UserError(f"timm has no model {name!r}; list them with python -c 'import timm; "
                        f"print(timm.list_models())'")
    extra = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **extra)
    except TypeError as e:
        raise UserError(f"timm's {name} does not take these settings ({e}); drop --drop_path_rate") from None


def model_config(name, num_classes, in_chans, img_size, mean, std, attention="none", drop_path_rate=0.0,
                 acb=False, stem=None):
    """The `model_config` dict stored in checkpoints; `model_from_config` rebuilds the model from it."""
    cfg = {"name": name, "num_classes": int(num_classes), "in_chans": int(in_chans), "img_size": int(img_size),
           "mean": [float(m) for m in mean], "std": [float(s) for s in std], "attention": attention,
           "drop_path_rate": float(drop_path_rate), "acb": bool(acb), "reparameterized": False}
    if stem is not None:
        cfg["stem"] = stem
    return cfg


def model_from_config(cfg):
    """Build the model a checkpoint's `model_config` describes (deploy form if it was re-parameterised)."""
    missing = [k for k in ("name", "num_classes", "in_chans", "img_size", "mean", "std") if k not in cfg]
    if missing:
        raise UserError(f"checkpoint model_config lacks {', '.join(missing)}; was it written by this repository?")
    model = build_model(cfg["name"], cfg["num_classes"], cfg["in_chans"], cfg["img_size"], cfg["mean"],
                        cfg["std"], attention=cfg.get("attention", "none"),
                        drop_path_rate=cfg.get("drop_path_rate", 0.0), acb=cfg.get("acb", False),
                        stem=cfg.get("stem"))
    if cfg.get("reparameterized"):
        from models.reparam import reparameterize_model  # imported here: only deploy checkpoints need it
        model = reparameterize_model(model)
    return model


def model_summary(model, in_chans, img_size):
    """(number of parameters, FLOPs of one batch-1 forward in eval mode as counted by FlopCounterMode).

    FlopCounterMode counts 2 FLOPs per multiply-add of convs and matmuls; norms and activations are free.
    """
    num_params = sum(p.numel() for p in model.parameters())
    p = next(model.parameters())
    x = torch.zeros(1, in_chans, img_size, img_size, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return num_params, counter.get_total_flops()
