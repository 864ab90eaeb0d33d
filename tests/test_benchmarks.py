"""The benchmark scripts still run against today's train.py, their tables add up, and every file they write
carries the environment it was measured in (reporting/environment.py's header, with this torch).

Smallest settings only: these check that each script runs end to end and that its derived columns agree with
its raw ones (ratios, shares, images per second); the numbers themselves come from running the scripts.
"""
import json
import math
import os
import sys

import pytest
import torch
from conftest import ROOT, needs_fmnist, run_script
from PIL import Image

from reporting.environment import describe, environment


def _run(script, tmp_path, *args):
    out = tmp_path / "out.json"
    r = run_script([f"benchmarks/{script}", *args, "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    doc = _checked(out)
    assert r.stdout.splitlines()[0] == describe(doc["environment"])  # the environment line opens the output
    return doc["results"], r.stdout


def _checked(path):
    """A benchmark's JSON, after checking its environment header."""
    doc = json.loads(path.read_text())
    assert list(doc) == ["environment", "results"]
    env = doc["environment"]
    assert env["torch"] == torch.__version__ and env["isa"] == environment()["isa"] and "hostname" not in env
    return doc


@needs_fmnist
def test_bench_loop_every_trick(tmp_path):
    res, out = _run("bench_loop.py", tmp_path, "--model", "resnet8", "--batch_size", "8", "--steps", "2",
                    "--rounds", "1", "--no_amp")
    rows = {r["variant"]: r for r in res["rows"]}
    assert {"bare loop", "train.py (no tricks)", "ema", "lookahead k5", "muon", "lion", "mixup", "cutmix", "awp", "sam",
            "pgd-3", "kd teacher resnet56", "se", "cbam", "eca", "ca", "fgsm", "drop_path 0.1", "prog_resize 16 px",
            "prog_resize 20 px", "prog_resize 24 px"} == set(rows)
    assert rows["train.py (no tricks)"]["ratio_to_train_py"] == 1.0
    plain = rows["train.py (no tricks)"]
    for r in rows.values():
        # img/s and ms/step describe the same median time; the ratio is against the plain step's
        assert math.isclose(r["images_per_second"] * r["step_ms"] / 1000, 8, rel_tol=1e-9)
        assert math.isclose(r["ratio_to_train_py"], r["step_ms"] / plain["step_ms"], rel_tol=1e-9)
    assert math.isclose(res["loop_efficiency"],
                        plain["images_per_second"] / rows["bare loop"]["images_per_second"], rel_tol=1e-9)
    assert "loop efficiency (train.py / bare)" in out


@needs_fmnist
def test_bench_loop_skips_tricks_the_model_lacks_and_refuses_unknown_ones(tmp_path, capsys):
    res, out = _run("bench_loop.py", tmp_path, "--model", "airnet_s", "--batch_size", "8", "--steps", "2",
                    "--rounds", "1", "--tricks", "all")
    rows = {r["variant"] for r in res["rows"]}
    assert "ema" in rows and not rows & {"se", "cbam", "eca", "ca", "drop_path 0.1"}
    assert "skipped se: airnet_s takes no attention modules" in out
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_loop
    for tricks, fragment in (("plain", "unknown --tricks plain"), ("se", "se does not apply to --model airnet_s")):
        with pytest.raises(SystemExit) as exc:  # argparse's error: usage, then one error line, exit code 2
            bench_loop.main(["--model", "airnet_s", "--steps", "1", "--tricks", tricks, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and fragment in err[-1], err
    assert not (tmp_path / "x").exists()
    bench_loop.main(["--model", "airnet_s", "--batch_size", "8", "--steps", "2", "--rounds", "1", "--tricks", "none",
                     "--out", str(tmp_path / "none.json")])
    res = _checked(tmp_path / "none.json")["results"]
    assert {r["variant"] for r in res["rows"]} == {"bare loop", "train.py (no tricks)"}


@needs_fmnist
def test_bench_data_quick(tmp_path):
    """In-memory rows, and the image folder (PNG, JPEG, JPEG stored at 64 px) read by train.py's file loader
    with each --workers and from --cache_images ram, alone and feeding the step; the CSV beside the JSON holds
    the same rows."""
    import config
    from reporting.environment import read_csv
    res, out = _run("bench_data.py", tmp_path, "--quick", "--model", "resnet8", "--batch_size", "16",
                    "--threads", "1", "--workers", "0,1")
    folders = ["image folder, PNG 28 px", "image folder, JPEG 28 px", "image folder, JPEG 64 px resized to 28"]
    fast_path = "in-memory + batch aug (fast path)"
    assert [(r["path"], r["workers"]) for r in res["rows"]] == [
        ("in-memory, no aug (floor)", None), (fast_path, None), ("in-memory + imgaug seed preset", None),
        *((f + s, w) for f in folders for s, w in (("", 0), ("", 1), (", --cache_images ram", 1)))]
    d = config.training_defaults()
    amp = {False: ["fp32"], True: ["bf16 autocast"], "auto": ["fp32", "bf16 autocast"]}[d.amp]  # train.py's default
    assert res["step"]["precision"] in [a + " channels_last" * d.channels_last for a in amp]
    step_ms = res["step"]["ms_per_batch"]
    assert math.isclose(res["step"]["images_per_second"] * step_ms / 1000, 16, rel_tol=1e-9)
    for r in res["rows"]:
        assert r["images_per_second"] > 0 and 0 < r["data_share"] < 1
        assert math.isclose(r["data_share"], r["data_ms_per_batch"] / (r["data_ms_per_batch"] + step_ms),
                            rel_tol=1e-9)
        assert math.isclose(r["images_per_second"] * r["data_ms_per_batch"] / 1000, 16, rel_tol=1e-9)
        folder = r["path"].startswith("image folder")
        assert (r["setup_s"] > 0) if folder else r["setup_s"] is None  # the load before the first batch
        if r["workers"] is None and r["path"] != fast_path:
            assert r["end_to_end_images_per_second"] is None
        else:  # end to end: the loader feeding the real step
            assert r["end_to_end_images_per_second"] > 0
            assert math.isclose(r["end_to_end_vs_step"] * step_ms / 1000 * r["end_to_end_images_per_second"], 16,
                                rel_tol=1e-9)
    fast = next(r for r in res["rows"] if r["path"] == fast_path)
    assert res["fast_path_data_share"] == fast["data_share"]
    assert res["target_met"] == (fast["data_share"] <= 0.05)
    assert list(res["folder_advice"]) == folders
    for name, advice in res["folder_advice"].items():
        own = [r for r in res["rows"] if r["path"] == name]
        within = [r["workers"] for r in own if r["data_share"] <= res["folder_target"]]
        assert advice["fewest_workers_within_target"] == (min(within) if within else None)
        best = max(own, key=lambda r: r["end_to_end_images_per_second"])
        assert advice["fastest_end_to_end_workers"] == best["workers"]
        assert f"{name}: data <= 10% of the step from --workers" in out
    env, rows = read_csv(tmp_path / "out.csv")
    assert env == json.loads((tmp_path / "out.json").read_text())["environment"]
    assert len(rows) == len(res["rows"])
    for row, r in zip(rows, res["rows"]):
        assert row["data_path"] == r["path"] and row["workers"] == ("" if r["workers"] is None else str(r["workers"]))
        assert float(row["img_s"]) == r["images_per_second"] and float(row["share_of_step"]) == r["data_share"]
        assert row["torch"] == torch.__version__ and row["date"] == env["date"][:10] and env["isa"] in row["cpu"]
        assert row["command"] == res["command"] and row["command"].startswith("python benchmarks/bench_data.py --quick")


@needs_fmnist
def test_bench_data_folder_holds_the_subset(tmp_path):
    """The image folder bench_data.py times holds its Fashion-MNIST images under their labels, grey, at the size
    stored: PNG bit for bit; read back by the file loader at 28 px, each JPEG (also those stored at 64 px) is
    closer to its own original than to any other image of the subset."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_data import write_folder

    from datasets.fashion_mnist import load_fashion_mnist
    from datasets.files import load_image, read_imagefolder
    x, y = load_fashion_mnist("data")[:2]
    x, y = x[:40], y[:40]
    for fmt, side in (("PNG", 28), ("JPEG", 28), ("JPEG", 64)):
        splits = read_imagefolder(write_folder(str(tmp_path / f"{fmt}{side}"), x, y, fmt, side))
        paths, names = splits["train"]
        assert len(paths) == 40 and sorted(splits["val"][1]) == sorted({str(v) for v in y.tolist()})
        for path, name in zip(paths, names):
            i = int(os.path.splitext(os.path.basename(path))[0])
            assert name == str(int(y[i])) and path.endswith(".png" if fmt == "PNG" else ".jpg")
            with Image.open(path) as img:
                assert img.mode == "L" and img.size == (side, side)
            back = load_image(path, 1, 28)
            errors = (back.float() - x.float()).abs().mean((1, 2, 3))
            assert int(errors.argmin()) == i and (fmt != "PNG" or errors[i] == 0)


def test_time_alternately_takes_a_runs_own_seconds():
    """A run that returns a float has timed itself; any other run is timed whole, warm-up excluded."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from timing import time_alternately
    calls = []
    times = time_alternately({"own": lambda: calls.append("own") or 0.25, "whole": lambda: calls.append("whole")}, 2)
    assert calls == ["own", "whole"] * 3  # one warm-up round, then two timed ones, in turn
    assert times["own"] == [0.25, 0.25] and all(0 <= t < 1 for t in times["whole"])


@needs_fmnist
def test_bench_precision_quick(tmp_path):
    res, _ = _run("bench_precision.py", tmp_path, "--quick", "--no_compile", "--threads", "1", "--batch_size", "8")
    variants = {r["variant"] for r in res["rows"]}
    from engine.precision import bf16_conv_math_active
    bf16_math = {"fp32 bf16-math channels_last"} if bf16_conv_math_active() else set()
    assert variants == {"fp32 NCHW", "fp32 channels_last", "bf16 NCHW", "bf16 channels_last"} | bf16_math
    base = next(r for r in res["rows"] if r["variant"] == "fp32 NCHW")
    assert base["speedup_vs_fp32_nchw"] == 1.0
    for r in res["rows"]:
        assert math.isclose(r["speedup_vs_fp32_nchw"], r["images_per_second"] / base["images_per_second"],
                            rel_tol=1e-9)
        assert r["train_py_flags"].endswith("--threads 1")
    assert res["fastest"]["resnet8"]["images_per_second"] == max(r["images_per_second"] for r in res["rows"])


@needs_fmnist
def test_bench_ensemble_quick(tmp_path):
    res, out = _run("bench_ensemble.py", tmp_path, "--model", "resnet8", "--batch_size", "16", "--steps", "2",
                    "--rounds", "1", "--no_amp")
    rows = {r["processes"]: r for r in res["rows"]}
    assert set(rows) == {1, 2} and rows[1]["threads_each"] == 2 and rows[2]["threads_each"] == 1
    assert rows[1]["vs_first"] == 1.0
    for r in rows.values():
        assert r["images_per_second"] == r["rounds"][0] > 0
        assert math.isclose(r["per_process"], r["images_per_second"] / r["processes"], rel_tol=1e-9)
        assert math.isclose(r["vs_first"], r["images_per_second"] / rows[1]["images_per_second"], rel_tol=1e-9)


@needs_fmnist
def test_profile_layers_macs_match_flop_counter(tmp_path):
    """profile_layers.py's per-convolution multiply-accumulates (from its hooks' output shapes) add up to
    torch's own FlopCounterMode count of the model's convolutions (2 flops per MAC), and its rates and shares
    follow from its times."""
    from torch.utils.flop_counter import FlopCounterMode

    from models import build_model
    res, out = _run("profile_layers.py", tmp_path, "--model", "resnet8", "--batch_size", "8", "--steps", "2",
                    "--threads", "1")
    model = build_model("resnet8", 10, 1, 28, (0.286,), (0.353,))
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(8, 1, 28, 28))
    conv_flops = counter.get_flop_counts()["Global"][torch.ops.aten.convolution]
    assert math.isclose(sum(r["gmacs_forward"] for r in res["rows"]) * 1e9 * 2, conv_flops, rel_tol=1e-9)
    assert len(res["rows"]) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    # only the first convolution (its input is the image, which needs no gradient) has no backward timing
    assert [r["layer"] for r in res["rows"] if r["backward_gmac_per_s"] is None] == [res["rows"][0]["layer"]]
    for r in res["rows"]:
        assert math.isclose(r["forward_gmac_per_s"], r["gmacs_forward"] / r["forward_ms"] * 1000, rel_tol=1e-9)
        if r["backward_gmac_per_s"] is not None:
            assert math.isclose(r["backward_gmac_per_s"], 2 * r["gmacs_forward"] / r["backward_ms"] * 1000,
                                rel_tol=1e-9)
    assert math.isclose(res["conv_share_of_step"], sum(r["share_of_step"] for r in res["rows"]), rel_tol=1e-9)
    assert 0 < res["conv_share_of_step"] < 1 and "| layer |" in out
    assert res["threads"] == 1 and res["steps"] == 2  # --threads and --steps took effect
