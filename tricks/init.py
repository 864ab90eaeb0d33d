"""Weight init by name: Xavier (Glorot & Bengio 2010), Kaiming (He et al. 2015), orthogonal (Saxe et al. 2014),
normal N(0, std) / uniform U(-std, std), LSUV (Mishkin & Matas 2016), zero-γ residual branches (Goyal et al. 2017).
Gain = calculate_gain(nonlinearity); biases 0, norm layers weight 1 / bias 0. LSUV measures with BatchNorm in train
mode (batch statistics) and Dropout/DropPath off, then puts every module's mode and the BN running statistics back.
seed: the seed's weights_init as it ran: convs Xavier-normal (gain 1) with bias 0.3, Linear N(0, 0.1) with bias 0.
Its BatchNorm branch (weight 1, bias 0) called `m.weight()` (a TypeError, had it run) and never ran: reproduced by
leaving norm layers as the model built them (torch's 1 / 0 unless the model sets its own, e.g. airnet's zero γ).
Deviation: a conv without bias keeps none (the seed's constant_(m.bias, 0.3) would raise).
Dirac (airbench, Jordan 2024): every square-kernel conv's first min(in, out) filters become the identity
(nn.init.dirac_), the others keep the model's own init; biases and norms are left alone.
Patch-whitening stem (airbench): the first conv's filters become the eigenvectors of the covariance of its
input patches, scaled by 1 / sqrt(eigenvalue + eps), and their negatives; the weight is then frozen.
"""
import logging
import math

import torch
from torch import nn

from engine.optim import NORM_LAYERS
from tricks.swa import deterministic_train_mode
from utils.errors import UserError

log = logging.getLogger(__name__)

INITS = ("default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal", "lsuv",
         "dirac", "normal", "uniform", "seed")
NONLINEARITIES = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                  "conv_transpose3d", "sigmoid", "tanh", "relu", "leaky_relu", "selu")
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


def _init_weight(w, init, mode, nonlinearity, gain, std):
    if init == "normal":
        nn.init.normal_(w, 0.0, std)
    elif init == "uniform":
        nn.init.uniform_(w, -std, std)
    elif init == "xavier_uniform":
        nn.init.xavier_uniform_(w, gain=gain)
    elif init == "xavier_normal":
        nn.init.xavier_normal_(w, gain=gain)
    elif init in ("kaiming_uniform", "kaiming_normal"):
        # a=0.01 makes leaky_relu's gain the same as calculate_gain's default slope.
        fn = nn.init.kaiming_uniform_ if init == "kaiming_uniform" else nn.init.kaiming_normal_
        fn(w, a=0.01 if nonlinearity == "leaky_relu" else 0, mode=mode, nonlinearity=nonlinearity)
    else:  # orthogonal, and the data-free first step of lsuv
        nn.init.orthogonal_(w, gain=gain)


