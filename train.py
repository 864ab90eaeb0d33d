"""Train an image classifier; every trick is a flag (see README.md) and off by default.

Read top to bottom: `main` builds data, model, optimiser and schedule, then the tricks (each an object
or None), then runs `for epoch: train_one_epoch(); evaluate(); save_checkpoint()`.
    python train.py                          # Fashion-MNIST, ResNet-20, the default recipe
    torchrun --nproc_per_node 2 train.py     # data-parallel
"""
import functools
import logging
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import config
from datasets import build_data, inverse_frequency_weights
from datasets.transforms import build_batch_augment, describe as describe_aug
from models import build_model, model_config, model_summary
from utils import distributed as dist_utils
from utils.adversarial import build_attack, pgd, pgd_eval_defaults
from utils.awp import AWP
from utils.budget import TimeBudget, eval_share, replan_schedule
from utils.checkpoint import get_rng_state, load_checkpoint, load_model, load_state, save_checkpoint, set_rng_state
from utils.ema import ModelEMA
from utils.ensemble import load_ensemble, train_ensemble
from utils.errors import UserError, run_cli
from utils.infobatch import InfoBatch, check_infobatch
from utils.init import init_weights, lsuv_init, whiten_stem, zero_init_residual
from utils.lookahead import Lookahead
from utils.logger import setup_logging
from utils.misc import (make_precision, resize_square, resolve_device, seed_everything, set_fp32_precision,
                        topk_hits, tta_views)
from utils.mix import build_mixer
from utils.optim import build_optimizer, scaled_lr
from utils.outputs import plot_curves, prepare_output_dir, write_json, write_metrics_csv
from utils.prog_resize import check_any_size, epoch_cost, train_size
from utils.report import loader_image_getter, write_eval_report
from utils.scheduler import build_scheduler, plot_lr
from utils.swa import SWA
from utils.tb import log_epoch, log_images, make_tb_writer

log = logging.getLogger("train")


class NonFiniteLoss(UserError):
    pass


SYNC_EVERY = 50  # steps between host syncs of the training loss on a GPU


def _non_finite(epoch, step, sync_every):
    where = f"epoch {epoch + 1} step {step + 1}" + ("" if sync_every == 1 else f" (checked every {sync_every} steps)")
    return NonFiniteLoss(f"loss became non-finite at {where}; the last good checkpoint is kept; "
                         f"lower --lr, add --warmup_epochs or --clip_grad")


