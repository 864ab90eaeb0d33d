"""train.py wires each trick flag to its object: one tiny run with many flags, checked through its outputs
(a flag parsed and then ignored would leave these traces missing)."""
import json

import torch

import config
import train
from conftest import QUICK, needs_fmnist

pytestmark = needs_fmnist


def test_trick_flags_reach_the_run(tmp_path, monkeypatch):
    seen = {}
    orig_criterion, orig_step = train.make_criterion, train.train_one_epoch

    def spy_criterion(label_smoothing=0.0, class_weights=None):
        seen["label_smoothing"], seen["class_weights"] = label_smoothing, class_weights
        return orig_criterion(label_smoothing, class_weights)

    def spy_epoch(*a, **kw):
        seen.setdefault("epochs", []).append({k: kw[k] for k in ("mix", "attack", "awp", "ema", "clip_grad")})
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
    assert first["ema"] is not None and first["awp"] is None
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