@torch.no_grad()
def init_weights(model, init, mode="fan_in", nonlinearity="relu", std=None):
    """Re-initialise every conv/linear/norm layer of `model` by name; returns the number of conv/linear layers.

    "default" keeps PyTorch's (or the model's own) initialisation. "lsuv" does the orthogonal part only;
    `lsuv_init(model, batch)` does all of LSUV. "normal" and "uniform" need `std` (--init_std).
    """
    if init not in INITS:
        raise UserError(f"unknown --init {init!r}; choose one of {', '.join(INITS)}")
    if mode not in ("fan_in", "fan_out"):
        raise UserError(f"unknown --init_mode {mode!r}; choose fan_in or fan_out")
    try:
        gain = nn.init.calculate_gain(nonlinearity)
    except ValueError:
        raise UserError(f"unknown --init_nonlinearity {nonlinearity!r}; choose one of "
                        f"{', '.join(NONLINEARITIES)}") from None
    if init in ("normal", "uniform"):
        if std is None:
            raise ValueError(f"init_weights(..., {init!r}) needs std= (train.py passes --init_std)")
        if not (math.isfinite(std) and std > 0):
            raise UserError(f"--init_std {std} must be a positive number")
    if init == "default":
        return 0
    if init == "dirac":
        return _dirac_init(model)
    if init == "seed":
        return _seed_init(model)
    n = 0
    for m in model.modules():
        if isinstance(m, _WEIGHTED):
            _init_weight(m.weight, init, mode, nonlinearity, gain, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            n += 1
        elif isinstance(m, NORM_LAYERS):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    return n


def _seed_init(model):
    """The seed's scheme (see the module docstring): returns the number of conv/linear layers."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0.3)
            n += 1
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.1)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            n += 1
        # no norm-layer branch: the seed's called m.weight() and never ran
    return n


def _dirac_init(model):
    """Partial identity init of every conv with a square odd kernel and groups == 1; returns how many."""
    n = 0
    for m in model.modules():
        if (isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size[0] == m.kernel_size[1]
                and m.kernel_size[0] % 2 == 1):
            nn.init.dirac_(m.weight[:min(m.in_channels, m.out_channels)])
            n += 1
    if n == 0:
        raise UserError("--init dirac: this model has no square-kernel Conv2d layers; choose another --init")
    return n


def first_conv(model, batch):
    """(name, module, its input on `batch`) of the first Conv2d the forward pass calls."""
    seen = []

    def hook(mod, inp):
        seen.append((mod, inp[0].detach()))
        raise _Stop

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        model(batch)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise UserError("--whiten_stem: the model calls no Conv2d; drop the flag")
    conv, x = seen[0]
    name = next(n for n, m in model.named_modules() if m is conv)
    return name, conv, x


@torch.no_grad()
def whiten_stem(model, batch, eps=5e-4):
    """Set the first conv's filters to the patch-whitening basis of `batch` (float pixels in [0, 1]) and freeze
    its weight. For d = in_channels * kh * kw patch dimensions with covariance eigenpairs (l_i, v_i), filter i is
    v_i / sqrt(l_i + eps) and filter P + i its negative (P = min(d, out // 2) pairs, largest eigenvalues
    first); filters beyond 2P keep their own init. The bias (if any) stays
    trainable and is set to centre the outputs. Returns (layer name, eigenvalues in descending order)."""
    was_training = model.training
    model.eval()
    try:
        name, conv, x = first_conv(model, batch)
    finally:
        model.train(was_training)
    if conv.groups != 1:
        raise UserError(f"--whiten_stem: the first conv {name} is grouped; drop the flag")
    patches = torch.nn.functional.unfold(x.double(), conv.kernel_size, dilation=conv.dilation)  # (N, d, L)
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    mean = patches.mean(0)
    cov = torch.cov(patches.T)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    eigvals, eigvecs = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)
    d = eigvals.numel()
    pairs = min(d, conv.out_channels // 2)
    if pairs == 0:
        raise UserError(f"--whiten_stem: the first conv {name} has {conv.out_channels} filter(s); "
                        f"whitening needs at least 2")
    filters = (eigvecs[:, :pairs] / torch.sqrt(eigvals[:pairs] + eps)).T  # (pairs, d)
    filters = torch.cat([filters, -filters])
    w = conv.weight
    w[:2 * pairs] = filters.reshape(2 * pairs, *w.shape[1:]).to(w.dtype)
    if conv.bias is not None:
        conv.bias[:2 * pairs] = -(filters @ mean).to(conv.bias.dtype)
    w.requires_grad_(False)
    return name, eigvals


def zero_init_residual(model):
    """Call `zero_init_last()` on every module that has it (residual blocks); returns how many."""
    n = 0
    for m in model.modules():
        if callable(getattr(m, "zero_init_last", None)):
            m.zero_init_last()
            n += 1
    if n == 0:
        raise UserError("--zero_init_residual: this model has no residual blocks (no zero_init_last()); "
                        "drop the flag")
    return n


class _Stop(Exception):
    """Raised by the LSUV hook: the rest of the forward pass is not needed."""


@torch.no_grad()
def lsuv_init(model, batch, tol=0.1, max_iter=10):
    """LSUV: orthogonal init, then, in forward order, scale each conv/linear weight until the variance of the
    layer's output on `batch` (float pixels in [0, 1]) is 1 within `tol`, at most `max_iter` times.

    Returns {layer name: final output variance}. Layers whose output variance is 0 are skipped.
    """
    if not batch.is_floating_point():
        raise ValueError("lsuv_init expects a float batch in [0, 1]; convert uint8 with .float().div(255)")
    init_weights(model, "orthogonal", nonlinearity="linear")
    layers = dict((name, m) for name, m in model.named_modules() if isinstance(m, _WEIGHTED))
    first = next(iter(layers.values()), None)
    if first is None:
        return {}
    batch = batch.to(first.weight.device)
    buffers = {k: v.clone() for k, v in model.named_buffers()}  # BN running stats move in train mode
    # BN normalises with batch statistics, as in training; Dropout/DropPath off, so the variance set is that of
    # the deterministic network and not that of one noisy draw (inverted dropout inflates it)
    try:
        with deterministic_train_mode(model):
            order = []  # names in the order the forward pass calls them
            handles = [m.register_forward_hook(lambda mod, inp, out, name=name: order.append(name))
                       for name, m in layers.items()]
            try:
                model(batch)
            finally:
                for h in handles:
                    h.remove()
            order = list(dict.fromkeys(order))  # a module called twice is scaled once
            final = {}
            for name in order:
                final[name] = _lsuv_layer(model, batch, name, layers[name], tol, max_iter)
    finally:
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    return final


def _lsuv_layer(model, batch, name, layer, tol, max_iter):
    def out_var():
        seen = []

        def hook(mod, inp, out):
            seen.append(out.detach().float().var().item())
            raise _Stop

        h = layer.register_forward_hook(hook)
        try:
            model(batch)
        except _Stop:
            pass
        finally:
            h.remove()
        return seen[0]

    var = out_var()
    it = 0
    while abs(var - 1.0) >= tol and it < max_iter:
        if not math.isfinite(var) or var < 1e-8:  # zero weights or zero input: nothing to scale
            log.info("LSUV %s: output variance %.3g, skipped", name, var)
            return var
        layer.weight.div_(math.sqrt(var))
        var = out_var()
        it += 1
    log.info("LSUV %s: output variance %.4f after %d step(s)", name, var, it)
    return var
