"""train.py wires each trick flag to its object: one tiny run with many flags, checked through its outputs
(a flag parsed and then ignored would leave these traces missing)."""
import json

import pytest
import torch
from conftest import QUICK, needs_fmnist

import config
import train
from utils.errors import UserError

pytestmark = needs_fmnist


def test_trick_flags_reach_the_run(tmp_path, monkeypatch):
    seen = {}
    orig_criterion, orig_step = train.make_criterion, train.train_one_epoch

    def spy_criterion(label_smoothing=0.0, class_weights=None):
        seen["label_smoothing"], seen["class_weights"] = label_smoothing, class_weights
        return orig_criterion(label_smoothing, class_weights)

    def spy_epoch(*a, **kw):
        tricks = a[8]  # the StepTricks bundle
        names = ("mix", "attack", "perturb_weights", "ema", "clip_grad")
        seen.setdefault("epochs", []).append({k: getattr(tricks, k) for k in names})
        return orig_step(*a, **kw)

    monkeypatch.setattr(train, "make_criterion", spy_criterion)
    monkeypatch.setattr(train, "train_one_epoch", spy_epoch)
    out = tmp_path / "run"
    args = config.parse_args([*QUICK, "--epochs", "2", "--eval_subset", "64", "--output_dir", str(out),
                              "--ema", "--swa", "--swa_start", "1", "--eval_adv", "pgd", "--eval_adv_steps", "1",
                              "--adv", "fgsm", "--mixup_alpha", "0.2", "--mix_off_epoch", "2", "--attention", "se",
                              "--drop_path_rate", "0.1", "--zero_init_residual", "--no_bias_decay",
                              "--label_smoothing", "0.1", "--clip_grad", "1.0", "--class_weights", "auto",
                              "--tensorboard"])
    summary = train.main(args)

    assert seen["label_smoothing"] == 0.1
    torch.testing.assert_close(seen["class_weights"].cpu(), torch.ones(10), atol=0.05, rtol=0)  # balanced subset
    first, second = seen["epochs"]
    assert first["mix"] is not None and second["mix"] is None  # --mix_off_epoch 2: mixing stops at epoch 2
    assert first["attack"] is not None and first["attack"].kind == "fgsm" and first["clip_grad"] == 1.0
    assert first["ema"] is not None and first["perturb_weights"] is None
    for key in ("final_val_acc_ema", "swa_val_acc", "test_acc_swa", "robust_val_acc"):
        assert key in summary, key
    assert summary["robust_val_acc"] <= summary["final_val_acc"] + 1e-9
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert len(ckpt["optimizer"]["param_groups"]) == 2  # --no_bias_decay: decay and no-decay groups
    assert ckpt["model_config"]["attention"] == "se" and ckpt["model_config"]["drop_path_rate"] == 0.1
    assert ckpt["ema"]["num_updates"] > 0
    assert (out / "swa.pt").is_file() and (out / "eval_report.json").is_file()
    assert any((out / "tb").iterdir())
    rows = (out / "metrics.csv").read_text().splitlines()
    assert "val_acc_ema" in rows[0] and "robust_val_acc" in rows[0] and len(rows) == 3
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2


