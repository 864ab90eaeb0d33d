"""K-fold cross-validation: `--kfold K --fold all` trains every fold, then predicts every training image with the
fold model that did not train on it (out-of-fold, OOF) and scores the K fold models as an ensemble.

    python train.py --kfold 5 --fold all --output_dir runs/cv5                 # the folds one after another
    python train.py --kfold 5 --fold all --output_dir runs/cv5 --jobs 2        # two folds at once, threads shared
    python train_distill.py --teacher_ckpt runs/T/best.pt --kfold 5 --fold all --output_dir runs/cv5-kd
    python predict.py --ckpt runs/cv5/fold*/last.pt --split test --out test.csv  # the fold ensemble, mean softmax

OUTPUT/fold<i>/ is a normal run directory: the same command with `--fold i --output_dir OUTPUT/fold<i>` (each fold
gets the whole --epochs / --time_budget). Then, in this process, each fold's final model (last.pt, never best.pt:
that one was chosen on the very images it would score) predicts its fold's validation split, which gives
- OUTPUT/oof_predictions.csv: one row per image of the folds' validation splits, that is every training-split
  image once (with --eval_subset N, N of each fold): `sample` (the index into the training split for Fashion-MNIST
  and CIFAR-10, the file name relative to --data_dir for image files), `fold`, `label`, `pred` (class names) and
  one probability column per class, named after it;
- OUTPUT/cv_summary.json: each fold's validation accuracy, their mean and sample std, the OOF accuracy (from the
  rows above) and, where the dataset has a test split (Fashion-MNIST's 10k test images under --kfold), each fold
  model's test accuracy and the fold ensemble's (mean softmax). --tta/--tta_shift apply to every evaluation.
Rerunning the same command skips finished folds (their summary.json exists) and resumes an interrupted one from
its last.pt; --overwrite retrains every fold. All folds share --seed and the split (--data_seed).
"""
import argparse
import copy
import csv
import io
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time

import torch
import yaml

import config
from datasets import DataOptions, build_data
from engine.checkpoint import load_model
from engine.ensemble import forward_lines, last_line, load_ensemble, member_threads
from engine.loop import evaluate
from engine.precision import make_precision, set_fp32_precision
from utils.errors import Interrupted, UserError
from utils.logger import setup_logging
from utils.misc import resolve_device
from utils.outputs import atomic_write, prepare_output_dir, write_json

log = logging.getLogger("train")

ROOT = os.path.dirname(os.path.abspath(__file__))
FOLD_MODEL = "last.pt"  # the final weights of each fold
# Flags that change how the folds run but not what they compute: a rerun may change them.
NOT_COMPARED = {"threads", "jobs", "progress", "tensorboard", "workers"}


def check_flags(args):
    """What --fold all and --jobs mean together with the other flags (single values: config.RANGES)."""
    if args.fold != "all":
        raise UserError(f"--jobs {args.jobs} trains several folds at once and needs --kfold K --fold all; drop it "
                        "to train one run")
    if args.kfold < 2:
        raise UserError("--fold all trains every fold and needs --kfold K with K >= 2, e.g. --kfold 5 --fold all")
    if args.resume:
        raise UserError("--fold all resumes by itself: rerun the same command (finished folds are skipped, an "
                        "interrupted one continues from its last.pt) and drop --resume")
    if args.eval_only:
        raise UserError("--fold all trains the folds; evaluate their ensemble with --eval_only --ckpt "
                        "OUTPUT/fold*/last.pt")
    clash = [f for f in ("plot_lr", "preview_aug") if getattr(args, f)] + (["ensemble"] if args.ensemble > 1 else [])
    if clash:
        raise UserError(f"--fold all does not go with --{clash[0]}; drop one of them")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--fold all runs the folds itself; start it with plain python, not torchrun")


def check_same_flags(args, config_path, fold_dirs):
    """A rerun must train what the finished folds trained: refuse flags that differ from OUTPUT/config.yaml once a
    fold has a checkpoint or a summary."""
    started = [d for d in fold_dirs if any(os.path.isfile(os.path.join(d, f)) for f in (FOLD_MODEL, "summary.json"))]
    if not started or not os.path.isfile(config_path):
        return
    with open(config_path) as f:
        saved = yaml.safe_load(f) or {}
    now = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}
    diff = [k for k in now if k in saved and k not in config._RUN_LOCAL | NOT_COMPARED and saved[k] != now[k]]
    if diff:
        k = diff[0]
        raise UserError(f"{os.path.dirname(config_path)} holds folds trained with {k}={saved[k]!r} but this command "
                        f"gives {k}={now[k]!r} ({len(diff)} flag(s) differ); rerun with its flags (--config "
                        f"{config_path}), pass --overwrite to retrain every fold, or another --output_dir")


def fold_status(run_dir, overwrite=False):
    """done: summary.json present; resume: last.pt without a summary; new otherwise (or with overwrite)."""
    if overwrite:
        return "new"
    if os.path.isfile(os.path.join(run_dir, "summary.json")):
        return "done"
    return "resume" if os.path.isfile(os.path.join(run_dir, FOLD_MODEL)) else "new"


