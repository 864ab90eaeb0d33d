"""--ensemble's premise: N training processes with T/N threads each against one process with T threads.

Each configuration starts its worker processes (train.py's `train_one_epoch` on fixed in-memory batches, as
bench_loop.py); every worker warms up, waits for a common start signal, then times --steps steps. Aggregate
throughput = all workers' images / (last end - first start). The configurations alternate for --rounds rounds
(noisy machine). ~3-4 min on a quiet 2-core machine with the defaults.
    python benchmarks/bench_ensemble.py                       # airnet_m, batch 128, bf16 autocast
    python benchmarks/bench_ensemble.py --no_amp --model resnet20
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from utils.flags import BoolFlag  # noqa: E402


def worker(b):
    """One process: build, warm up, signal ready, wait for the start file, time the steps, print JSON."""
    import torch

    import config
    import train
    from datasets import build_data
    from engine.optim import build_optimizer
    from engine.precision import make_precision
    from engine.scheduler import build_scheduler
    from models import build_model

    torch.set_num_threads(b.threads)
    args = config.parse_args(["--batch_size", str(b.batch_size), "--device", "cpu", "--no_progress",
                              "--train_subset", str(b.batch_size * b.steps), "--seed", str(b.index)])
    data = build_data(args)
    batches = [(x.clone(), y.clone()) for x, y in data.train_loader][: b.steps]
    prec = make_precision(torch.device("cpu"), b.amp, "bf16", True)
    m = build_model(b.model, data.num_classes, data.in_chans, data.img_size, data.mean, data.std)
    m.to(memory_format=torch.channels_last)
    opt = build_optimizer(m, args, args.lr)
    sched, scaler = build_scheduler(opt, args, len(batches)), prec.scaler()

    def run():
        train.train_one_epoch(m, batches, opt, sched, train.make_criterion(), scaler, prec, 0)

    run()  # warm-up: oneDNN primitives, allocator
    open(os.path.join(b.sync, f"ready{b.index}"), "w").close()
    while not os.path.exists(os.path.join(b.sync, "go")):
        time.sleep(0.01)
    t0 = time.time()
    run()
    print(json.dumps({"start": t0, "end": time.time(), "images": len(batches) * b.batch_size}))


def run_config(b, n, threads):
    """n concurrent workers of `threads` threads each: aggregate images/s."""
    with tempfile.TemporaryDirectory() as sync:
        cmd = [sys.executable, HERE, "--worker", "--sync", sync, "--threads", str(threads), "--model", b.model,
               "--batch_size", str(b.batch_size), "--steps", str(b.steps), "--amp" if b.amp else "--no_amp"]
        procs = [subprocess.Popen([*cmd, "--index", str(i)], stdout=subprocess.PIPE, text=True) for i in range(n)]
        while not all(os.path.exists(os.path.join(sync, f"ready{i}")) for i in range(n)):
            if any(p.poll() not in (None, 0) for p in procs):
                raise SystemExit("a benchmark worker failed; run it alone to see its error")
            time.sleep(0.05)
        open(os.path.join(sync, "go"), "w").close()
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    seconds = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    return sum(o["images"] for o in outs) / seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="airnet_m")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per worker")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--threads", type=int, default=2, help="the machine's threads, shared by the workers")
    p.add_argument("--members", default="1,2", help="comma list of worker counts to compare")
    p.add_argument("--amp", action=BoolFlag, default=True,
                   help="bf16 autocast, fixed for every worker (no auto: workers probing alone could disagree; "
                        "bench_precision.py shows what train.py's --amp auto picks here)")
    p.add_argument("--out", default="bench_out/ensemble.json")
    p.add_argument("--worker", action=BoolFlag, help=argparse.SUPPRESS)
    p.add_argument("--sync", help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    b = p.parse_args()
    if b.worker:
        return worker(b)
    from reporting.environment import describe, environment, write_json
    env = {**environment(), "threads": b.threads}  # the threads the workers share, not this process's
    print(describe(env))
    counts = [int(n) for n in b.members.split(",")]
    speeds = {n: [] for n in counts}
    for _ in range(b.rounds):
        for n in counts:
            speeds[n].append(run_config(b, n, max(1, b.threads // n)))
    base = statistics.median(speeds[counts[0]])
    rows = []
    print(f"{b.model}, batch {b.batch_size}, {'bf16 autocast' if b.amp else 'fp32'}, channels_last, "
          f"{b.threads} threads in all, {b.steps} steps x {b.rounds} rounds")
    print("| processes | threads each | aggregate img/s (median) | per process | vs first row | rounds |")
    print("|---|---|---|---|---|---|")
    for n in counts:
        med = statistics.median(speeds[n])
        rows.append({"processes": n, "threads_each": max(1, b.threads // n), "images_per_second": med,
                     "per_process": med / n, "vs_first": med / base, "rounds": speeds[n]})
        print(f"| {n} | {max(1, b.threads // n)} | {med:.0f} | {med / n:.0f} | {med / base:.2f}x | "
              + ", ".join(f"{s:.0f}" for s in speeds[n]) + " |")
    write_json(b.out, {"model": b.model, "batch_size": b.batch_size, "amp": b.amp, "threads": b.threads,
                       "steps": b.steps, "rows": rows}, env)
    print(f"wrote {b.out}")


if __name__ == "__main__":
    main()
