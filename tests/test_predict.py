"""Tests for predict.py: the same top-1 as train.py --eval_only on the same images, train-form = deploy-form
(= ONNX) predictions, dataset mode, unreadable images, and the CSV layout. One tiny --acb model, trained once."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image

import config
import predict
import reparam_export
import train
from datasets.files import load_image
from engine.checkpoint import load_model
from utils.errors import UserError, run_cli

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def write_images(root, per_class, rng, mixed=0):
    """Noisy images of each colour; `mixed` more per class halfway to the next colour (hard to classify)."""
    colours = list(COLOURS.values())
    for c, (name, colour) in enumerate(COLOURS.items()):
        (root / name).mkdir(parents=True)
        for k in range(per_class + mixed):
            base = np.array(colour) if k < per_class else (np.array(colour) + colours[(c + 1) % 3]) / 2
            pixels = np.clip(base + rng.integers(-40, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{k}.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An imagefolder dataset (train/, val/), a 1-epoch resnet8 --acb run (a subprocess, as users run it),
    train.py --eval_only on the val split, and the deploy checkpoint and ONNX file of reparam_export.py."""
    tmp = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    write_images(tmp / "data" / "train", 12, rng)
    write_images(tmp / "data" / "val", 5, rng, mixed=2)
    data = ["--dataset", "imagefolder", "--data_dir", str(tmp / "data"), "--img_size", "32"]
    res = run_script(["train.py", *data, "--model", "resnet8", "--acb", "--epochs", "1", "--batch_size", "8",
                      "--no_progress", "--device", "cpu", "--no_amp", "--warmup_epochs", "0", "--lr", "0.02",
                      "--output_dir", str(tmp / "run")])
    assert res.returncode == 0, res.stderr[-2000:]
    train.main(config.parse_args([*data, "--eval_only", "--ckpt", str(tmp / "run" / "last.pt"), "--device",
                                  "cpu", "--no_amp", "--no_progress", "--output_dir", str(tmp / "eval")]))
    onnx = []
    try:
        import onnxruntime  # noqa: F401
        onnx = ["--onnx", str(tmp / "deploy.onnx")]
    except ImportError:
        pass
    assert reparam_export.main(["--ckpt", str(tmp / "run" / "last.pt"), "--out", str(tmp / "deploy.pt"),
                                "--latency_runs", "0", *onnx]) == 0
    return tmp


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def predict_folder(run, ckpt, out, *extra):
    return predict.main(["--ckpt", str(ckpt), "--images", str(run / "data" / "val"), "--out", str(out),
                         "--device", "cpu", "--no_progress", *map(str, extra)])


def test_folder_top1_matches_eval_only(run, tmp_path):
    summary = predict_folder(run, run / "run" / "last.pt", tmp_path / "p.csv", "--topk", "2", "--batch_size", "4")
    rows = read_rows(tmp_path / "p.csv")
    assert summary == {"images": 21, "skipped": 0, "out": str(tmp_path / "p.csv")}
    assert list(rows[0]) == ["image", "pred_1", "prob_1", "pred_2", "prob_2"]
    assert [r["image"] for r in rows] == [os.path.join(c, f"{k}.png") for c in sorted(COLOURS) for k in range(7)]
    correct = sum(r["pred_1"] == r["image"].split(os.sep)[0] for r in rows)
    eval_acc = json.loads((run / "eval" / "eval_summary.json").read_text())["val_acc"]
    assert correct / len(rows) == pytest.approx(eval_acc, abs=1e-12)
    assert all(float(r["prob_1"]) >= float(r["prob_2"]) for r in rows)

    # each row is the checkpoint's own softmax of that image, computed here without predict.py
    model, ckpt = load_model(str(run / "run" / "last.pt"))
    model.eval()
    x = torch.stack([load_image(str(run / "data" / "val" / r["image"]), 3, 32) for r in rows]).float() / 255
    with torch.no_grad():
        probs = model(x).softmax(1)
    top_p, top_i = probs.topk(2, dim=1)
    names = ckpt["class_names"]
    assert [r["pred_1"] for r in rows] == [names[i] for i in top_i[:, 0].tolist()]
    np.testing.assert_allclose([float(r["prob_1"]) for r in rows], top_p[:, 0].numpy(), atol=2e-6)

    # dataset mode (the run's own data flags from the checkpoint): the same predictions, with labels
    s = predict.main(["--ckpt", str(run / "run" / "last.pt"), "--out", str(tmp_path / "d.csv"), "--device", "cpu",
                      "--no_progress"])
    assert s["accuracy"] == pytest.approx(eval_acc, abs=1e-12)
    by_path = {os.path.relpath(r["image"], run / "data" / "val"): r for r in read_rows(tmp_path / "d.csv")}
    assert {k: (r["label"], r["pred_1"]) for k, r in by_path.items()} == \
        {r["image"]: (r["image"].split(os.sep)[0], r["pred_1"]) for r in rows}


