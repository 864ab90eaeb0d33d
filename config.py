"""Every flag of train.py, grouped by concern, plus `--config FILE` (YAML or JSON).

Precedence: parser defaults < config file < command line. The resolved configuration is written to
`<output_dir>/config.yaml`; passing that file back with `--config` reproduces the run.

One flag convention, for every flag:
- names use underscores (`--batch_size`); a config file's keys are the same names without dashes;
- booleans are `--x` / `--no_x` (`--ema` / `--no_ema`), `x: true|false` in a config file; `--amp` also takes `auto`;
- numeric tricks are off at 0 (`--lookahead_k 0`, `--random_erasing 0`, `--time_budget 0`); scale factors and
  counts are neutral at 1 (`--norm_bias_lr_scale 1`, `--ensemble 1`);
- a choice flag picks one method, `none` is off (`--attention none`, `--adv none`); `default` means torch's own
  (`--init default`, `--fp32_precision default`); optional lists are off when not given (`--cutout N SIZE`).
"""
import argparse
import dataclasses
import json
import math
import os
import sys

import yaml

# every name list is defined where it is implemented; the parser takes its choices from there
from datasets import DATASETS
from datasets.transforms import AUTO_AUGMENTS
from engine.muon import MUON_AUX
from engine.optim import OPTIMIZERS, SAM_BASES
from engine.precision import FP32_PRECISIONS
from engine.scheduler import SCHEDULERS
from models import ATTENTIONS
from tricks.adversarial import ADVS
from tricks.init import INITS
from utils.errors import UserError
from utils.flags import BoolAutoFlag, BoolFlag, HelpFormatter  # noqa: F401 (config.BoolFlag: the scripts' boolean flag)

_NOT_IN_CONFIG = {"config"}
# Older spellings of boolean flags, still read from config files and checkpoints: old key -> (new key, negate).
_RENAMED = {"no_bias_decay": ("bias_decay", True), "no_progress": ("progress", True)}


def _renamed(cfg):
    """Map older boolean keys (no_bias_decay: true) to the current ones (bias_decay: false)."""
    out = {}
    for k, v in cfg.items():
        new, negate = _RENAMED.get(k, (k, False))
        out[new] = (not v) if negate and isinstance(v, bool) else v
    return out
# Flags that belong to one invocation; a resumed run does not inherit them from its checkpoint.
# output_dir too: a resumed run writes beside the checkpoint it resumes (or into --output_dir), never into the
# folder recorded in the checkpoint's flags (a copied run must not rewrite the original).
_RUN_LOCAL = {"config", "resume", "overwrite", "eval_only", "ckpt", "plot_lr", "preview_aug", "output_dir"}


class _FoldValueError(argparse.ArgumentTypeError, ValueError):
    """argparse prints its message; a config file's check (_typed) takes it as a ValueError."""


def fold_value(text):
    """--fold's value: a fold number (0, 1, ...; checked against --kfold with the data) or `all`."""
    if str(text) == "all":
        return "all"
    if not str(text).isdigit():
        raise _FoldValueError(f"{text!r} is not a fold: give a number 0..K-1 (with --kfold K) or all")
    return int(text)


fold_value.expected = "a fold number (0..K-1) or all"


def rate_or_auto(text):
    """--infobatch's value: a number, or `auto` (train.py decides from the other flags)."""
    if str(text) == "auto":
        return "auto"
    try:
        return float(text)
    except (TypeError, ValueError):
        raise _FoldValueError(f"{text!r} is not a number or auto") from None


rate_or_auto.expected = "a number or auto"
AUTO_INFOBATCH = 0.5  # --infobatch auto's rate (the paper's)


def infobatch_clash(args, distill=False):
    """The first setting under which a training loss is not one plain sample's own (InfoBatch scores samples by
    their losses), or None."""
    for flag, on in (("--mixup_alpha/--cutmix_alpha/--mosaic (mixed samples have no own loss)",
                      args.mixup_alpha or args.cutmix_alpha or args.mosaic),
                     (f"--adv {args.adv}", args.adv != "none"), ("--balanced_sampler", args.balanced_sampler),
                     ("train_distill.py (its loss is not per sample)", distill)):
        if on:
            return flag
    return None


def resolve_infobatch(args, distill=False):
    """--infobatch auto (the default) -> AUTO_INFOBATCH where every training loss is one plain sample's own, else 0;
    run once before the flags are saved, so config.yaml and checkpoints hold the rate that trained."""
    if args.infobatch == "auto":
        args.infobatch = 0.0 if infobatch_clash(args, distill) else AUTO_INFOBATCH
    return args


