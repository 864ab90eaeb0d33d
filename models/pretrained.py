"""Pretrained weights for fine-tuning (--pretrained): torchvision's published weights through its weights API,
timm's through timm, or a file (a torchvision/timm state dict, or a checkpoint of this repository).

The weights load into the network exactly or not at all: a stem whose input channels differ is adapted (to 1
channel by summing the filters over the input channels, as timm's adapt_input_conv does; to 3 channels from 1 by
repeating them scaled by 1/3), a classifier whose class count differs is left freshly initialised, and every
other missing, unexpected or mis-shaped tensor is a one-line UserError naming it. Files load with
weights_only=True, so a pickled-code file is refused.
"""
import logging
import os

import torch
from torch import nn

from utils.errors import UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TORCHVISION = ("resnet18", "resnet34", "resnet50")  # registry names built on torchvision's architectures
_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers


def torchvision_state_dict(name):
    """torchvision's default ImageNet weights for `name`, from its cache under TORCH_HOME (downloaded when the
    machine is online)."""
    import torchvision
    weights = torchvision.models.get_model_weights(name).DEFAULT
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        return weights.get_state_dict(progress=False, weights_only=True), path
    except Exception as e:  # no network (URLError), a proxy error, a truncated cache file, ...
        reason = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot get torchvision's {name} weights ({reason}); download {weights.url} on a "
                        f"machine with internet and put it at {path} (TORCH_HOME sets the folder), or pass "
                        f"--pretrained PATH") from None


def read_weights(path, use_ema=False):
    """(state dict of the network, its (mean, std) or None, its class names or None) from a file: a
    torchvision/timm state dict, a training checkpoint with a "state_dict"/"model" entry, or a checkpoint of this
    repository (train, averaged or SWA form; use_ema: its EMA weights; a deploy form is refused)."""
    if not os.path.isfile(path):
        raise UserError(f"--pretrained {path} does not exist; pass a weights file (.pt/.pth)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"--pretrained {path} is not a readable weights file ({reason})") from None
    stats = class_names = None
    if isinstance(obj, dict) and isinstance(obj.get("model_config"), dict) and "model" in obj:
        if obj["model_config"].get("reparameterized"):  # conv and BatchNorm fused: no train-form model matches
            raise UserError(f"--pretrained {path} is a deploy checkpoint (convolutions and BatchNorm fused by "
                            f"reparam_export.py); fine-tune from the checkpoint it was exported from")
        if use_ema and not isinstance(obj.get("ema"), dict):
            raise UserError(f"--pretrained_use_ema: {path} holds no EMA weights; drop the flag")
        state = obj["ema"]["module"] if use_ema else obj["model"]
        cfg = obj["model_config"]
        stats = (cfg["mean"], cfg["std"]) if "mean" in cfg and "std" in cfg else None
        class_names = obj.get("class_names")
        state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}  # inside ImageClassifier
    elif use_ema:
        raise UserError(f"--pretrained_use_ema: {path} is not a checkpoint of this repository; drop the flag")
    else:
        state = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"--pretrained {path} holds no state dict of tensors; pass a torchvision/timm state "
                        f"dict or a checkpoint of this repository")
    return state, stats, class_names


def adapt_input_conv(weight, in_chans):
    """A stem filter bank `weight` (out, c, k, k) made to take `in_chans` channels: summed over the channels for
    one (a grey image repeated over c channels gives the same response), repeated and scaled by c / in_chans
    for more."""
    c = weight.shape[1]
    if c == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    if c == 1:
        return weight.repeat(1, in_chans, 1, 1) / in_chans
    raise UserError(f"the pretrained stem takes {c} channels and the data has {in_chans}; pass --in_chans {c}")


def classifier_head(net):
    """The module that maps features to classes: timm's get_classifier(), else the last nn.Linear."""
    if hasattr(net, "get_classifier"):
        return net.get_classifier()
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("this model has no linear classifier head to re-initialise or train alone")
    return linears[-1]


