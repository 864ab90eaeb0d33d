"""Ensembles: `--ensemble N` trains N seeds at once as N processes, then evaluates their averaged prediction;
`--eval_only --ckpt A.pt B.pt ...` evaluates the same average for checkpoints already trained.

The ensemble predicts the mean of its members' softmax probabilities. `Ensemble.forward` returns the log of
that mean, which is a valid logit vector (softmax(log p) = p), so evaluate() and its TTA work unchanged.
Each member gets about 1/N of the machine: benchmarks/bench_ensemble.py measures N processes of T/N threads
against one process of T threads.
"""
import logging
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.checkpoint import load_model
from utils.errors import UserError

log = logging.getLogger(__name__)


class Ensemble(nn.Module):
    """log(mean_i softmax(member_i(x))), computed in fp32 for stability under autocast."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        logp = torch.stack([F.log_softmax(m(x).float(), dim=1) for m in self.members])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))


def load_ensemble(paths, use_ema=False):
    """Rebuild each checkpoint's model; all must predict the same classes from the same inputs."""
    models, ckpts = [], []
    for p in paths:
        if not os.path.isfile(p):
            raise UserError(f"checkpoint {p} not found; pass the best.pt/last.pt files of finished runs")
        model, ckpt = load_model(p, use_ema=use_ema)
        models.append(model)
        ckpts.append(ckpt)
    first = ckpts[0]
    for p, c in zip(paths[1:], ckpts[1:]):
        for key in ("num_classes", "in_chans", "img_size"):
            if c["model_config"].get(key) != first["model_config"].get(key):
                raise UserError(f"{p} has {key} {c['model_config'].get(key)} but {paths[0]} has "
                                f"{first['model_config'].get(key)}; ensemble checkpoints trained on the same data")
        if c.get("class_names") != first.get("class_names"):
            raise UserError(f"{p} and {paths[0]} name their classes differently; ensemble checkpoints trained "
                            "on the same data")
    return Ensemble(models), first


def member_threads(total, n):
    """Intra-op threads per member so that N members share the machine's `total` threads."""
    return max(1, total // n)


def member_command(script, config_path, seed, data_seed, threads, output_dir, overwrite=False):
    """The child command line: the parent's resolved config, one member with its own seed, threads and
    directory, and the parent's data split (data_seed)."""
    return [sys.executable, script, "--config", config_path, "--ensemble", "1", "--seed", str(seed),
            "--data_seed", str(data_seed), "--threads", str(threads), "--output_dir", output_dir,
            *(["--overwrite"] if overwrite else [])]


def train_members(script, config_path, out_dir, n, seed, data_seed, threads, log, overwrite=False, poll=2.0):
    """Run N member processes concurrently; forward their log lines prefixed [mI]; raise if any fails.

    Returns the member directories (each holds train.py's usual outputs: last.pt, summary.json, ...)."""
    procs, logs, dirs, offsets = [], [], [], []
    try:
        for i in range(n):
            d = os.path.join(out_dir, f"member{i}")
            dirs.append(d)
            logs.append(os.path.join(out_dir, f"member{i}.out"))
            with open(logs[-1], "w") as f:
                cmd = member_command(script, config_path, seed + i, data_seed, threads, d, overwrite)
                procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT))
            offsets.append(0)
        log.info(f"ensemble: {n} members training at once ({threads} thread(s) each), seeds {seed}..{seed + n - 1}; "
                 f"their output: {out_dir}/member*.out")
        while True:
            done = [p.poll() is not None for p in procs]
            for i in range(n):
                offsets[i] = forward_lines(logs[i], offsets[i], f"[m{i}] ", log)
            failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                i = failed[0]
                raise UserError(f"ensemble member {i} failed (exit code {procs[i].returncode}: "
                                f"{last_line(logs[i])}); its output is in {logs[i]}")
            if all(done):
                return dirs
            time.sleep(poll)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()


def last_line(path):
    with open(path, "rb") as f:
        lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def forward_lines(path, offset, prefix, log):
    """Log the complete lines written to `path` since `offset` (progress-bar redraws dropped); new offset."""
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1
    for line in chunk[:end].decode("utf-8", "replace").splitlines():
        line = line.rsplit("\r", 1)[-1].strip()
        if line:
            log.info(prefix + line)
    return offset + end
