"""Time to accuracy: the default recipe against the earlier one (configs/reference_default.yaml), end to end.

Each run is a fresh process, `python train.py [--config FILE] --seed S`, timed from start to exit (what a user
waits for: imports, data, the --amp auto probe, training and evaluation), one after the other in the order
reference S, default S for each seed, so both see the same machine. Run it on an otherwise idle machine.
Writes bench_out/time_to_accuracy.csv (environment header, one row per run) and prints the means and the ratio
of mean wall times. Quiet 2-core AMD Zen 4: ~13 min for seeds 0 and 1.
    python benchmarks/time_to_accuracy.py [--seeds 0 1]
    python benchmarks/time_to_accuracy.py --quick     # smoke run: 1 epoch on 1,024 images, seconds
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from reporting.environment import describe, environment, write_csv  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.flags import BoolFlag  # noqa: E402

RECIPES = {"reference": ["--config", "configs/reference_default.yaml"], "default": []}
QUICK = ["--train_subset", "1024", "--eval_subset", "1024", "--epochs", "1"]


def run_once(recipe, seed, out_dir, extra):
    """One training in a fresh process; returns its row (accuracy from summary.json, wall time from here)."""
    cmd = [sys.executable, "train.py", *RECIPES[recipe], "--seed", str(seed), "--output_dir", out_dir, *extra]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{shlex.join(cmd[1:])} failed ({last}); run it alone to see why")
    with open(os.path.join(out_dir, "summary.json")) as f:
        s = json.load(f)
    shown = ["python", "train.py", *RECIPES[recipe], "--seed", str(seed), *extra]
    return {"recipe": recipe, "seed": seed, "epochs": s["epochs"], "test_acc": s["test_acc"],
            "wall_s": round(wall, 1), "train_s": round(s["train_seconds"], 1),
            "img_s": round(s["images_per_second"]), "amp": s.get("amp", ""),
            "amp_probe": json.dumps(s["amp_probe"]) if s.get("amp_probe") else "", "command": shlex.join(shown)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="bench_out/time_to_accuracy.csv")
    p.add_argument("--quick", action=BoolFlag, help="1 epoch on 1,024 images: checks the script, measures nothing")
    args = p.parse_args(argv)
    env = environment()
    print(f"# {describe(env)}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for recipe in RECIPES:  # reference first, then the default, seed by seed
                row = run_once(recipe, seed, os.path.join(tmp, f"{recipe}{seed}"), QUICK if args.quick else [])
                rows.append(row)
                print(f"{recipe} seed {seed}: {100 * row['test_acc']:.2f}% in {row['wall_s']:.1f} s "
                      f"({row['img_s']} img/s, amp {row['amp']})", flush=True)
                write_csv(args.out, rows, env)  # after every run: an interrupted call keeps what finished
    mean = {r: (statistics.fmean(x["test_acc"] for x in rows if x["recipe"] == r),
                statistics.fmean(x["wall_s"] for x in rows if x["recipe"] == r)) for r in RECIPES}
    for r, (acc, wall) in mean.items():
        print(f"{r}: mean {100 * acc:.2f}% in {wall:.1f} s")
    print(f"wall time ratio default / reference: {mean['default'][1] / mean['reference'][1]:.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