def fold_args(args, fold, run_dir, status):
    """The flags of one fold: the command's own with --fold i --output_dir OUTPUT/fold<i> (and --resume its
    last.pt); a new fold may replace a stale fold directory's files."""
    return argparse.Namespace(**{**copy.deepcopy(vars(args)), "fold": fold, "output_dir": run_dir, "jobs": 1,
                                 "resume": os.path.join(run_dir, FOLD_MODEL) if status == "resume" else None,
                                 "overwrite": status == "new"})


def fold_command(script, config_path, fold, run_dir, status, threads):
    """The child command line of one fold under --jobs: the parent's resolved flags, one fold, its share of the
    threads."""
    cmd = [sys.executable, script, "--config", config_path, "--fold", str(fold), "--jobs", "1",
           "--threads", str(threads), "--output_dir", run_dir]
    return cmd + (["--resume", os.path.join(run_dir, FOLD_MODEL)] if status == "resume" else ["--overwrite"])


def train_in_process(todo, train_fold, make_args, log_file):
    """Train the folds `todo` one after another with `train_fold(make_args(fold))` (train.main)."""
    for fold in todo:
        try:
            train_fold(make_args(fold))
        finally:
            setup_logging(log_file)  # the fold logged into its own train.log; back to the parent's


def train_in_processes(commands, jobs, out_dir, poll=0.5):
    """Run {fold: command}, `jobs` at a time, forwarding each fold's output as `[f<i>] ` lines (the whole of it is
    in OUTPUT/fold<i>.out). A failed fold stops the others, whose last.pt stays for the rerun, and raises."""
    pending, running = list(commands.items()), {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                fold, cmd = pending.pop(0)
                path = os.path.join(out_dir, f"fold{fold}.out")
                with open(path, "ab") as f:  # appended: a resumed fold keeps the output of its first attempt
                    offset = f.tell()
                    running[fold] = [subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT), path, offset]
            time.sleep(poll)
            for fold, entry in list(running.items()):
                proc, path, offset = entry
                finished = proc.poll() is not None  # before reading, so that its last lines are read too
                entry[2] = forward_lines(path, offset, f"[f{fold}] ", log)
                if finished:
                    del running[fold]
                    if proc.returncode != 0:
                        raise UserError(f"fold {fold} failed (exit code {proc.returncode}: {last_line(path)}); its "
                                        f"output is in {path}; fix it and rerun the same command to resume")
    finally:
        for proc, _, _ in running.values():  # SIGTERM: each keeps its last complete epoch in last.pt
            if proc.poll() is None:
                proc.terminate()
                proc.wait()


def sample_ids(data, data_dir):
    """Ids of the validation samples in the validation loader's order: the index into the training split for
    in-memory datasets, the image's file name relative to `data_dir` for file datasets."""
    if data.val_paths is None:
        return [int(i) for i in data.val_index]
    return [os.path.relpath(p, data_dir) for p in data.val_paths]


def score_folds(model_paths, fold_data, data_dir, prec, tta, tta_shift):
    """Evaluate each fold model on its own validation split (and on the test split, when there is one).

    fold_data(i) -> the Data of fold i. Returns the OOF rows as (sample id, fold, target, probabilities), the
    per-fold results, the class names and the test loader (None without a test split)."""
    rows, folds, test_loader = [], [], None
    for fold, path in enumerate(model_paths):
        data = fold_data(fold)
        model, _ = load_model(path)
        model.to(prec.device)
        if prec.channels_last:
            model.to(memory_format=torch.channels_last)  # as the fold evaluated itself
        val = evaluate(model, data.val_loader, prec, collect=True, tta=tta, tta_shift=tta_shift)
        ids = sample_ids(data, data_dir)
        assert len(ids) == len(val["targets"]), "the validation loader and its ids disagree"
        rows += [(i, fold, int(t), p) for i, t, p in zip(ids, val["targets"].tolist(), val["probs"])]
        result = {"fold": fold, "val_samples": len(ids), "val_acc": val["acc"]}
        if data.test_loader is not None:
            result["test_acc"] = evaluate(model, data.test_loader, prec, tta=tta, tta_shift=tta_shift)["acc"]
            test_loader = data.test_loader  # the same images for every fold (the held-out split)
        folds.append(result)
    return rows, folds, data.class_names, test_loader