def _add_data_args(p):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="fashion_mnist", help=f"one of {', '.join(DATASETS)}")
    g.add_argument("--data_dir", default="data",
                   help="dataset root; Fashion-MNIST falls back to /usr/share/datasets/fashion-mnist")
    g.add_argument("--download", action=BoolFlag,
                   help="let torchvision download Fashion-MNIST/CIFAR-10 into --data_dir if missing")
    g.add_argument("--info_csv", default=None, help="csv dataset: file mapping image name to label")
    g.add_argument("--image_column", default="image", help="csv dataset: column with image file names")
    g.add_argument("--label_column", default="label", help="csv dataset: column with labels (any type)")
    g.add_argument("--train_list", default=None, help="csv dataset: text file of training image names")
    g.add_argument("--val_list", default=None, help="csv dataset: text file of validation image names")
    g.add_argument("--img_size", type=int, default=None,
                   help="resize file images to this square size (default: 28 for Fashion-MNIST, "
                        "32 for CIFAR-10, 64 for file datasets)")
    g.add_argument("--crop_pct", type=float, default=0.0, metavar="P",
                   help="file datasets at --img_size >= 64 (as timm/torchvision do): evaluate on a centre crop "
                        "of the image resized, aspect kept, to img_size / P; train on random-resized crops "
                        "(scale --random_resized_crop or 0.08 to 1) of it; 0 = squash to the square")
    g.add_argument("--in_chans", type=int, default=None, choices=(1, 3),
                   help="file datasets: convert images to 1 (L) or 3 (RGB) channels (default 3)")
    g.add_argument("--val_ratio", type=float, default=0.0,
                   help="carve a stratified validation split from train (0 = use the test split)")
    g.add_argument("--kfold", type=int, default=0, help="stratified K-fold: number of folds (0 = off)")
    g.add_argument("--fold", type=fold_value, default=0,
                   help="which fold (0..K-1) validates, or all (crossval.py)")
    g.add_argument("--classes", nargs="+", default=None, metavar="C",
                   help="train and evaluate on these classes only (names, or indices where no name is a "
                        "number), relabelled 0..k-1")
    g.add_argument("--train_subset", type=int, default=0, help="stratified subset of N training images")
    g.add_argument("--eval_subset", type=int, default=0, help="stratified subset of N eval images")
    g.add_argument("--skip_bad_images", action=BoolFlag,
                   help="drop unreadable images (with a count) instead of stopping")
    g.add_argument("--workers", type=int, default=0, help="file datasets: loader workers, decoding threads")
    g.add_argument("--cache_images", default="none", choices=("none", "ram"),
                   help="file datasets: ram = decode once, train from memory")
    g.add_argument("--class_weights", default="none", choices=("none", "auto"),
                   help="auto: inverse class frequency weights in the loss")
    g.add_argument("--balanced_sampler", action=BoolFlag,
                   help="draw training samples so every class is equally likely")


def _add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", default="fastresnet8", help="registry name (see models/__init__.py)")
    g.add_argument("--attention", default="none", choices=ATTENTIONS,
                   help="attention module in every residual block")
    g.add_argument("--drop_path_rate", type=float, default=0.0,
                   help="stochastic depth: block l of L is dropped with rate R*l/L")
    g.add_argument("--acb", action=BoolFlag,
                   help="ACNet: train every kxk conv+BN as kxk + 1xk + kx1 branches")


def _add_finetune_args(p):
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--pretrained", nargs="?", const="default", default=None, metavar="SOURCE",
                   help="start from pretrained weights: alone, the architecture's published ones (torchvision's for "
                        "resnet18/34/50, from TORCH_HOME's cache; timm's for timm/NAME); with a path, a torchvision "
                        "or timm state dict, or a checkpoint of this repository")
    g.add_argument("--pretrained_use_ema", action=BoolFlag, help="--pretrained PATH: take its EMA weights")
    g.add_argument("--freeze_epochs", type=int, default=0, metavar="N",
                   help="train only the classifier head for the first N epochs, the backbone's BatchNorm statistics "
                        "frozen (linear probing, then fine-tuning; 0 = off)")
    g.add_argument("--layer_decay", type=float, default=1.0, metavar="G",
                   help="layer-wise lr decay: a stage at depth d from the head trains at lr x G^d (1 = off)")
    g.add_argument("--head_lr_scale", type=float, default=1.0, metavar="S",
                   help="the classifier head trains at lr x S (1 = off)")


