"""CPU speed defaults by measurement: fp32 / bf16 autocast x NCHW / channels_last, fp32 with bf16 conv math
(--fp32_precision bf16), torch.compile, thread count.

train.py's `train_one_epoch` on fixed pre-gathered batches (as bench_loop.py); every variant at every --threads
setting, alternating round by round in one process; compile time reported apart. bf16 paid 2.2x+ on AMX
Xeons and on an AMD Zen 4 (AVX512-BF16, no AMX) but lost on an AVX512-BF16 Xeon, so the CPU's ISA goes in the
JSON's environment, next to what train.py's `--amp auto` probe picks here. Quiet 2-core machine: ~5-7 min (~3 of
it compiling on a cold Inductor cache, far less warm); --quick (resnet8, 2 steps, 1 round): ~1-2 min cold,
seconds with --no_compile.
    python benchmarks/bench_precision.py
    python benchmarks/bench_precision.py --quick
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import config  # noqa: E402
import train  # noqa: E402
from datasets import build_data  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from engine.precision import bf16_conv_math_active, choose_amp, make_precision, set_fp32_precision  # noqa: E402
from engine.scheduler import build_scheduler  # noqa: E402
from models import build_model  # noqa: E402
from reporting.environment import describe, environment, write_json  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.flags import BoolFlag

# name -> (amp, channels_last, compile, fp32 conv/matmul math, the train.py flags that select it)
VARIANTS = {
    "fp32 NCHW": (False, False, False, "ieee", "--no_channels_last"),
    "fp32 channels_last": (False, True, False, "ieee", "(default)"),
    "fp32 bf16-math channels_last": (False, True, False, "bf16", "--fp32_precision bf16"),
    "bf16 NCHW": (True, False, False, "ieee", "--amp --no_channels_last"),
    "bf16 channels_last": (True, True, False, "ieee", "--amp"),
    "compile fp32 channels_last": (False, True, True, "ieee", "--compile"),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet8,resnet20", help="comma list of registry names")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="steps per timed run")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--threads", default="1,2", help="comma list of torch.set_num_threads settings")
    p.add_argument("--compile", action=BoolFlag, default=True,
                   help="include the torch.compile variant (compiled once per model and thread setting)")
    p.add_argument("--quick", action=BoolFlag, help="smoke run: resnet8, 2 steps, 1 round")
    p.add_argument("--out", default="bench_out/precision.json")
    b = p.parse_args()
    if b.quick:
        b.models, b.steps, b.rounds = "resnet8", 2, 1
    threads = [int(t) for t in b.threads.split(",")]
    default_threads = torch.get_num_threads()  # train.py's without --threads
    env = environment()
    print(describe(env))
    variants = {k: v for k, v in VARIANTS.items() if b.compile or not v[2]}
    if not bf16_conv_math_active():  # --fp32_precision bf16 is refused where it would change nothing
        variants = {k: v for k, v in variants.items() if v[3] != "bf16"}

    args = config.parse_args(["--batch_size", str(b.batch_size), "--device", "cpu",
                              "--train_subset", str(b.batch_size * b.steps), "--no_progress"])
    data = build_data(args)
    batches = [(x.clone(), y.clone()) for x, y in data.train_loader][: b.steps]

    def make_run(model_name, amp, channels_last, compiled, math):
        torch.manual_seed(0)
        prec = make_precision(torch.device("cpu"), amp, "bf16", channels_last)
        m = build_model(model_name, data.num_classes, data.in_chans, data.img_size, data.mean, data.std)
        if channels_last:
            m.to(memory_format=torch.channels_last)
        # Inductor's CPU kernels bake in torch.get_num_threads() at compile time, so each thread setting
        # gets its own compiled model, compiled (on its warm-up pass) while that setting is active.
        step_model = torch.compile(m) if compiled else m
        opt = build_optimizer(m, args, args.lr)
        sched, scaler = build_scheduler(opt, args, len(batches)), prec.scaler()

        def run():  # the math setting is process-wide: each variant sets its own before it runs
            set_fp32_precision(torch.device("cpu"), math)
            train.train_one_epoch(step_model, batches, opt, sched, train.make_criterion(), scaler, prec, 0)
        return run

    rows, compile_seconds = [], {}
    for model_name in b.models.split(","):
        runs = {(name, t): make_run(model_name, *v[:4]) for t in threads for name, v in variants.items()}
        first = {}
        for (name, t), run in runs.items():  # warm-up (and compile): oneDNN primitives, Inductor kernels
            torch.set_num_threads(t)
            t0 = time.perf_counter()
            run()
            first[(name, t)] = time.perf_counter() - t0
            if variants[name][2]:
                run()  # a second pass in case the first one's graphs get recompiled
        times = {key: [] for key in runs}
        for _ in range(b.rounds):
            for (name, t), run in runs.items():
                torch.set_num_threads(t)
                t0 = time.perf_counter()
                run()
                times[(name, t)].append(time.perf_counter() - t0)
        for (name, t), ts in times.items():
            med = statistics.median(ts)
            if variants[name][2]:
                compile_seconds[f"{model_name}, threads={t}"] = first[(name, t)] - med
            rows.append({"model": model_name, "variant": name, "threads": t,
                         "images_per_second": b.steps * b.batch_size / med, "step_ms": 1000 * med / b.steps,
                         "train_py_flags": f"{variants[name][4]} --threads {t}".replace("(default) ", "")})

    fastest = {}
    print("| model | variant | threads | img/s | ms/step | vs fp32 NCHW | train.py flags |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(q for q in rows if q["model"] == r["model"] and q["threads"] == r["threads"]
                    and q["variant"] == "fp32 NCHW")
        r["speedup_vs_fp32_nchw"] = r["images_per_second"] / base["images_per_second"]
        print(f"| {r['model']} | {r['variant']} | {r['threads']} | {r['images_per_second']:.0f} | "
              f"{r['step_ms']:.1f} | {r['speedup_vs_fp32_nchw']:.2f}x | {r['train_py_flags']} |")
        if r["images_per_second"] > fastest.get(r["model"], {"images_per_second": 0})["images_per_second"]:
            fastest[r["model"]] = r
    print()
    for key, s in compile_seconds.items():
        print(f"compile, one-off (first pass minus a steady pass), {key}: {s:.1f} s")
    once = {m: ", plus {:.0f} s compiling once".format(compile_seconds[f"{m}, threads={r['threads']}"])
            for m, r in fastest.items() if variants[r["variant"]][2]}
    print("fastest: " + "; ".join(f"{m}: {r['variant']}, threads={r['threads']}, {r['images_per_second']:.0f} img/s "
                                    f"({r['train_py_flags']}{once.get(m, '')})" for m, r in fastest.items()))
    torch.set_num_threads(default_threads)
    set_fp32_precision(torch.device("cpu"), "ieee")
    amp_auto = {}
    for model_name in b.models.split(","):  # what train.py --amp auto picks here (channels_last, as the default)
        torch.manual_seed(0)
        m = build_model(model_name, data.num_classes, data.in_chans, data.img_size, data.mean, data.std)
        prec, line = choose_amp(make_precision(torch.device("cpu"), "auto", "auto", True),
                                m.to(memory_format=torch.channels_last), data.in_chans, data.img_size,
                                b.batch_size)
        print(f"{model_name}, threads={default_threads}: {line}")
        amp_auto[model_name] = {"amp": prec.mode, "threads": default_threads, **(prec.probe or {})}
    result = {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "batch_size": b.batch_size,
              "steps": b.steps, "rounds": b.rounds, "threads": threads, "rows": rows,
              "compile_seconds": compile_seconds, "amp_auto": amp_auto,
              "fastest": {m: {k: r[k] for k in ("variant", "threads", "images_per_second", "train_py_flags")}
                          for m, r in fastest.items()}}
    write_json(b.out, result, env)


if __name__ == "__main__":
    run_cli(main)  # bad input: one "error: ..." line, exit code 2
