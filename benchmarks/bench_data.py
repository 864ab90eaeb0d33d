"""Data-path cost against the default model's train step: in-memory batches, and an image folder on disk.

The folder rows read what `train.py --dataset imagefolder --data_dir DIR --in_chans 1 --img_size 28` reads,
through build_data (decode, resize, the per-sample augmentation, DataLoader collate): a Fashion-MNIST subset
written once as grey PNG and JPEG (quality 90) at 28 px, and as JPEG at 64 px that the loader resizes to 28
(photos are rarely stored at training size), read with each --workers count and once more with
--cache_images ram (decoded at load time in as many threads as the largest --workers, then the in-memory
path); `setup_s` is the load (scan, decode check, cache) that build_data takes before the first batch,
timed once. The step is config.py's default
model, batch size and precision on pre-gathered batches. Each path runs alone (img/s; share of the step =
data / (data + step) per batch) and, for the folder and the default in-memory path, feeding the real step
(end to end: on a 2-core CPU, workers compete with the step's threads). All alternate round by round; each
epoch is timed without its first batch. Quiet 2-core machine: ~2 min.
    python benchmarks/bench_data.py
    python benchmarks/bench_data.py --quick      # smoke run, seconds
"""
import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timing import time_alternately  # noqa: E402  (benchmarks/timing.py, next to this script)

import config  # noqa: E402
from datasets import DataOptions, build_data  # noqa: E402
from datasets.loader import InMemoryLoader  # noqa: E402
from datasets.transforms import build_batch_augment  # noqa: E402
from engine.loop import make_criterion, train_one_epoch  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from engine.precision import choose_amp, make_precision, set_fp32_precision  # noqa: E402
from engine.scheduler import build_scheduler  # noqa: E402
from models import build_model  # noqa: E402
from reporting.environment import describe, environment, write_csv, write_json  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.flags import BoolFlag

FOLDERS = {"image folder, PNG 28 px": ("PNG", 28), "image folder, JPEG 28 px": ("JPEG", 28),
           "image folder, JPEG 64 px resized to 28": ("JPEG", 64)}  # name -> (format, stored side)
FAST_PATH = "in-memory + batch aug (fast path)"
CACHED = ", --cache_images ram"  # appended to a folder's name: its row read from the decoded cache
FAST_TARGET, FOLDER_TARGET = 0.05, 0.10  # data share of the step each path should stay within


class AfterFirstBatch:
    """A loader that times its epochs from the consumer's request for the second batch to the end: `per_batch`
    is the last epoch's seconds per batch, all but the first (the pipeline filling up: workers decode it before
    anything can overlap, once an epoch, and these epochs are short)."""

    def __init__(self, loader):
        self.loader, self.per_batch = loader, None

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        yield next(batches)
        t0, n = time.perf_counter(), 0
        for batch in batches:
            yield batch
            n += 1
        self.per_batch = (time.perf_counter() - t0) / n


def write_folder(root, images, labels, fmt, side):
    """uint8 N1HW images as grey files root/train/<label>/<i>.png|jpg of side x side pixels, and each class's
    first image again under root/val/ (train.py then validates on val/ and trains on all of train/)."""
    first = {}
    for i, (x, y) in enumerate(zip(images, labels.tolist())):
        img = Image.fromarray(x[0].numpy())
        if side != img.width:
            img = img.resize((side, side), Image.BILINEAR)
        for split in ("train", "val") if first.setdefault(y, i) == i else ("train",):
            folder = os.path.join(root, split, str(y))
            os.makedirs(folder, exist_ok=True)
            if fmt == "PNG":
                img.save(os.path.join(folder, f"{i}.png"))
            else:
                img.save(os.path.join(folder, f"{i}.jpg"), quality=90)
    return root


def consume(loader, prec):
    """Iterate one epoch as the loop does (uint8 batches become float pixels); seconds per batch after the first."""
    for x, *_ in loader:
        prec.to_input(x)
    return loader.per_batch


