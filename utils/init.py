"""Weight init by name: Xavier (Glorot & Bengio 2010), Kaiming (He et al. 2015), orthogonal (Saxe et al. 2014),
LSUV (Mishkin & Matas 2016), zero-γ residual branches (Goyal et al. 2017). Gain = calculate_gain(nonlinearity);
biases 0, norm layers weight 1 / bias 0. LSUV measures in train mode (BN on batch statistics) and puts the BN
running statistics back afterwards.
"""
import logging
import math

import torch
from torch import nn

from utils.errors import UserError

log = logging.getLogger(__name__)

INITS = ("default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal", "lsuv")
NONLINEARITIES = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                  "conv_transpose3d", "sigmoid", "tanh", "relu", "leaky_relu", "selu")
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def _init_weight(w, init, mode, nonlinearity, gain):
    if init == "xavier_uniform":
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
def init_weights(model, init, mode="fan_in", nonlinearity="relu"):
    """Re-initialise every conv/linear/norm layer of `model` by name; returns the number of conv/linear layers.

    "default" keeps PyTorch's (or the model's own) initialisation. "lsuv" does the orthogonal part only;
    `lsuv_init(model, batch)` does all of LSUV.
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
    if init == "default":
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, _WEIGHTED):
            _init_weight(m.weight, init, mode, nonlinearity, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            n += 1
        elif isinstance(m, _NORMS):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    return n


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
    was_training = model.training
    buffers = {k: v.clone() for k, v in model.named_buffers()}  # BN running stats move in train mode
    model.train()
    try:
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
        model.train(was_training)
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
