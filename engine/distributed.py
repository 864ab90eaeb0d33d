"""torchrun support: process-group setup, rank helpers and exact metric reduction.

Run `torchrun --nproc_per_node N train.py ...`; torchrun sets RANK, WORLD_SIZE and LOCAL_RANK.
CPU uses the gloo backend, CUDA uses nccl. Every helper is a no-op (or returns its input) when
the script runs as one plain process.
"""
import io
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(use_cuda):
    """Join the process group torchrun describes in the environment; a no-op when run plainly."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return info


def _active():
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(values, device):
    """Sum a list of numbers over all processes (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _active():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_tensor_sum(t):
    """Sum tensor `t` over all processes in place (no-op in one process); returns it."""
    if _active():
        dist.all_reduce(t)
    return t


def all_finite(value, device):
    """Whether `value` (a number) is finite on every process. A collective: all ranks must call it at the same
    step, or a rank that stopped alone on a bad loss would leave the others waiting in DDP's gradient all-reduce."""
    ok = math.isfinite(value)
    if not _active():
        return ok  # one process: no collective, nothing allocated (this runs every step on the CPU)
    return all_reduce_sum([0.0 if ok else 1.0], device)[0] == 0


@torch.no_grad()
def broadcast_module(module, src=0):
    """Give every process rank `src`'s parameters and buffers, in place.

    Ranks seed their RNGs differently (their augmentation streams), so freshly initialised weights
    differ. DDP broadcasts rank 0's weights when it wraps the model, but EMA/SWA copies taken before
    that would keep each rank's own initialisation: call this before building them.
    """
    if not _active():
        return
    for t in module.state_dict().values():
        buf = t if t.is_contiguous() else t.contiguous()  # channels_last weights: send a dense copy
        dist.broadcast(buf, src)
        if buf is not t:
            t.copy_(buf)


@torch.no_grad()
def average_buffers(module):
    """Average the floating-point buffers (BatchNorm running statistics) over processes, in place.

    After a BatchNorm re-estimation (SWA) each rank holds statistics of its own shard. They are
    cumulative averages over equally many batches per rank (the sharded loader guarantees equal
    counts), so their mean is the average over every rank's batches. Integer buffers are kept.
    """
    if not _active():
        return
    for b in module.buffers():
        if b.is_floating_point():
            buf = b if b.is_contiguous() else b.contiguous()
            dist.all_reduce(buf)
            buf.div_(dist.get_world_size())
            if buf is not b:
                b.copy_(buf)


def all_gather_object(obj):
    """[rank 0's obj, rank 1's obj, ...] on every process; [obj] when plain.

    `obj` holds what a checkpoint may (tensors, numbers, strings, lists, tuples, dicts). It travels as
    torch.save bytes and is read back with weights_only=True: torch's own pickling of tensors inside
    all_gather_object fails to load in torch 2.14 (UntypedStorage has no attribute 'dtype').
    """
    if not _active():
        return [obj]
    buf = io.BytesIO()
    torch.save(obj, buf)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, buf.getvalue())
    return [torch.load(io.BytesIO(b), map_location="cpu", weights_only=True) for b in out]


def barrier():
    if _active():
        dist.barrier()


def cleanup():
    if _active():
        dist.destroy_process_group()
