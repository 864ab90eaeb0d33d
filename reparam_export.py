"""Re-parameterise a trained checkpoint for deployment, prove it unchanged, and export it.

    python reparam_export.py --ckpt runs/x/best.pt --out deploy.pt [--use_ema] [--onnx deploy.onnx]
                             [--torchscript deploy.ts]

The trained model is switched to eval(), deep-copied and fused with `reparameterize_model` (RepVGG, ACNet);
the copy's outputs (and those of the ONNX / TorchScript files) must match the trained model on a random and
a real batch (torch.testing.assert_close), otherwise nothing is written and the exit code is 1.
`train.py --eval_only --ckpt deploy.pt` evaluates the result.
"""
import copy
import os
import statistics
import sys
import time
import warnings

import torch

import config
from engine.checkpoint import load_checkpoint, load_model, save_checkpoint
from models import model_summary
from models.reparam import count_reparameterizable, reparameterize_model
from utils.errors import UserError, run_cli


class Mismatch(Exception):
    """A converted model whose outputs differ from the trained one."""


def get_parser():
    p = config.tool_parser(__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, metavar="PATH", help="training checkpoint (best.pt / last.pt of train.py)")
    p.add_argument("--out", required=True, metavar="PATH", help="deploy checkpoint to write")
    p.add_argument("--use_ema", action=config.BoolFlag, help="export the EMA weights of the checkpoint")
    p.add_argument("--onnx", default=None, metavar="PATH", help="also export ONNX (checked with onnxruntime)")
    p.add_argument("--opset", type=int, default=17, metavar="N", help="ONNX opset version (>= 17)")
    p.add_argument("--torchscript", default=None, metavar="PATH", help="also export TorchScript (traced)")
    p.add_argument("--check_batch", type=int, default=16, metavar="N", help="images in each comparison batch")
    p.add_argument("--rtol", type=float, default=1e-4, help="assert_close relative tolerance on the logits")
    p.add_argument("--atol", type=float, default=1e-4, help="assert_close absolute tolerance on the logits")
    p.add_argument("--latency_runs", type=int, default=20, metavar="N",
                   help="timed CPU forward passes per batch size (median reported; 0 = skip timing)")
    return p


def check_outputs(name, got, expected, rtol, atol):
    """assert_close that reports the max |Δ| and raises Mismatch instead of AssertionError."""
    diff = (got.double() - expected.double()).abs().max().item()
    try:
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    except AssertionError:
        raise Mismatch(f"{name}: outputs differ from the trained model (max |Δ| = {diff:.3g}, "
                       f"rtol {rtol:g}, atol {atol:g})")
    print(f"{name}: max |Δ| = {diff:.3g}  ok")


def real_batch(ckpt_args, shape, n):
    """Up to n evaluation images of the run's own data as floats in [0, 1], or None if unavailable."""
    import datasets  # local: only needed here, and it pulls in the data stack
    if not ckpt_args:
        print("the checkpoint stores no training args, so its data is unknown; checking a random batch only")
        return None
    args = config.training_defaults(ckpt_args, datasets.ONE_PASS, {"download": False})
    try:
        x, _ = next(iter(datasets.build_data(args).val_loader))
    except (UserError, OSError, StopIteration) as e:
        print(f"real data unavailable ({e or type(e).__name__}); checking a random batch only")
        return None
    if tuple(x.shape[1:]) != tuple(shape):
        print(f"the run's data has shape {tuple(x.shape[1:])}, the model expects {tuple(shape)}; "
              f"checking a random batch only")
        return None
    return x[:n].float().div(255)


def latency_ms(model, x, runs):
    """Median wall time of `runs` forward passes after two warm-up passes."""
    times = []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        model(x)
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile(model, shape, runs):
    """Parameters, FLOPs of one image and median CPU latency at batch 1 and 64, as printable strings."""
    x1, x64 = torch.rand(1, *shape), torch.rand(64, *shape)
    params, flops = model_summary(model, shape[0], shape[1])
    row = {"params": f"{params:,}", "MFLOPs / image": f"{flops / 1e6:.2f}"}
    if runs > 0:
        row["CPU ms, batch 1"] = f"{latency_ms(model, x1, runs):.2f}"
        row["CPU ms, batch 64"] = f"{latency_ms(model, x64, runs):.2f}"
    return row


def print_table(before, after):
    print(f"{'':18s} {'trained':>12s} {'deploy':>12s}")
    for key in before:
        print(f"{key:18s} {before[key]:>12s} {after[key]:>12s}")


