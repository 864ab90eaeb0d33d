"""The training loop: `train_one_epoch` and `evaluate`, and the one criterion.

Every trick enters `train_one_epoch` at one visible call point, in this order: progressive resize, batch mixing
(`mix`), adversarial inputs (`attack`), the distillation teacher, weight perturbation (`perturb_weights`: AWP,
SAM), forward + loss (InfoBatch's per-sample weights: `prune`), backward, restoring the weights, clipping, optimizer
and scaler step, schedule, `lookahead`, `ema`. train.py builds the tricks (each None when off) and hands them over
in one `StepTricks`.
"""
import contextlib
import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine import distributed as dist_utils
from utils.errors import UserError
from utils.misc import resize_square, topk_hits, tta_views

SYNC_EVERY = 50  # steps between host syncs of the training loss on a GPU


class NonFiniteLoss(UserError):
    pass


@dataclass
class StepTricks:
    """What acts inside a training step besides forward, backward and the optimizer: each trick None when off.

    mix: (x, y) -> (x, y_soft) (tricks/mix.py). attack: .perturb(model, x, y, loss) -> x_adv (tricks/adversarial.py),
    with `attack_loss` (the plain criterion, also the weight perturbation's). perturb_weights: .perturb(x, y, loss) /
    .restore() around the forward and backward, the gradient taken at perturbed weights applied at the restored ones
    (AWP, tricks/awp.py; SAM, tricks/sam.py).
    teacher: distillation, criterion(logits, y, teacher_logits). prune: InfoBatch (tricks/infobatch.py): the loader
    yields sample indices too and the loss is its weighted per-sample mean. lookahead, ema: stepped after every
    optimizer step. side: train at side x side (progressive resizing). clip_grad: max global grad norm (0 = off).
    freeze: the head-only phase of fine-tuning (tricks/freeze.py), which keeps the frozen BatchNorms in eval mode.
    accum_steps: gradients of K micro-batches summed before each optimizer step (the schedule, EMA, lookahead and
    clipping count optimizer steps; under DDP the inner micro-batches skip the gradient all-reduce).
    Two loop settings: sched_steps, schedule steps per full epoch (an epoch of fewer batches, pruned, steps the
    schedule proportionally more often so each epoch ends where a full one would; None = its optimizer steps),
    and sync_every, batches between host syncs for the non-finite-loss check (None: 1 on the CPU, where a sync
    is free, SYNC_EVERY elsewhere, where .item() every step would stall the device queue).
    """
    mix: Callable | None = None
    attack: Any = None
    attack_loss: Callable | None = None
    perturb_weights: Any = None
    teacher: torch.nn.Module | None = None
    prune: Any = None
    lookahead: Any = None
    ema: Any = None
    side: int | None = None
    clip_grad: float = 0.0
    freeze: Any = None
    accum_steps: int = 1
    sched_steps: int | None = None
    sync_every: int | None = None


