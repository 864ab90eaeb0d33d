"""Loop efficiency and per-trick overhead: train.py's `train_one_epoch` against a bare PyTorch loop.

Both see the same model, batch and in-memory Fashion-MNIST batches; variants are timed alternately,
round after round, because these machines are noisy. Prints a table and writes JSON (with the environment).
    python benchmarks/bench_loop.py --model resnet20 --steps 20 --rounds 3 --out bench_out/loop.json
"""
import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timing import time_alternately  # noqa: E402  (benchmarks/timing.py, next to this script)

import config  # noqa: E402
import train  # noqa: E402
from datasets import build_data  # noqa: E402
from engine.loop import StepTricks  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from engine.precision import choose_amp, make_precision  # noqa: E402
from engine.scheduler import build_scheduler  # noqa: E402
from models import build_model  # noqa: E402
from reporting.environment import describe, environment, write_json  # noqa: E402
from tricks.adversarial import build_attack  # noqa: E402
from tricks.awp import AWP  # noqa: E402
from tricks.ema import ModelEMA  # noqa: E402
from tricks.kd import DistillationLoss  # noqa: E402
from tricks.lookahead import Lookahead  # noqa: E402
from tricks.mix import build_mixer  # noqa: E402
from tricks.prog_resize import check_any_size  # noqa: E402
from tricks.sam import SAM  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.flags import BoolAutoFlag, BoolFlag


