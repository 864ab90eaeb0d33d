"""Adversarial Weight Perturbation (Wu, Xia & Wang, NeurIPS 2020): the loss is taken at w + v, v a layer-wise
ascent step with ||v_l|| = gamma * ||w_l|| on every conv/linear weight. Per batch: awp.perturb(x_adv, y, loss_fn);
forward + backward; awp.restore(); then unscale, clip, optimizer.step(). Deviations from the reference code: the
restore copies saved weights back (bit-exact) before the step; the proxy ascends its raw gradient (lr cancels).
"""
import copy

import torch
import torch.nn.functional as F

from utils.errors import UserError

EPS = 1e-20  # as in the reference code: a layer with zero gradient gets v = 0


def unwrap(model):
    """The plain module behind torch.compile and (Distributed)DataParallel; it owns the parameters."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)


class AWP:
    """Perturb the model's weights toward higher loss for one forward/backward, then put them back exactly.

    Call order in one training step (the gradient taken at w + v is applied to the original w, as in the paper):

        x_adv = attack.perturb(model, x, y, criterion) if attack else x   # attacked at the unperturbed weights
        awp.perturb(x_adv, y, criterion)      # proxy ascent step, then w <- w + v
        with autocast: loss = criterion(model(x_adv), y)
        scaler.scale(loss).backward()         # gradient at w + v
        awp.restore()                         # w <- saved w (bit-exact), before the step, EMA and evaluation
        scaler.unscale_(opt); clip; scaler.step(opt); scaler.update(); sched.step(); ema.update(model)

    The ascent runs on a private copy of the model (the proxy), so it leaves the model's .grad and BN running
    statistics alone; the proxy takes the model's mode and the caller's autocast. The forward at w + v does update
    the model's BN statistics, as in the reference. Pass the model that owns the weights or its compiled / DDP
    wrapper (unwrapped here); build AWP after moving the model to its device and memory format.
    """

    def __init__(self, model, gamma):
        if gamma <= 0:
            raise UserError(f"AWP gamma {gamma} must be > 0 (the paper uses 0.005-0.01); set --awp_gamma")
        self.model = unwrap(model)
        self.gamma = gamma
        # Conv and linear weights only (ndim > 1), as in the reference; biases and norm parameters stay put.
        self.names = [n for n, p in self.model.named_parameters() if p.ndim > 1 and p.requires_grad]
        self.proxy = copy.deepcopy(self.model)
        for n, p in self.proxy.named_parameters():
            p.grad = None
            p.requires_grad_(n in self.names)
        self._saved = None

    @torch.no_grad()
    def _ascent_direction(self, x, y, loss_fn):
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train(self.model.training)
        proxy_params = dict(self.proxy.named_parameters())
        weights = [proxy_params[n] for n in self.names]
        with torch.enable_grad():
            # v is normalised per layer, so the loss scale is free: x batch size keeps fp16 grads from underflow.
            loss = loss_fn(self.proxy(x), y) * x.shape[0]
            return torch.autograd.grad(loss, weights, allow_unused=True)

    @torch.no_grad()
    def perturb(self, x, y, loss_fn=F.cross_entropy):
        """Compute v on (x, y) and add it to the model's weights: w_l <- w_l + gamma*||w_l|| * g_l/||g_l||."""
        if self._saved is not None:
            raise RuntimeError("AWP.perturb() called twice; call AWP.restore() after each backward")
        grads = self._ascent_direction(x, y, loss_fn)
        params = dict(self.model.named_parameters())
        self._saved = {}
        for name, g in zip(self.names, grads):
            if g is None:  # weight not used in this forward
                continue
            w = params[name]
            dtype = torch.promote_types(w.dtype, torch.float32)  # norms in at least float32
            g = torch.nan_to_num(g.to(dtype), nan=0.0, posinf=0.0, neginf=0.0)
            v = g * (self.gamma * w.to(dtype).norm() / (g.norm() + EPS))
            self._saved[name] = w.detach().clone()
            w.add_(v.to(w.dtype))
        # Autocast caches low-precision copies of weights per autocast region and does not notice in-place changes.
        torch.clear_autocast_cache()

    @torch.no_grad()
    def restore(self):
        """Copy the weights saved by perturb() back; call after backward and before optimizer.step()."""
        if self._saved is None:
            raise RuntimeError("AWP.restore() without a preceding AWP.perturb()")
        params = dict(self.model.named_parameters())
        for name, w in self._saved.items():
            params[name].copy_(w)
        self._saved = None
        torch.clear_autocast_cache()

    def __repr__(self):
        return f"AWP(gamma={self.gamma}, layers={len(self.names)})"


def build_awp(cfg, model):
    """AWP for --adv awp, else None. The loop applies it from epoch --awp_start_epoch on."""
    if cfg.adv != "awp":
        return None
    if cfg.awp_start_epoch < 0:
        raise UserError(f"--awp_start_epoch {cfg.awp_start_epoch} must be >= 0")
    return AWP(model, cfg.awp_gamma)