def unwrap(model):
    """The plain module inside DDP and torch.compile wrappers (the EMA source and the attack target)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _non_finite(epoch, step, sync_every):
    where = f"epoch {epoch + 1} step {step + 1}" + ("" if sync_every == 1 else f" (checked every {sync_every} steps)")
    return NonFiniteLoss(f"loss became non-finite at {where}; the last good checkpoint is kept; "
                         f"lower --lr, add --warmup_epochs or --clip_grad")


def train_one_epoch(model, loader, optimizer, sched, criterion, scaler, prec, epoch, tricks=None, *,
                    progress=False):
    """One pass over the training data. `model` may be DDP/compile-wrapped. `sched` is stepped per optimizer step;
    None leaves the lr alone (the SWA phase sets it per epoch)."""
    t = tricks or StepTricks()
    unwrapped = unwrap(model)
    model.train()
    if t.freeze is not None:
        t.freeze.set_modes(unwrapped)  # linear probing: the frozen backbone's BatchNorms keep their statistics
    sync_every = t.sync_every or (1 if prec.device.type == "cpu" else SYNC_EVERY)
    loss_sum = torch.zeros((), dtype=torch.float64, device=prec.device)
    correct = torch.zeros((), dtype=torch.int64, device=prec.device)
    seen, t0 = 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not progress, dynamic_ncols=True)
    num_batches, accum = len(loader), t.accum_steps
    num_steps = math.ceil(num_batches / accum)  # optimizer steps this epoch
    sched_steps = t.sched_steps or num_steps
    took_step = [False]
    hook = optimizer.register_step_post_hook(lambda *_: took_step.__setitem__(0, True))
    for step, (x, y, *idx) in enumerate(bar):
        x, y = prec.to_input(x), y.to(prec.device, non_blocking=True)
        if t.side is not None:
            x = resize_square(x, t.side)  # progressive resizing: every trick below sees the resized batch
        if t.mix is not None:
            x, y = t.mix(x, y)  # soft targets; label smoothing stays inside the criterion
        if t.attack is not None:
            with prec.autocast():  # adversarial inputs, in [0, 1] pixel space; no DDP sync needed
                x = t.attack.perturb(unwrapped, x, y, t.attack_loss)
        teacher_logits = None
        if t.teacher is not None:
            with torch.no_grad(), prec.autocast():
                teacher_logits = t.teacher(x)  # sees exactly the student's (mixed, perturbed) batch
        if t.perturb_weights is not None:
            with prec.autocast():
                t.perturb_weights.perturb(x, y, t.attack_loss)  # weights w -> w + v (worst case near w)

        k, micro = divmod(step, accum)  # optimizer step k, its micro-batch `micro`
        group = min(accum, num_batches - k * accum)  # micro-batches summed into step k
        if micro == 0:
            optimizer.zero_grad(set_to_none=True)
        stepping = micro + 1 == group
        # inner micro-batches of DDP skip the gradient all-reduce; the last one reduces the sum
        with contextlib.nullcontext() if stepping or not hasattr(model, "no_sync") else model.no_sync():
            with prec.autocast():
                logits = model(x)
                if t.prune is not None:
                    loss = t.prune.batch_loss(criterion(logits, y, reduction="none"), idx[0])
                else:
                    loss = criterion(logits, y) if t.teacher is None else criterion(logits, y, teacher_logits)
            n = y.shape[0]
            loss_sum += loss.detach().double() * n
            if (step + 1) % sync_every == 0 and not dist_utils.all_finite(loss_sum.item(), prec.device):
                raise _non_finite(epoch, step, sync_every)  # on every rank together (all_finite is a collective)
            scaler.scale(loss / group).backward()  # the mean over the step's micro-batches, as one big batch
        if t.perturb_weights is not None:
            t.perturb_weights.restore()  # back to w exactly: the gradient taken at w + v is applied at w
        correct += topk_hits(logits.detach(), y, topk=(1,))[0]
        seen += n
        if not stepping:
            continue
        if t.clip_grad > 0:
            scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        took_step[0] = False
        scaler.step(optimizer)
        scaler.update()
        # an fp16 overflow: GradScaler skipped optimizer.step(); the schedule, lookahead and EMA skip this step
        # too, so they count only the steps the weights took (known from the optimizer's hook: no host sync)
        stepped = took_step[0]
        if sched is not None and stepped:
            for _ in range((k + 1) * sched_steps // num_steps - k * sched_steps // num_steps):
                sched.step()  # once per step, unless the epoch is shorter than sched_steps
        if t.lookahead is not None and stepped:
            t.lookahead.step()  # every k-th step: slow += alpha (fast - slow); fast = slow
        if t.ema is not None and stepped:
            t.ema.update(unwrapped)
        if progress and step % max(10, sync_every) == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}")
    hook.remove()
    loss_sum, correct, seen = dist_utils.all_reduce_sum([loss_sum.item(), correct.item(), seen], prec.device)
    if not math.isfinite(loss_sum):  # summed over ranks: a bad loss on any rank stops every rank here
        raise _non_finite(epoch, step, sync_every)
    seconds = time.perf_counter() - t0
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen,
            "images_per_second": seen / seconds, "epoch_seconds": seconds}


def evaluate(model, loader, prec, *, tta=False, tta_shift=0, robust=None, collect=False):
    """Loss, top-1 and top-5 over every sample exactly once (summed over processes).

    tta: average the logits of the image and its horizontal flip; tta_shift > 0: also of the image translated
    by +-tta_shift pixels (utils.misc.tta_views). robust: an attack (model, x, y) -> x_adv; also report the
    accuracy on its inputs (robust_acc, on the plain view). collect: also return the per-sample probabilities and
    targets (for the evaluation report).
    """
    model.eval()
    # running sums stay on the device (no host sync per batch); loss in float64, counts as integers
    loss_sum = torch.zeros((), dtype=torch.float64, device=prec.device)
    top1 = top5 = hits_adv = torch.zeros((), dtype=torch.int64, device=prec.device)
    n = 0
    probs, targets = [], []
    for x, y in loader:
        x, y = prec.to_input(x), y.to(prec.device, non_blocking=True)
        with torch.no_grad(), prec.autocast():
            views = tta_views(x, flip=tta, shift=tta_shift)
            logits = sum(model(v).float() for v in views) / len(views)  # average in fp32, not bf16/fp16
        hits1, hits5 = topk_hits(logits, y)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        top1, top5 = top1 + hits1, top5 + hits5
        n += y.shape[0]
        if robust is not None:
            with prec.autocast():
                x_adv = robust(model, x, y)
                with torch.no_grad():
                    hits_adv = hits_adv + (model(x_adv).argmax(1) == y).sum()
        if collect:
            probs.append(logits.softmax(1).cpu())
            targets.append(y.cpu())
    sums = [loss_sum.item(), top1.item(), top5.item(), hits_adv.item(), n]
    loss, top1, top5, hits_adv, n = dist_utils.all_reduce_sum(sums, prec.device)
    if n == 0:
        raise UserError("the evaluation split is empty; check --val_ratio/--eval_subset")
    out = {"loss": loss / n, "acc": top1 / n, "acc5": top5 / n}
    if robust is not None:
        out["robust_acc"] = hits_adv / n
    if collect:
        out["probs"], out["targets"] = torch.cat(probs), torch.cat(targets)
    return out


def make_criterion(label_smoothing=0.0, class_weights=None):
    """Cross-entropy on class indices or soft targets; the one place label smoothing is applied."""
    return functools.partial(F.cross_entropy, label_smoothing=label_smoothing, weight=class_weights)
