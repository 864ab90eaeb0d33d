"""Train an image classifier; every trick is a flag (see README.md) and off by default.

Read top to bottom: `main` builds data, model, optimiser and schedule, then the tricks (each an object
or None), then runs `for epoch: train_one_epoch(); evaluate(); save_checkpoint()`.
    python train.py                          # Fashion-MNIST, ResNet-20, the default recipe
    torchrun --nproc_per_node 2 train.py     # data-parallel
"""
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time

import torch

import config
from config import infobatch_clash, options, resolve_infobatch
from datasets import DataOptions, build_data, inverse_frequency_weights
from datasets.transforms import build_batch_augment
from datasets.transforms import describe as describe_aug
from engine import distributed as dist_utils
from engine.budget import TimeBudget, eval_share, replan_schedule
from engine.checkpoint import (
    get_rng_state,
    load_checkpoint,
    load_model,
    load_state,
    load_states,
    save_checkpoint,
    save_states,
    set_rng_state,
)
from engine.ensemble import load_ensemble, member_threads, train_members
from engine.loop import NonFiniteLoss, StepTricks, evaluate, make_criterion, train_one_epoch, unwrap  # noqa: F401
from engine.optim import OptimizerOptions, build_optimizer, scaled_lr
from engine.precision import choose_amp, decision_record, make_precision, recorded_mode, set_fp32_precision
from engine.scheduler import OWN_WARMUP, ScheduleOptions, build_scheduler, plot_lr
from models import build_model, model_config, model_summary
from models.pretrained import fetch_weights, load_pretrained, stats_for
from reporting.report import loader_image_getter, write_eval_report
from reporting.tb import log_epoch, log_images, make_tb_writer
from tricks.adversarial import AdvOptions, build_attack, pgd, pgd_eval_defaults
from tricks.awp import AWP
from tricks.ema import ModelEMA
from tricks.freeze import FreezeBackbone
from tricks.infobatch import InfoBatch, check_infobatch
from tricks.init import init_weights, lsuv_init, whiten_stem, zero_init_residual
from tricks.lookahead import Lookahead
from tricks.mix import MixOptions, build_mixer
from tricks.prog_resize import check_any_size, epoch_cost, train_size
from tricks.sam import SAM
from tricks.swa import SWA
from utils.errors import Interrupted, UserError, run_cli
from utils.logger import setup_logging
from utils.misc import resolve_device, seed_everything, tta_views
from utils.outputs import eval_dir, plot_curves, prepare_output_dir, write_json, write_metrics_csv

log = logging.getLogger("train")


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


def schedule_options(args, world_size):
    """The schedule's options. The linear scaling rule (--lr_base_batch) scales every absolute lr in them
    (--min_lr, --warmup_lr_init, --cyclic_base_lr; --swa_lr too) by the factor it applies to --lr."""
    k = scaled_lr(options(OptimizerOptions, args), world_size) / args.lr
    return options(ScheduleOptions, args, lr=args.lr * k, min_lr=args.min_lr * k,
                   warmup_lr_init=args.warmup_lr_init * k, cyclic_base_lr=args.cyclic_base_lr * k)


def data_options(args):
    """build_data's options from the flags (InfoBatch needs the sample indices with each batch)."""
    return options(DataOptions, args, with_index=args.infobatch not in ("auto", 0))  # auto: check_args decides


def robust_attack(args):
    """--eval_adv pgd: the deterministic PGD that evaluate() measures robust accuracy with; None when off."""
    if args.eval_adv != "pgd":
        return None
    return functools.partial(pgd, **pgd_eval_defaults(args.adv_eps, args.eval_adv_steps))


def tta_kwargs(args):
    """evaluate()'s test-time augmentation keywords from the flags."""
    return dict(tta=args.tta, tta_shift=args.tta_shift)


def weight_perturbation(args, model):
    """The weights perturbed inside each step (the loop's perturb_weights): AWP for --adv awp, SAM (ASAM with
    --sam_adaptive) for --opt sam, else None. Built after the model is on its device and in its memory format."""
    if args.adv == "awp":
        return AWP(model, args.awp_gamma)
    return SAM(model, args.sam_rho, args.sam_adaptive) if args.opt == "sam" else None