def _add_optim_args(p):
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=7)
    g.add_argument("--batch_size", type=int, default=256, help="per-process batch size")
    g.add_argument("--accum_steps", type=int, default=1, metavar="K",
                   help="sum the gradients of K batches before each optimizer step (an effective batch of "
                        "K x batch_size; the schedule, EMA and clipping count optimizer steps; 1 = off)")
    g.add_argument("--opt", default="sgd", help=f"one of {', '.join(OPTIMIZERS)} (muon: Muon on the hidden weight "
                   "matrices, --muon_aux on the rest; sam: SAM around --sam_base)")
    g.add_argument("--lr", type=float, default=0.2, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=0.9,
                   help="SGD momentum; beta1 for adam/adamw/lion; muon: the aux optimiser's")
    g.add_argument("--lion_beta2", type=float, default=0.99, help="lion: beta2 of its momentum (Chen et al. 2023)")
    g.add_argument("--muon_lr", type=float, default=0.02,
                   help="muon: peak lr of the hidden weight matrices (x the layer-wise factors); --lr is the aux's")
    g.add_argument("--muon_momentum", type=float, default=0.95, help="muon: Muon's Nesterov momentum")
    g.add_argument("--muon_aux", default="sgd", choices=MUON_AUX,
                   help="muon: the optimiser of the input layer, head, biases and norms (--momentum, --nesterov)")
    g.add_argument("--sam_rho", type=float, default=0.05,
                   help="sam: radius of the weight perturbation (Foret et al. 2021: 0.05; ASAM: 0.5-2)")
    g.add_argument("--sam_adaptive", action=BoolFlag, help="sam: ASAM, the radius scaled by |w| (Kwon et al. 2021)")
    g.add_argument("--sam_base", default="sgd", choices=SAM_BASES, help="sam: the optimiser that steps")
    g.add_argument("--nesterov", action=BoolFlag, default=True)
    g.add_argument("--weight_decay", type=float, default=5e-4)
    g.add_argument("--bias_decay", action=BoolFlag, default=True,
                   help="weight decay on biases and norm parameters too (--no_bias_decay: none on them)")
    g.add_argument("--norm_bias_lr_scale", type=float, default=1.0,
                   help="normalisation-layer biases train at lr x this and weight decay / this (airbench: 64)")
    g.add_argument("--lr_base_batch", type=int, default=0,
                   help="linear scaling rule: lr = lr * batch_size * world_size / B (0 = off)")
    g.add_argument("--clip_grad", type=float, default=0.0, help="clip the global grad norm (0 = off)")
    g.add_argument("--label_smoothing", type=float, default=0.1)
    g.add_argument("--infobatch", type=rate_or_auto, default="auto", metavar="R",
                   help="InfoBatch data pruning: each epoch leaves out a random fraction R of the samples whose last "
                        "loss is below the mean and up-weights the rest of them (0 = off; paper: 0.5). auto: 0.5 "
                        "where every training loss is a plain sample's own (no batch mixing, adversarial training, "
                        "balanced sampler or distillation), else off")
    g.add_argument("--infobatch_anneal", type=float, default=0.875, metavar="FRAC",
                   help="--infobatch prunes in this fraction of the epochs; the rest train on every sample")


def _add_schedule_args(p):
    g = p.add_argument_group("learning-rate schedule")
    g.add_argument("--scheduler", default="cosine", help=f"one of {', '.join(SCHEDULERS)}")
    g.add_argument("--warmup_epochs", type=float, default=1.0, help="linear warmup (fractions allowed)")
    g.add_argument("--warmup_lr_init", type=float, default=0.0, help="lr at the start of warmup")
    g.add_argument("--min_lr", type=float, default=0.0, help="floor of cosine/poly schedules")
    g.add_argument("--step_size", type=float, default=30,
                   help="step: epochs between decays, counted from the start of training")
    g.add_argument("--milestones", type=float, nargs="+", default=[30, 60, 90],
                   help="multistep: epochs (from the start of training) at which to decay")
    g.add_argument("--gamma", type=float, default=0.1, help="step/multistep/exponential decay factor "
                   "(exponential and cyclic exp_range: per epoch; multiplicative: x G per epoch)")
    g.add_argument("--plateau_patience", type=int, default=5, help="plateau: epochs without improvement")
    g.add_argument("--plateau_factor", type=float, default=0.1)
    g.add_argument("--cyclic_base_lr", type=float, default=1e-4)
    g.add_argument("--cyclic_step_epochs", type=float, default=2.0, help="cyclic: half-cycle length")
    g.add_argument("--cyclic_mode", default="triangular",
                   choices=("triangular", "triangular2", "exp_range"))
    g.add_argument("--onecycle_pct_start", type=float, default=0.25)
    g.add_argument("--onecycle_div_factor", type=float, default=25.0)
    g.add_argument("--onecycle_final_div_factor", type=float, default=1e4)
    g.add_argument("--restart_epochs", type=float, default=10, help="cosine_restarts: first period")
    g.add_argument("--restart_mult", type=int, default=1, help="cosine_restarts: period multiplier")
    g.add_argument("--poly_power", type=float, default=2.0)
    g.add_argument("--plot_lr", action=BoolFlag,
                   help="write lr_schedule.png for these flags and exit without training")


