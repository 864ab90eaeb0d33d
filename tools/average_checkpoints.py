"""Weighted average of the weights of several checkpoints (offline SWA / checkpoint averaging, as in
Izmailov et al., 2018 and Vaswani et al., 2017), accumulated in float64 and cast back to each tensor's dtype.
Integer buffers (num_batches_tracked) come from the last checkpoint; --update_bn re-estimates BatchNorm on the
training data of the last checkpoint's run (data flags given here override its saved ones), Dropout/DropPath off.
    python -m tools.average_checkpoints a.pt b.pt c.pt --weights 0.2 0.3 0.5 --out avg.pt [--update_bn]
"""
import logging
import math
import os

import torch

import config
from engine.checkpoint import load_checkpoint, load_state, save_checkpoint
from tricks.swa import update_bn_uint8
from utils.errors import UserError, run_cli
from utils.misc import resolve_device

log = logging.getLogger(__name__)

# Training state that does not describe the averaged weights; set to None in the output.
TRAINING_STATE = ("optimizer", "scheduler", "scaler", "ema", "swa")


def normalize_weights(weights, n):
    """One positive weight per checkpoint (None: equal weights), scaled to sum to 1."""
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise UserError(f"{len(weights)} weights for {n} checkpoints; give exactly one weight per checkpoint")
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise UserError(f"checkpoint weights must be positive, got {', '.join(f'{w:g}' for w in bad)}; "
                        f"pass positive numbers to --weights (or omit it for equal weights)")
    total = math.fsum(weights)
    if abs(total - 1.0) > 1e-9:
        log.info(f"checkpoint weights sum to {total:g}; normalised to sum to 1")
    return [w / total for w in weights]


def average_state_dicts(state_dicts, weights=None, strict=True, names=None):
    """Weighted mean of `state_dicts` -> (avg_state_dict, skipped_keys).

    Floating tensors: sum_i w_i * t_i in float64, cast back to the last state dict's dtype. Integer and
    bool tensors and non-tensors: copied from the last state dict. A key missing from some state dict,
    or with differing shapes (or floating vs integer), is an error listing every such key when `strict`;
    otherwise it is skipped: kept from the last state dict if it is there, else left out.
    """
    if not state_dicts:
        raise UserError("no checkpoints to average; pass at least one checkpoint path")
    weights = normalize_weights(weights, len(state_dicts))
    names = list(names) if names is not None else [f"#{i + 1}" for i in range(len(state_dicts))]
    last = state_dicts[-1]
    keys = list(dict.fromkeys(k for sd in [last, *state_dicts] for k in sd))

    problems = {}
    for k in keys:
        missing = [name for name, sd in zip(names, state_dicts) if k not in sd]
        if missing:
            problems[k] = f"missing in {', '.join(missing)}"
            continue
        ts = [sd[k] for sd in state_dicts]
        if not all(torch.is_tensor(t) for t in ts):
            continue
        shapes = [tuple(t.shape) for t in ts]
        if len(set(shapes)) > 1:
            problems[k] = "shapes " + ", ".join(f"{list(s)} in {n}" for s, n in zip(shapes, names))
        elif len({t.is_floating_point() for t in ts}) > 1:
            problems[k] = "dtypes " + ", ".join(f"{t.dtype} in {n}" for t, n in zip(ts, names))
    if problems and strict:
        detail = "; ".join(f"{k} ({why})" for k, why in problems.items())
        raise UserError(f"{len(problems)} key(s) differ between the checkpoints: {detail}; average checkpoints "
                        f"of the same model, or pass --no_strict to skip these keys")

    avg = {}
    for k, ref in last.items():
        if k in problems or not torch.is_tensor(ref) or not ref.is_floating_point():
            avg[k] = ref
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for w, sd in zip(weights, state_dicts):
            acc.add_(sd[k].detach().to(device="cpu", dtype=torch.float64), alpha=w)
        avg[k] = acc.to(ref.dtype)
    skipped = list(problems)
    if skipped:
        log.warning(f"skipped {len(skipped)} key(s) that differ between the checkpoints (kept from the last "
                    f"one where present): {', '.join(skipped)}")
    return avg, skipped