def main(argv=None):
    d = config.training_defaults()  # train.py's defaults: the step follows them when they change
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help="model whose training step the data time is set against")
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--batches", type=int, default=8, help="batches per epoch (the subset written to disk)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    p.add_argument("--workers", default="0,1,2", help="comma list of DataLoader worker counts (image folder)")
    p.add_argument("--crop_padding", type=int, default=2)
    p.add_argument("--hflip", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=d.threads, help="torch.set_num_threads (0 = torch default)")
    p.add_argument("--quick", action=BoolFlag, help="smoke run: 3 batches, 1 round")
    p.add_argument("--out", default="bench_out/data.json", help="JSON results; CSV rows go beside it (.csv)")
    b = p.parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_data.py", *(sys.argv[1:] if argv is None else argv)])
    if b.quick:
        b.batches, b.rounds = 3, 1
    workers = [int(w) for w in b.workers.split(",")]
    if b.threads > 0:
        torch.set_num_threads(b.threads)
    env = environment()
    print(describe(env))
    torch.manual_seed(0)

    common = ["--batch_size", str(b.batch_size), "--device", "cpu", "--no_progress",
              "--crop_padding", str(b.crop_padding), "--hflip", str(b.hflip)]
    args = config.parse_args([*common, "--model", b.model, "--train_subset", str(b.batch_size * b.batches)])
    imgaug_args = config.parse_args([*common, "--aug_backend", "imgaug", "--imgaug_preset", "seed"])
    data = build_data(args)
    images, labels, c = data.train_images, data.train_labels, data.in_chans

    def in_memory(batch_aug):
        return InMemoryLoader(images, labels, b.batch_size, shuffle=True, seed=0, drop_last=True, batch_aug=batch_aug)

    setup_s = {}

    def folder(key, root, w, cache="none"):  # train.py's training loader for this folder, --workers w, the cache
        a = config.parse_args([*common, "--dataset", "imagefolder", "--data_dir", root, "--in_chans", str(c),
                               "--img_size", str(data.img_size), "--workers", str(w), "--cache_images", cache])
        t0 = time.perf_counter()
        loader = build_data(config.options(DataOptions, a, with_index=False)).train_loader
        setup_s[key] = time.perf_counter() - t0
        return loader

    # The step as train.py runs it by default (fp32 channels_last today), on fixed pre-gathered batches.
    set_fp32_precision(torch.device("cpu"), d.fp32_precision)
    prec = make_precision(torch.device("cpu"), d.amp, d.amp_dtype, d.channels_last)
    model = build_model(b.model, data.num_classes, c, data.img_size, data.mean, data.std)
    if prec.channels_last:
        model.to(memory_format=torch.channels_last)
    prec, amp_line = choose_amp(prec, model, c, data.img_size, b.batch_size)  # if --amp auto
    if amp_line:
        print(amp_line)
    opt = build_optimizer(model, args, args.lr)
    sched, scaler, criterion = build_scheduler(opt, args, b.batches), prec.scaler(), make_criterion()

    def train_epoch(loader):
        train_one_epoch(model, loader, opt, sched, criterion, scaler, prec, 0)
        return loader.per_batch

    with tempfile.TemporaryDirectory() as tmp:
        paths = {("in-memory, no aug (floor)", None): in_memory(None),
                 (FAST_PATH, None): in_memory(build_batch_augment(args, c)),
                 ("in-memory + imgaug seed preset", None): in_memory(build_batch_augment(imgaug_args, c))}
        for name, (fmt, side) in FOLDERS.items():
            root = write_folder(os.path.join(tmp, f"{fmt}{side}"), images, labels, fmt, side)
            paths.update({(name, w): folder((name, w), root, w) for w in workers})
            paths[(name + CACHED, max(workers))] = folder((name + CACHED, max(workers)), root, max(workers), "ram")
        paths = {key: AfterFirstBatch(loader) for key, loader in paths.items()}
        fixed = AfterFirstBatch([(x.clone(), y.clone()) for x, y in in_memory(None)])
        runs = {"step": lambda: train_epoch(fixed)}
        for (name, w), loader in paths.items():
            runs[(name, w)] = lambda ld=loader: consume(ld, prec)
            if w is not None or name == FAST_PATH or name.endswith(CACHED):
                runs[(name, w, "end to end")] = lambda ld=loader: train_epoch(ld)
        # seconds per batch of each round; persistent workers start once, in the warm-up epoch
        per_batch = {key: statistics.median(ts) for key, ts in time_alternately(runs, b.rounds).items()}

    step_s = per_batch.pop("step")
    rows = []
    for name, w in paths:
        data_s, e2e_s = per_batch[(name, w)], per_batch.get((name, w, "end to end"))
        rows.append({"path": name, "workers": w, "images_per_second": b.batch_size / data_s,
                     "data_ms_per_batch": 1000 * data_s, "data_share": data_s / (data_s + step_s),
                     "end_to_end_images_per_second": None if e2e_s is None else b.batch_size / e2e_s,
                     "end_to_end_vs_step": None if e2e_s is None else e2e_s / step_s,
                     "setup_s": setup_s.get((name, w))})
    advice = {}
    for name in FOLDERS:
        own = [r for r in rows if r["path"] == name]
        within = [r["workers"] for r in own if r["data_share"] <= FOLDER_TARGET]
        advice[name] = {"fewest_workers_within_target": min(within) if within else None,
                        "fastest_end_to_end_workers": max(own, key=lambda r: r["end_to_end_images_per_second"])[
                            "workers"]}
    fast = next(r for r in rows if r["path"] == FAST_PATH)
    result = {"model": b.model, "batch_size": b.batch_size, "batches": b.batches, "rounds": b.rounds,
              "augmentation": f"--crop_padding {b.crop_padding} --hflip {b.hflip}", "threads": torch.get_num_threads(),
              "step": {"precision": f"{'bf16 autocast' if prec.enabled else 'fp32'}"
                                    f"{' channels_last' if prec.channels_last else ''}",
                       "ms_per_batch": 1000 * step_s, "images_per_second": b.batch_size / step_s},
              "fast_path_data_share": fast["data_share"], "target_met": fast["data_share"] <= FAST_TARGET,
              "folder_target": FOLDER_TARGET, "folder_advice": advice, "command": command, "rows": rows}

    print_report(result)
    write_json(b.out, result, env)
    write_csv(os.path.splitext(b.out)[0] + ".csv", csv_rows(result, env), env)