def load_pretrained(net, state, source, reset_head=False):
    """Load `state` into `net` exactly: stem channels adapted, a head of another class count (or any head, with
    reset_head: other classes of the same count) left fresh, both logged by name; any other difference is a
    UserError. Returns the names of the fresh head tensors."""
    state = {_strip(k): v for k, v in state.items()}
    own = net.state_dict()
    head_module = classifier_head(net)
    head = {f"{n}.{p}" for n, m in net.named_modules() if m is head_module for p in ("weight", "bias")}
    fresh, loaded = [], {}
    for key, value in state.items():
        if key in own and value.shape != own[key].shape and value.ndim == 4 and own[key].ndim == 4 \
                and value.shape[0] == own[key].shape[0] and value.shape[2:] == own[key].shape[2:]:
            log.info(f"pretrained: {key} adapted from {value.shape[1]} to {own[key].shape[1]} input channel(s)")
            value = adapt_input_conv(value, own[key].shape[1])
        if key in head and (reset_head or key not in own or value.shape != own[key].shape):
            fresh.append(key)
            continue
        loaded[key] = value
    missing = sorted(k for k in own if k not in loaded and k not in fresh and not _buffer_ok(k))
    unexpected = sorted(k for k in state if k not in own and k not in fresh)
    shapes = sorted(k for k in loaded if k in own and loaded[k].shape != own[k].shape)
    for what, keys in (("lacks", missing), ("has unexpected", unexpected), ("has mis-shaped", shapes)):
        if keys:
            raise UserError(f"--pretrained {source} {what} tensor(s) {', '.join(keys[:4])}"
                            f"{' ...' if len(keys) > 4 else ''} for this model; pass weights of the same "
                            f"architecture (--model) or train from scratch")
    net.load_state_dict({**own, **loaded})
    for key in fresh:
        log.info(f"pretrained: {key} re-initialised (the weights' classifier predicts other classes)")
    log.info(f"pretrained: loaded {len(loaded)} tensors from {source}")
    return fresh


def _strip(key):
    for prefix in _PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _buffer_ok(key):
    return key.endswith("num_batches_tracked")  # absent from some exported state dicts; a counter, not a weight


class Weights:
    """Pretrained weights resolved from --pretrained: the state dict, the input statistics they were trained with
    (None: unknown, the data's are used), the torchvision stem they need, and where they came from."""

    def __init__(self, state, stats, stem, source, class_names=None):
        self.state, self.stats, self.stem, self.source = state, stats, stem, source
        self.class_names = class_names  # a checkpoint of this repository: the classes its head predicts


def fetch_weights(model_name, source, use_ema=False):
    """--pretrained [SOURCE] for --model `model_name`: source "default" is the architecture's published weights
    (torchvision's for resnet18/34/50, timm's for timm/NAME); otherwise a file path."""
    standard = "standard" if model_name in TORCHVISION else None
    if source != "default":
        state, stats, class_names = read_weights(source, use_ema)
        from_repo = stats is not None
        return Weights(state, stats, None if from_repo else standard, source, class_names)
    if use_ema:
        raise UserError("--pretrained_use_ema needs --pretrained PATH (a checkpoint of this repository)")
    if model_name in TORCHVISION:
        state, path = torchvision_state_dict(model_name)
        return Weights(state, (IMAGENET_MEAN, IMAGENET_STD), standard, path)
    if model_name.startswith("timm/"):
        return _timm_weights(model_name[len("timm/"):])
    raise UserError(f"--pretrained without a file: {model_name} has no published weights (torchvision's "
                    f"{', '.join(TORCHVISION)} and timm/NAME do); pass --pretrained PATH or train from scratch")


def _timm_weights(name):
    import timm
    try:
        net = timm.create_model(name, pretrained=True)
    except Exception as e:  # no network and an empty Hugging Face cache, no pretrained tag, ...
        reason = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot get timm's {name} weights ({reason}); download them where the machine is "
                        f"online (HF_HOME holds timm's cache), or pass --pretrained PATH to a state dict") from None
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    stats = (tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))
    return Weights(net.state_dict(), stats, None, f"timm:{name}")


def stats_for(stats, in_chans):
    """Input mean/std of the weights for `in_chans` channels: averaged for grey data through a summed stem,
    repeated for colour data through a repeated one."""
    mean, std = (list(map(float, s)) for s in stats)
    if len(mean) == in_chans:
        return mean, std
    if in_chans == 1:
        return [sum(mean) / len(mean)], [sum(std) / len(std)]
    if len(mean) == 1:
        return mean * in_chans, std * in_chans
    raise UserError(f"the pretrained weights expect {len(mean)} input channels; pass --in_chans {len(mean)}")