def _add_init_args(p):
    g = p.add_argument_group("weight init")
    g.add_argument("--init", default="default", help=f"one of {', '.join(INITS)} (seed: the seed's scheme, "
                   f"convs Xavier-normal with bias 0.3, Linear N(0, 0.1), norms as built; see tricks/init.py)")
    g.add_argument("--init_std", type=float, default=0.01, metavar="S",
                   help="--init normal: weights N(0, S); --init uniform: U(-S, S)")
    g.add_argument("--init_mode", default="fan_in", choices=("fan_in", "fan_out"))
    g.add_argument("--init_nonlinearity", default="relu",
                   help="gain via nn.init.calculate_gain (relu, leaky_relu, tanh, linear, ...)")
    g.add_argument("--lsuv_tol", type=float, default=0.1)
    g.add_argument("--lsuv_max_iter", type=int, default=10)
    g.add_argument("--zero_init_residual", action=BoolFlag,
                   help="set the last norm gamma of every residual branch to 0")
    g.add_argument("--whiten_stem", action=BoolFlag,
                   help="first conv = frozen patch-whitening filters computed from 5,000 training images")


def _add_averaging_args(p):
    g = p.add_argument_group("weight averaging")
    g.add_argument("--ema", action=BoolFlag, help="keep an exponential moving average of the weights")
    g.add_argument("--ema_decay", type=float, default=0.999, help="per optimizer step")
    g.add_argument("--ema_warmup", action=BoolFlag,
                   help="ramp the decay up as min(decay, (1+n)/(10+n)) over early steps")
    g.add_argument("--lookahead_k", type=int, default=0,
                   help="Lookahead: every K optimizer steps pull slow weights towards the fast ones (0 = off)")
    g.add_argument("--lookahead_alpha", type=float, default=0.5, help="Lookahead: slow-weight step size")
    g.add_argument("--swa", action=BoolFlag, help="stochastic weight averaging")
    g.add_argument("--swa_start", type=int, default=0, help="epoch from which SWA averages")
    g.add_argument("--swa_lr", type=float, default=0.05)
    g.add_argument("--swa_anneal_epochs", type=int, default=1)