def test_init_tta_awp_start_threads_amp_compile_reach_the_run(tmp_path, monkeypatch):
    """--init (non-LSUV), --tta, --tta_shift, --awp_start_epoch, --threads, --amp_dtype, --compile, --eval_interval."""
    seen = {"evaluate": [], "epochs": []}
    orig_init, orig_eval, orig_epoch = train.init_weights, train.evaluate, train.train_one_epoch

    def spy_init(model, scheme, mode, nonlinearity, std=None):
        seen["init"] = scheme
        orig_init(model, scheme, mode, nonlinearity, std=std)
        seen["fc_std"] = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight.std().item()

    def spy_eval(*a, **kw):
        seen["evaluate"].append((kw.get("tta"), kw.get("tta_shift")))
        return orig_eval(*a, **kw)

    def spy_epoch(*a, **kw):
        prec = a[6]
        seen["epochs"].append({"awp": a[8].perturb_weights, "dtype": prec.dtype, "threads": torch.get_num_threads(),
                               "compiled": isinstance(a[0], torch.nn.Sequential)})
        return orig_epoch(*a, **kw)

    monkeypatch.setattr(train, "init_weights", spy_init)
    monkeypatch.setattr(train, "evaluate", spy_eval)
    monkeypatch.setattr(train, "train_one_epoch", spy_epoch)
    monkeypatch.setattr(train.torch, "compile", lambda m: torch.nn.Sequential(m))  # a wrapper, no compile time
    threads = torch.get_num_threads()
    out = tmp_path / "run"
    args = config.parse_args([*QUICK, "--epochs", "3", "--eval_subset", "64", "--output_dir", str(out),
                              "--init", "xavier_uniform", "--tta", "--tta_shift", "1", "--adv", "awp",
                              "--awp_start_epoch", "1", "--threads", "1", "--amp", "--amp_dtype", "bf16", "--compile",
                              "--eval_interval", "2"])
    try:
        train.main(args)
    finally:
        torch.set_num_threads(threads)

    # Xavier-uniform fc (64 -> 10) with the relu gain: std = sqrt(2) * sqrt(2 / (64 + 10)) = 0.2325
    # (PyTorch's own Linear init would give 1 / sqrt(3 * 64) = 0.072)
    assert seen["init"] == "xavier_uniform"
    assert abs(seen["fc_std"] - 2 ** 0.5 * (2 / 74) ** 0.5) < 0.02
    first, second, third = seen["epochs"]
    assert first["awp"] is None and second["awp"] is not None and third["awp"] is not None
    assert all(e["dtype"] == torch.bfloat16 and e["threads"] == 1 and e["compiled"] for e in seen["epochs"])
    # --eval_interval 2 over 3 epochs: evaluated after epochs 2 and 3, always with the flip + shift TTA
    assert seen["evaluate"] == [(True, 1), (True, 1)]
    rows = (out / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 4 and rows[1].split(",")[header.index("val_acc")] == ""
    assert rows[2].split(",")[header.index("val_acc")] != ""


def test_eval_interval_0_evaluates_after_the_last_epoch_only(tmp_path, monkeypatch):
    calls = []
    orig_eval = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a, **kw: calls.append(1) or orig_eval(*a, **kw))
    out = tmp_path / "run"
    train.main(config.parse_args([*QUICK, "--epochs", "3", "--eval_subset", "64", "--eval_interval", "0",
                                  "--output_dir", str(out)]))
    rows = [r.split(",") for r in (out / "metrics.csv").read_text().splitlines()]
    col = rows[0].index("val_acc")
    assert len(calls) == 1 and [r[col] != "" for r in rows[1:]] == [False, False, True]


def test_eval_interval_with_plateau_is_refused(tmp_path):
    with pytest.raises(UserError, match="eval_interval"):
        train.check_args(config.parse_args(["--scheduler", "plateau", "--eval_interval", "2"]))
    with pytest.raises(UserError, match="eval_interval"):
        train.check_args(config.parse_args(["--scheduler", "plateau", "--eval_interval", "0"]))
    with pytest.raises(UserError, match="eval_interval"):
        train.check_args(config.parse_args(["--eval_interval", "-1"]))
    with pytest.raises(UserError, match="tta_shift"):
        train.check_args(config.parse_args(["--tta_shift", "-1"]))


def test_airbench_flags_reach_the_run(tmp_path, monkeypatch):
    """--whiten_stem (frozen through training), --init dirac, --norm_bias_lr_scale."""
    from tricks.init import whiten_stem
    seen = {}
    orig_whiten = train.whiten_stem

    def spy_whiten(model, batch):
        seen["batch"] = batch.clone()
        result = orig_whiten(model, batch)
        seen["stem"] = model.net.stem.weight.detach().clone()
        return result

    monkeypatch.setattr(train, "whiten_stem", spy_whiten)
    out = tmp_path / "run"
    args = config.parse_args([*QUICK, "--model", "airnet_s", "--output_dir", str(out), "--whiten_stem",
                              "--init", "dirac", "--norm_bias_lr_scale", "16", "--weight_decay", "0.01"])
    train.main(args)
    assert seen["batch"].shape == (512, 1, 28, 28)  # all of the 512-image subset (< 5,000)
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    # Frozen: the trained stem is the stem right after whitening, and its 2 x 9 whitening filters equal a
    # fresh whitening of that batch.
    torch.testing.assert_close(ckpt["model"]["net.stem.weight"], seen["stem"].cpu())
    fresh = train.build_model(**{k: v for k, v in ckpt["model_config"].items() if k != "reparameterized"})
    whiten_stem(fresh, seen["batch"].cpu())
    torch.testing.assert_close(seen["stem"][:18].cpu(), fresh.net.stem.weight.detach()[:18])
    groups = ckpt["optimizer"]["param_groups"]
    assert [(g["weight_decay"]) for g in groups] == [0.01, 0.01 / 16]
    assert groups[1]["initial_lr"] == 16 * groups[0]["initial_lr"]


def test_alternating_flip_reaches_the_training_loader():
    from datasets import build_data
    args = config.parse_args([*QUICK, "--hflip", "0.5", "--hflip_mode", "alternate"])
    data = build_data(args)
    assert data.train_loader.flip_bits is not None and data.train_loader.flip_bits.shape == (512,)
    assert data.val_loader.flip_bits is None  # evaluation never flips
    plain = build_data(config.parse_args([*QUICK, "--hflip", "0.5"]))
    assert plain.train_loader.flip_bits is None