def train_one_epoch(model, loader, optimizer, sched, criterion, scaler, prec, epoch, *, mix=None,
                    attack=None, attack_loss=None, awp=None, ema=None, unwrapped=None, step_sched=True,
                    clip_grad=0.0, teacher=None, progress=False, sync_every=None, lookahead=None, side=None,
                    prune=None, sched_steps=None):
    """One pass over the training data. Each trick enters at one visible call point.

    `model` may be DDP/compile-wrapped; `unwrapped` is the plain module (EMA source, attack target).
    side: train on images resized to side x side (--prog_resize); None keeps the loader's size.
    prune: an InfoBatch (--infobatch): the loader yields (x, y, sample indices) and the loss is its weighted
    per-sample mean. sched_steps: schedule steps per full epoch; an epoch of fewer batches (pruned) steps the
    schedule proportionally more often, so each epoch ends where a full one would.
    sync_every: steps between host syncs for the non-finite-loss check (default: 1 on the CPU, where a sync is
    free, SYNC_EVERY elsewhere, where .item() every step would stall the device queue).
    """
    unwrapped = unwrapped if unwrapped is not None else model
    model.train()
    if sync_every is None:
        sync_every = 1 if prec.device.type == "cpu" else SYNC_EVERY
    loss_sum = torch.zeros((), dtype=torch.float64, device=prec.device)
    correct = torch.zeros((), dtype=torch.int64, device=prec.device)
    seen, t0 = 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not progress, dynamic_ncols=True)
    num_steps = len(loader)
    sched_steps = sched_steps or num_steps
    took_step = [False]
    hook = optimizer.register_step_post_hook(lambda *_: took_step.__setitem__(0, True))
    for step, (x, y, *idx) in enumerate(bar):
        x, y = prec.to_input(x), y.to(prec.device, non_blocking=True)
        if side is not None:
            x = resize_square(x, side)  # progressive resizing: every trick below sees the resized batch
        if mix is not None:
            x, y = mix(x, y)  # soft targets; label smoothing stays inside the criterion
        if attack is not None:
            with prec.autocast():  # adversarial inputs, in [0, 1] pixel space; no DDP sync needed
                x = attack.perturb(unwrapped, x, y, attack_loss)
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad(), prec.autocast():
                teacher_logits = teacher(x)  # sees exactly the student's (mixed, perturbed) batch
        if awp is not None:
            with prec.autocast():
                awp.perturb(x, y, attack_loss)  # weights w -> w + v (worst case near w)

        optimizer.zero_grad(set_to_none=True)
        with prec.autocast():
            logits = model(x)
            if prune is not None:
                loss = prune.batch_loss(criterion(logits, y, reduction="none"), idx[0])
            else:
                loss = criterion(logits, y) if teacher is None else criterion(logits, y, teacher_logits)
        n = y.shape[0]
        loss_sum += loss.detach().double() * n
        if (step + 1) % sync_every == 0 and not dist_utils.all_finite(loss_sum.item(), prec.device):
            raise _non_finite(epoch, step, sync_every)  # on every rank together (all_finite is a collective)
        scaler.scale(loss).backward()
        if awp is not None:
            awp.restore()  # back to w exactly: the gradient taken at w + v is applied at w
        if clip_grad > 0:
            scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        took_step[0] = False
        scaler.step(optimizer)
        scaler.update()
        # an fp16 overflow: GradScaler skipped optimizer.step(); the schedule, lookahead and EMA skip this step
        # too, so they count only the steps the weights took (known from the optimizer's hook: no host sync)
        stepped = took_step[0]
        if step_sched and stepped:  # per-iteration schedule (SWA sets the lr per epoch instead)
            for _ in range((step + 1) * sched_steps // num_steps - step * sched_steps // num_steps):
                sched.step()  # once per step, unless the epoch is shorter than sched_steps
        if lookahead is not None and stepped:
            lookahead.step()  # every k-th step: slow += alpha (fast - slow); fast = slow
        if ema is not None and stepped:
            ema.update(unwrapped)

        correct += topk_hits(logits.detach(), y, topk=(1,))[0]
        seen += n
        if progress and step % max(10, sync_every) == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}")
    hook.remove()
    loss_sum, correct, seen = dist_utils.all_reduce_sum([loss_sum.item(), correct.item(), seen], prec.device)
    if not math.isfinite(loss_sum):  # summed over ranks: a bad loss on any rank stops every rank here
        raise _non_finite(epoch, step, sync_every)
    seconds = time.perf_counter() - t0
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen,
            "images_per_second": seen / seconds, "epoch_seconds": seconds}


def evaluate(model, loader, prec, *, tta=False, tta_shift=0, adv_eps=0.0, adv_steps=0, collect=False):
    """Loss, top-1 and top-5 over every sample exactly once (summed over processes).

    tta: average the logits of the image and its horizontal flip; tta_shift > 0: also of the image translated
    by +-tta_shift pixels (utils.misc.tta_views). adv_steps > 0: also PGD robust accuracy (on the plain view).
    collect: also return the per-sample probabilities and targets (for the evaluation report).
    """
    model.eval()
    # running sums stay on the device (no host sync per batch); loss in float64, counts as integers
    loss_sum = torch.zeros((), dtype=torch.float64, device=prec.device)
    top1 = top5 = robust = torch.zeros((), dtype=torch.int64, device=prec.device)
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
        if adv_steps > 0:
            with prec.autocast():
                x_adv = pgd(model, x, y, **pgd_eval_defaults(adv_eps, adv_steps))  # deterministic
                with torch.no_grad():
                    robust = robust + (model(x_adv).argmax(1) == y).sum()
        if collect:
            probs.append(logits.softmax(1).cpu())
            targets.append(y.cpu())
    sums = [loss_sum.item(), top1.item(), top5.item(), robust.item(), n]
    loss, top1, top5, robust, n = dist_utils.all_reduce_sum(sums, prec.device)
    if n == 0:
        raise UserError("the evaluation split is empty; check --val_ratio/--eval_subset")
    out = {"loss": loss / n, "acc": top1 / n, "acc5": top5 / n}
    if adv_steps > 0:
        out["robust_acc"] = robust / n
    if collect:
        out["probs"], out["targets"] = torch.cat(probs), torch.cat(targets)
    return out


