"""Checkpoints as plain dicts of unwrapped modules: written atomically, read with weights_only=True.

A crash (or SIGKILL) while saving leaves the previous file intact: we write `<path>.tmp` and rename.
"""
import os
import random
import warnings

import numpy as np
import torch

from models import model_from_config
from utils.errors import UserError


def save_checkpoint(obj, path):
    """torch.save to a temporary file in the same directory, then atomically rename over `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError from its zip writer
        if isinstance(e, RuntimeError) and "write" not in str(e).lower() and "file" not in str(e).lower():
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:120]
        raise UserError(f"cannot write checkpoint {path} ({reason}); free some space or pass another "
                        f"--output_dir (the previous {os.path.basename(path)}, if any, is intact)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """Load a checkpoint written by this repository; a missing, truncated or foreign file is a UserError."""
    if not path or not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .pt file written by train.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of arbitrary objects, text file, ...
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable checkpoint ({reason}); "
                        f"it may be truncated or not written by train.py")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this repository (no 'model'/'model_config' keys)")
    return ckpt


def load_state(module, state_dict, what):
    """load_state_dict that turns key/shape mismatches into a one-line UserError."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3])[:300]
        raise UserError(f"{what} does not match the model ({detail}); "
                        f"use a checkpoint of the same --model and settings")


def load_model(path_or_ckpt, use_ema=False):
    """Rebuild the model a checkpoint describes and load its weights (EMA weights with use_ema)."""
    ckpt = load_checkpoint(path_or_ckpt) if isinstance(path_or_ckpt, (str, os.PathLike)) else path_or_ckpt
    model = model_from_config(ckpt["model_config"])
    if use_ema:
        if not ckpt.get("ema"):
            raise UserError("--use_ema: this checkpoint holds no EMA weights; train with --ema or drop --use_ema")
        state = ckpt["ema"]["module"]
    else:
        state = ckpt["model"]
    load_state(model, state, "checkpoint weights")
    return model, ckpt


def get_rng_state(device=None):
    """Every RNG a run draws from, as tensors and plain types (loadable with weights_only=True). On CUDA only the
    run's own GPU's generator is saved: a resume may see fewer or other GPUs."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:])}
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device=None):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    cuda = state.get("cuda")
    if cuda is None or device is None or torch.device(device).type != "cuda":
        return  # a CPU run, or a CUDA run resumed on the CPU: CUDA's stream restarts
    device = torch.device(device)
    if isinstance(cuda, (list, tuple)):  # checkpoints before this change saved every visible GPU's state
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= len(cuda):
            warnings.warn(f"the checkpoint holds no CUDA random state for GPU {index}; it restarts")
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def save_states(stateful):
    """The checkpoint entries of a run's stateful parts. The protocol: each part is registered under a name
    (optimizer, scheduler, scaler, ema, swa, lookahead, infobatch, ...) and has state_dict() / load_state_dict(),
    so checkpoint and resume loop over them instead of naming each one."""
    return {name: part.state_dict() for name, part in stateful.items()}


def load_states(stateful, ckpt, path, required=("optimizer", "scheduler")):
    """Load every registered part from `ckpt`. A part the checkpoint lacks (a trick switched on at resume) keeps
    its fresh state; a missing required part means the file is not a training checkpoint."""
    for name in required:
        if not isinstance(ckpt.get(name), dict):
            raise UserError(f"{path} has no {name} state, so it is not a train.py last.pt (an averaged, SWA or "
                            f"deploy checkpoint?); evaluate it with --eval_only --ckpt {path}, or start a new run")
    for name, part in stateful.items():
        if ckpt.get(name):  # a run without fp16 saved a disabled scaler's empty state
            part.load_state_dict(ckpt[name])
