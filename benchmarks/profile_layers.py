"""Where a training step's time goes, convolution by convolution: forward and backward milliseconds and the
multiply-accumulate rate (GMAC/s) each one reaches, against the whole step, for one registry model.

Timed with module hooks around every nn.Conv2d inside train.py's `train_one_epoch` on fixed in-memory batches
(the same step as bench_loop.py), on the CPU only: it runs kernels synchronously, so each hook pair brackets
exactly that layer's work (CUDA would need a synchronisation per hook). A layer whose rate is far
below the others' is where a faster kernel or a different shape would pay.
    python benchmarks/profile_layers.py --model airnet_m --batch_size 128 --amp
"""
import argparse
import os
import sys
import time
import warnings
from collections import defaultdict

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import config  # noqa: E402
import train  # noqa: E402
from datasets import build_data  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from engine.precision import make_precision  # noqa: E402
from engine.scheduler import build_scheduler  # noqa: E402
from models import build_model  # noqa: E402
from reporting.environment import describe, environment, write_json  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.flags import BoolFlag


def conv_macs(conv, out_shape):
    """Multiply-accumulates of one forward pass of `conv` producing `out_shape` (N, C_out, H_out, W_out)."""
    n, c_out, h, w = out_shape
    kh, kw = conv.kernel_size
    return n * c_out * h * w * (conv.in_channels // conv.groups) * kh * kw


class ConvTimer:
    """Forward and backward wall time of every nn.Conv2d in a model, summed over the steps it sees."""

    def __init__(self, model):
        self.fwd, self.bwd = defaultdict(float), defaultdict(float)
        self.macs, self._t0 = {}, {}
        self.untimed_backward = set()  # layers whose input needs no gradient (the stem): reported as "—"
        self.handles = []
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                self.handles += [m.register_forward_pre_hook(self._start_forward(name)),
                                 m.register_forward_hook(self._stop_forward(name, m)),
                                 m.register_full_backward_pre_hook(self._start(name, "b")),
                                 m.register_full_backward_hook(self._stop_backward(name))]

    def _start(self, name, kind):
        def hook(*_):
            self._t0[(name, kind)] = time.perf_counter()
        return hook

    def _start_forward(self, name):
        def hook(_, inputs):
            if not inputs[0].requires_grad:  # then both backward hooks fire before its weight gradient runs
                self.untimed_backward.add(name)
            self._t0[(name, "f")] = time.perf_counter()
        return hook

    def _stop_forward(self, name, m):
        def hook(_, __, out):
            self.fwd[name] += time.perf_counter() - self._t0[(name, "f")]
            self.macs[name] = conv_macs(m, tuple(out.shape))
        return hook

    def _stop_backward(self, name):
        def hook(*_):
            self.bwd[name] += time.perf_counter() - self._t0[(name, "b")]
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="airnet_m")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one untimed warm-up pass)")
    p.add_argument("--amp", action=BoolFlag, default=False, help="bf16 autocast")
    p.add_argument("--channels_last", action=BoolFlag, default=True)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--out", default="bench_out/profile_layers.json")
    b = p.parse_args()
    if b.threads:
        torch.set_num_threads(b.threads)
    env = environment()
    print(describe(env))

    args = config.parse_args(["--model", b.model, "--batch_size", str(b.batch_size), "--device", "cpu",
                              "--train_subset", str(b.batch_size * b.steps), "--no_progress"])
    data = build_data(args)
    batches = [(x.clone(), y.clone()) for x, y in data.train_loader][: b.steps]
    torch.manual_seed(0)
    prec = make_precision(torch.device("cpu"), b.amp, "bf16", b.channels_last)
    model = build_model(b.model, data.num_classes, data.in_chans, data.img_size, data.mean, data.std)
    if b.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, args, args.lr)
    sched, scaler, crit = build_scheduler(opt, args, len(batches)), prec.scaler(), train.make_criterion()

    def epoch():
        train.train_one_epoch(model, batches, opt, sched, crit, scaler, prec, 0)

    epoch()  # warm-up: oneDNN primitive caches, allocator
    t0 = time.perf_counter()
    epoch()
    plain_s = time.perf_counter() - t0  # the same pass without hooks, for the hooks' own overhead
    timer = ConvTimer(model)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # "Full backward hook is firing when ... no inputs require gradients"
        warnings.filterwarnings("ignore", message="Full backward hook")
        epoch()
    step_s = (time.perf_counter() - t0) / len(batches)
    timer.remove()

    steps = len(batches)
    rows = []
    for name in timer.macs:
        fwd_s, bwd_s = timer.fwd[name] / steps, timer.bwd[name] / steps
        if name in timer.untimed_backward:
            bwd_s = 0.0
        macs = timer.macs[name]  # per forward pass; the backward does ~2x (input and weight gradients)
        rows.append({"layer": name, "gmacs_forward": macs / 1e9,
                     "forward_ms": 1000 * fwd_s, "backward_ms": 1000 * bwd_s,
                     "forward_gmac_per_s": macs / fwd_s / 1e9 if fwd_s else None,
                     "backward_gmac_per_s": 2 * macs / bwd_s / 1e9 if bwd_s else None,
                     "share_of_step": (fwd_s + bwd_s) / step_s})
    conv_share = sum(r["share_of_step"] for r in rows)
    print(f"{b.model}, batch {b.batch_size}, {'bf16 autocast' if b.amp else 'fp32'}, "
          f"{'channels_last' if b.channels_last else 'NCHW'}, {torch.get_num_threads()} threads: "
          f"step {1000 * step_s:.1f} ms with hooks, {1000 * plain_s / steps:.1f} ms without")
    print("| layer | GMAC fwd | fwd ms | bwd ms | fwd GMAC/s | bwd GMAC/s | share of step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rate = lambda v: "—" if v is None else f"{v:.0f}"  # noqa: E731
        print(f"| {r['layer']} | {r['gmacs_forward']:.3f} | {r['forward_ms']:.1f} | {r['backward_ms']:.1f} | "
              f"{rate(r['forward_gmac_per_s'])} | {rate(r['backward_gmac_per_s'])} | {100 * r['share_of_step']:.1f}% |")
    print(f"\nconvolutions: {100 * conv_share:.1f}% of the step (—: no backward timed; a frozen layer has none, and"
          " a first layer's weight gradient falls outside its hooks)")
    write_json(b.out, {"model": b.model, "batch_size": b.batch_size, "amp": b.amp, "channels_last": b.channels_last,
                       "threads": torch.get_num_threads(), "steps": steps, "step_ms": 1000 * step_s,
                       "step_ms_without_hooks": 1000 * plain_s / steps, "conv_share_of_step": conv_share,
                       "rows": rows}, env)
    print(f"-> {b.out}")


if __name__ == "__main__":
    run_cli(main)