def export_onnx(model, batches, expected, path, opset, rtol, atol):
    """Export with the TorchScript-based exporter (no onnxscript needed); check every batch with onnxruntime."""
    x = next(iter(batches.values()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is deliberate, see above
        torch.onnx.export(model, (x,), path, opset_version=opset, dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime is not installed: the ONNX file is not checked")
        return
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for name, x in batches.items():
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        check_outputs(f"onnxruntime vs trained, {name}", got, expected[name], rtol, atol)


def export_torchscript(model, batches, expected, path, rtol, atol):
    """torch.jit.trace, save, load back, and check every batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated but still works
        torch.jit.save(torch.jit.trace(model, next(iter(batches.values()))), path)
        loaded = torch.jit.load(path)
    for name, x in batches.items():
        check_outputs(f"torchscript vs trained, {name}", loaded(x), expected[name], rtol, atol)


def _check_paths(args):
    outputs = [p for p in (args.out, args.onnx, args.torchscript) if p]
    real = [os.path.realpath(p) for p in outputs]
    if os.path.realpath(args.ckpt) in real:
        raise UserError(f"an output path equals --ckpt {args.ckpt}; write the deploy files elsewhere")
    if len(set(real)) != len(real):
        raise UserError("--out, --onnx and --torchscript must be different files")
    for p in outputs:
        folder = os.path.dirname(os.path.abspath(p))
        if os.path.isdir(p):
            raise UserError(f"{p} is a folder; give a file path")
        if not os.path.isdir(folder):
            raise UserError(f"folder {folder} of {p} does not exist; create it first")
    if args.opset < 17:
        raise UserError(f"--opset {args.opset} is too old; use 17 or newer")
    if args.check_batch < 1 or args.latency_runs < 0:
        raise UserError("--check_batch must be >= 1 and --latency_runs >= 0")


def main(argv=None):
    args = get_parser().parse_args(argv)
    _check_paths(args)
    ckpt = load_checkpoint(args.ckpt)
    model, _ = load_model(ckpt, use_ema=args.use_ema)
    cfg = ckpt["model_config"]
    model.eval()  # fusion uses the BN running statistics: compare in eval mode
    deploy = copy.deepcopy(model)
    n = count_reparameterizable(deploy)
    reparameterize_model(deploy)
    if n == 0:
        why = " (it is already re-parameterised)" if cfg.get("reparameterized") else ""
        print(f"nothing to re-parameterise in {cfg['name']}{why}; the deploy checkpoint equals the trained one")

    shape = (cfg["in_chans"], cfg["img_size"], cfg["img_size"])
    batches = {"random batch": torch.rand(args.check_batch, *shape, generator=torch.Generator().manual_seed(0))}
    x_real = real_batch(ckpt.get("args"), shape, args.check_batch)
    if x_real is not None:
        batches["real batch"] = x_real
    tmp = {p: f"{p}.tmp{os.getpid()}" for p in (args.onnx, args.torchscript) if p}
    try:
        with torch.no_grad():
            expected = {name: model(x) for name, x in batches.items()}
            for name, x in batches.items():
                check_outputs(f"re-parameterised vs trained, {name}", deploy(x), expected[name],
                              args.rtol, args.atol)
            if args.onnx:
                export_onnx(deploy, batches, expected, tmp[args.onnx], args.opset, args.rtol, args.atol)
            if args.torchscript:
                export_torchscript(deploy, batches, expected, tmp[args.torchscript], args.rtol, args.atol)
        # Everything checked: write the deploy checkpoint, then move the exports into place.
        save_checkpoint({"model": deploy.state_dict(), "model_config": {**cfg, "reparameterized": True},
                         "class_names": ckpt.get("class_names"), "args": ckpt.get("args")}, args.out)
        print(f"wrote {args.out}")
        for final, t in tmp.items():
            os.replace(t, final)
            print(f"wrote {final}")
    except Mismatch as e:
        print(f"error: {e}; nothing written", file=sys.stderr)
        return 1
    finally:
        for t in tmp.values():
            if os.path.exists(t):
                os.remove(t)

    with torch.inference_mode():
        print_table(profile(model, shape, args.latency_runs), profile(deploy, shape, args.latency_runs))
    return 0


if __name__ == "__main__":
    from utils.logger import setup_logging
    setup_logging()
    sys.exit(run_cli(main))