def _add_aug_args(p):
    g = p.add_argument_group("augmentation (per sample)")
    g.add_argument("--hflip", type=float, default=0.5, metavar="P")
    g.add_argument("--hflip_mode", default="random", choices=("random", "alternate"),
                   help="alternate (in-memory data or --cache_images ram, --hflip 0.5): each image is flipped in "
                        "every other epoch, "
                        "starting from a seeded random half (airbench)")
    g.add_argument("--vflip", type=float, default=0.0, metavar="P")
    g.add_argument("--rotate", type=float, default=0.0, metavar="DEG")
    g.add_argument("--prog_resize", type=int, default=0, metavar="PX",
                   help="progressive resizing: train the first epochs on images downscaled to PX, growing in "
                        "4-px steps to the full size by --prog_resize_until of the run (0 = off); "
                        "evaluation stays at full size")
    g.add_argument("--prog_resize_until", type=float, default=0.75, metavar="FRAC",
                   help="fraction of the epochs after which --prog_resize trains at the full size")
    g.add_argument("--crop_padding", type=int, default=0, metavar="PX",
                   help="random crop after zero padding by PX")
    g.add_argument("--random_resized_crop", type=float, default=0.0, metavar="SCALE_MIN",
                   help="RandomResizedCrop with scale (SCALE_MIN, 1) (0 = off)")
    g.add_argument("--blur", type=float, default=0.0, metavar="P", help="Gaussian blur probability")
    g.add_argument("--color_jitter", type=float, nargs=4, default=None, metavar=("B", "C", "S", "H"),
                   help="brightness, contrast, saturation, hue (1-channel: only B and C apply)")
    g.add_argument("--affine", type=float, nargs=3, default=None, metavar=("TRANSLATE", "SCALE", "SHEAR"),
                   help="translate fraction, scale delta, shear degrees")
    g.add_argument("--perspective", type=float, default=0.0, metavar="P")
    g.add_argument("--auto_augment", default="none", choices=("none", *AUTO_AUGMENTS))
    g.add_argument("--cutout", type=int, nargs=2, default=None, metavar=("N", "SIZE"),
                   help="N square holes of SIZE pixels")
    g.add_argument("--random_erasing", type=float, default=0.0, metavar="P")
    g.add_argument("--aug_backend", default="torchvision", choices=("torchvision", "imgaug"))
    g.add_argument("--imgaug_preset", default="none", choices=("none", "seed"),
                   help="seed: the original project's imgaug pipeline, Fliplr(0.5), Flipud(0.5), "
                        "GaussianBlur(sigma=(0, 0.1)), MultiplyBrightness(mul=(0.65, 1.35)) (1-channel: Multiply)")
    g.add_argument("--preview_aug", action=BoolFlag,
                   help="write aug_preview.png for these flags and exit without training")
    g = p.add_argument_group("augmentation (batch mixing)")
    g.add_argument("--mixup_alpha", type=float, default=0.0)
    g.add_argument("--cutmix_alpha", type=float, default=0.0)
    g.add_argument("--mix_switch_prob", type=float, default=0.5,
                   help="with both alphas: probability of CutMix for a batch")
    g.add_argument("--mosaic", type=float, default=0.0, metavar="P", help="probability of 2x2 mosaic")
    g.add_argument("--mix_prob", type=float, default=1.0, help="probability of mixing a batch")
    g.add_argument("--mix_off_epoch", type=int, default=0,
                   help="no mixing from epoch E on, counting epochs from 1 as the log does (0 = never off)")


def _add_adv_args(p):
    g = p.add_argument_group("adversarial training")
    g.add_argument("--adv", default="none", choices=ADVS)
    g.add_argument("--adv_eps", type=float, default=0.1, help="L-inf radius in [0, 1] pixel units")
    g.add_argument("--adv_alpha", type=float, default=0.0, help="step size (0 = 1.25*eps for FGSM, "
                   "2.5*eps/steps for PGD)")
    g.add_argument("--adv_steps", type=int, default=7)
    g.add_argument("--adv_random_start", action=BoolFlag, default=True)
    g.add_argument("--awp_gamma", type=float, default=0.005, help="AWP: relative weight perturbation")
    g.add_argument("--awp_start_epoch", type=int, default=0)
    g.add_argument("--awp_inputs", default="pgd", choices=("clean", "fgsm", "pgd"),
                   help="AWP: inputs used with the perturbed weights")
    g.add_argument("--eval_adv", default="none", choices=("none", "pgd"))
    g.add_argument("--eval_adv_steps", type=int, default=10)


