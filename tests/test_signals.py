"""Ctrl-C (SIGINT) and SIGTERM end a run with one line naming the last complete checkpoint and the exact
--resume command, exit 130 / 143, and leave that checkpoint whole."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, needs_fmnist


@needs_fmnist
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_ends_the_run_with_the_resume_command(tmp_path, signum, code):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", "mlp_student", "--epochs", "500",
           "--train_subset", "256", "--eval_subset", "64", "--batch_size", "64", "--warmup_epochs", "0",
           "--device", "cpu", "--no_progress", "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)  # somewhere inside a later epoch, or inside a checkpoint write
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    last = str(out / "last.pt")
    assert lines[0].startswith(f"stopped by {signal.Signals(signum).name}: {last} holds epoch ")
    assert lines[0].endswith(f"continue with: python train.py --resume {last}")
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # whole, loadable
    assert ckpt["epoch"] >= 1
    assert not [f for f in os.listdir(out) if ".tmp" in f]
