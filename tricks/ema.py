"""Exponential moving average of the weights (Polyak averaging with exponential weights), as in
timm's ModelEmaV2 and torchvision's reference scripts: ema = d * ema + (1 - d) * w after every optimizer step.
Buffers are averaged too (BatchNorm running statistics); integer buffers (num_batches_tracked) are copied.
Optional warm-up as in TF's ExponentialMovingAverage: d_n = min(d, (1 + n) / (10 + n)).
"""
import copy
import logging
import weakref

import torch

log = logging.getLogger(__name__)


class ModelEMA:
    """Keeps `self.module`, an eval-mode, no-grad copy of `model` whose weights are the running average.

    Build it from the unwrapped model after `.to(device)` / channels_last and before DDP or torch.compile,
    then call `update(model)` after every optimizer step. `model` may also be the DDP- or compile-wrapped
    model: their parameters() and buffers() are the unwrapped model's, in the same order.
    The average keeps the dtype the model had when the EMA was built; the model's tensors are cast to it.
    """

    def __init__(self, model, decay, warmup=False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = float(decay), bool(warmup), 0
        self._slots = _tensor_slots(self.module)
        is_float = [d[k].is_floating_point() for d, k in self._slots]
        self._float_idx = [i for i, f in enumerate(is_float) if f]
        self._other_idx = [i for i, f in enumerate(is_float) if not f]
        self._source = (None, None)  # (weak reference to the last model passed to update, its slots)

    def decay_at(self, n):
        """Decay used by update number n + 1 (n updates already done)."""
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model):
        d = self.decay_at(self.num_updates)
        ema = [dct[k] for dct, k in self._slots]
        src = [dct[k] for dct, k in self._source_slots(model)]
        # Cast only where needed so the common case (same dtype and device) stays one multi-tensor
        # kernel; a different memory format (channels_last on one side) is fine for lerp.
        ema_f = [ema[i] for i in self._float_idx]
        torch._foreach_lerp_(ema_f, [_like(src[i], e) for i, e in zip(self._float_idx, ema_f)], 1.0 - d)
        if self._other_idx:  # integer buffers (num_batches_tracked): copied
            ema_o = [ema[i] for i in self._other_idx]
            torch._foreach_copy_(ema_o, [_like(src[i], e) for i, e in zip(self._other_idx, ema_o)])
        self.num_updates += 1

    def _source_slots(self, model):
        # Walking model.parameters() costs ~0.5 ms per step for a ResNet-20 (more than the average
        # itself), so the walk is done once per model object and its tensors are looked up by name.
        ref, slots = self._source
        if ref is None or ref() is not model:
            slots = _tensor_slots(model)
            if len(slots) != len(self._slots):
                raise ValueError(f"EMA holds {len(self._slots)} parameters and buffers but the model has "
                                 f"{len(slots)}; pass the model the EMA was built from")
            self._source = (weakref.ref(model), slots)
        return slots

    def state_dict(self):
        return {"module": self.module.state_dict(), "num_updates": self.num_updates,
                "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state_dict):
        """Restore the averaged weights and the step count (the decay and warm-up flags stay as built)."""
        self.module.load_state_dict(state_dict["module"])
        self.num_updates = int(state_dict["num_updates"])
        if state_dict.get("decay", self.decay) != self.decay:
            log.info(f"EMA: checkpoint decay {state_dict['decay']} replaced by --ema_decay {self.decay}")


def _tensor_slots(module):
    """(dict, name) of every parameter, then every buffer, in parameters()/buffers() order. Reading
    dict[name] at update time sees a tensor that was replaced (buffers are, by module.to())."""
    slots, seen = [], set()
    for attr in ("_parameters", "_buffers"):
        for m in module.modules():
            dct = getattr(m, attr)
            for name, t in dct.items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    slots.append((dct, name))
    return slots


def _like(t, ref):
    return t if t.dtype == ref.dtype and t.device == ref.device else t.to(device=ref.device, dtype=ref.dtype)