def print_report(res):
    def cell(v, fmt):
        return "—" if v is None else format(v, fmt)
    print("| data path | workers | img/s (data only) | ms/batch | data / (data + step) | end to end img/s | "
          "end to end / step | setup s |\n|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['path']} | {cell(r['workers'], 'd')} | {r['images_per_second']:.0f} | "
              f"{r['data_ms_per_batch']:.2f} | {100 * r['data_share']:.1f}% | "
              f"{cell(r['end_to_end_images_per_second'], '.0f')} | {cell(r['end_to_end_vs_step'], '.2f')} | "
              f"{cell(r['setup_s'], '.2f')} |")
    step = res["step"]
    print(f"\nstep ({res['model']}, batch {res['batch_size']}, {step['precision']}): {step['ms_per_batch']:.1f} "
          f"ms/batch, {step['images_per_second']:.0f} img/s")
    print(f"fast path data share: {100 * res['fast_path_data_share']:.1f}% "
          f"(target <= {FAST_TARGET:.0%}: {'met' if res['target_met'] else 'NOT met'})")
    for name, a in res["folder_advice"].items():
        within = a["fewest_workers_within_target"]
        print(f"{name}: data <= {FOLDER_TARGET:.0%} of the step from --workers "
              f"{'(none measured)' if within is None else within}; fastest end to end: --workers "
              f"{a['fastest_end_to_end_workers']}")


def csv_rows(res, env):
    """One row per data path, in the columns of docs/results/speed_data.csv (raw numbers, shares as fractions)."""
    cpu = f"{env['cpu_model']} ({env['isa'] or 'no AVX2'})"
    return [{"data_path": r["path"], "workers": r["workers"], "img_s": r["images_per_second"],
             "share_of_step": r["data_share"], "end_to_end_img_s": r["end_to_end_images_per_second"],
             "end_to_end_vs_step": r["end_to_end_vs_step"], "setup_s": r["setup_s"], "model": res["model"],
             "batch": res["batch_size"],
             "step_img_s": res["step"]["images_per_second"], "cpu": cpu, "torch": env["torch"],
             "date": env["date"][:10], "commit": env["git_commit"], "command": res["command"]} for r in res["rows"]]

if __name__ == "__main__":
    run_cli(main)  # bad input: one "error: ..." line, exit code 2