def check_args(args, distill=False):
    if args.freeze_epochs and args.freeze_epochs >= args.epochs:
        raise UserError(f"--freeze_epochs {args.freeze_epochs} leaves no epoch to fine-tune in --epochs "
                        f"{args.epochs}; freeze for fewer epochs")
    if args.pretrained and (args.init != "default" or args.zero_init_residual or args.whiten_stem):
        raise UserError("--init, --zero_init_residual and --whiten_stem would overwrite the pretrained weights; "
                        "drop them or --pretrained")
    if args.opt == "sam" and (args.adv == "awp" or args.awp_start_epoch):
        raise UserError("--opt sam and --adv awp both perturb the weights inside each step (SAM from the first "
                        "epoch: no --awp_start_epoch); pick one")
    if args.accum_steps > 1 and args.adv == "awp":
        raise UserError("--adv awp takes its own gradient inside each step; it does not combine with "
                        "--accum_steps (use a larger --batch_size)")
    resolve_infobatch(args, distill)  # --infobatch auto -> a rate
    if distill and args.ensemble > 1:
        raise UserError("--ensemble is a train.py flag; train_distill.py trains one student")
    # single values are range-checked with the flags (config.RANGES); here: what flags mean together
    if args.eval_only and not args.ckpt:
        raise UserError("--eval_only needs --ckpt PATH (a checkpoint written by train.py)")
    if args.resume and args.eval_only:
        raise UserError("--resume and --eval_only do not go together; use --eval_only --ckpt PATH")
    if args.ensemble > 1:
        clash = [f for f in ("eval_only", "resume", "plot_lr", "preview_aug", "swa") if getattr(args, f)]
        if clash:
            raise UserError(f"--ensemble {args.ensemble} does not go with --{clash[0]}; evaluate finished runs "
                            "with --eval_only --ckpt A.pt B.pt ..., or train one model")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("--ensemble starts its own processes; run it with plain python, not torchrun")
    if args.swa and args.swa_start >= args.epochs:
        raise UserError(f"--swa_start {args.swa_start} must be below --epochs {args.epochs}")
    if args.time_budget and args.swa:
        raise UserError("--time_budget cannot move --swa_start with the planned epoch count; drop one of them, "
                        "or size --epochs for SWA yourself")
    if args.prog_resize and (args.prog_resize < 8 or not 0.0 < args.prog_resize_until <= 1.0):
        raise UserError(f"--prog_resize {args.prog_resize} / --prog_resize_until {args.prog_resize_until:g}: "
                        "the start side must be at least 8 px (0 = off) and the fraction in (0, 1], e.g. "
                        "--prog_resize 16 --prog_resize_until 0.75")
    if args.infobatch:  # per-sample losses of plain (unmixed, clean) samples drawn without replacement
        check_infobatch(args.infobatch, args.infobatch_anneal)
        clash = infobatch_clash(args, distill)
        if clash:
            raise UserError(f"--infobatch {args.infobatch:g} does not combine with {clash}; drop one of them "
                            "(--infobatch 0 or auto turns pruning off)")
    if args.eval_interval != 1 and args.scheduler == "plateau":
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
        if args.eval_only:
            args.output_dir = eval_dir(args.ckpt[0], args.output_dir, args.overwrite) if dist.is_main \
                else args.output_dir
        elif dist.is_main:
            args.output_dir = prepare_output_dir(args.output_dir, args.model, args.dataset, args.resume,
                                                 args.overwrite)
    setup_logging(os.path.join(args.output_dir, "train.log") if writes and dist.is_main else None, dist.is_main)
    if args.warmup_epochs >= args.epochs and args.scheduler not in OWN_WARMUP and not args.eval_only:
        # the first thing a user tries (`--epochs 1` with the default 1-epoch warmup) trains: warm up for half
        warmup = args.epochs / 2
        log.warning(f"--warmup_epochs {args.warmup_epochs:g} would leave no epochs of --scheduler "
                    f"{args.scheduler} in {args.epochs} epoch(s); warming up for {warmup:g} instead")
        args.warmup_epochs = warmup
    prec = make_precision(device, args.amp, args.amp_dtype, args.channels_last)
    if args.ensemble == 1:  # an ensemble's members log their own
        log.info(f"device {prec.device} | amp {prec.mode} | channels_last "
                 f"{prec.channels_last} | fp32 math {args.fp32_precision} | world size {dist.world_size} | "
                 f"threads {torch.get_num_threads()}")
    return dist, prec


