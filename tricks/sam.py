"""Sharpness-Aware Minimization (SAM, Foret et al., ICLR 2021) and Adaptive SAM (ASAM, Kwon et al., ICML 2021).
Per step: g = grad L(w) on the batch; e = rho g / ||g|| over all trainable parameters (ASAM: e = rho T^2 g / ||T g||
with T = |w| + eta on weights, 1 on biases and norm parameters); the loss gradient at w + e; w restored bit-exactly;
then the base optimizer (--sam_base) steps at w with that gradient. BatchNorm: the ascent forward at w updates the
running statistics, as a plain step does; the forward at w + e leaves them as the ascent left them (restore() copies
them back), so each step moves them once, at w. Deviation: ASAM's code also scales norm-layer weights by T; here
only weights of two or more dimensions are.
"""
import torch
import torch.nn.functional as F
from torch import nn

from engine.loop import unwrap
from utils.errors import UserError

EPS = 1e-12  # a zero gradient gives e = 0


class SAM:
    """Perturb the weights to the worst case within radius rho for one forward/backward, then put them back exactly.

    Call order in one training step (the loop's weight-perturbation call points, shared with AWP):

        sam.perturb(x, y, criterion)     # ascent gradient at w (BN statistics move once, here), then w <- w + e
        with autocast: loss = criterion(model(x), y)
        scaler.scale(loss).backward()    # gradient at w + e, into .grad
        sam.restore()                    # w and BN statistics back, bit-exact; then unscale, clip, step

    The ascent gradient comes from torch.autograd.grad on the unwrapped model, so .grad (the micro-batches summed so
    far) is untouched and DDP's gradient hooks do not fire: each process perturbs by its own batch's gradient, as in
    the paper's per-accelerator implementation. Parameters are looked up at every step (freezing may change them).
    """

    def __init__(self, model, rho, adaptive=False, eta=0.01):
        if rho <= 0 or eta < 0:
            raise UserError(f"SAM rho {rho:g} must be > 0 and eta {eta:g} >= 0 (SAM's paper: rho 0.05; ASAM's: "
                            f"0.5-2); set --sam_rho")
        self.model = unwrap(model)
        self.rho, self.adaptive, self.eta = rho, adaptive, eta
        self._saved = None  # [(parameter, its value at w)]
        self._stats = None  # [(BatchNorm buffer, its value after the ascent)]

    def _ascent_gradient(self, params, x, y, loss_fn):
        with torch.enable_grad():
            # e is normalised, so the loss scale is free: x batch size keeps fp16 gradients from underflowing
            loss = loss_fn(self.model(x), y) * x.shape[0]
            return torch.autograd.grad(loss, params, allow_unused=True)

    @torch.no_grad()
    def perturb(self, x, y, loss_fn=F.cross_entropy):
        """Take the gradient at w on (x, y) and move the weights to w + e."""
        if self._saved is not None:
            raise RuntimeError("SAM.perturb() called twice; call SAM.restore() after each backward")
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = self._ascent_gradient(params, x, y, loss_fn)
        self._stats = [(b, b.clone()) for m in self.model.modules()
                       if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
                       for b in m.buffers(recurse=False)]
        scaled = []  # (parameter, T g, T or None)
        for p, g in zip(params, grads):
            if g is None:  # not used in this forward
                continue
            dtype = torch.promote_types(p.dtype, torch.float32)  # norms in at least float32
            g = torch.nan_to_num(g.to(dtype), nan=0.0, posinf=0.0, neginf=0.0)
            t = p.detach().to(dtype).abs().add_(self.eta) if self.adaptive and p.ndim > 1 else None
            scaled.append((p, g if t is None else g * t, t))
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(tg) for _, tg, _ in scaled])) \
            if scaled else 0.0
        self._saved = []
        for p, tg, t in scaled:
            e = tg * (self.rho / (norm + EPS)) if t is None else tg * t * (self.rho / (norm + EPS))
            self._saved.append((p, p.detach().clone()))
            p.add_(e.to(p.dtype))
        # Autocast caches low-precision copies of weights per autocast region and does not notice in-place changes.
        torch.clear_autocast_cache()

    @torch.no_grad()
    def restore(self):
        """Copy w and the BatchNorm statistics saved by perturb() back; call after backward, before the step."""
        if self._saved is None:
            raise RuntimeError("SAM.restore() without a preceding SAM.perturb()")
        for p, w in self._saved:
            p.copy_(w)
        for b, v in self._stats:
            b.copy_(v)
        self._saved = self._stats = None
        torch.clear_autocast_cache()

    def __repr__(self):
        return f"{'ASAM' if self.adaptive else 'SAM'}(rho={self.rho}" + (f", eta={self.eta})" if self.adaptive else ")")
