"""Lookahead (Zhang, Lucas, Hinton & Ba 2019, "Lookahead Optimizer: k steps forward, 1 step back"): the inner
optimiser moves the "fast" weights; every k of its steps the "slow" weights move a fraction alpha towards
them, slow <- slow + alpha * (fast - slow), and the fast weights restart from there, fast <- slow.
It wraps no optimiser: call `step()` after every optimiser step. Only trainable parameters have slow copies;
buffers (BatchNorm statistics) follow the fast weights. airbench uses a variant of this ("lookahead/EMA pull").
"""
import torch

from utils.errors import UserError


class Lookahead:
    def __init__(self, model, k=5, alpha=0.5):
        if int(k) != k or k < 1:
            raise UserError(f"--lookahead_k must be a whole number of steps >= 1 (got {k})")
        if not 0.0 < alpha <= 1.0:
            raise UserError(f"--lookahead_alpha must be in (0, 1] (got {alpha}); 1 is plain training")
        self.k, self.alpha, self.steps = int(k), float(alpha), 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.slow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def step(self):
        """Count one optimiser step; on every k-th, pull the slow weights and reset the fast ones. Returns
        whether it synchronised."""
        self.steps += 1
        if self.steps % self.k:
            return False
        torch._foreach_lerp_(self.slow, [p.detach() for p in self.params], self.alpha)
        torch._foreach_copy_([p.data for p in self.params], self.slow)
        return True

    def state_dict(self):
        return {"k": self.k, "alpha": self.alpha, "steps": self.steps, "slow": [s.clone() for s in self.slow]}

    def load_state_dict(self, state):
        slow = state["slow"]
        if len(slow) != len(self.slow) or any(a.shape != b.shape for a, b in zip(slow, self.slow)):
            raise UserError("the checkpoint's lookahead weights do not match this model; resume with the same "
                            "--model and flags")
        self.steps = int(state["steps"])  # k and alpha come from the flags
        for dst, src in zip(self.slow, slow):
            dst.copy_(src)
