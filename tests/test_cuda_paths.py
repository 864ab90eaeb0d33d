"""Decisions that only matter on CUDA, checked on the CPU (no GPU here): which AMP dtype a GPU gets, the CUDA
random state a checkpoint keeps and restores, `--device cuda:N` under torchrun, resuming into fp16's GradScaler,
test-time augmentation averaged in fp32 under autocast, and where a --cache_images ram cache lives."""
import pytest
import torch
from conftest import QUICK, needs_fmnist

from utils.errors import UserError


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_amp_dtype_is_bf16_only_with_bf16_tensor_cores(monkeypatch, capability, dtype):
    from engine.precision import make_precision
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # says yes on V100/T4 too
    prec = make_precision(torch.device("cuda", 1), amp=True)
    assert prec.dtype == dtype
    assert asked == [torch.device("cuda", 1)]  # the run's GPU, not the current one


def test_image_cache_goes_to_the_gpu_only_when_it_takes_at_most_half_its_free_memory(monkeypatch):
    from datasets import cache_device
    gpu = torch.device("cuda", 1)
    assert cache_device(5 * 2**30, gpu, free_bytes=10 * 2**30) == gpu
    assert cache_device(5 * 2**30 + 1, gpu, free_bytes=10 * 2**30) == torch.device("cpu")
    assert cache_device(10**12, "cpu") == torch.device("cpu")  # the CPU never asks CUDA
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: asked.append(d) or (8 * 2**30, 80 * 2**30))
    assert cache_device(4 * 2**30, gpu) == gpu and asked == [gpu]  # the run's GPU's free memory


def test_explicit_gpu_under_torchrun_is_refused(monkeypatch):
    from utils.misc import resolve_device
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--device cuda:1 under torchrun .* pass --device cuda"):
        resolve_device("cuda:1", False, local_rank=0)
    assert resolve_device("cpu", False) == torch.device("cpu")


def test_checkpoint_keeps_only_the_runs_own_gpu_random_state(monkeypatch):
    from engine import checkpoint
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: calls.append(("get", d)) or torch.tensor([7]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append(("set", int(s[0]), d)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    gpu1 = torch.device("cuda", 1)

    assert "cuda" not in checkpoint.get_rng_state(torch.device("cpu"))
    state = checkpoint.get_rng_state(gpu1)
    assert calls == [("get", gpu1)] and int(state["cuda"][0]) == 7
    cpu_before = torch.get_rng_state()
    checkpoint.set_rng_state(state, gpu1)
    assert calls[-1] == ("set", 7, gpu1) and torch.equal(torch.get_rng_state(), cpu_before)

    calls.clear()
    checkpoint.set_rng_state(state, torch.device("cpu"))  # a CUDA checkpoint resumed on the CPU
    assert calls == []
    # older checkpoints hold every visible GPU's state: GPU 1 takes entry 1; a GPU beyond the list restarts
    old = {**state, "cuda": [torch.tensor([3]), torch.tensor([4])]}
    checkpoint.set_rng_state(old, gpu1)
    assert calls == [("set", 4, gpu1)]
    with pytest.warns(UserWarning, match="no CUDA random state for GPU 5"):
        checkpoint.set_rng_state(old, torch.device("cuda", 5))
    assert len(calls) == 1


@needs_fmnist
def test_resume_into_fp16_grad_scaler_from_a_run_without_it(tmp_path):
    """A bf16/fp32/CPU run saves a disabled GradScaler's empty state; resuming it with fp16 (a fresh, enabled
    scaler) keeps the fresh scaler instead of failing. A saved enabled state is restored."""
    import argparse

    import train
    from engine.checkpoint import load_model
    from engine.optim import build_optimizer
    from engine.scheduler import build_scheduler
    run = tmp_path / "run"
    import config
    train.main(config.parse_args([*QUICK, "--output_dir", str(run)]))
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["scaler"] == {}

    def resume(state):
        torch.save({**ckpt, "scaler": state}, tmp_path / "r.pt")
        model, _ = load_model(ckpt)
        args = argparse.Namespace(**ckpt["args"])
        opt = build_optimizer(model, args, args.lr)
        sched = build_scheduler(opt, args, 8)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=True)  # stands in for CUDA's
        train.restore_run(str(tmp_path / "r.pt"), ckpt["model_config"], model,
                          {"optimizer": opt, "scheduler": sched, "scaler": scaler}, train.dist_utils.DistInfo())
        return scaler.get_scale()

    assert resume({}) == 2.0 ** 10
    assert resume(torch.amp.GradScaler("cpu", init_scale=8.0).state_dict()) == 8.0


def test_tta_logits_average_in_fp32_under_autocast():
    import train
    from engine.precision import make_precision
    from utils.misc import tta_views
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    torch.nn.init.normal_(model[1].weight, std=30.0, generator=g)  # large logits: bf16 sums would round
    images = torch.randint(0, 256, (64, 1, 4, 4), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (64,), generator=g)
    prec = make_precision(torch.device("cpu"), amp=True, amp_dtype="bf16")
    got = train.evaluate(model, [(images, labels)], prec, tta=True, tta_shift=1)

    x = images.float() / 255
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [model(v) for v in tta_views(x, flip=True, shift=1)]
    assert all(o.dtype == torch.bfloat16 for o in outs)
    mean32 = torch.stack([o.float() for o in outs]).sum(0) / len(outs)
    assert got["loss"] == pytest.approx(torch.nn.functional.cross_entropy(mean32, labels).item(), rel=1e-6)
    mean16 = (sum(outs) / len(outs)).float()  # what summing inside autocast gave
    assert not torch.equal(mean16, mean32)


def test_a_step_grad_scaler_skips_does_not_move_schedule_lookahead_or_ema():
    """fp16 overflow: GradScaler skips optimizer.step(); the lr schedule, lookahead and EMA must skip it too.
    A CPU GradScaler stands in for CUDA's; a gradient hook makes step 2 of 4 overflow."""
    import argparse

    import train
    from engine.precision import make_precision
    from engine.scheduler import build_scheduler
    from tricks.ema import ModelEMA
    from tricks.lookahead import Lookahead
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(**{**vars(__import__("config").parse_args([])), "epochs": 1, "warmup_epochs": 0.0})
    sched = build_scheduler(opt, args, 4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=True)
    look, ema = Lookahead(model, k=1, alpha=0.5), ModelEMA(model, decay=0.9)
    calls = [0]

    def overflow_on_second_step(g):
        calls[0] += 1
        return g * float("inf") if calls[0] == 2 else g
    model[1].weight.register_hook(overflow_on_second_step)
    batches = [(torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8), torch.randint(0, 3, (8,)))
               for _ in range(4)]
    prec = make_precision(torch.device("cpu"), amp=False)
    train.train_one_epoch(model, batches, opt, sched, train.make_criterion(), scaler, prec, 0,
                          train.StepTricks(lookahead=look, ema=ema))
    assert calls[0] == 4 and scaler.get_scale() == 2.0 ** 9  # one overflow: the scale halved once
    assert sched.iteration == 3 and look.steps == 3 and ema.num_updates == 3