def make_criterion(label_smoothing=0.0, class_weights=None):
    """Cross-entropy on class indices or soft targets; the one place label smoothing is applied."""
    return functools.partial(F.cross_entropy, label_smoothing=label_smoothing, weight=class_weights)


def whitening_batch(data, seed, n=5000):
    """Up to n training images (uint8) for --whiten_stem: a seeded random subset of an in-memory split, else
    the first (augmented) batches of the training loader."""
    if data.train_images is not None:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(data.train_images), generator=g)[:n]
        return data.train_images[idx.to(data.train_images.device)]
    batches, count = [], 0
    for x, *_ in data.train_loader:
        batches.append(x)
        count += len(x)
        if count >= n:
            break
    return torch.cat(batches)[:n]


def tta_kwargs(args):
    """evaluate()'s test-time augmentation keywords from the flags."""
    return dict(tta=args.tta, tta_shift=args.tta_shift)


def check_args(args):
    for name in ("batch_size", "epochs"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive (got {getattr(args, name)})")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive (got {args.lr})")
    if args.eval_only and not args.ckpt:
        raise UserError("--eval_only needs --ckpt PATH (a checkpoint written by train.py)")
    if args.resume and args.eval_only:
        raise UserError("--resume and --eval_only do not go together; use --eval_only --ckpt PATH")
    if args.ensemble < 1:
        raise UserError(f"--ensemble must be a number of members >= 1 (got {args.ensemble})")
    if args.ensemble > 1:
        clash = [f for f in ("eval_only", "resume", "plot_lr", "preview_aug", "swa") if getattr(args, f)]
        if clash:
            raise UserError(f"--ensemble {args.ensemble} does not go with --{clash[0]}; evaluate finished runs "
                            "with --eval_only --ckpt A.pt B.pt ..., or train one model")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("--ensemble starts its own processes; run it with plain python, not torchrun")
    if args.swa and args.swa_start >= args.epochs:
        raise UserError(f"--swa_start {args.swa_start} must be below --epochs {args.epochs}")
    if args.tta_shift < 0:
        raise UserError(f"--tta_shift must be 0 (off) or a number of pixels (got {args.tta_shift})")
    if args.eval_interval < 1:
        raise UserError(f"--eval_interval must be at least 1 (got {args.eval_interval})")
    if args.time_budget < 0:
        raise UserError(f"--time_budget must be a number of minutes > 0, or 0 for off (got {args.time_budget:g})")
    if args.time_budget and args.swa:
        raise UserError("--time_budget cannot move --swa_start with the planned epoch count; drop one of them, "
                        "or size --epochs for SWA yourself")
    if args.prog_resize and (args.prog_resize < 8 or not 0.0 < args.prog_resize_until <= 1.0):
        raise UserError(f"--prog_resize {args.prog_resize} / --prog_resize_until {args.prog_resize_until:g}: "
                        "the start side must be at least 8 px (0 = off) and the fraction in (0, 1], e.g. "
                        "--prog_resize 16 --prog_resize_until 0.75")
    if args.infobatch:
        check_infobatch(args)
    if args.eval_interval > 1 and args.scheduler == "plateau":
        raise UserError("--scheduler plateau steps on every epoch's validation accuracy; use --eval_interval 1")