def build_model_for(args, data, prec, resumed=None):
    """The model the flags describe, initialised (--init, --zero_init_residual, --whiten_stem) and on the device,
    with its config (saved in every checkpoint), its size and the precision (--amp auto decided on it, or kept from
    `resumed`, the --resume checkpoint)."""
    weights = fetch_weights(args.model, args.pretrained, args.pretrained_use_ema) if args.pretrained else None
    # normalisation follows the weights' statistics when pretrained, the data's otherwise
    mean, std = stats_for(weights.stats, data.in_chans) if weights and weights.stats else (data.mean, data.std)
    mcfg = model_config(args.model, data.num_classes, data.in_chans, data.img_size, mean, std,
                        args.attention, args.drop_path_rate, args.acb, stem=weights.stem if weights else None)
    model = build_model(**{k: v for k, v in mcfg.items() if k != "reparameterized"})
    if weights is not None:  # a head trained on other classes (of the same count, too) starts fresh
        reset = weights.class_names is not None and list(weights.class_names) != list(data.class_names)
        load_pretrained(model.net, weights.state, weights.source, reset_head=reset)
    params, flops = model_summary(model, data.in_chans, data.img_size)
    log.info(f"model {args.model}: {params / 1e6:.3f} M params, {flops / 1e6:.1f} MFLOPs per image")
    model.to(prec.device)
    if args.init == "lsuv":
        x0 = next(iter(data.train_loader))[0]
        lsuv_init(model, x0.float().div(255), args.lsuv_tol, args.lsuv_max_iter)
    elif args.init != "default":
        init_weights(model, args.init, args.init_mode, args.init_nonlinearity, std=args.init_std)
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
    recorded = recorded_mode(resumed.get("amp"), prec.device) if resumed is not None and prec.auto else None
    prec, amp_line = choose_amp(prec, model, data.in_chans, data.img_size, args.batch_size, recorded=recorded)
    if amp_line:
        log.info(amp_line)
    return model, mcfg, {"params": params, "flops": flops}, prec


def wrap_for_training(model, args, dist, prec):
    """DDP and torch.compile see the model; EMA, evaluation and checkpoints keep the unwrapped one."""
    if args.sync_bn and not dist.enabled:
        log.warning("--sync_bn has no effect in a single process; it applies under torchrun")
    if dist.enabled:
        if args.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(  # a frozen backbone sends no gradients for a while
            model, device_ids=[prec.device.index] if prec.device.type == "cuda" else None,
            find_unused_parameters=args.freeze_epochs > 0)
    return torch.compile(model) if args.compile else model


def draw_only(args, data, dist):
    """--plot_lr / --preview_aug: one picture into --output_dir, no training."""
    if args.plot_lr:
        if args.time_budget:
            log.warning(f"--plot_lr draws the schedule for --epochs {args.epochs}; under --time_budget the run "
                        "fits it to the epochs that fit (cosine/onecycle/poly), known only while it runs")
        return plot_lr(schedule_options(args, dist.world_size), len(data.train_loader), args.output_dir,
                       lr=scaled_lr(options(OptimizerOptions, args), dist.world_size))
    from reporting.preview import save_aug_preview
    path = os.path.join(args.output_dir, "aug_preview.png")
    images = data.train_images[:64] if data.train_images is not None else next(iter(data.train_loader))[0]
    save_aug_preview(images, data.train_labels[:64], data.class_names,
                     build_batch_augment(data_options(args), data.in_chans),
                     build_mixer(options(MixOptions, args), data.num_classes), path)
    log.info(f"wrote {path}")