def write_oof_csv(path, rows, class_names):
    """oof_predictions.csv, sorted by sample id, written atomically; returns the accuracy of its `pred` column."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["sample", "fold", "label", "pred", *class_names])
    correct = 0
    for sample, fold, target, probs in sorted(rows, key=lambda r: r[0]):
        pred = int(probs.argmax())
        correct += pred == target
        w.writerow([sample, fold, class_names[target], class_names[pred], *(f"{p:.6f}" for p in probs.tolist())])
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return correct / len(rows)


def train_folds(args, todo, dirs, status, train_fold, script, config_path, log_file):
    """Train the folds `todo`: in this process one after another (--jobs 1, or a single fold left), else as --jobs
    processes of `script` sharing the threads. An interruption says how to go on."""
    try:
        if args.jobs == 1 or len(todo) <= 1:
            train_in_process(todo, train_fold, lambda i: fold_args(args, i, dirs[i], status[i]), log_file)
            return
        jobs = min(args.jobs, len(todo))
        threads = member_threads(args.threads or torch.get_num_threads(), jobs)
        log.info(f"cross-validation: {len(todo)} folds, {jobs} at a time ({threads} thread(s) each); their output: "
                 f"{args.output_dir}/fold*.out")
        train_in_processes({i: fold_command(os.path.join(ROOT, script), config_path, i, dirs[i], status[i], threads)
                            for i in todo}, jobs, args.output_dir)
    except (KeyboardInterrupt, Interrupted) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        raise Interrupted(signum, f"finished folds are kept and interrupted ones keep their last complete epoch; "
                                  f"continue with the same command and --output_dir {args.output_dir}") from None


def score(args, dirs):
    """Each fold's final model on its own validation split (oof_predictions.csv) and the test split, then their
    ensemble on the test split; returns cv_summary.json's content."""
    device = resolve_device(args.device, args.cuda, args.gpus)
    set_fp32_precision(device, args.fp32_precision)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    prec = make_precision(device, args.amp, args.amp_dtype, args.channels_last)  # --amp auto: fp32 (no probe)
    paths = [os.path.join(d, FOLD_MODEL) for d in dirs]

    def fold_data(fold):
        return build_data(config.options(DataOptions, args, fold=fold, with_index=False), device=prec.device)
    rows, folds, class_names, test_loader = score_folds(paths, fold_data, args.data_dir, prec, args.tta,
                                                        args.tta_shift)
    oof_acc = write_oof_csv(os.path.join(args.output_dir, "oof_predictions.csv"), rows, class_names)
    for fold, d in zip(folds, dirs):  # how each fold trained, from its own summary
        with open(os.path.join(d, "summary.json")) as f:
            fold.update({k: v for k, v in json.load(f).items() if k in ("epochs", "train_seconds")})
    accs = [f["val_acc"] for f in folds]
    summary = {"model": args.model, "dataset": args.dataset, "kfold": args.kfold, "fold_model": FOLD_MODEL,
               "tta": args.tta, "tta_shift": args.tta_shift, "folds": folds,
               "val_acc_mean": statistics.fmean(accs), "val_acc_std": statistics.stdev(accs),  # ddof=1
               "oof_acc": oof_acc, "oof_samples": len(rows)}
    if test_loader is not None:
        ensemble, _ = load_ensemble(paths)
        ensemble.to(prec.device)
        if prec.channels_last:
            ensemble.to(memory_format=torch.channels_last)
        summary["test_acc_mean"] = statistics.fmean(f["test_acc"] for f in folds)
        summary["test_acc_ensemble"] = evaluate(ensemble, test_loader, prec, tta=args.tta,
                                                tta_shift=args.tta_shift)["acc"]
    summary["train_seconds"] = sum(f.get("train_seconds", 0.0) for f in folds)  # however many ran at once
    return summary


def main(args, train_fold, script="train.py"):
    """--kfold K --fold all: train the folds (train_fold(fold_args) in this process, or `script` in --jobs
    processes), then write oof_predictions.csv and cv_summary.json into --output_dir; returns the summary."""
    started = time.perf_counter()
    check_flags(args)
    out = args.output_dir = prepare_output_dir(args.output_dir, args.model, args.dataset, overwrite=args.overwrite)
    log_file = os.path.join(out, "train.log")
    setup_logging(log_file)
    config_path = os.path.join(out, "config.yaml")
    dirs = [os.path.join(out, f"fold{i}") for i in range(args.kfold)]
    if not args.overwrite:
        check_same_flags(args, config_path, dirs)
    config.save_config(args, config_path)  # the flags of every fold, and of --jobs' child processes
    status = [fold_status(d, args.overwrite) for d in dirs]
    for i, s in enumerate(status):
        log.info(f"fold {i} of {args.kfold}: " + {"done": f"finished ({dirs[i]}/summary.json), skipped",
                                              "resume": f"resuming from {dirs[i]}/{FOLD_MODEL}",
                                              "new": f"training into {dirs[i]}"}[s])
    todo = [i for i, s in enumerate(status) if s != "done"]
    if todo:  # results of the folds as they were must not outlive a retrained one
        for name in ("cv_summary.json", "oof_predictions.csv", *(f"fold{i}/summary.json" for i in todo)):
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    train_folds(args, todo, dirs, status, train_fold, script, config_path, log_file)

    summary = score(args, dirs)
    summary["wall_seconds_this_call"] = time.perf_counter() - started
    write_json(os.path.join(out, "cv_summary.json"), summary)
    test = f", fold ensemble test acc {summary['test_acc_ensemble']:.4f}" if "test_acc_ensemble" in summary else ""
    log.info(f"done: {args.kfold}-fold val acc {summary['val_acc_mean']:.4f} ± {summary['val_acc_std']:.4f}, "
             f"out-of-fold acc {summary['oof_acc']:.4f} over {summary['oof_samples']} images{test} -> {out}")
    return summary
