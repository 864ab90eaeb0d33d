"""End-to-end: a 1-epoch run writes every output; a killed run resumes to identical weights;
bad input fails with a one-line message and exit code 2."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import QUICK, ROOT, cli_error, needs_fmnist, run_script

import config
import train

pytestmark = needs_fmnist


def test_smoke_run_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    r = run_script(["train.py", *QUICK, "--output_dir", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("metrics.csv", "curves.png", "summary.json", "last.pt", "best.pt", "config.yaml", "train.log"):
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    for key in ("final_val_acc", "best_val_acc", "test_acc", "epochs", "train_seconds", "images_per_second"):
        assert key in s, key
    assert 0.0 <= s["final_val_acc"] <= 1.0 and s["epochs"] == 1
    assert s["final_val_acc"] > 0.3  # 512 real images, one epoch: well above chance (0.1)
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert ckpt["epoch"] == 1 and len(ckpt["class_names"]) == 10

    # --eval_only on the checkpoint reproduces the final validation accuracy
    train.main(config.parse_args(["--eval_only", "--ckpt", str(out / "last.pt"), *QUICK[:4], "--no_tta", "--no_amp",
                                  "--no_progress",
                                  "--device", "cpu", "--output_dir", str(tmp_path / "ev")]))
    ev = json.loads((tmp_path / "ev" / "eval_summary.json").read_text())
    assert ev["val_acc"] == pytest.approx(s["final_val_acc"], abs=1e-9)

    # reusing a directory that holds checkpoints is refused, nothing is touched
    before = (out / "last.pt").stat().st_mtime_ns
    _expect_error([*QUICK, "--output_dir", str(out)], "already holds checkpoints", capsys)
    assert (out / "last.pt").stat().st_mtime_ns == before


def test_kill_and_resume_gives_identical_weights(tmp_path):
    flags = [*QUICK, "--epochs", "3", "--deterministic", "--train_subset", "1024", "--hflip", "0.5",
             "--crop_padding", "2", "--mixup_alpha", "0.2", "--ema", "--ema_warmup",
             "--lookahead_k", "3"]  # 16 steps per epoch: each epoch ends between two lookahead pulls
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = run_script(["train.py", *flags, "--output_dir", str(full)])
    assert r.returncode == 0, r.stderr[-2000:]

    proc = subprocess.Popen([sys.executable, "train.py", *flags, "--output_dir", str(killed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "metrics.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(killed / "last.pt", map_location="cpu", weights_only=True)
    if ckpt["epoch"] == 3:
        pytest.skip("the run finished before it could be killed")
    r = run_script(["train.py", "--resume", str(killed / "last.pt"), "--no_progress"])
    assert r.returncode == 0, r.stderr[-2000:]
    a = torch.load(full / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(killed / "last.pt", map_location="cpu", weights_only=True)
    assert b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["module"]:  # the EMA continues with its step count
        assert torch.equal(a["ema"]["module"][k], b["ema"]["module"][k]), k
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"]
    assert a["lookahead"]["steps"] == b["lookahead"]["steps"] == 48
    for sa, sb in zip(a["lookahead"]["slow"], b["lookahead"]["slow"]):
        assert torch.equal(sa, sb)
    assert len(b["metrics"]["history"]) == 3


def _expect_error(args, fragment, capsys):
    """`python train.py ARGS` exits 2 with a one-line error naming `fragment` (in this interpreter: see cli_error)."""
    line = cli_error(train.main, args, capsys)
    assert fragment in line, line


def test_bad_flag_in_a_fresh_interpreter(tmp_path):
    """The script itself, not just main(): one line on stderr, exit code 2, no traceback, nothing written."""
    r = run_script(["train.py", *QUICK, "--output_dir", str(tmp_path / "r"), "--epochs", "0"])
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert r.stderr.strip().splitlines() == ["error: --epochs 0: must be in [1, inf)"], r.stderr[-1500:]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--batch_size", "0"], "--batch_size 0: must be in [1, inf)"),
    (["--lr", "-1"], "--lr -1: must be in (0, inf)"),
    (["--epochs", "0"], "--epochs 0: must be in [1, inf)"),
    (["--dataset", "mnist_typo"], "fashion_mnist"),
    (["--model", "resnet_typo"], "resnet20"),
    (["--opt", "adagrad"], "sgd"),
    (["--scheduler", "warm"], "cosine"),
    (["--dataset", "cifar10", "--data_dir", "/nonexistent"], "/nonexistent"),
    (["--device", "cuda"], "CUDA is not available"),
])
def test_bad_flags(args, fragment, tmp_path, capsys):
    _expect_error([*QUICK, "--output_dir", str(tmp_path / "r"), *args], fragment, capsys)


def test_bad_checkpoints(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    _expect_error(["--eval_only", "--ckpt", str(junk)], "not a readable checkpoint", capsys)
    _expect_error(["--eval_only", "--ckpt", str(tmp_path / "missing.pt")], "does not exist", capsys)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lr: 0.1\nnot_a_flag: 1\n")
    _expect_error(["--config", str(cfg)], "not_a_flag", capsys)


def test_resume_of_another_model_and_truncated_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(config.parse_args([*QUICK, "--output_dir", str(out)]))
    _expect_error(["--resume", str(out / "last.pt"), "--model", "resnet20", "--epochs", "2"],
                  "differ", capsys)
    data = (out / "last.pt").read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    _expect_error(["--eval_only", "--ckpt", str(trunc)], "truncated", capsys)


def test_unwritable_output_dir(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores permissions: use a path under a regular file instead
        target = tmp_path / "file"
        target.write_text("x")
        target = target / "sub"
    else:
        target = ro / "sub"
    _expect_error([*QUICK, "--output_dir", str(target)], "cannot write to", capsys)


def test_nan_loss_stops_with_a_one_line_message(tmp_path, capsys):
    _expect_error([*QUICK, "--output_dir", str(tmp_path / "run"), "--lr", "1e30", "--opt", "sgd"], "epoch 1 step",
                  capsys)


def _seed_csv_layout(tmp_path, n=24):
    """The seed's layout: a folder of images of mixed sizes and modes, a CSV of file name -> string label."""
    from PIL import Image
    d = tmp_path / "images"
    d.mkdir()
    rows = ["image,label"]
    for i in range(n):
        mode, size = (("L", (20 + i, 24)), ("RGB", (40, 30 + i)), ("RGBA", (32, 32)))[i % 3]
        Image.new(mode, size, color=(i * 10) % 255 if mode == "L" else ((i * 10) % 255, 50, 100, 255)[:len(mode)]).save(
            d / f"img{i}.png")
        rows.append(f"img{i}.png,{'shirt' if i % 2 else 'shoe'}")
    csv = tmp_path / "info.csv"
    csv.write_text("\n".join(rows) + "\n")
    return d, csv


