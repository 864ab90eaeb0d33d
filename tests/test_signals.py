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
    # a shell starts background jobs with SIGINT ignored, and Python then installs no Ctrl-C handler: the child
    # gets the default disposition back, as a terminal's foreground process has it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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


def test_a_signal_inside_a_log_write_is_not_swallowed(monkeypatch):
    """SIGTERM raises Interrupted wherever the run is; most often inside a log line's write, whose handler turns
    any Exception into a printed "Logging error" and carries on. The run must stop instead."""
    import logging

    import utils.logger
    from utils.errors import Interrupted
    log = utils.logger.setup_logging()

    def write(*args, **kwargs):
        raise Interrupted(signal.SIGTERM)
    monkeypatch.setattr(utils.logger.tqdm, "write", write)
    try:
        with pytest.raises(Interrupted):
            log.info("epoch 3 | loss 0.5")
    finally:
        logging.getLogger().handlers.clear()