def setup_run(args):
    """Device, precision, seeds and (on rank 0) the output directory and logging."""
    device = resolve_device(args.device, args.cuda, args.gpus, int(os.environ.get("LOCAL_RANK", "0")))
    dist = dist_utils.init_distributed(device.type == "cuda")
    if args.sync_bn and device.type != "cuda":
        raise UserError("--sync_bn needs CUDA (SyncBatchNorm does not run on CPU); drop it for CPU runs")
    set_fp32_precision(device, args.fp32_precision)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed + dist.rank, args.deterministic)
    writes = not (args.plot_lr or args.preview_aug)
    if not writes:  # a single picture, into --output_dir (default: here)
        args.output_dir = args.output_dir or "."
        os.makedirs(args.output_dir, exist_ok=True)
    else:
        if args.eval_only and args.output_dir is None:
            args.output_dir = os.path.join(os.path.dirname(os.path.abspath(args.ckpt[0])), "eval")
            os.makedirs(args.output_dir, exist_ok=True)
        elif dist.is_main:
            args.output_dir = prepare_output_dir(args.output_dir, args.model, args.dataset, args.resume,
                                                 args.overwrite or args.eval_only)
    setup_logging(os.path.join(args.output_dir, "train.log") if writes and dist.is_main else None, dist.is_main)
    prec = make_precision(device, args.amp, args.amp_dtype, args.channels_last)
    return dist, prec