def test_seed_csv_layout_trains_and_bad_csv_inputs_exit_2(tmp_path, capsys):
    d, csv = _seed_csv_layout(tmp_path)
    base = ["--dataset", "csv", "--data_dir", str(d), "--info_csv", str(csv), "--img_size", "32", "--model", "resnet8",
            "--epochs", "1", "--batch_size", "8", "--no_progress", "--device", "cpu", "--warmup_epochs", "0"]
    # the decoded-in-memory path (tests/test_image_cache.py checks its images) trains end to end
    train.main(config.parse_args([*base, "--cache_images", "ram", "--crop_padding", "2",
                                  "--output_dir", str(tmp_path / "ok")]))
    s = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert s["val_split"] == "val" and 0.0 <= s["final_val_acc"] <= 1.0

    _expect_error([*base, "--label_column", "class", "--output_dir", str(tmp_path / "r1")], "class", capsys)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    csv.write_text(csv.read_text() + "broken.png,shoe\n")
    _expect_error([*base, "--output_dir", str(tmp_path / "r2")], "broken.png", capsys)
    train.main(config.parse_args([*base, "--skip_bad_images", "--output_dir", str(tmp_path / "r3")]))
    assert (tmp_path / "r3" / "summary.json").is_file()
    csv.write_text(csv.read_text() + "missing.png,shirt\n")
    _expect_error([*base, "--skip_bad_images", "--output_dir", str(tmp_path / "r4"), "--val_ratio", "1.5"],
                  "val_ratio", capsys)
    _expect_error([*base, "--output_dir", str(tmp_path / "r5")], "missing.png", capsys)


def _np_cross_entropy(logits, y):
    """Mean cross-entropy in float64 numpy (log-softmax with the max subtracted)."""
    import numpy as np
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean()