def _add_run_args(p):
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=None, help="default: runs/<model>-<dataset>-<time>")
    g.add_argument("--overwrite", action=BoolFlag, help="allow writing into a run dir with checkpoints")
    g.add_argument("--resume", default=None, metavar="PATH", help="continue from a last.pt")
    g.add_argument("--eval_only", action=BoolFlag, help="evaluate --ckpt and exit")
    g.add_argument("--ckpt", default=None, nargs="+", metavar="PATH",
                   help="checkpoint for --eval_only; several: evaluate their ensemble (mean of softmax)")
    g.add_argument("--use_ema", action=BoolFlag, help="--eval_only: evaluate the EMA weights")
    g.add_argument("--tta", action=BoolFlag, default=True, help="evaluate with horizontal-flip test-time augmentation")
    g.add_argument("--tta_shift", type=int, default=0, metavar="PX",
                   help="test-time augmentation: also average views translated by +-PX pixels (and, with --tta, "
                        "their mirrors)")
    g.add_argument("--eval_interval", type=int, default=0, metavar="N",
                   help="evaluate every N epochs and after the last one; 0: after the last one only")
    g.add_argument("--time_budget", type=float, default=0.0, metavar="MIN",
                   help="fit the run into MIN minutes of wall time: after every epoch plan the most epochs (at "
                        "most --epochs) that fit, re-fitting a cosine/onecycle/poly schedule to them (0 = off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--data_seed", type=int, default=None,
                   help="seed of the validation carve (--val_ratio/--kfold) and --train_subset/--eval_subset "
                        "(default: --seed), so runs with different seeds can share one split")
    g.add_argument("--ensemble", type=int, default=1, metavar="N",
                   help="train N members (seeds seed..seed+N-1) at once as N processes sharing --threads, then "
                        "evaluate the mean of their softmax outputs (with --tta); 1 = one model")
    g.add_argument("--jobs", type=int, default=1, metavar="J",
                   help="--fold all: train J folds at once as J processes sharing --threads (1 = one after "
                        "another, in this process)")
    g.add_argument("--deterministic", action=BoolFlag,
                   help="deterministic algorithms (bit-exact resume on CPU)")
    g.add_argument("--progress", action=BoolFlag, default=True, help="tqdm progress bars (on a terminal)")
    g.add_argument("--tensorboard", action=BoolFlag, help="log to <output_dir>/tb")
    g = p.add_argument_group("device and speed")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--cuda", action=BoolFlag, help="use CUDA when available, else warn and use CPU")
    g.add_argument("--gpus", default=None, help="e.g. 0,1: sets CUDA_VISIBLE_DEVICES before CUDA starts")
    g.add_argument("--amp", action=BoolAutoFlag, default="auto",
                   help="autocast: bf16 on CPU (2x+ on AMX CPUs, 1.4x on AMD Zen 4, slower on some AVX-512 Xeons); "
                        "bf16, or fp16 + GradScaler, on CUDA. auto: on CPU time a few steps of the model in fp32 "
                        "and bf16 at start and keep bf16 only if it is 1.1x+ faster; on CUDA bf16 from compute "
                        "capability 8 (Ampere), else off")
    g.add_argument("--amp_dtype", default="auto", choices=("auto", "bf16", "fp16"))
    g.add_argument("--channels_last", action=BoolFlag, default=True)
    g.add_argument("--fp32_precision", default="default", choices=FP32_PRECISIONS,
                   help="fp32 conv/matmul math: default = torch's (CPU ieee, CUDA cuDNN convs tf32); bf16 = oneDNN "
                        "bf16 inputs with fp32 accumulation (CPUs with AVX512-BF16/AMX; weights stay fp32); "
                        "tf32 = CUDA TF32")
    g.add_argument("--compile", action=BoolFlag, help="torch.compile the model")
    g.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch default)")
    g.add_argument("--sync_bn", action=BoolFlag, help="DDP on CUDA: SyncBatchNorm")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message}; see --help\n")  # one line, as run_cli prints a UserError