def recompute_bn(state_dict, ckpt, device, data_flags=None):
    """Load `state_dict` into the model `ckpt` describes and re-estimate BatchNorm on the training data of the run
    (its saved flags over train.py's defaults), with `data_flags` (a dict) over those; Dropout/DropPath are off
    (tricks.swa.update_bn_uint8)."""
    import datasets  # only --update_bn needs the data and model code
    import models
    data = datasets.build_data(config.training_defaults(ckpt.get("args") or {}, datasets.ONE_PASS, data_flags or {}))
    model = models.model_from_config(ckpt["model_config"])
    load_state(model, state_dict, "the averaged weights")
    model.to(device)
    update_bn_uint8(data.train_loader, model, device)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def get_parser():
    p = config.tool_parser("Average the weights of several checkpoints of one model.",
                           usage="%(prog)s CKPT [CKPT ...] --out PATH [--weights W [W ...]] [options]")
    p.add_argument("ckpts", nargs="+", metavar="CKPT", help="checkpoints written by train.py")
    p.add_argument("--weights", type=float, nargs="+", default=None, metavar="W",
                   help="one positive weight per checkpoint (default: equal); normalised to sum to 1")
    p.add_argument("--out", required=True, metavar="PATH", help="path of the averaged checkpoint")
    p.add_argument("--use_ema", action=config.BoolFlag, help="average the checkpoints' EMA weights")
    p.add_argument("--strict", action=config.BoolFlag, default=True,
                   help="fail on keys missing or shaped differently in some checkpoint; --no_strict skips them "
                        "(keeping the last checkpoint's value)")
    p.add_argument("--update_bn", action=config.BoolFlag,
                   help="re-estimate BatchNorm statistics on the run's training data (Dropout and DropPath off)")
    p.add_argument("--device", default="auto", help="--update_bn: auto | cpu | cuda | cuda:N")
    config.add_data_args(p, unset="the last checkpoint's training flags (read by --update_bn)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    out = os.path.realpath(args.out)
    for path in args.ckpts:
        if os.path.realpath(path) == out:
            raise UserError(f"--out {args.out} is one of the input checkpoints; write the average to a new path")
    weights = normalize_weights(args.weights, len(args.ckpts))
    ckpts = [load_checkpoint(path) for path in args.ckpts]
    if args.use_ema:
        for path, c in zip(args.ckpts, ckpts):
            if not c.get("ema"):
                raise UserError(f"--use_ema: {path} holds no EMA weights; train with --ema or drop --use_ema")
        state_dicts = [c["ema"]["module"] for c in ckpts]
    else:
        state_dicts = [c["model"] for c in ckpts]
    last = ckpts[-1]
    for path, c in zip(args.ckpts, ckpts):
        if c["model_config"] != last["model_config"]:
            log.warning(f"{path} has model_config {c['model_config']}, the last checkpoint "
                        f"{last['model_config']}; the output uses the last one")

    avg, _ = average_state_dicts(state_dicts, weights, strict=args.strict, names=args.ckpts)
    if args.update_bn:
        avg = recompute_bn(avg, last, resolve_device(args.device, False), config.given_data_flags(args))
    result = {**last, "model": avg, "averaged_from": list(args.ckpts), "weights": weights}
    for k in TRAINING_STATE:
        if k in result:
            result[k] = None
    save_checkpoint(result, args.out)
    log.info(f"wrote {args.out}: {'EMA weights' if args.use_ema else 'weights'} of {len(ckpts)} checkpoints "
             f"averaged with weights {', '.join(f'{w:.4g}' for w in weights)}"
             f"{', BatchNorm re-estimated' if args.update_bn else ''}")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_cli(main)