def test_flip_and_shift_tta_equal_the_closed_form():
    """evaluate(tta=True) on a linear model equals a linear model with weights (W + mirror(W)) / 2; with
    tta_shift, the mean of the logits of the shifted (and mirrored) images computed here in numpy."""
    import numpy as np

    import train
    from engine.precision import make_precision
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    torch.nn.init.normal_(model[1].weight, generator=g)
    images = torch.randint(0, 256, (40, 1, 4, 4), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (40,), generator=g)
    loader = [(images[i:i + 16], labels[i:i + 16]) for i in range(0, 40, 16)]
    prec = make_precision(torch.device("cpu"), amp=False)

    w = model[1].weight.detach().numpy().astype(np.float64)
    b = model[1].bias.detach().numpy().astype(np.float64)
    w_tta = (w + w.reshape(3, 1, 4, 4)[..., ::-1].reshape(3, 16)) / 2
    x = images.numpy().reshape(40, 16).astype(np.float64) / 255
    y = labels.numpy()
    for weights, tta in ((w, False), (w_tta, True)):
        logits = x @ weights.T + b
        got = train.evaluate(model, loader, prec, tta=tta)
        assert abs(got["loss"] - _np_cross_entropy(logits, y)) < 1e-5
        assert abs(got["acc"] - (logits.argmax(1) == y).mean()) < 1e-12
    assert train.evaluate(model, loader, prec, tta=True)["loss"] != train.evaluate(model, loader, prec)["loss"]

    # tta_shift 1: also the images moved one pixel down-right and up-left (zero fill), and the mirrors of all three
    img = x.reshape(40, 4, 4)
    down_right, up_left = np.zeros_like(img), np.zeros_like(img)
    down_right[:, 1:, 1:] = img[:, :-1, :-1]
    up_left[:, :-1, :-1] = img[:, 1:, 1:]
    views = [v.reshape(40, 16) for v in (img, down_right, up_left)]
    for tta in (False, True):
        if tta:
            views += [v.reshape(40, 4, 4)[..., ::-1].reshape(40, 16) for v in views]
        logits = sum(v @ w.T + b for v in views) / len(views)
        got = train.evaluate(model, loader, prec, tta=tta, tta_shift=1)
        assert abs(got["acc"] - (logits.argmax(1) == y).mean()) < 1e-12
        assert abs(got["loss"] - _np_cross_entropy(logits, y)) < 1e-5


def test_epoch_sums_stay_on_device_and_non_finite_loss_is_caught_at_the_next_sync():
    """train_one_epoch's device-side running sums equal the per-sample closed form (lr 0 keeps the weights),
    whatever the sync interval; a NaN loss at step 4 is reported at step 4 (sync every step) or at step 6
    (sync every 3 steps, as on a GPU)."""
    import numpy as np

    import train
    from engine.precision import make_precision
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    images = torch.randint(0, 256, (64, 1, 4, 4), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (64,), generator=g)
    loader = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 64, 8)]
    prec = make_precision(torch.device("cpu"), amp=False)
    w = model[1].weight.detach().numpy().astype(np.float64)
    b = model[1].bias.detach().numpy().astype(np.float64)
    logits = images.numpy().reshape(64, 16).astype(np.float64) / 255 @ w.T + b
    y = labels.numpy()

    def run(sync_every, criterion=torch.nn.functional.cross_entropy):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        return train.train_one_epoch(model, loader, opt, sched, criterion, prec.scaler(), prec, 0,
                                     train.StepTricks(sync_every=sync_every))

    for sync_every in (1, 3, 100):
        got = run(sync_every)
        assert abs(got["train_loss"] - _np_cross_entropy(logits, y)) < 1e-5
        assert got["train_acc"] == (logits.argmax(1) == y).mean()

    for sync_every, reported in ((1, "step 4;"), (3, "step 6 (checked every 3 steps)")):
        calls = []

        def nan_at_step_4(out, target):
            calls.append(1)
            loss = torch.nn.functional.cross_entropy(out, target)
            return loss * float("nan") if len(calls) == 4 else loss

        with pytest.raises(train.NonFiniteLoss, match=r"epoch 1 " + reported.replace("(", r"\(").replace(")", r"\)")):
            run(sync_every, nan_at_step_4)


def test_unwrap_sees_through_compile_and_ddp_style_wrappers():
    """train_one_epoch updates EMA and attacks the plain module inside torch.compile / DDP wrappers."""
    import train
    net = torch.nn.Linear(3, 2)

    class DDPLike(torch.nn.Module):  # DistributedDataParallel keeps the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module
    assert train.unwrap(torch.compile(net)) is net
    assert train.unwrap(DDPLike(torch.compile(net))) is net
    assert train.unwrap(net) is net