def test_train_form_deploy_form_and_onnx_agree(run, tmp_path):
    tta = ("--tta", "--tta_shift", "1")
    predict_folder(run, run / "run" / "last.pt", tmp_path / "train.csv", "--topk", "3", *tta)
    predict_folder(run, run / "deploy.pt", tmp_path / "deploy.csv", "--topk", "3", *tta)
    outs = [read_rows(tmp_path / "train.csv"), read_rows(tmp_path / "deploy.csv")]
    if (run / "deploy.onnx").exists():
        predict_folder(run, run / "deploy.onnx", tmp_path / "onnx.csv", "--topk", "3", *tta, "--meta",
                       run / "deploy.pt")
        outs.append(read_rows(tmp_path / "onnx.csv"))
        with pytest.raises(UserError, match="--meta"):
            predict_folder(run, run / "deploy.onnx", tmp_path / "x.csv")
    ref = outs[0]
    # --tta --tta_shift 1 is evaluate()'s: the mean of the logits of the image, of it moved 1 px down-right and
    # 1 px up-left (zero fill), and of the mirrors of those three
    model, _ = load_model(str(run / "run" / "last.pt"))
    model.eval()
    x = torch.stack([load_image(str(run / "data" / "val" / r["image"]), 3, 32) for r in ref]).float() / 255
    down_right, up_left = torch.zeros_like(x), torch.zeros_like(x)
    down_right[..., 1:, 1:] = x[..., :-1, :-1]
    up_left[..., :-1, :-1] = x[..., 1:, 1:]
    with torch.no_grad():
        views = [x, down_right, up_left]
        probs = (sum(model(v) + model(v.flip(3)) for v in views) / 6).softmax(1)
    np.testing.assert_allclose([float(r["prob_1"]) for r in ref], probs.max(1).values.numpy(), atol=2e-6)
    for other in outs[1:]:
        assert [r["image"] for r in other] == [r["image"] for r in ref]
        assert [r["pred_1"] for r in other] == [r["pred_1"] for r in ref]
        np.testing.assert_allclose([[float(r[f"prob_{k}"]) for k in (1, 2, 3)] for r in other],
                                   [[float(r[f"prob_{k}"]) for k in (1, 2, 3)] for r in ref], atol=1e-4)
    assert all(abs(sum(float(r[f"prob_{k}"]) for k in (1, 2, 3)) - 1) < 1e-5 for r in ref)  # all 3 classes


def test_list_input_and_unreadable_images(run, tmp_path, capsys):
    good = run / "data" / "val" / "red" / "0.png"
    bad = tmp_path / "broken.png"
    bad.write_bytes(good.read_bytes()[:60])
    listing = tmp_path / "files.txt"
    listing.write_text(f"{good}\nbroken.png\n")  # the second relative to the list's folder
    out = tmp_path / "p.csv"
    with pytest.raises(UserError, match="broken.png"):
        predict.main(["--ckpt", str(run / "run" / "last.pt"), "--list", str(listing), "--out", str(out),
                      "--device", "cpu", "--no_progress"])
    assert not out.exists() and not list(tmp_path.glob("p.csv.tmp*"))  # nothing half-written
    s = predict.main(["--ckpt", str(run / "run" / "last.pt"), "--list", str(listing), "--out", str(out),
                      "--device", "cpu", "--no_progress", "--skip_bad_images", "--topk", "9"])
    assert s["images"] == 1 and s["skipped"] == 1
    rows = read_rows(out)
    assert [r["image"] for r in rows] == [str(good)] and "pred_3" in rows[0] and "pred_4" not in rows[0]
    with pytest.raises(SystemExit) as exit_:  # what `python predict.py` does with a UserError
        run_cli(predict.main, ["--ckpt", str(tmp_path / "missing.pt"), "--images", str(tmp_path), "--out",
                               str(tmp_path / "q.csv")])
    assert exit_.value.code == 2 and "missing.pt" in capsys.readouterr().err


def test_data_flags_given_override_the_checkpoints(run, tmp_path):
    # the run saved --eval_subset 0 (every val image); a data flag given here wins over the checkpoint's
    s = predict.main(["--ckpt", str(run / "run" / "last.pt"), "--out", str(tmp_path / "d.csv"), "--device", "cpu",
                      "--no_progress", "--eval_subset", "6"])
    assert s["images"] == 6 and len(read_rows(tmp_path / "d.csv")) == 6


def test_a_cached_runs_predictions_are_named_by_file(run, tmp_path):
    """A run trained with --cache_images ram and --hflip_mode alternate: predict reads its split once from disk
    (no cache, no loader flips), and names rows by file even when given --cache_images ram itself."""
    ckpt = torch.load(run / "run" / "last.pt", map_location="cpu", weights_only=True)
    ckpt["args"] = {**ckpt["args"], "cache_images": "ram", "hflip_mode": "alternate"}
    torch.save(ckpt, tmp_path / "cached.pt")
    outs = []
    for i, extra in enumerate(([], ["--cache_images", "ram"])):
        s = predict.main(["--ckpt", str(tmp_path / "cached.pt"), "--out", str(tmp_path / f"{i}.csv"), "--device",
                          "cpu", "--no_progress", *extra])
        outs.append((s["accuracy"], read_rows(tmp_path / f"{i}.csv")))
    plain = predict.main(["--ckpt", str(run / "run" / "last.pt"), "--out", str(tmp_path / "plain.csv"), "--device",
                          "cpu", "--no_progress"])
    for acc, rows in outs:
        assert acc == plain["accuracy"] and rows == read_rows(tmp_path / "plain.csv")
        assert all(r["image"].endswith(".png") for r in rows)


def test_help_lists_only_predicts_flags_and_a_bad_flag_is_one_error_line():
    res = run_script(["predict.py", "--help"])
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and len(lines) <= 84, len(lines)
    assert "--topk" in res.stdout and "--data_dir" in res.stdout and "--no_progress" in res.stdout
    assert "--mixup_alpha" not in res.stdout and "--epochs" not in res.stdout
    for argv, message in ((["--topk", "five"], "error: argument --topk: invalid int value: 'five'"),
                          (["--mixup_alpha", "0.2"], "error: unrecognized arguments: --mixup_alpha 0.2")):
        res = run_script(["predict.py", "--ckpt", "x.pt", *argv])
        assert res.returncode == 2 and res.stderr.startswith(message), res.stderr
        assert len(res.stderr.splitlines()) == 1 and not res.stdout
