"""Data-path cost: in-memory uint8 batches + vectorised batch augmentation vs per-sample DataLoader paths.

Each path runs epochs over the same Fashion-MNIST subset (batches made float on the CPU as the loop does); the
resnet20 train step runs on fixed pre-gathered batches (as bench_loop.py); all alternate round by round, and
the data share is data / (data + step) per batch (target <= 5% on the fast path). Quiet 2-core machine: ~2 min.
    python benchmarks/bench_data.py
    python benchmarks/bench_data.py --quick      # smoke run, seconds
"""
import argparse
import os
import statistics
import sys

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timing import time_alternately  # noqa: E402  (benchmarks/timing.py, next to this script)

import config  # noqa: E402
import train  # noqa: E402
from datasets import build_data  # noqa: E402
from datasets.loader import InMemoryLoader, make_file_loader  # noqa: E402
from datasets.transforms import build_batch_augment, build_train_transform, seed_worker  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from engine.precision import make_precision  # noqa: E402
from engine.scheduler import build_scheduler  # noqa: E402
from models import build_model  # noqa: E402
from reporting.environment import describe, environment, write_json  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.flags import BoolFlag


class PILDataset(Dataset):
    """The seed-style path: each item goes uint8 array -> PIL image -> torchvision transforms (float out)."""

    def __init__(self, images, labels, transform):
        self.images = images.permute(0, 2, 3, 1).squeeze(3).contiguous().numpy()  # (N, H, W) grey or (N, H, W, 3)
        self.labels, self.transform = labels.tolist(), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


class Uint8Dataset(Dataset):
    """What file datasets hand the per-sample v2 transform: a uint8 CHW tensor (minus the file decoding)."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels.tolist(), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def consume(loader, prec):
    """Iterate one epoch as the loop does; uint8 batches become float pixels, float ones only change layout."""
    for x, _ in loader:
        if x.dtype == torch.uint8:
            prec.to_input(x)
        else:
            x.contiguous(memory_format=torch.channels_last)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", help="model whose training step the data time is set against")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--batches", type=int, default=40, help="batches per epoch of every data path")
    p.add_argument("--steps", type=int, default=10, help="training steps per timed step run")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    p.add_argument("--workers", default="0,2", help="comma list of DataLoader worker counts (per-sample paths)")
    p.add_argument("--crop_padding", type=int, default=2)
    p.add_argument("--hflip", type=float, default=0.5)
    p.add_argument("--quick", action=BoolFlag, help="smoke run: 4 batches, 2 steps, 2 rounds")
    p.add_argument("--out", default="bench_out/data.json")
    b = p.parse_args()
    if b.quick:
        b.batches, b.steps, b.rounds = 4, 2, 2
    workers = [int(w) for w in b.workers.split(",")]
    env = environment()
    print(describe(env))
    torch.manual_seed(0)

    aug = ["--crop_padding", str(b.crop_padding), "--hflip", str(b.hflip)]
    args = config.parse_args(["--model", b.model, "--batch_size", str(b.batch_size), "--device", "cpu",
                              "--train_subset", str(b.batch_size * b.batches), "--no_progress", *aug])
    imgaug_args = config.parse_args([*aug, "--aug_backend", "imgaug", "--imgaug_preset", "seed"])
    data = build_data(args)
    images, labels, c = data.train_images, data.train_labels, data.in_chans
    prec = make_precision(torch.device("cpu"), False, "auto", True)  # fp32 channels_last

    def in_memory(batch_aug):
        return InMemoryLoader(images, labels, b.batch_size, shuffle=True, seed=0, drop_last=True, batch_aug=batch_aug)

    pil_tf = T.Compose([T.RandomCrop(data.img_size, padding=b.crop_padding), T.RandomHorizontalFlip(b.hflip),
                        T.ToTensor(), T.Normalize(data.mean, data.std)])
    paths = {"in-memory, no aug (floor)": in_memory(None),
             "in-memory + batch aug (fast path)": in_memory(build_batch_augment(args, c)),
             "in-memory + imgaug seed preset": in_memory(build_batch_augment(imgaug_args, c))}
    for w in workers:
        # persistent workers: steady-state throughput, without the per-epoch worker start-up
        paths[f"PIL per sample (seed-style), workers {w}"] = DataLoader(
            PILDataset(images, labels, pil_tf), b.batch_size, shuffle=True, drop_last=True, num_workers=w,
            persistent_workers=w > 0)
    for w in workers:
        paths[f"v2 per sample on uint8 (file datasets), workers {w}"] = make_file_loader(
            Uint8Dataset(images, labels, build_train_transform(args, c)), b.batch_size, shuffle=True, seed=0,
            drop_last=True, workers=w, worker_init_fn=seed_worker)

    # The step: train.py's train_one_epoch on fixed pre-gathered batches, so no data work is inside it.
    model = build_model(b.model, data.num_classes, c, data.img_size, data.mean, data.std)
    model.to(memory_format=torch.channels_last)
    batches = [(x.clone(), y.clone()) for x, y in in_memory(None)][: b.steps]
    opt = build_optimizer(model, args, args.lr)
    sched, scaler = build_scheduler(opt, args, len(batches)), prec.scaler()
    runs = {"train step": lambda: train.train_one_epoch(model, batches, opt, sched, train.make_criterion(),
                                                        scaler, prec, 0)}
    runs.update({name: (lambda ld=ld: consume(ld, prec)) for name, ld in paths.items()})

    times = time_alternately(runs, b.rounds)

    # Serial model: data time adds to step time. Worker paths are timed with the cores to themselves; in
    # training they would overlap the step but compete with it for the same (here: 2) cores.
    step_s = statistics.median(times.pop("train step")) / len(batches)
    rows = []
    for name, ts in times.items():
        data_s = statistics.median(ts) / len(paths[name])
        rows.append({"path": name, "images_per_second": b.batch_size / data_s, "data_ms_per_batch": 1000 * data_s,
                     "data_share": data_s / (data_s + step_s)})
    fast = next(r for r in rows if "fast path" in r["path"])
    result = {"model": b.model, "batch_size": b.batch_size, "batches": b.batches, "steps": len(batches),
              "rounds": b.rounds, "augmentation": " ".join(aug), "threads": torch.get_num_threads(),
              "step": {"precision": "fp32 channels_last", "ms_per_batch": 1000 * step_s,
                       "images_per_second": b.batch_size / step_s},
              "fast_path_data_share": fast["data_share"], "target_met": fast["data_share"] <= 0.05, "rows": rows}
    print("| data path | img/s (data only) | ms/batch | data / (data + step) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['images_per_second']:.0f} | {r['data_ms_per_batch']:.2f} | "
              f"{100 * r['data_share']:.1f}% |")
    print(f"\nstep ({b.model}, batch {b.batch_size}, fp32 channels_last): {1000 * step_s:.1f} ms/batch, "
          f"{b.batch_size / step_s:.0f} img/s")
    print(f"fast path data share: {100 * fast['data_share']:.1f}% "
          f"(target <= 5%: {'met' if result['target_met'] else 'NOT met'})")
    write_json(b.out, result, env)


if __name__ == "__main__":
    run_cli(main)  # bad input: one "error: ..." line, exit code 2