_INF = math.inf
_P = (0, 1)  # a probability
# The range of every numeric flag, checked at start whether or not its trick is on: name -> (low, high) with
# both ends included, or (low, high, "open-low" / "open-high" / "open") where an end is excluded. NaN and
# infinity are refused for every float. List flags apply the range to each element.
RANGES = {
    "img_size": (8, _INF), "crop_pct": (0, 1), "val_ratio": (0, 1, "open-high"),
    "kfold": (0, _INF),  # --fold: fold_value
    "train_subset": (0, _INF), "eval_subset": (0, _INF), "workers": (0, _INF),
    "drop_path_rate": (0, 1, "open-high"),
    "freeze_epochs": (0, _INF), "layer_decay": (0, 1, "open-low"), "head_lr_scale": (0, _INF, "open"),
    "epochs": (1, _INF), "batch_size": (1, _INF), "accum_steps": (1, _INF), "lr": (0, _INF, "open"),
    "momentum": (0, 1, "open-high"), "lion_beta2": (0, 1, "open-high"), "muon_lr": (0, _INF, "open"),
    "muon_momentum": (0, 1, "open-high"), "sam_rho": (0, _INF, "open"),
    "weight_decay": (0, _INF), "norm_bias_lr_scale": (0, _INF, "open"), "lr_base_batch": (0, _INF),
    "clip_grad": (0, _INF), "label_smoothing": (0, 1, "open-high"), "infobatch": (0, 1, "open-high"),
    "infobatch_anneal": _P,
    "warmup_epochs": (0, _INF), "warmup_lr_init": (0, _INF), "min_lr": (0, _INF), "step_size": (0, _INF, "open"),
    "milestones": (0, _INF), "gamma": (0, 1, "open-low"), "plateau_patience": (0, _INF),
    "plateau_factor": (0, 1, "open"), "cyclic_base_lr": (0, _INF), "cyclic_step_epochs": (0, _INF, "open"),
    "onecycle_pct_start": (0, 1, "open"), "onecycle_div_factor": (0, _INF, "open"),
    "onecycle_final_div_factor": (0, _INF, "open"), "restart_epochs": (0, _INF, "open"), "restart_mult": (1, _INF),
    "poly_power": (0, _INF, "open"),
    "lsuv_tol": (0, _INF, "open"), "lsuv_max_iter": (1, _INF), "init_std": (0, _INF, "open"),
    "ema_decay": (0, 1, "open"), "lookahead_k": (0, _INF), "lookahead_alpha": (0, 1, "open-low"),
    "swa_start": (0, _INF), "swa_lr": (0, _INF, "open"), "swa_anneal_epochs": (0, _INF),
    "hflip": _P, "vflip": _P, "rotate": (0, 180), "prog_resize": (0, _INF), "prog_resize_until": (0, 1, "open-low"),
    "crop_padding": (0, _INF), "random_resized_crop": _P, "blur": _P, "color_jitter": (0, _INF),
    "affine": (0, _INF), "perspective": _P, "cutout": (1, _INF), "random_erasing": _P,
    "mixup_alpha": (0, _INF), "cutmix_alpha": (0, _INF), "mix_switch_prob": _P, "mosaic": _P, "mix_prob": _P,
    "mix_off_epoch": (0, _INF),
    "adv_eps": _P, "adv_alpha": (0, _INF), "adv_steps": (1, _INF), "awp_gamma": (0, _INF, "open"),
    "awp_start_epoch": (0, _INF), "eval_adv_steps": (1, _INF),
    "tta_shift": (0, _INF), "eval_interval": (0, _INF), "time_budget": (0, _INF), "seed": (0, 2**63 - 1),
    "data_seed": (0, 2**63 - 1), "ensemble": (1, _INF), "jobs": (1, _INF), "threads": (0, _INF),
}


def _in_range(value, spec):
    low, high, *how = spec
    how = how[0] if how else ""
    above = value > low if how in ("open", "open-low") else value >= low
    below = value < high if how in ("open", "open-high") else value <= high
    return above and below


def _describe_range(spec):
    low, high, *how = spec
    how = how[0] if how else ""
    left = "(" if how in ("open", "open-low") else "["
    right = ")" if how in ("open", "open-high") or high == _INF else "]"
    return f"{left}{low:g}, {'inf' if high == _INF else f'{high:g}'}{right}"


def validate(args, parser):
    """Every numeric flag inside its RANGES entry (NaN/inf refused): one UserError naming flag, value, range."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.type not in (int, float, rate_or_auto) or value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            if v == "auto":
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"--{action.dest} {v}: must be a finite number")
            spec = RANGES.get(action.dest)
            if spec is not None and not _in_range(v, spec):
                raise UserError(f"--{action.dest} {v:g}: must be in {_describe_range(spec)}")


def get_parser():
    p = _Parser(description="Train an image classifier with optional tricks.", formatter_class=HelpFormatter)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML or JSON file of flag values; command-line flags override it")
    for add in (_add_data_args, _add_model_args, _add_finetune_args, _add_optim_args, _add_schedule_args,
                _add_init_args,
                _add_averaging_args, _add_aug_args, _add_adv_args, _add_run_args):
        add(p)
    return p


def load_config_file(path, parser):
    """Read a YAML/JSON flag file; every key must be a flag of `parser`."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist; check the --config path")
    try:
        with open(path) as f:
            text = f.read()
        cfg = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"config file {path} is not valid YAML/JSON ({first}); fix its syntax")
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise UserError(f"config file {path} must hold a mapping of flag names to values")
    known = {a.dest for a in parser._actions}
    cfg = _renamed({k.replace("-", "_") if isinstance(k, str) else k: v for k, v in cfg.items()})
    unknown = sorted(str(k) for k in cfg if not isinstance(k, str) or k not in known)
    if unknown:
        raise UserError(f"config file {path} has unknown key(s) {', '.join(unknown)}; "
                        f"keys are flag names without dashes (see --help)")
    actions = {a.dest: a for a in parser._actions}
    return {k: _typed(path, k, v, actions[k]) for k, v in cfg.items() if k not in _NOT_IN_CONFIG}