def main(args, build_loss=None):
    """Train (or evaluate) as the flags say. `build_loss(args, data, prec, criterion)` lets
    train_distill.py swap the loss: it returns (criterion, teacher_or_None, extra_summary)."""
    started = time.perf_counter()  # --time_budget counts from here
    check_args(args, distill=build_loss is not None)
    dist, prec = setup_run(args)
    if args.ensemble > 1:
        return run_ensemble(args, prec, started, lambda m, loader: evaluate(m, loader, prec, **tta_kwargs(args)))
    # ---- data -------------------------------------------------------------------------------
    data = build_data(data_options(args), rank=dist.rank, world_size=dist.world_size, device=prec.device)
    if args.tta_shift >= data.img_size:
        raise UserError(f"--tta_shift {args.tta_shift} moves a {data.img_size}-pixel image out of view; use 1-2 px")
    steps_per_epoch = math.ceil(len(data.train_loader) / args.accum_steps)  # optimizer steps
    if args.plot_lr or args.preview_aug:
        return draw_only(args, data, dist)
    if args.eval_only:
        summary = eval_only(args, data, prec, dist)
        dist_utils.cleanup()
        return summary

    # ---- model, optimiser and schedule --------------------------------------------------------
    resumed = load_checkpoint(args.resume) if args.resume else None  # read once, fails before any training
    model, mcfg, size, prec = build_model_for(args, data, prec, resumed)  # prec: --amp auto decided on the model
    lr = scaled_lr(options(OptimizerOptions, args), dist.world_size)
    if lr != args.lr:
        log.info(f"linear scaling rule: lr {args.lr} x {args.batch_size * dist.world_size}/{args.lr_base_batch}"
                 f" = {lr:.5g}")
    optimizer = build_optimizer(model, options(OptimizerOptions, args), lr)
    sched = build_scheduler(optimizer, schedule_options(args, dist.world_size), steps_per_epoch)
    scaler = prec.scaler()
    class_weights = (inverse_frequency_weights(data.train_labels, data.num_classes).to(prec.device)
                     if args.class_weights == "auto" else None)
    criterion = make_criterion(args.label_smoothing, class_weights)

    # ---- tricks: each is an object or None ---------------------------------------------------
    ema = ModelEMA(model, args.ema_decay, args.ema_warmup) if args.ema else None  # before DDP/compile
    swa = SWA(model, optimizer, args.swa_start, args.swa_lr * lr / args.lr, args.swa_anneal_epochs) \
        if args.swa else None  # --swa_lr scaled as --lr is
    for line in describe_aug(data_options(args)):
        log.info(f"aug: {line}")
    tricks = StepTricks(
        mix=build_mixer(options(MixOptions, args), data.num_classes), attack=build_attack(options(AdvOptions, args)),
        attack_loss=criterion,
        perturb_weights=weight_perturbation(args, model),
        prune=(InfoBatch(len(data.train_labels), args.infobatch, args.infobatch_anneal, args.seed, prec.device)
               if args.infobatch else None),
        lookahead=Lookahead(model, args.lookahead_k, args.lookahead_alpha) if args.lookahead_k else None,
        ema=ema, clip_grad=args.clip_grad, accum_steps=args.accum_steps, sched_steps=steps_per_epoch,
        freeze=FreezeBackbone(model, args.freeze_epochs) if args.freeze_epochs else None)
    criterion, tricks.teacher, extra_summary = (build_loss(args, data, prec, criterion) if build_loss is not None
                                                else (criterion, None, {}))  # train_distill.py's loss
    robust = robust_attack(args)
    # checkpoint and resume loop over these: a name, state_dict() and load_state_dict() each
    stateful = {name: part for name, part in dict(
        optimizer=optimizer, scheduler=sched, scaler=scaler, ema=ema, swa=swa, lookahead=tricks.lookahead,
        infobatch=tricks.prune).items() if part is not None}

    # ---- resume, budget, wrappers -------------------------------------------------------------
    run = restore_run(args.resume, mcfg, model, stateful, dist, resumed) if args.resume else RunState()
    epochs = (args.time_budget and run.planned_epochs) or args.epochs  # a budget may plan fewer
    budget = make_budget(args, data, started, run, ema is not None)
    train_model = wrap_for_training(model, args, dist, prec)
    if dist.is_main:
        config.save_config(args, os.path.join(args.output_dir, "config.yaml"))
    tb = make_tb_writer(args.output_dir, args.tensorboard and dist.is_main)  # None when off
    if tb is not None:  # un-augmented training images; draws from no RNG (resume stays exact)
        first = torch.arange(min(16, len(data.train_labels)))
        log_images(tb, "train/images", loader_image_getter(data.train_loader)(first), 0)

    # ---- the loop ----------------------------------------------------------------------------
    progress = dist.is_main and args.progress and os.isatty(1)
    val = {}
    resize_cost = epoch_cost(data.img_size, args.prog_resize, args.prog_resize_until)  # 1 without --prog_resize
    prune = tricks.prune

    def cost(k, e):  # epoch k's (1-based) share of a full epoch's time in a run of e epochs, for the budget
        return resize_cost(k, e) * (prune.cost(k, e) if prune is not None else 1.0)
    if budget is not None:
        budget.begin()
    for epoch in range(run.epoch, args.epochs):
        if epoch >= epochs:  # the budget planned fewer epochs
            break
        data.train_loader.set_epoch(epoch)
        swa_on = swa is not None and swa.active(epoch)
        side = train_size(epoch, epochs, data.img_size, args.prog_resize, args.prog_resize_until)
        selected = prune.select(epoch, epochs) if prune is not None else None
        if prune is not None:
            data.train_loader.set_subset(selected)
        epoch_tricks = dataclasses.replace(
            tricks, side=side if args.prog_resize else None,
            mix=None if args.mix_off_epoch and epoch + 1 >= args.mix_off_epoch else tricks.mix,  # epochs from 1
            perturb_weights=tricks.perturb_weights if epoch >= args.awp_start_epoch else None,
            freeze=tricks.freeze if tricks.freeze is not None and tricks.freeze.begin_epoch(epoch) else None)
        stats = train_one_epoch(train_model, data.train_loader, optimizer, None if swa_on else sched, criterion,
                                scaler, prec, epoch, epoch_tricks, progress=progress)
        run.train_seconds += stats["epoch_seconds"]
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
            planned = replan(budget, epoch, epochs, resize_cost(epoch + 1, epochs) * len(data.train_loader)
                             / steps_per_epoch, cost, args.time_budget)
            if planned != epochs:
                sched = stateful["scheduler"] = replan_schedule(
                    sched, optimizer, schedule_options(args, dist.world_size), steps_per_epoch, planned)
                epochs = planned
        last = epoch + 1 == epochs
        if last or (args.eval_interval and (epoch + 1) % args.eval_interval == 0):
            eval_start = time.perf_counter()
            report = last and not dist.enabled  # per-sample outputs for eval_report.md
            val = evaluate(model, data.val_loader, prec, collect=report, robust=robust, **tta_kwargs(args))
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
        run.history.append(row)
        run.planned_epochs = epochs if budget is not None else None
        log_epoch(tb, row, epoch + 1)
        log.info(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        save_run(args, dist, prec, model, mcfg, data.class_names, stateful, run, budget)

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
    summary = summarize_run(args, data, prec, dist, model, ema, swa, mcfg, run, {**size, **extra_summary})
    dist_utils.cleanup()
    return summary


@dataclasses.dataclass
class RunState:
    """What the loop carries from epoch to epoch, and a checkpoint carries across a resume."""
    epoch: int = 0  # epochs done
    best_acc: float = 0.0
    history: list = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0
    planned_epochs: int | None = None  # under --time_budget
    wall_seconds: float | None = None


def make_budget(args, data, started, run, with_ema):
    """--time_budget: a TimeBudget that re-plans the epoch count after every epoch (None when off)."""
    if not args.time_budget:
        return None
    views = len(tta_views(torch.zeros(1, 1, 1, 1), args.tta, args.tta_shift))
    return TimeBudget(args.time_budget, args.epochs, args.eval_interval,
                      eval_share(len(data.val_loader), len(data.train_loader), views, with_ema),
                      start=started, prior_s=run.wall_seconds or run.train_seconds,
                      extra_evals=int(data.test_loader is not None))


def replan(budget, epoch, epochs, done_cost, cost, minutes):
    """The epoch count the budget allows after `epoch` (0-based) finished, the same on every rank."""
    planned = budget.plan(epoch + 1, done_cost, cost)
    if epoch + 1 == epochs:  # the plan's last epoch: its schedule has annealed, so a late speed-up
        planned = epochs     # must not add epochs at lr ~0
    planned = dist_utils.all_gather_object(planned)[0]  # every rank follows rank 0
    if planned != epochs:
        log.info(f"time budget {minutes:g} min: {budget.elapsed() / 60:.1f} min used, "
                 f"{'re-' if epoch else ''}planned {planned} epochs (was {epochs})")
    return planned


def save_run(args, dist, prec, model, mcfg, class_names, stateful, run, budget):
    """End of an epoch: last.pt (and best.pt when the validation accuracy improved), metrics.csv, curves.png."""
    row = run.history[-1]
    rng = dist_utils.all_gather_object(get_rng_state(prec.device))  # a collective: every rank, before the rank-0 block
    if not dist.is_main:
        return
    best = "val_acc" in row and row["val_acc"] > run.best_acc
    run.best_acc = max(run.best_acc, row.get("val_acc", 0.0))
    ckpt = {"model": model.state_dict(), "model_config": mcfg, "class_names": class_names, "args": vars(args),
            **save_states(stateful), "epoch": row["epoch"], "rng": rng[0], "rng_ranks": rng if dist.enabled else None,
            "amp": decision_record(prec),
            "best_val_acc": run.best_acc,
            "metrics": {"history": run.history, "train_seconds": run.train_seconds,
                        "planned_epochs": run.planned_epochs,
                        "wall_seconds": budget.elapsed() if budget is not None else None}}
    save_checkpoint(ckpt, os.path.join(args.output_dir, "last.pt"))
    if best:
        save_checkpoint(ckpt, os.path.join(args.output_dir, "best.pt"))
    write_metrics_csv(os.path.join(args.output_dir, "metrics.csv"), run.history)
    plot_curves(os.path.join(args.output_dir, "curves.png"), run.history)


def restore_run(path, mcfg, model, stateful, dist, ckpt=None):
    """--resume: load the weights and every stateful part back (from `ckpt`, the file at `path` already loaded, or
    from `path`); returns the RunState to continue from."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    m = ckpt.get("metrics")
    if not isinstance(ckpt.get("model_config"), dict) or not isinstance(m, dict) or "epoch" not in ckpt:
        raise UserError(f"{path} is not a train.py last.pt (it lacks model_config, epoch or metrics); evaluate a "
                        f"finished model with --eval_only --ckpt {path}, or start a new run")
    if not (isinstance(ckpt["epoch"], int) and ckpt["epoch"] >= 0 and isinstance(m.get("history"), list)
            and isinstance(ckpt.get("best_val_acc", 0.0), (int, float)) and isinstance(ckpt.get("rng"), dict)):
        raise UserError(f"{path} has a damaged training state (epoch, metrics history, best accuracy or random "
                        f"state of the wrong type); resume from an untouched last.pt or start a new run")
    if ckpt["model_config"] != mcfg:
        raise UserError(f"{path} was trained with model settings {ckpt['model_config'].get('name')}/"
                        f"{ckpt['model_config'].get('num_classes')} classes that differ from these flags; "
                        f"resume with the run's own config.yaml (--config) or start a new run")
    load_state(model, ckpt["model"], path)
    load_states(stateful, ckpt, path)
    rng = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if len(rng) == dist.world_size:
        # each rank continues its own augmentation stream
        set_rng_state(rng[dist.rank], next(model.parameters()).device)
    else:
        log.warning(f"{path} was saved by {len(rng)} process(es), this run has {dist.world_size}: "
                    f"random augmentation streams restart from --seed")
    log.info(f"resumed from {path} at epoch {ckpt['epoch']}")
    return RunState(epoch=ckpt["epoch"], best_acc=ckpt["best_val_acc"], history=m["history"],
                    train_seconds=m.get("train_seconds", 0.0), planned_epochs=m.get("planned_epochs"),
                    wall_seconds=m.get("wall_seconds"))


def summarize_run(args, data, prec, dist, model, ema, swa, mcfg, run, extra):
    """summary.json: final/best accuracy, the averaged models (EMA, SWA) and the test split when separate."""
    history, best_acc, train_seconds = run.history, run.best_acc, run.train_seconds
    final = history[-1]
    summary = {"model": args.model, "dataset": args.dataset, "val_split": data.val_name,
               "epochs": len(history), "final_val_acc": final["val_acc"], "best_val_acc": best_acc,
               "final_val_acc5": final["val_acc5"], "train_seconds": train_seconds,
               "images_per_second": sum(r["images_per_second"] for r in history) / len(history), **extra,
               "amp": prec.mode, **({"amp_probe": prec.probe} if prec.probe else {})}
    if ema is not None:
        summary.update(final_val_acc_ema=final["val_acc_ema"],
                       best_val_acc_ema=max(r["val_acc_ema"] for r in history if "val_acc_ema" in r))
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
    robust = robust_attack(args)
    res = evaluate(model, data.val_loader, prec, collect=not dist.enabled, robust=robust, **tta_kwargs(args))
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


def run_ensemble(args, prec, started, evaluate):
    """--ensemble N: train N seeds at once (`script` run once per member, sharing the threads), then evaluate the
    mean of their softmax outputs with `evaluate(model, loader)` (train.py's, with the run's TTA). Members live in
    <output_dir>/member<i>/ with train.py's usual files; the parent writes config.yaml and summary.json."""
    config.save_config(args, os.path.join(args.output_dir, "config.yaml"))  # the children's flags, and a rerun's
    threads = member_threads(args.threads or torch.get_num_threads(), args.ensemble)
    data_seed = args.seed if args.data_seed is None else args.data_seed
    dirs = train_members(os.path.abspath(__file__), os.path.join(args.output_dir, "config.yaml"), args.output_dir,
                         args.ensemble, args.seed, data_seed, threads, log, args.overwrite)
    data = build_data(data_options(args), device=prec.device)
    members = []
    for d in dirs:
        with open(os.path.join(d, "summary.json")) as f:
            s = json.load(f)
        members.append({k: s[k] for k in ("final_val_acc", "test_acc", "epochs", "train_seconds") if k in s})
    summary = {"model": args.model, "dataset": args.dataset, "val_split": data.val_name, "ensemble": args.ensemble,
               "members": members}
    for use_ema in (False, True) if args.ema else (False,):
        model, _ = load_ensemble([os.path.join(d, "last.pt") for d in dirs], use_ema=use_ema)
        model.to(prec.device)
        tag = "_ema" if use_ema else ""
        summary["final_val_acc" + tag] = evaluate(model, data.val_loader)["acc"]
        if data.test_loader is not None:
            summary["test_acc" + tag] = evaluate(model, data.test_loader)["acc"]
        elif data.val_name == "test":
            summary["test_acc" + tag] = summary["final_val_acc" + tag]
    summary["train_seconds"] = max(m.get("train_seconds", 0.0) for m in members)  # they train side by side
    summary["wall_seconds"] = time.perf_counter() - started
    write_json(os.path.join(args.output_dir, "summary.json"), summary)
    log.info(f"done: ensemble of {args.ensemble}: {data.val_name} acc {summary['final_val_acc']:.4f} (members "
             + ", ".join(f"{m['final_val_acc']:.4f}" for m in members)
             + f"), {summary['wall_seconds'] / 60:.1f} min wall -> {args.output_dir}")
    return summary


def run(args, build_loss=None, script="train.py"):
    """main() for the command line: an interrupted run (Ctrl-C, SIGTERM) says what it kept and how to go on."""
    if args.fold == "all" or args.jobs > 1:  # --kfold K --fold all: every fold, then out-of-fold predictions
        import crossval
        return crossval.main(args, lambda fold_args: main(fold_args, build_loss), script)
    try:
        return main(args, build_loss)
    except (KeyboardInterrupt, Interrupted) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        raise Interrupted(signum, resume_hint(args, script)) from None


def resume_hint(args, script):
    """Where an interrupted run stands: its last complete checkpoint and the command that continues it."""
    last = os.path.join(args.output_dir, "last.pt") if args.output_dir else None
    if args.eval_only or args.plot_lr or args.preview_aug or not (last and os.path.isfile(last)):
        return "no epoch had finished, so nothing was kept; rerun the command"
    try:
        epoch = load_checkpoint(last)["epoch"]
    except (UserError, KeyError):
        return f"{last} is unreadable; rerun the command"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launch = f"torchrun --nproc_per_node {world} {script}" if world > 1 else f"python {script}"
    return f"{last} holds epoch {epoch}, complete; continue with: {launch} --resume {last}"


if __name__ == "__main__":
    run_cli(lambda: run(config.parse_args()))