class FixedBatches:
    """The same pre-gathered uint8 batches every pass: isolates the step from the data path."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def bare_loop(model, batches, optimizer, sched, prec, scaler):
    """The minimal hand-written loop train.py is compared with."""
    model.train()
    for x, y in batches:
        x = x.contiguous(memory_format=torch.channels_last) if prec.channels_last else x
        x = x.float().div_(255)
        optimizer.zero_grad(set_to_none=True)
        with prec.autocast():
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sched.step()
        loss.item()


TRICKS = ("ema", "lookahead k5", "muon", "lion", "mixup", "cutmix", "drop_path 0.1", "se", "cbam", "eca", "ca", "fgsm",
          "pgd-3", "awp", "sam", "kd teacher resnet56", "prog_resize 16 px", "prog_resize 20 px", "prog_resize 24 px")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="steps per timed run")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--amp", action=BoolAutoFlag, default=False,
                   help="bf16 autocast (train.py's --amp, auto included; off by default, as in train.py)")
    p.add_argument("--channels_last", action=BoolFlag, default=True)
    p.add_argument("--tricks", default="all", help="comma list of tricks to time, or 'none' / 'all'")
    p.add_argument("--out", default="bench_out/loop.json")
    b = p.parse_args(argv)
    if b.tricks in ("none", "all"):
        names = list(TRICKS) if b.tricks == "all" else []
    else:
        names = [t.strip() for t in b.tricks.split(",")]
    unknown = [t for t in names if t not in TRICKS]
    if unknown:  # before loading any data
        p.error(f"unknown --tricks {', '.join(unknown)}; choose from: {', '.join(TRICKS)}, or none / all")
    env = environment()
    print(describe(env))

    args = config.parse_args(["--model", b.model, "--batch_size", str(b.batch_size), "--device", "cpu",
                              "--train_subset", str(b.batch_size * b.steps), "--no_progress"])
    data = build_data(args)
    batches = FixedBatches([(x.clone(), y.clone()) for x, y in data.train_loader][: b.steps])
    prec = make_precision(torch.device("cpu"), b.amp, "auto", b.channels_last)

    def fresh(opt_args=args, **model_kw):
        torch.manual_seed(0)
        m = build_model(b.model, data.num_classes, data.in_chans, data.img_size, data.mean, data.std, **model_kw)
        if prec.channels_last:
            m.to(memory_format=torch.channels_last)
        opt = build_optimizer(m, opt_args, opt_args.lr)
        return m, opt, build_scheduler(opt, opt_args, len(batches)), prec.scaler()

    prec, amp_line = choose_amp(prec, fresh()[0], data.in_chans, data.img_size, b.batch_size)  # --amp auto
    if amp_line:
        print(amp_line)

    def loop_variant(model_kw=None, opt_name=None, **tricks):  # opt_name: another --opt
        opt_args = argparse.Namespace(**{**vars(args), "opt": opt_name}) if opt_name else args
        m, opt, sched, scaler = fresh(opt_args, **(model_kw or {}))
        extra = {k: v(m) if callable(v) and k in ("ema", "perturb_weights", "lookahead") else v
                 for k, v in tricks.items()}
        crit = extra.pop("criterion", train.make_criterion())
        step_tricks = StepTricks(attack_loss=train.make_criterion(), **extra)
        return lambda: train.train_one_epoch(m, batches, opt, sched, crit, scaler, prec, 0, step_tricks)

    def bare_variant():
        m, opt, sched, scaler = fresh()
        return lambda: bare_loop(m, batches, opt, sched, prec, scaler)

    def mix_args(**kw):
        return build_mixer(config.parse_args([f"--{k}={v}" for k, v in kw.items()]), data.num_classes)

    def attack(kind, steps=1):
        return build_attack(config.parse_args(["--adv", kind, "--adv_eps", "0.1", "--adv_steps", str(steps)]))

    def resized(side):  # --prog_resize's steps at `side` px (a step on smaller images: a ratio below 1)
        check_any_size(fresh()[0], side, data.img_size, data.in_chans, torch.device("cpu"), b.model)
        return loop_variant(side=side)

    teacher = build_model("resnet56", data.num_classes, data.in_chans, data.img_size, data.mean, data.std).eval()
    if prec.channels_last:
        teacher.to(memory_format=torch.channels_last)
    variants = {"bare loop": bare_variant, "train.py (no tricks)": lambda: loop_variant()}
    tricks = {
        "ema": lambda: loop_variant(ema=lambda m: ModelEMA(m, 0.999)),
        "lookahead k5": lambda: loop_variant(lookahead=lambda m: Lookahead(m, 5, 0.5)),
        "muon": lambda: loop_variant(opt_name="muon"),
        "lion": lambda: loop_variant(opt_name="lion"),
        "mixup": lambda: loop_variant(mix=mix_args(mixup_alpha=0.2)),
        "cutmix": lambda: loop_variant(mix=mix_args(cutmix_alpha=1.0)),
        "drop_path 0.1": lambda: loop_variant(model_kw={"drop_path_rate": 0.1}),
        "se": lambda: loop_variant(model_kw={"attention": "se"}),
        "cbam": lambda: loop_variant(model_kw={"attention": "cbam"}),
        "eca": lambda: loop_variant(model_kw={"attention": "eca"}),
        "ca": lambda: loop_variant(model_kw={"attention": "ca"}),
        "fgsm": lambda: loop_variant(attack=attack("fgsm")),
        "pgd-3": lambda: loop_variant(attack=attack("pgd", 3)),
        "awp": lambda: loop_variant(perturb_weights=lambda m: AWP(m, 0.005)),
        "sam": lambda: loop_variant(opt_name="sam", perturb_weights=lambda m: SAM(m, 0.05)),
        "kd teacher resnet56": lambda: loop_variant(teacher=teacher, criterion=DistillationLoss(4.0, 0.5, 0.0)),
        "prog_resize 16 px": lambda: resized(16),
        "prog_resize 20 px": lambda: resized(20),
        "prog_resize 24 px": lambda: resized(24),
    }
    assert tuple(tricks) == TRICKS
    variants.update({k: tricks[k] for k in names})

    runs = {}
    for name, make in variants.items():
        try:
            runs[name] = make()
        except UserError as e:  # e.g. attention or DropPath on a model without residual blocks
            if b.tricks != "all":
                p.error(f"{name} does not apply to --model {b.model}: {e}")
            print(f"skipped {name}: {e}")
    times = time_alternately(runs, b.rounds)

    n_img = b.steps * b.batch_size
    base = statistics.median(times["train.py (no tricks)"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": name, "images_per_second": n_img / med, "step_ms": 1000 * med / b.steps,
                     "ratio_to_train_py": med / base})
    bare = next(r for r in rows if r["variant"] == "bare loop")
    plain = next(r for r in rows if r["variant"] == "train.py (no tricks)")
    result = {"model": b.model, "batch_size": b.batch_size, "steps": b.steps, "rounds": b.rounds, "amp": prec.mode,
              "channels_last": b.channels_last, "threads": torch.get_num_threads(),
              "loop_efficiency": plain["images_per_second"] / bare["images_per_second"], "rows": rows}
    print("| variant | img/s | ms/step | time vs train.py step |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['images_per_second']:.0f} | {r['step_ms']:.1f} | {r['ratio_to_train_py']:.2f}x |")
    print(f"\nloop efficiency (train.py / bare): {result['loop_efficiency']:.3f}")
    write_json(b.out, result, env)


if __name__ == "__main__":
    run_cli(main)  # bad input: one "error: ..." line, exit code 2
