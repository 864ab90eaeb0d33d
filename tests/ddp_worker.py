"""Test helper: one process of a 2-process gloo group (torch.multiprocessing.spawn) that runs
engine.distributed's helpers on rank-specific tensors and saves what it saw, for
tests/test_distributed.py to assert on.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import distributed as dist_utils  # noqa: E402


def small_model(seed):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    return m.to(memory_format=torch.channels_last)  # as train.py does with --channels_last


def clone_state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def run(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    # A file rendezvous needs no port; init_distributed then finds the group already there.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    info = dist_utils.init_distributed(use_cuda=False)
    out = {"info": (info.rank, info.world_size, info.local_rank, info.is_main, info.enabled)}

    out["sums"] = dist_utils.all_reduce_sum([rank + 0.25, 1, 2**40 + rank], torch.device("cpu"))

    m = small_model(seed=100 + rank)  # each rank initialises differently, as with per-rank seeds
    with torch.no_grad():
        m[1].running_mean.fill_(rank + 1.0)
        m[1].num_batches_tracked.fill_(7 + rank)
    out["before"] = clone_state(m)
    dist_utils.broadcast_module(m)
    out["after"] = clone_state(m)
    out["channels_last"] = m[0].weight.is_contiguous(memory_format=torch.channels_last)

    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]) * (rank + 1))
        bn.running_var.copy_(torch.tensor([0.5, 1.0, 4.0]) + rank)
        bn.num_batches_tracked.fill_(3 + rank)
    dist_utils.average_buffers(bn)
    out["bn"] = clone_state(bn)

    # all_finite: one rank's inf makes every rank stop together (rank 0's own value is finite)
    out["finite"] = (dist_utils.all_finite(1.0, torch.device("cpu")),
                     dist_utils.all_finite(float("inf") if rank == 1 else 2.0, torch.device("cpu")),
                     dist_utils.all_finite(float("nan") if rank == 0 else 2.0, torch.device("cpu")))

    out["gathered"] = dist_utils.all_gather_object({"rank": rank, "t": torch.arange(3) + 10 * rank})
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist_utils.cleanup()