def main(args, build_loss=None):
    """Train (or evaluate) as the flags say. `build_loss(args, data, prec, criterion)` lets
    train_distill.py swap the loss: it returns (criterion, teacher_or_None, extra_summary)."""
    started = time.perf_counter()  # --time_budget counts from here
    check_args(args)
    if build_loss is not None and args.infobatch:
        raise UserError("--infobatch is not supported by train_distill.py (its loss is not per sample); drop it")
    if build_loss is not None and args.ensemble > 1:
        raise UserError("--ensemble is a train.py flag; train_distill.py trains one student")
    dist, prec = setup_run(args)
    if args.ensemble > 1:
        return train_ensemble(args, prec, started, os.path.abspath(__file__),
                              lambda m, loader: evaluate(m, loader, prec, **tta_kwargs(args)))
    log.info(f"device {prec.device} | amp {prec.dtype if prec.enabled else 'off'} | "
             f"channels_last {prec.channels_last} | fp32 math {args.fp32_precision} | world size {dist.world_size} | "
             f"threads {torch.get_num_threads()}")

    # ---- data -------------------------------------------------------------------------------
    data = build_data(args, rank=dist.rank, world_size=dist.world_size, device=prec.device)
    steps_per_epoch = len(data.train_loader)
    if args.plot_lr:
        if args.time_budget:
            log.warning(f"--plot_lr draws the schedule for --epochs {args.epochs}; under --time_budget the run "
                        "fits it to the epochs that fit (cosine/onecycle/poly), known only while it runs")
        plot_lr(args, steps_per_epoch, args.output_dir, lr=scaled_lr(args, dist.world_size))
        return None
    if args.preview_aug:
        from utils.preview import save_aug_preview
        path = os.path.join(args.output_dir, "aug_preview.png")
        images = data.train_images[:64] if data.train_images is not None else next(iter(data.train_loader))[0]
        save_aug_preview(images, data.train_labels[:64], data.class_names, build_batch_augment(args, data.in_chans),
                         build_mixer(args, data.num_classes), path)
        return log.info(f"wrote {path}")
    if args.eval_only:
        summary = eval_only(args, data, prec, dist)
        dist_utils.cleanup()
        return summary

    # ---- model ------------------------------------------------------------------------------
    mcfg = model_config(args.model, data.num_classes, data.in_chans, data.img_size, data.mean, data.std,
                        args.attention, args.drop_path_rate, args.acb)
    model = build_model(**{k: v for k, v in mcfg.items() if k != "reparameterized"})
    params, flops = model_summary(model, data.in_chans, data.img_size)
    log.info(f"model {args.model}: {params / 1e6:.3f} M params, {flops / 1e6:.1f} MFLOPs per image")
    model.to(prec.device)
    if args.init == "lsuv":
        x0 = next(iter(data.train_loader))[0]
        lsuv_init(model, x0.float().div(255), args.lsuv_tol, args.lsuv_max_iter)
    elif args.init != "default":
        init_weights(model, args.init, args.init_mode, args.init_nonlinearity)
    if args.zero_init_residual:
        log.info(f"zero-init residual: {zero_init_residual(model)} blocks")  # after LSUV, which resets norms
    if args.whiten_stem:
        name, eigvals = whiten_stem(model, whitening_batch(data, args.seed).to(prec.device).float().div(255))
        log.info(f"whitened and froze {name}: patch eigenvalues {eigvals.max():.3g} .. {eigvals.min():.3g}")
    if args.prog_resize:
        check_any_size(model, args.prog_resize, data.img_size, data.in_chans, prec.device, args.model)
    if prec.channels_last:
        model.to(memory_format=torch.channels_last)
    dist_utils.broadcast_module(model)  # ranks seed differently: all start (and EMA/SWA copy) rank 0's init

    # ---- optimiser and schedule --------------------------------------------------------------
    lr = scaled_lr(args, dist.world_size)
    if lr != args.lr:
        log.info(f"linear scaling rule: lr {args.lr} x {args.batch_size * dist.world_size}/{args.lr_base_batch}"
                 f" = {lr:.5g}")
    optimizer = build_optimizer(model, args, lr)
    sched = build_scheduler(optimizer, args, steps_per_epoch)
    scaler = prec.scaler()
    class_weights = (inverse_frequency_weights(data.train_labels, data.num_classes).to(prec.device)
                     if args.class_weights == "auto" else None)
    criterion = make_criterion(args.label_smoothing, class_weights)
    attack_loss = criterion

    # ---- tricks: each is an object or None ---------------------------------------------------
    ema = ModelEMA(model, args.ema_decay, args.ema_warmup) if args.ema else None  # before DDP/compile
    lookahead = Lookahead(model, args.lookahead_k, args.lookahead_alpha) if args.lookahead_k else None
    swa = SWA(model, optimizer, args.swa_start, args.swa_lr, args.swa_anneal_epochs) if args.swa else None
    mix = build_mixer(args, data.num_classes)
    for line in describe_aug(args):
        log.info(f"aug: {line}")
    attack = build_attack(args)
    awp = AWP(model, args.awp_gamma) if args.adv == "awp" else None
    prune = (InfoBatch(len(data.train_labels), args.infobatch, args.infobatch_anneal, args.seed,
                       prec.device) if args.infobatch else None)
    teacher, extra_summary = None, {}
    if build_loss is not None:
        criterion, teacher, extra_summary = build_loss(args, data, prec, criterion)

    # ---- resume ------------------------------------------------------------------------------
    start_epoch, best_acc, history, metrics = 0, 0.0, [], {}
    if args.resume:
        start_epoch, best_acc, history, metrics = restore_run(
            args.resume, mcfg, model, optimizer, sched, scaler, ema, swa, dist, lookahead, prune)
    train_seconds = metrics.get("train_seconds", 0.0)
    epochs = (args.time_budget and metrics.get("planned_epochs")) or args.epochs  # a budget may plan fewer
    budget = None
    if args.time_budget:
        views = len(tta_views(torch.zeros(1, 1, 1, 1), args.tta, args.tta_shift))
        budget = TimeBudget(args.time_budget, args.epochs, args.eval_interval,
                            eval_share(len(data.val_loader), steps_per_epoch, views, ema is not None),
                            start=started, prior_s=metrics.get("wall_seconds") or train_seconds,
                            extra_evals=int(data.test_loader is not None))

    # ---- wrappers: DDP and compile see the model; EMA/checkpoints keep the unwrapped one --------
    train_model = model
    if args.sync_bn and not dist.enabled:
        log.warning("--sync_bn has no effect in a single process; it applies under torchrun")
    if dist.enabled:
        if args.sync_bn:
            train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[prec.device.index] if prec.device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)
    if dist.is_main:
        config.save_config(args, os.path.join(args.output_dir, "config.yaml"))
    tb = make_tb_writer(args.output_dir, args.tensorboard and dist.is_main)  # None when off
    if tb is not None:  # un-augmented training images; draws from no RNG (resume stays exact)
        first = torch.arange(min(16, len(data.train_labels)))
        log_images(tb, "train/images", loader_image_getter(data.train_loader)(first), 0)

    # ---- the loop ----------------------------------------------------------------------------
    progress = dist.is_main and not args.no_progress and os.isatty(1)
    val = {}
    adv_eval = dict(adv_eps=args.adv_eps, adv_steps=args.eval_adv_steps) if args.eval_adv == "pgd" else {}
    resize_cost = epoch_cost(data.img_size, args.prog_resize, args.prog_resize_until)  # 1 without --prog_resize

    def cost(k, e):  # epoch k's (1-based) share of a full epoch's time in a run of e epochs, for the budget
        return resize_cost(k, e) * (prune.cost(k, e) if prune is not None else 1.0)
    if budget is not None:
        budget.begin()
    for epoch in range(start_epoch, args.epochs):
        if epoch >= epochs:
            break
        data.train_loader.set_epoch(epoch)
        swa_on = swa is not None and swa.active(epoch)
        side = train_size(epoch, epochs, data.img_size, args.prog_resize, args.prog_resize_until)
        if prune is not None:
            selected = prune.select(epoch, epochs)
            data.train_loader.set_subset(selected)
        stats = train_one_epoch(
            train_model, data.train_loader, optimizer, sched, criterion, scaler, prec, epoch,
            mix=None if args.mix_off_epoch and epoch + 1 >= args.mix_off_epoch else mix,  # epochs count from 1
            attack=attack, attack_loss=attack_loss,
            awp=awp if awp is not None and epoch >= args.awp_start_epoch else None,
            ema=ema, unwrapped=model, step_sched=not swa_on, clip_grad=args.clip_grad,
            teacher=teacher, progress=progress, lookahead=lookahead, side=side if args.prog_resize else None,
            prune=prune, sched_steps=steps_per_epoch)
        train_seconds += stats["epoch_seconds"]
        if prune is not None:
            prune.end_epoch()  # a collective under torchrun: every rank gets every rank's new scores
        if dist.enabled:  # without --sync_bn each rank's BatchNorm statistics saw only its shard: evaluate and
            dist_utils.average_buffers(model)  # save one model, their average (timm's --dist_bn reduce)
            if ema is not None:
                dist_utils.average_buffers(ema.module)
        row = {"epoch": epoch + 1, **stats, "lr": optimizer.param_groups[0]["lr"]}
        if args.prog_resize:
            row["train_size"] = side
        if prune is not None:
            row["train_samples"] = len(selected) if selected is not None else len(data.train_labels)
        if budget is not None:
            done_cost = resize_cost(epoch + 1, epochs) * len(data.train_loader) / steps_per_epoch
            planned = budget.plan(epoch + 1, done_cost, cost)
            if epoch + 1 == epochs:  # the plan's last epoch: its schedule has annealed, so a late speed-up
                planned = epochs     # must not add epochs at lr ~0
            planned = dist_utils.all_gather_object(planned)[0]  # every rank follows rank 0
            if planned != epochs:
                log.info(f"time budget {args.time_budget:g} min: {budget.elapsed() / 60:.1f} min used, "
                         f"{'re-' if epoch else ''}planned {planned} epochs (was {epochs})")
                sched = replan_schedule(sched, optimizer, args, steps_per_epoch, planned)
                epochs = planned
        last = epoch + 1 == epochs
        if last or (epoch + 1) % args.eval_interval == 0:
            eval_start = time.perf_counter()
            report = last and not dist.enabled  # per-sample outputs for eval_report.md
            val = evaluate(model, data.val_loader, prec, collect=report, **tta_kwargs(args), **adv_eval)
            row.update(val_loss=val["loss"], val_acc=val["acc"], val_acc5=val["acc5"])
            if "robust_acc" in val:
                row["robust_val_acc"] = val["robust_acc"]
            if ema is not None:
                val_ema = evaluate(ema.module, data.val_loader, prec, **tta_kwargs(args))
                row.update(val_loss_ema=val_ema["loss"], val_acc_ema=val_ema["acc"])
            if budget is not None:
                budget.add_eval(time.perf_counter() - eval_start)
        if not swa_on:
            sched.step_epoch(row.get("val_acc"))  # only plateau acts on it (check_args: evaluated every epoch)
        else:
            swa.step_epoch(model, epoch)
        history.append(row)
        log_epoch(tb, row, epoch + 1)
        log.info(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        # a collective: every rank, outside the rank-0 block
        rng = dist_utils.all_gather_object(get_rng_state(prec.device))
        if dist.is_main:
            best = "val_acc" in row and row["val_acc"] > best_acc
            best_acc = max(best_acc, row.get("val_acc", 0.0))
            ckpt = {"model": model.state_dict(), "model_config": mcfg, "class_names": data.class_names,
                    "args": vars(args), "optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                    "swa": swa.state_dict() if swa is not None else None, "epoch": epoch + 1,
                    "lookahead": lookahead.state_dict() if lookahead is not None else None,
                    "infobatch": prune.state_dict() if prune is not None else None,
                    "rng": rng[0], "rng_ranks": rng if dist.enabled else None, "best_val_acc": best_acc,
                    "metrics": {"history": history, "train_seconds": train_seconds,
                                "planned_epochs": epochs if budget is not None else None,
                                "wall_seconds": budget.elapsed() if budget is not None else None}}
            save_checkpoint(ckpt, os.path.join(args.output_dir, "last.pt"))
            if best:
                save_checkpoint(ckpt, os.path.join(args.output_dir, "best.pt"))
            write_metrics_csv(os.path.join(args.output_dir, "metrics.csv"), history)
            plot_curves(os.path.join(args.output_dir, "curves.png"), history)

    # ---- end of training: evaluation report, SWA batch-norm update, test split, summary ----------
    if prune is not None:
        data.train_loader.set_subset(None)  # SWA's batch-norm statistics see every sample
    if dist.is_main and "probs" in val:
        write_eval_report(args.output_dir, val["probs"], val["targets"], data.class_names,
                          loader_image_getter(data.val_loader))
    if tb is not None:
        tb.close()
    if budget is not None:
        extra_summary.update(time_budget_minutes=args.time_budget, planned_epochs=epochs)
    summary = summarize_run(args, data, prec, dist, model, ema, swa, mcfg, history, best_acc, train_seconds,
                            {"params": params, "flops": flops, **extra_summary})
    dist_utils.cleanup()
    return summary


def restore_run(path, mcfg, model, optimizer, sched, scaler, ema, swa, dist, lookahead=None, prune=None):
    """--resume: load every piece of state back; returns (start_epoch, best_acc, history, metrics dict)."""
    ckpt = load_checkpoint(path)
    if ckpt["model_config"] != mcfg:
        raise UserError(f"{path} was trained with model settings {ckpt['model_config']['name']}/"
                        f"{ckpt['model_config']['num_classes']} classes that differ from these flags; "
                        f"resume with the run's own config.yaml (--config) or start a new run")
    load_state(model, ckpt["model"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):  # a run without fp16 saved a disabled scaler's empty state
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("ema"):
        ema.load_state_dict(ckpt["ema"])
    if swa is not None and ckpt.get("swa"):
        swa.load_state_dict(ckpt["swa"])
    if lookahead is not None and ckpt.get("lookahead"):
        lookahead.load_state_dict(ckpt["lookahead"])
    if prune is not None and ckpt.get("infobatch"):
        prune.load_state_dict(ckpt["infobatch"])
    rng = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if len(rng) == dist.world_size:
        # each rank continues its own augmentation stream
        set_rng_state(rng[dist.rank], next(model.parameters()).device)
    else:
        log.warning(f"{path} was saved by {len(rng)} process(es), this run has {dist.world_size}: "
                    f"random augmentation streams restart from --seed")
    log.info(f"resumed from {path} at epoch {ckpt['epoch']}")
    return ckpt["epoch"], ckpt["best_val_acc"], ckpt["metrics"]["history"], ckpt["metrics"]


def summarize_run(args, data, prec, dist, model, ema, swa, mcfg, history, best_acc, train_seconds, extra):
    """summary.json: final/best accuracy, the averaged models (EMA, SWA) and the test split when separate."""
    final = history[-1]
    summary = {"model": args.model, "dataset": args.dataset, "val_split": data.val_name,
               "epochs": len(history), "final_val_acc": final["val_acc"], "best_val_acc": best_acc,
               "final_val_acc5": final["val_acc5"], "train_seconds": train_seconds,
               "images_per_second": sum(r["images_per_second"] for r in history) / len(history), **extra}
    if ema is not None:
        summary.update(final_val_acc_ema=final["val_acc_ema"], best_val_acc_ema=max(r["val_acc_ema"] for r in history if "val_acc_ema" in r))
    if "robust_val_acc" in final:
        summary["robust_val_acc"] = final["robust_val_acc"]
    if swa is not None:
        swa.finalize(data.train_loader, prec.device)
        dist_utils.average_buffers(swa.module)  # each rank re-estimated BatchNorm on its own shard
        summary["swa_val_acc"] = evaluate(swa.module, data.val_loader, prec, **tta_kwargs(args))["acc"]
        if data.test_loader is not None:
            summary["test_acc_swa"] = evaluate(swa.module, data.test_loader, prec, **tta_kwargs(args))["acc"]
        elif data.val_name == "test":
            summary["test_acc_swa"] = summary["swa_val_acc"]
        if dist.is_main:
            save_checkpoint({"model": swa.module.state_dict(), "model_config": mcfg, "class_names": data.class_names,
                             "args": vars(args), "epoch": args.epochs}, os.path.join(args.output_dir, "swa.pt"))
    if data.test_loader is not None:
        summary["test_acc"] = evaluate(model, data.test_loader, prec, **tta_kwargs(args))["acc"]
        if ema is not None:
            summary["test_acc_ema"] = evaluate(ema.module, data.test_loader, prec, **tta_kwargs(args))["acc"]
    elif data.val_name == "test":
        summary["test_acc"] = final["val_acc"]  # the validation split is the official test split
        if ema is not None:
            summary["test_acc_ema"] = final["val_acc_ema"]
    if dist.is_main:
        write_json(os.path.join(args.output_dir, "summary.json"), summary)
        log.info(f"done: final {data.val_name} acc {final['val_acc']:.4f}, best {best_acc:.4f}, "
                 f"{train_seconds:.0f} s training -> {args.output_dir}")
    return summary


def eval_only(args, data, prec, dist):
    """--eval_only --ckpt PATH [PATH ...]: evaluate a train-form, averaged, SWA or deploy checkpoint, or the
    ensemble (mean softmax) of several."""
    if len(args.ckpt) == 1:
        model, ckpt = load_model(args.ckpt[0], use_ema=args.use_ema)
    else:
        model, ckpt = load_ensemble(args.ckpt, use_ema=args.use_ema)
    name = args.ckpt[0] if len(args.ckpt) == 1 else args.ckpt
    if ckpt["model_config"]["num_classes"] != data.num_classes:
        raise UserError(f"{args.ckpt[0]} predicts {ckpt['model_config']['num_classes']} classes but the data has "
                        f"{data.num_classes}; evaluate it on the dataset it was trained on")
    model.to(prec.device)
    adv = dict(adv_eps=args.adv_eps, adv_steps=args.eval_adv_steps) if args.eval_adv == "pgd" else {}
    res = evaluate(model, data.val_loader, prec, collect=not dist.enabled, **tta_kwargs(args), **adv)
    summary = {"ckpt": name, "val_split": data.val_name, "val_acc": res["acc"], "val_acc5": res["acc5"],
               "val_loss": res["loss"], **({"robust_val_acc": res["robust_acc"]} if "robust_acc" in res else {})}
    if data.test_loader is not None:
        summary["test_acc"] = evaluate(model, data.test_loader, prec, **tta_kwargs(args))["acc"]
    if dist.is_main:
        write_json(os.path.join(args.output_dir, "eval_summary.json"), summary)
        if "probs" in res:
            write_eval_report(args.output_dir, res["probs"], res["targets"], data.class_names,
                              loader_image_getter(data.val_loader))
        log.info(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    return summary


if __name__ == "__main__":
    run_cli(lambda: main(config.parse_args()))