def _typed(path, key, value, action):
    """A config file's value converted and checked as the command line would take it (one line if it cannot)."""
    many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 0)  # BoolFlag's is 0
    kind = action.words if isinstance(action, BoolFlag) else {int: "an integer", float: "a number"}.get(
        action.type, getattr(action.type, "expected", "a string"))
    if many:
        kind = f"a list of {action.nargs if isinstance(action.nargs, int) else 'one or more'} " \
               f"{kind.replace('an ', '').replace('a ', '')}s"
    if action.choices is not None:
        kind = f"one of {', '.join(map(str, action.choices))}"

    def bad():
        return UserError(f"config file {path}: {key}: {value!r} is not {kind}"
                         + (" (or null)" if action.default is None else ""))
    if value is None:
        if action.default is not None:
            raise bad()
        return None
    if isinstance(action, BoolFlag):
        if not action.accepts(value):
            raise bad()
        return value
    if many != isinstance(value, list) or (isinstance(action.nargs, int) and len(value) != action.nargs):
        raise bad()
    out = []
    for v in value if many else [value]:
        if isinstance(v, (bool, list, dict)) or v is None or (action.type is int and not isinstance(v, int)):
            raise bad()
        try:
            v = action.type(v) if action.type is not None else str(v)
        except (TypeError, ValueError):
            raise bad() from None
        if action.choices is not None and v not in action.choices:
            raise bad()
        out.append(v)
    return out if many else out[0]


def parse_args(argv=None, parser=None):
    """Parse flags with precedence defaults < --config file (or the --resume checkpoint's flags) < command line."""
    parser = parser or get_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    pre, _ = parser.parse_known_args(argv)
    if pre.resume:
        # Continue the run as it was configured: its saved flags become the defaults.
        from engine.checkpoint import load_checkpoint
        saved = _renamed(load_checkpoint(pre.resume).get("args") or {})
        known = {a.dest for a in parser._actions}
        parser.set_defaults(**{k: v for k, v in saved.items() if k in known and k not in _RUN_LOCAL})
    if pre.config:
        parser.set_defaults(**load_config_file(pre.config, parser))
    args = parser.parse_args(argv)
    validate(args, parser)
    return args


def options(cls, args, **override):
    """The library's options dataclass `cls` filled from the parsed flags (and `override`): library code takes
    these explicit fields, never `args` itself (timm's optimizer_kwargs(cfg=args) pattern)."""
    return cls(**{f.name: override[f.name] if f.name in override else getattr(args, f.name)
                  for f in dataclasses.fields(cls)})


def save_config(args, path):
    """Write the resolved flags so that `--config path` reproduces the run (into a new output dir)."""
    d = {k: v for k, v in vars(args).items() if k not in _RUN_LOCAL}
    with open(path, "w") as f:
        yaml.safe_dump(d, f, sort_keys=False)


# ---- tools: shared flag groups
# predict.py, reparam_export.py and tools/*.py build small parsers of their own from these, so that each --help
# lists that tool's flags only; a tool that calls datasets.build_data gets train.py's namespace from
# training_defaults().

class _ToolParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message}; see --help\n")  # one line, as run_cli prints a UserError


class _HelpFormatter(HelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)"
        return action.help if action.default is None else super()._get_help_string(action)


def tool_parser(description, usage=None):
    """An ArgumentParser for a tool: defaults shown in --help; a bad flag gives one line `error: ...`, exit 2."""
    return _ToolParser(description=description, usage=usage, formatter_class=_HelpFormatter)


def add_data_args(parser, unset=None):
    """train.py's data flag group. With `unset` (a note for --help saying where their values come from), flags
    the user does not give are left out of the parsed namespace, for the tool to fill in (training_defaults)."""
    _add_data_args(parser)
    if unset:
        group = parser._action_groups[-1]
        group.description = f"flags not given: {unset}"
        for action in group._group_actions:
            action.default = argparse.SUPPRESS


def given_data_flags(args):
    """{flag: value} of the data flags in `args` (parsed with add_data_args(parser, unset=...): those given)."""
    group = argparse.ArgumentParser(add_help=False)
    _add_data_args(group)
    return {a.dest: getattr(args, a.dest) for a in group._actions if hasattr(args, a.dest)}


def training_defaults(*updates):
    """A namespace of every train.py flag at its default, updated by each dict of `updates` in turn (e.g. a
    checkpoint's saved flags, then the flags given to the tool): what datasets.build_data and the like read."""
    args = get_parser().parse_args([])
    for update in updates:
        vars(args).update(update)
    return args
